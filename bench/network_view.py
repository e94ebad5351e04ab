"""The network view under amplification (issue 26, finding 4): AI Horde workers with long
model lists, then readers of the anonymous GET /api/v1/network.

A coordinator process (fresh SQLite) with registration and worker limits opened wide;
`--workers` AI Horde workers (20 per account) pop once each with `--models` names of
`--name-chars` characters (the review: 240 workers x about 63 KB). Then `--readers`
concurrent GETs of /api/v1/network, `--rounds` times, while /healthz is timed; the table
shows how many workers got in, the view's size and time, and /healthz's latency alone and
under the readers. Uses only HTTP, so it runs against older trees too (`--tree DIR`;
pass `--no-network-scope` for a tree without the `network` rate-limit scope).

    .venv/bin/python bench/network_view.py [--workers 240] [--models 1000] [--name-chars 56]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from processes import wait_line

ROOT = Path(__file__).resolve().parent.parent
WIDE = "1000/100000,1000/100000"


async def _pop(
    http: aiohttp.ClientSession, url: str, key: str, name: str, models: list[str]
) -> int:
    body = {"name": name, "models": models, "max_pixels": 512 * 512}
    async with http.post(f"{url}/api/v2/generate/pop", json=body, headers={"apikey": key}) as r:
        await r.read()
        return r.status


async def _timed_get(http: aiohttp.ClientSession, url: str) -> tuple[float, int, int]:
    started = time.perf_counter()
    async with http.get(url) as r:
        body = await r.read()
        return time.perf_counter() - started, r.status, len(body)


async def _run(url: str, args: argparse.Namespace) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        keys = []
        for i in range((args.workers + 19) // 20):
            async with http.post(f"{url}/api/v1/accounts", json={"name": f"bench{i}"}) as r:
                keys.append((await r.json())["api_key"])
        accepted = 0
        for n in range(args.workers):
            names = [f"w{n:03d}-{i:04d}-".ljust(args.name_chars, "x") for i in range(args.models)]
            accepted += await _pop(http, url, keys[n // 20], f"worker{n}", names) == 200
        alone = [(await _timed_get(http, f"{url}/healthz"))[0] for _ in range(20)]
        view_time, _, view_bytes = await _timed_get(http, f"{url}/api/v1/network")

        under: list[float] = []
        statuses: list[int] = []
        for _ in range(args.rounds):
            readers = [
                asyncio.create_task(_timed_get(http, f"{url}/api/v1/network"))
                for _ in range(args.readers)
            ]
            while not all(r.done() for r in readers):
                under.append((await _timed_get(http, f"{url}/healthz"))[0])
            statuses += [(await r)[1] for r in readers]

    refused = sum(s != 200 for s in statuses)
    print(
        "| workers accepted | view bytes | view time | /healthz alone p50 | /healthz under "
        f"{args.readers} readers p50 / max | readers refused (429) |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {accepted} of {args.workers} | {view_bytes:,} | {view_time * 1000:.0f} ms "
        f"| {statistics.median(alone) * 1000:.1f} ms "
        f"| {statistics.median(under) * 1000:.1f} / {max(under) * 1000:.0f} ms "
        f"| {refused} of {len(statuses)} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=240)
    parser.add_argument("--models", type=int, default=1000, help="names per worker")
    parser.add_argument("--name-chars", type=int, default=56, help="characters per name")
    parser.add_argument("--readers", type=int, default=6, help="concurrent GETs of the view")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the source tree to run")
    parser.add_argument(
        "--no-network-scope", action="store_true", help="the tree has no `network` scope"
    )
    args = parser.parse_args()
    scopes = ["register", "worker", "pop"] + ([] if args.no_network_scope else ["network"])
    work = Path(tempfile.mkdtemp(prefix="idlegrid-bench-"))
    command = [sys.executable, "-m", "client.cli", "coordinator", "--port", "0"]
    command += ["--data-dir", str(work / "data")]
    command += [f"--rate-limit={scope}={WIDE}" for scope in scopes]
    env = {**os.environ, "PYTHONPATH": str(args.tree.resolve())}
    log = work / "coordinator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=args.tree, env=env, stdout=out, stderr=out)
    try:
        url = wait_line(log, r"listening on (http://\S+)", proc, 60)
        asyncio.run(_run(url, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
