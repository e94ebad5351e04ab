"""`open_file_store`: the back end `--file-store` names."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.config import CoordinatorConfig
from coordinator.files.database import DatabaseFiles
from coordinator.files.local import LocalFiles
from coordinator.files.store import UPLOADS, FileStore

__all__ = ["FILE_STORES", "file_store_problem", "open_file_store"]

# `--file-store` values: files under --data-dir, or rows in the (PostgreSQL) database
FILE_STORES = ("local", "database")


def open_file_store(config: CoordinatorConfig, engine: AsyncEngine) -> FileStore:
    """The configured file store; `engine` is the coordinator's database. ValueError
    (naming the fix) for a file store the configuration cannot have."""
    if problem := file_store_problem(config):
        raise ValueError(problem)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if config.file_store == "database":
        return DatabaseFiles(engine, config.data_dir / UPLOADS)
    return LocalFiles(config.data_dir)


def file_store_problem(config: CoordinatorConfig) -> str | None:
    """What is wrong with `--file-store` in `config` (an error message naming the fix), or None."""
    if config.file_store not in FILE_STORES:
        return f"--file-store {config.file_store!r}: use one of {', '.join(FILE_STORES)}"
    backend = make_url(config.resolved_database_url).get_backend_name()
    if config.file_store == "database" and backend != "postgresql":
        return (
            f"--file-store database needs PostgreSQL, but the database is {backend}: pass "
            "--database-url postgresql+asyncpg://USER@HOST/DB, or use --file-store local"
        )
    return None
