"""The WebSocket opening handshake (RFC 6455 section 4), sans I/O: bytes in, a verdict out.

:class:`UpgradeReader` takes what a client sends until its HTTP upgrade request is complete
(h11 parses the HTTP) and returns the checked :class:`Upgrade`, or raises
:class:`BadHandshake` with the HTTP status to answer with. Everything a peer can put in a
request ends in one of those two: a malformed request line, bytes that are not ASCII where
RFC 6455 wants tokens, a head over :data:`MAX_REQUEST_HEAD`, HTTP/1.0, a bad
``Sec-WebSocket-Key``. Nothing here decodes ``Host`` or the target beyond what the broker
reads (the ``?token=`` query), so nothing here raises anything else.

:func:`accept_response` and :func:`error_response` build the answers. Bytes the client sent
after its request (its first WebSocket frames, written with the request) are kept in
:attr:`Upgrade.trailing` for the WebSocket layer.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs

import h11
from wsproto.utilities import generate_accept_token

#: The largest request head (request line and headers) accepted: an Authorization header with
#: a big JWT and a browser's cookies fit; more is answered with 431.
MAX_REQUEST_HEAD = 16384

_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class BadHandshake(Exception):
    """The upgrade request is refused with HTTP ``status``; ``str()`` is the reason, sent
    as the body; ``headers`` go with the answer."""

    def __init__(
        self, status: int, reason: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.headers = tuple(headers)


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A checked WebSocket upgrade request.

    ``headers`` are the request's headers with lower-case names, in order; ``subprotocols``
    the names the client offered, in its order of preference; ``trailing`` what it sent after
    the request.
    """

    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    subprotocols: tuple[str, ...]
    key: bytes
    trailing: bytes = b""

    def header(self, name: bytes) -> str | None:
        """The value of the first header called ``name`` (lower case), if any, as text
        (Latin-1, so any byte decodes)."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1").strip()
        return None

    def query(self, name: str) -> str | None:
        """The first value of ``name`` in the target's query string, if any."""
        values = parse_qs(self.target.partition("?")[2]).get(name)
        return values[0] if values else None


class UpgradeReader:
    """Reads one upgrade request; feed it with :meth:`receive` until it returns one."""

    def __init__(self, max_head: int = MAX_REQUEST_HEAD) -> None:
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self._max_head = max_head
        self._received = 0

    def receive(self, data: bytes | bytearray) -> Upgrade | None:
        """Take the next bytes (``b""`` at end of stream); the request once it is complete,
        ``None`` while more is needed. Raises :class:`BadHandshake`, or :class:`EOFError`
        at the end of the stream (a request completed earlier was returned then).

        The answer does not depend on how the bytes were split into reads: they are parsed
        at most ``max_head`` at a time, as if they had come in pieces.
        """
        if not data:
            raise EOFError
        data = bytes(data)
        for start in range(0, len(data), self._max_head):
            upgrade = self._parse(data[start : start + self._max_head])
            if upgrade is not None:
                rest = data[start + self._max_head :]
                return dataclasses.replace(upgrade, trailing=upgrade.trailing + rest)
        return None

    def _parse(self, data: bytes) -> Upgrade | None:
        self._received += len(data)
        self._http.receive_data(data)
        try:
            event = self._http.next_event()
        except h11.RemoteProtocolError as exc:
            # A head over the limit is 431, whatever else is wrong with it; h11 hints 501 for
            # a transfer coding it does not know, but any body on an upgrade is an error.
            if self._received > self._max_head:
                raise _too_large(self._max_head) from None
            raise BadHandshake(400, f"bad HTTP request: {exc}") from None
        if event is h11.NEED_DATA:
            return None
        assert isinstance(event, h11.Request), event  # the first event of a server is one
        trailing = self._http.trailing_data[0]
        if self._received - len(trailing) > self._max_head:
            raise _too_large(self._max_head)
        return check_request(event, bytes(trailing))


def _too_large(limit: int) -> BadHandshake:
    return BadHandshake(431, f"request head over {limit} bytes")


def check_request(request: h11.Request, trailing: bytes = b"") -> Upgrade:
    """Check a parsed HTTP request against RFC 6455 section 4.2.1; the :class:`Upgrade` it
    asks for, or :class:`BadHandshake`."""
    if request.method != b"GET":
        raise BadHandshake(405, "a WebSocket upgrade is a GET", [(b"Allow", b"GET")])
    if request.http_version != b"1.1":
        raise BadHandshake(400, "a WebSocket upgrade needs HTTP/1.1")
    headers = tuple((name.lower(), value) for name, value in request.headers)
    values: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        values.setdefault(name, []).append(value)
    upgrade = _tokens(values.get(b"upgrade", []))
    connection = _tokens(values.get(b"connection", []))
    if b"websocket" not in upgrade or b"upgrade" not in connection:
        raise BadHandshake(
            426,
            "this is a WebSocket endpoint: connect with a WebSocket client",
            [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
        )
    if not values.get(b"host"):
        raise BadHandshake(400, "missing Host header")
    if values.get(b"sec-websocket-version") != [b"13"]:
        raise BadHandshake(
            426, "Sec-WebSocket-Version must be 13", [(b"Sec-WebSocket-Version", b"13")]
        )
    key = values.get(b"sec-websocket-key", [])
    if len(key) != 1 or not _is_nonce(key[0]):
        raise BadHandshake(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    if b"content-length" in values or b"transfer-encoding" in values:
        raise BadHandshake(400, "a WebSocket upgrade request has no body")
    offered = _tokens(values.get(b"sec-websocket-protocol", []), lower=False)
    if not all(_is_token(name) for name in offered):
        raise BadHandshake(400, "Sec-WebSocket-Protocol must list tokens")
    return Upgrade(
        target=request.target.decode("ascii"),  # h11 accepts printable ASCII only
        headers=headers,
        subprotocols=tuple(name.decode("ascii") for name in offered),
        key=key[0].strip(),
        trailing=trailing,
    )


def _tokens(values: list[bytes], *, lower: bool = True) -> list[bytes]:
    """The comma-separated items of one header's values (lower-cased unless told not to)."""
    items = [item.strip() for value in values for item in value.split(b",")]
    return [item.lower() if lower else item for item in items if item]


def _is_token(value: bytes) -> bool:
    return bool(value) and all(byte in _TOKEN_CHARS for byte in value)


def _is_nonce(value: bytes) -> bool:
    try:
        return len(base64.b64decode(value.strip(), validate=True)) == 16
    except binascii.Error:
        return False


def accept_response(upgrade: Upgrade, subprotocol: str | None) -> bytes:
    """The ``101 Switching Protocols`` answer to ``upgrade``, choosing ``subprotocol``."""
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + generate_accept_token(upgrade.key),
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii"))
    return b"\r\n".join([*lines, b"", b""])


def error_response(status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete HTTP error answer: ``status``, ``headers``, and ``body`` as plain text; the
    connection closes after it."""
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b"Error"
    lines = [
        b"HTTP/1.1 %d %s" % (status, phrase),
        *(name + b": " + value for name, value in headers),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    return b"\r\n".join([*lines, b"", body])
