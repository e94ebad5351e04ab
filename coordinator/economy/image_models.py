"""The operator's image model reference: names pinned to a checkpoint, their limits and prices.

`[[image_models]]` tables of `idlegrid coordinator --models FILE` (the file that lists the
text models, coordinator.economy.text_models) become `CoordinatorConfig.image_models`:

    [[image_models]]
    name = "Deliberate"            # the name jobs and workers use
    baseline = "sd1"               # sd1, sd2 or sdxl: prices (SDXL x2) and LoRAs
    sha256 = "9aba26ab..."         # the checkpoint (worker.image.checkpoint_hash)
    default_size = [512, 512]      # width, height of jobs naming it that give no size
    max_pixels = 1048576           # largest width x height of its jobs
    max_steps = 100                # most steps of its jobs
    nsfw = false                   # only nsfw requests may name it (default false)
    trigger = ["deliberate"]       # words for clients to put in prompts (default none)

A worker popping a catalog name must report that checkpoint's hash (`check_pop`); a name
the reference does not list is served only where the operator allows uncatalogued models
(`uncatalogued_allowed`). Jobs naming a catalog model are held to its limits
(`check_job`) and priced by its baseline (`price`: the one place the coordinator prices an
image job, so reservation and settlement see the same cost).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from coordinator.config import CoordinatorConfig
from coordinator.economy.text_models import parse_catalog
from coordinator.errors import BadRequest
from protocol.cost import BASELINE_FACTORS, image_cost
from protocol.image_models import ImageModel
from protocol.loras import BASELINES, Baseline
from protocol.params import MAX_SIDE, MIN_SIDE, ImageParams

__all__ = [
    "baseline",
    "catalog_fields",
    "check_job",
    "check_pop",
    "find",
    "named_only",
    "parse_image_models",
    "price",
    "uncatalogued_allowed",
    "with_default_size",
]

# TOML key -> (what it must be, whether it may be left out)
_KEYS: dict[str, tuple[str, bool]] = {
    "name": ("the model's name, 1-100 characters", False),
    "baseline": (f"its family, one of {', '.join(BASELINES)}", False),
    "sha256": ("the checkpoint's SHA-256, 64 hex digits (README: Image model reference)", False),
    "default_size": (
        f"[width, height] of jobs that give no size, multiples of 8 from {MIN_SIDE} to {MAX_SIDE}",
        False,
    ),
    "max_pixels": ("the largest width x height of its jobs, a whole number 4096-16777216", False),
    "max_steps": ("the most steps of its jobs, a whole number 1-500", False),
    "nsfw": ("true or false", True),
    "trigger": ('a list of words, e.g. ["analog style"]', True),
}
# ImageModel field -> TOML key, for validation errors
_FIELD_KEYS = {"default_width": "default_size", "default_height": "default_size"}


def catalog_fields(text: str) -> dict[str, Any]:
    """CoordinatorConfig fields of a `--models` file: its text models (when it lists any;
    else the built-in ones stay) and its image models; ValueError naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML ({exc})") from None
    fields: dict[str, Any] = {"image_models": parse_image_models(data)}
    if "models" in data or "default" in data or not fields["image_models"]:
        models, default = parse_catalog(text)
        fields.update(text_models=models, default_text_model=default)
    return fields


def parse_image_models(data: dict[str, Any]) -> tuple[ImageModel, ...]:
    """The `[[image_models]]` tables of a parsed `--models` file; ValueError naming the key."""
    entries = data.get("image_models", [])
    if not isinstance(entries, list):
        raise ValueError("image_models: write one [[image_models]] table per model")
    models: list[ImageModel] = []
    for i, entry in enumerate(entries):
        model = _image_model(f"image_models[{i}]", entry)
        if any(m.name == model.name for m in models):
            raise ValueError(
                f"image_models[{i}].name: {model.name!r} is listed twice; list it once"
            )
        models.append(model)
    return tuple(models)


def _image_model(where: str, entry: Any) -> ImageModel:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a table; write it as [[image_models]]")
    for key, (meaning, optional) in _KEYS.items():
        if key not in entry and not optional:
            raise ValueError(f"{where}.{key}: missing; give {meaning}")
    for key in entry:
        if key not in _KEYS:
            raise ValueError(f"{where}.{key}: unknown key; an image model has {', '.join(_KEYS)}")
    size = entry["default_size"]
    trigger = entry.get("trigger", [])
    if not (isinstance(size, list) and len(size) == 2 and all(type(s) is int for s in size)):
        raise ValueError(f"{where}.default_size: {size!r} is not {_KEYS['default_size'][0]}")
    if not isinstance(trigger, list):
        raise ValueError(f"{where}.trigger: {trigger!r} is not {_KEYS['trigger'][0]}")
    values = {
        "name": entry["name"],
        "baseline": entry["baseline"],
        "sha256": entry["sha256"].lower() if isinstance(entry["sha256"], str) else None,
        "default_width": size[0],
        "default_height": size[1],
        "max_pixels": entry["max_pixels"],
        "max_steps": entry["max_steps"],
        "nsfw": entry.get("nsfw", False),
        "trigger": tuple(trigger),
    }
    try:
        model = ImageModel(**values)
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0])
        key = _FIELD_KEYS.get(field, field)
        raise ValueError(f"{where}.{key}: {entry[key]!r} is not {_KEYS[key][0]}") from None
    for side in ("width", "height"):
        if getattr(model, f"default_{side}") % 8:
            raise ValueError(f"{where}.default_size: {size!r} is not {_KEYS['default_size'][0]}")
    if model.default_width * model.default_height > model.max_pixels:
        raise ValueError(
            f"{where}.default_size: {size[0]}x{size[1]} is over max_pixels "
            f"({model.max_pixels}); make it smaller or raise max_pixels"
        )
    return model


