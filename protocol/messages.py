"""Typed messages of the HTTP API (coordinator <-> client, coordinator <-> worker).

Versioned by addition: new fields get defaults, nothing is renamed. Requests forbid
unknown fields so a typo is an error, not a silently ignored option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.control import CONTROL_TYPES, ControlType
from protocol.image_models import ImageModel
from protocol.loras import MAX_LORAS, MAX_TIS, Baseline, ResolvedAdapter
from protocol.params import MAX_N, MAX_SOURCE_BASE64, MAX_STEPS, ImageParams, ModelName
from protocol.postprocess import POST_PROCESSORS
from protocol.preview import PREVIEW_BASE64_CHARS

PostProcessorName = Literal[
    "GFPGAN",
    "RealESRGAN_x2plus",
    "RealESRGAN_x4plus",
    "RealESRGAN_x4plus_anime_6B",
    "NMKD_Siax",
    "4x_AnimeSharp",
]

__all__ = [
    "AccountCreate",
    "AccountCreated",
    "AccountInfo",
    "Challenge",
    "ChallengeRequest",
    "DisputeCreate",
    "DisputeRecorded",
    "EngineInfo",
    "ErrorBody",
    "ErrorDetail",
    "FailureReport",
    "FieldProblem",
    "Health",
    "IMAGE_SEED_HEADER",
    "IMAGE_SHA256_HEADER",
    "IMAGE_SIGNATURE_HEADER",
    "HistoryEntry",
    "HistoryPage",
    "ImageInfo",
    "ImageJobCreated",
    "ImageJobRequest",
    "ImageUploaded",
    "InviteCreate",
    "InvitesCreated",
    "JobCancelled",
    "JobList",
    "JobKind",
    "JobState",
    "JobStatus",
    "LeaseExtended",
    "LeasedJob",
    "NetworkModel",
    "NetworkQueue",
    "NetworkStatus",
    "NetworkWorker",
    "PopRequest",
    "PopResponse",
    "ProgressReport",
    "Quote",
    "RatingCreate",
    "RatingRecorded",
    "ResultAccepted",
    "ResultSubmit",
    "ShareState",
    "ShareUpdate",
    "SubmittedImage",
    "TransferCreate",
    "TransferDone",
    "WorkerInfo",
    "WorkerKind",
    "WorkerRegister",
    "WorkerRegistered",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{1,31}$"
HEX_64 = r"^[0-9a-f]{64}$"
HEX_128 = r"^[0-9a-f]{128}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- accounts -------------------------------------------------------------------------


class AccountCreate(_Request):
    name: str = Field(
        pattern=NAME_PATTERN,
        description="2-32 letters, digits, '_', '.', '-'; starts with a letter or digit",
    )
    invite: str | None = Field(
        default=None,
        max_length=100,
        description="a single-use invite code; required when the coordinator's registration "
        "is invite-only",
    )


class InviteCreate(_Request):
    count: int = Field(default=1, ge=1, le=100, description="how many codes to make")


class InvitesCreated(_Response):
    codes: list[str] = Field(description="single-use invite codes, shown once")


class AccountCreated(_Response):
    name: str
    api_key: str = Field(description="shown once; the coordinator stores only its hash")
    kudos: int


class AccountInfo(_Response):
    name: str
    kudos: int = Field(description="balance: the sum of the account's ledger postings")
    available: int = Field(default=0, description="what can be spent now: kudos - floor")
    reserved: int = Field(default=0, description="held in escrow for queued and running jobs")
    earned: int = Field(
        default=0, description="from serving jobs, uptime, ratings and released trust holds"
    )
    pending: int = Field(
        default=0, description="earnings of the account's untrusted workers held until verified"
    )
    spent: int = Field(default=0, description="paid for finished jobs")
    granted: int = Field(
        default=0, description="from the network's grants (new account, rating rewards)"
    )
    transferred_in: int = 0
    transferred_out: int = 0
    unspent_grants: int = Field(
        default=0,
        description="the part of kudos that was granted (grants, rating rewards, uptime, "
        "spot-check pay, and pay for jobs that grants funded) and not yet spent: spendable "
        "on jobs (spent first), never transferable",
    )
    transferable: int = Field(
        default=0,
        description="what a transfer may move now: kudos - unspent grants, above the floor",
    )


class HistoryEntry(_Response):
    id: int = Field(description="ledger entry id; ids increase with time")
    at: float = Field(description="unix seconds")
    reason: str = Field(
        description="grant | reserve | settle | refund | transfer | rating | uptime | "
        "release | forfeit | verify"
    )
    job_id: str | None = None
    amount: int = Field(description="change of this account's balance (negative = out)")
    counterparties: list[str] = Field(description="the other accounts of the entry, by name")


class HistoryPage(_Response):
    entries: list[HistoryEntry]
    next_before: int | None = Field(description="pass as ?before= for older entries; null = end")


class TransferCreate(_Request):
    to: str = Field(pattern=NAME_PATTERN, description="the receiving account's name")
    amount: int = Field(ge=1, le=10**12, description="whole kudos")


class TransferDone(_Response):
    id: int = Field(description="the ledger entry of the transfer")
    to: str
    amount: int
    idempotency_key: str


# --- image jobs -----------------------------------------------------------------------

JobState = Literal["queued", "leased", "done", "failed", "cancelled"]
# what a job asks for, and what a worker serves (block servers serve a text model's layers)
JobKind = Literal["image", "text"]
WorkerKind = Literal["image", "text", "blocks"]


class ImageJobCreated(_Response):
    id: str
    kudos_cost: int
    seed: int
    queue_position: int | None
    eta_seconds: float | None = Field(default=None, description="null when unknown")
    warnings: list[str] = Field(
        default=[],
        description="e.g. why no online worker could serve the job now (it stays queued "
        "until one can)",
    )


class Quote(_Response):
    kudos_cost: int
    balance: int = Field(description="the caller's balance (the shared one when anonymous)")
    available: int = Field(description="what the caller can spend now: balance - floor")
    affordable: bool
    anonymous: bool
    queue_length: int = Field(description="jobs of this kind waiting now")
    queue_position: int = Field(description="where the job would enter the queue (0 = next)")
    eta_seconds: float | None = Field(
        description="estimated seconds until it would finish; null without recent throughput"
    )


class JobCancelled(_Response):
    id: str
    state: JobState
    refunded: int


class ShareUpdate(_Request):
    shared: bool = Field(default=True, description="let any registered user see and rate it")


class ShareState(_Response):
    id: str
    shared: bool


class RatingCreate(_Request):
    score: int = Field(ge=1, le=10, description="1 (bad) to 10 (excellent)")


class RatingRecorded(_Response):
    job_id: str
    index: int
    score: int
    kudos_earned: int = Field(description="0 once the rater's daily rating rewards are used up")
    rating: float = Field(description="the image's mean score")
    ratings: int


class ImageInfo(_Response):
    index: int
    seed: int
    sha256: str
    url: str
    rating: float | None = Field(default=None, description="mean score, null if unrated")
    ratings: int = 0


class JobStatus(_Response):
    id: str
    kind: Literal["image"] = "image"
    state: JobState
    queue_position: int | None = Field(description="0 = next to run; null once running")
    n: int
    seeds: list[int]
    kudos_cost: int
    image: int = Field(default=0, description="index of the image being generated")
    step: int = 0
    steps: int = 0
    attempts: int = 0
    error: str | None = None
    images: list[ImageInfo] = []
    eta_seconds: float | None = Field(
        default=None, description="estimated seconds until done; null when unknown or finished"
    )
    shared: bool = False
    params: ImageParams | None = Field(
        default=None, description="what was asked for (seed fixed); only to who may see the job"
    )
    created_at: float | None = Field(default=None, description="unix seconds")
    signed: bool = Field(
        default=True,
        description="false when an AI Horde worker made the images: unsigned and never "
        "checked; dispute it while `disputable`",
    )
    disputable: bool = Field(
        default=False, description="its worker's pay is still held: POST .../dispute refunds it"
    )

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class ImageJobRequest(ImageParams):
    """An image job: its parameters, and who may run it."""

    signed_only: bool = Field(
        default=False,
        description="only workers that sign their results (no AI Horde workers, whose results "
        "are unsigned and never checked)",
    )
    nsfw: bool = Field(
        default=False,
        description="the request is NSFW (AI Horde's `nsfw`): needed to name a model the "
        "image model reference marks nsfw",
    )
    # here the images themselves, as base64 (the job's parameters then hold their digests)
    source_image: str | None = Field(
        default=None,
        max_length=MAX_SOURCE_BASE64,
        description="base64 WebP, PNG or JPEG: the image img2img, inpainting and "
        "outpainting start from (LANCZOS-resized to width x height)",
    )
    source_mask: str | None = Field(
        default=None,
        max_length=MAX_SOURCE_BASE64,
        description="base64 image the size of the source: white = repaint (inpainting); "
        "without it the source's transparent pixels are repainted",
    )

    def params(self) -> ImageParams:
        return ImageParams.model_validate(
            self.model_dump(exclude={"signed_only", "nsfw", "source_image", "source_mask"})
        )


class ImageModelList(_Response):
    """The coordinator's image model reference (GET /api/v1/models/image)."""

    models: list[ImageModel]
    uncatalogued: bool = Field(
        description="whether workers may also serve models the reference does not list"
    )


