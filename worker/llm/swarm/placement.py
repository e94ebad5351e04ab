"""Where blocks are served and how a route crosses them: the swarm's placement rules.

A new block server picks the span where the swarm is weakest (`choose_blocks` over the
`coverage` of the announced servers); a client plans the fastest chain of servers through
the blocks (`fastest_chain`) and names the blocks nobody serves (`uncovered`). Servers and
clients both import this module, never each other. The design follows Petals'
`server/block_selection.py`; the code is our own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from worker.llm.swarm.records import ServerRecord, ServerState

__all__ = ["Hop", "choose_blocks", "coverage", "fastest_chain", "uncovered"]


@dataclass(frozen=True)
class Hop:
    """One server of a route and the blocks [start, end) it computes for us."""

    peer_id: str
    start: int
    end: int


def coverage(records: Iterable[ServerRecord], num_blocks: int) -> list[float]:
    """Total throughput of the joining and online servers of each block.

    A joining server has not measured its throughput yet; it counts as much as the fastest
    known server, so that servers starting at the same time spread out.
    """
    live = [record for record in records if record.state != ServerState.OFFLINE]
    nominal = max((record.throughput for record in live), default=0.0) or 1.0
    total = [0.0] * num_blocks
    for record in live:
        for block in range(record.start, min(record.end, num_blocks)):
            total[block] += record.throughput or nominal
    return total


def choose_blocks(num_blocks: int, span_length: int, coverage: list[float]) -> tuple[int, int]:
    """The contiguous range of `span_length` blocks where the swarm is weakest.

    `coverage[b]` is the total throughput serving block b. Windows are compared by their
    coverage sorted ascending (the weakest block first, then the next weakest...), so a new
    server fills the hole that limits the swarm most; ties go to the lowest start.
    """
    if not 1 <= span_length <= num_blocks:
        raise ValueError(f"span_length must be within 1..{num_blocks}, got {span_length}")
    if len(coverage) != num_blocks:
        raise ValueError(f"coverage has {len(coverage)} entries for {num_blocks} blocks")
    best = min(
        range(num_blocks - span_length + 1),
        key=lambda start: (sorted(coverage[start : start + span_length]), start),
    )
    return best, best + span_length


def uncovered(records: list[ServerRecord], start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of blocks in [start, end) that none of `records` serves."""
    covered = [False] * (end - start)
    for record in records:
        for block in range(max(record.start, start), min(record.end, end)):
            covered[block - start] = True
    ranges: list[tuple[int, int]] = []
    for offset, ok in enumerate(covered):
        block = start + offset
        if ok:
            continue
        if ranges and ranges[-1][1] == block:
            ranges[-1] = (ranges[-1][0], block + 1)
        else:
            ranges.append((block, block + 1))
    return ranges


def fastest_chain(
    servers: list[tuple[ServerRecord, float]], start: int, end: int, hop_penalty: float
) -> list[Hop]:
    """Least estimated seconds per token from block `start` to `end` (a DAG shortest path).

    A server can be entered at any block of its span and is left at its end (or `end`).
    """
    best: dict[int, tuple[float, int, Hop | None]] = {start: (0.0, 0, None)}
    for position in range(start, end):
        if position not in best:
            continue
        cost, hops, _ = best[position]
        for record, rtt in servers:
            if not record.start <= position < record.end:
                continue
            target = min(record.end, end)
            per_block = 1.0 / (max(record.throughput, 1e-3) * (record.end - record.start))
            total = cost + rtt + hop_penalty + (target - position) * per_block
            known = best.get(target)
            if known is None or (total, hops + 1) < known[:2]:
                best[target] = (total, hops + 1, Hop(record.peer_id, position, target))
    chain: list[Hop] = []
    position = end
    while position != start:
        hop = best[position][2]
        assert hop is not None
        chain.append(hop)
        position = hop.start
    return chain[::-1]
