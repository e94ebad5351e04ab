"""`python -m coordinator.db.migrations`: add a revision, show the history.

    python -m coordinator.db.migrations revision -m "add jobs.priority" [--autogenerate]
    python -m coordinator.db.migrations history

`--autogenerate` builds a throwaway in-memory SQLite database with the revisions so far
and writes the difference from coordinator.db.schema into the new revision, for you to
review (it cannot see everything: renames, data, PostgreSQL-only details).
Databases are upgraded by the coordinator itself when it starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from coordinator.db.migrations import config, next_revision_id, upgrade


def _ruff_after_writing(cfg: Config) -> Config:
    """Have Alembic run ruff (if installed) on the new file, so it passes scripts/check."""
    if importlib.util.find_spec("ruff") is None:
        return cfg
    section = "post_write_hooks"
    cfg.set_section_option(section, "hooks", "ruff_fix, ruff_format")
    for hook, args in (("ruff_fix", "check --fix --quiet"), ("ruff_format", "format --quiet")):
        cfg.set_section_option(section, f"{hook}.type", "exec")
        cfg.set_section_option(section, f"{hook}.executable", sys.executable)
        cfg.set_section_option(
            section, f"{hook}.options", f"-m ruff {args} REVISION_SCRIPT_FILENAME"
        )
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator.db.migrations",
        description="Manage the coordinator's Alembic revisions (databases upgrade at start).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    revision = sub.add_parser("revision", help="add a revision file after the head")
    revision.add_argument("-m", "--message", required=True, help="what the revision changes")
    revision.add_argument(
        "--autogenerate",
        action="store_true",
        help="fill it with the difference between coordinator.db.schema and the revisions",
    )
    sub.add_parser("history", help="list the revisions")
    args = parser.parse_args(argv)

    if args.command == "history":
        command.history(config(), verbose=True)
        return
    rev_id = next_revision_id(args.message)
    if not args.autogenerate:
        command.revision(_ruff_after_writing(config()), args.message, rev_id=rev_id)
        return
    engine = create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            upgrade(connection)
            cfg = _ruff_after_writing(config(connection))
            command.revision(cfg, args.message, autogenerate=True, rev_id=rev_id)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
