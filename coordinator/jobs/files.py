"""Content-addressed result files under the data directory.

A file's name is the SHA-256 of its bytes, so writing the same image twice is harmless
and a crash between writing the file and committing the job leaves only an orphan.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["ResultFiles"]


class ResultFiles:
    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return self._root / digest[:2] / f"{digest[2:]}.png"

    def put_file(self, source: Path, digest: str) -> None:
        """Move `source` in as the file of `digest`. The caller has hashed it (it must be
        `digest`) and synced it to disk, and it lies on the same file system (the data
        directory), so the move is one atomic rename."""
        target = self.path(digest)
        if target.exists():
            source.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)

    def put_bytes(self, data: bytes, digest: str) -> None:
        """Store `data` (whose SHA-256 is `digest`) durably: a synced temporary file in the
        same directory, renamed into place. Blocking: call it in a thread."""
        target = self.path(digest)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)

    def remove(self, digest: str) -> None:
        """Delete the file of `digest` (a disputed image no result refers to any more).
        Blocking: call it in a thread."""
        self.path(digest).unlink(missing_ok=True)

    def get(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()
