"""The coordinator under load: job lifecycles/s (our worker protocol and AI Horde's), status
polls/s, queue latency by queue size, event streams.

Starts a real coordinator (`idlegrid coordinator`, a subprocess; a fresh one and a fresh
database for every scenario) on SQLite, on PostgreSQL with one process and on PostgreSQL
with two (`--processes 2`, when the coordinator has that flag). Rate limits are relaxed,
accounts get a large grant and the simulated workers are trusted with spot checks off, so
what is measured is the queue, not the limits. Everything goes over real HTTP on 127.0.0.1:
requesters use the SDK (`client.sdk.AsyncClient`); workers register an Ed25519 identity,
pop, upload a real 64x64 PNG (made once with Pillow) signed with `protocol.signing`, and
finalize. Every job is 64x64, 1 step, 1 image (1 kudo). The scenarios:

  lifecycles  N workers (--workers, default 4) loop pop (long-poll) -> PUT image and
              finish in one request (PUT .../images/0/result; a coordinator older than that
              route answers 404, and then PUT image -> POST result) while M requesters
              (--requesters, default 8) submit (at most 4 x N jobs outstanding); counts the
              jobs settled per second over --seconds after a warm-up, and the submit ->
              settled time of each.
  horde       the same with AI Horde workers: POST /api/v2/generate/pop with the owner's API
              key and a name, then /api/v2/generate/submit with the image as base64 WebP
              (unsigned: the pay is held for disputes, as for any AI Horde worker).
  polls       256 requests queued through /api/v2/generate/async (a quarter of them then
              finished), and --pollers (default 16) clients each GETting
              /api/v2/generate/check/{id} of a random one, one request after another, as
              AI Horde clients wait for their images: polls/s and p50/p99.
  queue       fills the queue to each of --sizes with concurrent submits from M requesters
              (--concurrency in flight; "fill/s" is that submit rate), then for --seconds
              --queue-clients tasks (default 1) each loop: pop with wait=0 (timed), complete
              the job, submit a new one (timed), GET its status (timed) -- so the queue stays
              at the size.
  streams     queues --streams jobs and opens one server-sent event stream on each
              (GET /api/v1/jobs/{id}/events), then for --seconds submits 20 jobs/s and GETs
              statuses of queued jobs one after another (timed), counting events delivered.

Latencies are client-side wall times of one HTTP request (p50/p99); RSS is the
coordinator's (its processes together: after each measurement, and the peak); CPU is the
share of one core used by the coordinator and by this load generator during the window
(a load generator near 100% limits what can be measured), and "coord CPU ms each" is the
coordinator's CPU time per lifecycle or poll: on a busy machine, where the coordinator gets
only part of its core, 1000 / that is what one core of its own would do. The coordinator
runs on one core and this load generator on another (--pin, default the first two cores
this process may use). Targets are printed next to the measured values, never asserted.

Before/after: `--coordinator-path before=DIR --coordinator-path after=.` runs every scenario
once per code (DIR first on the coordinator's PYTHONPATH, e.g. a `git worktree` of an older
commit), interleaved, so the machine's load falls on both alike, and prints a comparison.
`--profile DIR` writes a cProfile of each coordinator's measuring window (bench/profiled.py).

    .venv/bin/python bench/coordinator_load.py [--databases sqlite,postgres]
        [--scenarios lifecycles,horde,polls,queue,streams] [--seconds 10] [--workers 4]
        [--requesters 8] [--pollers 16] [--sizes 1000,10000,100000] [--streams 1000]
        [--concurrency 32] [--coordinator-path LABEL=DIR ...] [--rounds 1] [--pin 0,1|none]
        [--profile DIR] [--quick]

PostgreSQL: IDLEGRID_BENCH_POSTGRES_URL (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test) names the server; each run creates a
database idlegrid_bench_<pid> there (through the `postgres` database) and drops it after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped,unused-ignore]
from processes import wait_line

POSTGRES_URL = os.environ.get(
    "IDLEGRID_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
GRANT = 10**12  # kudos per account: never the limit
RELAXED = "1000000/1000000,1000000/1000000"  # per key and per IP, for every rate-limit scope
WORKER_ACCOUNT = "bench-workers"  # trusted (--trust-account): no spot checks, no holds
MODEL = "bench"
SIZE = 64  # every job is SIZE x SIZE, 1 step, 1 image
SUBMITS_PER_SECOND = 20  # streams scenario
MAX_IN_FLIGHT = 64  # ... submits at once at most
STREAMS_PER_WATCHER = 16  # streamed jobs per account
BACKLOG_PER_WORKER = 4  # lifecycles: jobs outstanding per worker at most
PROFILED = Path(__file__).with_name("profiled.py")  # --profile runs the coordinator in it
POLL_JOBS = 256  # polls: AI Horde requests whose status is polled

# the targets
TARGET_P50_MS = 5.0  # pop and submit at 100 000 queued jobs, SQLite
TARGET_P99_MS = 25.0
TARGET_GROWTH = 1.5  # p50 at 100k / p50 at 1k
TARGET_SIZE = 100_000
TARGET_LIFECYCLES = 250.0  # per second, SQLite, one process on one core (both protocols)
TARGET_POLLS = 1500.0  # AI Horde status checks per second, SQLite, one process on one core
TARGET_STREAMS = 1000
TARGET_STATUS_P50_MS = 20.0  # with TARGET_STREAMS open streams and 20 submits/s

SCENARIOS = ("lifecycles", "horde", "polls", "queue", "streams")
SQLITE = "sqlite, 1 process"
PG1 = "postgres, 1 process"
PG2 = "postgres, 2 processes"


Loop = Callable[[], Coroutine[Any, Any, None]]


class BenchError(Exception):
    pass


class NotFoundError(BenchError):
    """A 404: from a coordinator older than the route asked for, among others."""


class TooManyErrors(BenchError):
    """Ends a scenario: more errors than a benchmark can shrug off."""


# --- measurements ------------------------------------------------------------------------


@dataclass
class Samples:
    """Latencies (seconds) and errors per operation."""

    times: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    recording: bool = True

    def add(self, op: str, seconds: float) -> None:
        if self.recording:
            self.times.setdefault(op, []).append(seconds)

    def error(self, op: str, exc: BaseException) -> None:
        self.errors[op] = self.errors.get(op, 0) + 1
        if not self.first_error:
            self.first_error = f"{op}: {type(exc).__name__}: {str(exc)[:300]}"
        if sum(self.errors.values()) > 50:
            raise TooManyErrors(f"{self.first_error} (and 50 more errors)")

    def pct(self, op: str, q: float) -> float | None:
        return percentile(self.times.get(op, []), q)

    def count(self, op: str) -> int:
        return len(self.times.get(op, []))

    def error_text(self) -> str:
        return ", ".join(f"{op} {n}" for op, n in sorted(self.errors.items())) or "0"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@contextlib.contextmanager
def timed(samples: Samples, op: str) -> Iterator[None]:
    began = time.perf_counter()
    try:
        yield
    except Exception as exc:  # HTTP errors, the SDK's errors (ApiError, ...)
        samples.error(op, exc)
        raise
    samples.add(op, time.perf_counter() - began)


def forever(body: Loop) -> Loop:
    """A task that runs `body` again and again; an error (already counted by `timed`)
    does not end it, too many errors do."""

    async def loop() -> None:
        while True:
            try:
                await body()
            except TooManyErrors:
                raise
            except Exception:
                await asyncio.sleep(0.05)

    return loop


# --- the coordinator process ---------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What this coordinator's `--help` offers."""

    processes: bool
    scopes: tuple[str, ...]
    stream_flags: tuple[str, ...]


