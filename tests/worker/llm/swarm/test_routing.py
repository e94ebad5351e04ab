"""Route planning: a pure function of the servers, their round trips and throughputs."""

from __future__ import annotations

from worker.llm.swarm.placement import Hop, fastest_chain, uncovered
from worker.llm.swarm.records import ServerRecord, ServerState


def _server(peer: str, start: int, end: int, throughput: float = 100.0) -> ServerRecord:
    return ServerRecord(peer, start, end, 8, 64, throughput, 1024, ServerState.ONLINE)


def test_one_hop_beats_two_when_otherwise_equal() -> None:
    servers = [
        (_server("a", 0, 4, 100.0), 0.001),
        (_server("b", 4, 8, 100.0), 0.001),
        (_server("c", 0, 8, 50.0), 0.001),  # same compute time per block as a and b
    ]
    assert fastest_chain(servers, 0, 8, hop_penalty=0.002) == [Hop("c", 0, 8)]


def test_a_far_server_is_avoided() -> None:
    servers = [
        (_server("near-a", 0, 4), 0.001),
        (_server("near-b", 4, 8), 0.001),
        (_server("far", 0, 8, 200.0), 0.5),
    ]
    assert fastest_chain(servers, 0, 8, hop_penalty=0.002) == [
        Hop("near-a", 0, 4),
        Hop("near-b", 4, 8),
    ]


def test_a_server_can_be_entered_mid_span() -> None:
    servers = [(_server("a", 0, 3), 0.001), (_server("b", 2, 8), 0.001)]
    assert fastest_chain(servers, 0, 8, hop_penalty=0.002) == [Hop("a", 0, 3), Hop("b", 3, 8)]
    # a replacement for blocks 2:4 only: b is entered at 2 and left at 4
    assert fastest_chain(servers[1:], 2, 4, hop_penalty=0.002) == [Hop("b", 2, 4)]


def test_uncovered_ranges() -> None:
    servers = [_server("a", 0, 2), _server("b", 3, 4), _server("c", 6, 7)]
    assert uncovered(servers, 0, 8) == [(2, 3), (4, 6), (7, 8)]
    assert uncovered(servers, 0, 2) == []
    assert uncovered([], 2, 4) == [(2, 4)]
