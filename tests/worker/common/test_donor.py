"""Donor controls: each rule and idleness source with an injected clock or fake readings,
the flags' errors, and a real image worker that stops popping while its owner is busy."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.params import ImageParams
from protocol.signing import Identity
from sandbox import Sandbox, SandboxPolicy
from tests.conftest import LiveApp, start_app
from worker.common.donor import (
    CpuLoad,
    CpuSample,
    DonorGate,
    DonorSettings,
    GpuLoad,
    HourlyLimit,
    Idle,
    InputActivity,
    Schedule,
    TimeRange,
    build_gate,
    parse_schedule,
)
from worker.common.link import CoordinatorLink
from worker.common.status import WorkerStatus
from worker.image.config import ImageWorkerConfig
from worker.image.worker import ImageWorker

REPO_ROOT = Path(__file__).resolve().parents[3]


class FakeClock:
    """Time stands still until a test (or a `sleep`) moves it."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def local(hour: int, minute: int = 0) -> float:
    """The epoch time of a local time of day (on a fixed date)."""
    return datetime(2026, 3, 14, hour, minute).timestamp()


class FakeSource:
    """An idleness source the test flips; counts how often it was asked."""

    def __init__(self, busy: str | None = None) -> None:
        self.reason = busy
        self.asked = 0

    async def busy(self) -> str | None:
        self.asked += 1
        return self.reason


# --- schedule ---------------------------------------------------------------------------


def test_schedule_parses_ranges_lists_and_wrapping() -> None:
    assert parse_schedule("22:00-08:00") == (TimeRange(22 * 60, 8 * 60),)
    assert parse_schedule(" 9:30-12:00 , 13:00-17:45") == (
        TimeRange(9 * 60 + 30, 12 * 60),
        TimeRange(13 * 60, 17 * 60 + 45),
    )
    assert str(TimeRange(22 * 60, 8 * 60)) == "22:00-08:00"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("22-08", "'22-08' is not a time range; use HH:MM-HH:MM"),
        ("25:00-08:00", "not a time of day"),
        ("10:60-11:00", "not a time of day"),
        ("22:00-08:00,", "'' is not a time range"),
        ("08:00-08:00", "is empty; leave --schedule out"),
    ],
)
def test_schedule_rejects_bad_input_saying_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("hour", "minute", "open_"),
    [(21, 59, False), (22, 0, True), (23, 30, True), (0, 0, True), (7, 59, True), (8, 0, False)],
)
async def test_schedule_wrapping_midnight(hour: int, minute: int, open_: bool) -> None:
    rule = Schedule(parse_schedule("22:00-08:00"), FakeClock(local(hour, minute)))
    reason = await rule.blocked()
    assert (reason is None) == open_
    if not open_:
        assert reason == "outside --schedule 22:00-08:00"


async def test_schedule_with_several_ranges() -> None:
    clock = FakeClock(local(12, 30))
    rule = Schedule(parse_schedule("09:00-10:00,12:00-13:00"), clock)
    assert await rule.blocked() is None
    clock.now = local(11)
    assert await rule.blocked() == "outside --schedule 09:00-10:00,12:00-13:00"


