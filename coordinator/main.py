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

from aiohttp import web
from sqlalchemy.engine import make_url

from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from coordinator.files import file_store_problem
from coordinator.network_flags import NETWORK, run_operator_actions
from coordinator.settings import ECONOMY, ENV_PREFIX, CoordinatorSettings
from coordinator.store import Store
from protocol.config_file import add_config_flag
from protocol.settings import SettingsError, add_flags, env_name, validated
from protocol.signals import StopSignals, caught_signals

__all__ = ["register_commands"]

log = logging.getLogger(__name__)


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "coordinator",
        help="run the coordinator service (job queue, accounts, kudos ledger)",
        description="Run the coordinator: the job queue, accounts, kudos ledger and results "
        "store. Every flag can also be set in the environment, "
        f"{ENV_PREFIX}FLAG_NAME (e.g. {env_name(ENV_PREFIX, '--trust-hold')}=0.3), and in "
        "a --config file; a flag given wins over the environment, which wins over the file.",
    )
    # the economy's flags before the open network's (argparse lists groups as made)
    groups = {title: parser.add_argument_group(title) for title in (ECONOMY, NETWORK)}
    add_flags(parser, CoordinatorSettings, groups)
    add_config_flag(
        parser,
        subparsers,
        help="TOML file of flags: keys are the long flag names (trust-hold = 0.3, "
        'trust-worker = ["..."]), at the top level or in a [coordinator] section; the '
        "environment and flags given here override it",
        env_prefixes=(ENV_PREFIX,),
    )
    parser.set_defaults(run=_run)


LOG_FORMAT = "%(asctime)s %(levelname)s {who}%(name)s: %(message)s"


def _run(args: argparse.Namespace) -> int:
    try:
        settings = validated(CoordinatorSettings, args)
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from None
    log_level = settings.log_level.upper()
    logging.basicConfig(level=log_level, format=LOG_FORMAT.format(who=""))
    config = settings.config()
    if run_operator_actions(settings, config):
        return 0
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
    return _supervise(config, log_level)


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
    with StopSignals() as signals:
        stop = signals.stop
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
    try:
        with caught_signals(wake_w) as stopping:
            children = _Children(config, log_level)
            try:
                return _watch(config, children, wake_r, stopping)
            finally:
                children.stop()
    finally:
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
