#!/usr/bin/env python3
"""Where an idle subscribed connection's memory goes: tracemalloc over 1 000 connections.

    .venv/bin/python bench/micro_memory.py

Runs a broker in this process, opens 1 000 subscribed connections with the Node load
generator's memory scenario, and prints the Python heap growth per connection by file and by
line. (RSS per connection, what bench/run reports, is a few KiB higher: allocator slack.)
"""

import gc
import os
import subprocess
import tracemalloc

import trio

from broker.config import Config, LimitsConfig
from broker.io.server import Broker

LOADGEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loadgen", "bench.mjs")


def short(where: object) -> str:
    return str(where).split("site-packages/")[-1]


async def main() -> None:
    """Snapshot the heap before and after 1 000 subscribed connections; print the growth."""
    conns = 1000
    tracemalloc.start(1)
    async with trio.open_nursery() as nursery:
        broker = await nursery.start(
            Broker(Config(limits=LimitsConfig(max_connections_per_ip=100000))).serve
        )
        gc.collect()
        before = tracemalloc.take_snapshot()
        cmd = ["node", LOADGEN, "--url", broker.url, "--scenario", "memory",
               "--pid", str(os.getpid()), "--conns", str(conns)]  # fmt: skip
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
        # The load generator holds the connections for 1 s once subscribed, then exits.
        while broker.hub.subscription_count() < conns:  # noqa: ASYNC110 (polling broker state)
            await trio.sleep(0.05)
        gc.collect()
        after = tracemalloc.take_snapshot()
        total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        print(f"python heap growth per connection: {total / conns / 1024:.1f} KiB")
        for key in ("filename", "lineno"):
            for stat in after.compare_to(before, key)[:12]:
                print(f"{stat.size_diff / conns / 1024:6.2f} KiB  {short(stat.traceback[0])}")
        await proc.wait()
        broker.shutdown()


if __name__ == "__main__":
    trio.run(main)
