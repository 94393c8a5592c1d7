#!/usr/bin/env python3
"""Micro-benchmark of the pure fan-out path: a publish into OutboundQueues, no sockets.

    .venv/bin/python bench/micro_hub.py [subscribers] [messages]

Prints the cost per delivery of LocalDelivery.publish (route, encode once, offer per subscriber)
plus OutboundQueue.take_batch, best of 5, for fanout (one topic) and topics (one each).
"""

from __future__ import annotations

import sys
import time

import trio

from broker.core.delivery import LocalDelivery
from broker.core.history import MemoryHistory
from broker.core.hub import Hub, Subscription
from broker.core.outbound import OutboundQueue
from broker.core.rules import PolicyTable
from broker.protocol.frames import Encoding


class FakeSubscriber:
    """A connection without a socket: a queue and an encoding."""

    def __init__(self) -> None:
        self.queue = OutboundQueue(1_000_000, 1 << 40)
        self.encoding = Encoding.MSGPACK

    def close_slow_consumer(self, why: str) -> None:
        raise AssertionError(why)


async def scenario(subscribers: int, messages: int, own_topics: bool) -> float:
    hub = Hub(PolicyTable([]), slow_timeout=5.0)
    delivery = LocalDelivery(hub, MemoryHistory(hub.policies.history_for))
    subs = [FakeSubscriber() for _ in range(subscribers)]
    for i, sub in enumerate(subs):
        hub.add(Subscription(sub, f"bench.t.{i}" if own_topics else "bench.fanout"))
    topics = [f"bench.t.{i}" for i in range(subscribers)] if own_topics else ["bench.fanout"]
    data = b"a" * 64
    best = float("inf")
    every = 64 * len(topics)
    for _ in range(5):
        start = time.process_time()
        for n in range(messages):
            delivery.publish(topics[n % len(topics)], data, 0.0)
            if n % every == every - 1:  # each subscriber has ~64 messages queued
                for sub in subs:
                    sub.queue.take_batch(1 << 20)
        elapsed = time.process_time() - start
        for sub in subs:
            sub.queue.take_batch(1 << 30)
        deliveries = messages * (1 if own_topics else subscribers)
        best = min(best, elapsed / deliveries)
    return best


def main() -> None:
    subscribers = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    fan = trio.run(scenario, subscribers, messages, False)
    own = trio.run(scenario, 1000, messages * 100, True)
    print(f"fanout  subs={subscribers}  {fan * 1e6:.2f} us/delivery  ({1 / fan:,.0f}/s)")
    print(f"topics  subs=1000  {own * 1e6:.2f} us/delivery  ({1 / own:,.0f}/s)")


if __name__ == "__main__":
    main()
