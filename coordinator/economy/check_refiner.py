"""Spot checks of jobs an SDXL refiner may finish: which checker makes the same pixels.

A worker started with `--refiner` finishes plain SDXL txt2img jobs with it
(protocol.refiner.refiner_takes): other pixels than its base model alone, further from them
than `verify_tolerance`. So a check of such a job goes only to a checker of the same refiner
setup (protocol.refiner.refiner_setup: no refiner, or the same refiner and switch point) as
the checked worker's engine report (`workers.engine`): `check_refiner` is that requirement,
stored on the queued check (`jobs.check_refiner`), and a pop offers the check only to a
trusted worker whose own setup (`refiner_setup_of`, bound as one parameter) is the same
(coordinator.economy.checks.checks_for).

A worker that reported no engine gets no requirement on its checks (as its checks were
before) and, as a checker, takes only checks without one.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from protocol.params import ImageParams
from protocol.refiner import refiner_setup, refiner_takes

__all__ = ["UNREPORTED", "check_refiner", "refiner_setup_of", "sdxl_engine"]

# the setup bound for a checker that reported no engine: matches no requirement
UNREPORTED = "unreported"


@functools.lru_cache(maxsize=256)
def _report(engine: str) -> dict[str, Any]:
    try:
        report = json.loads(engine)
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def refiner_setup_of(engine: str | None) -> str:
    """The refiner setup of a worker whose engine report (`workers.engine`) is `engine`;
    `UNREPORTED` without one."""
    if not engine:
        return UNREPORTED
    report = _report(engine)
    if not report:
        return UNREPORTED
    sha256, switch = report.get("refiner_sha256"), report.get("refiner_switch")
    return refiner_setup(
        sha256 if isinstance(sha256, str) else None,
        float(switch) if isinstance(switch, int | float) else None,
    )


def check_refiner(engine: str | None, params: ImageParams) -> str | None:
    """The refiner setup a checker of a job of `params` must have, its worker's engine
    report being `engine`: its worker's own for a job a refiner may take on an SDXL engine
    (one with a refiner is one); None (any checker) for every other job, or without a
    report."""
    if not sdxl_engine(engine) or not refiner_takes(params):
        return None
    return refiner_setup_of(engine)


def sdxl_engine(engine: str | None) -> bool:
    """Whether the engine report is an SDXL one (or has a refiner): the only engines whose
    checks `check_refiner` may constrain (cheap: the report's parse is cached)."""
    if not engine:
        return False
    report = _report(engine)
    return bool(report.get("refiner_sha256")) or report.get("baseline") == "sdxl"
