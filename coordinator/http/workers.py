"""The worker side: challenge, register, pop (long-poll), progress, a leased job's source
images, failure (results: routes_results)."""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp import web

from coordinator.economy import image_models
from coordinator.errors import (
    BadRequest,
    Conflict,
    NotFound,
    OutdatedWorker,
    Unauthorized,
    UnsandboxedWorker,
)
from coordinator.http.addresses import client_ip
from coordinator.http.api import API, Call, WorkerCall, api_key_of
from coordinator.http.jobs import job_status
from coordinator.http.metrics import timed_pop
from coordinator.http.polling import long_poll
from coordinator.http.state import CONFIG, FILES, PREVIEWS, SIGNALS, STORE
from coordinator.jobs.image import ImageJob
from coordinator.jobs.possible import Offer
from coordinator.jobs.previews import check_preview
from protocol.errors import SignatureInvalid
from protocol.loras import ADAPTER_FAILURES
from protocol.messages import (
    Challenge,
    ChallengeRequest,
    FailureReport,
    JobStatus,
    LeasedJob,
    LeaseExtended,
    PopRequest,
    PopResponse,
    ProgressReport,
    WorkerRegister,
    WorkerRegistered,
)
from protocol.preview import JobPreview, PreviewType
from protocol.signing import account_binding, registration_message, verify

# how a worker's give-back reason ends when it hands the job back because it is stopping
# (worker.image, the gateway): a drain does not count toward --faulted-run. It is the
# worker's word; what bounds a liar is that one owner cannot fail a job for its requester
# (coordinator.jobs.lifecycle).
DRAINING = "shutting down"


@API.route(
    "POST",
    "/api/v1/workers/challenge",
    summary="A single-use nonce, valid for a minute, for a worker to sign: its registration "
    "or a block server's peer-id proof",
    response=Challenge,
    limit="challenge",
)
async def challenge(request: web.Request, call: Call[ChallengeRequest]) -> Challenge:
    body = call.body
    nonce, expires_at = await request.app[STORE].workers.challenge(body.purpose)
    return Challenge(nonce=nonce, expires_at=expires_at)


@API.route(
    "POST",
    "/api/v1/workers/register",
    summary="Register a worker identity (Ed25519) by signing a challenge; with an API key "
    "its earnings go to that account (the signature covers which)",
    response=WorkerRegistered,
    auth="optional",
    limit="worker",
)
async def register_worker(request: web.Request, call: Call[WorkerRegister]) -> WorkerRegistered:
    body = call.body
    if body.nonce is None:
        raise OutdatedWorker("registration")
    if body.account != account_binding(api_key_of(request)):
        raise Unauthorized(
            "this registration is signed for another account than the API key sent with it "
            "(or for none); a worker signs account_binding(its API key) with a fresh nonce",
            [("account", "must be account_binding of the `apikey` header, or empty without")],
        )
    try:
        verify(
            body.public_key,
            registration_message(body.name, body.public_key, body.account, body.nonce),
            body.signature,
        )
    except SignatureInvalid:
        raise Unauthorized("registration signature does not match public_key") from None
    worker, token = await request.app[STORE].workers.register_worker(
        body.name, body.public_key, call.account, client_ip(request), nonce=body.nonce
    )
    return WorkerRegistered(worker_id=worker.id, token=token)


