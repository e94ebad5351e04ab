"""GET /api/v1/samplers: the sampler names an image job accepts (protocol.samplers), in
order, with each one's cost factor and the default; the web page fills its form from it."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from coordinator.http.api import API, Call
from protocol.samplers import DEFAULT_SAMPLER, SAMPLERS

__all__ = ["SamplerInfo", "SamplerList", "samplers"]


class SamplerInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="as AUTOMATIC1111 users know it; the `sampler` of a job")
    evaluations_per_step: int = Field(
        description="model evaluations per step: its factor in the kudos cost (2 = double)"
    )


class SamplerList(BaseModel):
    model_config = ConfigDict(frozen=True)

    samplers: list[SamplerInfo]
    default: str = Field(description="the sampler of a job that names none")


_LIST = SamplerList(
    samplers=[SamplerInfo(name=n, evaluations_per_step=f) for n, f in SAMPLERS.items()],
    default=DEFAULT_SAMPLER,
)


@API.route(
    "GET",
    "/api/v1/samplers",
    summary="The samplers an image job may name, with their cost factors and the default",
    response=SamplerList,
)
async def samplers(request: web.Request, call: Call[None]) -> SamplerList:
    return _LIST
