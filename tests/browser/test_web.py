"""The web page in real headless Chromium against real processes on loopback: a
coordinator, an image worker on the tiny SD model, and the text swarm (two block servers
and a gateway on the tiny LLM), started once for the module.

Every request the page makes is recorded: the API key must travel in headers only, never
in a URL, and the page must raise no console errors (a CSP violation is one).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    FilePayload,
    Page,
    Playwright,
    Route,
    expect,
    sync_playwright,
)

from client.sdk import Client
from coordinator.files.local import LocalFiles
from coordinator.http.web import MODULES_DIR
from protocol.params import ImageParams
from protocol.samplers import DEFAULT_SAMPLER, SAMPLERS
from tests.e2e.test_image_network import horde, image_worker_args
from tests.e2e.test_text_network import Swarm
from tests.procs import Proc

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    # nothing but loopback resolves: the page must work offline
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
SCREENS = Path("/tmp/idlegrid-screens")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMEOUT_MS = 60_000


class Grid(Swarm):
    """The text swarm of tests/e2e plus one image worker (`painter`), owned by the donor.
    The image worker starts before the block servers, so both load at the same time."""

    def server(self, name: str, blocks: str, peer: str | None) -> tuple[Proc, str]:
        if not hasattr(self, "painter"):
            args = image_worker_args(self.url, self.models, self.tmp, "painter")
            self.painter = self.start("painter", [*args, f"--api-key={self.donor}"])
        return super().server(name, blocks, peer)


class Session:
    """One browser context and page, recording every request and console error."""

    def __init__(self, browser: Browser, url: str, shots: Path, **options: Any) -> None:
        self.url = url
        self.shots = shots
        self.context: BrowserContext = browser.new_context(base_url=url, **options)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page: Page = self.context.new_page()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append((r.url, r.headers)))
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _console(self, message: ConsoleMessage) -> None:
        # Chromium logs every 4xx answer; the tests provoke some. A CSP violation or a
        # script error is what must not happen.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def open(self, path: str = "/") -> Page:
        self.page.goto(path)
        return self.page

    def sign_in(self, key: str) -> None:
        page = self.page
        page.get_by_label("API key", exact=True).fill(key)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_be_visible()

    def screenshot(self, name: str, full_page: bool = True) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=path, full_page=full_page)
        print(f"screenshot: {path}")
        return path

    def close(self, key: str | None = None) -> None:
        try:
            assert self.errors == [], self.errors
            foreign = [u for u, _ in self.requests if not u.startswith((self.url, "blob:"))]
            assert foreign == [], f"the page asked another origin: {foreign}"
            if key is not None:
                leaked = [url for url, _ in self.requests if key in url]
                assert leaked == [], f"the API key went into URLs: {leaked}"
        finally:
            self.context.close()


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Grid]:
    net = Grid(tmp_path_factory.mktemp("grid"), tiny_models)
    try:
        net.painter.wait_for("ready", 180)
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = _launch(p)
        try:
            yield chromium
        finally:
            chromium.close()


def _launch(p: Playwright) -> Browser:
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the tests save screenshots; at the end they are copied to /tmp/idlegrid-screens
    too, where people look for them."""
    taken = tmp_path_factory.mktemp("screens")
    yield taken
    SCREENS.mkdir(parents=True, exist_ok=True)
    for path in sorted(taken.glob("*.png")):
        shutil.copy(path, SCREENS / path.name)
        print(f"copied {path} -> {SCREENS / path.name}")


