"""The LLM swarm with real processes on loopback: block servers, the swarm client, failover.

Two swarms share one coordinator: "llm" (alpha 0:2 + bravo 2:4, small cache budget and idle
timeout) for the session tests, and "relay" (papa 0:2, quebec choosing its own blocks,
romeo 2:4) whose servers the failover tests kill. Embeddings, final norm and LM head run
here, as the text gateway runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.procs import assert_confined, sandboxed_engine
from tests.worker.llm.swarm.conftest import Cluster, Server
from worker.errors import MissingBlocks, SwarmStepFailed
from worker.llm.gateway.core import CoreSettings, GenerationCore
from worker.llm.gateway.generation import SamplingParams
from worker.llm.swarm.placement import Hop
from worker.llm.swarm.records import ServerState
from worker.llm.swarm.routing import SwarmClient, SwarmClientConfig
from worker.llm.swarm.session import InferenceSession, SpanUsage

pytestmark = pytest.mark.slow

PROMPT = torch.tensor([[1, 17, 42, 256, 7]])


@pytest.fixture(scope="module")
def servers(cluster: Cluster) -> dict[str, Server]:
    small = ("--cache-tokens", "256", "--session-idle-timeout", "2")
    alpha = cluster.server("alpha", "--blocks", "0:2", "--new-swarm", *small)
    # relay records live 3 s unless refreshed every second
    relay = ("--model-name", "relay", "--announce-interval", "1", "--record-ttl", "3")
    papa = cluster.server("papa", "--blocks", "0:2", "--new-swarm", *relay)
    alpha.ready(), papa.ready()
    bravo = cluster.server("bravo", "--blocks", "2:4", "--initial-peers", alpha.maddr, *small)
    # no --blocks: must choose 2:4, the range nobody serves yet
    quebec = cluster.server("quebec", "--num-blocks", "2", "--initial-peers", papa.maddr, *relay)
    bravo.ready(), quebec.ready()
    romeo = cluster.server("romeo", "--blocks", "2:4", "--initial-peers", papa.maddr, *relay)
    romeo.ready()
    return {s.name: s for s in (alpha, bravo, papa, quebec, romeo)}


@contextlib.asynccontextmanager
async def swarm_client(model: str, peer: Server, **options: Any) -> AsyncIterator[SwarmClient]:
    config = SwarmClientConfig(model_name=model, initial_peers=(peer.maddr,), **options)
    client = await SwarmClient.create(config)
    try:
        yield client
    finally:
        await client.aclose()


def _embed(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        embedded: torch.Tensor = model.model.embed_tokens(ids)
    return embedded


def _last_logits(model: LlamaForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model.lm_head(model.model.norm(hidden[:, -1]))
    return logits[0]


def local_greedy(model: LlamaForCausalLM, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and last-position logits of the full model, recomputed from scratch."""
    ids = PROMPT
    tokens, logits = [], []
    for _ in range(steps + 1):
        with torch.no_grad():
            last = model(ids).logits[0, -1]
        logits.append(last)
        tokens.append(int(last.argmax()))
        ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, logits


