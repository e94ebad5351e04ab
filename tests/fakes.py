"""A worker without an engine: real identity, real HTTP link, PNGs drawn with Pillow.

`FakeImageEngine` is the other half: an engine for a real sandbox (and a real
ImageWorker) that draws solid PNGs instead of running a model. `register_accounts` makes
the requesters (and worker owners) of a test.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

from PIL import Image

from client.api import AsyncTransport
from client.sdk import AsyncClient
from protocol.engine import IMAGE, ImageProgress, ImageResult
from protocol.messages import LeasedJob
from protocol.params import ImageParams
from protocol.signing import Identity
from sandbox.calls import CallTable, Emit
from worker.common.link import Capabilities, CoordinatorLink

__all__ = ["CAPS", "FakeImageEngine", "FakeWorker", "job_pngs", "png", "register_accounts"]

CAPS = Capabilities(models=["tiny"], max_pixels=512 * 512, max_steps=50)


async def register_accounts(url: str, *names: str) -> list[str]:
    """Register accounts `names` on the coordinator at `url`; their API keys, in order."""
    async with AsyncClient(url) as anon:
        return [(await anon.register(name)).api_key for name in names]


@functools.lru_cache(maxsize=64)
def png(seed: int, width: int = 64, height: int = 64, compress_level: int = 1) -> bytes:
    """A solid PNG whose colour depends on `seed` (compress_level 0: as large as a PNG of
    that size gets; fast at any size)."""
    buffer = io.BytesIO()
    colour = (seed % 256, (seed // 256) % 256, 7)
    Image.new("RGB", (width, height), colour).save(
        buffer, format="PNG", compress_level=compress_level
    )
    return buffer.getvalue()


def job_pngs(job: LeasedJob, offset: int = 0, compress_level: int = 1) -> list[bytes]:
    """One PNG per image of the job, at its size (`offset` shifts the colours: a wrong image)."""
    params = job.params
    return [png(s + offset, params.width, params.height, compress_level) for s in params.seeds()]


class FakeWorker:
    """A registered worker whose link (`transport`: the network by default; e.g. an
    in-memory one of tests/inmemory.py) the test drives by hand."""

    def __init__(
        self,
        url: str,
        name: str = "fake",
        api_key: str | None = None,
        *,
        transport: AsyncTransport | None = None,
    ) -> None:
        self.identity = Identity.generate()
        self.link = CoordinatorLink(url, self.identity, name, api_key, transport=transport)

    async def __aenter__(self) -> FakeWorker:
        await self.link.register()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.link.aclose()


class FakeImageEngine:
    """Runs in a sandbox child: answers an "image" call with solid PNGs of the size in its
    options (`{"size": [w, h]}`; default the job's own size)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.size = options.get("size")
        self.calls = CallTable()
        self.calls.add(IMAGE, self.image)

    def handle(
        self, kind: str, payload: dict[str, object], emit: Callable[[dict[str, object]], None]
    ) -> tuple[dict[str, object], list[bytes]]:
        return self.calls.handle(kind, payload, emit)

    def image(
        self, params: ImageParams, emit: Emit[ImageProgress]
    ) -> tuple[ImageResult, list[bytes]]:
        width, height = self.size or params.output_size
        seeds = params.seeds()
        result = ImageResult(seeds=seeds, model="fake", width=params.width, height=params.height)
        return result, [png(seed, width, height) for seed in seeds]
