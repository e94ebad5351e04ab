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
`avoid` routes around the servers it names.

Rollback: `step(hidden, start_position=N)` first cuts the session back to its first N
tokens (speculative decoding drops rejected drafts so; a new turn can cut back to a common
prefix). Each server gets `start_position` with the step (`worker.llm.swarm.wire`) and must
answer the position it reached. What the session recorded is kept as steps with their
start positions: `served` overlays them (a later step replaces the positions it covers), so
a spot check sees exactly what the kept positions were answered, and a replay sends the
same steps with the same start positions (same chunks, same kernels, the same cache).

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


@dataclass(frozen=True)
class _Sent:
    """One step to one hop: its inputs [1, n, H] for positions start..start+n-1 and (once
    answered) the outputs."""

    start: int
    inputs: torch.Tensor
    outputs: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.start + self.inputs.shape[1]


def _overlay(steps: list[_Sent], length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inputs and outputs of positions 0..length-1 from steps in order, each replacing the
    positions it covers (None if they cover none)."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    held = 0
    for sent in steps:
        assert sent.outputs is not None
        inputs, outputs = _cut(inputs, held, sent.start), _cut(outputs, held, sent.start)
        inputs.append(sent.inputs)
        outputs.append(sent.outputs)
        held = sent.end
    inputs, outputs = _cut(inputs, held, length), _cut(outputs, held, length)
    if not inputs:
        return None
    return torch.cat(inputs, dim=1), torch.cat(outputs, dim=1)


def _cut(chunks: list[torch.Tensor], held: int, length: int) -> list[torch.Tensor]:
    """`chunks` (holding `held` positions along dim 1) cut to their first `length`."""
    while chunks and held > length:
        last = chunks[-1]
        size = last.shape[1]
        if held - size >= length:
            chunks = chunks[:-1]
            held -= size
        else:
            chunks = [*chunks[:-1], last[:, : size - (held - length)]]
            held = length
    return chunks


class _Stream:
    """One open rpc_inference stream to one server: requests in, responses out, in order."""

    def __init__(self, client: SwarmClient, hop: Hop) -> None:
        self.hop = hop
        self._client = client
        self._queue: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._responses: AsyncGenerator[runtime_pb2.ExpertResponse, None] | None = None
        # the metadata of the last response received
        self.metadata: dict[str, object] = {}

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
        self.metadata = unpack(response.metadata)
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
    # tokens the server holds for the current stream, as far as our requests say
    held: int = 0


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
    # inputs sent to each block boundary of the route, step by step (for replays)
    _history: dict[int, list[_Sent]] = field(default_factory=dict)
    _usage: dict[Hop, int] = field(default_factory=dict)
    # per hop, the inputs it was given and the outputs it answered, step by step
    _served: dict[Hop, list[_Sent]] = field(default_factory=dict)
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
        """What each server was given and answered (replays included) for the positions the
        session holds, from position 0 (rolled-back positions left out)."""
        states = []
        for hop, steps in self._served.items():
            overlaid = _overlay(steps, self.position)
            if overlaid is not None:
                states.append(HopStates(hop, *overlaid))
        return states

    async def step(self, hidden: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
        """Hidden states [1, n, H] of the next n tokens -> last block's outputs [1, n, H].

        The outputs are before the model's final norm. `start_position` N (at most
        `position`) rolls the session back to its first N tokens first: these n tokens are
        positions N.. (default: `position`, nothing rolled back).
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
        start = self.position if start_position is None else start_position
        if not 0 <= start <= self.position:
            raise ValueError(
                f"start_position {start_position} is outside the session's {self.position} tokens"
            )
        if start + new > self.max_length:
            raise ValueError(
                f"{start} + {new} tokens exceed the session's max_length {self.max_length}"
            )
        if self._failed is not None:
            raise SwarmStepFailed(
                f"this session failed earlier ({self._failed}); open a new one"
            ) from self._failed
        if start < self.position:
            self._roll_back(start)
        try:
            output = await self._step(hidden.detach().cpu().contiguous(), start)
        except BaseException as exc:
            # some servers may have run this step and others not: the caches disagree now
            self._failed = exc
            raise
        self.position = start + new
        return output

    def _roll_back(self, position: int) -> None:
        """Forget the recorded steps that start at or after `position` (later steps replace
        them); the servers cut their caches with the next step's start_position."""
        for boundary, steps in self._history.items():
            self._history[boundary] = [sent for sent in steps if sent.start < position]
        for hop, steps in self._served.items():
            self._served[hop] = [sent for sent in steps if sent.start < position]
        self.position = position

    async def _step(self, x: torch.Tensor, start: int) -> torch.Tensor:
        new = x.shape[1]
        # the retry budget starts at the first failure, however long detecting it took
        deadline: float | None = None
        index = 0
        while index < len(self._hops):
            state = self._hops[index]
            try:
                y = await self._call(state, x, start)
            except ServerFailed as exc:
                if deadline is None:
                    deadline = time.monotonic() + self.client.config.retry_budget
                await self._replace(index, exc, deadline)
                continue
            self._history.setdefault(state.hop.start, []).append(_Sent(start, x))
            self._count(state.hop, new)
            self._served.setdefault(state.hop, []).append(_Sent(start, x, y))
            x = y
            index += 1
        return x

    def _request(
        self, state: _HopState, x: torch.Tensor, start: int
    ) -> tuple[runtime_pb2.ExpertRequest, bool]:
        """The request of a step at `start`, and whether it rolls the server back."""
        request = runtime_pb2.ExpertRequest(tensors=[serialize_torch_tensor(x)])
        metadata: dict[str, object] = {}
        if state.sent == 0:
            metadata = {
                "model": self.client.config.model_name,
                "session_id": f"{self.id}.{self._streams_opened}",
                "max_length": self.max_length,
                "start": state.hop.start,
                "end": state.hop.end,
            }
        rolls_back = start != state.held
        if rolls_back:
            metadata["start_position"] = start
        if metadata:
            request.metadata = pack(metadata)
        state.sent += 1
        state.held = start + x.shape[1]
        return request, rolls_back

    @staticmethod
    def _check_position(state: _HopState, stream: _Stream, position: int) -> None:
        """ServerFailed unless the server says it reached `position` (after a rollback)."""
        if stream.metadata.get("position") != position:
            raise ServerFailed(
                state.hop.peer_id,
                f"answered position {stream.metadata.get('position')!r} after a rollback, not "
                f"{position} (a server without start_position support)",
                code="bad_response",
            )

    async def _ensure_stream(self, state: _HopState) -> _Stream:
        if state.stream is None:
            stream = _Stream(self.client, state.hop)
            await stream.open()
            state.stream = stream
            state.sent = state.held = 0
            self._streams_opened += 1
        return state.stream

    async def _call(self, state: _HopState, x: torch.Tensor, start: int) -> torch.Tensor:
        stream = await self._ensure_stream(state)
        request, rolls_back = self._request(state, x, start)
        stream.send(request)
        output = await stream.receive()
        if rolls_back:
            self._check_position(state, stream, state.held)
        return output

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
            requests = [self._request(state, sent.inputs, sent.start) for sent in chunks]
            for request, _ in requests:  # pipelined: all requests first, then all answers
                stream.send(request)
            outputs = []
            for sent, (_, rolls_back) in zip(chunks, requests, strict=True):
                outputs.append(await stream.receive())
                if rolls_back:
                    self._check_position(state, stream, sent.end)
            self._count(state.hop, sum(sent.inputs.shape[1] for sent in chunks))
            # a replay starts from position 0: it replaces what this hop answered before
            self._served[state.hop] = [
                _Sent(sent.start, sent.inputs, output)
                for sent, output in zip(chunks, outputs, strict=True)
            ]
            if position + 1 < len(states):
                self._history[state.hop.end] = chunks = [
                    _Sent(sent.start, output) for sent, output in zip(chunks, outputs, strict=True)
                ]
