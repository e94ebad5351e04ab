"""The worker's routes, as `Call`s (client.api.core): register, pop, progress, results.

Registration and a block server's peer link sign a single-use coordinator nonce (from
`challenge`), so neither can be replayed. A result goes up as one raw-PNG upload per image
(`PUT /api/v1/jobs/{id}/images/{i}`, seed, hash and signature in headers), then one small
JSON request that names the uploads and gets the job paid; a job of one image without LoRAs
or TIs goes up and is paid in one request (`PUT /api/v1/jobs/{id}/images/0/result`). Every
call but `challenge` and `register` carries the worker's token (`auth="worker"`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from client.api.core import Call, Request, body, call
from protocol.control import ControlType
from protocol.messages import (
    IMAGE_SEED_HEADER,
    IMAGE_SHA256_HEADER,
    IMAGE_SIGNATURE_HEADER,
    Challenge,
    ChallengeRequest,
    FailureReport,
    ImageUploaded,
    JobStatus,
    LeasedJob,
    LeaseExtended,
    PopRequest,
    PopResponse,
    ProgressReport,
    ResultAccepted,
    ResultSubmit,
    WorkerRegister,
    WorkerRegistered,
)
from protocol.signing import Identity, account_binding, registration_message
from protocol.text import (
    LeasedTextJob,
    PeerLink,
    PeerLinked,
    TextDelta,
    TextDeltaAccepted,
    TextFailure,
    TextModel,
    TextPopRequest,
    TextPopResponse,
    TextResultAccepted,
    TextResultSubmit,
    TextStatus,
)

__all__ = [
    "Capabilities",
    "challenge",
    "engine",
    "fail",
    "fail_text",
    "finish",
    "link_peer",
    "pop",
    "pop_text",
    "progress",
    "register",
    "source",
    "submit_text",
    "text_delta",
    "upload_final_image",
    "upload_image",
]

# what a challenge's nonce will sign: a registration or a peer-id proof
Purpose = Literal["register", "peer"]
# seconds a call may take beyond a long-poll's wait, and for the big ones
POLL_MARGIN = 30.0
UPLOAD_SECONDS = 300.0
FINISH_SECONDS = 120.0


class Capabilities(BaseModel):
    """What an image worker can serve: it is popped only jobs within these."""

    models: list[str]
    max_pixels: int
    max_steps: int
    # jobs with a source image; with a mask (inpainting, outpainting)
    img2img: bool = False
    inpainting: bool = False
    # jobs without a source image (false for an inpainting checkpoint)
    txt2img: bool = True
    # AI Horde post-processors it holds (protocol.postprocess)
    post_processors: list[str] = []
    # ControlNet types it has models for; those it can make control maps for
    controlnets: list[ControlType] = []
    control_annotators: list[ControlType] = []
    # jobs with LoRAs or textual inversions (protocol.loras)
    loras: bool = False
    # the checkpoint's hash (worker.image.checkpoint_hash) and family, checked against the
    # coordinator's image model reference
    checkpoint_sha256: str | None = None
    baseline: str | None = None


class _Ignored(BaseModel):
    pass


def challenge(purpose: Purpose) -> Call[str]:
    """A single-use nonce to sign (`register` or `peer`), valid for about a minute."""
    message = ChallengeRequest.model_construct(purpose=purpose)
    request = Request("POST", "/api/v1/workers/challenge", json=body(message))
    return Call(request, lambda content: Challenge.model_validate_json(content).nonce)


def register(
    identity: Identity, name: str, api_key: str | None, nonce: str
) -> Call[WorkerRegistered]:
    """Register `identity` as worker `name`, signing the account its earnings go to (the
    binding of `api_key`) and `nonce`: a captured registration cannot be replayed."""
    account = account_binding(api_key or None)
    signature = identity.sign(registration_message(name, identity.public_key, account, nonce))
    message = WorkerRegister.model_construct(
        name=name,
        public_key=identity.public_key,
        account=account,
        nonce=nonce,
        signature=signature,
    )
    return call(Request("POST", "/api/v1/workers/register", json=body(message)), WorkerRegistered)


def engine(info: dict[str, Any]) -> Call[None]:
    """Tell the coordinator which engine build this worker runs (for spot checks)."""
    request = Request("POST", "/api/v1/workers/engine", json=info, auth="worker")
    return Call(request, lambda content: _none(_Ignored.model_validate_json(content)))


def pop(capabilities: Capabilities, wait: float) -> Call[LeasedJob | None]:
    """Long-poll up to `wait` s for an image job within `capabilities`."""
    message = PopRequest.model_construct(**capabilities.model_dump(), wait=wait)
    request = Request(
        "POST", "/api/v1/workers/pop", json=body(message), timeout=wait + POLL_MARGIN, auth="worker"
    )
    return Call(request, lambda content: PopResponse.model_validate_json(content).job)


def progress(
    job_id: str, image: int, step: int, steps: int, preview: str | None = None
) -> Call[LeaseExtended]:
    """Report a step of a leased job, with a live preview (base64) if one is wanted;
    extends the lease."""
    message = ProgressReport.model_construct(image=image, step=step, steps=steps, preview=preview)
    path = f"/api/v1/jobs/{job_id}/progress"
    return call(Request("POST", path, json=body(message), auth="worker"), LeaseExtended)


def source(job_id: str, digest: str) -> Call[bytes]:
    """A source image or mask of a job this worker holds, by SHA-256 (the digests in its
    params), as raw bytes; the caller checks the digest."""
    path = f"/api/v1/jobs/{job_id}/sources/{digest}"
    return Call(Request("GET", path, timeout=UPLOAD_SECONDS, auth="worker"), bytes)


def _image_put(
    job: LeasedJob, image: dict[str, Any], png: bytes, suffix: str, timeout: float
) -> Request:
    """A PUT of one image as raw PNG bytes to the image's path + `suffix`, its entry of the
    result (index, seed, sha256, signature) in headers."""
    headers = {
        "Content-Type": "image/png",
        IMAGE_SEED_HEADER: str(image["seed"]),
        IMAGE_SHA256_HEADER: image["sha256"],
        IMAGE_SIGNATURE_HEADER: image["signature"],
    }
    path = f"/api/v1/jobs/{job.id}/images/{image['index']}{suffix}"
    return Request("PUT", path, content=png, headers=headers, timeout=timeout, auth="worker")


def upload_image(job: LeasedJob, image: dict[str, Any], png: bytes) -> Call[ImageUploaded]:
    """Upload one image as raw PNG bytes; `image` is its entry of the result (index, seed,
    sha256 and signature: worker.common.link.CoordinatorLink.signed_image)."""
    return call(_image_put(job, image, png, "", UPLOAD_SECONDS), ImageUploaded)


def upload_final_image(job: LeasedJob, image: dict[str, Any], png: bytes) -> Call[ResultAccepted]:
    """Upload the only image of a job without LoRAs or TIs and finish the job, in one
    request (`image` as for upload_image); get paid. A coordinator older than this route
    answers 404: then upload_image and finish."""
    request = _image_put(job, image, png, "/result", UPLOAD_SECONDS + FINISH_SECONDS)
    return call(request, ResultAccepted)


def finish(
    job: LeasedJob,
    images: list[dict[str, Any]],
    adapters: list[dict[str, Any]] | None = None,
    adapters_signature: str | None = None,
) -> Call[ResultAccepted]:
    """Finish the job whose images are uploaded; get paid. A job with LoRAs or TIs also
    names (and signs) the versions and files it used."""
    extra: dict[str, Any] = {}
    if adapters:
        extra = {"adapters": adapters, "adapters_signature": adapters_signature}
    message = ResultSubmit.model_construct(images=images, **extra)  # type: ignore[arg-type]
    request = Request(
        "POST",
        f"/api/v1/jobs/{job.id}/result",
        json=body(message),
        timeout=FINISH_SECONDS,
        auth="worker",
    )
    return call(request, ResultAccepted)


def fail(job_id: str, reason: str) -> Call[JobStatus]:
    """Give a leased job up; `reason` is cut to the 500 characters the coordinator keeps."""
    message = FailureReport.model_construct(reason=reason[:500])
    path = f"/api/v1/jobs/{job_id}/fail"
    return call(Request("POST", path, json=body(message), auth="worker"), JobStatus)


# --- block servers and text gateways ----------------------------------------------------


def link_peer(peer_id: str, nonce: str, peer_signature: str) -> Call[PeerLinked]:
    """Link a block server's hivemind peer id to the worker, with its key's proof."""
    message = PeerLink.model_construct(peer_id=peer_id, nonce=nonce, peer_signature=peer_signature)
    return call(
        Request("POST", "/api/v1/workers/peers", json=body(message), auth="worker"), PeerLinked
    )


def pop_text(models: list[TextModel], wait: float) -> Call[LeasedTextJob | None]:
    """Long-poll up to `wait` s for a text job of one of `models`."""
    message = TextPopRequest.model_construct(models=models, wait=wait)
    request = Request(
        "POST", "/api/v1/text/pop", json=body(message), timeout=wait + POLL_MARGIN, auth="worker"
    )
    return Call(request, lambda content: TextPopResponse.model_validate_json(content).job)


def text_delta(job_id: str, offset: int, text: str) -> Call[TextDeltaAccepted]:
    """Stream a piece of a text job's reply, at `offset`."""
    message = TextDelta.model_construct(offset=offset, text=text)
    path = f"/api/v1/text/jobs/{job_id}/delta"
    return call(Request("POST", path, json=body(message), auth="worker"), TextDeltaAccepted)


