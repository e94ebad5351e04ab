"""OpenAI-compatible endpoints over text jobs, so OpenAI clients work with
`base_url=<coordinator>/v1` and an idlegrid API key as the bearer token.

A request queues a normal text job (same kudos, priority and refunds) and waits for it;
with `stream: true` it relays the job's text as `chat.completion.chunk` events. With
`tools`, an answer that is a call (protocol/openai_tools.py) becomes `tool_calls`. `n` choices
are `n` jobs, choice i seeded with `seed + i` (streamed: `n` must be 1). AI Horde's
anonymous key `0000000000` as the bearer token is an anonymous request, as on /api/v2.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from coordinator.errors import BadRequest, JobFailed, StoreUnavailable
from coordinator.http.api import API, Call
from coordinator.http.state import CONFIG, STORE
from coordinator.http.streams import open_stream
from coordinator.http.text import follow_text, submit
from coordinator.jobs.text import TextJob
from coordinator.store import Account
from protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionRequest,
    LegacyLogprobs,
    ModelList,
    OpenAIModel,
    Usage,
)
from protocol.openai_tools import Tool, parse_call
from protocol.params import MAX_SEED
from protocol.text import TextParams

log = logging.getLogger(__name__)


@API.route(
    "GET",
    "/v1/models",
    summary="OpenAI-compatible: the coordinator's text models (its catalog), the default "
    "first; a request for one no gateway serves right now is refused with 400",
    response=ModelList,
    auth="optional",
)
async def list_models(request: web.Request, call: Call[None]) -> ModelList:
    config, now = request.app[CONFIG], int(request.app[STORE].db.now())
    models = sorted(config.text_models, key=lambda m: m.name != config.default_text_model)
    return ModelList(data=[OpenAIModel(id=m.name, created=now) for m in models])


def _usage(jobs: list[TextJob]) -> Usage:
    # the prompt counts once, as OpenAI counts it for n choices
    prompt = max(job.prompt_tokens for job in jobs)
    completion = sum(job.completion_tokens for job in jobs)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def _submit_choices(
    request: web.Request, account: Account | None, params: TextParams, n: int, stream: bool
) -> list[TextJob]:
    """One job per choice; choice i is seeded with seed + i (when a seed is given;
    past the largest seed it wraps to 0)."""
    if stream and n > 1:
        raise BadRequest(
            "streaming gives one choice; set n to 1 or leave stream out",
            [("n", "must be 1 with stream: true")],
        )
    jobs = []
    for i in range(n):
        seed = None if params.seed is None else (params.seed + i) % (MAX_SEED + 1)
        jobs.append(await submit(request, account, params.model_copy(update={"seed": seed})))
    return jobs


async def _all_finished(request: web.Request, jobs: list[TextJob]) -> list[TextJob]:
    return list(await asyncio.gather(*(_finished(request, job) for job in jobs)))


async def _finished(request: web.Request, job: TextJob) -> TextJob:
    async for current in follow_text(request, job):
        job = current
    if not job.finished:
        raise StoreUnavailable(
            f"the coordinator is restarting; text job {job.id} goes on: "
            f"GET /api/v1/text/jobs/{job.id}"
        )
    if job.state != "done":
        raise JobFailed(f"text job {job.id} {job.state}: {job.error or 'no reason given'}")
    return job


def _json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False)


async def _stream(
    request: web.Request,
    account: Account | None,
    job: TextJob,
    chunk: Callable[[str, str | None], dict[str, Any]],
    include_usage: bool,
    last: Callable[[TextJob], list[dict[str, Any]]] | None = None,
) -> web.StreamResponse:
    """Relay a job's text as OpenAI stream chunks, then (with `include_usage`) a chunk of
    no choices and the usage, then `data: [DONE]`. With `last`, no text is relayed while
    the job runs: `last(job)` gives the chunks of the whole answer (a tool call)."""
    sent = 0
    async with open_stream(request, account, f"OpenAI stream of text job {job.id}") as stream:
        await stream.send(_json(chunk("", None)))
        async for current in follow_text(request, job):
            job = current
            # A requeued job restarts its text; what was relayed cannot be taken back, so
            # relay only text past what the client already has.
            if last is None and len(job.text) > sent:
                await stream.send(_json(chunk(job.text[sent:], None)))
                sent = len(job.text)
            await stream.keepalive()
        if job.state == "done":
            for payload in [chunk("", job.finish_reason or "stop")] if last is None else last(job):
                await stream.send(_json(payload))
            if include_usage:
                usage = _usage([job]).model_dump()
                await stream.send(_json({**chunk("", None), "choices": [], "usage": usage}))
        else:
            message = (
                f"text job {job.id} {job.state}: {job.error or 'no reason given'}"
                if job.finished
                else f"the coordinator is restarting; text job {job.id} goes on: "
                f"GET /api/v1/text/jobs/{job.id}"
            )
            error = {"message": message, "type": "job_failed", "code": "job_failed"}
            await stream.send(_json({"error": error}))
        await stream.send("[DONE]")
    return stream.response


@API.route(
    "POST",
    "/v1/chat/completions",
    summary="OpenAI-compatible chat completion (set `stream` for server-sent chunks)",
    response=ChatCompletion,
    auth="optional",
    errors=(402, 502),
    limit="submit",
)
async def chat_completions(
    request: web.Request, call: Call[ChatCompletionRequest]
) -> web.StreamResponse | ChatCompletion:
    body = call.body
    jobs = await _submit_choices(request, call.account, body.text_params(), body.n, body.stream)
    job = jobs[0]
    completion_id, created = f"chatcmpl-{job.id}", int(request.app[STORE].db.now())
    if body.stream:

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta: dict[str, str] = {"content": text}
            if not text and finish is None:
                delta = {"role": "assistant", "content": ""}
            elif finish is not None:
                delta = {}
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": job.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        tools = body.tools if body.effective_tool_choice != "none" else None
        last = None if tools is None else _answer_chunks(chunk, tools)
        return await _stream(request, call.account, job, chunk, include_usage, last)
    jobs = await _all_finished(request, jobs)
    tools = body.tools if body.effective_tool_choice != "none" else None
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=job.model,
        choices=[_chat_choice(i, choice, tools) for i, choice in enumerate(jobs)],
        usage=_usage(jobs),
    )


def _answer_chunks(
    chunk: Callable[[str, str | None], dict[str, Any]], tools: list[Tool]
) -> Callable[[TextJob], list[dict[str, Any]]]:
    """A streamed answer with tools, sent whole once the job is done: the call as one
    `tool_calls` delta, or the text as one content delta."""

    def last(job: TextJob) -> list[dict[str, Any]]:
        choice = _chat_choice(0, job, tools)
        if choice.message.tool_calls is None:
            return [chunk(job.text, None), chunk("", choice.finish_reason)]
        (call,) = choice.message.tool_calls
        delta = {"tool_calls": [{"index": 0, **call.model_dump()}]}
        first = chunk("", None)
        first["choices"][0]["delta"] = delta
        return [first, chunk("", "tool_calls")]

    return last


def _chat_choice(index: int, job: TextJob, tools: list[Tool] | None) -> ChatChoice:
    """A choice's answer: a tool call where it is one (README: Tools), else its text."""
    call = parse_call(job.text, tools, f"call_{job.id}") if tools else None
    logprobs = None if job.logprobs is None else ChoiceLogprobs.of(job.logprobs)
    if call is not None:
        message = AssistantMessage(content=None, tool_calls=[call])
        return ChatChoice(
            index=index, message=message, finish_reason="tool_calls", logprobs=logprobs
        )
    message = AssistantMessage(content=job.text)
    return ChatChoice(
        index=index, message=message, finish_reason=job.finish_reason, logprobs=logprobs
    )


@API.route(
    "POST",
    "/v1/completions",
    summary="OpenAI-compatible (legacy) text completion of a prompt",
    response=Completion,
    auth="optional",
    errors=(402, 502),
    limit="submit",
)
async def completions(
    request: web.Request, call: Call[CompletionRequest]
) -> web.StreamResponse | Completion:
    body = call.body
    jobs = await _submit_choices(request, call.account, body.text_params(), body.n, body.stream)
    job = jobs[0]
    completion_id, created = f"cmpl-{job.id}", int(request.app[STORE].db.now())
    if body.stream:

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": job.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await _stream(request, call.account, job, chunk, include_usage)
    jobs = await _all_finished(request, jobs)
    return Completion(
        id=completion_id,
        created=created,
        model=job.model,
        choices=[
            CompletionChoice(
                index=i,
                text=choice.text,
                finish_reason=choice.finish_reason,
                logprobs=None if choice.logprobs is None else LegacyLogprobs.of(choice.logprobs),
            )
            for i, choice in enumerate(jobs)
        ],
        usage=_usage(jobs),
    )
