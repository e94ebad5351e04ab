"""AI Horde's image workers (/api/v2/generate/pop and /submit) serving our queue.

An AI Horde worker (horde-worker-reGen, any bridge) authenticates with its owner's API key
and a worker name; it becomes a worker of that account (Workers.horde_worker) and leases
jobs through the same queue as ours. Its results are unsigned and come from engines we
cannot reproduce, so: it is never trusted and never takes or gets spot checks; it only
gets one-image jobs whose requester did not ask for signed results; what it earns is held
for `--horde-hold` seconds and refunded if the requester disputes the job in that time
(coordinator.economy.payments.hold_for_dispute). Its images are decoded under the same caps
as our own uploads and stored as PNG. A coordinator that requires sandboxed workers turns
them away. (AI Horde's text workers cannot report block usage; they are not served.)

A name costs nothing, so a new one is created through the `worker` rate limit of native
registrations and counts toward `--max-workers-per-account`; a new name of an account
whose worker is paused is paused too; every report that is not `ok` counts toward
`--faulted-run` (coordinator.economy.suspicion).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

from aiohttp import web

from coordinator.errors import BadRequest, Forbidden, NotFound, UnsandboxedWorker
from coordinator.http.addresses import client_ip
from coordinator.http.api import API, Call
from coordinator.http.metrics import timed_pop
from coordinator.http.state import CONFIG, FILES, LIMITER, SIGNALS, STORE
from coordinator.jobs.foreign_images import png_from_base64
from coordinator.store import Account, ResultRecord
from protocol.horde import (
    GenerationSubmitted,
    PopPayload,
    PopRequestV2,
    PopResponseV2,
    SubmitRequestV2,
    horde_sampler,
)
from protocol.infotext import parameters_text
from protocol.params import MAX_STEPS

__all__ = ["horde_pop", "horde_submit"]


def _owner(account: Account | None) -> Account:
    if account is None:
        raise Forbidden(
            "anonymous users cannot run workers; send your API key in the `apikey` header"
        ).horde("AnonForbiddenWorker")
    return account


@API.route(
    "POST",
    "/api/v2/generate/pop",
    summary="AI Horde worker: lease a one-image job for one of its models (unsigned results: "
    "never trusted, pay held; requesters may exclude it)",
    response=PopResponseV2,
    auth="optional",
    errors=(403,),
    limit="pop",
)
async def horde_pop(request: web.Request, call: Call[PopRequestV2]) -> PopResponseV2:
    owner = _owner(call.account)
    if request.app[CONFIG].require_sandbox:
        raise UnsandboxedWorker()
    body = call.body
    store = request.app[STORE]
    ip = client_ip(request)
    worker = await store.workers.horde_worker(owner, body.name)
    if worker is None:
        # a new name is a new worker identity: the same limit as a native registration
        await request.app[LIMITER].check("worker", f"account:{owner.id}", ip)
        worker = await store.workers.new_horde_worker(owner, body.name, ip)
    # the poll is noted (uptime, address, offer) in the pop's transaction
    poll = store.workers.poll_note(worker, ip, kind="image", models=body.models)
    job = await timed_pop(
        request,
        "image",
        lambda: store.image_jobs.pop(
            worker,
            body.models,
            body.max_pixels,
            MAX_STEPS,
            poll,
            img2img=body.allow_img2img,
            inpainting=body.allow_img2img and body.allow_painting,
        ),
    )()
    if job is None:
        return PopResponseV2(id=None, ids=[], payload={}, model=None, skipped={})
    request.app[SIGNALS].job_changed(job.id)
    p = job.params
    sampler = horde_sampler(p.sampler)
    # pop_job offers no other jobs
    assert sampler is not None
    assert p.seed is not None
    payload = PopPayload(
        prompt=f"{p.prompt} ### {p.negative_prompt}" if p.negative_prompt else p.prompt,
        sampler_name=sampler[0],
        karras=sampler[1] or p.karras,
        tiling=p.tiling,
        clip_skip=p.clip_skip,
        cfg_scale=p.cfg_scale,
        seed=str(p.seed),
        width=p.width,
        height=p.height,
        ddim_steps=p.steps,
        denoising_strength=None if p.source_image is None else p.denoising_strength,
    )
    sources = [await _base64_file(request, d) for d in (p.source_image, p.source_mask)]
    return PopResponseV2(
        id=job.id,
        ids=[job.id],
        payload=payload.model_dump(),
        model=p.model or (body.models[0] if body.models else "stable_diffusion"),
        skipped={},
        ttl=int(job.lease_seconds),
        source_processing=p.source_processing if p.source_image else "img2img",
        source_image=sources[0],
        source_mask=sources[1],
    )


async def _base64_file(request: web.Request, digest: str | None) -> str | None:
    """A stored source image or mask as base64 (None for none)."""
    if digest is None:
        return None
    async with request.app[FILES].local_copy(digest) as path:
        return await asyncio.to_thread(lambda: base64.b64encode(path.read_bytes()).decode())


@API.route(
    "POST",
    "/api/v2/generate/submit",
    summary="AI Horde worker: the image of a leased job (base64 WebP or PNG); a faulted "
    "state gives the job back",
    response=GenerationSubmitted,
    auth="optional",
    errors=(403, 404),
    limit="result",
)
async def horde_submit(request: web.Request, call: Call[SubmitRequestV2]) -> GenerationSubmitted:
    owner = _owner(call.account)
    body = call.body
    store, signals = request.app[STORE], request.app[SIGNALS]
    job = await store.image_jobs.get(body.id.lower())
    if job is None:
        raise NotFound(f"Processing Job with ID {body.id} does not exist.").horde("InvalidJobID")
    worker = await store.workers.worker_by_id(job.worker_id) if job.worker_id else None
    if worker is None or worker.signs or worker.account_id != owner.id:
        raise Forbidden(f"job {body.id} is not leased to a worker of yours").horde(
            "WrongCredentials"
        )
    if job.state != "leased":
        raise BadRequest(
            f"job {body.id} is {job.state}: its lease ended or it was submitted already"
        ).horde("DuplicateGen" if job.state == "done" else "AbortedGen")
    if body.state != "ok":
        # faulted, censored (a blacked-out image) or refused: another worker tries, and
        # the give-back counts against this one (--faulted-run)
        job = await store.image_jobs.fail(worker, job.id, f"AI Horde worker reported {body.state}")
        signals.job_changed(job.id)
        if job.state == "queued":
            signals.job_queued("image", job.params.model)
        return GenerationSubmitted(reward=0.0)
    p = job.params
    assert p.seed is not None
    model = p.model or (worker.models[0] if worker.models else "unknown")
    files, text = request.app[FILES], parameters_text(p, p.seed, model)

    def decode() -> tuple[bytes, str]:
        """In one thread hop (a hop costs more than a small image's work)."""
        png = png_from_base64(body.generation, p.width, p.height, text)
        return png, hashlib.sha256(png).hexdigest()

    png, digest = await asyncio.to_thread(decode)
    await files.put_bytes(png, digest)
    # unsigned: the signature column stays empty
    _, held = await store.image_jobs.finish(worker, job, [ResultRecord(0, p.seed, digest, "")])
    signals.job_changed(job.id)
    return GenerationSubmitted(reward=float(held))
