"""Several chats at once through one gateway and real block server processes (tiny LM).

alpha serves blocks 0:2, bravo and charlie both 2:4 (the spare for the failover test); one
gateway with `--max-sessions 4`. Four different chats (two greedy, two sampled with a
seed) are first run one at a time, then all at once: the servers batch their steps
(their debug log says so) and every chat's text is its solo text. Then all at once again
while the 2:4 server in use is killed: each chat fails over to the spare with the same text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from client.sdk import AsyncClient
from protocol.text import TextParams
from tests.procs import Proc
from tests.worker.llm.swarm.conftest import Cluster, Server

pytestmark = pytest.mark.slow

TOKENS = 24
PROMPTS = ["def read_file(path):", "import os\n", "class Point:", "for i in range(10):"]


def chats() -> list[TextParams]:
    return [
        TextParams(
            model="llm",
            prompt=prompt,
            max_tokens=TOKENS,
            temperature=0.0 if n % 2 == 0 else 0.9,
            seed=None if n % 2 == 0 else 1000 + n,
        )
        for n, prompt in enumerate(PROMPTS)
    ]


@pytest.fixture(scope="module")
def swarm(cluster: Cluster) -> tuple[dict[str, Server], Proc]:
    """The three servers and the gateway (which starts beside the last two)."""
    debug = ("--log-level", "DEBUG")
    alpha = cluster.server("alpha", "--blocks", "0:2", "--new-swarm", *debug).ready()
    bravo = cluster.server("bravo", "--blocks", "2:4", "--initial-peers", alpha.maddr, *debug)
    charlie = cluster.server("charlie", "--blocks", "2:4", "--initial-peers", alpha.maddr, *debug)
    # no spot checks: a checked job's re-run would add sessions the failover test counts;
    # no kept sessions: a chat run again would reuse its first run's session (on either
    # spare) instead of opening one the failover test can find and kill
    gateway = cluster.gateway(
        "gateway",
        alpha,
        "--max-sessions",
        "4",
        "--check-rate",
        "0",
        "--session-keep",
        "0",
        "--log-level",
        "DEBUG",
    )
    bravo.ready(), charlie.ready()
    gateway.wait_for("idlegrid text gateway gateway ready", 120)
    return {s.name: s for s in (alpha, bravo, charlie)}, gateway


async def _all_at_once(
    cluster: Cluster, on_first_text: Callable[[], Awaitable[None]] | None = None
) -> list[str]:
    first = asyncio.Event()

    def seen(_: str) -> None:
        first.set()

    async with AsyncClient(cluster.url, cluster.api_key) as grid:

        async def watch() -> None:
            if on_first_text is not None:
                await first.wait()
                await on_first_text()

        async with asyncio.TaskGroup() as group:
            group.create_task(watch())
            statuses = await asyncio.gather(
                *(grid.complete(params, seen, wait_timeout=120) for params in chats())
            )
    return [status.text for status in statuses]


def _batches(server: Server) -> int:
    return server.proc.output().count("steps in one batch")


def _sessions(server: Server) -> int:
    return server.proc.output().count("opened session")


async def test_chats_at_once_give_their_solo_text_and_survive_a_killed_server(
    cluster: Cluster, swarm: tuple[dict[str, Server], Proc]
) -> None:
    servers, gateway = swarm
    async with AsyncClient(cluster.url, cluster.api_key) as grid:
        solo = [(await grid.complete(params, wait_timeout=120)).text for params in chats()]
    assert len(set(solo)) == len(solo)  # different chats
    alpha = servers["alpha"]
    before = _batches(alpha)
    assert await _all_at_once(cluster) == solo
    assert _batches(alpha) > before, "the chats' steps were never batched"

    spares = [servers["bravo"], servers["charlie"]]
    opened = {s.name: _sessions(s) for s in spares}
    killed: list[Server] = []

    async def kill_the_server_in_use() -> None:
        victim = max(spares, key=lambda s: _sessions(s) - opened[s.name])
        victim.proc.kill()
        killed.append(victim)

    assert await _all_at_once(cluster, kill_the_server_in_use) == solo
    assert killed and "replacing the server of blocks 2:4" in gateway.output()
