"""The swarm client: routes hidden states through a chain of block servers.

`SwarmClient` joins the DHT as a client, reads the servers' signed announcements, and plans
routes: chains of servers covering the model's blocks, chosen for the least estimated time
per token (measured round trip to each server + its announced compute time + a fixed cost
per hop, so fewer hops win ties). Round trips are measured once per server with a cheap
`rpc_info` call and cached.

An `InferenceSession` keeps one open stream per hop of its route, and the inputs it sent to
each hop. When a server fails mid-generation (stream error, timeout, killed process, error
response), the session bans it for a while, plans a replacement for that hop's blocks
(possibly split over several servers), replays the recorded inputs chunk by chunk to the
replacement (same chunks, so the same kernels and a bit-identical cache), and carries on:
the outputs are the same as without the failure. Retrying is bounded by `retry_budget`;
when no server covers some blocks, `MissingBlocks` names them.

A session also keeps what each hop was given and answered (`served`), so that
`worker.llm.swarm.checks` can recompute some of it on other servers; a session opened with
`avoid` routes around the servers it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import torch
from hivemind import DHT
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from worker.errors import MissingBlocks, ServerFailed, SwarmStepFailed
from worker.llm.swarm.dht import start_dht, stop_dht
from worker.llm.swarm.placement import Hop, fastest_chain, uncovered
from worker.llm.swarm.records import ServerRecord, ServerState, read_records
from worker.llm.swarm.wire import MAX_UNARY_BYTES, BlockServicer, pack, unpack

__all__ = ["HopStates", "InferenceSession", "SpanUsage", "SwarmClient", "SwarmClientConfig"]

log = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

# seconds a server that said "busy" (no room in its cache) is left out before trying again
BUSY_BACKOFF = 1.0


@dataclass(frozen=True)
class SwarmClientConfig:
    # the model's name in the swarm
    model_name: str
    # multiaddrs of swarm peers (e.g. a block server's printed address)
    initial_peers: tuple[str, ...]
    # blocks in the model; None = learn it from the announcements
    num_blocks: int | None = None
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    # UPnP / NAT-PMP port mapping; off for local setups
    nat_port_map: bool = False
    # seconds one server may take to answer one request before it counts as failed
    step_timeout: float = 30.0
    # while an answer is slower than this, ping the server (a vanished one fails the ping)
    probe_after: float = 1.0
    # seconds a step may spend finding and replaying to replacement servers
    retry_budget: float = 10.0
    # seconds a failed server is left out of routes
    ban_seconds: float = 30.0
    # announcements younger than this are reused when planning a route
    records_max_age: float = 5.0
    # measured round trips are reused for this long
    ping_max_age: float = 60.0
    # a server that does not answer a ping within this is left out
    ping_timeout: float = 3.0
    # fixed cost per hop (seconds) in route planning: prefer fewer servers
    hop_penalty: float = 0.002
    # seconds to wait for the DHT daemon to start
    startup_timeout: float = 60.0


@dataclass(frozen=True)
class SpanUsage:
    """Tokens one server processed for blocks [start, end) of one session (replays count)."""

    peer_id: str
    start: int
    end: int
    tokens: int


@dataclass(frozen=True)
class HopStates:
    """What one server of a session was given and answered, from the session's first token:
    `inputs` and `outputs` are [1, n, H] hidden states of positions 0..n-1."""

    hop: Hop
    inputs: torch.Tensor
    outputs: torch.Tensor


class SwarmClient:
    """A DHT client of one model's swarm; open `session()`s to run hidden states through it."""

    def __init__(self, config: SwarmClientConfig, dht: DHT, p2p: P2P) -> None:
        self.config = config
        self.dht = dht
        self.p2p = p2p
        self._records: list[ServerRecord] = []
        self._records_at = float("-inf")
        self._records_lock = asyncio.Lock()
        self._rtt: dict[str, tuple[float, float]] = {}  # peer -> (seconds, measured at)
        self._banned: dict[str, float] = {}  # peer -> banned until (monotonic)
        self.num_blocks: int = config.num_blocks or 0
        self.hidden_size: int | None = None

    @classmethod
    async def create(cls, config: SwarmClientConfig) -> SwarmClient:
        dht = await start_dht(
            initial_peers=config.initial_peers,
            host_maddrs=config.host_maddrs,
            nat_port_map=config.nat_port_map,
            client_mode=True,
            validator=RSASignatureValidator(),
            startup_timeout=config.startup_timeout,
        )
        try:
            p2p = await dht.replicate_p2p()
            client = cls(config, dht, p2p)
            await client.records(refresh=True)
        except BaseException:
            await stop_dht(dht)
            raise
        return client

    async def aclose(self) -> None:
        await self.p2p.shutdown()
        await stop_dht(self.dht)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- announcements and routes ---------------------------------------------------------

    async def records(self, refresh: bool = False) -> list[ServerRecord]:
        """The model's valid announcements (cached for `records_max_age` seconds)."""
        async with self._records_lock:
            age = time.monotonic() - self._records_at
            if refresh or age > self.config.records_max_age:
                records = await read_records(
                    self.dht, self.config.model_name, self.config.num_blocks
                )
                self._learn_model(records)
                self._records = [r for r in records if r.num_blocks == self.num_blocks]
                self._records_at = time.monotonic()
            return self._records

    def _learn_model(self, records: list[ServerRecord]) -> None:
        if not records:
            return
        if not self.num_blocks:
            self.num_blocks = Counter(r.num_blocks for r in records).most_common(1)[0][0]
        sizes = Counter(r.hidden_size for r in records if r.num_blocks == self.num_blocks)
        if sizes:
            self.hidden_size = sizes.most_common(1)[0][0]

    def ban(self, peer_id: str, seconds: float | None = None) -> None:
        """Leave `peer_id` out of new routes for a while."""
        seconds = self.config.ban_seconds if seconds is None else seconds
        self._banned[peer_id] = time.monotonic() + seconds
        self._rtt.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        until = self._banned.get(peer_id)
        if until is None:
            return False
        if until < time.monotonic():
            del self._banned[peer_id]
            return False
        return True

    async def info(self, peer_id: str) -> dict[str, Any]:
        """A server's live state: {model, peer_id, start, end, num_blocks, throughput,
        cache_tokens (free now)}. ServerFailed if it does not answer."""
        stub = BlockServicer.get_stub(self.p2p, PeerID.from_base58(peer_id))
        began = time.perf_counter()
        try:
            reply = await stub.rpc_info(
                runtime_pb2.ExpertUID(uid=self.config.model_name),
                timeout=self.config.ping_timeout,
            )
        except Exception as exc:
            raise ServerFailed(peer_id, f"does not answer: {exc!r}") from exc
        rtt = time.perf_counter() - began
        info = unpack(reply.serialized_info)
        if info.get("model") != self.config.model_name:
            raise ServerFailed(peer_id, f"serves {info.get('model')!r}", code="bad_request")
        self._rtt[peer_id] = (rtt, time.monotonic())
        return info

    async def ping(self, peer_id: str) -> float:
        """Round-trip seconds to `peer_id` (cached); ServerFailed if it does not answer."""
        cached = self._rtt.get(peer_id)
        if cached is None or time.monotonic() - cached[1] >= self.config.ping_max_age:
            await self.info(peer_id)
            cached = self._rtt[peer_id]
        return cached[0]

    async def route(
        self, start: int = 0, end: int | None = None, avoid: frozenset[str] = frozenset()
    ) -> list[Hop]:
        """The fastest chain of reachable servers for blocks [start, end) (default: all),
        leaving out the peers in `avoid`.

        MissingBlocks if the reachable, unbanned, online servers leave some blocks uncovered.
        """
        records = await self.records()
        if not self.num_blocks:
            raise MissingBlocks(self.config.model_name, [])
        end = self.num_blocks if end is None else end
        candidates = [
            r
            for r in records
            if r.state == ServerState.ONLINE
            and r.start < end
            and r.end > start
            and not self.is_banned(r.peer_id)
            and r.peer_id not in avoid
        ]
        _raise_if_uncovered(self.config.model_name, candidates, start, end)
        rtts = await asyncio.gather(
            *(self.ping(r.peer_id) for r in candidates), return_exceptions=True
        )
        reachable: list[tuple[ServerRecord, float]] = []
        for record, rtt in zip(candidates, rtts, strict=True):
            if isinstance(rtt, BaseException):
                if not isinstance(rtt, Exception):
                    raise rtt
                log.info("leaving out %s: %s", record.peer_id, rtt)
                self.ban(record.peer_id)
            else:
                reachable.append((record, rtt))
        _raise_if_uncovered(self.config.model_name, [r for r, _ in reachable], start, end)
        return fastest_chain(reachable, start, end, self.config.hop_penalty)

    def session(self, max_length: int, avoid: frozenset[str] = frozenset()) -> InferenceSession:
        """An inference session of up to `max_length` tokens that never routes through the
        peers in `avoid`: `async with` it."""
        return InferenceSession(self, max_length, avoid=avoid)

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """A stateless pass of hidden states [B, n, H] through all blocks (no session)."""
        if hidden.numel() * hidden.element_size() > MAX_UNARY_BYTES:
            raise ValueError(
                f"hidden states of {hidden.numel() * hidden.element_size()} bytes are too large "
                f"for a stateless pass (at most {MAX_UNARY_BYTES}); use a session"
            )
        deadline = time.monotonic() + self.config.retry_budget
        while True:
            hops = await self._route_until(0, None, deadline)
            try:
                output = hidden
                for hop in hops:
                    output = await self.forward_hop(hop, output)
                return output
            except ServerFailed as exc:
                self.ban(exc.peer_id)
                if time.monotonic() > deadline:
                    raise SwarmStepFailed(f"forward failed within the retry budget: {exc}") from exc

    async def forward_hop(self, hop: Hop, hidden: torch.Tensor) -> torch.Tensor:
        """A stateless pass of hidden states [B, n, H] through one server's blocks
        [hop.start, hop.end); ServerFailed if it fails or answers with an error."""
        stub = BlockServicer.get_stub(self.p2p, PeerID.from_base58(hop.peer_id))
        request = runtime_pb2.ExpertRequest(
            tensors=[serialize_torch_tensor(hidden)],
            metadata=pack({"model": self.config.model_name, "start": hop.start, "end": hop.end}),
        )
        try:
            response = await stub.rpc_forward(request, timeout=self.config.step_timeout)
        except Exception as exc:
            raise ServerFailed(hop.peer_id, f"forward failed: {exc!r}") from exc
        return _output_of(hop.peer_id, response)

    async def other_models(self) -> list[str]:
        """The models the initial peers serve, when not this client's (a name mismatch)."""
        names: set[str] = set()
        for maddr in self.config.initial_peers:
            _, found, peer = maddr.rpartition("/p2p/")
            if not found:
                continue
            try:
                stub = BlockServicer.get_stub(self.p2p, PeerID.from_base58(peer))
                reply = await stub.rpc_info(
                    runtime_pb2.ExpertUID(uid=self.config.model_name),
                    timeout=self.config.ping_timeout,
                )
                model = unpack(reply.serialized_info).get("model")
            except Exception as exc:
                log.debug("initial peer %s does not say what it serves: %r", peer, exc)
                continue
            # a peer's words end up in an error message: only plain names, never raw text
            plain = isinstance(model, str) and _PLAIN_NAME.fullmatch(model)
            if plain and model != self.config.model_name:
                names.add(str(model))
        return sorted(names)

    async def _route_until(
        self, start: int, end: int | None, deadline: float, avoid: frozenset[str] = frozenset()
    ) -> list[Hop]:
        """A route, waiting (with backoff) for servers to appear until `deadline`."""
        delay = 0.2
        while True:
            try:
                return await self.route(start, end, avoid)
            except MissingBlocks as missing:
                if time.monotonic() + delay > deadline:
                    if self._records or missing.others:
                        raise
                    # nobody announces this model at all: say what the swarm serves instead
                    others = await self.other_models()
                    if not others:
                        raise
                    raise MissingBlocks(missing.model, missing.ranges, others) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            await self.records(refresh=True)


