"""The route table: handlers declare their body and response models once, and the same
declaration drives validation, authentication, error mapping and the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import DBAPIError, IntegrityError

from coordinator.config import DEFAULT_RATE_LIMITS
from coordinator.errors import BadRequest, BodyTooLarge, CoordinatorError, Unauthorized
from coordinator.http.addresses import client_ip
from coordinator.http.bodies import BODY_LIMITS, body_limit, load_json
from coordinator.http.state import LIMITER, STORE
from coordinator.store import Account, Worker
from protocol.errors import ValidationFailed
from protocol.horde import ANONYMOUS_KEY, HordeError
from protocol.messages import ErrorBody, ErrorDetail, FieldProblem
from protocol.validation import parse
from protocol.version import VERSION

__all__ = ["API", "Api", "Call", "Query", "error_middleware", "int_query", "whole_number"]

log = logging.getLogger(__name__)

Auth = Literal["none", "optional", "user", "worker"]
Query = tuple[str, str, dict[str, Any]]


@dataclass
class Call:
    """What a handler receives besides the request: who called and the parsed body."""

    account: Account | None = None
    worker: Worker | None = None
    body: Any = None


Handler = Callable[[web.Request, Call], Awaitable[BaseModel | web.StreamResponse]]


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
    # optional query parameters the handler reads: (name, description, JSON schema)
    query: tuple[Query, ...] = ()
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
        return authorization.removeprefix("Bearer ").strip() or None
    return None


def whole_number(name: str, description: str, low: int, high: int) -> Query:
    """An optional whole-number query parameter from `low` to `high` (read by int_query)."""
    return (name, description, {"type": "integer", "minimum": low, "maximum": high})


@overload
def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int: ...
@overload
def int_query(
    request: web.Request, name: str, default: None, low: int, high: int
) -> int | None: ...
def int_query(
    request: web.Request, name: str, default: int | None, low: int, high: int
) -> int | None:
    """The whole-number query parameter `name` (`default` when absent), or 400 naming it."""
    raw = request.query.get(name)
    if raw is None:
        return default
    # ASCII digits, and no more than `high` has: `isdigit` also accepts "²", which `int`
    # refuses, and `int` refuses more than 4 300 digits
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))) or not (
        low <= int(raw) <= high
    ):
        raise BadRequest(
            f"query parameter {name}={raw!r} must be a whole number from {low} to {high}",
            [(name, f"must be {low}..{high}")],
        )
    return int(raw)


# bodies larger than this are parsed in a thread: the event loop keeps serving
_THREAD_BYTES = 256 * 1024


async def _read_body(request: web.Request, model: type[BaseModel], limit: int) -> Any:
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
        body: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        auth: Auth = "none",
        status: int = 200,
        produces: str = "application/json",
        raw: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        query: tuple[Query, ...] = (),
        errors: tuple[int, ...] = (),
        limit: str | None = None,
    ) -> Callable[[Handler], Handler]:
        assert body is None or raw is None, "a route has a JSON body or a raw one, not both"
        # a scope missing from the defaults would be unlimited and unknown to --rate-limit
        assert limit is None or limit in DEFAULT_RATE_LIMITS, f"no rate-limit scope {limit!r}"

        def register(handler: Handler) -> Handler:
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
                    query,
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
            call = Call()
            store = request.app[STORE]
            if route.auth in ("optional", "user"):
                key = api_key_of(request)
                if key is not None:
                    call.account = await store.accounts.account_by_key(key)
                    if call.account is None:
                        raise Unauthorized(
                            "unknown API key; register with `idlegrid account register`"
                        )
                elif route.auth == "user":
                    raise Unauthorized("this needs an API key: send it in the `apikey` header")
            elif route.auth == "worker":
                token = request.headers.get("X-Worker-Token", "")
                call.worker = await store.workers.worker_by_token(token) if token else None
                if call.worker is None:
                    raise Unauthorized("unknown worker token; register the worker again")
            if route.limit is not None:
                identity = (
                    f"account:{call.account.id}"
                    if call.account is not None
                    else f"worker:{call.worker.id}"
                    if call.worker is not None
                    else None
                )
                await request.app[LIMITER].check(route.limit, identity, client_ip(request))
            if route.body is not None:
                call.body = await _read_body(
                    request, route.body, body_limit(route.method, route.path)
                )
            result = await route.handler(request, call)
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
            codes = set(route.errors) | (
                {400} if route.body or route.raw or route.headers or route.query else set()
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
            params = (
                [
                    {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
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
                + [
                    {
                        "name": name,
                        "in": "query",
                        "required": False,
                        "description": description,
                        "schema": schema,
                    }
                    for name, description, schema in route.query
                ]
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
