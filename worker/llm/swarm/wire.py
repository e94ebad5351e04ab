"""The block server's RPC interface and message framing, shared by server and client.

Wire protocol (on the server's libp2p peer, handlers named `BlockServicer.rpc_*`):

    rpc_inference  bidirectional stream, one per session per span. The first request opens
                   the session: metadata {model, session_id, max_length, start, end} (msgpack);
                   it may already carry the first hidden states. Every request with a tensor
                   [1, n, H] gets one response with the outputs of block `end - 1` for those
                   n tokens; the server keeps the session's attention cache between requests.
                   A response whose metadata has {"error", "code"} ends the session. Closing
                   the stream frees the session.
    rpc_forward    unary, stateless: metadata {model, start, end}, tensor [B, n, H] -> outputs.
    rpc_info       unary ping: ExpertUID(uid=model) -> msgpack {peer_id, start, end, ...}.

Clients call `BlockServicer.get_stub(p2p, peer_id)`; a server registers its implementation
with `BlockServicer().add_p2p_handlers(p2p, wrapper=handlers)`, so neither imports the
other.
"""

from __future__ import annotations

# hivemind's ServicerBase reads these annotations at runtime and only recognises typing's
# AsyncIterator, not collections.abc's.
from typing import Any, AsyncIterator  # noqa: UP035

from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

__all__ = ["MAX_UNARY_BYTES", "BlockServicer", "error_response", "pack", "unpack"]

# largest request or response of the stateless rpc_forward (hivemind's unary message limit)
MAX_UNARY_BYTES = 4 * 1024 * 1024 - 64 * 1024


def pack(metadata: dict[str, Any]) -> bytes:
    packed: bytes = MSGPackSerializer.dumps(metadata)
    return packed


def unpack(raw: bytes) -> dict[str, Any]:
    """Metadata of a request or response; {} if empty, malformed or not a map."""
    if not raw:
        return {}
    try:
        value = MSGPackSerializer.loads(raw)
    except Exception:  # msgpack raises several unrelated types for garbage
        return {}
    return value if isinstance(value, dict) else {}


def error_response(code: str, message: str) -> runtime_pb2.ExpertResponse:
    """A response that refuses a request: `code` says why ("busy", "idle", "bad_request",
    "closing"), `message` says what to do."""
    return runtime_pb2.ExpertResponse(metadata=pack({"error": message, "code": code}))


# hivemind is untyped: ServicerBase is Any to mypy, and subclassing Any is an error in strict
class BlockServicer(ServicerBase):  # type: ignore[misc]
    """The RPC interface of a block server: names, protobuf types, streaming or not.

    hivemind derives handler names (`BlockServicer.rpc_*`) and the client stub from these
    signatures; the bodies never run (the server's handlers are passed as `wrapper`).
    """

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError

    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_info(
        self, request: runtime_pb2.ExpertUID, context: P2PContext
    ) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError
