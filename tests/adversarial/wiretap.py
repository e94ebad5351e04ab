"""A forwarding proxy on 127.0.0.1 that sees what a worker sends: the attacker's view of
a link it can read (a leaky TLS terminator, a debug log) or delay (a slow network).

Every request is recorded and forwarded to the coordinator; requests to a held path wait
until the test releases them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

__all__ = ["Captured", "Wiretap"]

# hop-by-hop and length headers the proxy sets itself
_DROPPED = {"host", "content-length", "transfer-encoding", "connection"}


@dataclass(frozen=True)
class Captured:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class _Hold:
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)


class Wiretap:
    """`async with Wiretap(upstream) as tap:` point the victim at `tap.url`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self.captured: list[Captured] = []
        self._holds: dict[str, _Hold] = {}
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Wiretap:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for hold in self._holds.values():
            hold.released.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    def hold(self, path: str) -> None:
        """Hold requests to `path` until `release(path)`."""
        self._holds[path] = _Hold()

    async def arrived(self, path: str) -> Captured:
        """Wait until a request to the held `path` arrives; the last one to it."""
        await self._holds[path].arrived.wait()
        return self.last(path)

    def release(self, path: str) -> None:
        self._holds[path].released.set()

    def last(self, path: str) -> Captured:
        return [c for c in self.captured if c.path == path][-1]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
        self.captured.append(Captured(request.method, request.path, headers, body))
        hold = self._holds.get(request.path)
        if hold is not None:
            hold.arrived.set()
            await hold.released.wait()
        async with self._http.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            content = await upstream.read()
            return web.Response(
                status=upstream.status,
                body=content,
                content_type=upstream.content_type,
            )
