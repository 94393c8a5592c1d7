"""Several broker nodes as one, through a real Redis (each test starts its own redis-server).

Most tests run the nodes in this process (real WebSockets, real Redis); the last ones run three
``broker serve`` processes, to SIGKILL one.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from broker.cluster.backplane import RedisBackplane, _Commands, _Pending, redis_glob
from broker.cluster.delivery import ClusterDelivery
from broker.cluster.resp import RedisAddress, RedisConnection, RedisError, encode_command
from broker.config import AuthConfig, ClusterConfig, Config, TokenGrant
from broker.core.delivery import Unavailable
from broker.core.outbound import Policy
from broker.core.rules import HistoryLimits, TopicRule
from broker.io.server import Broker
from tests.helpers import make_config, start_broker, wait_until
from tests.redis_server import RedisServer, running_redis
from tests.wire import Frame, WireClient, connect


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


HISTORY = TopicRule("chat.>", Policy.BLOCK, HistoryLimits(1000))


def cluster_config(
    redis: RedisServer,
    node_id: str,
    *,
    history: bool = True,
    auth: AuthConfig | None = None,
    **limits: Any,
) -> Config:
    config = make_config(**limits)
    return config.replace(
        cluster=ClusterConfig(backend=redis.url, node_id=node_id),
        topics=(HISTORY,) if history else (),
        auth=auth if auth is not None else config.auth,
    )


def backplane(broker: Broker) -> RedisBackplane:
    delivery = broker.delivery
    assert isinstance(delivery, ClusterDelivery) and isinstance(delivery.backplane, RedisBackplane)
    return delivery.backplane


@asynccontextmanager
async def nodes(
    redis: RedisServer,
    count: int,
    *,
    history: bool = True,
    auth: AuthConfig | None = None,
    **limits: Any,
) -> AsyncIterator[list[Broker]]:
    """``count`` brokers in this process sharing ``redis``, each connected to it (keeping
    history on ``chat.>`` unless told not to)."""
    async with trio.open_nursery() as nursery:
        brokers = [
            await start_broker(
                nursery, cluster_config(redis, f"n{i}", history=history, auth=auth, **limits)
            )
            for i in range(count)
        ]
        await wait_until(lambda: all(backplane(b).connected for b in brokers))
        yield brokers
        for broker in brokers:
            broker.shutdown()


async def publish_all(client: WireClient, topic: str, values: list[object]) -> None:
    """Publish each value with an id (so in order, each acknowledged)."""
    for index, value in enumerate(values, start=100):
        await client.publish(topic, value, id=index)


async def test_a_message_published_on_one_node_reaches_subscribers_on_every_node(
    redis: RedisServer,
) -> None:
    async with (
        nodes(redis, 3) as (a, b, c),
        connect(a.url) as sa,
        connect(b.url) as sb,
        connect(c.url) as pc,
    ):
        await sa.subscribe("chat.room")
        await sb.subscribe("chat.room")
        await pc.publish("chat.room", {"text": "hi"})
        for client in (sa, sb):
            await client.expect("msg", topic="chat.room", sub="chat.room", data={"text": "hi"})


async def test_nodes_given_one_node_id_by_a_shared_config_still_deliver_to_each_other(
    redis: RedisServer,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = [await start_broker(nursery, cluster_config(redis, "eu-1")) for _ in range(2)]
        await wait_until(lambda: backplane(a).connected and backplane(b).connected)
        async with connect(a.url) as subscriber, connect(b.url) as publisher:
            await subscriber.subscribe("news.a")  # no history: only the backplane carries it
            await publisher.publish("news.a", "from b", id=1)
            await subscriber.expect("msg", topic="news.a", data="from b")
        assert a.node_id.startswith("eu-1-") and a.node_id != b.node_id
        a.shutdown()
        b.shutdown()


async def test_wildcards_match_across_nodes_like_on_one(redis: RedisServer) -> None:
    async with (
        nodes(redis, 2) as (a, b),
        connect(a.url, "json") as subscriber,
        connect(b.url) as publisher,
    ):
        await subscriber.subscribe("chat.*", id=1)
        await subscriber.subscribe("news.>", id=2)
        # Redis' glob '*' also matches 'chat.a.b'; the broker must not deliver it to chat.*
        for topic in ("chat.a.b", "chat.a", "news", "news.x.y", "other.a"):
            await publisher.publish(topic, topic)
        await subscriber.expect("msg", topic="chat.a", sub="chat.*")
        await subscriber.expect("msg", topic="news.x.y", sub="news.>")
        await subscriber.publish("end", 0, id=3)  # a local round trip: nothing else came
        assert subscriber._pending == []


async def test_overlapping_subscriptions_on_a_node_get_each_message_once_per_subscription(
    redis: RedisServer,
) -> None:
    async with (
        nodes(redis, 2) as (a, b),
        connect(a.url) as one,
        connect(a.url) as two,
        connect(b.url) as publisher,
    ):
        await one.subscribe("x.y", id=1)
        await one.subscribe("x.*", id=2)
        await two.subscribe("x.>", id=1)
        await publisher.publish("x.y", 1)
        await publisher.publish("x.y", 2)
        got = [await one.next() for _ in range(4)]
        assert sorted((f["sub"], f["data"]) for f in got) == [
            ("x.*", 1),
            ("x.*", 2),
            ("x.y", 1),
            ("x.y", 2),
        ]
        await two.expect("msg", data=1)
        await two.expect("msg", data=2)
        await one.publish("end", 0, id=3)
        assert one._pending == []
        assert backplane(a).stats["duplicates"] == 4  # Redis sent each one 3 times


async def test_the_origin_node_delivers_its_own_messages_once(redis: RedisServer) -> None:
    async with nodes(redis, 2) as (a, _), connect(a.url) as client:
        await client.subscribe("t")
        await client.publish("t", "mine", id=2)
        await client.expect("msg", data="mine")
        await client.publish("u", 0, id=3)
        assert client._pending == []


async def test_one_publishers_messages_arrive_in_order_on_other_nodes(redis: RedisServer) -> None:
    async with (
        nodes(redis, 3) as (a, b, c),
        connect(a.url) as sb,
        connect(b.url) as sc,
        connect(c.url) as publisher,
    ):
        await sb.subscribe("seq.>")
        await sc.subscribe("seq.n")
        values = list(range(300))
        await publisher.send(*({"op": "pub", "topic": "seq.n", "data": v} for v in values))
        await publisher.publish("seq.n", "done", id=9)
        for client in (sb, sc):
            got = [(await client.expect("msg"))["data"] for _ in range(301)]
            assert got == [*values, "done"]


async def test_a_burst_of_mixed_publishes_keeps_each_topics_order_and_offsets(
    redis: RedisServer,
) -> None:
    """Publishes queued for Redis together (history ones numbered in batches) keep one
    publisher's order per topic, and a pub with id is ok only once Redis has it and all
    before it."""
    async with (
        nodes(redis, 2) as (a, b),
        connect(a.url) as subscriber,
        connect(b.url) as publisher,
    ):
        for n, topic in enumerate(("chat.a", "chat.b", "plain"), start=1):
            await subscriber.subscribe(topic, id=n)
        frames: list[Frame] = []
        sent: dict[str, list[int]] = {"chat.a": [], "chat.b": [], "plain": []}
        for n in range(900):
            topic = "chat.b" if n % 7 == 3 else "plain" if n % 11 == 5 else "chat.a"
            frames.append({"op": "pub", "topic": topic, "data": n})
            if n % 150 == 149:
                frames[-1]["id"] = n
            sent[topic].append(n)
        await publisher.send(*frames)
        for n in range(149, 900, 150):
            assert (await publisher.reply(n))["op"] == "ok"
        kept = await redis.command("XLEN", "broker:h:chat.a")
        assert kept == len(sent["chat.a"])  # the last ok: it is in Redis, and all before it
        got: dict[str, list[int]] = {topic: [] for topic in sent}
        offsets: dict[str, list[int]] = {"chat.a": [], "chat.b": []}
        for _ in range(900):
            frame = await subscriber.expect("msg")
            got[frame["topic"]].append(frame["data"])
            if frame["topic"] in offsets:
                offsets[frame["topic"]].append(frame["offset"])
        assert got == sent
        for topic, numbered in offsets.items():
            assert numbered == list(range(1, len(sent[topic]) + 1))


async def test_a_burst_on_a_history_topic_is_numbered_in_few_script_calls(
    redis: RedisServer,
) -> None:
    async with nodes(redis, 1) as (a,), connect(a.url) as publisher:
        await redis.command("CONFIG", "RESETSTAT")
        await publisher.send(
            *({"op": "pub", "topic": "chat.burst", "data": n} for n in range(1000))
        )
        await publisher.publish("chat.burst", "end", id=1)
        assert await redis.command("GET", "broker:o:chat.burst") == b"1001"
        stats = await redis.command("INFO", "commandstats")
        assert isinstance(stats, bytes)
        calls = int(stats.split(b"cmdstat_eval:calls=")[1].split(b",")[0])
        assert calls <= 1000 // 128 + 3, stats  # batches of at most 128, and the last pub


async def test_subscriptions_follow_local_clients_in_redis(redis: RedisServer) -> None:
    async with nodes(redis, 1) as (a,):
        async with connect(a.url) as one, connect(a.url) as two:
            await one.subscribe("p.*")
            await two.subscribe("p.*")
            await one.subscribe("exact")
            # p.* once for the node; chat.> (history) is followed by no one here
            assert await redis.command("PUBSUB", "NUMPAT") == 1
            assert await redis.command("PUBSUB", "CHANNELS", "broker:m:*") == [b"broker:m:exact"]
            await one.send({"op": "unsub", "id": 5, "topic": "p.*"})
            await one.reply(5)
            assert await redis.command("PUBSUB", "NUMPAT") == 1  # two still holds it
        # both connections closed: the node follows nothing in Redis
        await wait_redis(redis, "NUMPAT", 0)
        await wait_redis(redis, "CHANNELS", [])


async def test_a_forbidden_sub_is_refused_without_following_its_topic_in_redis(
    redis: RedisServer,
) -> None:
    alice = TokenGrant("alice-token", "alice", subscribe=("news.>",))
    async with nodes(redis, 1, auth=AuthConfig(mode="tokens", tokens=(alice,))) as (node,):
        plane = backplane(node)
        followed: list[str] = []
        follow = plane.follow

        def recording_follow(pattern: str) -> None:
            followed.append(pattern)
            follow(pattern)

        plane.follow = recording_follow  # type: ignore[method-assign]
        async with connect(node.url + "?token=alice-token") as client:
            await client.send({"op": "sub", "id": 1, "topic": "secret.plans"})
            assert (await client.reply(1))["code"] == "forbidden"
            await client.subscribe("news.today")
        assert "secret.plans" not in followed and "news.today" in followed


async def test_unsub_then_sub_again_at_once_is_answered_at_once(redis: RedisServer) -> None:
    async with nodes(redis, 1) as (a,), connect(a.url) as client:
        backplane(a).timeout = 60  # a missed wake-up would hang past the client's 5 s
        await client.subscribe("again", id=1)
        await client.send(
            {"op": "unsub", "id": 2, "topic": "again"}, {"op": "sub", "id": 3, "topic": "again"}
        )
        assert (await client.reply(3))["op"] == "ok"


async def wait_redis(redis: RedisServer, what: str, expected: object) -> None:
    # Message channels only: every node also listens on its ask/answer channels (server API).
    args = ("PUBSUB", what, "broker:m:*") if what == "CHANNELS" else ("PUBSUB", what)
    with trio.fail_after(5):
        while await redis.command(*args) != expected:  # noqa: ASYNC110 - polls Redis
            await trio.sleep(0.01)


async def test_a_node_without_redis_serves_locally_and_answers_unavailable(
    redis: RedisServer,
) -> None:
    async with (
        nodes(redis, 2) as (a, b),
        connect(a.url) as local,
        connect(a.url) as publisher,
        connect(b.url) as remote,
    ):
        await local.subscribe("t")
        await remote.subscribe("t")
        await redis.stop()
        await wait_until(lambda: not backplane(a).connected)
        await publisher.send({"op": "pub", "id": 7, "topic": "t", "data": "during"})
        reply = await publisher.reply(7)
        assert reply["op"] == "err" and reply["code"] == "unavailable", reply
        assert "this node's subscribers only" in reply["msg"]
        await local.expect("msg", data="during")

        await redis.start()
        await wait_until(lambda: backplane(a).connected and backplane(b).followed("t"))
        await publisher.publish("t", "after", id=8)  # resubscribed: it crosses nodes again
        await local.expect("msg", data="after")
        await remote.expect("msg", data="after")
        assert backplane(a).stats["outages"] == 1


async def test_a_redis_that_stops_answering_is_noticed_by_an_idle_node(
    redis: RedisServer,
) -> None:
    async with nodes(redis, 1) as (a,), connect(a.url) as client:
        backplane(a).timeout = 0.2
        await client.subscribe("idle")  # wakes the subscriber task with the short timeout
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)  # a half-open connection: no error, no answer
        try:
            await wait_until(lambda: not backplane(a).connected)
        finally:
            redis.process.send_signal(signal.SIGCONT)
        await wait_until(lambda: backplane(a).connected)


async def test_an_idle_node_subscribed_to_nothing_stays_connected(redis: RedisServer) -> None:
    """Redis answers PING with a plain PONG when the connection subscribes to nothing."""
    async with nodes(redis, 1, history=False) as (a,), connect(a.url) as client:
        backplane(a).timeout = 0.25  # a PONG later than this is an outage: not too tight
        await client.subscribe("wake", id=1)  # wakes the subscriber task with the short timeout
        await client.send({"op": "unsub", "id": 2, "topic": "wake"})
        await client.reply(2)
        await wait_until(lambda: backplane(a).stats["pongs"] >= 3)
        assert backplane(a).stats["outages"] == 0


async def test_redis_restarted_mid_stream_loses_no_acknowledged_message(
    redis: RedisServer,
) -> None:
    """Every publish answered ok reaches the other node; those answered unavailable do not
    claim to; the stream carries on after the restart. (What Redis took just before it was
    killed may die with it, unsent: docs/cluster.md, "Delivery across an outage".)"""
    async with (
        nodes(redis, 2) as (a, b),
        connect(a.url) as subscriber,
        connect(b.url) as publisher,
    ):
        await subscriber.subscribe("s")
        acknowledged: list[int] = []

        async def publish(start: int, stop: int) -> None:
            for n in range(start, stop):
                await publisher.send({"op": "pub", "id": n, "topic": "s", "data": n})
                if (await publisher.reply(n))["op"] == "ok":
                    acknowledged.append(n)

        await publish(1, 50)
        received = [(await subscriber.expect("msg"))["data"] for _ in acknowledged]
        await redis.stop()
        await publish(50, 60)  # fails fast: the node knows Redis is gone
        await redis.start()
        await wait_until(lambda: backplane(a).followed("s") and backplane(b).connected)
        await publish(60, 110)
        while len(received) < len(acknowledged):
            received.append((await subscriber.expect("msg"))["data"])
        assert received == acknowledged
        assert acknowledged[:49] == list(range(1, 50))
        assert acknowledged[-50:] == list(range(60, 110))


async def test_a_full_hub_buffer_pushes_back_on_redis_instead_of_growing(
    redis: RedisServer,
) -> None:
    async with (
        nodes(redis, 2, queue_messages=4, slow_timeout=30) as (a, b),
        connect(a.url) as stuck,
        connect(b.url) as publisher,
    ):
        await stuck.subscribe("flood")  # under block, and never reads
        payload = "x" * 1000
        for batch in range(20):
            await publisher.send(
                *({"op": "pub", "topic": "flood", "data": payload} for _ in range(200))
            )
            await publisher.publish("flood", batch, id=batch + 1)
        # node a took at most its buffer; the rest waits in the kernel and in Redis
        assert backplane(a).statistics()["buffered"] <= 1024
        assert backplane(a).stats["received"] < 4020


async def sub_since(client: WireClient, topic: str, epoch: str, offset: int, id: int) -> Frame:
    since = {"epoch": epoch, "offset": offset}
    await client.send({"op": "sub", "id": id, "topic": topic, "since": since})
    return await client.reply(id)


async def test_recovery_on_another_node_during_continuous_publishing_is_exact(
    redis: RedisServer,
) -> None:
    """Clients keep leaving and recovering on the other node (whose mirror is forgotten each
    time, so it loads from Redis while messages stream in): no gap, no duplicate."""
    async with nodes(redis, 2) as (a, b), connect(b.url) as publisher:
        stop = trio.Event()

        async def publish() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                await publisher.send({"op": "pub", "topic": "chat.live", "data": n})
                if n % 20 == 0:
                    await publisher.publish("chat.live", -n, id=n)  # keep pace with acks

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            async with connect(a.url) as first:
                await first.send({"op": "sub", "id": 1, "topic": "chat.live"})
                ok = await first.reply(1)
                epoch, seen = ok["epoch"], ok["offset"]
                for _ in range(3):
                    seen = (await first.expect("msg"))["offset"]
            for round in range(6):
                a.delivery.history.clear()  # cold: the next sub loads from Redis mid-stream
                async with connect(a.url if round % 2 else b.url) as client:
                    reply = await sub_since(client, "chat.live", epoch, seen, 1)
                    assert reply["recovered"] is True, reply
                    for _ in range(15):
                        frame = await client.expect("msg")
                        assert frame["offset"] == seen + 1, (frame, seen)
                        seen = frame["offset"]
            stop.set()


async def test_a_node_that_lost_redis_for_a_while_recovers_clients_exactly(
    redis: RedisServer,
) -> None:
    async with nodes(redis, 2) as (a, b), connect(b.url) as publisher:
        async with connect(a.url) as client:
            await client.send({"op": "sub", "id": 1, "topic": "chat.r"})
            ok = await client.reply(1)
        clients = await redis.command("CLIENT", "LIST")
        assert isinstance(clients, bytes)
        for line in clients.decode().splitlines():
            if f"name=broker-{a.node_id} " in line:
                await redis.command("CLIENT", "KILL", "ID", line.split()[0].split("=")[1])
        await wait_until(lambda: not backplane(a).connected)
        for n in range(5):
            await publisher.publish("chat.r", n, id=n + 1)  # node b is fine: kept in Redis
        await wait_until(lambda: backplane(a).connected)
        async with connect(a.url) as client:
            reply = await sub_since(client, "chat.r", ok["epoch"], ok["offset"], 1)
            assert reply["recovered"] is True, reply
            assert [(await client.expect("msg"))["data"] for _ in range(5)] == list(range(5))


async def test_redis_losing_its_data_starts_a_new_epoch(redis: RedisServer) -> None:
    async with nodes(redis, 2) as (a, b), connect(b.url) as publisher:
        await publisher.publish("chat.e", "old", id=1)
        async with connect(a.url) as client:
            await client.send({"op": "sub", "id": 1, "topic": "chat.e"})
            old = await client.reply(1)
            assert old["offset"] == 1
        await redis.stop()
        await redis.start()  # no persistence: the history is gone
        await wait_until(lambda: backplane(a).connected and backplane(b).connected)
        await publisher.publish("chat.e", "new", id=2)
        async with connect(a.url) as client:
            reply = await sub_since(client, "chat.e", old["epoch"], 1, 1)
            assert reply["recovered"] is False and reply["epoch"] != old["epoch"]
            assert reply["offset"] == 1


async def test_a_history_topic_refuses_publishes_while_redis_is_down(redis: RedisServer) -> None:
    async with nodes(redis, 1) as (a,), connect(a.url) as client:
        await client.subscribe("chat.d")
        await redis.stop()
        await wait_until(lambda: not backplane(a).connected)
        await client.send({"op": "pub", "id": 2, "topic": "chat.d", "data": 1})
        reply = await client.reply(2)
        assert reply["op"] == "err" and reply["code"] == "unavailable"
        assert "not delivered" in reply["msg"]
        await client.send({"op": "sub", "id": 3, "topic": "chat.other"})
        reply = await client.reply(3)  # its history cannot be read either
        assert reply["op"] == "err" and reply["code"] == "unavailable"
        await client.subscribe("plain", id=4)  # the connection goes on
        assert client._pending == []


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("chat.*", "chat.a", True),
        ("chat.*", "chat.a.b", True),  # Redis' * matches dots: the hub filters again
        ("chat.>", "chat.a.b", True),
        ("chat.>", "chat", False),
        ("*.x", "a.x", True),
        ("*.x", "a.y", False),
        ("a?[b].>", "a?[b].c", True),
        ("a?[b].>", "ax[b].c", False),
        ("a?[b].>", "a?b.c", False),
        ("back\\slash.*", "back\\slash.z", True),
        ("a.*.b.*.c.*", "a.x.b.y.c.z", True),  # the glob stops at its second wildcard
        ("a.*.b.*.c.*", "a.x.b.y.d.z", True),  # so it brings more: the hub filters again
        ("a.*.b.*.c.*", "a.x.c.y.c.z", False),
        (".".join(["*"] * 100), ".".join(["x"] * 100), True),
    ],
)
async def test_redis_globs_cover_what_a_pattern_matches_in_real_redis(
    redis: RedisServer, pattern: str, topic: str, matches: bool
) -> None:
    address = RedisAddress("127.0.0.1", redis.port)
    subscriber = await RedisConnection.open(address, 5)
    try:
        with trio.fail_after(5):
            await subscriber.send(encode_command("PSUBSCRIBE", redis_glob("p:", pattern)))
            await subscriber.receive()
            receivers = await redis.command("PUBLISH", "p:" + topic, "x")
        assert receivers == int(matches)
    finally:
        await subscriber.aclose()


async def test_a_node_follows_at_most_max_patterns_wildcard_globs(redis: RedisServer) -> None:
    async with nodes(redis, 1, history=False) as (node,):
        backplane(node).max_patterns = 3
        async with connect(node.url) as client, connect(node.url) as other:
            for n in range(3):
                await client.subscribe(f"p{n}.*", id=n)
            await client.send({"op": "sub", "id": 9, "topic": "p9.*"})
            refused = await client.reply(9)
            assert refused["code"] == "too_many_subs" and "max_patterns" in refused["msg"]
            await other.subscribe("p0.*")  # a glob already followed costs Redis nothing more
            await other.send({"op": "sub", "id": 2, "topic": "p0.*.x.*"})  # a fourth glob
            assert (await other.reply(2))["code"] == "too_many_subs"
            await other.subscribe("concrete.topic", id=3)  # channels are not capped
            await client.send({"op": "unsub", "id": 10, "topic": "p1.*"})
            await client.reply(10)
            await client.subscribe("p9.*", id=11)  # room again
            await wait_redis(redis, "NUMPAT", 3)


async def test_subscribing_stores_nothing_in_redis_and_publishing_stores_keys_that_expire(
    redis: RedisServer,
) -> None:
    async with nodes(redis, 2) as (a, b), connect(a.url) as client, connect(b.url) as other:
        first = await sub_since_nothing(client, "chat.waiting")
        for n in range(200):  # subscribe-only churn on new history topics
            await client.send(
                {"op": "sub", "id": 2, "topic": f"chat.churn.{n}"},
                {"op": "unsub", "id": 3, "topic": f"chat.churn.{n}"},
            )
            assert (await client.reply(2))["op"] == "ok"
            await client.reply(3)
        keys = await redis.command("KEYS", "broker:*")
        assert keys == [b"broker:fresh"]  # one key for the whole cluster
        await other.publish("chat.waiting", "first", id=7)
        await client.expect("msg", topic="chat.waiting", data="first", offset=1)
        for key in (b"broker:e:chat.waiting", b"broker:o:chat.waiting", b"broker:h:chat.waiting"):
            ttl = await redis.command("PTTL", key)
            assert isinstance(ttl, int) and 0 < ttl <= 30 * 24 * 3600 * 1000
        async with connect(b.url) as late:  # subscribed before the first message: recovers it
            since = {"epoch": first["epoch"], "offset": 0}
            reply = await sub_since(late, "chat.waiting", since["epoch"], 0, id=4)
            assert reply["recovered"] is True and reply["epoch"] == first["epoch"]
            await late.expect("msg", data="first", offset=1)


async def sub_since_nothing(client: WireClient, topic: str) -> Frame:
    await client.send({"op": "sub", "id": 1, "topic": topic})
    reply = await client.reply(1)
    assert reply["op"] == "ok" and reply["offset"] == 0
    return reply


def test_cluster_config_is_checked_naming_the_key() -> None:
    from broker.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"cluster.backend: 'http://x' is not a redis:// URL"):
        config_from_dict({"cluster": {"backend": "http://x"}})
    with pytest.raises(ConfigError, match=r"cluster.node_id"):
        config_from_dict({"cluster": {"backend": "redis://h", "node_id": "a b"}})
    config = config_from_dict({"cluster": {"backend": "redis://h:7000/2"}})
    assert config.cluster.backend == "redis://h:7000/2"
    assert dataclasses.replace(config.cluster, node_id="x").node_id == "x"


# --- three broker processes ---

HISTORY_RULE = '[[topics]]\npattern = "chat.>"\nhistory_size = 100\n'


class NodeProcess:
    """A ``broker serve`` process of the cluster; its log is drained (and kept) as it runs."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.url = ""
        self._ready = trio.Event()

    async def read_log(self, *, task_status: trio.TaskStatus[None]) -> None:
        assert self.process.stderr is not None
        buffer, listening, connected = b"", False, False
        with trio.fail_after(20):
            while not (listening and connected):
                chunk = await self.process.stderr.receive_some(4096)
                assert chunk, f"the broker exited: {buffer.decode()}{''.join(self.log)}"
                buffer += chunk
                *lines, rest = buffer.split(b"\n")
                buffer = rest
                for line in (raw.decode() for raw in lines):
                    self.log.append(line)
                    if "listening on ws://" in line:
                        self.url = line.split("listening on ", 1)[1].split(" ", 1)[0]
                        listening = True
                    connected = connected or "connected to Redis" in line
        task_status.started()
        while await self.process.stderr.receive_some(4096):
            pass


