"""A spot check of a refined job, end to end: real image workers on the tiny SDXL model
with the tiny refiner, the checker the coordinator picks (same refiner setup) makes the
same pixels, and the honest worker passes its check (README "Spot checks and refiners")."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from client.sdk import Client
from protocol.params import ImageParams
from tests.e2e.test_image_network import Network, image_worker_args

pytestmark = pytest.mark.slow


def _refiner_args(network: Network, name: str, api_key: str) -> list[str]:
    args = image_worker_args(network.url, network.models, network.tmp, name)
    args[args.index("--model") + 1] = str(network.models / "sdxl")
    return [*args, "--refiner", str(network.models / "sdxl-refiner"), f"--api-key={api_key}"]


def test_a_refined_job_is_checked_by_a_refiner_worker_and_agrees(
    tmp_path: Path, tiny_models: Path
) -> None:
    flags = ["--trust-account", "operator", "--spot-check-rate", "1", "--allow-same-ip-checks"]
    network = Network(tmp_path, tiny_models, lease_timeout=5, coordinator_args=flags)
    try:
        operator, painter_key, alice = (
            network.register(n) for n in ("operator", "painter", "alice")
        )
        referee = network.start("referee", _refiner_args(network, "referee", operator))
        painter = network.start("painter", _refiner_args(network, "painter", painter_key))
        referee.wait_for(r"worker id [0-9a-f]{32}", 180)
        painter_id = painter.wait_for(r"worker id ([0-9a-f]{32})", 180).group(1)
        # (both reported their engine, refiner included)
        assert network.sandboxed(referee) and network.sandboxed(painter)
        # the trusted referee was seen (a check can be queued) but is away while the
        # untrusted painter serves the job (its cut-off long poll leases nothing:
        # coordinator.http.polling; the short lease is a backstop)
        referee.stop()
        with Client(network.url, alice) as grid:
            params = ImageParams(prompt="a red cat", width=64, height=64, steps=4, seed=3)
            made = grid.generate(params, tmp_path / "out")
            with Image.open(made.paths[0]) as image:
                assert 'Refiner: "sdxl-refiner"' in image.info["parameters"]
            network.start("referee", _refiner_args(network, "referee", operator))
            deadline = time.monotonic() + 60
            while (record := grid.worker(painter_id)).checks_passed == 0:
                assert record.checks_failed == 0 and time.monotonic() < deadline
                time.sleep(0.2)
            assert (record.checks_passed, record.checks_failed, record.suspicion) == (1, 0, 0)
    finally:
        network.close()
