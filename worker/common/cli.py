"""Flags and start-up steps every `idlegrid worker KIND` command shares.

Only the commands' `main` modules (`worker.image.main`, `worker.llm.blocks_main`,
`worker.llm.gateway.main`) call these; they read flags and the environment so that nothing
else has to. Heavier imports (pydantic, cryptography) happen inside the functions, so
`idlegrid --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.common.identity import ClaimedIdentity

__all__ = [
    "add_identity_flags",
    "add_log_level_flag",
    "api_key",
    "claim_identity_from_flags",
    "configure_logging",
]


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "idlegrid"


def add_identity_flags(parser: argparse.ArgumentParser, service: str) -> None:
    """`--name` and `--identity` of one worker service (`image`, `blocks`, `gateway`)."""
    parser.add_argument(
        "--name",
        help=f"worker name (default: HOST-{service}; HOST-{service}-2, ... when another "
        f"{service} worker on this machine already runs under it)",
    )
    parser.add_argument(
        "--identity",
        type=Path,
        help="Ed25519 identity file, locked while this worker runs "
        "(default: ~/.local/share/idlegrid/worker-NAME.key)",
    )


def add_log_level_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")


def configure_logging(args: argparse.Namespace) -> None:
    """Configure logging from `--log-level` (the only place the worker does)."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def api_key(args: argparse.Namespace) -> str | None:
    """The owner's API key: `--api-key`, else the environment's IDLEGRID_API_KEY."""
    key: str | None = args.api_key or os.environ.get("IDLEGRID_API_KEY")
    return key


def claim_identity_from_flags(args: argparse.Namespace, service: str) -> ClaimedIdentity | None:
    """This process's name and locked identity from `--name`/`--identity`; None after
    printing why not (the caller exits 2)."""
    from protocol.messages import NAME_PATTERN
    from worker.common.identity import claim_identity
    from worker.errors import IdentityError

    if args.name is not None and not re.fullmatch(NAME_PATTERN, args.name):
        print("error: --name: use 2-32 letters, digits, '_', '.', '-'", file=sys.stderr)
        return None
    try:
        return claim_identity(
            service,
            name=args.name,
            file=args.identity,
            data_home=_data_home(),
            host=socket.gethostname(),
        )
    except IdentityError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"error: cannot use the identity file: {exc}", file=sys.stderr)
    return None
