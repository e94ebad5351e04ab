"""The identity lock and default names: one identity per live worker process.

Holders run in real separate processes (flock is per open file, so the kernel, not our
code, decides who holds what); each signals that it holds its lock by printing a line and
then blocks on stdin until the test closes it or kills it.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.messages import NAME_PATTERN
from worker.common.identity import (
    ClaimedIdentity,
    claim_identity,
    default_name,
    load_or_create_identity,
)
from worker.errors import IdentityFileInvalid, IdentityInUse

ROOT = Path(__file__).resolve().parents[3]
HOST = "box"

# argv: NAME ('' = default) DATA_HOME fork|nofork
HOLDER = """
import os, sys
from pathlib import Path
from worker.common.identity import claim_identity

claimed = claim_identity(
    "image", name=sys.argv[1] or None, file=None, data_home=Path(sys.argv[2]), host="box"
)
child = 0
if sys.argv[3] == "fork":
    ready, forked = os.pipe()
    child = os.fork()  # like hivemind's DHT process: it must not keep the lock
    if child == 0:
        os.write(forked, b"x")  # the fork hooks (which drop the lock's descriptor) have run
        sys.stdin.read()
        os._exit(0)
    os.read(ready, 1)
print(claimed.name, child, flush=True)
sys.stdin.read()
"""


class Holder:
    """A process holding an identity; `name` and (if it forked) `child` pid once started."""

    def __init__(self, data_home: Path, name: str | None = None, fork: bool = False) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-c", HOLDER, name or "", str(data_home), "fork" if fork else "x"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()  # blocks until the lock is held (or it died)
        if not line:
            self.popen.wait()
            assert self.popen.stderr is not None
            raise AssertionError(
                f"holder exited {self.popen.returncode}: {self.popen.stderr.read()}"
            )
        self.name, child = line.split()
        self.child = int(child)

    def close(self) -> None:
        """Stop the holder and anything it forked (its stdin closes, so they exit)."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.communicate(timeout=30)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    try:
        yield started
    finally:
        for holder in started:
            holder.close()


def claim(data_home: Path, name: str | None = None, file: Path | None = None) -> ClaimedIdentity:
    return claim_identity("image", name=name, file=file, data_home=data_home, host=HOST)


@pytest.mark.parametrize(
    ("host", "service", "instance", "expected"),
    [
        ("vm", "image", 1, "vm-image"),
        ("vm", "image", 2, "vm-image-2"),
        ("my host.example", "blocks", 1, "my-host.example-blocks"),
        ("", "gateway", 1, "worker-gateway"),
        ("-_x", "image", 1, "x-image"),
        ("a" * 40, "gateway", 12, "a" * 21 + "-gateway-12"),
        # truncation ending on a separator drops it rather than doubling the dash
        ("a" * 25 + "-b", "image", 1, "a" * 25 + "-image"),
    ],
)
def test_default_name_keeps_the_suffix_and_is_valid(
    host: str, service: str, instance: int, expected: str
) -> None:
    name = default_name(host, service, instance)
    assert name == expected
    assert re.fullmatch(NAME_PATTERN, name)


def test_claim_creates_an_owner_only_key_and_keeps_it(tmp_path: Path) -> None:
    with claim(tmp_path) as first:
        assert first.name == "box-image"
        assert first.file == tmp_path / "worker-box-image.key"
        assert stat.S_IMODE(first.file.stat().st_mode) == 0o600
    with claim(tmp_path) as again:
        assert again.identity.public_key == first.identity.public_key
    assert load_or_create_identity(first.file).public_key == first.identity.public_key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker-box-image.key"]


def test_explicit_name_or_file_in_use_is_a_clear_error(
    tmp_path: Path, holders: list[Holder]
) -> None:
    holders.append(Holder(tmp_path, "painter"))
    key = tmp_path / "worker-painter.key"
    for name, file in (("painter", None), (None, key), ("other-name", key)):
        with pytest.raises(IdentityInUse) as caught:
            claim(tmp_path, name, file)
        assert str(caught.value) == (
            f"another idlegrid worker is using identity {key}; "
            "give this one another --name or --identity"
        )
    # an explicit name is never bumped to -2, but a different one is free
    with claim(tmp_path, "painter-b") as other:
        assert other.name == "painter-b"


def test_default_name_moves_to_the_next_free_instance(
    tmp_path: Path, holders: list[Holder]
) -> None:
    holders.append(Holder(tmp_path))
    assert holders[0].name == "box-image"
    holders.append(Holder(tmp_path))
    assert holders[1].name == "box-image-2"
    with claim(tmp_path) as third:
        assert third.name == "box-image-3"
        # a lock taken by this same process on another open file also counts
        with claim(tmp_path) as fourth:
            assert fourth.name == "box-image-4"
    holders.pop(0).close()
    with claim(tmp_path) as freed:
        assert freed.name == "box-image"
    keys = {load_or_create_identity(p).public_key for p in tmp_path.glob("*.key")}
    assert len(keys) == 4


def test_lock_is_freed_when_the_holder_is_killed_even_if_its_fork_lives(
    tmp_path: Path, holders: list[Holder]
) -> None:
    holder = Holder(tmp_path, "painter", fork=True)
    holders.append(holder)
    with pytest.raises(IdentityInUse):
        claim(tmp_path, "painter")
    holder.popen.send_signal(signal.SIGKILL)  # the holder only, not its process group
    holder.popen.wait(timeout=30)
    os.kill(holder.child, 0)  # the forked child is still alive...
    with claim(tmp_path, "painter") as successor:  # ...and holds no lock
        assert successor.name == "painter"


def test_invalid_key_file_names_the_file_and_frees_the_lock(tmp_path: Path) -> None:
    bad = tmp_path / "worker-box-image.key"
    bad.write_text("not a key\n")
    with pytest.raises(IdentityFileInvalid, match=re.escape(str(bad))):
        claim(tmp_path)
    bad.write_text("00" * 32 + "\n")
    with claim(tmp_path) as fixed:
        assert fixed.file == bad


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "blocks", "gateway"])
def test_cli_exits_2_when_its_identity_is_in_use(
    kind: str, tmp_path: Path, tiny_models: Path, holders: list[Holder]
) -> None:
    holders.append(Holder(tmp_path / "idlegrid", "shared"))
    flags = {
        "image": ["--model", str(tiny_models / "sd")],
        "blocks": ["--model", str(tiny_models / "llm"), "--new-swarm"],
        "gateway": ["--model", str(tiny_models / "llm"), "--initial-peers", "/ip4/127.0.0.1"],
    }[kind]
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "worker", kind, "--coordinator", "http://127.0.0.1:9"]
        + [*flags, "--name", "shared"],
        cwd=ROOT,
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    key = tmp_path / "idlegrid" / "worker-shared.key"
    assert done.returncode == 2, done.stderr
    assert (
        f"error: another idlegrid worker is using identity {key}; "
        "give this one another --name or --identity"
    ) in done.stderr
