"""`Sandbox`: a long-lived engine in a restricted child process, restarted after crashes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pydantic import BaseModel

from protocol.engine import EngineCall
from sandbox.calls import CallResult, parse_message
from sandbox.engine import EngineResult, ProgressCallback
from sandbox.errors import EngineCrashed, EngineMisbehaved, EngineTimedOut, SandboxClosed
from sandbox.policy import DEFAULT_POLICY, SandboxPolicy
from sandbox.process import ChildProcess

__all__ = ["Sandbox"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
RequestT = TypeVar("RequestT", bound=BaseModel)
ProgressT = TypeVar("ProgressT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel)

_ENGINE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class Sandbox:
    """Hosts one engine in a child process and forwards calls to it, one at a time.

    Create with `await Sandbox.create(...)` (or `async with await Sandbox.create(...)`)
    and finish with `aclose()`. After a crash or a timeout the child is gone; the next
    `call` first starts a fresh one (counted in `restarts`), so a caller can simply retry.
    """

    def __init__(
        self, engine: str, options: dict[str, Any], policy: SandboxPolicy, workdir: Path
    ) -> None:
        # Private: use create(), which also starts the first child.
        self._engine = engine
        self._options = options
        self._policy = policy
        self._workdir = workdir
        self._lock = asyncio.Lock()  # one request at a time; also guards _child
        self._child: ChildProcess | None = None
        self._restarts = 0
        self._last_request_id = 0
        self._closed = False
        self._close_done = asyncio.Event()

    @classmethod
    async def create(
        cls, engine: str, options: dict[str, Any], policy: SandboxPolicy = DEFAULT_POLICY
    ) -> Sandbox:
        """Start the child and wait until `engine` ("package.module:ClassName") is built.

        Raises EngineStartFailed with the child's error if construction fails or takes
        longer than `policy.start_timeout`; ValueError for a malformed engine name and
        TypeError/ValueError if `options` is not JSON.
        """
        if not _ENGINE_NAME.fullmatch(engine):
            raise ValueError(f"engine {engine!r} must look like 'package.module:ClassName'")
        workdir = Path(tempfile.mkdtemp(prefix="idlegrid-sandbox-", dir=policy.workdir_root))
        self = cls(engine, dict(options), policy, workdir)
        try:
            (workdir / "tmp").mkdir()
            self._child = await self._start_child()
        except BaseException:
            await _remove_tree(workdir)
            raise
        return self

    @property
    def pid(self) -> int | None:
        """The current child's pid, or None between a crash and the restart, or when closed."""
        if self._child is None or self._child.dead:
            return None
        return self._child.pid

    @property
    def restarts(self) -> int:
        """How many times a fresh child replaced one that crashed or timed out."""
        return self._restarts

    @property
    def workdir(self) -> Path:
        """The child's private cwd and HOME; removed by aclose()."""
        return self._workdir

    async def call(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        blobs: Sequence[bytes] = (),
        on_progress: ProgressCallback | None = None,
        # Kept despite ASYNC109 (which prefers an outer asyncio.timeout): this one also
        # tells the timeout apart from a cancellation and reports EngineTimedOut.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> EngineResult:
        """Run `engine.handle(kind, payload, emit)` in the child and return its result;
        with `blobs` (binary input, e.g. tensors), `engine.handle(..., blobs=blobs)`.

        `on_progress` receives each emitted dict in order (sync or async). `timeout`
        (default `policy.job_timeout`) covers the request only: not waiting for an earlier
        call, nor restarting a crashed child (that has `policy.start_timeout`).

        Raises EngineFailed if handle raised (the engine stays up); EngineCrashed if the
        child died; EngineTimedOut if the timeout passed (the child is killed);
        EngineStartFailed if a needed restart failed; SandboxClosed after aclose();
        FrameTooLarge, TypeError or ValueError for a payload that cannot be sent.
        An exception from `on_progress` propagates as is, and costs a restart.
        (`run` is the typed form: pydantic messages, validated at the boundary.)
        """
        return await self._request(kind, payload, blobs, on_progress, timeout, _as_is)

    async def run(
        self,
        call: EngineCall[RequestT, ProgressT, ResultT],
        request: RequestT,
        *,
        blobs: Sequence[bytes] = (),
        on_progress: Callable[[ProgressT], Awaitable[None] | None] | None = None,
        check: Callable[[CallResult[ResultT]], None] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (as in `call`)
    ) -> CallResult[ResultT]:
        """`call` with typed messages: send `request` (and `blobs`), validate each progress
        message and the result against `call`'s models (the engine side:
        `sandbox.calls.CallTable`), then run `check` on the result (e.g. that the blobs
        fit it), which raises EngineMisbehaved if they do not.

        Raises what `call` raises, and EngineMisbehaved (an EngineCrashed: the child is
        killed and restarts before the next call) naming the fields of a progress message
        or result that does not fit its model, or from `check`.
        """
        engine = self._engine

        def progress(data: dict[str, Any]) -> Awaitable[None] | None:
            if call.progress is None:
                raise EngineMisbehaved(
                    f"engine {engine!r} emitted progress during a {call.kind!r} call, "
                    "which has none"
                )
            message = parse_message(engine, call.kind, "progress message", call.progress, data)
            return None if on_progress is None else on_progress(message)

        def parse(result: EngineResult) -> CallResult[ResultT]:
            data = parse_message(engine, call.kind, "result", call.result, result.data)
            answer = CallResult(data, result.blobs)
            if check is not None:
                check(answer)
            return answer

        payload = request.model_dump(mode="json", by_alias=True)
        return await self._request(call.kind, payload, blobs, progress, timeout, parse)

    async def _request(
        self,
        kind: str,
        payload: dict[str, Any],
        blobs: Sequence[bytes],
        on_progress: ProgressCallback | None,
        timeout: float | None,  # noqa: ASYNC109 (as in `call`)
        parse: Callable[[EngineResult], T],
    ) -> T:
        limit = self._policy.job_timeout if timeout is None else timeout
        if limit <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {limit}")
        async with self._lock:
            child = await self._current_child()
            self._last_request_id += 1
            try:
                async with asyncio.timeout(limit) as deadline:
                    return await child.request(
                        self._last_request_id, kind, payload, on_progress, blobs, parse
                    )
            except TimeoutError:
                if not deadline.expired():
                    raise  # raised by on_progress, not by our deadline
                logger.warning("engine %r timed out after %s s; killed it", self._engine, limit)
                raise EngineTimedOut(
                    f"engine {self._engine!r} did not finish a {kind!r} call within {limit} s; "
                    "it was killed and a fresh engine starts before the next call. Pass a "
                    "larger timeout (or raise SandboxPolicy.job_timeout) for slow jobs"
                ) from None
            except EngineCrashed as exc:
                if self._closed:
                    raise SandboxClosed("the sandbox was closed during the call") from exc
                logger.warning("%s", exc)
                raise
            finally:
                if child.dead:
                    self._child = None

    async def ensure_running(self) -> None:
        """Restart a crashed or killed engine now rather than at the next call.

        Raises EngineStartFailed if the restart fails, SandboxClosed after aclose().
        """
        async with self._lock:
            await self._current_child()

    async def _current_child(self) -> ChildProcess:
        self._raise_if_closed("the sandbox is closed; create a new one")
        if self._child is None:
            child = await self._start_child()
            try:
                self._raise_if_closed("the sandbox was closed while the engine restarted")
            except SandboxClosed:
                await child.kill()
                raise
            self._child = child
            self._restarts += 1
            logger.info("restarted engine %r (restart %d)", self._engine, self._restarts)
        return self._child

    def _raise_if_closed(self, message: str) -> None:
        if self._closed:
            raise SandboxClosed(message)

    async def _start_child(self) -> ChildProcess:
        # The environment is read here, at start time, only to copy the allowed variables.
        env = self._policy.child_env(os.environ, self._workdir)
        return await ChildProcess.start(
            self._engine, self._options, self._policy, self._workdir, env
        )

    async def aclose(self) -> None:
        """Ask the child to exit, kill its process group after a grace period, remove the
        workdir. A call in flight is cut short with SandboxClosed. Idempotent."""
        if self._closed:
            await self._close_done.wait()
            return
        self._closed = True
        try:
            child = self._child
            if child is not None and self._lock.locked():
                # A call is running: end it now rather than wait up to job_timeout.
                child.signal_kill()
            async with self._lock:
                if self._child is not None:
                    await self._child.shutdown(self._policy.shutdown_timeout)
                    self._child = None
        finally:
            await _remove_tree(self._workdir)
            self._close_done.set()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _as_is(result: EngineResult) -> EngineResult:
    return result


async def _remove_tree(path: Path) -> None:
    # In a thread: an engine may leave gigabytes of files behind.
    await asyncio.to_thread(_remove_tree_sync, path)


def _remove_tree_sync(path: Path) -> None:
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    # The engine may have made directories read-only; make them ours again and retry.
    for root, dirs, _ in os.walk(path):
        for directory in (Path(root), *(Path(root, name) for name in dirs)):
            with contextlib.suppress(OSError):
                directory.chmod(directory.stat().st_mode | stat.S_IRWXU)
    try:
        shutil.rmtree(path)
    except OSError as exc:
        logger.warning("could not remove sandbox workdir %s: %s", path, exc)
