"""The benchmark harness still runs: every scenario of ``bench/run``, briefly, against the broker.

No figure is checked (speed is measured by ``bench/run`` itself, never asserted in a test);
only that each scenario prints its line and loses nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCENARIOS = ["fanout", "fanout-idle", "latency", "topics", "memory"]
# Small enough for a few seconds in all; the load generator ignores what a scenario does not use.
BRIEFLY = ["--seconds", "0.2", "--subs", "4", "--idle", "40", "--rate", "200", "--conns", "10"]


def test_every_bench_scenario_runs_and_loses_nothing() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the load generator needs Node 20+")
    if not (BENCH / "loadgen" / "node_modules").is_dir():
        pytest.fail("bench/loadgen/node_modules is missing: run `make test` (it runs npm ci)")
    done = subprocess.run(
        [sys.executable, str(BENCH / "run"), "--", *BRIEFLY],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    assert [line.split()[0] for line in lines] == SCENARIOS, done.stdout
    for line in lines:
        assert "lost=" not in line or "lost=0 " in line, line
