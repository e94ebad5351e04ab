"""`idlegrid generate`'s flags for the image extras of AI Horde (protocol.postprocess): the
hires fix, an upscaler and a face fixer. Kept apart from client.cli so that each extra's
flags and their mapping onto ImageParams fields sit together."""

from __future__ import annotations

import argparse
from typing import Any

from protocol.postprocess import (
    DEFAULT_FACEFIXER_STRENGTH,
    DEFAULT_HIRES_STRENGTH,
    FACE_FIXERS,
    UPSCALERS,
)

__all__ = ["add_extras_flags", "extras_fields"]


def add_extras_flags(generate: argparse.ArgumentParser) -> None:
    generate.add_argument(
        "--hires-fix",
        action="store_true",
        help="sample first at the model's native size, then again at --size (A1111's hires fix)",
    )
    generate.add_argument(
        "--hires-strength",
        type=float,
        help=f"with --hires-fix: how much the second pass repaints, 0.01..1 "
        f"(default {DEFAULT_HIRES_STRENGTH})",
    )
    generate.add_argument(
        "--upscale",
        metavar="NAME",
        help=f"upscale the result: one of {', '.join(UPSCALERS)} (workers that hold it)",
    )
    generate.add_argument(
        "--face-fix",
        metavar="NAME",
        help=f"restore faces: {', '.join(FACE_FIXERS)} (runs before --upscale)",
    )
    generate.add_argument(
        "--face-fix-strength",
        type=float,
        help=f"with --face-fix: how much of the restored image is kept, 0..1 "
        f"(default {DEFAULT_FACEFIXER_STRENGTH})",
    )


def extras_fields(args: argparse.Namespace, usage_error: type[Exception]) -> dict[str, Any]:
    """The ImageParams fields the flags ask for; `usage_error` for a flag missing the one it
    goes with. The names themselves are checked by ImageParams (the error names the field)."""
    fields: dict[str, Any] = {}
    if args.hires_strength is not None and not args.hires_fix:
        raise usage_error("--hires-strength goes with --hires-fix: add it")
    if args.face_fix_strength is not None and args.face_fix is None:
        raise usage_error("--face-fix-strength goes with --face-fix NAME: add it")
    if args.face_fix in UPSCALERS:
        raise usage_error(f"--face-fix: {args.face_fix} is an upscaler: use --upscale")
    if args.upscale in FACE_FIXERS:
        raise usage_error(f"--upscale: {args.upscale} is a face fixer: use --face-fix")
    if args.hires_fix:
        fields["hires_fix"] = True
        if args.hires_strength is not None:
            fields["hires_fix_denoising_strength"] = args.hires_strength
    post = [name for name in (args.face_fix, args.upscale) if name is not None]
    if post:
        fields["post_processing"] = post
    if args.face_fix_strength is not None:
        fields["facefixer_strength"] = args.face_fix_strength
    return fields
