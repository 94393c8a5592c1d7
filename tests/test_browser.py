"""The chat page in a real browser (headless Debian Chromium, driven by Playwright).

Two tabs join one room through a real broker configured as ``make chat`` serves it
(``config/chat.toml``: rooms keep history and have presence). What was said before a tab joined
fills its view; what one types shows in the other, the broker's presence shows who joined and
left, and a screenshot is saved to ``test-artifacts/chat.png``. A tab whose browser is killed
leaves the other's "here now" within seconds, and so does one whose network goes silent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    WebSocketRoute,
    expect,
    sync_playwright,
)

from broker.config import Config, load_config
from broker_client import connect
from tests.helpers import start_broker

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOT = ROOT / "test-artifacts" / "chat.png"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium: `make test` installs Debian's chromium"
)


@pytest.fixture
def broker_config() -> Config:
    """The config ``make chat`` serves (the ``broker`` fixture picks a free port)."""
    return load_config(ROOT / "config" / "chat.toml")


@pytest.fixture
async def static_url(nursery: trio.Nursery) -> str:
    """The repository served over HTTP as docs/browser.md says (``python -m http.server``).

    Port 0 picks a free port, which the server prints; the process ends with the test.
    """
    command = [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"]
    run = partial(
        trio.run_process, command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    process: trio.Process = await nursery.start(run)
    assert process.stdout is not None
    printed = b""
    with trio.fail_after(10):
        while (found := re.search(rb"port (\d+)", printed)) is None:
            printed += await process.stdout.receive_some()
    return f"http://127.0.0.1:{int(found[1])}/"


class Tabs:
    """Tabs of one headless Chromium on the chat page; what goes wrong in them is in ``errors``."""

    def __init__(self, browser: Browser, page_url: str) -> None:
        self.browser = browser
        self.page_url = page_url
        self.errors: list[str] = []
        self.context = self.new_context()

    def new_context(self) -> BrowserContext:
        """A browser context of its own (a separate profile): closing it kills its tabs."""
        return self.browser.new_context(viewport={"width": 900, "height": 640})

    def open(
        self,
        name: str,
        route: Callable[[WebSocketRoute], None] | None = None,
        context: BrowserContext | None = None,
        url: str | None = None,
    ) -> Page:
        """A new tab on the page (or on ``url``), its name filled in; ``route`` handles its
        WebSockets; in ``context`` (default: the first one)."""

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append(f"{name}: {message.text}")

        page = (context or self.context).new_page()
        page.set_default_timeout(10_000)
        page.on("pageerror", lambda error: self.errors.append(f"{name}: {error}"))
        page.on("console", console)
        if route is not None:
            page.route_web_socket(re.compile("^ws://"), route)
        page.goto(url or self.page_url)
        page.fill("#name", name)
        return page


@contextmanager
def chromium(page_url: str) -> Iterator[Tabs]:
    """Playwright's sync API (run it in a worker thread: it runs its own loop)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tabs = Tabs(browser, page_url)
            yield tabs
        finally:
            browser.close()
    assert not tabs.errors, tabs.errors


def join(page: Page, room: str) -> None:
    page.fill("#room", room)
    page.click("#join button")


def say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def page_url(static_url: str, broker_url: str) -> str:
    return f"{static_url}examples/chat/?{urllib.parse.urlencode({'broker': broker_url})}"


async def test_two_tabs_chat_in_one_room(static_url: str, broker_url: str) -> None:
    await trio.to_thread.run_sync(chat_in_two_tabs, page_url(static_url, broker_url))


def chat_in_two_tabs(page_url: str) -> None:
    with chromium(page_url) as tabs:
        alice = tabs.open("Alice")
        join(alice, "not a room!")
        expect(alice.locator("#join-error")).to_contain_text("A room name is")
        expect(alice.locator("#chat")).to_be_hidden()
        join(alice, "lobby")
        expect(alice.locator("#chat")).to_be_visible()
        expect(alice.locator("#join")).to_be_hidden()
        for text in ["Is anyone here?", "I'll wait."]:
            say(alice, text)
            expect(alice.locator("#log .msg .text").last).to_have_text(text)

        bob = tabs.open("Bob")
        join(bob, "lobby")
        # The room keeps history: what Alice said before Bob came is in his view, first.
        expect(bob.locator("#log .msg .text, #log .event")).to_have_text(
            ["Is anyone here?", "I'll wait.", "You joined #lobby as Bob"]
        )
        expect(alice.locator("#log .event").last).to_have_text("Bob joined")
        expect(alice.locator("#people li")).to_have_text(["Alice", "Bob"])
        expect(bob.locator("#people li")).to_have_text(["Bob", "Alice"])  # you first
        expect(bob.locator("#people li.me")).to_have_text(["Bob"])

        say(alice, "Hello Bob, this is Alice.")
        expect(bob.locator("#log .msg .text").last).to_have_text("Hello Bob, this is Alice.")
        bob.fill("#text", "Hi Alice! Loud and clear.")
        bob.click("#send button")
        expected = [
            "Is anyone here?",
            "I'll wait.",
            "Hello Bob, this is Alice.",
            "Hi Alice! Loud and clear.",
        ]
        expect(alice.locator("#log .msg .text")).to_have_text(expected)
        expect(bob.locator("#log .msg .text")).to_have_text(expected)
        expect(bob.locator("#log .msg.mine .text")).to_have_text(expected[-1:])
        SCREENSHOT.parent.mkdir(exist_ok=True)
        bob.screenshot(path=SCREENSHOT)

        bob.goto("about:blank")  # leaving the page closes its connection: the broker says so
        expect(alice.locator("#log .event").last).to_have_text("Bob left")
        expect(alice.locator("#people li")).to_have_text(["Alice"])


