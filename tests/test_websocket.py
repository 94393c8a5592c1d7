"""broker.io.websocket on an in-memory stream pair, against a hand-driven wsproto client."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from broker.io.websocket import (
    ConnectionClosed,
    MessageTooBig,
    Pinger,
    PingTimeout,
    WebSocket,
    _unmasked,
    frame_header,
    read_handshake,
    xor_mask,
)
from broker.protocol.handshake import BadHandshake


class Peer:
    """The client end: a wsproto client on the other half of the stream pair."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.ws.send(event) for event in events))

    async def events(self) -> list[Event]:
        data = await self.stream.receive_some()
        self.ws.receive_data(bytes(data) or None)
        return list(self.ws.events())


async def open_pair(
    subprotocols: list[str] | None = None,
    *,
    ping_interval: float = 20.0,
    ping_timeout: float | None = None,
    sockets: bool = False,
    pinger: Pinger | None = None,
) -> tuple[WebSocket, Peer]:
    server_stream: trio.abc.Stream
    client_stream: trio.abc.Stream
    if sockets:
        server_socket, client_socket = trio.socket.socketpair()
        server_stream, client_stream = (
            trio.SocketStream(server_socket),
            trio.SocketStream(client_socket),
        )
    else:
        server_stream, client_stream = trio.testing.memory_stream_pair()
    peer = Peer(client_stream)
    await peer.send(Request(host="broker", target="/?token=t", subprotocols=subprotocols or []))
    handshake = await read_handshake(server_stream)
    assert handshake.upgrade.target == "/?token=t"
    assert handshake.upgrade.subprotocols == tuple(subprotocols or ())
    websocket = await handshake.accept(
        subprotocols[0] if subprotocols else None,
        max_message_size=1000,
        ping_interval=ping_interval,
        ping_timeout=ping_interval if ping_timeout is None else ping_timeout,
        pinger=pinger,
    )
    [accepted] = await peer.events()
    assert isinstance(accepted, AcceptConnection)
    return websocket, peer


def test_frame_header_uses_the_shortest_length_encoding() -> None:
    assert frame_header(125, text=False) == b"\x82\x7d"
    assert frame_header(126, text=True) == b"\x81\x7e\x00\x7e"
    assert frame_header(65536, text=False) == b"\x82\x7f" + (65536).to_bytes(8, "big")


async def test_reject_sends_status_headers_and_body() -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    peer = Peer(client_stream)
    await peer.send(Request(host="broker", target="/"))
    handshake = await read_handshake(server_stream)
    await handshake.reject(401, b"no token\n", [(b"WWW-Authenticate", b"Bearer")])
    events = await peer.events()
    assert isinstance(events[0], RejectConnection)
    assert events[0].status_code == 401
    assert (b"www-authenticate", b"Bearer") in events[0].headers
    assert b"".join(e.data for e in events if isinstance(e, RejectData)) == b"no token\n"


async def test_garbage_instead_of_a_handshake_is_a_bad_handshake() -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"not http at all\r\n\r\n")
    with pytest.raises(BadHandshake) as refused:
        await read_handshake(server_stream)
    assert refused.value.status == 400


async def test_a_client_gone_before_its_request_ends_is_an_eof() -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
    await client_stream.aclose()
    with pytest.raises(EOFError):
        await read_handshake(server_stream)


async def test_frames_sent_with_the_request_are_read_first() -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    peer = Peer(client_stream)
    request = peer.ws.send(Request(host="broker", target="/"))
    early = b"\x82\x85\x00\x00\x00\x00early"  # binary, masked with zeros: what a client sends
    await client_stream.send_all(request + early)
    handshake = await read_handshake(server_stream)
    websocket = await handshake.accept(
        None, max_message_size=1000, ping_interval=20, ping_timeout=20
    )
    assert await websocket.receive() == [b"early"]


async def test_one_read_returns_every_message_it_completed_in_order() -> None:
    websocket, peer = await open_pair(["pubsub.v1.json"])
    assert websocket.subprotocol == "pubsub.v1.json"
    await peer.send(BytesMessage(b"a"), TextMessage("b"), BytesMessage(b"c"))
    assert await websocket.receive() == [b"a", "b", b"c"]


async def test_a_message_in_pieces_is_joined() -> None:
    websocket, peer = await open_pair()
    await peer.send(BytesMessage(b"ab", message_finished=False), BytesMessage(b"cd"))
    assert await websocket.receive() == [b"abcd"]


async def test_send_message_is_one_frame_of_the_joined_parts() -> None:
    websocket, peer = await open_pair()
    await websocket.send_message([b"x" * 100, b"y" * 100], text=False)
    events = await peer.events()
    assert len(events) == 1
    assert isinstance(events[0], BytesMessage)
    assert events[0].data == b"x" * 100 + b"y" * 100


async def test_message_over_max_message_size_raises() -> None:
    websocket, peer = await open_pair()
    await peer.send(BytesMessage(b"x" * 1001))
    with pytest.raises(MessageTooBig):
        await websocket.receive()


