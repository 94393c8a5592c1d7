"""Reconnecting: the backoff policy, and a client that outlives its broker's restart."""

from __future__ import annotations

import dataclasses

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from broker.io.server import Broker
from broker_client import (
    Backoff,
    Client,
    ConnectionLost,
    Forbidden,
    Message,
    ReplyTimeout,
    connect,
)
from tests.helpers import make_config, start_broker, wait_until

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


async def restart(nursery: trio.Nursery, broker: Broker) -> Broker:
    """Stop ``broker`` and start a new one on the same port."""
    broker.shutdown()
    await broker.wait_stopped()
    assert broker.port is not None
    server = dataclasses.replace(broker.config.server, port=broker.port)
    return await start_broker(nursery, broker.config.replace(server=server))


async def test_subscriber_async_for_carries_on_across_a_broker_restart(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, make_config())
    url = broker.url
    reconnected = trio.Event()
    hooked: list[Client] = []

    def on_reconnect(client: Client) -> None:
        hooked.append(client)
        reconnected.set()

    received_send, received = trio.open_memory_channel[Message](10)
    async with (
        connect(url, backoff=TINY, on_reconnect=on_reconnect) as client,
        client.subscribe("news.*") as sub,
        client.subscribe("alerts"),
    ):

        async def consume() -> None:  # one async for, across the restart
            async for msg in sub:
                await received_send.send(msg)

        nursery.start_soon(consume)
        async with connect(url) as publisher:
            await publisher.publish("news.a", "before")
        with trio.fail_after(5):
            assert (await received.receive()).data == "before"

        broker = await restart(nursery, broker)
        with trio.fail_after(5):
            await reconnected.wait()
        assert hooked == [client]
        assert client.reconnects == 1
        (connection,) = broker.connections
        assert set(connection.subscriptions) == {"news.*", "alerts"}  # none lost

        async with connect(url) as publisher:
            await publisher.publish("news.b", "after")
        with trio.fail_after(5):
            assert (await received.receive()).data == "after"
        await client.publish("news.c", "own")  # and it publishes again
        with trio.fail_after(5):
            assert (await received.receive()).data == "own"


async def test_publish_during_the_outage_is_sent_after_reconnecting(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, make_config())
    backoff = Backoff(base=0.05, max=0.05)
    async with connect(broker.url, backoff=backoff) as client, client.subscribe("jobs") as sub:
        broker.shutdown()
        await broker.wait_stopped()
        await wait_until(lambda: not client.connected)
        client.publish_nowait("jobs", 1)
        async with trio.open_nursery() as inner:
            inner.start_soon(client.publish, "jobs", 2)  # waits in the outbox
            broker = await restart(nursery, broker)
        with trio.fail_after(5):
            assert [(await sub.receive()).data for _ in range(2)] == [1, 2]


async def test_reconnect_off_ends_the_async_for_with_connection_lost(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, make_config())
    async with connect(broker.url, reconnect=False) as client, client.subscribe("x") as sub:
        broker.shutdown()
        with pytest.raises(ConnectionLost) as caught, trio.fail_after(5):
            async for _ in sub:
                pass  # pragma: no cover
        assert caught.value.close_code == 1001
        with pytest.raises(ConnectionLost):
            await client.publish("x", 1)


async def test_forbidden_close_stops_reconnecting(broker: Broker) -> None:
    async with connect(broker.url, backoff=TINY) as client, client.subscribe("x") as sub:
        (connection,) = broker.connections
        connection.close(4003, "token expired")
        with pytest.raises(Forbidden), trio.fail_after(5):
            await sub.receive()
        assert client.reconnects == 0
        await wait_until(lambda: not broker.connections)  # and it does not come back


async def test_peer_that_stops_answering_pings_is_dropped_and_reconnected(
    nursery: trio.Nursery,
) -> None:
    accepted: list[object] = []
    second = trio.Event()

    async def never_read(request: WebSocketRequest) -> None:
        # Its reader stalls once its one-message queue is full, so pings go unanswered.
        accepted.append(await request.accept(subprotocol="pubsub.v1.msgpack"))
        if len(accepted) == 2:
            second.set()
        await trio.sleep_forever()

    server = await nursery.start(serve_websocket, never_read, "127.0.0.1", 0, None)
    url = f"ws://127.0.0.1:{server.port}/"
    async with connect(url, backoff=TINY, ping_interval=0.05, reply_timeout=0.05) as client:
        for n in range(3):  # one WebSocket message each
            with pytest.raises(ReplyTimeout):
                await client.publish("x", n)
        with trio.fail_after(5):
            await second.wait()
        assert client.reconnects <= 1
