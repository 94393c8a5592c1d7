"""Recovery after a reconnect, end to end over real sockets: offsets, replay, epochs, eviction."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from broker.config import Config, HistoryConfig
from broker.core.delivery import LocalDelivery
from broker.core.history import MemoryHistory
from broker.core.hub import Hub, Subscription
from broker.core.outbound import OutboundQueue, Policy
from broker.core.rules import HistoryLimits, PolicyTable, TopicRule
from broker.io.server import Broker
from broker.protocol.frames import Encoding
from tests.helpers import make_config, start_broker, wait_until
from tests.rawsocket import RawClient, open_raw
from tests.wire import Frame, WireClient, connect

TOPIC = "chat.room"


def history_config(
    size: int = 1000, ttl: float | None = None, max_bytes: int = 64 * 1024 * 1024, **limits: Any
) -> Config:
    """Brokers whose ``chat.>`` topics keep history; other topics keep none."""
    rule = TopicRule("chat.>", Policy.BLOCK, HistoryLimits(size, ttl))
    return make_config(**limits).replace(topics=(rule,), history=HistoryConfig(max_bytes))


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Broker]:
    """A broker for the body of the ``async with``, shut down after it."""
    async with trio.open_nursery() as nursery:
        broker = await start_broker(nursery, config)
        yield broker
        broker.shutdown()


async def sub(client: WireClient, topic: str, since: Any = None, id: int = 1) -> Frame:
    """Subscribe (with ``since`` if given) and return the reply."""
    frame: dict[str, Any] = {"op": "sub", "id": id, "topic": topic}
    if since is not None:
        frame["since"] = since
    await client.send(frame)
    return await client.reply(id)


async def publish_numbers(client: WireClient, start: int, stop: int, topic: str = TOPIC) -> None:
    """Publish ``start..stop-1`` as data and wait for the broker to accept the last one."""
    frames: list[dict[str, Any]] = [
        {"op": "pub", "topic": topic, "data": n} for n in range(start, stop)
    ]
    frames[-1]["id"] = 1000 + stop
    await client.send(*frames)
    assert (await client.reply(1000 + stop))["op"] == "ok"  # frames before it stay pending


async def read_messages(client: WireClient, count: int) -> list[Frame]:
    """The next ``count`` frames, asserting that they are all ``msg``."""
    frames = [await client.next() for _ in range(count)]
    assert all(frame["op"] == "msg" for frame in frames), frames
    return frames


async def test_sub_on_a_history_topic_replies_with_epoch_and_latest_offset() -> None:
    async with running(history_config()) as broker, connect(broker.url) as client:
        first = await sub(client, TOPIC)
        assert first["op"] == "ok" and first["offset"] == 0 and isinstance(first["epoch"], str)
        await publish_numbers(client, 0, 3)
        assert [m["offset"] for m in await read_messages(client, 3)] == [1, 2, 3]
        again = await sub(client, "chat.other", id=2)
        assert again["offset"] == 0 and isinstance(again["epoch"], str)
        third = await sub(client, "chat.*", id=3)  # a wildcard: no position of its own
        assert third == {"op": "ok", "id": 3}
        async with connect(broker.url) as late:
            assert await sub(late, TOPIC) == {"op": "ok", "id": 1, **first, "offset": 3}


async def test_messages_carry_offsets_for_wildcard_subscribers_in_both_encodings() -> None:
    async with (
        running(history_config()) as broker,
        connect(broker.url) as packed,
        connect(broker.url, "json") as text,
    ):
        for client in (packed, text):
            await sub(client, "chat.>")
            await sub(client, "news.>", id=2)
        await publish_numbers(packed, 0, 2)
        await publish_numbers(packed, 0, 1, topic="news.a")
        for client in (packed, text):
            frames = await read_messages(client, 3)
            assert [(m["sub"], m.get("offset"), m["data"]) for m in frames] == [
                ("chat.>", 1, 0),
                ("chat.>", 2, 1),
                ("news.>", None, 0),  # no history, no offset
            ]


async def test_recovery_during_continuous_publishing_has_no_gap_and_no_duplicate() -> None:
    """Recovering subscribers join while a publisher never pauses; each gets every offset once.

    The replay (hundreds of messages, over the outbound queue's bound) is still being written
    when the live messages published after the ``sub`` start to queue behind it.
    """
    config = history_config(size=100_000, queue_messages=64)
    stop, final_known = trio.Event(), trio.Event()
    final = 0
    results: dict[int, list[Frame]] = {}

    async with running(config) as broker:
        async with connect(broker.url) as watcher:
            epoch = (await sub(watcher, TOPIC))["epoch"]

        async def publisher() -> None:
            nonlocal final
            async with connect(broker.url) as pub:
                while not stop.is_set():
                    await publish_numbers(pub, final, final + 25)
                    final += 25
            final_known.set()

        async def recover(index: int, since: int, encoding: str, live_seen: trio.Event) -> None:
            async with connect(broker.url, encoding) as client:
                reply = await sub(client, TOPIC, {"epoch": epoch, "offset": since})
                assert reply["recovered"] is True and reply["epoch"] == epoch
                frames: list[Frame] = []
                while not frames or frames[-1]["offset"] < reply["offset"] + 200:
                    frames.append(await client.next())
                live_seen.set()
                await final_known.wait()
                while frames[-1]["offset"] < final:
                    frames.append(await client.next())
                results[index] = [reply, *frames]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            seen = []
            for index, since in enumerate([0, 100, 300, 450]):
                # history to replay, then more published before each join
                await wait_until(lambda: final >= 500 + 100 * index)  # noqa: B023
                event = trio.Event()
                seen.append(event)
                encoding = "json" if index % 2 else "msgpack"
                nursery.start_soon(recover, index, since, encoding, event)
            for event in seen:
                await event.wait()
            stop.set()

    for index, since in enumerate([0, 100, 300, 450]):
        reply, *frames = results[index]
        assert reply["offset"] > since + 1  # there was a replay ...
        assert frames[-1]["offset"] == final > reply["offset"]  # ... and live messages after it
        assert all(frame["op"] == "msg" for frame in frames)
        assert [f["offset"] for f in frames] == list(range(since + 1, final + 1))
        assert [f["data"] for f in frames] == list(range(since, final))


async def test_client_killed_mid_stream_recovers_exactly_the_missed_messages() -> None:
    async with running(history_config()) as broker, connect(broker.url) as publisher:
        assert broker.port is not None
        raw = await open_raw(broker.port)
        assert isinstance(raw, RawClient)
        await raw.send_frames({"op": "sub", "id": 1, "topic": TOPIC})
        received: list[dict[str, Any]] = []
        await publish_numbers(publisher, 0, 40)
        while len(received) < 11:  # the ok and at least ten messages
            frames, _ = await raw.read_frames()
            received += frames
        epoch = received[0]["epoch"]
        last = received[-1]["offset"]
        await raw.stream.aclose()  # the socket dies: no close handshake
        await publish_numbers(publisher, 40, 60)

        async with connect(broker.url) as client:
            reply = await sub(client, TOPIC, {"epoch": epoch, "offset": last})
            assert reply == {
                "op": "ok",
                "id": 1,
                "epoch": epoch,
                "offset": 60,
                "recovered": True,
            }
            missed = await read_messages(client, 60 - last)
            assert [m["offset"] for m in missed] == list(range(last + 1, 61))
            await publish_numbers(publisher, 60, 61)
            assert (await client.next())["offset"] == 61


async def test_new_epoch_after_a_restart_is_not_recovered_and_replays_nothing() -> None:
    config = history_config()
    async with running(config) as broker, connect(broker.url) as client:
        old = await sub(client, TOPIC)
        await publish_numbers(client, 0, 3)
    async with running(config) as broker, connect(broker.url) as client:
        await publish_numbers(client, 0, 2)
        reply = await sub(client, TOPIC, {"epoch": old["epoch"], "offset": 3})
        assert reply["recovered"] is False and reply["offset"] == 2
        assert reply["epoch"] != old["epoch"]
        await publish_numbers(client, 7, 8)
        assert await client.next() == {
            "op": "msg",
            "topic": TOPIC,
            "sub": TOPIC,
            "data": 7,
            "offset": 3,
        }


async def test_size_eviction_makes_an_older_position_unrecoverable() -> None:
    async with running(history_config(size=5)) as broker, connect(broker.url) as client:
        epoch = (await sub(client, "chat.other"))["epoch"]
        epoch = (await sub(client, TOPIC, id=2))["epoch"]
        await publish_numbers(client, 0, 10)
        await read_messages(client, 10)
        async with connect(broker.url) as late:
            gap = await sub(late, TOPIC, {"epoch": epoch, "offset": 2})
            assert gap["recovered"] is False and gap["offset"] == 10
            assert [m["offset"] for m in await read_messages(late, 5)] == [6, 7, 8, 9, 10]
        async with connect(broker.url) as late:
            whole = await sub(late, TOPIC, {"epoch": epoch, "offset": 5})
            assert whole["recovered"] is True
            assert [m["offset"] for m in await read_messages(late, 5)] == [6, 7, 8, 9, 10]


async def test_ttl_eviction_drops_expired_messages_from_the_replay(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with running(history_config(ttl=60)) as broker, connect(broker.url) as client:
        epoch = (await sub(client, TOPIC))["epoch"]
        await publish_numbers(client, 0, 3)
        mock_clock.jump(30)
        await publish_numbers(client, 3, 5)
        mock_clock.jump(31)  # the first three are now 61 s old
        await read_messages(client, 5)
        async with connect(broker.url) as late:
            reply = await sub(late, TOPIC, {"epoch": epoch, "offset": 0})
            assert reply["recovered"] is False and reply["epoch"] == epoch
            assert [m["offset"] for m in await read_messages(late, 2)] == [4, 5]
        async with connect(broker.url) as late:
            reply = await sub(late, TOPIC, {"epoch": epoch, "offset": 3})
            assert reply["recovered"] is True
            await publish_numbers(client, 5, 6)
            assert [m["offset"] for m in await read_messages(late, 3)] == [4, 5, 6]


async def test_memory_cap_evicts_the_least_recently_published_topic(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="broker.history")
    config = history_config(max_bytes=20_000)
    async with running(config) as broker, connect(broker.url) as client:
        epoch = (await sub(client, "chat.first"))["epoch"]
        await publish_numbers(client, 0, 1, topic="chat.first")
        for n in range(30):  # ~30 KB of history on other topics
            await client.send({"op": "pub", "topic": f"chat.t{n}", "data": b"x" * 1000})
        await publish_numbers(client, 0, 1, topic="chat.last")
        assert broker.delivery.history.statistics()["bytes"] <= 20_000  # type: ignore[attr-defined]
        async with connect(broker.url) as again:
            reply = await sub(again, "chat.first", {"epoch": epoch, "offset": 1})
        assert reply["recovered"] is False and reply["epoch"] != epoch and reply["offset"] == 0
    assert "starting with 'chat.first'" in caplog.text


async def test_since_on_a_topic_without_history_subscribes_live_with_recovered_false() -> None:
    async with running(history_config()) as broker, connect(broker.url) as client:
        reply = await sub(client, "news.a", {"epoch": "e", "offset": 4})
        assert reply == {"op": "ok", "id": 1, "recovered": False}
        await publish_numbers(client, 0, 1, topic="news.a")
        assert await client.next() == {"op": "msg", "topic": "news.a", "sub": "news.a", "data": 0}


@pytest.mark.parametrize(
    ("topic", "since", "message"),
    [
        ("chat.*", {"epoch": "e", "offset": 0}, "needs a concrete topic"),
        ("chat.>", {"epoch": "e", "offset": 0}, "needs a concrete topic"),
        (TOPIC, {"epoch": "e"}, "'since' must be a map"),
        (TOPIC, [1, 2], "'since' must be a map"),
    ],
)
async def test_bad_since_is_refused_and_subscribes_nothing(
    topic: str, since: Any, message: str
) -> None:
    async with running(history_config()) as broker, connect(broker.url) as client:
        reply = await sub(client, topic, since)
        assert reply["op"] == "err" and reply["code"] == "bad_request"
        assert message in reply["msg"]
        assert broker.hub.subscription_count() == 0


async def test_since_on_a_subscription_already_held_is_refused_without_a_replay() -> None:
    async with running(history_config()) as broker, connect(broker.url) as client:
        epoch = (await sub(client, TOPIC))["epoch"]
        await publish_numbers(client, 0, 2)
        await read_messages(client, 2)
        reply = await sub(client, TOPIC, {"epoch": epoch, "offset": 0}, id=2)
        assert reply["op"] == "err" and "already subscribed" in reply["msg"]
        await publish_numbers(client, 2, 3)
        assert (await client.next())["offset"] == 3


# --- the hub alone ----------------------------------------------------------------------------


class FakeSubscriber:
    """A subscriber whose queue holds one message, drained by the test."""

    def __init__(self) -> None:
        self.queue = OutboundQueue(max_messages=1, max_bytes=1 << 20)
        self.encoding = Encoding.MSGPACK

    def close_slow_consumer(self, why: str) -> None:
        raise AssertionError(why)


async def test_publishes_of_a_history_topic_queue_in_offset_order_even_when_blocked() -> None:
    """A publish is queued whole before anyone waits: no newer publish overtakes an older one
    whose publisher waits for room in a full queue."""
    rule = TopicRule("chat.>", Policy.BLOCK, HistoryLimits(10))
    hub = Hub(PolicyTable([rule]), slow_timeout=60)
    delivery = LocalDelivery(hub, MemoryHistory(hub.policies.history_for))
    subscriber = FakeSubscriber()
    await delivery.subscribe(Subscription(subscriber, TOPIC), None)
    assert delivery.publish(TOPIC, 1, 0.0) is None  # the queue is now full
    second = delivery.publish(TOPIC, 2, 0.0)  # queued past the bound: its publisher must wait
    third = delivery.publish(TOPIC, 3, 0.0)  # another publisher, before the first one waits
    assert second is not None and third is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second.complete)
        nursery.start_soon(third.complete)
        await trio.testing.wait_all_tasks_blocked()
        frames = subscriber.queue.take_batch(1 << 20).frames  # room: both go on
    assert [msgpack.unpackb(frame)["offset"] for frame in frames] == [1, 2, 3]