async def test_pings_are_answered_and_peer_close_is_echoed() -> None:
    websocket, peer = await open_pair()
    await peer.send(Ping(b"hi"), BytesMessage(b"m"), CloseConnection(4000, "bye"))
    assert await websocket.receive() == [b"m"]  # what came before the close is returned
    with pytest.raises(ConnectionClosed) as closed:
        await websocket.receive()
    assert closed.value.code == 4000 == websocket.closed
    events = await peer.events()
    assert [type(e) for e in events] == [Pong, CloseConnection]


async def test_no_pong_is_a_ping_timeout(autojump_clock: trio.testing.MockClock) -> None:
    websocket, peer = await open_pair(ping_interval=1.0)
    with pytest.raises(PingTimeout):
        await websocket.receive()
    assert [type(e) for e in await peer.events()] == [Ping]


async def test_a_pong_left_unread_while_away_is_not_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    websocket, peer = await open_pair(ping_interval=1.0)
    await peer.send(BytesMessage(b"first"))
    assert await websocket.receive() == [b"first"]
    with trio.move_on_after(1.5):  # the ping goes out at 1 s
        await websocket.receive()
    [ping] = await peer.events()
    assert isinstance(ping, Ping)
    await peer.send(ping.response(), BytesMessage(b"later"))
    await trio.sleep(10)  # the caller is busy elsewhere, long past the ping timeout
    assert await websocket.receive() == [b"later"]


async def test_pongs_in_time_keep_the_connection_through_ping_intervals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    websocket, peer = await open_pair(ping_interval=1.0)
    received: list[bytes | str] = []

    async def read() -> None:
        received.extend(await websocket.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for _ in range(3):  # a ping each second; a missed pong would time out the second
            [ping] = await peer.events()
            assert isinstance(ping, Ping)
            await peer.send(ping.response())
        await peer.send(BytesMessage(b"still here"))
    assert received == [b"still here"]


async def test_the_pinger_pings_an_idle_socket_and_pongs_in_time_keep_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pinger = Pinger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger.run)
        websocket, peer = await open_pair(
            ping_interval=1.0, ping_timeout=5.0, sockets=True, pinger=pinger
        )
        received: list[bytes | str] = []
        done = trio.Event()

        async def read() -> None:
            received.extend(await websocket.receive())
            done.set()

        nursery.start_soon(read)
        for second in (1, 2, 3):  # a ping each second, written by the pinger
            [ping] = await peer.events()
            assert isinstance(ping, Ping)
            assert second <= trio.current_time() < second + 0.5
            await peer.send(ping.response())  # the reader reads it
        await peer.send(BytesMessage(b"still here"))
        await done.wait()
        assert len(pinger) == 1
        nursery.cancel_scope.cancel()
    assert received == [b"still here"]


async def test_the_pinger_times_out_a_reader_whose_peer_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pinger = Pinger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger.run)
        websocket, peer = await open_pair(ping_interval=1.0, sockets=True, pinger=pinger)
        with pytest.raises(PingTimeout):
            await websocket.receive()
        assert trio.current_time() < 3  # the ping at 1 s, the timeout 1 s later
        assert [type(e) for e in await peer.events()] == [Ping]
        assert len(pinger) == 0
        nursery.cancel_scope.cancel()


async def test_with_the_pinger_a_reader_away_past_the_timeout_is_not_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pinger = Pinger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger.run)
        websocket, peer = await open_pair(ping_interval=1.0, sockets=True, pinger=pinger)
        await peer.send(BytesMessage(b"first"))
        assert await websocket.receive() == [b"first"]
        await trio.sleep(10)  # the caller is busy elsewhere, long past the ping timeout
        [ping] = await peer.events()  # the pinger pinged meanwhile, once
        assert isinstance(ping, Ping)
        await peer.send(ping.response(), BytesMessage(b"later"))
        assert await websocket.receive() == [b"later"]
        nursery.cancel_scope.cancel()


async def test_a_ping_in_two_reads_and_a_ping_in_a_batch_are_both_answered() -> None:
    websocket, peer = await open_pair(sockets=True)
    ping = b"\x89\x82\x01\x02\x03\x04" + bytes((ord("h") ^ 1, ord("i") ^ 2))  # masked "hi"
    await peer.stream.send_all(ping[:3])
    await peer.stream.send_all(ping[3:] + ping + b"\x82\x81\x00\x00\x00\x00m")
    assert await websocket.receive() == [b"m"]
    assert await peer.events() == [Pong(b"hi"), Pong(b"hi")]


async def test_a_control_frame_with_a_16_bit_length_is_a_protocol_error() -> None:
    websocket, peer = await open_pair()
    await peer.stream.send_all(b"\x89\xfe\x00\x02\x00\x00\x00\x00hi")
    with pytest.raises(ConnectionClosed) as closed:
        await websocket.receive()
    assert closed.value.code == 1002


async def test_aclose_runs_the_closing_handshake_then_closes_the_stream() -> None:
    websocket, peer = await open_pair()

    async def answer() -> None:
        [close] = await peer.events()
        assert isinstance(close, CloseConnection)
        assert (close.code, close.reason) == (1001, "going")
        await peer.send(close.response())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        await websocket.aclose(1001, "going", 5.0)
    assert websocket.closed == 1001
    assert await peer.stream.receive_some() == b""


