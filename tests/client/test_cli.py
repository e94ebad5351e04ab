"""The `idlegrid` command: bad input is refused locally with the field and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from client.cli import main
from client.credentials import Credentials


def _idlegrid(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "64"], "--size: '64' is not WIDTHxHEIGHT"),
        (["--size", "65x64"], "width: 65 is not a multiple of 8"),
        (["--steps", "0"], "steps: input should be greater than or equal to 1"),
        (["--sampler", "Euler z"], "unknown sampler 'Euler z'"),
        (["-n", "-1"], "n: input should be greater than or equal to 1"),
    ],
)
def test_generate_refuses_bad_input_before_any_network(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # port 9 (discard) on loopback: nothing listens, and nothing must be sent anyway
    code = main(["generate", "a cat", "--coordinator", "http://127.0.0.1:9", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unreachable_coordinator_is_a_clear_failure(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "a cat", "--coordinator", "http://127.0.0.1:9", "--size", "64x64"])
    assert code == 1
    assert "cannot reach the coordinator at http://127.0.0.1:9" in capsys.readouterr().err


def test_worker_refuses_pickle_weights(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really a pickle")
    done = _idlegrid(
        "worker", "image", "--coordinator", "http://127.0.0.1:9", "--model", str(checkpoint)
    )
    assert done.returncode == 2
    assert "--model" in done.stderr and "safetensors" in done.stderr


def test_credentials_file_is_private(tmp_path: Path) -> None:
    creds = Credentials(tmp_path / "c" / "credentials.json")
    creds.save("http://x/", "key-1")
    assert creds.api_key("http://x") == "key-1"
    assert (creds.path.stat().st_mode & 0o777) == 0o600
