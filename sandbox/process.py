"""One child process: spawn it, wait for its engine, exchange frames, stop or kill it.

A `ChildProcess` is used for one engine lifetime; `Sandbox` replaces it after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sandbox.channel import (
    CHILD_FRAMES,
    MAX_INIT_BYTES,
    ChildFrame,
    ErrorFrame,
    InitFrame,
    Limits,
    ProgressFrame,
    ReadyFrame,
    RequestFrame,
    ResultFrame,
    ShutdownFrame,
    encode_frame,
    read_frame_async,
)
from sandbox.confine import (
    PidsCgroup,
    bwrap_argv,
    check_confinement,
    package_dirs,
    seccomp_pipe,
)
from sandbox.engine import EngineResult, ProgressCallback
from sandbox.errors import (
    ChannelClosed,
    ChannelError,
    ConfinementUnavailable,
    EngineCrashed,
    EngineFailed,
    EngineStartFailed,
)
from sandbox.policy import SandboxPolicy

__all__ = ["ChildProcess"]

logger = logging.getLogger(__name__)

# Seconds to wait for a process to be reaped once it closed its pipe or got SIGKILL;
# only a process stuck in the kernel (e.g. a hung GPU driver call) takes longer.
_REAP_TIMEOUT = 10.0

T = TypeVar("T")


def _confinement(engine: str, policy: SandboxPolicy, workdir: Path) -> tuple[tuple[str, ...], int]:
    """bubblewrap's part of the command line, and the read end of a pipe holding the
    seccomp program (to pass to the child and close after spawning it)."""
    readiness = check_confinement()  # cached: ChildProcess.start ran it off the loop
    if not readiness.ready or readiness.bwrap is None:
        raise ConfinementUnavailable(f"cannot confine engine {engine!r}: {readiness.explain()}")
    own_package = engine.split(":", 1)[0].split(".", 1)[0]
    packages = package_dirs(dict.fromkeys((*policy.packages, own_package)))
    argv = bwrap_argv(
        readiness.bwrap,
        workdir,
        read_only=policy.read_only,
        packages=packages,
        network=policy.network,
        disk_bytes=policy.disk_bytes,
    )
    read_end = seccomp_pipe()
    return (*argv, "--seccomp", str(read_end)), read_end


def _import_roots(engine: str, policy: SandboxPolicy) -> str:
    """PYTHONPATH for the child: the directories this process imports the child's packages
    from, so the child runs the same code as its parent (a source checkout on the parent's
    PYTHONPATH, or the installed tree) and never whatever else the environment would find.
    The parent's own PYTHONPATH is scrubbed (SandboxPolicy.env_allow); these are the bound
    package directories' parents."""
    own_package = engine.split(":", 1)[0].split(".", 1)[0]
    dirs = package_dirs(dict.fromkeys(("sandbox", *policy.packages, own_package)))
    return os.pathsep.join(dict.fromkeys(str(d.parent) for d in dirs if d.is_dir()))


_warned_uncapped = False


def _root_process_cap(limit: int) -> PidsCgroup | None:
    """For a worker running as root, whom RLIMIT_NPROC does not bind: a pids cgroup."""
    global _warned_uncapped
    cgroup = PidsCgroup.create(limit)
    if cgroup is None and not _warned_uncapped:
        _warned_uncapped = True
        logger.warning(
            "the worker runs as root and no pids cgroup can be made, so the sandbox's "
            "process limit (%d) is not enforced; run the worker as an ordinary user",
            limit,
        )
    return cgroup