async def test_on_a_socket_messages_are_written_directly_until_the_close() -> None:
    websocket, peer = await open_pair(sockets=True)
    assert websocket.can_send_now()
    assert websocket.send_now([b"di", b"rect"], False, 6)
    await websocket.send_message([b"via ", b"send_message"], False)
    assert await peer.events() == [BytesMessage(b"direct"), BytesMessage(b"via send_message")]

    async def answer() -> None:
        [close] = await peer.events()
        assert isinstance(close, CloseConnection)
        await peer.send(close.response())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        await websocket.aclose(1000, None, 5.0)
    assert not websocket.can_send_now()  # its file descriptor number may be reused


async def test_messages_read_with_a_message_over_the_limit_are_returned_before_it() -> None:
    websocket, peer = await open_pair()
    small = b"\x82\x85\x00\x00\x00\x00small"
    big = b"\x82\xfe\x03\xe9\x00\x00\x00\x00" + b"x" * 1001  # masked, 16-bit length
    await peer.stream.send_all(small + big)
    assert await websocket.receive() == [b"small"]
    with pytest.raises(MessageTooBig):
        await websocket.receive()


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmasking_is_the_xor_with_the_repeated_key(data: bytes, key: bytes) -> None:
    expected = bytes(byte ^ key[i % 4] for i, byte in enumerate(data))
    assert xor_mask(data, key) == expected
    frame = b"\x82\xff" + key + data  # what the broker unmasks with (websockets' C loop)
    assert _unmasked(frame, 2, len(data)) == _unmasked(bytearray(frame), 2, len(data)) == expected


def fill_send_buffer(websocket: WebSocket) -> int:
    """Write empty binary frames to ``websocket``'s socket until it takes no more, as writes
    that each went out whole would: the socket is full, and no write is in progress. Returns
    how many frames went out."""
    sock = websocket.stream.socket  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = 0
    while True:
        try:
            sent = os.write(sock.fileno(), b"\x82\x00")
        except BlockingIOError:
            return frames
        assert sent == 2
        frames += 1


async def test_a_ping_a_full_socket_takes_part_of_is_finished_by_the_owner_writer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pinger = Pinger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger.run)
        websocket, peer = await open_pair(
            ping_interval=1.0, ping_timeout=5.0, sockets=True, pinger=pinger
        )
        left = trio.Event()
        websocket.wake_writer = left.set  # as a Connection's queue starts its writer
        frames = fill_send_buffer(websocket)
        await left.wait()  # the pinger's ping found the socket full
        assert websocket.sending_rest
        # Another send (a writer already at work) writes the ping's rest first, then its own;
        # the peer, reading again, gets every frame whole, the ping among them.
        nursery.start_soon(websocket.send_message, [b"after"], False)
        events: list[Event] = []
        with trio.fail_after(10):  # the ping's rest left to no one: a send waits for ever
            while BytesMessage(b"after") not in events:
                events += await peer.events()
        assert events.count(BytesMessage(b"")) == frames
        assert events[frames:] == [Ping(b""), BytesMessage(b"after")]
        await peer.send(Pong(b""), BytesMessage(b"alive"))
        assert await websocket.receive() == [b"alive"]  # its pong came: no ping timeout
        nursery.cancel_scope.cancel()


async def test_a_write_cut_off_mid_frame_is_followed_by_no_close_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    websocket, peer = await open_pair(sockets=True)
    message = bytes(1 << 20)  # more than the socket pair buffers: the write waits
    with trio.move_on_after(1):
        await websocket.send_message([message], False)
    assert websocket.closed == 1006  # part of the frame is out: the stream is unusable
    await websocket.aclose(1001, "going", 5.0)  # closes TCP at once, writing nothing more
    assert trio.current_time() < 2
    received = bytearray()
    while data := await peer.stream.receive_some():
        received += data
    whole = frame_header(len(message), text=False) + message
    assert 0 < len(received) < len(whole)
    assert received == whole[: len(received)]


async def test_behind_a_write_a_ping_flood_gets_4_pongs_and_our_ping_still_goes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pinger = Pinger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger.run)
        websocket, peer = await open_pair(
            ping_interval=1.0, ping_timeout=5.0, sockets=True, pinger=pinger
        )
        frames = fill_send_buffer(websocket)
        nursery.start_soon(websocket.send_message, [b"stuck"], False)  # a write in progress
        await peer.send(*(Ping(b"%d" % n) for n in range(6)))  # a peer flooding pings
        nursery.start_soon(websocket.receive)  # reads them: the pongs wait behind the write
        await trio.sleep(1.5)  # the pinger's ping is due at 1 s: it waits behind it too
        events: list[Event] = []
        with trio.fail_after(10):
            while Ping(b"") not in events:
                events += await peer.events()
        assert events[frames:] == [
            BytesMessage(b"stuck"),
            *(Pong(b"%d" % n) for n in range(4)),
            Ping(b""),  # it is timed: dropped, a live client would time out
        ]
        nursery.cancel_scope.cancel()
