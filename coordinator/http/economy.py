"""The kudos economy over HTTP: quotes, cancel, share, ratings, transfers, history, workers."""

from __future__ import annotations

import re
from typing import Annotated

from aiohttp import web

from coordinator.economy import image_models
from coordinator.errors import NotFound, UnsandboxedWorker
from coordinator.http.api import API, Call, UserCall, WorkerCall
from coordinator.http.idempotency import header_key
from coordinator.http.jobs import check_anonymous_limits, owned_job
from coordinator.http.params import WholeNumber
from coordinator.http.state import CONFIG, SIGNALS, STORE
from protocol.messages import (
    EngineInfo,
    HistoryPage,
    JobCancelled,
    Quote,
    RatingCreate,
    RatingRecorded,
    ShareState,
    ShareUpdate,
    TransferCreate,
    TransferDone,
    WorkerInfo,
)
from protocol.params import ImageParams

MAX_HISTORY = 500


@API.route(
    "POST",
    "/api/v1/quotes/image",
    summary="What an image job would cost, what you can spend, the queue and the ETA; "
    "submits nothing",
    response=Quote,
    auth="optional",
    limit="quote",
)
async def quote_image(request: web.Request, call: Call[ImageParams]) -> Quote:
    store = request.app[STORE]
    params = call.body
    account = call.account or await store.accounts.anonymous_account()
    if account.anonymous:
        check_anonymous_limits(request, params)
    if "width" not in params.model_fields_set and "height" not in params.model_fields_set:
        params = image_models.with_default_size(request.app[CONFIG], params)
    # (the model's limits; a quote has no nsfw flag: an NSFW model is quoted too)
    image_models.check_job(request.app[CONFIG], params, nsfw=True)
    cost = image_models.price(request.app[CONFIG], params)
    return await store.ledger.quote(
        account, cost, await store.image_jobs.quote_place(account, cost)
    )


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/cancel",
    summary="Cancel a queued or running job and refund its kudos; a worker still running it "
    "gets 409 when it submits",
    response=JobCancelled,
    auth="optional",
    errors=(404, 409),
    limit="cancel",
)
async def cancel_job(request: web.Request, call: Call[None]) -> JobCancelled:
    store = request.app[STORE]
    job = await owned_job(store, request.match_info["job_id"], call.account, viewing=False)
    refunded = await store.image_jobs.cancel(job.id)
    request.app[SIGNALS].job_changed(job.id)
    return JobCancelled(id=job.id, state="cancelled", refunded=refunded)


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/share",
    summary="Share (or unshare) a job: any registered user may then see and rate its images",
    response=ShareState,
    auth="user",
    errors=(404,),
    limit="share",
)
async def share_job(request: web.Request, call: UserCall[ShareUpdate]) -> ShareState:
    store = request.app[STORE]
    job = await owned_job(store, request.match_info["job_id"], call.account, viewing=False)
    body = call.body
    await store.image_jobs.set_shared(job.id, body.shared)
    return ShareState(id=job.id, shared=body.shared)


@API.route(
    "POST",
    "/api/v1/jobs/{job_id}/images/{index}/rating",
    summary="Rate one image 1-10 (yours, or a shared job's); earns a small kudos reward, "
    "once per image",
    response=RatingRecorded,
    auth="user",
    status=201,
    errors=(404, 409),
    limit="rate",
)
async def rate_image(
    request: web.Request,
    call: UserCall[RatingCreate],
    # no job has 10**9 images
    index: Annotated[int, WholeNumber("the image's index, from 0", 0, 10**9 - 1)],
) -> RatingRecorded:
    body = call.body
    return await request.app[STORE].ledger.rate_image(
        call.account, request.match_info["job_id"], index, body.score
    )


@API.route(
    "POST",
    "/api/v1/transfers",
    summary="Give kudos to another user. Send an Idempotency-Key header: a replay returns the "
    "first answer and moves nothing; the same key with another body is 409",
    response=TransferDone,
    auth="user",
    status=201,
    errors=(402, 404, 409),
    limit="transfer",
)
async def create_transfer(request: web.Request, call: UserCall[TransferCreate]) -> TransferDone:
    key = header_key(request, required=True)
    body = call.body
    return await request.app[STORE].ledger.transfer(call.account, body.to, body.amount, key)


@API.route(
    "GET",
    "/api/v1/accounts/me/history",
    summary="The caller's ledger entries, newest first (?limit=1..500, ?before=ENTRY_ID)",
    response=HistoryPage,
    auth="user",
)
async def account_history(
    request: web.Request,
    call: UserCall[None],
    limit: Annotated[int, WholeNumber("entries to return (default 50)", 1, MAX_HISTORY)] = 50,
    before: Annotated[
        int | None, WholeNumber("only entries older than this entry id", 1, 2**62)
    ] = None,
) -> HistoryPage:
    return await request.app[STORE].ledger.history(call.account, limit, before)


@API.route(
    "GET",
    "/api/v1/workers/{worker_id}",
    summary="A worker's public record: trust, spot checks, jobs done, ratings, engine",
    response=WorkerInfo,
    errors=(404,),
)
async def show_worker(request: web.Request, call: Call[None]) -> WorkerInfo:
    worker_id = request.match_info["worker_id"]
    if not re.fullmatch(r"[0-9a-f]{32}", worker_id):
        raise NotFound(f"no worker {worker_id}")
    return await request.app[STORE].workers.worker_info(worker_id)


@API.route(
    "POST",
    "/api/v1/workers/engine",
    summary="Report the worker's engine build; spot checks require identical pixels only "
    "between identical builds",
    response=WorkerInfo,
    auth="worker",
    errors=(403,),
    limit="engine",
)
async def report_engine(request: web.Request, call: WorkerCall[EngineInfo]) -> WorkerInfo:
    store = request.app[STORE]
    body = call.body
    if request.app[CONFIG].require_sandbox and body.sandboxed is not True:
        raise UnsandboxedWorker()
    await store.workers.set_engine(call.worker, body.model_dump_json())
    return await store.workers.worker_info(call.worker.id)
