"""A block server that returns garbage hidden states, for tests and bench/text_checks.py.

It is a real `BlockServer` (DHT, P2P, sessions, announcements) whose compute adds noise as
large as the hidden states themselves to every answer, and which announces the highest
throughput readers believe, so that clients route through it (as a liar would, to be
paid for more work). `start_lying_server` links its peer id to a coordinator account, as
`idlegrid worker blocks` does, so gateways' usage reports may name it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from protocol.signing import Identity
from worker.common.link import CoordinatorLink
from worker.llm.swarm.peer_proof import PeerKey
from worker.llm.swarm.records import MAX_THROUGHPUT, ServerRecord, ServerState
from worker.llm.swarm.server import BlockServer, BlockServerConfig, Hidden

__all__ = ["LyingBlockServer", "start_lying_server"]


class LyingBlockServer(BlockServer):
    """Answers every step (sessions and stateless passes) with its output plus noise."""

    # noise scale relative to each hidden-state vector's size
    noise = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # tokens it answered (sessions and stateless passes)
        self.tokens = 0
        # seeded (steps run one at a time, in order), so that a test's garbage is the
        # same in every run: some garbage decodes to text a coordinator refuses (NUL)
        self.generator = torch.Generator().manual_seed(1)

    async def _compute(
        self, hidden: Hidden, session: Any, past: int, start: int, end: int
    ) -> runtime_pb2.Tensor:
        answer = await super()._compute(hidden, session, past, start, end)
        self.tokens += hidden.tokens
        output = torch.frombuffer(bytearray(answer.buffer), dtype=torch.float32)
        output = output.reshape(list(answer.size))
        scale = output.norm(dim=-1, keepdim=True) / output.shape[-1] ** 0.5
        noise = torch.randn(output.shape, generator=self.generator) * scale * self.noise
        lie = (output + noise).contiguous()
        answer.buffer = lie.numpy().tobytes()
        return answer

    def _record(self, state: ServerState) -> ServerRecord:
        return replace(super()._record(state), throughput=MAX_THROUGHPUT)


async def start_lying_server(
    coordinator: str, api_key: str, model_dir: Path, blocks: tuple[int, int], peer: str | None
) -> tuple[LyingBlockServer, CoordinatorLink]:
    """A lying server of `blocks`, joined to the swarm through `peer` (None: a new swarm)
    and linked to the coordinator account of `api_key`. Close both when done."""
    link = CoordinatorLink(coordinator, Identity.generate(), "liar", api_key)
    await link.register()
    peer_key = PeerKey.generate()
    config = BlockServerConfig(
        model_dir=model_dir,
        model_name=model_dir.name,
        blocks=blocks,
        initial_peers=(peer,) if peer else (),
        announce_interval=1.0,
        peer_key=peer_key,
    )
    try:
        server = await LyingBlockServer.create(config)
        assert isinstance(server, LyingBlockServer)
        try:
            await link.link_peer(peer_key)
        except BaseException:
            await server.aclose()
            raise
    except BaseException:
        await link.aclose()
        raise
    return server, link