def _register(url: str, name: str) -> str:
    with Client(url) as anon:
        return anon.register(name).api_key


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def test_page_and_static_files_are_served_with_a_strict_policy(grid: Grid) -> None:
    status, headers, body = _get(f"{grid.url}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Cache-Control"] == "no-cache"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "img-src 'self' blob: data:" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    # the page is ES modules: app.js imports the rest from /static/page/
    assert b'<script type="module" src="/static/app.js"></script>' in body
    revalidated = urllib.request.Request(f"{grid.url}/", headers={"If-None-Match": headers["ETag"]})
    with pytest.raises(urllib.error.HTTPError) as unchanged:
        urllib.request.urlopen(revalidated, timeout=10)
    unchanged.value.close()
    assert unchanged.value.code == 304
    # no inline script, no style attribute, nothing from another origin
    assert not re.search(rb"<script(?![^>]*\bsrc=)[^>]*>", body)
    assert not re.search(rb"\s(style|on\w+)=", body) and b"<style" not in body
    assert not re.search(rb"https?://", body)
    modules = sorted(f"page/{p.name}" for p in MODULES_DIR.glob("*.js"))
    assert len(modules) >= 8, modules
    for name, kind in (
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        *((module, "text/javascript") for module in modules),
    ):
        status, headers, asset = _get(f"{grid.url}/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind), (name, headers)
        assert headers["Cache-Control"] == "no-cache"
        assert headers["Content-Security-Policy"] == policy, name
        assert not re.search(rb"https?://", asset), name
        # the DOM is built from nodes and text, never parsed from strings
        assert b"innerHTML" not in asset and b"eval(" not in asset, name
    for name in ("..%2Fhttp%2Fweb.py", "%2E%2E%2Fapp.py", "nope.js", "..", ".hidden", "page"):
        assert _get(f"{grid.url}/static/{name}")[0] == 404, name
    for name in ("..%2Fapp.js", "..%2Findex.html", "nope.js", "..", "."):
        assert _get(f"{grid.url}/static/page/{name}")[0] == 404, name


def test_register_shows_the_key_once_then_signs_out(
    grid: Grid, browser: Browser, shots: Path
) -> None:
    session = Session(browser, grid.url, shots)
    page = session.open()
    page.get_by_label("Account name").fill("webby")
    page.get_by_role("button", name="Register").click()
    expect(page.locator("#keybox")).to_be_visible()
    expect(page.locator("#keybox")).to_contain_text("shown once")
    key = page.get_by_label("Your new API key").input_value()
    with Client(grid.url, key) as me:
        assert me.me().name == "webby"
    expect(page.locator("#who-name")).to_have_text("webby")
    page.get_by_role("button", name="I have saved it").click()
    expect(page.locator("#keybox")).to_be_hidden()
    # kept across a reload, in localStorage only
    page.reload()
    expect(page.locator("#who-name")).to_have_text("webby")
    assert page.evaluate("localStorage.getItem('idlegrid.apiKey')") == key
    # the same name again: the API's message next to the form
    page.get_by_role("button", name="Sign out").click()
    assert page.evaluate("localStorage.getItem('idlegrid.apiKey')") is None
    page.get_by_label("Account name").fill("webby")
    page.get_by_role("button", name="Register").click()
    expect(page.locator("#register-error")).to_contain_text("webby")
    # a wrong key is refused
    page.get_by_label("API key", exact=True).fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("unknown API key")
    expect(page.locator("#who")).to_be_hidden()
    session.close(key)


def test_generate_rate_download_share_and_reuse(grid: Grid, browser: Browser, shots: Path) -> None:
    key = _register(grid.url, "painter-fan")
    viewer_key = _register(grid.url, "viewer")
    session = Session(browser, grid.url, shots, viewport={"width": 1400, "height": 1000})
    page = session.open()
    session.sign_in(key)
    start_kudos = page.locator("#who-kudos").inner_text()
    # the samplers come from GET /api/v1/samplers (protocol/samplers.py), the default chosen
    expect(page.locator("#gen-sampler option")).to_have_text(list(SAMPLERS))
    expect(page.locator("#gen-sampler")).to_have_value(DEFAULT_SAMPLER)

    prompt = "a lighthouse on a cliff, oil painting"
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Negative prompt").fill("blurry")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Sampler").select_option("Euler")
    page.get_by_label("Seed").fill("1234")
    page.get_by_label("Batch size").fill("4")
    page.get_by_label("Image model").select_option("sd")
    params = ImageParams(
        prompt=prompt,
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=4,
        sampler="Euler",
        seed=1234,
        n=4,
        model="sd",
    )
    with Client(grid.url, key) as me:
        cost = me.quote_image(params).kudos_cost
    expect(page.locator("#quote")).to_contain_text(f"Costs {cost} kudo")

    # CivitAI LoRAs and TIs: AI Horde's add-ons in the price (3 per LoRA, 1 for any TI), and
    # a problem inside the list beside its input
    page.get_by_label("LoRAs").fill("Tiny Style:0.8, 1234:1:0.5")
    page.get_by_label("Textual inversions").fill("easynegative")
    expect(page.locator("#quote")).to_contain_text(f"Costs {cost + 7} kudo")
    page.get_by_label("LoRAs").fill("Tiny Style:9")
    expect(page.locator("#gen-loras-error")).to_contain_text("less than or equal to 5")
    page.get_by_label("LoRAs").fill("")
    page.get_by_label("Textual inversions").fill("")
    expect(page.locator("#quote")).to_contain_text(f"Costs {cost} kudo")

    # a bad field: the API's problem beside the input (quoted as the user types)
    page.get_by_label("Width").fill("100")
    expect(page.locator("#gen-width-error")).to_contain_text("multiple of 8")
    expect(page.get_by_label("Width")).to_have_attribute("aria-invalid", "true")
    page.get_by_label("Width").fill("64")
    expect(page.locator("#gen-width-error")).to_be_empty()
    expect(page.locator("#quote")).to_contain_text(f"Costs {cost} kudo")

    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_contain_text("Done: 4 images", timeout=120_000)
    # (the page asks for live previews: /events?previews=true)
    events = [headers for url, headers in session.requests if "/events" in url]
    assert events and events[0].get("apikey") == key, "the progress came from the event stream"

    cards = page.locator("#gallery .image-card")
    expect(cards).to_have_count(4)
    card = cards.first

    def parameters(seed: int) -> str:
        return (
            f"{prompt}\nNegative prompt: blurry\n"
            f"Steps: 4, Sampler: Euler, CFG scale: 7, Seed: {seed}, Size: 64x64, Model: sd"
        )

    # image i of a job has seed + i
    for index in range(4):
        expect(cards.nth(index).locator("pre")).to_have_text(parameters(1234 + index))
    expect(card.locator("img")).to_be_visible()
    assert card.locator("img").evaluate("img => img.complete && img.naturalWidth") == 64
    job_id = card.get_attribute("data-job")
    assert job_id
    expect(page.locator("#who-kudos")).not_to_have_text(start_kudos)

    # download: the page's file is the coordinator's PNG
    with page.expect_download() as download_info:
        card.get_by_role("link", name="Download").click()
    downloaded = Path(download_info.value.path()).read_bytes()
    with Client(grid.url, key) as me:
        assert downloaded.startswith(PNG_SIGNATURE)
        assert downloaded == me.image(job_id, 0)

    # rate it
    card.get_by_label("Rate").select_option("8")
    card.get_by_role("button", name="Rate").click()
    expect(card.locator(".meta")).to_contain_text("You rated it 8")
    with Client(grid.url, key) as me:
        assert me.job(job_id).images[0].rating == 8

    # share it: the link opens the image for another signed-in user
    card.get_by_role("switch", name="Shared").check()
    link = card.get_by_label("Link to the shared image")
    expect(link).to_be_visible()
    shared_url = link.input_value()
    assert shared_url == f"{grid.url}/#job={job_id}"
    with Client(grid.url, key) as me:
        assert me.job(job_id).shared
    page.locator("#gallery-title").click()  # no focus ring in the picture
    session.screenshot("generate-and-gallery")

    # reuse its settings
    page.get_by_label("Prompt", exact=True).fill("something else")
    page.get_by_label("Steps").fill("30")
    card.get_by_role("button", name="Reuse settings").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == prompt
    assert page.get_by_label("Negative prompt").input_value() == "blurry"
    assert page.get_by_label("Steps").input_value() == "4"
    assert page.get_by_label("Sampler").input_value() == "Euler"
    assert page.get_by_label("Seed").input_value() == "1234"
    session.close(key)

    viewer = Session(browser, grid.url, shots)
    viewer.open()
    viewer.sign_in(viewer_key)
    viewer.page.goto(shared_url)
    shared = viewer.page.locator("#shared-job")
    expect(shared).to_contain_text("Shared with you")
    expect(shared.locator("pre")).to_have_text([parameters(1234 + i) for i in range(4)])
    expect(shared.locator("img").first).to_be_visible()
    viewer.close(viewer_key)


