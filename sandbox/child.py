"""The sandboxed child: `python -m sandbox.child`, started only by `Sandbox`.

Order matters in `main`: the protocol pipes are moved off fds 0 and 1 before any engine
code can print, and the resource limits are in force before the engine is imported.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import resource
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, BinaryIO

from sandbox.channel import (
    MAX_INIT_BYTES,
    PARENT_FRAMES,
    PROTOCOL_VERSION,
    ErrorFrame,
    InitFrame,
    Limits,
    ProgressFrame,
    ReadyFrame,
    RequestFrame,
    ResultFrame,
    ShutdownFrame,
    encode_frame,
    read_frame_sync,
)
from sandbox.engine import Engine
from sandbox.errors import ChannelClosed, ChannelError

__all__ = ["main"]

# An exception message longer than this is cut, so a huge repr cannot overflow the frame.
_MAX_ERROR_CHARS = 8000
# engine log lines, on the worker's stderr beside the worker's own (same layout)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class _Writer:
    """Sends frames to the parent; a lock keeps frames whole when engines emit from threads."""

    def __init__(self, stream: BinaryIO, max_bytes: int) -> None:
        self.lock = threading.Lock()
        self.max_bytes = max_bytes
        self._stream = stream

    def send(self, frame: ErrorFrame | ReadyFrame) -> None:
        self.send_bytes(encode_frame(frame, max_bytes=self.max_bytes))

    def send_bytes(self, data: bytes) -> None:
        with self.lock:
            self.write_locked(data)

    def write_locked(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()


class _Emitter:
    """The `emit` handed to `engine.handle` for one request; dead once handle returns."""

    def __init__(self, writer: _Writer, request_id: int) -> None:
        self._writer = writer
        self._request_id = request_id
        self._open = True

    def __call__(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise TypeError(f"emit() takes a dict, got {type(data).__name__}")
        frame = encode_frame(
            ProgressFrame(id=self._request_id, data=data), max_bytes=self._writer.max_bytes
        )
        with self._writer.lock:
            if not self._open:
                raise RuntimeError(
                    "emit() was called after handle() returned; send progress only while "
                    "the request runs"
                )
            self._writer.write_locked(frame)

    def close(self) -> None:
        with self._writer.lock:
            self._open = False


def main() -> int:
    proto_in, proto_out = _take_protocol_fds()
    _die_with_parent()
    reader = os.fdopen(proto_in, "rb")
    writer = _Writer(os.fdopen(proto_out, "wb"), MAX_INIT_BYTES)
    try:
        return _run(reader, writer)
    except ChannelClosed:
        return 0  # the parent went away; nobody is left to answer
    except BrokenPipeError:
        return 0
    except ChannelError as exc:
        print(f"sandbox child: protocol error from the parent: {exc}", file=sys.stderr)
        return 2


def _run(reader: BinaryIO, writer: _Writer) -> int:
    init, _ = read_frame_sync(reader, PARENT_FRAMES, MAX_INIT_BYTES)
    if not isinstance(init, InitFrame):
        raise ChannelError(f"expected an init frame first, got {init.type!r}")
    writer.max_bytes = init.max_frame_bytes
    try:
        if init.version != PROTOCOL_VERSION:
            raise RuntimeError(
                f"parent speaks protocol {init.version}, child {PROTOCOL_VERSION}; "
                "the parent and child must come from the same idlegrid install"
            )
        _apply_limits(init.limits)
        if init.log_level is not None:
            logging.basicConfig(level=init.log_level, format=LOG_FORMAT)
        engine = _load_engine_class(init.engine)(init.options)
    except Exception as exc:
        traceback.print_exc()
        writer.send(_error_frame(None, exc))
        return 1
    writer.send(ReadyFrame(pid=os.getpid()))
    while True:
        try:
            frame, blobs = read_frame_sync(reader, PARENT_FRAMES, init.max_frame_bytes)
        except ChannelClosed:
            return 0
        if isinstance(frame, ShutdownFrame):
            return 0
        if not isinstance(frame, RequestFrame):
            raise ChannelError(f"expected a request frame, got {frame.type!r}")
        _handle(engine, frame, blobs, writer)


def _take_protocol_fds() -> tuple[int, int]:
    """Keep private copies of the pipes; engine output on fd 1 goes to stderr instead."""
    # os.dup makes non-inheritable fds, so processes the engine spawns never get the pipes.
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return proto_in, proto_out


def _die_with_parent() -> None:
    """Have the kernel kill us if the parent dies, so no orphan keeps holding a GPU.

    If the parent died before this call, reading the init frame hits EOF and we exit.
    The kernel ties this to the parent *thread* that forked us: the event loop's thread,
    which lives as long as the Sandbox can be used.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _apply_limits(limits: Limits) -> None:
    _set_limit(resource.RLIMIT_CORE, "RLIMIT_CORE", 0)  # a core dump could hold secrets
    _set_limit(resource.RLIMIT_NOFILE, "RLIMIT_NOFILE", limits.open_files)
    if limits.memory_bytes is not None:
        _set_limit(resource.RLIMIT_AS, "RLIMIT_AS", limits.memory_bytes)
    if limits.cpu_seconds is not None:
        _set_limit(resource.RLIMIT_CPU, "RLIMIT_CPU", limits.cpu_seconds)
    if limits.file_size_bytes is not None:
        _set_limit(resource.RLIMIT_FSIZE, "RLIMIT_FSIZE", limits.file_size_bytes)
    if limits.processes is not None:
        _set_limit(resource.RLIMIT_NPROC, "RLIMIT_NPROC", limits.processes)


