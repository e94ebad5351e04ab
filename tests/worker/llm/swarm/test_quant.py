"""Quantized block servers (`--quant int8`): a quarter of the memory, announced in the DHT,
an honest one passes spot checks against unquantized servers and a perturbed one is still
caught."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from tests.worker.llm.swarm.conftest import Cluster, Server
from tests.worker.llm.swarm.test_records import PROOF, SUBKEY, _value
from worker.llm.swarm.blocks import BlockSpan
from worker.llm.swarm.checks import DEFAULT_TOLERANCE, agree, check_hop, verdict
from worker.llm.swarm.placement import Hop
from worker.llm.swarm.quant import pair_tolerance
from worker.llm.swarm.records import ServerRecord, ServerState, parse_record
from worker.llm.swarm.routing import SwarmClient, SwarmClientConfig
from worker.llm.swarm.session import HopStates


def _weight_bytes(span: BlockSpan) -> int:
    total = 0
    for layer in span.layers:
        for tensor in layer.state_dict().values():
            parts = [tensor.qdata, tensor.scale] if hasattr(tensor, "qdata") else [tensor]
            total += sum(p.numel() * p.element_size() for p in parts)
    return total


def _perturbed(states: torch.Tensor, relative: float, seed: int = 0) -> torch.Tensor:
    """`states` plus noise of `relative` times each position's L2 norm."""
    noise = torch.randn(states.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise / noise.norm(dim=-1, keepdim=True) * states.norm(dim=-1, keepdim=True)
    perturbed: torch.Tensor = states + relative * noise
    return perturbed


def test_an_int8_span_holds_a_quarter_of_the_memory_and_agrees(tiny_models: Path) -> None:
    plain = BlockSpan.load(tiny_models / "llm", 0, 4)
    int8 = BlockSpan.load(tiny_models / "llm", 0, 4, quant="int8")
    assert int8.dtype == torch.float32
    ratio = _weight_bytes(int8) / _weight_bytes(plain)
    assert ratio <= 0.3, ratio
    hidden = torch.randn(1, 9, plain.hidden_size, generator=torch.Generator().manual_seed(5))
    a, b = plain.forward(hidden, None), int8.forward(hidden, None)
    assert not torch.equal(a, b)  # it is quantized
    assert agree(a, b, pair_tolerance(DEFAULT_TOLERANCE, "int8", "none"))


def test_records_announce_the_quantization() -> None:
    record = parse_record(SUBKEY, _value(quant="int8"))
    assert record is not None and record.quant == "int8"
    assert parse_record(SUBKEY, {**record.to_value(), "owner_proof": PROOF}) == record
    # an unquantized record keeps the fields that readers before quantization expect
    plain = parse_record(SUBKEY, _value())
    assert plain is not None and plain.quant == "none" and "quant" not in plain.to_value()
    for bad in ("nf4", "INT8", 8, None):
        assert parse_record(SUBKEY, _value(quant=bad)) is None


def test_each_side_is_allowed_its_quantizations_noise_and_no_more() -> None:
    served = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(1)) * 3
    # 12 % off: past the plain tolerance (0.1), within int8's allowance (0.15)
    near = _perturbed(served, 0.12)
    assert verdict(served, near, None) == ("undecided", "")
    assert verdict(served, near, None, quants=("int8", "none", "none")) == ("agree", "")
    # a liar claiming int8, 30 % off, is found wrong by two servers that agree
    liar = _perturbed(served, 0.30, seed=2)
    honest = _perturbed(served, 0.01, seed=3)
    assert verdict(liar, served, honest, quants=("int8", "none", "int8")) == ("wrong", "A")


@pytest.fixture(scope="module")
def quantized(cluster: Cluster) -> dict[str, Server]:
    kilo = cluster.server("kilo", "--blocks", "0:4", "--new-swarm", "--quant", "int8").ready()
    lima = cluster.server("lima", "--blocks", "0:4", "--initial-peers", kilo.maddr)
    mike = cluster.server(
        "mike", "--blocks", "0:4", "--initial-peers", kilo.maddr, "--quant", "int8"
    )
    lima.ready(), mike.ready()
    return {s.name: s for s in (kilo, lima, mike)}


@pytest.fixture
async def client(quantized: dict[str, Server]) -> AsyncIterator[SwarmClient]:
    config = SwarmClientConfig(model_name="llm", initial_peers=(quantized["kilo"].maddr,))
    swarm = await SwarmClient.create(config)
    try:
        yield swarm
    finally:
        await swarm.aclose()


async def _online(client: SwarmClient, count: int) -> list[ServerRecord]:
    for _ in range(100):
        records = await client.records(refresh=True)
        online = [r for r in records if r.state == ServerState.ONLINE]
        if len(online) >= count:
            return online
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {count} servers online")


@pytest.mark.slow
async def test_quantized_servers_pass_honest_checks_and_a_perturbed_one_is_caught(
    quantized: dict[str, Server], client: SwarmClient, tiny_models: Path
) -> None:
    records = await _online(client, 3)
    quants = {r.peer_id: r.quant for r in records}
    kilo, lima, mike = (quantized[n].peer_id for n in ("kilo", "lima", "mike"))
    assert (quants[kilo], quants[lima], quants[mike]) == ("int8", "none", "int8")

    inputs = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(7))
    served = await client.forward_hop(Hop(kilo, 0, 4), inputs)
    plain = await client.forward_hop(Hop(lima, 0, 4), inputs)
    local = BlockSpan.load(tiny_models / "llm", 0, 4).forward(inputs, None)
    assert torch.allclose(plain, local, atol=1e-5)
    assert not torch.equal(served, plain)

    rng = random.Random(3)
    honest = await check_hop(client, HopStates(Hop(kilo, 0, 4), inputs, served), rng)
    assert honest is not None and honest.check.verdict == "agree", honest
    lie = _perturbed(served, 0.3)
    caught = await check_hop(client, HopStates(Hop(kilo, 0, 4), inputs, lie), rng)
    assert caught is not None, "no checker answered"
    assert caught.check.verdict == "wrong" and caught.check.peer_id == kilo, caught