def submit_text(
    job: LeasedTextJob,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    spans: list[dict[str, Any]],
    checks: list[dict[str, Any]] | None,
    signature: str,
    logprobs: list[dict[str, Any]] | None = None,
) -> Call[TextResultAccepted]:
    """Report a finished text job: its text, usage, who served it and the gateway's spot
    checks of those servers (protocol.text.ServerCheck), signed."""
    message = TextResultSubmit.model_construct(
        text=text,
        finish_reason=finish_reason,  # type: ignore[arg-type]
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        spans=spans,  # type: ignore[arg-type]
        checks=checks or None,  # type: ignore[arg-type]
        signature=signature,
        logprobs=logprobs,  # type: ignore[arg-type]
    )
    path = f"/api/v1/text/jobs/{job.id}/result"
    return call(Request("POST", path, json=body(message), auth="worker"), TextResultAccepted)


def fail_text(job_id: str, reason: str, retry: bool) -> Call[TextStatus]:
    """Give a text job up; `retry`: whether another gateway may try it."""
    message = TextFailure.model_construct(reason=reason[:500], retry=retry)
    path = f"/api/v1/text/jobs/{job_id}/fail"
    return call(Request("POST", path, json=body(message), auth="worker"), TextStatus)


def _none(_: object) -> None:
    return None
