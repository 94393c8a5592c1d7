"""A Python client given several URLs: which it tries, when it moves on, and that it loses
nothing when the node it is on drains (a real two-node cluster on a real Redis).

Every async test runs under asyncio and under Trio; the brokers are processes of their own.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from broker.pytest_plugin import BrokerProcess
from broker_client import Backoff, Message, connect
from broker_client.endpoints import Endpoints
from tests.anyio_helpers import METRICS, wait_until
from tests.redis_server import REDIS_SERVER, free_port

pytestmark = pytest.mark.anyio

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


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess() as process:
        yield process


async def test_an_unreachable_url_is_passed_over_for_one_that_serves(
    broker: BrokerProcess, unreachable_url: str
) -> None:
    for _ in range(4):  # shuffled: both orders come up
        async with connect([unreachable_url, broker.url], backoff=TINY) as client:
            assert client.url == broker.url
            await client.publish("t", 1)


@pytest.fixture(scope="module")
def capped_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess("[limits]\nmax_connections_per_ip = 1\n") as process:
        yield process


async def test_a_full_broker_is_passed_over_for_one_with_room(
    capped_broker: BrokerProcess, broker: BrokerProcess
) -> None:
    async with connect(capped_broker.url):  # capped is now full for 127.0.0.1
        for _ in range(4):
            async with connect([capped_broker.url, broker.url], backoff=TINY) as client:
                assert client.url == broker.url
                await client.publish("t", 1)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A ``redis-server`` of the test's own (no persistence), killed after it."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    port = free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "no",
               "--save", "", "--loglevel", "warning"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.DEVNULL) as process:
        try:
            deadline = time.monotonic() + 10
            while not _answers_ping(port):
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.kill()


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def node_config(redis_url: str, node_id: str) -> str:
    """A cluster node on ``redis_url`` keeping history on ``chat.>`` (``/readyz`` on)."""
    return f"""{METRICS}
[cluster]
backend = "{redis_url}"
node_id = "{node_id}"

[[topics]]
pattern = "chat.>"
on_full = "block"
history_size = 1000
"""


async def wait_ready(broker: BrokerProcess) -> None:
    """Wait until the broker's ``/readyz`` says it is ready (a node: connected to Redis)."""
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            while (await http.get(f"{broker.metrics_url}/readyz")).status_code != 200:  # noqa: ASYNC110
                await anyio.sleep(0.01)


async def test_clients_of_a_draining_node_land_on_the_other_and_lose_nothing(
    redis_url: str,
) -> None:
    """The failover the issue asks for: a subscriber on a history topic (and one on a topic
    without history) given both nodes' URLs; the node it is on drains while messages keep
    coming on the other. It reconnects to the other node, recovers with ``since`` there, and
    its application sees every message once, in order; the no-history one is told of a gap."""
    async with (
        BrokerProcess(node_config(redis_url, "n0")) as n0,
        BrokerProcess(node_config(redis_url, "n1")) as n1,
    ):
        brokers = [n0, n1]
        for node in brokers:
            await wait_ready(node)
        urls = [broker.url for broker in brokers]
        gaps: list[tuple[str, str]] = []
        async with (
            connect(
                urls, backoff=TINY, on_gap=lambda sub, why: gaps.append((sub.pattern, why))
            ) as client,
            client.subscribe("chat.failover") as kept,
            client.subscribe("plain.failover") as plain,
        ):
            on = next(b for b in brokers if b.url == client.url)
            other = next(b for b in brokers if b is not on)
            async with connect(other.url) as publisher:
                for n in range(20):
                    await publisher.publish("chat.failover", n)
                received = [(await kept.receive()).data for _ in range(20)]
                on.terminate()  # 1001 to its clients, then it stops listening
                for n in range(20, 60):  # while the client is away, and after
                    await publisher.publish("chat.failover", n)
                with anyio.fail_after(10):
                    while len(received) < 60:
                        message: Message = await kept.receive()
                        received.append(message.data)
                # counted once every resubscription is answered: plain's may come after 59
                await wait_until(lambda: client.reconnects == 1)
                assert client.url == other.url
            assert received == list(range(60))
            assert kept.recovered is True
            assert gaps == [(plain.pattern, gaps[0][1])] and "no history" in gaps[0][1]
