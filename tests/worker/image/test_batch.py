"""A job's images as one UNet batch, `--low-vram`, and the peak memory the engine reports."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import SlicedAttnProcessor
from PIL import Image

from client.cli import build_parser
from protocol.messages import EngineInfo
from protocol.settings import validated
from worker.image.batch import BatchProgress, chunks
from worker.image.engine import ImageEngine
from worker.image.main import ImageSettings
from worker.image.memory import PeakMemory
from worker.image.worker import engine_info

# prompt editing swaps the embeddings mid-run, which a batch must repeat per image
BASE = {
    "prompt": "a photo of a [red:blue:0.5] cat",
    "negative_prompt": "blurry dog",
    "width": 64,
    "height": 64,
    "steps": 4,
    "sampler": "Euler a",
    "seed": 40,
    "n": 3,
}
# batched matrix products may round differently in the last bits (worker.image.batch)
TOLERANCE = 2


@pytest.fixture(scope="module")
def batched(tiny_sd: Path) -> ImageEngine:
    return ImageEngine({"model": str(tiny_sd)})


@pytest.fixture(scope="module")
def one_by_one(tiny_sd: Path) -> ImageEngine:
    return ImageEngine({"model": str(tiny_sd), "max_batch_pixels": 0})


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _run(
    engine: ImageEngine, blobs: list[bytes] | None = None, **fields: Any
) -> tuple[dict[str, Any], list[np.ndarray], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    data, pngs = engine.handle("image", {**BASE, **fields}, events.append, blobs)
    return data, [_pixels(png) for png in pngs], events


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@contextmanager
def _unet_batches(engine: ImageEngine) -> Iterator[list[int]]:
    """The batch size of every UNet call made inside the block."""
    sizes: list[int] = []
    handle = engine.pipe.unet.register_forward_pre_hook(
        lambda module, args: sizes.append(int(args[0].shape[0]))
    )
    try:
        yield sizes
    finally:
        handle.remove()


def _source() -> bytes:
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# -- batches -------------------------------------------------------------------------------


def test_chunks_hold_as_many_images_as_fit() -> None:
    assert chunks(4, 512 * 512, 1024 * 1024) == [range(0, 4)]
    assert chunks(4, 512 * 512, 3 * 512 * 512) == [range(0, 3), range(3, 4)]
    # an image larger than the cap still runs, alone; 0 = one at a time
    assert chunks(2, 1024 * 1024, 512 * 512) == [range(0, 1), range(1, 2)]
    assert chunks(3, 64 * 64, 0) == [range(0, 1), range(1, 2), range(2, 3)]


def test_batch_progress_counts_image_steps_as_one_by_one_would() -> None:
    first, second = BatchProgress(range(0, 2), 4, 3), BatchProgress(range(2, 3), 4, 3)
    positions = [(e.image, e.step) for e in map(first.event, range(1, 5))]
    positions += [(e.image, e.step) for e in map(second.event, range(1, 5))]
    assert positions == [(0, 2), (0, 4), (1, 2), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]
    # image x steps + step: the image-steps done, as the coordinator's ETA reads them
    assert [e * 4 + s for e, s in positions] == [2, 4, 6, 8, 9, 10, 11, 12]


@pytest.mark.slow
def test_a_batch_of_three_makes_the_one_by_one_pixels(
    batched: ImageEngine, one_by_one: ImageEngine
) -> None:
    with _unet_batches(batched) as sizes:
        data, together, events = _run(batched)
    _, alone, alone_events = _run(one_by_one)
    # one UNet call per step for all three images and their negatives
    assert sizes == [6] * 4
    diff = _max_diff(together, alone)
    print(f"txt2img n=3 batched vs one by one: max |diff| {diff}")
    assert diff <= TOLERANCE
    assert data["seeds"] == [40, 41, 42]
    assert not np.array_equal(together[0], together[1])
    assert [(e["image"], e["step"]) for e in events] == [(0, 3), (1, 2), (2, 1), (2, 4)]
    last = {"image": 2, "step": 4, "steps": 4, "n": 3, "preview": None}
    assert alone_events[-1] == events[-1] == last


@pytest.mark.slow
def test_img2img_batches_with_each_image_its_own_vae_sample(
    batched: ImageEngine, one_by_one: ImageEngine
) -> None:
    fields = {"source_processing": "img2img", "denoising_strength": 0.75}
    with _unet_batches(batched) as sizes:
        _, together, _ = _run(batched, [_source()], **fields)
    _, alone, _ = _run(one_by_one, [_source()], **fields)
    assert sizes == [6] * 3
    diff = _max_diff(together, alone)
    print(f"img2img n=3 batched vs one by one: max |diff| {diff}")
    assert diff <= TOLERANCE
    # different seeds, different VAE samples and noise
    assert not np.array_equal(together[1], together[2])


@pytest.mark.slow
def test_images_beyond_the_cap_run_in_chunks(tiny_sd: Path, one_by_one: ImageEngine) -> None:
    pairs = ImageEngine({"model": str(tiny_sd), "max_batch_pixels": 2 * 64 * 64})
    with _unet_batches(pairs) as sizes:
        _, chunked, events = _run(pairs, steps=2)
    _, alone, _ = _run(one_by_one, steps=2)
    assert sizes == [4, 4, 2, 2]
    assert _max_diff(chunked, alone) <= TOLERANCE
    assert [(e["image"], e["step"]) for e in events] == [(0, 2), (1, 2), (2, 1), (2, 2)]


# -- --low-vram and peak memory ------------------------------------------------------------


@pytest.mark.slow
def test_low_vram_slices_and_tiles_and_keeps_the_image(tiny_sd: Path, batched: ImageEngine) -> None:
    low = ImageEngine({"model": str(tiny_sd), "low_vram": True})
    processors = low.pipe.unet.attn_processors.values()
    assert all(isinstance(p, SlicedAttnProcessor) for p in processors)
    assert low.pipe.vae.use_slicing and low.pipe.vae.use_tiling
    # float16 and offload need CUDA: on the CPU the weights stay float32 on the device
    assert low.dtype == torch.float32 and low.pipe.unet.dtype == torch.float32
    info, _ = low.handle("image_info", {}, lambda message: None)
    assert info["dtype"] == "float32"
    data, sliced, _ = _run(low)
    _, plain, _ = _run(batched)
    diff = _max_diff(sliced, plain)
    print(f"--low-vram vs plain: max |diff| {diff}")
    assert diff <= TOLERANCE
    assert data["peak_memory_bytes"] > 0


def test_peak_memory_is_reported_per_job(batched: ImageEngine) -> None:
    info, _ = batched.handle("image_info", {}, lambda message: None)
    assert cast(int, info["peak_memory_bytes"]) > 0
    data, _, _ = _run(batched, n=1, steps=1)
    assert data["peak_memory_bytes"] > 0


def test_the_cpu_peak_is_the_jobs_not_the_process_lifetimes() -> None:
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    before = memory.peak()
    grown = b"\1" * (256 * 2**20)  # resident: every page written
    peak = memory.peak()
    del grown
    assert before is not None and peak is not None and peak >= before + 200 * 2**20
    # the next job starts from the current RSS, not from the earlier peak
    memory.start()
    later = memory.peak()
    assert later is not None and later <= peak - 200 * 2**20


def test_the_flags_parse() -> None:
    common = ["worker", "image", "--coordinator", "http://127.0.0.1:1", "--model", "m"]
    default = validated(ImageSettings, build_parser().parse_args(common))
    assert (default.low_vram, default.max_batch_pixels) == (False, 1024 * 1024)
    flags = ["--low-vram", "--max-batch-pixels", "0"]
    settings = validated(ImageSettings, build_parser().parse_args([*common, *flags]))
    assert (settings.low_vram, settings.max_batch_pixels) == (True, 0)


def test_the_build_report_names_low_vram_and_batching() -> None:
    report = EngineInfo.model_validate(engine_info(low_vram=True, max_batch_pixels=0))
    assert report.low_vram is True and report.max_batch_pixels == 0
    # (no GPU here: float16 only with --low-vram on CUDA)
    assert report.device != "cpu" or report.dtype == "float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 and CPU offload need CUDA")
def test_low_vram_on_cuda_offloads_in_float16(tiny_sd: Path) -> None:
    low = ImageEngine({"model": str(tiny_sd), "low_vram": True})
    assert low.dtype == torch.float16 and low.pipe.unet.dtype == torch.float16
    # accelerate keeps each model on the CPU until it runs
    assert low.pipe.unet.device.type == "cpu"
    data, images, _ = _run(low, n=2)
    assert len(images) == 2 and data["peak_memory_bytes"] > 0
