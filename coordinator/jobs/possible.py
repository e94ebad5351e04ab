"""Whether any online worker could serve an image job: AI Horde's `is_possible`.

Every image pop says what the worker takes (`Offer`: size and step limits, and which
source processing: none, img2img, inpainting/outpainting); the coordinator keeps the last
one with the worker (`workers.offer`, coordinator.workers). `possible` holds a job against
the offers of the online, unpaused image workers with the rules of the pop itself
(coordinator.jobs.image._fits, which says the same in SQL): a job that no offer fits is
still queued (such a worker may come), and AI Horde's clients are told so, as AI Horde
tells them (`is_possible: false` in check/status, a `NoAvailableWorker` warning when the
request is made; on /api/v1 a warning), with the reason `unservable` finds.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from protocol.horde import SAMPLERS_WITHOUT_HORDE_NAME
from protocol.params import ImageParams

__all__ = ["Offer", "WorkerOffer", "fits", "no_worker_warning", "possible", "unservable"]


def no_worker_warning(reason: str) -> dict[str, str]:
    """AI Horde's warning on a request no online worker can serve (its code), with why."""
    return {
        "code": "NoAvailableWorker",
        "message": f"No online worker can serve this request now: {reason}. It stays queued "
        "until one comes; change the request to have it served sooner.",
    }


@functools.lru_cache(maxsize=256)
def _dumps(offer: Offer) -> str:
    # (a worker sends the same offer with every pop: its JSON is made once)
    return json.dumps(asdict(offer), sort_keys=True, separators=(",", ":"))


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
    # the AI Horde post-processors it holds (protocol.postprocess), sorted
    post_processors: tuple[str, ...] = ()
    # the ControlNet types it has models for, and of those the ones whose control maps it
    # makes (protocol.control), sorted
    controlnets: tuple[str, ...] = ()
    control_annotators: tuple[str, ...] = ()
    # jobs with LoRAs or textual inversions (fetched from CivitAI by the worker)
    loras: bool = False
    # the checkpoint's hash and family it reported (the pop checked the hash against the
    # image model reference, coordinator.economy.image_models)
    checkpoint_sha256: str | None = None
    baseline: str | None = None
    # only jobs naming one of its models (a job naming none is priced below its models':
    # coordinator.economy.image_models.named_only)
    named_only: bool = False

    def dumps(self) -> str:
        return _dumps(self)

    @classmethod
    def loads(cls, text: str | None) -> Offer | None:
        """The offer stored as `text`; None for none (or one this version cannot read)."""
        if not text:
            return None
        try:
            fields = json.loads(text)
            for name in ("post_processors", "controlnets", "control_annotators"):
                fields[name] = tuple(fields.get(name, ()))
            return cls(**fields)
        except (ValueError, TypeError, AttributeError):
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


def _requirements(
    params: ImageParams, signed_only: bool
) -> list[tuple[Callable[[WorkerOffer], bool], str]]:
    """What a worker must meet to pop a job of `params` (coordinator.jobs.image._fits),
    each with the reason to give when no online worker meets it (and those before it). An
    offer not told yet (None) may well meet those it would say."""

    def offered(test: Callable[[Offer], bool]) -> Callable[[WorkerOffer], bool]:
        return lambda worker: worker.offer is None or test(worker.offer)

    def unsigned_may(worker: WorkerOffer) -> bool:
        return worker.signs or not (
            signed_only or params.n != 1 or params.sampler in SAMPLERS_WITHOUT_HORDE_NAME
        )

    processing = params.source_processing
    unsigned_rule = (
        "signs its results"
        if signed_only
        else "takes more than one image per job"
        if params.n != 1
        else f"samples with {params.sampler}"
    )
    return [
        (
            lambda worker: (
                params.model in worker.models
                or (params.model is None and not (worker.offer and worker.offer.named_only))
            ),
            f"no online worker offers the model {params.model!r}"
            if params.model is not None
            else "the online workers serve only jobs that name their model",
        ),
        (
            offered(lambda offer: offer.takes(processing)),
            f"no online worker {'with that model ' if params.model else ''}takes "
            + ("text-to-image" if processing == "txt2img" else processing)
            + " jobs",
        ),
        (
            offered(lambda offer: params.pixels <= offer.max_pixels),
            f"no online worker that takes them makes {params.width}x{params.height} images",
        ),
        (
            offered(lambda offer: params.steps <= offer.max_steps),
            f"no online worker that takes them runs {params.steps} steps",
        ),
        (unsigned_may, f"no online worker that takes them {unsigned_rule}"),
        (
            offered(lambda offer: set(params.post_processing) <= set(offer.post_processors)),
            "no online worker that takes them holds the post-processors "
            + ", ".join(params.post_processing),
        ),
        (
            offered(lambda offer: offer.loras or not (params.loras or params.tis)),
            "no online worker that takes them takes LoRAs or textual inversions",
        ),
        (
            offered(lambda offer: _serves_control(offer, params)),
            f"no online worker that takes them serves ControlNet {params.control_type}"
            + ("" if params.image_is_control else " from a source image (its annotator)"),
        ),
    ]


def _serves_control(offer: Offer, params: ImageParams) -> bool:
    """Whether `offer` covers the job's ControlNet: a model of its type, and the type's
    annotator unless the source already is the control map."""
    if params.control_type is None:
        return True
    return params.control_type in offer.controlnets and (
        params.image_is_control or params.control_type in offer.control_annotators
    )


def unservable(
    workers: Iterable[WorkerOffer], params: ImageParams, signed_only: bool
) -> str | None:
    """None when one of `workers` (the online ones) could serve a job of `params`; else
    why not: the first requirement that none of the workers meeting the ones before it
    meets."""
    left = list(workers)
    if not left:
        return "no image worker is online"
    for meets, reason in _requirements(params, signed_only):
        left = [worker for worker in left if meets(worker)]
        if not left:
            return reason
    return None


def fits(worker: WorkerOffer, params: ImageParams, signed_only: bool) -> bool:
    """Whether `worker` may pop a job of `params` (coordinator.jobs.image._fits)."""
    return unservable([worker], params, signed_only) is None


def possible(workers: Iterable[WorkerOffer], params: ImageParams, signed_only: bool) -> bool:
    """Whether any of `workers` (the online ones) could serve a job of `params`."""
    return unservable(workers, params, signed_only) is None
