"""One client connection: the I/O around its :class:`~broker.core.session.Session`.

The connection's task reads; a writer task runs beside it, in the connection's nursery, only
while a direct write cannot do (an idle connection is one waiting task; a timer task
closes it with 4003 when the client's token expires):

- The **reader** takes every WebSocket message one socket read completed and has the
  session execute their frames, in order, before anything else runs
  (:meth:`Session.receive`, inside :meth:`DirectWrites.run`: the subscribers it queued
  for are written at the end, see :mod:`broker.io.writes`). A command the session cannot
  finish at once (a ``block`` subscriber's queue full, a ``sub``, other nodes) is awaited
  there (:meth:`Session.complete`): so a publisher held back stops reading, and TCP pushes
  back on it. Between reads it waits while its client leaves too many replies unread.
  It also ends the keep-alive (:meth:`WebSocket.receive` raises :class:`PingTimeout`): a
  peer that does not answer a ping within ``ping_timeout`` is closed with 1001; a message
  over ``max_message_size`` closes with 1009.
- Most writes are direct: the reader that queued the messages writes them
  (:meth:`Connection.write_held`). When it cannot (a write the socket did not take whole, a
  long queue, lag counts, TLS, a message from elsewhere) the queue has a **writer** started
  (:meth:`Connection.start_writer`): it takes everything queued (up to
  ``max_message_size``) and sends it as one WebSocket message, again while more is queued,
  and ends when nothing is (:meth:`OutboundQueue.writer_done`). Idle connections get each
  message at once, busy ones get batches, and nothing waits on a timer.

Closing is a request (:meth:`Connection.close`): a writer flushes or discards what is
queued and ends the nursery (the reader with it), and the close frame is sent. Whatever ends
it, the session's subscriptions are dropped on the way out. This module and
:mod:`broker.io.writes` are the only ones that write to a client's socket.
"""

from __future__ import annotations

import logging

import trio

from broker.config import ServerConfig
from broker.core.delivery import Delivery
from broker.core.hub import Subscription
from broker.core.outbound import Batch, OutboundQueue, Part, join_pairs
from broker.core.permissions import ANONYMOUS, Identity
from broker.core.rules import SessionLimits
from broker.core.session import Session
from broker.core.stats import BrokerStats, ConnectionSnapshot, describe, metrics_clock
from broker.io.auth import seconds_left
from broker.io.websocket import ConnectionClosed, MessageTooBig, PingTimeout, WebSocket
from broker.io.writes import DirectWrites
from broker.protocol.codes import CloseCode
from broker.protocol.frames import Encoding, encode_lag

log = logging.getLogger("broker.connection")

# The held writes make at most this many messages to an idle subscriber themselves
# (write_held); a longer queue means a publisher far ahead: its writer, yielding while the
# queue grows, makes fewer and bigger writes (fanout: ~700 frames per write instead of
# ~300-400). Held writes are flushed once per scheduler pass (DirectWrites.flush_writes), so
# a subscriber of several publishers gets more than one read's messages: 8 woke its writer
# for most of them (small-topics, 4 publishers).
DIRECT_WRITE_MAX = 64