class JobList(_Response):
    jobs: list[JobStatus] = Field(description="newest first")
    next_offset: int | None = Field(description="pass as ?offset= for older jobs; null = end")


class DisputeCreate(_Request):
    reason: str = Field(default="", max_length=500, description="what is wrong with the images")


class DisputeRecorded(_Response):
    id: str
    refunded: int


# --- the network ------------------------------------------------------------------------


class NetworkWorker(_Response):
    id: str
    name: str
    kind: WorkerKind
    protocol: Literal["idlegrid", "horde"] = "idlegrid"
    trusted: bool
    online: bool = Field(description="polled within the last few minutes")
    models: list[str]
    post_processors: list[str] = Field(default=[], description="AI Horde post-processors held")
    controlnets: list[str] = Field(
        default=[], description="ControlNet types it serves (from a ready control map)"
    )
    control_annotators: list[str] = Field(
        default=[], description="of those, the types whose control map it makes from an image"
    )
    jobs_done: int
    last_seen: float
    img2img: bool | None = Field(
        default=None,
        description="an image worker: whether its last pop took jobs with a source image "
        "(None: not an image worker, or it has not said)",
    )
    inpainting: bool | None = Field(
        default=None, description="likewise, jobs with a mask (inpainting, outpainting)"
    )


class NetworkModel(_Response):
    name: str
    kind: JobKind
    workers: int = Field(description="online workers offering it")
    queued: int = Field(description="jobs waiting for it")
    eta_seconds: float | None = None


