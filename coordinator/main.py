"""`idlegrid coordinator ...`: parse flags into a CoordinatorConfig and serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from coordinator.app import create_app
from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit

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
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
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


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
    config = CoordinatorConfig(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        database_url=args.database_url,
        lease_timeout=args.lease_timeout,
        new_account_grant=args.grant,
        trusted_workers=frozenset(args.trust_worker),
        trusted_accounts=frozenset(args.trust_account),
        spot_check_rate=args.spot_check_rate,
        trust_hold_fraction=args.trust_hold,
        uptime_period=args.uptime_period,
        uptime_reward=args.uptime_reward,
        rating_reward=args.rating_reward,
        priority_seconds_per_doubling=args.seconds_per_doubling,
        rate_limits=_rate_limits(args.rate_limit),
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
