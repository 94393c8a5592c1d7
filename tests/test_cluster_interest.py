"""Interest-based following: a node receives from Redis only what its own clients subscribe
to, history topics included, and recovery stays exact on a node that did not follow a topic
(real Redis, nodes in this process)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from broker.cluster.delivery import ClusterDelivery
from broker.io.server import Broker
from tests.helpers import wait_until
from tests.redis_server import RedisServer, running_redis
from tests.test_cluster import backplane, nodes, sub_since
from tests.wire import WireClient, connect


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


def delivery(broker: Broker) -> ClusterDelivery:
    assert isinstance(broker.delivery, ClusterDelivery)
    return broker.delivery


async def followers(redis: RedisServer, topic: str) -> object:
    """How many connections Redis has subscribed to ``topic``'s channel."""
    reply = await redis.command("PUBSUB", "NUMSUB", "broker:m:" + topic)
    assert isinstance(reply, list)
    return reply[1]


async def round_trip(client: WireClient, id: int) -> None:
    """A local publish answered: everything the node had received before is delivered."""
    await client.publish("sync", 0, id=id)


async def test_a_node_receives_no_message_nobody_there_subscribes_to(redis: RedisServer) -> None:
    async with nodes(redis, 2) as (a, b), connect(a.url) as idle, connect(b.url) as publisher:
        for n in range(1, 41):  # a plain topic and a history topic (chat.>)
            await publisher.publish("plain.t" if n % 2 else "chat.t", n, id=n)
        await round_trip(idle, 1)
        assert backplane(a).stats["received"] == 0
        assert delivery(a).unwanted == 0 and delivery(b).unwanted == 0
        assert await redis.command("PUBSUB", "NUMPAT") == 0  # no node follows chat.>
        assert not delivery(a).history.is_warm("chat.t")


async def test_a_history_topic_is_followed_while_a_local_client_subscribes(
    redis: RedisServer,
) -> None:
    async with nodes(redis, 2) as (a, b), connect(b.url) as publisher:
        async with connect(a.url) as client:
            await client.subscribe("chat.room")
            assert await followers(redis, "chat.room") == 1
            await publisher.publish("chat.room", "hi", id=1)
            assert (await client.expect("msg", data="hi"))["offset"] == 1
            assert delivery(a).history.is_warm("chat.room")
        # the last subscriber gone: no longer followed, and its mirror forgotten
        await wait_until(lambda: not delivery(a).history.is_warm("chat.room"))
        with trio.fail_after(5):
            while await followers(redis, "chat.room") != 0:  # noqa: ASYNC110 - polls Redis
                await trio.sleep(0.01)
        for n in range(2, 12):
            await publisher.publish("chat.room", n, id=n)
        assert backplane(a).stats["received"] == 1
        assert delivery(a).unwanted == 0


async def test_unwanted_messages_are_counted(redis: RedisServer) -> None:
    """A Redis glob brings more than its pattern matches ('*' matches dots in Redis): the
    node receives those and counts them."""
    async with nodes(redis, 2) as (a, b), connect(a.url) as client, connect(b.url) as publisher:
        await client.subscribe("w.*")
        await publisher.publish("w.a", 1, id=1)
        await publisher.publish("w.a.b", 2, id=2)  # matches the glob w.*, not the pattern
        await publisher.publish("w.c", 3, id=3)
        assert [(await client.expect("msg"))["data"] for _ in range(2)] == [1, 3]
        assert delivery(a).unwanted == 1


async def test_recovery_on_a_node_that_never_followed_the_topic(redis: RedisServer) -> None:
    async with nodes(redis, 2) as (a, b), connect(b.url) as publisher:
        async with connect(b.url) as first:
            await first.send({"op": "sub", "id": 1, "topic": "chat.r"})
            epoch = (await first.reply(1))["epoch"]
        for n in range(1, 11):
            await publisher.publish("chat.r", n, id=n)  # no subscriber left anywhere
        assert backplane(a).stats["received"] == 0
        async with connect(a.url) as client:
            reply = await sub_since(client, "chat.r", epoch, 3, 1)
            assert reply["recovered"] is True and reply["offset"] == 10, reply
            replayed = [(await client.expect("msg"))["offset"] for _ in range(7)]
            assert replayed == list(range(4, 11))
            await publisher.publish("chat.r", 11, id=11)
            assert (await client.expect("msg"))["offset"] == 11


async def test_recovery_is_exact_while_publishes_race_the_follow(redis: RedisServer) -> None:
    """Two publishers (one on each node) never stop; clients on node a keep subscribing with
    since and leaving, in pairs at once, so node a stops following the topic between rounds
    and starts again while messages stream: every client sees each offset once, in order,
    from its since on."""
    async with nodes(redis, 2) as (a, b), connect(a.url) as pa, connect(b.url) as pb:
        stop = trio.Event()

        async def publish(client: WireClient, start: int) -> None:
            n = start
            while not stop.is_set():
                n += 2
                await client.send({"op": "pub", "topic": "chat.live", "data": n})
                if n % 40 < 2:
                    await client.publish("chat.live", -n, id=n)  # keep pace with acks

        async def follow(since: tuple[str, int], got: list[int]) -> None:
            async with connect(a.url) as client:
                reply = await sub_since(client, "chat.live", since[0], since[1], 1)
                assert reply["recovered"] is True, reply
                while len(got) < 30:
                    got.append((await client.expect("msg"))["offset"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish, pa, 0)
            nursery.start_soon(publish, pb, 1)
            async with connect(b.url) as first:
                await first.send({"op": "sub", "id": 1, "topic": "chat.live"})
                ok = await first.reply(1)
                epoch, seen = ok["epoch"], ok["offset"]
            for _ in range(8):
                await wait_until(lambda: not backplane(a).followed("chat.live"))
                assert not delivery(a).history.is_warm("chat.live")
                one: list[int] = []
                two: list[int] = []
                async with trio.open_nursery() as pair:
                    pair.start_soon(follow, (epoch, seen), one)
                    pair.start_soon(follow, (epoch, seen - 5), two)
                assert one == list(range(seen + 1, seen + 31))
                assert two == list(range(seen - 4, seen + 26))
                seen = one[-1]
            stop.set()
        await wait_until(lambda: not delivery(a)._held)  # the last pair's holds went with them


async def test_a_history_sub_while_redis_is_down_holds_nothing(redis: RedisServer) -> None:
    async with nodes(redis, 1) as (a,), connect(a.url) as client:
        await redis.stop()
        await wait_until(lambda: not backplane(a).connected)
        await client.send({"op": "sub", "id": 1, "topic": "chat.down"})
        reply = await client.reply(1)
        assert reply["op"] == "err" and reply["code"] == "unavailable", reply
        assert not delivery(a)._held
