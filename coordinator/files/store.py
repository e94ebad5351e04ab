"""FileStore: the one interface to stored files, whichever back end holds them.

Two kinds of file, both named like paths relative to the data directory:

- results: content-addressed PNGs (`results/<ab>/<rest>.png`, the name from the SHA-256 of
  the bytes), so storing the same image twice is harmless and a crash between storing a
  file and committing its job leaves only an orphan;
- upload markers (`uploads/<job>/<worker>/<index>`, on disk `uploads/<job>.<worker>.<index>`),
  holding an image's SHA-256: which worker uploaded which image of which job, so that the
  request finishing the job can name them and any coordinator sharing the files can accept
  it. Markers go away when the job finishes; those of abandoned jobs are pruned by age.

An upload's body is spooled to a local temporary file (coordinator.files.spool), checked
there and then kept (`keep`) or dropped (leaving the spool's block).
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from aiohttp import StreamReader, web

from coordinator.files.spool import Check, Spooled, prune_temporary, spool

__all__ = ["FileStore", "flat_marker_name", "marker_name", "markers_of_job", "result_name"]

_HEX_64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
# the folder of upload markers (and of the spool's temporary files, on disk)
UPLOADS = "uploads"


def result_name(digest: str) -> str:
    """The name of the result file whose SHA-256 is `digest` (ValueError if not a digest)."""
    if not _HEX_64.fullmatch(digest):
        raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
    return f"results/{digest[:2]}/{digest[2:]}.png"


def markers_of_job(job_id: str) -> str:
    """The folder of one job's upload markers, ending in '/' (ValueError if not an id)."""
    if not _NAME.fullmatch(job_id):
        raise ValueError(f"not an id: {job_id!r}")
    return f"{UPLOADS}/{job_id}/"


def marker_name(job_id: str, worker_id: str, index: int) -> str:
    if not _NAME.fullmatch(worker_id):
        raise ValueError(f"not an id: {worker_id!r}")
    return f"{markers_of_job(job_id)}{worker_id}/{int(index)}"


def flat_marker_name(job_id: str, worker_id: str, index: int) -> str:
    """The marker's name inside the uploads folder, with no folders of its own:
    `<job>.<worker>.<index>` (ids hold no '.'; ValueError if not an id)."""
    if not (_NAME.fullmatch(job_id) and _NAME.fullmatch(worker_id)):
        raise ValueError(f"not an id: {job_id!r} or {worker_id!r}")
    return f"{job_id}.{worker_id}.{int(index)}"


class FileStore(ABC):
    """Result images and upload markers. Every method may be called on the event loop:
    a back end moves blocking work to threads itself."""

    def __init__(self, spool_dir: Path) -> None:
        self._spool_dir = spool_dir
        spool_dir.mkdir(parents=True, exist_ok=True)

    # --- uploads -----------------------------------------------------------------------

    def spool(
        self, body: StreamReader, limit: int, check: Check | None = None
    ) -> AbstractAsyncContextManager[Spooled]:
        """Receive an upload into a local temporary file (coordinator.files.spool), and
        run `check` on it in the same thread hop."""
        return spool(self._spool_dir, body, limit, check)

    @abstractmethod
    async def keep(self, spooled: Spooled) -> None:
        """Store a spooled upload as the result file of its SHA-256. The caller has checked
        it; the temporary file may be moved away or left for the spool to remove."""

    @abstractmethod
    async def mark(self, job_id: str, worker_id: str, index: int, sha256: str) -> None:
        """Remember that this worker uploaded image `index` of the job, with this hash."""

    @abstractmethod
    async def marked(self, job_id: str, worker_id: str, index: int) -> str | None:
        """The SHA-256 of image `index` as this worker uploaded it, or None."""

    @abstractmethod
    async def discard(self, job_id: str, worker_id: str, count: int) -> None:
        """Forget the upload markers of the job (it finished or failed): at least those of
        `worker_id`'s images 0..count-1; a back end may forget other workers' too (what
        is left is pruned by age)."""

    async def prune(self, max_age: float) -> int:
        """Forget the upload markers nobody touched for `max_age` seconds and remove
        temporary files a killed process left behind; how many markers (or, on disk,
        jobs' folders) went."""
        await asyncio.to_thread(prune_temporary, self._spool_dir, max_age)
        return await self._prune_markers(max_age)

    @abstractmethod
    async def _prune_markers(self, max_age: float) -> int: ...

    # --- results -----------------------------------------------------------------------

    @abstractmethod
    async def put_bytes(self, data: bytes, digest: str) -> None:
        """Store `data` (whose SHA-256 is `digest`) durably as a result file."""

    async def put_made(self, make: Callable[[], tuple[bytes, str]]) -> str:
        """Store the result file `make` (blocking: e.g. decoding an image) returns, as
        (bytes, their SHA-256) run in a thread; the digest. A back end that writes in a
        thread does both in one hop (a hop costs more than a small image's work)."""
        data, digest = await asyncio.to_thread(make)
        await self.put_bytes(data, digest)
        return digest

    @abstractmethod
    async def size(self, digest: str) -> int | None:
        """The size in bytes of the result file of `digest`, or None if there is none."""

    async def exists(self, digest: str) -> bool:
        return await self.size(digest) is not None

    async def stored_already(self, digest: str) -> bool:
        """Whether the result file of `digest` is stored, for a back end that can tell
        without a round trip (a local stat); False otherwise. An upload of an image
        already stored is then checked in memory, with no file to write."""
        return False

    @abstractmethod
    async def remove(self, digest: str) -> None:
        """Delete the result file of `digest` (a disputed image no result refers to)."""

    @abstractmethod
    def local_copy(self, digest: str) -> AbstractAsyncContextManager[Path]:
        """A path holding the result file of `digest` for the block (for decoders that read
        files); a path that does not exist if there is no such file."""

    @abstractmethod
    async def response(
        self, request: web.Request, digest: str, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        """The result file of `digest` as a download with `headers` (content type, caching,
        CSP...), sent without reading it whole on the loop; NotFound if there is none."""
