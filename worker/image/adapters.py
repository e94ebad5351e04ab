"""A job's LoRAs and textual inversions, made ready in the worker before the engine runs.

Each is resolved through CivitAI (worker.image.civitai), checked against the checkpoint's
baseline and any pin (`sha256`, set on verification re-runs), and fetched into the cache
(worker.image.lora_cache), whose folder the sandbox binds read-only. Trigger words and TI
tokens are injected into the prompt only when the job asks (`inject_trigger`,
`inject_ti`): "any" appends the first trigger word, "all" all of them, other text those
that contain it (ignoring case), else the first; a TI's token goes at the start of the
prompt, or at the end of the negative prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from protocol.adapted import AdaptedImage, EngineLora, EngineTi
from protocol.loras import Baseline, LoraSpec, ResolvedAdapter, TiSpec, baseline_of
from protocol.params import ImageParams
from worker.errors import AdapterUnavailable
from worker.image.civitai import CivitaiApi, CivitaiFile, Kind
from worker.image.lora_cache import LoraCache

__all__ = ["AdapterSettings", "Adapters", "Backoff", "PreparedJob", "trigger_words"]

# seconds for one API call or one file download
_API_TIMEOUT = 30.0
_DOWNLOAD_TIMEOUT = 1800.0


@dataclass(frozen=True)
class AdapterSettings:
    # CivitAI's origin; the worker calls {url}/api/v1/... (--civitai-url)
    civitai_url: str
    # sent as a bearer token, for gated models and files (--civitai-token)
    civitai_token: str | None
    # the cache folder (bound read-only into the sandbox)
    cache_dir: Path
    # largest file accepted (--lora-max-mb) and the cache's cap (--lora-cache-gb)
    max_bytes: int
    cache_bytes: int
    # the checkpoint's baseline: LoRAs made for another are refused (None until the engine
    # has found it in the model: ImageWorker.create sets it)
    baseline: Baseline | None = None


@dataclass(frozen=True)
class PreparedJob:
    """What the engine runs, and what was resolved (signed into the result)."""

    request: AdaptedImage
    resolved: list[ResolvedAdapter]


def trigger_words(words: tuple[str, ...], inject: str) -> list[str]:
    """The trigger words `inject` asks for (see the module's docstring)."""
    if not words:
        return []
    if inject.lower() == "any":
        return [words[0]]
    if inject.lower() == "all":
        return list(words)
    matching = [word for word in words if inject.lower() in word.lower()]
    return matching or [words[0]]


class Backoff:
    """After CivitAI could not be reached, the worker takes no LoRA jobs for a while (`first`
    seconds, doubling up to `cap` while it stays unreachable), so they go to workers that
    can fetch them; plain jobs go on. `clock`: seconds, monotonic (tests pass their own)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        first: float = 30.0,
        cap: float = 600.0,
    ) -> None:
        self.clock = clock
        self.first = first
        self.cap = cap
        self.pause = 0.0
        self.until = 0.0

    def failed(self) -> None:
        self.pause = min(self.cap, self.pause * 2 if self.pause else self.first)
        self.until = self.clock() + self.pause

    def succeeded(self) -> None:
        self.pause = 0.0
        self.until = 0.0

    @property
    def open(self) -> bool:
        return self.clock() >= self.until


class Adapters:
    """Create with `await Adapters.create(settings)`; `aclose()` when done."""

    def __init__(self, settings: AdapterSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self.api = CivitaiApi(session, settings.civitai_url, settings.civitai_token)
        self.cache = LoraCache(settings.cache_dir, settings.max_bytes, settings.cache_bytes)
        self.backoff = Backoff()

    @classmethod
    async def create(cls, settings: AdapterSettings) -> Adapters:
        timeout = aiohttp.ClientTimeout(total=_DOWNLOAD_TIMEOUT, sock_connect=_API_TIMEOUT)
        return cls(settings, aiohttp.ClientSession(timeout=timeout, trust_env=False))

    async def aclose(self) -> None:
        await self.session.close()

    @property
    def accepting(self) -> bool:
        """Whether to take LoRA jobs now (not while CivitAI is unreachable: `Backoff`)."""
        return self.backoff.open

    async def prepare(self, params: ImageParams) -> PreparedJob:
        """Resolve, check and fetch the job's LoRAs and TIs; AdapterUnavailable with the
        reason (download_failed, baseline_mismatch) when one cannot be used."""
        try:
            prepared = await self._prepare(params)
        except AdapterUnavailable as exc:
            if exc.unreachable:
                self.backoff.failed()
            raise
        self.backoff.succeeded()
        return prepared

    async def _prepare(self, params: ImageParams) -> PreparedJob:
        prompt, negative = params.prompt, params.negative_prompt
        paths: list[Path] = []
        resolved: list[ResolvedAdapter] = []
        loras: list[EngineLora] = []
        for index, lora in enumerate(params.loras):
            file, path = await self._fetch(lora, "lora", paths)
            resolved.append(_resolved(file))
            loras.append(
                EngineLora(
                    path=str(path),
                    adapter=f"lora{index}",
                    model=lora.model,
                    clip=lora.clip,
                    sha256=file.sha256,
                    name=lora.name,
                )
            )
            if lora.inject_trigger:
                words = trigger_words(file.trained_words, lora.inject_trigger)
                if words:
                    prompt = ", ".join([prompt, *words])
        tis: list[EngineTi] = []
        for ti in params.tis:
            file, path = await self._fetch(ti, "ti", paths)
            resolved.append(_resolved(file))
            tis.append(
                EngineTi(path=str(path), token=ti.name, strength=ti.strength, sha256=file.sha256)
            )
            if ti.inject_ti == "prompt":
                prompt = f"{ti.name}, {prompt}"
            elif ti.inject_ti == "negprompt":
                negative = f"{negative}, {ti.name}" if negative else ti.name
        self.cache.touch(paths)
        engine_params = params.model_copy(update={"prompt": prompt, "negative_prompt": negative})
        return PreparedJob(AdaptedImage(params=engine_params, loras=loras, tis=tis), resolved)

    async def _fetch(
        self, spec: LoraSpec | TiSpec, kind: Kind, keep: list[Path]
    ) -> tuple[CivitaiFile, Path]:
        file = await self.api.resolve(spec, kind)
        what = f"{'LoRA' if kind == 'lora' else 'textual inversion'} {spec.name!r}"
        if spec.sha256 is not None and file.sha256 != spec.sha256:
            raise AdapterUnavailable(
                "download_failed",
                f"{what} was pinned to SHA256 {spec.sha256}, but CivitAI now gives "
                f"{file.sha256} for version {file.version_id}",
            )
        ours = self.settings.baseline
        theirs = baseline_of(file.base_model)
        base = file.base_model or "an unnamed base model"
        if theirs != ours:
            raise AdapterUnavailable(
                "baseline_mismatch",
                f"{what} (version {file.version_id}) is made for {base!r} "
                f"({theirs or 'no baseline served here'}), but this worker's checkpoint is {ours}",
            )
        path = await self.cache.fetch(self.session, file, self.api.headers, keep)
        keep.append(path)
        return file, path


def _resolved(file: CivitaiFile) -> ResolvedAdapter:
    return ResolvedAdapter(
        kind=file.kind, name=file.name, version_id=file.version_id, sha256=file.sha256
    )
