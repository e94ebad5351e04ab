"""SandboxPolicy validation and the child's environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandbox import SandboxPolicy


def test_child_env_keeps_only_allowed_variables_then_extras_then_ours() -> None:
    policy = SandboxPolicy(env_allow=("PATH", "LANG"), extra_env={"LANG": "C.UTF-8", "X": "1"})
    parent = {"PATH": "/usr/bin", "LANG": "de_DE.UTF-8", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    env = policy.child_env(parent, Path("/w"))
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "X": "1",
        "HOME": "/w",
        "TMPDIR": "/w/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def test_extra_env_is_a_read_only_copy() -> None:
    extra = {"HF_HUB_OFFLINE": "1"}
    policy = SandboxPolicy(extra_env=extra)
    extra["HF_HUB_OFFLINE"] = "0"
    assert policy.extra_env == {"HF_HUB_OFFLINE": "1"}
    with pytest.raises(TypeError):
        policy.extra_env["X"] = "1"  # type: ignore[index]
    hash(policy)  # still usable as a key


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"extra_env": {"HOME": "/root"}}, "may not set 'HOME'"),
        ({"env_allow": ("TMPDIR",)}, "may not set 'TMPDIR'"),
        ({"extra_env": {"A=B": "1"}}, "not a valid environment name"),
        ({"start_timeout": 0}, "start_timeout must be > 0"),
        ({"job_timeout": -1.0}, "job_timeout must be > 0"),
        ({"memory_bytes": 0}, "memory_bytes must be > 0 or None"),
        ({"shutdown_timeout": -1}, "shutdown_timeout must be >= 0"),
    ],
)
def test_bad_policies_are_refused_with_the_field_named(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SandboxPolicy(**fields)