class Network:
    """Bob's network, cut at will: his tab's WebSockets pass through Playwright's routing."""

    def __init__(self) -> None:
        self.down = False
        self.routes: list[tuple[WebSocketRoute, WebSocketRoute]] = []

    def route(self, page_side: WebSocketRoute) -> None:
        if self.down:
            page_side.close()  # the page sees it open, then close: a failed attempt
            return
        self.routes.append((page_side, page_side.connect_to_server()))

    def cut(self) -> None:
        self.down = True
        for page_side, server_side in self.routes:
            server_side.close()
            page_side.close()
        self.routes.clear()


async def test_a_tab_back_from_a_cut_shows_what_it_missed_or_says_some_is_missing(
    static_url: str, broker_url: str
) -> None:
    async def publish_many(room: str, count: int) -> None:
        async with connect(broker_url, encoding="json") as client:
            for n in range(count):
                data = {"id": "carol", "name": "Carol", "text": f"flood {n}", "at": 0}
                await client.publish(f"chat.{room}.messages", data)

    def run_publish_many(room: str, count: int) -> None:
        trio.from_thread.run(publish_many, room, count)

    await trio.to_thread.run_sync(
        back_from_a_cut, page_url(static_url, broker_url), run_publish_many
    )


def back_from_a_cut(page_url: str, publish_many: Callable[[str, int], None]) -> None:
    network = Network()
    with chromium(page_url) as tabs:
        alice = tabs.open("Alice")
        join(alice, "away")
        bob = tabs.open("Bob", network.route)
        join(bob, "away")
        expect(alice.locator("#people li")).to_have_text(["Alice", "Bob"])
        status = bob.locator("#status")

        network.cut()
        expect(status).to_have_attribute("data-state", "disconnected")
        say(alice, "Sent while Bob was away.")
        expect(alice.locator("#log .msg .text")).to_have_text(["Sent while Bob was away."])
        network.down = False
        expect(bob.locator("#log .msg .text")).to_have_text(["Sent while Bob was away."])
        expect(bob.locator("#log .event", has_text="missing")).to_have_count(0)

        # More than config/chat.toml keeps (200) while he is away: the oldest are lost.
        network.cut()
        expect(status).to_have_attribute("data-state", "disconnected")
        publish_many("away", 201)
        network.down = False
        expect(bob.locator("#log .event").last).to_have_text(
            "⚠ Some messages sent while you were away are missing."
        )
        expect(bob.locator("#log .msg .text").last).to_have_text("flood 200")
        expect(bob.locator("#log .msg .text").nth(1)).to_have_text("flood 1")


class SilentNetwork:
    """A TCP proxy in front of the broker whose connections can go silent: from :meth:`hush`
    on, no byte passes either way and nothing is closed, as when a laptop sleeps or a phone
    loses its signal. Only the broker's keep-alive can notice."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.url = ""
        self.silent = False  # set from the browser's thread; read by the pumps

    def hush(self) -> None:
        self.silent = True

    async def serve(self, *, task_status: trio.TaskStatus[SilentNetwork]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        task_status.started(self)
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, downstream: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with downstream, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, downstream, upstream)
            nursery.start_soon(self._pump, upstream, downstream)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for data in source:
                if not self.silent:
                    await sink.send_all(data)
            if not self.silent:
                await sink.send_eof()
        if self.silent:
            await trio.sleep_forever()  # not even a close gets through (the test ends it)


def keepalive_config(ping: float) -> Config:
    """``config/chat.toml`` with a quick keep-alive: a ping every ``ping`` s, which must be
    answered within ``ping`` s."""
    config = load_config(ROOT / "config" / "chat.toml")
    server = dataclasses.replace(
        config.server, host="127.0.0.1", port=0, ping_interval=ping, ping_timeout=ping
    )
    return config.replace(server=server)


@pytest.mark.parametrize("silent", [False, True], ids=["closed", "then silent"])
async def test_a_killed_tab_leaves_the_other_tabs_list_within_10_s(
    static_url: str, nursery: trio.Nursery, silent: bool
) -> None:
    """Bob's browser context is closed abruptly (no page events run); ``then silent``: his
    network went silent first, so not even a TCP close reaches the broker, which notices by
    its keep-alive (1 s ping, 1 s to answer). Either way the broker's presence drops him."""
    broker = await start_broker(nursery, keepalive_config(1.0))
    network: SilentNetwork = await nursery.start(SilentNetwork(broker.port or 0).serve)
    bob_url = page_url(static_url, network.url)
    await trio.to_thread.run_sync(
        killed_tab, page_url(static_url, broker.url), bob_url, network if silent else None
    )


def killed_tab(page_url: str, bob_url: str, network: SilentNetwork | None) -> None:
    with chromium(page_url) as tabs:
        alice = tabs.open("Alice")
        join(alice, "wake")
        doomed = tabs.new_context()
        bob = tabs.open("Bob", context=doomed, url=bob_url)
        join(bob, "wake")
        expect(alice.locator("#people li")).to_have_text(["Alice", "Bob"])
        expect(bob.locator("#people li")).to_have_text(["Bob", "Alice"])
        expect(alice.locator("#log .event").last).to_have_text("Bob joined")

        if network is not None:
            network.hush()
        doomed.close()  # within 10 s of this, Alice's list has only her
        expect(alice.locator("#people li")).to_have_text(["Alice"], timeout=10_000)
        expect(alice.locator("#log .event").last).to_have_text("Bob left")
