"""The operator's text models: their names and sizes, and so their prices.

A model's blocks and parameters price every token of it (protocol.cost), so they come
from the coordinator's catalog (`CoordinatorConfig.text_models`: built-in, or
`idlegrid coordinator --models FILE`), never from a worker. Requests name a catalog model
or get the default; a gateway may offer only catalog models with exactly their sizes;
settlement prices with the catalog. `parse_catalog` reads the TOML file (its image models,
`[[image_models]]`: coordinator.economy.image_models):

    default = "smollm2"          # the model of requests that name none

    [[models]]
    name = "smollm2"             # the name gateways and block servers use
    parameters = 134515008       # total parameter count
    blocks = 30                  # decoder blocks (num_hidden_layers)
    context = 8192               # tokens, prompt included
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from coordinator.config import CoordinatorConfig
from coordinator.errors import BadRequest
from protocol.text import TextModel

__all__ = ["check_offer", "choose", "find", "names", "parse_catalog"]

# TOML key -> (TextModel field, what it means)
_KEYS = {
    "name": ("name", "the model's name in the swarm, 1-128 characters"),
    "parameters": ("parameters", "the model's total parameter count, a whole number >= 1"),
    "blocks": ("blocks", "its decoder blocks (num_hidden_layers), a whole number 1-1024"),
    "context": ("max_context", "its context in tokens, a whole number 16-1048576"),
}


def names(config: CoordinatorConfig) -> str:
    return ", ".join(m.name for m in config.text_models)


def find(config: CoordinatorConfig, name: str) -> TextModel | None:
    return next((m for m in config.text_models if m.name == name), None)


def choose(config: CoordinatorConfig, name: str | None, field: str) -> TextModel:
    """The catalog model a request names, or the default; 400 listing the known ones."""
    model = find(config, config.default_text_model if name is None else name)
    if model is None:
        raise BadRequest(
            f"model {name!r} is not served here; choose one of: {names(config)}",
            [(field, f"must be one of: {names(config)}")],
        )
    return model


def check_offer(config: CoordinatorConfig, offered: Sequence[TextModel]) -> list[TextModel]:
    """The catalog entries of the models a gateway offers; 400 naming every model that is
    not in the catalog or has other sizes (the gateway gets no jobs until it matches)."""
    problems: list[tuple[str, str]] = []
    for i, model in enumerate(offered):
        known = find(config, model.name)
        if known is None:
            problems.append(
                (
                    f"models[{i}].name",
                    f"model {model.name!r} is not in this coordinator's catalog "
                    f"(it prices only: {names(config)})",
                )
            )
        elif known != model:
            problems.append(
                (
                    f"models[{i}]",
                    f"model {model.name!r} must have {known.sizes()} here, "
                    + f"not {model.sizes()}",
                )
            )
    if problems:
        raise BadRequest(
            "the coordinator refuses these models: "
            + "; ".join(message for _, message in problems)
            + ". Serve a model of the catalog (GET /v1/models) unchanged, or ask the "
            "operator to add yours to `idlegrid coordinator --models FILE`",
            problems,
        )
    return [m for m in config.text_models if m in offered]


def parse_catalog(text: str) -> tuple[tuple[TextModel, ...], str]:
    """(models, default model) from a `--models` TOML file; ValueError naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML ({exc})") from None
    # (its [[image_models]]: coordinator.economy.image_models)
    unknown = sorted(set(data) - {"default", "models", "image_models"})
    if unknown:
        raise ValueError(
            f"{unknown[0]}: unknown key; the file has `default`, [[models]] and [[image_models]]"
        )
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            "models: missing; give one [[models]] table per model with " + ", ".join(_KEYS)
        )
    models: list[TextModel] = []
    for i, entry in enumerate(entries):
        model = _model(f"models[{i}]", entry)
        if any(m.name == model.name for m in models):
            raise ValueError(f"models[{i}].name: {model.name!r} is listed twice; list it once")
        models.append(model)
    default = data.get("default")
    if default is None and len(models) == 1:
        default = models[0].name
    if not isinstance(default, str) or all(m.name != default for m in models):
        listed = ", ".join(m.name for m in models)
        raise ValueError(
            f"default: must name one of the models ({listed}), e.g. default = {models[0].name!r}"
        )
    return tuple(models), default


def _model(where: str, entry: Any) -> TextModel:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a table; write it as [[models]]")
    for key in _KEYS:
        if key not in entry:
            raise ValueError(f"{where}.{key}: missing; give {_KEYS[key][1]}")
    for key, value in entry.items():
        if key not in _KEYS:
            raise ValueError(f"{where}.{key}: unknown key; a model has {', '.join(_KEYS)}")
        expected = str if key == "name" else int
        if type(value) is not expected:
            raise ValueError(f"{where}.{key}: {value!r} is not {_KEYS[key][1]}")
    try:
        return TextModel(**{_KEYS[key][0]: value for key, value in entry.items()})
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0])
        key = next(k for k, (f, _) in _KEYS.items() if f == field)
        raise ValueError(f"{where}.{key}: {entry[key]!r} is not {_KEYS[key][1]}") from None
