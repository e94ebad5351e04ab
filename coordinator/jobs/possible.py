"""Whether any online worker could serve an image job: AI Horde's `is_possible`.

Every image pop says what the worker takes (`Offer`: size and step limits, and which
source processing: none, img2img, inpainting/outpainting); the coordinator keeps the last
one with the worker (`workers.offer`, coordinator.workers). `possible` holds a job against
the offers of the online, unpaused image workers with the rules of the pop itself
(coordinator.jobs.image._fits, which says the same in SQL): a job that no offer fits is
still queued (such a worker may come), and AI Horde's clients are told so, as AI Horde
tells them (`is_possible: false` in check/status, a `NoAvailableWorker` warning when the
request is made).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from protocol.horde import SAMPLERS_WITHOUT_HORDE_NAME
from protocol.params import ImageParams

__all__ = ["NO_WORKER_WARNING", "Offer", "WorkerOffer", "fits", "possible"]

# AI Horde's warning on a request no online worker can serve (its code and meaning)
NO_WORKER_WARNING = {
    "code": "NoAvailableWorker",
    "message": "No online worker can serve this request now (its model, size, steps or "
    "source image); it stays queued until one comes. Choose another model or a smaller "
    "request to have it served sooner.",
}


@dataclass(frozen=True)
class Offer:
    """What an image worker's pop takes besides its models (PopRequest's fields)."""

    max_pixels: int
    max_steps: int
    # jobs without a source image; with one (img2img); with a mask or alpha (inpainting
    # and outpainting)
    txt2img: bool = True
    img2img: bool = False
    inpainting: bool = False

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str | None) -> Offer | None:
        """The offer stored as `text`; None for none (or one this version cannot read)."""
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def takes(self, processing: str) -> bool:
        """Whether it takes jobs of this `source_processing`."""
        if processing == "txt2img":
            return self.txt2img
        if processing == "img2img":
            return self.img2img
        return self.inpainting


@dataclass(frozen=True)
class WorkerOffer:
    """An online image worker as `possible` sees it."""

    models: tuple[str, ...]
    # whether it signs its results (ours) or not (an AI Horde worker)
    signs: bool
    # None: it has not popped since the coordinator began keeping offers
    offer: Offer | None


def fits(worker: WorkerOffer, params: ImageParams, signed_only: bool) -> bool:
    """Whether `worker` may pop a job of `params` (coordinator.jobs.image._fits)."""
    if params.model is not None and params.model not in worker.models:
        return False
    if not worker.signs and (
        signed_only or params.n != 1 or params.sampler in SAMPLERS_WITHOUT_HORDE_NAME
    ):
        return False
    offer = worker.offer
    if offer is None:
        return True  # not told yet: it may well
    return (
        params.pixels <= offer.max_pixels
        and params.steps <= offer.max_steps
        and offer.takes(params.source_processing)
    )


def possible(workers: Iterable[WorkerOffer], params: ImageParams, signed_only: bool) -> bool:
    """Whether any of `workers` (the online ones) could serve a job of `params`."""
    return any(fits(worker, params, signed_only) for worker in workers)
