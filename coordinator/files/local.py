"""LocalFiles: stored files under the data directory (`--file-store local`, the default).

    <data dir>/results/<ab>/<rest>.png          result images
    <data dir>/uploads/<job>/<worker>/<index>   upload markers (symbolic links whose
                                                target is the image's SHA-256)
    <data dir>/uploads/.incoming-*              uploads being received (the spool)

The spool lies on the same file system as results/, so keeping a checked upload is one
atomic rename. Downloads are sent by aiohttp's FileResponse (sendfile, ranges).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from aiohttp import web

from coordinator.errors import NotFound
from coordinator.files.spool import Spooled
from coordinator.files.store import UPLOADS, FileStore, marker_name, markers_of_job, result_name

__all__ = ["LocalFiles"]


class LocalFiles(FileStore):
    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir / UPLOADS)
        self._root = data_dir

    def path(self, digest: str) -> Path:
        """Where the result file of `digest` lies (whether or not it exists)."""
        return self._root / result_name(digest)

    # --- uploads -----------------------------------------------------------------------

    async def keep(self, spooled: Spooled) -> None:
        # a rename and a directory: metadata only, cheaper on the loop than a thread hop
        target = self.path(spooled.sha256)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(spooled.path, target)

    # A marker is a symbolic link whose target is the image's SHA-256 (not a path): made
    # and read in one call each, atomic without a temporary file; written without fsync,
    # like SQLite's own writes here (coordinator.db.inline_sqlite), on the loop: cheaper
    # than a thread hop. (A marker that is a regular file, from an older version, is read
    # too.)

    async def mark(self, job_id: str, worker_id: str, index: int, sha256: str) -> None:
        marker = self._root / marker_name(job_id, worker_id, index)
        folder = marker.parent
        try:
            # (two mkdirs, where pathlib's mkdir(parents=True) makes three calls)
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder.parent)
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
        except FileNotFoundError:  # the uploads folder itself went away
            folder.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(sha256, marker)
        except FileExistsError:  # uploaded again: the later one counts, replaced atomically
            tmp = folder / f".marker-{secrets.token_hex(8)}"
            os.symlink(sha256, tmp)
            try:
                os.replace(tmp, marker)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    async def marked(self, job_id: str, worker_id: str, index: int) -> str | None:
        path = self._root / marker_name(job_id, worker_id, index)
        try:
            return os.readlink(path)
        except FileNotFoundError:
            return None
        except OSError:  # not a link: a marker file of an older version
            try:
                return path.read_text().strip()
            except FileNotFoundError:
                return None

    async def discard(self, job_id: str) -> None:
        # in a thread: removing a directory can wait on the disk (measured up to ms here)
        folder = self._root / markers_of_job(job_id)
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)

    async def _prune_markers(self, max_age: float) -> int:
        return await asyncio.to_thread(self._prune_folders, max_age)

    def _prune_folders(self, max_age: float) -> int:
        cutoff = time.time() - max_age
        pruned = 0
        for entry in self._spool_dir.iterdir():
            if not entry.is_dir():
                continue  # the spool's temporary files (FileStore.prune)
            try:
                newest = max(
                    (p.lstat().st_mtime for p in entry.rglob("*")), default=entry.stat().st_mtime
                )
            except FileNotFoundError:
                continue  # removed meanwhile by the job's own finish
            if newest < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                pruned += 1
        return pruned

    # --- results -----------------------------------------------------------------------

    async def put_bytes(self, data: bytes, digest: str) -> None:
        await asyncio.to_thread(self._write, data, self.path(digest))

    async def put_made(self, make: Callable[[], tuple[bytes, str]]) -> str:
        def made() -> str:  # one thread hop for making and writing
            data, digest = make()
            self._write(data, self.path(digest))
            return digest

        return await asyncio.to_thread(made)

    @staticmethod
    def _write(data: bytes, target: Path) -> None:
        """A synced temporary file in the same directory, renamed into place."""
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)

    async def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def remove(self, digest: str) -> None:
        await asyncio.to_thread(self.path(digest).unlink, missing_ok=True)

    @contextlib.asynccontextmanager
    async def local_copy(self, digest: str) -> AsyncIterator[Path]:
        yield self.path(digest)

    async def response(
        self, request: web.Request, digest: str, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        path = self.path(digest)
        if not path.is_file():
            raise NotFound(f"the image {digest} is no longer stored")
        # (aiohttp sets the ETag from the file's time and size: stable, as files never change)
        return web.FileResponse(path, headers=dict(headers))
