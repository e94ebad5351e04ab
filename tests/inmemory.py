"""The typed client's in-memory transport: the coordinator's real app, without sockets.

    async with InMemoryCoordinator(config) as coordinator:
        async with AsyncClient(coordinator.url, transport=coordinator.transport()) as grid:
            await grid.register("alice")

Every request becomes a real aiohttp `web.Request`, made by the app's own request factory
with the body fed to its payload stream, and goes through the app's router, middlewares
and handlers; what the handler writes (status line, headers, body pieces) comes back
through a writer that queues it: whole for `send`, line by line as it is written for
`stream` (server-sent events). The app starts and stops as it does behind a socket
(aiohttp's AppRunner, no site). Requests come from `remote` (a loopback address unless a
test gives each client its own, e.g. to meet per-address limits).

It lives under tests/ because it imports the coordinator: the runtime packages may not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from client.api import Request, Response, StreamedResponse, TransportError
from coordinator.app import create_app
from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.config import CoordinatorConfig
from coordinator.http.state import STORE
from coordinator.store import Store

__all__ = ["InMemoryCoordinator", "InMemoryTransport"]

log = logging.getLogger(__name__)

# never dialled (.invalid names resolve nowhere): it only names the coordinator in messages
URL_IN_MEMORY = "http://coordinator.invalid"


class _NoSendfile:
    """The connection's transport, as far as the coordinator (is the client still there:
    coordinator.http.polling) and `web.FileResponse` look at it: there is no socket to
    sendfile to, so aiohttp falls back to writing the file through the pipe."""

    def is_closing(self) -> bool:
        return False  # the in-memory client hears every answer

    @property
    def _sendfile_compatible(self) -> object:  # what `loop.sendfile` asks next
        raise NotImplementedError("the in-memory transport has no socket to sendfile to")


class _Connection:
    """What aiohttp's Request reads of the connection a request arrived on."""

    ssl_context = None
    transport = _NoSendfile()
    max_field_size = 8190
    max_line_length = 8190
    max_headers = 128

    def __init__(self, remote: str) -> None:
        self.peername = (remote, 50000)
        self.sockname = ("127.0.0.1", 80)


class _Pipe(AbstractStreamWriter):
    """Catches what a handler writes: the status and headers once, then the body's
    pieces (None: the end)."""

    def __init__(self) -> None:
        self.head: asyncio.Future[tuple[int, CIMultiDict[str]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pieces: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        # "HTTP/1.1 200 OK"
        self.head.set_result((int(status_line.split(" ", 2)[1]), CIMultiDict(headers)))

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise ConnectionResetError("the in-memory client stopped reading")
        self.output_size += len(chunk)
        self.pieces.put_nowait(bytes(chunk))

    async def write_eof(self, chunk: bytes = b"") -> None:
        if chunk:
            await self.write(chunk)
        self.pieces.put_nowait(None)

    async def drain(self) -> None:
        pass

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        raise NotImplementedError("the in-memory transport does not compress answers")

    def enable_chunking(self) -> None:
        pass  # pieces are passed on as they are written: nothing to frame


class _Streamed:
    def __init__(self, status: int, headers: CIMultiDict[str], pipe: _Pipe) -> None:
        self.status = status
        self.headers: Mapping[str, str] = headers
        self._pipe = pipe
        self._ended = False

    async def _pieces(self) -> AsyncIterator[bytes]:
        while not self._ended:
            piece = await self._pipe.pieces.get()
            if piece is None:
                self._ended = True
            else:
                yield piece

    async def lines(self) -> AsyncIterator[bytes]:
        buffer = b""
        async for piece in self._pieces():
            buffer += piece
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line + b"\n"
        if buffer:
            yield buffer

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self._pieces()])


class InMemoryTransport:
    """Hands requests to a started app's handler (`server`: its AppRunner's server)."""

    def __init__(self, server: web.Server, remote: str = "127.0.0.1") -> None:
        self._server = server
        self._remote = remote
        self._serving: set[asyncio.Task[None]] = set()

    async def send(self, request: Request) -> Response:
        async with self.stream(request) as answer:
            content = await answer.read()
        return Response(answer.status, answer.headers, content)

    @contextlib.asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[StreamedResponse]:
        pipe = _Pipe()
        serving = asyncio.create_task(self._serve(request, pipe))
        self._serving.add(serving)
        serving.add_done_callback(self._serving.discard)
        try:
            status, headers = await pipe.head
            yield _Streamed(status, headers, pipe)
        finally:
            # the client hung up: a handler still writing is stopped, as a socket's would be
            pipe.closed = True
            await _stop(serving)

    async def aclose(self) -> None:
        for serving in list(self._serving):
            await _stop(serving)

    async def _serve(self, request: Request, pipe: _Pipe) -> None:
        try:
            web_request = self._web_request(request, pipe)
            try:
                response = await self._server.request_handler(web_request)
            except web.HTTPException as exc:
                response = exc
            except Exception:
                # as aiohttp answers a handler that raised
                log.exception("the app failed %s %s", request.method, request.path)
                response = web.Response(status=500, text="500 Internal Server Error")
            if not response.prepared:
                await response.prepare(web_request)
            await response.write_eof()
        finally:
            if not pipe.head.done():
                pipe.head.set_exception(TransportError("the app gave no answer", sent=True))
            pipe.pieces.put_nowait(None)

    def _web_request(self, request: Request, pipe: _Pipe) -> web.BaseRequest:
        """`request` as aiohttp's server would have parsed it off a socket."""
        content = request.content
        headers = CIMultiDict(request.headers)
        if content is None and request.json is not None:
            content = json.dumps(request.json).encode()
            headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Host", urlsplit(request.base_url or URL_IN_MEMORY).netloc)
        headers["Content-Length"] = str(len(content or b""))
        loop = asyncio.get_running_loop()
        payload = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
        if content:
            payload.feed_data(content)
        payload.feed_eof()
        target = request.path + (f"?{urlencode(dict(request.params))}" if request.params else "")
        message = RawRequestMessage(
            request.method,
            target,
            HttpVersion11,
            CIMultiDictProxy(headers),
            tuple((name.encode(), value.encode()) for name, value in headers.items()),
            False,
            None,
            False,
            False,
            URL(target),
        )
        task = asyncio.current_task()
        assert task is not None
        connection: Any = _Connection(self._remote)
        return self._server.request_factory(message, payload, connection, pipe, task)


async def _stop(serving: asyncio.Task[None]) -> None:
    if not serving.done():
        serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving


class InMemoryCoordinator:
    """The coordinator's app (coordinator.app.create_app), started without a socket;
    `transport()` makes transports into it, `url` names it in the clients' messages."""

    url = URL_IN_MEMORY

    def __init__(self, config: CoordinatorConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.app = create_app(config, clock)
        self._runner = web.AppRunner(self.app, access_log=None)

    async def __aenter__(self) -> InMemoryCoordinator:
        await self._runner.setup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    @property
    def store(self) -> Store:
        return self.app[STORE]

    def transport(self, remote: str = "127.0.0.1") -> InMemoryTransport:
        """A transport whose requests come from `remote`."""
        server = self._runner.server
        assert server is not None, "enter the InMemoryCoordinator first"
        return InMemoryTransport(server, remote)
