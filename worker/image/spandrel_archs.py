"""spandrel's ESRGAN and GFPGAN architectures, imported without spandrel's main registry.

`import spandrel` (0.4.2, its latest release) builds its registry of every architecture it
knows, and two of them (LaMa, RestoreFormer) import torchvision at module level; PyPI's
torchvision does not load beside our CPU build of torch (it fails with "operator
torchvision::nms does not exist"), and we do not install it. Older releases import it the
same way. So the `spandrel` package object is created here without running its
`__init__` (the import system then finds its submodules as usual), and only the modules
we use are imported: the ESRGAN (RRDBNet) and GFPGAN architectures and the state-dict
canonicaliser. Neither needs torchvision. The rest of spandrel is never imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

__all__ = ["canonicalize_state_dict", "esrgan_arch", "gfpgan_arch", "spandrel_module"]


def _package() -> ModuleType:
    loaded = sys.modules.get("spandrel")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("spandrel")
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("spandrel is not installed (pip install spandrel==0.4.2)")
    # the package without its __init__ (which would import every architecture)
    package = importlib.util.module_from_spec(spec)
    sys.modules["spandrel"] = package
    return package


def spandrel_module(name: str) -> Any:
    """The module `spandrel.<name>`, imported without spandrel's registry."""
    _package()
    return importlib.import_module(f"spandrel.{name}")


def esrgan_arch() -> Any:
    """A new `spandrel.architectures.ESRGAN.ESRGANArch`."""
    return spandrel_module("architectures.ESRGAN").ESRGANArch()


def gfpgan_arch() -> Any:
    """A new `spandrel.architectures.GFPGAN.GFPGANArch`."""
    return spandrel_module("architectures.GFPGAN").GFPGANArch()


def canonicalize_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """spandrel's canonical form of a checkpoint's state dict (unwraps `params_ema`,
    `params`, `state_dict`, strips `module.` prefixes)."""
    result: dict[str, Any] = spandrel_module("__helpers.canonicalize").canonicalize_state_dict(
        state_dict
    )
    return result
