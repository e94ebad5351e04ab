"""Image uploads between `PUT .../images/{index}` and the result that pays for them.

An upload is streamed to a temporary file under the data directory while it is hashed
(`Uploads.spool`), checked, and then moved into the content-addressed result files. A
small marker (`uploads/<job>/<worker>/<index>`, holding the image's SHA-256) remembers
which worker uploaded which image of which job, so the finishing request can name them
and any coordinator process sharing the data directory can accept it. Markers go away
when the job finishes or is given back; those of abandoned jobs are pruned by age.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aiohttp import StreamReader

from coordinator.errors import BodyTooLarge

__all__ = ["Spooled", "Uploads"]

# write (and hash) the body in pieces of about this size, in a thread
_FLUSH_BYTES = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class Spooled:
    """A received body on disk."""

    path: Path
    sha256: str
    size: int


class _Sink:
    """A file being written and hashed; its methods block, so call them in a thread."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._hasher = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._handle.write(data)
        self._hasher.update(data)

    def finish(self, data: bytes) -> str:
        """Write the last piece and sync: the SHA-256 of everything written."""
        self.write(data)
        return self.sync()

    def sync(self) -> str:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return self._hasher.hexdigest()


class Uploads:
    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def spool(self, body: StreamReader, limit: int) -> AsyncIterator[Spooled]:
        """Stream `body` into a temporary file (at most `limit` bytes, else BodyTooLarge);
        the file is removed on leaving the block unless the caller moved it away."""
        fd, name = tempfile.mkstemp(dir=self._root, prefix=".incoming-")
        path = Path(name)
        try:
            size = 0
            pending = bytearray()
            with os.fdopen(fd, "wb") as handle:
                sink = _Sink(handle)
                async for chunk in body.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge(
                            f"the image is over the limit of {limit} bytes for this job's size",
                            [("body", f"must be at most {limit} bytes")],
                        )
                    pending += chunk
                    if len(pending) >= _FLUSH_BYTES:
                        await asyncio.to_thread(sink.write, bytes(pending))
                        pending.clear()
                # (one thread hop for both: a hop costs more than a small image's write)
                digest = await asyncio.to_thread(sink.finish, bytes(pending))
            yield Spooled(path, digest, size)
        finally:
            # (a quick local unlink; no thread, so it also runs when we are cancelled)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _marker(self, job_id: str, worker_id: str, index: int) -> Path:
        for part in (job_id, worker_id):
            if not _NAME.match(part):
                raise ValueError(f"not an id: {part!r}")
        return self._root / job_id / worker_id / str(index)

    def mark(self, job_id: str, worker_id: str, index: int, sha256: str) -> None:
        """Remember that this worker uploaded image `index` of the job, with this hash."""
        marker = self._marker(job_id, worker_id, index)
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=marker.parent, prefix=".marker-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(sha256)
            os.replace(tmp, marker)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def marked(self, job_id: str, worker_id: str, index: int) -> str | None:
        """The SHA-256 of image `index` as this worker uploaded it, or None."""
        try:
            return self._marker(job_id, worker_id, index).read_text().strip()
        except FileNotFoundError:
            return None

    def discard(self, job_id: str) -> None:
        """Forget every upload of the job (finished or given back)."""
        if _NAME.match(job_id):
            shutil.rmtree(self._root / job_id, ignore_errors=True)

    def prune(self, max_age: float) -> int:
        """Forget uploads of jobs nobody touched for `max_age` seconds; returns how many
        jobs. Also removes temporary files a killed process left behind."""
        cutoff = time.time() - max_age
        pruned = 0
        for entry in self._root.iterdir():
            try:
                if entry.name.startswith(".incoming-"):
                    if entry.stat().st_mtime < cutoff:
                        entry.unlink(missing_ok=True)
                    continue
                newest = max(
                    (p.stat().st_mtime for p in entry.rglob("*")), default=entry.stat().st_mtime
                )
            except FileNotFoundError:
                continue  # removed meanwhile by the job's own finish
            if newest < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                pruned += 1
        return pruned
