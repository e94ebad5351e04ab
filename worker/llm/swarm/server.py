"""The block server: serves a span of decoder layers to the swarm over hivemind P2P.

The RPC interface and its framing are in `worker.llm.swarm.wire`; this module implements
the handlers (`_Handlers`). Sessions are bounded: each reserves `max_length` tokens of the
server's `cache_tokens` budget until it closes, one peer may hold at most
`peer_cache_share` of that budget and `max_streams_per_peer` streams (`PeerLimits`), and a
stream that does no work for `session_idle_timeout` seconds is closed (requests without
hidden states are answered but do not keep it open; one may grow the session's
`max_length`, see `extend_session`). A frame longer than the session can use (its
`max_length`: a rollback may free what it holds) is refused on its length, before it is
read. A request's `start_position` cuts the session back first (`worker.llm.swarm.wire`).

Layer compute runs in a second, confined process (`worker.llm.swarm.compute`): this one
keeps the network and the keys, checks each tensor's declared dtype, shape and byte count
against the session, and hands the bytes over undecoded; the compute process decodes
them, runs the layers and holds the caches. Steps of all sessions queue for it in a
`StepBatcher` (worker.llm.swarm.batcher): the decode steps waiting whenever it is free run
as one batched forward, and prompts are cut into chunks of `prefill_chunk` tokens so one
long prompt does not hold back everyone's next token; the event loop keeps serving streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey

from sandbox.errors import EngineCrashed, EngineFailed, EngineStartFailed, EngineTimedOut
from worker.errors import ModelError
from worker.llm.swarm.batcher import BadStep, StepBatcher
from worker.llm.swarm.blocks import ModelInfo
from worker.llm.swarm.compute import ComputeSettings, SpanCompute, hidden_sizes
from worker.llm.swarm.dht import start_dht, stop_dht
from worker.llm.swarm.limits import PeerLimits, Refused
from worker.llm.swarm.peer_proof import PeerKey
from worker.llm.swarm.placement import choose_blocks, coverage
from worker.llm.swarm.records import (
    MAX_THROUGHPUT,
    Announcer,
    ServerRecord,
    ServerState,
    read_records,
)
from worker.llm.swarm.wire import (
    MAX_UNARY_BYTES,
    BadFrame,
    FrameTooLarge,
    error_response,
    frame_limit,
    handle_name,
    pack,
    read_request,
    unpack,
    write_response,
)

__all__ = ["BlockServer", "BlockServerConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockServerConfig:
    # local model folder (config.json + safetensors)
    model_dir: Path
    # the model's name in the swarm; clients look it up by this name
    model_name: str
    # blocks to serve, [start, end); None = choose where the swarm is weakest
    blocks: tuple[int, int] | None = None
    # how many blocks to serve when choosing (None = all of them)
    span_length: int | None = None
    # multiaddrs of peers already in the swarm; empty = start a new swarm
    initial_peers: tuple[str, ...] = ()
    # where the libp2p daemon listens
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    # addresses to announce instead of the listening ones (e.g. a public IP); empty = those
    announce_maddrs: tuple[str, ...] = ()
    # UPnP / NAT-PMP port mapping; off for local setups (it probes the LAN otherwise)
    nat_port_map: bool = False
    # torch intra-op threads: tiny per-token ops are latency bound, so 1 is fastest on CPU
    threads: int = 1
    # weights dtype, e.g. torch.bfloat16; None keeps the stored dtype
    dtype: torch.dtype | None = None
    # weight quantization (`--quant`): one of protocol.engine.QUANTS (worker.llm.swarm.quant)
    quant: str = "none"
    # seconds between refreshes of the DHT record, and how long a record lives
    announce_interval: float = 10.0
    record_ttl: float = 30.0
    # seconds after which a stream that did no work (no hidden states) is closed
    session_idle_timeout: float = 60.0
    # attention-cache budget, in tokens, shared by all open sessions
    cache_tokens: int = 16384
    # the most of `cache_tokens` one peer may hold at once (0.5: at least two peers fit)
    peer_cache_share: float = 0.5
    # rpc_inference streams one peer may have open at once
    max_streams_per_peer: int = 8
    # seconds to wait for the DHT daemon to start
    startup_timeout: float = 60.0
    # the libp2p key: p2pd's identity, the proof of our peer id to the coordinator, and the
    # voucher for the key that signs our DHT records; None = a fresh one
    peer_key: PeerKey | None = None
    # run the layer compute unconfined (`--unsandboxed`; see worker.llm.swarm.compute)
    unsandboxed: bool = False
    # seconds one step may take before the compute process is killed and restarted
    step_timeout: float = 300.0
    # prompt tokens per compute call: longer prompts are cut, and other sessions' decode
    # steps run between the pieces (worker.llm.swarm.batcher)
    prefill_chunk: int = 128
    # seconds an idle compute waits for more sessions' steps before running a batch (0:
    # batch only what queued while it was busy, which adds no latency)
    batch_window: float = 0.0


@dataclass(frozen=True)
class Hidden:
    """Hidden states as they arrived: raw row-major bytes, not decoded here."""

    buffer: bytes
    dtype: str
    shape: list[int]

    @property
    def tokens(self) -> int:
        return self.shape[0] * self.shape[1]


def _hidden_in(serialized: runtime_pb2.Tensor, hidden_size: int, batch_one: bool) -> Hidden:
    """Check a tensor's declared dtype and shape against its bytes, without decoding it."""
    shape = [int(size) for size in serialized.size]
    dtype = serialized.dtype
    wanted = "[1, n, H]" if batch_one else "[B, n, H]"
    if serialized.compression != runtime_pb2.CompressionType.NONE:
        raise Refused("bad_request", "send hidden states uncompressed (compression NONE)")
    if not hidden_sizes(dtype, 1):
        raise Refused(
            "bad_request", f"hidden states of dtype {dtype!r}; send float32, float16 or bfloat16"
        )
    if (
        len(shape) != 3
        or shape[-1] != hidden_size
        or shape[1] < 1
        or shape[0] < 1
        or (batch_one and shape[0] != 1)
    ):
        raise Refused(
            "bad_request",
            f"expected hidden states {wanted} with H={hidden_size}, got {tuple(shape)}",
        )
    if len(serialized.buffer) not in hidden_sizes(dtype, math.prod(shape)):
        raise Refused(
            "bad_request",
            f"cannot read the hidden states: {len(serialized.buffer)} bytes do not hold a "
            f"{dtype} tensor of shape {tuple(shape)}",
        )
    return Hidden(serialized.buffer, dtype, shape)


