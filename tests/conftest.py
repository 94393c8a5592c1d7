"""Fixtures for the tests that run under asyncio and Trio alike (anyio's pytest plugin)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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
def unreachable_port() -> Iterator[int]:
    """A port on 127.0.0.1 bound but not listening for the whole test: connecting to it is
    refused at once, and nothing else can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def unreachable_url(unreachable_port: int) -> str:
    """A ``ws://`` URL on :func:`unreachable_port`."""
    return f"ws://127.0.0.1:{unreachable_port}/"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a compiled module older than its source: it is not the code in the tree
    (``make test`` rebuilds; ``BROKER_PURE_PYTHON=1`` runs the sources instead)."""
    if os.environ.get("BROKER_PURE_PYTHON"):
        return
    root = Path(__file__).parent.parent / "broker"
    stale = [
        str(source.relative_to(root.parent))
        for compiled in root.rglob("*.so")
        if (source := compiled.with_name(compiled.name.split(".")[0] + ".py")).exists()
        and source.stat().st_mtime > compiled.stat().st_mtime
    ]
    if stale:
        pytest.exit(
            f"{', '.join(stale)} changed after it was compiled: rebuild with `make test` (or "
            "`pip install -e .`), or run the sources with BROKER_PURE_PYTHON=1",
            returncode=4,
        )
