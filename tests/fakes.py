"""A worker without an engine: real identity, real HTTP link, PNGs drawn with Pillow."""

from __future__ import annotations

import io

from PIL import Image

from protocol.signing import Identity
from worker.link import Capabilities, CoordinatorLink

__all__ = ["FakeWorker", "png"]

CAPS = Capabilities(models=["tiny"], max_pixels=512 * 512, max_steps=50)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeWorker:
    def __init__(self, url: str, name: str = "fake", api_key: str | None = None) -> None:
        self.identity = Identity.generate()
        self.link = CoordinatorLink(url, self.identity, name, api_key)

    async def __aenter__(self) -> FakeWorker:
        await self.link.register()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.link.aclose()
