"""What the client's tests share to run under asyncio and Trio alike (anyio's pytest plugin).

The broker runs in its own process there (:class:`~broker.pytest_plugin.BrokerProcess`), so
a test looks into it as an operator would, through its ``/connz`` (with ``[metrics]`` on):
see :func:`subscriptions`. The fixtures they share are in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx

from broker.pytest_plugin import BrokerProcess

#: A config's ``[metrics]`` table: a monitor listener on a free port, for ``/connz``.
METRICS = "[metrics]\nport = 0\n"


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (state a test cannot await) until it holds; fail after 5 s."""
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - the state has no event to wait on
            await anyio.sleep(0.001)


async def subscriptions(broker: BrokerProcess) -> list[set[str]]:
    """The subscriptions of each connection the broker has now, from its ``/connz``."""
    assert broker.metrics_url is not None, "start the broker with METRICS in its config"
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{broker.metrics_url}/connz", params={"limit": 100_000})
    return [set(connection["subscriptions"]) for connection in response.json()["top"]]


async def wait_for_subscriptions(
    broker: BrokerProcess, condition: Callable[[list[set[str]]], bool]
) -> None:
    """Poll the broker's connections' subscriptions until ``condition`` holds; fail after 5 s."""
    with anyio.fail_after(5):
        while not condition(await subscriptions(broker)):  # noqa: ASYNC110 - nor this
            await anyio.sleep(0.01)
