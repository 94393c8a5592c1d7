"""A WebSocket server a test scripts, for what the real broker does not do (or not on cue):
refuse with a given status and body, accept and stay silent, hang up, stop reading.

It runs on anyio and wsproto, so the same test drives it under asyncio and under Trio. Each
connection is handed to the test's handler as a :class:`Request`, to :meth:`~Request.accept`
or :meth:`~Request.reject`; the connection ends when the handler returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.events import Request as Upgrade


class Peer:
    """The client's side of one connection, as the server sees it."""

    def __init__(self, stream: anyio.abc.ByteStream, ws: WSConnection) -> None:
        self._stream, self._ws = stream, ws
        self._events: list[Event] = []

    async def next_event(self) -> Event:
        """The next event from the client; raises ``anyio.EndOfStream`` at the end of TCP."""
        while not self._events:
            self._ws.receive_data(await self._stream.receive())
            self._events.extend(self._ws.events())
        return self._events.pop(0)

    async def get_message(self) -> bytes | str:
        """The next whole message (pings answered on the way); ``anyio.EndOfStream`` once the
        client closed."""
        text, data = "", b""
        while True:
            event = await self.next_event()
            if isinstance(event, Ping):
                await self._stream.send(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                await self._stream.send(self._ws.send(event.response()))
                raise anyio.EndOfStream
            elif isinstance(event, TextMessage):
                text += event.data
                if event.message_finished:
                    return text
            elif isinstance(event, BytesMessage):
                data += event.data
                if event.message_finished:
                    return data

    async def send_message(self, message: bytes | str) -> None:
        """Send one message."""
        event = TextMessage(message) if isinstance(message, str) else BytesMessage(message)
        await self._stream.send(self._ws.send(event))

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame, and wait (up to a second) for the client's."""
        await self._stream.send(self._ws.send(CloseConnection(code, reason)))
        with anyio.move_on_after(1), contextlib.suppress(anyio.EndOfStream):
            while not isinstance(await self.next_event(), CloseConnection):
                pass


class Request:
    """An opening handshake: its ``headers`` (names in lower case) and ``subprotocols``."""

    def __init__(self, stream: anyio.abc.ByteStream, ws: WSConnection, upgrade: Upgrade) -> None:
        self._stream, self._ws = stream, ws
        self.headers: list[tuple[bytes, bytes]] = [
            (bytes(name).lower(), bytes(value)) for name, value in upgrade.extra_headers
        ]
        self.subprotocols = list(upgrade.subprotocols)

    async def accept(self, subprotocol: str | None = None) -> Peer:
        """Answer 101 with ``subprotocol``; the open connection."""
        await self._stream.send(self._ws.send(AcceptConnection(subprotocol=subprotocol)))
        return Peer(self._stream, self._ws)

    async def reject(
        self, status: int, *, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Answer with HTTP ``status``, ``headers`` and ``body`` instead of 101."""
        length = [(b"content-length", str(len(body)).encode())]
        refusal = RejectConnection(status, [*(headers or []), *length], has_body=True)
        await self._stream.send(self._ws.send(refusal) + self._ws.send(RejectData(body)))


Handler = Callable[[Request], Awaitable[None]]


async def serve_fake(
    handler: Handler, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Listen on 127.0.0.1 and a free port, report the ``ws://`` URL as started, and run
    ``handler`` for each connection until cancelled."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            ws = WSConnection(ConnectionType.SERVER)
            try:
                while True:
                    ws.receive_data(await stream.receive())
                    upgrade = next((e for e in ws.events() if isinstance(e, Upgrade)), None)
                    if upgrade is not None:
                        break
                await handler(Request(stream, ws, upgrade))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the client went away

    async with listener:
        task_status.started(f"ws://127.0.0.1:{port}/")
        await listener.serve(serve)


async def start_fake(task_group: anyio.abc.TaskGroup, handler: Handler) -> str:
    """Start :func:`serve_fake` in ``task_group``; its URL."""
    url: str = await task_group.start(serve_fake, handler)
    return url
