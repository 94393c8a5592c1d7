"""Bad input gets a clear error, as the protocol says, and never disturbs anyone else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
from wsproto.events import BytesMessage

from broker.config import Config
from broker.io.server import Broker
from tests.helpers import make_config, start_broker, wait_until
from tests.rawsocket import RawClient, open_raw, open_tcp
from tests.wire import WireClient, connect


@asynccontextmanager
async def bystanders(url: str) -> AsyncIterator[tuple[WireClient, WireClient]]:
    """A subscriber and a publisher that must not notice anything."""
    async with connect(url) as sub, connect(url, "json") as pub:
        await sub.subscribe("calm.*")
        yield sub, pub


async def still_fine(sub: WireClient, pub: WireClient, n: int) -> None:
    await pub.publish("calm.topic", n, id=n)
    await sub.expect("msg", topic="calm.topic", data=n)


def packed(*values: Any) -> bytes:
    return b"".join(msgpack.packb(value) for value in values)


BAD_MSGPACK = [
    pytest.param(b"\xc1", "bad_request", None, id="undecodable-byte"),
    pytest.param(packed([1, 2, 3]), "bad_request", None, id="array-not-map"),
    pytest.param(packed("sub"), "bad_request", None, id="string-not-map"),
    pytest.param(packed({"id": 5, "topic": "a"}), "bad_request", 5, id="map-without-op"),
    pytest.param(packed({"op": 7, "id": 5}), "bad_request", 5, id="op-not-a-string"),
    pytest.param(packed({"op": "sub", "id": "5", "topic": "a"}), "bad_request", None,
                 id="id-not-an-integer"),
    pytest.param(packed({"op": "sub", "id": True, "topic": "a"}), "bad_request", None,
                 id="id-is-a-boolean"),
    pytest.param(packed({"op": "sub", "id": -1, "topic": "a"}), "bad_request", None,
                 id="id-negative"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": 12}), "bad_request", 5,
                 id="topic-not-a-string"),
    pytest.param(packed({"op": "sub", "topic": "a"}), "bad_request", None, id="sub-without-id"),
    pytest.param(packed({"op": "pub", "id": 5, "topic": "a"}), "bad_request", 5,
                 id="pub-without-data"),
    pytest.param(packed({"op": "frobnicate", "id": 5}), "unknown_op", 5, id="unknown-op"),
    pytest.param(packed({"op": "pub", "id": 5, "topic": "a.*", "data": 1}), "invalid_topic", 5,
                 id="publish-to-wildcard"),
    pytest.param(packed({"op": "pub", "id": 5, "topic": "a.>", "data": 1}), "invalid_topic", 5,
                 id="publish-to-tail-wildcard"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": "a..b"}), "invalid_topic", 5,
                 id="empty-segment"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": ".a"}), "invalid_topic", 5,
                 id="leading-dot"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": ""}), "invalid_topic", 5,
                 id="empty-topic"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": "a" * 256}), "invalid_topic", 5,
                 id="topic-over-255-bytes"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": "é" * 128}), "invalid_topic", 5,
                 id="topic-over-255-utf8-bytes"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": "a.>.b"}), "invalid_topic", 5,
                 id="tail-wildcard-not-last"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": "a b"}), "invalid_topic", 5,
                 id="whitespace"),
    pytest.param(packed({"op": "sub", "id": 5, "topic": "a*"}), "invalid_topic", 5,
                 id="wildcard-inside-segment"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "code", "frame_id"), BAD_MSGPACK)
async def test_bad_msgpack_frame_is_answered_and_connection_stays_open(
    broker_url: str, message: bytes, code: str, frame_id: int | None
) -> None:
    async with bystanders(broker_url) as (sub, pub), connect(broker_url) as client:
        await client.websocket.send_message(message)
        error = await client.expect("err", code=code)
        assert error.get("id") == frame_id
        assert isinstance(error["msg"], str) and error["msg"]
        await client.subscribe("after.bad", id=99)  # the offender carries on
        await still_fine(sub, pub, 1)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "bad_request"),
        ('{"op": "sub", "id": 1', "bad_request"),
        ("[1, 2]", "bad_request"),
        ('{"op": "sub", "id": 1.5, "topic": "a"}', "bad_request"),
        ('{"op": "pub", "topic": "a b", "data": 1}', "invalid_topic"),
    ],
)
async def test_bad_json_frame_is_answered(broker_url: str, message: str, code: str) -> None:
    async with bystanders(broker_url) as (sub, pub), connect(broker_url, "json") as client:
        await client.websocket.send_message(message)
        await client.expect("err", code=code)
        await client.subscribe("after.bad", id=99)
        await still_fine(sub, pub, 1)


async def test_undecodable_rest_of_a_batch_gets_one_error_after_the_good_frames(
    broker_url: str,
) -> None:
    async with connect(broker_url) as client:
        good = packed({"op": "sub", "id": 1, "topic": "a"}, {"op": "sub", "id": 2, "topic": "b"})
        await client.websocket.send_message(good + b"\xc1\x00\x01" + packed({"op": "x", "id": 3}))
        await client.expect("ok", id=1)
        await client.expect("ok", id=2)
        error = await client.expect("err", code="bad_request")
        assert "id" not in error
        await client.publish("a", "still here", id=4)


async def test_text_message_on_msgpack_subprotocol_is_bad_request(broker_url: str) -> None:
    async with connect(broker_url) as client:
        await client.websocket.send_message('{"op": "sub", "id": 1, "topic": "a"}')
        await client.expect("err", code="bad_request")
        await client.subscribe("a", id=2)


async def test_binary_message_on_json_subprotocol_is_bad_request(broker_url: str) -> None:
    async with connect(broker_url, "json") as client:
        await client.websocket.send_message(packed({"op": "sub", "id": 1, "topic": "a"}))
        await client.expect("err", code="bad_request")
        await client.subscribe("a", id=2)


@pytest.fixture
def broker_config() -> Config:
    return make_config(max_subscriptions=3, max_payload=1000, max_bad_frames=5,
                       server={"max_message_size": 64 * 1024})  # fmt: skip


async def test_more_than_max_subscriptions_is_refused(broker_url: str) -> None:
    async with connect(broker_url) as client:
        for n in range(3):
            await client.subscribe(f"t.{n}", id=n)
        await client.subscribe("t.0", id=10)  # re-subscribing is not a new subscription
        await client.send({"op": "sub", "id": 11, "topic": "t.3"})
        await client.expect("err", id=11, code="too_many_subs")
        await client.send({"op": "unsub", "id": 12, "topic": "t.0"})
        await client.expect("ok", id=12)
        await client.subscribe("t.3", id=13)  # room again after an unsub


async def test_publish_over_max_payload_is_too_large(broker_url: str) -> None:
    async with bystanders(broker_url) as (sub, pub), connect(broker_url) as client:
        await client.subscribe("big")
        await client.send({"op": "pub", "id": 2, "topic": "big", "data": b"x" * 2000})
        await client.expect("err", id=2, code="too_large")
        await client.publish("big", b"x" * 500, id=3)
        await client.expect("msg", topic="big")
        await still_fine(sub, pub, 1)


async def test_message_over_max_message_size_closes_with_1009(broker_url: str) -> None:
    async with bystanders(broker_url) as (sub, pub), connect(broker_url) as client:
        await client.websocket.send_message(b"\x00" * (64 * 1024 + 1))
        assert await client.expect_close() == 1009
        await still_fine(sub, pub, 1)


async def test_flood_of_bad_frames_closes_with_4008_after_the_errors(broker_url: str) -> None:
    async with bystanders(broker_url) as (sub, pub), connect(broker_url) as client:
        await client.send(*({"op": "nope", "id": n} for n in range(4)))
        for n in range(4):
            await client.expect("err", id=n, code="unknown_op")
        await client.subscribe("ok.resets.the.count", id=50)
        await client.send(*({"op": "nope", "id": n} for n in range(100, 105)))
        for n in range(100, 105):
            await client.expect("err", id=n)
        assert await client.expect_close() == 4008
        await still_fine(sub, pub, 1)


async def test_client_dying_mid_frame_disturbs_no_one(broker: Broker) -> None:
    assert broker.port is not None
    async with bystanders(broker.url) as (sub, pub):
        raw = await open_raw(broker.port)
        assert isinstance(raw, RawClient)
        await raw.send_frames({"op": "sub", "id": 1, "topic": "calm.*"})
        frame = raw.ws.send(BytesMessage(data=b"\x81" * 1000))
        await raw.stream.send_all(frame[: len(frame) // 2])  # half a WebSocket frame, then gone
        await raw.stream.aclose()
        await still_fine(sub, pub, 1)
        await wait_until(lambda: len(broker.connections) == 2)
        assert broker.hub.subscription_count() == 1


async def test_tcp_client_that_never_handshakes_is_dropped(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, make_config(server={"handshake_timeout": 0.2}))
    assert broker.port is not None
    stream = await open_tcp(broker.port)
    await stream.send_all(b"GET / HTTP/1.1\r\n")  # and nothing more
    with trio.fail_after(5):
        assert await stream.receive_some(1024) == b""
    broker.shutdown()


async def test_an_internal_error_on_a_publish_is_answered_and_the_connection_goes_on(
    broker: Broker,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = broker.delivery.publish

    def failing(topic: str, data: Any, now: float, *, acknowledged: bool = True) -> Any:
        if topic == "boom":
            raise RuntimeError("a bug")
        return real(topic, data, now, acknowledged=acknowledged)

    monkeypatch.setattr(broker.delivery, "publish", failing)
    async with bystanders(broker_url) as (sub, pub), connect(broker_url) as client:
        await client.send({"op": "pub", "id": 7, "topic": "boom", "data": 1})
        await client.expect("err", id=7, code="internal")
        await client.publish("calm.after", "fine", id=8)
        await sub.expect("msg", topic="calm.after", data="fine")
        await still_fine(sub, pub, 1)
    assert "internal error" in caplog.text and "a bug" in caplog.text
