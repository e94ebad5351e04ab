"""Finding 5, peer-id squatting: "linking a block server's peer id needs no proof of owning
the libp2p key; peer ids are public in the DHT before the real server links, so a squatter
can claim them, collect their earnings, and the real server exits on the 409."

A real `idlegrid worker blocks` process joins a swarm through the squatter's own DHT node;
a wiretap holds its peer link until the squatter, who read the server's peer id from the
DHT, has tried to link it first: with the old unproven link, with a proof made with a key
of its own, and with a squat left in the database from before proofs existed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from sqlalchemy import select

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.db.schema import worker_peers
from tests.adversarial.wiretap import Wiretap
from tests.conftest import LiveApp, start_app
from tests.fakes import FakeWorker
from tests.procs import Proc
from worker.errors import CoordinatorRejected
from worker.llm.swarm.dht import start_dht, stop_dht
from worker.llm.swarm.peer_proof import PeerKey
from worker.llm.swarm.records import servers_key

pytestmark = pytest.mark.slow

PEERS = "/api/v1/workers/peers"
# a record's subkey: the peer id, then the key that signs the record
_PEER = re.compile(rb"([1-9A-HJ-NP-Za-km-z]+)\[owner:")
READY = r"idlegrid block server honest serving blocks 0:4 of llm at \S+/p2p/(\S+)"


@pytest.fixture
async def coordinator(sqlite_only_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    runner, app = await start_app(sqlite_only_config)
    try:
        yield app
    finally:
        await runner.cleanup()


@pytest.fixture
async def squatter_dht() -> AsyncIterator[DHT]:
    """The squatter's own node in the swarm (the one the server joins through)."""
    dht = await start_dht(
        initial_peers=(),
        host_maddrs=("/ip4/127.0.0.1/tcp/0",),
        client_mode=False,
        validator=RSASignatureValidator(RSAPrivateKey()),
    )
    try:
        yield dht
    finally:
        await stop_dht(dht)


async def _peer_in_dht(dht: DHT) -> str:
    """The peer id in the block server's announcement, as anyone in the swarm reads it
    (the raw entry: the squatter needs nothing but the id)."""
    async with asyncio.timeout(60):
        while True:
            found = await asyncio.to_thread(dht.get, servers_key("llm"), True)
            subkeys = [] if found is None or not isinstance(found.value, dict) else found.value
            for subkey in subkeys:
                if isinstance(subkey, bytes) and (match := _PEER.match(subkey)):
                    return match.group(1).decode()
            await asyncio.sleep(0.2)


async def _linked_to(live: LiveApp, peer_id: str) -> str | None:
    async with live.store.db.begin() as conn:
        row = (
            await conn.execute(
                select(worker_peers.c.worker_id).where(worker_peers.c.peer_id == peer_id)
            )
        ).first()
    return None if row is None else str(row.worker_id)


async def test_a_squatter_cannot_link_a_block_servers_peer_id(
    coordinator: LiveApp, squatter_dht: DHT, tiny_models: Path, tmp_path: Path
) -> None:
    async with AsyncClient(coordinator.url) as anon:
        donor_key = (await anon.register("donor")).api_key
        mallory_key = (await anon.register("mallory")).api_key
    initial = str(squatter_dht.get_visible_maddrs()[0])
    async with Wiretap(coordinator.url) as tap:
        tap.hold(PEERS)
        server = Proc(
            [
                "worker",
                "blocks",
                "--model",
                str(tiny_models / "llm"),
                "--coordinator",
                tap.url,
                "--api-key",
                donor_key,
                "--name",
                "honest",
                "--identity",
                str(tmp_path / "honest.key"),
                "--threads",
                "1",
                "--blocks",
                "0:4",
                "--initial-peers",
                initial,
            ],
            tmp_path / "honest.log",
        )
        try:
            async with asyncio.timeout(120):
                await tap.arrived(PEERS)
            peer_id = await _peer_in_dht(squatter_dht)
            async with FakeWorker(coordinator.url, "squatter", mallory_key) as squatter:
                # the link as it used to be: signed by the squatter's worker key only
                status, answer = await _post_peer_link(
                    squatter,
                    {"peer_id": peer_id, "timestamp": int(time.time()), "signature": "0" * 128},
                )
                assert status == 400 and "upgrade" in answer["error"]["message"]
                # a "proof" made with a libp2p key of the squatter's own
                with pytest.raises(CoordinatorRejected) as refused:
                    await squatter.link.link_peer(_Impostor(peer_id, PeerKey.generate()))
                assert refused.value.status == 401
                assert f"no proof of owning peer id {peer_id}" in str(refused.value)
                assert await _linked_to(coordinator, peer_id) is None
                # a squat from before proofs existed, still in the database
                await _squat(coordinator, peer_id, squatter.link.worker_id)

            tap.release(PEERS)
            ready = await asyncio.to_thread(server.wait_for, READY, 60)
            assert ready.group(1) == peer_id
            honest = await coordinator.store.workers.worker_row(
                await _worker_named(coordinator, "honest")
            )
            assert honest is not None
            # the proof wins over the old squat; the server serves on and is paid
            assert await _linked_to(coordinator, peer_id) == honest.id
            assert server.popen.poll() is None
        finally:
            await asyncio.to_thread(server.stop)


class _Impostor:
    """Claims someone else's peer id, signing with its own libp2p key."""

    def __init__(self, peer_id: str, key: PeerKey) -> None:
        self.peer_id = peer_id
        self._key = key

    def sign(self, message: bytes) -> str:
        return self._key.sign(message)


async def _post_peer_link(worker: FakeWorker, body: dict[str, Any]) -> tuple[int, Any]:
    headers = {"X-Worker-Token": worker.link.token or ""}
    async with (
        aiohttp.ClientSession() as http,
        http.post(worker.link.base_url + PEERS, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def _squat(live: LiveApp, peer_id: str, worker_id: str | None) -> None:
    async with live.store.db.begin() as conn:
        await conn.execute(
            worker_peers.insert().values(peer_id=peer_id, worker_id=worker_id, linked_at=0.0)
        )


async def _worker_named(live: LiveApp, name: str) -> str:
    from coordinator.db.schema import workers

    async with live.store.db.begin() as conn:
        return str(
            (await conn.execute(select(workers.c.id).where(workers.c.name == name))).scalar_one()
        )