@API.route(
    "POST",
    "/api/v1/workers/pop",
    summary="Lease the best queued job that fits; waits up to `wait` seconds for one",
    response=PopResponse,
    auth="worker",
    errors=(403,),
    limit="pop",
)
async def pop(request: web.Request, call: WorkerCall[PopRequest]) -> PopResponse:
    store, signals = request.app[STORE], request.app[SIGNALS]
    body = call.body
    worker = call.worker
    if request.app[CONFIG].require_sandbox and worker.sandboxed is not True:
        raise UnsandboxedWorker()
    # the poll is noted (uptime, address, offer) in the first attempt's transaction
    offer = Offer(
        max_pixels=body.max_pixels,
        max_steps=body.max_steps,
        txt2img=body.txt2img,
        img2img=body.img2img,
        inpainting=body.inpainting,
        post_processors=tuple(sorted(set(body.post_processors))),
        controlnets=tuple(sorted(set(body.controlnets))),
        control_annotators=tuple(sorted(set(body.control_annotators) & set(body.controlnets))),
        loras=body.loras,
        checkpoint_sha256=body.checkpoint_sha256,
        baseline=body.baseline,
        named_only=image_models.named_only(request.app[CONFIG], body.models),
    )
    # a catalog name only with its checkpoint; others only where the operator allows them
    image_models.check_pop(request.app[CONFIG], body.models, body.checkpoint_sha256)
    polls = [
        store.workers.poll_note(
            worker, client_ip(request), kind="image", models=body.models, offer=offer.dumps()
        )
    ]

    def attempt() -> Awaitable[ImageJob | None]:
        poll = polls.pop() if polls else None
        return store.image_jobs.pop(
            worker,
            body.models,
            body.max_pixels,
            body.max_steps,
            poll,
            img2img=offer.img2img,
            inpainting=offer.inpainting,
            txt2img=offer.txt2img,
            post_processors=frozenset(offer.post_processors),
            controlnets=offer.controlnets,
            control_annotators=offer.control_annotators,
            loras=offer.loras,
            named_only=offer.named_only,
        )

    job = await long_poll(
        request,
        body.wait,
        timed_pop(request, "image", attempt),
        "image",
        body.models,
    )
    if job is None:
        return PopResponse(job=None)
    signals.job_changed(job.id)
    assert job.lease_deadline is not None
    return PopResponse(
        job=LeasedJob(
            id=job.id,
            params=job.params,
            params_hash=job.params_hash,
            lease_seconds=job.lease_seconds,
            lease_deadline=job.lease_deadline,
        )
    )


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/progress",
    summary="Report step progress; extends the lease",
    response=LeaseExtended,
    auth="worker",
    errors=(404, 409),
    limit="progress",
)
async def progress(request: web.Request, call: WorkerCall[ProgressReport]) -> LeaseExtended:
    body = call.body
    # (checked before anything is recorded: a bad preview refuses the whole report)
    kind = None if body.preview is None else preview_type(body.preview)
    job = await request.app[STORE].image_jobs.report_progress(
        call.worker, request.match_info["job_id"], body.image, body.step, body.steps
    )
    previews = request.app[PREVIEWS]
    if kind is not None and body.preview is not None:
        # kept only while a requester watches with previews on; never stored or paid
        previews.put(
            job.id,
            JobPreview(
                image=body.image,
                step=body.step,
                steps=body.steps,
                content_type=kind,
                data=body.preview,
            ),
        )
    request.app[SIGNALS].job_changed(job.id)
    assert job.lease_deadline is not None
    return LeaseExtended(
        id=job.id, lease_deadline=job.lease_deadline, previews=previews.wanted(job.id)
    )


def preview_type(text: str) -> PreviewType:
    """The media type of a progress report's preview; BadRequest naming `preview` if it is
    no small JPEG, PNG or WebP picture."""
    try:
        return check_preview(text)
    except ValueError as exc:
        raise BadRequest(f"preview: {exc}", [("preview", str(exc))]) from None


@API.route(
    "GET",
    "/api/v1/jobs/{job_id}/sources/{digest}",
    summary="The source image or mask of a job this worker holds, by its SHA-256 (the "
    "digests in the job's params), as the requester sent it (PNG, WebP or JPEG)",
    auth="worker",
    produces="application/octet-stream",
    errors=(404, 409),
    limit="progress",
)
async def job_source(request: web.Request, call: WorkerCall[None]) -> web.StreamResponse:
    job_id, digest = request.match_info["job_id"], request.match_info["digest"]
    job = await request.app[STORE].image_jobs.get(job_id)
    if job is None or digest not in (job.params.source_image, job.params.source_mask):
        raise NotFound(f"job {job_id} has no source image {digest}")
    if job.state != "leased" or job.worker_id != call.worker.id:
        raise Conflict(f"job {job_id} is not leased to this worker")
    return await request.app[FILES].response(
        request,
        digest,
        {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{digest}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/fail",
    summary="Give a leased job back (engine crash, timeout): requeued, or refunded "
    "after too many tries",
    response=JobStatus,
    auth="worker",
    errors=(404, 409),
    limit="result",
)
async def fail(request: web.Request, call: WorkerCall[FailureReport]) -> JobStatus:
    reason: str = call.body.reason
    store = request.app[STORE]
    counts = not reason.endswith(DRAINING)
    if counts and reason.startswith(ADAPTER_FAILURES):
        # a LoRA that cannot be fetched or fits another checkpoint is not the worker's
        # fault: said of a job that has them, it does not count towards a pause
        leased = await store.image_jobs.get(request.match_info["job_id"])
        counts = leased is None or not (leased.params.loras or leased.params.tis)
    job = await store.image_jobs.fail(
        call.worker, request.match_info["job_id"], reason, counts=counts
    )
    await request.app[FILES].discard(job.id, call.worker.id, job.params.n)
    request.app[SIGNALS].job_changed(job.id)
    if job.state == "queued":
        request.app[SIGNALS].job_queued("image", job.params.model)
    return await job_status(request, job)
