"""The sharded engine on a real Redis Cluster (3 masters, 3 replicas, from redis-server):
delivery across nodes and shards, wildcards below the shard key, per-publisher order,
recovery on another node, presence, and a master's failover (docs/cluster.md).

One cluster serves the module (it takes about two seconds to make); each test keeps apart
with its own ``cluster.prefix``. The failover test makes and breaks its own.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from broker.cluster.delivery import ClusterDelivery
from broker.cluster.resp import ConnectionLost, RedisAddress
from broker.cluster.sharded import ShardedBackplane
from broker.cluster.slots import key_slot
from broker.config import ApiConfig, AuthConfig, ClusterConfig, Config
from broker.core.outbound import Policy
from broker.core.rules import HistoryLimits, TopicRule
from broker.io.server import Broker
from tests.helpers import make_config, start_broker, wait_until
from tests.redis_cluster import RedisCluster, running_cluster
from tests.redis_server import running_redis
from tests.test_api import ALICE, BOB, KEY
from tests.test_cluster import sub_since
from tests.test_presence import presence, sub
from tests.wire import bearer, connect

HISTORY = TopicRule("chat.>", Policy.BLOCK, HistoryLimits(1000))
ROOM = TopicRule("room.>", Policy.DROP_OLDEST, presence=True)
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    with running_cluster() as cluster:
        yield cluster


def sharded_config(
    cluster: RedisCluster, node_id: str, prefix: str, topics: tuple[TopicRule, ...], **more: Any
) -> Config:
    return make_config().replace(
        cluster=ClusterConfig(seeds=cluster.seeds, node_id=node_id, prefix=prefix, **more),
        topics=topics,
    )


def engine(broker: Broker) -> ShardedBackplane:
    delivery = broker.delivery
    assert isinstance(delivery, ClusterDelivery)
    assert isinstance(delivery.backplane, ShardedBackplane)
    return delivery.backplane


def unwanted(broker: Broker) -> int:
    delivery = broker.delivery
    assert isinstance(delivery, ClusterDelivery)
    return delivery.unwanted + engine(broker).stats["stale"]


@asynccontextmanager
async def nodes(
    cluster: RedisCluster,
    count: int,
    topics: tuple[TopicRule, ...] = (HISTORY,),
    **more: Any,
) -> AsyncIterator[list[Broker]]:
    """``count`` brokers in this process on ``cluster``, under a prefix of their own."""
    prefix = f"t{next(_prefixes)}"
    async with trio.open_nursery() as nursery:
        brokers = [
            await start_broker(nursery, sharded_config(cluster, f"n{i}", prefix, topics, **more))
            for i in range(count)
        ]
        await wait_until(lambda: all(engine(b).connected for b in brokers))
        yield brokers
        for broker in brokers:
            broker.shutdown()


def topics_on_every_shard(
    cluster: RedisCluster, broker: Broker, stem: str, suffix: str = ""
) -> list[str]:
    """Topics ``{stem}N{suffix}`` whose shard keys are served by different masters, one per
    master."""
    backplane, found, owners = engine(broker), dict[int, str](), cluster.owners()
    for n in range(1000):
        topic = f"{stem}{n}{suffix}"
        master = cluster.master_of(backplane.route(topic).base, owners)
        found.setdefault(master, topic)
        if len(found) == 3:
            return list(found.values())
    raise AssertionError("no topics found on every master")


async def test_messages_cross_nodes_on_every_shard_of_a_redis_cluster(
    redis_cluster: RedisCluster,
) -> None:
    async with (
        nodes(redis_cluster, 3) as (a, b, c),
        connect(a.url) as sa,
        connect(b.url) as sb,
        connect(c.url) as publisher,
    ):
        topics = topics_on_every_shard(redis_cluster, a, "plain")
        assert len({key_slot(engine(a).route(t).base) for t in topics}) == 3
        for topic in topics:
            await sa.subscribe(topic)
            await sb.subscribe(topic)
        for topic in topics:
            await publisher.publish(topic, {"on": topic})
        for client in (sa, sb):  # each shard is its own Redis connection: any order
            got = [await client.expect("msg") for _ in topics]
            assert sorted((f["topic"], f["sub"], f["data"]["on"]) for f in got) == sorted(
                (topic, topic, topic) for topic in topics
            )
        # nobody follows chat.* (history) topics: published, numbered, received by nobody
        for topic in ("chat.a", "chat.b.c", "chat.d"):
            await publisher.publish(topic, 1, id=2)
        await sa.publish("sync", 0, id=3)  # a round trip: what Redis sent has come
        # a concrete topic's channel brings only it: nothing unwanted anywhere, and the
        # publisher's node, where nobody subscribes, receives nothing at all
        assert [unwanted(n) for n in (a, b, c)] == [0, 0, 0]
        assert [engine(n).stats["received"] for n in (a, b, c)] == [3, 3, 0]
        assert engine(c).stats["own"] == 0


async def test_wildcards_below_the_shard_key_cross_nodes_and_others_are_refused(
    redis_cluster: RedisCluster,
) -> None:
    async with (
        nodes(redis_cluster, 2, topics=(), shard_key_segments=2) as (a, b),
        connect(a.url, "json") as subscriber,
        connect(b.url) as publisher,
    ):
        await subscriber.subscribe("news.eu.*", id=1)
        await subscriber.subscribe("news.us.>", id=2)
        await subscriber.subscribe("news.us.x", id=3)
        for topic in ("news.eu.a", "news.eu.a.b", "news.us.x", "news.us.y.z", "news.asia.a"):
            await publisher.publish(topic, topic)
        await subscriber.expect("msg", topic="news.eu.a", sub="news.eu.*")
        got = {(f["sub"], f["data"]) for f in [await subscriber.next() for _ in range(3)]}
        assert got == {
            ("news.us.>", "news.us.x"),
            ("news.us.x", "news.us.x"),
            ("news.us.>", "news.us.y.z"),
        }
        await subscriber.publish("end", 0, id=4)  # a local round trip: nothing else came
        assert subscriber._pending == []
        # news.eu.a.b comes on news.eu's wildcard channel but matches no subscription here
        # (its shard's connection may bring it after the round trip on the others)
        await wait_until(lambda: unwanted(a) == 1)
        for pattern in ("news.*", "news.>", "*.eu.x", ">", "news.*.x"):
            await subscriber.send({"op": "sub", "id": 9, "topic": pattern})
            reply = await subscriber.reply(9)
            assert reply["op"] == "err" and reply["code"] == "not_enabled", reply
            assert "shard key" in reply["msg"] and "'a.b.>'" in reply["msg"]


async def test_one_publishers_messages_arrive_in_order_across_shards_and_nodes(
    redis_cluster: RedisCluster,
) -> None:
    async with (
        nodes(redis_cluster, 3, shard_key_segments=2) as (a, b, c),
        connect(a.url) as sa,
        connect(b.url) as sb,
        connect(c.url) as publisher,
    ):
        plain = topics_on_every_shard(redis_cluster, a, "seq.", ".x")
        numbered = topics_on_every_shard(redis_cluster, a, "chat.")
        for topic in plain + numbered:
            await sa.subscribe(topic)
        for topic in plain:  # seq.N.x: on seq.N's wildcard channel too
            await sb.subscribe(topic.removesuffix("x") + ">")
        values = list(range(200))
        for value in values:  # without id: queued for Redis in bursts, on three shards
            for topic in plain + numbered:
                await publisher.send({"op": "pub", "topic": topic, "data": value})
        await publisher.publish(plain[0], "end", id=1)
        for client, wanted in ((sa, plain + numbered), (sb, plain)):
            seen: dict[str, list[int]] = {topic: [] for topic in wanted}
            while any(len(seen[t]) < len(values) for t in wanted):
                frame = await client.expect("msg")
                if frame["data"] != "end":
                    seen[frame["topic"]].append(frame["data"])
            assert all(seen[topic] == values for topic in wanted)


async def test_a_client_recovers_on_another_node_from_the_history_on_its_shard(
    redis_cluster: RedisCluster,
) -> None:
    async with (
        nodes(redis_cluster, 2) as (a, b),
        connect(b.url) as publisher,
        connect(a.url) as wild,
    ):
        await wild.subscribe("chat.live.>")  # on the key 'chat''s wildcard channel
        async with connect(a.url) as first:
            await first.send({"op": "sub", "id": 1, "topic": "chat.live.x"})
            ok = await first.reply(1)
            assert ok["op"] == "ok" and ok["offset"] == 0
            for n in range(1, 6):
                await publisher.publish("chat.live.x", n, id=n)
            for n in range(1, 6):
                assert (await first.expect("msg", data=n))["offset"] == n
                frame = await wild.expect("msg", data=n, sub="chat.live.>")
                assert frame["offset"] == n
        for n in range(6, 11):  # missed by the client
            await publisher.publish("chat.live.x", n, id=n)
        async with connect(b.url) as again:
            reply = await sub_since(again, "chat.live.x", ok["epoch"], 5, 1)
            assert reply["recovered"] is True and reply["offset"] == 10, reply
            for n in range(6, 11):
                assert (await again.expect("msg", data=n))["offset"] == n
            await publisher.publish("chat.live.x", 11, id=11)
            assert (await again.expect("msg", data=11))["offset"] == 11
        # the topic's keys share its shard key's slot
        base = engine(a).route("chat.live.x").base
        keys = (
            await redis_cluster.command(await redis_cluster.master(base), "KEYS", base + "*")
        ).split()
        kinds = ("e:chat.live.x", "o:chat.live.x", "h:chat.live.x", "fresh")
        assert sorted(keys) == sorted(f"{base}:{kind}" for kind in kinds)


async def test_presence_is_shared_by_the_nodes_of_a_redis_cluster(
    redis_cluster: RedisCluster,
) -> None:
    async with nodes(redis_cluster, 2, topics=(ROOM,)) as (a, b), connect(b.url) as watcher:
        await sub(watcher, "room.1", 1, join_leave=True)
        own = (await watcher.expect("join"))["member"]
        async with connect(a.url) as guest:
            await sub(guest, "room.1", 1, info="from a")
            joined = (await watcher.expect("join"))["member"]
            assert joined["info"] == "from a"
            with trio.fail_after(5):
                while (await presence(watcher, "room.1", 7))["count"] != 2:  # noqa: ASYNC110 - polls Redis
                    await trio.sleep(0.01)
        left = await watcher.expect("leave")
        assert left["member"] == joined and own != joined


async def test_a_master_killed_fails_over_to_its_replica_and_the_node_recovers() -> None:
    """SIGKILL the master of a topic's shard: the node reports the outage (publishes answer
    err unavailable) until the replica has taken over, then follows and delivers again, and
    the topic's history is still there."""
    with running_cluster() as cluster:
        async with (
            nodes(cluster, 2) as (a, b),
            connect(a.url) as subscriber,
            connect(b.url) as publisher,
        ):
            await subscriber.send({"op": "sub", "id": 1, "topic": "chat.f"})
            epoch = (await subscriber.reply(1))["epoch"]
            await publisher.publish("chat.f", 1, id=1)
            await subscriber.expect("msg", data=1)
            master = await cluster.master(engine(a).route("chat.f").base)
            # the replica must have the history before its master dies
            replicas = [
                p
                for p in cluster.ports
                if p != master
                and f"master_port:{master}" in await cluster.command(p, "INFO", "replication")
            ]
            (replica,) = replicas
            assert await cluster.command(master, "WAIT", "1", "5000") == "1"
            await trio.to_thread.run_sync(cluster.kill, master)
            await wait_until(lambda: not engine(b).connected)
            await publisher.send({"op": "pub", "id": 2, "topic": "chat.f", "data": 2})
            assert (await publisher.reply(2))["code"] == "unavailable"
            with trio.fail_after(20):
                await wait_connected(a, b)
            assert await cluster.master(engine(a).route("chat.f").base) == replica
            await publisher.publish("chat.f", 3, id=3)
            async with connect(a.url) as again:
                reply = await sub_since(again, "chat.f", epoch, 0, 1)
                assert reply["recovered"] is True and reply["offset"] == 2, reply
                assert [(await again.expect("msg"))["data"] for _ in range(2)] == [1, 3]
            assert engine(a).stats["outages"] >= 1


