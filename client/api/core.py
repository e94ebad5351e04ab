"""The I/O-free core of the typed client: requests to send, answers to decode.

A route (client.api.routes, client.api.worker_routes) is a function that returns a
`Call`: the `Request` to send (method, path, JSON body made from protocol's request
models or raw bytes, headers such as Idempotency-Key, the seconds it may take, and which
credential it carries) and how to decode a successful answer into a typed model. `ApiCore`
adds the base URL and the credential (`apikey` or `X-Worker-Token`) and decodes an answer,
turning an error status into the typed error of the face's `ErrorPolicy`. Nothing here
touches the network: transports (client.api.transports) do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel

from client.api.errors import TransportError

__all__ = ["ApiCore", "Call", "ErrorPolicy", "Request", "Response", "body", "call"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# which credential a request carries: the account's API key (`apikey`, where the client has
# one), or the token a worker got when it registered (`X-Worker-Token`)
Auth = Literal["account", "worker"]


@dataclass(frozen=True)
class Request:
    """One HTTP request. `json` goes as a JSON body, or `content` as the raw body (with its
    Content-Type in `headers`); `timeout`: seconds for the whole exchange (None: the
    client's). `base_url` is filled in by ApiCore.prepare."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    auth: Auth = "account"
    base_url: str = ""

    @property
    def url(self) -> str:
        return self.base_url + self.path


@dataclass(frozen=True)
class Response:
    """A whole answer: status, headers and body."""

    status: int
    headers: Mapping[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass(frozen=True)
class Call(Generic[T]):
    """A request and how to decode its successful answer's body."""

    request: Request
    decode: Callable[[bytes], T]


def call(request: Request, model: type[M]) -> Call[M]:
    """A call whose answer is one `model`."""
    return Call(request, model.model_validate_json)


def body(message: BaseModel) -> dict[str, Any]:
    """The JSON body of a request model: the fields it was given, None left out.

    Routes build their bodies with `Model.model_construct(...)` (typed by pydantic's mypy
    plugin): the coordinator validates them, and answers a bad value with the field's name
    and the fix, so the client does not refuse it first."""
    return message.model_dump(mode="json", exclude_unset=True, exclude_none=True, warnings=False)


class ErrorPolicy(Protocol):
    """How a face names failures: each returns the exception to raise."""

    def rejected(self, request: Request, response: Response) -> Exception:
        """The coordinator answered with an error status (>= 400)."""
        ...

    def unreachable(self, request: Request, error: TransportError) -> Exception:
        """The request got no answer (refused, broken, silent connection)."""
        ...

    def timed_out(self, request: Request, seconds: float) -> Exception:
        """No whole answer within `seconds`."""
        ...


class ApiCore:
    """Where requests go and with which credential; decodes answers. `timeout`: default
    seconds for one request."""

    def __init__(
        self, base_url: str, api_key: str | None, errors: ErrorPolicy, timeout: float
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.errors = errors
        self.timeout = timeout
        # set when a worker registers: the credential of its worker calls
        self.worker_token: str | None = None

    def prepare(self, request: Request) -> Request:
        """The request as sent: base URL, credential and timeout filled in."""
        headers = dict(request.headers)
        if request.auth == "worker":
            assert self.worker_token is not None, "register() first"
            headers["X-Worker-Token"] = self.worker_token
        elif self.api_key:
            headers["apikey"] = self.api_key
        return dataclasses.replace(
            request,
            base_url=self.base_url,
            headers=headers,
            timeout=self.timeout if request.timeout is None else request.timeout,
        )

    def check(self, request: Request, response: Response) -> None:
        """Raise the face's error for an error status."""
        if response.status >= 400:
            raise self.errors.rejected(request, response)

    def decode(self, call: Call[T], request: Request, response: Response) -> T:
        self.check(request, response)
        return call.decode(response.content)
