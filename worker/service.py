"""Running a worker service in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

__all__ = ["run_until_signalled"]


async def run_until_signalled(service: Coroutine[Any, Any, None]) -> bool:
    """Run `service` until it returns or SIGINT/SIGTERM cancels it (its cleanup runs on
    cancellation). Returns True when a signal stopped it."""
    task = asyncio.ensure_future(service)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        return True
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return False
