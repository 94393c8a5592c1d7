"""The package works as pure Python too, where nothing was compiled (setup.py): when this
suite runs compiled, the core's tests run once more with ``BROKER_PURE_PYTHON=1``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import broker

# The tests of the compiled modules without sockets, and end-to-end publishing.
CORE_TESTS = [
    "test_topics.py",
    "test_frames.py",
    "test_outbound.py",
    "test_hub.py",
    "test_session.py",
    "test_websocket.py",
    "test_pubsub.py",
]


@pytest.mark.skipif(not broker.compiled(), reason="the whole suite runs as pure Python")
def test_the_core_passes_as_pure_python() -> None:
    here = Path(__file__).parent
    environment = {**os.environ, "BROKER_PURE_PYTHON": "1"}
    check = "import broker; assert not broker.compiled()"
    subprocess.run([sys.executable, "-c", check], env=environment, check=True)
    tests = [str(here / name) for name in CORE_TESTS]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
        env=environment,
        cwd=here.parent,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
