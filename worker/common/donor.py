"""Donor controls: when this machine's owner lets the worker take jobs.

The serve loop (worker.common.service.serve_jobs) asks a `DonorGate` before every pop;
while the gate names a reason, the worker pops nothing (a job in hand is still finished,
never abandoned) and asks again about once a second. The rules:

- `Schedule`: only within local-time ranges such as `22:00-08:00` (`--schedule`);
- `HourlyLimit`: at most N jobs started in any sliding hour (`--max-jobs-per-hour`);
- `Idle`: only while the owner is away (`--when idle`), as told by idleness sources:
  `InputActivity` (no keyboard or mouse input for `--idle-minutes`, where /dev/input can
  be read), `GpuLoad` (other processes' GPU use, when pynvml and a GPU are present) and
  `CpuLoad` (other processes' CPU use below `--idle-cpu-percent`).

Sources and clocks are small protocols, so tests pass fakes instead of the real machine.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "Clock",
    "CpuLoad",
    "CpuSample",
    "DonorGate",
    "DonorSettings",
    "GpuLoad",
    "HourlyLimit",
    "Idle",
    "IdlenessSource",
    "InputActivity",
    "Rule",
    "Schedule",
    "SystemClock",
    "TimeRange",
    "build_gate",
    "parse_schedule",
]

log = logging.getLogger(__name__)


# --- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    """Minutes after local midnight: [start, end), wrapping midnight when end <= start."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )


@dataclass(frozen=True)
class DonorSettings:
    # "always": take jobs whenever allowed; "idle": only while the owner is away
    when: Literal["always", "idle"] = "always"
    # minutes without keyboard/mouse input before the machine counts as idle
    idle_minutes: float = 5.0
    # most CPU other processes may use (percent of the whole machine) for it to count as idle
    idle_cpu_percent: float = 30.0
    # most GPU other processes may use (percent) for it to count as idle
    idle_gpu_percent: float = 10.0
    # local-time ranges in which jobs are taken (empty: any time)
    schedule: tuple[TimeRange, ...] = field(default_factory=tuple)
    # jobs started in any sliding hour (None: no limit)
    max_jobs_per_hour: int | None = None

    @property
    def active(self) -> bool:
        """Whether any rule can hold the worker back."""
        return self.when == "idle" or bool(self.schedule) or self.max_jobs_per_hour is not None


_RANGE = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")


def parse_schedule(text: str) -> tuple[TimeRange, ...]:
    """`22:00-08:00` or a comma-separated list of such ranges (local time, 24 h clock).
    ValueError names the bad part and the expected form."""
    ranges = []
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if match is None:
            raise ValueError(
                f"{part.strip()!r} is not a time range; use HH:MM-HH:MM, e.g. 22:00-08:00 "
                "(several: 22:00-08:00,12:00-13:00)"
            )
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ValueError(f"{part.strip()!r} is not a time of day (00:00 to 23:59)")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ValueError(
                f"{part.strip()!r} is empty; leave --schedule out to serve at any time"
            )
        ranges.append(TimeRange(start, end))
    return tuple(ranges)


# --- clocks and rules -------------------------------------------------------------------


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (local time of day comes from this)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Rule(Protocol):
    async def blocked(self) -> str | None:
        """Why no job may be taken now, or None."""
        ...

    def job_started(self) -> None:
        """A job was taken."""
        ...


class Schedule:
    def __init__(self, ranges: Sequence[TimeRange], clock: Clock) -> None:
        self.ranges = tuple(ranges)
        self.clock = clock

    async def blocked(self) -> str | None:
        local = datetime.fromtimestamp(self.clock.time())
        minute = local.hour * 60 + local.minute
        if any(r.contains(minute) for r in self.ranges):
            return None
        return "outside --schedule " + ",".join(str(r) for r in self.ranges)

    def job_started(self) -> None:
        pass


class HourlyLimit:
    """At most `limit` jobs started in any 3600 seconds."""

    def __init__(self, limit: int, clock: Clock) -> None:
        self.limit = limit
        self.clock = clock
        self._started: deque[float] = deque()

    async def blocked(self) -> str | None:
        hour_ago = self.clock.time() - 3600
        while self._started and self._started[0] <= hour_ago:
            self._started.popleft()
        if len(self._started) < self.limit:
            return None
        return f"{self.limit} jobs in the last hour (--max-jobs-per-hour {self.limit})"

    def job_started(self) -> None:
        self._started.append(self.clock.time())


class IdlenessSource(Protocol):
    async def busy(self) -> str | None:
        """Why the owner seems to be using the machine; None when idle or unknown."""
        ...


class Idle:
    """Jobs only while every source says the machine is idle (`--when idle`)."""

    def __init__(self, sources: Sequence[IdlenessSource]) -> None:
        self.sources = tuple(sources)

    async def blocked(self) -> str | None:
        for source in self.sources:
            reason = await source.busy()
            if reason is not None:
                return f"machine in use ({reason})"
        return None

    def job_started(self) -> None:
        pass