async def test_a_slot_moved_to_another_master_is_followed_there(
    redis_cluster: RedisCluster,
) -> None:
    """Move a history topic's slot between masters under two nodes: a publish while it
    moves is sent on by ASK, one after it by MOVED; the subscribing node, told by Redis
    that its subscription went (sunsubscribe), follows the topic on its new master; the
    history moved with the slot, so a client recovers everything."""
    cluster = redis_cluster
    async with (
        nodes(cluster, 2) as (a, b),
        connect(a.url) as subscriber,
        connect(b.url) as publisher,
    ):
        topic = "chat.moving"
        await subscriber.send({"op": "sub", "id": 1, "topic": topic})
        epoch = (await subscriber.reply(1))["epoch"]
        await publisher.publish(topic, 1, id=1)
        await subscriber.expect("msg", data=1)
        base = engine(a).route(topic).base
        slot = str(key_slot(base))
        source = await cluster.master(base)
        masters = [p for p in cluster.running if "role:master" in await cluster.command(p, "INFO")]
        target = next(p for p in masters if p != source)
        source_id = await cluster.command(source, "CLUSTER", "MYID")
        target_id = await cluster.command(target, "CLUSTER", "MYID")
        assert (
            await cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            == "OK"
        )
        assert (
            await cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            == "OK"
        )
        keys = (await cluster.command(source, "CLUSTER", "GETKEYSINSLOT", slot, "100")).split()
        assert len(keys) == 4, keys
        await cluster.command(
            source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys
        )
        await publisher.publish(topic, 2, id=2)  # the keys are gone from the source: ASK
        assert engine(b).stats["asked"] >= 1
        outages = engine(a).stats["outages"]
        for port in cluster.running:
            await cluster.command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        with trio.fail_after(10):  # the subscribing node follows the topic on its new master
            while not (engine(a).stats["outages"] > outages and engine(a).followed(topic)):  # noqa: ASYNC110
                await trio.sleep(0.01)
        await publisher.publish(topic, 3, id=3)  # node b still sends it to the source: MOVED
        assert engine(b).stats["moved"] >= 1
        frame = await subscriber.expect("msg", data=3)
        assert frame["offset"] == 3
        async with connect(a.url) as again:
            reply = await sub_since(again, topic, epoch, 1, 1)
            assert reply["recovered"] is True and reply["offset"] == 3, reply
            assert [(await again.expect("msg"))["data"] for _ in range(2)] == [2, 3]