@pytest.mark.slow
def test_bad_schedule_flag_exits_2_naming_the_flag(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "worker", "image", "--coordinator",
         "http://127.0.0.1:9", "--model", str(tmp_path), "--schedule", "22:00-8"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 2
    assert "argument --schedule: '22:00-8' is not a time range" in done.stderr


# --- jobs per hour ----------------------------------------------------------------------


async def test_hourly_limit_is_a_sliding_hour() -> None:
    clock = FakeClock(1_000_000.0)
    rule = HourlyLimit(2, clock)
    assert await rule.blocked() is None
    rule.job_started()
    clock.now += 1000
    rule.job_started()
    assert await rule.blocked() == "2 jobs in the last hour (--max-jobs-per-hour 2)"
    clock.now += 2599  # the first job is 3599 s old
    assert await rule.blocked() is not None
    clock.now += 1
    assert await rule.blocked() is None
    rule.job_started()
    assert await rule.blocked() is not None


# --- idleness sources -------------------------------------------------------------------


async def test_input_activity_from_device_times(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    source = InputActivity(300, clock, devices=tmp_path)
    assert await source.busy() is None  # no devices: unknown, not busy
    for name, age in (("event0", 1000), ("event3", 100), ("mouse0", 1)):
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (clock.now - age, clock.now - age))
    assert await source.busy() == "keyboard or mouse used in the last 5 min"  # event3
    clock.now += 200  # event3 is now 300 s old; mouse0 is not an event device
    assert await source.busy() is None


async def test_input_activity_unreadable_directory_is_unknown(tmp_path: Path) -> None:
    source = InputActivity(300, FakeClock(0), devices=tmp_path / "missing")
    assert await source.busy() is None


async def test_cpu_load_counts_other_processes_only() -> None:
    clock = FakeClock(0.0)
    # 4 cores over each step: 4 CPU seconds per second
    samples = [
        CpuSample(busy=0.0, total=0.0, own=0.0),
        # 2 s later: 8 CPU-s in all, 6 busy of which 4 are ours -> others 25 %
        CpuSample(busy=6.0, total=8.0, own=4.0),
        # 2 s later: 8 more CPU-s, 7 busy of which 1 is ours -> others 75 %
        CpuSample(busy=13.0, total=16.0, own=5.0),
    ]
    readings = iter(samples)
    source = CpuLoad(30, clock, sample=lambda: next(readings), window=2.0, stale=5.0)
    assert await source.busy() is None  # 25 % < 30 %
    assert clock.slept == [2.0]  # a fresh window, as there was no earlier look
    clock.now += 2.0
    assert await source.busy() == "other processes use over 30% CPU"
    assert clock.slept == [2.0]  # the last look was recent: no new wait


async def test_cpu_load_takes_a_fresh_window_after_a_stale_look() -> None:
    clock = FakeClock(0.0)
    readings = iter(
        [
            CpuSample(0, 0, 0),
            CpuSample(1, 4, 0),
            # a long job later: mostly busy with our own work
            CpuSample(400, 404, 390),
            CpuSample(401, 408, 391),
        ]
    )
    source = CpuLoad(30, clock, sample=lambda: next(readings), window=1.0, stale=5.0)
    assert await source.busy() is None
    clock.now += 100
    assert await source.busy() is None  # judged on the fresh 1 s window, not the job
    assert clock.slept == [1.0, 1.0]


def test_cpu_load_reads_this_machine() -> None:
    from worker.common.donor import psutil_sample

    first, second = psutil_sample(), psutil_sample()
    assert 0 < first.busy <= first.total and first.own > 0
    assert second.total >= first.total


@dataclass
class _Sample:
    pid: int
    smUtil: int  # noqa: N815 (NVML's field name)


@dataclass
class _Rates:
    gpu: int


class FakeNvml:
    """Enough of pynvml for GpuLoad: per-process samples, or none (older drivers)."""

    class NVMLError(Exception):
        pass

    def __init__(self, samples: list[_Sample] | None, overall: int = 0) -> None:
        self.samples = samples
        self.overall = overall

    def nvmlDeviceGetProcessUtilization(self, handle: Any, since: int) -> list[_Sample]:  # noqa: N802
        if self.samples is None:
            raise self.NVMLError("not supported")
        return self.samples

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> _Rates:  # noqa: N802
        return _Rates(self.overall)


async def test_gpu_load_ignores_our_own_processes() -> None:
    nvml = FakeNvml([_Sample(os.getpid(), 90), _Sample(1, 5)])
    source = GpuLoad(nvml, ["gpu0"], threshold=10)
    assert await source.busy() is None
    nvml.samples = [_Sample(os.getpid(), 0), _Sample(1, 40)]
    assert await source.busy() == "other processes use over 10% GPU"


async def test_gpu_load_falls_back_to_the_whole_gpu() -> None:
    source = GpuLoad(FakeNvml(None, overall=50), ["gpu0"], threshold=10)
    assert await source.busy() == "other processes use over 10% GPU"


def test_no_gpu_source_without_pynvml() -> None:
    try:
        import pynvml  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        assert GpuLoad.open(10) is None
    else:
        pytest.skip("pynvml is installed here")


# --- the gate -----------------------------------------------------------------------------


async def test_gate_names_the_first_rule_that_holds_back() -> None:
    clock = FakeClock(local(12))
    source = FakeSource()
    limit = HourlyLimit(1, clock)
    gate = DonorGate([Schedule(parse_schedule("09:00-17:00"), clock), limit, Idle([source])])
    assert await gate.reason() is None
    source.reason = "someone typing"
    assert await gate.reason() == "machine in use (someone typing)"
    gate.job_started()
    assert await gate.reason() == "1 jobs in the last hour (--max-jobs-per-hour 1)"
    clock.now = local(18)
    assert await gate.reason() == "outside --schedule 09:00-17:00"


def test_no_gate_unless_a_control_is_set() -> None:
    assert build_gate(DonorSettings()) is None
    gate = build_gate(DonorSettings(max_jobs_per_hour=3), FakeClock(0))
    assert gate is not None and [type(r) for r in gate.rules] == [HourlyLimit]
    idle = build_gate(DonorSettings(when="idle"), FakeClock(0))
    assert idle is not None
    (rule,) = idle.rules
    assert isinstance(rule, Idle)
    assert {type(s) for s in rule.sources} >= {InputActivity, CpuLoad}


# --- a real worker behind the gate --------------------------------------------------------


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[LiveApp]:
    runner, app = await start_app(CoordinatorConfig(data_dir=tmp_path / "data", port=0))
    try:
        yield app
    finally:
        await runner.cleanup()


async def _until(what: str, check: Any, seconds: float = 15) -> None:
    try:
        async with asyncio.timeout(seconds):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


async def test_worker_pauses_while_the_owner_is_busy_and_finishes_the_job_in_hand(
    live: LiveApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worker.common.service")
    source = FakeSource(busy="owner typing")
    config = ImageWorkerConfig(
        coordinator=live.url,
        model="unused",
        model_config=None,
        model_name="tiny",
        name="polite",
        identity_file=tmp_path / "polite.key",
        pop_wait=1.0,
        gate_poll=0.05,
    )
    policy = SandboxPolicy(
        workdir_root=tmp_path,
        extra_env={"PYTHONPATH": str(REPO_ROOT)},
        packages=("sandbox", "protocol", "tests", "client", "worker"),
        start_timeout=60,
        job_timeout=60,
    )
    sandbox = await Sandbox.create("tests.fakes:FakeImageEngine", {}, policy)
    link = CoordinatorLink(live.url, Identity.generate(), "polite", None)
    worker = ImageWorker(config, sandbox, link, gate=DonorGate([Idle([source])]))
    status: WorkerStatus = worker.status

    flips: list[str] = []

    def owner_returns_when_the_first_job_starts(changed: WorkerStatus) -> None:
        if changed.current_job is not None and not flips:
            flips.append(changed.current_job)
            source.reason = "owner back"

    status.listen(owner_returns_when_the_first_job_starts)
    params: dict[str, Any] = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    async with AsyncClient(live.url) as grid:
        jobs = [(await grid.submit_image(ImageParams(**params, seed=s))).id for s in (1, 2)]

        async def states() -> list[str]:
            return [(await grid.job(job)).state for job in jobs]

        async def asked_again(times: int) -> bool:
            return source.asked >= times

        async def paused() -> bool:
            return status.state == "paused"

        running = asyncio.ensure_future(worker.run())
        try:
            await _until("paused", paused)
            assert status.reason == "machine in use (owner typing)"
            seen = source.asked
            await _until("the gate asked again", lambda: asked_again(seen + 5))
            assert await states() == ["queued", "queued"]

            source.reason = None  # owner away: one job is taken, then the owner is back
            await _until("one job done", lambda: _one_done(states))
            seen = source.asked
            await _until("the gate asked again", lambda: asked_again(seen + 5))
            assert sorted(await states()) == ["done", "queued"]
            assert status.state == "paused" and status.reason == "machine in use (owner back)"
            assert status.jobs_done == 1

            source.reason = None
            await _until("both done", lambda: _all_done(states))
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await worker.aclose()
            await link.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("paused: machine in use (owner typing)") == 1  # not once per poll
    assert "serving again" in messages
    assert "paused: machine in use (owner back)" in messages


async def _one_done(states: Any) -> bool:
    return sorted(await states()) == ["done", "queued"]


async def _all_done(states: Any) -> bool:
    return bool(await states() == ["done", "done"])