class Connection:
    """Serves one accepted WebSocket until either side closes it (see the module doc)."""

    __slots__ = (
        "_encoding",
        "_nursery",
        "_queue",
        "_text",
        "close_code",
        "close_reason",
        "messages_out",
        "peer",
        "server",
        "session",
        "started",
        "stats",
        "websocket",
        "writes",
    )

    def __init__(
        self,
        websocket: WebSocket,
        encoding: Encoding,
        delivery: Delivery,
        writes: DirectWrites,
        limits: SessionLimits,
        server: ServerConfig,
        peer: str,
        identity: Identity = ANONYMOUS,
        stats: BrokerStats | None = None,
    ) -> None:
        self.websocket = websocket
        self._encoding = encoding
        self._text = encoding is not Encoding.MSGPACK  # JSON frames travel as text messages
        self.writes = writes
        self.server = server
        self.peer = peer
        self.stats = stats if stats is not None else BrokerStats()
        self._queue = OutboundQueue(
            limits.queue_messages, limits.queue_bytes, drops=self.stats.drops
        )
        self._queue.owner = self
        websocket.wake_writer = self._queue.wake_writer  # to finish a ping's partial write
        self.session = Session(
            self, delivery, identity, limits, self.stats, peer, trio.current_time()
        )
        self.started = metrics_clock()
        self.messages_out = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._nursery: trio.Nursery | None = None  # the writers', while one may start

    @property
    def queue(self) -> OutboundQueue:
        """This connection's outbound queue."""
        return self._queue

    @property
    def encoding(self) -> Encoding:
        """The encoding negotiated at the handshake."""
        return self._encoding

    @property
    def identity(self) -> Identity:
        """Who the client is."""
        return self.session.identity

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The client's subscriptions, by pattern."""
        return self.session.subscriptions

    def snapshot(self, now: float) -> ConnectionSnapshot:
        """This connection's peer, subject, subscriptions and queue, as of ``now``
        (:func:`~broker.core.stats.metrics_clock`)."""
        queue = self._queue.statistics()
        oldest = self._queue.oldest_time()
        return ConnectionSnapshot(
            peer=self.peer,
            subject=self.identity.subject,
            subscriptions=tuple(self.subscriptions),
            queue_messages=queue["messages"],
            queue_bytes=queue["bytes"],
            dropped=queue["dropped_total"],
            oldest_age=None if oldest is None else max(0.0, now - oldest),
            messages_out=self.messages_out,
            connected_for=now - self.started,
        )

    # --- closing ---

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Ask the connection to close with ``code``; the first request wins. Never blocks.

        With ``flush``, what is already queued is sent first (bounded by ``drain_timeout``);
        without, it is discarded.
        """
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = code, reason
        if not flush:
            self._queue.clear()
        self._queue.close()  # a writer flushes, then ends the nursery (an idle one is started)
        if self._nursery is not None:  # the flush (or a write in progress) gets drain_timeout
            self._nursery.cancel_scope.deadline = trio.current_time() + self.server.drain_timeout

    def close_slow_consumer(self, why: str) -> None:
        """Close with 4002, discarding what is queued (the hub asks, through the session)."""
        if self.close_code is None:
            self.stats.slow_consumer_disconnects += 1
            facts = describe(self.snapshot(metrics_clock()))
            log.warning("slow consumer %s: %s; closing with 4002", facts, why)
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer", flush=False)

    # --- the connection's life ---

    async def serve(self) -> None:
        """Read (and write, see the module doc) until the connection ends, then clean up."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop, nursery)  # what is queued yet
                if seconds_left(self.identity) is not None:
                    nursery.start_soon(self._close_when_token_expires)
                try:
                    if self.close_code is None:
                        await self._read_loop()
                    else:  # closed before it started
                        nursery.cancel_scope.deadline = (
                            trio.current_time() + self.server.drain_timeout
                        )
                finally:
                    self._nursery = None  # closing: the writer at work ends the nursery
        finally:
            self.session.end()
            self._queue.close()
            self._queue.clear()
        await self._send_close()

    async def _send_close(self) -> None:
        if self.websocket.closed is not None:
            return  # the peer closed first, or the socket died
        code = self.close_code if self.close_code is not None else CloseCode.NORMAL
        await self.websocket.aclose(code, self.close_reason or None, self.server.drain_timeout)

    async def _read_loop(self) -> None:
        session, writes, queue = self.session, self.writes, self._queue
        try:
            while True:
                messages = await self.websocket.receive()
                # The subscribers a run queued for are written at its end (io/writes.py).
                waiting = writes.run(session.receive, messages, trio.current_time(), None)
                while waiting is not None:
                    await session.complete(waiting)
                    waiting = writes.run(session.receive, messages, trio.current_time(), waiting)
                messages = []  # not kept while idle
                if queue.closed:
                    return  # closing
                if queue.replies_full:  # a peer not reading its replies
                    await queue.wait_reply_room()
        except MessageTooBig:
            size = self.server.max_message_size
            self.close(CloseCode.TOO_BIG, f"Exceeded maximum message size: {size} bytes")
        except PingTimeout:
            log.info("peer=%s did not answer a ping within %g s", self.peer,
                     self.server.ping_timeout)  # fmt: skip
            self.close(CloseCode.GOING_AWAY, "ping timeout", flush=False)
        except ConnectionClosed as exc:
            self._lost(exc)

    def _lost(self, closed: ConnectionClosed) -> None:
        """The peer closed, or the socket is gone: end the connection, discarding the queue."""
        if self.close_code is None:
            self.close(closed.code, f"closed by peer ({closed.code})", flush=False)

    def start_writer(self) -> None:
        """Asked by the queue: start a writer (not once the reader is done)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._write_loop, self._nursery)

    async def _write_loop(self, nursery: trio.Nursery) -> None:
        """Write until nothing is queued; once the queue is closed, flush it and end
        ``nursery`` (the connection's)."""
        queue = self._queue
        websocket = self.websocket
        max_size = self.server.max_message_size
        batch: Batch | None = None
        frames: list[Part] | None = None
        while True:
            if websocket.sending_rest:
                try:
                    await websocket.finish_send()
                except ConnectionClosed as exc:
                    self._lost(exc)
                    break
            if not queue.pending:
                if not queue.closed:
                    queue.writer_done()  # the next frame starts another (start_writer)
                    return
                break  # closed, and flushed or discarded
            # While the queue keeps growing, let its producers run once more: under load the
            # batch grows (fewer, bigger writes); when idle this costs one scheduler pass.
            for _ in range(4):
                queued = len(queue)
                await trio.lowlevel.cancel_shielded_checkpoint()
                if len(queue) == queued:
                    break
            depth = len(queue)
            batch = queue.take_batch(max_size)
            if not batch.parts and not batch.lags:
                continue  # discarded meanwhile (closed)
            frames, size = self._frames(batch.lags, batch.parts, batch.size)
            try:
                await websocket.send_message(frames, self._text, size)
            except ConnectionClosed as exc:
                self._lost(exc)
                break
            self.messages_out += batch.messages
            self.stats.count_write(depth, batch.messages, size, batch.oldest)
            batch = frames = None  # not kept while waiting
        nursery.cancel_scope.cancel()  # the reader and the token's timer

    def take_wake_up(self) -> bool:
        """Asked by the queue when no writer runs: while a reader runs commands, the
        reader writes for us at its end (:meth:`DirectWrites.take`)."""
        return self.writes.take(self)

    def write_held(self) -> None:
        """Write the queue directly if still no writer runs, the queue is short and the socket
        takes it without waiting; otherwise leave it to a writer (started if none runs),
        which also reports lags and finishes a partial write."""
        queue = self._queue
        websocket = self.websocket
        taken = None
        if websocket.can_send_now():
            taken = queue.take_direct(DIRECT_WRITE_MAX, self.server.max_message_size)
        if taken is None:
            queue.wake_writer()
            return
        parts, messages, oldest, size = taken
        depth = len(parts) // 2
        if self._text:  # a binary message is the parts as they are (see _frames)
            parts, size = self._frames({}, parts, size)
        if not websocket.send_now(parts, self._text, size):
            queue.wake_writer()  # the socket took part: a writer sends the rest
        self.messages_out += messages
        self.stats.count_write(depth, messages, size, oldest)

    def _frames(self, lags: dict[str, int], parts: list[Part], size: int) -> tuple[list[Part], int]:
        """What to send as one message for ``lags`` and the ``parts`` of ``size`` bytes (see
        :class:`~broker.core.outbound.Batch`), and its size."""
        if not lags and not self._text:
            return parts, size  # each frame's body and tail, joined by the send
        encoding = self._encoding
        frames = [encode_lag(sub, n, encoding) for sub, n in lags.items()]
        size += sum(map(len, frames))
        if self._text:
            text = b"\n".join(frames + join_pairs(parts))
            return [text], len(text)
        return [*frames, *parts], size

    async def _close_when_token_expires(self) -> None:
        left = seconds_left(self.identity)
        if left is None:
            return
        await trio.sleep(max(0.0, left))
        log.info("peer=%s subject=%s: token expired", self.peer, self.identity.subject)
        self.close(CloseCode.FORBIDDEN, "token expired")
