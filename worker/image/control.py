"""ControlNet in the image engine: the donor's control models, a job's control map, and
diffusers' `StableDiffusionControlNetPipeline` built on the loaded components.

The donor names one control model per control type (`--controlnet TYPE=PATH`): a diffusers
`ControlNetModel` folder, or one `.safetensors` file, with diffusers' parameter names or the
original ones (lllyasviel's, as A1111 and ComfyUI use them; diffusers' converter renames
them); a single file's config is the base model's UNet's, as for the ControlNets trained on
SD 1.5. Pickle
weights are refused. Models load with the engine, so a bad path fails at start.

The control map is made from the job's source image, already LANCZOS-resized to the job's
size (`worker.image.sources`): the canny annotator (OpenCV, `protocol.control`'s
thresholds, on the RGB image as A1111's extension runs it), the scribble threshold (no
weights), HED's `hed` and `fakescribbles` maps from the donor's HED weights
(`worker.image.hed`, `--annotator hed=PATH`, loaded with the engine), or the image itself
with `image_is_control`. A job whose annotator this engine cannot run is refused naming
`control_type` (workers do not advertise those types as annotated).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import torch
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.pipelines.controlnet.pipeline_controlnet import (
    StableDiffusionControlNetPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from PIL import Image
from safetensors.torch import load_file

from protocol.control import (
    ANNOTATOR_TYPES,
    CANNY_HIGH_THRESHOLD,
    CANNY_LOW_THRESHOLD,
    SCRIBBLE_THRESHOLD,
    AnnotatorName,
    ControlType,
    mappable_types,
)
from protocol.params import ImageParams
from worker.errors import InvalidGenerationInput, ModelNotFound, UnsafeWeights
from worker.image.hed import HedNetwork, fake_scribble, hed_edges, load_hed

__all__ = ["ControlJob", "ControlNets", "control_map", "load_controlnet"]

logger = logging.getLogger(__name__)

# a parameter every diffusers ControlNetModel has (the control image's encoder)
_DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"


@dataclass(frozen=True)
class ControlJob:
    """What a ControlNet job runs: the pipeline with its control model, the control map
    (RGB, the job's size) and the control model's name (for the PNG's parameters)."""

    pipeline: StableDiffusionControlNetPipeline
    image: Image.Image
    model_name: str


def load_controlnet(path: Path, base: StableDiffusionPipeline) -> ControlNetModel:
    """The ControlNetModel at `path` (a diffusers folder, or a .safetensors file in either
    layout, configured like the base UNet), in float32 on the CPU."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"{path} is not a diffusers ControlNetModel folder (no config.json)"
            )
        loaded = ControlNetModel.from_pretrained(
            path, use_safetensors=True, local_files_only=True, torch_dtype=torch.float32
        )
        return cast(ControlNetModel, loaded)
    if not path.is_file():
        raise ModelNotFound(f"no ControlNet model at {path}: pass a folder or a .safetensors file")
    if path.suffix != ".safetensors":
        raise UnsafeWeights(
            f"{path.name}: only .safetensors ControlNet weights are loaded (pickle files can "
            "run code); convert it to safetensors"
        )
    model: ControlNetModel = ControlNetModel.from_unet(base.unet, load_weights_from_unet=False)
    state = load_file(str(path))
    try:
        if _DIFFUSERS_KEY not in state:
            # the original (lllyasviel, A1111) layout: diffusers' own converter renames it
            state = convert_controlnet_checkpoint(state, dict(model.config))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise ModelNotFound(
            f"{path.name} does not fit the model's UNet (a ControlNet for another base "
            f"model, or not a ControlNet?): {str(exc).splitlines()[0]}"
        ) from None
    cast(torch.nn.Module, model).to(torch.float32)
    return model


def control_map(
    params: ImageParams,
    source: Image.Image,
    annotators: Mapping[AnnotatorName, HedNetwork] | None = None,
) -> Image.Image:
    """The control map of a job from its source image (RGB, already the job's size), with
    the annotators whose weights the engine holds."""
    image = source.convert("RGB")
    if params.image_is_control:
        return image
    held = annotators or {}
    control_type = params.control_type
    lines: np.ndarray | None = None
    if control_type == "canny":
        lines = cv2.Canny(np.asarray(image), CANNY_LOW_THRESHOLD, CANNY_HIGH_THRESHOLD)
    elif control_type == "scribble":
        # a drawing: its dark strokes become white lines on black
        darkest = np.asarray(image).min(axis=2)
        lines = np.where(darkest < SCRIBBLE_THRESHOLD, 255, 0).astype(np.uint8)
    elif control_type in ANNOTATOR_TYPES["hed"] and "hed" in held:
        lines = hed_edges(held["hed"], image)
        if control_type == "fakescribbles":
            lines = fake_scribble(lines)
    if lines is not None:
        return Image.fromarray(np.stack([lines] * 3, axis=-1))
    served = ", ".join(sorted(mappable_types(held)))
    raise InvalidGenerationInput(
        "control_type",
        f"the {control_type!r} annotator needs weights this worker does not have "
        f"(it makes {served} maps only); send a ready control map with image_is_control",
    )


class ControlNets:
    """The donor's control models on the engine's device, and their pipelines."""

    def __init__(
        self,
        paths: Mapping[ControlType, str],
        base: StableDiffusionPipeline,
        annotators: Mapping[AnnotatorName, str] | None = None,
    ) -> None:
        self.base = base
        # the donor's annotator weights (--annotator NAME=PATH)
        self.annotators: dict[AnnotatorName, HedNetwork] = {}
        for annotator, location in (annotators or {}).items():
            self.annotators[annotator] = load_hed(Path(location), base.device)
            logger.info("loaded the %s annotator", annotator)
        self.models: dict[ControlType, tuple[ControlNetModel, str]] = {}
        for control_type, location in paths.items():
            path = Path(location)
            model = load_controlnet(path, base)
            cast(torch.nn.Module, model).to(base.device)
            model.eval()
            name = path.stem if path.is_file() else path.name
            self.models[control_type] = (model, name)
            logger.info("loaded ControlNet %s for %s", name, control_type)
        self._pipelines: dict[ControlType, StableDiffusionControlNetPipeline] = {}

    def job(self, params: ImageParams, source: Image.Image) -> ControlJob:
        """The pipeline and control map of a job with a `control_type`."""
        control_type = params.control_type
        if control_type is None:
            raise ValueError("not a ControlNet job")
        if control_type not in self.models:
            raise InvalidGenerationInput(
                "control_type",
                f"this worker has no {control_type!r} control model (it has: "
                f"{', '.join(self.models) or 'none'}); it should not have taken the job",
            )
        model, name = self.models[control_type]
        image = control_map(params, source, self.annotators)
        pipeline = self._pipelines.get(control_type)
        if pipeline is None:
            components = {**self.base.components, "requires_safety_checker": False}
            pipeline = StableDiffusionControlNetPipeline(**components, controlnet=model)
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[control_type] = pipeline
        return ControlJob(pipeline, image, name)
