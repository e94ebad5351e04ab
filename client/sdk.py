"""Python SDK: `AsyncClient` (aiohttp) and `Client`, its synchronous twin.

    async with AsyncClient("http://127.0.0.1:8470", api_key=KEY) as grid:
        result = await grid.generate(ImageParams(prompt="a lighthouse", steps=20), out_dir="out")

`generate` submits, follows the job's server-sent event stream (queue position, then step
progress) and downloads the PNGs. Waits (`wait`, `complete`, `events`, `text_events`) ride
out coordinator restarts and 503s for up to `wait_timeout` seconds without an answer
(client.follow), then raise WaitTimeout naming the job.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel

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
from protocol.messages import (
    AccountCreated,
    AccountInfo,
    ErrorBody,
    HistoryPage,
    ImageJobCreated,
    InvitesCreated,
    JobCancelled,
    JobStatus,
    Quote,
    RatingRecorded,
    ShareState,
    TransferDone,
    WorkerInfo,
)
from protocol.openai import ModelList
from protocol.params import ImageParams
from protocol.text import TextJobCreated, TextParams, TextStatus

__all__ = ["AsyncClient", "Client", "GenerationResult", "TextEvent"]

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
ProgressCallback = Callable[[JobStatus], Awaitable[None] | None]


@dataclass(frozen=True)
class GenerationResult:
    job_id: str
    seeds: list[int]
    kudos_cost: int
    paths: list[Path] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)


def _raise_for(status: int, text: str, retry_after: str | None = None) -> None:
    try:
        detail = ErrorBody.model_validate_json(text).error
        code, message = detail.code, detail.message
        fields = [(f.field, f.message) for f in detail.fields]
    except ValueError:
        code, message, fields = "http_error", text[:500] or f"HTTP {status}", []
    if status == 429:
        try:
            wait = float(retry_after or 1)
        except ValueError:
            wait = 1.0
        raise RateLimited(status, code, message, fields, wait)
    cls = AuthError if status in (401, 403) else NotEnoughKudos if status == 402 else ApiError
    raise cls(status, code, message, fields)


class AsyncClient:
    """`timeout`: seconds for one request; `wait_timeout`: seconds a wait on a job keeps
    trying while the coordinator does not answer (restarting, unreachable, 503)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        wait_timeout: float = WAIT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.wait_timeout = wait_timeout
        # a stream silent for longer than the coordinator's keep-alive interval is lost
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout, sock_read=max(READ_TIMEOUT, timeout)
        )
        self._request_timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"apikey": self.api_key} if self.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        model: type[M],
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> M:
        try:
            async with asyncio.timeout(self._request_timeout):
                async with self._http().request(
                    method, self.base_url + path, json=body, headers=headers, params=params
                ) as resp:
                    text = await resp.text()
                    if resp.status >= 400:
                        _raise_for(resp.status, text, resp.headers.get("Retry-After"))
                    return model.model_validate_json(text)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise CoordinatorUnreachable(
                f"cannot reach the coordinator at {self.base_url}: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise CoordinatorUnreachable(
                f"the coordinator at {self.base_url} did not answer {method} {path} within "
                f"{self._request_timeout:g} s"
            ) from exc

    # --- accounts ---------------------------------------------------------------------

    async def register(self, name: str, invite: str | None = None) -> AccountCreated:
        """Create an account (`invite`: a code, where registration is invite-only)."""
        body = {"name": name} if invite is None else {"name": name, "invite": invite}
        return await self._request("POST", "/api/v1/accounts", AccountCreated, body)

    async def invite(self, count: int = 1) -> list[str]:
        """Make single-use invite codes (as many as the coordinator allows per account)."""
        made = await self._request("POST", "/api/v1/invites", InvitesCreated, {"count": count})
        return made.codes

    async def me(self) -> AccountInfo:
        return await self._request("GET", "/api/v1/accounts/me", AccountInfo)

    async def history(self, limit: int = 50, before: int | None = None) -> HistoryPage:
        """The caller's ledger entries, newest first; pass `next_before` on for older ones."""
        params = {"limit": str(limit)}
        if before is not None:
            params["before"] = str(before)
        return await self._request("GET", "/api/v1/accounts/me/history", HistoryPage, params=params)

    async def transfer(
        self, to: str, amount: int, idempotency_key: str | None = None
    ) -> TransferDone:
        """Give `amount` kudos to user `to`. Retrying with the same `idempotency_key` (a new
        UUID if absent; returned in the answer) never pays twice."""
        key = idempotency_key or str(uuid.uuid4())
        return await self._request(
            "POST",
            "/api/v1/transfers",
            TransferDone,
            {"to": to, "amount": amount},
            headers={"Idempotency-Key": key},
        )

    async def worker(self, worker_id: str) -> WorkerInfo:
        return await self._request("GET", f"/api/v1/workers/{worker_id}", WorkerInfo)

    # --- image jobs -------------------------------------------------------------------

    async def quote_image(self, params: ImageParams) -> Quote:
        """Cost, balance, queue and ETA of a job, without submitting it."""
        body = params.model_dump(mode="json", exclude_none=True)
        return await self._request("POST", "/api/v1/quotes/image", Quote, body)

    async def cancel(self, job_id: str) -> JobCancelled:
        return await self._request("POST", f"/api/v1/jobs/{job_id}/cancel", JobCancelled)

    async def share(self, job_id: str, shared: bool = True) -> ShareState:
        return await self._request(
            "POST", f"/api/v1/jobs/{job_id}/share", ShareState, {"shared": shared}
        )

    async def rate(self, job_id: str, index: int, score: int) -> RatingRecorded:
        return await self._request(
            "POST",
            f"/api/v1/jobs/{job_id}/images/{index}/rating",
            RatingRecorded,
            {"score": score},
        )

    async def _submit(
        self, path: str, model: type[M], body: dict[str, Any], idempotency_key: str | None
    ) -> M:
        """POST a job with an Idempotency-Key (a new UUID if absent) and retry it, with the
        same key, while the coordinator does not answer (a restart cut the answer off, a
        503) for up to `wait_timeout` s: the coordinator makes one job and charges once per
        key, so a retry never pays twice. A rate limit (429) is the caller's to handle, and
        so is a coordinator that refuses the first connection: nothing was sent."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        patience = Patience("(new job)", self.wait_timeout)
        sent = False
        while True:
            try:
                return await self._request("POST", path, model, body, headers=headers)
            except Exception as exc:
                refused = isinstance(exc.__cause__, aiohttp.ClientConnectorError)
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
        self, params: ImageParams, idempotency_key: str | None = None
    ) -> ImageJobCreated:
        """Queue an image job (retried through restarts; see `_submit`)."""
        body = params.model_dump(mode="json", exclude_none=True)
        return await self._submit("/api/v1/jobs/image", ImageJobCreated, body, idempotency_key)

    async def job(self, job_id: str) -> JobStatus:
        return await self._request("GET", f"/api/v1/jobs/{job_id}", JobStatus)

    async def _stream(self, path: str, patience: Patience) -> AsyncGenerator[tuple[str, Any], None]:
        """One event stream: (event, data) until it ends. Waiting for it to open is bounded
        by `patience`; once open, a silence longer than READ_TIMEOUT breaks it."""
        try:
            async with asyncio.timeout_at(patience.deadline):
                response = await self._http().get(
                    self.base_url + path, headers={"Accept": "text/event-stream"}
                )
            try:
                if response.status >= 400:
                    _raise_for(
                        response.status, await response.text(), response.headers.get("Retry-After")
                    )
                patience.contact()
                async for item in read_events(response, patience):
                    yield item
            finally:
                response.close()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise CoordinatorUnreachable(f"lost the event stream {path}: {exc}") from exc

    async def _follow(
        self,
        path: str,
        job_id: str,
        read: Callable[[], Awaitable[BaseModel]],
        wait_timeout: float | None,
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """(event, data) of the job's event stream at `path`/events for as long as the caller
        reads. A stream that ends is followed by a fresh ("status", data) from `read()` and
        a new stream; failures that a restart explains are retried with backoff
        (client.follow), until the coordinator has not answered for `wait_timeout`."""
        patience = Patience(job_id, self.wait_timeout if wait_timeout is None else wait_timeout)
        while True:
            try:
                async with aclosing(self._stream(f"{path}/events", patience)) as events:
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
        follow = self._follow(
            f"/api/v1/jobs/{job_id}", job_id, lambda: self.job(job_id), wait_timeout
        )
        async with aclosing(follow) as items:
            async for _, data in items:
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
    ) -> JobStatus:
        """Follow a job until it ends. Reconnects when the stream drops and retries through
        coordinator restarts and 503s with backoff; raises WaitTimeout (naming the job) when
        the coordinator has not answered for `wait_timeout` s (default: the client's)."""
        async with aclosing(self.events(job_id, wait_timeout=wait_timeout)) as statuses:
            async for status in statuses:
                if on_progress is not None:
                    outcome = on_progress(status)
                    if outcome is not None:
                        await outcome
                if status.finished:
                    return status
        raise ClientError(f"the events of job {job_id} ended before the job did")

    async def image(self, job_id: str, index: int) -> bytes:
        url = f"{self.base_url}/api/v1/jobs/{job_id}/images/{index}"
        try:
            async with asyncio.timeout(self._request_timeout):
                async with self._http().get(url) as resp:
                    if resp.status >= 400:
                        _raise_for(resp.status, await resp.text())
                    return await resp.read()
        except aiohttp.ClientConnectionError as exc:
            raise CoordinatorUnreachable(
                f"cannot download image {index} of job {job_id}: {exc}"
            ) from exc

    async def generate(
        self,
        params: ImageParams,
        out_dir: Path | str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Submit, wait and download. Files are named `<job id>-<index>.png` in `out_dir`."""
        created = await self.submit_image(params)
        final = await self.wait(created.id, on_progress)
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
        )

    # --- text jobs (chat and completion) ----------------------------------------------

    async def models(self) -> list[str]:
        """Names of the text models gateways serve now."""
        listing = await self._request("GET", "/v1/models", ModelList)
        return [model.id for model in listing.data]

    async def submit_text(
        self, params: TextParams, idempotency_key: str | None = None
    ) -> TextJobCreated:
        """Queue a text job (retried through restarts; see `_submit`)."""
        body = params.model_dump(mode="json", exclude_none=True)
        return await self._submit("/api/v1/text/jobs", TextJobCreated, body, idempotency_key)

    async def text_job(self, job_id: str) -> TextStatus:
        return await self._request("GET", f"/api/v1/text/jobs/{job_id}", TextStatus)

    async def cancel_text(self, job_id: str) -> JobCancelled:
        """Cancel a queued or running text job; its reserved kudos are refunded."""
        return await self._request("POST", f"/api/v1/text/jobs/{job_id}/cancel", JobCancelled)

    async def text_events(
        self, job_id: str, *, wait_timeout: float | None = None
    ) -> AsyncGenerator[TextEvent, None]:
        """A text job's events until it ends: text pieces (with their offset) and statuses.
        Rides out dropped streams and coordinator restarts (see `wait`); after a reconnect
        text may come again from an earlier offset."""
        path = f"/api/v1/text/jobs/{job_id}"
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
                    if on_text is not None:
                        outcome = on_text(fresh)
                        if outcome is not None:
                            await outcome
        if status is None:
            raise ClientError(f"the events of text job {created.id} ended before the job did")
        if status.state != "done":
            raise JobFailed(created.id, status.state, status.error)
        if on_text is not None and len(status.text) > shown:
            outcome = on_text(status.text[shown:])
            if outcome is not None:
                await outcome
        return status


@dataclass(frozen=True)
class TextEvent:
    """One event of a text job's stream: new text at `offset`, or a status."""

    offset: int = 0
    text: str = ""
    status: TextStatus | None = None


def _write_files(directory: Path, named: dict[str, bytes]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in named.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


class Client:
    """The synchronous SDK: the same calls, run on a private event loop thread."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        wait_timeout: float = WAIT_TIMEOUT,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="idlegrid-client", daemon=True
        )
        self._thread.start()
        self._async = AsyncClient(base_url, api_key, timeout=timeout, wait_timeout=wait_timeout)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def register(self, name: str, invite: str | None = None) -> AccountCreated:
        return self._run(self._async.register(name, invite))

    def invite(self, count: int = 1) -> list[str]:
        return self._run(self._async.invite(count))

    def me(self) -> AccountInfo:
        return self._run(self._async.me())

    def submit_image(
        self, params: ImageParams, idempotency_key: str | None = None
    ) -> ImageJobCreated:
        return self._run(self._async.submit_image(params, idempotency_key))

    def quote_image(self, params: ImageParams) -> Quote:
        return self._run(self._async.quote_image(params))

    def cancel(self, job_id: str) -> JobCancelled:
        return self._run(self._async.cancel(job_id))

    def share(self, job_id: str, shared: bool = True) -> ShareState:
        return self._run(self._async.share(job_id, shared))

    def rate(self, job_id: str, index: int, score: int) -> RatingRecorded:
        return self._run(self._async.rate(job_id, index, score))

    def history(self, limit: int = 50, before: int | None = None) -> HistoryPage:
        return self._run(self._async.history(limit, before))

    def transfer(self, to: str, amount: int, idempotency_key: str | None = None) -> TransferDone:
        return self._run(self._async.transfer(to, amount, idempotency_key))

    def worker(self, worker_id: str) -> WorkerInfo:
        return self._run(self._async.worker(worker_id))

    def job(self, job_id: str) -> JobStatus:
        return self._run(self._async.job(job_id))

    def wait(self, job_id: str) -> JobStatus:
        return self._run(self._async.wait(job_id))

    def image(self, job_id: str, index: int) -> bytes:
        return self._run(self._async.image(job_id, index))

    def generate(self, params: ImageParams, out_dir: Path | str | None = None) -> GenerationResult:
        return self._run(self._async.generate(params, out_dir))

    def models(self) -> list[str]:
        return self._run(self._async.models())

    def submit_text(self, params: TextParams, idempotency_key: str | None = None) -> TextJobCreated:
        return self._run(self._async.submit_text(params, idempotency_key))

    def text_job(self, job_id: str) -> TextStatus:
        return self._run(self._async.text_job(job_id))

    def complete(
        self, params: TextParams, on_text: Callable[[str], None] | None = None
    ) -> TextStatus:
        """Like AsyncClient.complete; `on_text` runs on the client's loop thread."""
        return self._run(self._async.complete(params, on_text))
