"""Spot checks of hidden states: the comparison, the verdicts and the prefix drawn.

`check_hop` runs against `_FakeSwarm`, which answers stateless passes with a causal
function of the hidden states (the running mean over positions, doubled) and lets some
servers lie or fail; the real swarm is in tests/adversarial/test_wrong_hidden_states.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from worker.errors import ServerFailed
from worker.llm.swarm.checks import agree, check_hop, pick_prefix, verdict
from worker.llm.swarm.placement import Hop
from worker.llm.swarm.records import ServerRecord, ServerState
from worker.llm.swarm.session import HopStates
from worker.llm.swarm.wire import MAX_UNARY_BYTES

H = 64


def _states(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, n, H, generator=torch.Generator().manual_seed(seed)) * 3


def test_equal_and_nearly_equal_states_agree() -> None:
    a = _states()
    assert agree(a, a.clone())
    assert agree(a, a * (1 + 1e-3))
    # an honest server in bfloat16 against one in float32
    assert agree(a, a.to(torch.bfloat16).float())


def test_garbage_disagrees_even_at_one_position() -> None:
    a = _states()
    assert not agree(a, a + torch.randn_like(a) * a.std())
    one_off = a.clone()
    one_off[0, 7] *= 1.2
    assert not agree(a, one_off)
    assert agree(a, one_off, tolerance=0.25)


@pytest.mark.parametrize(
    "other",
    [_states(11), _states()[..., :32], torch.full((1, 12, H), float("nan"))],
    ids=["fewer positions", "other width", "nan"],
)
def test_wrong_shapes_and_non_finite_states_disagree(other: torch.Tensor) -> None:
    assert not agree(_states(), other)


def test_non_finite_states_never_agree_even_with_themselves() -> None:
    infinite = _states()
    infinite[0, 3, 5] = float("inf")
    assert not agree(infinite, infinite.clone())


def test_verdicts() -> None:
    good = _states()
    bad = good + torch.randn_like(good) * good.std()
    worse = good - torch.randn_like(good) * good.std()
    assert verdict(good, good.clone(), None) == ("agree", "")
    assert verdict(good, bad, None) == ("undecided", "")
    assert verdict(bad, good, good.clone()) == ("wrong", "A")
    assert verdict(good, bad, good.clone()) == ("wrong", "B")
    assert verdict(good, bad, worse) == ("undecided", "")


def test_prefix_is_any_length_short_ones_likelier() -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    lengths = [pick_prefix(300, H, rng) for _ in range(3000)]
    assert min(lengths) >= 1 and max(lengths) <= 300
    assert max(lengths) > 250  # the end of a session gets checked too
    # floor(L u^2) + 1 averages about L / 3
    assert 85 < sum(lengths) / len(lengths) < 115
    assert pick_prefix(1, H, rng) == 1
    # never more than one stateless request holds
    huge = 10 * MAX_UNARY_BYTES // (H * 4)
    assert all(pick_prefix(huge, H, rng) <= MAX_UNARY_BYTES // (H * 4) for _ in range(50))


def _honest(hidden: torch.Tensor) -> torch.Tensor:
    """A causal stand-in for blocks: position i depends on positions 0..i only."""
    counts = torch.arange(1, hidden.shape[1] + 1).view(1, -1, 1)
    return 2 * hidden.cumsum(dim=1) / counts


class _FakeSwarm:
    """What check_hop needs from a SwarmClient: records, bans and stateless passes."""

    def __init__(self, peers: dict[str, str]) -> None:
        # peer -> "honest" | "liar" | "down"
        self.peers = peers
        self.banned: set[str] = set()
        self.asked: list[tuple[str, int]] = []

    async def records(self) -> list[ServerRecord]:
        return [
            ServerRecord(peer, 0, 4, 4, H, 100.0, 1024, ServerState.ONLINE) for peer in self.peers
        ]

    def is_banned(self, peer_id: str) -> bool:
        return peer_id in self.banned

    def ban(self, peer_id: str, seconds: float | None = None) -> None:
        self.banned.add(peer_id)

    async def forward_hop(self, hop: Hop, hidden: torch.Tensor) -> torch.Tensor:
        self.asked.append((hop.peer_id, hidden.shape[1]))
        kind = self.peers[hop.peer_id]
        if kind == "down":
            raise ServerFailed(hop.peer_id, "does not answer")
        output = _honest(hidden)
        return output + 5 * output.std() if kind == "liar" else output


def _served(peer: str, liar: bool, n: int = 40) -> HopStates:
    inputs = _states(n, seed=3)
    outputs = _honest(inputs)
    if liar:
        outputs = outputs + torch.randn_like(outputs) * outputs.std()
    return HopStates(Hop(peer, 0, 4), inputs, outputs)


async def test_an_honest_server_is_checked_by_one_other() -> None:
    swarm = _FakeSwarm({"a": "honest", "b": "honest", "c": "honest"})
    result = await check_hop(swarm, _served("a", liar=False), random.Random(1))
    assert result is not None
    assert (result.check.peer_id, result.check.verdict) == ("a", "agree")
    assert len(result.check.checkers) == 1 and result.check.checkers[0] in "bc"
    # one checker recomputed a prefix of the 4 blocks
    ((_, length),) = swarm.asked
    assert result.block_tokens == length * 4


async def test_a_liar_is_found_wrong_by_two_others() -> None:
    swarm = _FakeSwarm({"a": "liar", "b": "honest", "c": "honest"})
    result = await check_hop(swarm, _served("a", liar=True), random.Random(1))
    assert result is not None
    check = result.check
    assert (check.peer_id, check.verdict, sorted(check.checkers)) == ("a", "wrong", ["b", "c"])
    assert result.block_tokens == 2 * swarm.asked[0][1] * 4


async def test_a_lying_checker_is_the_one_found_wrong() -> None:
    swarm = _FakeSwarm({"a": "honest", "b": "liar", "c": "honest"})
    for seed in range(20):  # until b is drawn first
        swarm.asked.clear()
        result = await check_hop(swarm, _served("a", liar=False), random.Random(seed))
        assert result is not None
        if swarm.asked[0][0] == "b":
            break
    else:
        pytest.fail("b was never the first checker")
    assert result.check.model_dump() == {
        "peer_id": "b",
        "start": 0,
        "end": 4,
        "checkers": ["a", "c"],
        "verdict": "wrong",
    }


async def test_without_a_third_server_the_verdict_is_undecided() -> None:
    swarm = _FakeSwarm({"a": "liar", "b": "honest"})
    result = await check_hop(swarm, _served("a", liar=True), random.Random(1))
    assert result is not None
    assert (result.check.verdict, result.check.checkers) == ("undecided", ["b"])


async def test_a_failing_checker_is_banned_and_another_asked() -> None:
    swarm = _FakeSwarm({"a": "liar", "b": "down", "c": "honest", "d": "honest"})
    result = await check_hop(swarm, _served("a", liar=True), random.Random(2))
    assert result is not None
    assert (result.check.verdict, sorted(result.check.checkers)) == ("wrong", ["c", "d"])
    assert swarm.banned == ({"b"} if "b" in {p for p, _ in swarm.asked} else set())


async def test_nothing_to_check_against() -> None:
    swarm = _FakeSwarm({"a": "honest", "b": "down"})
    assert await check_hop(swarm, _served("a", liar=False), random.Random(1)) is None
    assert swarm.banned == {"b"}
