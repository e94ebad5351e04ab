"""The worker's status: the JSON file beside its identity, the terminal line, and
`idlegrid worker status` reading what a real `idlegrid worker image` wrote."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.procs import Proc
from worker.common.controls_cli import status_outputs
from worker.common.status import (
    StatusFile,
    TerminalLine,
    WorkerStatus,
    read_status,
    status_path,
)


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def test_status_file_follows_every_change_and_goes_on_exit(tmp_path: Path) -> None:
    path = status_path(tmp_path / "worker-w1.key")
    assert path == tmp_path / "worker-w1.status.json"
    status = WorkerStatus("w1", clock=Ticks())
    file = StatusFile(path)
    status.listen(file)
    first = json.loads(path.read_text())
    assert first == {
        "pid": os.getpid(),
        "name": "w1",
        "state": "idle",
        "reason": None,
        "jobs_done": 0,
        "kudos_earned": 0,
        "current_job": None,
        "started_at": 1001.0,
        "updated_at": 1001.0,
    }
    status.set_state("paused", "outside --schedule 22:00-08:00")
    paused = {"state": "paused", "reason": "outside --schedule 22:00-08:00", "updated_at": 1002.0}
    assert read_status(path) == {**first, **paused}
    status.job_started("job-1")
    status.job_paid(7)
    status.job_ended()
    final = read_status(path)
    assert final is not None
    assert (final["state"], final["current_job"], final["jobs_done"], final["kudos_earned"]) == (
        "serving",
        None,
        1,
        7,
    )
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left
    file.remove()
    assert not path.exists() and read_status(path) is None


def test_draining_is_final() -> None:
    status = WorkerStatus("w")
    status.job_started("j")
    status.set_state("draining")
    status.set_state("idle")
    status.job_started("k")
    assert status.state == "draining" and status.current_job == "k"


def test_status_of_a_dead_worker_is_none(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    path = tmp_path / "w.status.json"
    path.write_text(json.dumps({"pid": int(gone.stdout), "state": "idle"}))
    assert read_status(path) is None
    path.write_text("{half a fi")
    assert read_status(path) is None


def test_terminal_line_rewrites_one_line() -> None:
    out = io.StringIO()
    status = WorkerStatus("w")
    line = TerminalLine(out)
    status.listen(line)
    status.set_state("paused", "machine in use (owner typing)")
    status.job_started("abc")
    status.job_paid(3)
    status.job_ended()
    line.write("INFO a log line\n")  # through the line, as the worker's log handler writes
    line.close()
    assert out.getvalue().split("\r\x1b[K") == [
        "",
        "w: idle | 0 jobs, 0 kudos",
        "w: paused (machine in use (owner typing)) | 0 jobs, 0 kudos",
        "w: serving job abc | 0 jobs, 0 kudos",
        "w: serving | 1 jobs, 3 kudos",
        "INFO a log line\n",
        "w: serving | 1 jobs, 3 kudos\n",
    ]


def test_live_line_only_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    master, replica = os.openpty()
    with os.fdopen(replica, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        status = WorkerStatus("w")
        with status_outputs(status, tmp_path / "w.key"):
            assert read_status(tmp_path / "w.status.json") is not None
            status.set_state("paused", "outside --schedule 22:00-08:00")
        assert not (tmp_path / "w.status.json").exists()
    shown = os.read(master, 65536)
    os.close(master)
    assert b"\r\x1b[Kw: paused (outside --schedule 22:00-08:00) | 0 jobs, 0 kudos" in shown
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with status_outputs(WorkerStatus("w"), tmp_path / "w.key"):
        pass
    assert plain.getvalue() == ""


# --- a real worker and `idlegrid worker status` ---------------------------------------------


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[str]:
    proc = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "data")],
                tmp_path / "coordinator.log")  # fmt: skip
    try:
        yield proc.wait_for(r"listening on (http://\S+)", 60).group(1)
    finally:
        proc.stop()


def _status(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", "worker", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "share")},
    )


@pytest.mark.slow
def test_worker_status_reads_a_running_worker(
    tmp_path: Path, coordinator: str, tiny_models: Path
) -> None:
    # a schedule that excludes now: the worker pauses at once, a state only it can know
    later = datetime.now() + timedelta(hours=2)
    window = f"{later:%H}:00-{later + timedelta(hours=1):%H}:00"
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "share")}
    # a default identity (XDG_DATA_HOME/idlegrid/worker-NAME.key), found by --name
    worker = Proc(
        ["worker", "image", "--coordinator", coordinator, "--model", str(tiny_models / "sd"),
         "--name", "shown", "--threads", "1", "--schedule", window],
        tmp_path / "worker.log",
        env=env,
    )  # fmt: skip
    try:
        worker.wait_for(f"paused: outside --schedule {window}", 60)
        key = tmp_path / "share" / "idlegrid" / "worker-shown.key"
        for args in (["--name", "shown"], ["--identity", str(key)], []):
            shown = _status(tmp_path, *args)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            header, row = shown.stdout.splitlines()
            assert header.split()[:6] == ["NAME", "PID", "STATE", "JOBS", "KUDOS", "JOB"]
            assert row.split()[:3] == ["shown", str(worker.pid), "paused"]
            assert f"paused (outside --schedule {window})" in row
        assert worker.stop() == 0
        assert "\x1b[K" not in worker.output()  # no live line when stderr is not a terminal
    finally:
        worker.stop()
    assert not (tmp_path / "share" / "idlegrid" / "worker-shown.status.json").exists()
    gone = _status(tmp_path, "--name", "shown")
    assert gone.returncode == 1
    assert gone.stdout.strip() == "shown: not running"
    nobody = _status(tmp_path)
    assert nobody.returncode == 1 and "not running" in nobody.stdout
