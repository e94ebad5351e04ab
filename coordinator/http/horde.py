"""AI Horde's v2 API for requesters (/api/v2): a second door to the same rooms.

AI Horde's clients (ArtBot, the Krita and GIMP plugins, SillyTavern, KoboldAI Lite,
horde_sdk) work unchanged against `http://HOST:PORT/api/`. Every request becomes one of our
own jobs through the same functions /api/v1 uses (coordinator.http.jobs.queue_image,
coordinator.http.text.submit); kudos, priority, trust and limits are ours. The wire
format is in protocol.horde; AI Horde's workers are served by coordinator.http.horde_workers.

Quirks kept for their clients: the `apikey` header (`0000000000` = anonymous), errors
shaped `{"message", "rc"}` (coordinator.http.api), floats for kudos, an image's seed as a
string, `done: true` for faulted jobs too, and no 4xx while polling a live job: a job made
here is visible to whoever holds its id, as on AI Horde.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from coordinator.economy import image_models
from coordinator.errors import BadRequest, NotFound, Unauthorized
from coordinator.http.api import API, Call
from coordinator.http.jobs import owned_job, queue_image, with_sources
from coordinator.http.network import shared_network_status
from coordinator.http.params import Choice, Text
from coordinator.http.possible import unservable_job
from coordinator.http.state import CONFIG, FILES, SIGNALS, STORE, VIEWS
from coordinator.http.text import choose_model, first_served, visible_text_job
from coordinator.http.text import submit as submit_text
from coordinator.jobs import text as text_jobs
from coordinator.jobs.foreign_images import webp_base64
from coordinator.jobs.lifecycle import Lifecycle
from coordinator.jobs.network import ONLINE_SECONDS
from coordinator.jobs.possible import no_worker_warning
from coordinator.jobs.source_check import CheckedSources
from coordinator.jobs.text import TextJob
from coordinator.store import Account, ImageJob, Store
from protocol.errors import ValidationFailed
from protocol.horde import (
    ANONYMOUS_KEY,
    HORDE_SAMPLERS,
    ActiveModel,
    DryRun,
    Heartbeat,
    ImageGeneration,
    ImageRequestV2,
    KudosDetails,
    RequestAsync,
    RequestStatusCheck,
    RequestStatusImage,
    RequestStatusText,
    TextGeneration,
    TextRequestV2,
    UserDetails,
    UserRecords,
    WorkerDetails,
    WorkerKudos,
    split_prompt,
)
from protocol.params import MAX_SEED, ImageParams
from protocol.postprocess import DEFAULT_FACEFIXER_STRENGTH, DEFAULT_HIRES_STRENGTH
from protocol.text import (
    KOBOLD_SAMPLER_ORDER,
    KOBOLD_SAMPLING_FIELDS,
    MAX_CONTEXT_TOKENS,
    MAX_PROMPT_CHARS,
    TextParams,
)
from protocol.validation import parse
from protocol.version import VERSION

__all__ = ["image_params", "text_params"]

M = TypeVar("M", bound=BaseModel)

# KoboldAI's fields that TextParams has under the same name
_KOBOLD_FIELDS = (
    *KOBOLD_SAMPLING_FIELDS,
    "singleline",
    "frmttriminc",
    "frmtrmblln",
    "frmtrmspch",
    "frmtadsnsp",
)

# where our validation names a field, AI Horde's request names it
_V2_FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "prompt",
    "width": "params.width",
    "height": "params.height",
    "steps": "params.steps",
    "cfg_scale": "params.cfg_scale",
    "sampler": "params.sampler_name",
    "seed": "params.seed",
    "n": "params.n",
    "karras": "params.karras",
    "clip_skip": "params.clip_skip",
    "tiling": "params.tiling",
    "seed_variation": "params.seed_variation",
    "model": "models",
    "hires_fix": "params.hires_fix",
    "hires_fix_denoising_strength": "params.hires_fix_denoising_strength",
    "post_processing": "params.post_processing",
    "facefixer_strength": "params.facefixer_strength",
    "control_type": "params.control_type",
    "image_is_control": "params.image_is_control",
    "return_control_map": "params.return_control_map",
    "loras": "params.loras",
    "tis": "params.tis",
    "max_tokens": "params.max_length",
    "temperature": "params.temperature",
    "top_p": "params.top_p",
    "top_k": "params.top_k",
    "repetition_penalty": "params.rep_pen",
    "stop": "params.stop_sequence",
    "max_context_length": "params.max_context_length",
    **{name: f"params.{name}" for name in _KOBOLD_FIELDS},
}


def _v2_field(ours: str) -> str:
    """AI Horde's name of one of our fields (keeping a path into it: loras[0].model)."""
    head = re.split(r"[.\[]", ours, maxsplit=1)[0]
    name = _V2_FIELDS.get(head)
    if name is None:
        return _V2_FIELDS.get(ours.split(".")[0], ours)
    return name + ours[len(head) :] if head in ("loras", "tis") else name


