"""Where a benchmark's CPU goes: CPU seconds of each process of a started cluster (and of its
children: the sandboxed compute and engine processes, the p2p daemons) over a window, and
optionally py-spy's sampled stacks of some of them over the same window.

    shares = CpuShares({"first": proc, ...})   # labels -> started processes
    shares.begin(); ...; table = shares.end()   # {"first/compute": seconds, ...}

A child is named by what it runs: `p2pd` (hivemind's daemon), `sandbox` (the confined child
process: a block server's compute, a gateway's engine), or its program name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

__all__ = ["CpuShares"]


def _kind(process: psutil.Process) -> str:
    try:
        name = process.name()
        line = " ".join(process.cmdline())
    except psutil.Error:
        return "gone"
    if "p2pd" in name or "p2pd" in line:
        return "p2pd"
    if name.startswith("python"):
        return "sandbox" if "sandbox" in line else "python"
    return str(name)


class CpuShares:
    def __init__(self, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        self._procs = procs
        self._before: dict[int, float] = {}
        self._labels: dict[int, str] = {}
        self._spies: list[subprocess.Popen[bytes]] = []

    def _members(self) -> dict[int, str]:
        members = {os.getpid(): "bench client"}
        for label, proc in self._procs.items():
            try:
                root = psutil.Process(proc.pid)
                members[root.pid] = f"{label}/main"
                for child in root.children(recursive=True):
                    members[child.pid] = f"{label}/{_kind(child)}"
            except psutil.Error:
                continue
        return members

    @staticmethod
    def _seconds(pid: int) -> float:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def pids(self, label: str) -> list[int]:
        """The processes under `label` ("first/sandbox", "gateway/main", ...)."""
        return [pid for pid, name in self._members().items() if name == label]

    def begin(self, spy: dict[str, Path] | None = None) -> None:
        """Start the window; `spy` maps labels to files for py-spy's raw stacks (if the
        py-spy program is next to this Python or on PATH)."""
        self._labels = self._members()
        self._before = {pid: self._seconds(pid) for pid in self._labels}
        program = Path(sys.executable).with_name("py-spy")
        found = str(program) if program.exists() else shutil.which("py-spy")
        for label, out in (spy or {}).items():
            if found is None:
                print("cpu_share: no py-spy; stacks not recorded", file=sys.stderr)
                break
            for pid in self.pids(label)[:1]:
                command = [found, "record", "--pid", str(pid), "--rate", "50", "--format"]
                command += ["raw", "--output", str(out), "--nonblocking", "--threads"]
                self._spies.append(
                    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )

    def end(self) -> dict[str, float]:
        """CPU seconds per label since `begin` (py-spy's stacks written)."""
        spent: dict[str, float] = {}
        for pid, label in self._labels.items():
            spent[label] = spent.get(label, 0.0) + self._seconds(pid) - self._before[pid]
        for spy in self._spies:
            spy.send_signal(signal.SIGINT)
        for spy in self._spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
        self._spies.clear()
        return spent