async def swarm_greedy(
    session: InferenceSession,
    model: LlamaForCausalLM,
    steps: int,
    before_step: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """The same through the swarm: prefill, then one token per step."""
    logits = [_last_logits(model, await session.step(_embed(model, PROMPT)))]
    tokens = [int(logits[-1].argmax())]
    for step in range(steps):
        if before_step is not None:
            await before_step(step)
        hidden = await session.step(_embed(model, torch.tensor([[tokens[-1]]])))
        logits.append(_last_logits(model, hidden))
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def assert_same_generation(
    got: tuple[list[int], list[torch.Tensor]], want: tuple[list[int], list[torch.Tensor]]
) -> None:
    assert got[0] == want[0]
    worst = max(float((a - b).abs().max()) for a, b in zip(got[1], want[1], strict=True))
    assert worst < 1e-4, f"logits differ by {worst}"


async def test_two_servers_give_the_local_models_logits(
    servers: dict[str, Server], full_model: LlamaForCausalLM
) -> None:
    alpha, bravo = servers["alpha"], servers["bravo"]
    assert (alpha.start, alpha.end, bravo.start, bravo.end) == (0, 2, 2, 4)
    steps = 10
    async with swarm_client("llm", alpha) as client:
        assert (client.num_blocks, client.hidden_size) == (4, 64)
        async with InferenceSession(client, max_length=64) as session:
            assert session.route == [Hop(alpha.peer_id, 0, 2), Hop(bravo.peer_id, 2, 4)]
            result = await swarm_greedy(session, full_model, steps)
            usage = session.usage
    assert_same_generation(result, local_greedy(full_model, steps))
    tokens = PROMPT.shape[1] + steps
    assert sorted(usage, key=lambda u: u.start) == [
        SpanUsage(alpha.peer_id, 0, 2, tokens),
        SpanUsage(bravo.peer_id, 2, 4, tokens),
    ]


async def test_stateless_forward_through_the_swarm(
    servers: dict[str, Server], full_model: LlamaForCausalLM
) -> None:
    async with swarm_client("llm", servers["alpha"]) as client:
        hidden = await client.forward(_embed(full_model, PROMPT))
    with torch.no_grad():
        reference = full_model(PROMPT).logits[0, -1]
    assert (_last_logits(full_model, hidden) - reference).abs().max() < 1e-4


async def _wait_free_cache(client: SwarmClient, server: Server, tokens: int) -> None:
    """Poll the server until `tokens` of its cache are free (its sessions closed)."""
    async with asyncio.timeout(10):
        while True:
            if (await client.info(server.peer_id))["cache_tokens"] == tokens:
                return
            await asyncio.sleep(0.05)


async def test_sessions_beyond_a_peers_cache_share_are_refused(
    servers: dict[str, Server], full_model: LlamaForCausalLM
) -> None:
    alpha = servers["alpha"]
    async with swarm_client("llm", alpha, retry_budget=1.5) as client:
        info = await client.info(alpha.peer_id)
        assert info["cache_tokens_per_peer"] == 128  # half of 256, the default share
        async with InferenceSession(client, max_length=120) as big:
            await big.step(_embed(full_model, PROMPT))
            assert (await client.info(alpha.peer_id))["cache_tokens"] == 256 - 120
            began = time.monotonic()
            async with InferenceSession(client, max_length=100) as second:
                with pytest.raises(
                    SwarmStepFailed, match=r"holds 120 of at most 128 of 256 tokens per peer"
                ):
                    await second.step(_embed(full_model, PROMPT))
            assert time.monotonic() - began < 10
        # closing the stream frees the session; then the same request fits
        await _wait_free_cache(client, alpha, 256)
        async with InferenceSession(client, max_length=100) as third:
            await third.step(_embed(full_model, PROMPT))


async def test_an_idle_session_is_closed_and_the_client_replays_it(
    servers: dict[str, Server], full_model: LlamaForCausalLM
) -> None:
    alpha, bravo = servers["alpha"], servers["bravo"]
    steps = 6

    async def idle_midway(step: int) -> None:
        if step == 3:  # both servers drop the session after 2 s without requests
            await _wait_free_cache(client, alpha, 256)
            await _wait_free_cache(client, bravo, 256)

    async with (
        swarm_client("llm", alpha) as client,
        InferenceSession(client, max_length=64) as session,
    ):
        result = await swarm_greedy(session, full_model, steps, idle_midway)
        usage = {(u.peer_id, u.start): u.tokens for u in session.usage}
    assert_same_generation(result, local_greedy(full_model, steps))
    # the same servers took the session back; the replay of 5 + 3 tokens counts too
    total = PROMPT.shape[1] + steps
    assert usage == {(alpha.peer_id, 0): total + 8, (bravo.peer_id, 2): total + 8}


async def test_rolled_back_drafts_leave_the_caches_as_plain_decoding_even_after_a_replay(
    servers: dict[str, Server], full_model: LlamaForCausalLM
) -> None:
    """Each step sends the next token and two wrong drafts, and the next step cuts them off
    (start_position): the logits stay the plain ones, also after both servers dropped the
    idle session and the client replayed its rolled-back steps; what the session recorded
    for spot checks is what a stateless pass over the kept inputs gives."""
    alpha, bravo = servers["alpha"], servers["bravo"]
    steps = 6
    async with (
        swarm_client("llm", alpha) as client,
        InferenceSession(client, max_length=64) as session,
    ):
        logits = [_last_logits(full_model, await session.step(_embed(full_model, PROMPT)))]
        tokens = [int(logits[-1].argmax())]
        for step in range(steps):
            if step == 3:  # both servers drop the session after 2 s without requests
                await _wait_free_cache(client, alpha, 256)
                await _wait_free_cache(client, bravo, 256)
            kept = PROMPT.shape[1] + step  # the drafts of the last step are cut off
            drafted = torch.tensor([[tokens[-1], 9, 10]])
            hidden = await session.step(_embed(full_model, drafted), start_position=kept)
            assert session.position == kept + 3
            logits.append(_last_logits(full_model, hidden[:, :1]))
            tokens.append(int(logits[-1].argmax()))
        served = session.served
        recomputed = [await client.forward_hop(states.hop, states.inputs) for states in served]
    assert_same_generation((tokens, logits), local_greedy(full_model, steps))
    assert [states.hop.start for states in served] == [0, 2]
    for states, again in zip(served, recomputed, strict=True):
        # the prompt, a token per step, and the last step's two drafts
        assert states.inputs.shape[1] == states.outputs.shape[1] == PROMPT.shape[1] + steps + 2
        assert (states.outputs - again).abs().max() < 1e-4
    ids = torch.cat([PROMPT, torch.tensor([tokens[:steps]]), torch.tensor([[9, 10]])], dim=1)
    assert torch.equal(served[0].inputs, _embed(full_model, ids))


def test_a_server_without_blocks_takes_the_uncovered_range(servers: dict[str, Server]) -> None:
    assert (servers["papa"].start, servers["papa"].end) == (0, 2)
    assert (servers["quebec"].start, servers["quebec"].end) == (2, 4)


async def test_a_killed_server_is_replaced_mid_generation(
    servers: dict[str, Server], full_model: LlamaForCausalLM
) -> None:
    papa = servers["papa"]
    by_peer = {servers[n].peer_id: servers[n] for n in ("quebec", "romeo")}
    steps, kill_before = 10, 4
    recovery: list[float] = []
    async with (
        swarm_client("relay", papa, step_timeout=5.0) as client,
        InferenceSession(client, max_length=64) as session,
    ):
        victim = by_peer[session.route[1].peer_id]

        async def kill_midway(step: int) -> None:
            if step == kill_before:
                victim.proc.kill(signal.SIGKILL)
                recovery.append(time.perf_counter())
            elif step == kill_before + 1:
                recovery[0] = time.perf_counter() - recovery[0]

        result = await swarm_greedy(session, full_model, steps, kill_midway)
        route, usage = session.route, session.usage
    print(f"\nrecovered from a killed server in {recovery[0] * 1000:.0f} ms")
    assert_same_generation(result, local_greedy(full_model, steps))
    (survivor,) = (s for s in by_peer.values() if s is not victim)
    assert route == [Hop(papa.peer_id, 0, 2), Hop(survivor.peer_id, 2, 4)]
    # the replacement was paid for the replayed history and everything after it
    tokens = {u.peer_id: u.tokens for u in usage if u.start == 2}
    assert tokens == {
        victim.peer_id: PROMPT.shape[1] + kill_before,
        survivor.peer_id: PROMPT.shape[1] + steps,
    }


async def test_without_a_replacement_missing_blocks_names_them(
    servers: dict[str, Server], full_model: LlamaForCausalLM
) -> None:
    papa = servers["papa"]
    async with swarm_client("relay", papa, retry_budget=2.0, ping_timeout=1.0) as client:
        async with InferenceSession(client, max_length=64) as session:
            await session.step(_embed(full_model, PROMPT))
            for name in ("quebec", "romeo"):
                servers[name].proc.kill(signal.SIGKILL)
            began = time.monotonic()
            with pytest.raises(MissingBlocks, match="no server serves blocks 2:4 of model relay"):
                await session.step(_embed(full_model, torch.tensor([[3]])))
            assert time.monotonic() - began < 10
            # papa ran that step, the rest did not: the session cannot go on
            with pytest.raises(SwarmStepFailed, match="this session failed earlier"):
                await session.step(_embed(full_model, torch.tensor([[3]])))
        with pytest.raises(MissingBlocks, match="blocks 2:4 of model relay") as caught:
            async with InferenceSession(client, max_length=64):
                pass
        assert caught.value.ranges == [(2, 4)]
        # the dead servers' records expire; papa's, older than their lifetime, is refreshed
        async with asyncio.timeout(10):
            while True:
                records = await client.records(refresh=True)
                if [r.peer_id for r in records] == [papa.peer_id]:
                    break
                await asyncio.sleep(0.2)


def test_a_servers_layer_compute_runs_confined(servers: dict[str, Server]) -> None:
    """The issue's check, from the host's /proc: the process that decodes strangers' tensors
    and runs the layers has no_new_privs, a seccomp filter, and its own mount, pid, user and
    network namespaces; the server process keeps the network for its p2p daemon."""
    server = servers["alpha"].proc.pid
    assert_confined(sandboxed_engine(server), server, ("mnt", "pid", "user", "net"))
    assert os.readlink(f"/proc/{server}/ns/net") == os.readlink("/proc/self/ns/net")


async def test_a_leaving_server_finishes_open_sessions_and_takes_no_new_ones(
    cluster: Cluster, full_model: LlamaForCausalLM
) -> None:
    """The first SIGTERM: the record says LEAVING at once, a new session is refused, the open
    one keeps stepping; the server stops when it closes (long before --drain-seconds)."""
    flags = ("--model-name", "drain", "--announce-interval", "1", "--record-ttl", "3")
    sierra = cluster.server("sierra", "--blocks", "0:4", "--new-swarm", *flags)
    sierra.ready()
    async with swarm_client("drain", sierra) as client:
        async with InferenceSession(client, max_length=64) as session:
            await session.step(_embed(full_model, PROMPT))
            sierra.proc.popen.send_signal(signal.SIGTERM)
            for _ in range(100):
                if (await client.records(refresh=True))[0].state == ServerState.LEAVING:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the leaving server's record never said so")
            with pytest.raises(MissingBlocks):
                async with InferenceSession(client, max_length=64):
                    pass
            await asyncio.sleep(1.0)
            hidden = await session.step(_embed(full_model, torch.tensor([[3]])))
            assert hidden.shape == (1, 1, 64)
            assert sierra.proc.popen.poll() is None  # still serving the open session
        began = time.monotonic()
        assert await asyncio.to_thread(sierra.proc.popen.wait, 20) == 0
        assert time.monotonic() - began < 15  # not the 30 s of --drain-seconds
    assert "leaving: announced; finishing 1 open sessions" in sierra.proc.output()


def test_sigterm_stops_a_server_without_orphans(servers: dict[str, Server]) -> None:
    papa = servers["papa"]
    children = psutil.Process(papa.proc.pid).children(recursive=True)
    names = {child.name() for child in children}
    assert "p2pd" in names, names  # the DHT process and its daemon
    papa.proc.popen.send_signal(signal.SIGTERM)
    assert papa.proc.popen.wait(timeout=20) == 0
    assert "block server stopped" in papa.proc.output()
    deadline = time.monotonic() + 10
    while left := [c for c in children if _running(c)]:
        assert time.monotonic() < deadline, f"orphans left: {left}"
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_bad_flags_exit_2_naming_the_flag(cluster: Cluster, tmp_path: Path) -> None:
    gpt = tmp_path / "gpt"
    shutil.copytree(cluster.models / "llm", gpt)
    config = json.loads((gpt / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (gpt / "config.json").write_text(json.dumps(config))
    llm = str(cluster.models / "llm")
    base = ["worker", "blocks", "--coordinator", cluster.url, "--new-swarm"]
    cases = {
        "error: --model: .*'gpt2'; supported model types: llama, mistral, qwen2, qwen3": [
            "--model",
            str(gpt),
        ],
        r"error: --blocks: START must be less than END, got 3:1": [
            "--model",
            llm,
            "--blocks",
            "3:1",
        ],
        r"error: --blocks: llm has 4 blocks; use END <= 4": ["--model", llm, "--blocks", "0:9"],
    }
    procs = {pattern: cluster.cli(*base, *args) for pattern, args in cases.items()}
    for pattern, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert re.search(pattern, err), err


# -- conversation reuse and warm routes (issue 25) ----------------------------------------

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ban_eos=True)
TURN_1 = [1, 17, 42, 256, 7, 99, 3, 12]


async def _quiet(_: str) -> None:
    pass


@contextlib.asynccontextmanager
async def gateway_core(
    peer: Server, tiny_models: Path, session_keep: float
) -> AsyncIterator[GenerationCore]:
    settings = CoreSettings(
        model=tiny_models / "llm",
        model_name="llm",
        initial_peers=(peer.maddr,),
        threads=1,
        check_rate=0.0,
        session_keep=session_keep,
    )
    core = await GenerationCore.create(settings)
    try:
        yield core
    finally:
        await core.aclose()


async def test_a_second_turn_reuses_its_requesters_kept_session(
    servers: dict[str, Server], tiny_models: Path
) -> None:
    alpha = servers["alpha"]
    async with gateway_core(alpha, tiny_models, session_keep=30) as core:
        first = await core.generate(TURN_1, 8, GREEDY, _quiet, requester="alice")
        assert len(core.kept) == 1
        # the next turn: the conversation so far (the answer included), then new words
        turn_2 = [*TURN_1, *first.result.token_ids, 5, 6, 7]
        held = len(TURN_1) + 8 - 1  # the last answer token was never sent
        second = await core.generate(turn_2, 8, GREEDY, _quiet, requester="alice")
        stats = core.kept.stats
        assert (stats.reused, stats.reused_tokens) == (1, held)
        assert stats.prefilled == [len(TURN_1), len(turn_2) - held]
        # the report covers every block for the whole prompt, as the coordinator checks:
        # the held tokens count for the servers that kept them
        assert set(second.spans.values()) == {len(turn_2) + 8 - 1}

        # another requester with the same conversation gets a session of its own
        fresh = await core.generate(turn_2, 8, GREEDY, _quiet, requester="bob")
        assert stats.reused == 1 and stats.prefilled[-1] == len(turn_2)
        assert fresh.result.token_ids == second.result.token_ids
        assert fresh.result.text == second.result.text
        # alice's kept session (her second turn) is still there, next to bob's
        assert len(core.kept) == 2
        # a turn that leaves alice's conversation partway reuses their common start: the
        # first step cuts the kept session back to it (and the text is a fresh session's)
        edited = [*TURN_1[:4], 5, 6]
        cut = await core.generate(edited, 8, GREEDY, _quiet, requester="alice")
        assert (stats.reused, stats.prefilled[-1]) == (2, 2)
        plain = await core.generate(edited, 8, GREEDY, _quiet)
        assert cut.result.token_ids == plain.result.token_ids
        # a prompt that shares nothing with her kept session closes it
        await core.generate([2, 3, 4], 8, GREEDY, _quiet, requester="alice")
        assert stats.closed == 1


async def test_a_kept_session_dropped_by_its_servers_falls_back_and_one_expires(
    servers: dict[str, Server], tiny_models: Path
) -> None:
    alpha, bravo = servers["alpha"], servers["bravo"]
    async with gateway_core(alpha, tiny_models, session_keep=30) as core:
        first = await core.generate(TURN_1, 8, GREEDY, _quiet, requester="alice")
        # the servers drop sessions idle for 2 s, before the gateway's 30 s are up
        await _wait_free_cache(core.swarm, alpha, 256)
        await _wait_free_cache(core.swarm, bravo, 256)
        turn_2 = [*TURN_1, *first.result.token_ids, 5, 6, 7]
        second = await core.generate(turn_2, 8, GREEDY, _quiet, requester="alice")
        assert (core.kept.stats.reused, core.kept.stats.fallbacks) == (0, 1)
        assert core.kept.stats.prefilled[-1] == len(turn_2)
        fresh = await core.generate(turn_2, 8, GREEDY, _quiet)
        assert fresh.result.token_ids == second.result.token_ids
        await core.kept.aclose()

    async with gateway_core(alpha, tiny_models, session_keep=0.5) as core:
        await core.generate(TURN_1, 8, GREEDY, _quiet, requester="alice")
        assert (await core.swarm.info(alpha.peer_id))["cache_tokens"] == 256 - 16
        async with asyncio.timeout(10):
            while True:
                if not core.kept:
                    break
                await asyncio.sleep(0.05)
        # the gateway closed it (the servers would have only after their 2 s)
        assert core.kept.stats.closed == 1
        await _wait_free_cache(core.swarm, alpha, 256)


async def test_a_warm_route_needs_no_lookup_after_a_pause(servers: dict[str, Server]) -> None:
    for warm in (True, False):
        async with swarm_client(
            "llm", servers["alpha"], records_max_age=0.2, keep_warm=warm
        ) as client:
            assert client.lookups == 1  # joining
            read_at = client._records_at
            async with asyncio.timeout(10):  # a pause: the records age past records_max_age
                while True:
                    aged = time.monotonic() - read_at > 0.5
                    if aged and not (warm and client._records_at == read_at):
                        break
                    await asyncio.sleep(0.05)
            await client.route()
            assert client.lookups == (1 if warm else 2)
