"""What a gateway offers against the coordinator's catalog of text models.

The coordinator's built-in entries (`protocol.text.BUILTIN_TEXT_MODELS`) must be exactly
what a gateway offers for the models `idlegrid models tiny` and `idlegrid models smollm2`
build; a gateway whose model the coordinator prices with other sizes stops, saying which.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from coordinator.config import CoordinatorConfig
from coordinator.economy.text_models import check_offer
from protocol.text import BUILTIN_TEXT_MODELS
from tests.procs import Proc
from worker.llm.gateway.config import GatewayConfig
from worker.llm.gateway.core import offered_model
from worker.llm.gateway.lm_head import LMHead
from worker.llm.swarm.dht import start_dht, stop_dht


def _smollm2() -> Path:
    folder = os.environ.get("IDLEGRID_TEST_SMOLLM2")
    if not folder or not (Path(folder) / "config.json").is_file():
        pytest.fail(
            "set IDLEGRID_TEST_SMOLLM2 to the folder `idlegrid models smollm2 DIR` writes "
            "(DIR/smollm2; scripts/test builds it into .cache/real-models/smollm2)"
        )
    return Path(folder)


def _gateway_config(model: Path, tmp_path: Path) -> GatewayConfig:
    # the defaults of `idlegrid worker gateway --model DIR`: the folder's name, its context
    return GatewayConfig(
        coordinator="http://127.0.0.1:9",
        model=model,
        model_name=model.name,
        name="gateway",
        identity_file=tmp_path / "gateway.key",
        initial_peers=(),
    )


@pytest.mark.parametrize("which", ["llm", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_the_built_in_models_are_what_idlegrid_models_builds(
    which: str, tiny_models: Path, tmp_path: Path
) -> None:
    folder = tiny_models / "llm" if which == "llm" else _smollm2()
    config = _gateway_config(folder, tmp_path)
    offered = offered_model(config.model_name, LMHead.load(folder), config.max_context)
    built_in = {m.name: m for m in BUILTIN_TEXT_MODELS}
    assert offered == built_in[which]
    # and a coordinator with the built-in catalog takes the offer
    assert check_offer(CoordinatorConfig(data_dir=tmp_path), [offered]) == [offered]


@pytest.fixture
async def dht() -> AsyncIterator[DHT]:
    """A swarm node for the gateway to join (no block server: it never gets to serve)."""
    node = await start_dht(
        initial_peers=(),
        host_maddrs=("/ip4/127.0.0.1/tcp/0",),
        client_mode=False,
        validator=RSASignatureValidator(RSAPrivateKey()),
    )
    try:
        yield node
    finally:
        await stop_dht(node)


@pytest.mark.slow
async def test_a_gateway_the_coordinator_prices_otherwise_stops_naming_the_sizes(
    dht: DHT, tiny_models: Path, tmp_path: Path
) -> None:
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        'default = "llm"\n\n'
        "[[models]]\n"
        'name = "llm"\n'
        "parameters = 1000\n"
        "blocks = 4\n"
        "context = 512\n"
    )
    coordinator = Proc(
        ["coordinator", "--port", "0", "--data-dir", str(tmp_path / "data")]
        + ["--models", str(catalog)],
        tmp_path / "coordinator.log",
    )
    gateway: Proc | None = None
    try:
        url = coordinator.wait_for(r"listening on (http://\S+)", 60).group(1)
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        gateway = Proc(
            ["worker", "gateway", "--coordinator", url, "--model", str(tiny_models / "llm")]
            + ["--initial-peers", maddrs[0], "--identity", str(tmp_path / "gateway.key")]
            + ["--threads", "1"],
            tmp_path / "gateway.log",
        )
        code = await asyncio.to_thread(gateway.popen.wait, 120)
        output = gateway.output()
        assert code == 1, output
        assert "model 'llm' must have blocks 4, parameters 1000, context 512 here" in output
        assert "not blocks 4, parameters 276032, context 512" in output
    finally:
        if gateway is not None:
            gateway.stop()
        coordinator.stop()
