"""A pytest plugin (loaded through the ``pytest11`` entry point) for testing against a real broker.

Fixtures, for pytest-trio tests (the broker runs in the test's own Trio run):

- ``broker_config``: the :class:`~broker.config.Config` the broker starts with. Override it in
  your ``conftest.py`` to set limits or policies; the host is 127.0.0.1 and the port a free one.
- ``broker``: a running, in-process :class:`~broker.io.server.Broker`, shut down after the test.
- ``broker_url``: its ``ws://127.0.0.1:PORT/`` URL.
- ``broker_client``: a :class:`broker_client.Client` connected to that broker, closed after
  the test.

For tests under any event loop (asyncio with anyio or pytest-asyncio, Trio) or none, the
broker as a service meets it, in its own process:

- ``broker_process_config``: the TOML text (as in ``config/broker.toml``) it starts with;
  empty by default (the defaults). Override it to set limits, policies, auth, ``[metrics]``...
- ``broker_process``: a :class:`BrokerProcess`, ``broker serve`` on 127.0.0.1 and a free
  port, started before the test and stopped after it (``.url``, ``.port``, ``.metrics_url``,
  ``.api_url``). The fixture is synchronous, so it works with any async plugin; for a broker
  shared by many tests, or several per test, use :class:`BrokerProcess` yourself.

A test marked ``pytest.mark.anyio`` runs under anyio's plugin (on each of its backends) even
where pytest-trio's ``trio_mode`` would take every async test for Trio.

Outside this project, the plugin loads when the package is installed; or add
``pytest_plugins = ["broker.pytest_plugin"]`` to your top-level ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import trio

from broker.config import Config, load_config
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


@pytest.fixture
def broker_process_config() -> str:
    """The TOML text the ``broker_process`` fixture starts with (empty: the defaults)."""
    return ""


@pytest.fixture
def broker_process(broker_process_config: str) -> Iterator[BrokerProcess]:
    """``broker serve`` in its own process on 127.0.0.1 and a free port, for one test."""
    with BrokerProcess(broker_process_config) as process:
        yield process


#: How long ``broker serve`` may take to listen, or to stop after SIGTERM.
PROCESS_TIMEOUT = 15.0
_LISTENING = {  # what the broker logs once its listeners listen
    "url": re.compile(r"listening on (\S+) "),
    "metrics_url": re.compile(r"metrics and health on (\S+) "),
    "api_url": re.compile(r"server API on (\S+) "),
}


class BrokerProcess:
    """``broker serve`` in a subprocess on 127.0.0.1, with ``config``: TOML text (validated
    here first, so a mistake fails the test with the broker's ``ConfigError``) or a file.

    :meth:`start` returns once the broker listens, with :attr:`url` and :attr:`port` set (and
    :attr:`metrics_url`, :attr:`api_url` when the config opens those listeners on port 0 or
    another); ``port`` 0 picks a free one, and a :meth:`restart` keeps it. :meth:`terminate`
    is what a service manager does: SIGTERM, so the broker closes its clients with 1001,
    drains and exits; :meth:`wait_stopped` waits for that without blocking the event loop (the
    broker waits for its clients' closing handshakes, which need the loop), :meth:`stop` from
    synchronous code. The broker's log is in :attr:`log_path`, and in the error when it fails
    to start. As a context manager (``with``, or ``async with`` in async code): started on
    entry, stopped on exit.
    """

    def __init__(self, config: str | os.PathLike[str] = "", *, port: int = 0) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="broker-")
        directory = Path(self._directory.name)
        if isinstance(config, str):
            self.config_path = directory / "broker.toml"
            self.config_path.write_text(config)
        else:
            self.config_path = Path(config)
        self.config: Config = load_config(self.config_path)  # raises ConfigError
        self.log_path = directory / "broker.log"
        self.port = port
        self.url = ""
        self.metrics_url: str | None = None
        self.api_url: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BrokerProcess:
        """Start ``broker serve`` and return once it listens (raises ``RuntimeError`` with its
        log if it exits or takes over :data:`PROCESS_TIMEOUT` seconds)."""
        if self.running:
            raise RuntimeError("the broker process is running already")
        self._reaped()
        command = [sys.executable, "-m", "broker", "serve", "--config", str(self.config_path),
                   "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        with self.log_path.open("ab") as log:
            start = log.tell()
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)  # fmt: skip
        wanted = {"url"}
        wanted |= {"metrics_url"} if self.config.metrics.enabled else set()
        wanted |= {"api_url"} if self.config.api.enabled else set()
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while True:  # the log is the one place that says when, and which ports
            with self.log_path.open("rb") as log:
                log.seek(start)
                printed = log.read().decode(errors="replace")
            found = {name: m[1] for name, p in _LISTENING.items() if (m := p.search(printed))}
            if wanted <= found.keys():
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._reaped()
                raise RuntimeError(f"broker serve did not start:\n{printed}")
            time.sleep(0.005)
        self.url = found["url"]
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))
        self.metrics_url, self.api_url = found.get("metrics_url"), found.get("api_url")
        return self

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the process exits."""
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM: the broker closes its clients with 1001, drains and exits."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    async def wait_stopped(self) -> int:
        """Wait for the process to exit (after :meth:`terminate`), under anyio (so from asyncio
        or Trio); kill it if it takes over :data:`PROCESS_TIMEOUT` seconds. Its exit status."""
        with anyio.move_on_after(PROCESS_TIMEOUT):
            while self.running:  # noqa: ASYNC110
                await anyio.sleep(0.005)  # a child's exit has no event to wait on here
        return self._reaped()

    def stop(self) -> int:
        """:meth:`terminate` and wait for the exit, blocking; kill it if it takes too long."""
        self.terminate()
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(PROCESS_TIMEOUT)
        return self._reaped()

    async def restart(self) -> BrokerProcess:
        """:meth:`terminate`, :meth:`wait_stopped`, then :meth:`start` on the same port."""
        self.terminate()
        await self.wait_stopped()
        return self.start()

    def _reaped(self) -> int:
        """Forget the process, killed first if it still runs; its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.kill()
        status = self.process.wait()
        self.process = None
        return status

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._directory.cleanup()

    async def __aenter__(self) -> BrokerProcess:
        return self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        self.terminate()
        with anyio.CancelScope(shield=True):
            await self.wait_stopped()
        self._directory.cleanup()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Leave tests marked ``anyio`` to anyio's plugin: pytest-trio's ``trio_mode`` marks every
    async test ``trio``, and would run even the asyncio ones under Trio."""
    for item in items:
        if item.get_closest_marker("anyio") is not None:
            item.own_markers[:] = [mark for mark in item.own_markers if mark.name != "trio"]
