"""The ``history`` op: reading a topic's kept messages without subscribing (PROTOCOL v1.1),
on one node and on another node of a cluster."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from broker.config import AuthConfig, TokenGrant
from broker.core.delivery import HISTORY_PAGE_BYTES
from tests.helpers import start_broker
from tests.redis_server import RedisServer
from tests.test_cluster import nodes, redis  # noqa: F401 (the fixture)
from tests.test_metrics import scrape, with_metrics
from tests.test_recovery import history_config
from tests.wire import WireClient, bearer, connect


async def history(client: WireClient, topic: str, id: int, **fields: Any) -> dict[str, Any]:
    await client.send({"op": "history", "id": id, "topic": topic, **fields})
    return await client.reply(id)


async def test_history_pages_through_what_a_topic_keeps(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, history_config(size=50))
    async with connect(broker.url) as client:
        for n in range(1, 61):  # 60 published, the last 50 kept: offsets 11..60
            await client.publish("chat.h", n, id=n)
        first = await history(client, "chat.h", 1, limit=20)
        assert first["offset"] == 60 and "recovered" not in first
        assert [m["offset"] for m in first["messages"]] == list(range(11, 31))
        assert [m["data"] for m in first["messages"]] == list(range(11, 31))
        since = {"epoch": first["epoch"], "offset": 30}
        rest = await history(client, "chat.h", 2, since=since, limit=1000)
        assert [m["offset"] for m in rest["messages"]] == list(range(31, 61))
        assert rest["recovered"] is True
        default = await history(client, "chat.h", 3)
        assert len(default["messages"]) == 50  # all kept (the default limit is 100)


async def test_a_history_answer_ends_early_past_its_byte_bound_and_reads_on(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, history_config(size=50))
    big = "x" * (HISTORY_PAGE_BYTES // 3)
    async with connect(broker.url) as client:
        for n in range(1, 8):
            await client.publish("chat.b", big, id=n)
        offsets: list[int] = []
        since: dict[str, Any] | None = None
        id = 1
        while not offsets or offsets[-1] < 7:
            page = await history(client, "chat.b", id, limit=1000, **since_field(since))
            assert 1 <= len(page["messages"]) <= 3  # never over the bound but by one message
            offsets += [m["offset"] for m in page["messages"]]
            since, id = {"epoch": page["epoch"], "offset": offsets[-1]}, id + 1
        assert offsets == list(range(1, 8))


def since_field(since: dict[str, Any] | None) -> dict[str, Any]:
    return {} if since is None else {"since": since}


async def test_history_reads_are_counted_in_metrics(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, with_metrics(history_config(size=50)))
    async with connect(broker.url) as client:
        for n in range(1, 6):
            await client.publish("chat.m", n, id=n)
        await history(client, "chat.m", 1, limit=3)
        await history(client, "chat.m", 2)
    metrics = await scrape(broker)
    assert metrics["broker_history_reads_total"] == 2
    assert metrics["broker_history_read_messages_total"] == 3 + 5


async def test_history_says_when_the_asked_position_is_no_longer_kept(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, history_config(size=5))
    async with connect(broker.url) as client:
        for n in range(1, 11):
            await client.publish("chat.e", n, id=n)
        latest = await history(client, "chat.e", 1)
        evicted = await history(client, "chat.e", 2, since={"epoch": latest["epoch"], "offset": 2})
        assert evicted["recovered"] is False
        assert [m["offset"] for m in evicted["messages"]] == [6, 7, 8, 9, 10]
        other = await history(client, "chat.e", 3, since={"epoch": "gone", "offset": 2})
        assert other["recovered"] is False and other["epoch"] == latest["epoch"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"topic": "plain.t"}, "not_enabled"),
        ({"topic": "chat.*"}, "invalid_topic"),
        ({"topic": "chat.t", "limit": 0}, "bad_request"),
        ({"topic": "chat.t", "limit": 1001}, "bad_request"),
        ({"topic": "chat.t", "since": {"epoch": 1}}, "bad_request"),
    ],
)
async def test_bad_history_requests_get_their_error_and_the_connection_goes_on(
    nursery: trio.Nursery, frame: dict[str, Any], code: str
) -> None:
    broker = await start_broker(nursery, history_config())
    async with connect(broker.url) as client:
        await client.send({"op": "history", "id": 1, **frame})
        assert (await client.reply(1))["code"] == code
        assert (await history(client, "chat.ok", 2))["messages"] == []


async def test_history_needs_the_subscribe_permission(nursery: trio.Nursery) -> None:
    grant = TokenGrant("t-pub", "writer", publish=("chat.>",))
    broker = await start_broker(
        nursery, history_config().replace(auth=AuthConfig("tokens", (grant,)))
    )
    async with connect(broker.url, extra_headers=bearer("t-pub")) as client:
        await client.publish("chat.p", 1, id=1)
        refused = await history(client, "chat.p", 2)
        assert (refused["code"], refused["msg"]) == (
            "forbidden",
            "not allowed to subscribe to 'chat.p', which reading its history needs",
        )


async def test_history_on_another_node_reads_it_from_redis(
    redis: RedisServer,  # noqa: F811
) -> None:
    """Node b follows nothing: it reads a copy from Redis, and keeps no mirror that would go
    stale (a later sub with since there recovers what came after the read)."""
    async with nodes(redis, 2) as (a, b), connect(a.url) as publisher:
        for n in range(1, 6):
            await publisher.publish("chat.x", n, id=n)
        async with connect(b.url) as reader:
            answer = await history(reader, "chat.x", 1)
            assert [m["data"] for m in answer["messages"]] == [1, 2, 3, 4, 5]
            for n in range(6, 9):
                await publisher.publish("chat.x", n, id=n)
            since = {"epoch": answer["epoch"], "offset": answer["offset"]}
            await reader.send({"op": "sub", "id": 2, "topic": "chat.x", "since": since})
            assert (await reader.reply(2))["recovered"] is True
            assert [(await reader.expect("msg"))["data"] for _ in range(3)] == [6, 7, 8]
