"""Image extras in the engine (issue 24 part B): the hires fix against plain diffusers, the
upscalers against spandrel's architectures called directly, on random weights. GFPGAN is
tested through a real worker (tests/e2e/test_image_extras.py): its weights are large."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from PIL import Image
from safetensors.torch import save_file

from protocol.infotext import PNG_PARAMETERS_KEY
from protocol.params import ImageParams
from tests.reference import plain_image, plain_pipeline
from tests.reference_extras import plain_hires, plain_upscale, rrdbnet
from worker.errors import InvalidGenerationInput, ModelNotFound, UnsafeWeights
from worker.image.engine import ImageEngine
from worker.image.post_files import post_processor_files
from worker.image.postprocess import PostProcessors, load_post_processor

BASE = {"prompt": "a photo of a red cat", "steps": 4, "cfg_scale": 7.0, "seed": 31}
CPU = torch.device("cpu")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def small_native_sd(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline declaring a native size of 64x64 (UNet sample_size 8 latents x the
    VAE's 8), so a hires fix runs at test sizes."""
    out = tmp_path_factory.mktemp("native64") / "sd"
    shutil.copytree(tiny_sd, out)
    config_path = out / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["sample_size"] = 8
    config_path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A donor's folder: x2 as safetensors, x4 as a tensors-only .pth, a CodeFormers file
    (ignored: refused by name) and an unrelated file."""
    folder = tmp_path_factory.mktemp("post")
    save_file(_state(rrdbnet(2, seed=1)), folder / "RealESRGAN_x2plus.safetensors")
    torch.save({"params_ema": _state(rrdbnet(4, seed=2))}, folder / "RealESRGAN_x4plus.pth")
    (folder / "CodeFormers.pth").write_bytes(b"not loaded")
    (folder / "notes.txt").write_text("hello")
    return folder


@pytest.fixture(scope="module")
def engine(small_native_sd: Path, upscalers: Path) -> ImageEngine:
    return ImageEngine(
        {"model": str(small_native_sd), "threads": None, "post_processors": str(upscalers)}
    )


@pytest.fixture(scope="module")
def plain_pipe(small_native_sd: Path) -> StableDiffusionPipeline:
    return plain_pipeline(small_native_sd)


def _run(engine: ImageEngine, **fields: Any) -> tuple[dict[str, Any], bytes, list[Any]]:
    events: list[dict[str, Any]] = []
    data, blobs = engine.handle("image", {**BASE, **fields}, events.append)
    return data, blobs[0], events


def _open(png: bytes) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")), str(image.info[PNG_PARAMETERS_KEY])


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(int) - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}"


def test_hires_fix_matches_diffusers(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline
) -> None:
    fields = {"width": 128, "height": 96, "hires_fix": True, "hires_fix_denoising_strength": 0.5}
    data, png, events = _run(engine, **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    # 128x96 scaled until its shorter side is 64 -> 85.3x64, rounded down to 8s -> 80x64
    expected = plain_hires(plain_pipe, params, 31, (80, 64))
    pixels, text = _open(png)
    _close(pixels, expected)
    assert (data["width"], data["height"]) == (128, 96)
    assert "Size: 80x64" in text
    assert "Denoising strength: 0.5, Hires upscale: 1.6, Hires resize: 128x96" in text
    assert "Hires steps: 4, Hires upscaler: Latent" in text
    # 4 first-pass steps and int(4 x 0.5) = 2 second-pass steps, each reported once
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e["steps"] for e in events} == {6}


def test_hires_fix_at_native_size_is_plain(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline
) -> None:
    fields = {"width": 64, "height": 96, "hires_fix": True}
    _, png, events = _run(engine, **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    pixels, text = _open(png)
    np.testing.assert_array_equal(pixels, plain_image(plain_pipe, params, 31))
    assert "Hires" not in text
    assert events[-1]["step"] == events[-1]["steps"] == 4


@pytest.mark.parametrize(
    ("name", "scale", "seed"), [("RealESRGAN_x2plus", 2, 1), ("RealESRGAN_x4plus", 4, 2)]
)
def test_upscalers_match_spandrel(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline, name: str, scale: int, seed: int
) -> None:
    fields = {"width": 64, "height": 72, "post_processing": [name]}
    data, png, _ = _run(engine, **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    plain = Image.fromarray(plain_image(plain_pipe, params, 31))
    expected = plain_upscale(rrdbnet(scale, seed=seed), plain)
    pixels, text = _open(png)
    assert (data["width"], data["height"]) == (64 * scale, 72 * scale)
    _close(pixels, np.asarray(expected))
    assert "Size: 64x72" in text and f"Postprocessing: {name}" in text


def test_engine_refuses_post_processors_it_lacks(engine: ImageEngine) -> None:
    with pytest.raises(InvalidGenerationInput, match="GFPGAN") as caught:
        _run(engine, width=64, height=64, post_processing=["GFPGAN"])
    assert caught.value.field == "post_processing"


@pytest.mark.slow
def test_two_x_upscale_to_1024(upscalers: Path) -> None:
    post = PostProcessors.load(upscalers, CPU)
    assert sorted(post.models) == ["RealESRGAN_x2plus", "RealESRGAN_x4plus"]
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    params = ImageParams(prompt="x", post_processing=["RealESRGAN_x2plus"])
    assert params.output_size == (1024, 1024)
    out = post.apply(image, params, seed=0)
    assert out.size == (1024, 1024)
    _close(np.asarray(out), np.asarray(plain_upscale(rrdbnet(2, seed=1), image)))


def test_post_processor_files_and_weights(upscalers: Path, tmp_path: Path) -> None:
    assert {n: p.name for n, p in post_processor_files(upscalers).items()} == {
        "RealESRGAN_x2plus": "RealESRGAN_x2plus.safetensors",
        "RealESRGAN_x4plus": "RealESRGAN_x4plus.pth",
    }
    with pytest.raises(ModelNotFound, match="no such folder"):
        post_processor_files(tmp_path / "missing")
    with pytest.raises(ModelNotFound, match="GFPGAN.safetensors"):
        post_processor_files(tmp_path)
    (tmp_path / "NMKD_Siax.ckpt").write_bytes(b"pickle")
    with pytest.raises(UnsafeWeights, match="NMKD_Siax.ckpt"):
        post_processor_files(tmp_path)
    # x2 weights under an x4 name, and an upscaler under GFPGAN's name, are refused
    with pytest.raises(ModelNotFound, match="must upscale 4x but these weights upscale 2x"):
        load_post_processor("4x_AnimeSharp", _state(rrdbnet(2, seed=1)))
    with pytest.raises(ModelNotFound, match="not a GFPGAN model"):
        load_post_processor("GFPGAN", _state(rrdbnet(2, seed=1)))
    # a .pth holding a pickled object is refused by torch.load(weights_only=True)
    bad = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"model": torch.nn.Linear(1, 1)}, bad)
    (tmp_path / "NMKD_Siax.ckpt").unlink()
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        PostProcessors.load(tmp_path, CPU)


def test_worker_flag_refuses_a_folder_without_weights(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.cli import main

    (tmp_path / "GFPGAN.pt").write_bytes(b"pickle")
    args = ["worker", "image", "--coordinator", "http://127.0.0.1:9", "--model", str(tiny_sd)]
    assert main([*args, "--post-processors", str(tmp_path / "none")]) == 2
    assert "--post-processors" in capsys.readouterr().err
    assert main([*args, "--post-processors", str(tmp_path)]) == 2
    assert "GFPGAN.pt is a pickle" in capsys.readouterr().err