def _hidden_out(buffer: bytes, shape: list[int]) -> runtime_pb2.Tensor:
    """The compute's float32 output as hivemind's uncompressed tensor message."""
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.NONE,
        buffer=buffer,
        size=shape,
        dtype="float32",
        requires_grad=False,
    )


@dataclass
class _Session:
    peer: str
    id: str
    start: int
    end: int
    max_length: int
    # the compute process's name for its cache, and which compute process holds it
    key: str
    generation: int
    position: int = 0


def start_position(session: _Session, metadata: dict[str, Any]) -> int | None:
    """A request's `start_position` (None if it has none); Refused unless it is a whole
    number from 0 to the tokens the session holds."""
    if "start_position" not in metadata:
        return None
    cut = metadata["start_position"]
    if not isinstance(cut, int) or isinstance(cut, bool) or not 0 <= cut <= session.position:
        raise Refused(
            "bad_request",
            f"start_position must be a whole number from 0 to the session's "
            f"{session.position} tokens, got {cut!r}",
        )
    return cut


# After its last answer a stream reads (and drops) what the peer already sent, for at most
# this long and this much, before closing: closing a socket with unread data resets the
# connection, and the reset can overtake the answer just written (a refusal then never
# arrives).
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20


async def _linger(reader: asyncio.StreamReader) -> None:
    budget = LINGER_BYTES
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        async with asyncio.timeout(LINGER_SECONDS):
            while budget > 0 and (chunk := await reader.read(min(1 << 16, budget))):
                budget -= len(chunk)


