"""What the network adds to a small image job, on loopback.

Starts a coordinator and one image worker (real processes), then times, in one run:
  direct  - the same generation called directly in diffusers in this process
  network - submit -> worker -> signed result -> SSE -> download, through the SDK
and prints the medians, the overhead per job and the ratio.

    .venv/bin/python bench/image_overhead.py [--runs 20] [--steps 4] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from processes import wait_line


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import diffusers
    import torch

    from client.sdk import Client
    from protocol.params import ImageParams
    from worker.image.samplers import SCHEDULER_SPECS
    from worker.models.tiny_models import build_tiny_models

    work = Path(tempfile.mkdtemp(prefix="idlegrid-bench-"))
    models = Path(os.environ.get("IDLEGRID_TEST_MODELS") or work / "models")
    if not (models / "sd" / "model_index.json").exists():
        build_tiny_models(models)
    cli = [sys.executable, "-m", "client.cli"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        log_c = work / "coordinator.log"
        coordinator = subprocess.Popen(
            [
                *cli,
                "coordinator",
                "--port",
                "0",
                "--data-dir",
                str(work / "data"),
                "--log-level",
                "WARNING",
            ],
            stdout=log_c.open("wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append(coordinator)
        url = wait_line(log_c, r"http://[0-9.]+:\d+", coordinator, 60)
        log_w = work / "worker.log"
        worker = subprocess.Popen(
            [
                *cli,
                "worker",
                "image",
                "--coordinator",
                url,
                "--model",
                str(models / "sd"),
                "--name",
                "bench",
                "--identity",
                str(work / "bench.key"),
                "--threads",
                str(args.threads),
                "--log-level",
                "WARNING",
            ],
            stdout=log_w.open("wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append(worker)
        wait_line(log_w, "ready", worker, 300)

        params = ImageParams(
            prompt="a lighthouse",
            width=args.size,
            height=args.size,
            steps=args.steps,
            sampler="Euler",
            seed=1,
        )
        torch.set_num_threads(args.threads)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            models / "sd", local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        class_name, options = SCHEDULER_SPECS[params.sampler]
        pipe.scheduler = getattr(diffusers, class_name).from_config(
            pipe.scheduler.config, **options
        )

        def direct() -> None:
            image = pipe(
                prompt=params.prompt,
                width=params.width,
                height=params.height,
                num_inference_steps=params.steps,
                guidance_scale=params.cfg_scale,
                generator=torch.Generator("cpu").manual_seed(1),
            ).images[0]
            image.tobytes()

        with Client(url) as grid:

            def network() -> None:
                grid.generate(params)

            for warm in (direct, network, direct, network):
                warm()
            timings: dict[str, list[float]] = {"direct": [], "network": []}
            for _ in range(args.runs):  # interleaved, so drift hits both alike
                for name, run in (("direct", direct), ("network", network)):
                    start = time.perf_counter()
                    run()
                    timings[name].append(time.perf_counter() - start)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)

    d, n = statistics.median(timings["direct"]), statistics.median(timings["network"])
    print(
        f"\nsmall image job: {args.size}x{args.size}, {args.steps} steps, Euler, "
        f"{args.threads} torch threads, {args.runs} runs each, medians"
    )
    print(f"| {'path':<28} | {'median ms':>10} | {'ratio':>6} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 8}|")
    print(f"| {'direct diffusers (baseline)':<28} | {d * 1000:>10.1f} | {1:>6.2f} |")
    print(f"| {'through the network':<28} | {n * 1000:>10.1f} | {n / d:>6.2f} |")
    print(f"\nnetwork overhead per job: {(n - d) * 1000:.1f} ms (target: under 50 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
