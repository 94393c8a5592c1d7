"""The chat page in a real browser (headless Debian Chromium, driven by Playwright).

Two tabs join one room through a real broker configured as ``make chat`` serves it
(``config/chat.toml``: rooms keep history). What was said before a tab joined fills its view;
what one types shows in the other, presence shows who joined and left, and a screenshot is
saved to ``test-artifacts/chat.png``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse
from functools import partial
from pathlib import Path

import pytest
import trio
from playwright.sync_api import ConsoleMessage, Page, expect, sync_playwright

from broker.config import Config, load_config

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


async def test_two_tabs_chat_in_one_room(static_url: str, broker_url: str) -> None:
    query = urllib.parse.urlencode({"broker": broker_url})
    await trio.to_thread.run_sync(chat_in_two_tabs, f"{static_url}examples/chat/?{query}")


def chat_in_two_tabs(page_url: str) -> None:
    """Drive the page with Playwright's sync API (in a worker thread: it runs its own loop)."""
    errors: list[str] = []

    def open_tab(name: str) -> Page:
        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                errors.append(f"{name}: {message.text}")

        page = context.new_page()
        page.set_default_timeout(10_000)
        page.on("pageerror", lambda error: errors.append(f"{name}: {error}"))
        page.on("console", console)
        page.goto(page_url)
        page.fill("#name", name)
        return page

    def join(page: Page, room: str) -> None:
        page.fill("#room", room)
        page.click("#join button")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 900, "height": 640})
            alice = open_tab("Alice")
            join(alice, "not a room!")
            expect(alice.locator("#join-error")).to_contain_text("A room name is")
            expect(alice.locator("#chat")).to_be_hidden()
            join(alice, "lobby")
            expect(alice.locator("#chat")).to_be_visible()
            expect(alice.locator("#join")).to_be_hidden()
            for text in ["Is anyone here?", "I'll wait."]:
                alice.fill("#text", text)
                alice.press("#text", "Enter")
                expect(alice.locator("#log .msg .text").last).to_have_text(text)

            bob = open_tab("Bob")
            join(bob, "lobby")
            # The room keeps history: what Alice said before Bob came is in his view, first.
            expect(bob.locator("#log .msg .text, #log .event")).to_have_text(
                ["Is anyone here?", "I'll wait.", "You joined #lobby as Bob"]
            )
            expect(alice.locator("#log .event").last).to_have_text("Bob joined")
            expect(alice.locator("#people li")).to_have_text(["Alice", "Bob"])
            expect(bob.locator("#people li")).to_have_text(["Bob", "Alice"])  # Alice said "here"

            alice.fill("#text", "Hello Bob, this is Alice.")
            alice.press("#text", "Enter")
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

            bob.goto("about:blank")  # leaving the page sends "leave" from pagehide
            expect(alice.locator("#log .event").last).to_have_text("Bob left")
            expect(alice.locator("#people li")).to_have_text(["Alice"])
        finally:
            browser.close()
    assert not errors, errors
