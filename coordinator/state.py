"""Typed application state shared by the handlers (aiohttp `AppKey`s)."""

from __future__ import annotations

from aiohttp import web

from coordinator.config import CoordinatorConfig
from coordinator.ratelimit import RateLimiter
from coordinator.results import ResultFiles
from coordinator.signals import Signals
from coordinator.store import Store
from coordinator.uploads import Uploads

__all__ = ["CONFIG", "FILES", "LIMITER", "SIGNALS", "STORE", "UPLOADS"]

CONFIG = web.AppKey("config", CoordinatorConfig)
STORE = web.AppKey("store", Store)
FILES = web.AppKey("files", ResultFiles)
SIGNALS = web.AppKey("signals", Signals)
LIMITER = web.AppKey("limiter", RateLimiter)
UPLOADS = web.AppKey("uploads", Uploads)
