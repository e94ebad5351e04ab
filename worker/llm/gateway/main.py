"""`idlegrid worker gateway ...`: flags and start-up of the text gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import ConfigDict, Field, field_validator

from protocol.settings import Flag, SettingsError, add_flags, validated
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
from worker.common.controls_cli import DonorFlags
from worker.common.sandboxing import Unsandboxed, confinement_allowed

if TYPE_CHECKING:
    from protocol.signing import Identity
    from worker.llm.gateway.config import GatewayConfig

__all__ = ["GatewaySettings", "add_gateway_command"]

log = logging.getLogger(__name__)


class GatewaySettings(DonorFlags):
    """Every setting of `idlegrid worker gateway` (protocol.settings)."""

    # (model_* names are the flags', not pydantic's)
    model_config = ConfigDict(protected_namespaces=())

    coordinator: CoordinatorUrl
    model: Annotated[Path, Flag("local model folder (config, tokenizer, weights)", required=True)]
    model_name: Annotated[str | None, Flag("model name in the swarm (default: folder name)")] = None
    initial_peers: Annotated[
        list[str],
        Flag(
            "multiaddrs of swarm peers, e.g. the ones block servers print",
            metavar="MADDR",
            nargs="+",
            required=True,
        ),
    ]
    host_maddr: Annotated[
        list[str],
        Flag(
            "where this gateway's DHT node listens (default %(default)s)",
            metavar="MADDR",
            nargs="+",
        ),
    ] = ["/ip4/127.0.0.1/tcp/0"]
    name: WorkerName = None
    identity: IdentityFile = None
    api_key: ApiKey = None
    threads: Annotated[int | None, Field(ge=1), Flag("torch CPU threads (default: torch's)")] = None
    max_context: Annotated[
        int | None, Field(ge=1), Flag("context length offered (default: the model's)")
    ] = None
    check_rate: Annotated[
        float,
        Flag(
            "share of jobs whose block servers are spot-checked on other servers, 0..1 "
            "(default %(default)s: an always-wrong server is caught within 20 jobs with "
            "99.9%% probability at ~9%% extra compute; 0 = off)"
        ),
    ] = 0.3
    check_tolerance: Annotated[
        float,
        Flag(
            "worst relative distance between two servers' hidden states that still counts "
            "as equal (default %(default)s; bfloat16 against float32 differs by up to ~0.04)"
        ),
    ] = 0.1
    check_ban_seconds: Annotated[
        float,
        Flag(
            "seconds a server found returning wrong hidden states is left out of routes "
            "(default %(default)s)"
        ),
    ] = 3600.0
    max_sessions: Annotated[
        int,
        Field(ge=1, le=256),
        Flag(
            "chats served at once, each its own job and swarm session; the block servers "
            "batch their steps (default %(default)s)"
        ),
    ] = 8
    draft_tokens: Annotated[
        int,
        Field(ge=0, le=32),
        Flag(
            "most tokens drafted per step by prompt lookup for speculative decoding, "
            "verified by the swarm in one step (default %(default)s; 0 = off)"
        ),
    ] = 8
    session_keep: Annotated[
        float,
        Field(ge=0, le=3600),
        Flag(
            "seconds a finished chat's swarm session (the servers' attention caches) is kept "
            "for the same requester's next turn, which then prefills only its new tokens; "
            "keep it below the servers' --session-idle-timeout (default %(default)s; 0 = off)"
        ),
    ] = 30.0
    log_level: LogLevel = LOG_LEVEL

    # the fix in each message (NaN fails every comparison, so it is refused too)
    @field_validator("check_rate")
    @classmethod
    def _check_rate(cls, rate: float) -> float:
        if not 0 <= rate <= 1:
            raise ValueError(f"{str(rate)!r}: use a number from 0 (off) to 1 (every job)")
        return rate

    @field_validator("check_tolerance")
    @classmethod
    def _check_tolerance(cls, tolerance: float) -> float:
        if not 0 < tolerance < 1:
            raise ValueError(f"{str(tolerance)!r}: use a number between 0 and 1, e.g. 0.1")
        return tolerance

    @field_validator("check_ban_seconds")
    @classmethod
    def _check_ban_seconds(cls, seconds: float) -> float:
        if not seconds >= 0:
            raise ValueError(f"{str(seconds)!r}: use 0 or more seconds")
        return seconds

    unsandboxed: Unsandboxed = False


def add_gateway_command(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gateway = kinds.add_parser(
        "gateway",
        help="serve chat and completion jobs by driving generation through the swarm",
        description="Pop text jobs from a coordinator and generate them through block "
        "servers found in the swarm; holds only the model's embeddings and LM head.",
    )
    add_flags(gateway, GatewaySettings, words={"kind": "gateway"})
    add_config_flag(gateway, kinds)
    gateway.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = validated(GatewaySettings, args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    from worker.llm.gateway.config import GatewayConfig

    model = settings.model.resolve()
    if not (model / "config.json").is_file():
        print(f"error: --model: {model} has no config.json; give a model folder", file=sys.stderr)
        return 2
    if not confinement_allowed(settings.unsandboxed):
        return 2
    claimed = claim_identity_from_flags(settings.name, settings.identity, "gateway")
    if claimed is None:
        return 2
    config = GatewayConfig(
        coordinator=settings.coordinator,
        model=model,
        model_name=settings.model_name or model.name,
        name=claimed.name,
        identity_file=claimed.file,
        initial_peers=tuple(settings.initial_peers),
        host_maddrs=tuple(settings.host_maddr),
        api_key=settings.api_key,
        threads=settings.threads,
        max_context=settings.max_context,
        check_rate=settings.check_rate,
        check_tolerance=settings.check_tolerance,
        check_ban_seconds=settings.check_ban_seconds,
        max_sessions=settings.max_sessions,
        draft_tokens=settings.draft_tokens,
        session_keep=settings.session_keep,
        unsandboxed=settings.unsandboxed,
        donor=settings.donor_settings(),
    )
    with claimed:
        return asyncio.run(_serve(config, claimed.identity))


async def _serve(config: GatewayConfig, identity: Identity) -> int:
    from worker.common.link import CoordinatorLink
    from worker.common.service import run_until_signalled
    from worker.errors import CoordinatorRejected, ModelError, SwarmError
    from worker.llm.gateway.gateway import TextGateway

    link = CoordinatorLink(config.coordinator, identity, config.name, config.api_key)
    try:
        try:
            gateway = await TextGateway.create(config, link)
        except (ModelError, SwarmError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            if await run_until_signalled(gateway.run(), gateway.drain):
                log.info("stopping after %d text jobs", gateway.jobs_done)
        except CoordinatorRejected as exc:
            # e.g. the model is not in the coordinator's catalog, or has other sizes there
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await gateway.aclose()
    finally:
        await link.aclose()
    return 0