async def start_node(
    nursery: trio.Nursery, redis: RedisServer, tmp_path: Path, name: str, extra: str = ""
) -> NodeProcess:
    """A node process; ``extra`` is added to its ``[cluster]`` table (then its topics)."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[cluster]\nbackend = "{redis.url}"\nnode_id = "{name}"\n{extra}\n{HISTORY_RULE}'
    )
    command = [sys.executable, "-m", "broker", "serve", "--config", str(path), "--port", "0"]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    node = NodeProcess(process)
    await nursery.start(node.read_log)
    return node


@asynccontextmanager
async def node_processes(
    redis: RedisServer, tmp_path: Path, count: int, extra: str = ""
) -> AsyncIterator[list[NodeProcess]]:
    async with trio.open_nursery() as nursery:
        started: list[NodeProcess] = []
        try:
            for index in range(count):
                started.append(await start_node(nursery, redis, tmp_path, f"node{index}", extra))
            yield started
        finally:
            for node in started:
                if node.process.returncode is None:
                    node.process.kill()
            with trio.CancelScope(shield=True), trio.fail_after(10):
                for node in started:
                    await node.process.wait()


async def test_three_node_processes_deliver_recover_and_survive_a_sigkill(
    redis: RedisServer, tmp_path: Path
) -> None:
    async with node_processes(redis, tmp_path, 3) as (one, two, three):  # noqa: SIM117
        async with connect(one.url) as doomed, connect(three.url) as publisher:
            await doomed.send({"op": "sub", "id": 1, "topic": "chat.room"})
            position = await doomed.reply(1)
            await doomed.subscribe("chat.*", id=2)
            await publisher.publish("chat.room", "a", id=1)
            first = await doomed.expect("msg", topic="chat.room", data="a")
            await doomed.expect("msg", topic="chat.room", data="a", sub="chat.*")
            assert first["offset"] == position["offset"] + 1

            # Order across processes: one publisher on node three, a wildcard on node two.
            async with connect(two.url) as watcher:
                await watcher.subscribe("orders.>")
                pubs = [{"op": "pub", "topic": "orders.eu", "data": n} for n in range(100)]
                await publisher.send(*pubs[:50])  # not acknowledged: order is all that holds
                await publisher.send(*pubs[50:])
                got = [(await watcher.expect("msg", sub="orders.>"))["data"] for _ in range(100)]
                assert got == list(range(100))

            one.process.kill()  # SIGKILL: no drain, no goodbye
            with trio.fail_after(10):
                await one.process.wait()
            await publisher.publish("chat.room", "b", id=2)

            # The client reconnects to another node and recovers exactly what it missed:
            # offsets and epochs are the same on every node (history lives in Redis).
            async with connect(two.url) as moved:
                since = {"epoch": position["epoch"], "offset": first["offset"]}
                await moved.send({"op": "sub", "id": 1, "topic": "chat.room", "since": since})
                reply = await moved.reply(1)
                assert reply["op"] == "ok" and reply["recovered"] is True, reply
                assert reply["epoch"] == position["epoch"]
                replayed = await moved.expect("msg", topic="chat.room", data="b")
                assert replayed["offset"] == first["offset"] + 1
                await publisher.publish("chat.room", "c", id=3)
                live = await moved.expect("msg", topic="chat.room", data="c")
                assert live["offset"] == first["offset"] + 2


class SlowRedis:
    """A command connection whose replies the test hands over when it likes."""

    def __init__(self) -> None:
        self.replies_in, self.replies = trio.open_memory_channel[Any](10)

    async def send(self, data: bytes) -> None:
        pass

    async def receive_all(self) -> list[Any]:
        return [await self.replies.receive()]


async def test_a_reply_later_than_the_timeout_is_not_taken_for_a_protocol_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    redis = SlowRedis()
    commands = _Commands(redis, timeout=5.0, depth=8)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commands.write_loop)
        with pytest.raises(Unavailable, match=r"no reply from Redis within 5 s"):
            await commands.call(encode_command("PING"))
        redis.replies_in.send_nowait(b"PONG")  # the late reply, read after the failure
        await commands.read_loop()  # returns: the connection is being replaced, no error
        nursery.cancel_scope.cancel()
    assert commands.why == "no reply from Redis within 5 s"


async def test_a_reply_just_past_the_deadline_is_still_taken(
    autojump_clock: trio.abc.Clock,
) -> None:
    redis = SlowRedis()
    commands = _Commands(redis, timeout=5.0, depth=8)  # type: ignore[arg-type]

    async def reply_late() -> None:
        await trio.sleep(5.2)  # as after a stall of this node's own event loop
        redis.replies_in.send_nowait(b"PONG")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commands.write_loop)
        nursery.start_soon(commands.read_loop)
        nursery.start_soon(reply_late)
        assert await commands.call(encode_command("PING")) == b"PONG"
        assert not commands.broken.is_set()
        nursery.cancel_scope.cancel()


async def test_a_command_handed_to_the_writer_as_the_connection_fails_fails_too() -> None:
    commands = _Commands(SlowRedis(), timeout=5.0, depth=8)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commands.write_loop)
        await trio.testing.wait_all_tasks_blocked()  # the writer waits for a command
        pending = _Pending()
        commands._in.send_nowait((encode_command("PING"), pending))  # handed straight over
        commands.fail("lost")  # before the writer runs: it must neither crash nor send
        await trio.testing.wait_all_tasks_blocked()
    assert pending.done.is_set() and pending.error == "lost"


async def test_an_error_answer_to_a_publish_nobody_waits_for_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis = SlowRedis()
    commands = _Commands(redis, timeout=5.0, depth=8)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commands.write_loop)
        nursery.start_soon(commands.read_loop)
        for _ in range(3):
            assert commands.queue(encode_command("EVAL", "...", 0))
            await trio.testing.wait_all_tasks_blocked()  # sent: its reply is now awaited
            redis.replies_in.send_nowait(RedisError("OOM command not allowed"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    refused = [r for r in caplog.records if "Redis refused publishes without id" in r.message]
    assert len(refused) == 1 and "OOM" in refused[0].message  # once per burst


async def test_a_bug_on_the_redis_connection_is_an_outage_not_the_end_of_the_node(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_loop, bugs = _Commands.write_loop, list[int]()

    async def buggy_once(self: _Commands) -> None:
        if not bugs:
            bugs.append(1)
            raise RuntimeError("a bug")
        await write_loop(self)

    monkeypatch.setattr(_Commands, "write_loop", buggy_once)
    async with nodes(redis, 1) as (node,), connect(node.url) as client:
        await wait_until(
            lambda: backplane(node).stats["outages"] == 1 and backplane(node).connected
        )
        await client.publish("chat.after", "x", id=1)  # served: it reconnected
    assert "internal error on the Redis connection" in caplog.text and "RuntimeError" in caplog.text
