"""Fault injection over real loopback sockets: whatever one TCP peer does, at whatever stage of
its connection's life, the failure is that connection's alone and the broker serves on.

Each test is one attack inside :func:`survives`, which then proves that

- the broker still serves: a new client subscribes and gets the message it publishes;
- a subscriber connected before the attack still gets messages published after it;
- file descriptors, ``broker.connections``, ``broker.admitted_per_ip`` and the live
  ``Connection``/``WebSocket`` objects are back to what they were before the attack;
- nothing was logged by the ``broker`` loggers at ERROR or above, or with a traceback, and
  no broker bug was counted (``broker_internal_errors_total``).

The broker runs in the test's nursery, so a broker that dies fails the test with the exception
that escaped its ``serve`` task.

An attacker writes with :func:`write_now` (``os.write``, no checkpoint), so the bytes and the
RST after them are both in the broker's socket before the broker runs again: the broker reads
the bytes, acts on them, and meets the reset while answering. Where the order matters more
finely, an attack sweeps over how many scheduler passes the broker gets in between.

A malformed upgrade request may be refused (HTTP 4xx), dropped, or let in when the broker
needs none of the bad bytes (tests/test_hardening.py decides which); here it must get one of
those answers, and a connection let in must then be served.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import trio
import trustme
from wsproto import ConnectionType
from wsproto.connection import Connection as WebSocketProtocol
from wsproto.events import BytesMessage, CloseConnection

from broker.config import Config, TlsConfig
from broker.io.connection import Connection
from broker.io.server import Broker
from broker.io.websocket import WebSocket
from tests.helpers import make_config, start_broker, wait_until
from tests.rawsocket import RawClient, open_raw, open_tcp, stuck_subscriber
from tests.wire import connect

UPGRADE = (
    b"GET / HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)
MAX_MESSAGE_SIZE = 256 * 1024
BIG = b"x" * (60 * 1024)  # one ~64 KiB message body


@pytest.fixture
def broker_config() -> Config:
    return make_config(
        topics={"big.>": "drop_oldest"},  # a stuck subscriber never holds its publisher back
        server={"handshake_timeout": 0.3, "max_message_size": MAX_MESSAGE_SIZE,
                "drain_timeout": 2},
        max_connections_per_ip=1000,  # hundreds of attackers at once must not 503 the checks
    )  # fmt: skip


# --- the checks after every attack ---


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


TRACKED: tuple[type, ...] = (Connection, WebSocket)


def live_objects() -> dict[str, int]:
    """How many ``Connection`` and ``WebSocket`` objects are alive, after a full collection."""
    gc.collect()
    counts = {kind.__name__: 0 for kind in TRACKED}
    for obj in gc.get_objects():
        if isinstance(obj, TRACKED):
            counts[type(obj).__name__] += 1
    return counts


async def settles(condition: Callable[[], bool], state: Callable[[], str]) -> None:
    """Wait (up to 5 s) for ``condition``; fail with ``state()`` if it never holds."""
    try:
        await wait_until(condition)
    except trio.TooSlowError:
        pytest.fail(state())


def assert_no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [
        record
        for record in caplog.records
        if (record.name == "broker" or record.name.startswith("broker."))
        and (record.levelno >= logging.ERROR or record.exc_info)
    ]
    assert not bad, "a peer's fault was logged as an error or with a traceback:\n" + "\n".join(
        f"{record.levelname} {record.name}: {record.getMessage()}"
        + (" [with traceback]" if record.exc_info else "")
        for record in bad
    )


@asynccontextmanager
async def capturing_broker_logs(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """Capture the ``broker`` loggers from INFO up, even if something turned propagation off."""
    logger = logging.getLogger("broker")
    propagate, logger.propagate = logger.propagate, True
    caplog.set_level(logging.INFO, logger="broker")
    try:
        yield
    finally:
        logger.propagate = propagate


@asynccontextmanager
async def survives(
    broker: Broker, caplog: pytest.LogCaptureFixture, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[None]:
    """Run the attack in the body; then prove the broker serves on and got everything back."""
    async with capturing_broker_logs(caplog), connect(broker.url, ssl_context=ssl_context) as old:
        await old.subscribe("before.>")
        await wait_until(lambda: len(broker.connections) == 1)
        (subscriber,) = [c.peer for c in broker.connections]  # no reference to the Connection
        objects, fds = live_objects(), open_fds()

        yield

        # A new client is served (it is accepted after every attacking connection, which the
        # listener accepted in order: each of those already holds its descriptor now).
        async with connect(broker.url, ssl_context=ssl_context) as new:
            await new.subscribe("after.>")
            await new.publish("after.check", "new client", id=2)
            await new.expect("msg", topic="after.check", data="new client")
            await new.publish("before.check", "old subscriber", id=3)
        await old.expect("msg", topic="before.check", data="old subscriber")

        await settles(
            lambda: (
                [c.peer for c in broker.connections] == [subscriber]
                and broker.admitted_per_ip.total() == 1
            ),
            lambda: (
                f"connections left: {[c.peer for c in broker.connections]} (expected only "
                f"{subscriber}); admitted per IP: {dict(broker.admitted_per_ip)}"
            ),
        )
        await all_given_back(fds, objects, caplog, "before the attack")
        assert broker.stats.internal_errors == 0  # every failure was the peer's, and contained


async def all_given_back(
    fds: int, objects: dict[str, int], caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """File descriptors and live connection objects are back to ``fds`` and ``objects``, and
    nothing was logged at ERROR or with a traceback."""
    await settles(
        lambda: open_fds() <= fds,
        lambda: f"file descriptors leaked: {open_fds()} open, {fds} {when}",
    )
    now = live_objects()
    assert all(now[kind] <= objects[kind] for kind in now), (
        f"objects leaked: {now} alive, {objects} {when}"
    )
    assert_no_error_logged(caplog)


def assert_refused_or_closed(answer: bytes) -> None:
    """The broker either answered with an HTTP 4xx or just closed."""
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]


# --- the attacker's moves ---


def write_now(stream: trio.SocketStream, data: bytes) -> None:
    """Write ``data`` without a checkpoint: the broker cannot run before what comes next."""
    assert os.write(stream.socket.fileno(), data) == len(data)


def reset(stream: trio.SocketStream) -> None:
    """Abort the connection: SO_LINGER 0, then close, makes the kernel send an RST."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the broker sends until it closes the connection (EOF or RST); then close."""
    received = bytearray()
    with trio.fail_after(5):
        try:
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass  # it closed with bytes of ours unread: an RST
    await stream.aclose()
    return bytes(received)


