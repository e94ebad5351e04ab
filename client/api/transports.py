"""How requests travel: the transport interface and the aiohttp transport (real network).

A transport sends a prepared `Request` (client.api.core) and gives back its answer,
whole (`send`) or as a stream whose lines arrive as they are written (`stream`: server-sent
events). A request without an answer raises TransportError; an error status is an answer.
Whole-exchange timeouts are the faces' (client.api.faces); a transport only bounds
connecting and, where it is given one, the silence between two pieces of an answer.

Tests swap in tests/inmemory.py's transport, which runs the coordinator's real app in the
test's own process without sockets.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import aiohttp

from client.api.core import Request, Response
from client.api.errors import TransportError

__all__ = ["AiohttpTransport", "AsyncTransport", "StreamedResponse"]


class StreamedResponse(Protocol):
    """An answer whose body is still arriving."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def lines(self) -> AsyncIterator[bytes]:
        """The body, line by line (each with its line ending), as it arrives."""
        ...

    async def read(self) -> bytes:
        """The rest of the body."""
        ...


class AsyncTransport(Protocol):
    async def send(self, request: Request) -> Response:
        """The whole answer to `request`."""
        ...

    def stream(self, request: Request) -> AbstractAsyncContextManager[StreamedResponse]:
        """The answer to `request` as it arrives; leaving the context drops it."""
        ...

    async def aclose(self) -> None: ...


class _AiohttpStreamed:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            async for line in self._response.content:
                yield line
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise TransportError(str(exc), sent=True) from exc

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise TransportError(str(exc), sent=True) from exc


class AiohttpTransport:
    """HTTP over one aiohttp session (made on first use, in the loop that uses it).

    `connect_timeout`: seconds to connect; `read_timeout`: seconds of silence after which
    an answer is given up (None: no limit)."""

    def __init__(self, *, connect_timeout: float, read_timeout: float | None = None) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: Request) -> Response:
        async with self.stream(request) as answer:
            content = await answer.read()
        return Response(answer.status, answer.headers, content)

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[StreamedResponse]:
        # (a file-like body is sent in pieces; raw bytes would be written at once)
        payload: dict[str, Any] = (
            {"json": request.json}
            if request.content is None
            else {"data": io.BytesIO(request.content)}
        )
        try:
            response = await self._http().request(
                request.method,
                request.url,
                headers=dict(request.headers),
                params=dict(request.params) or None,
                **payload,
            )
        except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as exc:
            # refused, unresolvable or no URL at all: nothing reached the coordinator
            raise TransportError(str(exc), sent=False) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise TransportError(str(exc), sent=True) from exc
        try:
            yield _AiohttpStreamed(response)
        finally:
            response.close()