def test_a_live_preview_shows_under_the_progress_bar(
    grid: Grid, browser: Browser, shots: Path
) -> None:
    """The page asks for previews and shows the latest in place. The painter's jobs are too
    short for a real preview, so the job's stream and status are answered by the test
    (a leased job with one preview) until it lets the real ones through."""
    key = grid.alice  # (registering is rate-limited per address: the module is at its limit)
    session = Session(browser, grid.url, shots)
    page = session.open()
    session.sign_in(key)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (220, 30, 30)).save(buffer, format="JPEG")
    preview = {
        "image": 0,
        "step": 5,
        "steps": 20,
        "content_type": "image/jpeg",
        "data": base64.b64encode(buffer.getvalue()).decode(),
    }
    job_url = re.compile(r".*/api/v1/jobs/[0-9a-f-]{36}(/events\?previews=true)?$")

    def leased(route: Route) -> None:
        job_id = route.request.url.split("/api/v1/jobs/")[1].split("/")[0]
        status = {"id": job_id, "state": "leased", "image": 0, "step": 5, "steps": 20, "n": 1}
        if "/events" in route.request.url:
            body = f"event: status\ndata: {json.dumps(status)}\n\n"
            body += f"event: preview\ndata: {json.dumps(preview)}\n\n"
            route.fulfill(status=200, content_type="text/event-stream", body=body)
        else:
            route.fulfill(status=200, content_type="application/json", body=json.dumps(status))

    page.route(job_url, leased)
    page.get_by_label("Prompt", exact=True).fill("a red lighthouse")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_label("Steps").fill("4")
    page.get_by_role("button", name="Generate").click()
    shown = page.locator("#progress-preview")
    expect(shown).to_be_visible()
    expect(shown).to_have_attribute("alt", "Preview of image 1, step 5 of 20")
    assert shown.evaluate("img => img.complete && img.naturalWidth") == 8
    expect(page.locator("#progress-text")).to_contain_text("step 5 of 20")
    session.screenshot("live-preview", full_page=False)
    events = [url for url, _ in session.requests if "/events" in url]
    assert events and all(url.endswith("/events?previews=true") for url in events)
    # the real stream and status again: the job is done and the preview gone
    page.unroute(job_url)
    expect(page.locator("#progress-text")).to_contain_text("Done: 1 image", timeout=120_000)
    expect(shown).to_be_hidden()
    session.close(key)


