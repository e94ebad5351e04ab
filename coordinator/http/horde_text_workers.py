"""AI Horde's text workers (/api/v2/generate/text/pop and /submit) serving our text queue.

A KoboldCpp or aphrodite bridge (AI-Horde-Worker's scribe, horde-bridge) hosts a model
whole and asks AI Horde's text worker API for prompts; here it becomes an AI Horde worker of
its owner's account (as an image bridge does: coordinator.http.horde_workers) and leases
text jobs from the same queue as our gateways, for the catalog models it names (exactly,
or behind its backend's prefix: `koboldcpp/smollm2`). It gets only jobs made through AI
Horde's own /api/v2/generate/text/async without `trusted_workers` (prompts with KoboldAI's
parameters, which its backend applies itself); chat, OpenAI and /api/v1 jobs need our
gateways' chat templates, grammars, logprobs and signed usage. Its text is unsigned and
never checked: the catalog's price of the tokens estimated is held for `--horde-hold`
seconds and refunded if the requester disputes it (coordinator.economy.horde_text).
"""

from __future__ import annotations

from aiohttp import web

from coordinator.economy import horde_text, text_models
from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound
from coordinator.http.addresses import client_ip
from coordinator.http.api import API, Call, UserCall
from coordinator.http.horde_workers import horde_owner, named_worker
from coordinator.http.metrics import timed_pop
from coordinator.http.state import CONFIG, SIGNALS, STORE
from coordinator.http.text import visible_text_job
from coordinator.jobs.text import HORDE_SECONDS_PER_TOKEN, TextJob
from protocol.horde import GenerationSubmitted
from protocol.horde_text import TextPopRequestV2, TextPopResponseV2, TextSubmitRequestV2
from protocol.messages import DisputeCreate, DisputeRecorded
from protocol.text import KOBOLD_FIELDS, TextModel, TextParams, text_cap

__all__ = ["backend_model", "horde_text_pop", "horde_text_submit", "kobold_payload"]

# the backends' prefixes of AI Horde text model names ("koboldcpp/Name")
BACKEND_PREFIXES = ("koboldcpp/", "aphrodite/", "vllm/")

# TextParams' names -> KoboldAI's, where they differ
_KOBOLD_NAMES = {"repetition_penalty": "rep_pen", "stop": "stop_sequence", "seed": "sampler_seed"}


def backend_model(models: tuple[TextModel, ...], name: str) -> TextModel | None:
    """The catalog model an AI Horde text worker's model name means, if any."""
    for prefix in ("", *BACKEND_PREFIXES):
        if name.startswith(prefix):
            found = next((m for m in models if m.name == name[len(prefix) :]), None)
            if found is not None:
                return found
    return None


def _context(params: TextParams, model: TextModel, offered: int | None = None) -> int:
    """The tokens of context the job is given: its max_context_length, within the model's
    and (at pop) the worker's."""
    context = min(params.max_context_length or model.max_context, model.max_context)
    return context if offered is None else min(context, offered)


def kobold_payload(params: TextParams, context: int) -> dict[str, object]:
    """AI Horde's ModelPayloadKobold for a job: its prompt and KoboldAI's parameters."""
    payload: dict[str, object] = {
        "prompt": params.prompt or "",
        "n": 1,
        "max_length": params.max_tokens,
        "max_context_length": context,
    }
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed"):
        payload[_KOBOLD_NAMES.get(name, name)] = getattr(params, name)
    for name in KOBOLD_FIELDS:
        if name != "max_context_length" and getattr(params, name) is not None:
            payload[name] = getattr(params, name)
    return payload


