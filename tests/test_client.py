"""The Python client against a real broker over loopback: round trips, errors, backpressure.

Every async test runs under asyncio and under Trio (anyio's plugin). The broker runs in its
own process, one per config, shared by the module's tests; what it does not do on cue (refuse
with a status, stay silent, hang up) a scripted server does (``tests/fake_server.py``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.abc
import pytest
import trio

from broker.pytest_plugin import BrokerProcess
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
from broker_client.codec import Encoding, decode, encode
from broker_client.errors import error_from_frame
from tests.anyio_helpers import METRICS, wait_for_subscriptions, wait_until
from tests.fake_server import Request, start_fake

pytestmark = pytest.mark.anyio

LIMITED = "[limits]\nmax_payload = 100\nmax_subscriptions = 1\n"
LAGGING = """
[limits]
queue_messages = 4

[[topics]]
pattern = "ticks"
on_full = "drop_newest"
"""


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    """The module's broker: the defaults, and ``/connz``."""
    with BrokerProcess(METRICS) as process:
        yield process


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[Client]:
    async with connect(broker.url) as client:
        yield client


async def next_message(subscription: Any) -> Any:
    with anyio.fail_after(5):
        return await subscription.receive()


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_publish_reaches_a_subscriber_in_either_encoding(
    broker: BrokerProcess, encoding: str
) -> None:
    async with (
        connect(broker.url, encoding=encoding) as client,
        client.subscribe("orders.*") as sub,
    ):
        await client.publish("orders.created", {"id": 7, "items": ["a", None, 1.5]})
        msg = await next_message(sub)
    assert (msg.topic, msg.pattern) == ("orders.created", "orders.*")
    assert msg.data == {"id": 7, "items": ["a", None, 1.5]}
    assert msg.offset is None


async def test_msgpack_carries_bytes(client: Client) -> None:
    async with client.subscribe("blobs.>") as sub:
        await client.publish("blobs.png.small", b"\x89PNG\x00")
        assert (await next_message(sub)).data == b"\x89PNG\x00"


async def test_json_refuses_bytes_at_once(broker: BrokerProcess) -> None:
    async with connect(broker.url, encoding="json") as client:
        with pytest.raises(TypeError):
            await client.publish("blobs", b"raw")


async def test_publish_nowait_messages_arrive_in_order(broker: BrokerProcess) -> None:
    async with (
        connect(broker.url) as publisher,
        connect(broker.url) as subscriber,
        subscriber.subscribe("metrics.cpu") as sub,
    ):
        for n in range(100):
            publisher.publish_nowait("metrics.cpu", n)
        assert [(await next_message(sub)).data for _ in range(100)] == list(range(100))


async def test_a_burst_of_publish_nowait_fits_the_brokers_message_size(
    broker: BrokerProcess,
) -> None:
    """1.2 MB queued at once goes in batches within the broker's 1 MiB max_message_size
    (one batch of it all would be closed with 1009, and lost)."""
    async with (
        connect(broker.url) as publisher,
        connect(broker.url) as subscriber,
        subscriber.subscribe("burst") as sub,
    ):
        for n in range(600):
            publisher.publish_nowait("burst", f"{n:04}" + "x" * 2000)
        await publisher.publish("burst", "last")
        got = [(await next_message(sub)).data[:4] for _ in range(601)]
        assert got == [f"{n:04}" for n in range(600)] + ["last"]
        assert publisher.reconnects == 0 and publisher.connected


async def test_a_frame_over_max_message_size_raises_too_large_and_the_connection_stays(
    client: Client,
) -> None:
    big = b"x" * (1024 * 1024)
    with pytest.raises(TooLarge, match=r"over max_message_size \(1048576\)"):
        await client.publish("big", big)
    with pytest.raises(TooLarge):
        client.publish_nowait("big", big)
    await client.publish("big", "small")  # the same connection
    assert client.reconnects == 0


async def test_publish_nowait_is_flushed_when_the_client_closes(client: Client) -> None:
    async with client.subscribe("last.words") as sub:
        async with connect(client.url) as short_lived:
            short_lived.publish_nowait("last.words", "bye")
        assert (await next_message(sub)).data == "bye"


async def test_publish_nowait_raises_would_block_when_the_outbox_is_full(
    broker: BrokerProcess,
) -> None:
    async with connect(broker.url, outbox_size=3) as client:
        for n in range(3):
            client.publish_nowait("metrics", n)  # no checkpoint: the writer has not run yet
        with pytest.raises(anyio.WouldBlock) as full:
            client.publish_nowait("metrics", 3)
        assert isinstance(full.value, trio.WouldBlock)  # as it was when the client was Trio's


async def test_two_subscriptions_to_one_pattern_each_get_every_message(
    broker: BrokerProcess, client: Client
) -> None:
    async with client.subscribe("chat.>") as first:
        async with client.subscribe("chat.>") as second:
            await client.publish("chat.room", 1)
            assert (await next_message(first)).data == 1
            assert (await next_message(second)).data == 1
        await client.publish("chat.room", 2)
        assert (await next_message(first)).data == 2
    await wait_for_subscriptions(broker, lambda subscribed: not any(subscribed))


async def test_leaving_the_subscribe_block_unsubscribes(
    broker: BrokerProcess, client: Client
) -> None:
    async with client.subscribe("a.*"):
        await wait_for_subscriptions(broker, lambda subscribed: {"a.*"} in subscribed)
    await wait_for_subscriptions(broker, lambda subscribed: {"a.*"} not in subscribed)


