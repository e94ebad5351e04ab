"""The block server's RPC interface and message framing, shared by server and client.

Wire protocol (on the server's libp2p peer, handlers named `BlockServicer.rpc_*`):

    rpc_inference  bidirectional stream, one per session per span. The first request opens
                   the session: metadata {model, session_id, max_length, start, end} (msgpack);
                   it may already carry the first hidden states. Every request with a tensor
                   [1, n, H] gets one response with the outputs of block `end - 1` for those
                   n tokens; the server keeps the session's attention cache between requests.
                   A response whose metadata has {"error", "code"} ends the session. Closing
                   the stream frees the session.
                   Rollback: any request may carry {"start_position": N} in its metadata,
                   0 <= N <= the tokens the session holds: the session's cache is cut to its
                   first N tokens, and the request's hidden states (if any) are positions
                   N, N+1, ... (N + n <= max_length). The answer then carries
                   {"position": N + n}, so a client can tell a server that ignored the field.
                   A request with start_position and no tensor only cuts (empty answer).
                   Speculative decoding drops rejected draft tokens with it; a new turn of
                   a conversation can cut back to the common prefix.
                   Frames are hivemind's (a marker byte, an 8-byte length, the protobuf);
                   the server reads them itself (`read_request`) so that it can refuse a
                   frame longer than `frame_limit` on its length alone, before reading it.
    rpc_forward    unary, stateless: metadata {model, start, end}, tensor [B, n, H] -> outputs.
    rpc_info       unary ping: ExpertUID(uid=model) -> msgpack {peer_id, start, end, ...}.

Clients call `BlockServicer.get_stub(p2p, peer_id)`; a server registers its handlers under
`handle_name(method)` (rpc_inference as a raw stream handler), so neither imports the other.
"""

from __future__ import annotations

# hivemind's ServicerBase reads these annotations at runtime and only recognises typing's
# AsyncIterator, not collections.abc's.
import asyncio
from typing import Any, AsyncIterator  # noqa: UP035

from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

__all__ = [
    "MAX_UNARY_BYTES",
    "BadFrame",
    "BlockServicer",
    "FrameTooLarge",
    "error_response",
    "frame_limit",
    "handle_name",
    "pack",
    "read_request",
    "unpack",
    "write_response",
]

# largest request or response of the stateless rpc_forward (hivemind's unary message limit)
MAX_UNARY_BYTES = 4 * 1024 * 1024 - 64 * 1024
# hidden states travel as float32 or narrower
BYTES_PER_VALUE = 4
# a frame's metadata and protobuf fields besides the hidden states' bytes
FRAME_OVERHEAD = 4096


def frame_limit(tokens: int, hidden_size: int) -> int:
    """The longest rpc_inference frame that may carry hidden states of `tokens` tokens."""
    return tokens * hidden_size * BYTES_PER_VALUE + FRAME_OVERHEAD


class FrameTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a frame of {size} bytes is longer than the {limit} allowed")
        self.size = size
        self.limit = limit


class BadFrame(Exception):
    """Bytes on an rpc_inference stream that are not a request frame."""


async def read_request(
    reader: asyncio.StreamReader, limit: int
) -> runtime_pb2.ExpertRequest | None:
    """The next request of an rpc_inference stream; None when the caller ends the stream.

    FrameTooLarge as soon as the length says more than `limit` bytes (the body is not read);
    BadFrame for anything else that is not a request; IncompleteReadError if the caller
    hangs up mid-frame.
    """
    try:
        marker = await reader.readexactly(1)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None  # hung up between frames
    size = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if marker == P2P.ERROR_MARKER:
        return None  # hivemind's end of stream (a caller sends no other errors)
    if marker != P2P.MESSAGE_MARKER:
        raise BadFrame(f"unknown frame marker {marker!r}")
    if size > limit:
        raise FrameTooLarge(size, limit)
    body = await reader.readexactly(size)
    try:
        return runtime_pb2.ExpertRequest.FromString(body)
    except Exception as exc:  # protobuf's DecodeError (its type stubs are not installed)
        raise BadFrame(f"not an ExpertRequest: {exc}") from exc


async def write_response(
    writer: asyncio.StreamWriter, response: runtime_pb2.ExpertResponse
) -> None:
    await P2P.send_protobuf(response, writer)


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
    "too_large", "failed", "closing"), `message` says what to do."""
    return runtime_pb2.ExpertResponse(metadata=pack({"error": message, "code": code}))


def handle_name(method: str) -> str:
    """The P2P protocol name of one of `BlockServicer`'s handlers (as hivemind names them)."""
    return f"{BlockServicer.__name__}.{method}"


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
