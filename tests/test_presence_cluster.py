"""Presence across broker nodes through a real Redis: members on every node, join and leave
everywhere, a killed node's members gone within ``presence_ttl``, announced again after Redis
lost them (docs/presence.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from broker.core.outbound import Policy
from broker.core.rules import TopicRule
from broker.io.server import Broker
from tests.helpers import start_broker, wait_until
from tests.redis_server import RedisServer
from tests.test_cluster import backplane, cluster_config, node_processes, redis  # noqa: F401
from tests.test_presence import presence, sub
from tests.wire import WireClient, connect

ROOM = TopicRule("room.>", Policy.DROP_OLDEST, presence=True)
TTL = 1.5  # presence_ttl here: a vanished node's members leave everywhere within it


@asynccontextmanager
async def room_nodes(redis: RedisServer, count: int) -> AsyncIterator[list[Broker]]:  # noqa: F811
    """``count`` nodes in this process whose ``room.>`` topics keep presence."""
    async with trio.open_nursery() as nursery:
        brokers = []
        for index in range(count):
            config = cluster_config(redis, f"p{index}", history=False)
            config = config.replace(
                topics=(ROOM,), cluster=dataclasses.replace(config.cluster, presence_ttl=TTL)
            )
            brokers.append(await start_broker(nursery, config))
        await wait_until(lambda: all(backplane(b).connected for b in brokers))
        yield brokers
        for broker in brokers:
            broker.shutdown()


async def count_on(client: WireClient, topic: str, expected: int) -> None:
    """Ask until ``topic`` has ``expected`` members (another node's change is asynchronous)."""
    with trio.fail_after(5):
        for id in range(1000, 100000):
            if (await presence(client, topic, id))["count"] == expected:
                return
            await trio.sleep(0.01)


async def test_members_of_every_node_are_one_room_with_join_and_leave_everywhere(
    redis: RedisServer,  # noqa: F811
) -> None:
    async with room_nodes(redis, 2) as (a, b), connect(b.url) as watcher:
        await sub(watcher, "room.1", 1, join_leave=True)
        own = (await watcher.expect("join"))["member"]
        async with connect(a.url) as guest:
            await sub(guest, "room.1", 1, info="from a")
            joined = await watcher.expect("join")  # through Redis
            assert joined["member"]["info"] == "from a" and joined["sub"] == "room.1"
            answer = await presence(watcher, "room.1", 2)
            assert answer["count"] == 2
            assert {m["client"] for m in answer["members"]} == {
                own["client"],
                joined["member"]["client"],
            }
            async with connect(a.url) as asker:  # the same answer on the other node
                assert (await presence(asker, "room.1", 1))["count"] == 2
        left = await watcher.expect("leave")
        assert left["member"]["client"] == joined["member"]["client"]
        assert (await presence(watcher, "room.1", 3))["count"] == 1


async def test_pages_across_nodes_return_every_member_once(
    redis: RedisServer,  # noqa: F811
) -> None:
    async with room_nodes(redis, 2) as brokers, trio.open_nursery() as members:
        for n in range(12):
            await members.start(_member, brokers[n % 2].url, "room.big")
        async with connect(brokers[0].url) as asker:
            await count_on(asker, "room.big", 12)
            seen: list[str] = []
            cursor = None
            for id in range(1, 20):
                extra: dict[str, str] = {"cursor": cursor} if cursor else {}
                answer = await presence(asker, "room.big", id, limit=5, **extra)
                seen += [m["client"] for m in answer["members"]]
                cursor = answer.get("cursor")
                if cursor is None:
                    break
            assert len(seen) == len(set(seen)) == 12
        members.cancel_scope.cancel()


async def _member(url: str, topic: str, *, task_status: trio.TaskStatus[None]) -> None:
    async with connect(url) as client:
        await sub(client, topic, 1)
        task_status.started()
        await trio.sleep_forever()


async def test_members_are_announced_again_after_redis_lost_them(
    redis: RedisServer,  # noqa: F811
) -> None:
    async with room_nodes(redis, 2) as (a, b), connect(a.url) as member:
        await sub(member, "room.r", 1)
        async with connect(b.url) as asker:
            await count_on(asker, "room.r", 1)
        await redis.stop()
        await redis.start()  # no persistence: every member is gone from Redis
        await wait_until(lambda: backplane(a).connected and backplane(b).connected)
        async with connect(b.url) as asker:
            await count_on(asker, "room.r", 1)  # node a noticed and announced it again


async def test_a_node_that_dies_has_its_members_leave_everywhere_within_presence_ttl(
    redis: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """SIGKILL: the node says nothing; the others find its alive key expired in Redis."""
    extra = f'presence_ttl = {TTL}\n[[topics]]\npattern = "room.>"\npresence = true\n'
    async with node_processes(redis, tmp_path, 2, extra) as (doomed, survivor):  # noqa: SIM117
        async with connect(survivor.url) as watcher, connect(doomed.url) as victim:
            await sub(watcher, "room.k", 1, join_leave=True)
            await watcher.expect("join")
            await sub(victim, "room.k", 1, info="doomed")
            gone = (await watcher.expect("join"))["member"]
            doomed.process.kill()
            with trio.fail_after(10):
                await doomed.process.wait()
            with trio.fail_after(TTL + 1):  # the TTL, plus room for a slow machine
                left = await watcher.expect("leave")
            assert left["member"] == gone
            assert (await presence(watcher, "room.k", 2))["count"] == 1
