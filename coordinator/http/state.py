"""Typed application state shared by the handlers (aiohttp `AppKey`s)."""

from __future__ import annotations

from aiohttp import web

from coordinator.clock import Clock
from coordinator.config import CoordinatorConfig
from coordinator.files import FileStore
from coordinator.http.ratelimit import RateLimiter
from coordinator.http.views import SharedViews
from coordinator.jobs.previews import Previews
from coordinator.jobs.signals import Signals
from coordinator.store import Store

__all__ = [
    "CLOCK",
    "CONFIG",
    "FILES",
    "LIMITER",
    "PREVIEWS",
    "REQUESTER_KEY",
    "SIGNALS",
    "STORE",
    "VIEWS",
]

CONFIG = web.AppKey("config", CoordinatorConfig)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
STORE = web.AppKey("store", Store)
FILES = web.AppKey("files", FileStore)
SIGNALS = web.AppKey("signals", Signals)
LIMITER = web.AppKey("limiter", RateLimiter)
VIEWS = web.AppKey("views", SharedViews)
PREVIEWS = web.AppKey("previews", Previews)
# keys the requester tags of text jobs (coordinator.http.text.requester_tag): one key for
# every process on the database (coordinator.db.secrets)
REQUESTER_KEY = web.AppKey("requester_key", bytes)
