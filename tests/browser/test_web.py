"""The web page in real headless Chromium against real processes on loopback: a
coordinator, an image worker on the tiny SD model, and the text swarm (two block servers
and a gateway on the tiny LLM), started once for the module.

Every request the page makes is recorded: the API key must travel in headers only, never
in a URL, and the page must raise no console errors (a CSP violation is one).
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from client.sdk import Client
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
    events = [headers for url, headers in session.requests if url.endswith("/events")]
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
