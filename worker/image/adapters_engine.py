"""LoRAs and textual inversions in the engine (inside the sandbox).

The reproducibility contract: an image with LoRAs is the one the diffusers pipeline makes
after `load_lora_weights(file, adapter_name=...)` and `set_adapters(names,
adapter_weights=[{"unet": model, "text_encoder": clip}, ...])`, not fused; a textual
inversion is `load_textual_inversion(file, token=name)` (with `strength` != 1 its vectors
are scaled first). Files are read with safetensors only, from the cache folder the worker
binds read-only. A plain job after an adapted one runs on the unloaded, original weights.
"""

from __future__ import annotations

import logging
from typing import Any

from safetensors.torch import load_file

from protocol.adapted import AdaptedImage, EngineLora, EngineTi
from protocol.params import ImageParams
from worker.errors import AdapterUnavailable, InvalidGenerationInput

__all__ = ["EngineAdapters"]

log = logging.getLogger(__name__)


class EngineAdapters:
    """The LoRAs and TIs loaded into one pipeline (kept loaded while jobs repeat them)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._loaded: tuple[tuple[EngineLora, ...], tuple[EngineTi, ...]] = ((), ())
        # the parameters the loaded set was applied for (`check` lets only them through)
        self._for: ImageParams | None = None

    def apply(self, request: AdaptedImage) -> None:
        """Load what `request` names (unloading anything else) for its `params`."""
        params = request.params
        if len(request.loras) != len(params.loras) or len(request.tis) != len(params.tis):
            raise InvalidGenerationInput(
                "loras",
                f"the job names {len(params.loras)} LoRAs and {len(params.tis)} textual "
                f"inversions, but {len(request.loras)} and {len(request.tis)} files came",
            )
        wanted = (tuple(request.loras), tuple(request.tis))
        if wanted != self._loaded:
            self.clear()
            self._loaded = wanted
            try:
                self._load(*wanted)
            except BaseException:
                self.clear()
                raise
        self._for = params

    def check(self, params: ImageParams) -> None:
        """Before a job runs: a job without adapters runs on the original weights; one with
        them only after `apply` (the IMAGE call alone never serves them)."""
        if params is self._for:
            return
        if params.loras or params.tis:
            raise InvalidGenerationInput(
                "loras", "LoRAs and textual inversions come through the adapted_image call"
            )
        self.clear()

    def hashes(self) -> dict[str, str]:
        """A1111's `Lora hashes` and `TI hashes` of what is loaded (name: first 10 hex digits
        of the file's SHA-256, CivitAI's AutoV2), for the PNG's parameters."""
        loras = [lora for lora in self._loaded[0] if lora.sha256]
        tis = [ti for ti in self._loaded[1] if ti.sha256]
        found = {}
        if loras:
            found["Lora hashes"] = ", ".join(f"{x.name}: {x.sha256[:10]}" for x in loras)
        if tis:
            found["TI hashes"] = ", ".join(f"{x.token}: {x.sha256[:10]}" for x in tis)
        return found

    def clear(self) -> None:
        loras, tis = self._loaded
        if loras:
            self.pipe.unload_lora_weights()
        if tis:
            self.pipe.unload_textual_inversion()
        self._loaded = ((), ())
        self._for = None

    def _load(self, loras: tuple[EngineLora, ...], tis: tuple[EngineTi, ...]) -> None:
        try:
            for lora in loras:
                self.pipe.load_lora_weights(load_file(lora.path), adapter_name=lora.adapter)
            if loras:
                self.pipe.set_adapters(
                    [lora.adapter for lora in loras],
                    adapter_weights=[
                        {"unet": lora.model, "text_encoder": lora.clip} for lora in loras
                    ],
                )
        except Exception as exc:
            # (a kind diffusers cannot load, or keys it does not know: the LoRA's fault)
            names = ", ".join(repr(lora.name or lora.adapter) for lora in loras)
            raise AdapterUnavailable(
                "parse_failed", f"LoRA {names} cannot be loaded: {exc}"
            ) from None
        for ti in tis:
            state = load_file(ti.path)
            if ti.strength != 1.0:
                state = {key: value * ti.strength for key, value in state.items()}
            try:
                self.pipe.load_textual_inversion(state, token=ti.token)
            except Exception as exc:
                raise AdapterUnavailable(
                    "parse_failed", f"textual inversion {ti.token!r} cannot be loaded: {exc}"
                ) from None
        log.info("loaded %d LoRAs and %d textual inversions", len(loras), len(tis))
