"""Finding 6, forged DHT records: "a record with subkey `VICTIM[owner:ATTACKER]` validates and is
returned by `parse_record`; the owner key is never tied to the peer id; `throughput=inf` is
accepted and wins every route."

A real block server serves the whole tiny model (hivemind DHT and P2P on 127.0.0.1). The
attacker joins its swarm with a DHT node of their own and writes a record in the victim's name,
signed with the attacker's key, saying the victim went offline; then runs a block server of
their own (our code, announcing a lie) whose record claims infinite, NaN or absurd throughput.
An honest swarm client must route through the victim as if neither record existed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from worker.llm.swarm.dht import start_dht, stop_dht
from worker.llm.swarm.placement import Hop
from worker.llm.swarm.records import ServerRecord, ServerState, parse_record, servers_key
from worker.llm.swarm.routing import SwarmClient, SwarmClientConfig
from worker.llm.swarm.server import BlockServer, BlockServerConfig

pytestmark = pytest.mark.slow


def _config(tiny_models: Path, initial_peers: tuple[str, ...] = ()) -> BlockServerConfig:
    return BlockServerConfig(
        model_dir=tiny_models / "llm",
        model_name="llm",
        blocks=(0, 4),
        initial_peers=initial_peers,
        announce_interval=600.0,
        record_ttl=1200.0,
    )


@pytest.fixture
async def victim(tiny_models: Path) -> AsyncIterator[BlockServer]:
    server = await BlockServer.create(_config(tiny_models))
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture
async def victim_maddr(victim: BlockServer) -> str:
    return (await victim.visible_maddrs())[0]


@pytest.fixture
async def client(victim_maddr: str) -> AsyncIterator[SwarmClient]:
    config = SwarmClientConfig(model_name="llm", initial_peers=(victim_maddr,), num_blocks=4)
    swarm = await SwarmClient.create(config)
    try:
        yield swarm
    finally:
        await swarm.aclose()


async def _records_of(client: SwarmClient, peer_id: str) -> list[ServerRecord]:
    return [r for r in await client.records(refresh=True) if r.peer_id == peer_id]


async def test_a_record_in_the_victims_name_signed_by_the_attacker_is_ignored(
    victim: BlockServer, victim_maddr: str, client: SwarmClient
) -> None:
    victim_id = victim.peer_id.encode()
    attacker_key = RSASignatureValidator(RSAPrivateKey())
    attacker = await start_dht(
        initial_peers=(victim_maddr,),
        host_maddrs=("/ip4/127.0.0.1/tcp/0",),
        client_mode=False,
        validator=attacker_key,
    )
    try:
        # the victim's genuine value (with whatever proofs it carries), now saying "offline"
        key = servers_key("llm")
        found = await attacker.get(key, latest=True, return_future=True)
        (genuine,) = (e.value for s, e in found.value.items() if s.startswith(victim_id))
        forged = {**genuine, "state": str(ServerState.OFFLINE)}
        subkey = victim_id + attacker_key.local_public_key
        stored = await attacker.store(
            key, forged, get_dht_time() + 60, subkey=subkey, return_future=True
        )
        assert stored, "the DHT accepts the forgery (it is validly signed by its owner key)"
        assert parse_record(subkey, forged, 4) is None

        # the victim's own, online record is the only one anybody reads for its peer id
        (record,) = await _records_of(client, victim.peer_id)
        assert (record.state, record.start, record.end) == (ServerState.ONLINE, 0, 4)
        assert await client.route() == [Hop(victim.peer_id, 0, 4)]
    finally:
        await stop_dht(attacker)


class _Liar(BlockServer):
    """A block server (our code) whose owner edited what it announces about its speed."""

    lie = math.inf

    def _record(self, state: ServerState) -> ServerRecord:
        return replace(super()._record(state), throughput=self.lie)


@pytest.fixture
async def liar(victim_maddr: str, tiny_models: Path) -> AsyncIterator[_Liar]:
    server = await _Liar.create(_config(tiny_models, (victim_maddr,)))
    assert isinstance(server, _Liar)
    try:
        yield server
    finally:
        await server.aclose()


@pytest.mark.parametrize("lie", [math.inf, math.nan, 1e12])
async def test_absurd_throughput_is_ignored_by_routing(
    victim: BlockServer, client: SwarmClient, liar: _Liar, lie: float
) -> None:
    liar.lie = lie
    await liar._announce(ServerState.ONLINE)
    # the liar is really there: it answers like a block server of this model
    assert (await client.info(liar.peer_id))["peer_id"] == liar.peer_id
    async with asyncio.timeout(10):  # the victim's record is read back as well
        while True:
            if await _records_of(client, victim.peer_id):
                break
            await asyncio.sleep(0.2)

    assert await _records_of(client, liar.peer_id) == []
    for _ in range(3):
        assert await client.route() == [Hop(victim.peer_id, 0, 4)]