class NetworkQueue(_Response):
    kind: JobKind
    queued: int
    running: int


class NetworkStatus(_Response):
    workers: list[NetworkWorker] = Field(description="a page of them, most recently seen first")
    models: list[NetworkModel]
    queue: list[NetworkQueue]
    post_processors: list[str] = Field(
        default=[], description="the AI Horde post-processors some online image worker holds"
    )
    next_offset: int | None = Field(
        default=None, description="pass as ?offset= for the next page of workers; null = end"
    )


# --- workers --------------------------------------------------------------------------


class ChallengeRequest(_Request):
    purpose: Literal["register", "peer"] = Field(
        default="register",
        description="what the nonce will sign: a worker registration or a peer-id proof",
    )


class Challenge(_Response):
    nonce: str = Field(description="single use; sign it before `expires_at`")
    expires_at: float = Field(description="unix seconds")


class WorkerRegister(_Request):
    name: str = Field(pattern=NAME_PATTERN)
    public_key: str = Field(pattern=HEX_64, description="Ed25519 public key, hex")
    # workers before signed challenges sent a timestamp and no nonce: they are told to upgrade
    timestamp: int | None = Field(default=None, description="unused (sent by old workers)")
    nonce: str | None = Field(
        default=None, max_length=64, description="from POST /api/v1/workers/challenge"
    )
    account: str = Field(
        default="",
        pattern=r"^([0-9a-f]{64})?$",
        description="account_binding(API key sent in `apikey`), or empty without a key",
    )
    signature: str = Field(pattern=HEX_128, description="over registration_message(...)")


