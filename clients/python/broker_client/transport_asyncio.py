"""The client's transport under asyncio: the asyncio API of websockets (``websockets.asyncio``).

The client keeps its own keep-alive and its own backpressure, so websockets' are set to
match the Trio transport: no pings of its own (it still answers the broker's), no reading
ahead of the client (once more than one message waits unread it stops reading the socket,
and TCP pushes back on the broker), ``send`` waiting while the socket's write buffer is over
its limit (websockets' default, 32 KiB), no compression, no HTTP proxy from the environment.
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from broker_client.transport import (
    CloseInfo,
    Handshake,
    Refused,
    TransportClosed,
    Unreachable,
    closed_during_handshake,
    tls_reason,
)

#: Unread messages past which websockets stops reading the socket (trio-websocket's queue is
#: one message too), and at which it reads again: its high- and low-water marks.
READ_AHEAD = (1, 0)


class AsyncioTransport:
    """A :class:`~broker_client.transport.Transport` on a websockets connection."""

    def __init__(self, websocket: ClientConnection) -> None:
        self._websocket = websocket

    @property
    def closed(self) -> CloseInfo | None:
        """``None`` while open; the close code and reason once closed."""
        code = self._websocket.close_code
        return None if code is None else CloseInfo(code, self._websocket.close_reason or "")

    async def send(self, message: bytes | str) -> None:
        """Send one message."""
        try:
            await self._websocket.send(message)
        except ConnectionClosed:
            raise TransportClosed from None

    async def receive(self) -> bytes | str:
        """The next message."""
        try:
            return await self._websocket.recv()
        except ConnectionClosed:
            raise TransportClosed from None

    async def ping(self) -> None:
        """Ping; return with the pong."""
        try:
            await (await self._websocket.ping())
        except ConnectionClosed:
            raise TransportClosed from None

    async def aclose(self) -> None:
        """Close with 1000 and wait for the peer's close."""
        await self._websocket.close()


@asynccontextmanager
async def open_asyncio_transport(handshake: Handshake) -> AsyncIterator[AsyncioTransport]:
    """Connect with websockets; see :func:`broker_client.transport.open_transport`."""
    timeout = handshake.connect_timeout
    try:
        websocket = await connect(
            handshake.endpoint.url,
            subprotocols=[Subprotocol(name) for name in handshake.subprotocols],
            additional_headers=list(handshake.headers),
            ssl=handshake.ssl_context if handshake.endpoint.tls else None,
            open_timeout=timeout,
            close_timeout=timeout,
            ping_interval=None,
            ping_timeout=None,
            max_size=handshake.max_message_size,
            max_queue=READ_AHEAD,
            compression=None,
            proxy=None,
        )
    except InvalidStatus as refused:
        response = refused.response
        raise Refused(
            response.status_code, list(response.headers.raw_items()), bytes(response.body)
        ) from None
    except TimeoutError:
        raise Unreachable(f"no handshake within {timeout} s") from None
    except ssl.SSLError as exc:
        raise Unreachable(tls_reason(exc)) from None
    except OSError as exc:
        raise Unreachable(_os_reason(exc)) from None
    except InvalidHandshake as exc:  # a response that is not HTTP, or none at all
        closed = isinstance(exc.__cause__, EOFError)
        raise Unreachable(closed_during_handshake(handshake) if closed else str(exc)) from None
    try:
        yield AsyncioTransport(websocket)
    finally:
        websocket.transport.abort()  # what is not closed yet is dropped at once


def _os_reason(exc: OSError) -> str:
    """Why, as "Connection refused", rather than asyncio's "Connect call failed (address)"."""
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)  # a name that does not resolve, several addresses failed
