"""The server API's examples, against ``broker serve`` in a real process: the Flask view of
examples/flask_publish.py publishes to a page open in Chromium, and the ``curl`` one-liner of
docs/api.md publishes to a WebSocket subscriber."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from playwright.sync_api import ConsoleMessage, expect, sync_playwright

from broker.pytest_plugin import BrokerProcess
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.wire import connect

ROOT = Path(__file__).resolve().parent.parent
KEY = "examples-test-key-0123456789"
CONFIG = f"""
[api]
port = 0
keys = ["{KEY}"]

[[topics]]
pattern = "orders.>"
history_size = 100
"""
#: The line of docs/api.md that marks the one-liner below it.
ONE_LINER_MARK = "<!-- the curl one-liner: tests/test_api_examples.py runs it -->"


@pytest.fixture
def broker_process_config() -> str:
    return CONFIG


@pytest.fixture
async def flask_url(broker_process: BrokerProcess, nursery: trio.Nursery) -> str:
    """examples/flask_publish.py in a process of its own, on a free port; ends with the test."""
    broker = broker_process
    assert broker.api_url is not None
    env = {
        **os.environ,
        "BROKER_API_KEY": KEY,
        "BROKER_API": broker.api_url,
        "BROKER_URL": broker.url,
        "PORT": "0",
    }
    command = [sys.executable, "-u", str(ROOT / "examples" / "flask_publish.py")]
    run = partial(trio.run_process, command, env=env, stdout=subprocess.PIPE)
    process: trio.Process = await nursery.start(run)
    assert process.stdout is not None
    printed = b""
    with trio.fail_after(20):
        while (found := re.search(rb"(http://127\.0\.0\.1:\d+/)", printed)) is None:
            chunk = await process.stdout.receive_some()
            assert chunk, "the Flask example exited"
            printed += chunk
    return found[1].decode()


async def test_the_flask_view_publishes_through_the_server_api(
    broker_process: BrokerProcess, flask_url: str
) -> None:
    async with connect(broker_process.url) as subscriber, httpx.AsyncClient() as http:
        await subscriber.subscribe("orders.created")
        response = await http.post(f"{flask_url}orders", json={"item": "tea"})
        assert (response.status_code, response.json()) == (201, {"published": True, "offset": 1})
        await subscriber.expect("msg", topic="orders.created", data={"item": "tea"}, offset=1)
        response = await http.post(f"{flask_url}orders", content=b"not json")
        assert response.status_code == 400


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: `make test` installs it")
async def test_the_flask_view_publishes_to_a_page_open_in_a_browser(flask_url: str) -> None:
    await trio.to_thread.run_sync(place_an_order_and_see_it_in_the_page, flask_url)


def place_an_order_and_see_it_in_the_page(flask_url: str) -> None:
    errors: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(10_000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", console)
            page.goto(flask_url)
            expect(page.locator("#status")).to_have_text("subscribed")
            for item in ("tea", "cake"):
                response = httpx.post(f"{flask_url}orders", json={"item": item})
                assert response.status_code == 201, response.text
            expect(page.locator("#orders li")).to_have_text(['{"item":"tea"}', '{"item":"cake"}'])
        finally:
            browser.close()
    assert not errors, errors


def one_liner() -> str:
    """The ``curl`` command of docs/api.md, from the code block after its mark."""
    text = (ROOT / "docs" / "api.md").read_text()
    after = text.split(ONE_LINER_MARK, 1)[1]
    block = re.search(r"```sh\n(.*?)```", after, re.DOTALL)
    assert block is not None
    return block[1]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl: `make test` installs it")
async def test_the_curl_one_liner_of_the_docs_publishes(broker_process: BrokerProcess) -> None:
    assert broker_process.api_url is not None
    command = one_liner().replace("http://127.0.0.1:8767", broker_process.api_url)
    async with connect(broker_process.url, "json") as subscriber:
        await subscriber.subscribe("orders.created")
        with trio.fail_after(20):
            result = await trio.run_process(
                ["sh", "-c", command],
                env={**os.environ, "BROKER_API_KEY": KEY},
                capture_stdout=True,
                capture_stderr=True,
            )
        assert result.stderr == b""
        assert json.loads(result.stdout)["offset"] == 1
        await subscriber.expect("msg", topic="orders.created", data={"id": 7}, offset=1)