def test_chat_streams_the_reply(grid: Grid, browser: Browser, shots: Path) -> None:
    session = Session(browser, grid.url, shots)
    page = session.open("/#chat")
    session.sign_in(grid.alice)
    with Client(grid.url, grid.alice) as alice:
        before = alice.me().kudos
    expect(page.get_by_label("Chat model")).to_have_value("llm")
    page.get_by_label("Max tokens").fill("24")
    # count the updates of the reply as they happen
    page.evaluate(
        """() => {
            window.chunks = 0;
            new MutationObserver((changes) => {
                for (const change of changes) {
                    const msg = change.target.parentElement?.closest?.('.msg.assistant')
                        || change.target.closest?.('.msg.assistant');
                    if (msg) window.chunks += 1;
                }
            }).observe(document.getElementById('chat-log'),
                       {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.get_by_label("Message").fill("Tell me about lighthouses.")
    page.get_by_label("Message").press("Enter")
    expect(page.locator(".msg.user")).to_have_text(re.compile("Tell me about lighthouses"))
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled(timeout=120_000)
    reply = page.locator(".msg.assistant .text").inner_text()
    assert reply.strip() and reply != "(no text)"
    assert page.evaluate("window.chunks") >= 2, "the reply arrived in one piece"
    chat = [(u, h) for u, h in session.requests if u.endswith("/v1/chat/completions")]
    assert chat and chat[0][1].get("authorization") == f"Bearer {grid.alice}"
    expect(page.locator("#who-kudos")).not_to_have_text(f"{before:,}")
    session.screenshot("chat")
    session.close(grid.alice)


def test_account_history_and_transfer(grid: Grid, browser: Browser, shots: Path) -> None:
    key = _register(grid.url, "giver")
    session = Session(browser, grid.url, shots)
    page = session.open("/#account")
    session.sign_in(key)
    expect(page.locator("#history tbody tr").first).to_contain_text("grant")
    page.get_by_label("To account").fill("nobody-here")
    page.get_by_label("Amount").fill("1")
    page.get_by_role("button", name="Send kudos").click()
    expect(page.locator("#transfer-error")).not_to_be_empty()
    page.get_by_label("To account").fill("webby-not-there")
    page.get_by_label("Amount").fill("0")
    page.get_by_role("button", name="Send kudos").click()
    expect(page.locator("#transfer-amount-error")).to_contain_text("1 or more")
    session.screenshot("account")
    session.close(key)


def test_dispute_an_ai_horde_workers_image(grid: Grid, browser: Browser, shots: Path) -> None:
    """An AI Horde worker (its /api/v2 side, played here) makes an image; the requester
    sees that it is unsigned and disputes it from the gallery: the kudos come back."""
    key, owner = _register(grid.url, "doubter"), _register(grid.url, "bridge-owner")
    body: dict[str, Any] = {
        "prompt": "a bridge",
        "width": 64,
        "height": 64,
        "steps": 4,
        "model": "horde-only",
    }
    with Client(grid.url, key) as me:
        job = me.submit_image(ImageParams(**body))
        before = me.me().kudos
    pop = {"name": "bridge", "models": ["horde-only"]}
    status, leased = horde(grid.url, "POST", "/generate/pop", owner, pop)
    assert status == 200 and leased["id"] == job.id, leased
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 20, 20)).save(out, format="WEBP", lossless=True)
    image = base64.b64encode(out.getvalue()).decode()
    submit = {"id": job.id, "seed": int(leased["payload"]["seed"]), "generation": image}
    assert horde(grid.url, "POST", "/generate/submit", owner, submit)[0] == 200

    session = Session(browser, grid.url, shots)
    page = session.open()
    session.sign_in(key)
    expect(page.get_by_label("Only workers that sign their images")).not_to_be_checked()
    card = page.locator(f'#gallery .image-card[data-job="{job.id}"]')
    expect(card).to_contain_text("Made by an AI Horde worker")
    card.get_by_label("What is wrong with the images").fill("not a bridge")
    card.get_by_role("button", name="Dispute").click()
    expect(card).to_contain_text(f"Disputed: {job.kudos_cost} kudo")
    expect(page.locator("#who-kudos")).to_have_text(str(before + job.kudos_cost))
    session.screenshot("dispute", full_page=False)
    session.close(key)


def test_network_tab_lists_the_workers(grid: Grid, browser: Browser, shots: Path) -> None:
    session = Session(browser, grid.url, shots)
    page = session.open("/#network")
    workers = page.locator("#workers-table tbody")
    expect(workers).to_contain_text("painter")
    row = workers.locator("tr", has_text="painter")
    expect(row).to_contain_text("image")
    expect(row).to_contain_text("online")
    expect(workers).to_contain_text("gateway")
    expect(page.locator("#models-table tbody")).to_contain_text("llm")
    session.screenshot("network")
    session.close()


def test_keyboard_labels_and_phone_layout(grid: Grid, browser: Browser, shots: Path) -> None:
    session = Session(
        browser, grid.url, shots, viewport={"width": 390, "height": 844}, is_mobile=True
    )
    page = session.open()
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
            .filter((el) => !el.labels?.length && !el.getAttribute('aria-label'))
            .map((el) => el.id || el.name)"""
    )
    assert unlabelled == []
    # the tabs: arrow keys move between them, focus is visible
    page.get_by_role("tab", name="Images").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Chat")).to_be_focused()
    expect(page.get_by_role("tab", name="Chat")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-chat")).to_be_visible()
    outline = page.get_by_role("tab", name="Chat").evaluate(
        "el => getComputedStyle(el).outlineStyle"
    )
    assert outline != "none"
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#panel-images")).to_be_visible()
    # nothing wider than the phone
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    session.screenshot("phone")
    session.close()


def _stored_file(grid: Grid, digest: str) -> bytes:
    """A file the coordinator stored (its local file store under the data dir)."""
    return LocalFiles(grid.tmp / "data").path(digest).read_bytes()


def _job_params(grid: Grid, job_id: str) -> dict[str, Any]:
    """A job's parameters as the coordinator stored them."""
    database = grid.tmp / "data" / "idlegrid.db"
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        (params,) = db.execute("SELECT params FROM jobs WHERE id = ?", (job_id,)).fetchone()
    loaded: dict[str, Any] = json.loads(params)
    return loaded


def _drag(page: Page, selector: str, points: list[tuple[float, float]]) -> None:
    """Press the mouse on `selector` at the first point, move through the rest, release;
    points are fractions of its width and height."""
    target = page.locator(selector)
    target.scroll_into_view_if_needed()
    box = target.bounding_box()
    assert box is not None
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=6)
    page.mouse.up()


