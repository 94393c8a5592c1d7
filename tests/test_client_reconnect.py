"""Reconnecting: the backoff policy, and a client that outlives its broker's restart.

Every async test runs under asyncio and under Trio; the broker is a process of its own, which
the tests stop (SIGTERM: it closes its clients with 1001) and start again on the same port.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import anyio.abc
import pytest

from broker.pytest_plugin import BrokerProcess
from broker_client import (
    Backoff,
    Client,
    ConnectionLost,
    Forbidden,
    Message,
    ReplyTimeout,
    connect,
)
from broker_client.codec import Encoding, decode, encode
from tests.anyio_helpers import METRICS, subscriptions, wait_until
from tests.fake_server import Request, start_fake

pytestmark = pytest.mark.anyio

TINY = Backoff(base=0.001, max=0.01)


def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    backoff = Backoff(base=0.1, max=1.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.delay(10_000) == 1.0


@pytest.mark.parametrize("attempt", [0, 3, 50])
def test_backoff_jitter_stays_within_its_share(attempt: int) -> None:
    backoff = Backoff(base=0.1, max=2.0, jitter=0.25)
    ceiling = min(2.0, 0.1 * 2**attempt)
    assert backoff.delay(attempt, rand=0.0) == ceiling
    assert backoff.delay(attempt, rand=0.999) == pytest.approx(ceiling * (1 - 0.25 * 0.999))
    assert all(ceiling * 0.75 <= backoff.delay(attempt) <= ceiling for _ in range(100))


@pytest.mark.parametrize(
    "kwargs", [{"base": -1.0}, {"base": 2.0, "max": 1.0}, {"jitter": 1.5}, {"jitter": -0.1}]
)
def test_backoff_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


@pytest.fixture(scope="module")
def module_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(METRICS) as process:
        yield process


@pytest.fixture
def broker(module_broker: BrokerProcess) -> BrokerProcess:
    """The module's broker (``/connz`` on), for the test to stop and start again: started
    again first if the last test left it stopped."""
    if not module_broker.running:
        module_broker.start()
    return module_broker


async def test_subscriber_async_for_carries_on_across_a_broker_restart(
    broker: BrokerProcess, task_group: anyio.abc.TaskGroup
) -> None:
    url = broker.url
    reconnected = anyio.Event()
    hooked: list[Client] = []

    def on_reconnect(client: Client) -> None:
        hooked.append(client)
        reconnected.set()

    received_send, received = anyio.create_memory_object_stream[Message](10)
    async with (
        connect(url, backoff=TINY, on_reconnect=on_reconnect) as client,
        client.subscribe("news.*") as sub,
        client.subscribe("alerts"),
    ):

        async def consume() -> None:  # one async for, across the restart
            async for msg in sub:
                await received_send.send(msg)

        task_group.start_soon(consume)
        async with connect(url) as publisher:
            await publisher.publish("news.a", "before")
        with anyio.fail_after(5):
            assert (await received.receive()).data == "before"

        await broker.restart()
        with anyio.fail_after(5):
            await reconnected.wait()
        assert hooked == [client]
        assert client.reconnects == 1
        assert await subscriptions(broker) == [{"news.*", "alerts"}]  # none lost

        async with connect(url) as publisher:
            await publisher.publish("news.b", "after")
        with anyio.fail_after(5):
            assert (await received.receive()).data == "after"
        await client.publish("news.c", "own")  # and it publishes again
        with anyio.fail_after(5):
            assert (await received.receive()).data == "own"


async def test_publish_during_the_outage_is_sent_after_reconnecting(
    broker: BrokerProcess,
) -> None:
    backoff = Backoff(base=0.05, max=0.05)
    async with connect(broker.url, backoff=backoff) as client, client.subscribe("jobs") as sub:
        broker.terminate()
        await broker.wait_stopped()
        await wait_until(lambda: not client.connected)
        client.publish_nowait("jobs", 1)
        async with anyio.create_task_group() as inner:
            inner.start_soon(client.publish, "jobs", 2)  # waits in the outbox
            broker.start()  # on the same port
        with anyio.fail_after(5):
            assert [(await sub.receive()).data for _ in range(2)] == [1, 2]


async def test_a_reply_that_times_out_during_an_outage_says_why(broker: BrokerProcess) -> None:
    backoff = Backoff(base=0.01, max=0.05)
    async with connect(broker.url, backoff=backoff, reply_timeout=0.5) as client:
        broker.terminate()  # it closes its clients with 1001, then stops listening
        await broker.wait_stopped()
        await wait_until(lambda: not client.connected)
        with pytest.raises(ReplyTimeout) as timed_out:
            await client.publish("jobs", 1)  # it said "no reply within 0.5 s", nothing more
    assert str(timed_out.value).startswith(
        f"no reply to pub 'jobs' within 0.5 s: not connected (connection to {broker.url} lost "
        "(close code 1001: server shutting down); then connecting to "
    )


async def test_reconnect_off_ends_the_async_for_with_connection_lost(
    broker: BrokerProcess,
) -> None:
    async with connect(broker.url, reconnect=False) as client, client.subscribe("x") as sub:
        broker.terminate()
        with pytest.raises(ConnectionLost) as caught, anyio.fail_after(5):
            async for _ in sub:
                pass  # pragma: no cover
        assert (caught.value.close_code, caught.value.close_reason) == (
            1001,
            "server shutting down",
        )
        with pytest.raises(ConnectionLost):
            await client.publish("x", 1)
    await broker.wait_stopped()


async def test_forbidden_close_stops_reconnecting(task_group: anyio.abc.TaskGroup) -> None:
    accepted = 0

    async def expire_after_the_sub(request: Request) -> None:
        nonlocal accepted
        accepted += 1
        peer = await request.accept(subprotocol="pubsub.v1.msgpack")
        (sub,) = decode(await peer.get_message())
        await peer.send_message(encode({"op": "ok", "id": sub["id"]}, Encoding.MSGPACK))
        await peer.aclose(4003, "token expired")

    url = await start_fake(task_group, expire_after_the_sub)
    async with connect(url, backoff=TINY) as client, client.subscribe("x") as sub:
        with pytest.raises(Forbidden), anyio.fail_after(5):
            await sub.receive()
        assert (client.reconnects, client.connected, accepted) == (0, False, 1)


async def test_peer_that_stops_answering_pings_is_dropped_and_reconnected(
    task_group: anyio.abc.TaskGroup, caplog: pytest.LogCaptureFixture
) -> None:
    accepted = 0
    second = anyio.Event()

    async def stop_reading_the_first(request: Request) -> None:
        nonlocal accepted
        accepted += 1
        peer = await request.accept(subprotocol="pubsub.v1.msgpack")
        if accepted == 1:
            await anyio.sleep_forever()  # reads nothing: its pings go unanswered
        second.set()
        while True:  # reads, and answers pings, until the client closes
            await peer.get_message()

    url = await start_fake(task_group, stop_reading_the_first)
    async with connect(url, backoff=TINY, ping_interval=0.05) as client:
        with anyio.fail_after(5):
            await second.wait()
        await wait_until(lambda: client.reconnects == 1)
    assert "lost (no pong within 0.05 s); reconnecting" in caplog.text
