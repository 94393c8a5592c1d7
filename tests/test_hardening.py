"""What a hostile or careless client could do to the broker, each reproduced end to end.

Each test is one way a single client used to cost everyone else (issue 16): a request the
handshake could not parse, state a subscriber could make the broker keep, a message it could
store but not deliver, a line it could forge in the log. The attacks on every stage of a
connection's life (resets, timeouts, TLS on the wrong port) are in test_faults.py.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgpack
import pytest
import trio

from broker.config import MetricsConfig
from broker.core.stats import BurstLog
from broker.io.server import Broker
from broker.operations.logs import TextFormatter, escape_control
from broker.protocol.frames import MAX_DATA_DEPTH
from broker.protocol.handshake import MAX_REQUEST_HEAD
from tests.helpers import make_config, start_broker
from tests.rawsocket import open_tcp
from tests.test_recovery import history_config, publish_numbers, running, sub
from tests.wire import connect

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def answer(broker: Broker, data: bytes) -> bytes:
    """Send ``data`` on a new TCP connection; what the broker answers before it closes."""
    assert broker.port is not None
    stream = await open_tcp(broker.port)
    await stream.send_all(data)
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            received += chunk
            if b"\r\n\r\n" in received and received.startswith(b"HTTP/1.1 101"):
                break
    await stream.aclose()
    return received


BIG = b"x" * MAX_REQUEST_HEAD


def masked(payload: bytes) -> bytes:
    """A binary client frame (masked with zeros) carrying ``payload``."""
    assert len(payload) < 126
    return bytes((0x82, 0x80 | len(payload))) + bytes(4) + payload


# --- the handshake ----------------------------------------------------------------------


async def test_a_frame_written_with_the_upgrade_request_is_executed(broker: Broker) -> None:
    assert broker.port is not None
    stream = await open_tcp(broker.port)
    await stream.send_all(UPGRADE + masked(msgpack.packb({"op": "sub", "id": 7, "topic": "a"})))
    received = b""
    with trio.fail_after(5):
        while b"\x82" not in received.partition(b"\r\n\r\n")[2]:
            received += await stream.receive_some(65536)
    frame = received.partition(b"\r\n\r\n")[2]
    assert msgpack.unpackb(frame[2:]) == {"op": "ok", "id": 7}
    await stream.aclose()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0", 1), b"400"),
        (UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"not-a-key"), b"400"),
        (UPGRADE.replace(b"\r\n\r\n", b"\r\nX-Big: " + BIG + b"\r\n\r\n"), b"431"),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"426"),
    ],
    ids=["http-1.0", "bad-key", "64-kib-header", "plain-http"],
)
async def test_a_request_rfc_6455_refuses_gets_its_http_status(
    broker: Broker, request_bytes: bytes, status: bytes
) -> None:
    assert (await answer(broker, request_bytes)).startswith(b"HTTP/1.1 " + status)


@pytest.mark.parametrize(
    "header", [b"Host: \xff\xfe", b"Host: xn--a", b"Host: a\r\nSec-WebSocket-Extensions: \xff"]
)
async def test_header_bytes_wsproto_choked_on_are_accepted(broker: Broker, header: bytes) -> None:
    request_bytes = UPGRADE.replace(b"Host: 127.0.0.1", header)
    assert (await answer(broker, request_bytes)).startswith(b"HTTP/1.1 101")


async def test_a_target_urlsplit_choked_on_gets_in_without_a_token(broker: Broker) -> None:
    for target in (b"//[", b"//[::1/", b"/?token=%zz"):
        request_bytes = UPGRADE.replace(b"GET / ", b"GET " + target + b" ")
        assert (await answer(broker, request_bytes)).startswith(b"HTTP/1.1 101")


# --- memory a subscriber can make the broker spend ---------------------------------------


async def test_deep_patterns_are_bounded_per_connection_in_segments(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, make_config(max_subscription_segments=1000))
    deep = ".".join(["s"] * 126)  # 251 bytes, 126 segments: ~30 KiB of routing nodes each
    async with connect(broker.url) as client:
        frames = [{"op": "sub", "id": n, "topic": f"{n}.{deep}"[:255]} for n in range(10)]
        await client.send(*frames)
        replies = [await client.reply(n) for n in range(10)]
    assert [r["op"] for r in replies] == ["ok"] * 7 + ["err"] * 3
    assert replies[-1]["code"] == "too_many_subs"
    assert "max_subscription_segments" in replies[-1]["msg"]


async def test_pattern_bytes_are_bounded_per_connection(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, make_config(max_subscription_bytes=1000))
    async with connect(broker.url) as client:
        await client.send(*({"op": "sub", "id": n, "topic": f"{n:03}" + "x" * 197}
                            for n in range(6)))  # fmt: skip
        replies = [await client.reply(n) for n in range(6)]
        assert [r["op"] for r in replies] == ["ok"] * 5 + ["err"]
        assert "max_subscription_bytes" in replies[-1]["msg"]
        await client.send({"op": "unsub", "id": 9, "topic": "000" + "x" * 197})
        await client.reply(9)
        await client.subscribe("005" + "x" * 197, id=10)  # the unsub gave its bytes back


async def test_subscribe_churn_on_new_history_topics_evicts_no_ones_history(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = history_config(max_bytes=4096)
    async with running(config) as broker, connect(broker.url) as client:
        first = await sub(client, "chat.kept")
        await publish_numbers(client, 0, 3, topic="chat.kept")
        with caplog.at_level(logging.INFO, logger="broker.history"):
            for n in range(1000):  # a subscribe-only client: new topics under a history rule
                await client.send(
                    {"op": "sub", "id": 2, "topic": f"chat.churn.{n}"},
                    {"op": "unsub", "id": 3, "topic": f"chat.churn.{n}"},
                )
                await client.reply(3)
        async with connect(broker.url) as again:
            since = {"epoch": first["epoch"], "offset": 0}
            reply = await sub(again, "chat.kept", since=since)
            assert reply["recovered"] is True and reply["offset"] == 3
        assert broker.delivery.history.statistics()["topics"] == 1  # type: ignore[attr-defined]
    assert "evict" not in caplog.text


# --- a message that cannot be delivered to every encoding --------------------------------


def nested(depth: int, leaf: Any = b"leaf") -> Any:
    value: Any = leaf
    for _ in range(depth):
        value = [value]
    return value


async def test_data_nested_too_deep_is_refused_before_it_is_stored() -> None:
    async with (
        running(history_config()) as broker,
        connect(broker.url) as packed,
        connect(broker.url, "json") as text,
    ):
        first = await sub(text, "chat.deep")
        await packed.send({"op": "pub", "id": 1, "topic": "chat.deep", "data": nested(500)})
        refused = await packed.reply(1)
        assert refused["op"] == "err" and refused["code"] == "bad_request"
        await packed.publish("chat.deep", nested(MAX_DATA_DEPTH - 1), id=2)
        as_json = nested(MAX_DATA_DEPTH - 1, "bGVhZg==")  # bytes reach JSON in base64
        await text.expect("msg", topic="chat.deep", offset=1, data=as_json)
        async with connect(broker.url, "json") as late:  # the replay holds what was stored
            since = {"epoch": first["epoch"], "offset": 0}
            reply = await sub(late, "chat.deep", since=since)
            assert reply["op"] == "ok" and reply["recovered"] is True and reply["offset"] == 1
            await late.expect("msg", offset=1)


async def test_a_sub_whose_replay_cannot_be_encoded_is_not_left_subscribed(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, history_config())
    history = broker.delivery.history
    position = history.position("chat.bad", 0)
    history.append("chat.bad", b"\xc1", 0)  # stored by some bug: 0xc1 is never msgpack
    async with connect(broker.url, "json") as client:
        since = {"epoch": position.epoch, "offset": 0}
        reply = await sub(client, "chat.bad", since=since)
        assert reply["op"] == "err" and reply["code"] == "internal"
        assert broker.hub.subscription_count() == 0
        await client.subscribe("chat.bad", id=2)  # no "already subscribed"


# --- the log ------------------------------------------------------------------------------


def test_a_subject_with_a_newline_cannot_forge_a_log_line() -> None:
    record = logging.LogRecord(
        "broker.server", logging.INFO, __file__, 1, "connect subject=%s", ("bob\nINFO forged",),
        None,
    )  # fmt: skip
    line = TextFormatter().format(record)
    assert "\n" not in line and "bob\\nINFO forged" in line
    assert escape_control("right\u202eleft\x1b[2J") == "right\\u202eleft\\x1b[2J"
    assert escape_control("plain ü €") == "plain ü €"


def test_a_burst_of_refusals_is_logged_once() -> None:
    burst = BurstLog(quiet=10)
    assert burst.first("limit", 0.0) == 0
    assert [burst.first("limit", t / 10) for t in range(1, 100)] == [None] * 99
    assert burst.first("other", 5.0) == 0
    assert burst.first("limit", 30.0) == 99  # a new burst says how many went unlogged


async def test_a_metrics_listener_beyond_loopback_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Broker(make_config().replace(metrics=MetricsConfig(host="0.0.0.0", port=0)))
    broker.port, broker.metrics_url = 1, "http://0.0.0.0:2"  # as if it listened
    with caplog.at_level(logging.WARNING, logger="broker.server"):
        broker._log_startup()
    assert "/connz" in caplog.text and "no authentication" in caplog.text


# --- slowloris ----------------------------------------------------------------------------


async def test_trickling_handshakes_neither_lock_out_a_new_client_nor_grow_without_bound(
    broker: Broker,
) -> None:
    assert broker.port is not None
    cap = broker.config.server.max_handshakes
    tricklers = []
    for _ in range(cap + 500):  # each sends part of a request, then a byte now and then
        stream = await open_tcp(broker.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nX-Slow: ")
        tricklers.append(stream)
    for stream in tricklers[-100:]:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"x")
    with trio.fail_after(2):
        async with connect(broker.url) as client:
            await client.subscribe("still.open")
    assert len(broker._handshaking) <= cap  # memory: bounded by the cap, not by the attack
    assert broker.stats.handshakes_failed["dropped"] >= 500
    for stream in tricklers:
        await stream.aclose()
