"""A Python client given several URLs: which it tries, when it moves on, and that it loses
nothing when the node it is on drains (a real two-node cluster on a real Redis)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from broker.io.server import Broker
from broker_client import Backoff, Message, connect
from broker_client.endpoints import Endpoints
from tests.helpers import make_config, start_broker
from tests.redis_server import RedisServer
from tests.test_cluster import nodes, redis  # noqa: F401 (the fixture)
from tests.wire import connect as wire_connect

TINY = Backoff(base=0.01, max=0.05)

# --- the pure part ---


def test_endpoints_move_on_at_once_until_every_url_failed_in_a_row() -> None:
    endpoints = Endpoints(["ws://a/", "ws://b/", "ws://c/"], shuffle=False)
    assert endpoints.current.url == "ws://a/"
    assert endpoints.failed(now=0.0) and endpoints.current.url == "ws://b/"
    assert endpoints.failed(now=0.0) and endpoints.current.url == "ws://c/"
    assert not endpoints.failed(now=0.0)  # all three in a row: wait the backoff
    assert endpoints.current.url == "ws://a/"
    endpoints.connected()
    assert endpoints.failed(now=0.0) and endpoints.failed(now=0.0)  # a new round


def test_a_retry_after_keeps_its_url_from_being_tried_before_then() -> None:
    endpoints = Endpoints(["ws://a/", "ws://b/"], shuffle=False)
    assert endpoints.failed(now=10.0, retry_after=5.0)  # a: 503, Retry-After 5
    assert endpoints.current.url == "ws://b/" and endpoints.wait(now=10.0) == 0.0
    assert not endpoints.failed(now=11.0)
    assert endpoints.current.url == "ws://a/" and endpoints.wait(now=11.0) == 4.0


def test_endpoints_are_shuffled_so_clients_spread_over_the_nodes() -> None:
    urls = [f"ws://node{i}/" for i in range(4)]
    firsts = {Endpoints(urls).current.url for _ in range(200)}
    assert firsts == set(urls)


@pytest.mark.parametrize("url", ["http://a/", "ws://", "a:1"])
def test_every_url_is_checked(url: str) -> None:
    with pytest.raises(ValueError, match="ws://HOST"):
        Endpoints(["ws://ok/", url])


def test_no_url_is_an_error() -> None:
    with pytest.raises(ValueError, match="URL"):
        Endpoints([])


# --- over real sockets ---


@pytest.fixture
def unreachable_url() -> Iterator[str]:
    """A port bound but not listening: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/"


async def test_an_unreachable_url_is_passed_over_for_one_that_serves(
    nursery: trio.Nursery, unreachable_url: str
) -> None:
    broker = await start_broker(nursery, make_config())
    for _ in range(4):  # shuffled: both orders come up
        async with connect([unreachable_url, broker.url], backoff=TINY) as client:
            assert client.url == broker.url
            await client.publish("t", 1)


async def test_a_full_broker_is_passed_over_for_one_with_room(nursery: trio.Nursery) -> None:
    capped = await start_broker(nursery, make_config(max_connections_per_ip=1))
    roomy = await start_broker(nursery, make_config())
    async with wire_connect(capped.url):  # capped is now full for 127.0.0.1
        for _ in range(4):
            async with connect([capped.url, roomy.url], backoff=TINY) as client:
                assert client.url == roomy.url
                await client.publish("t", 1)


async def test_clients_of_a_draining_node_land_on_the_other_and_lose_nothing(
    redis: RedisServer,  # noqa: F811 (the fixture)
) -> None:
    """The failover the issue asks for: a subscriber on a history topic (and one on a topic
    without history) given both nodes' URLs; the node it is on drains while messages keep
    coming on the other. It reconnects to the other node, recovers with ``since`` there, and
    its application sees every message once, in order; the no-history one is told of a gap."""
    async with nodes(redis, 2) as brokers:
        urls = [broker.url for broker in brokers]
        gaps: list[tuple[str, str]] = []
        async with (
            connect(
                urls, backoff=TINY, on_gap=lambda sub, why: gaps.append((sub.pattern, why))
            ) as client,
            client.subscribe("chat.failover") as kept,
            client.subscribe("plain.failover") as plain,
        ):
            on: Broker = next(b for b in brokers if b.url == client.url)
            other = next(b for b in brokers if b is not on)
            async with wire_connect(other.url) as publisher:
                for n in range(20):
                    await publisher.publish("chat.failover", n, id=n + 1)
                received = [(await kept.receive()).data for _ in range(20)]
                on.shutdown()  # 1001 to its clients, then it stops listening
                for n in range(20, 60):  # while the client is away, and after
                    await publisher.publish("chat.failover", n, id=n + 1)
                with trio.fail_after(10):
                    while len(received) < 60:
                        message: Message = await kept.receive()
                        received.append(message.data)
                assert client.reconnects == 1 and client.url == other.url
            assert received == list(range(60))
            assert kept.recovered is True
            assert gaps == [(plain.pattern, gaps[0][1])] and "no history" in gaps[0][1]
