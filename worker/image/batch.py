"""The images of one job as UNet batches, with the pixels of one-by-one rendering.

A job's n images run through the pipeline together (`num_images_per_prompt`) while
width x height x images stays within the engine's `max_batch_pixels` (ImageEngineOptions,
`--max-batch-pixels`), else in consecutive chunks of as many as fit; 0 renders one at a time.
Every image keeps its own CPU generator seeded `seed + i`: diffusers draws image i's noise
(initial latents, a source image's VAE sample, an ancestral sampler's noise) from
generator i alone, in the same order as for a lone image. Batched matrix products may round
differently in the last bits, so a batched image can differ from its lone rendering by a
level or two of 255 (tests bound it by 2; `bench/image_batch.py` measures it).

Every kind of job batches: txt2img, img2img, inpainting, ControlNet and the hires fix (both
passes), since diffusers repeats the source, mask and control map over the batch itself.

Progress: the images of a batch advance together, so a step of a batch of k images is
reported as the position one-by-one rendering would have reached after the same work
(`BatchProgress`): `image * steps + step` counts the image-steps done, which is how the
coordinator computes a job's progress and ETA (`coordinator.jobs.queue.eta_of`), and the
last event is still image n - 1 at step `steps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protocol.engine import ImageProgress

__all__ = ["BatchProgress", "chunks", "generators"]


def chunks(n: int, pixels: int, max_batch_pixels: int) -> list[range]:
    """The job's image indices in batches of at most `max_batch_pixels // pixels` images
    (at least one each); `pixels`: one image's width x height (the largest pass's)."""
    size = max(1, max_batch_pixels // max(pixels, 1))
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def generators(seeds: Sequence[int]) -> torch.Generator | list[torch.Generator]:
    """One CPU generator per image; a lone image gets a bare generator, as before batching."""
    made = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return made[0] if len(made) == 1 else made


@dataclass(frozen=True)
class BatchProgress:
    """Progress events of the batch `images` of a job of `n` images, `steps` each."""

    images: range
    steps: int
    n: int

    def event(self, step: int, preview: str | None = None) -> ImageProgress:
        """The event after the batch's images have all finished `step` steps (with the
        live preview of the batch's first image, if one is due)."""
        done = self.images.start * self.steps + len(self.images) * step
        image = max(0, (done - 1) // self.steps)
        step = done - image * self.steps
        return ImageProgress(image=image, step=step, steps=self.steps, n=self.n, preview=preview)
