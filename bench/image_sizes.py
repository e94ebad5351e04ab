"""Seconds per sampling step and per whole image, by image size, for one or more SD models.

Plain diffusers in this process (no network): each run makes one 2-step Euler image (CFG 7,
so each step runs the UNet on a batch of two) per model and size, timing the second step
(the first also holds the text encoder and the set-up) and the whole image; a 1-step image
is the whole minus one step. Models and sizes are interleaved, so drift hits all alike; the table
holds medians.

    .venv/bin/python bench/image_sizes.py [--models DIR ...] [--sizes 64,512,1024] [--runs 3]

`--models` defaults to the tiny SD model (`$IDLEGRID_TEST_MODELS/sd`, built if needed). To
compare two builds of it, pass both folders.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, nargs="+", help="SD pipeline folders")
    parser.add_argument("--sizes", default="64,512,1024", help="square sides, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()

    import diffusers
    import torch

    from worker.models.tiny_models import build_tiny_models

    folders: list[Path] = args.models or []
    if not folders:
        models = Path(os.environ.get("IDLEGRID_TEST_MODELS") or tempfile.mkdtemp() + "/models")
        if not (models / "sd" / "model_index.json").exists():
            build_tiny_models(models)
        folders = [models / "sd"]
    sizes = [int(side) for side in args.sizes.split(",")]
    torch.set_num_threads(args.threads)

    pipes = {}
    for folder in folders:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            folder, use_safetensors=True, local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipes[folder] = pipe

    def image(folder: Path, side: int) -> tuple[float, float]:
        """(seconds of the second step, seconds of the whole 2-step image)"""
        ends: list[float] = []

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            ends.append(time.perf_counter())
            return kwargs

        start = time.perf_counter()
        pipes[folder](
            prompt="a lighthouse",
            width=side,
            height=side,
            num_inference_steps=2,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(1),
            output_type="np",
            callback_on_step_end=on_step_end,
        )
        return ends[1] - ends[0], time.perf_counter() - start

    for folder in folders:  # warm-up: first calls load lazily and pick kernels
        image(folder, 64)
    steps: dict[tuple[Path, int], list[float]] = {}
    images: dict[tuple[Path, int], list[float]] = {}
    for _ in range(args.runs):
        for side in sizes:
            for folder in folders:
                step, whole = image(folder, side)
                steps.setdefault((folder, side), []).append(step)
                images.setdefault((folder, side), []).append(whole)

    print(f"\nEuler, CFG 7, {args.threads} torch threads, medians of {args.runs} runs")
    print(
        f"| {'model':<28} | {'size':>9} | {'latent':>7} | {'step s':>7} | "
        f"{'1-step image s':>14} | {'2-step image s':>14} |"
    )
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 16}|{'-' * 16}|")
    for folder in folders:
        factor = pipes[folder].vae_scale_factor
        for side in sizes:
            step = statistics.median(steps[(folder, side)])
            whole = statistics.median(images[(folder, side)])
            size, latent = f"{side}x{side}", f"{side // factor}x{side // factor}"
            print(
                f"| {str(folder)[-28:]:<28} | {size:>9} | {latent:>7} | {step:>7.2f} | "
                f"{whole - step:>14.2f} | {whole:>14.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
