"""Run a Python module (`python -m MODULE ARGS`) under cProfile, recording only between the
signals SIGUSR1 (start) and SIGUSR2 (stop, and write the stats): so a benchmark profiles
its measuring window, not the start-up.

    python bench/profiled.py OUT.pstats MODULE [ARGS...]

With IDLEGRID_PROFILE_CLOCK=cpu the profile counts the main thread's CPU time instead of
wall time (a syscall blocked on the disk then costs only its CPU).
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
import time
from types import FrameType


def main() -> None:
    out, module = sys.argv[1], sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    sys.path[0] = os.getcwd()  # as `python -m` has it
    if os.environ.get("IDLEGRID_PROFILE_CLOCK") == "cpu":
        profile = cProfile.Profile(time.thread_time)
    else:
        profile = cProfile.Profile()

    def start(_signum: int, _frame: FrameType | None) -> None:
        profile.enable()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        profile.disable()
        profile.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