class WorkerRegistered(_Response):
    worker_id: str
    token: str = Field(description="send as X-Worker-Token on worker calls")


class EngineInfo(_Request):
    """The engine build a worker runs: spot checks demand identical pixels only between
    workers whose builds match."""

    engine: str = Field(min_length=1, max_length=64, description="e.g. 'diffusers'")
    versions: dict[str, str] = Field(
        default={}, max_length=16, description="package -> version, e.g. torch, diffusers"
    )
    device: str = Field(default="cpu", max_length=64, description="e.g. 'cpu', 'cuda:NVIDIA L4'")
    dtype: str = Field(default="float32", max_length=32)
    sandboxed: bool | None = Field(
        default=None,
        description="the engine runs confined (false: the worker's owner passed "
        "--unsandboxed; null: not reported, an older worker)",
    )
    checkpoint_sha256: str | None = Field(
        default=None,
        pattern=HEX_64,
        description="an image worker's checkpoint hash (worker.image.checkpoint_hash): "
        "identical pixels are expected only between workers of the same checkpoint",
    )
    baseline: Baseline | None = Field(
        default=None, description="an image worker's checkpoint family (sd1, sd2, sdxl)"
    )
    # (both change the last bits of pixels, so they are part of the build)
    low_vram: bool | None = Field(
        default=None,
        description="the image engine runs with --low-vram (sliced attention; float16 "
        "on CUDA); null: not reported",
    )
    max_batch_pixels: int | None = Field(
        default=None,
        ge=0,
        description="the image engine batches a job's images up to this many pixels "
        "(--max-batch-pixels); null: not reported, one image at a time",
    )
    # (a refiner finishes SDXL txt2img jobs: other pixels than the base alone)
    refiner_sha256: str | None = Field(
        default=None,
        pattern=HEX_64,
        description="the hash of the image worker's SDXL refiner (--refiner, "
        "worker.image.refiner; as checkpoint_sha256); null: none",
    )
    refiner_switch: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="the fraction of the schedule its base samples before the refiner "
        "(--refiner-switch); null: no refiner",
    )


class WorkerInfo(_Response):
    id: str
    name: str
    trusted: bool
    paused: bool
    pause_reason: str | None = None
    suspicion: int
    checks_passed: int
    checks_failed: int
    jobs_done: int
    rating: float | None = Field(description="mean score of the images it made")
    ratings: int
    engine: EngineInfo | None
    last_seen: float


