"""LoRAs and textual inversions in the engine (inside the sandbox).

The reproducibility contract: an image with LoRAs is the one the diffusers pipeline makes
after `load_lora_weights(file, adapter_name=...)` and `set_adapters(names,
adapter_weights=[{"unet": model, "text_encoder": clip}, ...])`, not fused (on SDXL the
clip strength is also `text_encoder_2`'s); a textual inversion is
`load_textual_inversion(file, token=name)` (with `strength` != 1 its vectors are scaled
first). An SDXL embedding holds a tensor per text encoder, as CivitAI's SDXL TIs do:
`clip_l` goes into `text_encoder`/`tokenizer`, `clip_g` into `text_encoder_2`/`tokenizer_2`
(diffusers' SDXL recipe), so the token stands for its vectors in both (the prompt encoding
converts a prompt for each tokenizer: worker.image.baselines.text_encoding). Files are read
with safetensors only, from the cache folder the worker binds read-only. A plain job after
an adapted one runs on the unloaded, original weights (on SDXL, both encoders' tokens are
unloaded).
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

# an SDXL embedding's tensors: for the first text encoder (CLIP ViT-L) and the second
# (OpenCLIP ViT-bigG)
_SDXL_TI_KEYS = ("clip_l", "clip_g")


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
            for tokenizer, text_encoder in self._text_encoders():
                self.pipe.unload_textual_inversion(tokenizer=tokenizer, text_encoder=text_encoder)
        self._loaded = ((), ())
        self._for = None

    def _load(self, loras: tuple[EngineLora, ...], tis: tuple[EngineTi, ...]) -> None:
        try:
            for lora in loras:
                self.pipe.load_lora_weights(load_file(lora.path), adapter_name=lora.adapter)
            if loras:
                self.pipe.set_adapters(
                    [lora.adapter for lora in loras],
                    adapter_weights=[self._weights(lora) for lora in loras],
                )
        except Exception as exc:
            # (a kind diffusers cannot load, or keys it does not know: the LoRA's fault)
            names = ", ".join(repr(lora.name or lora.adapter) for lora in loras)
            raise AdapterUnavailable(
                "parse_failed", f"LoRA {names} cannot be loaded: {exc}"
            ) from None
        for ti in tis:
            self._load_ti(ti)
        log.info("loaded %d LoRAs and %d textual inversions", len(loras), len(tis))

    @property
    def _xl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    def _text_encoders(self) -> list[tuple[Any, Any]]:
        """The (tokenizer, text encoder) pairs, in the order of `_SDXL_TI_KEYS` on SDXL."""
        pairs = [(self.pipe.tokenizer, self.pipe.text_encoder)]
        if self._xl:
            pairs.append((self.pipe.tokenizer_2, self.pipe.text_encoder_2))
        return pairs

    def _weights(self, lora: EngineLora) -> dict[str, float]:
        weights = {"unet": lora.model, "text_encoder": lora.clip}
        if self._xl:
            weights["text_encoder_2"] = lora.clip
        return weights

    def _load_ti(self, ti: EngineTi) -> None:
        state = load_file(ti.path)
        if ti.strength != 1.0:
            state = {key: value * ti.strength for key, value in state.items()}
        what = f"textual inversion {ti.token!r}"
        parts: list[tuple[Any, Any, Any]]
        if self._xl:
            missing = [key for key in _SDXL_TI_KEYS if key not in state]
            if missing:
                raise AdapterUnavailable(
                    "parse_failed",
                    f"{what} has no {' or '.join(missing)} tensor: an SDXL embedding holds "
                    f"one for each text encoder ({', '.join(_SDXL_TI_KEYS)})",
                )
            parts = [
                (state[key], tokenizer, text_encoder)
                for key, (tokenizer, text_encoder) in zip(
                    _SDXL_TI_KEYS, self._text_encoders(), strict=True
                )
            ]
        else:
            parts = [(state, self.pipe.tokenizer, self.pipe.text_encoder)]
        for embedding, tokenizer, text_encoder in parts:
            try:
                self.pipe.load_textual_inversion(
                    embedding, token=ti.token, tokenizer=tokenizer, text_encoder=text_encoder
                )
            except Exception as exc:
                raise AdapterUnavailable(
                    "parse_failed", f"{what} cannot be loaded: {exc}"
                ) from None
