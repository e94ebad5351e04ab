"""Python SDK: `AsyncClient` and `Client`, its synchronous twin, over client.api.

    async with AsyncClient("http://127.0.0.1:8470", api_key=KEY) as grid:
        result = await grid.generate(ImageParams(prompt="a lighthouse", steps=20), out_dir="out")

`generate` submits, follows the job's server-sent event stream (queue position, then step
progress) and downloads the PNGs. Waits (`wait`, `complete`, `events`, `text_events`) ride
out coordinator restarts and 503s for up to `wait_timeout` seconds without an answer
(client.follow), then raise WaitTimeout naming the job. Single requests are the routes of
client.api.routes; `transport` swaps the network for another (tests/inmemory.py runs the
coordinator's app in-process).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from client.api import routes
from client.api.core import Call, Request, Response
from client.api.errors import TransportError
from client.api.faces import AsyncApi, SyncFace, blocking, endpoint
from client.api.transports import AsyncTransport
from client.errors import (
    ApiError,
    AuthError,
    ClientError,
    CoordinatorUnreachable,
    JobFailed,
    NotEnoughKudos,
    RateLimited,
    WaitTimeout,
)
from client.follow import READ_TIMEOUT, WAIT_TIMEOUT, Patience, read_events, retryable
from protocol.messages import ErrorBody, ImageJobCreated, JobStatus
from protocol.params import ImageParams
from protocol.preview import JobPreview
from protocol.text import TextJobCreated, TextParams, TextStatus

__all__ = ["AsyncClient", "Client", "GenerationResult", "SdkErrors", "TextEvent"]

T = TypeVar("T")
ProgressCallback = Callable[[JobStatus], Awaitable[None] | None]
PreviewCallback = Callable[[JobPreview], Awaitable[None] | None]


@dataclass(frozen=True)
class GenerationResult:
    job_id: str
    seeds: list[int]
    kudos_cost: int
    paths: list[Path] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    # what the coordinator warned of when the job was made (e.g. no online worker could
    # serve it then)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TextEvent:
    """One event of a text job's stream: new text at `offset`, or a status."""

    offset: int = 0
    text: str = ""
    status: TextStatus | None = None


class SdkErrors:
    """The SDK's errors (client.errors) for the typed client's failures."""

    def rejected(self, request: Request, response: Response) -> Exception:
        status, text = response.status, response.text
        try:
            detail = ErrorBody.model_validate_json(text).error
            code, message = detail.code, detail.message
            fields = [(f.field, f.message) for f in detail.fields]
        except ValueError:
            code, message, fields = "http_error", text[:500] or f"HTTP {status}", []
        if status == 429:
            try:
                wait = float(response.headers.get("Retry-After") or 1)
            except ValueError:
                wait = 1.0
            return RateLimited(status, code, message, fields, wait)
        cls = AuthError if status in (401, 403) else NotEnoughKudos if status == 402 else ApiError
        return cls(status, code, message, fields)

    def unreachable(self, request: Request, error: TransportError) -> Exception:
        return CoordinatorUnreachable(
            f"cannot reach the coordinator at {request.base_url}: {error}"
        )

    def timed_out(self, request: Request, seconds: float) -> Exception:
        return CoordinatorUnreachable(
            f"the coordinator at {request.base_url} did not answer {request.method} "
            f"{request.path} within {seconds:g} s"
        )