def _raise_if_uncovered(model: str, records: list[ServerRecord], start: int, end: int) -> None:
    missing = uncovered(records, start, end)
    if missing:
        raise MissingBlocks(model, missing)


def _output_of(peer_id: str, response: runtime_pb2.ExpertResponse) -> torch.Tensor:
    metadata = unpack(response.metadata)
    if "error" in metadata:
        raise ServerFailed(peer_id, str(metadata["error"]), code=str(metadata.get("code")))
    if len(response.tensors) != 1:
        raise ServerFailed(peer_id, "answered without hidden states", code="bad_response")
    output: torch.Tensor = deserialize_torch_tensor(response.tensors[0])
    return output


class _Stream:
    """One open rpc_inference stream to one server: requests in, responses out, in order."""

    def __init__(self, client: SwarmClient, hop: Hop) -> None:
        self.hop = hop
        self._client = client
        self._queue: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._responses: AsyncGenerator[runtime_pb2.ExpertResponse, None] | None = None

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            request = await self._queue.get()
            if request is None:
                return
            yield request

    async def open(self) -> None:
        stub = BlockServicer.get_stub(self._client.p2p, PeerID.from_base58(self.hop.peer_id))
        try:
            async with asyncio.timeout(self._client.config.step_timeout):
                self._responses = await stub.rpc_inference(self._requests())
        except Exception as exc:
            raise ServerFailed(self.hop.peer_id, f"cannot open a stream: {exc!r}") from exc

    def send(self, request: runtime_pb2.ExpertRequest) -> None:
        self._queue.put_nowait(request)

    async def receive(self) -> torch.Tensor:
        """The next response's hidden states; ServerFailed if the server fails or vanishes.

        A server whose machine vanished may never close the connection, so while a response
        is slow the server is probed with a ping: a server that is only busy computing still
        answers it (compute runs off its event loop).
        """
        assert self._responses is not None
        config = self._client.config
        waiter = asyncio.ensure_future(anext(self._responses))
        try:
            async with asyncio.timeout(config.step_timeout):
                while True:
                    done, _ = await asyncio.wait({waiter}, timeout=config.probe_after)
                    if done:
                        break
                    await self._client.info(self.hop.peer_id)
            response = waiter.result()
        except StopAsyncIteration:
            raise ServerFailed(self.hop.peer_id, "closed the stream") from None
        except TimeoutError:
            raise ServerFailed(
                self.hop.peer_id, f"no answer within {config.step_timeout:g}s"
            ) from None
        except ServerFailed:
            raise
        except Exception as exc:
            raise ServerFailed(self.hop.peer_id, f"stream failed: {exc!r}") from exc
        finally:
            if not waiter.done():
                waiter.cancel()
        return _output_of(self.hop.peer_id, response)

    async def aclose(self) -> None:
        self._queue.put_nowait(None)
        if self._responses is not None:
            with contextlib.suppress(Exception):
                await self._responses.aclose()


