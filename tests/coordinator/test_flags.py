"""The coordinator's command line: flags reach its config, and bad values name the flag."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from coordinator import network_flags


def _settings(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    network_flags.add_arguments(parser)
    return network_flags.settings(parser.parse_args(list(argv)))


def test_the_speed_check_is_a_flag_and_inf_turns_it_off() -> None:
    assert _settings()["max_pixel_steps_per_second"] == 2e8
    assert _settings("--max-pixel-steps-per-second", "5e9")["max_pixel_steps_per_second"] == 5e9
    assert _settings("--max-pixel-steps-per-second", "inf")["max_pixel_steps_per_second"] == float(
        "inf"
    )
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit, match="--max-pixel-steps-per-second"):
            _settings("--max-pixel-steps-per-second", bad)
