"""Which jobs an SDXL refiner finishes, and a worker's refiner setup as spot checks match it.

An image worker started with `--refiner` (worker.image.refiner) hands the end of the
schedule of some jobs to the refiner: other pixels than its base model alone makes. The
engine (worker.image.engine) and the coordinator's spot checks
(coordinator.economy.checks) both read the rule here, so a check of a job goes only to a
checker whose refiner makes the same pixels for it.
"""

from __future__ import annotations

from protocol.params import ImageParams

__all__ = ["NO_REFINER", "refiner_setup", "refiner_takes"]

# the setup of a worker without a refiner
NO_REFINER = "none"


def refiner_takes(params: ImageParams) -> bool:
    """Whether a worker with a refiner hands the job to it: plain txt2img only (no source
    image, so no ControlNet either; no LoRAs nor textual inversions, which the refiner has
    not loaded). A hires fix job is refined only when its model is native at the job's
    size (no second pass runs, worker.image.hires): the engine knows its model's native
    side, the coordinator does not, so it treats such a job as one the refiner may take."""
    return params.source_processing == "txt2img" and not params.loras and not params.tis


def refiner_setup(refiner_sha256: str | None, refiner_switch: float | None) -> str:
    """A worker's refiner setup as one string (protocol.messages.EngineInfo's fields):
    `NO_REFINER`, or the refiner's SHA-256 and switch point; two workers of the same
    setup refine the same jobs the same way."""
    if refiner_sha256 is None:
        return NO_REFINER
    return f"{refiner_sha256}@{float(refiner_switch or 0.0)!r}"
