"""ControlNet in the image engine (issue 24): canny and `image_is_control` pixel-identical to
diffusers' StableDiffusionControlNetPipeline called directly with the same control map and
seed; `return_control_map`; what a worker cannot serve is refused naming the field."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from diffusers.models.controlnets.controlnet import ControlNetModel

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from protocol.infotext import PNG_PARAMETERS_KEY
from protocol.params import ImageParams
from tests.reference import plain_controlnet, plain_image, plain_pipeline
from worker.errors import InvalidGenerationInput, ModelNotFound, UnsafeWeights
from worker.image.control import load_controlnet
from worker.image.engine import ImageEngine
from worker.image.main import controlnets
from worker.models.tiny_controlnet import build_tiny_controlnet

BASE: dict[str, Any] = {
    "prompt": "a photo of a red cat",
    "width": 64,
    "height": 64,
    "steps": 4,
    "cfg_scale": 7.0,
    "seed": 11,
    "sampler": "Euler",
    "source_processing": "img2img",
}
TOLERANCE = 2


@pytest.fixture(scope="module")
def controlnet_dir(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_controlnet(tiny_sd, tmp_path_factory.mktemp("cn") / "tiny-canny")


@pytest.fixture(scope="module")
def controlnet_file(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cn-file") / "tiny-depth.safetensors"
    return build_tiny_controlnet(tiny_sd, out, single_file=True)


@pytest.fixture(scope="module")
def engine(tiny_sd: Path, controlnet_dir: Path, controlnet_file: Path) -> ImageEngine:
    controls = {"canny": str(controlnet_dir), "depth": str(controlnet_file)}
    return ImageEngine({"model": str(tiny_sd), "controlnets": controls})


@pytest.fixture(scope="module")
def plain_pipe(tiny_sd: Path) -> StableDiffusionPipeline:
    return plain_pipeline(tiny_sd)


def _source() -> Image.Image:
    """Shapes with sharp edges (so canny finds some), not the job's size."""
    image = np.full((96, 80, 3), 30, np.uint8)
    cv2.rectangle(image, (10, 12), (50, 60), (220, 180, 40), -1)
    cv2.circle(image, (55, 70), 18, (40, 200, 230), -1)
    return Image.fromarray(image)


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _sized(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)


def _canny(image: Image.Image) -> Image.Image:
    edges = cv2.Canny(np.asarray(_sized(image)), 100, 200)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _reference(
    pipe: StableDiffusionPipeline, controlnet: ControlNetModel, control: Image.Image, seed: int
) -> np.ndarray:
    params = ImageParams.model_validate(BASE)
    return plain_controlnet(pipe, params, seed, controlnet, control)


def _run(engine: ImageEngine, **fields: Any) -> tuple[list[bytes], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    _, blobs = engine.handle("image", {**BASE, **fields}, events.append, [_encode(_source())])
    return blobs, events


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(int) - expected.astype(int)).max()
    assert diff <= TOLERANCE, f"max |diff| {diff}"


def test_canny_matches_diffusers_controlnet_pipeline(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline, controlnet_dir: Path
) -> None:
    blobs, events = _run(engine, control_type="canny")
    controlnet = ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True)
    assert isinstance(controlnet, ControlNetModel)
    control = _canny(_source())
    assert 0 < np.asarray(control).mean() < 255  # the map has edges and background
    for i, png in enumerate(blobs):
        _close(_pixels(png), _reference(plain_pipe, controlnet, control, 11 + i))
    # sampled from noise: every step, whatever the denoising strength
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    # the map reaches the UNet: not the image without it
    params = ImageParams.model_validate({**BASE, "source_processing": "txt2img"})
    plain = plain_image(plain_pipe, params, 11)
    assert np.abs(_pixels(blobs[0]).astype(int) - plain.astype(int)).max() > 20
    with Image.open(io.BytesIO(blobs[0])) as image:
        text = image.info[PNG_PARAMETERS_KEY]
    entry = text.split(", ControlNet 0: ", 1)[1]
    assert json.loads(entry) == (
        "Module: canny, Model: tiny-canny, Weight: 1, Resize Mode: Just Resize, "
        "Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, "
        "Pixel Perfect: False, Control Mode: Balanced"
    )
    assert "Denoising strength" not in text


