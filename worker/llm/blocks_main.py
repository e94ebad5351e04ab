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
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.engine import QUANTS
from protocol.settings import Flag, SettingsError, add_flags, validated
from protocol.signals import StopSignals
from worker.common.cli import (
    LOG_LEVEL,
    ApiKey,
    CoordinatorUrl,
    IdentityFile,
    LogLevel,
    WorkerName,
    claim_identity_from_flags,
    configure_logging,
)
from worker.common.config_file import add_config_flag
from worker.common.sandboxing import Unsandboxed, confinement_allowed, report_confinement

if TYPE_CHECKING:
    from protocol.signing import Identity
    from worker.llm.swarm.server import BlockServerConfig

__all__ = ["BlocksSettings", "add_blocks_command"]

log = logging.getLogger(__name__)

READY_LINE = "idlegrid block server {name} serving blocks {start}:{end} of {model} at {maddr}"


class BlocksSettings(BaseModel):
    """Every setting of `idlegrid worker blocks` (protocol.settings)."""

    # (model_* names are the flags', not pydantic's)
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: Annotated[Path, Flag("local model folder (safetensors)", required=True)]
    coordinator: CoordinatorUrl
    model_name: Annotated[
        str | None, Flag("the model's name in the swarm (default: the folder's name)")
    ] = None
    blocks: Annotated[
        str | None, Flag("blocks to serve, START:END (default: where the swarm is weakest)")
    ] = None
    num_blocks: Annotated[
        int | None, Flag("how many blocks to serve when choosing them (default: all)")
    ] = None
    new_swarm: Annotated[bool, Flag("start a new swarm", exclusive="swarm!")] = False
    initial_peers: Annotated[
        list[str] | None,
        Flag("multiaddrs of peers in the swarm", metavar="MADDR", nargs="+", exclusive="swarm!"),
    ] = None
    host_maddr: Annotated[
        list[str],
        Flag(
            "where to listen (default %(default)s; use /ip4/0.0.0.0/tcp/PORT to be reachable)",
            metavar="MADDR",
            nargs="+",
        ),
    ] = ["/ip4/127.0.0.1/tcp/0"]
    announce_maddr: Annotated[
        list[str] | None,
        Flag("addresses to announce instead", metavar="MADDR", nargs="+"),
    ] = None
    nat_port_map: Annotated[bool, Flag("ask the router for a port mapping (UPnP / NAT-PMP)")] = (
        False
    )
    name: WorkerName = None
    identity: IdentityFile = None
    api_key: ApiKey = None
    threads: Annotated[int, Field(ge=1), Flag("torch CPU threads (default %(default)s)")] = 1
    quant: Annotated[
        str,
        Flag(
            "weight quantization: int8 is weight-only int8 through torchao (about a quarter of "
            "the memory, CPU or CUDA); bnb-int8 (LLM.int8) and nf4 (4-bit NormalFloat) are "
            "bitsandbytes' and need CUDA; spot checks allow each its noise "
            "(default %(default)s)",
            choices=QUANTS,
        ),
    ] = "none"
    announce_interval: Annotated[
        float, Field(gt=0), Flag("seconds between DHT announcements (default %(default)s)")
    ] = 10.0
    record_ttl: Annotated[
        float | None,
        Field(gt=0),
        Flag("seconds an announcement lives (default: 3 x --announce-interval)"),
    ] = None
    drain_seconds: Annotated[
        float,
        Field(ge=0),
        Flag(
            "on the first SIGTERM/Ctrl-C: announce leaving, refuse new sessions and let open "
            "ones finish for up to this long before stopping; a second signal stops at once "
            "(default %(default)s)"
        ),
    ] = 30.0
    session_idle_timeout: Annotated[
        float,
        Field(gt=0),
        Flag("seconds before an idle session is closed (default %(default)s)"),
    ] = 60.0
    cache_tokens: Annotated[
        int,
        Field(ge=1),
        Flag("attention-cache budget in tokens, shared by all sessions (default %(default)s)"),
    ] = 16384
    peer_cache_share: Annotated[
        float,
        Field(gt=0, le=1),
        Flag(
            "the most of the attention cache one peer may hold, a fraction in (0, 1] "
            "(default %(default)s)"
        ),
    ] = 0.5
    max_streams_per_peer: Annotated[
        int,
        Field(ge=1),
        Flag("inference streams one peer may keep open (default %(default)s)"),
    ] = 8
    unsandboxed: Unsandboxed = False
    log_level: LogLevel = LOG_LEVEL

    @model_validator(mode="after")
    def _ttl_after_interval(self) -> BlocksSettings:
        if self.record_ttl is not None and self.record_ttl <= self.announce_interval:
            raise ValueError("--record-ttl must be longer than --announce-interval")
        if self.blocks is not None and self.num_blocks is not None:
            raise ValueError("--num-blocks: give either --blocks or --num-blocks, not both")
        return self


def add_blocks_command(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    blocks = kinds.add_parser(
        "blocks",
        help="serve transformer blocks of an LLM to the swarm",
        description="Serve a span of an LLM's decoder layers to the idlegrid swarm (hivemind "
        "DHT). Prints one line per address once serving: "
        + READY_LINE.format(name="NAME", start="START", end="END", model="MODEL", maddr="MADDR"),
    )
    add_flags(blocks, BlocksSettings, words={"kind": "blocks"})
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
    try:
        settings = validated(BlocksSettings, args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    from worker.errors import ModelError
    from worker.llm.swarm.blocks import ModelInfo
    from worker.llm.swarm.server import BlockServerConfig

    try:
        try:
            model = ModelInfo.read(settings.model, settings.model_name)
        except ModelError as exc:
            raise _BadFlag("--model", str(exc)) from None
        blocks = _parse_blocks(settings.blocks) if settings.blocks is not None else None
        if blocks is not None and blocks[1] > model.num_blocks:
            raise _BadFlag(
                "--blocks",
                f"{model.name} has {model.num_blocks} blocks; use END <= {model.num_blocks}",
            )
        span = settings.num_blocks
        if span is not None and not 1 <= span <= model.num_blocks:
            raise _BadFlag("--num-blocks", f"use 1..{model.num_blocks}, got {span}")
        from worker.llm.swarm.quant import unavailable

        reason = unavailable(settings.quant)
        if reason is not None:
            raise _BadFlag("--quant", reason)
    except _BadFlag as exc:
        print(exc, file=sys.stderr)
        return 2
    if not confinement_allowed(settings.unsandboxed):
        return 2
    config = BlockServerConfig(
        model_dir=settings.model,
        model_name=model.name,
        blocks=blocks,
        span_length=settings.num_blocks,
        initial_peers=tuple(settings.initial_peers or ()),
        host_maddrs=tuple(settings.host_maddr),
        announce_maddrs=tuple(settings.announce_maddr or ()),
        nat_port_map=settings.nat_port_map,
        threads=settings.threads,
        quant=settings.quant,
        announce_interval=settings.announce_interval,
        record_ttl=settings.record_ttl or 3 * settings.announce_interval,
        session_idle_timeout=settings.session_idle_timeout,
        cache_tokens=settings.cache_tokens,
        peer_cache_share=settings.peer_cache_share,
        max_streams_per_peer=settings.max_streams_per_peer,
        unsandboxed=settings.unsandboxed,
    )
    claimed = claim_identity_from_flags(settings.name, settings.identity, "blocks")
    if claimed is None:
        return 2
    command = _Command(
        coordinator=settings.coordinator,
        name=claimed.name,
        identity=claimed.identity,
        api_key=settings.api_key,
        drain_seconds=settings.drain_seconds,
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
