"""What live previews cost the engine (README: Live previews).

Two measurements, printed as one table:
  one preview   `Previewer` alone (latents -> RGB by the published factors -> JPEG ->
                base64) on the latents of a 512x512 SD 1.x image (64x64) and of a
                1024x1024 SDXL one (128x128): milliseconds per preview.
  a whole job   the image engine in this process on --model (default: the tiny test model,
                $IDLEGRID_TEST_MODELS/sd) making one 512x512 image in --steps steps, with
                previews off and with one every step (the most a worker can be asked for;
                the default is every 5): seconds per job and the ratio to "off". The tiny
                model's UNet step is far cheaper than a real one's, so its ratio is an
                upper bound of the overhead on a real checkpoint.

    .venv/bin/python bench/preview_cost.py [--model DIR] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from worker.image.engine import ImageEngine
from worker.image.preview import Previewer


def _preview_ms(side: int, baseline: str, rounds: int = 50) -> float:
    previewer = Previewer(baseline, 1)  # type: ignore[arg-type]
    latents = {"latents": torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))}
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        previewer(1, 2, latents)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _job_seconds(engine: ImageEngine, every: int, steps: int, rounds: int) -> float:
    engine.previewer.every = every
    fields = {"prompt": "a lighthouse", "width": 512, "height": 512, "steps": steps, "seed": 1}
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        engine.handle("image", fields, lambda message: None)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("IDLEGRID_TEST_MODELS", ".cache/tiny-models")) / "sd"
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| measurement | value | ratio |")
    print("|---|---|---|")
    print(f"| one preview, SD 1.x 64x64 latents | {_preview_ms(64, 'sd1'):.2f} ms | |")
    print(f"| one preview, SDXL 128x128 latents | {_preview_ms(128, 'sdxl'):.2f} ms | |")
    engine = ImageEngine({"model": str(args.model), "threads": 1})
    _job_seconds(engine, 0, 2, 1)  # warm-up
    # interleaved, so the machine's load falls on both alike
    off, every = [], []
    for _ in range(args.rounds):
        off.append(_job_seconds(engine, 0, args.steps, 1))
        every.append(_job_seconds(engine, 1, args.steps, 1))
    base, with_previews = statistics.median(off), statistics.median(every)
    label = f"512x512, {args.steps} steps, tiny model"
    print(f"| job, previews off ({label}) | {base:.3f} s | 1.00 |")
    print(
        f"| job, a preview every step ({label}) | {with_previews:.3f} s "
        f"| {with_previews / base:.2f} |"
    )


if __name__ == "__main__":
    main()