def test_source_image_and_painted_mask_make_an_inpainting_job(
    grid: Grid, browser: Browser, shots: Path, tmp_path: Path
) -> None:
    key = _register(grid.url, "mask-painter")
    session = Session(browser, grid.url, shots, viewport={"width": 1400, "height": 1000})
    page = session.open()
    session.sign_in(key)
    source_input = page.get_by_label("Source image", exact=True)

    # what is not a usable image is refused beside the input, before anything is sent
    source_input.set_input_files({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"})
    expect(page.locator("#gen-source-problem")).to_contain_text("not a PNG, WebP or JPEG")
    broken = FilePayload(name="broken.png", mimeType="image/png", buffer=PNG_SIGNATURE + b"no")
    source_input.set_input_files(broken)
    expect(page.locator("#gen-source-problem")).to_contain_text("could not be read as an image")
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.truncate(32 * 1024 * 1024 + 1)  # sparse: nothing is written
    source_input.set_input_files(huge)
    expect(page.locator("#gen-source-problem")).to_contain_text("over the 32 MB")
    expect(page.locator("#source-editor")).to_be_hidden()

    # a photo its EXIF orientation turns is shown turned, and sent as what is shown
    photo, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    Image.new("RGB", (96, 64), (200, 40, 40)).save(photo, format="JPEG", exif=exif.tobytes())
    turned = FilePayload(name="photo.jpg", mimeType="image/jpeg", buffer=photo.getvalue())
    source_input.set_input_files(turned)
    expect(page.locator("#source-size")).to_contain_text("64x96 pixels")
    expect(page.locator("#source-size")).to_contain_text("sent as a PNG of what is shown")

    # a 64x96 source: the job takes its size; strength 0.5
    out = io.BytesIO()
    Image.new("RGB", (64, 96), (30, 120, 200)).save(out, format="PNG")
    source = out.getvalue()
    source_input.set_input_files({"name": "sky.png", "mimeType": "image/png", "buffer": source})
    expect(page.locator("#source-editor")).to_be_visible()
    expect(page.locator("#gen-source-problem")).to_be_empty()
    assert page.get_by_label("Width").input_value() == "64"
    assert page.get_by_label("Height").input_value() == "96"
    expect(page.locator("#source-mode")).to_contain_text("img2img")
    page.get_by_label("Prompt", exact=True).fill("a kite")
    page.get_by_label("Steps").fill("4")
    # the coordinator's answer beside the field it names: 4 x 0.1 runs no step
    page.get_by_label("Denoising strength").fill("0.1")
    expect(page.locator("#gen-strength-error")).to_contain_text("no sampling step")
    page.get_by_label("Denoising strength").fill("0.5")
    expect(page.locator("#gen-strength-error")).to_be_empty()

    # a mask of another size is refused; one the source's size is taken (white = repaint)
    mask_input = page.get_by_label("Or upload a mask")
    for size in ((32, 32), (64, 96)):
        top = Image.new("L", size, 0)
        top.paste(255, (0, 0, size[0], 24))
        upload = io.BytesIO()
        top.save(upload, format="PNG")
        payload = FilePayload(name="m.png", mimeType="image/png", buffer=upload.getvalue())
        if size == (32, 32):
            mask_input.set_input_files(payload)
            expect(page.locator("#gen-mask-problem")).to_contain_text("the source image's size")
            # something painted, then cleared
            _drag(page, "#mask-canvas", [(0.5, 0.8), (0.6, 0.8)])
            expect(page.locator("#source-mode")).to_contain_text("Inpainting")
            page.get_by_role("button", name="Clear mask").click()
            expect(page.locator("#source-mode")).to_contain_text("img2img")
        else:
            mask_input.set_input_files(payload)
            expect(page.locator("#gen-mask-problem")).to_be_empty()

    # paint a band across the middle, then erase its centre
    page.get_by_label("Brush size").fill("40")
    _drag(page, "#mask-canvas", [(0.1, 0.5), (0.9, 0.5)])
    expect(page.locator("#source-mode")).to_contain_text("Inpainting")
    page.get_by_label("Erase").check()
    _drag(page, "#mask-canvas", [(0.5, 0.5), (0.5, 0.5)])
    page.get_by_label("Seed").fill("7")
    page.get_by_label("Image model").select_option("sd")
    expect(page.locator("#quote")).to_contain_text("Costs")
    session.screenshot("inpainting-form", full_page=False)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_contain_text("Done: 1 image", timeout=120_000)

    card = page.locator("#gallery .image-card").first
    expect(card.locator("pre")).to_contain_text("Source processing: inpainting")
    job_id = card.get_attribute("data-job")
    assert job_id
    params = _job_params(grid, job_id)
    assert params["source_processing"] == "inpainting"
    assert params["denoising_strength"] == 0.5
    assert (params["width"], params["height"]) == (64, 96)
    # the source went as its own bytes; the mask is what was uploaded and painted, at the
    # source's size
    assert _stored_file(grid, params["source_image"]) == source
    mask = Image.open(io.BytesIO(_stored_file(grid, params["source_mask"]))).convert("L")
    assert mask.size == (64, 96)
    assert mask.getpixel((16, 48)) == 255 and mask.getpixel((48, 48)) == 255  # painted
    assert mask.getpixel((32, 48)) == 0  # erased
    assert mask.getpixel((32, 10)) == 255 and mask.getpixel((63, 23)) == 255  # uploaded
    assert mask.getpixel((32, 30)) == 0 and mask.getpixel((32, 86)) == 0  # never painted
    assert mask.getpixel((35, 77)) == 0  # painted, then cleared
    assert mask.getpixel((0, 48)) == 0 and mask.getpixel((63, 48)) == 0  # past the band's ends

    # reusing its settings asks for the source image again (the page never had it back)
    page.get_by_role("button", name="Remove image").click()
    expect(page.locator("#source-editor")).to_be_hidden()
    card.get_by_role("button", name="Reuse settings").click()
    expect(page.locator("#gen-source-problem")).to_contain_text("made from a source image")
    expect(page.get_by_label("Denoising strength")).to_have_value("0.5")
    session.close(key)


def test_source_images_are_offered_only_when_a_worker_takes_them(
    grid: Grid, browser: Browser, shots: Path
) -> None:
    """When the network view says what its workers take, the form follows it."""
    session = Session(browser, grid.url, shots)

    def without_sources(route: Route) -> None:
        net = route.fetch().json()
        for worker in net["workers"]:
            worker.update(img2img=False, inpainting=False)
        route.fulfill(json=net)

    session.page.route("**/api/v1/network", without_sources)
    page = session.open()
    expect(page.locator("#source-offer")).to_contain_text("No online worker takes source images")
    expect(page.get_by_label("Source image", exact=True)).to_be_disabled()
    session.close()


def test_image_extras_are_offered_as_workers_serve_them_and_reach_the_job(
    grid: Grid, browser: Browser, shots: Path
) -> None:
    """Upscalers, the face fixer and ControlNet types only as the network view says online
    workers serve them (faked here); the extras reach the stored job, its card and "Reuse
    settings"."""
    key = grid.alice  # (registering is rate-limited per address: the module is at its limit)
    held: dict[str, list[str]] = {
        "post_processors": ["RealESRGAN_x4plus"],
        "controlnets": ["depth"],
        "control_annotators": [],
    }

    def serving(route: Route) -> None:
        net = route.fetch().json()
        for worker in net["workers"]:
            if worker["kind"] == "image":
                worker.update(held)
        net["post_processors"] = held["post_processors"]
        route.fulfill(json=net)

    session = Session(browser, grid.url, shots, viewport={"width": 1400, "height": 1000})
    session.page.route("**/api/v1/network", serving)
    page = session.open()
    session.sign_in(key)
    # only the upscaler a worker holds; no face fixer; depth only with a ready map
    expect(page.locator("#gen-upscaler option")).to_have_text(["None", "RealESRGAN_x4plus"])
    expect(page.get_by_label("Face fixer (GFPGAN)")).to_be_disabled()
    expect(page.locator("#gen-face-fix-hint")).to_contain_text("No online worker holds GFPGAN")
    expect(page.locator("#gen-control option")).to_have_text(
        ["None", "depth (ready control map only)"]
    )
    page.get_by_label("ControlNet", exact=True).select_option("depth")
    expect(page.get_by_label("Image is the control map")).to_be_checked()
    expect(page.get_by_label("Image is the control map")).to_be_disabled()
    expect(page.get_by_label("Return the control map")).to_be_disabled()
    page.get_by_label("ControlNet", exact=True).select_option("")

    # what every worker serves, made by the tiny-SD worker
    page.get_by_label("Prompt", exact=True).fill("a tiled floor")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Sampler").select_option("Euler")
    page.get_by_label("Seed").fill("5")
    page.get_by_label("Hires fix").check()
    page.get_by_label("Hires strength").fill("0.5")
    page.get_by_label("Clip skip").fill("2")
    page.get_by_label("Seamless tiles").check()
    page.get_by_label("Karras sigmas").check()
    expect(page.locator("#quote")).to_contain_text("Costs")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_contain_text("Done: 1 image", timeout=120_000)
    card = page.locator("#gallery .image-card").first
    expect(card.locator("pre")).to_contain_text(
        "Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Schedule type: Karras, "
        "Hires fix: 0.5 strength, Clip skip: 2, Tiling: True"
    )
    job_id = card.get_attribute("data-job")
    assert job_id
    params = _job_params(grid, job_id)
    assert params["hires_fix"] is True and params["hires_fix_denoising_strength"] == 0.5
    assert params["clip_skip"] == 2 and params["tiling"] is True and params["karras"] is True
    assert "post_processing" not in params and "control_type" not in params
    for label in ("Hires fix", "Seamless tiles", "Karras sigmas"):
        page.get_by_label(label).uncheck()
    page.get_by_label("Clip skip").fill("1")
    card.get_by_role("button", name="Reuse settings").click()
    for label in ("Hires fix", "Seamless tiles", "Karras sigmas"):
        expect(page.get_by_label(label)).to_be_checked()
    expect(page.get_by_label("Hires strength")).to_have_value("0.5")
    expect(page.get_by_label("Clip skip")).to_have_value("2")

    # workers holding more: the face fixer, the 2x upscaler, canny with its map made
    held.update(
        post_processors=["GFPGAN", "RealESRGAN_x2plus"],
        controlnets=["canny", "depth"],
        control_annotators=["canny"],
    )
    page.reload()
    expect(page.locator("#gen-upscaler option")).to_have_text(["None", "RealESRGAN_x2plus"])
    expect(page.locator("#gen-control option")).to_have_text(
        ["None", "canny", "depth (ready control map only)"]
    )
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(out, format="PNG")
    page.get_by_label("Source image", exact=True).set_input_files(
        {"name": "edges.png", "mimeType": "image/png", "buffer": out.getvalue()}
    )
    expect(page.locator("#source-editor")).to_be_visible()
    page.get_by_label("Prompt", exact=True).fill("a house")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Denoising strength").fill("0.5")  # not sent: sampled from noise
    page.get_by_label("Face fixer (GFPGAN)").check()
    page.get_by_label("Face fixer strength").fill("0.5")
    page.get_by_label("Upscaler").select_option("RealESRGAN_x2plus")
    page.get_by_label("ControlNet", exact=True).select_option("canny")
    expect(page.get_by_label("Image is the control map")).to_be_enabled()
    expect(page.get_by_label("Denoising strength")).to_be_disabled()
    page.get_by_label("Return the control map").check()
    # the map is returned as made, never post-processed: the coordinator refuses the pair
    expect(page.locator("#quote")).to_contain_text("Fix the marked fields")
    page.get_by_label("Return the control map").uncheck()
    expect(page.locator("#quote")).to_contain_text("Costs")
    session.screenshot("image-extras", full_page=False)
    with page.expect_response("**/api/v1/jobs/image") as created:
        page.get_by_role("button", name="Generate").click()
    job_id = created.value.json()["id"]
    params = _job_params(grid, job_id)
    assert params["post_processing"] == ["GFPGAN", "RealESRGAN_x2plus"]
    assert params["facefixer_strength"] == 0.5
    assert params["control_type"] == "canny" and "return_control_map" not in params
    assert params["source_processing"] == "img2img" and "image_is_control" not in params
    assert params.get("denoising_strength", 0.75) == 0.75
    # (no real worker serves these: the job waits until cancelled)
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#progress-text")).to_contain_text("Cancelled")
    session.close(key)


def test_chat_settings_regenerate_copy_and_a_kept_conversation(
    grid: Grid, browser: Browser, shots: Path
) -> None:
    session = Session(browser, grid.url, shots, permissions=["clipboard-read", "clipboard-write"])
    page = session.open("/#chat")
    session.sign_in(grid.alice)
    expect(page.get_by_label("Chat model")).to_have_value("llm")
    page.get_by_label("System prompt").fill("You answer in one word.")
    page.get_by_label("Temperature").fill("1.5")
    page.get_by_label("Max tokens").fill("6")
    page.get_by_label("Stop strings").fill("zzqx\n\\n\\n")
    page.get_by_label("Message").fill("Name a colour.")
    page.get_by_role("button", name="Send", exact=True).click()
    send = page.get_by_role("button", name="Send", exact=True)
    expect(send).to_be_enabled(timeout=120_000)
    answer = page.locator(".msg.assistant")
    expect(answer).to_have_count(1)
    first_job = answer.get_attribute("data-job")
    assert first_job
    # the settings reached the job
    params = _job_params(grid, first_job)
    assert params["messages"] == [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
    ]
    assert params["temperature"] == 1.5 and params["max_tokens"] == 6
    assert params["stop"] == ["zzqx", "\n\n"]
    first_text = answer.locator(".text").inner_text()

    # copy an answer
    answer.get_by_role("button", name="Copy").click()
    expect(answer.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == first_text

    # a reload keeps the conversation and the settings
    page.reload()
    expect(page.locator(".msg.user .text")).to_have_text(["Name a colour."])
    expect(page.locator(".msg.assistant .text")).to_have_text([first_text])
    expect(page.get_by_label("System prompt")).to_have_value("You answer in one word.")
    expect(page.get_by_label("Temperature")).to_have_value("1.5")
    expect(page.get_by_label("Stop strings")).to_have_value("zzqx\n\\n\\n")

    # regenerate replaces the last answer with another job's
    page.get_by_role("button", name="Regenerate").click()
    expect(page.get_by_role("button", name="Regenerate")).to_be_enabled(timeout=120_000)
    expect(page.locator(".msg")).to_have_count(2)
    second_job = page.locator(".msg.assistant").get_attribute("data-job")
    assert second_job and second_job != first_job
    params = _job_params(grid, second_job)
    assert [m["content"] for m in params["messages"]] == [
        "You answer in one word.",
        "Name a colour.",
    ]
    stored = json.loads(page.evaluate("localStorage.getItem('idlegrid.chat')"))
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["job"] == second_job
    session.screenshot("chat-settings")

    # a regenerate the coordinator refuses keeps the last answer, and says why
    page.get_by_label("Max tokens").fill("100000")
    page.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".msg.error")).to_contain_text("The last answer is kept")
    expect(page.locator(".msg.assistant")).to_have_attribute("data-job", second_job)
    expect(page.locator("#chat-error")).to_contain_text("max_tokens")

    # a setting out of range is marked before anything is sent; "New chat" forgets it all
    page.get_by_label("Temperature").fill("3")
    page.get_by_role("button", name="Regenerate").click()
    expect(page.locator("#chat-temperature-error")).to_contain_text("from 0")
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".msg")).to_have_count(0)
    page.reload()
    expect(page.get_by_label("Chat model")).to_have_value("llm")
    expect(page.locator(".msg")).to_have_count(0)
    session.close(grid.alice)
