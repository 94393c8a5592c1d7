"""The WebSocket under the client: one small interface, one implementation per event loop.

:func:`open_transport` makes the opening handshake with what the client asks for (a
:class:`Handshake`: subprotocols, headers, TLS context, a timeout, the largest message it
takes) and yields a
:class:`Transport`: messages out and in, a ping that returns with its pong, an orderly close,
and once closed the close code and reason. Under Trio it is trio-websocket
(:mod:`broker_client.transport_trio`), under asyncio the asyncio API of websockets
(:mod:`broker_client.transport_asyncio`); the running loop decides. A handshake that fails
raises :class:`Refused` (the server answered with an HTTP error) or :class:`Unreachable`
(why there is no connection); a connection that is closed raises :class:`TransportClosed`.
Leaving the ``async with`` releases the socket at once, closed or not.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import sniffio

from broker_client.endpoints import Endpoint


class Refused(Exception):
    """The server answered the opening handshake with HTTP ``status`` instead of 101."""

    def __init__(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        """The value of the response's header ``name`` (any case), if it has one."""
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


class Unreachable(Exception):
    """No connection: unreachable, TLS failed, timed out, or closed during the handshake.

    ``str()`` says which, in a few words.
    """


class TransportClosed(Exception):
    """The connection is closed (by either side, or lost); :attr:`Transport.closed` says how."""


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How a connection closed: the close frame's ``code`` and ``reason`` (1006 and ``""``
    when it ended without one)."""

    code: int
    reason: str


class Transport(Protocol):
    """An open WebSocket connection to the broker."""

    @property
    def closed(self) -> CloseInfo | None:
        """``None`` while open; how it closed, once closed."""
        ...

    async def send(self, message: bytes | str) -> None:
        """Send one message (binary or text); waits while the socket's buffer is full.
        Raises :class:`TransportClosed`."""
        ...

    async def receive(self) -> bytes | str:
        """The next message; raises :class:`TransportClosed` after the last."""
        ...

    async def ping(self) -> None:
        """Send a ping and return when its pong comes; raises :class:`TransportClosed`."""
        ...

    async def aclose(self) -> None:
        """The closing handshake with code 1000 (bound it with a timeout: the peer may not
        answer)."""
        ...


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the client asks for when it connects to ``endpoint``: its ``subprotocols`` and
    extra ``headers``, the TLS context for ``wss://``, the seconds the TCP connection, TLS and
    the opening handshake may take together, and the largest message it takes."""

    endpoint: Endpoint
    subprotocols: Sequence[str]
    headers: Sequence[tuple[str, str]]
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    max_message_size: int


def open_transport(handshake: Handshake) -> AbstractAsyncContextManager[Transport]:
    """Connect as ``handshake`` says, on the running event loop's implementation; yield the
    connection. Raises :class:`Refused` or :class:`Unreachable` if there is none."""
    if sniffio.current_async_library() == "trio":
        from broker_client.transport_trio import open_trio_transport

        return open_trio_transport(handshake)
    from broker_client.transport_asyncio import open_asyncio_transport

    return open_asyncio_transport(handshake)


def verifying_context(ca_file: str | None) -> ssl.SSLContext:
    """A TLS context that verifies servers against the CAs in ``ca_file`` (PEM), or the
    system's; :class:`ValueError` saying why when ``ca_file`` is missing or holds no CA."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise ValueError(f"CA file {ca_file}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"CA file {ca_file}: not a readable PEM certificate ({exc})") from None


def closed_during_handshake(handshake: Handshake) -> str:
    """Why there is no connection when the server closed before answering the upgrade: over
    ``ws://``, most often a ``wss://`` broker that took the request for a bad TLS hello."""
    if handshake.ssl_context is None:
        return "closed during the handshake (if the broker serves TLS, the URL is wss://)"
    return "closed during the handshake"


def tls_reason(exc: BaseException | None) -> str:
    """What broke a TLS handshake, given the TLS error (or what caused it): a certificate the
    client does not trust, most often."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message} (see ca_file)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return "the connection closed during the handshake"
