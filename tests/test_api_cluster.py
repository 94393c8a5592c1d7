"""The server API of a cluster: two nodes and a real Redis; ``disconnect`` and ``info`` answer
for every node, a publish reaches every node's subscribers, and Redis down is 503."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from broker.config import ApiConfig, AuthConfig, ClusterConfig
from broker.core.outbound import Policy
from broker.core.rules import TopicRule
from broker.io.server import Broker
from tests.helpers import make_config, start_broker, wait_until
from tests.redis_server import RedisServer, running_redis
from tests.test_api import ALICE, BOB, KEY
from tests.test_cluster import HISTORY, backplane
from tests.wire import bearer, connect

ROOMS = TopicRule("room.>", Policy.BLOCK, presence=True)


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with running_redis() as server:
        yield server


@asynccontextmanager
async def api_nodes(redis_url: str, count: int) -> AsyncIterator[list[Broker]]:
    """``count`` nodes sharing the Redis at ``redis_url`` (history on chat.>, presence on
    room.>), each serving the API; connected to Redis unless it is down."""
    async with trio.open_nursery() as nursery:
        brokers = []
        for index in range(count):
            config = make_config().replace(
                cluster=ClusterConfig(backend=redis_url, node_id=f"n{index}"),
                topics=(HISTORY, ROOMS),
                auth=AuthConfig(mode="tokens", tokens=(ALICE, BOB)),
                api=ApiConfig(port=0, keys=(KEY,)),
            )
            brokers.append(await start_broker(nursery, config))
        yield brokers
        for broker in brokers:
            broker.shutdown()


@asynccontextmanager
async def api_client(broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=str(broker.api_url), headers=headers) as client:
        yield client


async def test_disconnect_closes_the_users_connections_on_every_node(redis: RedisServer) -> None:
    async with (
        api_nodes(redis.url, 2) as (a, b),
        connect(a.url, extra_headers=bearer("alice-token")) as on_a,
        connect(b.url, extra_headers=bearer("alice-token")) as on_b,
        connect(b.url, "json", extra_headers=bearer("alice-token")) as also_on_b,
        connect(b.url, extra_headers=bearer("bob-token")) as bob,
        api_client(a) as http,
    ):
        await wait_until(lambda: backplane(a).connected and backplane(b).connected)
        response = await http.post("/api/disconnect", json={"user": "alice", "reason": "bye"})
        assert (response.status_code, response.json()) == (200, {"disconnected": 3})
        for client in (on_a, on_b, also_on_b):
            assert await client.expect_close() == 4010
        await bob.publish("x", 1)  # bob's connection on b is untouched
        response = await http.post("/api/disconnect", json={"user": "alice"})
        assert response.json() == {"disconnected": 0}


async def test_info_lists_every_node(redis: RedisServer) -> None:
    async with (
        api_nodes(redis.url, 2) as (a, b),
        connect(b.url, extra_headers=bearer("bob-token")) as bob,
        api_client(a) as http,
    ):
        await wait_until(lambda: backplane(a).connected and backplane(b).connected)
        await bob.subscribe("x.*")
        info = (await http.get("/api/info")).json()
        assert [node["node"] for node in info["nodes"]] == [a.node_id, b.node_id]
        assert a.node_id.startswith("n0-")  # the configured name, then what makes it unique
        assert [node["connections"] for node in info["nodes"]] == [0, 1]
        assert (info["connections"], info["subscriptions"]) == (1, 1)


async def test_a_publish_reaches_every_nodes_subscribers_numbered_in_redis(
    redis: RedisServer,
) -> None:
    async with (
        api_nodes(redis.url, 2) as (a, b),
        connect(b.url, extra_headers=bearer("bob-token")) as on_b,
        connect(b.url, extra_headers=bearer("bob-token")) as member,
        api_client(a) as http,
    ):
        await wait_until(lambda: backplane(a).connected and backplane(b).connected)
        await on_b.send({"op": "sub", "id": 1, "topic": "chat.room"})
        ok = await on_b.reply(1)
        await member.subscribe("room.lobby")
        for offset in (1, 2):
            response = await http.post("/api/publish", json={"topic": "chat.room", "data": offset})
            assert response.json() == {"epoch": ok["epoch"], "offset": offset}
            await on_b.expect("msg", topic="chat.room", data=offset, offset=offset)
        history = (await http.post("/api/history", json={"topic": "chat.room"})).json()
        assert [m["data"] for m in history["messages"]] == [1, 2]
        presence = (await http.post("/api/presence", json={"topic": "room.lobby"})).json()
        assert [m["user"] for m in presence["members"]] == ["bob"]  # a member on node b


async def test_racing_publishes_each_answer_their_own_offset(redis: RedisServer) -> None:
    async with api_nodes(redis.url, 2) as (a, b), api_client(a) as http:
        await wait_until(lambda: backplane(a).connected and backplane(b).connected)
        answers: dict[int, int] = {}

        async def publish(data: int) -> None:
            response = await http.post("/api/publish", json={"topic": "chat.race", "data": data})
            answers[data] = response.json()["offset"]

        async with trio.open_nursery() as racing:  # 20 requests in flight at once
            for data in range(20):
                racing.start_soon(publish, data)
        history = (await http.post("/api/history", json={"topic": "chat.race"})).json()
        assert {m["data"]: m["offset"] for m in history["messages"]} == answers


async def test_with_redis_unreachable_the_api_answers_503(unreachable_port: int) -> None:
    async with (
        api_nodes(f"redis://127.0.0.1:{unreachable_port}/0", 1) as (node,),
        connect(node.url, extra_headers=bearer("alice-token")) as alice,
        api_client(node) as http,
    ):
        await alice.subscribe("news")
        answers = {}
        for method, path, body in (
            ("POST", "/api/publish", {"topic": "news", "data": 1}),
            ("POST", "/api/publish", {"topic": "chat.a", "data": 1}),
            ("POST", "/api/presence", {"topic": "room.a"}),
            ("POST", "/api/history", {"topic": "chat.a"}),
            ("POST", "/api/disconnect", {"user": "alice"}),
            ("GET", "/api/info", None),
        ):
            response = await http.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error"]["code"] == "unavailable"
            answers[path] = response.json()["error"]["message"]
        # The plain topic's message reached this node's subscriber, as a pub's does; alice
        # was disconnected here, and the answer says so.
        await alice.expect("msg", topic="news", data=1)
        assert "1 connection(s) closed on this node only" in answers["/api/disconnect"]
        assert await alice.expect_close() == 4010
