"""Alembic migrations of the coordinator's database, configured in code (no alembic.ini).

`coordinator.db.schema.migrate` calls `upgrade` at start-up, inside the caller's
transaction: an empty database runs every revision, a database left by the last release
before Alembic (a `schema_version` table at version 3) is stamped `0001_released` first.
Add a revision with `python -m coordinator.db.migrations revision -m "what changes"`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, UniqueConstraint, inspect, text

from coordinator.errors import LegacySchemaError

__all__ = [
    "RELEASED",
    "LegacySchemaError",
    "config",
    "include_object",
    "next_revision_id",
    "upgrade",
]

# the revision that is exactly the schema of the release before Alembic (schema_version 3)
RELEASED = "0001_released"
# the only schema_version a database may have to be taken over by Alembic
LEGACY_VERSION = 3
# pg_advisory_xact_lock key serialising coordinators that start at once ("idlegrid")
ADVISORY_LOCK = 0x69646C6567726964

HERE = Path(__file__).resolve().parent


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for this package, using `connection` if given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    # revision files are named by their id, e.g. versions/0002_sql_queue.py
    cfg.set_main_option("file_template", "%%(rev)s")
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: Connection, revision: str = "head") -> str | None:
    """Upgrade the database behind `connection` (in a transaction the caller commits)
    to `revision`; returns the revision it is at afterwards."""
    if connection.dialect.name == "postgresql":
        # Coordinators starting together queue here; the next one in sees the work done.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK})
    cfg = config(connection)
    if _current(connection) is None and _legacy_version(connection) is not None:
        command.stamp(cfg, RELEASED)
    command.upgrade(cfg, revision)
    return _current(connection)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _legacy_version(connection: Connection) -> int | None:
    """The version of a database made by the hand-written migrations, or None if it has no
    `schema_version` table; LegacySchemaError unless that version is the released 3."""
    if not inspect(connection).has_table("schema_version"):
        return None
    version = connection.execute(text("SELECT max(version) FROM schema_version")).scalar()
    if version != LEGACY_VERSION:
        raise LegacySchemaError(
            f"the database is at schema_version {version}, but this coordinator can only "
            f"upgrade databases at schema_version {LEGACY_VERSION}: run the previous release "
            "of idlegrid against it once (it upgrades the schema at start-up and can then be "
            "stopped), then start this one"
        )
    return int(version)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Autogenerate's filter: skip a UNIQUE constraint on exactly the primary key's columns
    (results has one), which PostgreSQL folds into the primary key, so it is never there."""
    if type_ == "unique_constraint" and isinstance(obj, UniqueConstraint):
        table = obj.table
        return set(obj.columns.keys()) != set(table.primary_key.columns.keys())
    return True


def next_revision_id(message: str, cfg: Config | None = None) -> str:
    """The id (and file name) of the revision after the head: `0003_add_something`."""
    head = ScriptDirectory.from_config(cfg or config()).get_current_head()
    number = int(head.split("_", 1)[0]) + 1 if head else 1
    slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40].rstrip("_")
    return f"{number:04d}_{slug}" if slug else f"{number:04d}"
