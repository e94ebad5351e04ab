"""Python SDK: `AsyncClient` (aiohttp) and `Client`, its synchronous twin.

    async with AsyncClient("http://127.0.0.1:8470", api_key=KEY) as grid:
        result = await grid.generate(ImageParams(prompt="a lighthouse", steps=20), out_dir="out")

`generate` submits, follows the job's server-sent event stream (queue position, then step
progress) and downloads the PNGs.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel

from client.errors import (
    ApiError,
    AuthError,
    CoordinatorUnreachable,
    JobFailed,
    NotEnoughKudos,
)
from protocol.messages import AccountCreated, AccountInfo, ErrorBody, ImageJobCreated, JobStatus
from protocol.params import ImageParams

__all__ = ["AsyncClient", "Client", "GenerationResult"]

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


def _raise_for(status: int, text: str) -> None:
    try:
        detail = ErrorBody.model_validate_json(text).error
        code, message = detail.code, detail.message
        fields = [(f.field, f.message) for f in detail.fields]
    except ValueError:
        code, message, fields = "http_error", text[:500] or f"HTTP {status}", []
    cls = AuthError if status in (401, 403) else NotEnoughKudos if status == 402 else ApiError
    raise cls(status, code, message, fields)


class AsyncClient:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=None)
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

    async def _request(self, method: str, path: str, model: type[M], body: Any = None) -> M:
        try:
            async with asyncio.timeout(self._request_timeout):
                async with self._http().request(method, self.base_url + path, json=body) as resp:
                    text = await resp.text()
                    if resp.status >= 400:
                        _raise_for(resp.status, text)
                    return model.model_validate_json(text)
        except aiohttp.ClientConnectionError as exc:
            raise CoordinatorUnreachable(
                f"cannot reach the coordinator at {self.base_url}: {exc}"
            ) from exc

    # --- accounts ---------------------------------------------------------------------

    async def register(self, name: str) -> AccountCreated:
        return await self._request("POST", "/api/v1/accounts", AccountCreated, {"name": name})

    async def me(self) -> AccountInfo:
        return await self._request("GET", "/api/v1/accounts/me", AccountInfo)

    # --- image jobs -------------------------------------------------------------------

    async def submit_image(self, params: ImageParams) -> ImageJobCreated:
        body = params.model_dump(mode="json", exclude_none=True)
        return await self._request("POST", "/api/v1/jobs/image", ImageJobCreated, body)

    async def job(self, job_id: str) -> JobStatus:
        return await self._request("GET", f"/api/v1/jobs/{job_id}", JobStatus)

    async def events(self, job_id: str) -> AsyncIterator[JobStatus]:
        """Every status change of a job, from its server-sent event stream, until it ends."""
        url = f"{self.base_url}/api/v1/jobs/{job_id}/events"
        try:
            async with self._http().get(url, headers={"Accept": "text/event-stream"}) as resp:
                if resp.status >= 400:
                    _raise_for(resp.status, await resp.text())
                data: list[str] = []
                async for raw in resp.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        status = JobStatus.model_validate(json.loads("\n".join(data)))
                        data = []
                        yield status
                        if status.finished:
                            return
        except aiohttp.ClientConnectionError as exc:
            raise CoordinatorUnreachable(f"lost the event stream of job {job_id}: {exc}") from exc

    async def wait(self, job_id: str, on_progress: ProgressCallback | None = None) -> JobStatus:
        """Follow a job until it ends; reconnects if the stream drops."""
        while True:
            try:
                async for status in self.events(job_id):
                    if on_progress is not None:
                        outcome = on_progress(status)
                        if outcome is not None:
                            await outcome
                    if status.finished:
                        return status
            except CoordinatorUnreachable:
                await asyncio.sleep(0.5)
            status = await self.job(job_id)
            if status.finished:
                return status

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

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="idlegrid-client", daemon=True
        )
        self._thread.start()
        self._async = AsyncClient(base_url, api_key, timeout=timeout)

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

    def register(self, name: str) -> AccountCreated:
        return self._run(self._async.register(name))

    def me(self) -> AccountInfo:
        return self._run(self._async.me())

    def submit_image(self, params: ImageParams) -> ImageJobCreated:
        return self._run(self._async.submit_image(params))

    def job(self, job_id: str) -> JobStatus:
        return self._run(self._async.job(job_id))

    def wait(self, job_id: str) -> JobStatus:
        return self._run(self._async.wait(job_id))

    def image(self, job_id: str, index: int) -> bytes:
        return self._run(self._async.image(job_id, index))

    def generate(self, params: ImageParams, out_dir: Path | str | None = None) -> GenerationResult:
        return self._run(self._async.generate(params, out_dir))
