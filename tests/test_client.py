"""The Python client against a real broker over loopback: round trips, errors, backpressure."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from broker.io.server import Broker
from broker_client import (
    BadRequest,
    BrokerError,
    CannotConnect,
    Client,
    Closed,
    ConnectionLost,
    Forbidden,
    Internal,
    InvalidTopic,
    RateLimited,
    ReplyTimeout,
    TooLarge,
    TooManySubscriptions,
    Unavailable,
    UnknownOp,
    connect,
)
from broker_client.errors import error_from_frame
from tests.helpers import make_config, start_broker, wait_until


async def next_message(subscription: Any) -> Any:
    with trio.fail_after(5):
        return await subscription.receive()


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_publish_reaches_a_subscriber_in_either_encoding(
    broker_url: str, encoding: str
) -> None:
    async with (
        connect(broker_url, encoding=encoding) as client,
        client.subscribe("orders.*") as sub,
    ):
        await client.publish("orders.created", {"id": 7, "items": ["a", None, 1.5]})
        msg = await next_message(sub)
    assert (msg.topic, msg.pattern) == ("orders.created", "orders.*")
    assert msg.data == {"id": 7, "items": ["a", None, 1.5]}
    assert msg.offset is None


async def test_msgpack_carries_bytes(broker_client: Client) -> None:
    async with broker_client.subscribe("blobs.>") as sub:
        await broker_client.publish("blobs.png.small", b"\x89PNG\x00")
        assert (await next_message(sub)).data == b"\x89PNG\x00"


async def test_json_refuses_bytes_at_once(broker_url: str) -> None:
    async with connect(broker_url, encoding="json") as client:
        with pytest.raises(TypeError):
            await client.publish("blobs", b"raw")


async def test_publish_nowait_messages_arrive_in_order(broker_url: str) -> None:
    async with (
        connect(broker_url) as publisher,
        connect(broker_url) as subscriber,
        subscriber.subscribe("metrics.cpu") as sub,
    ):
        for n in range(100):
            publisher.publish_nowait("metrics.cpu", n)
        assert [(await next_message(sub)).data for _ in range(100)] == list(range(100))


async def test_publish_nowait_is_flushed_when_the_client_closes(broker_client: Client) -> None:
    async with broker_client.subscribe("last.words") as sub:
        async with connect(broker_client.url) as short_lived:
            short_lived.publish_nowait("last.words", "bye")
        assert (await next_message(sub)).data == "bye"


async def test_publish_nowait_raises_would_block_when_the_outbox_is_full(
    broker_url: str,
) -> None:
    async with connect(broker_url, outbox_size=3) as client:
        for n in range(3):
            client.publish_nowait("metrics", n)  # no checkpoint: the writer has not run yet
        with pytest.raises(trio.WouldBlock):
            client.publish_nowait("metrics", 3)


async def test_two_subscriptions_to_one_pattern_each_get_every_message(
    broker: Broker, broker_client: Client
) -> None:
    async with broker_client.subscribe("chat.>") as first:
        async with broker_client.subscribe("chat.>") as second:
            await broker_client.publish("chat.room", 1)
            assert (await next_message(first)).data == 1
            assert (await next_message(second)).data == 1
        await broker_client.publish("chat.room", 2)
        assert (await next_message(first)).data == 2
    await wait_until(lambda: all(not c.subscriptions for c in broker.connections))


async def test_leaving_the_subscribe_block_unsubscribes(
    broker: Broker, broker_client: Client
) -> None:
    async with broker_client.subscribe("a.*"):
        (connection,) = broker.connections
        assert set(connection.subscriptions) == {"a.*"}
    await wait_until(lambda: not connection.subscriptions)


async def test_async_for_ends_when_the_client_closes(broker_url: str) -> None:
    received = []
    async with connect(broker_url) as client, client.subscribe("news") as sub:
        await client.publish("news", "one")
        await client.aclose()
        async for msg in sub:
            received.append(msg.data)
    assert received == ["one"]


# --- errors ---


async def test_an_error_in_the_block_propagates_as_it_is(broker_url: str) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with connect(broker_url):
            raise KeyError("mine")


async def test_broker_errors_carry_code_and_message(broker_client: Client) -> None:
    with pytest.raises(InvalidTopic) as caught:
        await broker_client.publish("orders.*", 1)
    assert caught.value.code == "invalid_topic"
    assert "wildcard" in caught.value.message
    with pytest.raises(InvalidTopic):
        async with broker_client.subscribe("a.>.b"):
            pass
    await broker_client.publish("still.usable", 1)


async def test_too_large_and_too_many_subscriptions(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, make_config(max_payload=100, max_subscriptions=1))
    async with connect(broker.url) as client:
        with pytest.raises(TooLarge) as caught:
            await client.publish("big", "x" * 200)
        assert caught.value.code == "too_large"
        async with client.subscribe("one"):
            with pytest.raises(TooManySubscriptions):
                async with client.subscribe("two"):
                    pass


@pytest.mark.parametrize(
    ("code", "cls"),
    [("bad_request", BadRequest), ("unknown_op", UnknownOp), ("invalid_topic", InvalidTopic),
     ("forbidden", Forbidden), ("too_large", TooLarge), ("too_many_subs", TooManySubscriptions),
     ("rate_limited", RateLimited), ("unavailable", Unavailable), ("internal", Internal)],
)  # fmt: skip
def test_every_error_code_has_its_exception(code: str, cls: type[BrokerError]) -> None:
    error = error_from_frame(code, "why")
    assert type(error) is cls
    assert (error.code, error.message, str(error)) == (code, "why", f"{code}: why")


def test_an_unknown_error_code_is_still_a_broker_error() -> None:
    error = error_from_frame("new_code", "why")
    assert type(error) is BrokerError
    assert error.code == "new_code"


async def test_unreachable_broker_raises_cannot_connect(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, make_config())
    port = broker.port
    broker.shutdown()
    await broker.wait_stopped()
    with pytest.raises(CannotConnect, match=f"cannot connect to ws://127.0.0.1:{port}"):
        async with connect(f"ws://127.0.0.1:{port}"):
            pass  # pragma: no cover


Handler = Callable[[WebSocketRequest], Awaitable[None]]


async def fake_broker(nursery: trio.Nursery, handler: Handler) -> str:
    """A WebSocket server running ``handler``: for what the real broker does not do (yet)."""
    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/"


@pytest.mark.parametrize("status", [401, 403])
async def test_handshake_rejected_with_401_or_403_is_forbidden(
    nursery: trio.Nursery, status: int
) -> None:
    async def reject(request: WebSocketRequest) -> None:
        await request.reject(status, body=b"bad token")

    url = await fake_broker(nursery, reject)
    with pytest.raises(Forbidden, match=f"refused with HTTP {status}: bad token") as refused:
        async with connect(url, token="expired"):
            pass  # pragma: no cover
    assert refused.value.status == status


async def test_token_is_sent_as_a_bearer_header(nursery: trio.Nursery) -> None:
    headers: list[tuple[bytes, bytes]] = []

    async def accept(request: WebSocketRequest) -> None:
        headers.extend(request.headers)
        await request.accept(subprotocol="pubsub.v1.msgpack")

    async with connect(await fake_broker(nursery, accept), token="s3cret"):
        pass
    assert (b"authorization", b"Bearer s3cret") in headers


async def test_close_4003_ends_the_client_with_forbidden(
    broker: Broker, broker_client: Client
) -> None:
    async with broker_client.subscribe("private.>") as sub:
        (connection,) = broker.connections
        connection.close(4003, "token expired")
        with pytest.raises(Forbidden, match="token expired"), trio.fail_after(5):
            async for _ in sub:
                pass  # pragma: no cover
    with pytest.raises(Forbidden):
        await broker_client.publish("private.x", 1)


async def test_silent_broker_gives_reply_timeout(nursery: trio.Nursery) -> None:
    async def never_reply(request: WebSocketRequest) -> None:
        websocket = await request.accept(subprotocol="pubsub.v1.msgpack")
        await trio.sleep_forever()
        del websocket

    async with connect(await fake_broker(nursery, never_reply), reply_timeout=0.05) as client:
        with pytest.raises(ReplyTimeout, match=r"no reply to pub 'x' within 0\.05 s"):
            await client.publish("x", 1)


async def test_drop_after_sending_raises_connection_lost(nursery: trio.Nursery) -> None:
    async def hang_up(request: WebSocketRequest) -> None:
        websocket = await request.accept(subprotocol="pubsub.v1.msgpack")
        await websocket.get_message()
        await websocket.aclose(1011, "gone")

    async with connect(await fake_broker(nursery, hang_up), reconnect=False) as client:
        with pytest.raises(ConnectionLost) as caught:
            await client.publish("x", 1)
        assert caught.value.close_code == 1011


async def test_using_a_closed_client_raises_closed(broker_url: str) -> None:
    async with connect(broker_url) as client:
        pass
    with pytest.raises(Closed):
        await client.publish("x", 1)
    with pytest.raises(Closed):
        client.publish_nowait("x", 1)


# --- slow consumers ---


async def test_slow_consumer_buffer_is_bounded_and_loses_nothing_under_block(
    broker_url: str,
) -> None:
    async with connect(broker_url, buffer_size=4) as client, client.subscribe("ticks") as sub:
        async with connect(broker_url) as publisher:
            for n in range(50):
                await publisher.publish("ticks", n)
        await wait_until(lambda: sub.buffered == 4)
        assert sub.buffered == 4  # the reader waits instead of buffering more
        assert [(await next_message(sub)).data for _ in range(50)] == list(range(50))
        assert sub.dropped == 0


async def test_lag_notices_add_to_dropped_and_log_a_warning(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    count, payload = 200, b"x" * 65536  # 13 MB: more than loopback buffers hold
    config = make_config({"ticks": "drop_newest"}, queue_messages=4)
    broker = await start_broker(nursery, config)
    received: list[int] = []
    async with connect(broker.url, buffer_size=1) as client, client.subscribe("ticks") as sub:
        async with connect(broker.url) as publisher:
            for n in range(count):
                await publisher.publish("ticks", [n, payload])
        async with trio.open_nursery() as consumer:  # only now does the subscriber read

            async def consume() -> None:
                async for msg in sub:
                    received.append(msg.data[0])

            consumer.start_soon(consume)
            await wait_until(lambda: len(received) + sub.dropped == count)
            consumer.cancel_scope.cancel()
    assert sub.dropped > 0
    assert received == sorted(received)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped" in r.getMessage() and "'ticks'" in r.getMessage() for r in warnings)
