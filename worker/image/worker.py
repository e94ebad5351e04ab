"""The image worker daemon: pop jobs that fit, run them in the sandboxed engine, submit
signed results. Engine crashes and hangs give the job back and restart the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from protocol.adapted import ADAPTED_IMAGE
from protocol.control import mappable_types
from protocol.engine import IMAGE, IMAGE_INFO, ImageEngineOptions, ImageProgress, NoMessage
from protocol.loras import Baseline
from protocol.messages import LeasedJob
from protocol.params import sampled_steps
from protocol.signing import params_hash
from sandbox import Sandbox, SandboxPolicy
from sandbox.errors import EngineCrashed, EngineFailed, EngineTimedOut
from worker.common.donor import build_gate
from worker.common.link import Capabilities, CoordinatorLink, retrying
from worker.common.service import Drain, Gate, serve_jobs
from worker.common.status import WorkerStatus
from worker.errors import (
    AdapterUnavailable,
    BaselineConflict,
    CoordinatorRejected,
    CoordinatorUnavailable,
    LeaseLost,
)
from worker.image.adapters import Adapters, PreparedJob
from worker.image.checkpoint_hash import model_sha256
from worker.image.config import ImageWorkerConfig

__all__ = ["ENGINE", "LORA_BASELINES", "ImageWorker", "PreviewGate", "engine_policy"]

log = logging.getLogger(__name__)

# the engine class the sandbox child imports (the parent never imports it)
ENGINE = "worker.image.engine:ImageEngine"
# the baselines whose checkpoints take LoRAs and textual inversions (all of them:
# worker.image.adapters_engine)
LORA_BASELINES: tuple[Baseline, ...] = ("sd1", "sd2", "sdxl")


class ImageWorker:
    """Create with `await ImageWorker.create(config, identity)`; then `run(stop)`; `aclose()`."""

    def __init__(
        self,
        config: ImageWorkerConfig,
        sandbox: Sandbox,
        link: CoordinatorLink,
        *,
        gate: Gate | None = None,
        inpainting_checkpoint: bool = False,
        adapters: Adapters | None = None,
        checkpoint_sha256: str | None = None,
        baseline: Baseline = "sd1",
        refiner_sha256: str | None = None,
    ) -> None:
        self.config = config
        # the --refiner checkpoint's hash (worker.image.checkpoint_hash), in the engine info
        self.refiner_sha256 = refiner_sha256
        self.sandbox = sandbox
        self.link = link
        # the engine serves source images and masks (worker.image.sources); an inpainting
        # checkpoint (9-channel UNet) only inpainting and outpainting, as on AI Horde
        self.capabilities = Capabilities(
            models=[config.model_name],
            max_pixels=config.max_pixels,
            max_steps=config.max_steps,
            txt2img=not inpainting_checkpoint,
            img2img=not inpainting_checkpoint,
            inpainting=True,
            post_processors=list(config.post_processors),
            # ControlNet: the types it has a model for; of those, the ones whose control map
            # it can make (the others only from a ready map: image_is_control)
            controlnets=sorted(config.controlnets),
            control_annotators=sorted(set(config.controlnets) & mappable_types(config.annotators)),
            loras=adapters is not None and baseline in LORA_BASELINES,
            # checked against the coordinator's image model reference
            checkpoint_sha256=checkpoint_sha256,
            baseline=baseline,
        )
        # LoRAs and textual inversions from CivitAI (None: not taken)
        self.adapters = adapters
        self.jobs_done = 0
        # donor controls (worker.common.donor); tests pass a gate with fake sources
        self.gate = gate if gate is not None else build_gate(config.donor)
        self.status = WorkerStatus(config.name)
        # run_until_signalled starts it on the first SIGINT/SIGTERM
        self.drain = Drain(on_start=lambda: self.status.set_state("draining"))

    @classmethod
    async def create(cls, config: ImageWorkerConfig, link: CoordinatorLink) -> ImageWorker:
        # (a restart with unchanged files reads them from the cache, not the disk)
        checkpoint = await asyncio.to_thread(
            model_sha256, config.model, config.checkpoint_hash_cache
        )
        log.info("checkpoint %s has SHA-256 %s", config.model, checkpoint)
        refiner = None
        if config.refiner is not None:
            refiner = await asyncio.to_thread(
                model_sha256, str(config.refiner), config.checkpoint_hash_cache
            )
            log.info("refiner %s has SHA-256 %s", config.refiner, refiner)
        options = ImageEngineOptions(
            model=config.model,
            model_config=str(config.model_config) if config.model_config else None,
            model_name=config.model_name,
            threads=config.threads,
            max_vram_bytes=config.max_vram_bytes,
            low_vram=config.low_vram,
            max_batch_pixels=config.max_batch_pixels,
            post_processors=(
                str(config.post_processors_dir) if config.post_processors_dir else None
            ),
            controlnets={kind: str(path) for kind, path in config.controlnets.items()},
            annotators={name: str(path) for name, path in config.annotators.items()},
            preview_every=config.preview_every,
            preview_decoder=str(config.preview_decoder) if config.preview_decoder else None,
            refiner=None if config.refiner is None else str(config.refiner),
            refiner_config=None if config.refiner_config is None else str(config.refiner_config),
            refiner_switch=config.refiner_switch,
        )
        adapters = None
        if config.adapters is not None:
            # (creates the cache folder, which the sandbox binds read-only)
            adapters = await Adapters.create(config.adapters)
        try:
            sandbox = await Sandbox.create(
                ENGINE, options.model_dump(mode="json", by_alias=True), engine_policy(config)
            )
        except BaseException:
            if adapters is not None:
                await adapters.aclose()
            raise
        try:
            loaded = (await sandbox.run(IMAGE_INFO, NoMessage())).data
            if config.baseline is not None and config.baseline != loaded.baseline:
                raise BaselineConflict(
                    f"--baseline {config.baseline}: {loaded.model} is an {loaded.baseline} "
                    f"checkpoint (its architecture says so); give --baseline {loaded.baseline} "
                    "or leave the flag out"
                )
        except BaseException:
            await sandbox.aclose()
            if adapters is not None:
                await adapters.aclose()
            raise
        peak = loaded.peak_memory_bytes
        log.info(
            "engine loaded %s (%s), peak memory %s",
            loaded.model,
            loaded.dtype,
            "unknown" if peak is None else f"{peak / 2**20:.0f} MiB",
        )
        if loaded.inpainting:
            log.info("%s is an inpainting checkpoint: serving only inpainting", loaded.model)
        if adapters is not None:
            adapters.settings = replace(adapters.settings, baseline=loaded.baseline)
            if loaded.baseline not in LORA_BASELINES:
                log.warning(
                    "%s is an %s checkpoint: it takes no LoRAs or textual inversions yet",
                    loaded.model,
                    loaded.baseline,
                )
        return cls(
            config,
            sandbox,
            link,
            inpainting_checkpoint=loaded.inpainting,
            adapters=adapters,
            checkpoint_sha256=checkpoint,
            baseline=loaded.baseline,
            refiner_sha256=refiner,
        )

    async def aclose(self) -> None:
        try:
            await self.sandbox.aclose()
        finally:
            if self.adapters is not None:
                await self.adapters.aclose()

    async def run(self) -> None:
        """Serve until cancelled."""
        registered = await retrying("register", self.link.register)
        log.info("registered as worker %s", registered.worker_id)
        try:
            await self.link.report_engine(
                engine_info(
                    sandboxed=not self.config.unsandboxed,
                    checkpoint_sha256=self.capabilities.checkpoint_sha256,
                    baseline=self.capabilities.baseline,
                    low_vram=self.config.low_vram,
                    max_batch_pixels=self.config.max_batch_pixels,
                    refiner_sha256=self.refiner_sha256,
                    refiner_switch=self.config.refiner_switch if self.config.refiner else None,
                )
            )
        except (CoordinatorRejected, CoordinatorUnavailable) as exc:
            log.warning("could not report the engine build (spot checks will be lenient): %s", exc)
        print(
            f"idlegrid image worker {self.config.name} ready: model {self.config.model_name}, "
            f"worker id {registered.worker_id}",
            flush=True,
        )
        await serve_jobs(
            self.link,
            lambda: self.link.pop(self.offer(), self.config.pop_wait),
            self.serve,
            gate=self.gate,
            drain=self.drain,
            status=self.status,
            gate_poll=self.config.gate_poll,
        )

    def offer(self) -> Capabilities:
        """What to pop now: no LoRA jobs while CivitAI is unreachable (adapters.Backoff)."""
        if self.adapters is not None and not self.adapters.accepting:
            return self.capabilities.model_copy(update={"loras": False})
        return self.capabilities

    async def serve(self, job: LeasedJob) -> None:
        if params_hash(job.params) != job.params_hash:
            await self._give_back(
                job, "params hash mismatch: coordinator and worker versions differ"
            )
            return
        started = time.monotonic()
        # Jobs shorter than one interval finish without any progress traffic.
        last_report = started
        # where the engine is: (image, step, steps), repeated by the heartbeat
        position = (0, 0, sampled_steps(job.params))

        # live previews: sent only while the coordinator says someone watches with them on
        previews = PreviewGate(self.config.preview_interval)

        async def report(image: int, step: int, steps: int, preview: str | None = None) -> None:
            nonlocal last_report
            last_report = time.monotonic()
            try:
                extended = await self.link.progress(job.id, image, step, steps, preview)
            except (CoordinatorUnavailable, LeaseLost) as exc:
                log.warning("progress report for job %s failed: %s", job.id, exc)
                return
            previews.wanted = extended.previews

        async def on_progress(event: ImageProgress) -> None:
            nonlocal position
            position = (event.image, event.step, event.steps)
            now = time.monotonic()
            preview = previews.take(event.preview, now)
            if preview is not None:
                await report(*position, preview)
                return
            # The result follows the last step at once, so reporting it would only delay it.
            if now - last_report < self.config.progress_interval or event.step == event.steps:
                return
            await report(*position)

        async def heartbeat() -> None:
            # Encoding a source image and decoding the result report no sampling step
            # and can take longer than a lease on a slow machine: while the engine works,
            # repeat the last position whenever nothing was reported for an interval.
            interval = self.heartbeat_interval(job)
            while True:
                await asyncio.sleep(max(0.0, last_report + interval - time.monotonic()))
                if time.monotonic() - last_report >= interval:
                    await report(*position)

        try:
            sources = await self.link.sources(job)
        except LeaseLost as exc:
            log.warning("job %s was taken back before its sources arrived: %s", job.id, exc)
            return
        except (CoordinatorRejected, CoordinatorUnavailable) as exc:
            log.error("could not download the sources of job %s: %s", job.id, exc)
            await self._give_back(job, f"source download failed: {exc}")
            return
        prepared: PreparedJob | None = None
        if job.params.loras or job.params.tis:
            try:
                prepared = await self._prepare_adapters(job)
            except AdapterUnavailable as exc:
                # (AI Horde's gen_metadata code leads the reason: download_failed, ...)
                log.error("job %s: %s", job.id, exc)
                await self._give_back(job, str(exc))
                return
            except asyncio.CancelledError:
                await asyncio.shield(self._give_back(job, "worker shutting down"))
                raise
        beating = asyncio.create_task(heartbeat())
        try:
            # (EngineMisbehaved, a malformed message from the engine, is an EngineCrashed)
            if prepared is None:
                result = await self.sandbox.run(
                    IMAGE, job.params, blobs=sources, on_progress=on_progress
                )
            else:
                result = await self.sandbox.run(
                    ADAPTED_IMAGE, prepared.request, blobs=sources, on_progress=on_progress
                )
        except (EngineCrashed, EngineTimedOut, EngineFailed) as exc:
            log.error("engine failed on job %s: %s", job.id, exc)
            if isinstance(exc, EngineFailed) and exc.error_type == AdapterUnavailable.__name__:
                # a LoRA or TI the engine cannot load: its reason as AI Horde names it
                await self._give_back(job, exc.message)
            else:
                await self._give_back(job, f"{type(exc).__name__}: {exc}")
            # Reload before asking for more work, so no lease runs out during the reload.
            await self.sandbox.ensure_running()
            return
        except asyncio.CancelledError:
            await asyncio.shield(self._give_back(job, "worker shutting down"))
            raise
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        seeds = result.data.seeds
        try:
            used = prepared.resolved if prepared is not None else None
            accepted = await retrying(
                "submit", lambda: self.link.submit(job, seeds, result.blobs, used)
            )
        except LeaseLost as exc:
            log.warning("job %s was taken back before we finished: %s", job.id, exc)
            return
        except CoordinatorRejected as exc:
            # Sending the same result again would be refused again: give the job back now
            # (requeued for another worker) rather than hold it until the lease runs out.
            log.error("result of job %s refused, giving the job back: %s", job.id, exc)
            await self._give_back(job, f"result refused: {exc}")
            return
        self.jobs_done += 1
        self.status.job_paid(accepted.kudos_earned)
        peak = result.data.peak_memory_bytes
        log.info(
            "job %s done in %.2fs, peak memory %s, earned %d kudos",
            job.id,
            time.monotonic() - started,
            "unknown" if peak is None else f"{peak / 2**20:.0f} MiB",
            accepted.kudos_earned,
        )

    async def _prepare_adapters(self, job: LeasedJob) -> PreparedJob:
        """The job's LoRAs and TIs, resolved and downloaded (AdapterUnavailable if not)."""
        if self.adapters is None:
            raise AdapterUnavailable("download_failed", "this worker takes no LoRAs")
        # keep the lease while downloading: progress at step 0
        position = (0, 0, sampled_steps(job.params))
        preparing = asyncio.ensure_future(self.adapters.prepare(job.params))
        interval = self.heartbeat_interval(job)
        try:
            while True:
                done, _ = await asyncio.wait({preparing}, timeout=interval)
                if done:
                    return preparing.result()
                try:
                    await self.link.progress(job.id, *position)
                except (CoordinatorUnavailable, LeaseLost) as exc:
                    log.warning("progress report for job %s failed: %s", job.id, exc)
        finally:
            if not preparing.done():
                preparing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await preparing

    def heartbeat_interval(self, job: LeasedJob) -> float:
        """Seconds without a report after which the worker reports again while its engine
        works: the configured interval, else a third of the job's lease."""
        if self.config.heartbeat_interval is not None:
            return self.config.heartbeat_interval
        return max(job.lease_seconds / 3, self.config.progress_interval, 0.1)

    async def _give_back(self, job: LeasedJob, reason: str) -> None:
        try:
            async with asyncio.timeout(10):
                await self.link.fail(job.id, reason)
        except (CoordinatorUnavailable, LeaseLost, CoordinatorRejected, TimeoutError) as exc:
            # The lease will expire on its own and the job will be requeued then.
            log.warning("could not give job %s back: %s", job.id, exc)


