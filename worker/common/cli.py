"""Settings and start-up steps every `idlegrid worker KIND` command shares.

The settings are `Annotated` types that each command's settings class uses for its fields
(protocol.settings: one declaration gives the flag, the environment variable and the
config-file key). Only the commands' `main` modules (`worker.image.main`,
`worker.llm.blocks_main`, `worker.llm.gateway.main`) use these; they read flags and the
environment so that nothing else has to. Heavier imports (cryptography) happen inside the
functions, so `idlegrid --help` stays fast.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from protocol.settings import Flag

if TYPE_CHECKING:
    from worker.common.identity import ClaimedIdentity

__all__ = [
    "LOG_LEVEL",
    "ApiKey",
    "CoordinatorUrl",
    "IdentityFile",
    "LogLevel",
    "WorkerName",
    "claim_identity_from_flags",
    "configure_logging",
]

# Settings every worker command declares (protocol.settings); `{kind}` is the command's
# name (image, blocks, gateway).
CoordinatorUrl = Annotated[str, Flag("coordinator URL", required=True)]
WorkerName = Annotated[
    str | None,
    Flag(
        "worker name (default: HOST-{kind}; HOST-{kind}-2, ... when another {kind} worker "
        "on this machine already runs under it)"
    ),
]
IdentityFile = Annotated[
    Path | None,
    Flag(
        "Ed25519 identity file, locked while this worker runs "
        "(default: ~/.local/share/idlegrid/worker-NAME.key)"
    ),
]
ApiKey = Annotated[
    str | None,
    Flag("owner's API key; earnings go to that account (env IDLEGRID_API_KEY)", secret=True),
]
LogLevel = Annotated[str, Flag("logging level (default %(default)s)")]
LOG_LEVEL = "INFO"


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "idlegrid"


def configure_logging(level: str) -> None:
    """Configure logging from `--log-level` (the only place the worker does)."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def claim_identity_from_flags(
    name: str | None, identity: Path | None, service: str
) -> ClaimedIdentity | None:
    """This process's name and locked identity from `--name`/`--identity`; None after
    printing why not (the caller exits 2)."""
    from protocol.messages import NAME_PATTERN
    from worker.common.identity import claim_identity
    from worker.errors import IdentityError

    if name is not None and not re.fullmatch(NAME_PATTERN, name):
        print("error: --name: use 2-32 letters, digits, '_', '.', '-'", file=sys.stderr)
        return None
    try:
        return claim_identity(
            service,
            name=name,
            file=identity,
            data_home=_data_home(),
            host=socket.gethostname(),
        )
    except IdentityError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"error: cannot use the identity file: {exc}", file=sys.stderr)
    return None
