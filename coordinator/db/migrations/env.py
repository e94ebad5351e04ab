"""Alembic's environment: run by `coordinator.db.migrations.upgrade` on its connection.

It never configures logging (no fileConfig): Alembic logs through the coordinator's.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from coordinator.db.migrations import include_object
from coordinator.db.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "run migrations through coordinator.db.migrations (python -m coordinator.db.migrations"
        " --help), which passes a connection; there is no alembic.ini or offline mode"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things: batch operations copy the table instead
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    include_object=include_object,
)
# In the caller's transaction (coordinator.db.schema.migrate) this begins nothing: the
# caller commits, so the schema change and whatever it does next are atomic.
with context.begin_transaction():
    context.run_migrations()
