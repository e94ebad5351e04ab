"""Engines for the sandbox tests. They run inside the child process (TypedImageEngine also in
pytest, to test CallTable in-process)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from protocol.engine import IMAGE, ImageProgress, ImageResult
from protocol.params import ImageParams
from sandbox.calls import CallTable
from sandbox.calls import Emit as CallEmit

Emit = Callable[[dict[str, Any]], None]
Result = tuple[dict[str, Any], list[bytes]]


class EchoEngine:
    """Dispatches `kind` to a `do_<kind>` method; each exercises one sandbox feature."""

    def __init__(self, options: dict[str, Any]) -> None:
        # Libraries print while loading models; this must not reach the protocol pipe.
        print("EchoEngine: loading (stdout noise)")
        self.options = options
        self.spawned: list[subprocess.Popen[bytes]] = []

    def handle(self, kind: str, payload: dict[str, Any], emit: Emit) -> Result:
        method: Callable[[dict[str, Any], Emit], Result] = getattr(self, f"do_{kind}")
        return method(payload, emit)

    def do_echo(self, payload: dict[str, Any], emit: Emit) -> Result:
        blobs = [bytes(range(256)) * payload.get("repeat", 1), b"", b"\x00\xff" * 3]
        return {"payload": payload, "options": self.options}, blobs

    def do_progress(self, payload: dict[str, Any], emit: Emit) -> Result:
        for step in range(payload["steps"]):
            emit({"step": step})
        return {"steps": payload["steps"]}, []

    def do_fail(self, payload: dict[str, Any], emit: Emit) -> Result:
        raise ValueError(payload["message"])

    def do_wait_forever(self, payload: dict[str, Any], emit: Emit) -> Result:
        emit({"started": True})
        threading.Event().wait()  # until the parent kills us
        raise AssertionError("unreachable")

    def do_env(self, payload: dict[str, Any], emit: Emit) -> Result:
        return {"env": dict(os.environ), "cwd": os.getcwd()}, []

    def do_limits(self, payload: dict[str, Any], emit: Emit) -> Result:
        limits = {
            name: list(resource.getrlimit(getattr(resource, name)))
            for name in ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_AS")
        }
        return {"limits": limits}, []

    def do_write_file(self, payload: dict[str, Any], emit: Emit) -> Result:
        with open("big.bin", "wb") as f:
            f.write(b"\0" * payload["size"])
        return {"written": payload["size"]}, []

    def do_noise(self, payload: dict[str, Any], emit: Emit) -> Result:
        marker = payload["marker"]
        print(marker, "via print()")
        sys.stdout.buffer.write(b"\x00\x00\x00\x05\x00\x00\x00\x00 frame-like bytes\n")
        sys.stdout.flush()
        os.write(1, f"{marker} via fd 1\n".encode())
        emit({"between": "noise"})
        print(marker, "after emit")
        return {"ok": True}, [b"intact"]

    def do_bad_result(self, payload: dict[str, Any], emit: Emit) -> Result:
        return {"not json": {1, 2, 3}}, []

    def do_big_result(self, payload: dict[str, Any], emit: Emit) -> Result:
        return {}, [b"x" * payload["size"]]

    def do_spawn(self, payload: dict[str, Any], emit: Emit) -> Result:
        # A grandchild, as a misbehaving engine library might leave behind.
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.spawned.append(proc)
        return {"pid": proc.pid, "own_pid": os.getpid()}, []


class BrokenEngine:
    def __init__(self, options: dict[str, Any]) -> None:
        raise RuntimeError("model weights not found at /nonexistent/model.safetensors")


class NeverReadyEngine:
    def __init__(self, options: dict[str, Any]) -> None:
        threading.Event().wait()


class BinaryEngine:
    """Takes binary input: `reverse` answers the blobs it got, last first, each reversed."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def handle(
        self, kind: str, payload: dict[str, Any], emit: Emit, blobs: list[bytes] | None = None
    ) -> Result:
        assert kind == "reverse"
        got = blobs or []
        return {**payload, "sizes": [len(blob) for blob in got]}, [b[::-1] for b in reversed(got)]


class LyingImageEngine:
    """Answers `image` calls with raw dicts (no CallTable), lying as its prompt asks:
    "bad progress", "bad result", "extra field", "no progress" or "honest"."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def handle(self, kind: str, payload: dict[str, Any], emit: Emit) -> Result:
        prompt = payload["prompt"]
        progress = {"image": 0, "step": 1, "steps": payload["steps"], "n": 1}
        if prompt == "bad progress":
            emit({**progress, "step": "one", "steps": -1})
        elif prompt != "no progress":
            emit(progress)
        result = {"seeds": [payload["seed"]], "model": "liar", "width": 64, "height": 64}
        if prompt == "bad result":
            result = {**result, "seeds": ["all of them"], "height": 3}
        elif prompt == "extra field":
            result = {**result, "owned": True}
        return result, [b"not really a png"]


class TypedImageEngine:
    """The IMAGE call through a CallTable, misusing it as its prompt asks: "wrong result"
    (returns another model), "raw emit" (emits a dict) or "honest"."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.calls = CallTable()
        self.calls.add(IMAGE, self.image)

    def handle(
        self, kind: str, payload: dict[str, object], emit: Callable[[dict[str, object]], None]
    ) -> tuple[dict[str, object], list[bytes]]:
        return self.calls.handle(kind, payload, emit)

    def image(self, params: ImageParams, emit: CallEmit[ImageProgress]) -> tuple[Any, list[bytes]]:
        assert params.seed is not None
        if params.prompt == "raw emit":
            emit({"image": 0, "step": 1, "steps": params.steps, "n": 1})  # type: ignore[arg-type]
        emit(ImageProgress(image=0, step=1, steps=params.steps, n=params.n))
        if params.prompt == "wrong result":
            return ImageProgress(image=0, step=1, steps=1, n=1), []
        result = ImageResult(seeds=params.seeds(), model="typed", width=64, height=64)
        return result, [b"png"] * params.n
