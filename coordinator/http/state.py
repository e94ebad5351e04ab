"""Typed application state shared by the handlers (aiohttp `AppKey`s)."""

from __future__ import annotations

from aiohttp import web

from coordinator.clock import Clock
from coordinator.config import CoordinatorConfig
from coordinator.http.ratelimit import RateLimiter
from coordinator.http.views import SharedViews
from coordinator.jobs.files import ResultFiles
from coordinator.jobs.signals import Signals
from coordinator.jobs.uploads import Uploads
from coordinator.store import Store

__all__ = ["CLOCK", "CONFIG", "FILES", "LIMITER", "SIGNALS", "STORE", "UPLOADS", "VIEWS"]

CONFIG = web.AppKey("config", CoordinatorConfig)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
STORE = web.AppKey("store", Store)
FILES = web.AppKey("files", ResultFiles)
SIGNALS = web.AppKey("signals", Signals)
LIMITER = web.AppKey("limiter", RateLimiter)
UPLOADS = web.AppKey("uploads", Uploads)
VIEWS = web.AppKey("views", SharedViews)
