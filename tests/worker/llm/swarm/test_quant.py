"""Quantized block servers (`--quant int8`): a quarter of the memory, announced in the DHT,
an honest one passes spot checks against unquantized servers and a perturbed one is still
caught. bitsandbytes' modes (`--quant bnb-int8 | nf4`): refused without CUDA, announced,
checked with their own allowances; the CUDA path itself runs only where CUDA is."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from tests.worker.llm.swarm.conftest import Cluster, Server
from tests.worker.llm.swarm.test_records import PROOF, SUBKEY, _value
from worker.llm.swarm.blocks import BlockSpan
from worker.llm.swarm.checks import DEFAULT_TOLERANCE, agree, check_hop, verdict
from worker.llm.swarm.placement import Hop
from worker.llm.swarm.quant import (
    CUDA_QUANTS,
    EXTRA_TOLERANCE,
    QUANTS,
    pair_tolerance,
    quantize_layers,
    unavailable,
)
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
    assert set(QUANTS) == {"none", "int8", "bnb-int8", "nf4"}
    for quant in ("int8", "bnb-int8", "nf4"):
        record = parse_record(SUBKEY, _value(quant=quant))
        assert record is not None and record.quant == quant
        assert parse_record(SUBKEY, {**record.to_value(), "owner_proof": PROOF}) == record
    # an unquantized record keeps the fields that readers before quantization expect
    plain = parse_record(SUBKEY, _value())
    assert plain is not None and plain.quant == "none" and "quant" not in plain.to_value()
    for bad in ("fp4", "NF4", "bnb_int8", "INT8", 8, None):
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


# the worst relative L2 distance per position against fp32 that bench/llm_quant.py and
# bench/llm_quant_bnb.py measured on SmolLM2 (15 blocks, real text)
MEASURED = {"int8": 0.045, "bnb-int8": 0.118, "nf4": 0.413}


def test_the_tolerance_table_covers_honest_servers_and_orders_the_modes() -> None:
    assert set(EXTRA_TOLERANCE) == set(QUANTS) and EXTRA_TOLERANCE["none"] == 0
    # coarser formats are allowed more: nf4 (16 levels) > LLM.int8 > weight-only int8
    assert 0 < EXTRA_TOLERANCE["int8"] < EXTRA_TOLERANCE["bnb-int8"] < EXTRA_TOLERANCE["nf4"]
    served = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(4)) * 3
    for quant, worst in MEASURED.items():
        # an honest server as far from fp32 as measured agrees with an unquantized one...
        assert EXTRA_TOLERANCE[quant] > worst
        honest = _perturbed(served, worst, seed=5)
        assert verdict(honest, served, None, quants=(quant, "none", "none")) == ("agree", "")
        # ...and two of the same quantization compute alike: no allowance between them
        assert pair_tolerance(DEFAULT_TOLERANCE, quant, quant) == DEFAULT_TOLERANCE
    # garbage (states unrelated to the input) is caught against every mode: unrelated
    # vectors lie about sqrt(2) apart, beyond the widest pair tolerance
    widest = max(pair_tolerance(DEFAULT_TOLERANCE, a, "none") for a in QUANTS)
    assert widest < 1.0
    garbage = torch.randn(served.shape, generator=torch.Generator().manual_seed(6)) * 3
    for quant in QUANTS:
        honest = _perturbed(served, 0.01, seed=7)
        outcome = verdict(garbage, served, honest, quants=(quant, "none", "none"))
        assert outcome == ("wrong", "A"), quant


@pytest.mark.parametrize("quant", CUDA_QUANTS)
def test_a_liar_claiming_a_coarse_mode_is_caught_by_servers_of_that_mode(quant: str) -> None:
    served = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(8)) * 3
    liar = _perturbed(served, 0.3, seed=9)
    same = _perturbed(served, 0.01, seed=10)  # two honest servers of the liar's mode
    other = _perturbed(served, 0.01, seed=11)
    assert verdict(liar, same, other, quants=(quant, quant, quant)) == ("wrong", "A")
    # against unquantized checkers, 30 % hides in nf4's allowance: that is why check_hop
    # asks servers of the checked server's own quantization first
    if quant == "nf4":
        assert verdict(liar, same, other, quants=(quant, "none", "none")) == ("agree", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_bitsandbytes_modes_are_refused_naming_what_works() -> None:
    for quant in CUDA_QUANTS:
        reason = unavailable(quant)
        assert reason is not None and "CUDA" in reason and "--quant none, int8" in reason
        with pytest.raises(RuntimeError, match=f"--quant {quant}: .*CUDA"):
            quantize_layers([torch.nn.Linear(4, 4)], quant)
    assert unavailable("int8") is None and unavailable("none") is None


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_a_block_server_without_cuda_refuses_nf4_at_start(tiny_models: Path) -> None:
    # it refuses before it loads a block or calls the coordinator (nobody listens there)
    proc = subprocess.run(
        [sys.executable, "-m", "client.cli", "worker", "blocks", "--new-swarm", "--model"]
        + [str(tiny_models / "llm"), "--coordinator", "http://127.0.0.1:9", "--quant", "nf4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr
    assert proc.returncode == 2, err
    pattern = "error: --quant: nf4 runs on CUDA only (bitsandbytes), and this machine has no "
    pattern += "CUDA device; use --quant none, int8 here"
    assert re.search(re.escape(pattern), err), err


@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")),
    reason="needs CUDA and bitsandbytes",
)
@pytest.mark.parametrize("quant", CUDA_QUANTS)
def test_a_bitsandbytes_span_runs_on_the_gpu_and_agrees(tiny_models: Path, quant: str) -> None:
    import bitsandbytes as bnb

    plain = BlockSpan.load(tiny_models / "llm", 0, 4)
    span = BlockSpan.load(tiny_models / "llm", 0, 4, quant=quant)
    kind = bnb.nn.Linear4bit if quant == "nf4" else bnb.nn.Linear8bitLt
    assert isinstance(span.layers[0].get_submodule("self_attn.q_proj"), kind)
    assert span.device.type == "cuda" and span.dtype == torch.float16
    hidden = torch.randn(1, 9, plain.hidden_size, generator=torch.Generator().manual_seed(5))
    a, b = plain.forward(hidden, None), span.forward(hidden, None)
    assert b.device.type == "cpu"
    assert agree(a, b.float(), pair_tolerance(DEFAULT_TOLERANCE, quant, "none"))


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
