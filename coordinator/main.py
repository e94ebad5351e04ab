"""`idlegrid coordinator ...`: parse flags into a CoordinatorConfig and serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from coordinator.app import create_app
from coordinator.config import CoordinatorConfig

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
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.lease_timeout is not None and args.lease_timeout <= 0:
        raise SystemExit("--lease-timeout must be a positive number of seconds")
    config = CoordinatorConfig(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        database_url=args.database_url,
        lease_timeout=args.lease_timeout,
        new_account_grant=args.grant,
    )
    asyncio.run(serve(config))
    return 0


async def serve(config: CoordinatorConfig) -> None:
    """Serve until SIGINT/SIGTERM, then shut down cleanly."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1]
    # Tests and scripts read this line to learn the port when --port 0 is used.
    print(f"idlegrid coordinator listening on http://{config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()
