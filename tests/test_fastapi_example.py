"""examples/fastapi_app.py in a uvicorn process of its own, against a broker process: an order
POSTed to the app reaches a page open in Chromium (subscribed with the JS client), and the
app's Server-Sent Events relay streams what is published to the broker.

Under asyncio, the app's own loop: the test drives Chromium with Playwright's async API.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import ConsoleMessage, async_playwright, expect

from broker.pytest_plugin import BrokerProcess
from broker_client import connect
from tests.anyio_helpers import METRICS, wait_for_subscriptions
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(METRICS) as process:
        yield process


@pytest.fixture(scope="module")
def app_url(broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The example under ``uvicorn`` on a free port, as its docstring runs it; its URL."""
    log_path = tmp_path_factory.mktemp("fastapi") / "uvicorn.log"
    command = [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--app-dir", "examples",
               "--host", "127.0.0.1", "--port", "0"]  # fmt: skip
    env = {**os.environ, "BROKER_URL": broker.url}
    with log_path.open("wb") as log:
        app = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while (running := re.search(r"running on (http://\S+)", log_path.read_text())) is None:
            assert app.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        yield f"{running[1]}/"
    finally:
        app.terminate()
        app.wait(10)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: `make test` installs it")
async def test_an_order_posted_to_the_app_reaches_a_page_subscribed_to_the_broker(
    app_url: str,
) -> None:
    errors: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    async with async_playwright() as playwright, httpx.AsyncClient() as http:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(10_000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", console)
            await page.goto(app_url)
            await expect(page.locator("#status")).to_have_text("subscribed")
            for item in ("tea", "cake"):
                response = await http.post(f"{app_url}orders", json={"item": item})
                assert (response.status_code, response.json()) == (
                    201,
                    {"item": item, "quantity": 1},
                )
            await expect(page.locator("#orders li")).to_have_text(
                [f'orders.created {{"item":"{item}","quantity":1}}' for item in ("tea", "cake")]
            )
            refused = await http.post(f"{app_url}orders", json={"quantity": 2})  # no item
            assert refused.status_code == 422
        finally:
            await browser.close()
    assert not errors, errors


async def test_the_relay_streams_what_is_published_to_the_broker_until_left(
    broker: BrokerProcess, app_url: str
) -> None:
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", f"{app_url}orders/events") as events,
    ):
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = events.aiter_lines()
        assert await anext(lines) == ": subscribed"  # the stream is live from here
        async with connect(broker.url) as publisher:
            await publisher.publish("orders.paid", {"item": "tea", "paid": True})
        assert [await anext(lines) for _ in range(3)] == [
            "",
            "event: orders.paid",
            'data: {"item": "tea", "paid": true}',
        ]
    # Leaving the stream ends its subscription: the app's connection keeps none.
    await wait_for_subscriptions(broker, lambda subscribed: {"orders.*"} not in subscribed)