def find(config: CoordinatorConfig, name: str | None) -> ImageModel | None:
    if name is None or not config.image_models:
        return None
    return _index(config.image_models).get(name)


# id(the config's models) -> (those models, by name): every pop looks its names up
_INDEXES: dict[int, tuple[tuple[ImageModel, ...], dict[str, ImageModel]]] = {}


def _index(models: tuple[ImageModel, ...]) -> dict[str, ImageModel]:
    known = _INDEXES.get(id(models))
    if known is not None and known[0] is models:
        return known[1]
    index = {m.name: m for m in models}
    if len(_INDEXES) > 8:  # (one config per process; tests make more)
        _INDEXES.clear()
    _INDEXES[id(models)] = (models, index)
    return index


def uncatalogued_allowed(config: CoordinatorConfig) -> bool:
    """Whether workers may serve names the reference does not list (by default only while
    it lists none: a coordinator without a reference serves any model, as it always has)."""
    if config.allow_uncatalogued_models is None:
        return not config.image_models
    return config.allow_uncatalogued_models


def baseline(config: CoordinatorConfig, params: ImageParams) -> Baseline:
    """The baseline a job is priced at: its catalog model's. A job naming an uncatalogued
    model or none is priced as sd1, whoever serves it: a worker's word does not set what
    requesters pay."""
    model = find(config, params.model)
    return "sd1" if model is None else model.baseline


def named_only(config: CoordinatorConfig, models: Sequence[str]) -> bool:
    """Whether a worker offering `models` gets only jobs naming one of them: when each is a
    catalog model costing more than sd1 (SDXL), since a job naming no model is priced as
    sd1 and would pay it less than its work costs."""
    baselines = [find(config, name) for name in models]
    return bool(baselines) and all(
        m is not None and BASELINE_FACTORS[m.baseline] > BASELINE_FACTORS["sd1"] for m in baselines
    )


def price(config: CoordinatorConfig, params: ImageParams) -> int:
    """Kudos for an image job: reserved when it is queued (job.cost) and paid from that."""
    return image_cost(params, baseline(config, params))


def with_default_size(config: CoordinatorConfig, params: ImageParams) -> ImageParams:
    """`params` at its catalog model's default size (for a request that gave no size)."""
    model = find(config, params.model)
    if model is None:
        return params
    size = {"width": model.default_width, "height": model.default_height}
    return ImageParams.model_validate({**params.model_dump(), **size})


def check_job(config: CoordinatorConfig, params: ImageParams, nsfw: bool, prefix: str = "") -> None:
    """BadRequest naming each field of a job that its catalog model does not allow
    (`prefix`: where the door keeps the size and steps, "params." on /api/v2)."""
    model = find(config, params.model)
    if model is None:
        if params.model is not None and not uncatalogued_allowed(config):
            names = ", ".join(m.name for m in config.image_models)
            problem = (
                f"{params.model!r} is not in this coordinator's image model reference; "
                f"choose one of: {names}"
            )
            raise BadRequest(f"model: {problem}", [("model", problem)])
        return
    problems: list[tuple[str, str]] = []
    if params.pixels > model.max_pixels:
        problems.append(
            (
                f"{prefix}width",
                f"{params.width}x{params.height} is over {model.name}'s {model.max_pixels} "
                "pixels; ask for a smaller width or height",
            )
        )
    if params.steps > model.max_steps:
        problems.append(
            (
                f"{prefix}steps",
                f"{params.steps} is over {model.name}'s {model.max_steps} steps; ask for fewer",
            )
        )
    if model.nsfw and not nsfw:
        problems.append(("nsfw", f"{model.name} is an NSFW model; send nsfw=true to use it"))
    if problems:
        raise BadRequest("; ".join(f"{f}: {m}" for f, m in problems), problems)


def check_pop(
    config: CoordinatorConfig, models: Sequence[str], sha256: str | None, *, horde: bool = False
) -> None:
    """BadRequest unless every catalog name a worker offers pins the checkpoint hash it
    reported, and every other name is allowed here (the worker gets no jobs until it
    matches). An AI Horde worker (`horde`) cannot report a hash: its catalog names are taken
    as AI Horde takes them (its bridge checks the reference's hash itself; its results are
    unsigned and held for dispute), its other names only where uncatalogued ones are."""
    problems: list[tuple[str, str]] = []
    allowed = uncatalogued_allowed(config)
    for i, name in enumerate(models):
        model = find(config, name)
        if model is None:
            if not allowed:
                problems.append(
                    (
                        f"models[{i}]",
                        f"{name!r} is not in this coordinator's image model reference "
                        "(GET /api/v1/models/image) and the operator serves only those",
                    )
                )
        elif sha256 != model.sha256 and not horde:
            problems.append(
                (
                    "checkpoint_sha256",
                    f"{name!r} is the checkpoint with SHA-256 {model.sha256}, but this "
                    + ("worker reported none" if sha256 is None else f"worker holds {sha256}"),
                )
            )
    if problems:
        raise BadRequest(
            "the coordinator refuses these models: "
            + "; ".join(message for _, message in problems)
            + ". Serve the reference's checkpoint under its name, or name yours otherwise "
            "(--model-name)",
            problems,
        )