class PopRequest(_Request):
    models: list[ModelName] = Field(min_length=1, max_length=32)
    max_pixels: int = Field(ge=64 * 64, le=4096 * 4096)
    max_steps: int = Field(ge=1, le=MAX_STEPS)
    img2img: bool = Field(default=False, description="takes jobs with a source image")
    inpainting: bool = Field(
        default=False, description="takes inpainting and outpainting jobs (a mask, or alpha)"
    )
    txt2img: bool = Field(
        default=True,
        description="takes jobs without a source image (false for an inpainting checkpoint, "
        "which serves only inpainting and outpainting)",
    )
    post_processors: list[PostProcessorName] = Field(
        default=[],
        max_length=len(POST_PROCESSORS),
        description="AI Horde post-processors it holds (GFPGAN, RealESRGAN_x4plus, ...): "
        "jobs naming others are not offered",
    )
    controlnets: list[ControlType] = Field(
        default=[],
        max_length=len(CONTROL_TYPES),
        description="ControlNet: the control types it has a model for (jobs with a ready "
        "control map: image_is_control)",
    )
    control_annotators: list[ControlType] = Field(
        default=[],
        max_length=len(CONTROL_TYPES),
        description="of those, the control types whose map it makes from a source image",
    )
    loras: bool = Field(default=False, description="takes jobs with LoRAs or textual inversions")
    checkpoint_sha256: str | None = Field(
        default=None,
        pattern=HEX_64,
        description="the checkpoint's hash (worker.image.checkpoint_hash): a model of the "
        "coordinator's image model reference is popped only with the hash it pins",
    )
    baseline: Baseline | None = Field(
        default=None, description="the checkpoint's family (sd1, sd2, sdxl), as the worker sees it"
    )
    wait: float = Field(default=10.0, ge=0.0, le=60.0, description="long-poll seconds")


class LeasedJob(_Response):
    id: str
    params: ImageParams
    params_hash: str
    lease_seconds: float
    lease_deadline: float


class PopResponse(_Response):
    job: LeasedJob | None


class ProgressReport(_Request):
    image: int = Field(ge=0, lt=MAX_N)
    step: int = Field(ge=0, le=MAX_STEPS * 2)
    steps: int = Field(ge=1, le=MAX_STEPS * 2)
    # a live preview of the image at this step (protocol.preview), sent only while the
    # last LeaseExtended said `previews`
    preview: str | None = Field(
        default=None,
        max_length=PREVIEW_BASE64_CHARS,
        description="base64 of a small JPEG, PNG or WebP picture of the image so far",
    )


# An image is uploaded on its own (`PUT /api/v1/jobs/{job_id}/images/{index}`, body = the
# raw PNG) with these headers; the result that follows names the uploads and pays.
IMAGE_SEED_HEADER = "X-Image-Seed"
IMAGE_SHA256_HEADER = "X-Image-Sha256"
IMAGE_SIGNATURE_HEADER = "X-Image-Signature"


class ImageUploaded(_Response):
    id: str
    index: int
    sha256: str


class SubmittedImage(_Request):
    """One uploaded image of a result: the same seed, hash and signature as its upload."""

    index: int = Field(ge=0, lt=MAX_N)
    seed: int = Field(ge=0)
    sha256: str = Field(pattern=HEX_64)
    signature: str = Field(pattern=HEX_128, description="over result_message(...)")


class ResultSubmit(_Request):
    """Finishes a job whose images were all uploaded; the PNGs themselves are not sent here."""

    images: list[SubmittedImage] = Field(min_length=1, max_length=MAX_N)
    # a job with LoRAs or TIs: the versions and files used (its LoRAs, then its TIs), signed
    adapters: list[ResolvedAdapter] = Field(default=[], max_length=MAX_LORAS + MAX_TIS)
    adapters_signature: str | None = Field(
        default=None, pattern=HEX_128, description="over adapters_message(...)"
    )


class ResultAccepted(_Response):
    id: str
    kudos_earned: int = Field(description="paid to the worker's account now")
    kudos_held: int = Field(
        default=0, description="held pending until the (untrusted) worker passes a spot check"
    )


class FailureReport(_Request):
    reason: str = Field(min_length=1, max_length=500)


# --- errors ---------------------------------------------------------------------------


class FieldProblem(_Response):
    field: str
    message: str


class ErrorDetail(_Response):
    code: str
    message: str
    fields: list[FieldProblem] = []


class ErrorBody(_Response):
    error: ErrorDetail


class LeaseExtended(_Response):
    id: str
    lease_deadline: float
    # a requester watches the job with live previews on: attach them to progress reports
    previews: bool = False


class Health(_Response):
    status: Literal["ok"] = "ok"
    version: str
