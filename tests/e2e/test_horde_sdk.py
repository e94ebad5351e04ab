"""AI Horde's own Python client library, horde_sdk, unchanged against a coordinator.

horde_sdk lives in a venv of its own (.cache/horde-sdk-VERSION: it is a client under test,
not a dependency of ours). It and a real coordinator run inside a fresh network namespace
holding only loopback (`unshare -rn`), so whatever the library might reach for on its own
cannot leave the machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

VERSION = "0.18.0"
ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("horde_sdk_client.py")


@pytest.fixture(scope="module")
def sdk_python() -> Path:
    venv = ROOT / ".cache" / f"horde-sdk-{VERSION}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, f"horde_sdk=={VERSION}"], check=True, timeout=600)
        (venv / ".complete").touch()
    return python


def test_horde_sdk_generates_pops_submits_and_cancels(sdk_python: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        ["unshare", "-rn", sys.executable, __file__, str(sdk_python), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0 and "ALL OK" in done.stdout, done.stdout + done.stderr[-4000:]


def _register(url: str, name: str) -> str:
    request = urllib.request.Request(
        f"{url}/api/v1/accounts",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["api_key"])


def _inside(sdk_python: str, tmp: Path) -> int:
    """In the namespace: loopback up, a coordinator, two accounts, then horde_sdk."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    log = (tmp / "coordinator.log").open("w")
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "coordinator", "--port", "0"]
        + ["--data-dir", str(tmp / "data")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(300):
            found = re.search(r"listening on (http://\S+)", (tmp / "coordinator.log").read_text())
            if found:
                break
            coordinator.wait(0.1) if coordinator.poll() is not None else None
            subprocess.run(["sleep", "0.1"], check=True)
        else:
            raise SystemExit("the coordinator did not start")
        url = found.group(1)
        keys = [_register(url, name) for name in ("alice", "bridge-owner")]
        env = {**os.environ, "HOME": str(tmp)}  # (horde_sdk reads a .env from its cwd)
        return subprocess.run(
            [sdk_python, str(CLIENT), url, *keys], env=env, cwd=tmp, timeout=180, check=False
        ).returncode
    finally:
        coordinator.terminate()
        coordinator.wait(30)


if __name__ == "__main__":
    sys.exit(_inside(sys.argv[1], Path(sys.argv[2])))
