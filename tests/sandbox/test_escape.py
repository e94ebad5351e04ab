"""The escape suite: an engine standing in for malicious model code tries each way out of the
sandbox it is started in with the worker's own kind of policy; every attempt must fail and the
engine must keep serving afterwards.

Each test sets small limits of its own (64 MiB of disk, 1 GiB of memory, 64 processes), plants
its files under its tmp dir (HOME included) and only ever aims at 127.0.0.1. The README's
table "attempt → result" lists what these assert.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import Sandbox, SandboxPolicy
from sandbox.confine import check_confinement
from tests.procs import assert_confined
from tests.sandbox.test_sandbox import REPO_ROOT

HOSTILE = "tests.sandbox.hostile:HostileEngine"
GUARD = 30.0
MIB = 2**20
SECRET = "idl_" + "s3cr3t" * 6

pytestmark = pytest.mark.skipif(
    not check_confinement().ready,
    reason=f"confinement unavailable here: {check_confinement().explain()}",
)


def policy(tmp_path: Path, **overrides: Any) -> SandboxPolicy:
    fields: dict[str, Any] = {
        "workdir_root": tmp_path,
        "extra_env": {"PYTHONPATH": str(REPO_ROOT)},
        "start_timeout": GUARD,
        "job_timeout": GUARD,
        "memory_bytes": 1024 * MIB,
        "disk_bytes": 64 * MIB,
        "processes": 64,
        "packages": ("sandbox", "protocol", "tests"),
    }
    fields.update(overrides)
    return SandboxPolicy(**fields)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A planted home: an SSH key, a worker identity, and the API key in the environment."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nplanted\n")
    (home / ".ssh" / "id_rsa").chmod(0o600)
    identity = home / ".local" / "share" / "idlegrid" / "image.key"
    identity.parent.mkdir(parents=True)
    identity.write_text("planted identity")
    identity.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("IDLEGRID_API_KEY", SECRET)
    return home


@pytest.fixture
async def engine(tmp_path: Path, home: Path) -> AsyncIterator[Sandbox]:
    async with asyncio.timeout(GUARD):
        sb = await Sandbox.create(HOSTILE, {}, policy(tmp_path))
    try:
        yield sb
    finally:
        await sb.aclose()


async def attempt(sb: Sandbox, kind: str, **payload: Any) -> dict[str, Any]:
    """Run one attempt, then check that the engine still serves."""
    async with asyncio.timeout(GUARD):
        outcome = (await sb.call(kind, payload)).data
        assert (await sb.call("echo", {})).data["alive"]
    return outcome


async def test_the_engine_process_is_confined_as_the_issue_requires(engine: Sandbox) -> None:
    """Checked from the host in /proc: NoNewPrivs, seccomp filter mode, other namespaces."""
    pid = engine.pid
    assert pid is not None and pid != os.getpid()
    assert_confined(pid, os.getpid(), ("mnt", "pid", "user", "net", "ipc", "uts"))
    inside = await attempt(engine, "status")
    assert inside["NoNewPrivs"] == "1" and inside["Seccomp"] == "2"
    assert int(inside["CapEff"], 16) == 0


async def test_no_connection_to_the_hosts_loopback(engine: Sandbox) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    try:
        outcome = await attempt(engine, "connect", port=listener.getsockname()[1])
        assert outcome == {"connected": False, "error": "ECONNREFUSED"}
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's listener
    finally:
        listener.close()


async def test_only_its_own_loopback_interface(engine: Sandbox) -> None:
    assert (await attempt(engine, "interfaces"))["interfaces"] == ["lo"]


async def test_cannot_read_the_donors_files_or_the_worker_identity(
    engine: Sandbox, home: Path, tmp_path: Path
) -> None:
    beside_the_workdir = tmp_path / "planted.txt"
    beside_the_workdir.write_text("planted")
    paths = [
        home / ".ssh" / "id_rsa",
        home / ".local" / "share" / "idlegrid" / "image.key",
        beside_the_workdir,
        Path("/root/.ssh/id_rsa"),
        Path("/etc/shadow"),
    ]
    files = (await attempt(engine, "read", paths=[str(p) for p in paths]))["files"]
    for path in paths:
        assert files[str(path)] == {"error": "ENOENT"}, path
    assert (home / ".ssh" / "id_rsa").read_text().endswith("planted\n")


async def test_cannot_write_outside_its_workdir(engine: Sandbox, tmp_path: Path) -> None:
    outside = [tmp_path / "escaped.txt", Path("/escaped.txt"), Path(REPO_ROOT) / "escaped.txt"]
    inside = engine.workdir / "fine.txt"
    files = (await attempt(engine, "write", paths=[*map(str, outside), str(inside)]))["files"]
    for path in outside:
        assert not path.exists(), path  # nothing reaches the host
        if Path("/tmp") not in path.parents:  # (its /tmp is a private tmpfs: writable)
            assert files[str(path)]["error"] in {"EROFS", "ENOENT", "EACCES"}, (path, files)
    assert files[str(inside)] == {"written": True}
    assert not inside.exists()  # the workdir is a tmpfs the host never sees


async def test_cannot_read_the_api_key_from_any_environ(engine: Sandbox) -> None:
    outcome = await attempt(engine, "environs", secret=SECRET, host_parent=os.getpid())
    assert "SECRET FOUND" not in outcome["environs"].values()
    assert outcome["environs"][str(os.getpid())] == "ENOENT"  # the worker is not visible
    assert len(outcome["visible_pids"]) <= 3  # bubblewrap's init, the engine, maybe `ls`


async def test_cannot_signal_or_ptrace_the_worker(engine: Sandbox) -> None:
    outcome = await attempt(engine, "signal", host_parent=os.getpid())
    assert outcome == {
        "host_parent": "ESRCH",
        "parent_after_sigkill": "alive",
        "ptrace_parent": "EPERM",
        "ptrace_host_parent": "EPERM",
    }


async def test_a_fork_bomb_stops_at_the_process_limit(engine: Sandbox) -> None:
    outcome = await attempt(engine, "fork_bomb", tries=500)
    assert outcome["error"] == "EAGAIN"
    assert outcome["started"] < 64


async def test_memory_past_the_limit_is_refused(engine: Sandbox) -> None:
    outcome = await attempt(engine, "allocate", bytes=2048 * MIB)
    assert outcome == {"allocated": False, "error": "MemoryError"}


@pytest.mark.parametrize("where", ["workdir", "tmp"])
async def test_the_disk_quota_holds(engine: Sandbox, where: str) -> None:
    path = engine.workdir / "big.bin" if where == "workdir" else Path("/tmp/big.bin")
    outcome = await attempt(engine, "fill_disk", path=str(path), bytes=256 * MIB)
    assert outcome["error"] == "ENOSPC"
    assert outcome["written"] <= 64 * MIB


async def test_no_process_outlives_the_engine(tmp_path: Path, home: Path) -> None:
    token = f"{300 + uuid.uuid4().int % 10**6 / 10**7:.7f}"  # a unique `sleep` argument
    sb = await Sandbox.create(HOSTILE, {}, policy(tmp_path))
    try:
        await attempt(sb, "outlive", token=token)
        # (on a loaded machine /proc may show the new process a moment later)
        for _ in range(100):
            if _processes_with(token):
                break
            await asyncio.sleep(0.05)
        assert _processes_with(token), "the daemon should run while the engine does"
    finally:
        await sb.aclose()
    for _ in range(int(GUARD / 0.05)):
        if not _processes_with(token):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the daemon outlived the engine: pids {_processes_with(token)}")


async def test_the_model_is_readable_and_read_only(tmp_path: Path, home: Path) -> None:
    # under the host's /tmp, like most test and benchmark models: bound over the
    # sandbox's own /tmp
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.safetensors").write_text("weights")
    async with await Sandbox.create(HOSTILE, {}, policy(tmp_path, read_only=(model,))) as sb:
        weights = str(model / "weights.safetensors")
        assert (await attempt(sb, "read", paths=[weights]))["files"] == {
            weights: {"read": "weights"}
        }
        written = (await attempt(sb, "write", paths=[weights]))["files"]
        assert written == {weights: {"error": "EROFS"}}
    assert (model / "weights.safetensors").read_text() == "weights"


async def test_cannot_mount_or_make_namespaces(engine: Sandbox) -> None:
    outcome = await attempt(engine, "mount")
    assert outcome == {"mount": "EPERM", "unshare_user": "EPERM", "unshare_net": "EPERM"}


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
