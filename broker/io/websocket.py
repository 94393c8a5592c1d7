"""The server side of WebSocket (RFC 6455): sans-IO ``wsproto`` driven over a Trio stream.

Our own thin layer instead of trio-websocket, for throughput (bench/README.md has the
numbers): no background task and no message channel per connection, so

- :meth:`WebSocket.receive` returns *every* message one read from the socket completed, and
  the caller executes them all before anything else runs: batches grow under load;
- :meth:`WebSocket.send_message` writes one message (its header built here, its frames
  joined once) with one ``send_all``, directly from the calling task;
- the keep-alive pings after ``ping_interval`` and gives up after ``ping_timeout`` without
  a pong. On a plain TCP socket one broker-wide :class:`Pinger` task writes every ping
  itself and wakes a reader only to time it out, so an idle connection's reader sleeps
  through its pings (it wakes for the pong alone) and waits without a cancel scope;
  otherwise (TLS, or no pinger) :meth:`WebSocket.receive`'s own deadline pings. Either way
  a connection whose reader is held back (a publish waiting under ``block``) does not
  time out meanwhile.

:func:`read_handshake` reads the HTTP upgrade; :meth:`Handshake.accept` or
:meth:`Handshake.reject` answers it. Pings are answered from :meth:`WebSocket.receive`; a send
started while another is in progress is appended to it instead of interleaving.
"""

from __future__ import annotations

import heapq
import math
import os
import struct
from collections.abc import Callable, Sequence

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from broker.protocol.handshake import Upgrade, UpgradeReader, accept_response, error_response

RECEIVE_SIZE = 1048576
HANDSHAKE_RECEIVE_SIZE = 65536  # a request head is at most MAX_REQUEST_HEAD
_OPEN, _REMOTE_CLOSING = ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING
_STREAM_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
_HEADER_16 = struct.Struct("!BBH").pack  # a data frame's header, 16-bit length
_PING = b"\x89\x00"  # a final, empty, unmasked ping frame


class ConnectionClosed(Exception):
    """The WebSocket is closed: by the peer's close frame (its ``code``), or 1006 (no frame)."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class MessageTooBig(Exception):
    """The peer sent a message over ``max_message_size``; close the connection with 1009."""


class PingTimeout(Exception):
    """No pong came within ``ping_timeout`` of a ping."""


def peer_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The remote (host, port) of a socket stream, or of the socket under a TLS stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        try:
            address = stream.socket.getpeername()
        except OSError:  # already disconnected
            return None
        return str(address[0]), int(address[1])
    return None


def frame_header(length: int, text: bool) -> bytes:
    """The header of one unmasked, final data frame (the server never masks, RFC 6455 5.1)."""
    first = 0x81 if text else 0x82
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _HEADER_16(first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


class Handshake:
    """A client's checked upgrade request on ``stream``, waiting for :meth:`accept` or
    :meth:`reject`."""

    __slots__ = ("stream", "upgrade")

    def __init__(self, stream: trio.abc.Stream, upgrade: Upgrade) -> None:
        self.stream = stream
        self.upgrade = upgrade

    async def reject(
        self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer with HTTP ``status`` and a ``body``; the caller then closes the stream."""
        await self.stream.send_all(error_response(status, body, headers))

    async def accept(
        self,
        subprotocol: str | None,
        *,
        max_message_size: int,
        ping_interval: float,
        ping_timeout: float,
        pinger: Pinger | None = None,
    ) -> WebSocket:
        """Complete the upgrade choosing ``subprotocol``; return the open WebSocket, which
        reads first what the client sent right behind its request (and is pinged by
        ``pinger`` if it is on a plain TCP socket)."""
        # The open connection needs none of the request: drop it (~0.9 KiB per connection).
        upgrade, self.upgrade = self.upgrade, _ACCEPTED
        websocket = WebSocket(
            self.stream,
            subprotocol,
            max_message_size,
            ping_interval,
            ping_timeout,
            upgrade.trailing,
        )
        await websocket.send_raw(accept_response(upgrade, subprotocol))
        if pinger is not None and websocket._fd >= 0:
            websocket._pinger = pinger
            pinger.add(websocket, websocket._timer_at)
        return websocket


_ACCEPTED = Upgrade("", (), (), b"")  # what a Handshake holds once accepted


