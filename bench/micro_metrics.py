"""Micro-benchmark: what the metrics counting costs on the hot path (publish -> written).

Publishes N messages through a real :class:`~broker.core.delivery.LocalDelivery` to K real
:class:`~broker.io.connection.Connection` objects whose WebSocket is a stub that accepts every
write at once, so what is timed is the broker's own work: fan-out, queueing, the writer's
batches, and the counting this branch added (a publish timestamp per message, per-batch
counters and histograms). Run it from a checkout with and without the metrics to compare:

    .venv/bin/python bench/micro_metrics.py                       # this tree
    git archive BASE broker | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before .venv/bin/python bench/micro_metrics.py  # the tree before

It also times the queue alone (``offer`` then ``take_batch``, no tasks: the steadiest figure
on a shared machine), and one ``prometheus_client`` ``Counter.inc()`` against a plain
``+= 1``, which is why the broker counts in plain integers and lets a collector read them at
scrape time.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
import timeit
from typing import Any

# Its stand-in WebSocket is no compiled WebSocket, which a compiled Connection requires: run
# the sources (the same code; times are pure Python's).
os.environ.setdefault("BROKER_PURE_PYTHON", "1")

import trio
import trio.testing

import broker
from broker.config import ServerConfig
from broker.core.delivery import LocalDelivery
from broker.core.history import MemoryHistory
from broker.core.hub import Hub, Subscription
from broker.core.outbound import OutboundQueue, Policy
from broker.core.rules import PolicyTable, SessionLimits
from broker.io.connection import Connection
from broker.io.writes import DirectWrites
from broker.protocol.frames import Encoding


class StubWebSocket:
    """Accepts every message at once; never receives anything; no direct writes."""

    closed = None
    sending_rest = False

    def can_send_now(self) -> bool:
        return False

    def __init__(self) -> None:
        self.sent = 0

    async def send_message(self, parts: Any, text: bool, length: int | None = None) -> None:
        self.sent += 1
        await trio.lowlevel.checkpoint()

    async def receive(self) -> list[bytes]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self, code: int, reason: str | None, timeout: float) -> None:  # noqa: ASYNC109
        return


async def run_once(messages: int, subscribers: int) -> float:
    """CPU seconds to publish ``messages`` to ``subscribers`` and have every batch written.

    CPU time of this process, not wall time, so that other load on the machine counts less.
    """
    hub = Hub(PolicyTable(()), slow_timeout=60.0)
    delivery = LocalDelivery(hub, MemoryHistory(hub.policies.history_for))
    writes, limits, server = DirectWrites(), SessionLimits(), ServerConfig()
    connections = []
    async with trio.open_nursery() as nursery:
        for n in range(subscribers):
            stub: Any = StubWebSocket()
            connection = Connection(
                stub, Encoding.MSGPACK, delivery, writes, limits, server, f"bench:{n}"
            )
            subscription = Subscription(connection, "bench.*")
            connection.subscriptions["bench.*"] = subscription
            hub.add(subscription)
            connections.append(connection)
            nursery.start_soon(connection.serve)
        await trio.testing.wait_all_tasks_blocked()
        data = {"n": 0, "payload": "x" * 100}
        start = time.process_time()
        for _ in range(messages):
            delivery.publish("bench.a", data, 0.0)
        await trio.testing.wait_all_tasks_blocked()  # every writer has emptied its queue
        assert not any(len(connection.queue) for connection in connections)
        elapsed = time.process_time() - start
        nursery.cancel_scope.cancel()
    return elapsed


def queue_ns_per_message() -> float:
    """Best ns per message of 1000 ``offer`` calls and one ``take_batch``."""
    queue = OutboundQueue(1 << 20, 1 << 40)
    frame, tail, block = b"x" * 100, b"tail", Policy.BLOCK
    stamped = "now" in inspect.signature(queue.offer).parameters  # the tree with metrics
    args: tuple[Any, ...] = ("s", "t", frame, tail, block, *((1.0,) if stamped else ()))

    def run() -> None:
        offer = queue.offer
        for _ in range(1000):
            offer(*args)
        queue.take_batch(1 << 30)

    return min(timeit.repeat(run, number=20, repeat=30)) / 20_000 * 1e9


def main() -> None:
    """Print the best of ``--repeat`` runs, in deliveries per second."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    best = min(trio.run(run_once, args.messages, args.subscribers) for _ in range(args.repeat))
    deliveries = args.messages * args.subscribers
    print(f"broker from {broker.__file__}")
    print(f"{args.messages} messages x {args.subscribers} subscribers: best {best:.3f} s CPU, "
          f"{best / deliveries * 1e9:.0f} ns per delivery")  # fmt: skip
    print(
        f"queue alone: {trio.run(_async, queue_ns_per_message):.0f} ns per message (offer + take)"
    )
    try:
        from prometheus_client import CollectorRegistry, Counter
    except ImportError:
        return
    counter = Counter("bench", "bench", registry=CollectorRegistry())
    plain = [0]

    def bump() -> None:
        plain[0] += 1

    loops = 1_000_000
    inc = min(timeit.repeat(counter.inc, number=loops, repeat=3)) / loops * 1e9
    add = min(timeit.repeat(bump, number=loops, repeat=3)) / loops * 1e9
    print(f"prometheus_client Counter.inc(): {inc:.0f} ns; a plain += 1 (in a function): "
          f"{add:.0f} ns")  # fmt: skip


async def _async(function: Any) -> Any:
    return function()  # the queue needs a running trio loop (trio.Event)


if __name__ == "__main__":
    main()
