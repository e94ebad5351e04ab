"""The donor's post-processor weights: which of AI Horde's post-processors a folder holds.

`idlegrid worker image --post-processors DIR`: each file is named after AI Horde's
post-processor, `NAME.safetensors` or `NAME.pth` (the `.pth` read only through
`torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers). The worker advertises exactly the names found; the engine loads them
(worker.image.postprocess). No torch here: the worker process only lists files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from protocol.postprocess import POST_PROCESSORS, REFUSED_POST_PROCESSORS
from worker.errors import ModelNotFound, UnsafeWeights

__all__ = ["WEIGHT_SUFFIXES", "post_processor_files"]

log = logging.getLogger(__name__)

# preferred first
WEIGHT_SUFFIXES = (".safetensors", ".pth")
_PICKLES = (".ckpt", ".pt", ".bin", ".pkl", ".pickle")


def post_processor_files(folder: Path) -> dict[str, Path]:
    """AI Horde post-processor name -> its weights file in `folder`. ModelNotFound when the
    folder is missing or holds none; UnsafeWeights for one in a pickle format."""
    if not folder.is_dir():
        raise ModelNotFound(f"--post-processors {folder}: no such folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.stem in REFUSED_POST_PROCESSORS:
            log.warning("--post-processors: ignoring %s: it %s", path.name, "is refused here")
            continue
        if path.stem not in POST_PROCESSORS:
            continue
        if path.suffix in _PICKLES:
            raise UnsafeWeights(
                f"--post-processors: {path.name} is a pickle, which can run code when loaded; "
                "convert it to .safetensors (or a plain tensors-only .pth)"
            )
        if path.suffix in WEIGHT_SUFFIXES and path.is_file():
            if path.stem in found and found[path.stem].suffix == WEIGHT_SUFFIXES[0]:
                continue
            found[path.stem] = path
    if not found:
        names = ", ".join(f"{n}.safetensors" for n in POST_PROCESSORS)
        raise ModelNotFound(
            f"--post-processors {folder}: no post-processor weights found; name the files "
            f"after AI Horde's post-processors: {names} (or .pth)"
        )
    return found
