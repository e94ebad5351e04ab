"""Per-peer limits of a block server and its frame reader, without a swarm."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from worker.llm.swarm.limits import PeerLimits, Refused
from worker.llm.swarm.wire import BadFrame, FrameTooLarge, frame_limit, pack, read_request


def test_a_peer_holds_at_most_its_share_and_all_peers_at_most_the_cache() -> None:
    limits = PeerLimits(cache_tokens=256, peer_share=0.5, max_streams=2)
    assert limits.peer_quota == 128
    limits.reserve("a", 100)
    with pytest.raises(Refused, match=r"holds 100 of at most 128 of 256 tokens per peer") as no:
        limits.reserve("a", 29)
    assert no.value.code == "busy"
    limits.reserve("a", 28)
    assert limits.room_for("a") == 0
    limits.reserve("b", 100)
    # b is within its share, but the cache is not big enough for both
    with pytest.raises(Refused, match=r"does not fit .*\(28 of 256 tokens\)"):
        limits.reserve("c", 29)
    assert limits.room_for("c") == 28
    limits.release("a", 128)
    assert (limits.free_tokens, limits.room_for("a")) == (156, 128)
    limits.release("b", 100)
    assert limits.free_tokens == 256


def test_a_peer_has_at_most_max_streams_open() -> None:
    limits = PeerLimits(cache_tokens=16, peer_share=1.0, max_streams=2)
    limits.open_stream("a")
    limits.open_stream("a")
    with pytest.raises(Refused, match="has 2 streams open here"):
        limits.open_stream("a")
    limits.open_stream("b")
    limits.close_stream("a")
    limits.open_stream("a")
    assert (limits.streams_of("a"), limits.streams_of("b")) == (2, 1)


@pytest.mark.parametrize(
    ("cache_tokens", "share", "streams", "error"),
    [
        (0, 0.5, 1, "cache_tokens must be at least 1"),
        (16, 0.0, 1, r"peer_share must be within \(0, 1\]"),
        (16, 1.5, 1, r"peer_share must be within \(0, 1\]"),
        (16, 0.5, 0, "max_streams must be at least 1"),
    ],
)
def test_impossible_limits_are_refused(
    cache_tokens: int, share: float, streams: int, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        PeerLimits(cache_tokens, share, streams)


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _frame(marker: bytes, body: bytes) -> bytes:
    return marker + len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body


async def test_frames_are_read_and_an_oversized_one_refused_on_its_length() -> None:
    request = runtime_pb2.ExpertRequest(metadata=pack({"model": "llm"}))
    body = request.SerializeToString()
    assert await read_request(_reader(_frame(P2P.MESSAGE_MARKER, body)), 100) == request
    # the end of the stream: hivemind's end marker, or a hang-up between frames
    assert await read_request(_reader(_frame(P2P.ERROR_MARKER, b"")), 100) is None
    assert await read_request(_reader(b""), 100) is None
    # only the header of the big frame is there: refused without waiting for its body
    header = P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
    with pytest.raises(FrameTooLarge, match=f"a frame of {1 << 40} bytes .* the 100 allowed"):
        await read_request(_reader(header), 100)
    with pytest.raises(BadFrame, match="unknown frame marker"):
        await read_request(_reader(_frame(b"\x07", body)), 100)
    with pytest.raises(BadFrame, match="not an ExpertRequest"):
        await read_request(_reader(_frame(P2P.MESSAGE_MARKER, b"\xff" * 8)), 100)
    with pytest.raises(asyncio.IncompleteReadError):
        await read_request(_reader(_frame(P2P.MESSAGE_MARKER, body)[:-1]), 100)


def test_the_frame_limit_fits_an_opening_request_with_float32_hidden_states() -> None:
    opening = {"model": "m" * 64, "session_id": "x" * 128, "max_length": 8, "start": 0, "end": 9}
    request = runtime_pb2.ExpertRequest(
        metadata=pack(opening), tensors=[serialize_torch_tensor(torch.zeros(1, 8, 64))]
    )
    assert request.ByteSize() <= frame_limit(8, 64)
