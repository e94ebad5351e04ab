"""`--config FILE` and the environment for the `idlegrid worker KIND` commands.

The file's format and checks are protocol.config_file's (the coordinator reads its file the
same way): keys are long flag names, top-level keys apply to every worker command with that
flag, and the sections `[image]`, `[blocks]`, `[gateway]` and `[doctor]` to one.

The environment sits between the command line and the file: `IDLEGRID_WORKER_FLAG` for every
worker command that has the flag and `IDLEGRID_WORKER_KIND_FLAG` for one
(`IDLEGRID_WORKER_IMAGE_MAX_PIXELS`, overriding `IDLEGRID_WORKER_MAX_PIXELS`), and the older
`IDLEGRID_API_KEY` below both. So a value comes from the command line, else the environment,
else the file's section, else its top level, else the flag's default.
"""

from __future__ import annotations

import argparse

from protocol import config_file
from protocol.config_file import ConfigFileError, ConfigFileParser, read_config_file

__all__ = ["ENV_PREFIX", "ConfigFileError", "WorkerParser", "add_config_flag", "read_config_file"]

# IDLEGRID_WORKER_FLAG for every worker command, IDLEGRID_WORKER_KIND_FLAG for one
ENV_PREFIX = "IDLEGRID_WORKER_"


class WorkerParser(ConfigFileParser):
    """The parser of each `idlegrid worker KIND` command (`parser_class=` of the `worker`
    subparsers)."""

    # the owner's API key had this variable before every flag had one ...
    env_aliases = {"--api-key": "IDLEGRID_API_KEY"}
    # ... and is better kept there than in a file others may read
    discouraged = {"api-key": "the environment variable IDLEGRID_API_KEY"}


def add_config_flag(
    parser: argparse.ArgumentParser, kinds: argparse._SubParsersAction[argparse.ArgumentParser]
) -> None:
    """Give a `worker KIND` command `--config FILE` and its IDLEGRID_WORKER_* variables;
    call it after adding the other flags. `kinds` is the `worker` subparsers action."""
    kind = parser.prog.split()[-1].upper()
    config_file.add_config_flag(
        parser,
        kinds,
        help="TOML file of flags: keys are the long flag names (max-pixels = 262144); "
        "flags given here override it; [image], [blocks], [gateway] sections hold values "
        "for one command, top-level keys apply to every command with that flag. "
        "IDLEGRID_WORKER_FLAG_NAME and IDLEGRID_WORKER_KIND_FLAG_NAME environment "
        "variables override the file",
        env_prefixes=(ENV_PREFIX, f"{ENV_PREFIX}{kind}_"),
    )
