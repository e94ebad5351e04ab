"""Inference sessions: tokens stepped through a route of block servers that keep caches.

An `InferenceSession` keeps one open stream per hop of its route, and the inputs it sent to
each hop. When a server fails mid-generation (stream error, timeout, killed process, error
response), the session bans it for a while, plans a replacement for that hop's blocks
(possibly split over several servers, with `worker.llm.swarm.routing`), replays the
recorded inputs chunk by chunk to the replacement (same chunks, so the same kernels and a
bit-identical cache), and carries on: the outputs are the same as without the failure.
Retrying is bounded by `retry_budget`; when no server covers some blocks, `MissingBlocks`
names them.

A session also keeps what each hop was given and answered (`served`), so that
`worker.llm.swarm.checks` can recompute some of it on other servers; a session opened with
`avoid` routes around the servers it names. `extend` asks the servers for room for more
tokens (a kept conversation's next turn, `worker.llm.gateway.kept`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from worker.errors import MissingBlocks, ServerFailed, SwarmStepFailed
from worker.llm.swarm.placement import Hop
from worker.llm.swarm.routing import SwarmClient, output_of
from worker.llm.swarm.wire import BlockServicer, pack, unpack

__all__ = ["HopStates", "InferenceSession", "SpanUsage"]

log = logging.getLogger(__name__)

# seconds a server that said "busy" (no room in its cache) is left out before trying again
BUSY_BACKOFF = 1.0


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
        """The next response's hidden states; ServerFailed if the server fails or vanishes."""
        return output_of(self.hop.peer_id, await self.response())

    async def response(self) -> runtime_pb2.ExpertResponse:
        """The next response; ServerFailed if the server fails or vanishes.

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
        return response

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
    """Generation state across the swarm: `async with InferenceSession(client, max_length)`,
    then `await step(hidden)` with the new tokens' states. It never routes through the
    peers in `avoid`."""

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
        route = await self.client.route_until(0, None, deadline, self.avoid)
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

    async def extend(self, max_length: int) -> bool:
        """Ask every server of the route for room up to `max_length` tokens (a kept
        conversation's next turn; it also tells whether they still hold the session). False
        if one has no room or dropped the session: then open a new session."""
        if self._closed or self._failed is not None:
            return False
        request = runtime_pb2.ExpertRequest(metadata=pack({"max_length": max_length}))
        for state in self._hops:
            if state.stream is None:
                return False
            state.stream.send(request)
            try:
                answer = unpack((await state.stream.response()).metadata)
            except ServerFailed as exc:
                log.info("a kept session cannot grow on %s: %s", state.hop.peer_id, exc)
                return False
            room = answer.get("max_length")
            if not isinstance(room, int) or room < max_length:
                return False
        self.max_length = max(self.max_length, max_length)
        return True

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
            raise RuntimeError("use the session inside `async with InferenceSession(client, ...)`")
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
                route = await self.client.route_until(start, end, deadline, self.avoid)
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
