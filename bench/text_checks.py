"""Spot checks of block servers: how fast a liar is caught, and what checking costs.

A real tiny swarm on loopback: a coordinator and two honest block servers of all four
blocks of the tiny LM (processes), a lying server of the same blocks (in this process:
noise as large as the hidden states on every answer, the highest throughput announced so
that every route goes through it) and a text gateway (in this process, to read its
counters) checking `--rate` of its jobs. Greedy completion jobs go through the coordinator
with the SDK, one after another, with prompts of 8 to 64 tokens and 32 new tokens.

  1. liar phase: `--jobs` jobs while the liar serves; the gateway bans nobody for long
     (`check_ban_seconds` 0), so every job meets the liar again. The per-job detection
     rate p is the share of the gateway's jobs in which a check found the liar wrong; the
     probability that a liar is caught within k jobs is 1 - (1 - p)^k.
  2. honest phase: the liar stops; `--jobs` more jobs. Extra compute is the block-steps
     the checkers ran over the block-steps the jobs ran (tokens x blocks, replays
     included): (served + checked) / served.

    .venv/bin/python bench/text_checks.py [--jobs 100] [--rate 0.3] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from processes import wait_line

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests/

TOKENS = 32


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100, help="jobs per phase (default 100)")
    parser.add_argument("--rate", type=float, default=0.3, help="check rate (default 0.3)")
    parser.add_argument("--seed", type=int, help="seeds the gateway's draws (default: random)")
    args = parser.parse_args()
    seed = random.randrange(2**32) if args.seed is None else args.seed
    print(f"seed {seed}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="idlegrid-bench-"))
    models = Path(os.environ.get("IDLEGRID_TEST_MODELS") or work / "models")
    if not (models / "llm" / "config.json").exists():
        from worker.models.tiny_models import build_tiny_models

        build_tiny_models(models)
    llm = models / "llm"
    procs: list[subprocess.Popen[bytes]] = []

    def start(label: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = work / f"{label}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "client.cli", *command],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc, log

    try:
        proc, log = start(
            "coordinator",
            ["coordinator", "--port", "0", "--data-dir", str(work / "data"), "--log-level",
             "WARNING", "--lease-timeout", "5"],
        )  # fmt: skip
        url = wait_line(log, r"listening on (http://\S+)", proc, 60)
        from client.sdk import Client

        with Client(url) as grid:
            api_key = grid.register("donor").api_key
        ready = r"serving blocks \d+:\d+ of \S+ at (\S+)"
        server = ["worker", "blocks", "--model", str(llm), "--coordinator", url, "--blocks"]
        server += ["0:4", f"--api-key={api_key}", "--threads", "1", "--log-level", "WARNING"]
        proc, log = start(
            "honest-a",
            [*server, "--new-swarm", "--name", "honest-a", "--identity", str(work / "a.key")],
        )
        maddr = wait_line(log, ready, proc, 120)
        proc, log = start(
            "honest-b",
            [*server, "--initial-peers", maddr, "--name", "honest-b", "--identity",
             str(work / "b.key")],
        )  # fmt: skip
        wait_line(log, ready, proc, 120)
        rows = asyncio.run(_measure(url, api_key, llm, maddr, work, args, seed))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)
    _print(rows, args)
    return 0


@dataclasses.dataclass
class _Rows:
    liar_jobs: int = 0
    caught_jobs: int = 0
    served: int = 0
    checked: int = 0
    honest_jobs: int = 0
    failed: int = 0
    seconds: float = 0.0


async def _measure(
    url: str,
    api_key: str,
    llm: Path,
    maddr: str,
    work: Path,
    args: argparse.Namespace,
    seed: int,
) -> _Rows:
    from client.errors import ApiError, JobFailed
    from client.sdk import AsyncClient
    from protocol.signing import Identity
    from protocol.text import TextParams
    from tests.worker.llm.swarm.lying_server import start_lying_server
    from worker.common.link import CoordinatorLink
    from worker.llm.gateway.config import GatewayConfig
    from worker.llm.gateway.gateway import TextGateway

    liar, liar_link = await start_lying_server(url, api_key, llm, (0, 4), maddr)
    config = GatewayConfig(
        coordinator=url,
        model=llm,
        model_name="llm",
        name="gateway",
        identity_file=work / "gateway.key",
        initial_peers=(maddr,),
        api_key=api_key,
        threads=1,
        check_rate=args.rate,
        check_ban_seconds=0.0,
    )
    link = CoordinatorLink(url, Identity.generate(), "gateway", api_key)
    try:
        gateway = await TextGateway.create(config, link, seed=seed)
    except BaseException:
        await link.aclose()
        await liar.aclose()
        await liar_link.aclose()
        raise
    task = asyncio.create_task(gateway.run())
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "far"]
    draw = random.Random(seed + 1)
    rows = _Rows()
    try:
        async with AsyncClient(url, api_key) as grid:

            async def job() -> None:
                prompt = " ".join(draw.choice(words) for _ in range(draw.randint(8, 64)))
                params = TextParams(model="llm", prompt=prompt, max_tokens=TOKENS, temperature=0)
                for attempt in range(60):  # the gateway may not have asked for work yet
                    try:
                        await grid.complete(params)
                        return
                    except JobFailed:
                        # the liar's unchecked garbage had text the coordinator refuses,
                        # three times: the job is refunded (its gateway jobs still count)
                        rows.failed += 1
                        return
                    except ApiError as exc:
                        if "no gateway" not in str(exc) or attempt == 59:
                            raise
                        await asyncio.sleep(0.5)

            for _ in range(args.jobs):
                await job()
            # (a job whose garbage text the coordinator refused comes back: counted twice)
            stats = await gateway.stats()
            rows.liar_jobs, rows.caught_jobs = stats["jobs"], stats["caught_jobs"]
            assert all(
                c["peer_id"] == liar.peer_id for c in stats["checks"] if c["verdict"] == "wrong"
            )
            await liar.aclose()
            await gateway.refresh_records()
            stats = await gateway.stats()
            served, checked = stats["served_block_tokens"], stats["checked_block_tokens"]
            started = time.monotonic()
            for _ in range(args.jobs):
                await job()
            rows.seconds = time.monotonic() - started
            rows.honest_jobs = args.jobs
            stats = await gateway.stats()
            rows.served = stats["served_block_tokens"] - served
            rows.checked = stats["checked_block_tokens"] - checked
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await gateway.aclose()
        await link.aclose()
        await liar.aclose()
        await liar_link.aclose()
    return rows


def _print(rows: _Rows, args: argparse.Namespace) -> None:
    p = rows.caught_jobs / max(rows.liar_jobs, 1)
    print(
        f"\ntiny LM, 4 blocks, greedy, 8-64 prompt tokens + {TOKENS} new, check rate "
        f"{args.rate:g}\n\nliar phase: {rows.liar_jobs} jobs through the liar, caught in "
        f"{rows.caught_jobs}: per-job detection rate p = {p:.3f} ({rows.failed} jobs failed: "
        "garbage text refused)\n"
    )
    print(f"| {'within k jobs':>13} | {'P(caught), measured p':>21} | {'1-(1-rate)^k':>12} |")
    print(f"|{'-' * 15}|{'-' * 23}|{'-' * 14}|")
    for k in (1, 2, 5, 10, 15, 20):
        measured = 1 - (1 - p) ** k
        expected = 1 - (1 - args.rate) ** k
        print(f"| {k:>13} | {measured:>21.4f} | {expected:>12.4f} |")
    extra = rows.checked / max(rows.served, 1)
    print(
        f"\nhonest phase: {rows.honest_jobs} jobs, {rows.served} block-steps served, "
        f"{rows.checked} checked: extra compute {extra:.1%} "
        f"(with / without checks = {1 + extra:.3f}); {rows.seconds:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
