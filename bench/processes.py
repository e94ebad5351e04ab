"""What the benchmark scripts share: started processes, waiting for a line they print, and
the LLM swarm (a coordinator and two block servers) the LLM benchmarks run on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Processes", "bench_llm", "start_swarm", "wait_line"]

CLI = [sys.executable, "-m", "client.cli"]


def wait_line(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Poll `log` until `pattern` appears; return its first group (or the whole match).
    Exits with the log if the process dies or the line does not come in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match.group(1 if match.lastindex else 0)
        if proc.poll() is not None:
            raise SystemExit(f"process exited early:\n{log.read_text()}")
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {pattern!r}:\n{log.read_text()}")


def bench_llm(model: Path | None, work: Path) -> Path:
    """The model folder to benchmark: `model`, or the tiny LM (built under `work` if
    IDLEGRID_TEST_MODELS names no built one)."""
    if model is not None:
        return model.resolve()
    models = Path(os.environ.get("IDLEGRID_TEST_MODELS") or work / "models")
    if not (models / "llm" / "config.json").exists():
        from worker.models.tiny_models import build_tiny_models

        build_tiny_models(models)
    return models / "llm"


class Processes:
    """`idlegrid` processes started by label, each logging to WORK/LABEL.log; `stop()` ends
    them all, the last started first."""

    def __init__(self, work: Path) -> None:
        self.work = work
        # by label (a label started again names its newest process)
        self.named: dict[str, subprocess.Popen[bytes]] = {}
        self._all: list[subprocess.Popen[bytes]] = []

    def start(self, label: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{label}.log"
        proc = subprocess.Popen([*CLI, *command], stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self._all.append(proc)
        self.named[label] = proc
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self._all):
            proc.terminate()
            proc.wait(timeout=30)


def start_swarm(
    processes: Processes, llm: Path, threads: int, server_flags: list[str] | None = None
) -> tuple[str, str]:
    """A coordinator and two block servers "first" and "second" (the halves of `llm`'s
    blocks); (the coordinator's URL, the first server's multiaddr) once all are up."""
    work = processes.work
    proc, log = processes.start(
        "coordinator",
        ["coordinator", "--port", "0", "--data-dir", str(work / "data"), "--log-level",
         "WARNING"],
    )  # fmt: skip
    url = wait_line(log, r"listening on (http://\S+)", proc, 60)
    blocks = json.loads((llm / "config.json").read_text())["num_hidden_layers"]
    half = blocks // 2
    ready = r"serving blocks \d+:\d+ of \S+ at (\S+)"
    server = ["worker", "blocks", "--model", str(llm), "--coordinator", url]
    server += ["--threads", str(threads), "--log-level", "WARNING", *(server_flags or [])]
    proc, log = processes.start(
        "first",
        [*server, "--blocks", f"0:{half}", "--new-swarm", "--name", "first",
         "--identity", str(work / "first.key")],
    )  # fmt: skip
    maddr = wait_line(log, ready, proc, 120)
    proc, log = processes.start(
        "second",
        [*server, "--blocks", f"{half}:{blocks}", "--initial-peers", maddr, "--name", "second",
         "--identity", str(work / "second.key")],
    )  # fmt: skip
    wait_line(log, ready, proc, 120)
    return url, maddr
