#!/usr/bin/env python3
"""Micro-benchmark of a publisher's reader path, without sockets: decode, checks, hub, writes.

    .venv/bin/python bench/micro_reader.py              # both shapes below, best of 3 each
    .venv/bin/python bench/micro_reader.py latency --reads 100 --repeat 1   # one shape, once

A real :class:`~broker.io.connection.Connection` (its session, the one-node delivery) executes
prepared reads (lists of msgpack WebSocket messages) from a stand-in WebSocket; its
subscribers are real connections whose stand-in WebSockets count writes instead of making the
syscall. Prints CPU microseconds per
delivery (``time.process_time``) and writes per delivery, for

- ``fanout``: 200 subscribers on one topic, 64 pubs per read (deep queues: the writers
  write, not the reader);
- ``topics``: 1 000 subscribers on their own topics, 40 messages of 64 pubs per read
  (as bench/run's topics scenario with 1 MiB reads);
- ``latency``: 100 subscribers on one topic, 3 pubs per read and a direct write per
  subscriber per read (bench/run's latency scenario reads ~2.4 pubs at a time: one tick of
  the load generator's timer).

CPU time on a shared VM varies by 10-30 % from minute to minute; bench/instructions runs a
shape under valgrind and prints instructions per delivery, which do not vary.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Sequence
from typing import Any, cast

# Its stand-in WebSocket is no compiled WebSocket, which a compiled Connection requires: run
# the sources (the same code; times are pure Python's).
os.environ.setdefault("BROKER_PURE_PYTHON", "1")

import msgpack
import trio
import trio.testing

from broker.config import ServerConfig
from broker.core.delivery import LocalDelivery
from broker.core.history import MemoryHistory
from broker.core.hub import Hub
from broker.core.rules import PolicyTable, SessionLimits
from broker.io.connection import Connection
from broker.io.writes import DirectWrites
from broker.protocol.frames import Encoding

LIMITS = SessionLimits()  # no publish rate
SERVER = ServerConfig()


class StandInWebSocket:
    """Serves prepared reads to ``receive`` and counts what would be written."""

    closed = None
    sending_rest = False

    def __init__(self, reads: Sequence[list[bytes]] = ()) -> None:
        self.reads = list(reads)
        self.served = 0
        self.writes = 0

    async def receive(self) -> list[bytes]:
        if self.served == len(self.reads):
            await trio.sleep_forever()
        self.served += 1
        await trio.lowlevel.checkpoint()
        return self.reads[self.served - 1]

    def can_send_now(self) -> bool:
        return True

    def send_now(self, parts: Sequence[bytes], text: bool, length: int) -> bool:
        b"".join(parts)
        self.writes += 1
        return True

    async def send_message(self, parts: Sequence[bytes], text: bool, length: int) -> None:
        b"".join(parts)
        self.writes += 1


def start_writer(nursery: trio.Nursery, connection: Connection) -> None:
    """Give ``connection`` its writer in ``nursery``, as ``Connection.serve`` does (before
    178a585 a writer task for its whole life; since, one started only when needed)."""
    if hasattr(connection, "start_writer"):
        connection._nursery = nursery
        nursery.start_soon(connection._write_loop, nursery)
    else:
        nursery.start_soon(connection._write_loop)


async def run(subscribers: int, one_topic: bool, pubs_per_read: int, reads: int) -> float:
    """CPU seconds per delivery of executing ``reads`` reads; prints writes per delivery."""
    hub = Hub(PolicyTable([]), slow_timeout=5.0)
    delivery = LocalDelivery(hub, MemoryHistory(hub.policies.history_for))
    writes = DirectWrites()

    def connection(websocket: Any, peer: str) -> Connection:
        return Connection(websocket, Encoding.MSGPACK, delivery, writes, LIMITS, SERVER, peer)

    topics = ["bench.one"] if one_topic else [f"bench.t.{i}" for i in range(subscribers)]
    connections = []
    for i in range(subscribers):
        subscriber = connection(StandInWebSocket(), "sub")
        sub = msgpack.packb({"op": "sub", "id": 1, "topic": topics[i % len(topics)]})
        waiting = subscriber.session.receive([sub], 0.0)
        assert waiting is not None
        await subscriber.session.complete(waiting)
        subscriber.queue.take_batch(1 << 20)  # the ok
        connections.append(subscriber)
    frames = [msgpack.packb({"op": "pub", "topic": t, "data": b"x" * 64}) for t in topics]
    prepared, n = [], 0
    for _ in range(reads):
        pubs = [frames[(n + k) % len(frames)] for k in range(pubs_per_read)]
        n += pubs_per_read
        prepared.append([b"".join(pubs[i : i + 64]) for i in range(0, len(pubs), 64)])
    publisher_ws = StandInWebSocket(prepared)
    publisher = connection(publisher_ws, "pub")
    async with trio.open_nursery() as nursery:
        for connection in connections:
            start_writer(nursery, connection)
        await trio.testing.wait_all_tasks_blocked()
        gc.freeze()  # as `broker serve` does once it has loaded (broker/operations/cli.py)
        start = time.process_time()
        nursery.start_soon(publisher._read_loop)
        while publisher_ws.served < reads:
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        elapsed = time.process_time() - start
        nursery.cancel_scope.cancel()
    deliveries = reads * pubs_per_read * (subscribers if one_topic else 1)
    written = sum(cast(StandInWebSocket, c.websocket).writes for c in connections)
    print(
        f"    {elapsed / deliveries * 1e6:.2f} us/delivery, {written / deliveries:.3f} writes each"
    )
    return elapsed / deliveries


# name: (subscribers, one topic, pubs per read, reads)
SHAPES = {
    "fanout": (200, True, 64, 200),
    "topics": (1000, False, 40 * 64, 60),
    "latency": (100, True, 3, 2000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shapes", nargs="*", metavar="SHAPE", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--reads", type=int, help="reads per run (default: the shape's)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per shape; the best is shown")
    args = parser.parse_args()
    for name in args.shapes:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}")
    for name in args.shapes or SHAPES:
        subscribers, one_topic, pubs_per_read, reads = SHAPES[name]
        print(name)
        shape = (subscribers, one_topic, pubs_per_read, args.reads or reads)
        best = min(trio.run(run, *shape) for _ in range(args.repeat))
        print(f"{name}: best {best * 1e6:.2f} us/delivery")


if __name__ == "__main__":
    main()
