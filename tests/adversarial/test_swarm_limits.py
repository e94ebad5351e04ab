"""Finding 10, swarm resource exhaustion: "any peer can reserve a server's whole attention cache
and keep it with empty requests; idle streams are unbounded; stream frames have no size cap
before the shape check."

A real block server (hivemind DHT and P2P on 127.0.0.1, a 256-token attention cache, sessions
idle for 2 s closed) faces an attacker peer driving `rpc_inference` streams by hand, down to
raw frames; an honest swarm client from another peer must still be served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from worker.llm.swarm.routing import SwarmClient, SwarmClientConfig
from worker.llm.swarm.server import BlockServer, BlockServerConfig
from worker.llm.swarm.session import InferenceSession
from worker.llm.swarm.wire import BlockServicer, pack, unpack

pytestmark = pytest.mark.slow

CACHE_TOKENS = 256
IDLE_SECONDS = 2.0
# the defaults the server is started with below: half the cache and 8 streams per peer
PEER_SHARE_TOKENS = CACHE_TOKENS // 2
STREAMS_PER_PEER = 8


@pytest.fixture
async def target(tiny_models: Path) -> AsyncIterator[BlockServer]:
    config = BlockServerConfig(
        model_dir=tiny_models / "llm",
        model_name="llm",
        blocks=(0, 4),
        cache_tokens=CACHE_TOKENS,
        session_idle_timeout=IDLE_SECONDS,
    )
    server = await BlockServer.create(config)
    try:
        yield server
    finally:
        await server.aclose()


async def _client(target: BlockServer) -> SwarmClient:
    maddr = (await target.visible_maddrs())[0]
    config = SwarmClientConfig(
        model_name="llm", initial_peers=(maddr,), num_blocks=4, retry_budget=2.0
    )
    return await SwarmClient.create(config)


@pytest.fixture
async def attacker(target: BlockServer) -> AsyncIterator[SwarmClient]:
    swarm = await _client(target)
    try:
        yield swarm
    finally:
        await swarm.aclose()


@pytest.fixture
async def honest(target: BlockServer) -> AsyncIterator[SwarmClient]:
    swarm = await _client(target)
    try:
        yield swarm
    finally:
        await swarm.aclose()


class _Stream:
    """An rpc_inference stream the attacker drives by hand."""

    def __init__(self, attacker: SwarmClient, server: BlockServer) -> None:
        self._stub = BlockServicer.get_stub(attacker.p2p, PeerID.from_base58(server.peer_id))
        self._queue: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._responses: Any = None

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._queue.get()) is not None:
            yield request

    async def open(self, max_length: int, session: str) -> dict[str, Any]:
        """Open a session (no hidden states): the server's answer's metadata (it names the
        session's max_length: such a request may grow it, worker.llm.swarm.server)."""
        self._responses = await self._stub.rpc_inference(self._requests())
        opening = {"model": "llm", "session_id": session, "max_length": max_length}
        return await self.send(metadata=opening)

    async def send(
        self, metadata: dict[str, Any] | None = None, hidden: torch.Tensor | None = None
    ) -> dict[str, Any]:
        request = runtime_pb2.ExpertRequest(metadata=pack(metadata) if metadata else b"")
        if hidden is not None:
            request.tensors.append(serialize_torch_tensor(hidden))
        self._queue.put_nowait(request)
        async with asyncio.timeout(10):
            return unpack((await anext(self._responses)).metadata)

    def close(self) -> None:
        self._queue.put_nowait(None)


@pytest.fixture
def streams(target: BlockServer, attacker: SwarmClient) -> Iterator[Callable[[], _Stream]]:
    """Opens the attacker's streams to the target; closes them all at the end."""
    opened: list[_Stream] = []

    def new() -> _Stream:
        opened.append(_Stream(attacker, target))
        return opened[-1]

    yield new
    for stream in opened:
        stream.close()


async def _served(honest: SwarmClient) -> None:
    """The honest peer gets a session and its hidden states through the server."""
    async with InferenceSession(honest, max_length=64) as session:
        output = await session.step(torch.randn(1, 5, 64))
    assert output.shape == (1, 5, 64)


async def test_a_peer_cannot_reserve_the_whole_cache(
    streams: Callable[[], _Stream], honest: SwarmClient
) -> None:
    whole = streams()
    refused = await whole.open(CACHE_TOKENS, "whole")
    assert refused.get("code") == "busy", refused
    assert f"at most {PEER_SHARE_TOKENS} of {CACHE_TOKENS} tokens per peer" in refused["error"]

    share = streams()
    assert await share.open(PEER_SHARE_TOKENS, "share") == {"max_length": PEER_SHARE_TOKENS}
    more = streams()
    refused = await more.open(1, "one more")
    assert refused.get("code") == "busy", refused
    assert f"holds {PEER_SHARE_TOKENS} of" in refused["error"]

    await _served(honest)


async def test_empty_requests_do_not_keep_a_session_alive(
    target: BlockServer, streams: Callable[[], _Stream]
) -> None:
    stream = streams()
    assert await stream.open(100, "squat") == {"max_length": 100}
    assert target.free_cache_tokens == CACHE_TOKENS - 100
    async with asyncio.timeout(IDLE_SECONDS * 4):
        while True:
            answer = await stream.send()
            if "code" in answer:  # (an empty request's answer names the max_length)
                break
            await asyncio.sleep(IDLE_SECONDS / 5)  # keep-alives, well inside the timeout
    assert answer.get("code") == "idle", answer
    assert target.free_cache_tokens == CACHE_TOKENS


async def test_a_peer_cannot_open_unbounded_streams(
    streams: Callable[[], _Stream], honest: SwarmClient
) -> None:
    for index in range(STREAMS_PER_PEER):
        assert await streams().open(1, f"s{index}") == {"max_length": 1}
    refused = await streams().open(1, "one too many")
    assert refused.get("code") == "busy", refused
    assert f"{STREAMS_PER_PEER} streams" in refused["error"]
    await _served(honest)


async def test_an_oversized_frame_or_a_rollback_outside_the_session_is_refused(
    target: BlockServer,
    attacker: SwarmClient,
    streams: Callable[[], _Stream],
    honest: SwarmClient,
) -> None:
    # a raw frame announcing 1 GiB, of which a few bytes are sent: refused on its header
    handle = "BlockServicer.rpc_inference"
    _, reader, writer = await attacker.p2p.call_binary_stream_handler(
        PeerID.from_base58(target.peer_id), handle
    )
    writer.write(P2P.MESSAGE_MARKER + (1 << 30).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    writer.write(b"\0" * 1024)
    await writer.drain()
    async with asyncio.timeout(10):
        response, _ = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
    writer.close()
    refused = unpack(response.metadata)
    assert refused.get("code") == "too_large", refused
    assert str(1 << 30) in refused["error"]

    # hidden states for 100 tokens in a 16-token session: too large, whatever they contain
    stream = streams()
    assert await stream.open(16, "small") == {"max_length": 16}
    refused = await stream.send(hidden=torch.zeros(1, 100, 64))
    assert refused.get("code") == "too_large", refused

    await _rollbacks_outside_the_session_are_refused(streams)
    await _served(honest)


async def _rollbacks_outside_the_session_are_refused(streams: Callable[[], _Stream]) -> None:
    """start_position (worker.llm.swarm.wire) cuts a session back; one beyond what it
    holds, not a whole number, or leaving more than max_length tokens ends the stream."""
    stream = streams()
    assert await stream.open(16, "cut") == {"max_length": 16}
    assert await stream.send(hidden=torch.zeros(1, 4, 64)) == {}
    assert await stream.send({"start_position": 2}) == {"position": 2}  # a cut alone
    assert await stream.send({"start_position": 1}, torch.zeros(1, 15, 64)) == {"position": 16}
    for cut, tokens, wrong in (
        (17, 1, "start_position must be a whole number from 0 to the session's 16 tokens"),
        (True, 1, "got True"),
        (3, 14, "3 + 14 tokens exceed the session's max_length 16"),
    ):
        stream = streams()
        assert await stream.open(16, f"cut-{cut}-{tokens}") == {"max_length": 16}
        await stream.send(hidden=torch.zeros(1, 16, 64))
        refused = await stream.send({"start_position": cut}, torch.zeros(1, tokens, 64))
        assert refused.get("code") == "bad_request" and wrong in refused["error"], refused
