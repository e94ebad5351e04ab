"""An engine standing in for malicious model code. It runs inside the sandbox child, never in
pytest; each `do_<attempt>` tries one way out and reports what happened, and never raises,
so one refused attempt does not end the engine."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

Emit = Callable[[dict[str, Any]], None]
Result = tuple[dict[str, Any], list[bytes]]

_libc = ctypes.CDLL(None, use_errno=True)
_PTRACE_ATTACH = 16
_MS_NOSUID = 2
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


def _failure(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def _libc_call(name: str, *args: Any) -> str | None:
    """None if the call succeeded, else the errno's name."""
    ctypes.set_errno(0)
    if getattr(_libc, name)(*args) == 0:
        return None
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


class HostileEngine:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def handle(self, kind: str, payload: dict[str, Any], emit: Emit) -> Result:
        method: Callable[[dict[str, Any]], dict[str, Any]] = getattr(self, f"do_{kind}")
        return method(payload), []

    def do_echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"alive": True, "pid": os.getpid()}

    def do_connect(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Reach a listener the test started on the host's loopback."""
        try:
            with socket.create_connection(("127.0.0.1", payload["port"]), timeout=3) as conn:
                conn.sendall(b"escaped")
        except OSError as exc:
            return {"connected": False, "error": _failure(exc)}
        return {"connected": True}

    def do_interfaces(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"interfaces": [name for _, name in socket.if_nameindex()]}

    def do_read(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Read each of `paths`: the contents if it worked, else the error."""
        found: dict[str, Any] = {}
        for path in payload["paths"]:
            try:
                with open(path, "rb") as handle:
                    found[path] = {"read": handle.read(4096).decode("latin-1")}
            except OSError as exc:
                found[path] = {"error": _failure(exc)}
        return {"files": found}

    def do_write(self, payload: dict[str, Any]) -> dict[str, Any]:
        done: dict[str, Any] = {}
        for path in payload["paths"]:
            try:
                with open(path, "wb") as handle:
                    handle.write(b"written by the engine")
                done[path] = {"written": True}
            except OSError as exc:
                done[path] = {"error": _failure(exc)}
        return {"files": done}

    def do_environs(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Look for `secret` in the environment of every process this engine can see, the
        parent's first."""
        pids = [str(os.getppid()), str(payload["host_parent"])]
        pids += sorted(p for p in os.listdir("/proc") if p.isdigit())
        seen: dict[str, str] = {}
        for pid in pids:
            try:
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    environ = handle.read()
            except OSError as exc:
                seen[pid] = _failure(exc)
                continue
            seen[pid] = "SECRET FOUND" if payload["secret"].encode() in environ else "no secret"
        return {
            "environs": seen,
            "visible_pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
        }

    def do_signal(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Signal 0 probes for a process without touching it: the worker's real pid must not
        exist here; the parent inside (the sandbox's init) ignores what it gets."""
        outcome: dict[str, Any] = {}
        try:
            os.kill(payload["host_parent"], 0)
            outcome["host_parent"] = "exists"
        except OSError as exc:
            outcome["host_parent"] = _failure(exc)
        # Only where our parent is a pid namespace's init (never the worker, should the
        # namespace be missing): the kernel drops a SIGKILL sent to it from inside.
        if os.getppid() == 1:
            try:
                os.kill(1, signal.SIGKILL)
                time.sleep(0.2)
                os.kill(1, 0)
                outcome["parent_after_sigkill"] = "alive"
            except OSError as exc:
                outcome["parent_after_sigkill"] = _failure(exc)
        else:
            outcome["parent_after_sigkill"] = f"not tried: parent is pid {os.getppid()}"
        outcome["ptrace_parent"] = _libc_call("ptrace", _PTRACE_ATTACH, os.getppid(), None, None)
        outcome["ptrace_host_parent"] = _libc_call(
            "ptrace", _PTRACE_ATTACH, payload["host_parent"], None, None
        )
        return outcome

    def do_fork_bomb(self, payload: dict[str, Any]) -> dict[str, Any]:
        children: list[subprocess.Popen[bytes]] = []
        error = None
        try:
            for _ in range(payload["tries"]):
                children.append(subprocess.Popen(["sleep", "30"]))
        except OSError as exc:
            error = _failure(exc)
        started = len(children)
        for child in children:
            child.kill()
            child.wait()
        return {"started": started, "error": error}

    def do_allocate(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            block = bytearray(payload["bytes"])
        except MemoryError:
            return {"allocated": False, "error": "MemoryError"}
        return {"allocated": len(block) == payload["bytes"]}

    def do_fill_disk(self, payload: dict[str, Any]) -> dict[str, Any]:
        written = 0
        chunk = b"\0" * 2**20
        try:
            with open(payload["path"], "wb") as handle:
                while written < payload["bytes"]:
                    handle.write(chunk)
                    handle.flush()
                    written += len(chunk)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(payload["path"])
            return {"written": written, "error": _failure(exc)}
        return {"written": written, "error": None}

    def do_outlive(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Start a daemon in a session of its own, detached from us, meant to outlive us."""
        child = subprocess.Popen(
            ["sleep", payload["token"]],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return {"daemon_pid": child.pid}

    def do_mount(self, payload: dict[str, Any]) -> dict[str, Any]:
        target = os.getcwd().encode()
        return {
            "mount": _libc_call("mount", b"none", target, b"tmpfs", _MS_NOSUID, None),
            "unshare_user": _libc_call("unshare", _CLONE_NEWUSER),
            "unshare_net": _libc_call("unshare", _CLONE_NEWNET),
        }

    def do_status(self, payload: dict[str, Any]) -> dict[str, Any]:
        with open("/proc/self/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        return {name: fields[name].strip() for name in ("NoNewPrivs", "Seccomp", "CapEff")}
