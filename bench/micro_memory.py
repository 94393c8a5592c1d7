#!/usr/bin/env python3
"""Where an idle subscribed connection's memory goes: tracemalloc over 2 000 connections.

    .venv/bin/python bench/micro_memory.py            # 2 000 connections
    .venv/bin/python bench/micro_memory.py 5000

Runs a broker in this process, opens the connections with one generator process of
``bench/connections.py`` (raw sockets, each subscribed to its own topic), and prints the
Python heap growth per connection, grouped by the broker line that allocated it (the
innermost frame in ``broker/``; what trio or wsproto allocated below it in brackets), so a
coroutine frame shows at the line that called it and a task or cancel scope at the line that
opened it. (RSS per connection, what bench/run and bench/connections.py report, is ~0.5 KiB
higher: allocator slack.)
"""

from __future__ import annotations

import gc
import linecache
import os
import subprocess
import sys
import tracemalloc
from collections import defaultdict

import trio

from broker.config import Config, LimitsConfig
from broker.io.server import Broker

HERE = os.path.dirname(os.path.abspath(__file__))
BROKER = os.path.join(os.path.dirname(HERE), "broker") + os.sep
GENERATOR = os.path.join(HERE, "connections.py")


def short(filename: str, lineno: int) -> str:
    return "/".join(filename.split(os.sep)[-2:]) + f":{lineno}"


def group(stats: list[tracemalloc.StatisticDiff], conns: int) -> dict[str, tuple[int, int, str]]:
    """By the innermost broker line: (bytes, objects, the biggest allocations below it, in
    bytes per connection)."""
    sizes: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    below: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for stat in stats:
        key, under = None, None
        for frame in reversed(stat.traceback):  # the most recent call first
            if frame.filename.startswith(BROKER):
                source = linecache.getline(frame.filename, frame.lineno).strip()[:50]
                key = f"{short(frame.filename, frame.lineno)} {source}"
                break
            if under is None:
                under = short(frame.filename, frame.lineno)
        key = key or f"(outside broker/) {under}"
        sizes[key] += stat.size_diff
        counts[key] += stat.count_diff
        below[key][under or "-"] += stat.size_diff
    biggest = {
        key: sorted(parts.items(), key=lambda kv: -kv[1])[:3] for key, parts in below.items()
    }
    return {
        key: (size, counts[key], ", ".join(f"{n} {b / conns:.0f}" for n, b in biggest[key]))
        for key, size in sizes.items()
    }


async def main(conns: int) -> None:
    """Snapshot the heap before and after ``conns`` subscribed connections; print the growth."""
    tracemalloc.start(25)
    async with trio.open_nursery() as nursery:
        broker = await nursery.start(Broker(Config(limits=LimitsConfig(max_connections=0))).serve)
        gc.collect()
        before = tracemalloc.take_snapshot()
        cmd = [sys.executable, GENERATOR, "--worker", "--port", str(broker.port), "--first", "0",
               "--count", str(conns), "--per-source", "25000", "--concurrency", "200"]  # fmt: skip
        proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        while broker.hub.subscription_count() < conns:  # noqa: ASYNC110 (polling broker state)
            await trio.sleep(0.05)
        await trio.sleep(0.5)  # the handshakes' deadlines expire from trio's heap
        gc.collect()
        after = tracemalloc.take_snapshot()
        stats = after.compare_to(before, "traceback")
        total = sum(stat.size_diff for stat in stats)
        print(f"python heap growth per connection: {total / conns:.0f} B")
        groups = sorted(group(stats, conns).items(), key=lambda kv: -kv[1][0])
        for key, (size, count, below) in groups:
            if size / conns >= 40:
                print(f"{size / conns:6.0f} B {count / conns:5.1f} objects  {key}")
                print(f"{'':21}[below: {below}]")
        proc.kill()
        await proc.wait()
        broker.shutdown()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
