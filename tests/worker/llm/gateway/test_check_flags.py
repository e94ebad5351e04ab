"""The gateway's spot-check flags: bad values exit 2 naming the flag and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "value", "fix"),
    [
        ("--check-rate", "1.5", "from 0 (off) to 1"),
        ("--check-rate", "nan", "from 0 (off) to 1"),
        ("--check-tolerance", "0", "between 0 and 1"),
        ("--check-ban-seconds", "-1", "0 or more"),
    ],
)
def test_bad_check_flags_exit_2_naming_the_flag(
    tiny_models: Path, flag: str, value: str, fix: str
) -> None:
    args = ["worker", "gateway", "--coordinator", "http://127.0.0.1:9", "--model"]
    args += [str(tiny_models / "llm"), "--initial-peers", "/ip4/127.0.0.1/tcp/9"]
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", *args, f"{flag}={value}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"error: {flag} '{float(value)}'" in done.stderr and fix in done.stderr
