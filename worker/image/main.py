"""`idlegrid worker image ...`: flags and start-up of the image worker.

Only this module reads the image worker's flags and environment. Heavy imports happen
inside the command, so `idlegrid --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
from worker.common.controls_cli import add_donor_flags, donor_settings, status_outputs
from worker.common.sandboxing import add_sandbox_flag, confinement_allowed

if TYPE_CHECKING:
    from protocol.signing import Identity
    from worker.image.config import ImageWorkerConfig

__all__ = ["add_image_command"]

log = logging.getLogger(__name__)


def add_image_command(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = kinds.add_parser(
        "image",
        help="serve image generation (Stable Diffusion)",
        description="Serve Stable Diffusion image jobs from a coordinator.",
    )
    image.add_argument("--coordinator", required=True, help="coordinator URL")
    image.add_argument(
        "--model", required=True, help="diffusers folder, .safetensors file or Hugging Face id"
    )
    image.add_argument(
        "--model-config",
        type=Path,
        help="local diffusers config folder for a single .safetensors file",
    )
    image.add_argument(
        "--model-name", help="name announced to the coordinator (default: from --model)"
    )
    add_identity_flags(image, "image")
    image.add_argument(
        "--api-key", help="owner's API key; earnings go to that account (env IDLEGRID_API_KEY)"
    )
    image.add_argument(
        "--max-pixels",
        type=int,
        default=1024 * 1024,
        help="largest width x height accepted (default %(default)s)",
    )
    image.add_argument(
        "--max-steps", type=int, default=150, help="most steps accepted (default %(default)s)"
    )
    image.add_argument(
        "--threads", type=int, help="torch CPU threads in the engine (default: torch's choice)"
    )
    image.add_argument(
        "--job-timeout",
        type=float,
        default=900.0,
        help="seconds before a stuck job is killed (default %(default)s)",
    )
    image.add_argument(
        "--max-ram",
        type=float,
        metavar="GIB",
        help="memory the engine may use, in GiB (default: no cap)",
    )
    image.add_argument(
        "--max-vram",
        type=float,
        metavar="GIB",
        help="GPU memory the engine may use, in GiB (default: all of it)",
    )
    add_sandbox_flag(image)
    add_donor_flags(image)
    add_log_level_flag(image)
    add_config_flag(image, kinds)
    image.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    configure_logging(args)
    from worker.errors import ModelError
    from worker.image.config import ImageWorkerConfig
    from worker.image.model_source import download_hub_model, resolve_model

    for flag, value in (("--max-ram", args.max_ram), ("--max-vram", args.max_vram)):
        if value is not None and value <= 0:
            print(f"error: {flag} must be a positive number of GiB, got {value}", file=sys.stderr)
            return 2
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    try:
        source = resolve_model(args.model, args.model_config)
    except ModelError as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return 2
    if not confinement_allowed(args.unsandboxed):
        return 2
    try:
        # outside the sandbox: the engine has no network and gets the folder read-only
        source = download_hub_model(source, hf_home / "idlegrid")
    except ModelError as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return 2
    claimed = claim_identity_from_flags(args, "image")
    if claimed is None:
        return 2
    config = ImageWorkerConfig(
        coordinator=args.coordinator,
        model=source.location,
        model_config=source.config_dir,
        model_name=args.model_name or source.name,
        name=claimed.name,
        identity_file=claimed.file,
        api_key=api_key(args),
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        threads=args.threads,
        job_timeout=args.job_timeout,
        donor=donor_settings(args),
        unsandboxed=args.unsandboxed,
        max_ram_bytes=None if args.max_ram is None else int(args.max_ram * 2**30),
        max_vram_bytes=None if args.max_vram is None else int(args.max_vram * 2**30),
    )
    with claimed:
        return asyncio.run(_serve(config, claimed.identity))


async def _serve(config: ImageWorkerConfig, identity: Identity) -> int:
    from sandbox.errors import EngineStartFailed
    from worker.common.link import CoordinatorLink
    from worker.common.service import run_until_signalled
    from worker.image.worker import ImageWorker

    link = CoordinatorLink(config.coordinator, identity, config.name, config.api_key)
    try:
        log.info("loading model %s in the sandboxed engine", config.model_name)
        try:
            worker = await ImageWorker.create(config, link)
        except EngineStartFailed as exc:
            print(f"error: the engine could not load the model: {exc}", file=sys.stderr)
            return 1
        try:
            with status_outputs(worker.status, config.identity_file):
                if await run_until_signalled(worker.run(), worker.drain):
                    log.info("stopping after %d jobs", worker.jobs_done)
        finally:
            await worker.aclose()
    finally:
        await link.aclose()
    return 0
