"""End to end: a donor's whole machine, every worker with its DEFAULT name and identity.

A coordinator, an image worker, a block server (new swarm, all blocks), a text gateway
joining it and a second image worker all run on one host, with HOME and XDG_DATA_HOME
under the test's tmp dir. They must get distinct identities (`HOST-image`, `HOST-blocks`,
`HOST-gateway`, `HOST-image-2`) and, serving side by side for 30 seconds, none may
re-register: a shared identity made each registration replace the other's token, so they
re-registered in turn forever.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from client.sdk import Client
from tests.procs import Proc
from worker.common.identity import default_name, load_or_create_identity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# seconds the workers serve side by side (idle workers re-registered within ~15 s, so twice
# that catches it)
SERVE_SECONDS = 30.0
START_TIMEOUT = 300.0
IMAGE_READY = r"idlegrid image worker (\S+) ready: .*worker id ([0-9a-f]{32})"
GATEWAY_READY = r"idlegrid text gateway (\S+) ready: .*worker id ([0-9a-f]{32})"
BLOCKS_READY = r"idlegrid block server (\S+) serving blocks \d+:\d+ of \S+ at (/\S+/p2p/\S+)"
REREGISTERED = "registering again"


def _workers_table(db: Path) -> dict[str, tuple[str, str, str]]:
    """The coordinator's workers: name -> (id, public key, token hash). A registration
    always stores a new token hash, so an unchanged hash means no registration since."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT name, id, public_key, token_hash FROM workers").fetchall()
    finally:
        conn.close()
    table = {name: (worker_id, key, token) for name, worker_id, key, token in rows}
    assert len(table) == len(rows), f"two workers share a name: {rows}"
    return table


def test_default_named_workers_share_a_machine_without_reregistering(
    tmp_path: Path, tiny_models: Path
) -> None:
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    identities = home / "data" / "idlegrid"
    host = socket.gethostname()
    expected = {
        "image": default_name(host, "image"),
        "blocks": default_name(host, "blocks"),
        "gateway": default_name(host, "gateway"),
        "image-2": default_name(host, "image", 2),
    }
    procs: dict[str, Proc] = {}

    def start(label: str, args: list[str]) -> Proc:
        procs[label] = Proc(args, tmp_path / f"{label}.log", env)
        return procs[label]

    try:
        coordinator = start(
            "coordinator", ["coordinator", "--port", "0", "--data-dir", str(tmp_path / "data")]
        )
        url = coordinator.wait_for(r"listening on (http://\S+)", 60).group(1)
        image = ["worker", "image", "--coordinator", url, "--model", str(tiny_models / "sd")]
        llm = str(tiny_models / "llm")
        start("image", [*image, "--threads", "1"])
        start("blocks", ["worker", "blocks", "--coordinator", url, "--model", llm, "--new-swarm"])
        # the second image worker starts once the first holds its identity
        procs["image"].wait_for(rf"worker name {re.escape(expected['image'])}, identity", 120)
        start("image-2", [*image, "--threads", "1"])
        blocks_name, peer = procs["blocks"].wait_for(BLOCKS_READY, START_TIMEOUT).groups()
        start(
            "gateway",
            ["worker", "gateway", "--coordinator", url, "--model", llm, "--initial-peers", peer]
            + ["--threads", "1"],
        )
        worker_ids: dict[str, str] = {}  # name -> worker id, from the ready lines
        names = {"blocks": blocks_name}
        for label, line in (
            ("image", IMAGE_READY),
            ("image-2", IMAGE_READY),
            ("gateway", GATEWAY_READY),
        ):
            names[label], worker_id = procs[label].wait_for(line, START_TIMEOUT).groups()
            worker_ids[names[label]] = worker_id
        assert names == expected

        db = tmp_path / "data" / "idlegrid.db"
        before = _workers_table(db)
        deadline = time.monotonic() + SERVE_SECONDS
        while time.monotonic() < deadline:  # fail as soon as anything goes wrong
            for label, proc in procs.items():
                assert proc.popen.poll() is None, f"{label} exited:\n{proc.output()}"
                assert REREGISTERED not in proc.output(), f"{label} re-registered"
            time.sleep(0.5)
        after = _workers_table(db)

        # one row per worker, each registered exactly once (its token never replaced)
        assert sorted(after) == sorted(expected.values())
        assert after == before
        for label in ("image", "image-2"):
            assert procs[label].output().count("registered as worker") == 1
        # distinct identities: one key file per default name, each the key it registered
        for label, name in expected.items():
            key = load_or_create_identity(identities / f"worker-{name}.key").public_key
            assert after[name][1] == key, label
        assert len({key for _, key, _ in after.values()}) == 4
        # and the coordinator's API shows each under its own name
        with Client(url) as grid:
            for name, worker_id in worker_ids.items():
                assert after[name][0] == worker_id
                assert grid.worker(worker_id).name == name
    finally:
        for proc in reversed(procs.values()):
            proc.stop()
