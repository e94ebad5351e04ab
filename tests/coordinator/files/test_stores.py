"""Both file stores through the one interface (coordinator.files.FileStore): the same tests
on files under a data directory and on rows of a fresh PostgreSQL database. Downloads and
uploads go through a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from coordinator.config import CoordinatorConfig
from coordinator.db.schema import migrate, stored_files
from coordinator.errors import BodyTooLarge, NotFound
from coordinator.files import (
    DatabaseFiles,
    FileStore,
    LocalFiles,
    file_store_problem,
    open_file_store,
)
from coordinator.files.database import CHUNK_BYTES
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _postgres_database

HEADERS = {
    "Content-Type": "image/png",
    "Cache-Control": "private, max-age=31536000",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}
JOB, OTHER_JOB, WORKER = "job-1", "job-2", "worker-1"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# several chunks of the database back end, the last one partial
BIG = os.urandom(2 * CHUNK_BYTES + 12345)
SMALL = b"\x89PNG tiny"


@contextlib.asynccontextmanager
async def _postgres_engine() -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh, migrated PostgreSQL database, dropped afterwards."""
    created = await _postgres_database()
    if created is None:
        pytest.skip(f"no PostgreSQL server reachable at {POSTGRES_URL}")
    name, url = created
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await migrate(conn)
        yield engine
    finally:
        await engine.dispose()
        await _drop_postgres_database(name)


@pytest.fixture
async def postgres_engine() -> AsyncIterator[AsyncEngine]:
    async with _postgres_engine() as engine:
        yield engine


@pytest.fixture(params=["local", pytest.param("database", marks=pytest.mark.postgres)])
async def files(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FileStore]:
    """The same store's interface over either back end, its spool in <tmp>/data/uploads."""
    if request.param == "local":
        yield LocalFiles(tmp_path / "data")
        return
    async with _postgres_engine() as engine:
        yield DatabaseFiles(engine, tmp_path / "data" / "uploads")


@pytest.fixture
async def server(files: FileStore) -> AsyncIterator[str]:
    """GET /files/{digest}: a download; PUT /files?keep=0|1: an upload spooled (at most
    BIG's size) and kept or dropped, answering its digest; with check=1 checked to be BIG
    in the spool's thread (422 if not)."""

    async def download(request: web.Request) -> web.StreamResponse:
        try:
            return await files.response(request, request.match_info["digest"], HEADERS)
        except NotFound:
            raise web.HTTPNotFound() from None

    async def upload(request: web.Request) -> web.Response:
        checked: list[bytes] = []

        def check(path: Path) -> None:  # (?check=1) what the spool's thread sees, whole
            checked.append(path.read_bytes())
            if checked[0] != BIG:
                raise ValueError("not BIG")

        try:
            wanted = check if request.query.get("check") == "1" else None
            async with files.spool(request.content, len(BIG), wanted) as spooled:
                assert spooled.path.stat().st_size == spooled.size
                if spooled.refused is not None:
                    return web.Response(status=422, text=str(spooled.refused))
                assert len(checked) == (wanted is not None)
                if request.query["keep"] == "1":
                    await files.keep(spooled)
        except BodyTooLarge:
            raise web.HTTPRequestEntityTooLarge(len(BIG), request.content_length or 0) from None
        return web.Response(text=f"{spooled.sha256} {spooled.size}")

    app = web.Application(client_max_size=4 * len(BIG))
    app.router.add_get("/files/{digest}", download)
    app.router.add_put("/files", upload)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _temporary(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "data" / "uploads").glob(".incoming-*"))