@dataclass
class _HopState:
    hop: Hop
    stream: _Stream | None = None
    # requests sent so far on the current stream (the first one opens the session)
    sent: int = 0


@dataclass
class InferenceSession:
    """Generation state across the swarm: `await step(hidden)` with the new tokens' states."""

    client: SwarmClient
    max_length: int
    # peers this session never routes through
    avoid: frozenset[str] = frozenset()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # tokens processed so far
    position: int = 0
    _hops: list[_HopState] = field(default_factory=list)
    # inputs sent to each block boundary of the route, one tensor per step (for replays)
    _history: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _usage: dict[Hop, int] = field(default_factory=dict)
    # per hop, the inputs it was given and the outputs it answered, step by step
    _served: dict[Hop, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)
    _closed: bool = False
    _streams_opened: int = 0
    # why a step failed: the session cannot continue after that
    _failed: BaseException | None = None

    async def __aenter__(self) -> Self:
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        deadline = time.monotonic() + self.client.config.retry_budget
        route = await self.client._route_until(0, None, deadline, self.avoid)
        self._hops = [_HopState(hop) for hop in route]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for state in self._hops:
            if state.stream is not None:
                await state.stream.aclose()
                state.stream = None

    @property
    def route(self) -> list[Hop]:
        return [state.hop for state in self._hops]

    @property
    def usage(self) -> list[SpanUsage]:
        """Tokens each server processed for this session, replays included."""
        return [
            SpanUsage(hop.peer_id, hop.start, hop.end, tokens)
            for hop, tokens in self._usage.items()
        ]

    @property
    def served(self) -> list[HopStates]:
        """What each server was given and answered (replays included), from position 0."""
        return [
            HopStates(hop, torch.cat(inputs, dim=1), torch.cat(outputs, dim=1))
            for hop, (inputs, outputs) in self._served.items()
            if inputs
        ]

    def _record(self, hop: Hop, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        given, answered = self._served.setdefault(hop, ([], []))
        given.extend(inputs)
        answered.extend(outputs)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [1, n, H] of the next n tokens -> last block's outputs [1, n, H].

        The outputs are before the model's final norm.
        """
        if self._closed or not self._hops:
            raise RuntimeError("use the session inside `async with client.session(...)`")
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1:
            raise ValueError(f"expected hidden states [1, n, H], got {tuple(hidden.shape)}")
        if self.client.hidden_size is not None and hidden.shape[2] != self.client.hidden_size:
            raise ValueError(
                f"expected hidden size {self.client.hidden_size}, got {hidden.shape[2]}"
            )
        new = hidden.shape[1]
        if self.position + new > self.max_length:
            raise ValueError(
                f"{self.position} + {new} tokens exceed the session's max_length {self.max_length}"
            )
        if self._failed is not None:
            raise SwarmStepFailed(
                f"this session failed earlier ({self._failed}); open a new one"
            ) from self._failed
        try:
            output = await self._step(hidden.detach().cpu().contiguous())
        except BaseException as exc:
            # some servers may have run this step and others not: the caches disagree now
            self._failed = exc
            raise
        self.position += new
        return output

    async def _step(self, x: torch.Tensor) -> torch.Tensor:
        new = x.shape[1]
        # the retry budget starts at the first failure, however long detecting it took
        deadline: float | None = None
        index = 0
        while index < len(self._hops):
            state = self._hops[index]
            try:
                y = await self._call(state, x)
            except ServerFailed as exc:
                if deadline is None:
                    deadline = time.monotonic() + self.client.config.retry_budget
                await self._replace(index, exc, deadline)
                continue
            self._history.setdefault(state.hop.start, []).append(x)
            self._count(state.hop, new)
            self._record(state.hop, [x], [y])
            x = y
            index += 1
        return x

    def _request(self, state: _HopState, x: torch.Tensor) -> runtime_pb2.ExpertRequest:
        request = runtime_pb2.ExpertRequest(tensors=[serialize_torch_tensor(x)])
        if state.sent == 0:
            request.metadata = pack(
                {
                    "model": self.client.config.model_name,
                    "session_id": f"{self.id}.{self._streams_opened}",
                    "max_length": self.max_length,
                    "start": state.hop.start,
                    "end": state.hop.end,
                }
            )
        state.sent += 1
        return request

    async def _ensure_stream(self, state: _HopState) -> _Stream:
        if state.stream is None:
            stream = _Stream(self.client, state.hop)
            await stream.open()
            state.stream = stream
            state.sent = 0
            self._streams_opened += 1
        return state.stream

    async def _call(self, state: _HopState, x: torch.Tensor) -> torch.Tensor:
        stream = await self._ensure_stream(state)
        stream.send(self._request(state, x))
        return await stream.receive()

    def _count(self, hop: Hop, tokens: int) -> None:
        self._usage[hop] = self._usage.get(hop, 0) + tokens

    async def _replace(self, index: int, failure: ServerFailed, deadline: float) -> None:
        """Swap hop `index` for a working chain over the same blocks, replaying its history."""
        budget = self.client.config.retry_budget
        failed = self._hops[index]
        if failed.stream is not None:
            await failed.stream.aclose()
            failed.stream = None
        start, end = failed.hop.start, failed.hop.end
        while True:
            log.info("replacing the server of blocks %d:%d: %s", start, end, failure)
            if failure.code == "busy":
                # full for now, not broken: try it again soon
                self.client.ban(failure.peer_id, min(BUSY_BACKOFF, self.client.config.ban_seconds))
            elif failure.code != "idle":
                # ("idle": the server only closed our idle session; going back to it is fine)
                self.client.ban(failure.peer_id)
            if time.monotonic() > deadline:
                raise SwarmStepFailed(
                    f"blocks {start}:{end} kept failing for {budget:g}s; last error: {failure}"
                ) from failure
            try:
                route = await self.client._route_until(start, end, deadline, self.avoid)
            except MissingBlocks as missing:
                if failure.code == "busy":
                    raise SwarmStepFailed(
                        f"no server of blocks {start}:{end} has room for this session; "
                        f"last answer: {failure}"
                    ) from missing
                raise
            states = [_HopState(hop) for hop in route]
            try:
                await self._replay(states)
            except ServerFailed as exc:
                for state in states:
                    if state.stream is not None:
                        await state.stream.aclose()
                failure = exc
                continue
            self._hops[index : index + 1] = states
            needed = {state.hop.start for state in self._hops}
            for boundary in list(self._history):
                if boundary not in needed:
                    del self._history[boundary]
            return

    async def _replay(self, states: list[_HopState]) -> None:
        """Rebuild the new hops' caches: send each the recorded inputs, chunk by chunk."""
        chunks = self._history.get(states[0].hop.start, [])
        for position, state in enumerate(states):
            if not chunks:
                return
            stream = await self._ensure_stream(state)
            for chunk in chunks:  # pipelined: all requests first, then all answers
                stream.send(self._request(state, chunk))
            outputs = [await stream.receive() for _ in chunks]
            self._count(state.hop, sum(chunk.shape[1] for chunk in chunks))
            # a replay starts from position 0: it replaces what this hop answered before
            self._served[state.hop] = (list(chunks), outputs)
            if position + 1 < len(states):
                self._history[state.hop.end] = chunks = outputs
