"""An upload's body streamed to a temporary file under the spool directory while it is
hashed. Both back ends check an upload there (coordinator.jobs.png_check reads a path)
and then keep it (`FileStore.keep`) or let it go: leaving the block removes whatever is
still there, so a refused upload leaves no file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aiohttp import StreamReader

from coordinator.errors import BodyTooLarge

__all__ = ["TEMPORARY_PREFIX", "Check", "Spooled", "prune_temporary", "spool"]

# write (and hash) the body in pieces of about this size, in a thread
_FLUSH_BYTES = 1024 * 1024
# every temporary file in the spool directory starts so (pruned when a killed process
# left one behind)
TEMPORARY_PREFIX = ".incoming-"
# a new file of our own: never an existing one, nor through a link
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# a check of a spooled file run in the thread that writes its last piece (blocking)
Check = Callable[[Path], None]


@dataclass(frozen=True)
class Spooled:
    """A received body on disk; `refused`: what the spool's `check` raised, if it did (the
    caller raises it when it has nothing to say first)."""

    path: Path
    sha256: str
    size: int
    refused: Exception | None = None


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
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return self._hasher.hexdigest()


def _finish_and_check(
    sink: _Sink, data: bytes, path: Path, check: Check | None
) -> tuple[str, Exception | None]:
    digest = sink.finish(data)
    if check is None:
        return digest, None
    try:
        check(path)
    except Exception as refused:
        return digest, refused
    return digest, None


@contextlib.asynccontextmanager
async def spool(
    root: Path, body: StreamReader, limit: int, check: Check | None = None
) -> AsyncIterator[Spooled]:
    """Stream `body` into a temporary file under `root` (at most `limit` bytes, else
    BodyTooLarge); the file is removed on leaving the block unless it was moved away.
    `check` (blocking: e.g. decoding the image) runs on the complete file in the same
    thread hop as its last write; what it raises comes as `Spooled.refused`."""
    # (os.open of a random name: what tempfile.mkstemp does, without its Python around it)
    name = f"{root}{os.sep}{TEMPORARY_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(name, _CREATE, 0o600)
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
            # (one thread hop for the last write, the sync and the check: a hop costs
            # more than a small image's write)
            digest, refused = await asyncio.to_thread(
                _finish_and_check, sink, bytes(pending), path, check
            )
        yield Spooled(path, digest, size, refused)
    finally:
        # (a quick local unlink; no thread, so it also runs when we are cancelled)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def prune_temporary(root: Path, max_age: float) -> None:
    """Remove temporary files older than `max_age` seconds that a killed process left
    behind. Blocking: call it in a thread."""
    cutoff = time.time() - max_age
    for entry in root.glob(f"{TEMPORARY_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