async def test_put_stream_copy_and_remove(files: FileStore, server: str, tmp_path: Path) -> None:
    digest = _digest(BIG)
    assert not await files.exists(digest) and await files.size(digest) is None
    await files.put_bytes(BIG, digest)
    await files.put_bytes(BIG, digest)  # content-addressed: storing it again is harmless
    assert await files.exists(digest) and await files.size(digest) == len(BIG)
    async with aiohttp.ClientSession() as http, http.get(f"{server}/files/{digest}") as resp:
        assert resp.status == 200
        for name, value in HEADERS.items():
            assert resp.headers[name] == value
        assert resp.headers["Content-Length"] == str(len(BIG))
        assert await resp.read() == BIG
    async with files.local_copy(digest) as path:
        assert path.read_bytes() == BIG
    assert _temporary(tmp_path) == []  # a database copy is gone after its block

    await files.remove(digest)
    await files.remove(digest)
    assert not await files.exists(digest)
    async with aiohttp.ClientSession() as http, http.get(f"{server}/files/{digest}") as resp:
        assert resp.status == 404
    async with files.local_copy(digest) as path:
        assert not path.exists()


async def test_small_and_empty_files(files: FileStore) -> None:
    for data in (SMALL, b""):
        await files.put_bytes(data, _digest(data))
        assert await files.size(_digest(data)) == len(data)
        async with files.local_copy(_digest(data)) as path:
            assert path.read_bytes() == data


async def test_not_a_digest_is_refused(files: FileStore) -> None:
    for bad in ("../../etc/passwd", "AB" * 32, "ab" * 31):
        with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
            await files.exists(bad)


