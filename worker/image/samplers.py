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
import numpy as np
import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from protocol.samplers import SAMPLERS, WITHOUT_KARRAS

__all__ = ["SCHEDULER_SPECS", "KarrasEulerAncestralScheduler", "make_scheduler"]

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
        "LCM": ("LCMScheduler", {}),
    }
)

if set(SCHEDULER_SPECS) != set(SAMPLERS):  # pragma: no cover - guards the two tables
    raise RuntimeError("SCHEDULER_SPECS and protocol.samplers.SAMPLERS list different names")


class KarrasEulerAncestralScheduler(EulerAncestralDiscreteScheduler):
    """Euler a on Karras sigmas (diffusers' Euler a has no `use_karras_sigmas`): the sigmas
    and timesteps EulerDiscreteScheduler computes with Karras sigmas, stepped ancestrally."""

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None
    ) -> None:
        super().set_timesteps(num_inference_steps, "cpu" if device is None else device)
        linear = self.sigmas[:-1]
        alphas = self.alphas_cumprod.numpy()
        log_sigmas = np.log(((1 - alphas) / alphas) ** 0.5)
        # (EulerDiscreteScheduler's own conversions, on this scheduler's config)
        karras = EulerDiscreteScheduler._convert_to_karras(
            self,
            in_sigmas=linear.numpy(),
            num_inference_steps=num_inference_steps,
        )
        timesteps = np.array(
            [EulerDiscreteScheduler._sigma_to_t(self, s, log_sigmas) for s in karras]
        )
        sigmas = np.concatenate([karras, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self._step_index = None
        self._begin_index = None


def make_scheduler(
    name: str, base_config: Mapping[str, Any], *, karras: bool = False
) -> SchedulerMixin:
    """A fresh scheduler for sampler `name`, keeping the model's betas and timestep options;
    `karras`: on Karras sigmas (for the samplers not in `WITHOUT_KARRAS`).

    `base_config` is the model's own scheduler config (`pipe.scheduler.config`). Raises
    `KeyError` naming the sampler if it is unknown, `ValueError` for Karras sigmas with a
    sampler that takes none; callers validate both at the boundary.
    """
    try:
        class_name, options = SCHEDULER_SPECS[name]
    except KeyError:
        known = ", ".join(SCHEDULER_SPECS)
        raise KeyError(f"unknown sampler {name!r}; choose one of: {known}") from None
    if karras and name in WITHOUT_KARRAS:
        raise ValueError(f"sampler {name!r} takes no Karras sigmas")
    cls = getattr(diffusers, class_name)
    if karras and cls is EulerAncestralDiscreteScheduler:
        cls = KarrasEulerAncestralScheduler
    elif karras:
        options = {**options, **_KARRAS}
    scheduler: SchedulerMixin = cls.from_config(dict(base_config), **options)
    return scheduler
