"""The faces of the typed client: async over a transport, sync over the async one.

`AsyncApi` sends `Call`s (client.api.core) through a transport and bounds each exchange by
its timeout; a face built on it (client.sdk.AsyncClient, worker.common.link.CoordinatorLink)
names its routes with `endpoint(route)` (one line each: the route's own signature, typed)
and adds the calls that take several requests. `SyncFace` runs an async face on a private
event-loop thread; its methods are `blocking(AsyncFace.method)`, typed like the async one
minus the await.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from client.api.core import ApiCore, Call, ErrorPolicy, Request, Response
from client.api.errors import TransportError
from client.api.transports import AiohttpTransport, AsyncTransport, StreamedResponse

__all__ = ["AsyncApi", "SyncFace", "blocking", "endpoint"]

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A", bound="AsyncApi")


class AsyncApi:
    """Sends calls to the coordinator at `base_url` through `transport` (default: aiohttp
    over the network, connecting within `connect_timeout` s and giving an answer up after
    `read_timeout` s of silence). `timeout`: seconds one request may take, unless its
    route says otherwise. Failures are raised as `errors` names them."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        errors: ErrorPolicy,
        *,
        timeout: float,
        connect_timeout: float,
        read_timeout: float | None = None,
        transport: AsyncTransport | None = None,
    ) -> None:
        self.core = ApiCore(base_url, api_key, errors, timeout)
        self.transport: AsyncTransport = transport or AiohttpTransport(
            connect_timeout=connect_timeout, read_timeout=read_timeout
        )

    @property
    def base_url(self) -> str:
        return self.core.base_url

    @base_url.setter
    def base_url(self, url: str) -> None:
        """Send the next requests to another coordinator (one of a cluster's)."""
        self.core.base_url = url.rstrip("/")

    async def __aenter__(self: A) -> A:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def send(self, call: Call[T]) -> T:
        """Send one call; its decoded answer, or the face's error."""
        request = self.core.prepare(call.request)
        response = await self.exchange(request)
        return self.core.decode(call, request, response)

    async def exchange(self, request: Request) -> Response:
        """The whole answer to a prepared request, within its timeout."""
        seconds = request.timeout if request.timeout is not None else self.core.timeout
        try:
            async with asyncio.timeout(seconds):
                return await self.transport.send(request)
        except TransportError as exc:
            raise self.core.errors.unreachable(request, exc) from exc
        except TimeoutError as exc:
            raise self.core.errors.timed_out(request, seconds) from exc

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[StreamedResponse]:
        """A prepared request's answer as it arrives; an error status is raised as the
        face's error. Timeouts and lost connections are the caller's (TransportError)."""
        async with self.transport.stream(request) as answer:
            if answer.status >= 400:
                content = await answer.read()
                self.core.check(request, Response(answer.status, answer.headers, content))
            yield answer


class endpoint(Generic[P, T]):  # (lower case: it reads like a function, as `property`)
    """A face's method that sends the call `route` builds: `me = endpoint(routes.me)`."""

    def __init__(self, route: Callable[P, Call[T]]) -> None:
        self.route = route
        self.__doc__ = route.__doc__

    @overload
    def __get__(self, face: None, owner: type[Any]) -> endpoint[P, T]: ...

    @overload
    def __get__(self, face: AsyncApi, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(
        self, face: AsyncApi | None, owner: type[Any]
    ) -> endpoint[P, T] | Callable[P, Coroutine[Any, Any, T]]:
        if face is None:
            return self
        route = self.route

        @functools.wraps(route)
        async def send(*args: P.args, **kwargs: P.kwargs) -> T:
            return await face.send(route(*args, **kwargs))

        return send


class SyncFace(Generic[A]):
    """An async face run on a private event-loop thread: `blocking` methods wait for it."""

    def __init__(self, make: Callable[[], A]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="idlegrid-client", daemon=True
        )
        self._thread.start()
        self._async = make()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the face's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncFace[A]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.run(self._async.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class _Blocking(Generic[P, T]):
    def __init__(self, doc: str | None) -> None:
        self.name = ""
        self.__doc__ = doc

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, face: None, owner: type[Any]) -> _Blocking[P, T]: ...

    @overload
    def __get__(self, face: SyncFace[Any], owner: type[Any]) -> Callable[P, T]: ...

    def __get__(
        self, face: SyncFace[Any] | None, owner: type[Any]
    ) -> _Blocking[P, T] | Callable[P, T]:
        if face is None:
            return self
        method = getattr(face._async, self.name)

        @functools.wraps(method)
        def wait(*args: P.args, **kwargs: P.kwargs) -> T:
            result: T = face.run(method(*args, **kwargs))
            return result

        return wait


@overload
def blocking(method: endpoint[P, T]) -> _Blocking[P, T]: ...


@overload
def blocking(method: Callable[Concatenate[Any, P], Awaitable[T]]) -> _Blocking[P, T]: ...


def blocking(method: Any) -> Any:
    """The sync twin of an async face's method, of the same name: `me = blocking(
    AsyncClient.me)` waits for `AsyncClient.me` on the face's loop thread."""
    return _Blocking(method.__doc__)
