"""`idlegrid coordinator` flags that open the network to strangers safely (README "Threat
model"): the operator's text models, registration, verification and bounds. Each area
adds its flags and turns them into CoordinatorConfig fields; coordinator.main calls
`add_arguments` and `settings`.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from coordinator.accounts import REGISTRATION_MODES
from coordinator.config import CoordinatorConfig
from coordinator.economy.text_models import parse_catalog
from coordinator.http.addresses import parse_networks
from coordinator.store import Store

__all__ = ["add_arguments", "settings"]


# --- text models and their prices -------------------------------------------------------


def _add_text_models(group: argparse._ArgumentGroup) -> None:
    defaults = CoordinatorConfig(data_dir=Path("."))
    built_in = ", ".join(m.name for m in defaults.text_models)
    group.add_argument(
        "--models",
        type=Path,
        metavar="FILE",
        help="TOML file of the text models gateways may serve and their sizes, which set "
        f"their price (README: Text models); default: built-in {built_in}, "
        f"default model {defaults.default_text_model}",
    )


def _text_models(args: argparse.Namespace) -> dict[str, Any]:
    if args.models is None:
        return {}
    try:
        text = args.models.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(
            f"--models {args.models}: cannot read it ({exc}); give a TOML file"
        ) from None
    try:
        models, default = parse_catalog(text)
    except ValueError as exc:
        raise SystemExit(f"--models {args.models}: {exc}") from None
    return {"text_models": models, "default_text_model": default}


# --- registration and grants ------------------------------------------------------------


def _add_registration(group: argparse._ArgumentGroup) -> None:
    defaults = CoordinatorConfig(data_dir=Path("."))
    group.add_argument(
        "--registration",
        default=defaults.registration,
        metavar="|".join(REGISTRATION_MODES),
        help="who may create an account: anyone (open), holders of an invite code (invite), "
        "nobody (closed) (default %(default)s)",
    )
    group.add_argument(
        "--invites-per-account",
        type=int,
        default=defaults.invites_per_account,
        metavar="N",
        help="invite codes each user may make with `idlegrid account invite`; 0 = only the "
        "operator invites (default %(default)s)",
    )
    group.add_argument(
        "--make-invites",
        type=int,
        metavar="N",
        help="print N new single-use invite codes for the database of --data-dir / "
        "--database-url and exit without serving (default: serve)",
    )
    group.add_argument(
        "--mint",
        action="append",
        default=[],
        metavar="USER=KUDOS",
        help="give USER KUDOS new transferable kudos (the only way they come into being: "
        "README, Threat model) in the database of --data-dir / --database-url and exit "
        "without serving; repeatable (default: serve)",
    )
    group.add_argument(
        "--anonymous-reserved-per-ip",
        type=int,
        default=defaults.anonymous_reserved_per_ip,
        metavar="KUDOS",
        help="most kudos one client address may hold reserved in queued and running "
        "anonymous jobs (default %(default)s)",
    )


def _registration(args: argparse.Namespace) -> dict[str, Any]:
    if args.registration not in REGISTRATION_MODES:
        raise SystemExit(
            f"--registration {args.registration!r}: use one of {', '.join(REGISTRATION_MODES)}"
        )
    if args.invites_per_account < 0:
        raise SystemExit(
            f"--invites-per-account {args.invites_per_account}: use 0 (only the operator "
            "invites) or more"
        )
    if args.anonymous_reserved_per_ip < 1:
        raise SystemExit(
            f"--anonymous-reserved-per-ip {args.anonymous_reserved_per_ip}: use a positive "
            "number of kudos"
        )
    if args.mint:
        config = CoordinatorConfig(data_dir=args.data_dir, database_url=args.database_url)
        for name, amount in asyncio.run(_mint(config, [_mint_spec(m) for m in args.mint])):
            print(f"minted {amount} transferable kudos for {name}")
        raise SystemExit(0)
    if args.make_invites is not None:
        if not 1 <= args.make_invites <= 10_000:
            raise SystemExit(f"--make-invites {args.make_invites}: use 1 to 10000 codes")
        config = CoordinatorConfig(data_dir=args.data_dir, database_url=args.database_url)
        for code in asyncio.run(_make_invites(config, args.make_invites)):
            print(code)
        raise SystemExit(0)
    return {
        "registration": args.registration,
        "invites_per_account": args.invites_per_account,
        "anonymous_reserved_per_ip": args.anonymous_reserved_per_ip,
    }


def _mint_spec(spec: str) -> tuple[str, int]:
    name, _, amount = spec.partition("=")
    if not name or not amount.isascii() or not amount.isdigit() or int(amount) < 1:
        raise SystemExit(f"--mint {spec!r}: use USER=KUDOS, KUDOS a positive whole number")
    return name, int(amount)


async def _mint(config: CoordinatorConfig, gifts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    store: Store = await Store.open(config)
    try:
        for name, amount in gifts:
            try:
                await store.ledger.mint(name, amount)
            except ValueError as exc:
                raise SystemExit(f"--mint {name}={amount}: {exc}") from None
        return gifts
    finally:
        await store.aclose()


async def _make_invites(config: CoordinatorConfig, count: int) -> list[str]:
    store: Store = await Store.open(config)
    try:
        return await store.accounts.create_invites(count)
    finally:
        await store.aclose()


# --- verification -----------------------------------------------------------------------


def _add_verification(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--allow-same-ip-checks",
        action="store_true",
        help="let a worker spot-check another seen at the same client IP (default: off, "
        "checks go to another address; turn on for a network on one host or LAN). A check "
        "never goes to a worker of the same owner either way",
    )
    group.add_argument(
        "--require-sandbox",
        action="store_true",
        help="give image jobs only to workers whose engine runs confined: refuse workers "
        "started with --unsandboxed, and those that do not say (older versions)",
    )
    group.add_argument(
        "--text-check-prefix",
        type=int,
        default=CoordinatorConfig(data_dir=Path(".")).text_check_prefix_chars,
        metavar="CHARS",
        help="a gateway's text spot check agrees when the two texts are equal or share "
        "their first CHARS characters (late floating-point drift); 0 = only equal texts "
        "(default %(default)s)",
    )
    group.add_argument(
        "--max-pixel-steps-per-second",
        type=float,
        default=CoordinatorConfig(data_dir=Path(".")).max_pixel_steps_per_second,
        metavar="RATE",
        help="an image result faster than RATE pixel-steps per second (width x height x "
        "steps x images over the time since the lease) is suspect: it is checked and counts "
        "towards a pause; 'inf' turns the speed check off (default %(default)s)",
    )


def _verification(args: argparse.Namespace) -> dict[str, Any]:
    if not args.max_pixel_steps_per_second > 0:
        raise SystemExit(
            f"--max-pixel-steps-per-second {args.max_pixel_steps_per_second}: use a positive "
            "rate, or inf for no speed check"
        )
    if args.text_check_prefix < 0:
        raise SystemExit(
            f"--text-check-prefix {args.text_check_prefix}: must be 0 (only equal texts "
            "agree) or a number of characters"
        )
    return {
        "verify_distinct_ip": not args.allow_same_ip_checks,
        "text_check_prefix_chars": args.text_check_prefix,
        "require_sandbox": args.require_sandbox,
        "max_pixel_steps_per_second": args.max_pixel_steps_per_second,
    }


# --- worker identities --------------------------------------------------------------------


def _add_identities(group: argparse._ArgumentGroup) -> None:
    defaults = CoordinatorConfig(data_dir=Path("."))
    group.add_argument(
        "--max-workers-per-account",
        type=int,
        default=defaults.max_workers_per_account,
        metavar="N",
        help="most workers (native or AI Horde names) one account may have (default %(default)s)",
    )
    group.add_argument(
        "--faulted-run",
        type=int,
        default=defaults.faulted_run,
        metavar="N",
        help="pause a worker that gives back N jobs in a row without finishing one "
        "(default %(default)s)",
    )
    group.add_argument(
        "--max-disputes-per-day",
        type=int,
        default=defaults.max_disputes_per_day,
        metavar="N",
        help="disputes of AI Horde workers' results one account may make per day "
        "(default %(default)s)",
    )
    group.add_argument(
        "--max-dispute-share",
        type=float,
        default=defaults.max_dispute_share,
        metavar="F",
        help="an account may dispute at most this share (rounded up) of its finished image "
        "jobs (default %(default)s)",
    )


def _identities(args: argparse.Namespace) -> dict[str, Any]:
    for flag, value in (
        ("--max-workers-per-account", args.max_workers_per_account),
        ("--faulted-run", args.faulted_run),
    ):
        if value < 1:
            raise SystemExit(f"{flag} {value}: use 1 or more")
    if args.max_disputes_per_day < 0:
        raise SystemExit(
            f"--max-disputes-per-day {args.max_disputes_per_day}: use 0 (no disputes) or more"
        )
    if not 0 <= args.max_dispute_share <= 1:
        raise SystemExit(f"--max-dispute-share {args.max_dispute_share}: use 0 to 1")
    return {
        "max_workers_per_account": args.max_workers_per_account,
        "faulted_run": args.faulted_run,
        "max_disputes_per_day": args.max_disputes_per_day,
        "max_dispute_share": args.max_dispute_share,
    }


# --- bounds, rate limits and client addresses ---------------------------------------------


def _add_bounds(group: argparse._ArgumentGroup) -> None:
    defaults = CoordinatorConfig(data_dir=Path("."))
    group.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="a reverse proxy (address or network, e.g. 10.0.0.0/8) whose X-Forwarded-For "
        "names the client, for rate limits and the same-address rules; repeatable "
        "(default: none, the header is ignored)",
    )
    group.add_argument(
        "--lease-ttl-factor",
        type=float,
        default=defaults.lease_ttl_factor,
        metavar="F",
        help="a job stays leased at most F times its work at the slowest acceptable pace "
        "after the pop, however often the worker reports (default %(default)s)",
    )


def _bounds(args: argparse.Namespace) -> dict[str, Any]:
    try:
        parse_networks(args.trusted_proxy)
    except ValueError as exc:
        raise SystemExit(f"--trusted-proxy: {exc}") from None
    if not args.lease_ttl_factor >= 1:
        raise SystemExit(
            f"--lease-ttl-factor must be at least 1 (a lease cannot end before its first "
            f"length), got {args.lease_ttl_factor}"
        )
    return {
        "trusted_proxies": tuple(spec.strip() for spec in args.trusted_proxy),
        "lease_ttl_factor": args.lease_ttl_factor,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("open network (see README: Threat model)")
    for add in (
        _add_text_models,
        _add_registration,
        _add_verification,
        _add_identities,
        _add_bounds,
    ):
        add(group)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """CoordinatorConfig fields from the flags (SystemExit naming the flag on bad values)."""
    return {
        **_text_models(args),
        **_registration(args),
        **_verification(args),
        **_identities(args),
        **_bounds(args),
    }
