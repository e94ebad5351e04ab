"""Swarm routing: which chain of block servers carries hidden states through the model.

`SwarmClient` joins the DHT as a client, reads the servers' signed announcements, and plans
routes: chains of servers covering the model's blocks, chosen for the least estimated time
per token (measured round trip to each server + its announced compute time + a fixed cost
per hop, so fewer hops win ties). Round trips are measured once per server with a cheap
`rpc_info` call and cached. A server that fails is banned for a while and left out of new
routes; `route_until` waits (with backoff) for servers to cover a range of blocks, and
`MissingBlocks` names the blocks nobody covers. `forward` is a stateless pass that reroutes
around a failed server.

The route stays warm between jobs: with `keep_warm`, a background task re-reads the
announcements every `records_max_age` seconds and re-measures round trips before they age
out, so the first token after a pause plans its route from memory (no DHT lookup, no
ping). Records up to `records_max_stale` old are used as they are; a server that left
meanwhile fails its first step, is banned and replaced (`route_until` reads the DHT again
when the remaining servers leave blocks uncovered).

Sessions, which keep attention caches on the servers of a route and replay to a
replacement, are `worker.llm.swarm.session`'s; this module never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
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

__all__ = ["SwarmClient", "SwarmClientConfig", "output_of"]

log = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


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
    # re-read the announcements and re-measure round trips in the background, so a route
    # after a pause needs no lookup; then records up to `records_max_stale` old are used
    keep_warm: bool = True
    records_max_stale: float = 60.0
    # measured round trips are reused for this long
    ping_max_age: float = 60.0
    # a server that does not answer a ping within this is left out
    ping_timeout: float = 3.0
    # fixed cost per hop (seconds) in route planning: prefer fewer servers
    hop_penalty: float = 0.002
    # seconds to wait for the DHT daemon to start
    startup_timeout: float = 60.0


class SwarmClient:
    """A DHT client of one model's swarm: its servers, their bans and round trips, routes.

    Open `worker.llm.swarm.session.InferenceSession(client, max_length)` to run hidden
    states through it with caches on the servers."""

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
        self._warmer: asyncio.Task[None] | None = None
        # DHT reads of the announcements made while planning routes (not in the background)
        self.lookups = 0

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
            if config.keep_warm:
                client._warmer = asyncio.create_task(client._keep_warm(), name="warm-route")
        except BaseException:
            await stop_dht(dht)
            raise
        return client

    async def aclose(self) -> None:
        if self._warmer is not None:
            self._warmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warmer
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
        """The model's valid announcements (cached for `records_max_age` seconds, or
        `records_max_stale` while kept warm)."""
        async with self._records_lock:
            age = time.monotonic() - self._records_at
            warm = self._warmer is not None and not self._warmer.done()
            if refresh or age > (
                self.config.records_max_stale if warm else self.config.records_max_age
            ):
                self.lookups += 1
                await self._read_records()
            return self._records

    async def _read_records(self) -> None:
        records = await read_records(self.dht, self.config.model_name, self.config.num_blocks)
        self._learn_model(records)
        self._records = [r for r in records if r.num_blocks == self.num_blocks]
        self._records_at = time.monotonic()

    async def _keep_warm(self) -> None:
        """Keep the announcements and the round trips to the announced servers fresh."""
        period = self.config.records_max_age
        while True:
            await asyncio.sleep(period)
            try:
                async with self._records_lock:
                    await self._read_records()
                records, now = self._records, time.monotonic()
                stale = [
                    r.peer_id
                    for r in records
                    if not self.is_banned(r.peer_id)
                    and now - self._rtt.get(r.peer_id, (0.0, float("-inf")))[1]
                    > self.config.ping_max_age - 2 * period
                ]
                # (a server that does not answer is left for the next route to find out)
                await asyncio.gather(*(self.info(peer) for peer in stale), return_exceptions=True)
            except Exception:
                log.debug("keeping the route warm failed; will retry", exc_info=True)

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

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """A stateless pass of hidden states [B, n, H] through all blocks (no session)."""
        if hidden.numel() * hidden.element_size() > MAX_UNARY_BYTES:
            raise ValueError(
                f"hidden states of {hidden.numel() * hidden.element_size()} bytes are too large "
                f"for a stateless pass (at most {MAX_UNARY_BYTES}); use a session"
            )
        deadline = time.monotonic() + self.config.retry_budget
        while True:
            hops = await self.route_until(0, None, deadline)
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
        return output_of(hop.peer_id, response)

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

    async def route_until(
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


def output_of(peer_id: str, response: runtime_pb2.ExpertResponse) -> torch.Tensor:
    """The hidden states a server answered; ServerFailed if it answered with an error."""
    metadata = unpack(response.metadata)
    if "error" in metadata:
        raise ServerFailed(peer_id, str(metadata["error"]), code=str(metadata.get("code")))
    if len(response.tensors) != 1:
        raise ServerFailed(peer_id, "answered without hidden states", code="bad_response")
    output: torch.Tensor = deserialize_torch_tensor(response.tensors[0])
    return output
