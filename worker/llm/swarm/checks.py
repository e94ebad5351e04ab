"""Spot checks of block servers' hidden states: recompute some of a session on other servers.

What is checked, and why it is sound: a server's answer to one step depends on its
attention cache, i.e. on everything the session sent it before. So a check never replays a
lone step; it replays a *prefix*: the inputs server A was given for positions 0..j, in one
stateless `rpc_forward` to a server B of the same blocks. With a causal mask, B's outputs
for positions 0..j depend on exactly those inputs, so an honest B reproduces what an honest
A answered for all j + 1 positions (the prefill's and the decode steps' alike), up to
floating-point noise. The cut j is drawn as floor(L * u^2) (u uniform, L the positions A
served): any position can be checked, short prefixes are likelier, so one check costs
about a third of A's work on average.

Comparison (`agree`): per position, the relative L2 distance |a - b| / max(|a|, |b|) of
the two hidden-state vectors, and its worst over the positions, must stay within
`tolerance` (default 0.1). Honest servers on other machines, kernels or dtypes stay below
that: all 30 blocks of SmolLM2 in bfloat16 against float32 differ by 1.9 % on average and
4.1 % at worst (33 tokens); garbage lands far above it. A liar that perturbs every state
by less than 10 % is not caught by this check. Quantized servers announce their
quantization, and a comparison of two different quantizations allows each side its
quantization's noise on top (`worker.llm.swarm.quant.pair_tolerance`: int8 adds 0.05 a
side, bnb-int8 0.15, nf4 0.5); servers of the checked one's quantization are asked first.

Verdicts (protocol.text.ServerCheck): B agrees -> "agree". B disagrees -> a third server C
of the same blocks (if any) recomputes the prefix too: the one C disagrees with, while C
agrees with the other, is "wrong" (when that is B, the check names B, checked by A and C);
no C, or C agreeing with both or neither -> "undecided". Checkers are drawn at random
among the online, unbanned servers that cover the blocks, so a server cannot know whether
it is being checked or who checks it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from protocol.text import ServerCheck
from worker.errors import ServerFailed
from worker.llm.swarm.placement import Hop
from worker.llm.swarm.quant import pair_tolerance
from worker.llm.swarm.records import ServerRecord, ServerState
from worker.llm.swarm.session import HopStates
from worker.llm.swarm.wire import MAX_UNARY_BYTES

__all__ = [
    "DEFAULT_TOLERANCE",
    "CheckResult",
    "Swarm",
    "Verdict",
    "agree",
    "check_hop",
    "pick_prefix",
    "verdict",
]

log = logging.getLogger(__name__)

Verdict = Literal["agree", "wrong", "undecided"]

# worst relative L2 distance per position between two servers' hidden states still "equal"
DEFAULT_TOLERANCE = 0.1


class Swarm(Protocol):
    """What a check needs of `worker.llm.swarm.routing.SwarmClient`."""

    async def records(self) -> list[ServerRecord]: ...

    def is_banned(self, peer_id: str) -> bool: ...

    def ban(self, peer_id: str, seconds: float | None = None) -> None: ...

    async def forward_hop(self, hop: Hop, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class CheckResult:
    """One spot check: the report for the coordinator and the compute it cost."""

    check: ServerCheck
    # block-tokens the checkers computed: positions x blocks x servers asked
    block_tokens: int


def agree(a: torch.Tensor, b: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Whether hidden states `a` and `b` [..., n, H] match within `tolerance`: at every
    position, |a - b| <= tolerance * max(|a|, |b|) (L2 norms over H). Shapes must match."""
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    distance = (a - b).norm(dim=-1)
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)
    return bool((distance <= tolerance * scale).all())