async def half_close(stream: trio.SocketStream) -> bytes:
    """Send FIN, then read what the broker answers until it closes too."""
    await stream.send_eof()
    return await read_until_closed(stream)


async def finish_upgrade(raw: RawClient) -> None:
    """Send a ``sub`` and read its ``ok``: the connection is fully up."""
    await raw.send_frames({"op": "sub", "id": 1, "topic": "mine.>"})
    frames: list[dict[str, object]] = []
    with trio.fail_after(5):
        while not frames:
            frames, _ = await raw.read_frames()
    assert frames == [{"op": "ok", "id": 1}]


async def upgraded(port: int) -> RawClient:
    raw = await open_raw(port)
    assert isinstance(raw, RawClient)
    return raw


def port_of(broker: Broker) -> int:
    assert broker.port is not None
    return broker.port


# --- 1-4: before and during the upgrade request ---


async def test_a_silent_peer_is_dropped_at_the_handshake_timeout_and_the_broker_serves_on(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    async with survives(broker, caplog):
        stream = await open_tcp(port_of(broker))
        assert_refused_or_closed(await read_until_closed(stream))  # after handshake_timeout


STAGES = [
    pytest.param(b"", id="before-any-byte"),
    pytest.param(b"GET /ch", id="mid-request-line"),
    pytest.param(UPGRADE[:50], id="mid-headers"),
    pytest.param(UPGRADE, id="after-the-complete-upgrade-request"),
]


@pytest.mark.parametrize("sent", STAGES)
async def test_a_reset_during_the_upgrade_request_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    async with survives(broker, caplog):
        stream = await open_tcp(port_of(broker))
        write_now(stream, sent)
        reset(stream)


@pytest.mark.parametrize("sent", STAGES)
async def test_a_half_close_during_the_upgrade_request_is_closed_and_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    async with survives(broker, caplog):
        stream = await open_tcp(port_of(broker))
        write_now(stream, sent)
        answer = await half_close(stream)
        if sent == UPGRADE:  # a whole request may be accepted before the broker sees the FIN
            assert answer == b"" or answer.startswith(b"HTTP/1.1 101 "), answer[:200]
        else:
            assert_refused_or_closed(answer)


async def test_hundreds_of_resets_right_after_the_upgrade_request_leave_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    async with survives(broker, caplog):
        streams = [await open_tcp(port_of(broker)) for _ in range(300)]
        for stream in streams:  # all 300 requests and resets land before the broker runs
            write_now(stream, UPGRADE)
            reset(stream)


# --- 5: while the 101 is being written ---


async def test_a_reset_at_any_point_of_writing_the_101_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker gets 0 to 7 scheduler passes between the request and the RST: the reset
    # lands before it reads, while it answers, and after the 101.
    async with survives(broker, caplog):
        for attempt in range(160):
            stream = await open_tcp(port_of(broker))
            write_now(stream, UPGRADE)
            for _ in range(attempt % 8):
                await trio.lowlevel.checkpoint()
            reset(stream)


# --- 6: after the 101 ---


@pytest.mark.parametrize("subscribed", [False, True], ids=["right-after-the-101", "subscribed"])
async def test_a_reset_after_the_101_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture, subscribed: bool
) -> None:
    async with survives(broker, caplog):
        raw = await upgraded(port_of(broker))
        if subscribed:
            await finish_upgrade(raw)
        reset(raw.stream)