async def test_the_server_api_reaches_every_node_through_the_cluster(
    redis_cluster: RedisCluster,
) -> None:
    """``/api/disconnect`` asks every node (a question and its answers on shard channels
    of the ``{prefix}`` slot)."""
    prefix = f"t{next(_prefixes)}"
    async with trio.open_nursery() as nursery:
        brokers = []
        for index in range(2):
            config = sharded_config(redis_cluster, f"n{index}", prefix, (HISTORY,)).replace(
                auth=AuthConfig(mode="tokens", tokens=(ALICE, BOB)),
                api=ApiConfig(port=0, keys=(KEY,)),
            )
            brokers.append(await start_broker(nursery, config))
        a, b = brokers
        await wait_until(lambda: engine(a).connected and engine(b).connected)
        async with (
            connect(a.url, extra_headers=bearer("alice-token")) as on_a,
            connect(b.url, extra_headers=bearer("alice-token")) as on_b,
            connect(b.url, extra_headers=bearer("bob-token")) as bob,
            httpx.AsyncClient(
                base_url=str(a.api_url), headers={"Authorization": f"Bearer {KEY}"}
            ) as http,
        ):
            response = await http.post("/api/disconnect", json={"user": "alice"})
            assert (response.status_code, response.json()) == (200, {"disconnected": 2})
            for client in (on_a, on_b):
                assert await client.expect_close() == 4010
            await bob.publish("x", 1)
        for broker in brokers:
            broker.shutdown()