def test_image_is_control_feeds_the_source_as_the_map(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline, controlnet_file: Path, tiny_sd: Path
) -> None:
    # depth has no annotator here, but a ready map needs none; the model is a single file
    blobs, _ = _run(engine, control_type="depth", image_is_control=True)
    controlnet = load_controlnet(controlnet_file, plain_pipe)
    _close(_pixels(blobs[0]), _reference(plain_pipe, controlnet, _sized(_source()), 11))
    with Image.open(io.BytesIO(blobs[0])) as image:
        assert 'ControlNet 0: "Module: none, Model: tiny-depth,' in image.info[PNG_PARAMETERS_KEY]


def test_return_control_map_returns_the_canny_map(engine: ImageEngine) -> None:
    blobs, events = _run(engine, control_type="canny", return_control_map=True, n=2)
    assert len(blobs) == 2 and events == []
    for png in blobs:
        assert np.array_equal(_pixels(png), np.asarray(_canny(_source())))


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"control_type": "depth"}, "annotator needs weights"),
        ({"control_type": "hed", "image_is_control": True}, "no 'hed' control model"),
    ],
)
def test_what_the_worker_cannot_serve_is_refused_naming_control_type(
    engine: ImageEngine, fields: dict[str, Any], needle: str
) -> None:
    with pytest.raises(InvalidGenerationInput, match=needle) as caught:
        _run(engine, **fields)
    assert caught.value.field == "control_type"


def test_control_models_load_only_from_safetensors_that_fit(
    tmp_path: Path, plain_pipe: StableDiffusionPipeline, controlnet_file: Path
) -> None:
    pickle = tmp_path / "control.pth"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(UnsafeWeights, match="safetensors"):
        load_controlnet(pickle, plain_pipe)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(ModelNotFound, match="does not fit"):
        load_controlnet(wrong, plain_pipe)
    with pytest.raises(ModelNotFound, match="no ControlNet model"):
        load_controlnet(tmp_path / "missing", plain_pipe)
    not_controlnet = tmp_path / "control_v11p_sd15_canny.safetensors"
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(1)}, str(not_controlnet))
    with pytest.raises(ModelNotFound, match="does not fit"):
        load_controlnet(not_controlnet, plain_pipe)


def test_a_single_file_in_the_original_layout_loads_the_same_weights(
    tiny_sd: Path, tmp_path: Path, plain_pipe: StableDiffusionPipeline, controlnet_dir: Path
) -> None:
    original = build_tiny_controlnet(
        tiny_sd, tmp_path / "control.safetensors", single_file=True, original=True
    )
    with safe_open(str(original), framework="pt") as weights:
        names = set(weights.keys())  # noqa: SIM118 - not a dict
    assert "control_model.input_hint_block.14.weight" in names
    assert "control_model.zero_convs.0.0.weight" in names
    loaded = load_controlnet(original, plain_pipe).state_dict()
    expected = load_controlnet(controlnet_dir, plain_pipe).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in loaded)


def test_controlnet_flag_values(tmp_path: Path) -> None:
    model = tmp_path / "control-canny"
    model.mkdir()
    assert controlnets([f"canny={model}", f"depth={model}"]) == {"canny": model, "depth": model}
    for spec, needle in [
        ("canny", "TYPE=PATH"),
        (f"sketch={model}", "unknown control type; use one of canny, hed"),
        (f"canny={tmp_path / 'nothing'}", "does not exist"),
    ]:
        with pytest.raises(ValueError, match=needle):
            controlnets([spec])
    with pytest.raises(ValueError, match="given twice"):
        controlnets([f"canny={model}", f"canny={model}"])
