"""The route table: handlers declare their body and response models once, and the same
declaration drives validation, authentication, error mapping and the OpenAPI document.

A handler's second parameter says who may call and what body it takes, typed:
`call: Call[ImageJobRequest]` (anyone; `call.account` when a key was sent),
`UserCall[...]` (an API key: `call.account`), `WorkerCall[...]` (a worker token:
`call.worker`); `Call[None]` and the like take no JSON body. The route's body model is read
from that annotation, and its `auth=` must agree with the class: a disagreement fails when
the route is registered, at import. Path and query parameters follow, typed too
(coordinator.http.params).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, get_args, get_origin, get_type_hints

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import DBAPIError, IntegrityError

from coordinator.config import DEFAULT_RATE_LIMITS
from coordinator.errors import BodyTooLarge, CoordinatorError, Unauthorized
from coordinator.http.addresses import client_ip
from coordinator.http.bodies import BODY_LIMITS, body_limit, load_json
from coordinator.http.params import Declared, Text, declared
from coordinator.http.state import LIMITER, STORE
from coordinator.store import Account, Worker
from protocol.errors import ValidationFailed
from protocol.horde import ANONYMOUS_KEY, HordeError
from protocol.messages import ErrorBody, ErrorDetail, FieldProblem
from protocol.validation import parse
from protocol.version import VERSION

__all__ = ["API", "Api", "Call", "UserCall", "WorkerCall", "error_middleware"]

log = logging.getLogger(__name__)

Auth = Literal["none", "optional", "user", "worker"]

# the body model of a route, or None
B = TypeVar("B", bound=BaseModel | None)


@dataclass(frozen=True)
class Call(Generic[B]):
    """A request anyone may make (auth "none" or "optional"): the parsed body, and the
    caller's account when it sent an API key."""

    body: B
    account: Account | None


@dataclass(frozen=True)
class UserCall(Generic[B]):
    """A request with a known API key (auth "user"): the parsed body and the account."""

    body: B
    account: Account


@dataclass(frozen=True)
class WorkerCall(Generic[B]):
    """A request with a known worker token (auth "worker"): the parsed body and the worker."""

    body: B
    worker: Worker


AnyCall = Call[BaseModel | None] | UserCall[BaseModel | None] | WorkerCall[BaseModel | None]
# (request, call, then the path and query parameters it declares, by keyword)
Handler = Callable[..., Awaitable[BaseModel | web.StreamResponse]]
H = TypeVar("H", bound=Handler)
# the class of a handler's `call` for each kind of authentication
CALL_OF: dict[Auth, type[AnyCall]] = {
    "none": Call,
    "optional": Call,
    "user": UserCall,
    "worker": WorkerCall,
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None
    response: type[BaseModel] | None
    auth: Auth
    status: int
    produces: str
    # media type of a raw (binary) body that the handler streams itself, or None
    raw: str | None = None
    # request headers the handler reads: (name, description), for the OpenAPI document
    headers: tuple[tuple[str, str], ...] = ()
    # path and query parameters the handler declares (coordinator.http.params)
    params: tuple[Declared, ...] = ()
    errors: tuple[int, ...] = field(default=())
    # rate-limit scope (a key of DEFAULT_RATE_LIMITS), or None
    limit: str | None = None


def api_key_of(request: web.Request) -> str | None:
    """The caller's API key: AI Horde's `apikey` header or an OpenAI-style bearer token."""
    key = request.headers.get("apikey")
    if key == ANONYMOUS_KEY:
        # AI Horde's clients send this when the user has no key
        return None
    if key:
        return key
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Bearer "):
        bearer = authorization.removeprefix("Bearer ").strip()
        # OpenAI clients always send a key: AI Horde's anonymous one is no key
        return bearer if bearer and bearer != ANONYMOUS_KEY else None
    return None


# bodies larger than this are parsed in a thread: the event loop keeps serving
_THREAD_BYTES = 256 * 1024


async def _read_body(request: web.Request, model: type[BaseModel], limit: int) -> BaseModel:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"request body is {request.content_length} bytes; the limit here is {limit}",
            [("body", f"must be at most {limit} bytes")],
        )
    # `read(n)` returns what is buffered so far, not n bytes: read until the end.
    raw = bytearray()
    while chunk := await request.content.read(limit + 1 - len(raw)):
        raw += chunk
        if len(raw) > limit:
            raise BodyTooLarge(
                f"request body is over the limit of {limit} bytes",
                [("body", f"must be at most {limit} bytes")],
            )
    if len(raw) <= _THREAD_BYTES:
        return parse(model, load_json(bytes(raw)))
    return await asyncio.to_thread(lambda: parse(model, load_json(bytes(raw))))


