"""A pytest plugin (loaded through the ``pytest11`` entry point) for testing against a real broker.

Fixtures, for pytest-trio tests:

- ``broker_config``: the :class:`~broker.config.Config` the broker starts with. Override it in
  your ``conftest.py`` to set limits or policies; the host is 127.0.0.1 and the port a free one.
- ``broker``: a running, in-process :class:`~broker.io.server.Broker`, shut down after the test.
- ``broker_url``: its ``ws://127.0.0.1:PORT/`` URL.
- ``broker_client``: a :class:`broker_client.Client` connected to that broker, closed after
  the test.

Outside this project, the plugin loads when the package is installed; or add
``pytest_plugins = ["broker.pytest_plugin"]`` to your top-level ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
import trio

from broker.config import Config
from broker.io.server import Broker
from broker_client import Client, connect


@pytest.fixture
def broker_config() -> Config:
    """The config the ``broker`` fixture starts with (defaults; override to customise)."""
    return Config()


@pytest.fixture
async def broker(broker_config: Config, nursery: trio.Nursery) -> AsyncIterator[Broker]:
    """A broker serving on 127.0.0.1 and a free port for the duration of one test."""
    server = dataclasses.replace(broker_config.server, host="127.0.0.1", port=0)
    config = broker_config.replace(server=server)
    if config.metrics.enabled:  # the metrics listener too, on a free port (broker.metrics_url)
        config = config.replace(metrics=dataclasses.replace(config.metrics, port=0))
    running: Broker = await nursery.start(Broker(config).serve)
    yield running
    running.shutdown()
    await running.wait_stopped()


@pytest.fixture
def broker_url(broker: Broker) -> str:
    """The URL of the ``broker`` fixture's broker."""
    return broker.url


@pytest.fixture
async def broker_client(broker_url: str) -> AsyncIterator[Client]:
    """A client connected to the ``broker`` fixture (msgpack, reconnecting)."""
    async with connect(broker_url) as client:
        yield client