@pytest.mark.parametrize("subscribed", [False, True], ids=["right-after-the-101", "subscribed"])
async def test_a_half_close_after_the_101_without_a_close_frame_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture, subscribed: bool
) -> None:
    async with survives(broker, caplog):
        raw = await upgraded(port_of(broker))
        if subscribed:
            await finish_upgrade(raw)
        await half_close(raw.stream)  # the broker closes its side too


# --- 7: mid-write of a large batch ---


def queued_for(broker: Broker, pattern: str) -> list[int]:
    """The queue lengths of the connections subscribed to ``pattern`` (looked up each time:
    a test holding a ``Connection`` would keep it alive past the leak check)."""
    return [len(c.queue) for c in broker.connections if pattern in c.subscriptions]


async def test_a_reset_while_a_large_batch_is_written_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(broker)
    async with survives(broker, caplog):
        raw = await stuck_subscriber(port, "big.>")  # tiny receive buffer, never reads
        async with connect(broker.url) as publisher, trio.open_nursery() as nursery:

            async def publish() -> None:
                for _ in range(160):  # ~10 MiB: more than the socket buffers hold
                    await publisher.send({"op": "pub", "topic": "big.data", "data": BIG})
                await publisher.publish("big.data", BIG, id=1)  # queued for everyone

            nursery.start_soon(publish)
            # The writer is blocked in a write to the full socket, with more queued behind it.
            await wait_until(lambda: queued_for(broker, "big.>")[0] > 0)
            reset(raw.stream)
        await wait_until(lambda: not queued_for(broker, "big.>"))


@pytest.mark.parametrize("passes", [0, 1, 2, 3])
async def test_subscribers_resetting_while_their_writes_wait_for_the_flush_leave_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture, passes: int
) -> None:
    # A reader's writes to idle subscribers wait for DirectWrites.flush_writes, one scheduler
    # pass later: the subscribers reset in between, or just before, or just after.
    port = port_of(broker)
    async with survives(broker, caplog):
        subscribers = [await upgraded(port) for _ in range(6)]
        for subscriber in subscribers:
            await finish_upgrade(subscriber)
        publisher = await upgraded(port)
        pubs = b"".join(
            publisher.ws.send(BytesMessage(msgpack.packb({"op": "pub", "topic": t, "data": n})))
            for n in range(20)
            for t in ("mine.a", "mine.b")
        )
        write_now(publisher.stream, pubs)
        for _ in range(passes):
            await trio.lowlevel.checkpoint()
        for subscriber in subscribers:
            reset(subscriber.stream)
        reset(publisher.stream)