class AsyncClient(AsyncApi):
    """`timeout`: seconds for one request; `wait_timeout`: seconds a wait on a job keeps
    trying while the coordinator does not answer (restarting, unreachable, 503);
    `transport`: how requests travel (default: aiohttp over the network)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        wait_timeout: float = WAIT_TIMEOUT,
        transport: AsyncTransport | None = None,
    ) -> None:
        # a stream silent for longer than the coordinator's keep-alive interval is lost
        super().__init__(
            base_url,
            api_key,
            SdkErrors(),
            timeout=timeout,
            connect_timeout=timeout,
            read_timeout=max(READ_TIMEOUT, timeout),
            transport=transport,
        )
        self.wait_timeout = wait_timeout

    @property
    def api_key(self) -> str | None:
        return self.core.api_key

    # --- single requests (client.api.routes) ------------------------------------------

    register = endpoint(routes.register)
    invite = endpoint(routes.invite)
    me = endpoint(routes.me)
    history = endpoint(routes.history)
    transfer = endpoint(routes.transfer)
    worker = endpoint(routes.worker)
    quote_image = endpoint(routes.quote_image)
    cancel = endpoint(routes.cancel)
    share = endpoint(routes.share)
    rate = endpoint(routes.rate)
    job = endpoint(routes.job)
    image = endpoint(routes.image)
    models = endpoint(routes.models)
    text_job = endpoint(routes.text_job)
    cancel_text = endpoint(routes.cancel_text)

    # --- submitting, through restarts ---------------------------------------------------

    async def _submit(self, call: Call[T]) -> T:
        """Send a job's call (it carries an Idempotency-Key) and retry it, with the same
        key, while the coordinator does not answer (a restart cut the answer off, a 503)
        for up to `wait_timeout` s: the coordinator makes one job and charges once per key,
        so a retry never pays twice. A rate limit (429) is the caller's to handle, and so
        is a coordinator that refuses the first connection: nothing was sent."""
        patience = Patience("(new job)", self.wait_timeout)
        sent = False
        while True:
            try:
                return await self.send(call)
            except Exception as exc:
                cause = exc.__cause__
                refused = isinstance(cause, TransportError) and not cause.sent
                if isinstance(exc, RateLimited) or not retryable(exc) or (refused and not sent):
                    raise
                # it may have reached the coordinator: retry through its restart
                sent = sent or not refused
                try:
                    await patience.pause(exc)
                except WaitTimeout:
                    # nothing to wait on yet: the submit's own error says more
                    raise exc from None

    async def submit_image(
        self,
        params: ImageParams,
        idempotency_key: str | None = None,
        *,
        source_image: bytes | None = None,
        source_mask: bytes | None = None,
        nsfw: bool = False,
    ) -> ImageJobCreated:
        """Queue an image job (retried through restarts; see `_submit`); with a source
        image (and mask) as raw PNG, WebP or JPEG bytes; `nsfw`: the request is NSFW (for
        a model the image model reference marks nsfw)."""
        return await self._submit(
            routes.submit_image(params, idempotency_key, source_image, source_mask, nsfw)
        )

    async def submit_text(
        self, params: TextParams, idempotency_key: str | None = None
    ) -> TextJobCreated:
        """Queue a text job (retried through restarts; see `_submit`)."""
        return await self._submit(routes.submit_text(params, idempotency_key))

    # --- following a job ----------------------------------------------------------------

    async def _stream(
        self, path: str, patience: Patience, params: dict[str, str] | None = None
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """One event stream: (event, data) until it ends. Waiting for it to open is bounded
        by `patience`; once open, a silence longer than READ_TIMEOUT breaks it."""
        request = self.core.prepare(
            Request(
                "GET",
                f"{path}/events",
                headers={"Accept": "text/event-stream"},
                params=params or {},
            )
        )
        try:
            async with asyncio.timeout_at(patience.deadline) as opening:
                async with self.stream(request) as answer:
                    opening.reschedule(None)
                    patience.contact()
                    async for item in read_events(answer.lines(), patience):
                        yield item
        except TransportError as exc:
            raise CoordinatorUnreachable(f"lost the event stream {path}/events: {exc}") from exc

    async def _follow(
        self,
        path: str,
        job_id: str,
        read: Callable[[], Awaitable[JobStatus | TextStatus]],
        wait_timeout: float | None,
        params: dict[str, str] | None = None,
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """(event, data) of the job's event stream at `path`/events for as long as the caller
        reads. A stream that ends is followed by a fresh ("status", data) from `read()` and
        a new stream; failures that a restart explains are retried with backoff
        (client.follow), until the coordinator has not answered for `wait_timeout`."""
        patience = Patience(job_id, self.wait_timeout if wait_timeout is None else wait_timeout)
        while True:
            try:
                async with aclosing(self._stream(path, patience, params)) as events:
                    async for item in events:
                        yield item
                async with asyncio.timeout_at(patience.deadline):
                    status = await read()
                patience.contact()
                yield "status", status.model_dump(mode="json")
            except Exception as exc:
                if not retryable(exc):
                    raise
                await patience.pause(exc)

    async def events(
        self, job_id: str, *, wait_timeout: float | None = None
    ) -> AsyncGenerator[JobStatus, None]:
        """Every status change of a job, from its server-sent event stream, until it ends;
        rides out dropped streams and coordinator restarts (see `wait`)."""
        async with aclosing(self.image_events(job_id, wait_timeout=wait_timeout)) as items:
            async for item in items:
                if isinstance(item, JobStatus):
                    yield item

    async def image_events(
        self, job_id: str, *, previews: bool = False, wait_timeout: float | None = None
    ) -> AsyncGenerator[JobStatus | JobPreview, None]:
        """`events`, and with `previews` the job's live previews between them (JobPreview:
        a small picture of the image being sampled, every few steps while a worker runs
        it, when the worker makes them)."""
        follow = self._follow(
            f"{routes.JOBS}/{job_id}",
            job_id,
            lambda: self.job(job_id),
            wait_timeout,
            {"previews": "true"} if previews else None,
        )
        async with aclosing(follow) as items:
            async for kind, data in items:
                if kind == "preview":
                    # a preview is a courtesy: one this SDK cannot read (a newer
                    # coordinator's format) is skipped, never the end of the wait
                    with contextlib.suppress(ValidationError):
                        if previews:
                            yield JobPreview.model_validate(data)
                    continue
                status = JobStatus.model_validate(data)
                yield status
                if status.finished:
                    return

    async def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        *,
        wait_timeout: float | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> JobStatus:
        """Follow a job until it ends. Reconnects when the stream drops and retries through
        coordinator restarts and 503s with backoff; raises WaitTimeout (naming the job) when
        the coordinator has not answered for `wait_timeout` s (default: the client's).
        With `on_preview`, the stream asks for live previews and passes each one to it."""
        events = self.image_events(
            job_id, previews=on_preview is not None, wait_timeout=wait_timeout
        )
        async with aclosing(events) as items:
            async for item in items:
                if isinstance(item, JobPreview):
                    await _call_back(on_preview, item)
                    continue
                await _call_back(on_progress, item)
                if item.finished:
                    return item
        raise ClientError(f"the events of job {job_id} ended before the job did")

    async def generate(
        self,
        params: ImageParams,
        out_dir: Path | str | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        source_image: bytes | None = None,
        source_mask: bytes | None = None,
        nsfw: bool = False,
        on_warning: Callable[[str], None] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> GenerationResult:
        """Submit, wait and download. Files are named `<job id>-<index>.png` in `out_dir`.
        `source_image`, `source_mask`, `nsfw`: as `submit_image` takes them; `on_warning` is called
        with each of the coordinator's warnings as soon as the job is made (they are in the
        result too); `on_preview` with each live preview (see `wait`)."""
        created = await self.submit_image(
            params, source_image=source_image, source_mask=source_mask, nsfw=nsfw
        )
        for warning in created.warnings:
            if on_warning is not None:
                on_warning(warning)
        final = await self.wait(created.id, on_progress, on_preview=on_preview)
        if final.state != "done":
            raise JobFailed(created.id, final.state, final.error)
        images = [await self.image(created.id, info.index) for info in final.images]
        paths: list[Path] = []
        if out_dir is not None:
            named = {
                f"{created.id}-{info.index}.png": data
                for info, data in zip(final.images, images, strict=True)
            }
            paths = await asyncio.to_thread(_write_files, Path(out_dir), named)
        return GenerationResult(
            job_id=created.id,
            seeds=final.seeds,
            kudos_cost=final.kudos_cost,
            paths=paths,
            images=images,
            warnings=list(created.warnings),
        )

    async def text_events(
        self, job_id: str, *, wait_timeout: float | None = None
    ) -> AsyncGenerator[TextEvent, None]:
        """A text job's events until it ends: text pieces (with their offset) and statuses.
        Rides out dropped streams and coordinator restarts (see `wait`); after a reconnect
        text may come again from an earlier offset."""
        path = f"{routes.TEXT_JOBS}/{job_id}"
        follow = self._follow(path, job_id, lambda: self.text_job(job_id), wait_timeout)
        async with aclosing(follow) as items:
            async for kind, data in items:
                if kind == "text":
                    yield TextEvent(offset=data["offset"], text=data["text"])
                elif kind == "status":
                    status = TextStatus.model_validate(data)
                    yield TextEvent(status=status)
                    if status.finished:
                        return

    async def complete(
        self,
        params: TextParams,
        on_text: Callable[[str], Awaitable[None] | None] | None = None,
        *,
        wait_timeout: float | None = None,
    ) -> TextStatus:
        """Submit a chat or completion job and stream its text to `on_text` as it is made.

        Returns the final status (its `text` is the whole reply); raises JobFailed if the
        job fails (its kudos are refunded). Survives dropped streams, restarted jobs and
        coordinator restarts (WaitTimeout, naming the job, after `wait_timeout` s without an
        answer): only text the caller has not seen yet is passed on.
        """
        created = await self.submit_text(params)
        shown = 0
        status: TextStatus | None = None
        async with aclosing(self.text_events(created.id, wait_timeout=wait_timeout)) as events:
            async for event in events:
                if event.status is not None:
                    if event.status.finished:
                        status = event.status
                        break
                elif event.offset + len(event.text) > shown:
                    fresh = event.text[max(shown - event.offset, 0) :]
                    shown += len(fresh)
                    await _call_back(on_text, fresh)
        if status is None:
            raise ClientError(f"the events of text job {created.id} ended before the job did")
        if status.state != "done":
            raise JobFailed(created.id, status.state, status.error)
        if len(status.text) > shown:
            await _call_back(on_text, status.text[shown:])
        return status


async def _call_back(callback: Callable[[T], Awaitable[None] | None] | None, value: T) -> None:
    if callback is not None:
        outcome = callback(value)
        if outcome is not None:
            await outcome


def _write_files(directory: Path, named: dict[str, bytes]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in named.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


class Client(SyncFace[AsyncClient]):
    """The synchronous SDK: AsyncClient's calls, run on a private event loop thread (so
    callbacks such as `on_text` run on that thread, and so does `transport`: one bound to
    another loop, such as tests/inmemory.py's, cannot serve it)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        wait_timeout: float = WAIT_TIMEOUT,
        transport: AsyncTransport | None = None,
    ) -> None:
        super().__init__(
            lambda: AsyncClient(
                base_url, api_key, timeout=timeout, wait_timeout=wait_timeout, transport=transport
            )
        )

    def __enter__(self) -> Client:
        return self

    register = blocking(AsyncClient.register)
    invite = blocking(AsyncClient.invite)
    me = blocking(AsyncClient.me)
    history = blocking(AsyncClient.history)
    transfer = blocking(AsyncClient.transfer)
    worker = blocking(AsyncClient.worker)
    quote_image = blocking(AsyncClient.quote_image)
    cancel = blocking(AsyncClient.cancel)
    share = blocking(AsyncClient.share)
    rate = blocking(AsyncClient.rate)
    job = blocking(AsyncClient.job)
    image = blocking(AsyncClient.image)
    models = blocking(AsyncClient.models)
    text_job = blocking(AsyncClient.text_job)
    cancel_text = blocking(AsyncClient.cancel_text)
    submit_image = blocking(AsyncClient.submit_image)
    submit_text = blocking(AsyncClient.submit_text)
    wait = blocking(AsyncClient.wait)
    generate = blocking(AsyncClient.generate)
    complete = blocking(AsyncClient.complete)