class ChildProcess:
    """A running `python -m sandbox.child` and its pipes. Create with `start()`."""

    def __init__(self, proc: asyncio.subprocess.Process, engine: str, max_frame_bytes: int):
        if proc.stdin is None or proc.stdout is None:
            raise ValueError("the child process must be started with stdin and stdout pipes")
        self._proc = proc
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self._engine = engine
        self._max_frame_bytes = max_frame_bytes
        self._dead = False  # killed, exited, or out of step with us: never to be used again
        self._reaped = False
        self._engine_pid: int | None = None
        self._cgroup: PidsCgroup | None = None
        self._confined = False

    @classmethod
    async def start(
        cls,
        engine: str,
        options: dict[str, Any],
        policy: SandboxPolicy,
        workdir: Path,
        env: dict[str, str],
    ) -> ChildProcess:
        """Spawn the child and wait until it constructed the engine.

        Raises EngineStartFailed (with the child's error) if that fails or takes longer
        than `policy.start_timeout`, and TypeError/ValueError if `options` is not JSON.
        """
        limits = Limits(
            memory_bytes=policy.memory_bytes,
            cpu_seconds=policy.cpu_seconds,
            open_files=policy.open_files,
            file_size_bytes=policy.file_size_bytes,
            processes=policy.processes,
        )
        init = InitFrame(
            engine=engine,
            options=options,
            limits=limits,
            max_frame_bytes=policy.max_frame_bytes,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        # Options travel in the init frame rather than argv, where `ps` would show them.
        init_bytes = encode_frame(init, max_bytes=MAX_INIT_BYTES)
        confined: tuple[str, ...] = ()
        seccomp_fd = -1
        cgroup = None
        if policy.confine:
            await asyncio.to_thread(check_confinement)  # the first time: a probe run
            confined, seccomp_fd = _confinement(engine, policy, workdir)
            if policy.processes is not None and os.geteuid() == 0:
                cgroup = _root_process_cap(policy.processes)
        argv = (*policy.wrapper, *confined, sys.executable, "-m", "sandbox.child")
        # (a PYTHONPATH the policy set itself, in extra_env, comes after ours)
        roots = [_import_roots(engine, policy), env.get("PYTHONPATH", "")]
        env = {**env, "PYTHONPATH": os.pathsep.join(r for r in roots if r)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,  # inherited: engine logs show up in the worker's stderr
                env=env,
                cwd=workdir,
                # Its own process group, so kill() also reaches whatever the engine spawned.
                start_new_session=True,
                pass_fds=(seccomp_fd,) if seccomp_fd >= 0 else (),
                preexec_fn=None if cgroup is None else cgroup.enter,
            )
        except OSError as exc:
            if cgroup is not None:
                cgroup.remove()
            raise EngineStartFailed(
                f"cannot run {argv[0]!r} to start engine {engine!r}: {exc}; "
                "check SandboxPolicy.wrapper and the Python installation"
            ) from exc
        finally:
            if seccomp_fd >= 0:
                os.close(seccomp_fd)
        child = cls(proc, engine, policy.max_frame_bytes)
        child._cgroup = cgroup
        child._confined = policy.confine
        try:
            async with asyncio.timeout(policy.start_timeout):
                ready = await child._handshake(init_bytes)
        except TimeoutError:
            await child.kill()
            raise EngineStartFailed(
                f"engine {engine!r} was not ready within {policy.start_timeout} s; it was "
                "killed. Raise SandboxPolicy.start_timeout if the model loads slowly"
            ) from None
        except BaseException:
            await child.kill()
            raise
        child._engine_pid = child._find_engine_pid()
        logger.info("engine %r is ready (pid %d, engine pid %d)", engine, child.pid, ready.pid)
        return child

    @property
    def pid(self) -> int:
        """The pid (as the worker sees it) of the process running the engine; under
        confinement bubblewrap's grandchild, which sees itself as pid 2."""
        return self._engine_pid or self._proc.pid

    def _find_engine_pid(self) -> int | None:
        """The pid of `python -m sandbox.child` among what we spawned, or None."""
        pending = [self._proc.pid]
        while pending:
            pid = pending.pop(0)
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                # (bubblewrap's own command line ends with the same words)
                if command[1:3] == [b"-m", b"sandbox.child"]:
                    return pid
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            pending.extend(int(child) for child in children)
        return None

    @property
    def dead(self) -> bool:
        """True once the child must not be used again (it died or was killed)."""
        return self._dead

    async def request(
        self,
        request_id: int,
        kind: str,
        payload: dict[str, Any],
        on_progress: ProgressCallback | None,
        blobs: Sequence[bytes],
        parse: Callable[[EngineResult], T],
    ) -> T:
        """Run one job in the engine; its result as `parse` makes it.

        Raises TypeError/ValueError (payload not JSON) or FrameTooLarge before anything
        is sent; EngineFailed if the engine raised (the child stays usable); EngineCrashed
        if the child died or misbehaved. On any other way out (timeout, cancellation, an
        exception from `on_progress` or `parse`) the child is killed: it is still busy with
        a request nobody will read, or it answered what nobody can use.
        """
        frame = encode_frame(
            RequestFrame(id=request_id, kind=kind, payload=payload),
            blobs,
            max_bytes=self._max_frame_bytes,
        )
        try:
            return parse(await self._exchange(request_id, kind, frame, on_progress))
        except EngineFailed:
            raise
        except BaseException:
            await self.kill()
            raise

    async def _handshake(self, init_bytes: bytes) -> ReadyFrame:
        # A child that dies at once breaks the pipe; reading below reports why.
        with contextlib.suppress(ConnectionError):
            self._stdin.write(init_bytes)
            await self._stdin.drain()
        try:
            frame, _ = await read_frame_async(self._stdout, CHILD_FRAMES, MAX_INIT_BYTES)
        except ChannelClosed:
            self._dead = True
            status = await self._exit_status()
            raise EngineStartFailed(
                f"engine {self._engine!r}: the child process {status} before it was ready; "
                "its stderr (above) says why"
            ) from None
        except ChannelError as exc:
            raise EngineStartFailed(
                f"engine {self._engine!r}: the child sent a bad frame while starting: {exc}"
            ) from None
        if isinstance(frame, ReadyFrame):
            return frame
        if isinstance(frame, ErrorFrame):
            raise EngineStartFailed(
                f"engine {self._engine!r} failed to start: {frame.error_type}: {frame.message}"
            )
        raise EngineStartFailed(
            f"engine {self._engine!r}: the child sent {frame.type!r} instead of 'ready'"
        )

    async def _exchange(
        self,
        request_id: int,
        kind: str,
        frame: bytes,
        on_progress: ProgressCallback | None,
    ) -> EngineResult:
        await self._send(frame, kind)
        while True:
            message, blobs = await self._receive(kind)
            if isinstance(message, ProgressFrame) and message.id == request_id and not blobs:
                if on_progress is not None:
                    maybe_awaitable = on_progress(message.data)
                    if inspect.isawaitable(maybe_awaitable):
                        await maybe_awaitable
            elif isinstance(message, ResultFrame) and message.id == request_id:
                return EngineResult(data=message.data, blobs=blobs)
            elif isinstance(message, ErrorFrame) and message.id == request_id and not blobs:
                raise EngineFailed(message.error_type, message.message)
            else:
                raise EngineCrashed(
                    f"engine {self._engine!r} (pid {self.pid}) sent an unexpected "
                    f"{message.type!r} frame during a {kind!r} call; it was killed and a "
                    "fresh engine starts before the next call"
                )

    async def _send(self, frame: bytes, kind: str) -> None:
        try:
            self._stdin.write(frame)
            await self._stdin.drain()
        except ConnectionError:
            self._dead = True
            status = await self._exit_status()
            raise EngineCrashed(self._crash_message(kind, status)) from None

    async def _receive(self, kind: str) -> tuple[ChildFrame, list[bytes]]:
        try:
            return await read_frame_async(self._stdout, CHILD_FRAMES, self._max_frame_bytes)
        except ChannelClosed:
            self._dead = True
            status = await self._exit_status()
            raise EngineCrashed(self._crash_message(kind, status)) from None
        except ChannelError as exc:
            raise EngineCrashed(
                f"engine {self._engine!r} (pid {self.pid}) broke the protocol during a "
                f"{kind!r} call ({exc}); it was killed and a fresh engine starts before "
                "the next call"
            ) from None

    def _crash_message(self, kind: str, status: str) -> str:
        return (
            f"engine {self._engine!r} (pid {self.pid}) {status} during a {kind!r} call; "
            "its stderr (above) may say why. A fresh engine starts before the next call"
        )

    async def _exit_status(self) -> str:
        """How the child ended, for messages; kills it if it lingers after closing its pipe."""
        try:
            async with asyncio.timeout(_REAP_TIMEOUT):
                returncode = await self._proc.wait()
        except TimeoutError:
            await self.kill()
            return "closed its pipe without exiting (killed it)"
        # bubblewrap exits with 128 + N when the engine was killed by signal N
        if self._confined and 128 < returncode < 128 + signal.NSIG:
            returncode = 128 - returncode
        if returncode < 0:
            try:
                return f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                return f"was killed by signal {-returncode}"
        return f"exited with code {returncode}"

    def signal_kill(self) -> None:
        """Send SIGKILL to the child's process group without waiting (see `kill`)."""
        self._dead = True
        # The group id is the child's pid (start_new_session). Killing after the child
        # exited still reaches grandchildren left in the group; once the group is empty
        # the kernel reports ProcessLookupError.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    async def kill(self) -> None:
        """SIGKILL the process group, then reap the child and close its pipes; idempotent."""
        if self._reaped:
            return
        self.signal_kill()
        self._stdin.close()
        try:
            async with asyncio.timeout(_REAP_TIMEOUT):
                await self._proc.wait()
                # Read to EOF: asyncio closes the transport only after it saw EOF.
                await self._stdout.read()
        except TimeoutError:
            logger.error(
                "engine %r (pid %d) did not die within %s s of SIGKILL",
                self._engine,
                self.pid,
                _REAP_TIMEOUT,
            )
            return
        self._reaped = True
        if self._cgroup is not None:
            await asyncio.to_thread(self._cgroup.remove)

    async def shutdown(self, grace: float) -> None:
        """Ask the engine to exit, give it `grace` seconds, then kill what is left."""
        if not self._dead:
            self._dead = True
            with contextlib.suppress(ConnectionError):
                self._stdin.write(encode_frame(ShutdownFrame(), max_bytes=MAX_INIT_BYTES))
                await self._stdin.drain()
            self._stdin.close()
            try:
                async with asyncio.timeout(grace):
                    await self._proc.wait()
            except TimeoutError:
                logger.warning(
                    "engine %r (pid %d) did not exit within %s s of a shutdown request; killing it",
                    self._engine,
                    self.pid,
                    grace,
                )
        await self.kill()
