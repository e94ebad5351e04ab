"""GET /api/v1/models/image: the operator's image model reference
(coordinator.economy.image_models), for clients choosing a model and its size."""

from __future__ import annotations

from aiohttp import web

from coordinator.economy import image_models
from coordinator.http.api import API, Call
from coordinator.http.state import CONFIG
from protocol.messages import ImageModelList

__all__ = ["list_image_models"]


@API.route(
    "GET",
    "/api/v1/models/image",
    summary="The image model reference: each model's baseline, checkpoint SHA-256, default "
    "and largest size, most steps, nsfw and trigger words; and whether workers may serve "
    "models it does not list",
    response=ImageModelList,
    auth="optional",
)
async def list_image_models(request: web.Request, call: Call[None]) -> ImageModelList:
    config = request.app[CONFIG]
    return ImageModelList(
        models=list(config.image_models),
        uncatalogued=image_models.uncatalogued_allowed(config),
    )
