"""The client's transport under Trio: trio-websocket over a Trio stream the client opens itself.

trio-websocket runs a reader task per connection; it lives in a nursery of this transport's
own, for as long as the ``async with``. The client makes the TCP connection and the TLS
handshake itself, so that a certificate it does not trust fails at once, and wakes the
WebSocket handshake when that reader returns early (trio-websocket issue #199: a peer that
closes during the handshake would otherwise hang it until the timeout).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from broker_client.endpoints import Endpoint
from broker_client.transport import (
    CloseInfo,
    Handshake,
    Refused,
    TransportClosed,
    Unreachable,
    closed_during_handshake,
    tls_reason,
)

HANDSHAKE_ERRORS = (OSError, HandshakeError, trio.TooSlowError, trio.BrokenResourceError)


class TrioTransport:
    """A :class:`~broker_client.transport.Transport` on a trio-websocket connection."""

    def __init__(self, websocket: WebSocketConnection) -> None:
        self._websocket = websocket

    @property
    def closed(self) -> CloseInfo | None:
        """``None`` while open; the close code and reason once closed."""
        reason = self._websocket.closed
        return None if reason is None else CloseInfo(reason.code, reason.reason or "")

    async def send(self, message: bytes | str) -> None:
        """Send one message."""
        try:
            await self._websocket.send_message(message)
        except ConnectionClosed:
            raise TransportClosed from None

    async def receive(self) -> bytes | str:
        """The next message."""
        try:
            return await self._websocket.get_message()
        except ConnectionClosed:
            raise TransportClosed from None

    async def ping(self) -> None:
        """Ping; return with the pong."""
        try:
            await self._websocket.ping()
        except ConnectionClosed:
            raise TransportClosed from None

    async def aclose(self) -> None:
        """Close with 1000 and wait for the peer's close."""
        await self._websocket.aclose()


@asynccontextmanager
async def open_trio_transport(handshake: Handshake) -> AsyncIterator[TrioTransport]:
    """Connect with trio-websocket; see :func:`broker_client.transport.open_transport`."""
    endpoint = handshake.endpoint
    websocket: WebSocketConnection | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(handshake.connect_timeout):
                stream = await _open_stream(endpoint, handshake.ssl_context)
                with trio.CancelScope() as upgrade:
                    websocket = await wrap_client_stream(
                        cast(trio.Nursery, _OnReturn(nursery, upgrade.cancel)),
                        stream,
                        endpoint.host_header,
                        endpoint.resource,
                        subprotocols=handshake.subprotocols,
                        extra_headers=[(k.encode(), v.encode()) for k, v in handshake.headers],
                        max_message_size=handshake.max_message_size,
                    )
            if websocket is None:  # the reader returned: the peer closed
                await trio.aclose_forcefully(stream)
                raise Unreachable(closed_during_handshake(handshake))
            try:
                yield TrioTransport(websocket)
            finally:
                with trio.move_on_after(0):  # what is not closed yet is dropped at once
                    await websocket.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # trio-websocket raises a rejection from its reader task, hence the group
        failed, rest = group.split((*HANDSHAKE_ERRORS, Unreachable))
        if websocket is not None or rest is not None or failed is None:
            raise
        raise _handshake_failure(_first_leaf(failed), handshake.connect_timeout) from None


async def _open_stream(
    endpoint: Endpoint, ssl_context: ssl.SSLContext | None
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    if not endpoint.tls:
        return await trio.open_tcp_stream(endpoint.host, endpoint.port)
    assert ssl_context is not None
    stream = await trio.open_ssl_over_tcp_stream(
        endpoint.host, endpoint.port, ssl_context=ssl_context, https_compatible=True
    )
    try:  # here: a failure in trio-websocket's reader hangs (trio-websocket issue #199)
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


def _handshake_failure(exc: BaseException, timeout: float) -> Exception:
    """The :class:`Refused` or :class:`Unreachable` for what stopped a handshake."""
    if isinstance(exc, ConnectionRejected):
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in exc.headers or ()]
        return Refused(exc.status_code, headers, exc.body or b"")
    if isinstance(exc, Unreachable):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return Unreachable(f"no handshake within {timeout} s")
    if isinstance(exc, OSError):
        return Unreachable(_os_reason(exc))
    if isinstance(exc, trio.BrokenResourceError):
        return Unreachable(tls_reason(exc.__cause__ or exc.__context__))
    return Unreachable(str(exc) or type(exc).__name__)


def _os_reason(exc: OSError) -> str:
    """The useful part of a connect error: trio wraps each address's error in a group."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return exc.strerror or str(exc)


class _OnReturn:
    """Starts tasks in ``nursery`` and calls ``then()`` when one returns (not if it raises)."""

    def __init__(self, nursery: trio.Nursery, then: Callable[[], None]) -> None:
        self._nursery, self._then = nursery, then

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        async def run() -> None:
            await fn(*args)
            self._then()

        self._nursery.start_soon(run)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
