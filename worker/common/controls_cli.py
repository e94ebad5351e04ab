"""Donor controls on the command line: their flags, the live status outputs of a running
worker, and `idlegrid worker status`.

Only the commands' `main` modules call these (see worker.common.cli); the runtime gets
the flags' values as a `DonorSettings` inside its config object.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict

from protocol.settings import Flag
from worker.common.cli import _data_home

if TYPE_CHECKING:
    from worker.common.donor import DonorSettings, TimeRange
    from worker.common.status import WorkerStatus

__all__ = ["DONOR", "DonorFlags", "add_status_command", "status_outputs"]


def _schedule(text: str) -> tuple[TimeRange, ...]:
    from worker.common.donor import parse_schedule

    try:
        return parse_schedule(text)
    except ValueError as exc:
        # argparse prints "argument --schedule: MESSAGE" and exits 2
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value

    return parse


def _percent(text: str) -> float:
    value: float = _positive(float)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage (0 to 100)")
    return value


DONOR = "donor controls (when this machine takes jobs)"


class DonorFlags(BaseModel):
    """`--when`, `--idle-*`, `--schedule` and `--max-jobs-per-hour`: the donor-control
    settings of the commands that take jobs (protocol.settings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    when: Annotated[
        Literal["always", "idle"],
        Flag(
            "always, or only while nobody uses the machine (default %(default)s)",
            group=DONOR,
            choices=("always", "idle"),
        ),
    ] = "always"
    idle_minutes: Annotated[
        float,
        Flag(
            "with --when idle: minutes without keyboard/mouse input (default %(default)s)",
            metavar="N",
            group=DONOR,
            parse=_positive(float),
        ),
    ] = 5.0
    idle_cpu_percent: Annotated[
        float,
        Flag(
            "with --when idle: most CPU other programs may use (default %(default)s)",
            metavar="PCT",
            group=DONOR,
            parse=_percent,
        ),
    ] = 30.0
    idle_gpu_percent: Annotated[
        float,
        Flag(
            "with --when idle: most GPU other programs may use, read through NVML "
            "when pynvml is installed (default %(default)s)",
            metavar="PCT",
            group=DONOR,
            parse=_percent,
        ),
    ] = 10.0
    schedule: Annotated[
        tuple[Any, ...] | None,
        Flag(
            "take jobs only in these local times, e.g. 22:00-08:00 or "
            "22:00-08:00,12:00-13:00 (default: any time)",
            metavar="RANGES",
            group=DONOR,
            parse=_schedule,
        ),
    ] = None
    max_jobs_per_hour: Annotated[
        int | None,
        Flag(
            "take at most N jobs in any hour (default: no limit)",
            metavar="N",
            group=DONOR,
            parse=_positive(int),
        ),
    ] = None

    def donor_settings(self) -> DonorSettings:
        from worker.common.donor import DonorSettings

        return DonorSettings(
            when=self.when,
            idle_minutes=self.idle_minutes,
            idle_cpu_percent=self.idle_cpu_percent,
            idle_gpu_percent=self.idle_gpu_percent,
            schedule=self.schedule or (),
            max_jobs_per_hour=self.max_jobs_per_hour,
        )


@contextlib.contextmanager
def status_outputs(status: WorkerStatus, identity_file: Path) -> Iterator[None]:
    """While the worker runs: its status file beside `identity_file` (removed on exit)
    and, when stderr is a terminal, a live status line there."""
    from worker.common.status import StatusFile, TerminalLine, status_path

    file = StatusFile(status_path(identity_file))
    status.listen(file)
    line = TerminalLine(sys.stderr) if sys.stderr.isatty() else None
    # log lines to the terminal go through the status line, which is redrawn below them
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr
    ]
    if line is not None:
        for handler in handlers:
            handler.setStream(line)
        status.listen(line)
    try:
        yield
    finally:
        file.remove()
        if line is not None:
            for handler in handlers:
                handler.setStream(sys.stderr)
            line.close()


# --- idlegrid worker status -------------------------------------------------------------


def add_status_command(kinds: argparse._SubParsersAction[Any]) -> None:
    status = kinds.add_parser(
        "status",
        help="show what the workers on this machine are doing",
        description="Show a running worker's state, jobs done and kudos earned "
        "(exit status 1 when it is not running).",
    )
    which = status.add_mutually_exclusive_group()
    which.add_argument("--name", help="the worker's name (default: every worker found)")
    which.add_argument("--identity", type=Path, metavar="FILE", help="the worker's identity file")
    status.set_defaults(run=_run_status)


def _status_files(args: argparse.Namespace) -> list[Path]:
    from worker.common.status import status_path

    if args.identity is not None:
        return [status_path(args.identity)]
    if args.name is not None:
        return [status_path(_data_home() / f"worker-{args.name}.key")]
    return sorted(_data_home().glob("worker-*.status.json"))


def _when(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _run_status(args: argparse.Namespace) -> int:
    from worker.common.status import read_status

    found = [s for s in map(read_status, _status_files(args)) if s is not None]
    if not found:
        who = args.name or args.identity
        print(f"{who}: not running" if who else f"not running: no live worker in {_data_home()}")
        return 1
    header = ("NAME", "PID", "STATE", "JOBS", "KUDOS", "JOB", "SINCE", "UPDATED")
    rows = [header]
    for s in found:
        state = str(s.get("state"))
        if state == "paused" and s.get("reason"):
            state = f"paused ({s['reason']})"
        rows.append(
            (
                str(s.get("name")),
                str(s.get("pid")),
                state,
                str(s.get("jobs_done")),
                str(s.get("kudos_earned")),
                str(s.get("current_job") or "-"),
                _when(s.get("started_at")),
                _when(s.get("updated_at")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0