class PreviewGate:
    """Which of the engine's previews of a job to send: none until the coordinator says
    a requester watches with previews on (`wanted`, from each LeaseExtended), then at most
    one per `interval` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.wanted = False
        self._sent: float | None = None

    def take(self, preview: str | None, now: float) -> str | None:
        """`preview` if it should go now (and counts it as sent), else None."""
        if preview is None or not self.wanted:
            return None
        if self._sent is not None and now - self._sent < self.interval:
            return None
        self._sent = now
        return preview


def engine_policy(config: ImageWorkerConfig) -> SandboxPolicy:
    """The engine's confinement: no network, the model read-only, nothing else of ours."""
    model_files = [Path(config.model), *config.controlnets.values(), *config.annotators.values()]
    if config.model_config is not None:
        model_files.append(config.model_config)
    if config.post_processors_dir is not None:
        model_files.append(config.post_processors_dir)
    if config.preview_decoder is not None:
        model_files.append(config.preview_decoder)
    if config.refiner is not None:
        model_files.append(config.refiner)
    if config.refiner_config is not None:
        model_files.append(config.refiner_config)
    if config.adapters is not None:
        # downloaded by the worker (worker.image.adapters), read by the engine
        model_files.append(config.adapters.cache_dir)
    return SandboxPolicy(
        start_timeout=config.load_timeout,
        job_timeout=config.job_timeout,
        # hub models are downloaded by the worker before the engine starts
        extra_env={"HF_HUB_OFFLINE": "1"},
        confine=not config.unsandboxed,
        read_only=tuple(path.resolve() for path in model_files),
        packages=("sandbox", "protocol", "worker"),
        memory_bytes=config.max_ram_bytes,
    )


