"""A small HTTP/1.1 server for the server API: h11 parses, Trio moves the bytes.

:func:`serve_http` serves each accepted stream (TCP, or TLS) as a keep-alive connection: it
reads a request's head (h11; at most :data:`MAX_REQUEST_HEAD` bytes), hands it to the handler
with a :class:`Body` the handler reads only if it wants to, with the bound it chooses, and
sends the handler's :class:`Response` in one write. A body that was not read whole closes the
connection after the answer (``Connection: close``): nothing the handler did not ask for is
read. A connection waits at most :data:`KEEP_ALIVE` seconds for its next request head, and
a request's body and its answer each get :data:`REQUEST_TIMEOUT`.

Every failure stops at the connection: bytes that are not HTTP are answered 400 (431 for a
head too big) and the connection closed; a peer that goes away, or is too slow, is dropped;
an exception of the handler's (a bug) is logged, counted and answered 500. Beyond
:data:`MAX_CONNECTIONS` at once, a new connection is answered 503 and closed.

It measured at about a quarter of hypercorn's CPU per request on keep-alive connections
(bench/api.py), which is why the server API does not run on hypercorn as the monitor does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import trio

from broker.core.stats import BrokerStats
from broker.exceptiongroups import first_leaf
from broker.io.websocket import peer_address
from broker.protocol.handshake import MAX_REQUEST_HEAD

log = logging.getLogger("broker.api")

#: Seconds a connection may wait for its next request's head. Longer than clients keep idle
#: connections (httpx: 5 s), so that a client never sends on one the server is closing.
KEEP_ALIVE = 75.0
#: Seconds to receive a request's body, and to send an answer.
REQUEST_TIMEOUT = 10.0
#: Connections at once; one more is answered 503 and closed.
MAX_CONNECTIONS = 1024
RECEIVE_SIZE = 65536

#: What a peer that goes away, or sends what is not HTTP, raises.
PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError)


@dataclass(frozen=True, slots=True)
class Request:
    """A request's head: ``headers`` by lower-case name (the first of repeated ones)."""

    method: str
    path: str
    headers: dict[bytes, bytes]
    peer: str

    def header(self, name: bytes) -> bytes | None:
        """The value of the header ``name`` (lower case), if any."""
        return self.headers.get(name)


@dataclass(slots=True)
class Response:
    """An answer: its status, body, content type and any other headers."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class BodyTooLarge(Exception):
    """The body exceeds the bound the handler read it with."""


class Body:
    """A request's body, read on demand (:meth:`read`)."""

    def __init__(self, connection: _Connection, length: int | None) -> None:
        self._connection = connection
        self.length = length  # from Content-Length, if the request gave one

    async def read(self, limit: int) -> bytes:
        """The whole body; raises :class:`BodyTooLarge` as soon as it would exceed ``limit``
        bytes (at once if its ``Content-Length`` does), having read no more than that."""
        if self.length is not None and self.length > limit:
            raise BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        with trio.fail_after(REQUEST_TIMEOUT):
            while True:
                event = await self._connection.next_event()
                if isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                if not isinstance(event, h11.Data):
                    raise trio.BrokenResourceError(f"unexpected {event!r} in a body")
                size += len(event.data)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(bytes(event.data))


Handler = Callable[[Request, Body], Awaitable[Response]]


def error_body(code: str, message: str) -> bytes:
    """The API's error body, in JSON."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


_BUSY_BODY = error_body("unavailable", f"{MAX_CONNECTIONS} connections to the server API at once")
#: The whole answer to a connection beyond :data:`MAX_CONNECTIONS`.
BUSY = (
    b"HTTP/1.1 503 \r\ncontent-type: application/json\r\nretry-after: 5\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Connection:
    """One stream and its h11 state."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)

    async def next_event(self) -> object:
        """The next event from the peer, reading as needed (and telling a client that
        waits for ``100 Continue`` to send its body, once the body is read)."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    await self.send([h11.InformationalResponse(status_code=100, headers=[])])
                self.h11.receive_data(bytes(await self.stream.receive_some(RECEIVE_SIZE)))
            else:
                return event

    async def send(self, events: list[h11.Event]) -> None:
        """Send ``events`` in one write."""
        data = b"".join(self.h11.send(event) or b"" for event in events)
        with trio.fail_after(REQUEST_TIMEOUT):
            await self.stream.send_all(data)

    async def respond(self, response: Response) -> None:
        """Send ``response``, closing the connection after it if the request was not read
        whole."""
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            *response.headers,
        ]
        if self.h11.their_state is not h11.DONE:
            headers.append((b"connection", b"close"))
        await self.send([
            h11.Response(status_code=response.status, headers=headers,
                         reason=HTTPStatus(response.status).phrase.encode()),
            h11.Data(data=response.body),
            h11.EndOfMessage(),
        ])  # fmt: skip


async def serve_http(
    handler: Handler, listeners: list[trio.abc.Listener[trio.abc.Stream]], stats: BrokerStats
) -> None:
    """Serve ``listeners`` with ``handler`` until cancelled (see the module doc); count the
    handler's bugs in ``stats.internal_errors``."""
    connections = 0

    async def serve_stream(stream: trio.abc.Stream) -> None:
        nonlocal connections
        remote = peer_address(stream)
        peer = "unknown" if remote is None else f"{remote[0]}:{remote[1]}"
        connections += 1
        try:
            if connections > MAX_CONNECTIONS:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await stream.send_all(BUSY)
                return
            await _serve_connection(_Connection(stream), handler, peer, stats)
        except* PEER_GONE as group:
            log.debug("server API: peer=%s went away: %r", peer, first_leaf(group))
        finally:
            connections -= 1
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(serve_stream, listeners)


async def _serve_connection(
    connection: _Connection, handler: Handler, peer: str, stats: BrokerStats
) -> None:
    """Answer requests on ``connection`` until it closes (see the module doc)."""
    state = connection.h11
    while True:
        try:
            with trio.move_on_after(KEEP_ALIVE) as idle:
                event = await connection.next_event()
            if idle.cancelled_caught or not isinstance(event, h11.Request):
                return  # idle too long, or closed between requests
        except h11.RemoteProtocolError as exc:
            if state.our_state is h11.IDLE or state.our_state is h11.SEND_RESPONSE:
                answer = error_body("bad_request", f"not an HTTP/1.1 request: {exc}")
                await connection.respond(Response(exc.error_status_hint, answer))
            log.debug("server API: peer=%s sent a bad request: %s", peer, exc)
            return
        request = Request(
            event.method.decode("ascii", "replace"),
            event.target.decode("ascii", "replace").partition("?")[0],
            {name: value for name, value in reversed(event.headers)},
            peer,
        )
        length = request.header(b"content-length")
        body = Body(connection, int(length) if length is not None else None)
        try:
            response = await handler(request, body)
        except h11.RemoteProtocolError as exc:  # in the body
            log.debug("server API: peer=%s sent a bad body: %s", peer, exc)
            return
        except PEER_GONE:
            raise
        except Exception:
            stats.internal_errors += 1
            log.exception("server API: peer=%s: internal error on %s %s", peer, request.method,
                          request.path)  # fmt: skip
            response = Response(500, error_body("internal", "internal error"))
        await connection.respond(response)
        if state.our_state is not h11.DONE or state.their_state is not h11.DONE:
            return  # the body was not read whole, or the client asked to close
        state.start_next_cycle()
