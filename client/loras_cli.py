"""`idlegrid generate --lora NAME[:MODEL[:CLIP]] --ti NAME[:STRENGTH]`: CivitAI LoRAs and
textual inversions (protocol.loras), by name or model id, for the image job."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_adapter_flags", "adapter_fields", "split_strengths"]


def split_strengths(text: str, most: int) -> tuple[str, list[float]]:
    """'NAME:0.8:0.5' -> ('NAME', [0.8, 0.5]): up to `most` trailing numbers; a name may
    itself contain ':' (anything after it that is not a number stays in the name)."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < most:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        numbers.insert(0, value)
        parts.pop()
    return ":".join(parts), numbers


def _lora(text: str) -> dict[str, Any]:
    name, numbers = split_strengths(text, 2)
    spec: dict[str, Any] = {"name": name}
    if numbers:
        spec["model"] = numbers[0]
    if len(numbers) > 1:
        spec["clip"] = numbers[1]
    return spec


def _ti(text: str) -> dict[str, Any]:
    name, numbers = split_strengths(text, 1)
    return {"name": name, **({"strength": numbers[0]} if numbers else {})}


def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        type=_lora,
        metavar="NAME[:MODEL[:CLIP]]",
        help="a CivitAI LoRA by name or model id, with its UNet and text-encoder strengths "
        "(default 1); repeat for more (at most 5)",
    )
    parser.add_argument(
        "--ti",
        action="append",
        default=[],
        type=_ti,
        metavar="NAME[:STRENGTH]",
        help="a CivitAI textual inversion by name or model id; write its name in the prompt "
        "(repeat for more, at most 20)",
    )


def adapter_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The job's `loras` and `tis` from the flags (nothing when none were given)."""
    fields: dict[str, Any] = {}
    if args.lora:
        fields["loras"] = args.lora
    if args.ti:
        fields["tis"] = args.ti
    return fields
