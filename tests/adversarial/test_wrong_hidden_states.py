"""Finding 6, second half: "Hidden states are never checked, so a block server can return
garbage ... undetected."

A real swarm on 127.0.0.1: a coordinator process, a lying block server of all four blocks
of the tiny LM (in this process: a real `BlockServer` whose every answer carries noise as
large as the hidden states, announcing the highest throughput so that routes go through
it), later two honest servers of the same blocks (processes), and a text gateway (in this
process, so the test can turn its checks on and read what it found; its link goes
through a wiretap that records its reports). Jobs are greedy completions submitted with the
SDK and compared with transformers' `generate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from client.sdk import AsyncClient
from protocol.signing import Identity
from protocol.text import ServerCheck, TextParams
from tests.adversarial.wiretap import Wiretap
from tests.worker.llm.swarm.conftest import Cluster, Server
from tests.worker.llm.swarm.lying_server import start_lying_server
from worker.common.link import CoordinatorLink
from worker.llm.gateway.config import GatewayConfig
from worker.llm.gateway.gateway import TextGateway

pytestmark = pytest.mark.slow

PROMPT = "def read_file(path):"
TOKENS = 16
# jobs within which a checking gateway must have caught the liar (it checks every job it
# routes through the liar; routes follow measured round trips, and the liar answers pings
# from this busy process, so many routes take the honest servers instead: 3 jobs missed it
# in about one run of five here, i.e. some 6 routes in 10; 12 jobs miss it ~1 in 700)
MAX_JOBS = 12
POP = "/api/v1/text/pop"


def local_greedy(model_dir: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


@contextlib.asynccontextmanager
async def running_gateway(
    cluster: Cluster, tap: Wiretap, peer: str, tmp: Path, check_rate: float
) -> AsyncIterator[TextGateway]:
    config = GatewayConfig(
        coordinator=tap.url,
        model=cluster.models / "llm",
        model_name="llm",
        name="gateway",
        identity_file=tmp / "gateway.key",
        initial_peers=(peer,),
        api_key=cluster.api_key,
        threads=1,
        check_rate=check_rate,
    )
    link = CoordinatorLink(tap.url, Identity.generate(), "gateway", cluster.api_key)
    tap.hold(POP)
    gateway = await TextGateway.create(config, link)
    task = asyncio.create_task(gateway.run())
    try:
        async with asyncio.timeout(60):
            await tap.arrived(POP)  # it waits for jobs
        tap.release(POP)
        yield gateway
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await gateway.aclose()
        await link.aclose()


def honest_server(cluster: Cluster, name: str, peer: str) -> Server:
    # (--api-key=KEY: a key may start with "-")
    args = ["worker", "blocks", "--model", str(cluster.models / "llm"), "--blocks", "0:4"]
    args += ["--coordinator", cluster.url, f"--api-key={cluster.api_key}", "--name", name]
    args += ["--identity", str(cluster.tmp / f"{name}.key"), "--threads", "1"]
    return Server(name, cluster._start(name, [*args, "--initial-peers", peer]))


async def complete(cluster: Cluster) -> str:
    params = TextParams(model="llm", prompt=PROMPT, max_tokens=TOKENS, temperature=0.0)
    async with AsyncClient(cluster.url, cluster.api_key) as grid:
        async with asyncio.timeout(120):
            status = await grid.complete(params)
    return status.text


async def test_wrong_hidden_states_are_caught_and_never_answered(
    tmp_path: Path, tiny_models: Path
) -> None:
    cluster = Cluster(tmp_path, tiny_models)
    want = local_greedy(tiny_models / "llm", PROMPT)
    liar, liar_link = await start_lying_server(
        cluster.url, cluster.api_key, tiny_models / "llm", (0, 4), peer=None
    )
    try:
        maddr = (await liar.visible_maddrs())[0]
        async with (
            Wiretap(cluster.url) as tap,
            running_gateway(cluster, tap, maddr, tmp_path, check_rate=0.0) as gateway,
        ):
            # without checks (as before the fix) the liar's garbage is the answer, accepted
            assert await complete(cluster) != want
            assert liar.tokens > 0
            assert (await gateway.stats())["checks"] == []
            # honest servers of the same blocks join: two, so a disagreement can be decided
            honest = [honest_server(cluster, name, maddr) for name in ("honest-b", "honest-c")]
            honest = [server.ready() for server in honest]
            # (a check that finds one honest server only is undecided, and bans nobody for
            # long: wait until the gateway sees both, as a loaded machine may be slow)
            everyone = {liar.peer_id, *(server.peer_id for server in honest)}
            for _ in range(60):
                seen = set(await gateway.refresh_records())
                if seen == everyone:
                    break
                await asyncio.sleep(0.5)
            await gateway.set_check_rate(1.0)
            answers = []
            for _ in range(MAX_JOBS):
                answers.append(await complete(cluster))
                stats = await gateway.stats()
                if any(c["verdict"] == "wrong" for c in stats["checks"]):
                    break
            # the liar is found wrong by both honest servers and left out of routes
            checks = [ServerCheck.model_validate(c) for c in stats["checks"]]
            wrong = [c for c in checks if c.verdict == "wrong"]
            assert [(c.peer_id, c.start, c.end) for c in wrong] == [(liar.peer_id, 0, 4)], (
                json.dumps(stats["checks"]),
                json.dumps(stats.get("banned")),
                liar.peer_id,
            )
            assert sorted(wrong[0].checkers) == sorted(s.peer_id for s in honest)
            assert liar.peer_id in stats["banned"]
            # no answer was built on its hidden states: all equal the honest model's
            assert answers == [want] * len(answers)
            # the coordinator was told, in the gateway's signed report of that job
            reports = [json.loads(c.body) for c in tap.captured if c.path.endswith("/result")]
            reported = [c for r in reports for c in r.get("checks", [])]
            assert wrong[0].model_dump() in reported
            # and later jobs do not go near it
            lied = liar.tokens
            assert await complete(cluster) == want
            assert liar.tokens == lied
    finally:
        await liar.aclose()
        await liar_link.aclose()
        cluster.close()
