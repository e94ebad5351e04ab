"""LocalFiles: stored files under the data directory (`--file-store local`, the default).

    <data dir>/results/<ab>/<rest>.png          result images
    <data dir>/uploads/<job>.<worker>.<index>   upload markers (symbolic links whose
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
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from aiohttp import web

from coordinator.errors import NotFound
from coordinator.files.spool import Spooled
from coordinator.files.store import (
    UPLOADS,
    FileStore,
    flat_marker_name,
    marker_name,
    markers_of_job,
    result_name,
)

__all__ = ["LocalFiles"]

# a replacement marker being made (pruned when a killed process left one behind)
MARKER_TEMPORARY = ".marker-"


class LocalFiles(FileStore):
    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir / UPLOADS)
        self._root = data_dir
        self._uploads = f"{self._spool_dir}{os.sep}"  # markers' names start so

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

    # A marker is a symbolic link whose target is the image's SHA-256 (not a path), named
    # `uploads/<job>.<worker>.<index>` (ids hold no '.'): made, read and removed in one call
    # each, with no folders to make or remove; atomic without a temporary file; written
    # without fsync, like SQLite's own writes here (coordinator.db.inline_sqlite), on the
    # loop: metadata only, cheaper than a thread hop. Markers of an older version (folders
    # `uploads/<job>/<worker>/<index>`, a link or a file) are still read and removed.

    def _marker(self, job_id: str, worker_id: str, index: int) -> str:
        return f"{self._uploads}{flat_marker_name(job_id, worker_id, index)}"

    async def mark(self, job_id: str, worker_id: str, index: int, sha256: str) -> None:
        marker = self._marker(job_id, worker_id, index)
        try:
            os.symlink(sha256, marker)
        except FileNotFoundError:  # the uploads folder itself went away
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            os.symlink(sha256, marker)
        except FileExistsError:  # uploaded again: the later one counts, replaced atomically
            tmp = f"{self._uploads}{MARKER_TEMPORARY}{secrets.token_hex(8)}"
            os.symlink(sha256, tmp)
            try:
                os.replace(tmp, marker)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    async def marked(self, job_id: str, worker_id: str, index: int) -> str | None:
        try:
            return os.readlink(self._marker(job_id, worker_id, index))
        except FileNotFoundError:
            pass
        # an older version's marker, in folders: a link, or a file
        path = self._root / marker_name(job_id, worker_id, index)
        try:
            return os.readlink(path)
        except FileNotFoundError:
            return None
        except OSError:  # not a link: a marker file
            try:
                return path.read_text().strip()
            except FileNotFoundError:
                return None

    async def discard(self, job_id: str, worker_id: str, count: int) -> None:
        # the worker's markers: unlinked on the loop (metadata only, as making them); any
        # other worker's (a job leased again) are pruned by age
        for index in range(count):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marker(job_id, worker_id, index))
        # an older version's folder of the job's markers (one stat when there is none)
        folder = f"{self._root}{os.sep}{markers_of_job(job_id)}"
        try:
            os.lstat(folder)
        except FileNotFoundError:
            return
        # in a thread: removing a directory can wait on the disk
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)

    async def _prune_markers(self, max_age: float) -> int:
        return await asyncio.to_thread(self._prune_folders, max_age)

    def _prune_folders(self, max_age: float) -> int:
        cutoff = time.time() - max_age
        pruned = 0
        for entry in self._spool_dir.iterdir():
            if entry.is_symlink() or entry.name.startswith(MARKER_TEMPORARY):
                # a marker (or a killed replacement's temporary link)
                with contextlib.suppress(FileNotFoundError):
                    if entry.lstat().st_mtime < cutoff:
                        entry.unlink()
                        pruned += not entry.name.startswith(MARKER_TEMPORARY)
                continue
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

    async def stored_already(self, digest: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(self.path(digest)).st_mode)
        except FileNotFoundError:
            return False

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
