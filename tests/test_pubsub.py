"""Publish/subscribe over real WebSockets: routing, wildcards, encodings, order, batches."""

from __future__ import annotations

import trio

from broker.io.server import Broker
from tests.rawsocket import open_raw
from tests.wire import connect


async def test_subscriber_receives_published_message_with_its_pattern(broker_url: str) -> None:
    async with connect(broker_url) as sub, connect(broker_url) as pub:
        await sub.subscribe("chat.*")
        await pub.publish("chat.room1", {"text": "hi"})
        await sub.expect("msg", topic="chat.room1", sub="chat.*", data={"text": "hi"})


async def test_wildcards_follow_nats_semantics(broker_url: str) -> None:
    async with connect(broker_url) as sub, connect(broker_url) as pub:
        await sub.subscribe("a.*", id=1)
        await sub.subscribe("a.>", id=2)
        await sub.subscribe("a.*.c", id=3)
        for topic in ("a", "a.b", "a.b.c", "a.b.d", "x.b"):
            await pub.publish(topic, topic)
        await pub.publish("a.end.marker", "end")  # matched by a.> only
        got = []
        while (frame := await sub.next())["data"] != "end":
            got.append((frame["topic"], frame["sub"]))
        assert sorted(got) == sorted(
            [("a.b", "a.*"), ("a.b", "a.>"), ("a.b.c", "a.>"), ("a.b.c", "a.*.c"),
             ("a.b.d", "a.>")]
        )  # fmt: skip


async def test_each_matching_subscription_gets_its_own_copy(broker_url: str) -> None:
    async with connect(broker_url) as sub, connect(broker_url) as pub:
        await sub.subscribe("chat.*", id=1)
        await sub.subscribe("chat.>", id=2)
        await sub.subscribe("chat.a", id=3)
        await pub.publish("chat.a", 1)
        subs = {(await sub.expect("msg", topic="chat.a"))["sub"] for _ in range(3)}
        assert subs == {"chat.*", "chat.>", "chat.a"}


async def test_duplicate_sub_is_idempotent(broker_url: str) -> None:
    async with connect(broker_url) as sub, connect(broker_url) as pub:
        await sub.subscribe("news", id=1)
        await sub.subscribe("news", id=2)
        await pub.publish("news", 1)
        await pub.publish("news", 2)
        assert (await sub.expect("msg"))["data"] == 1
        assert (await sub.expect("msg"))["data"] == 2


async def test_unsub_stops_delivery_and_unknown_unsub_is_ok(broker_url: str) -> None:
    async with connect(broker_url) as sub, connect(broker_url) as pub:
        await sub.subscribe("news.*", id=1)
        await sub.subscribe("other", id=2)
        await sub.send({"op": "unsub", "id": 3, "topic": "news.*"})
        await sub.expect("ok", id=3)
        await sub.send({"op": "unsub", "id": 4, "topic": "never.subscribed"})
        await sub.expect("ok", id=4)
        await pub.publish("news.a", "lost")
        await pub.publish("other", "kept")
        await sub.expect("msg", topic="other", data="kept")


async def test_publisher_order_is_kept_for_every_subscriber(broker_url: str) -> None:
    count = 2000
    async with connect(broker_url) as first, connect(broker_url, "json") as second:
        await first.subscribe("seq")
        await second.subscribe("seq")
        async with connect(broker_url) as pub:
            for start in range(0, count, 100):
                await pub.send(*({"op": "pub", "topic": "seq", "data": n}
                                 for n in range(start, start + 100)))  # fmt: skip
            for client in (first, second):
                received = [(await client.expect("msg"))["data"] for _ in range(count)]
                assert received == list(range(count))


async def test_busy_subscriber_gets_batches_not_one_message_per_frame(broker_url: str) -> None:
    async with connect(broker_url) as sub, connect(broker_url) as pub:
        await sub.subscribe("burst")
        frames = [{"op": "pub", "topic": "burst", "data": n} for n in range(500)]
        await pub.send(*frames, {"op": "pub", "id": 9, "topic": "burst", "data": "end"})
        await pub.expect("ok", id=9)
        while (await sub.next())["data"] != "end":
            pass
        assert sub.messages_received < 500 / 5


async def test_msgpack_publisher_and_json_subscriber_interoperate(broker_url: str) -> None:
    async with connect(broker_url, "json") as js, connect(broker_url) as mp:
        await js.subscribe("mixed")
        await mp.subscribe("mixed")
        await mp.publish("mixed", {"n": 1, "raw": b"\x00\xff", "list": [1.5, None, True]})
        frame = await js.expect("msg", topic="mixed", sub="mixed")
        assert frame["data"] == {"n": 1, "raw": "AP8=", "list": [1.5, None, True]}
        frame = await mp.expect("msg")
        assert frame["data"]["raw"] == b"\x00\xff"
        await js.publish("mixed", {"from": "json"})
        assert (await mp.expect("msg"))["data"] == {"from": "json"}


async def test_publish_without_id_gets_no_reply(broker_url: str) -> None:
    async with connect(broker_url) as client:
        await client.subscribe("quiet")
        await client.send({"op": "pub", "topic": "quiet", "data": 1})
        await client.send({"op": "sub", "id": 7, "topic": "marker"})
        await client.expect("msg", data=1)
        await client.expect("ok", id=7)


async def test_no_subprotocol_means_msgpack(broker_url: str) -> None:
    async with connect(broker_url, subprotocols=[]) as client:
        assert client.websocket.subprotocol is None
        await client.subscribe("x")
        await client.publish("x", b"bin")
        await client.expect("msg", data=b"bin")


async def test_first_known_subprotocol_wins(broker_url: str) -> None:
    offered = ["something.else", "pubsub.v1.json", "pubsub.v1.msgpack"]
    async with connect(broker_url, "json", subprotocols=offered) as client:
        assert client.websocket.subprotocol == "pubsub.v1.json"
        await client.subscribe("x")


async def test_unknown_subprotocol_is_refused_with_400(broker: Broker) -> None:
    assert broker.port is not None
    rejection = await open_raw(broker.port, ("mqtt",))
    assert not hasattr(rejection, "stream")
    assert getattr(rejection, "status_code", None) == 400


async def test_many_subscribers_all_receive(broker_url: str) -> None:
    async with trio.open_nursery() as nursery:
        received: list[int] = []

        async def subscriber(ready: trio.Event, index: int) -> None:
            async with connect(broker_url, "json" if index % 2 else "msgpack") as client:
                await client.subscribe("fan.*")
                ready.set()
                await client.expect("msg", data="out")
                received.append(index)

        events = [trio.Event() for _ in range(50)]
        for index, event in enumerate(events):
            nursery.start_soon(subscriber, event, index)
        for event in events:
            await event.wait()
        async with connect(broker_url) as pub:
            await pub.publish("fan.out", "out")
    assert sorted(received) == list(range(50))
