"""A WebSocket client on a bare socket (wsproto), for misbehaving peers.

Unlike a library client it does nothing behind the test's back: it does not answer pings,
does not read unless asked, can shrink its receive buffer, and can die mid-frame.
"""

from __future__ import annotations

import socket
from typing import Any

import msgpack
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    RejectConnection,
    Request,
    TextMessage,
)


class RawClient:
    """A connected, hand-driven WebSocket client."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self._partial = bytearray()

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(self.ws.send(BytesMessage(data=data)))

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def send_frames(self, *frames: Any) -> None:
        await self.send_bytes(b"".join(msgpack.packb(frame) for frame in frames))

    async def events(self) -> list[Event]:
        """Read once from the socket and return the events it completed (empty list at EOF)."""
        data = await self.stream.receive_some(65536)
        if not data:
            return [CloseConnection(code=1006)]
        self.ws.receive_data(data)
        return list(self.ws.events())

    async def read_frames(self) -> tuple[list[dict[str, Any]], int | None]:
        """Read once; return the msgpack frames of completed messages and a close code, if any."""
        frames: list[dict[str, Any]] = []
        close = None
        for event in await self.events():
            if isinstance(event, BytesMessage):
                self._partial += event.data
                if event.message_finished:
                    unpacker = msgpack.Unpacker(raw=False)
                    unpacker.feed(bytes(self._partial))
                    frames.extend(unpacker)
                    self._partial.clear()
            elif isinstance(event, CloseConnection):
                close = event.code
        return frames, close

    async def wait_close_code(self) -> int:
        """Read (and discard messages) until the broker's close frame or EOF; return its code."""
        while True:
            for event in await self.events():
                if isinstance(event, CloseConnection):
                    if event.code != 1006:  # answer the close handshake, as clients do
                        await self.stream.send_all(self.ws.send(event.response()))
                    return event.code

    async def wait_eof(self) -> None:
        """Read until the TCP connection is closed by the broker."""
        while await self.stream.receive_some(65536):
            pass


async def open_raw(
    port: int,
    subprotocols: tuple[str, ...] = (),
    *,
    receive_buffer: int | None = None,
    target: str = "/",
) -> RawClient | RejectConnection:
    """Connect and complete the handshake (asking for ``target``, e.g. ``/?token=...``);
    the rejection event if the broker refuses."""
    stream = await open_tcp(port, receive_buffer=receive_buffer)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(
        ws.send(Request(host="127.0.0.1", target=target, subprotocols=list(subprotocols)))
    )
    while True:
        data = await stream.receive_some(65536)
        assert data, "the broker closed the connection during the handshake"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return RawClient(stream, ws)
            if isinstance(event, RejectConnection):
                await stream.aclose()
                return event


async def open_tcp(port: int, *, receive_buffer: int | None = None) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port, optionally with a tiny receive buffer."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def stuck_subscriber(port: int, pattern: str, *, target: str = "/") -> RawClient:
    """Subscribe ``pattern`` on a raw socket with a tiny receive buffer, then stop reading:
    the broker's outbound queue for it really fills."""
    raw = await open_raw(port, receive_buffer=4096, target=target)
    assert isinstance(raw, RawClient)
    await raw.send_frames({"op": "sub", "id": 1, "topic": pattern})
    frames: list[dict[str, Any]] = []
    with trio.fail_after(5):
        while not frames:
            frames, _ = await raw.read_frames()
    assert frames == [{"op": "ok", "id": 1}]
    return raw
