"""Slow subscribers, end to end: each on_full policy against a client that stops reading.

The slow client is a bare socket with a tiny receive buffer that reads nothing until the
test says so, so the broker's outbound queue for it really fills.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from broker.io.server import Broker
from tests.helpers import make_config, start_broker, wait_until
from tests.rawsocket import RawClient, stuck_subscriber
from tests.wire import WireClient, connect

PAYLOAD = b"x" * 65536  # 64 KiB: a few hundred of these overflow any loopback buffer
COUNT = 200


async def slow_subscriber(broker: Broker, pattern: str) -> RawClient:
    """Subscribe ``pattern`` on a raw socket, then stop reading."""
    assert broker.port is not None
    return await stuck_subscriber(broker.port, pattern)


async def publish_burst(
    broker: Broker, topic: str, count: int = COUNT, *, pace: list[int] | None = None
) -> None:
    """Publish ``count`` numbered messages, then wait for the ack of a final one.

    With ``pace`` (a healthy subscriber's received list), each batch of ten waits until it
    has everything so far, so only subscribers that stopped reading fall behind.
    """
    async with connect(broker.url) as pub:
        for start in range(0, count, 10):
            stop = min(start + 10, count)
            await pub.send(*({"op": "pub", "topic": topic, "data": [n, PAYLOAD]}
                             for n in range(start, stop)))  # fmt: skip
            if pace is not None:
                await wait_until(lambda: len(pace) >= stop)  # noqa: B023
        await pub.send({"op": "pub", "id": 1, "topic": "done", "data": 0})
        pub.timeout = 30
        await pub.expect("ok", id=1)


async def drain(raw: RawClient, expected: int) -> tuple[list[int], list[dict[str, Any]]]:
    """Read until ``expected`` messages are accounted for (received or reported dropped)."""
    numbers: list[int] = []
    frames: list[dict[str, Any]] = []
    dropped = 0
    with trio.fail_after(30):
        while len(numbers) + dropped < expected:
            batch, close = await raw.read_frames()
            assert close is None, f"closed with {close}"
            for frame in batch:
                frames.append(frame)
                if frame["op"] == "msg":
                    numbers.append(frame["data"][0])
                elif frame["op"] == "lag":
                    dropped += frame["dropped"]
    assert len(numbers) + dropped == expected
    return numbers, frames


def assert_lag_precedes_every_gap(frames: list[dict[str, Any]], pattern: str) -> None:
    """At every msg, the drops reported so far by lag frames cover the numbers missing so far."""
    reported = received = 0
    for frame in frames:
        if frame["op"] == "lag":
            assert frame["sub"] == pattern
            reported += frame["dropped"]
        elif frame["op"] == "msg":
            missing = frame["data"][0] - received
            told = f"{missing} missing before {frame['data'][0]}, {reported} told"
            assert reported >= missing, told
            received += 1


async def collect(client: WireClient, count: int, into: list[int]) -> None:
    client.timeout = 30
    for _ in range(count):
        into.append((await client.expect("msg"))["data"][0])


async def test_block_slows_publisher_then_disconnects_stuck_subscriber_with_4002(
    nursery: trio.Nursery,
) -> None:
    # slow_timeout holds for the healthy one too: long enough for a loaded machine's pauses
    broker = await start_broker(nursery, make_config(queue_messages=4, slow_timeout=1.0))
    healthy_got: list[int] = []
    async with connect(broker.url) as healthy:
        await healthy.subscribe("feed")
        stuck = await slow_subscriber(broker, "feed")
        async with trio.open_nursery() as readers:
            readers.start_soon(collect, healthy, COUNT, healthy_got)
            await publish_burst(broker, "feed")
        assert healthy_got == list(range(COUNT))  # nothing dropped for the healthy one
        assert await stuck.wait_close_code() == 4002
        await wait_until(lambda: len(broker.connections) == 1)
        assert broker.hub.subscription_count() == 1


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "conflate"])
async def test_drop_policies_never_slow_the_publisher_and_report_lag(
    nursery: trio.Nursery, policy: str
) -> None:
    config = make_config(topics={"ticks.>": policy}, queue_messages=4, slow_timeout=0.1)
    broker = await start_broker(nursery, config)
    raw = await slow_subscriber(broker, "ticks.*")
    await publish_burst(broker, "ticks.a")  # completes although the subscriber reads nothing
    numbers, frames = await drain(raw, COUNT)
    assert numbers == sorted(numbers)  # order kept across the gaps
    assert len(numbers) < COUNT
    assert_lag_precedes_every_gap(frames, "ticks.*")
    if policy == "drop_newest":
        assert COUNT - 1 not in numbers
    else:
        assert numbers[-1] == COUNT - 1  # the newest value always arrives
    assert len(broker.connections) == 1  # the slow subscriber was never disconnected


async def test_conflate_keeps_the_latest_value_per_topic(nursery: trio.Nursery) -> None:
    config = make_config(topics={"prices.*": "conflate"}, queue_messages=4)
    broker = await start_broker(nursery, config)
    raw = await slow_subscriber(broker, "prices.*")
    async with connect(broker.url) as pub:
        for n in range(COUNT):
            topic = "prices.a" if n % 2 else "prices.b"
            await pub.send({"op": "pub", "topic": topic, "data": [n, PAYLOAD]})
        await pub.publish("prices.done", [COUNT, b""], id=1)
    latest: dict[str, int] = {}
    with trio.fail_after(30):
        while latest.get("prices.done") != COUNT:
            batch, close = await raw.read_frames()
            assert close is None
            for frame in batch:
                if frame["op"] == "msg":
                    latest[frame["topic"]] = frame["data"][0]
    assert latest == {"prices.a": COUNT - 1, "prices.b": COUNT - 2, "prices.done": COUNT}


async def test_disconnect_policy_closes_slow_subscriber_at_once(nursery: trio.Nursery) -> None:
    config = make_config(topics={"alerts.>": "disconnect"}, queue_messages=64, slow_timeout=60)
    broker = await start_broker(nursery, config)
    got: list[int] = []
    async with connect(broker.url) as healthy:
        await healthy.subscribe("alerts.>")
        raw = await slow_subscriber(broker, "alerts.>")
        async with trio.open_nursery() as readers:
            readers.start_soon(collect, healthy, COUNT, got)
            await publish_burst(broker, "alerts.fire", pace=got)
        assert got == list(range(COUNT))
        assert await raw.wait_close_code() == 4002


async def test_slow_subscriber_does_not_delay_other_topics(nursery: trio.Nursery) -> None:
    config = make_config(topics={"ticks.>": "drop_oldest"}, queue_messages=4)
    broker = await start_broker(nursery, config)
    await slow_subscriber(broker, "ticks.>")
    async with connect(broker.url) as other:
        await other.subscribe("chat.room")
        await publish_burst(broker, "ticks.a")
        await other.publish("chat.room", "hello", id=2)
        await other.expect("msg", data="hello")