def _body_of(handler: Handler, auth: Auth) -> type[BaseModel] | None:
    """The body model a handler's `call` annotation names (`Call[Model]`: Model,
    `Call[None]`: None); TypeError when the annotation does not fit `auth`."""
    where = f"handler {handler.__module__}.{handler.__qualname__}"
    names = list(inspect.signature(handler).parameters)
    hint = get_type_hints(handler).get(names[1]) if len(names) >= 2 else None
    kind = CALL_OF[auth]
    args = get_args(hint)
    if get_origin(hint) is not kind or len(args) != 1:
        raise TypeError(
            f"{where}: an auth={auth!r} route's handler takes (request, call: "
            f"{kind.__name__}[BodyModel or None], ...), not {hint}"
        )
    body = args[0]
    if body is type(None):
        return None
    if isinstance(body, type) and issubclass(body, BaseModel):
        return body
    raise TypeError(f"{where}: the body of {kind.__name__}[...] must be a pydantic model or None")


class Api:
    def __init__(self, title: str, version: str) -> None:
        self.title = title
        self.version = version
        self.routes: list[Route] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        response: type[BaseModel] | None = None,
        auth: Auth = "none",
        status: int = 200,
        produces: str = "application/json",
        raw: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        errors: tuple[int, ...] = (),
        limit: str | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated handler; its body model, path and query parameters come
        from its signature (see the module's docstring)."""
        # a scope missing from the defaults would be unlimited and unknown to --rate-limit
        if limit is not None and limit not in DEFAULT_RATE_LIMITS:
            raise ValueError(f"{method} {path}: no rate-limit scope {limit!r}")

        def register(handler: H) -> H:
            body = _body_of(handler, auth)
            if body is not None and raw is not None:
                raise TypeError(f"{method} {path}: a route has a JSON body or a raw one, not both")
            self.routes.append(
                Route(
                    method,
                    path,
                    handler,
                    summary,
                    body,
                    response,
                    auth,
                    status,
                    produces,
                    raw,
                    headers,
                    declared(handler, _path_params(path)),
                    errors + ((429,) if limit else ()) + ((413,) if raw else ()),
                    limit,
                )
            )
            return handler

        return register

    def install(self, app: web.Application) -> None:
        bodies = {(r.method, r.path) for r in self.routes if r.body is not None}
        # a limit for a route that has no JSON body (or no longer exists) would mislead
        assert set(BODY_LIMITS) <= bodies, f"body limits of no route: {set(BODY_LIMITS) - bodies}"
        for route in self.routes:
            app.router.add_route(route.method, route.path, self._wrap(route))

    def _wrap(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            caller: Account | Worker | None = None
            if route.auth in ("optional", "user"):
                key = api_key_of(request)
                if key is not None:
                    caller = await request.app[STORE].accounts.account_by_key(key)
                    if caller is None:
                        raise Unauthorized(
                            "unknown API key; register with `idlegrid account register`"
                        )
                elif route.auth == "user":
                    raise Unauthorized("this needs an API key: send it in the `apikey` header")
            elif route.auth == "worker":
                token = request.headers.get("X-Worker-Token", "")
                caller = await request.app[STORE].workers.worker_by_token(token) if token else None
                if caller is None:
                    raise Unauthorized("unknown worker token; register the worker again")
            if route.limit is not None:
                identity = (
                    f"account:{caller.id}"
                    if isinstance(caller, Account)
                    else f"worker:{caller.id}"
                    if caller is not None
                    else None
                )
                await request.app[LIMITER].check(route.limit, identity, client_ip(request))
            body = None
            if route.body is not None:
                body = await _read_body(request, route.body, body_limit(route.method, route.path))
            values = {
                p.argument: p.value(
                    request.match_info.get(p.name)
                    if p.where == "path"
                    else request.query.get(p.name)
                )
                for p in route.params
            }
            # (the handler's annotation was checked against route.auth at registration)
            call: AnyCall
            if isinstance(caller, Worker):
                call = WorkerCall(body, caller)
            elif route.auth == "user" and caller is not None:
                call = UserCall(body, caller)
            else:
                call = Call(body, caller)
            result = await route.handler(request, call, **values)
            if isinstance(result, web.StreamResponse):
                return result
            return web.json_response(text=result.model_dump_json(), status=route.status)

        return handle

    def openapi(self) -> dict[str, Any]:
        models: set[type[BaseModel]] = {ErrorBody, HordeError}
        for route in self.routes:
            models.update(m for m in (route.body, route.response) if m is not None)
        ordered = sorted(models, key=lambda m: m.__name__)
        refs, schema = models_json_schema(
            [
                (m, "serialization" if m in (ErrorBody, HordeError) else "validation")
                for m in ordered
            ],
            ref_template="#/components/schemas/{model}",
        )
        paths: dict[str, dict[str, Any]] = {}
        for route in self.routes:
            op: dict[str, Any] = {"summary": route.summary, "operationId": route.handler.__name__}
            if route.body is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
                }
            elif route.raw is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {route.raw: {"schema": {"type": "string", "format": "binary"}}},
                }
            ok: dict[str, Any] = {"description": "success"}
            if route.response is not None:
                ok["content"] = {route.produces: {"schema": refs[(route.response, "validation")]}}
            elif route.produces != "application/json":
                ok["content"] = {route.produces: {}}
            # /api/v2 answers errors as AI Horde does
            shape = HordeError if route.path.startswith(HORDE_PREFIX) else ErrorBody
            error = {"content": {"application/json": {"schema": refs[(shape, "serialization")]}}}
            responses: dict[str, Any] = {str(route.status): ok}
            parsed = any(p.where == "query" or not isinstance(p.param, Text) for p in route.params)
            codes = set(route.errors) | (
                {400} if route.body or route.raw or route.headers or parsed else set()
            )
            if route.auth in ("user", "worker", "optional"):
                codes.add(401)
            for code in sorted(codes):
                responses[str(code)] = {"description": "error", **error}
            op["responses"] = responses
            if route.auth == "worker":
                op["security"] = [{"workerToken": []}]
            elif route.auth == "user":
                op["security"] = [{"apiKey": []}, {"bearer": []}]
            elif route.auth == "optional":
                op["security"] = [{}, {"apiKey": []}, {"bearer": []}]
            typed = {p.name: p.openapi() for p in route.params}
            params = (
                [
                    typed.get(name)
                    or {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                    for name in _path_params(route.path)
                ]
                + [
                    {
                        "name": name,
                        "in": "header",
                        "required": True,
                        "description": description,
                        "schema": {"type": "string"},
                    }
                    for name, description in route.headers
                ]
                + [p.openapi() for p in route.params if p.where == "query"]
            )
            if params:
                op["parameters"] = params
            paths.setdefault(route.path, {})[route.method.lower()] = op
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": schema.get("$defs", {}),
                "securitySchemes": {
                    "apiKey": {"type": "apiKey", "in": "header", "name": "apikey"},
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "workerToken": {"type": "apiKey", "in": "header", "name": "X-Worker-Token"},
                },
            },
        }


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]


