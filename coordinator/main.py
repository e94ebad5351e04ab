"""`idlegrid coordinator ...`: parse flags into a CoordinatorConfig and serve.

With `--processes N` (PostgreSQL only) this process becomes a supervisor: it holds the port
(a socket bound with SO_REUSEPORT, never listening), runs the migrations, starts N
coordinator processes (multiprocessing "spawn": fresh interpreters that inherit no sockets)
that each listen on that port with SO_REUSEPORT, so the kernel spreads connections over
them. It prints the usual "listening" line once all are ready, forwards SIGTERM/SIGINT to
them, and if one dies unexpectedly it stops the others and exits non-zero (a service
manager restarts the whole set; a silent restart could hide a crash loop). The children
die with it (PR_SET_PDEATHSIG on Linux, and a parent-pid watch everywhere).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import FrameType

from aiohttp import web
from sqlalchemy.engine import make_url

from coordinator import network_flags
from coordinator.app import create_app
from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit
from coordinator.files import FILE_STORES, file_store_problem
from coordinator.store import Store

__all__ = ["register_commands"]

log = logging.getLogger(__name__)


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "coordinator",
        help="run the coordinator service (job queue, accounts, kudos ledger)",
        description="Run the coordinator: the job queue, accounts, kudos ledger and results store.",
    )
    defaults = CoordinatorConfig(data_dir=Path("."))
    parser.add_argument("--host", default=defaults.host, help="interface (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="port, 0 = any free (default %(default)s)"
    )
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="results and the SQLite file go here"
    )
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/db "
        "(default: SQLite in --data-dir)",
    )
    parser.add_argument(
        "--file-store",
        choices=FILE_STORES,
        default=defaults.file_store,
        help="where result images and uploads are kept: files in --data-dir, or rows in the "
        "database (PostgreSQL; for coordinators on several machines) (default %(default)s)",
    )
    parser.add_argument(
        "--lease-timeout",
        type=float,
        help="seconds a worker has to finish or report progress "
        "(default: derived from the job's size)",
    )
    parser.add_argument(
        "--grant",
        type=int,
        default=defaults.new_account_grant,
        help="kudos for new accounts (default %(default)s)",
    )
    economy = parser.add_argument_group("kudos economy (see README: The kudos economy)")
    economy.add_argument(
        "--trust-worker",
        action="append",
        default=[],
        metavar="PUBLIC_KEY",
        help="a worker public key (hex) trusted from the start; repeatable",
    )
    economy.add_argument(
        "--trust-account",
        action="append",
        default=[],
        metavar="NAME",
        help="workers registered with this account's API key start trusted; repeatable",
    )
    economy.add_argument(
        "--spot-check-rate",
        type=float,
        default=defaults.spot_check_rate,
        help="chance that an untrusted worker's job is re-run by a trusted one "
        "(default %(default)s)",
    )
    economy.add_argument(
        "--trust-hold",
        type=float,
        default=defaults.trust_hold_fraction,
        help="fraction of an untrusted worker's earnings held until verified (default %(default)s)",
    )
    economy.add_argument(
        "--horde-hold",
        type=float,
        default=defaults.horde_hold_seconds,
        metavar="SECONDS",
        help="how long an AI Horde worker's pay is held (its results are unsigned and never "
        "checked) before it is paid, unless the requester disputes the job "
        "(default %(default)s)",
    )
    economy.add_argument(
        "--uptime-period",
        type=float,
        default=defaults.uptime_period,
        help="seconds of uninterrupted serving that earn --uptime-reward (default %(default)s)",
    )
    economy.add_argument(
        "--uptime-reward",
        type=int,
        default=defaults.uptime_reward,
        help="kudos per uptime period (default %(default)s)",
    )
    economy.add_argument(
        "--rating-reward",
        type=int,
        default=defaults.rating_reward,
        help="kudos a rating earns the rater (default %(default)s)",
    )
    economy.add_argument(
        "--seconds-per-doubling",
        type=float,
        default=defaults.priority_seconds_per_doubling,
        help="queue head start, in seconds of waiting, per doubling of the requester's kudos "
        "(default %(default)s)",
    )
    economy.add_argument(
        "--rate-limit",
        action="append",
        default=[],
        metavar="SCOPE=RATE/BURST[,IP_RATE/IP_BURST]",
        help="requests per second and burst per API key (and per IP) for SCOPE, one of "
        f"{', '.join(DEFAULT_RATE_LIMITS)}; e.g. submit=10/100,50/500; repeatable",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="coordinator processes serving the port (SO_REUSEPORT); more than 1 needs a "
        "PostgreSQL --database-url (default %(default)s)",
    )
    parser.add_argument(
        "--poll-fallback",
        type=float,
        default=defaults.poll_fallback,
        help="seconds after which waiting event streams and long-polls re-read the database "
        "even without a notification (default %(default)s)",
    )
    parser.add_argument(
        "--max-streams-per-key",
        type=int,
        default=defaults.max_streams_per_key,
        help="open event streams allowed per API key, per process (default %(default)s)",
    )
    parser.add_argument(
        "--max-streams-per-ip",
        type=int,
        default=defaults.max_streams_per_ip,
        help="open event streams allowed per client address, per process (default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    network_flags.add_arguments(parser)
    parser.set_defaults(run=_run)


def _rate_limits(specs: list[str]) -> dict[str, RateLimit]:
    limits = dict(DEFAULT_RATE_LIMITS)
    for spec in specs:
        try:
            scope, _, values = spec.partition("=")
            key_part, _, ip_part = values.partition(",")
            rate, burst = (float(v) for v in key_part.split("/"))
            ip_rate, ip_burst = (
                (float(v) for v in ip_part.split("/")) if ip_part else (rate * 5, burst * 5)
            )
        except ValueError:
            raise SystemExit(
                f"--rate-limit {spec!r}: write SCOPE=RATE/BURST[,IP_RATE/IP_BURST], "
                "e.g. submit=10/100,50/500"
            ) from None
        if scope not in DEFAULT_RATE_LIMITS:
            raise SystemExit(
                f"--rate-limit {spec!r}: unknown scope {scope!r}; "
                f"use one of {', '.join(DEFAULT_RATE_LIMITS)}"
            )
        if min(rate, burst, ip_rate, ip_burst) <= 0:
            raise SystemExit(f"--rate-limit {spec!r}: rates and bursts must be positive")
        limits[scope] = RateLimit(rate, burst, ip_rate, ip_burst)
    return limits


LOG_FORMAT = "%(asctime)s %(levelname)s {who}%(name)s: %(message)s"


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT.format(who=""))
    if args.processes < 1:
        raise SystemExit("--processes must be at least 1")
    if min(args.max_streams_per_key, args.max_streams_per_ip) < 1:
        raise SystemExit("--max-streams-per-key and --max-streams-per-ip must be at least 1")
    if args.poll_fallback <= 0:
        raise SystemExit("--poll-fallback must be a positive number of seconds")
    if args.lease_timeout is not None and args.lease_timeout <= 0:
        raise SystemExit("--lease-timeout must be a positive number of seconds")
    for flag, value in (
        ("--spot-check-rate", args.spot_check_rate),
        ("--trust-hold", args.trust_hold),
    ):
        if not 0 <= value <= 1:
            raise SystemExit(f"{flag} must be between 0 and 1, got {value}")
    if args.uptime_period <= 0:
        raise SystemExit("--uptime-period must be a positive number of seconds")
    if args.horde_hold < 0:
        raise SystemExit("--horde-hold must be 0 or more seconds")
    config = CoordinatorConfig(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        database_url=args.database_url,
        file_store=args.file_store,
        lease_timeout=args.lease_timeout,
        new_account_grant=args.grant,
        trusted_workers=frozenset(args.trust_worker),
        trusted_accounts=frozenset(args.trust_account),
        spot_check_rate=args.spot_check_rate,
        trust_hold_fraction=args.trust_hold,
        horde_hold_seconds=args.horde_hold,
        uptime_period=args.uptime_period,
        uptime_reward=args.uptime_reward,
        rating_reward=args.rating_reward,
        priority_seconds_per_doubling=args.seconds_per_doubling,
        rate_limits=_rate_limits(args.rate_limit),
        poll_fallback=args.poll_fallback,
        processes=args.processes,
        max_streams_per_key=args.max_streams_per_key,
        max_streams_per_ip=args.max_streams_per_ip,
        **network_flags.settings(args),
    )
    if problem := file_store_problem(config):
        raise SystemExit(problem)
    if config.processes == 1:
        asyncio.run(serve(config))
        return 0
    backend = make_url(config.resolved_database_url).get_backend_name()
    if backend != "postgresql":
        raise SystemExit(
            f"--processes {config.processes} needs PostgreSQL, but the database is {backend}: "
            "pass --database-url postgresql+asyncpg://USER@HOST/DB, or use --processes 1 "
            "(SQLite is for one coordinator process)"
        )
    return _supervise(config, args.log_level.upper())


def _listening(host: str, port: int) -> None:
    # Tests and scripts read this line to learn the port when --port 0 is used.
    print(f"idlegrid coordinator listening on http://{host}:{port}", flush=True)


async def serve(
    config: CoordinatorConfig,
    ready: Callable[[int], None] | None = None,
    parent: int | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then shut down cleanly. `ready(port)` replaces the
    "listening" line (a child of --processes tells its parent); with `parent` (a pid) the
    server also stops when that process is gone."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_port=config.processes > 1)
    await site.start()
    port = runner.addresses[0][1]
    if ready is None:
        _listening(config.host, port)
    else:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    orphaned = None if parent is None else asyncio.create_task(_orphaned(parent, stop))
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if orphaned is not None:
            orphaned.cancel()
        await runner.cleanup()


async def _orphaned(parent: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await stop.wait()
                return
    log.warning("the supervising process %d is gone; stopping", parent)
    stop.set()


# --- --processes N --------------------------------------------------------------------

# seconds the children get to start, and to stop after SIGTERM
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


def _hold_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) host:port with SO_REUSEPORT: resolves port 0 and keeps the port
    ours while the children bind it too."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
    except OSError as exc:
        holder.close()
        raise SystemExit(f"cannot bind {host}:{port}: {exc}") from None
    return holder


async def _migrate(config: CoordinatorConfig) -> None:
    """Bring the schema up to date once, before the children open the database."""
    store = await Store.open(config)
    await store.aclose()


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # gone before prctl took effect
        os._exit(1)


def _child(config: CoordinatorConfig, parent: int, ready: Connection, log_level: str) -> None:
    """One coordinator process of --processes N (runs in a spawned interpreter)."""
    _die_with_parent(parent)
    who = f"[{config.process_index}:{os.getpid()}] "
    logging.basicConfig(level=log_level, format=LOG_FORMAT.format(who=who), force=True)

    def tell(port: int) -> None:
        ready.send(port)
        ready.close()

    asyncio.run(serve(config, ready=tell, parent=parent))


class _Children:
    def __init__(self, config: CoordinatorConfig, log_level: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: dict[Connection, int] = {}
        for index in range(config.processes):
            receive, send = context.Pipe(duplex=False)
            proc = context.Process(
                target=_child,
                args=(
                    dataclasses.replace(config, process_index=index),
                    os.getpid(),
                    send,
                    log_level,
                ),
                name=f"coordinator-{index}",
            )
            proc.start()
            send.close()
            self.procs.append(proc)
            self.pipes[receive] = index

    def dead(self) -> list[multiprocessing.process.BaseProcess]:
        return [p for p in self.procs if p.exitcode is not None]

    def stop(self) -> None:
        """SIGTERM every child, wait, SIGKILL the stragglers."""
        for proc in self.procs:
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.warning("%s did not stop in %.0f s; killing it", proc.name, STOP_TIMEOUT)
                proc.kill()
                proc.join()
        for pipe in self.pipes:
            pipe.close()


def _supervise(config: CoordinatorConfig, log_level: str) -> int:
    holder = _hold_port(config.host, config.port)
    config = dataclasses.replace(config, port=holder.getsockname()[1])
    try:
        asyncio.run(_migrate(config))
    except Exception:
        holder.close()
        log.exception("preparing the database failed; no coordinator process started")
        return 1
    # Signals wake the waits below through this pair (and are forwarded to the children).
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    children = _Children(config, log_level)
    try:
        return _watch(config, children, wake_r, stopping)
    finally:
        children.stop()
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wake_r.close()
        wake_w.close()
        holder.close()


def _watch(
    config: CoordinatorConfig, children: _Children, wake: socket.socket, stopping: list[int]
) -> int:
    """Wait for every child to be ready, then for a signal or a death; the exit code."""
    waiting = dict(children.pipes)
    sentinels = {p.sentinel: p for p in children.procs}
    deadline = time.monotonic() + START_TIMEOUT
    while waiting:
        if stopping:
            return 0
        for ready in wait([*waiting, *sentinels, wake], timeout=1.0):
            if ready is wake:
                with contextlib.suppress(BlockingIOError):
                    wake.recv(4096)
            elif isinstance(ready, Connection) and ready in waiting:
                try:
                    ready.recv()
                    del waiting[ready]
                except EOFError:
                    pass  # it died: its sentinel tells
        if dead := children.dead():
            log.error(
                "%s exited with code %s while starting; stopping the others",
                dead[0].name,
                dead[0].exitcode,
            )
            return 1
        if time.monotonic() > deadline:
            log.error("the coordinator processes did not start in %.0f s", START_TIMEOUT)
            return 1
    log.info(
        "%d coordinator processes serve port %d: pids %s",
        config.processes,
        config.port,
        ", ".join(str(p.pid) for p in children.procs),
    )
    _listening(config.host, config.port)
    while not stopping:
        wait([*sentinels, wake], timeout=5.0)
        with contextlib.suppress(BlockingIOError):
            wake.recv(4096)
        if dead := children.dead():
            log.error(
                "%s (pid %s) exited unexpectedly with code %s; stopping the others",
                dead[0].name,
                dead[0].pid,
                dead[0].exitcode,
            )
            return 1
    log.info("signal %d: stopping the coordinator processes", stopping[0])
    return 0
