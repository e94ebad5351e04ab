"""A job of n images as one UNet batch vs one image at a time, with and without --low-vram.

Each configuration runs in its own process (so that peak memory is that engine's alone):
the image engine in-process (`worker.image.engine.ImageEngine`, as the sandbox child runs
it), one warm-up job, then `--runs` jobs of n images (Euler a, CFG 7) per size; the table
holds the median seconds per job, the speed-up of batching over one by one (same run, same
machine), the largest pixel difference from the one-by-one images (0-255), and the peak
memory the engine reported for the job (CUDA's peak allocation, or the process's peak RSS
on the CPU: worker.image.memory).

    .venv/bin/python bench/image_batch.py [--model DIR] [--sizes 512,768] [--n 4] [--runs 3]
        [--no-low-vram]

`--model` defaults to the tiny SD model (`$IDLEGRID_TEST_MODELS/sd`, built if needed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# name -> engine options beyond the model
CONFIGS: dict[str, dict[str, Any]] = {
    "one by one": {"max_batch_pixels": 0},
    "batched": {"max_batch_pixels": 2**40},
    "one by one, --low-vram": {"max_batch_pixels": 0, "low_vram": True},
    "batched, --low-vram": {"max_batch_pixels": 2**40, "low_vram": True},
}


def _child(args: argparse.Namespace) -> int:
    """Run one configuration; print {size: {seconds, peak, images (paths)}} as JSON."""
    import torch

    from worker.image.engine import ImageEngine

    torch.set_num_threads(args.threads)
    engine = ImageEngine({"model": str(args.model), **json.loads(args.child)})
    base = {"prompt": "a lighthouse at dusk", "steps": args.steps, "sampler": "Euler a"}
    out: dict[str, Any] = {}
    for side in args.size_list:
        job = {**base, "width": side, "height": side, "seed": 1}
        engine.handle("image", {**job, "n": 1, "steps": 1}, lambda event: None)
        seconds: list[float] = []
        peaks: list[int] = []
        for _ in range(args.runs):
            start = time.perf_counter()
            data, pngs = engine.handle("image", {**job, "n": args.n}, lambda event: None)
            seconds.append(time.perf_counter() - start)
            peaks.append(int(str(data["peak_memory_bytes"])))
        paths = []
        for i, png in enumerate(pngs):
            path = Path(args.out) / f"{side}-{i}.png"
            path.write_bytes(png)
            paths.append(str(path))
        median = statistics.median(seconds)
        out[str(side)] = {"seconds": median, "peak": max(peaks), "images": paths}
    print(json.dumps(out))
    return 0


def _pixels(path: str) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(Path(path).read_bytes())) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="SD pipeline folder")
    parser.add_argument("--sizes", default="512", help="square sides, comma-separated")
    parser.add_argument("--n", type=int, default=4, help="images per job")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-low-vram", action="store_true", help="skip the --low-vram runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size_list = [int(side) for side in args.sizes.split(",")]
    if args.model is None:
        from worker.models.tiny_models import build_tiny_models

        models = Path(os.environ.get("IDLEGRID_TEST_MODELS") or tempfile.mkdtemp() + "/models")
        if not (models / "sd" / "model_index.json").exists():
            build_tiny_models(models)
        args.model = models / "sd"
    if args.child is not None:
        return _child(args)

    import numpy as np

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in CONFIGS.items():
            if args.no_low_vram and options.get("low_vram"):
                continue
            out = Path(tmp) / str(len(results))
            out.mkdir()
            command = [sys.executable, __file__, "--child", json.dumps(options), "--out", str(out)]
            command += ["--model", str(args.model), "--sizes", args.sizes, "--n", str(args.n)]
            command += ["--steps", str(args.steps), "--runs", str(args.runs)]
            command += ["--threads", str(args.threads)]
            print(f"running: {name}", file=sys.stderr, flush=True)
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        reference = results["one by one"]
        plain = {"one by one": "one by one", "batched": "one by one"}
        print(
            f"\n{args.n} images per job, {args.steps} steps Euler a, CFG 7, "
            f"{args.threads} threads, median of {args.runs}; model {args.model.name}\n"
        )
        print(
            "| size | run | seconds per job | vs one by one | max pixel diff | peak memory (MiB) |"
        )
        print("|---|---|---|---|---|---|")
        for side in map(str, args.size_list):
            for name, by_size in results.items():
                row = by_size[side]
                base = results[plain.get(name, "one by one, --low-vram")][side]
                diff = max(
                    int(np.abs(_pixels(a) - _pixels(b)).max())
                    for a, b in zip(row["images"], reference[side]["images"], strict=True)
                )
                ratio = base["seconds"] / row["seconds"]
                print(
                    f"| {side}x{side} | {name} | {row['seconds']:.2f} | x{ratio:.2f} | "
                    f"{diff} | {row['peak'] / 2**20:.0f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