@API.route(
    "POST",
    "/api/v2/generate/text/pop",
    summary="AI Horde text worker (KoboldCpp/aphrodite bridge): lease a prompt for a catalog "
    "model it hosts whole (only /api/v2 requests without trusted_workers; unsigned: never "
    "trusted, pay held, disputable)",
    response=TextPopResponseV2,
    auth="optional",
    errors=(403,),
    limit="pop",
)
async def horde_text_pop(request: web.Request, call: Call[TextPopRequestV2]) -> TextPopResponseV2:
    body = call.body
    store, config = request.app[STORE], request.app[CONFIG]
    worker = await named_worker(request, call.account, body.name)
    # catalog name -> the worker's name for it
    theirs: dict[str, str] = {}
    for name in body.models:
        model = backend_model(config.text_models, name)
        if model is not None:
            theirs.setdefault(model.name, name)
    served = [m for m in config.text_models if m.name in theirs]
    # (the offer noted with the poll lets /api/v2 requests name these: choose_model)
    poll = store.workers.poll_note(worker, client_ip(request), kind="text", models=list(theirs))
    job = await timed_pop(
        request,
        "text",
        lambda: store.text_jobs.pop_unsigned(
            worker, list(theirs), body.max_length, body.max_context_length, poll
        ),
    )()
    if job is None:
        return TextPopResponseV2(id=None, ids=[], payload={}, model=None, skipped={})
    request.app[SIGNALS].job_changed(job.id)
    model = next(m for m in served if m.name == job.model)
    context = _context(job.params, model, body.max_context_length)
    return TextPopResponseV2(
        id=job.id,
        ids=[job.id],
        payload=kobold_payload(job.params, context),
        model=theirs[job.model],
        skipped={},
        ttl=int(job.lease_seconds + job.params.max_tokens * HORDE_SECONDS_PER_TOKEN),
    )


async def _leased_to_caller(request: web.Request, call: Call[TextSubmitRequestV2]) -> TextJob:
    owner = horde_owner(call.account)
    body = call.body
    store = request.app[STORE]
    job = await store.text_jobs.get(body.id.lower())
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
    return job


@API.route(
    "POST",
    "/api/v2/generate/text/submit",
    summary="AI Horde text worker: the text of a leased job; a faulted state gives it back. "
    "Paid the catalog price of the tokens estimated, held for dispute",
    response=GenerationSubmitted,
    auth="optional",
    errors=(403, 404, 409),
    limit="result",
)
async def horde_text_submit(
    request: web.Request, call: Call[TextSubmitRequestV2]
) -> GenerationSubmitted:
    job = await _leased_to_caller(request, call)
    body = call.body
    store, signals = request.app[STORE], request.app[SIGNALS]
    assert job.worker_id is not None
    worker = await store.workers.worker_by_id(job.worker_id)
    assert worker is not None
    if body.state != "ok":
        # faulted, censored or refused: another worker tries; counts toward --faulted-run
        job = await store.text_jobs.give_back(
            worker, job.id, f"AI Horde worker reported {body.state}"
        )
        signals.job_changed(job.id)
        if job.state == "queued":
            signals.job_queued("text", job.model)
        return GenerationSubmitted(reward=0.0)
    params = job.params
    cap = text_cap(params.max_tokens)
    if len(body.generation) > cap:
        raise BadRequest(
            f"generation holds {len(body.generation)} characters; a job of max_length "
            f"{params.max_tokens} may hold at most {cap}",
            [("generation", f"must be at most {cap} characters")],
        )
    if "\x00" in body.generation:
        # (lone surrogates are refused with the body: coordinator.http.api)
        raise BadRequest(
            "generation holds a NUL character, which no text has (PostgreSQL cannot store it)",
            [("generation", "must be text without NUL characters")],
        )
    model = text_models.find(request.app[CONFIG], job.model)
    if model is None:
        raise Conflict(f"model {job.model} left this coordinator's catalog; send state faulted")
    text, stopped = horde_text.cut_at_stop(body.generation, params.stop)
    tokens = horde_text.estimated_tokens(params, text, _context(params, model))
    finish = "stop" if stopped or tokens[1] < params.max_tokens else "length"
    price = horde_text.charge(model, sum(tokens), job.cost)
    held = await store.text_jobs.finish_unsigned(worker, job, text, finish, tokens, price)
    signals.job_changed(job.id)
    return GenerationSubmitted(reward=float(held))


@API.route(
    "POST",
    "/api/v1/text/jobs/{job_id}/dispute",
    summary="Dispute the text an AI Horde text worker made (unsigned, never checked) while "
    "its pay is held: the kudos come back, the text is deleted and the worker takes a "
    "suspicion (at most --max-disputes-per-day, and --max-dispute-share of your jobs)",
    response=DisputeRecorded,
    auth="user",
    errors=(403, 404, 409),
    limit="cancel",
)
async def dispute_text(request: web.Request, call: UserCall[DisputeCreate]) -> DisputeRecorded:
    store = request.app[STORE]
    job = await visible_text_job(store, request.match_info["job_id"], call.account)
    refunded = await store.text_jobs.dispute(job.id, call.body.reason or "no reason given")
    request.app[SIGNALS].job_changed(job.id)
    return DisputeRecorded(id=job.id, refunded=refunded)