@pytest.mark.parametrize("passes", [0, 1, 2, 3])
async def test_a_reset_around_the_start_of_a_writer_for_a_partial_write_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture, passes: int
) -> None:
    # The publisher's reader writes to the idle subscriber itself; its socket takes part of
    # the message, and a writer task is started to send the rest (Connection.start_writer):
    # the subscriber resets before that task runs, as it starts, or while it waits.
    port = port_of(broker)
    async with survives(broker, caplog):
        raw = await stuck_subscriber(port, "big.>")  # tiny receive buffer, never reads
        publisher = await upgraded(port)
        pub = {"op": "pub", "topic": "big.data", "data": BIG + BIG[:30_000]}  # its socket: less
        write_now(publisher.stream, publisher.ws.send(BytesMessage(msgpack.packb(pub))))
        for _ in range(passes):
            await trio.lowlevel.checkpoint()
        reset(raw.stream)
        reset(publisher.stream)


# --- 8: mid close handshake ---


async def test_a_peer_that_sends_a_close_frame_and_resets_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    async with survives(broker, caplog):
        raw = await upgraded(port_of(broker))
        write_now(raw.stream, raw.ws.send(CloseConnection(code=1000)))
        reset(raw.stream)  # without waiting for the broker's close reply


async def close_frame(raw: RawClient) -> CloseConnection:
    """Read (discarding messages) until the broker's close frame; do not answer it."""
    with trio.fail_after(5):
        while True:
            for event in await raw.events():
                if isinstance(event, CloseConnection):
                    return event


async def test_a_reset_instead_of_answering_the_brokers_close_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    async with survives(broker, caplog):
        raw = await upgraded(port_of(broker))
        await raw.stream.send_all(raw.ws.send(BytesMessage(data=b"\0" * (MAX_MESSAGE_SIZE + 1))))
        assert (await close_frame(raw)).code == 1009
        reset(raw.stream)  # the broker waits for our close reply


# --- 9: during a graceful shutdown ---


async def next_frames(raw: RawClient) -> list[dict[str, object]]:
    """The frames of the next complete message(s) (fails on a close)."""
    frames: list[dict[str, object]] = []
    with trio.fail_after(5):
        while not frames:
            frames, close = await raw.read_frames()
            assert close is None, close
    return frames


async def messages_until_close(raw: RawClient) -> tuple[list[dict[str, object]], int]:
    """The frames before the broker's close frame, and its code; the close is answered and
    the socket closed."""
    frames: list[dict[str, object]] = []
    with trio.fail_after(5):
        while True:
            for event in await raw.events():
                if isinstance(event, BytesMessage):  # small: one read holds each whole
                    unpacker = msgpack.Unpacker(raw=False)
                    unpacker.feed(event.data)
                    frames.extend(unpacker)
                if isinstance(event, CloseConnection):
                    if event.code != 1006:
                        await raw.stream.send_all(raw.ws.send(event.response()))
                    await raw.stream.aclose()
                    return frames, event.code


