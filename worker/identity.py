"""The worker's Ed25519 identity, created once and kept in a file readable only by its owner."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.signing import Identity

__all__ = ["load_or_create_identity"]


def load_or_create_identity(path: Path) -> Identity:
    """Load the key at `path`, or create it (mode 0600) if the file does not exist yet."""
    if path.exists():
        text = path.read_text().strip()
        try:
            return Identity.from_private_bytes(bytes.fromhex(text))
        except ValueError as exc:
            raise ValueError(
                f"identity file {path} is not a hex Ed25519 key ({exc}); "
                "move it away to create a new identity (the worker's reputation starts over)"
            ) from None
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(identity.private_bytes().hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    # link() fails if another process created the file meanwhile: then we use theirs.
    try:
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink()
        return load_or_create_identity(path)
    tmp.unlink()
    return identity