class DonorGate:
    """The rules the serve loop consults before each pop (worker.common.service.Gate)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    async def reason(self) -> str | None:
        for rule in self.rules:
            reason = await rule.blocked()
            if reason is not None:
                return reason
        return None

    def job_started(self) -> None:
        for rule in self.rules:
            rule.job_started()


# --- idleness sources -------------------------------------------------------------------


class InputActivity:
    """Keyboard and mouse input, from the newest access or change time of the input
    devices (Linux /dev/input/event*). Unknown (None) when there are none to stat."""

    def __init__(self, idle_seconds: float, clock: Clock, devices: Path = Path("/dev/input")):
        self.idle_seconds = idle_seconds
        self.clock = clock
        self.devices = devices

    def last_input(self) -> float | None:
        newest: float | None = None
        try:
            for device in self.devices.glob("event*"):
                st = device.stat()
                newest = max(newest or 0.0, st.st_atime, st.st_mtime)
        except OSError:
            return None
        return newest

    async def busy(self) -> str | None:
        last = self.last_input()
        if last is None or self.clock.time() - last >= self.idle_seconds:
            return None
        return f"keyboard or mouse used in the last {self.idle_seconds / 60:g} min"


@dataclass(frozen=True)
class CpuSample:
    # CPU seconds used by all processes, summed over cores
    busy: float
    # CPU seconds available (busy + idle), summed over cores
    total: float
    # CPU seconds used by this worker and its children
    own: float


def psutil_sample() -> CpuSample:
    """The machine's and this worker's (with its children's) CPU time so far."""
    import psutil

    times = psutil.cpu_times()
    values = times._asdict()
    # guest time is already counted in user time on Linux
    total = sum(v for k, v in values.items() if k not in ("guest", "guest_nice"))
    idle = values["idle"] + values.get("iowait", 0.0)
    me = psutil.Process()
    mine = me.cpu_times()
    own = mine.user + mine.system + mine.children_user + mine.children_system
    for child in me.children(recursive=True):
        try:
            theirs = child.cpu_times()
        except psutil.Error:
            continue  # gone meanwhile; its time moved into children_* above or is lost
        own += theirs.user + theirs.system
    return CpuSample(busy=total - idle, total=total, own=own)


class CpuLoad:
    """CPU use of other processes, over the time since the last look (a fresh `window`
    when the last look is stale), as percent of the whole machine."""

    def __init__(
        self,
        threshold: float,
        clock: Clock,
        sample: Callable[[], CpuSample] = psutil_sample,
        window: float = 0.5,
        stale: float = 5.0,
    ) -> None:
        self.threshold = threshold
        self.clock = clock
        self.sample = sample
        self.window = window
        self.stale = stale
        self._last: tuple[float, CpuSample] | None = None

    def others_percent(self, before: CpuSample, after: CpuSample) -> float:
        total = after.total - before.total
        if total <= 0:
            return 0.0
        others = (after.busy - before.busy) - (after.own - before.own)
        return max(0.0, min(100.0, 100.0 * others / total))

    async def busy(self) -> str | None:
        if self._last is None or self.clock.time() - self._last[0] > self.stale:
            self._last = (self.clock.time(), self.sample())
            await self.clock.sleep(self.window)
        before = self._last[1]
        now = self.sample()
        self._last = (self.clock.time(), now)
        percent = self.others_percent(before, now)
        log.debug("other processes use %.0f%% CPU", percent)
        if percent < self.threshold:
            return None
        return f"other processes use over {self.threshold:g}% CPU"


class GpuLoad:
    """GPU use of other processes, through NVML. `open` gives None when pynvml is not
    installed or there is no GPU (the source is then skipped)."""

    def __init__(self, nvml: Any, handles: list[Any], threshold: float) -> None:
        self.nvml = nvml
        self.handles = handles
        self.threshold = threshold
        self._since = 0

    @classmethod
    def open(cls, threshold: float) -> GpuLoad | None:
        try:
            nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as exc:  # not installed, no driver, no GPU: nothing to read
            log.debug("no GPU load readings: %r", exc)
            return None
        return cls(nvml, handles, threshold) if handles else None

    def _own_pids(self) -> set[int]:
        import psutil

        me = psutil.Process()
        return {me.pid, *(child.pid for child in me.children(recursive=True))}

    def _others_percent(self, handle: Any, own: set[int]) -> float:
        try:
            samples = self.nvml.nvmlDeviceGetProcessUtilization(handle, self._since)
        except self.nvml.NVMLError:
            # no per-process figures: the whole GPU (asked between jobs, when ours is idle)
            return float(self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        return float(sum(s.smUtil for s in samples if s.pid not in own))

    async def busy(self) -> str | None:
        own = self._own_pids()
        try:
            percent = max(self._others_percent(h, own) for h in self.handles)
        except self.nvml.NVMLError as exc:
            log.debug("GPU load unreadable: %r", exc)
            return None
        self._since = int(time.time() * 1_000_000)
        if percent < self.threshold:
            return None
        return f"other processes use over {self.threshold:g}% GPU"


def build_gate(settings: DonorSettings, clock: Clock | None = None) -> DonorGate | None:
    """The gate for these settings on this machine; None when no rule is set."""
    if not settings.active:
        return None
    clock = clock or SystemClock()
    rules: list[Rule] = []
    if settings.schedule:
        rules.append(Schedule(settings.schedule, clock))
    if settings.max_jobs_per_hour is not None:
        rules.append(HourlyLimit(settings.max_jobs_per_hour, clock))
    if settings.when == "idle":
        sources: list[IdlenessSource] = [InputActivity(settings.idle_minutes * 60, clock)]
        gpu = GpuLoad.open(settings.idle_gpu_percent)
        if gpu is not None:
            sources.append(gpu)
        sources.append(CpuLoad(settings.idle_cpu_percent, clock))
        rules.append(Idle(sources))
    return DonorGate(rules)
