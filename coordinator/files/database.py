"""DatabaseFiles: stored files as rows of the stored_files table (`--file-store database`).

A file is the rows (name, chunk 0..n-1) of at most CHUNK_BYTES each, written in one
transaction, so readers see all of it or nothing. Files are written from and read into
chunks one at a time (an upload from its spooled file, a download into a StreamResponse),
never whole in memory. Coordinators on several machines sharing one PostgreSQL database
so serve each other's images; the upload spool stays a local temporary file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import BinaryIO

from aiohttp import web
from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import ColumnElement

from coordinator.db.schema import stored_files
from coordinator.errors import NotFound
from coordinator.files.spool import TEMPORARY_PREFIX, Spooled
from coordinator.files.store import UPLOADS, FileStore, marker_name, markers_of_job, result_name

__all__ = ["CHUNK_BYTES", "DatabaseFiles"]

CHUNK_BYTES = 512 * 1024
_T = stored_files.c


class DatabaseFiles(FileStore):
    def __init__(self, engine: AsyncEngine, spool_dir: Path) -> None:
        super().__init__(spool_dir)
        self._engine = engine

    # --- writing and reading chunks ------------------------------------------------------

    async def _store(self, name: str, chunks: AsyncIterator[bytes]) -> None:
        """Store a result file (content-addressed: if it is there, it is these bytes)."""
        try:
            async with self._engine.begin() as conn:
                if await _chunk_count(conn, name):
                    return
                now = time.time()
                index = 0
                async for data in chunks:
                    await conn.execute(
                        insert(stored_files).values(
                            name=name, chunk=index, data=data, created_at=now
                        )
                    )
                    index += 1
        except IntegrityError:
            pass  # another coordinator stored the same bytes at the same moment

    async def _chunks(self, name: str, count: int) -> AsyncIterator[bytes]:
        """The file's chunks in order, one query each (each from the pool, briefly)."""
        query = select(_T.data).where(_T.name == name)
        for index in range(count):
            async with self._engine.connect() as conn:
                data = (await conn.execute(query.where(_T.chunk == index))).scalar_one_or_none()
            if data is None:
                raise NotFound(f"{name} was deleted while it was being read")
            yield bytes(data)

    async def _stat(self, name: str) -> tuple[int, int] | None:
        """(chunks, bytes) of the file, or None."""
        async with self._engine.connect() as conn:
            count, size = (
                await conn.execute(
                    select(func.count(), func.coalesce(func.sum(func.length(_T.data)), 0)).where(
                        _T.name == name
                    )
                )
            ).one()
        return (int(count), int(size)) if count else None

    # --- uploads -------------------------------------------------------------------------

    async def keep(self, spooled: Spooled) -> None:
        await self._store(result_name(spooled.sha256), _read_chunks(spooled.path))

    async def mark(self, job_id: str, worker_id: str, index: int, sha256: str) -> None:
        name = marker_name(job_id, worker_id, index)
        values = {"data": sha256.encode(), "created_at": time.time()}
        replace = update(stored_files).where(_T.name == name, _T.chunk == 0).values(**values)
        try:
            async with self._engine.begin() as conn:
                if not (await conn.execute(replace)).rowcount:
                    await conn.execute(insert(stored_files).values(name=name, chunk=0, **values))
        except IntegrityError:  # the same upload, twice at once: the later one counts
            async with self._engine.begin() as conn:
                await conn.execute(replace)

    async def marked(self, job_id: str, worker_id: str, index: int) -> str | None:
        name = marker_name(job_id, worker_id, index)
        async with self._engine.connect() as conn:
            data = (
                await conn.execute(select(_T.data).where(_T.name == name, _T.chunk == 0))
            ).scalar_one_or_none()
        return None if data is None else bytes(data).decode()

    async def discard(self, job_id: str, worker_id: str, count: int) -> None:
        # every worker's markers of the job
        # ids are letters, digits and '-': no LIKE wildcards
        await self._delete(_T.name.startswith(markers_of_job(job_id), autoescape=True))

    async def _prune_markers(self, max_age: float) -> int:
        cutoff = time.time() - max_age
        return await self._delete(
            and_(_T.name.startswith(f"{UPLOADS}/", autoescape=True), _T.created_at < cutoff)
        )

    async def _delete(self, where: ColumnElement[bool]) -> int:
        async with self._engine.begin() as conn:
            return int((await conn.execute(delete(stored_files).where(where))).rowcount)

    # --- results -------------------------------------------------------------------------

    async def put_bytes(self, data: bytes, digest: str) -> None:
        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, max(len(data), 1), CHUNK_BYTES):
                yield data[start : start + CHUNK_BYTES]

        await self._store(result_name(digest), pieces())

    async def size(self, digest: str) -> int | None:
        stat = await self._stat(result_name(digest))
        return None if stat is None else stat[1]

    async def remove(self, digest: str) -> None:
        await self._delete(_T.name == result_name(digest))

    @contextlib.asynccontextmanager
    async def local_copy(self, digest: str) -> AsyncIterator[Path]:
        name = result_name(digest)
        fd, temporary = tempfile.mkstemp(dir=self._spool_dir, prefix=f"{TEMPORARY_PREFIX}copy-")
        path = Path(temporary)
        try:
            with os.fdopen(fd, "wb") as handle:
                stat = await self._stat(name)
                if stat is not None:
                    async for data in self._chunks(name, stat[0]):
                        await asyncio.to_thread(handle.write, data)
            if stat is None:
                os.unlink(path)  # no such file: a path that does not exist
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def response(
        self, request: web.Request, digest: str, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        name = result_name(digest)
        stat = await self._stat(name)
        if stat is None:
            raise NotFound(f"the image {digest} is no longer stored")
        count, size = stat
        response = web.StreamResponse(headers=headers)
        response.content_length = size
        await response.prepare(request)
        if request.method != "HEAD":
            async for data in self._chunks(name, count):
                await response.write(data)
        await response.write_eof()
        return response


async def _chunk_count(conn: AsyncConnection, name: str) -> int:
    query = select(func.count()).select_from(stored_files).where(_T.name == name)
    return int((await conn.execute(query)).scalar_one())


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    """A local file's chunks, each read in a thread."""
    handle: BinaryIO = await asyncio.to_thread(path.open, "rb")
    try:
        while data := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield data
    finally:
        handle.close()