def _v2_parse(model: type[M], data: dict[str, object]) -> M:
    """Our own parameters from an AI Horde request; errors name AI Horde's fields."""
    try:
        return parse(model, data)
    except ValidationFailed as exc:
        problems = [(_v2_field(field), m) for field, m in exc.problems]
        raise BadRequest("; ".join(f"{f}: {m}" for f, m in problems), problems) from None


# digits of the largest seed (MAX_SEED): longer digit strings are hashed like other text
_SEED_DIGITS = len(str(MAX_SEED))


def _seed(text: str | None) -> int | None:
    """AI Horde takes any text as a seed: numbers as they are, other text hashed."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    # ASCII digits only: `isdigit` also accepts "²", which `int` refuses
    if text.isascii() and text.isdigit() and len(text) <= _SEED_DIGITS and int(text) <= MAX_SEED:
        return int(text)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:4], "big")


async def _image_model(request: web.Request, models: list[str]) -> str | None:
    """One model for the job: the only one named, else the first an online worker offers."""
    if len(models) <= 1:
        return models[0] if models else None
    offered = {
        m.name
        for m in (await shared_network_status(request, online_only=True)).models
        if m.kind == "image" and m.workers
    }
    return next((m for m in models if m in offered), models[0])


async def image_params(
    request: web.Request, body: ImageRequestV2
) -> tuple[ImageParams, CheckedSources]:
    """The job's parameters (with its sources' digests) and its checked source image and
    mask; a 400 naming the field for anything we cannot honour."""
    refuse_not_honoured(body.not_honoured())
    p = body.params
    # AI Horde: without a source image, source_processing means nothing (txt2img)
    processing = body.source_processing if body.source_image else "txt2img"
    if processing == "remix":
        problem = "'remix' is not served here; use img2img, inpainting or outpainting"
        raise BadRequest(f"source_processing: {problem}", [("source_processing", problem)])
    sampler = HORDE_SAMPLERS.get(p.sampler_name)
    if sampler is None:
        known = ", ".join(HORDE_SAMPLERS)
        raise BadRequest(
            f"sampler {p.sampler_name!r} is not served here; choose one of {known}",
            [("params.sampler_name", f"must be one of {known}")],
        ).horde("UnsupportedSampler")
    prompt, negative = split_prompt(body.prompt)
    control_type = None if p.control_type in (None, "", "none") else p.control_type
    # ControlNet samples from noise: AI Horde's denoising_strength does not apply
    strength = processing != "txt2img" and control_type is None
    params: ImageParams = _v2_parse(
        ImageParams,
        {
            "prompt": prompt,
            "negative_prompt": negative,
            "width": p.width,
            "height": p.height,
            "steps": p.steps,
            "cfg_scale": p.cfg_scale,
            # a sampler with a Karras variant names it (as before `karras` existed)
            "sampler": sampler[1] if p.karras and sampler[1] else sampler[0],
            "karras": p.karras and not sampler[1],
            "clip_skip": 1 if p.clip_skip is None else p.clip_skip,
            "tiling": bool(p.tiling),
            "seed_variation": 1 if p.seed_variation is None else p.seed_variation,
            "seed": _seed(p.seed),
            "n": p.n,
            "model": await _image_model(request, body.models),
            "source_processing": processing,
            **({"denoising_strength": p.denoising_strength} if strength else {}),
            **({"control_type": control_type} if control_type is not None else {}),
            **({"image_is_control": True} if p.image_is_control else {}),
            **({"return_control_map": True} if p.return_control_map else {}),
            "hires_fix": bool(p.hires_fix),
            "hires_fix_denoising_strength": DEFAULT_HIRES_STRENGTH
            if p.hires_fix_denoising_strength is None
            else p.hires_fix_denoising_strength,
            "post_processing": p.post_processing or [],
            "facefixer_strength": DEFAULT_FACEFIXER_STRENGTH
            if p.facefixer_strength is None
            else p.facefixer_strength,
            **({"loras": p.loras} if p.loras else {}),
            **({"tis": p.tis} if p.tis else {}),
        },
    )
    if "width" not in p.model_fields_set and "height" not in p.model_fields_set:
        params = image_models.with_default_size(request.app[CONFIG], params)
    return await with_sources(params, body.source_image or None, body.source_mask or None)


@API.route(
    "POST",
    "/api/v2/generate/async",
    summary="AI Horde: queue an image request ('prompt ### negative', params with k_* "
    "samplers, models, r2); `trusted_workers` keeps it from AI Horde workers",
    response=RequestAsync,
    auth="optional",
    status=202,
    errors=(403,),
    limit="submit",
)
async def image_async(
    request: web.Request, call: Call[ImageRequestV2]
) -> RequestAsync | web.Response:
    body = call.body
    params, sources = await image_params(request, body)
    if body.dry_run:
        image_models.check_job(request.app[CONFIG], params, body.nsfw, "params.")
        kudos = image_models.price(request.app[CONFIG], params)
        return web.json_response(DryRun(kudos=float(kudos)).model_dump())
    job = await queue_image(
        request,
        call.account,
        params,
        nsfw=body.nsfw,
        prefix="params.",
        signed_only=body.trusted_workers,
        horde={"r2": body.r2, "client_agent": request.headers.get("Client-Agent", "")[:200]},
        sources=sources,
    )
    if body.shared and call.account is not None:
        await request.app[STORE].image_jobs.set_shared(job.id, True)
    reason = await unservable_job(request, job)
    warnings = [] if reason is None else [no_worker_warning(reason)]
    return RequestAsync(id=job.id, kudos=float(job.cost), warnings=warnings)


def _job_id(request: web.Request) -> str:
    return request.match_info["id"].lower()


async def _image_job(request: web.Request, account: Account | None) -> ImageJob:
    """A job made through /api/v2 is visible to whoever holds its id (AI Horde's rule);
    any other only as /api/v1 allows."""
    store = request.app[STORE]
    job = await store.image_jobs.get(_job_id(request))
    if job is not None and job.horde is not None and job.verify_of is None:
        return job
    try:
        return await owned_job(store, _job_id(request), account)
    except NotFound:
        raise NotFound(f"Waiting Prompt with ID '{request.match_info['id']}' not found.").horde(
            "RequestNotFound"
        ) from None


async def _check(
    jobs: Lifecycle,
    job_id: str,
    state: str,
    n: int,
    cost: int,
    attempts: int,
    job: Any = None,
    *,
    is_possible: bool = True,
) -> dict[str, Any]:
    """`job`: the image job as just read, if the caller has it (saves reading it again);
    `is_possible`: AI Horde's (coordinator.http.possible)."""
    done = state in ("done", "failed", "cancelled")
    position, eta = (None, None) if done else await jobs.queue_info(job_id, job)
    return {
        "finished": n if state == "done" else 0,
        "processing": n if state == "leased" else 0,
        "restarted": max(attempts - 1, 0),
        "waiting": n if state == "queued" else 0,
        "done": done,
        "faulted": state == "failed",
        "wait_time": 0 if eta is None else int(eta),
        "queue_position": position or 0,
        "kudos": float(cost),
        "is_possible": is_possible,
    }


@API.route(
    "GET",
    "/api/v2/generate/check/{id}",
    summary="AI Horde: an image request's progress (no images)",
    response=RequestStatusCheck,
    auth="optional",
    errors=(404,),
)
async def image_check(request: web.Request, call: Call[None]) -> RequestStatusCheck:
    job = await _image_job(request, call.account)
    store = request.app[STORE]
    n = job.params.n
    check = await _check(
        store.image_jobs,
        job.id,
        job.state,
        n,
        job.cost,
        job.attempts,
        job,
        is_possible=await unservable_job(request, job) is None,
    )
    return RequestStatusCheck(**check)


async def _worker_names(store: Store, worker_id: str | None) -> tuple[str, str, tuple[str, ...]]:
    worker = await store.workers.worker_by_id(worker_id) if worker_id else None
    if worker is None:
        return "", "", ()
    return worker.id, worker.name, worker.models


async def image_status(request: web.Request, job: ImageJob) -> RequestStatusImage:
    store, files = request.app[STORE], request.app[FILES]
    generations = []
    if job.state == "done":
        worker_id, worker_name, models = await _worker_names(store, job.worker_id)
        model = job.params.model or (models[0] if models else "default")
        inline = job.horde is not None and job.horde.get("r2") is False
        for record in await store.image_jobs.results(job.id):
            if inline:
                async with files.local_copy(record.sha256) as path:
                    img = await asyncio.to_thread(webp_base64, path, *job.params.output_size)
            else:
                img = str(
                    request.url.with_path(
                        f"/api/v2/generate/image/{job.id}/{record.index}/{record.sha256}.png"
                    ).with_query(None)
                )
            generations.append(
                ImageGeneration(
                    img=img,
                    seed=str(record.seed),
                    id=str(uuid.UUID(record.sha256[:32])),
                    worker_id=worker_id,
                    worker_name=worker_name,
                    model=model,
                )
            )
    check = await _check(
        store.image_jobs,
        job.id,
        job.state,
        job.params.n,
        job.cost,
        job.attempts,
        job,
        is_possible=await unservable_job(request, job) is None,
    )
    return RequestStatusImage(**check, generations=generations, shared=job.shared)


@API.route(
    "GET",
    "/api/v2/generate/status/{id}",
    summary="AI Horde: an image request's progress and its images (URLs, or base64 WebP "
    "when it was made with r2 false)",
    response=RequestStatusImage,
    auth="optional",
    errors=(404,),
)
async def image_status_route(request: web.Request, call: Call[None]) -> RequestStatusImage:
    return await image_status(request, await _image_job(request, call.account))


@API.route(
    "DELETE",
    "/api/v2/generate/status/{id}",
    summary="AI Horde: cancel an image request (its kudos come back); its status as it was",
    response=RequestStatusImage,
    auth="optional",
    errors=(404,),
    limit="cancel",
)
async def image_cancel(request: web.Request, call: Call[None]) -> RequestStatusImage:
    store = request.app[STORE]
    job = await _image_job(request, call.account)
    if not job.finished:
        await store.image_jobs.cancel(job.id)
        request.app[SIGNALS].job_changed(job.id)
        found = await store.image_jobs.get(job.id)
        assert found is not None
        job = found
    return await image_status(request, job)


@API.route(
    "GET",
    "/api/v2/generate/image/{id}/{index}/{digest}",
    summary="AI Horde: a finished image by the URL its status gave (the URL is the "
    "capability, like AI Horde's download links)",
    produces="image/png",
    errors=(404,),
)
async def image_file(request: web.Request, call: Call[None]) -> web.StreamResponse:
    store = request.app[STORE]
    digest = request.match_info["digest"].removesuffix(".png")
    for record in await store.image_jobs.results(_job_id(request)):
        if str(record.index) == request.match_info["index"] and record.sha256 == digest:
            return await request.app[FILES].response(
                request,
                record.sha256,
                {
                    "Content-Type": "image/png",
                    "Cache-Control": "private, max-age=31536000",
                    "X-Content-Type-Options": "nosniff",
                    "Content-Security-Policy": "default-src 'none'; sandbox",
                },
            )
    raise NotFound("no such image").horde("RequestNotFound")


# --- text -------------------------------------------------------------------------------


def refuse_not_honoured(fields: list[str]) -> None:
    """A 400 naming each AI Horde field sent with a value we cannot honour yet."""
    refused = [
        (name, "is not supported here yet; leave it out or send its off value") for name in fields
    ]
    if refused:
        raise BadRequest("; ".join(f"{f}: {m}" for f, m in refused), refused)


def text_params(body: TextRequestV2) -> TextParams:
    p = body.params
    if p.n != 1:
        raise BadRequest(
            "params.n: one generation per request here; send several requests",
            [("params.n", "must be 1")],
        )
    refuse_not_honoured([f"params.{name}" for name in p.not_honoured()])
    prompt = body.prompt
    if len(prompt) > MAX_PROMPT_CHARS:
        # only the prompt's last tokens are used (max_context_length): never refused for length
        prompt = prompt[-MAX_PROMPT_CHARS:]
    values: dict[str, object] = {
        "prompt": prompt,
        "max_tokens": p.max_length,
        # beyond any model's context it makes no difference (the model's context cuts)
        "max_context_length": min(p.max_context_length, MAX_CONTEXT_TOKENS),
        # (of several, text_async takes the first one served)
        "model": body.models[0] if body.models else None,
        "sampler_order": list(KOBOLD_SAMPLER_ORDER),
    }
    for ours, theirs in (
        ("temperature", p.temperature),
        ("top_p", p.top_p),
        ("top_k", p.top_k),
        ("repetition_penalty", p.rep_pen),
        ("stop", p.stop_sequence),
    ):
        if theirs is not None:
            values[ours] = theirs
    if p.sampler_seed is not None and p.sampler_seed >= 0:  # KoboldAI's -1: a random seed
        if p.sampler_seed > MAX_SEED:
            problem = [("params.sampler_seed", f"must be at most {MAX_SEED} (-1: random)")]
            raise BadRequest(f"{problem[0][0]}: {problem[0][1]}", problem)
        values["seed"] = p.sampler_seed
    for name in _KOBOLD_FIELDS:
        if getattr(p, name) is not None:
            values[name] = getattr(p, name)
    params: TextParams = _v2_parse(TextParams, values)
    return params


@API.route(
    "POST",
    "/api/v2/generate/text/async",
    summary="AI Horde: queue a text request (KoboldAI-style prompt and params) on the swarm",
    response=RequestAsync,
    auth="optional",
    status=202,
    errors=(403,),
    limit="submit",
)
async def text_async(
    request: web.Request, call: Call[TextRequestV2]
) -> RequestAsync | web.Response:
    body = call.body
    refuse_not_honoured(["workers"] if body.workers else [])
    params = text_params(body)
    bridges = not body.trusted_workers  # AI Horde's text workers may serve it
    if len(body.models) > 1:
        # any of them will do: the first one served now
        chosen = await first_served(request, body.models, horde_workers=bridges)
        params = params.model_copy(update={"model": chosen})
    if body.dry_run:
        model = await choose_model(request, params.model, "models", horde_workers=bridges)
        cost = text_jobs.reserve_cost(params, model)
        return web.json_response(DryRun(kudos=float(cost)).model_dump())
    agent = request.headers.get("Client-Agent", "")[:200]
    job = await submit_text(
        request,
        call.account,
        params,
        horde={"client_agent": agent},
        signed_only=body.trusted_workers,
    )
    return RequestAsync(id=job.id, kudos=float(job.cost))


async def _text_job(request: web.Request, account: Account | None, *, polling: bool) -> TextJob:
    """The text job of the path: for `polling` a job made through /api/v2, whoever holds
    its id (AI Horde's rule; the ids are random UUIDs); else, and for jobs made through
    /api/v1 or the OpenAI routes, as /api/v1 allows."""
    store = request.app[STORE]
    if polling:
        found = await store.text_jobs.get(_job_id(request))
        if found is not None and found.horde:
            return found
    try:
        return await visible_text_job(store, _job_id(request), account)
    except NotFound:
        raise NotFound(f"Waiting Prompt with ID '{request.match_info['id']}' not found.").horde(
            "RequestNotFound"
        ) from None


async def text_status(request: web.Request, job: TextJob) -> RequestStatusText:
    store = request.app[STORE]
    generations = []
    if job.state == "done":
        worker_id, worker_name, _ = await _worker_names(store, job.worker_id)
        generations.append(
            TextGeneration(
                text=job.text,
                seed=job.params.seed or 0,
                worker_id=worker_id,
                worker_name=worker_name,
                model=job.model,
            )
        )
    cost = job.charged if job.charged is not None else job.cost
    check = await _check(store.text_jobs, job.id, job.state, 1, cost, job.attempts)
    if not job.finished:
        position, eta = await store.text_jobs.queue_info(job.id)
        check.update(queue_position=position or 0, wait_time=0 if eta is None else int(eta))
    return RequestStatusText(**check, generations=generations)


@API.route(
    "GET",
    "/api/v2/generate/text/status/{id}",
    summary="AI Horde: a text request's progress and, once done, its text",
    response=RequestStatusText,
    auth="optional",
    errors=(404,),
)
async def text_status_route(request: web.Request, call: Call[None]) -> RequestStatusText:
    return await text_status(request, await _text_job(request, call.account, polling=True))


@API.route(
    "DELETE",
    "/api/v2/generate/text/status/{id}",
    summary="AI Horde: cancel a text request (the unused kudos come back)",
    response=RequestStatusText,
    auth="optional",
    errors=(404,),
    limit="cancel",
)
async def text_cancel(request: web.Request, call: Call[None]) -> RequestStatusText:
    store = request.app[STORE]
    job = await _text_job(request, call.account, polling=False)
    if not job.finished:
        await store.text_jobs.cancel(job.id)
        request.app[SIGNALS].job_changed(job.id)
        job = await _text_job(request, call.account, polling=False)
    return await text_status(request, job)


# --- the network ------------------------------------------------------------------------


@API.route(
    "GET",
    "/api/v2/status/heartbeat",
    summary="AI Horde: is the coordinator up, and its version",
    response=Heartbeat,
)
async def heartbeat(request: web.Request, call: Call[None]) -> Heartbeat:
    return Heartbeat(message="OK", version=VERSION)


@API.route(
    "GET",
    "/api/v2/status/models",
    summary="AI Horde: the models online workers offer (?type=image|text, default image), "
    "with their worker counts and queues",
    response=None,
    limit="network",
)
async def status_models(
    request: web.Request,
    call: Call[None],
    # (horde_sdk sends `type=` for the default)
    kind: Annotated[
        str, Choice("image (the default) or text", ("image", "text"), name="type")
    ] = "image",
    state: Annotated[
        str,
        Choice(
            "AI Horde's model_state: known (image models of the reference only), custom "
            "(the others), all (the default)",
            ("known", "custom", "all"),
            name="model_state",
        ),
    ] = "all",
) -> web.Response:
    view = await shared_network_status(request, online_only=True)
    config = request.app[CONFIG]

    def listed(name: str) -> bool:
        if state == "all" or kind != "image":
            return True
        return (image_models.find(config, name) is not None) == (state == "known")

    models = [
        ActiveModel(
            name=m.name,
            count=m.workers,
            performance=0.0,
            queued=float(m.queued),
            jobs=float(m.queued),
            eta=int(m.eta_seconds or 0),
            type=m.kind,
        ).model_dump()
        for m in view.models
        if m.kind == kind and listed(m.name)
    ]
    return web.json_response(models)


async def user_details(store: Store, account: Account, created_at: float) -> UserDetails:
    info = await store.ledger.account_info(account)
    owned = await store.workers.account_workers(account.id)
    return UserDetails(
        username=f"{account.name}#{account.id}",
        id=account.id,
        kudos=float(info.kudos),
        kudos_details=KudosDetails(
            accumulated=float(info.earned),
            gifted=float(info.transferred_out),
            received=float(info.transferred_in),
            awarded=float(info.granted),
        ),
        concurrency=30,
        worker_count=len(owned),
        worker_ids=[w.id for w in owned],
        trusted=any(w.trusted for w in owned),
        suspicious=sum(w.suspicion for w in owned),
        account_age=max(int(time.time() - created_at), 0),
        records=UserRecords(
            fulfillment={"image": sum(w.jobs_done for w in owned if w.kind == "image")},
            usage={"megapixelsteps": 0.0, "tokens": 0.0},
        ),
    )


# AI Horde's anonymous user (the key 0000000000) is user 0
ANONYMOUS_USER = {"username": "Anonymous#0", "id": 0}


async def _anonymous_user(store: Store) -> UserDetails:
    """The shared anonymous account as AI Horde shows its anonymous user."""
    details = await user_details(store, await store.accounts.anonymous_account(), time.time())
    return details.model_copy(update=ANONYMOUS_USER)


@API.route(
    "GET",
    "/api/v2/find_user",
    summary="AI Horde: the account of the `apikey` header (the anonymous key "
    "`0000000000`: the anonymous user, Anonymous#0)",
    response=UserDetails,
    auth="optional",
    errors=(401, 404),
)
async def find_user(request: web.Request, call: Call[None]) -> UserDetails:
    store = request.app[STORE]
    if call.account is None:
        if request.headers.get("apikey") != ANONYMOUS_KEY:
            raise Unauthorized("this needs an API key: send it in the `apikey` header")
        return await _anonymous_user(store)
    found = await store.accounts.account_by_id(call.account.id)
    if found is None:
        raise NotFound("User with this API key not found.").horde("UserNotFound")
    return await user_details(store, *found)


@API.route(
    "GET",
    "/api/v2/users/{user_id}",
    summary="AI Horde: a user's public details (kudos, workers)",
    response=UserDetails,
    errors=(404,),
)
async def show_user(request: web.Request, call: Call[None]) -> UserDetails:
    raw = request.match_info["user_id"]
    store = request.app[STORE]
    if raw == "0":
        return await _anonymous_user(store)
    found = (
        await store.accounts.account_by_id(int(raw))
        if raw.isascii() and raw.isdigit() and len(raw) < 12
        else None
    )
    if found is None:
        raise NotFound(f"User with ID '{raw}' not found.").horde("UserNotFound")
    return await user_details(store, *found)


def worker_details(row: Any, now: float, earned: int) -> WorkerDetails:
    engine = json.loads(row.engine) if row.engine else {}
    agent = (
        f"idlegrid:{VERSION}:{engine.get('engine', 'unknown')}"
        if row.protocol == "idlegrid"
        else "AI Horde worker"
    )
    uptime = int(now - row.online_since) if row.online_since else 0
    return WorkerDetails(
        type="image" if row.kind == "image" else "text",
        name=row.name,
        id=row.id,
        online=now - row.last_seen <= ONLINE_SECONDS,
        requests_fulfilled=row.jobs_done,
        kudos_rewards=float(earned),
        kudos_details=WorkerKudos(generated=float(earned), uptime=0),
        performance=f"{row.jobs_done} jobs done",
        uptime=uptime,
        maintenance_mode=bool(row.paused),
        paused=bool(row.paused),
        info=(
            "serves transformer blocks of the swarm's LLM"
            if row.kind == "blocks"
            else "an AI Horde worker: unsigned results, pay held"
            if row.protocol == "horde"
            else "signs its results"
        ),
        trusted=bool(row.trusted),
        suspicious=row.suspicion,
        models=json.loads(row.models) if row.models else [],
        bridge_agent=agent,
    )


@API.route(
    "GET",
    "/api/v2/workers",
    summary="AI Horde: the online workers (?type=image|text, block servers count as text; "
    "?name= one by name)",
    response=None,
    limit="network",
)
async def list_workers(
    request: web.Request,
    call: Call[None],
    # (horde_sdk sends `type=` for all)
    kind: Annotated[
        str | None, Choice("image or text (default: both)", ("image", "text"), name="type")
    ] = None,
    name: Annotated[str, Text("only the worker of this name")] = "",
) -> web.Response:
    name = name.lower()
    store = request.app[STORE]
    # shared by everyone asking within network_view_seconds, like /api/v1/network
    at, rows = await request.app[VIEWS].get("workers", lambda: store.network.worker_records())
    found = [worker_details(row, at, earned) for row, earned in rows]
    return web.json_response(
        [
            w.model_dump(exclude_none=True)
            for w in found
            if (kind is None or w.type == kind) and (not name or w.name.lower() == name)
        ]
    )


@API.route(
    "GET",
    "/api/v2/workers/{worker_id}",
    summary="AI Horde: one worker's details, online or not",
    response=WorkerDetails,
    errors=(404,),
)
async def show_worker(request: web.Request, call: Call[None]) -> WorkerDetails:
    worker_id = request.match_info["worker_id"].replace("-", "").lower()
    at, rows = await request.app[STORE].network.worker_records(worker_id)
    if not rows or rows[0][0].kind is None:
        raise NotFound(f"Worker with ID '{request.match_info['worker_id']}' not found.").horde(
            "WorkerNotFound"
        )
    return worker_details(rows[0][0], at, rows[0][1])
