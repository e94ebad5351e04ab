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
    add_log_level_flag(image)
    image.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    configure_logging(args)
    from worker.errors import ModelError
    from worker.image.config import ImageWorkerConfig
    from worker.image.model_source import resolve_model

    try:
        source = resolve_model(args.model, args.model_config)
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
        hf_home=Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"),
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
            if await run_until_signalled(worker.run()):
                log.info("stopping after %d jobs", worker.jobs_done)
        finally:
            await worker.aclose()
    finally:
        await link.aclose()
    return 0