def _set_limit(which: int, name: str, value: int) -> None:
    # Soft and hard alike, so the engine cannot raise its own limit again.
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and value > hard:
        raise ValueError(
            f"cannot set {name} to {value}: this process's hard limit is {hard}; "
            "lower the value in SandboxPolicy or raise the hard limit (ulimit -H)"
        )
    resource.setrlimit(which, (value, value))


def _load_engine_class(name: str) -> type[Engine]:
    module_name, sep, qualname = name.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"engine {name!r} is not of the form 'package.module:ClassName'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"engine {name!r} is a {type(obj).__name__}, not a class")
    return obj


def _handle(engine: Engine, request: RequestFrame, blobs: list[bytes], writer: _Writer) -> None:
    emit = _Emitter(writer, request.id)
    try:
        try:
            if blobs:  # only engines that take binary input accept the keyword
                handle: Any = engine.handle
                result = handle(request.kind, request.payload, emit, blobs=blobs)
            else:
                result = engine.handle(request.kind, request.payload, emit)
        finally:
            emit.close()
        data, answer = _check_result(result)
        frame = encode_frame(
            ResultFrame(id=request.id, data=data), answer, max_bytes=writer.max_bytes
        )
    except Exception as exc:
        traceback.print_exc()
        writer.send(_error_frame(request.id, exc))
        return
    writer.send_bytes(frame)


def _check_result(result: object) -> tuple[dict[str, Any], Sequence[bytes]]:
    shape = "handle() must return (dict, list[bytes])"
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"{shape}, got {type(result).__name__}")
    data, blobs = result
    if not isinstance(data, dict):
        raise TypeError(f"{shape}, got {type(data).__name__} as the dict")
    if not isinstance(blobs, list | tuple):
        raise TypeError(f"{shape}, got {type(blobs).__name__} as the list")
    for i, blob in enumerate(blobs):
        if not isinstance(blob, bytes | bytearray):
            raise TypeError(f"{shape}, got {type(blob).__name__} as blob {i}")
    return data, [bytes(blob) for blob in blobs]


def _error_frame(request_id: int | None, exc: BaseException) -> ErrorFrame:
    message = str(exc)
    if len(message) > _MAX_ERROR_CHARS:
        message = message[:_MAX_ERROR_CHARS] + " ...(truncated)"
    return ErrorFrame(id=request_id, error_type=type(exc).__name__, message=message)


if __name__ == "__main__":
    sys.exit(main())