def _nvidia_gpu() -> str | None:
    """The first NVIDIA GPU's model, from the driver's /proc files (no torch import)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        for info in sorted(gpus.glob("*/information")):
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def engine_info(
    sandboxed: bool = True,
    *,
    checkpoint_sha256: str | None = None,
    baseline: str | None = None,
    low_vram: bool = False,
    max_batch_pixels: int = 1024 * 1024,
    refiner_sha256: str | None = None,
    refiner_switch: float | None = None,
) -> dict[str, Any]:
    """The engine build as spot checks compare it: package versions, device, dtype, the
    checkpoint (its hash and family, when known), and what changes the last bits of
    pixels: `--low-vram` (sliced attention; float16 on CUDA) and `--max-batch-pixels` (how
    a job's images are batched: worker.image.batch), and the SDXL refiner (`--refiner`: its
    hash and switch point; absent without one: workers with and without one, or with
    another, make other pixels for the same txt2img job).

    The engine runs on CUDA when torch is a CUDA build and a GPU is present (see
    worker.image.engine); both are read here without importing torch.
    """
    versions = {}
    for package in (
        "torch",
        "diffusers",
        "transformers",
        "numpy",
        "pillow",
        "opencv-python-headless",  # (the canny, scribble and HED control maps)
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    gpu = _nvidia_gpu()
    cuda_build = "+cu" in versions.get("torch", "")
    device = f"cuda:{gpu}" if gpu and cuda_build else "cpu"
    return {
        "engine": "diffusers",
        "versions": versions,
        "device": device,
        "dtype": "float16" if low_vram and device != "cpu" else "float32",
        "sandboxed": sandboxed,
        **({"checkpoint_sha256": checkpoint_sha256} if checkpoint_sha256 else {}),
        **({"baseline": baseline} if baseline else {}),
        "low_vram": low_vram,
        "max_batch_pixels": max_batch_pixels,
        **({"refiner_sha256": refiner_sha256} if refiner_sha256 else {}),
        **({"refiner_switch": refiner_switch} if refiner_switch is not None else {}),
    }
