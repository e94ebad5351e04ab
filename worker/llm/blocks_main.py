"""`idlegrid worker blocks ...`: serve transformer blocks of an LLM to the swarm.

Only this module reads the block server's flags and environment; heavy imports (torch,
transformers, hivemind) happen inside the command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.signals import StopSignals
from worker.common.cli import (
    add_identity_flags,
    add_log_level_flag,
    api_key,
    claim_identity_from_flags,
    configure_logging,
)
from worker.common.config_file import add_config_flag
from worker.common.sandboxing import (
    add_sandbox_flag,
    confinement_allowed,
    report_confinement,
)

if TYPE_CHECKING:
    from protocol.signing import Identity
    from worker.llm.swarm.server import BlockServerConfig

__all__ = ["add_blocks_command"]

log = logging.getLogger(__name__)

READY_LINE = "idlegrid block server {name} serving blocks {start}:{end} of {model} at {maddr}"


def add_blocks_command(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    blocks = kinds.add_parser(
        "blocks",
        help="serve transformer blocks of an LLM to the swarm",
        description="Serve a span of an LLM's decoder layers to the idlegrid swarm (hivemind "
        "DHT). Prints one line per address once serving: "
        + READY_LINE.format(name="NAME", start="START", end="END", model="MODEL", maddr="MADDR"),
    )
    blocks.add_argument(
        "--model", required=True, type=Path, help="local model folder (safetensors)"
    )
    blocks.add_argument("--coordinator", required=True, help="coordinator URL")
    blocks.add_argument(
        "--model-name", help="the model's name in the swarm (default: the folder's name)"
    )
    blocks.add_argument(
        "--blocks", help="blocks to serve, START:END (default: where the swarm is weakest)"
    )
    blocks.add_argument(
        "--num-blocks",
        type=int,
        help="how many blocks to serve when choosing them (default: all)",
    )
    swarm = blocks.add_mutually_exclusive_group(required=True)
    swarm.add_argument("--new-swarm", action="store_true", help="start a new swarm")
    swarm.add_argument(
        "--initial-peers", nargs="+", metavar="MADDR", help="multiaddrs of peers in the swarm"
    )
    blocks.add_argument(
        "--host-maddr",
        nargs="+",
        metavar="MADDR",
        default=["/ip4/127.0.0.1/tcp/0"],
        help="where to listen (default %(default)s; use /ip4/0.0.0.0/tcp/PORT to be reachable)",
    )
    blocks.add_argument(
        "--announce-maddr", nargs="+", metavar="MADDR", help="addresses to announce instead"
    )
    blocks.add_argument(
        "--nat-port-map",
        action="store_true",
        help="ask the router for a port mapping (UPnP / NAT-PMP)",
    )
    add_identity_flags(blocks, "blocks")
    blocks.add_argument(
        "--api-key", help="owner's API key; earnings go to that account (env IDLEGRID_API_KEY)"
    )
    blocks.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default %(default)s)"
    )
    blocks.add_argument(
        "--announce-interval",
        type=float,
        default=10.0,
        help="seconds between DHT announcements (default %(default)s)",
    )
    blocks.add_argument(
        "--record-ttl",
        type=float,
        help="seconds an announcement lives (default: 3 x --announce-interval)",
    )
    blocks.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on the first SIGTERM/Ctrl-C: announce leaving, refuse new sessions and let open "
        "ones finish for up to this long before stopping; a second signal stops at once "
        "(default %(default)s)",
    )
    blocks.add_argument(
        "--session-idle-timeout",
        type=float,
        default=60.0,
        help="seconds before an idle session is closed (default %(default)s)",
    )
    blocks.add_argument(
        "--cache-tokens",
        type=int,
        default=16384,
        help="attention-cache budget in tokens, shared by all sessions (default %(default)s)",
    )
    blocks.add_argument(
        "--peer-cache-share",
        type=float,
        default=0.5,
        help="the most of the attention cache one peer may hold, a fraction in (0, 1] "
        "(default %(default)s)",
    )
    blocks.add_argument(
        "--max-streams-per-peer",
        type=int,
        default=8,
        help="inference streams one peer may keep open (default %(default)s)",
    )
    add_sandbox_flag(blocks)
    add_log_level_flag(blocks)
    add_config_flag(blocks, kinds)
    blocks.set_defaults(run=_run_blocks)


@dataclass(frozen=True)
class _Command:
    coordinator: str
    name: str
    identity: Identity
    api_key: str | None
    # seconds open sessions may take to finish after the first signal
    drain_seconds: float = 30.0


class _BadFlag(Exception):
    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"error: {flag}: {message}")


def _parse_blocks(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if match is None:
        raise _BadFlag("--blocks", f"{text!r} is not START:END (e.g. 0:16)")
    start, end = int(match.group(1)), int(match.group(2))
    if start >= end:
        raise _BadFlag("--blocks", f"START must be less than END, got {start}:{end}")
    return start, end


def _run_blocks(args: argparse.Namespace) -> int:
    configure_logging(args)
    from worker.errors import ModelError
    from worker.llm.swarm.blocks import ModelInfo
    from worker.llm.swarm.server import BlockServerConfig

    try:
        try:
            model = ModelInfo.read(args.model, args.model_name)
        except ModelError as exc:
            raise _BadFlag("--model", str(exc)) from None
        blocks = _parse_blocks(args.blocks) if args.blocks is not None else None
        if blocks is not None and blocks[1] > model.num_blocks:
            raise _BadFlag(
                "--blocks",
                f"{model.name} has {model.num_blocks} blocks; use END <= {model.num_blocks}",
            )
        if args.num_blocks is not None and not 1 <= args.num_blocks <= model.num_blocks:
            raise _BadFlag("--num-blocks", f"use 1..{model.num_blocks}, got {args.num_blocks}")
        if blocks is not None and args.num_blocks is not None:
            raise _BadFlag("--num-blocks", "give either --blocks or --num-blocks, not both")
        for flag, value in (
            ("--threads", args.threads),
            ("--cache-tokens", args.cache_tokens),
            ("--max-streams-per-peer", args.max_streams_per_peer),
        ):
            if value < 1:
                raise _BadFlag(flag, f"must be at least 1, got {value}")
        for flag, seconds in (
            ("--announce-interval", args.announce_interval),
            ("--session-idle-timeout", args.session_idle_timeout),
            ("--record-ttl", args.record_ttl),
        ):
            if seconds is not None and not seconds > 0:
                raise _BadFlag(flag, f"must be a positive number of seconds, got {seconds}")
        if args.drain_seconds < 0:
            raise _BadFlag(
                "--drain-seconds", f"must be 0 or more seconds, got {args.drain_seconds}"
            )
        if not 0 < args.peer_cache_share <= 1:
            raise _BadFlag(
                "--peer-cache-share", f"must be within (0, 1], got {args.peer_cache_share}"
            )
        if args.record_ttl is not None and args.record_ttl <= args.announce_interval:
            raise _BadFlag("--record-ttl", "must be longer than --announce-interval")
    except _BadFlag as exc:
        print(exc, file=sys.stderr)
        return 2
    if not confinement_allowed(args.unsandboxed):
        return 2
    config = BlockServerConfig(
        model_dir=args.model,
        model_name=model.name,
        blocks=blocks,
        span_length=args.num_blocks,
        initial_peers=tuple(args.initial_peers or ()),
        host_maddrs=tuple(args.host_maddr),
        announce_maddrs=tuple(args.announce_maddr or ()),
        nat_port_map=args.nat_port_map,
        threads=args.threads,
        announce_interval=args.announce_interval,
        record_ttl=args.record_ttl or 3 * args.announce_interval,
        session_idle_timeout=args.session_idle_timeout,
        cache_tokens=args.cache_tokens,
        peer_cache_share=args.peer_cache_share,
        max_streams_per_peer=args.max_streams_per_peer,
        unsandboxed=args.unsandboxed,
    )
    claimed = claim_identity_from_flags(args, "blocks")
    if claimed is None:
        return 2
    command = _Command(
        coordinator=args.coordinator,
        name=claimed.name,
        identity=claimed.identity,
        api_key=api_key(args),
        drain_seconds=args.drain_seconds,
    )
    with claimed:
        return asyncio.run(_serve_blocks(config, command))


async def _serve_blocks(config: BlockServerConfig, command: _Command) -> int:
    from worker.common.link import CoordinatorLink
    from worker.errors import CoordinatorRejected, CoordinatorUnavailable, ModelError
    from worker.llm.swarm.peer_proof import PeerKey
    from worker.llm.swarm.server import BlockServer

    task = asyncio.current_task()
    assert task is not None
    server: BlockServer | None = None

    def on_signal(count: int) -> None:
        # the first signal while serving drains; one while starting, or a second, stops now
        if server is None or count > 1:
            task.cancel()

    link = CoordinatorLink(command.coordinator, command.identity, command.name, command.api_key)
    with StopSignals(on_signal) as signals:
        try:
            await link.register()
            await report_confinement(link, "swarm-blocks", config.unsandboxed)
            # our own libp2p key, so that we can prove the peer id is ours when we link it
            peer_key = PeerKey.generate()
            # (the server hands it to p2pd, and vouches with it for its DHT records' key)
            server = await BlockServer.create(replace(config, peer_key=peer_key))
            assert server.peer_id == peer_key.peer_id, "p2pd did not take our libp2p key"
            await link.link_peer(peer_key)
            for maddr in await server.visible_maddrs():
                print(
                    READY_LINE.format(
                        name=command.name,
                        start=server.start,
                        end=server.end,
                        model=server.model.name,
                        maddr=maddr,
                    ),
                    flush=True,
                )
            await signals.stop.wait()
            log.info("leaving (signal again to stop at once)")
            await server.drain(command.drain_seconds)
            log.info("stopping")
        except asyncio.CancelledError:
            log.info("stopping")
        except (CoordinatorUnavailable, CoordinatorRejected) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except ModelError as exc:
            print(f"error: --model: {exc}", file=sys.stderr)
            return 2
        finally:
            # a second signal must not interrupt the shutdown (it would orphan the DHT)
            signals.ignore_more()
            try:
                if server is not None:
                    await server.aclose()
            finally:
                await link.aclose()
    return 0