# AI Horde's return code (`rc`) for each of our error codes, for /api/v2 callers
HORDE_RC = {
    "validation_error": "BadRequest",
    "bad_request": "BadRequest",
    "body_too_large": "BadRequest",
    "bad_image": "ImageValidationFailed",
    "unauthorized": "InvalidAPIKey",
    "forbidden": "Forbidden",
    "worker_paused": "WorkerMaintenance",
    "unsandboxed_worker": "Forbidden",
    "not_found": "RequestNotFound",
    "conflict": "BadRequest",
    "insufficient_kudos": "KudosUpfront",
    "rate_limited": "TooManyPrompts",
    "store_unavailable": "MaintenanceMode",
}
# statuses AI Horde uses where ours differ: it answers a missing upfront payment with 403
# and a stale or duplicate submission with 400
HORDE_STATUS = {402: 403, 409: 400}
HORDE_PREFIX = "/api/v2/"


def _error_response(
    request: web.Request,
    status: int,
    code: str,
    message: str,
    fields: list[tuple[str, str]],
    rc: str | None = None,
) -> web.Response:
    if request.path.startswith(HORDE_PREFIX):
        horde = HordeError(
            message=message,
            rc=rc or HORDE_RC.get(code, "BadRequest" if status < 500 else "InternalError"),
            errors=dict(fields) if fields else None,
        )
        return web.json_response(
            text=horde.model_dump_json(exclude_none=True), status=HORDE_STATUS.get(status, status)
        )
    body = ErrorBody(
        error=ErrorDetail(
            code=code,
            message=message,
            fields=[FieldProblem(field=f, message=m) for f, m in fields],
        )
    )
    return web.json_response(text=body.model_dump_json(), status=status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The one place where errors become HTTP statuses."""
    try:
        return await handler(request)
    except ValidationFailed as exc:
        return _error_response(request, 400, "validation_error", str(exc), exc.problems)
    except CoordinatorError as exc:
        if exc.status >= 500:
            log.exception("request failed: %s %s", request.method, request.path)
        response = _error_response(request, exc.status, exc.code, exc.message, exc.fields, exc.rc)
        response.headers.update(exc.headers)
        return response
    except DBAPIError as exc:
        if isinstance(exc, IntegrityError):
            raise
        # deadlock, serialization failure, lost connection: the transaction rolled back
        log.warning("database error on %s %s: %s", request.method, request.path, exc.orig)
        response = _error_response(
            request,
            503,
            "store_unavailable",
            "the database is busy or unreachable; retry shortly",
            [],
        )
        response.headers["Retry-After"] = "1"
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(
            request, exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, []
        )


API = Api("idlegrid coordinator", VERSION)