@dataclass(frozen=True)
class Code:
    """Which coordinator code runs: `path` first on its PYTHONPATH (None: this checkout's)."""

    label: str
    path: Path | None


def probe_features(code: Code | None = None) -> Features:
    env = dict(os.environ)
    if code is not None and code.path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code.path), env.get("PYTHONPATH", "")])
    help_text = subprocess.run(
        [sys.executable, "-m", "client.cli", "coordinator", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
        cwd=None if code is None else code.path,
    ).stdout
    flags = set(re.findall(r"^\s+(--[a-z][a-z0-9-]*)", help_text, re.MULTILINE))
    flat = " ".join(help_text.split())
    found = re.search(r"for SCOPE, one of ([a-z0-9_, -]+?);", flat)
    scopes = (
        tuple(s.strip() for s in found.group(1).split(",") if s.strip())
        if found
        else ("submit", "pop")
    )
    streams = tuple(sorted(f for f in flags if f.startswith("--max") and "stream" in f))
    return Features("--processes" in flags, scopes, streams)


@dataclass
class Usage:
    """The coordinator's resources: RSS (MB) now and at peak, CPU seconds."""

    peak_mb: float = 0.0


class Coordinator:
    """`idlegrid coordinator` in its own process group; stopped by pid."""

    def __init__(
        self,
        work: Path,
        features: Features,
        database_url: str | None,
        processes: int,
        streams: int,
        code: Code | None = None,
        cpu: int | None = None,
    ) -> None:
        self.work = work
        self.code = code
        self.cpu = cpu
        self.profile: Path | None = None  # write cProfile's stats there at exit
        self.features = features
        self.database_url = database_url
        self.processes = processes
        self.streams = streams
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.usage = Usage()

    def start(self) -> str:
        self.work.mkdir(parents=True, exist_ok=True)
        # under --profile: python bench/profiled.py OUT client.cli ...
        run = ["-m"] if self.profile is None else [str(PROFILED), str(self.profile)]
        command = [
            sys.executable, *run, "client.cli", "coordinator", "--host", "127.0.0.1",
            "--port", "0", "--data-dir", str(self.work / "data"), "--grant", str(GRANT),
            "--trust-account", WORKER_ACCOUNT, "--spot-check-rate", "0",
            "--log-level", "WARNING",
        ]  # fmt: skip
        for scope in self.features.scopes:
            command += ["--rate-limit", f"{scope}={RELAXED}"]
        for flag in self.features.stream_flags:
            command += [flag, str(self.streams * 2 + 100)]
        if self.database_url is not None:
            command += ["--database-url", self.database_url]
        if self.processes > 1:
            command += ["--processes", str(self.processes)]
        log = self.work / "coordinator.log"
        env = dict(os.environ)
        if self.code is not None and self.code.path is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.code.path), env.get("PYTHONPATH", "")])
        cpu = self.cpu
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                # `python -m` puts the working directory first on sys.path, before PYTHONPATH
                cwd=None if self.code is None else self.code.path,
                # its --processes children inherit the core
                preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}),
            )
        self.url = wait_line(log, r"listening on (http://\S+)", self.proc, 120)
        return self.url

    def _processes(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        total = 0
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        self.usage.peak_mb = max(self.usage.peak_mb, total / 2**20)
        return total / 2**20

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def signal_profile(self, signum: int) -> None:
        """Start (SIGUSR1) or stop and write (SIGUSR2) the profile of a --profile run."""
        if self.profile is not None and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.work / "coordinator.log").read_text(errors="replace")
            raise BenchError(f"the coordinator exited ({self.proc.returncode}):\n{log[-3000:]}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        # whatever it left behind in its group (e.g. the processes of --processes)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def sample_rss(coordinator: Coordinator) -> None:
    """Keep the coordinator's peak RSS up to date while a scenario runs."""
    while True:
        coordinator.rss_mb()
        await asyncio.sleep(0.5)


# --- PostgreSQL ----------------------------------------------------------------------------


def _admin_dsn(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return (
        make_url(url)
        .set(drivername="postgresql", database=database)
        .render_as_string(hide_password=False)
    )


async def create_database(name: str) -> str:
    """A fresh database on the bench server; returns its SQLAlchemy URL."""
    import asyncpg
    from sqlalchemy.engine import make_url

    conn = await asyncpg.connect(_admin_dsn(POSTGRES_URL, "postgres"), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return str(make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False))


async def drop_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_admin_dsn(POSTGRES_URL, "postgres"), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def postgres_reachable() -> str | None:
    """None if the server answers, else why not."""
    import asyncpg

    try:
        conn = await asyncpg.connect(_admin_dsn(POSTGRES_URL, "postgres"), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"no PostgreSQL server ({type(exc).__name__})"
    await conn.close()
    return None


# --- simulated clients ---------------------------------------------------------------------


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (40, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


class BenchWorker:
    """A worker without an engine: a real identity, real signatures, the same PNG always."""

    def __init__(self, url: str, name: str, owner_key: str, png: bytes) -> None:
        from protocol.signing import Identity, sha256_hex

        self.url = url
        self.name = name
        self._owner_key = owner_key
        self._identity = Identity.generate()
        self._png = png
        self._sha256 = sha256_hex(png)
        self._token = ""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        # upload and finish in one request, until a coordinator answers 404 to it
        self._final_upload = True
        # --distinct-images: every upload a PNG of its own
        self.distinct = False

    async def aclose(self) -> None:
        await self._session.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        async with self._session.request(
            method, self.url + path, json=json, data=data, headers=headers
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                error = NotFoundError if resp.status == 404 else BenchError
                raise error(f"{method} {path}: HTTP {resp.status} {text[:300]}")
            return text

    async def register(self) -> None:
        from protocol.messages import Challenge, WorkerRegistered
        from protocol.signing import account_binding, registration_message

        challenge = await self._call(
            "POST", "/api/v1/workers/challenge", json={"purpose": "register"}
        )
        nonce = Challenge.model_validate_json(challenge).nonce
        key = self._identity.public_key
        account = account_binding(self._owner_key)
        body = {
            "name": self.name,
            "public_key": key,
            "account": account,
            "nonce": nonce,
            "signature": self._identity.sign(registration_message(self.name, key, account, nonce)),
        }
        text = await self._call(
            "POST", "/api/v1/workers/register", json=body, headers={"apikey": self._owner_key}
        )
        self._token = WorkerRegistered.model_validate_json(text).token

    async def pop(self, wait: float) -> Any:
        """The LeasedJob, or None."""
        from protocol.messages import PopResponse

        body = {"models": [MODEL], "max_pixels": SIZE * SIZE, "max_steps": 1, "wait": wait}
        text = await self._call(
            "POST", "/api/v1/workers/pop", json=body, headers={"X-Worker-Token": self._token}
        )
        return PopResponse.model_validate_json(text).job

    async def complete(self, job: Any) -> None:
        """Upload the image (raw PNG, signed) and finalize: the coordinator pays."""
        from protocol.messages import (
            IMAGE_SEED_HEADER,
            IMAGE_SHA256_HEADER,
            IMAGE_SIGNATURE_HEADER,
        )
        from protocol.signing import result_message, sha256_hex

        seed = job.params.seeds()[0]
        png, sha256 = self._png, self._sha256
        if self.distinct:  # a PNG of its own (a text chunk naming the job): stored anew
            png = _with_text(png, job.id)
            sha256 = sha256_hex(png)
        signature = self._identity.sign(result_message(job.id, job.params_hash, sha256))
        headers = {
            "X-Worker-Token": self._token,
            "Content-Type": "image/png",
            IMAGE_SEED_HEADER: str(seed),
            IMAGE_SHA256_HEADER: sha256,
            IMAGE_SIGNATURE_HEADER: signature,
        }
        if self._final_upload:  # one request, where the coordinator has the route
            path = f"/api/v1/jobs/{job.id}/images/0/result"
            try:
                await self._call("PUT", path, data=png, headers=headers)
                return
            except NotFoundError:
                self._final_upload = False  # an older coordinator (--coordinator-path)
        await self._call("PUT", f"/api/v1/jobs/{job.id}/images/0", data=png, headers=headers)
        image = {"index": 0, "seed": seed, "sha256": sha256, "signature": signature}
        await self._call(
            "POST",
            f"/api/v1/jobs/{job.id}/result",
            json={"images": [image]},
            headers={"X-Worker-Token": self._token},
        )


def _with_text(png: bytes, text: str) -> bytes:
    """`png` with a tEXt chunk holding `text` after its IHDR: the same pixels, other bytes."""
    import struct
    import zlib

    data = b"Comment\x00" + text.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data) & 0xFFFFFFFF)
    head = 8 + 25  # signature, IHDR
    return png[:head] + chunk + png[head:]


def tiny_webp_base64() -> str:
    """What an AI Horde worker submits: the image as base64 WebP."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (160, 90, 40)).save(buffer, format="WEBP", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class HordeJob:
    id: str


class HordeBenchWorker:
    """An AI Horde worker (horde-worker-reGen's requests): its owner's API key and a name,
    POST /api/v2/generate/pop, then /api/v2/generate/submit with a base64 WebP."""

    def __init__(self, url: str, name: str, owner_key: str, webp: str) -> None:
        self.url = url
        self.name = name
        self._headers = {"apikey": owner_key, "Client-Agent": "idlegrid-bench:1:bench"}
        self._webp = webp
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))

    async def aclose(self) -> None:
        await self._session.close()

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        async with self._session.post(self.url + path, json=body, headers=self._headers) as resp:
            if resp.status >= 400:
                raise BenchError(f"POST {path}: HTTP {resp.status} {(await resp.text())[:300]}")
            return await resp.json()

    async def register(self) -> None:
        """AI Horde workers need no registration: the first pop makes the worker."""

    async def pop(self, wait: float) -> HordeJob | None:
        """The job (None when the queue has nothing for it); AI Horde's pop never waits, so
        an empty one is followed by a pause of `wait` (its workers poll about once a
        second; a shorter pause here keeps the queue from being the limit)."""
        body = {"name": self.name, "models": [MODEL], "max_pixels": SIZE * SIZE}
        found = await self._post("/api/v2/generate/pop", body)
        if not found.get("id"):
            await asyncio.sleep(min(wait, 0.05))
            return None
        return HordeJob(found["id"])

    async def complete(self, job: HordeJob) -> None:
        body = {"id": job.id, "generation": self._webp, "state": "ok", "seed": 0}
        await self._post("/api/v2/generate/submit", body)


@dataclass
class Grid:
    """A running coordinator with its requesters and workers."""

    coordinator: Coordinator
    requesters: list[Any]  # client.sdk.AsyncClient
    workers: list[Any]  # BenchWorker or HordeBenchWorker
    keys: list[str] = field(default_factory=list)  # the requesters' API keys

    async def aclose(self) -> None:
        for client in self.requesters:
            await client.aclose()
        for worker in self.workers:
            await worker.aclose()


async def open_grid(
    coordinator: Coordinator, args: argparse.Namespace, png: bytes, *, horde: bool = False
) -> Grid:
    """Requesters and workers: ours (signed, trusted), or with `horde` AI Horde workers
    (unsigned, never trusted: their pay is held for disputes)."""
    from client.sdk import AsyncClient

    url = coordinator.url
    async with AsyncClient(url) as anonymous:
        keys = [
            (await anonymous.register(f"bench-req-{i}")).api_key for i in range(args.requesters)
        ]
        owner = (await anonymous.register(WORKER_ACCOUNT)).api_key
    grid = Grid(coordinator, [AsyncClient(url, key) for key in keys], [], keys)
    webp = tiny_webp_base64() if horde else ""
    for i in range(args.workers):
        name = f"bench-worker-{i}"
        worker: Any
        if horde:
            worker = HordeBenchWorker(url, name, owner, webp)
        else:
            worker = BenchWorker(url, name, owner, png)
            worker.distinct = args.distinct_images
        grid.workers.append(worker)
        await worker.register()
    return grid


def job_params() -> Any:
    from protocol.params import ImageParams

    return ImageParams(prompt="a load test", width=SIZE, height=SIZE, steps=1)


async def submit(client: Any, samples: Samples, params: Any, op: str = "submit") -> str:
    """One timed submit (recorded as `op`); retries after a 429 (not timed)."""
    from client.errors import RateLimited

    while True:
        try:
            with timed(samples, op):
                created = await client.submit_image(params)
            return str(created.id)
        except RateLimited as exc:
            await asyncio.sleep(exc.retry_after)


async def fill(
    requesters: list[Any],
    count: int,
    concurrency: int,
    jobs: list[tuple[int, str]],
    samples: Samples,
) -> float:
    """Submit `count` jobs, `concurrency` in flight, round robin over the requesters;
    appends (requester index, job id) to `jobs`; returns jobs per second. A failed submit
    is counted in `samples`' errors and tried again; its latency is not recorded."""
    if count <= 0:
        return math.nan
    params = job_params()
    counter = itertools.count()
    samples.recording = False

    async def one() -> None:
        while (i := next(counter)) < count:
            owner = i % len(requesters)
            while True:
                try:
                    job_id = await submit(requesters[owner], samples, params, "fill")
                    jobs.append((owner, job_id))
                    break
                except TooManyErrors:
                    raise
                except Exception:  # counted by timed(); try again
                    await asyncio.sleep(0.1)

    began = time.perf_counter()
    tasks = [asyncio.create_task(one()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return count / (time.perf_counter() - began)


async def run_window(
    grid: Grid,
    tasks: list[Loop],
    samples: Samples,
    warmup: float,
    seconds: float,
) -> tuple[float, float, float]:
    """Run `tasks` for warmup + seconds, recording only after the warm-up; returns the
    window's start (perf_counter) and the coordinator's and this process's CPU share."""
    samples.recording = False
    running = [asyncio.create_task(task()) for task in tasks]
    me = psutil.Process()
    try:
        await _sleep_watching(running, warmup)
        samples.recording = True
        grid.coordinator.signal_profile(signal.SIGUSR1)
        start = time.perf_counter()
        coordinator_cpu = grid.coordinator.cpu_seconds()
        own = me.cpu_times()
        await _sleep_watching(running, seconds)
        elapsed = time.perf_counter() - start
        grid.coordinator.signal_profile(signal.SIGUSR2)
        coordinator_share = (grid.coordinator.cpu_seconds() - coordinator_cpu) / elapsed
        after = me.cpu_times()
        own_share = (after.user + after.system - own.user - own.system) / elapsed
        samples.recording = False
        grid.coordinator.check_alive()
        return start, coordinator_share * 100, own_share * 100
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _sleep_watching(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    """Sleep, but stop with the error of a task that died."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        if not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error


# --- scenarios -----------------------------------------------------------------------------


@dataclass
class LifecycleRow:
    config: str
    note: str = ""
    per_second: float = math.nan
    samples: Samples = field(default_factory=Samples)
    lifecycle: list[float] = field(default_factory=list)
    coordinator_cpu: float = math.nan
    bench_cpu: float = math.nan
    rss_mb: float = math.nan
    peak_mb: float = math.nan


async def lifecycles(grid: Grid, row: LifecycleRow, args: argparse.Namespace) -> None:
    params = job_params()
    samples = row.samples
    backlog = asyncio.Semaphore(BACKLOG_PER_WORKER * len(grid.workers))
    submitted: dict[str, float] = {}
    settled: list[tuple[float, float | None]] = []  # (when, lifecycle seconds)

    def requester(client: Any) -> Loop:
        async def once() -> None:
            await backlog.acquire()
            began = time.perf_counter()
            try:
                job_id = await submit(client, samples, params)
            except BaseException:
                backlog.release()
                raise
            submitted[job_id] = began

        return forever(once)

    def worker(bench: BenchWorker) -> Loop:
        async def once() -> None:
            with timed(samples, "pop"):
                job = await bench.pop(wait=1.0)
            if job is None:
                return
            try:
                with timed(samples, "result"):
                    await bench.complete(job)
            finally:
                backlog.release()
            now = time.perf_counter()
            began = submitted.pop(job.id, None)
            settled.append((now, None if began is None else now - began))

        return forever(once)

    tasks = [requester(c) for c in grid.requesters] + [worker(w) for w in grid.workers]
    warmup = min(2.0, args.seconds / 5)
    start, row.coordinator_cpu, row.bench_cpu = await run_window(
        grid, tasks, samples, warmup, args.seconds
    )
    window = [(t, life) for t, life in settled if start <= t <= start + args.seconds]
    row.per_second = len(window) / args.seconds
    row.lifecycle = [life for _, life in window if life is not None]
    row.rss_mb = grid.coordinator.rss_mb()


@dataclass
class PollRow:
    config: str
    note: str = ""
    per_second: float = math.nan
    samples: Samples = field(default_factory=Samples)
    coordinator_cpu: float = math.nan
    bench_cpu: float = math.nan
    rss_mb: float = math.nan


async def polls(grid: Grid, row: PollRow, args: argparse.Namespace) -> None:
    """AI Horde clients waiting for their images: POLL_JOBS requests queued through
    POST /api/v2/generate/async (a quarter of them then finished by the workers), and
    --pollers tasks each GETting /api/v2/generate/check/{id} of a random one, one after
    another, without an API key (as AI Horde's clients poll)."""
    url = grid.coordinator.url
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    )
    try:
        ids: list[str] = []
        body = {"prompt": "a load test", "params": {"width": SIZE, "height": SIZE, "steps": 1}}
        body["models"] = [MODEL]
        for i in range(POLL_JOBS):
            headers = {"apikey": grid.keys[i % len(grid.keys)]}
            async with session.post(
                f"{url}/api/v2/generate/async", json=body, headers=headers
            ) as resp:
                if resp.status != 202:
                    raise BenchError(f"v2 submit: HTTP {resp.status} {await resp.text()}")
                ids.append((await resp.json())["id"])
        for i in range(POLL_JOBS // 4):
            worker = grid.workers[i % len(grid.workers)]
            job = await worker.pop(wait=0.0)
            if job is not None:
                await worker.complete(job)
        samples = row.samples

        async def poll() -> None:
            job_id = random.choice(ids)
            with timed(samples, "poll"):
                async with session.get(f"{url}/api/v2/generate/check/{job_id}") as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise BenchError(f"check: HTTP {resp.status}")

        warmup = min(1.0, args.seconds / 5)
        _, row.coordinator_cpu, row.bench_cpu = await run_window(
            grid, [forever(poll) for _ in range(args.pollers)], samples, warmup, args.seconds
        )
        row.per_second = samples.count("poll") / args.seconds
        row.rss_mb = grid.coordinator.rss_mb()
    finally:
        await session.close()


@dataclass
class QueueRow:
    config: str
    size: int
    note: str = ""
    fill_per_second: float = math.nan
    samples: Samples = field(default_factory=Samples)
    empty_pops: int = 0
    coordinator_cpu: float = math.nan
    bench_cpu: float = math.nan
    rss_mb: float = math.nan


async def queue_sizes(
    grid: Grid, config: str, args: argparse.Namespace, rows: list[QueueRow]
) -> None:
    params = job_params()
    jobs: list[tuple[int, str]] = []  # what was submitted (the queue holds about its tail)
    queued = 0
    for size in args.sizes:
        row = QueueRow(config, size)
        rows.append(row)
        row.fill_per_second = await fill(
            grid.requesters, size - queued, args.concurrency, jobs, row.samples
        )
        queued = size
        grid.coordinator.check_alive()
        samples, turn = row.samples, itertools.count()

        def pair(bench: BenchWorker, row: QueueRow = row, turn: Iterator[int] = turn) -> Loop:
            async def once() -> None:
                with timed(row.samples, "pop"):
                    job = await bench.pop(wait=0.0)
                if job is None:
                    row.empty_pops += 1
                else:
                    with timed(row.samples, "result"):
                        await bench.complete(job)
                owner = next(turn) % len(grid.requesters)
                client = grid.requesters[owner]
                job_id = await submit(client, row.samples, params)
                with timed(row.samples, "status"):
                    await client.job(job_id)

            return forever(once)

        warmup = min(1.0, args.seconds / 5)
        _, row.coordinator_cpu, row.bench_cpu = await run_window(
            grid,
            [pair(w) for w in grid.workers[: args.queue_clients]],
            samples,
            warmup,
            args.seconds,
        )
        row.rss_mb = grid.coordinator.rss_mb()
        print(
            f"  {config}: {size} queued, pop p50 {ms(samples.pct('pop', 50))} ms, "
            f"submit p50 {ms(samples.pct('submit', 50))} ms",
            flush=True,
        )


@dataclass
class StreamRow:
    config: str
    wanted: int
    note: str = ""
    opened: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    open_seconds: float = math.nan
    submits_per_second: float = math.nan
    events_per_second: float = math.nan
    samples: Samples = field(default_factory=Samples)
    coordinator_cpu: float = math.nan
    bench_cpu: float = math.nan
    rss_mb: float = math.nan


async def streams(grid: Grid, row: StreamRow, args: argparse.Namespace) -> None:
    """Streams come from many users, as they would: the streamed jobs belong to watcher
    accounts with STREAMS_PER_WATCHER each (a per-key cap is not what is measured)."""
    from client.sdk import AsyncClient

    url = grid.coordinator.url
    async with AsyncClient(url) as anonymous:
        keys = [
            (await anonymous.register(f"bench-watch-{i}")).api_key
            for i in range(math.ceil(args.streams / STREAMS_PER_WATCHER))
        ]
    watchers = [AsyncClient(url, key) for key in keys]
    try:
        await _streams(grid, watchers, row, args)
    finally:
        for watcher in watchers:
            await watcher.aclose()


async def _streams(
    grid: Grid, watchers: list[Any], row: StreamRow, args: argparse.Namespace
) -> None:
    jobs: list[tuple[int, str]] = []
    await fill(watchers, args.streams, args.concurrency, jobs, row.samples)
    url = grid.coordinator.url
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30)
    )
    opening = asyncio.Semaphore(64)
    settled = 0
    all_settled = asyncio.Event()
    events = 0

    def one_settled() -> None:
        nonlocal settled
        settled += 1
        if settled == len(jobs):
            all_settled.set()

    async def stream(owner: int, job_id: str) -> None:
        nonlocal events
        key = watchers[owner].api_key
        headers = {"apikey": key, "Accept": "text/event-stream"}
        first = True
        try:
            async with opening:
                resp = await session.get(f"{url}/api/v1/jobs/{job_id}/events", headers=headers)
                if resp.status != 200:
                    row.refused[resp.status] = row.refused.get(resp.status, 0) + 1
                    resp.release()
                    return
                async for line in resp.content:  # until the first event: open
                    if line.startswith(b"data:"):
                        events += 1
                        row.opened += 1
                        one_settled()
                        first = False
                        break
            async for line in resp.content:
                if line.startswith(b"data:"):
                    events += 1
            resp.release()
        except aiohttp.ClientError:
            row.refused[0] = row.refused.get(0, 0) + 1
        finally:
            if first:
                one_settled()

    began = time.perf_counter()
    readers = [asyncio.create_task(stream(owner, job_id)) for owner, job_id in jobs]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_settled.wait(), timeout=max(60.0, len(jobs) / 10))
        row.open_seconds = time.perf_counter() - began
        params = job_params()
        submits = 0

        async def submitter() -> None:
            """Open loop: a submit every 1/SUBMITS_PER_SECOND s, whether or not the last
            one has been answered (at most MAX_IN_FLIGHT at once)."""
            nonlocal submits
            in_flight: set[asyncio.Task[None]] = set()

            async def one(owner: int) -> None:
                nonlocal submits
                with contextlib.suppress(Exception):  # counted by timed()
                    await submit(grid.requesters[owner], row.samples, params)
                    if row.samples.recording:
                        submits += 1

            start = time.perf_counter()
            try:
                for i in itertools.count():
                    await asyncio.sleep(
                        max(0.0, start + i / SUBMITS_PER_SECOND - time.perf_counter())
                    )
                    if len(in_flight) < MAX_IN_FLIGHT:
                        task = asyncio.create_task(one(i % len(grid.requesters)))
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
            finally:
                for task in list(in_flight):
                    task.cancel()

        async def status() -> None:
            owner, job_id = random.choice(jobs)
            with timed(row.samples, "status"):
                await watchers[owner].job(job_id)

        warmup = min(1.0, args.seconds / 5)
        events_before = 0

        async def count_events_at_start() -> None:
            nonlocal events_before
            await asyncio.sleep(warmup)
            events_before = events

        _, row.coordinator_cpu, row.bench_cpu = await run_window(
            grid,
            [submitter, forever(status), count_events_at_start],
            row.samples,
            warmup,
            args.seconds,
        )
        row.submits_per_second = submits / args.seconds
        row.events_per_second = (events - events_before) / args.seconds
        row.rss_mb = grid.coordinator.rss_mb()
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await session.close()


# --- one configuration -----------------------------------------------------------------------


@dataclass
class Results:
    lifecycles: list[LifecycleRow] = field(default_factory=list)
    horde: list[LifecycleRow] = field(default_factory=list)  # AI Horde's worker protocol
    polls: list[PollRow] = field(default_factory=list)
    queue: list[QueueRow] = field(default_factory=list)
    streams: list[StreamRow] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    """Where a scenario runs: which database, processes, code and cores."""

    label: str  # the configuration as reported ("sqlite, 1 process", + " [code]")
    database: str
    processes: int
    code: Code
    features: Features
    coordinator_cpu: int | None
    horde: bool = False


async def with_grid(
    work: Path,
    run: Run,
    args: argparse.Namespace,
    png: bytes,
    scenario: Callable[[Grid], Awaitable[None]],
) -> float:
    """Start a fresh coordinator (and database), run `scenario`, stop everything;
    returns the coordinator's peak RSS in MB."""
    name = f"idlegrid_bench_{os.getpid()}"
    url = await create_database(name) if run.database == "postgres" else None
    coordinator = Coordinator(
        work, run.features, url, run.processes, args.streams, run.code, run.coordinator_cpu
    )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        coordinator.profile = args.profile / f"{work.name}.pstats"
    grid: Grid | None = None
    sampler: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(coordinator.start)
        sampler = asyncio.create_task(sample_rss(coordinator))
        grid = await open_grid(coordinator, args, png, horde=run.horde)
        await scenario(grid)
        return coordinator.usage.peak_mb
    finally:
        if sampler is not None:
            sampler.cancel()
        if grid is not None:
            await grid.aclose()
        await asyncio.to_thread(coordinator.stop)
        if url is not None:
            await drop_database(name)


async def unavailable_reason(database: str, processes: int, features: Features) -> str:
    if processes > 1 and not features.processes:
        return "n/a (coordinator has no --processes)"
    if database == "postgres":
        reason = await postgres_reachable()
        if reason is not None:
            return f"n/a ({reason} at {_server(POSTGRES_URL)})"
    return ""


async def run_scenario(
    what: str, run: Run, args: argparse.Namespace, work: Path, png: bytes, results: Results
) -> None:
    """One scenario in its own coordinator; its rows go to `results`."""
    label = run.label
    unavailable = await unavailable_reason(run.database, run.processes, run.features)
    slug = re.sub(r"[^a-z0-9]+", "-", label)

    async def attempt(scenario: Callable[[Grid], Awaitable[None]]) -> tuple[str, float]:
        """("", peak MB) or (why it failed, nan)."""
        print(f"{label}: {what} ...", flush=True)
        folder = work / f"{slug}-{what}-{next(_attempts)}"
        try:
            peak = await with_grid(folder, run, args, png, scenario)
            return "", peak
        except Exception as exc:  # BenchError, HTTP and the SDK's errors: report, go on
            failure: BaseException = exc
        except SystemExit as exc:  # wait_line: the coordinator did not start
            failure = exc
        lines = str(failure).strip().splitlines() or [type(failure).__name__]
        print(f"{label}: {what} failed: {failure!r}", file=sys.stderr)
        log = folder / "coordinator.log"
        if log.exists() and not isinstance(failure, SystemExit):
            tail = log.read_text(errors="replace")[-3000:]
            print(f"coordinator log (end):\n{tail}", file=sys.stderr, flush=True)
        return f"failed: {lines[0][:60]}", math.nan

    if what in ("lifecycles", "horde"):
        row = LifecycleRow(label)
        (results.horde if what == "horde" else results.lifecycles).append(row)
        if unavailable:
            row.note = unavailable
        else:
            row.note, row.peak_mb = await attempt(lambda g: lifecycles(g, row, args))
        if not row.note:
            print(f"  {label}: {what} {row.per_second:.0f}/s", flush=True)
    elif what == "polls":
        poll_row = PollRow(label)
        results.polls.append(poll_row)
        if unavailable:
            poll_row.note = unavailable
        else:
            poll_row.note, _ = await attempt(lambda g: polls(g, poll_row, args))
        if not poll_row.note:
            print(f"  {label}: polls {poll_row.per_second:.0f}/s", flush=True)
    elif what == "queue":
        if unavailable:
            results.queue.append(QueueRow(label, 0, unavailable))
        else:
            before = len(results.queue)
            note, _ = await attempt(lambda g: queue_sizes(g, label, args, results.queue))
            if note and len(results.queue) > before:
                results.queue[-1].note = note  # the size it was at
            elif note:
                results.queue.append(QueueRow(label, args.sizes[0], note))
    elif what == "streams":
        stream_row = StreamRow(label, args.streams)
        results.streams.append(stream_row)
        if unavailable:
            stream_row.note = unavailable
        else:
            stream_row.note, _ = await attempt(lambda g: streams(g, stream_row, args))


_attempts = itertools.count()


def _server(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return f"{parsed.host}:{parsed.port or 5432}"


# --- the report ----------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.1f}"


def num(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def cpu_ms(percent: float, per_second: float) -> str:
    """The coordinator's CPU time per operation: what its rate would be on a core of its
    own is about 1000 / this, whatever else the machine was doing."""
    if math.isnan(percent) or math.isnan(per_second) or per_second <= 0:
        return "-"
    return f"{percent * 10 / per_second:.2f}"


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("| " + " | ".join(cells) + " |")


def lifecycle_table(rows_of: list[LifecycleRow]) -> None:
    by_config = {r.config: r for r in rows_of if not r.note}
    rows = []
    for r in rows_of:
        if r.note:
            rows.append([r.config, r.note, *["-"] * 10])
            continue
        base = by_config.get(r.config.replace(PG1, SQLITE).replace(PG2, SQLITE))
        ratio = (
            f"{r.per_second / base.per_second:.2f}x"
            if base is not None and base.per_second > 0
            else "-"
        )
        rows.append([
            r.config, num(r.per_second), ratio,
            ms(percentile(r.lifecycle, 50)), ms(percentile(r.lifecycle, 99)),
            ms(r.samples.pct("pop", 50)), ms(r.samples.pct("result", 50)),
            r.samples.error_text(), num(r.coordinator_cpu), cpu_ms(r.coordinator_cpu, r.per_second),
            num(r.bench_cpu), f"{num(r.rss_mb)} / {num(r.peak_mb)}",
        ])  # fmt: skip
    table(
        ["coordinator", "lifecycles/s", "vs sqlite", "lifecycle p50", "lifecycle p99",
         "pop p50", "upload+result p50", "errors", "coord CPU %", "coord CPU ms each",
         "bench CPU %", "RSS / peak MB"],
        rows,
    )  # fmt: skip


def comparison(results: Results, codes: list[Code]) -> None:
    """Each code's rate beside the first's, per scenario and configuration (the mean of
    the rounds)."""
    if len(codes) < 2:
        return
    print(f"\n### {' vs '.join(c.label for c in codes)} (same run, interleaved)\n")
    rows = []
    for name, measured in (
        ("lifecycles/s", [(r.config, r.per_second) for r in results.lifecycles if not r.note]),
        ("AI Horde lifecycles/s", [(r.config, r.per_second) for r in results.horde if not r.note]),
        ("polls/s", [(r.config, r.per_second) for r in results.polls if not r.note]),
    ):
        for config in (SQLITE, PG1, PG2):
            rates = []
            for code in codes:
                found = [v for c, v in measured if c == f"{config} [{code.label}]"]
                rates.append(sum(found) / len(found) if found else math.nan)
            if all(math.isnan(v) for v in rates):
                continue
            first = rates[0]
            ratio = "-" if math.isnan(first) or first <= 0 else f"{rates[-1] / first:.1f}x"
            rows.append([f"{name}, {config}", *(num(v) for v in rates), ratio])
    table(["scenario", *(c.label for c in codes), "ratio"], rows)


def report(results: Results, args: argparse.Namespace) -> None:
    print(
        f"\n{args.workers} workers, {args.requesters} requesters, jobs {SIZE}x{SIZE} 1 step, "
        f"{args.seconds:g} s windows, latencies in ms (client-side, whole request)"
    )
    for title, rows_of in (
        ("Job lifecycles, our worker protocol (submit -> pop -> upload -> result -> settled)",
         results.lifecycles),
        ("Job lifecycles, AI Horde's worker protocol (submit -> /api/v2/generate/pop -> "
         "/api/v2/generate/submit with base64 WebP -> settled, pay held)", results.horde),
    ):  # fmt: skip
        if rows_of:
            print(f"\n### {title}\n")
            lifecycle_table(rows_of)
    if results.polls:
        print(
            f"\n### Status polls (GET /api/v2/generate/check/{{id}}, {args.pollers} pollers "
            f"one request after another, {POLL_JOBS} requests: 3/4 queued, 1/4 done)\n"
        )
        rows = []
        for p in results.polls:
            if p.note:
                rows.append([p.config, p.note, *["-"] * 6])
                continue
            rows.append([
                p.config, num(p.per_second), ms(p.samples.pct("poll", 50)),
                ms(p.samples.pct("poll", 99)), p.samples.error_text(),
                f"{num(p.coordinator_cpu)} / {num(p.bench_cpu)}",
                cpu_ms(p.coordinator_cpu, p.per_second), num(p.rss_mb),
            ])  # fmt: skip
        table(
            [
                "coordinator",
                "polls/s",
                "p50",
                "p99",
                "errors",
                "CPU % coord / bench",
                "coord CPU ms each",
                "RSS MB",
            ],
            rows,
        )
    if results.queue:
        print(
            "\n### Queue latency by queue size (each pop is answered by a completed job and "
            "a new submit, so the queue stays at its size)\n"
        )
        rows = []
        for q in results.queue:
            if q.note:
                rows.append([q.config, str(q.size or "-"), q.note, *["-"] * 10])
                continue
            s = q.samples
            rows.append([
                q.config, str(q.size), num(q.fill_per_second),
                ms(s.pct("pop", 50)), ms(s.pct("pop", 99)),
                ms(s.pct("submit", 50)), ms(s.pct("submit", 99)),
                ms(s.pct("status", 50)), ms(s.pct("status", 99)),
                str(s.count("pop")), s.error_text(),
                f"{num(q.coordinator_cpu)} / {num(q.bench_cpu)}", num(q.rss_mb),
            ])  # fmt: skip
        table(
            ["coordinator", "queued", "fill/s", "pop p50", "pop p99", "submit p50",
             "submit p99", "status p50", "status p99", "pops", "errors",
             "CPU % coord / bench", "RSS MB"],
            rows,
        )  # fmt: skip
    if results.streams:
        print(
            f"\n### Event streams (open SSE streams on queued jobs, {SUBMITS_PER_SECOND} "
            "submits/s, status GETs one after another)\n"
        )
        rows = []
        for st in results.streams:
            if st.note and not st.opened:
                rows.append([st.config, st.note, *["-"] * 9])
                continue
            refused = ", ".join(f"{k or 'error'}: {v}" for k, v in sorted(st.refused.items()))
            s = st.samples
            rows.append([
                st.config, f"{st.opened}/{st.wanted}", refused or "0", num(st.open_seconds, 1),
                num(st.submits_per_second, 1), ms(s.pct("submit", 50)),
                ms(s.pct("status", 50)), ms(s.pct("status", 99)), num(st.events_per_second),
                f"{num(st.coordinator_cpu)} / {num(st.bench_cpu)}", num(st.rss_mb),
            ])  # fmt: skip
        table(
            ["coordinator", "streams open", "refused", "open s", "submits/s", "submit p50",
             "status p50", "status p99", "events/s", "CPU % coord / bench", "RSS MB"],
            rows,
        )  # fmt: skip
    if any(429 in st.refused for st in results.streams):
        print(
            "\nrefused 429: the coordinator's caps on open streams per API key or per address "
            "(this bench raises them through --max-...-stream... flags when the coordinator "
            "has any)"
        )
    rows_cpu = [r.bench_cpu for r in results.lifecycles + results.horde + results.polls] + [
        r.bench_cpu for r in results.queue + results.streams
    ]
    busy = [cpu for cpu in rows_cpu if not math.isnan(cpu)]
    if busy and max(busy) >= 90:
        print(
            f"\nThe load generator used up to {max(busy):.0f}% of a core: where it did, the "
            "rates above are what it could drive, a lower bound for the coordinator."
        )
    targets(results)


def targets(results: Results) -> None:
    print("\n### Targets (printed, not asserted)\n")
    rows: list[list[str]] = []

    def check(name: str, measured: str, ok: bool | None) -> None:
        rows.append([name, measured, "-" if ok is None else "yes" if ok else "NO"])

    sqlite_rows = [q for q in results.queue if q.config == SQLITE and not q.note]
    if sqlite_rows:
        big = max(sqlite_rows, key=lambda q: q.size)
        small = min(sqlite_rows, key=lambda q: q.size)
        at = f" at {big.size}" + (
            "" if big.size >= TARGET_SIZE else f" (target is at {TARGET_SIZE})"
        )
        for op in ("pop", "submit"):
            p50, p99 = big.samples.pct(op, 50), big.samples.pct(op, 99)
            check(
                f"sqlite {op} p50 <= {TARGET_P50_MS:g} ms",
                f"{ms(p50)} ms{at}",
                None if p50 is None else p50 * 1000 <= TARGET_P50_MS,
            )
            check(
                f"sqlite {op} p99 <= {TARGET_P99_MS:g} ms",
                f"{ms(p99)} ms{at}",
                None if p99 is None else p99 * 1000 <= TARGET_P99_MS,
            )
        for op in ("pop", "submit"):
            p_big, p_small = big.samples.pct(op, 50), small.samples.pct(op, 50)
            if big is small or p_big is None or not p_small:
                check(f"sqlite {op} p50 growth <= {TARGET_GROWTH}x", "needs two sizes", None)
                continue
            growth = p_big / p_small
            check(
                f"sqlite {op} p50 growth <= {TARGET_GROWTH}x",
                f"{growth:.2f}x ({big.size} vs {small.size})",
                growth <= TARGET_GROWTH,
            )
    pairs = (("lifecycles", results.lifecycles), ("AI Horde lifecycles", results.horde))
    for name, rows_of in pairs:
        for r in rows_of:
            if r.config.startswith(SQLITE) and not r.note:
                check(
                    f"{r.config}: {name}/s >= {TARGET_LIFECYCLES:g}",
                    num(r.per_second),
                    r.per_second >= TARGET_LIFECYCLES,
                )
    for p in results.polls:
        if p.config.startswith(SQLITE) and not p.note:
            check(
                f"{p.config}: polls/s >= {TARGET_POLLS:g}",
                num(p.per_second),
                p.per_second >= TARGET_POLLS,
            )
    life = {r.config: r for r in results.lifecycles if not r.note}
    if PG1 in life and PG2 in life:
        one, two = life[PG1].per_second, life[PG2].per_second
        check("postgres 2 processes > 1 process", f"{num(two)} vs {num(one)}/s", two > one)
    else:
        missing = next((r.note for r in results.lifecycles if r.config == PG2 and r.note), "")
        if any(r.config.startswith("postgres") for r in results.lifecycles):
            check("postgres 2 processes > 1 process", missing or "not measured", None)
    for st in results.streams:
        p50 = st.samples.pct("status", 50)
        if p50 is None:
            continue
        note = "" if st.opened >= TARGET_STREAMS else f" (target is with {TARGET_STREAMS})"
        check(
            f"{st.config}: status p50 <= {TARGET_STATUS_P50_MS:g} ms with streams",
            f"{ms(p50)} ms with {st.opened} streams{note}",
            p50 * 1000 <= TARGET_STATUS_P50_MS,
        )
    if rows:
        table(["target", "measured", "met"], rows)
    else:
        print("(nothing measured)")


# --- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--databases", default="sqlite,postgres", help="sqlite and/or postgres")
    parser.add_argument("--sizes", help="queued jobs to measure at (default 1000,10000,100000)")
    parser.add_argument("--workers", type=int, default=4, help="simulated workers (default 4)")
    parser.add_argument("--requesters", type=int, default=8, help="requester accounts (default 8)")
    parser.add_argument("--seconds", type=float, help="measuring window per scenario (default 10)")
    parser.add_argument("--streams", type=int, help="event streams to open (default 1000)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="submits in flight while filling (default 32)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"which of {','.join(SCENARIOS)} (default all)",
    )
    parser.add_argument(
        "--pollers", type=int, default=16, help="polls: concurrent pollers (default 16)"
    )
    parser.add_argument(
        "--coordinator-path",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="run the coordinator from DIR (first on its PYTHONPATH), e.g. a worktree of an "
        "older commit; repeat to compare: every scenario runs once per code, interleaved "
        "(default: this checkout)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="profile each coordinator (its main process) during the measuring window with "
        "cProfile; the stats go to DIR/<scenario>.pstats (read them with python -m pstats)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each scenario per code (default 1)"
    )
    parser.add_argument(
        "--pin",
        default="auto",
        metavar="COORD,BENCH",
        help="cores for the coordinator's processes and for this load generator, e.g. 0,1; "
        "'none' to leave them free (default auto: 0,1 on a machine with 2 or more)",
    )
    parser.add_argument(
        "--queue-clients",
        type=int,
        default=1,
        help="pop/submit/status loops in the queue scenario (default %(default)s, like the "
        "issue's baseline of one worker popping: latency without queueing behind others)",
    )
    parser.add_argument(
        "--distinct-images",
        action="store_true",
        help="our workers upload a PNG of their own for every job (a text chunk naming it), "
        "so each is stored anew; by default every upload is the same PNG, stored once",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1000 queued jobs, 3 s windows, 200 streams (unless given)",
    )
    args = parser.parse_args()
    if args.sizes is None:
        args.sizes = "1000" if args.quick else "1000,10000,100000"
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error("--sizes: comma-separated numbers of jobs, e.g. 1000,10000")
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if args.streams is None:
        args.streams = 200 if args.quick else TARGET_STREAMS
    args.databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    args.scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if unknown := set(args.databases) - {"sqlite", "postgres"}:
        parser.error(f"--databases: unknown {', '.join(sorted(unknown))}; use sqlite,postgres")
    if unknown := args.scenarios - set(SCENARIOS):
        parser.error(f"--scenarios: unknown {', '.join(sorted(unknown))}")
    if min(args.workers, args.requesters, args.concurrency, args.pollers, args.rounds) < 1:
        parser.error("--workers, --requesters, --concurrency, --pollers, --rounds: at least 1")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    args.codes = []
    for item in args.coordinator_path:
        label, sep, folder = item.partition("=")
        if not sep or not label or not Path(folder, "coordinator").is_dir():
            parser.error(f"--coordinator-path {item}: use LABEL=DIR, DIR holding coordinator/")
        args.codes.append(Code(label, Path(folder).resolve()))
    if not args.codes:
        args.codes = [Code("this checkout", None)]
    if args.pin == "auto":
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        args.pin = (cores[0], cores[1]) if len(cores) >= 2 else None
    elif args.pin == "none":
        args.pin = None
    else:
        try:
            coord, bench = (int(c) for c in args.pin.split(","))
        except ValueError:
            parser.error("--pin: two core numbers COORD,BENCH (e.g. 0,1), or none")
        args.pin = (coord, bench)
    if not args.sizes or min(args.sizes) < 1 or args.streams < 1:
        parser.error("--sizes and --streams must be positive")
    return args


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop for the load generator when it is installed (a cheaper client measures more)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main() -> int:
    args = parse_args()
    # one descriptor per stream here and in the coordinator (it inherits the limit)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.streams * 2 + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    features = {code: probe_features(code) for code in args.codes}
    first = features[args.codes[0]]
    notes = [f"rate-limit scopes relaxed: {', '.join(first.scopes)}"]
    notes.append(
        f"stream caps raised: {', '.join(first.stream_flags)}"
        if first.stream_flags
        else "no stream-cap flags"
    )
    notes.append("--processes: yes" if first.processes else "--processes: not available")
    notes.append("load generator on " + ("uvloop" if _fast_loop() else "asyncio"))
    coordinator_cpu = None
    if args.pin is not None:
        coordinator_cpu, bench_cpu = args.pin
        os.sched_setaffinity(0, {bench_cpu})
        notes.append(f"coordinator on core {coordinator_cpu}, load generator on core {bench_cpu}")
    else:
        notes.append("not pinned to cores")
    print("coordinator: " + "; ".join(notes), flush=True)
    configs = []
    if "sqlite" in args.databases:
        configs.append((SQLITE, "sqlite", 1))
    if "postgres" in args.databases:
        configs += [(PG1, "postgres", 1), (PG2, "postgres", 2)]
    png = tiny_png()
    results = Results()
    loop_factory = _fast_loop()
    several = len(args.codes) > 1
    with tempfile.TemporaryDirectory(prefix="idlegrid-load-") as work:
        for label, database, processes in configs:
            for what in (s for s in SCENARIOS if s in args.scenarios):
                # interleaved: the machine's load falls on every code alike
                for _ in range(args.rounds):
                    for code in args.codes:
                        run = Run(
                            f"{label} [{code.label}]" if several else label,
                            database,
                            processes,
                            code,
                            features[code],
                            coordinator_cpu,
                            horde=what == "horde",
                        )
                        with asyncio.Runner(loop_factory=loop_factory) as runner:
                            runner.run(run_scenario(what, run, args, Path(work), png, results))
    report(results, args)
    comparison(results, args.codes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
