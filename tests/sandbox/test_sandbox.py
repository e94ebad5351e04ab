"""Sandbox against real child processes running the engines in tests/sandbox/engines.py."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import Sandbox, SandboxPolicy
from sandbox.errors import (
    EngineCrashed,
    EngineFailed,
    EngineStartFailed,
    EngineTimedOut,
    FrameTooLarge,
    SandboxClosed,
)

ECHO = "tests.sandbox.engines:EchoEngine"
BINARY = "tests.sandbox.engines:BinaryEngine"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Generous bound for anything that should take well under a second; only hit on a hang.
GUARD = 20.0


def make_policy(tmp_path: Path, **overrides: Any) -> SandboxPolicy:
    # PYTHONPATH is scrubbed and the child's cwd is its workdir, so it would not find the
    # (not installed) tests package without this.
    fields: dict[str, Any] = {
        "workdir_root": tmp_path,
        "extra_env": {"PYTHONPATH": str(REPO_ROOT)},
        "start_timeout": GUARD,
        "job_timeout": GUARD,
    }
    fields.update(overrides)
    return SandboxPolicy(**fields)


@pytest.fixture
async def sb(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with asyncio.timeout(GUARD):
        sandbox = await Sandbox.create(ECHO, {"model": "tiny"}, make_policy(tmp_path))
    async with sandbox:
        yield sandbox


def is_running(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (an unreaped zombie runs no code)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rpartition(")")[2].split()[0] != "Z"


async def wait_for_exit(pidfd: int) -> None:
    """Wait until the process behind `pidfd` exits: a pidfd turns readable then."""
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        async with asyncio.timeout(GUARD):
            await exited.wait()
    finally:
        loop.remove_reader(pidfd)


# Blocking filesystem helpers, kept out of the async tests' bodies (ruff ASYNC240).
def entries(path: Path) -> list[Path]:
    return list(path.iterdir())


def exists(path: Path) -> bool:
    return path.exists()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def resolved(path: Path) -> Path:
    return path.resolve()


async def test_binary_input_reaches_engines_that_take_it(tmp_path: Path) -> None:
    blobs = [bytes(range(256)) * 1000, b"", b"\x00"]
    async with await Sandbox.create(BINARY, {}, make_policy(tmp_path)) as sb:
        result = await sb.call("reverse", {"n": 3}, blobs=blobs)
        assert result.data == {"n": 3, "sizes": [256000, 0, 1]}
        assert result.blobs == [blob[::-1] for blob in reversed(blobs)]
        assert (await sb.call("reverse", {})).data == {"sizes": []}  # none: not passed


async def test_binary_input_to_an_engine_without_it_is_its_error(sb: Sandbox) -> None:
    with pytest.raises(EngineFailed, match="blobs"):
        await sb.call("echo", {}, blobs=[b"x"])
    assert (await sb.call("echo", {})).data["payload"] == {}  # still serving


async def test_echo_round_trip_with_blobs(sb: Sandbox) -> None:
    payload = {"text": "héllo ✓", "nested": {"n": [1, 2.5, None, True]}, "repeat": 4096}
    result = await sb.call("echo", payload)
    assert result.data == {"payload": payload, "options": {"model": "tiny"}}
    assert result.blobs == [bytes(range(256)) * 4096, b"", b"\x00\xff" * 3]


@pytest.mark.parametrize("style", ["sync", "async"])
async def test_progress_arrives_in_order_before_the_result(sb: Sandbox, style: str) -> None:
    seen: list[dict[str, Any]] = []

    def record(data: dict[str, Any]) -> None:
        seen.append(data)

    async def record_async(data: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append(data)

    callback = record if style == "sync" else record_async
    result = await sb.call("progress", {"steps": 50}, on_progress=callback)
    assert seen == [{"step": i} for i in range(50)]
    assert result.data == {"steps": 50}


async def test_engine_exception_is_reported_and_engine_stays_up(sb: Sandbox) -> None:
    pid = sb.pid
    with pytest.raises(EngineFailed, match="the prompt was empty") as info:
        await sb.call("fail", {"message": "the prompt was empty"})
    assert info.value.error_type == "ValueError"
    assert info.value.message == "the prompt was empty"
    assert (await sb.call("echo", {})).data["payload"] == {}
    assert sb.pid == pid
    assert sb.restarts == 0


async def test_result_that_is_not_json_is_an_engine_failure(sb: Sandbox) -> None:
    with pytest.raises(EngineFailed, match="not JSON serializable") as info:
        await sb.call("bad_result", {})
    assert info.value.error_type == "TypeError"
    assert (await sb.call("echo", {})).blobs[1] == b""


async def test_child_killed_mid_call_is_a_crash_then_restarted(sb: Sandbox) -> None:
    first_pid = sb.pid
    assert first_pid is not None

    def kill_child(data: dict[str, Any]) -> None:
        assert data == {"started": True}
        os.kill(first_pid, signal.SIGKILL)

    with pytest.raises(EngineCrashed, match="SIGKILL"):
        await sb.call("wait_forever", {}, on_progress=kill_child)
    pid_between = sb.pid
    assert pid_between is None
    result = await sb.call("echo", {"again": True})
    assert result.data["payload"] == {"again": True}
    pid_after = sb.pid
    assert pid_after not in (None, first_pid)
    assert sb.restarts == 1


async def test_hanging_call_times_out_kills_and_restarts(sb: Sandbox) -> None:
    first_pid = sb.pid
    assert first_pid is not None
    async with asyncio.timeout(GUARD):
        with pytest.raises(EngineTimedOut, match="within 0.5 s"):
            await sb.call("wait_forever", {}, timeout=0.5)
    assert not is_running(first_pid)
    assert (await sb.call("echo", {})).data["options"] == {"model": "tiny"}
    assert sb.restarts == 1


async def test_failing_progress_callback_propagates_and_costs_a_restart(sb: Sandbox) -> None:
    def explode(data: dict[str, Any]) -> None:
        raise LookupError("callback bug")

    with pytest.raises(LookupError, match="callback bug"):
        await sb.call("wait_forever", {}, on_progress=explode)
    assert sb.pid is None
    assert (await sb.call("progress", {"steps": 2})).data == {"steps": 2}
    assert sb.restarts == 1


async def test_cancelled_call_kills_the_busy_child(sb: Sandbox) -> None:
    started = asyncio.Event()
    first_pid = sb.pid
    assert first_pid is not None
    task = asyncio.create_task(sb.call("wait_forever", {}, on_progress=lambda data: started.set()))
    async with asyncio.timeout(GUARD):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not is_running(first_pid)
    assert (await sb.call("echo", {})).data["payload"] == {}
    assert sb.restarts == 1


async def test_constructor_error_is_engine_start_failed(tmp_path: Path) -> None:
    policy = make_policy(tmp_path)
    with pytest.raises(EngineStartFailed, match="RuntimeError: model weights not found at"):
        await Sandbox.create("tests.sandbox.engines:BrokenEngine", {}, policy)
    assert entries(tmp_path) == []  # the workdir went with the failed sandbox


async def test_missing_engine_module_is_engine_start_failed(tmp_path: Path) -> None:
    with pytest.raises(EngineStartFailed, match="No module named 'tests.sandbox.nope'"):
        await Sandbox.create("tests.sandbox.nope:Engine", {}, make_policy(tmp_path))


async def test_engine_slower_than_start_timeout(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, start_timeout=0.5)
    async with asyncio.timeout(GUARD):
        with pytest.raises(EngineStartFailed, match="start_timeout"):
            await Sandbox.create("tests.sandbox.engines:NeverReadyEngine", {}, policy)
    assert entries(tmp_path) == []


async def test_malformed_engine_name_is_rejected_before_starting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="package.module:ClassName"):
        await Sandbox.create("tests.sandbox.engines.EchoEngine", {}, make_policy(tmp_path))


async def test_environment_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDLEGRID_TEST_SECRET", "hunter2")
    monkeypatch.setenv("TZ", "UTC")
    policy = make_policy(tmp_path, extra_env={"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"})
    async with await Sandbox.create(ECHO, {}, policy) as sb:
        env = (await sb.call("env", {})).data["env"]
    assert "IDLEGRID_TEST_SECRET" not in env
    assert "hunter2" not in env.values()
    workdir = str(sb.workdir)
    assert env["HOME"] == workdir
    assert env["TMPDIR"] == str(sb.workdir / "tmp")
    assert env["TZ"] == "UTC"  # allowed, so passed through
    assert env["HF_HUB_OFFLINE"] == "1"
    allowed = set(policy.env_allow) | set(policy.extra_env)
    ours = {"HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PYTHONPATH"}
    # Python itself may add LC_CTYPE when it coerces the C locale; bubblewrap sets PWD
    # (the workdir) when it enters it.
    assert set(env) - allowed - ours <= {"LC_CTYPE", "PWD"}
    assert env.get("PWD", workdir) == workdir
    # the child imports the code its parent imported (here: this checkout), then the policy's
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), str(REPO_ROOT)]


async def test_cwd_is_a_private_workdir_removed_on_close(tmp_path: Path) -> None:
    # unconfined, so the workdir is the host directory (confined, it is a tmpfs at the same
    # path that the host never sees: tests/sandbox/test_escape.py)
    async with await Sandbox.create(ECHO, {}, make_policy(tmp_path, confine=False)) as sb:
        cwd = Path((await sb.call("env", {})).data["cwd"])
        assert cwd == resolved(sb.workdir)
        assert cwd.parent == resolved(tmp_path)
        assert mode(cwd) == 0o700
        await sb.call("write_file", {"size": 10})
        assert exists(cwd / "big.bin")
    assert not exists(cwd)


async def test_resource_limits_are_applied(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, open_files=200, file_size_bytes=100_000)
    async with await Sandbox.create(ECHO, {}, policy) as sb:
        limits = (await sb.call("limits", {})).data["limits"]
        assert limits["RLIMIT_NOFILE"] == [200, 200]
        assert limits["RLIMIT_CORE"] == [0, 0]
        assert limits["RLIMIT_FSIZE"] == [100_000, 100_000]
        with pytest.raises(EngineFailed, match="File too large"):
            await sb.call("write_file", {"size": 200_000})
        assert (await sb.call("write_file", {"size": 50_000})).data == {"written": 50_000}


async def test_engine_output_goes_to_stderr_not_the_protocol(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Created here, not in a fixture: pytest points fd 2 at capfd's file only during the
    # test call, and the child inherits whatever fd 2 is when it starts.
    async with await Sandbox.create(ECHO, {}, make_policy(tmp_path)) as sb:
        seen: list[dict[str, Any]] = []
        result = await sb.call("noise", {"marker": "NOISE-42"}, on_progress=seen.append)
        assert result.data == {"ok": True}
        assert result.blobs == [b"intact"]
        assert seen == [{"between": "noise"}]
        assert (await sb.call("echo", {})).data["payload"] == {}
    err = capfd.readouterr().err
    assert "EchoEngine: loading (stdout noise)" in err
    assert "NOISE-42 via print()" in err
    assert "NOISE-42 via fd 1" in err


async def test_frame_size_cap(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, max_frame_bytes=100_000)
    async with await Sandbox.create(ECHO, {}, policy) as sb:
        pid = sb.pid
        with pytest.raises(FrameTooLarge, match="max_frame_bytes"):
            await sb.call("echo", {"text": "x" * 200_000})
        with pytest.raises(EngineFailed) as info:
            await sb.call("big_result", {"size": 200_000})
        assert info.value.error_type == "FrameTooLarge"
        assert (await sb.call("big_result", {"size": 1000})).blobs == [b"x" * 1000]
        assert sb.pid == pid  # neither oversized frame cost the engine its life


async def test_aclose_leaves_no_process_behind(tmp_path: Path) -> None:
    # unconfined, where only the process group stands between the engine's children and the
    # host (confined, the pid namespace ends with the engine: tests/sandbox/test_escape.py)
    sb = await Sandbox.create(ECHO, {}, make_policy(tmp_path, confine=False))
    pids = (await sb.call("spawn", {})).data
    assert pids["own_pid"] == sb.pid
    pidfds = [os.pidfd_open(pids["own_pid"]), os.pidfd_open(pids["pid"])]
    try:
        await sb.aclose()
        for pidfd in pidfds:  # the grandchild too: it went with the process group
            await wait_for_exit(pidfd)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    assert sb.pid is None
    await sb.aclose()  # idempotent
    with pytest.raises(SandboxClosed):
        await sb.call("echo", {})


async def test_aclose_during_a_call_ends_it(tmp_path: Path) -> None:
    sb = await Sandbox.create(ECHO, {}, make_policy(tmp_path))
    started = asyncio.Event()
    call = asyncio.create_task(sb.call("wait_forever", {}, on_progress=lambda d: started.set()))
    async with asyncio.timeout(GUARD):
        await started.wait()
        await sb.aclose()
        with pytest.raises(SandboxClosed, match="closed during the call"):
            await call
    assert not exists(sb.workdir)


async def test_ensure_running_restarts_a_crashed_engine_eagerly(sb: Sandbox) -> None:
    first_pid = sb.pid
    assert first_pid is not None
    await sb.ensure_running()
    assert (sb.pid, sb.restarts) == (first_pid, 0)  # a live engine is left alone
    os.kill(first_pid, signal.SIGKILL)
    with pytest.raises(EngineCrashed):
        await sb.call("echo", {})
    await sb.ensure_running()
    assert sb.pid not in (None, first_pid)
    assert sb.restarts == 1
