"""The safetensors files of a local LLM folder, read tensor by tensor.

`SafetensorsCheckpoint` resolves tensor names to files (a single `model.safetensors` or a
sharded `model.safetensors.index.json`) and reads shapes from the file headers without
loading data, so a block server reads only its layers and a gateway only the head.
Pickle-based weights are refused.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from worker.errors import ModelNotFound, UnsafeWeights

__all__ = ["INDEX_FILE", "SINGLE_FILE", "SafetensorsCheckpoint"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _read_header(path: Path) -> dict[str, dict[str, object]]:
    """A safetensors file's JSON header (names, dtypes, shapes), without touching the data."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header: dict[str, dict[str, object]] = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header


class SafetensorsCheckpoint:
    """The safetensors files of a model folder: which file holds which tensor, and shapes."""

    def __init__(self, model_dir: Path, files_by_key: dict[str, Path]) -> None:
        self.model_dir = model_dir
        self.files_by_key = files_by_key

    @classmethod
    def open(cls, model_dir: Path) -> SafetensorsCheckpoint:
        model_dir = Path(model_dir)
        index = model_dir / INDEX_FILE
        single = model_dir / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls(model_dir, {key: model_dir / name for key, name in weight_map.items()})
        if single.is_file():
            return cls(model_dir, {key: single for key in _read_header(single)})
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise UnsafeWeights(
                f"{model_dir} has only pickle-based weights; convert them to safetensors"
            )
        raise ModelNotFound(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def __contains__(self, key: str) -> bool:
        return key in self.files_by_key

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from the file headers only."""
        shapes: dict[str, tuple[int, ...]] = {}
        for path in sorted(set(self.files_by_key.values())):
            for key, info in _read_header(path).items():
                shape = info["shape"]
                assert isinstance(shape, list)
                shapes[key] = tuple(int(n) for n in shape)
        return shapes

    def param_count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes().values())

    def load(
        self, keys: Iterable[str], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The named tensors (opening only the files that hold them), cast to `dtype` if given."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.files_by_key:
                raise ModelNotFound(
                    f"tensor {key!r} is missing from the weights in {self.model_dir}"
                )
            by_file.setdefault(self.files_by_key[key], []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        for path, file_keys in by_file.items():
            with safe_open(str(path), framework="pt") as file:
                for key in file_keys:
                    tensor = file.get_tensor(key)
                    tensors[key] = tensor if dtype is None else tensor.to(dtype)
        return tensors
