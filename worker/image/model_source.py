"""Turn a `--model` argument into a safe, explicit model source.

A worker only ever loads safetensors weights: pickle-based files can run arbitrary code
when loaded, and a volunteer's machine must never do that for a downloaded checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from worker.errors import ModelConfigMissing, ModelNotFound, UnsafeWeights

__all__ = ["PICKLE_SUFFIXES", "ModelSource", "download_hub_model", "resolve_model"]

PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"})
SAFE_SUFFIX = ".safetensors"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_CONVERT_HINT = (
    "convert it to .safetensors (e.g. with `safetensors.torch.save_file` on a trusted "
    "machine, or diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py "
    "--to_safetensors)"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a Stable Diffusion pipeline comes from."""

    kind: Literal["folder", "single_file", "hub"]
    # local path for "folder" and "single_file"; the repository id for "hub"
    location: str
    # local diffusers-format folder with the configs a single file lacks; None otherwise
    config_dir: Path | None
    # short name shown to users and written into PNGs
    name: str


def resolve_model(spec: str, config_dir: Path | None = None) -> ModelSource:
    """Check `spec` (a folder, a `.safetensors` file or a hub id) and describe it.

    `config_dir` is only used for a single file. Raises `UnsafeWeights` for pickle-based
    weights, `ModelConfigMissing` for a single file without a config folder, and
    `ModelNotFound` for anything else that is not a usable model.
    """
    # Absolute paths: the engine that loads them runs in a private working directory.
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        _check_folder(path)
        return ModelSource("folder", str(path), None, path.name)
    if path.is_file():
        return _single_file(path, config_dir)
    if _HUB_ID.fullmatch(spec) and ".." not in spec:
        return ModelSource("hub", spec, None, spec)
    raise ModelNotFound(
        f"no model at {spec!r}: it is not an existing folder or file, nor a hub id "
        "of the form owner/name"
    )


def _single_file(path: Path, config_dir: Path | None) -> ModelSource:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeWeights(f"refusing to load pickle-based weights from {path}: {_CONVERT_HINT}")
    if suffix != SAFE_SUFFIX:
        raise ModelNotFound(
            f"{path} is not a model file: expected a {SAFE_SUFFIX} file or a diffusers folder"
        )
    if config_dir is None:
        raise ModelConfigMissing(
            f"{path} is a single-file checkpoint, which holds weights but no configs: pass "
            "--model-config DIR with a local diffusers-format folder of the same architecture"
        )
    if not (config_dir / "model_index.json").is_file():
        raise ModelConfigMissing(
            f"model config folder {config_dir} has no model_index.json: pass --model-config "
            "DIR with a local diffusers-format folder of the same architecture"
        )
    return ModelSource("single_file", str(path), config_dir.resolve(), path.stem)


def _check_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        raise ModelNotFound(
            f"{path} is not a diffusers model folder (no model_index.json); pass a diffusers "
            f"folder or a {SAFE_SUFFIX} file"
        )
    weights = [p for p in path.rglob("*") if p.is_file() and _is_weight_file(p)]
    if not weights:
        raise ModelNotFound(f"{path} holds no weights ({SAFE_SUFFIX} files)")
    # Judge each component folder on its own: one pickle-only component would otherwise
    # make the whole load fail later, or worse, fall back to the pickle.
    for directory in sorted({p.parent for p in weights}):
        files = [p for p in weights if p.parent == directory]
        if not any(p.suffix.lower() == SAFE_SUFFIX for p in files):
            names = ", ".join(sorted(p.name for p in files))
            raise UnsafeWeights(
                f"refusing to load pickle-based weights from {directory} ({names}): {_CONVERT_HINT}"
            )


def _is_weight_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix == SAFE_SUFFIX or suffix in PICKLE_SUFFIXES


def download_hub_model(source: ModelSource, into: Path) -> ModelSource:
    """Fetch a hub model's configs, tokenizer and safetensors weights (never pickles) into
    `into/<owner>--<name>` as plain files, and describe that folder.

    The worker does this before the engine starts: the confined engine has no network and
    is handed the folder read-only. A folder fetched earlier is checked again and reused
    (huggingface_hub skips files it already has).
    """
    if source.kind != "hub":
        return source
    from huggingface_hub import snapshot_download

    folder = into / source.location.replace("/", "--")
    try:
        snapshot_download(
            source.location,
            local_dir=folder,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
        )
    except Exception as exc:  # the hub client raises many kinds: offline, 404, auth
        raise ModelNotFound(
            f"could not download {source.location!r} from the Hugging Face Hub ({exc}); "
            "download it yourself and pass the local folder"
        ) from exc
    _check_folder(folder)
    return ModelSource("folder", str(folder), None, source.name)