class _Handlers:
    """The block server's implementation of `BlockServicer`'s handlers."""

    def __init__(self, server: BlockServer) -> None:
        self._server = server

    async def rpc_inference(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One rpc_inference stream, read frame by frame (see `wire.read_request`)."""
        server = self._server
        peer = str(info.peer_id)
        with contextlib.closing(writer):
            try:
                server.limits.open_stream(peer)
            except Refused as exc:
                await self._send(writer, error_response(exc.code, str(exc)))
                await _linger(reader)
                return
            try:
                await self._serve(peer, reader, writer)
            finally:
                server.limits.close_stream(peer)
            await _linger(reader)

    async def _serve(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        server = self._server
        idle = server.config.session_idle_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + idle
        session: _Session | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        request = await read_request(reader, server.frame_limit(session))
                except TimeoutError:
                    message = f"session idle for {idle:g}s; closed (open a new one and replay)"
                    await self._send(writer, error_response("idle", message))
                    return
                except FrameTooLarge as exc:
                    message = (
                        f"{exc}: send at most the session's max_length tokens of hidden states "
                        "(float32 or narrower) per request"
                    )
                    await self._send(writer, error_response("too_large", message))
                    return
                except BadFrame as exc:
                    await self._send(writer, error_response("bad_request", str(exc)))
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the caller hung up
                if request is None:
                    return
                try:
                    metadata = unpack(request.metadata)
                    if session is None:
                        session = server.open_session(peer, metadata)
                        deadline = loop.time() + idle
                    cut = start_position(session, metadata)
                    if request.tensors:
                        output = await server.run_step(session, request.tensors[0], cut)
                        response = runtime_pb2.ExpertResponse(tensors=[output])
                        deadline = loop.time() + idle
                    elif cut is not None:
                        # only a rollback: the compute cuts the cache at the next step
                        session.position = cut
                        response = runtime_pb2.ExpertResponse()
                    else:
                        # answered, but it does no work: it does not keep the session open
                        response = server.extend_session(session, unpack(request.metadata))
                except Refused as exc:
                    await self._send(writer, error_response(exc.code, str(exc)))
                    return
                except Exception:
                    log.exception("an inference step failed")
                    message = "this server failed on the step; route around it"
                    await self._send(writer, error_response("failed", message))
                    return
                if cut is not None:
                    response.metadata = pack({"position": session.position})
                if not await self._send(writer, response):
                    return
        finally:
            if session is not None:
                server.close_session(session)

    async def _send(
        self, writer: asyncio.StreamWriter, response: runtime_pb2.ExpertResponse
    ) -> bool:
        """Write one response; False if the caller does not take it within the idle timeout."""
        try:
            async with asyncio.timeout(self._server.config.session_idle_timeout):
                await write_response(writer, response)
        except (TimeoutError, ConnectionError):
            return False
        return True

    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        try:
            output = await self._server.run_forward(unpack(request.metadata), request.tensors)
        except Refused as exc:
            return error_response(exc.code, str(exc))
        return runtime_pb2.ExpertResponse(tensors=[output])

    async def rpc_info(
        self, request: runtime_pb2.ExpertUID, context: P2PContext
    ) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=pack(self._server.info()))


class BlockServer:
    """Serves blocks [start, end) of one model until `aclose()`.

    Create with `await BlockServer.create(config)`: it joins (or starts) the DHT, picks its
    blocks, loads them, measures its throughput and starts announcing itself.
    """

    def __init__(
        self,
        config: BlockServerConfig,
        model: ModelInfo,
        dht: DHT,
        peer_key: PeerKey,
        announcer: Announcer,
        compute: SpanCompute,
        blocks: tuple[int, int],
        throughput: float,
    ) -> None:
        self.config = config
        self.model = model
        self.dht = dht
        self.peer_key = peer_key
        self.compute = compute
        self.blocks = blocks
        self.throughput = throughput
        self.peer_id = str(dht.peer_id)
        self.limits = PeerLimits(
            config.cache_tokens, config.peer_cache_share, config.max_streams_per_peer
        )
        self._announcer = announcer
        self._p2p: P2P | None = None
        self._handlers = _Handlers(self)
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._announce_task: asyncio.Task[None] | None = None
        self._closed = False
        self._leaving = False
        self._sessions_changed = asyncio.Event()
        self.batcher: StepBatcher | None = None

    @classmethod
    async def create(cls, config: BlockServerConfig) -> BlockServer:
        model = ModelInfo.read(config.model_dir, config.model_name)
        if config.blocks is not None:
            start, end = config.blocks
            if not 0 <= start < end <= model.num_blocks:
                raise ModelError(
                    f"blocks {start}:{end} are outside {model.name}'s {model.num_blocks} blocks; "
                    f"use START:END with 0 <= START < END <= {model.num_blocks}"
                )
        peer_key = config.peer_key or PeerKey.generate()
        # our own owner key for the DHT records (not hivemind's process-wide one), which
        # peer_key vouches for
        validator = RSASignatureValidator(RSAPrivateKey())
        with peer_key.identity_file() as identity_path:
            dht = await start_dht(
                initial_peers=config.initial_peers,
                host_maddrs=config.host_maddrs,
                announce_maddrs=config.announce_maddrs,
                nat_port_map=config.nat_port_map,
                client_mode=False,
                validator=validator,
                startup_timeout=config.startup_timeout,
                identity_path=identity_path,
            )
        server: BlockServer | None = None
        try:
            # (refuses a DHT whose peer id is not peer_key's)
            announcer = Announcer(dht, validator, model.name, peer_key)
            if config.blocks is None:
                records = await read_records(dht, model.name, model.num_blocks)
                length = config.span_length or model.num_blocks
                if not 1 <= length <= model.num_blocks:
                    raise ModelError(
                        f"cannot serve {length} blocks of {model.name}, which has "
                        f"{model.num_blocks}; use 1..{model.num_blocks}"
                    )
                start, end = choose_blocks(
                    model.num_blocks, length, coverage(records, model.num_blocks)
                )
                log.info("the swarm is weakest at blocks %d:%d; serving those", start, end)
            else:
                start, end = config.blocks
            joining = ServerRecord(
                peer_id=str(dht.peer_id),
                start=start,
                end=end,
                num_blocks=model.num_blocks,
                hidden_size=model.hidden_size,
                throughput=0.0,
                cache_tokens=0,
                state=ServerState.JOINING,
                quant=config.quant,
            )
            await announcer.announce(joining, config.record_ttl)
            settings = ComputeSettings(
                model_dir=config.model_dir,
                start=start,
                end=end,
                dtype=None if config.dtype is None else str(config.dtype).removeprefix("torch."),
                threads=config.threads,
                quant=config.quant,
                confine=not config.unsandboxed,
                step_timeout=config.step_timeout,
            )
            try:
                compute = await SpanCompute.start(settings)
            except EngineStartFailed as exc:
                raise ModelError(f"could not load blocks {start}:{end}: {exc}") from exc
            try:
                measured = await compute.measure()
            except BaseException:
                await compute.aclose()
                raise
            log.info("blocks %d:%d run at %.1f tokens/s", start, end, measured)
            # (readers ignore records beyond the cap; announce the most they believe)
            throughput = min(measured, MAX_THROUGHPUT)
            server = cls(config, model, dht, peer_key, announcer, compute, (start, end), throughput)
            await server._start()
        except BaseException:
            if server is not None:
                await server.aclose()
            else:
                await stop_dht(dht)
            raise
        return server

    async def _start(self) -> None:
        self.batcher = await StepBatcher.create(
            self.compute, self.config.prefill_chunk, self.config.batch_window
        )
        self._p2p = p2p = await self.dht.replicate_p2p()
        handlers = self._handlers
        await p2p.add_protobuf_handler(
            handle_name("rpc_forward"), handlers.rpc_forward, runtime_pb2.ExpertRequest
        )
        await p2p.add_protobuf_handler(
            handle_name("rpc_info"), handlers.rpc_info, runtime_pb2.ExpertUID
        )
        # a raw stream handler: frames are read here, so their length is checked first
        await p2p.add_binary_stream_handler(handle_name("rpc_inference"), handlers.rpc_inference)
        await self._announce(ServerState.ONLINE)
        self._announce_task = asyncio.create_task(self._announce_loop(), name="announce")

    @property
    def start(self) -> int:
        return self.blocks[0]

    @property
    def end(self) -> int:
        return self.blocks[1]

    @property
    def free_cache_tokens(self) -> int:
        return self.limits.free_tokens

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def visible_maddrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/PEER_ID) that other peers can use as initial peers."""
        maddrs = await asyncio.to_thread(self.dht.get_visible_maddrs)
        return [str(maddr) for maddr in maddrs]

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "peer_id": self.peer_id,
            "start": self.start,
            "end": self.end,
            "num_blocks": self.model.num_blocks,
            "throughput": self.throughput,
            "cache_tokens": self.free_cache_tokens,
            "cache_tokens_per_peer": self.limits.peer_quota,
        }

    def _record(self, state: ServerState) -> ServerRecord:
        return ServerRecord(
            peer_id=self.peer_id,
            start=self.start,
            end=self.end,
            num_blocks=self.model.num_blocks,
            hidden_size=self.model.hidden_size,
            throughput=self.throughput,
            cache_tokens=max(self.free_cache_tokens, 0),
            state=state,
            quant=self.config.quant,
        )

    async def _announce(self, state: ServerState, ttl: float | None = None) -> None:
        record = self._record(state)
        if not await self._announcer.announce(record, ttl or self.config.record_ttl):
            log.warning("no DHT peer accepted our %s record; will retry", state)

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.announce_interval)
            try:
                await self._announce(ServerState.LEAVING if self._leaving else ServerState.ONLINE)
            except Exception:
                log.warning("announcing failed; will retry", exc_info=True)
            with contextlib.suppress(Exception):  # free closed sessions' caches when idle
                await self.compute.flush()

    # -- sessions ---------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Leave gently: announce LEAVING at once (gateways route new sessions elsewhere),
        refuse new sessions, and return when the open ones have closed or after `grace`
        seconds, whichever comes first. `aclose()` then stops the server."""
        self._leaving = True
        log.info(
            "leaving: announced; finishing %d open sessions (at most %gs)",
            len(self._sessions),
            grace,
        )
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await self._announce(ServerState.LEAVING)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._sessions:
                    self._sessions_changed.clear()
                    await self._sessions_changed.wait()

    def open_session(self, peer: str, metadata: dict[str, Any]) -> _Session:
        if self._closed:
            raise Refused("closing", "this server is shutting down")
        if self._leaving:
            raise Refused("closing", "this server is leaving; open the session elsewhere")
        model = metadata.get("model")
        session_id = metadata.get("session_id")
        max_length = metadata.get("max_length")
        start = metadata.get("start", self.start)
        end = metadata.get("end", self.end)
        if model != self.model.name:
            raise Refused("bad_request", f"this server serves {self.model.name!r}, not {model!r}")
        if not isinstance(session_id, str) or not 1 <= len(session_id) <= 128:
            raise Refused("bad_request", "session_id must be a string of 1-128 characters")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise Refused(
                "bad_request", f"max_length must be a positive integer, got {max_length!r}"
            )
        if not (
            isinstance(start, int)
            and isinstance(end, int)
            and self.start <= start < end <= self.end
        ):
            raise Refused(
                "bad_request",
                f"blocks {start}:{end} are not within this server's {self.start}:{self.end}",
            )
        if (peer, session_id) in self._sessions:
            raise Refused("bad_request", f"session {session_id} is already open here")
        self.limits.reserve(peer, max_length)
        key = uuid.uuid4().hex
        session = _Session(peer, session_id, start, end, max_length, key, self.compute.generation)
        self._sessions[peer, session_id] = session
        log.debug("opened session %s (%d tokens)", session_id, max_length)
        return session

    def close_session(self, session: _Session) -> None:
        if self._sessions.pop((session.peer, session.id), None) is not None:
            self.limits.release(session.peer, session.max_length)
            self.compute.close(session.key)
            self._sessions_changed.set()
            log.debug("closed session %s", session.id)

    def extend_session(
        self, session: _Session, metadata: dict[str, Any]
    ) -> runtime_pb2.ExpertResponse:
        """A request without hidden states may ask for a larger `max_length` (a kept
        conversation's next turn, worker.llm.gateway.kept): reserved if the peer's share and
        the cache have room, else left as it was. The answer names the session's max_length."""
        wanted = metadata.get("max_length")
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > session.max_length:
            with contextlib.suppress(Refused):
                self.limits.reserve(session.peer, wanted - session.max_length)
                session.max_length = wanted
        return runtime_pb2.ExpertResponse(metadata=pack({"max_length": session.max_length}))

    def frame_limit(self, session: _Session | None) -> int:
        """The longest rpc_inference frame worth reading: hidden states for the session's
        `max_length` tokens (a request may roll it back to 0 first), or before one is open,
        for the most tokens one peer may reserve."""
        tokens = self.limits.peer_quota if session is None else session.max_length
        return frame_limit(tokens, self.model.hidden_size)

    async def run_step(
        self, session: _Session, serialized: runtime_pb2.Tensor, cut: int | None = None
    ) -> runtime_pb2.Tensor:
        """The session's next tokens; `cut` (a checked `start_position`) rolls it back first."""
        hidden = _hidden_in(serialized, self.model.hidden_size, batch_one=True)
        new = hidden.shape[1]
        past = session.position if cut is None else cut
        if past + new > session.max_length:
            raise Refused(
                "bad_request",
                f"{past} + {new} tokens exceed the session's max_length {session.max_length}",
            )
        session.position = past
        if session.generation != self.compute.generation:
            raise Refused(
                "failed", "this server's compute restarted and lost the session; replay elsewhere"
            )
        output = await self._compute(hidden, session, session.position, session.start, session.end)
        session.position += new
        return output

    async def _compute(
        self, hidden: Hidden, session: _Session | None, past: int, start: int, end: int
    ) -> runtime_pb2.Tensor:
        """Run blocks [start, end) on `hidden`: a session's next tokens, or a stateless pass."""
        try:
            if session is None:
                buffer, shape = await self.compute.forward(
                    hidden.buffer, hidden.dtype, hidden.shape, start, end
                )
            else:
                assert self.batcher is not None, "sessions open only once the server started"
                buffer, shape = await self.batcher.step(
                    session.key, hidden.buffer, hidden.dtype, hidden.shape, past, start, end
                )
        except BadStep as exc:
            raise Refused("bad_request", f"cannot read the hidden states: {exc}") from exc
        except EngineFailed as exc:
            if exc.error_type == "ValueError":  # the bytes or shape it was sent
                raise Refused("bad_request", f"cannot read the hidden states: {exc}") from exc
            raise
        except (EngineCrashed, EngineTimedOut) as exc:
            log.error("the compute process failed (%s); a fresh one takes over", exc)
            raise Refused("failed", "this server's compute failed; route around it") from exc
        return _hidden_out(buffer, shape)

    async def run_forward(
        self, metadata: dict[str, Any], tensors: list[runtime_pb2.Tensor]
    ) -> runtime_pb2.Tensor:
        if metadata.get("model") != self.model.name:
            raise Refused(
                "bad_request",
                f"this server serves {self.model.name!r}, not {metadata.get('model')!r}",
            )
        start = metadata.get("start", self.start)
        end = metadata.get("end", self.end)
        if not (
            isinstance(start, int)
            and isinstance(end, int)
            and self.start <= start < end <= self.end
        ):
            raise Refused(
                "bad_request",
                f"blocks {start}:{end} are not within this server's {self.start}:{self.end}",
            )
        if len(tensors) != 1:
            raise Refused("bad_request", "send exactly one tensor")
        if len(tensors[0].buffer) > MAX_UNARY_BYTES:
            raise Refused("too_large", "hidden states too large for rpc_forward; send fewer tokens")
        hidden = _hidden_in(tensors[0], self.model.hidden_size, batch_one=False)
        return await self._compute(hidden, None, 0, start, end)

    # -- shutdown ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Announce offline, stop serving, close sessions and stop the DHT (and its daemon)."""
        if self._closed:
            return
        self._closed = True
        if self._announce_task is not None:
            self._announce_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announce_task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await self._announce(ServerState.OFFLINE, ttl=self.config.record_ttl)
        if self._p2p is not None:
            # (the daemon may be gone already, e.g. after a Ctrl-C sent to the whole group)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self._p2p.remove_protobuf_handler(handle_name("rpc_forward"))
                    await self._p2p.remove_protobuf_handler(handle_name("rpc_info"))
                    await self._p2p.remove_binary_stream_handler(handle_name("rpc_inference"))
            await self._p2p.shutdown()
        for session in list(self._sessions.values()):
            self.close_session(session)
        if self.batcher is not None:
            await self.batcher.aclose()
        await self.compute.aclose()
        await stop_dht(self.dht)
        log.info("block server stopped")
