"""Reading a job's event stream in a test: what it sent, and events to wait on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from protocol.messages import JobStatus
from protocol.preview import JobPreview

__all__ = ["Collected"]


class Collected:
    """What one event stream sent; `opened` is set on its first event, `previewed` on its
    first preview."""

    def __init__(self) -> None:
        self.items: list[JobStatus | JobPreview] = []
        self.opened = asyncio.Event()
        self.previewed = asyncio.Event()

    async def read(self, events: AsyncIterator[JobStatus | JobPreview]) -> None:
        async for item in events:
            self.items.append(item)
            self.opened.set()
            if isinstance(item, JobPreview):
                self.previewed.set()
