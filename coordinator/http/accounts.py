"""Accounts: register, show, invite. Also health and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from coordinator.http.api import API, Call, UserCall
from coordinator.http.state import STORE
from protocol.messages import (
    AccountCreate,
    AccountCreated,
    AccountInfo,
    Health,
    InviteCreate,
    InvitesCreated,
)
from protocol.version import VERSION


@API.route("GET", "/healthz", summary="200 once the coordinator is ready", response=Health)
async def healthz(request: web.Request, call: Call[None]) -> Health:
    return Health(version=VERSION)


@API.route(
    "POST",
    "/api/v1/accounts",
    summary="Create an account; the API key is shown once. 403 when registration is closed, "
    "or invite-only and `invite` is not an unused code",
    response=AccountCreated,
    status=201,
    errors=(403, 409),
    limit="register",
)
async def create_account(request: web.Request, call: Call[AccountCreate]) -> AccountCreated:
    store = request.app[STORE]
    body = call.body
    account, api_key = await store.accounts.create_account(body.name, body.invite)
    return AccountCreated(
        name=account.name, api_key=api_key, kudos=await store.ledger.balance(account.id)
    )


@API.route(
    "GET",
    "/api/v1/accounts/me",
    summary="The caller's account: balance, available, reserved, earned, pending, spent",
    response=AccountInfo,
    auth="user",
)
async def show_account(request: web.Request, call: UserCall[None]) -> AccountInfo:
    return await request.app[STORE].ledger.account_info(call.account)


@API.route(
    "POST",
    "/api/v1/invites",
    summary="Make single-use invite codes for invite-only registration (each account may "
    "make the operator's --invites-per-account in all); the codes are shown once",
    response=InvitesCreated,
    auth="user",
    status=201,
    errors=(403,),
    limit="challenge",
)
async def create_invites(request: web.Request, call: UserCall[InviteCreate]) -> InvitesCreated:
    body = call.body
    return InvitesCreated(
        codes=await request.app[STORE].accounts.create_invites(body.count, call.account)
    )


@API.route("GET", "/api/v1/openapi.json", summary="This API's OpenAPI 3.1 description")
async def openapi(request: web.Request, call: Call[None]) -> web.StreamResponse:
    return web.json_response(API.openapi())