async def test_peers_resetting_while_the_broker_drains_on_shutdown_let_serve_return_normally(
    nursery: trio.Nursery, broker_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    # Raw clients throughout: trio-websocket 0.12 leaves its socket open (until garbage
    # collection) when the server closes first, which would look like a leak here.
    objects, fds = live_objects(), open_fds()
    async with capturing_broker_logs(caplog):
        broker = await start_broker(nursery, broker_config)
        port = port_of(broker)
        stuck = [await stuck_subscriber(port, "big.>") for _ in range(2)]
        old, publisher = await upgraded(port), await upgraded(port)
        await old.send_frames({"op": "sub", "id": 1, "topic": "before.>"})
        assert await next_frames(old) == [{"op": "ok", "id": 1}]
        for _ in range(160):  # ~10 MiB each: their queues stay full behind a blocked write
            await publisher.send_frames({"op": "pub", "topic": "big.data", "data": BIG})
        last = {"op": "pub", "id": 2, "topic": "before.last", "data": "flushed on shutdown"}
        await publisher.send_frames(last)
        assert await next_frames(publisher) == [{"op": "ok", "id": 2}]  # all queued now
        assert [queued > 0 for queued in queued_for(broker, "big.>")] == [True, True]
        before_handshakes = open_fds()
        handshaking = [await open_tcp(port) for _ in range(4)]
        await wait_until(lambda: open_fds() >= before_handshakes + 8)  # all accepted

        broker.shutdown()
        for stream in handshaking:  # upgrade requests the broker reads only once it drains
            write_now(stream, UPGRADE)
            reset(stream)
        await wait_until(lambda: all(c.close_code == 1001 for c in broker.connections))
        for raw in stuck:  # while the broker drains their queues
            reset(raw.stream)
        flushed = {"op": "msg", "topic": "before.last", "data": last["data"], "sub": "before.>"}
        assert await messages_until_close(old) == ([flushed], 1001)
        assert await messages_until_close(publisher) == ([], 1001)
        with trio.fail_after(5):
            await broker.wait_stopped()  # serve returned normally: it raised nothing

    assert not broker.connections
    assert broker.admitted_per_ip.total() == 0
    await all_given_back(fds, objects, caplog, "before the broker started")


# --- 10: TLS where it does not belong, and garbage where TLS belongs ---


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello."""
    context = ssl.create_default_context()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    return hello


async def test_a_tls_client_hello_on_the_plain_port_is_refused_and_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    async with survives(broker, caplog):
        stream = await open_tcp(port_of(broker))
        write_now(stream, client_hello())
        assert_refused_or_closed(await read_until_closed(stream))
        stream = await open_tcp(port_of(broker))
        write_now(stream, client_hello())
        reset(stream)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA, tmp_path: Path) -> TlsConfig:
    server_cert = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for pem in server_cert.cert_chain_pems:
        pem.write_to_path(str(cert), append=True)
    server_cert.private_key_pem.write_to_path(str(key))
    return TlsConfig(cert=str(cert), key=str(key))


@pytest.fixture
def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def tls_broker(
    nursery: trio.Nursery, broker_config: Config, tls: TlsConfig
) -> AsyncIterator[Broker]:
    broker = await start_broker(nursery, broker_config.replace(tls=tls))
    yield broker
    broker.shutdown()
    await broker.wait_stopped()


async def garbage_then_wait(stream: trio.SocketStream, _: ssl.SSLContext) -> None:
    write_now(stream, b"\x00\xffnot TLS at all\r\n\r\n" * 20)
    await read_until_closed(stream)  # whatever the TLS layer answers, then the close


async def nothing_then_wait(stream: trio.SocketStream, _: ssl.SSLContext) -> None:
    await read_until_closed(stream)  # dropped at the handshake timeout


async def garbage_then_reset(stream: trio.SocketStream, _: ssl.SSLContext) -> None:
    write_now(stream, b"\x00\xffnot TLS at all\r\n\r\n" * 20)
    reset(stream)


async def reset_at_once(stream: trio.SocketStream, _: ssl.SSLContext) -> None:
    reset(stream)


async def client_hello_then_reset(stream: trio.SocketStream, _: ssl.SSLContext) -> None:
    write_now(stream, client_hello())
    reset(stream)


async def upgrade_request_then_reset(stream: trio.SocketStream, context: ssl.SSLContext) -> None:
    tls_stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
    with trio.fail_after(5):
        await tls_stream.send_all(UPGRADE)  # after a complete TLS handshake
    reset(stream)


TLS_ATTACKS = [
    pytest.param(garbage_then_wait, id="garbage"),
    pytest.param(garbage_then_reset, id="garbage-then-reset"),
    pytest.param(nothing_then_wait, id="nothing"),
    pytest.param(reset_at_once, id="reset-before-any-byte"),
    pytest.param(client_hello_then_reset, id="reset-mid-tls-handshake"),
    pytest.param(upgrade_request_then_reset, id="reset-after-the-upgrade-request"),
]


@pytest.mark.parametrize("attack", TLS_ATTACKS)
async def test_a_misbehaving_peer_on_the_tls_port_is_dropped_and_leaves_the_broker_serving(
    tls_broker: Broker,
    trusting: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    attack: Callable[[trio.SocketStream, ssl.SSLContext], Awaitable[None]],
) -> None:
    async with survives(tls_broker, caplog, trusting):
        stream = await open_tcp(port_of(tls_broker))
        await attack(stream, trusting)


# --- 11: requests that trip the handshake parser ---


def request_with(target: bytes = b"/", **replaced: bytes) -> bytes:
    """The valid upgrade request with ``target`` and some headers replaced (``Host=...``,
    ``Connection=...``) or added (``Sec_WebSocket_Protocol=...``)."""
    headers = {
        b"Host": b"127.0.0.1",
        b"Upgrade": b"websocket",
        b"Connection": b"Upgrade",
        b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version": b"13",
    }
    for name, value in replaced.items():
        headers[name.replace("_", "-").encode()] = value
    lines = [b"GET " + target + b" HTTP/1.1", *(k + b": " + v for k, v in headers.items())]
    return b"\r\n".join(lines) + b"\r\n\r\n"


MALFORMED = [
    pytest.param(request_with(b"//["), id="target-//["),
    pytest.param(request_with(b"//[::1/"), id="target-//[::1/"),
    pytest.param(request_with(b"/\xff"), id="target-non-ascii"),
    pytest.param(request_with(Host=b"\xff"), id="host-non-ascii"),
    pytest.param(request_with(Host=b"xn--a"), id="host-invalid-punycode"),
    pytest.param(request_with(Connection=b"Upgrade, \xff"), id="connection-non-ascii"),
    pytest.param(request_with(Sec_WebSocket_Protocol=b"pubsub.v1.json, \xff"),
                 id="subprotocol-non-ascii"),
    pytest.param(request_with(Sec_WebSocket_Extensions=b"permessage-deflate; \xff"),
                 id="extensions-non-ascii"),
    pytest.param(request_with(Sec_WebSocket_Version=b"\xff"), id="version-non-ascii"),
]  # fmt: skip


async def read_head(stream: trio.SocketStream) -> bytes:
    """What the broker answers, up to the end of its HTTP head (or until it closes)."""
    received = bytearray()
    with trio.fail_after(5):
        while b"\r\n\r\n" not in received:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            received += data
    return bytes(received)


async def close_as_a_client(stream: trio.SocketStream, answer: bytes) -> None:
    """On a connection the broker upgraded (``answer``: its 101 and anything after it), send a
    close frame: the broker serving it answers with its own, then closes."""
    ws = WebSocketProtocol(ConnectionType.CLIENT)
    await stream.send_all(ws.send(CloseConnection(code=1000)))
    ws.receive_data(answer.split(b"\r\n\r\n", 1)[1] + await read_until_closed(stream))
    assert any(isinstance(event, CloseConnection) for event in ws.events())


@pytest.mark.parametrize("request_bytes", MALFORMED)
async def test_a_malformed_upgrade_request_gets_an_answer_and_leaves_the_broker_serving(
    broker: Broker, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    async with survives(broker, caplog):
        stream = await open_tcp(port_of(broker))
        write_now(stream, request_bytes)
        answer = await read_head(stream)
        if answer.startswith(b"HTTP/1.1 101 "):
            # Let in: the broker needs neither the target (beyond ?token=) nor these header
            # bytes (tests/test_hardening.py), and then serves the connection.
            await close_as_a_client(stream, answer)
        else:
            assert_refused_or_closed(answer + await read_until_closed(stream))


def test_the_malformed_requests_differ_from_the_valid_one_only_where_named() -> None:
    assert request_with() == UPGRADE
