from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from protocol.infotext import PNG_PARAMETERS_KEY, parameters_text
from protocol.params import ImageParams
from protocol.samplers import SAMPLERS
from tests.reference import plain_image, plain_pipeline
from worker.errors import ModelConfigMissing, ModelError, ModelNotFound, UnsafeWeights
from worker.image.engine import ImageEngine
from worker.image.model_source import resolve_model
from worker.image.samplers import SCHEDULER_SPECS, make_scheduler

# diffusers' schedulers hand torch tensors to numpy functions; numpy 2 warns that torch's
# Tensor.__array__ / __array_wrap__ lack its newer keywords. Harmless; nothing else muted.

BASE = {"prompt": "a photo of a red cat", "width": 64, "height": 64, "steps": 3, "cfg_scale": 7.0}
# the images of a job run as one batch, whose matrix products may round differently in the
# last bits than one image's (worker.image.batch): at most this many levels of 255
BATCH_TOLERANCE = 2


@pytest.fixture(scope="module")
def engine(tiny_sd: Path) -> ImageEngine:
    return ImageEngine({"model": str(tiny_sd), "model_config": None, "threads": None})


@pytest.fixture(scope="module")
def plain_pipe(tiny_sd: Path) -> StableDiffusionPipeline:
    """The same model loaded with plain diffusers, as the reference."""
    return plain_pipeline(tiny_sd)


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _run(
    engine: ImageEngine, **fields: Any
) -> tuple[dict[str, Any], list[bytes], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    data, blobs = engine.handle("image", {**BASE, **fields}, events.append)
    return data, blobs, events


# -- ImageEngine ---------------------------------------------------------------------------


@pytest.mark.slow
def test_engine_matches_plain_diffusers(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline
) -> None:
    fields = {"seed": 1234, "n": 2, "sampler": "Euler a", "negative_prompt": "blurry dog"}
    data, blobs, _ = _run(engine, **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    assert data.pop("peak_memory_bytes") > 0
    assert data == {"seeds": [1234, 1235], "model": "sd", "width": 64, "height": 64}
    assert len(blobs) == 2
    for i, png in enumerate(blobs):
        expected = plain_image(plain_pipe, params, 1234 + i).astype(int)
        assert np.abs(_pixels(png) - expected).max() <= BATCH_TOLERANCE
    assert not np.array_equal(_pixels(blobs[0]), _pixels(blobs[1]))


@pytest.mark.slow
def test_image_i_depends_only_on_seed_plus_i(engine: ImageEngine) -> None:
    _, pair, _ = _run(engine, seed=10, n=2)
    _, single, _ = _run(engine, seed=11, n=1)
    diff = np.abs(_pixels(pair[1]).astype(int) - _pixels(single[0])).max()
    assert diff <= BATCH_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_makes_the_plain_diffusers_image(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline, sampler: str
) -> None:
    fields = {"seed": 5, "steps": 2, "sampler": sampler}
    _, blobs, events = _run(engine, **fields)
    pixels = _pixels(blobs[0])
    assert pixels.shape == (64, 64, 3)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 0
    expected = plain_image(plain_pipe, ImageParams.model_validate({**BASE, **fields}), 5)
    np.testing.assert_array_equal(pixels, expected)
    assert [e["step"] for e in events] == [1, 2]


@pytest.mark.slow
def test_1024_image_is_sampled_as_a_128_latent_and_decoded_at_full_size(
    engine: ImageEngine,
) -> None:
    """The largest size workers take by default, at real SD 1's latent scale factor of 8:
    1024x1024 pixels are a 128x128 latent in the UNet and the VAE decoder."""
    latents: list[tuple[str, tuple[int, ...]]] = []

    def record(name: str) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            latents.append((name, tuple(args[0].shape)))

        return hook

    handles = [
        engine.pipe.unet.register_forward_pre_hook(record("unet")),
        engine.pipe.vae.decoder.register_forward_pre_hook(record("decoder")),
    ]
    try:
        data, blobs, events = _run(engine, seed=6, steps=1, width=1024, height=1024)
    finally:
        for handle in handles:
            handle.remove()
    # (the UNet sees the unconditional and the prompted latent as one batch of two)
    assert latents == [("unet", (2, 4, 128, 128)), ("decoder", (1, 4, 128, 128))]
    assert (data["width"], data["height"]) == (1024, 1024)
    pixels = _pixels(blobs[0])
    assert pixels.shape == (1024, 1024, 3)
    assert pixels.std() > 0
    assert [e["step"] for e in events] == [1]


def test_make_scheduler_follows_the_spec_table(plain_pipe: StableDiffusionPipeline) -> None:
    base = dict(plain_pipe.scheduler.config)
    for name, (class_name, options) in SCHEDULER_SPECS.items():
        scheduler = make_scheduler(name, base)
        assert type(scheduler).__name__ == class_name
        # every diffusers scheduler is also a ConfigMixin; SchedulerMixin does not say so
        config: dict[str, Any] = dict(cast(Any, scheduler).config)
        assert config["beta_start"] == 0.00085
        assert config["beta_schedule"] == "scaled_linear"
        for key, value in options.items():
            assert config[key] == value, (name, key)
    with pytest.raises(KeyError, match="unknown sampler 'Euler b'"):
        make_scheduler("Euler b", base)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
def test_progress_reports_each_step_once(engine: ImageEngine, sampler: str) -> None:
    _, _, events = _run(engine, seed=3, n=2, steps=3, sampler=sampler)
    # both images advance together: each batch step is reported as the position the same
    # work (2 image-steps) reaches one image at a time (worker.image.batch.BatchProgress)
    assert events == [
        {"image": image, "step": step, "steps": 3, "n": 2, "preview": None}
        for image, step in [(0, 2), (1, 1), (1, 3)]
    ]


def test_png_carries_the_parameters_text(engine: ImageEngine) -> None:
    fields = {"seed": 99, "n": 2, "sampler": "DPM++ 2M Karras", "negative_prompt": "ugly"}
    _, blobs, _ = _run(engine, **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    for i, png in enumerate(blobs):
        with PngImageFile(io.BytesIO(png)) as image:
            assert image.format == "PNG"
            assert image.text[PNG_PARAMETERS_KEY] == parameters_text(params, 99 + i, "sd")
    assert "Negative prompt: ugly" in parameters_text(params, 99, "sd")


def test_png_bytes_are_deterministic(engine: ImageEngine) -> None:
    _, first, _ = _run(engine, seed=21, prompt="ünïcödé prompt ✓")
    _, second, _ = _run(engine, seed=21, prompt="ünïcödé prompt ✓")
    assert first == second
    with PngImageFile(io.BytesIO(first[0])) as image:
        assert image.text[PNG_PARAMETERS_KEY].startswith("ünïcödé prompt ✓\n")


def test_rejects_other_job_kinds_and_missing_seed(engine: ImageEngine) -> None:
    with pytest.raises(ValueError, match="not 'text'"):
        engine.handle("text", {**BASE, "seed": 1}, lambda event: None)
    with pytest.raises(ValueError, match="no seed"):
        engine.handle("image", BASE, lambda event: None)


def test_single_file_engine_matches_folder_engine(
    engine: ImageEngine, tiny_sd: Path, tiny_sd_single_file: Path
) -> None:
    single = ImageEngine(
        {"model": str(tiny_sd_single_file), "model_config": str(tiny_sd), "threads": 1}
    )
    assert single.source.kind == "single_file"
    data, blobs, _ = _run(single, seed=8, sampler="DDIM")
    _, reference, _ = _run(engine, seed=8, sampler="DDIM")
    assert data["model"] == "tiny-sd1"
    np.testing.assert_array_equal(_pixels(blobs[0]), _pixels(reference[0]))
    with PngImageFile(io.BytesIO(blobs[0])) as image:
        assert image.text[PNG_PARAMETERS_KEY].endswith("Model: tiny-sd1")


def test_model_name_option_overrides_the_derived_name(tiny_sd: Path) -> None:
    named = ImageEngine(
        {"model": str(tiny_sd), "model_config": None, "threads": None, "model_name": "tiny-v1"}
    )
    data, blobs, _ = _run(named, seed=2, steps=1)
    assert data["model"] == "tiny-v1"
    with PngImageFile(io.BytesIO(blobs[0])) as image:
        assert image.text[PNG_PARAMETERS_KEY].endswith("Model: tiny-v1")


# -- refusing unsafe or incomplete models ------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"])
def test_engine_refuses_pickle_files(tmp_path: Path, tiny_sd: Path, suffix: str) -> None:
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(b"never unpickled")
    with pytest.raises(UnsafeWeights, match=r"refusing to load pickle-based weights from .*"):
        ImageEngine({"model": str(checkpoint), "model_config": str(tiny_sd), "threads": None})


def test_engine_refuses_folder_with_only_bin_weights(tmp_path: Path, tiny_sd: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_sd, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.with_suffix(".bin").write_bytes(b"never unpickled")
        weights.unlink()
    with pytest.raises(UnsafeWeights, match="convert it to .safetensors"):
        ImageEngine({"model": str(folder), "model_config": None, "threads": None})


def test_folder_with_one_pickle_only_component_is_refused(tmp_path: Path, tiny_sd: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_sd, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.with_suffix(".bin").write_bytes(b"never unpickled")
    weights.unlink()
    with pytest.raises(UnsafeWeights, match="vae"):
        resolve_model(str(folder))


def test_resolve_model_sources(tiny_sd: Path, tiny_sd_single_file: Path) -> None:
    folder = resolve_model(str(tiny_sd))
    assert (folder.kind, folder.location, folder.config_dir, folder.name) == (
        "folder",
        str(tiny_sd),
        None,
        "sd",
    )
    single = resolve_model(str(tiny_sd_single_file), tiny_sd)
    assert (single.kind, single.config_dir, single.name) == ("single_file", tiny_sd, "tiny-sd1")
    hub = resolve_model("runwayml/stable-diffusion-v1-5")
    assert (hub.kind, hub.location, hub.name) == (
        "hub",
        "runwayml/stable-diffusion-v1-5",
        "runwayml/stable-diffusion-v1-5",
    )


def test_single_file_needs_a_config_folder(tiny_sd_single_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelConfigMissing, match="--model-config DIR"):
        resolve_model(str(tiny_sd_single_file))
    with pytest.raises(ModelConfigMissing, match="no model_index.json"):
        resolve_model(str(tiny_sd_single_file), tmp_path)


@pytest.mark.parametrize(
    "spec", ["does-not-exist", "./missing/model", "/nowhere/at/all.safetensors", "a/b/c"]
)
def test_unknown_paths_are_not_found(spec: str) -> None:
    with pytest.raises(ModelNotFound, match="no model at"):
        resolve_model(spec)


def test_non_model_paths_are_not_found(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(ModelNotFound, match="not a model file"):
        resolve_model(str(text))
    with pytest.raises(ModelNotFound, match="no model_index.json"):
        resolve_model(str(tmp_path))


def test_model_errors_share_a_base() -> None:
    for error in (UnsafeWeights, ModelNotFound, ModelConfigMissing):
        assert issubclass(error, ModelError)


def test_relative_model_paths_become_absolute(
    tiny_sd: Path, tiny_sd_single_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the engine loads from a private working directory, so relative paths would break
    monkeypatch.chdir(tiny_sd.parent)
    assert resolve_model(tiny_sd.name).location == str(tiny_sd.resolve())
    single = resolve_model(str(tiny_sd_single_file), Path(tiny_sd.name))
    assert single.config_dir == tiny_sd.resolve()