async def wait_connected(*brokers: Broker) -> None:
    while not all(engine(b).connected for b in brokers):  # noqa: ASYNC110 - no event to wait on
        await trio.sleep(0.02)


def test_the_sharded_config_is_checked_naming_the_key() -> None:
    from broker.config import ConfigError, config_from_dict

    seeds = ["redis://h:7000", "redis://h:7001"]
    config = config_from_dict({"cluster": {"seeds": seeds, "shard_key_segments": 2}})
    assert config.cluster.seeds == tuple(seeds) and config.cluster.shard_key_segments == 2
    with pytest.raises(ConfigError, match=r"backend .* or seeds .*, not both"):
        config_from_dict({"cluster": {"seeds": seeds, "backend": "redis://h"}})
    with pytest.raises(ConfigError, match=r"cluster.seeds: 'redis://h/2': .*database 0 only"):
        config_from_dict({"cluster": {"seeds": ["redis://h/2"]}})
    with pytest.raises(ConfigError, match=r"cluster.seeds: 'h:7000' is not a redis:// URL"):
        config_from_dict({"cluster": {"seeds": ["h:7000"]}})
    with pytest.raises(ConfigError, match=r"cluster.prefix: .*braces"):
        config_from_dict({"cluster": {"seeds": seeds, "prefix": "{x}"}})
    with pytest.raises(ConfigError, match=r"cluster.shard_key_segments: must be greater than 0"):
        config_from_dict({"cluster": {"seeds": seeds, "shard_key_segments": 0}})


def test_a_topics_names_share_the_slot_of_its_shard_key() -> None:
    from broker.cluster.resp import RedisAddress

    backplane = ShardedBackplane([RedisAddress("h")], "n", "p", shard_key_segments=2)
    route = backplane.route("a.b.c.d")
    assert route.base == "{p:a.b}" and route.channel == b"{p:a.b}:m:a.b.c.d"
    assert route.wildcard == b"{p:a.b}:w"
    assert backplane.redis_name("a.b.*") == backplane.redis_name("a.b.>") == route.wildcard
    assert backplane.route("a.b").wildcard == b""  # no wildcard after the key matches it
    assert key_slot(route.channel) == key_slot(route.wildcard) == key_slot("p:a.b")


async def test_seeds_naming_a_redis_without_cluster_mode_say_to_use_backend() -> None:
    async with running_redis() as redis:
        engine = ShardedBackplane([RedisAddress.from_url(redis.url)], "n0", "t")
        with pytest.raises(ConnectionLost, match=r"for one Redis, set cluster.backend instead"):
            await engine._discover()
