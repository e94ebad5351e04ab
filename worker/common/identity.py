"""The worker's Ed25519 identity: a key file readable only by its owner, held by one process.

One machine may run several workers (`worker image`, `worker blocks`, `worker gateway`, or
two image workers). Each needs its own identity: the coordinator keeps one token per key,
so two processes sharing a key would keep replacing each other's registration. Hence:

- default names differ per service (`HOST-image`, `HOST-blocks`, `HOST-gateway`), and a
  second instance of a service takes the next free one (`HOST-image-2`, ...);
- a process holds an exclusive `flock` on its identity file for its whole life. The kernel
  drops the lock when the process dies, however it dies, so a killed worker never blocks
  the next one. An explicit `--name`/`--identity` that is held elsewhere is an error.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from protocol.signing import Identity
from worker.errors import IdentityFileInvalid, IdentityInUse

__all__ = [
    "ClaimedIdentity",
    "IdentityLock",
    "claim_identity",
    "default_name",
    "load_or_create_identity",
]

log = logging.getLogger(__name__)

# names are 2-32 letters, digits, '_', '.', '-' starting with a letter or digit
# (protocol.messages.NAME_PATTERN)
MAX_NAME_LENGTH = 32
# default names tried per service before giving up: HOST-image ... HOST-image-99
MAX_INSTANCES = 99


def default_name(host: str, service: str, instance: int = 1) -> str:
    """`HOST-SERVICE` (instance 1) or `HOST-SERVICE-N`, a valid worker name: the host part
    is cleaned and shortened so that the suffix always survives."""
    suffix = f"-{service}" if instance == 1 else f"-{service}-{instance}"
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", host)
    base = re.sub(r"^[^A-Za-z0-9]+", "", base)[: MAX_NAME_LENGTH - len(suffix)]
    return (base.rstrip("_.-") or "worker") + suffix


def load_or_create_identity(path: Path) -> Identity:
    """Load the key at `path`, or create it (mode 0600) if the file does not exist yet.
    Takes no lock: `claim_identity` is what a worker process calls."""
    if path.exists():
        return _parse(path.read_text(), path)
    return _create(path) or load_or_create_identity(path)


def _parse(text: str, path: Path) -> Identity:
    try:
        return Identity.from_private_bytes(bytes.fromhex(text.strip()))
    except ValueError as exc:
        raise IdentityFileInvalid(path, str(exc)) from None


def _create(path: Path) -> Identity | None:
    """Write a new key atomically; None if another process created the file meanwhile."""
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(identity.private_bytes().hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    # link() fails if another process created the file meanwhile: then we use theirs.
    try:
        os.link(tmp, path)
    except FileExistsError:
        return None
    finally:
        tmp.unlink()
    return identity


# Lock descriptors this process holds. A forked child (hivemind's DHT process) would
# otherwise share them and keep the lock alive after the worker itself was killed.
_held: set[int] = set()
_fork_hook_installed = False


def _forget_locks_in_child() -> None:
    for fd in _held:
        os.close(fd)  # closing only our copy; the parent keeps its lock
    _held.clear()


class IdentityLock:
    """An exclusive `flock` on an identity file, held until `release()` or process death.

    The descriptor is not inherited by exec'd programs (Python's default) nor kept by
    forked children, so only this process can hold the lock."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path) -> IdentityLock:
        """Lock the existing file at `path`; IdentityInUse if another process holds it."""
        global _fork_hook_installed
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IdentityInUse(path) from None
        except BaseException:
            os.close(fd)
            raise
        if not _fork_hook_installed:
            os.register_at_fork(after_in_child=_forget_locks_in_child)
            _fork_hook_installed = True
        _held.add(fd)
        return cls(path, fd)

    def read_text(self) -> str:
        """The locked file's content (read through the locked descriptor)."""
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 4096):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", errors="replace")

    def release(self) -> None:
        if self._fd in _held:
            _held.discard(self._fd)
            os.close(self._fd)  # drops the flock


@dataclass(frozen=True)
class ClaimedIdentity:
    """A worker's name and identity, locked for this process (`with` releases the lock)."""

    # the worker's display name
    name: str
    # the identity file, locked by `lock`
    file: Path
    # the key read from the locked file
    identity: Identity
    lock: IdentityLock

    def __enter__(self) -> ClaimedIdentity:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.lock.release()


def claim_identity(
    service: str, *, name: str | None, file: Path | None, data_home: Path, host: str
) -> ClaimedIdentity:
    """Choose, create if needed, and lock this process's identity.

    `name` and `file` are the operator's `--name` and `--identity` (None = default). Given
    either, the identity is `file` or `DATA_HOME/worker-NAME.key`, and if another process
    holds it, IdentityInUse. Given neither, the first default name (`HOST-SERVICE`,
    `HOST-SERVICE-2`, ...) whose identity no live process holds is taken."""
    if name is not None or file is not None:
        chosen = name or default_name(host, service)
        return _claim(chosen, file or data_home / f"worker-{chosen}.key")
    for instance in range(1, MAX_INSTANCES + 1):
        chosen = default_name(host, service, instance)
        try:
            return _claim(chosen, data_home / f"worker-{chosen}.key")
        except IdentityInUse:
            log.info("identity of %s is in use by another process; trying the next", chosen)
    raise IdentityInUse(data_home / f"worker-{default_name(host, service, MAX_INSTANCES)}.key")


def _claim(name: str, path: Path) -> ClaimedIdentity:
    if not path.exists():
        _create(path)  # None (someone else created it first) is fine: the lock decides
    lock = IdentityLock.acquire(path)
    try:
        identity = _parse(lock.read_text(), path)
    except BaseException:
        lock.release()
        raise
    log.info("worker name %s, identity %s (public key %s)", name, path, identity.public_key)
    return ClaimedIdentity(name, path, identity, lock)