def verdict(
    served: torch.Tensor,
    second: torch.Tensor,
    third: torch.Tensor | None,
    tolerance: float = DEFAULT_TOLERANCE,
    quants: tuple[str, str, str] = ("none", "none", "none"),
) -> tuple[Verdict, str]:
    """Who is wrong, from server A's answer (`served`), B's (`second`) and C's (`third`, if
    asked), whose quantizations are `quants`: ("agree", ""), ("wrong", "A" | "B") or
    ("undecided", "")."""
    a, b, c = quants
    if agree(served, second, pair_tolerance(tolerance, a, b)):
        return "agree", ""
    if third is None:
        return "undecided", ""
    with_a = agree(third, served, pair_tolerance(tolerance, c, a))
    with_b = agree(third, second, pair_tolerance(tolerance, c, b))
    if with_b and not with_a:
        return "wrong", "A"
    if with_a and not with_b:
        return "wrong", "B"
    return "undecided", ""


def pick_prefix(served: int, hidden_size: int, rng: random.Random) -> int:
    """How many of the first `served` positions to recompute: floor(served * u^2) + 1, at
    most what fits in one stateless request."""
    fits = max(1, MAX_UNARY_BYTES // (hidden_size * 4))
    return min(int(served * rng.random() ** 2) + 1, served, fits)


async def check_hop(
    client: Swarm,
    states: HopStates,
    rng: random.Random,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CheckResult | None:
    """Spot-check what `states.hop`'s server answered; None if no other server of its
    blocks answers (nothing could be checked)."""
    hop = states.hop
    length = pick_prefix(states.inputs.shape[1], states.inputs.shape[2], rng)
    inputs, served = states.inputs[:, :length], states.outputs[:, :length]
    quants = await _quants(client, hop)
    candidates = sorted(quants.keys() - {hop.peer_id})
    rng.shuffle(candidates)
    # servers of the checked one's quantization first (still in random order): they compute
    # alike, so no quantization allowance hides a lie between them
    candidates.sort(key=lambda peer: quants[peer] != quants[hop.peer_id])
    blocks = hop.end - hop.start
    answers: list[tuple[str, torch.Tensor]] = []
    for peer in candidates:
        try:
            answers.append((peer, await client.forward_hop(Hop(peer, hop.start, hop.end), inputs)))
        except ServerFailed as exc:
            log.info("checker %s of blocks %d:%d failed: %s", peer, hop.start, hop.end, exc)
            client.ban(peer)
            continue
        if len(answers) == 1 and agree(
            served, answers[0][1], pair_tolerance(tolerance, quants[hop.peer_id], quants[peer])
        ):
            break
        if len(answers) == 2:
            break
    if not answers:
        return None
    cost = len(answers) * length * blocks
    second, second_states = answers[0]
    third, third_states = answers[1] if len(answers) > 1 else ("", None)
    outcome, who = verdict(
        served,
        second_states,
        third_states,
        tolerance,
        (quants[hop.peer_id], quants[second], quants.get(third, "none")),
    )
    if who == "B":
        check = ServerCheck(
            peer_id=second,
            start=hop.start,
            end=hop.end,
            checkers=[hop.peer_id, third],
            verdict="wrong",
        )
    else:
        checkers = [second, third] if third else [second]
        check = ServerCheck(
            peer_id=hop.peer_id, start=hop.start, end=hop.end, checkers=checkers, verdict=outcome
        )
    return CheckResult(check, cost)


async def _quants(client: Swarm, hop: Hop) -> dict[str, str]:
    """The quantization of hop's server ("none" if its record is gone) and of every online,
    unbanned other server that covers all of its blocks (the checkers to choose from)."""
    records = await client.records()
    quants = {r.peer_id: r.quant for r in records if r.peer_id == hop.peer_id}
    quants.setdefault(hop.peer_id, "none")
    for r in records:
        if (
            r.state == ServerState.ONLINE
            and r.start <= hop.start
            and r.end >= hop.end
            and r.peer_id != hop.peer_id
            and not client.is_banned(r.peer_id)
        ):
            quants[r.peer_id] = r.quant
    return quants
