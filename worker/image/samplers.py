"""AUTOMATIC1111 sampler names mapped onto diffusers schedulers.

The table follows diffusers' "schedulers" documentation, which lists the A1111 equivalent
of each scheduler. None of these needs `torchsde`: the SDE variants use
`DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`, whose noise comes from the
pipeline's generator, so they stay reproducible per seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from protocol.samplers import SAMPLERS

__all__ = ["SCHEDULER_SPECS", "make_scheduler"]

_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
# SD's own DDIM / PNDM settings, in case the base config came from another scheduler class
# (from_config would otherwise fall back to those classes' defaults).
_DDIM = {"clip_sample": False, "set_alpha_to_one": False}
_PLMS = {"skip_prk_steps": True, "set_alpha_to_one": False}

# A1111 name -> (diffusers scheduler class name, options passed to from_config)
SCHEDULER_SPECS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType(
    {
        "Euler": ("EulerDiscreteScheduler", {}),
        "Euler a": ("EulerAncestralDiscreteScheduler", {}),
        "Heun": ("HeunDiscreteScheduler", {}),
        "DPM2": ("KDPM2DiscreteScheduler", {}),
        "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
        "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
        "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", _KARRAS),
        "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", _SDE),
        "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
        "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
        "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", _KARRAS),
        "DDIM": ("DDIMScheduler", _DDIM),
        "PLMS": ("PNDMScheduler", _PLMS),
        "LMS": ("LMSDiscreteScheduler", {}),
        "LMS Karras": ("LMSDiscreteScheduler", _KARRAS),
        "UniPC": ("UniPCMultistepScheduler", {}),
    }
)

if set(SCHEDULER_SPECS) != set(SAMPLERS):  # pragma: no cover - guards the two tables
    raise RuntimeError("SCHEDULER_SPECS and protocol.samplers.SAMPLERS list different names")


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for sampler `name`, keeping the model's betas and timestep options.

    `base_config` is the model's own scheduler config (`pipe.scheduler.config`). Raises
    `KeyError` naming the sampler if it is unknown; callers validate names at the boundary.
    """
    try:
        class_name, options = SCHEDULER_SPECS[name]
    except KeyError:
        known = ", ".join(SCHEDULER_SPECS)
        raise KeyError(f"unknown sampler {name!r}; choose one of: {known}") from None
    cls = getattr(diffusers, class_name)
    scheduler: SchedulerMixin = cls.from_config(dict(base_config), **options)
    return scheduler
