"""Text (LLM) jobs: the requester's side (submit, status, token stream) and the gateway's
(pop, stream text, submit the signed usage report, fail), plus block servers' peer links."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from coordinator.db.database import ANONYMOUS
from coordinator.db.request_keys import Idempotent
from coordinator.economy import text_models
from coordinator.errors import (
    BadRequest,
    Conflict,
    NotFound,
    OutdatedWorker,
    Unauthorized,
    UnsandboxedWorker,
)
from coordinator.http.addresses import client_ip
from coordinator.http.api import API, Call, WorkerCall
from coordinator.http.idempotency import submit_key
from coordinator.http.metrics import timed_pop
from coordinator.http.polling import long_poll
from coordinator.http.state import CONFIG, REQUESTER_KEY, SIGNALS, STORE
from coordinator.http.streams import follow, open_stream
from coordinator.jobs import text as text_jobs
from coordinator.jobs.text import TextJob
from coordinator.store import Account, Store
from protocol.errors import SignatureInvalid
from protocol.messages import JobCancelled, Quote
from protocol.params import MAX_SEED
from protocol.peer_ids import verify_peer_signature
from protocol.signing import peer_proof_message, text_result_message, verify
from protocol.text import (
    LeasedTextJob,
    PeerLink,
    PeerLinked,
    TextDelta,
    TextDeltaAccepted,
    TextFailure,
    TextJobCreated,
    TextModel,
    TextParams,
    TextPopRequest,
    TextPopResponse,
    TextResultAccepted,
    TextResultSubmit,
    TextStatus,
)

log = logging.getLogger(__name__)


async def choose_model(
    request: web.Request, name: str | None, field: str, *, horde_workers: bool = False
) -> TextModel:
    """The catalog model a request names (or the default), if a gateway serves it now
    (gateways re-offer on every long-poll), or with `horde_workers` an AI Horde text worker
    (for /api/v2 requests they may serve); 400 naming the models otherwise."""
    config = request.app[CONFIG]
    model = text_models.choose(config, name, field)
    served = await request.app[STORE].text_jobs.served_models(
        config.text_model_seconds, horde_workers=horde_workers
    )
    if model.name not in served:
        which = f"model {model.name}" + (" (the default)" if name is None else "")
        fix = (
            f"models served now: {', '.join(served)}; name one with `model`"
            if served
            else "try again later or start one with `idlegrid worker gateway`"
        )
        raise BadRequest(
            f"no gateway is serving {which} right now; {fix}",
            [(field, f"no gateway serves {model.name} now")],
        )
    return model


async def first_served(
    request: web.Request, names: Sequence[str], *, horde_workers: bool = False
) -> str | None:
    """Of several acceptable model names (AI Horde's `models`), the first one a gateway (or
    with `horde_workers` an AI Horde text worker) serves now; the first one when none is
    (choose_model names it)."""
    if not names:
        return None
    config = request.app[CONFIG]
    served = set(
        await request.app[STORE].text_jobs.served_models(
            config.text_model_seconds, horde_workers=horde_workers
        )
    )
    return next((name for name in names if name in served), names[0])


def check_text_limits(
    request: web.Request, params: TextParams, model: TextModel, account: Account
) -> None:
    config = request.app[CONFIG]
    if params.max_tokens >= model.max_context:
        raise BadRequest(
            f"max_tokens {params.max_tokens} does not fit the context of {model.name} "
            f"({model.max_context} tokens with the prompt); ask for fewer",
            [("max_tokens", f"must be less than {model.max_context}")],
        )
    if account.anonymous and params.max_tokens > config.anonymous_max_tokens:
        raise BadRequest(
            f"anonymous requests may ask for at most {config.anonymous_max_tokens} tokens; "
            "ask for fewer or send an API key",
            [("max_tokens", f"must be at most {config.anonymous_max_tokens} without an API key")],
        )


async def submit(
    request: web.Request,
    account: Account | None,
    params: TextParams,
    horde: dict[str, object] | None = None,
    idempotent: Idempotent | None = None,
    *,
    signed_only: bool = False,
) -> TextJob:
    """Validate against the catalog and the served models, fix the seed, queue and reserve
    (once per `idempotent` key); `horde`: the options of a request made through /api/v2
    (`signed_only`: its trusted_workers, keeping AI Horde's text workers away)."""
    store = request.app[STORE]
    account = account or await store.accounts.anonymous_account(client_ip(request))
    # AI Horde's text workers serve only /api/v2 jobs without trusted_workers
    bridges = horde is not None and not signed_only
    model = await choose_model(request, params.model, "model", horde_workers=bridges)
    check_text_limits(request, params, model, account)
    updates: dict[str, object] = {"model": model.name}
    if params.seed is None:
        # fixed now so that a retry on another gateway samples the same text
        updates["seed"] = secrets.randbelow(MAX_SEED + 1)
    params = params.model_copy(update=updates)
    job = await store.text_jobs.create(
        account, params, model, horde, idempotent, signed_only=signed_only
    )
    request.app[SIGNALS].job_queued("text", model.name)
    return job


async def visible_text_job(store: Store, job_id: str, account: Account | None) -> TextJob:
    """The job, if the caller may see it: the requester's key, or anyone for anonymous jobs."""
    job = await store.text_jobs.get(job_id)
    anonymous = (await store.accounts.anonymous_account()).id
    if job is None or (
        job.account_id != anonymous and (account is None or account.id != job.account_id)
    ):
        raise NotFound(f"no text job {job_id} visible to this API key")
    return job


async def text_status(store: Store, job: TextJob, *, with_text: bool = True) -> TextStatus:
    position, eta = await store.text_jobs.queue_info(job.id) if not job.finished else (None, None)
    return TextStatus(
        id=job.id,
        state=job.state,
        queue_position=position,
        eta_seconds=None if eta is None else round(eta, 1),
        model=job.model,
        text=job.text if with_text else "",
        finish_reason=job.finish_reason,
        prompt_tokens=job.prompt_tokens,
        completion_tokens=job.completion_tokens,
        kudos_cost=job.charged if job.charged is not None else job.cost,
        attempts=job.attempts,
        error=job.error if job.state in ("failed", "queued") else None,
        disputable=job.held_until is not None,
    )


@API.route(
    "POST",
    "/api/v1/text/jobs",
    summary="Queue a chat or completion job; its upper-bound cost is reserved, the rest "
    "refunded when it finishes. With an Idempotency-Key header a retry of the same body gets "
    "the same job and pays nothing more; the same key with another body is 409",
    response=TextJobCreated,
    auth="optional",
    status=202,
    errors=(402, 409),
    limit="submit",
)
async def submit_text(request: web.Request, call: Call[TextParams]) -> TextJobCreated:
    job = await submit(
        request,
        call.account,
        call.body,
        idempotent=submit_key(request, call.account is None, call.body),
    )
    return TextJobCreated(
        id=job.id,
        kudos_cost=job.cost,
        queue_position=await request.app[STORE].text_jobs.queue_position(job.id),
    )


@API.route(
    "POST",
    "/api/v1/quotes/text",
    summary="What a text job would reserve (unused kudos are refunded when it finishes), "
    "what you can spend, the queue and the ETA; submits nothing",
    response=Quote,
    auth="optional",
    limit="quote",
)
async def quote_text(request: web.Request, call: Call[TextParams]) -> Quote:
    store = request.app[STORE]
    params = call.body
    account = call.account or await store.accounts.anonymous_account()
    model = await choose_model(request, params.model, "model")
    check_text_limits(request, params, model, account)
    cost = text_jobs.reserve_cost(params, model)
    return await store.ledger.quote(account, cost, await store.text_jobs.quote_place(account, cost))


@API.route(
    "GET",
    "/api/v1/text/jobs/{job_id}",
    summary="A text job's state, queue position and text so far",
    response=TextStatus,
    auth="optional",
    errors=(404,),
)
async def get_text(request: web.Request, call: Call[None]) -> TextStatus:
    store = request.app[STORE]
    job = await visible_text_job(store, request.match_info["job_id"], call.account)
    return await text_status(store, job)


@API.route(
    "POST",
    "/api/v1/text/jobs/{job_id}/cancel",
    summary="Cancel a queued or running text job and refund its kudos; the gateway running "
    "it stops at its next piece of text",
    response=JobCancelled,
    auth="optional",
    errors=(404, 409),
    limit="cancel",
)
async def cancel_text(request: web.Request, call: Call[None]) -> JobCancelled:
    store = request.app[STORE]
    job = await visible_text_job(store, request.match_info["job_id"], call.account)
    refunded = await store.text_jobs.cancel(job.id)
    request.app[SIGNALS].job_changed(job.id)
    return JobCancelled(id=job.id, state="cancelled", refunded=refunded)


def follow_text(request: web.Request, job: TextJob) -> AsyncIterator[TextJob]:
    """The job now and whenever it may have changed, until finished (see http.streams)."""
    store = request.app[STORE]

    async def read() -> TextJob:
        found = await store.text_jobs.get(job.id)
        assert found is not None
        return found

    return follow(request, job.id, read, lambda j: j.finished, lambda j: j.state == "queued")


@API.route(
    "GET",
    "/api/v1/text/jobs/{job_id}/events",
    summary="Server-sent events: `text` events ({offset, text}: new text; an offset below "
    "what you have means the job restarted, drop text past it) and `status` events (a "
    "TextStatus without text while running, with the full text once finished)",
    auth="optional",
    produces="text/event-stream",
    errors=(404,),
    limit="stream",
)
async def text_events(request: web.Request, call: Call[None]) -> web.StreamResponse:
    store = request.app[STORE]
    job = await visible_text_job(store, request.match_info["job_id"], call.account)
    sent = ""
    last: TextStatus | None = None
    async with open_stream(request, call.account, f"event stream of text job {job.id}") as stream:
        async for current in follow_text(request, job):
            status = await text_status(store, current, with_text=current.finished)
            if not current.text.startswith(sent):
                sent = ""  # requeued and restarted: the text begins again
            if len(current.text) > len(sent) or (not current.text and sent):
                delta = {"offset": len(sent), "text": current.text[len(sent) :]}
                await stream.send(json.dumps(delta, ensure_ascii=False), "text")
                sent = current.text
            if status != last:
                await stream.send(status.model_dump_json(), "status")
                last = status
            await stream.keepalive()
    return stream.response


# --- gateways and block servers ---------------------------------------------------------


@API.route(
    "POST",
    "/api/v1/workers/peers",
    summary="Link a block server's hivemind peer id to this worker, proven with the peer "
    "id's libp2p key, so the coordinator can pay its owner for the blocks it serves",
    response=PeerLinked,
    auth="worker",
    errors=(403,),
    limit="peer",
)
async def link_peer(request: web.Request, call: WorkerCall[PeerLink]) -> PeerLinked:
    worker = call.worker
    if request.app[CONFIG].require_sandbox and worker.sandboxed is not True:
        raise UnsandboxedWorker()
    body = call.body
    if body.nonce is None or body.peer_signature is None:
        raise OutdatedWorker("peer link")
    try:
        verify_peer_signature(
            body.peer_id,
            peer_proof_message(body.nonce, worker.id, body.peer_id),
            body.peer_signature,
            body.peer_public_key,
        )
    except SignatureInvalid as exc:
        raise Unauthorized(
            f"no proof of owning peer id {body.peer_id}: {exc}; a block server signs "
            "peer_proof_message(nonce, its worker id, peer id) with its libp2p key",
            [("peer_signature", "must be made with the peer id's libp2p private key")],
        ) from None
    await request.app[STORE].text_jobs.link_peer(worker, body.peer_id, body.nonce)
    await request.app[STORE].workers.note_offer(worker, "blocks", ())
    return PeerLinked(peer_id=body.peer_id, worker_id=worker.id)


@API.route(
    "POST",
    "/api/v1/text/pop",
    summary="A gateway offers its models and leases the best queued text job for one of "
    "them; waits up to `wait` seconds for one. Every model offered must match the "
    "coordinator's catalog (name and sizes), else 400 naming each refused model",
    response=TextPopResponse,
    auth="worker",
    errors=(403,),
    limit="pop",
)
async def pop_text(request: web.Request, call: WorkerCall[TextPopRequest]) -> TextPopResponse:
    store, signals = request.app[STORE], request.app[SIGNALS]
    body = call.body
    worker = call.worker
    if request.app[CONFIG].require_sandbox and worker.sandboxed is not True:
        raise UnsandboxedWorker()
    # sizes set prices: a model outside the catalog or with other sizes gets no jobs
    offered = text_models.check_offer(request.app[CONFIG], body.models)
    await store.text_jobs.offer_models(offered)
    names = [m.name for m in offered]
    await store.workers.note_offer(worker, "text", names)
    attempt = timed_pop(request, "text", lambda: store.text_jobs.pop(worker, names))
    job = await long_poll(request, body.wait, attempt, "text", names)
    if job is None:
        return TextPopResponse(job=None)
    signals.job_changed(job.id)
    assert job.lease_deadline is not None
    return TextPopResponse(
        job=LeasedTextJob(
            id=job.id,
            model=job.model,
            params=job.params,
            params_hash=job.params_hash,
            lease_seconds=job.lease_seconds,
            lease_deadline=job.lease_deadline,
            requester=None
            if job.account_id == store.db.system_account(ANONYMOUS)
            else requester_tag(request.app[REQUESTER_KEY], worker.id, job.account_id),
        )
    )


def requester_tag(key: bytes, worker_id: str, account_id: int) -> str:
    """Who asked, as one gateway may know it (LeasedTextJob.requester): the same for one
    account's jobs on that worker, from every coordinator process and across restarts
    (`key`: the database's, coordinator.db.secrets), unlinkable across workers and to the
    account id."""
    message = f"{worker_id}:{account_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


@API.route(
    "POST",
    "/api/v1/text/jobs/{job_id}/delta",
    summary="Stream newly generated text of a leased job; extends the lease. The whole "
    "text may hold max_tokens x 128 characters; a delta past that is refused (400)",
    response=TextDeltaAccepted,
    auth="worker",
    errors=(404, 409),
    limit="delta",
)
async def text_delta(request: web.Request, call: WorkerCall[TextDelta]) -> TextDeltaAccepted:
    body = call.body
    job_id = request.match_info["job_id"]
    length, deadline = await request.app[STORE].text_jobs.append_text(
        call.worker, job_id, body.offset, body.text
    )
    request.app[SIGNALS].job_changed(job_id)
    return TextDeltaAccepted(id=job_id, length=length, lease_deadline=deadline)


@API.route(
    "POST",
    "/api/v1/text/jobs/{job_id}/result",
    summary="Finish a leased text job with the signed text, usage report and spot checks "
    "of block servers; the coordinator charges the requester, pays the block servers' "
    "owners, refunds the rest (a spot check of another gateway's job charges nobody)",
    response=TextResultAccepted,
    auth="worker",
    errors=(404, 409),
    limit="result",
)
async def text_result(
    request: web.Request, call: WorkerCall[TextResultSubmit]
) -> TextResultAccepted:
    store = request.app[STORE]
    worker = call.worker
    body = call.body
    job = await store.text_jobs.get(request.match_info["job_id"])
    if job is None or job.state != "leased" or job.worker_id != worker.id:
        raise Conflict(
            f"text job {request.match_info['job_id']} is not leased to this worker; "
            "it may have been given to another"
        )
    spans = [span.model_dump() for span in body.spans]
    checks = [check.model_dump() for check in body.checks]
    try:
        verify(
            worker.public_key,
            text_result_message(job.id, job.params_hash, body.text, spans, checks),
            body.signature,
        )
    except SignatureInvalid:
        raise Unauthorized("signature does not verify with this worker's key") from None
    model = text_models.find(request.app[CONFIG], job.model)
    if model is None:
        raise Conflict(
            f"model {job.model} left this coordinator's catalog; give the job back "
            f"(POST /api/v1/text/jobs/{job.id}/fail)"
        )
    settled = await store.text_jobs.complete(worker, job, body, model)
    signals = request.app[SIGNALS]
    signals.job_changed(job.id)
    if settled.verified is not None:
        signals.job_changed(settled.verified)  # a conviction replaces its text
    # the result may have scheduled a spot check for a trusted gateway
    signals.job_queued("text", job.model)
    return TextResultAccepted(
        id=job.id,
        kudos_charged=settled.charged,
        kudos_refunded=settled.refunded,
        kudos_earned=settled.paid.get(worker.account_id, 0),
    )


@API.route(
    "POST",
    "/api/v1/text/jobs/{job_id}/fail",
    summary="Give a leased text job back: requeued, or (retry false, or too many tries) "
    "failed and refunded",
    response=TextStatus,
    auth="worker",
    errors=(404, 409),
    limit="result",
)
async def text_fail(request: web.Request, call: WorkerCall[TextFailure]) -> TextStatus:
    store = request.app[STORE]
    body = call.body
    job = await store.text_jobs.fail(
        call.worker, request.match_info["job_id"], body.reason, body.retry
    )
    request.app[SIGNALS].job_changed(job.id)
    if job.state == "queued":
        request.app[SIGNALS].job_queued("text", job.model)
    return await text_status(store, job)