async def test_async_for_ends_when_the_client_closes(broker: BrokerProcess) -> None:
    received = []
    async with connect(broker.url) as client, client.subscribe("news") as sub:
        await client.publish("news", "one")
        await client.aclose()
        async for msg in sub:
            received.append(msg.data)
    assert received == ["one"]


# --- errors ---


async def test_an_error_in_the_block_propagates_as_it_is(broker: BrokerProcess) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with connect(broker.url):
            raise KeyError("mine")


async def test_broker_errors_carry_code_and_message(client: Client) -> None:
    with pytest.raises(InvalidTopic) as caught:
        await client.publish("orders.*", 1)
    assert caught.value.code == "invalid_topic"
    assert "wildcard" in caught.value.message
    with pytest.raises(InvalidTopic):
        async with client.subscribe("a.>.b"):
            pass
    await client.publish("still.usable", 1)


@pytest.fixture(scope="module")
def limited_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(LIMITED) as process:
        yield process


async def test_too_large_and_too_many_subscriptions(limited_broker: BrokerProcess) -> None:
    async with connect(limited_broker.url) as client:
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


async def test_unreachable_broker_raises_cannot_connect(unreachable_url: str) -> None:
    with pytest.raises(CannotConnect, match=f"cannot connect to {unreachable_url}: "):
        async with connect(unreachable_url):
            pass  # pragma: no cover


@pytest.mark.parametrize("status", [401, 403])
async def test_handshake_rejected_with_401_or_403_is_forbidden(
    task_group: anyio.abc.TaskGroup, status: int
) -> None:
    async def reject(request: Request) -> None:
        await request.reject(status, body=b"bad token")

    url = await start_fake(task_group, reject)
    with pytest.raises(Forbidden, match=f"refused with HTTP {status}: bad token") as refused:
        async with connect(url, token="expired"):
            pass  # pragma: no cover
    assert refused.value.status == status


async def test_token_is_sent_as_a_bearer_header(task_group: anyio.abc.TaskGroup) -> None:
    headers: list[tuple[bytes, bytes]] = []

    async def accept(request: Request) -> None:
        headers.extend(request.headers)
        await request.accept(subprotocol="pubsub.v1.msgpack")

    async with connect(await start_fake(task_group, accept), token="s3cret"):
        pass
    assert (b"authorization", b"Bearer s3cret") in headers


async def test_close_4003_ends_the_client_with_forbidden(task_group: anyio.abc.TaskGroup) -> None:
    async def expire_after_the_sub(request: Request) -> None:
        peer = await request.accept(subprotocol="pubsub.v1.msgpack")
        (sub,) = decode(await peer.get_message())
        await peer.send_message(encode({"op": "ok", "id": sub["id"]}, Encoding.MSGPACK))
        await peer.aclose(4003, "token expired")

    async with connect(await start_fake(task_group, expire_after_the_sub)) as client:
        async with client.subscribe("private.>") as sub:
            with pytest.raises(Forbidden, match="token expired") as ended, anyio.fail_after(5):
                async for _ in sub:
                    pass  # pragma: no cover
        assert (ended.value.close_code, ended.value.close_reason) == (4003, "token expired")
        with pytest.raises(Forbidden):
            await client.publish("private.x", 1)


async def test_silent_broker_gives_reply_timeout(task_group: anyio.abc.TaskGroup) -> None:
    async def never_reply(request: Request) -> None:
        peer = await request.accept(subprotocol="pubsub.v1.msgpack")
        while True:  # until the client closes
            await peer.get_message()

    url = await start_fake(task_group, never_reply)
    async with connect(url, reply_timeout=0.05) as client:
        with pytest.raises(ReplyTimeout, match=r"no reply to pub 'x' within 0\.05 s"):
            await client.publish("x", 1)


async def test_drop_after_sending_raises_connection_lost(task_group: anyio.abc.TaskGroup) -> None:
    async def hang_up(request: Request) -> None:
        peer = await request.accept(subprotocol="pubsub.v1.msgpack")
        await peer.get_message()
        await peer.aclose(1011, "gone")

    async with connect(await start_fake(task_group, hang_up), reconnect=False) as client:
        with pytest.raises(ConnectionLost) as caught:
            await client.publish("x", 1)
        assert (caught.value.close_code, caught.value.close_reason) == (1011, "gone")


async def test_using_a_closed_client_raises_closed(broker: BrokerProcess) -> None:
    async with connect(broker.url) as client:
        pass
    with pytest.raises(Closed):
        await client.publish("x", 1)
    with pytest.raises(Closed):
        client.publish_nowait("x", 1)


# --- slow consumers ---


async def test_slow_consumer_buffer_is_bounded_and_loses_nothing_under_block(
    broker: BrokerProcess,
) -> None:
    async with connect(broker.url, buffer_size=4) as client, client.subscribe("ticks") as sub:
        async with connect(broker.url) as publisher:
            for n in range(50):
                await publisher.publish("ticks", n)
        await wait_until(lambda: sub.buffered == 4)
        assert sub.buffered == 4  # the reader waits instead of buffering more
        assert [(await next_message(sub)).data for _ in range(50)] == list(range(50))
        assert sub.dropped == 0


@pytest.fixture(scope="module")
def lagging_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(LAGGING) as process:
        yield process


async def test_lag_notices_add_to_dropped_and_log_a_warning(
    lagging_broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    count, payload = 200, b"x" * 65536  # 13 MB: more than loopback buffers hold
    url = lagging_broker.url
    received: list[int] = []
    async with connect(url, buffer_size=1) as client, client.subscribe("ticks") as sub:
        async with connect(url) as publisher:
            for n in range(count):
                await publisher.publish("ticks", [n, payload])
        async with anyio.create_task_group() as consumer:  # only now does the subscriber read

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
