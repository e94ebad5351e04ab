"""The worker's cache of LoRA and textual inversion files, outside the sandbox.

Files are stored as `<sha256>.safetensors` in one folder that the engine's sandbox binds
read-only. A download is refused past `max_bytes` (the API's declared size first, then
while streaming), checked against the API's SHA-256 and for a safetensors header, and only
then renamed into place; a partial or wrong file never has a final name. The folder is kept
under `max_total_bytes` by evicting the least recently used files (each use touches its
file), never a file the current job uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import aiohttp

from worker.errors import AdapterUnavailable
from worker.image.civitai import CivitaiFile

__all__ = ["LoraCache", "check_safetensors_header"]

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
# a safetensors header is JSON of at most this many bytes (the format's own limit)
_MAX_HEADER = 100 * 1024 * 1024
_SUFFIX = ".safetensors"


def _failed(message: str) -> AdapterUnavailable:
    return AdapterUnavailable("download_failed", message)


def check_safetensors_header(path: Path) -> None:
    """ValueError unless `path` starts like a safetensors file (length, then a JSON object)."""
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > _MAX_HEADER or length > path.stat().st_size - 8:
            raise ValueError("no safetensors header")
        try:
            header = json.loads(file.read(length))
        except ValueError:
            raise ValueError("its safetensors header is not JSON") from None
        if not isinstance(header, dict):
            raise ValueError("its safetensors header is not a JSON object")


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class LoraCache:
    """`folder` holds the files; at most `max_bytes` each, `max_total_bytes` in all."""

    def __init__(self, folder: Path, max_bytes: int, max_total_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        folder.mkdir(parents=True, exist_ok=True)
        # one download of a file at a time
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}{_SUFFIX}"

    async def fetch(
        self,
        session: aiohttp.ClientSession,
        file: CivitaiFile,
        headers: dict[str, str],
        keep: Iterable[Path] = (),
    ) -> Path:
        """The cached file of `file`, downloaded first if needed (evicting none of `keep`);
        AdapterUnavailable when it is too large, unreachable, not safetensors or not the
        file the API describes."""
        limit_mb = self.max_bytes / 2**20
        if file.size_bytes is not None and file.size_bytes > self.max_bytes:
            raise _failed(
                f"{file.name!r} (version {file.version_id}) is {file.size_bytes / 2**20:.0f} MB, "
                f"over this worker's --lora-max-mb {limit_mb:.0f}"
            )
        target = self.path(file.sha256)
        lock = self._locks.setdefault(file.sha256, asyncio.Lock())
        async with lock:
            if target.exists():
                os.utime(target)
                return target
            await self._download(session, file, headers, target, keep)
        return target

    async def _download(
        self,
        session: aiohttp.ClientSession,
        file: CivitaiFile,
        headers: dict[str, str],
        target: Path,
        keep: Iterable[Path],
    ) -> None:
        what = f"{file.name!r} (version {file.version_id})"
        descriptor, name = tempfile.mkstemp(dir=self.folder, prefix=".part-")
        part = Path(name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(descriptor, "wb") as out:
                try:
                    async with session.get(file.url, headers=headers) as response:
                        if response.status >= 400:
                            raise _failed(f"downloading {what} answered {response.status}")
                        declared = response.content_length
                        if declared is not None and declared > self.max_bytes:
                            raise _failed(f"{what} is over this worker's --lora-max-mb")
                        async for chunk in response.content.iter_chunked(_CHUNK):
                            size += len(chunk)
                            if size > self.max_bytes:
                                raise _failed(f"{what} is over this worker's --lora-max-mb")
                            digest.update(chunk)
                            out.write(chunk)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise AdapterUnavailable(
                        "download_failed", f"downloading {what} failed ({exc})", unreachable=True
                    ) from None
            self._install(part, digest.hexdigest(), size, file, target, keep)
        finally:
            _discard(part)

    def _install(
        self,
        part: Path,
        sha256: str,
        size: int,
        file: CivitaiFile,
        target: Path,
        keep: Iterable[Path],
    ) -> None:
        """Give a checked download its final name (a few file operations: not awaited)."""
        what = f"{file.name!r} (version {file.version_id})"
        if sha256 != file.sha256:
            raise _failed(
                f"the file of {what} has SHA256 {sha256}, not the {file.sha256} CivitAI "
                "gives for it"
            )
        try:
            check_safetensors_header(part)
        except ValueError as exc:
            raise _failed(f"the file of {what} is not safetensors: {exc}") from None
        self.make_room(size, keep)
        part.replace(target)
        log.info("cached %s version %d (%d bytes)", file.kind, file.version_id, size)

    def make_room(self, incoming: int, keep: Iterable[Path]) -> None:
        """Evict the least recently used files until `incoming` more bytes fit under the cap,
        sparing those in `keep`."""
        kept = {path.resolve() for path in keep}
        files = []
        for path in self.folder.glob(f"*{_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files) + incoming
        for _, size, path in sorted(files, key=lambda entry: entry[0]):
            if total <= self.max_total_bytes:
                break
            if path.resolve() in kept:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                total -= size
                log.info("evicted %s from the LoRA cache", path.name)

    def touch(self, paths: Iterable[Path]) -> None:
        """Mark files as just used (the LRU order)."""
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
