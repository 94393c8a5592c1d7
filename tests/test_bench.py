"""The benchmark harness still runs: every scenario of ``bench/run``, briefly, against the broker.

No figure is checked (speed is measured by ``bench/run`` itself, never asserted in a test);
only that each scenario prints its line and loses nothing.
"""

from __future__ import annotations

import resource
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


# bench/refill.py at a thousandth of its size: the queue small enough and the payload large
# enough that the slow subscriber overflows it; history longer than everything published.
REFILL_BRIEFLY = ["--rate", "1000", "--seconds", "2", "--warm", "0.3", "--slow", "1",
                  "--size", "2048", "--queue-messages", "16", "--history-size", "4000"]  # fmt: skip


def test_refill_bench_runs_and_the_slow_subscriber_gets_everything_or_is_told() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the load generator needs Node 20+")
    for modules in (BENCH / "loadgen", BENCH.parent / "clients" / "js"):
        if not (modules / "node_modules").is_dir():
            pytest.fail(f"{modules}/node_modules is missing: run `make test` (it runs npm ci)")
    done = subprocess.run(
        [sys.executable, str(BENCH / "refill.py"), *REFILL_BRIEFLY],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # It exits 1 unless every message reached the slow application in order or was reported.
    assert done.returncode == 0, done.stdout + done.stderr
    table = [
        [cell.strip() for cell in line.strip("| ").split(" | ")]
        for line in done.stdout.splitlines()
        if line.startswith("| ")
    ]
    rows = {cells[0]: dict(zip(table[0], cells, strict=True)) for cells in table[1:]}
    assert list(rows) == ["refill", "block", "drop"], done.stdout
    got = next(name for name in table[0] if name.startswith("slow app got"))
    for name in ("refill", "block"):  # with history nothing is lost: by refill, or by waiting
        received, published = rows[name][got].split(" / ")
        assert received == published, done.stdout


def test_connections_bench_runs_pings_and_delivers_to_every_connection() -> None:
    # bench/connections.py at 40 connections over two source addresses and two generator
    # processes: idle through a few ping intervals, then one message to each.
    done = subprocess.run(
        [sys.executable, str(BENCH / "connections.py"), "--connections", "40", "--workers", "2",
         "--per-source", "25", "--ping-interval", "0.2", "--idle", "0.7"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    # It exits 1 if a message was lost or duplicated, or a connection failed or was closed.
    assert done.returncode == 0, done.stdout + done.stderr
    table = [
        [cell.strip() for cell in line.strip("| ").split(" | ")]
        for line in done.stdout.splitlines()
        if line.startswith("| ")
    ]
    row = dict(zip(table[0], table[1], strict=True))
    assert row["N"] == "40", done.stdout
    assert row["workers / source addresses"] == "2 / 2", done.stdout
    assert row["lost"] == "0", done.stdout
    pings_per_s = row["idle CPU (pings/s, CPU/ping)"].split("(")[1].split("/s")[0]
    assert float(pings_per_s) > 0, done.stdout  # the generator answered the broker's pings


def test_connections_bench_says_why_when_n_does_not_fit_the_open_files_limit() -> None:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] == resource.RLIM_INFINITY:
        pytest.skip("no open-files hard limit here: every N fits")
    done = subprocess.run(
        [sys.executable, str(BENCH / "connections.py"), "--connections", "100000000", "--strict"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stdout.splitlines()
    assert "100_000_000 connections do not fit: the open-files hard limit is" in line, line
    assert "--strict: not run" in line, line
