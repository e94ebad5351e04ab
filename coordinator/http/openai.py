"""OpenAI-compatible endpoints over text jobs, so OpenAI clients work with
`base_url=<coordinator>/v1` and an idlegrid API key as the bearer token.

A request queues a normal text job (same kudos, priority and refunds) and waits for it;
with `stream: true` it relays the job's text as `chat.completion.chunk` events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from coordinator.errors import JobFailed, StoreUnavailable
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
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelList,
    OpenAIModel,
    Usage,
)

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


def _usage(job: TextJob) -> Usage:
    return Usage(
        prompt_tokens=job.prompt_tokens,
        completion_tokens=job.completion_tokens,
        total_tokens=job.prompt_tokens + job.completion_tokens,
    )


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
) -> web.StreamResponse:
    """Relay a job's text as OpenAI stream chunks, then `data: [DONE]`."""
    sent = 0
    async with open_stream(request, account, f"OpenAI stream of text job {job.id}") as stream:
        await stream.send(_json(chunk("", None)))
        async for current in follow_text(request, job):
            job = current
            # A requeued job restarts its text; what was relayed cannot be taken back, so
            # relay only text past what the client already has.
            if len(job.text) > sent:
                await stream.send(_json(chunk(job.text[sent:], None)))
                sent = len(job.text)
            await stream.keepalive()
        if job.state == "done":
            await stream.send(_json(chunk("", job.finish_reason or "stop")))
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
    job = await submit(request, call.account, body.text_params())
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

        return await _stream(request, call.account, job, chunk)
    job = await _finished(request, job)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=job.model,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=job.text),
                finish_reason=job.finish_reason,
            )
        ],
        usage=_usage(job),
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
    job = await submit(request, call.account, body.text_params())
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

        return await _stream(request, call.account, job, chunk)
    job = await _finished(request, job)
    return Completion(
        id=completion_id,
        created=created,
        model=job.model,
        choices=[
            CompletionChoice(
                text=job.text,
                finish_reason=job.finish_reason,
            )
        ],
        usage=_usage(job),
    )
