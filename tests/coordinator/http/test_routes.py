"""Typed route inputs (coordinator.http.api, coordinator.http.params): a handler declares
its caller, body and parameters once, in its signature. A declaration that disagrees with
its route fails when the route is registered, that is at import; the values parsed from the
request reach the handler typed, or the caller gets a 400 naming the parameter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel

from coordinator.errors import BadRequest
from coordinator.http.api import API, Api, Call, UserCall, WorkerCall
from coordinator.http.params import Choice, Declared, Text, WholeNumber
from protocol.horde import ImageRequestV2
from protocol.messages import ImageJobRequest, RatingCreate, ResultSubmit
from tests.conftest import LiveApp
from tests.fakes import register_accounts

# import the app so every route module has registered its routes
from coordinator import app as _app  # noqa: F401  # isort: skip


ROOT = Path(__file__).resolve().parents[3]


class Echo(BaseModel):
    text: str


def _route(method: str, path: str) -> Any:
    return next(r for r in API.routes if (r.method, r.path) == (method, path))


def test_the_body_model_is_the_handlers_annotation() -> None:
    assert _route("POST", "/api/v1/jobs/image").body is ImageJobRequest
    assert _route("POST", "/api/v1/jobs/{job_id}/images/{index}/rating").body is RatingCreate
    assert _route("POST", "/api/v1/jobs/{job_id}/result").body is ResultSubmit
    assert _route("POST", "/api/v2/generate/async").body is ImageRequestV2
    assert _route("GET", "/api/v1/jobs/{job_id}").body is None
    upload = _route("PUT", "/api/v1/jobs/{job_id}/images/{index}")
    assert upload.body is None and upload.raw == "image/png"


def test_a_well_declared_route_registers() -> None:
    api = Api("test", "0")

    @api.route("POST", "/things/{index}", summary="s", auth="user")
    async def good(
        request: web.Request,
        call: UserCall[Echo],
        index: Annotated[int, WholeNumber("which", 0, 9)],
        limit: Annotated[int, WholeNumber("how many", 1, 100)] = 20,
        before: Annotated[int | None, WholeNumber("older than", 1, 99)] = None,
        kind: Annotated[str | None, Choice("a kind", ("a", "b"), name="type")] = None,
        name: Annotated[str, Text("a name")] = "",
    ) -> Echo:
        return call.body

    (route,) = api.routes
    assert route.body is Echo
    assert [(p.argument, p.name, p.where, p.required) for p in route.params] == [
        ("index", "index", "path", True),
        ("limit", "limit", "query", False),
        ("before", "before", "query", False),
        ("kind", "type", "query", False),
        ("name", "name", "query", False),
    ]
    operation = api.openapi()["paths"]["/things/{index}"]["post"]
    assert operation["parameters"][0]["schema"] == {"type": "integer", "minimum": 0, "maximum": 9}
    assert operation["parameters"][1]["schema"]["default"] == 20
    assert operation["parameters"][3]["schema"]["enum"] == ["a", "b"]
    assert "400" in operation["responses"]


def _refused(match: str) -> Any:
    return pytest.raises(TypeError, match=match)


def test_a_call_that_disagrees_with_auth_is_refused() -> None:
    api = Api("test", "0")
    with _refused(r"good_name.*auth='user'.*UserCall\[BodyModel or None\]"):

        @api.route("GET", "/a", summary="s", auth="user")
        async def good_name(request: web.Request, call: Call[None]) -> Echo:
            raise AssertionError

    with _refused(r"auth='worker'.*WorkerCall"):

        @api.route("GET", "/a", summary="s", auth="worker")
        async def worker(request: web.Request, call: UserCall[None]) -> Echo:
            raise AssertionError

    with _refused(r"auth='optional'.*Call\["):

        @api.route("GET", "/a", summary="s", auth="optional")
        async def anyone(request: web.Request, call: WorkerCall[None]) -> Echo:
            raise AssertionError

    assert api.routes == []


def test_an_unclear_body_is_refused() -> None:
    api = Api("test", "0")
    # the wrong annotations here are the point (type: ignore): the route must refuse them
    with _refused(r"Call\[BodyModel or None\]"):

        @api.route("GET", "/a", summary="s")
        async def bare(request: web.Request, call: Call) -> Echo:  # type: ignore[type-arg]
            raise AssertionError

    with _refused("must be a pydantic model or None"):

        @api.route("POST", "/a", summary="s")
        async def text(request: web.Request, call: Call[str]) -> Echo:  # type: ignore[type-var]
            raise AssertionError

    with _refused("a JSON body or a raw one, not both"):

        @api.route("PUT", "/a", summary="s", raw="image/png")
        async def both(request: web.Request, call: Call[Echo]) -> Echo:
            raise AssertionError

    with _refused(r"takes \(request, call"):

        @api.route("GET", "/a", summary="s")
        async def no_call(request: web.Request) -> Echo:
            raise AssertionError

    assert api.routes == []


def test_a_parameter_whose_type_disagrees_is_refused() -> None:
    api = Api("test", "0")
    with _refused(r"parameter limit must be declared Annotated"):

        @api.route("GET", "/a", summary="s")
        async def plain(request: web.Request, call: Call[None], limit: int = 5) -> Echo:
            raise AssertionError

    with _refused(r"parameter limit is declared <class 'int'>, but a WholeNumber with default"):

        @api.route("GET", "/a", summary="s")
        async def unsure(
            request: web.Request,
            call: Call[None],
            # the wrong default is the point: the route must refuse it
            limit: Annotated[int, WholeNumber("n", 1, 5)] = None,  # type: ignore[assignment]
        ) -> Echo:
            raise AssertionError

    with _refused(r"parameter kind is declared <class 'int'>"):

        @api.route("GET", "/a", summary="s")
        async def wrong(
            request: web.Request,
            call: Call[None],
            kind: Annotated[int, Choice("k", ("a", "b"))] = 1,
        ) -> Echo:
            raise AssertionError

    with _refused("path parameter index cannot have a default"):

        @api.route("GET", "/a/{index}", summary="s")
        async def default_path(
            request: web.Request,
            call: Call[None],
            index: Annotated[int, WholeNumber("i", 0, 5)] = 0,
        ) -> Echo:
            raise AssertionError

    assert api.routes == []


def test_a_module_with_a_disagreeing_route_fails_at_import(tmp_path: Path) -> None:
    (tmp_path / "bad_routes.py").write_text(
        "from __future__ import annotations\n"
        "from aiohttp import web\n"
        "from coordinator.http.api import Api, Call\n"
        "from protocol.messages import Health\n"
        "api = Api('t', '0')\n"
        "@api.route('GET', '/me', summary='s', auth='user')\n"
        "async def me(request: web.Request, call: Call[None]) -> Health:\n"
        "    raise AssertionError\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import bad_routes"],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "TypeError: handler bad_routes.me: an auth='user' route's handler takes" in done.stderr


def test_declared_values() -> None:
    count = Declared("count", "count", "query", WholeNumber("c", 1, 50), required=True)
    assert count.value("7") == 7
    for bad in ("0", "51", "²", "٣", "-1", "+5", " 5", "5 ", "1_0", "1" * 5000, ""):
        with pytest.raises(BadRequest, match=r"query parameter count=.* whole number from 1 to 50"):
            count.value(bad)
    with pytest.raises(BadRequest, match="query parameter count is missing") as missing:
        count.value(None)
    assert missing.value.fields == [("count", "is required")]
    kind = Declared("kind", "type", "query", Choice("k", ("image", "text")), False, "image")
    assert (kind.value(None), kind.value(""), kind.value("text")) == ("image", "image", "text")
    with pytest.raises(BadRequest, match=r"type='video': choose image or text"):
        kind.value("video")
    name = Declared("name", "name", "query", Text("n"), False, "")
    assert (name.value(None), name.value(""), name.value("Bob")) == ("", "", "Bob")


async def _get(url: str, key: str | None = None) -> tuple[int, Any]:
    headers = {"apikey": key} if key else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, json.loads(await resp.text())


def _fields(answer: Any) -> list[str]:
    return [f["field"] for f in answer["error"]["fields"]]


async def test_parameters_over_http(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "alice")
    api = f"{live.url}/api"
    for url, name in (
        (f"{api}/v1/jobs?limit=0", "limit"),
        (f"{api}/v1/jobs?offset=x", "offset"),
        (f"{api}/v1/accounts/me/history?before=0", "before"),
        (f"{api}/v1/accounts/me/history?limit=501", "limit"),
    ):
        status, answer = await _get(url, key)
        assert status == 400 and _fields(answer) == [name], (url, answer)
        assert f"query parameter {name}=" in answer["error"]["message"]
    status, answer = await _get(f"{api}/v1/jobs?limit=1&offset=0", key)
    assert status == 200 and answer == {"jobs": [], "next_offset": None}
    status, answer = await _get(f"{api}/v1/accounts/me/history?limit=1", key)
    assert status == 200 and len(answer["entries"]) <= 1, answer
    # AI Horde's routes: an empty `type=` is the default, another one is a 400 of theirs
    for path in ("/v2/status/models", "/v2/workers"):
        for query in ("", "?type=", "?type=image", "?type=text&name=nobody"):
            status, answer = await _get(f"{api}{path}{query}")
            assert status == 200 and answer == [], (path, query, answer)
        status, answer = await _get(f"{api}{path}?type=video")
        assert status == 400, answer
        assert answer == {
            "message": "type='video': choose image or text",
            "rc": "BadRequest",
            "errors": {"type": "must be image or text"},
        }