async def test_an_upload_is_kept_or_dropped(files: FileStore, server: str, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{server}/files?keep=0", data=SMALL) as resp:
            assert resp.status == 200 and await resp.text() == f"{_digest(SMALL)} {len(SMALL)}"
        assert not await files.exists(_digest(SMALL))  # dropped: nothing stored
        async with http.put(f"{server}/files?keep=1", data=io.BytesIO(BIG)) as resp:
            assert resp.status == 200 and await resp.text() == f"{_digest(BIG)} {len(BIG)}"
        assert await files.size(_digest(BIG)) == len(BIG)
        async with http.get(f"{server}/files/{_digest(BIG)}") as resp:
            assert await resp.read() == BIG
        async with http.put(f"{server}/files?keep=1", data=io.BytesIO(BIG + b"!")) as resp:
            assert resp.status == 413
        assert not await files.exists(_digest(BIG + b"!"))
        # the spool's check sees the whole file; what it raises comes back, nothing kept
        async with http.put(f"{server}/files?keep=1&check=1", data=io.BytesIO(BIG)) as resp:
            assert resp.status == 200 and await resp.text() == f"{_digest(BIG)} {len(BIG)}"
        async with http.put(f"{server}/files?keep=1&check=1", data=SMALL) as resp:
            assert resp.status == 422 and await resp.text() == "not BIG"
        assert not await files.exists(_digest(SMALL))
    # no temporary file is left behind, whatever became of the upload
    assert _temporary(tmp_path) == []


async def test_upload_markers(files: FileStore) -> None:
    assert await files.marked(JOB, WORKER, 0) is None
    await files.mark(JOB, WORKER, 0, _digest(SMALL))
    await files.mark(JOB, WORKER, 1, _digest(SMALL))
    await files.mark(JOB, WORKER, 1, _digest(BIG))  # uploaded again: the later one counts
    await files.mark(OTHER_JOB, WORKER, 0, _digest(BIG))
    assert await files.marked(JOB, WORKER, 0) == _digest(SMALL)
    assert await files.marked(JOB, WORKER, 1) == _digest(BIG)
    assert await files.marked(JOB, "worker-2", 1) is None
    await files.discard(JOB, WORKER, 2)
    assert await files.marked(JOB, WORKER, 0) is None
    assert await files.marked(JOB, WORKER, 1) is None
    assert await files.marked(OTHER_JOB, WORKER, 0) == _digest(BIG)
    with pytest.raises(ValueError, match="not an id"):
        await files.mark("../x", WORKER, 0, _digest(SMALL))
    with pytest.raises(ValueError, match="not an id"):
        await files.mark(JOB, "a.b", 0, _digest(SMALL))


async def test_local_markers_are_links_and_old_markers_still_count(tmp_path: Path) -> None:
    files = LocalFiles(tmp_path / "data")
    uploads = tmp_path / "data" / "uploads"
    await files.mark(JOB, WORKER, 0, _digest(SMALL))
    marker = uploads / f"{JOB}.{WORKER}.0"  # no folders to make or remove
    assert os.readlink(marker) == _digest(SMALL)
    await files.mark(JOB, WORKER, 0, _digest(BIG))  # replaced by a link
    assert await files.marked(JOB, WORKER, 0) == _digest(BIG) and marker.is_symlink()
    assert sorted(p.name for p in uploads.iterdir()) == [marker.name]  # no temporary left
    # markers of an older version, in folders (the result may come after an upgrade): a
    # link, or a file
    older = uploads / JOB / WORKER
    older.mkdir(parents=True)
    os.symlink(_digest(SMALL), older / "1")
    (older / "2").write_text(_digest(BIG))
    assert await files.marked(JOB, WORKER, 1) == _digest(SMALL)
    assert await files.marked(JOB, WORKER, 2) == _digest(BIG)
    await files.discard(JOB, WORKER, 3)  # the new marker and the older folder both go
    assert list(uploads.iterdir()) == []
    assert await files.marked(JOB, WORKER, 2) is None


async def test_prune_forgets_old_markers_and_temporary_files(
    files: FileStore, tmp_path: Path
) -> None:
    await files.put_bytes(SMALL, _digest(SMALL))
    await files.mark(JOB, WORKER, 0, _digest(SMALL))
    leftover = tmp_path / "data" / "uploads" / ".incoming-killed"
    leftover.write_bytes(b"half an upload")
    assert await files.prune(3600) == 0
    assert await files.marked(JOB, WORKER, 0) == _digest(SMALL) and leftover.exists()
    assert await files.prune(-60) == 1  # everything is older than a minute from now
    assert await files.marked(JOB, WORKER, 0) is None and not leftover.exists()
    assert list((tmp_path / "data" / "uploads").iterdir()) == []
    assert await files.exists(_digest(SMALL))  # results are never pruned


@pytest.mark.postgres
async def test_database_files_are_rows_of_chunks(
    postgres_engine: AsyncEngine, tmp_path: Path
) -> None:
    files = DatabaseFiles(postgres_engine, tmp_path / "uploads")
    await files.put_bytes(BIG, _digest(BIG))
    async with postgres_engine.connect() as conn:
        sizes = (
            await conn.execute(
                select(func.length(stored_files.c.data)).order_by(stored_files.c.chunk)
            )
        ).scalars()
        assert list(sizes) == [CHUNK_BYTES, CHUNK_BYTES, 12345]
    assert not (tmp_path / "results").exists()


def test_the_database_store_needs_postgresql(tmp_path: Path) -> None:
    sqlite = CoordinatorConfig(data_dir=tmp_path, file_store="database")
    problem = file_store_problem(sqlite)
    assert problem is not None and "--database-url postgresql" in problem
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        open_file_store(sqlite, create_async_engine(sqlite.resolved_database_url))
    bad = CoordinatorConfig(data_dir=tmp_path, file_store="s3")
    assert "use one of local, database" in (file_store_problem(bad) or "")
    assert file_store_problem(CoordinatorConfig(data_dir=tmp_path)) is None
    shared = CoordinatorConfig(data_dir=tmp_path, file_store="database", database_url=POSTGRES_URL)
    assert file_store_problem(shared) is None


async def test_a_made_file_is_stored_under_its_digest(files: FileStore) -> None:
    def refused() -> tuple[bytes, str]:
        raise ValueError("not an image")

    with pytest.raises(ValueError, match="not an image"):
        await files.put_made(refused)
    # made and written (one thread hop on disk), content-addressed as put_bytes
    assert await files.put_made(lambda: (SMALL, _digest(SMALL))) == _digest(SMALL)
    assert await files.size(_digest(SMALL)) == len(SMALL)
    async with files.local_copy(_digest(SMALL)) as path:
        assert path.read_bytes() == SMALL
