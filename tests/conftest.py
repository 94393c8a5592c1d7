"""Fixtures for the tests that run under asyncio and Trio alike (anyio's pytest plugin)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.abc
import pytest


@pytest.fixture
async def task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group for the test's background tasks (servers, proxies), cancelled after it:
    pytest-trio's ``nursery``, for tests marked ``anyio``."""
    async with anyio.create_task_group() as tasks:
        yield tasks
        tasks.cancel_scope.cancel()


@pytest.fixture
def unreachable_url() -> Iterator[str]:
    """A port bound but not listening: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/"