async def read_handshake(stream: trio.abc.Stream) -> Handshake:
    """Read a WebSocket upgrade request (bound it with the handshake timeout). Raises
    :class:`~broker.protocol.handshake.BadHandshake` for a request to refuse (answer it), and
    :class:`EOFError` or a trio stream error if the client went away."""
    reader = UpgradeReader()
    while True:
        upgrade = reader.receive(await stream.receive_some(HANDSHAKE_RECEIVE_SIZE))
        if upgrade is not None:
            return Handshake(stream, upgrade)


class WebSocket:
    """An open server-side WebSocket on ``stream`` (see the module doc).

    ``closed`` is ``None`` while open, then the close code that ended it (1006 also once a
    write was cut off in the middle of a frame: no frame, not even a close, may follow it).
    ``wake_writer``, if set, is called when the :class:`Pinger`'s ping leaves the rest of a
    write (the socket took part of it): the owner has :meth:`finish_send` run.
    """

    __slots__ = (
        "_conn",
        "_fast",
        "_fd",
        "_held",
        "_idle",
        "_leftover",
        "_max_message_size",
        "_need",
        "_partial",
        "_partial_size",
        "_pending",
        "_ping_interval",
        "_ping_outstanding",
        "_ping_timeout",
        "_pinger",
        "_reading",
        "_sending",
        "_socket",
        "_timed_out",
        "_timer_at",
        "_too_big",
        "_trailing",
        "closed",
        "stream",
        "subprotocol",
        "wake_writer",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        subprotocol: str | None,
        max_message_size: int,
        ping_interval: float,
        ping_timeout: float,
        trailing: bytes = b"",
    ) -> None:
        self.stream = stream
        self._trailing = trailing  # received behind the upgrade request: read first
        self._too_big = False  # a message over max_message_size came after those returned
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._fd = -1 if self._socket is None else self._socket.fileno()  # for send_now
        self.subprotocol = subprotocol
        self.closed: int | None = None
        self._conn: Connection | None = None  # wsproto, made by the first frame it must read
        self._max_message_size = max_message_size
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._timer_at = trio.current_time() + ping_interval
        self._ping_outstanding = False
        self._pinger: Pinger | None = None  # pings this WebSocket, if set (see Pinger)
        self._reading = False  # in receive(): a ping timeout counts only then
        self._timed_out = False  # the pinger found no pong within ping_timeout
        self._partial: list[bytes | bytearray | str] | None = None  # a fragmented message
        self._partial_size = 0
        self._fast = True  # whole frames are ours to split (see _process)
        self._held = bytearray()  # the start of a frame a later read completes
        self._need = 0  # how long _held must grow before it is worth parsing again
        self._sending = False
        self._idle: trio.Event | None = None  # set when a write in progress ends
        self._pending: list[bytes] | None = None  # control frames behind a write
        self._leftover: memoryview | None = None  # the unsent rest of a send_now
        self.wake_writer: Callable[[], None] | None = None

    # --- sending ---

    async def send_raw(self, data: bytes, *, control: bool = False) -> None:
        """Write ``data`` with one ``send_all``.

        A ``control`` frame (pong, ping, close reply) sent while a write is in progress goes
        right after that write instead of waiting (at most a few: a peer flooding pings but
        not reading gets no more); anything else waits for the write in progress to end.
        """
        while self._sending:
            if control:
                self._hold_control(data)
                return
            if self._leftover is not None:  # no task is writing it (a ping's rest, say)
                await self.finish_send()
                continue
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
        self._sending = True
        await self._write(data)

    async def _write(self, data: bytes | memoryview) -> None:
        """``data`` and the control frames queued behind it; the caller set ``_sending``."""
        try:
            await self._send_all(data)
            while self._pending:
                data = b"".join(self._pending)
                self._pending = None
                await self._send_all(data)
        except (OSError, *_STREAM_GONE):
            self._gone()
            raise ConnectionClosed(1006) from None
        except trio.Cancelled:
            self._gone()  # a frame may be cut short: nothing may follow it (not even a close)
            raise
        finally:
            self._sending = False
            if self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _send_all(self, data: bytes | memoryview) -> None:
        # On a plain TCP stream, the socket's own send: SocketStream.send_all adds a conflict
        # detector, an error-translating context manager and a memoryview to every write.
        sock = self._socket
        if sock is None:
            await self.stream.send_all(data)
            return
        sent = await sock.send(data)
        if sent < len(data):
            await self.stream.send_all(memoryview(data)[sent:])

    def can_send_now(self) -> bool:
        """Whether :meth:`send_now` may write: a plain TCP socket, open, no write in progress."""
        return (
            self._fd >= 0
            and not self._sending
            and self.closed is None
            and (self._conn is None or self._conn.state is _OPEN)
        )

    def send_now(self, parts: Sequence[bytes | memoryview], text: bool, length: int) -> bool:
        """Write the message ``parts`` (``length`` bytes) without waiting, after
        :meth:`can_send_now`. True if it all went out (or the socket is gone); False if the
        socket took only part: the rest is a write in progress until :meth:`finish_send`.
        """
        return self._write_now(b"".join([frame_header(length, text), *parts]))

    def _write_now(self, data: bytes) -> bool:
        """Write ``data`` without waiting. True if it all went out (or the socket is gone);
        False if the socket took only part: the rest is a write in progress."""
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._gone()
            return True
        if sent == len(data):
            return True
        self._sending = True
        self._leftover = memoryview(data)[sent:]
        return False

    @property
    def sending_rest(self) -> bool:
        """Whether a :meth:`send_now` left bytes for :meth:`finish_send`."""
        return self._leftover is not None

    async def finish_send(self) -> None:
        """Write what :meth:`send_now` could not (raises :exc:`ConnectionClosed`)."""
        data, self._leftover = self._leftover, None
        if data is not None:
            await self._write(data)

    async def send_message(
        self, parts: Sequence[bytes | memoryview], text: bool, length: int | None = None
    ) -> None:
        """Send the concatenation of ``parts`` (``length`` bytes, if known) as one message
        (UTF-8 text if ``text``)."""
        if self.closed is not None or (self._conn is not None and self._conn.state is not _OPEN):
            raise ConnectionClosed(self.closed if self.closed is not None else 1006)
        if length is None:
            length = sum(map(len, parts))
        if self.can_send_now():  # a plain TCP socket: try the write without the scheduler
            if not self.send_now(parts, text, length):
                await self.finish_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        await self.send_raw(b"".join([frame_header(length, text), *parts]))

    # --- receiving ---

    async def receive(self) -> list[bytes] | list[str]:
        """Wait for the next read that completes messages; return them all, in order.

        Answers pings and runs the keep-alive meanwhile. Raises :class:`ConnectionClosed`
        once the peer closed (after returning the messages that came before its close),
        :class:`MessageTooBig` or :class:`PingTimeout`. Time spent away from this method
        (say, a publish held back under ``block``) does not count against the peer: its pong
        may be sitting unread, so an overdue pong gets another ``ping_timeout``.
        """
        if self._too_big:
            raise MessageTooBig
        now = trio.current_time()
        if self._ping_outstanding and now >= self._timer_at:
            self._timer_at = now + self._ping_timeout
        drained = False  # the last read took all there was and completed no message
        while True:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            data: bytes | bytearray | None = self._trailing
            if data:
                self._trailing = b""
            elif self._pinger is not None:  # it pings us, and wakes us only to time out
                self._reading = True
                try:
                    data = await self._receive_some(drained)
                finally:
                    self._reading = False
            else:
                data = None
                with trio.move_on_at(self._timer_at):
                    data = await self._receive_some(drained)
            if data is None:
                await self._keepalive()
                continue
            if not data:
                self._gone()
                raise ConnectionClosed(1006)
            messages = await self._process(data)
            if messages:
                return messages
            # Nothing held: the read ended between frames (a pong), not inside a message
            # whose rest is likely there already.
            drained = len(data) < RECEIVE_SIZE and not self._held and self._partial is None

    async def _receive_some(self, drained: bool = False) -> bytes | bytearray:
        """One read from the socket: ``b""`` once the peer or the socket is gone.

        On a plain TCP socket, read(2) itself, waiting with ``wait_readable`` when there is
        nothing yet, as ``SocketStream.receive_some`` does under its conflict detector and
        error translation: an idle connection waits here with three fewer coroutine frames
        and context managers (~1.5 KiB per connection), and a read costs fewer calls. After
        a read that took all there was and ended between frames (``drained``: a pong, say)
        it waits first: the read would fail (an idle connection's pong cost two reads, one
        failing, ~10 % of its CPU).
        """
        fd = self._fd
        if fd < 0:
            try:
                return await self.stream.receive_some(RECEIVE_SIZE)
            except _STREAM_GONE:
                return b""
        if self._timed_out:
            raise PingTimeout
        if not drained:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                pass
            except OSError:
                return b""
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()  # a read is a checkpoint
                return data
        while True:
            if self._timed_out:
                raise PingTimeout
            try:
                await trio.lowlevel.wait_readable(fd)
                return os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                pass
            except _STREAM_GONE:
                if self._timed_out:  # the pinger's wake-up (Pinger.visit)
                    raise PingTimeout from None
                return b""
            except OSError:
                return b""

    def _ping_due(self, now: float) -> float | None:
        """The :class:`Pinger` calls this at ``_timer_at`` (or later): ping, or time out.
        Returns when to be called next, or ``None`` once the pinger is done with us."""
        if self._timer_at > now:  # a pong (or the reader's return) moved the timer
            return self._timer_at
        if self.closed is not None or self._fd < 0:
            return None
        if not self._ping_outstanding:
            if self._conn is not None and self._conn.state is not _OPEN:
                return None  # closing
            self._send_control_now(_PING)
            self._ping_outstanding = True
            self._timer_at = now + self._ping_timeout
            return self._timer_at
        if not self._reading:  # held back: the timeout counts when it reads again
            return now + self._ping_timeout
        self._timed_out = True
        trio.lowlevel.notify_closing(self._fd)  # wakes the reader: it raises PingTimeout
        return None

    def _send_control_now(self, data: bytes) -> None:
        """Write a control frame without waiting: behind the write in progress if there is
        one (as :meth:`send_raw` does), else at once; what the socket does not take is the
        rest of a write in progress, which the next send finishes (:meth:`finish_send`)."""
        if self._sending:
            self._hold_control(data)
        elif not self._write_now(data) and self.wake_writer is not None:
            self.wake_writer()  # the socket took part: the rest waits for a writer

    def _hold_control(self, data: bytes) -> None:
        """Queue a control frame behind the write in progress (at most 4 pongs: a peer
        flooding pings but not reading gets no more; our own ping always, as it is timed)."""
        if self._pending is None:
            self._pending = [data]
        elif len(self._pending) < 4 or data == _PING:
            self._pending.append(data)

    async def _keepalive(self) -> None:
        if self._ping_outstanding:
            raise PingTimeout
        self._ping_outstanding = True
        self._timer_at = trio.current_time() + self._ping_timeout
        conn = self._conn
        await self.send_raw(_PING if conn is None else conn.send(Ping()), control=True)

    async def _process(self, data: bytes | bytearray) -> list[bytes] | list[str]:
        """The messages ``data`` completes, in order.

        An ordinary frame (a whole message in one frame: FIN, masked, binary or valid UTF-8
        text, no extension bits, its length in the fewest bytes and within
        ``max_message_size``) is unmasked here once it is whole; until then its start is
        held. Every other frame goes through wsproto, which keeps the protocol's state
        (fragments, control frames, closing, errors): whole, or, if it is not, with
        everything after it, since wsproto then holds part of a frame.
        """
        done: list[bytes | str] = []
        if not self._fast:
            await self._through_wsproto(data, done)
            return done  # type: ignore[return-value]
        if self._held:
            self._held += data
            if len(self._held) < self._need:
                return done  # type: ignore[return-value]
            data, self._held = self._held, bytearray()
        end = len(data)
        pos = 0
        while pos < end:
            first = data[pos]
            second = data[pos + 1] if end - pos > 1 else 0
            length = second & 0x7F
            at = pos + 2 if length < 126 else pos + 4 if length == 126 else pos + 10
            if at > end:
                self._held, self._need = bytearray(data[pos:]), at - pos
                break
            if length == 126:
                length = (data[pos + 2] << 8) | data[pos + 3]
                minimal = length >= 126
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : at], "big")
                minimal = 65536 <= length < 1 << 63
            else:
                minimal = True
            masked = second & 0x80
            stop = at + 4 + length if masked else at + length
            if (
                masked
                and (first == 0x8A or first == 0x89)
                and at == pos + 2  # 7-bit length: at most 125 bytes
                and self._partial is None
                and (self._conn is None or self._conn.state is _OPEN)
            ):  # a pong (the keep-alive's answer) or a ping, whole in one frame
                if stop > end:
                    self._held, self._need = bytearray(data[pos:]), stop - pos
                    break
                if first == 0x8A:
                    self._pong()
                else:
                    payload = _unmasked(data, at, length)
                    await self.send_raw(b"\x8a" + bytes((length,)) + payload, control=True)
                pos = stop
                continue
            if (
                masked
                and (first == 0x82 or first == 0x81)
                and minimal
                and length <= self._max_message_size
                and self._partial is None
                and (self._conn is None or self._conn.state is _OPEN)
            ):
                if stop > end:
                    self._held, self._need = bytearray(data[pos:]), stop - pos
                    break
                payload = _unmasked(data, at, length)
                if first == 0x82:
                    done.append(payload)
                    pos = stop
                    continue
                try:
                    done.append(payload.decode())
                    pos = stop
                    continue
                except UnicodeDecodeError:
                    pass  # wsproto closes with 1007
            if stop > end:
                self._fast = False
                await self._through_wsproto(data[pos:], done)
                break
            closed = await self._through_wsproto(data[pos:stop], done)
            pos = stop
            if closed or self._too_big:
                break
        return done  # type: ignore[return-value]

    def _pong(self) -> None:
        self._ping_outstanding = False
        self._timer_at = trio.current_time() + self._ping_interval
        if self._pinger is not None:  # the next ping comes before the timeout would have
            self._pinger.add(self, self._timer_at)

    async def _through_wsproto(self, data: bytes | bytearray, done: list[bytes | str]) -> bool:
        """Have wsproto read ``data``, adding the messages it completes to ``done``; True
        once the peer closed."""
        conn = self._wsproto()
        conn.receive_data(bytes(data) if isinstance(data, bytearray) else data)
        for event in conn.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                piece: bytes | bytearray | str = event.data
                self._partial_size += len(piece)
                if self._partial_size > self._max_message_size:
                    if not done:
                        raise MessageTooBig
                    self._too_big = True  # the messages before it first; then the close
                    break
                partial = self._partial
                if not event.message_finished:
                    if partial is None:
                        partial = self._partial = []
                    partial.append(piece)
                    continue
                if partial is not None:
                    partial.append(piece)
                    piece = "".join(partial) if isinstance(piece, str) else b"".join(partial)  # type: ignore[arg-type]
                    self._partial = None
                done.append(bytes(piece) if isinstance(piece, bytearray) else piece)
                self._partial_size = 0
            elif isinstance(event, Ping):
                await self.send_raw(conn.send(event.response()), control=True)
            elif isinstance(event, Pong):
                self._pong()
            elif isinstance(event, CloseConnection):
                await self._peer_closed(event)
                return True
        return False

    async def _peer_closed(self, event: CloseConnection) -> None:
        conn = self._wsproto()
        state = conn.state
        self.closed = event.code
        if self._pinger is not None:
            self._pinger.discard(self)
        try:
            if state is _REMOTE_CLOSING:  # the peer began the closing handshake: answer it
                await self.send_raw(conn.send(event.response()), control=True)
            elif state is _OPEN:  # wsproto's verdict on a protocol error (1002, 1007)
                reply = CloseConnection(event.code, event.reason)
                await self.send_raw(conn.send(reply), control=True)
        except ConnectionClosed:
            pass

    def _wsproto(self) -> Connection:
        """The wsproto connection, made on first use: the frames :meth:`_process` reads
        itself (whole data messages, pings and pongs) never need it, and an idle
        connection sees only those (~1.7 KiB per connection)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = Connection(ConnectionType.SERVER)
        return conn

    def _gone(self) -> None:
        if self.closed is None:
            self.closed = 1006
        if self._pinger is not None:
            self._pinger.discard(self)

    # --- closing ---

    async def aclose(self, code: int, reason: str | None, timeout: float) -> None:  # noqa: ASYNC109
        """Run the closing handshake with ``code`` (for up to ``timeout``), then close TCP.

        Only once nothing else reads from this WebSocket.
        """
        conn = self._wsproto()
        with trio.move_on_after(timeout):
            try:
                if conn.state is _OPEN and self.closed is None:
                    await self.send_raw(conn.send(CloseConnection(code, reason)))
                    while conn.state is not ConnectionState.CLOSED:
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                        if not data:
                            break
                        conn.receive_data(bytes(data))
                        for _ in conn.events():
                            pass  # messages after our close are discarded
            except (ConnectionClosed, LocalProtocolError, *_STREAM_GONE):
                pass
        if self.closed is None:
            self.closed = code
        if self._pinger is not None:
            self._pinger.discard(self)
        self._fd = -1  # the number may soon belong to another socket
        await trio.aclose_forcefully(self.stream)


def _unmasked(data: bytes | bytearray, at: int, length: int) -> bytes:
    """The ``length`` payload bytes of a masked frame whose key starts at ``at``, unmasked."""
    start = at + 4
    # Typed here: where websockets is not installed (the compile's build environment),
    # mypy sees apply_mask as Any.
    payload: bytes = apply_mask(data[start : start + length], data[at:start])
    return payload


def xor_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    """``data`` XOR the 4-byte ``mask`` repeated: one XOR of two integers (what the broker
    unmasks with when websockets is built without its C extension)."""
    length = len(data)
    return (
        int.from_bytes(data, "little")
        ^ int.from_bytes((mask * ((length >> 2) + 1))[:length], "little")
    ).to_bytes(length, "little")


try:  # websockets' C loop (websockets is a dependency: the Python client's asyncio transport)
    from websockets.speedups import apply_mask  # 0.16 us for 90 bytes, 0.31 for 4 KiB
except ImportError:  # pragma: no cover  (websockets built without its C extension)
    apply_mask = xor_mask  # 0.54 us for 90 bytes, 7.1 for 4 KiB


class Pinger:
    """The keep-alive of every WebSocket on a plain TCP socket, in one task (:meth:`run`).

    Each WebSocket sits in one bucket of a timer wheel (``RESOLUTION`` s per bucket) at
    its ``_timer_at``. When its bucket comes, :meth:`WebSocket._ping_due` writes a ping
    without waking its reader, or, ``ping_timeout`` after a ping with no pong, wakes the
    reader (``notify_closing`` on its socket) to raise :class:`PingTimeout`. A pong moves
    the WebSocket to the bucket of its next ping. So an idle connection costs one write and
    one read per ``ping_interval``, and its reader waits without a cancel scope.
    """

    RESOLUTION = 0.25

    __slots__ = ("_buckets", "_keys", "_where")

    def __init__(self) -> None:
        self._buckets: dict[int, dict[WebSocket, None]] = {}
        self._keys: list[int] = []  # a heap of the buckets' keys
        self._where: dict[WebSocket, int] = {}  # each WebSocket's bucket

    def __len__(self) -> int:
        return len(self._where)

    def add(self, websocket: WebSocket, at: float) -> None:
        """Call ``websocket._ping_due`` at ``at`` (a little later: the wheel's resolution)."""
        self.discard(websocket)
        key = math.ceil(at / self.RESOLUTION)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._keys, key)
        bucket[websocket] = None
        self._where[websocket] = key

    def discard(self, websocket: WebSocket) -> None:
        """Stop pinging ``websocket`` (it closed)."""
        key = self._where.pop(websocket, None)
        if key is not None:
            del self._buckets[key][websocket]

    def visit(self, now: float) -> float:
        """Ping or time out every WebSocket due by ``now``; when the next one is due."""
        keys, buckets = self._keys, self._buckets
        while keys and keys[0] * self.RESOLUTION <= now:
            bucket = buckets.pop(heapq.heappop(keys))
            for websocket in bucket:
                del self._where[websocket]
                at = websocket._ping_due(now)
                if at is not None:
                    self.add(websocket, at)
        return keys[0] * self.RESOLUTION if keys else now + self.RESOLUTION

    async def run(self) -> None:
        """Keep every added WebSocket alive until cancelled."""
        while True:  # a timer: until the next bucket, at most 1 s
            now = trio.current_time()
            await trio.sleep_until(min(self.visit(now), now + 1.0))
