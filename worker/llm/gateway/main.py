"""`idlegrid worker gateway ...`: flags and start-up of the text gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from worker.common.cli import (
    add_identity_flags,
    add_log_level_flag,
    api_key,
    claim_identity_from_flags,
    configure_logging,
)
from worker.common.config_file import add_config_flag
from worker.common.controls_cli import add_donor_flags, donor_settings
from worker.common.sandboxing import add_sandbox_flag, confinement_allowed

if TYPE_CHECKING:
    from protocol.signing import Identity
    from worker.llm.gateway.config import GatewayConfig

__all__ = ["add_gateway_command"]

log = logging.getLogger(__name__)


def add_gateway_command(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gateway = kinds.add_parser(
        "gateway",
        help="serve chat and completion jobs by driving generation through the swarm",
        description="Pop text jobs from a coordinator and generate them through block "
        "servers found in the swarm; holds only the model's embeddings and LM head.",
    )
    gateway.add_argument("--coordinator", required=True, help="coordinator URL")
    gateway.add_argument(
        "--model", required=True, type=Path, help="local model folder (config, tokenizer, weights)"
    )
    gateway.add_argument("--model-name", help="model name in the swarm (default: folder name)")
    gateway.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        metavar="MADDR",
        help="multiaddrs of swarm peers, e.g. the ones block servers print",
    )
    gateway.add_argument(
        "--host-maddr",
        nargs="+",
        default=["/ip4/127.0.0.1/tcp/0"],
        metavar="MADDR",
        help="where this gateway's DHT node listens (default %(default)s)",
    )
    add_identity_flags(gateway, "gateway")
    gateway.add_argument(
        "--api-key", help="owner's API key; earnings go to that account (env IDLEGRID_API_KEY)"
    )
    gateway.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    gateway.add_argument(
        "--max-context", type=int, help="context length offered (default: the model's)"
    )
    gateway.add_argument(
        "--check-rate",
        type=float,
        default=0.3,
        help="share of jobs whose block servers are spot-checked on other servers, 0..1 "
        "(default %(default)s: an always-wrong server is caught within 20 jobs with 99.9%% "
        "probability at ~9%% extra compute; 0 = off)",
    )
    gateway.add_argument(
        "--check-tolerance",
        type=float,
        default=0.1,
        help="worst relative distance between two servers' hidden states that still counts "
        "as equal (default %(default)s; bfloat16 against float32 differs by up to ~0.04)",
    )
    gateway.add_argument(
        "--check-ban-seconds",
        type=float,
        default=3600.0,
        help="seconds a server found returning wrong hidden states is left out of routes "
        "(default %(default)s)",
    )
    add_log_level_flag(gateway)
    add_sandbox_flag(gateway)
    add_donor_flags(gateway)
    add_config_flag(gateway, kinds)
    gateway.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    configure_logging(args)
    from worker.llm.gateway.config import GatewayConfig

    model = args.model.resolve()
    if not (model / "config.json").is_file():
        print(f"error: --model: {model} has no config.json; give a model folder", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("error: --threads: use 1 or more", file=sys.stderr)
        return 2
    if not 0 <= args.check_rate <= 1:
        print("error: --check-rate: use a number from 0 (off) to 1 (every job)", file=sys.stderr)
        return 2
    if not 0 < args.check_tolerance < 1:
        print("error: --check-tolerance: use a number between 0 and 1, e.g. 0.1", file=sys.stderr)
        return 2
    if not args.check_ban_seconds >= 0:
        print("error: --check-ban-seconds: use 0 or more seconds", file=sys.stderr)
        return 2
    if not confinement_allowed(args.unsandboxed):
        return 2
    claimed = claim_identity_from_flags(args, "gateway")
    if claimed is None:
        return 2
    config = GatewayConfig(
        coordinator=args.coordinator,
        model=model,
        model_name=args.model_name or model.name,
        name=claimed.name,
        identity_file=claimed.file,
        initial_peers=tuple(args.initial_peers),
        host_maddrs=tuple(args.host_maddr),
        api_key=api_key(args),
        threads=args.threads,
        max_context=args.max_context,
        check_rate=args.check_rate,
        check_tolerance=args.check_tolerance,
        check_ban_seconds=args.check_ban_seconds,
        unsandboxed=args.unsandboxed,
        donor=donor_settings(args),
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
