"""The typed client of the coordinator's API, shared by the SDK, the CLI and the workers.

core.py           Request, Response, Call; ApiCore: base URL, credentials, decoding (no I/O)
routes.py         the requester's routes (accounts, image and text jobs) as Calls
worker_routes.py  the worker's routes (register, pop, progress, results) as Calls
transports.py     AsyncTransport; AiohttpTransport over the network
faces.py          AsyncApi (sends Calls), `endpoint`, SyncFace and `blocking`
errors.py         TransportError: a request got no answer

Layering: this package imports only protocol (and aiohttp, pydantic); client's SDK and CLI
(client.sdk, client.cli) and the worker (worker.common.link) build on it. Tests run the
coordinator's real app without sockets through tests/inmemory.py's transport.
"""

from client.api import routes, worker_routes
from client.api.core import ApiCore, Call, ErrorPolicy, Request, Response
from client.api.errors import TransportError
from client.api.faces import AsyncApi, SyncFace, blocking, endpoint
from client.api.transports import AiohttpTransport, AsyncTransport, StreamedResponse

__all__ = [
    "AiohttpTransport",
    "ApiCore",
    "AsyncApi",
    "AsyncTransport",
    "Call",
    "ErrorPolicy",
    "Request",
    "Response",
    "StreamedResponse",
    "SyncFace",
    "TransportError",
    "blocking",
    "endpoint",
    "routes",
    "worker_routes",
]
