"""One client connection: two tasks, a reader and a writer (plus a timer if the token expires).

- The **reader** takes every WebSocket message one socket read completed, decodes them into
  frames and executes them all in order before anything else runs: ``sub``/``unsub`` change
  the hub, ``pub`` awaits :meth:`Hub.publish` (which checkpoints only when a ``block`` policy
  makes it wait, slowing this publisher's reads so that TCP pushes back on it). Bad frames
  are answered with ``err``; ``max_bad_frames`` of them in a row close the connection with
  4008. The reader also runs the keep-alive (:meth:`WebSocket.receive`): a peer that does
  not answer a ping within ``ping_timeout`` is closed with 1001.
- The **writer** waits for the outbound queue, takes everything in it (up to
  ``max_message_size``) and sends it as one WebSocket message: idle connections get each
  message at once, busy ones get batches, and nothing waits on a timer.
- When the client's token expires, the connection is closed with 4003.

Every ``sub`` and ``pub`` is checked against the client's :class:`~broker.auth.Identity`
(``err forbidden``) and every ``pub`` against its publish rate (``err rate_limited``); the
connection stays open after either.

Closing is a request (:meth:`Connection.close`): the writer flushes or discards what is
queued, sends the close frame, and the nursery ends. Whatever ends it, the subscriptions are
removed from the hub on the way out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from broker.auth import ANONYMOUS, Identity, seconds_left
from broker.frames import (
    Command,
    Encoding,
    ErrorCode,
    FrameError,
    Pub,
    Sub,
    decode_batch,
    encode_err,
    encode_lag,
    encode_ok,
)
from broker.hub import Hub, Subscription
from broker.outbound import OutboundQueue
from broker.ratelimit import PublishLimiter
from broker.websocket import ConnectionClosed, MessageTooBig, PingTimeout, WebSocket

log = logging.getLogger("broker.connection")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009
CLOSE_SLOW_CONSUMER = 4002
CLOSE_FORBIDDEN = 4003
CLOSE_POLICY = 4008


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The per-connection limits a :class:`Connection` enforces."""

    max_subscriptions: int = 1024
    queue_messages: int = 1024
    queue_bytes: int = 8 * 1024 * 1024
    max_payload: int = 1024 * 1024
    max_bad_frames: int = 10
    max_message_size: int = 1024 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 5.0
    publish_rate: float = 10000.0
    publish_burst: int = 10000
    publish_bytes_rate: int = 16 * 1024 * 1024
    publish_bytes_burst: int = 16 * 1024 * 1024


class Connection:
    """Serves one accepted WebSocket until either side closes it (see the module doc)."""

    def __init__(
        self,
        websocket: WebSocket,
        encoding: Encoding,
        hub: Hub,
        limits: ConnectionLimits,
        peer: str,
        identity: Identity = ANONYMOUS,
    ) -> None:
        self.websocket = websocket
        self._encoding = encoding
        self.hub = hub
        self.limits = limits
        self.peer = peer
        self.identity = identity
        self._publish_limiter = PublishLimiter(
            limits.publish_rate,
            limits.publish_burst,
            limits.publish_bytes_rate,
            limits.publish_bytes_burst,
            trio.current_time(),
        )
        self._queue = OutboundQueue(limits.queue_messages, limits.queue_bytes)
        self.subscriptions: dict[str, Subscription] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self._send_scope: trio.CancelScope | None = None
        self._bad_in_a_row = 0

    @property
    def queue(self) -> OutboundQueue:
        """This connection's outbound queue."""
        return self._queue

    @property
    def encoding(self) -> Encoding:
        """The encoding negotiated at the handshake."""
        return self._encoding

    # --- closing ---

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Ask the connection to close with ``code``; the first request wins. Never blocks.

        With ``flush``, what is already queued is sent first (bounded by ``close_timeout``
        or, on shutdown, the drain timeout); without, it is discarded.
        """
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = code, reason
        if not flush:
            self._queue.clear()
        self._queue.close()
        if self._send_scope is not None:  # a write in progress gets close_timeout to finish
            self._send_scope.deadline = trio.current_time() + self.limits.close_timeout

    def close_slow_consumer(self, why: str) -> None:
        """Close with 4002, discarding what is queued (called by the hub)."""
        if self.close_code is None:
            log.warning("slow consumer peer=%s: %s; closing with 4002", self.peer, why)
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer", flush=False)

    # --- the connection's life ---

    async def serve(self) -> None:
        """Run the reader and writer until the connection ends, then clean up."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                if seconds_left(self.identity) is not None:
                    nursery.start_soon(self._close_when_token_expires)
                await self._write_loop()
                nursery.cancel_scope.cancel()
        finally:
            for subscription in self.subscriptions.values():
                self.hub.unsubscribe(subscription)
            self._queue.close()
            self._queue.clear()
        await self._send_close()

    async def _send_close(self) -> None:
        if self.websocket.closed is not None:
            return  # the peer closed first, or the socket died
        code = self.close_code if self.close_code is not None else CLOSE_NORMAL
        await self.websocket.aclose(code, self.close_reason or None, self.limits.close_timeout)

    async def _write_loop(self) -> None:
        queue = self._queue
        encoding = self._encoding
        text = encoding is not Encoding.MSGPACK
        while True:
            await queue.wait_batch()
            # While the queue keeps growing, let its producers run once more: under load the
            # batch grows (fewer, bigger writes); when idle this costs one scheduler pass.
            for _ in range(4):
                queued = len(queue)
                await trio.lowlevel.cancel_shielded_checkpoint()
                if len(queue) == queued:
                    break
            batch = queue.take_batch(self.limits.max_message_size)
            if not batch.frames and not batch.lags:
                return  # closed, and flushed or discarded
            frames = [encode_lag(sub, n, encoding) for sub, n in batch.lags.items()]
            frames += batch.frames
            if text:
                frames = [b"\n".join(frames)]
            with trio.CancelScope() as scope:
                self._send_scope = scope
                if self.close_code is not None:
                    scope.deadline = trio.current_time() + self.limits.close_timeout
                try:
                    await self.websocket.send_message(frames, text)
                except ConnectionClosed:
                    return
                finally:
                    self._send_scope = None
            if scope.cancelled_caught:
                return  # the peer stopped reading while we were closing

    async def _read_loop(self) -> None:
        try:
            while True:
                for message in await self.websocket.receive():
                    for item in decode_batch(message, self._encoding):
                        if self._queue.closed:
                            return  # closing: the rest of the batch is not executed
                        if isinstance(item, FrameError):
                            if self._refuse(item):
                                return
                        else:
                            self._bad_in_a_row = 0
                            try:
                                await self._execute(item)
                            except Exception:
                                log.exception("peer=%s: internal error on %r", self.peer, item)
                                self._reply_error(
                                    FrameError(ErrorCode.INTERNAL, "internal error", item.id)
                                )
                    await self._queue.wait_reply_room()  # a peer not reading replies: no hold
        except MessageTooBig:
            size = self.limits.max_message_size
            self.close(CLOSE_TOO_BIG, f"Exceeded maximum message size: {size} bytes")
        except PingTimeout:
            log.info("peer=%s did not answer a ping within %g s", self.peer,
                     self.limits.ping_timeout)  # fmt: skip
            self.close(CLOSE_GOING_AWAY, "ping timeout", flush=False)
        except ConnectionClosed as exc:
            if self.close_code is None:
                self.close(exc.code, f"closed by peer ({exc.code})", flush=False)

    def _refuse(self, error: FrameError) -> bool:
        """Answer a bad frame; True if this was one too many in a row."""
        self._reply_error(error)
        self._bad_in_a_row += 1
        if self._bad_in_a_row >= self.limits.max_bad_frames:
            log.info("peer=%s sent %d bad frames in a row", self.peer, self._bad_in_a_row)
            self.close(CLOSE_POLICY, f"{self._bad_in_a_row} bad frames in a row")
            return True
        return False

    async def _execute(self, command: Command) -> None:
        if isinstance(command, Pub):
            if command.size > self.limits.max_payload:
                self._reply_error(
                    FrameError(
                        ErrorCode.TOO_LARGE,
                        f"publish of {command.size} bytes exceeds max_payload "
                        f"({self.limits.max_payload})",
                        command.id,
                    )
                )
                return
            refusal = self._refuse_publish(command)
            if refusal is not None:
                self._reply_error(refusal)
                return
            await self.hub.publish(command.topic, command.data)
            if command.id is not None:
                self._queue.put_reply(encode_ok(command.id, self._encoding))
        elif isinstance(command, Sub):
            self._subscribe(command)
        else:
            dropped = self.subscriptions.pop(command.topic, None)
            if dropped is not None:
                self.hub.unsubscribe(dropped)
            self._queue.put_reply(encode_ok(command.id, self._encoding))

    def _refuse_publish(self, command: Pub) -> FrameError | None:
        # The rate comes first, so that forbidden publishes cannot be sent without limit either.
        if not self._publish_limiter.try_publish(command.size, trio.current_time()):
            return FrameError(
                ErrorCode.RATE_LIMITED,
                f"over the publish rate ({self.limits.publish_rate:g} messages, "
                f"{self.limits.publish_bytes_rate} bytes per second)",
                command.id,
            )
        if not self.identity.permissions.may_publish(command.topic):
            return FrameError(
                ErrorCode.FORBIDDEN, f"not allowed to publish to {command.topic!r}", command.id
            )
        return None

    def _subscribe(self, command: Sub) -> None:
        if not self.identity.permissions.may_subscribe(command.topic):
            self._reply_error(
                FrameError(
                    ErrorCode.FORBIDDEN,
                    f"not allowed to subscribe to {command.topic!r}",
                    command.id,
                )
            )
            return
        if command.topic in self.subscriptions:
            if command.since is None:
                self._queue.put_reply(encode_ok(command.id, self._encoding))
            else:
                self._reply_error(
                    FrameError(
                        ErrorCode.BAD_REQUEST,
                        f"already subscribed to {command.topic!r}; 'since' only applies to a "
                        "new subscription (unsub first)",
                        command.id,
                    )
                )
            return
        if len(self.subscriptions) >= self.limits.max_subscriptions:
            self._reply_error(
                FrameError(
                    ErrorCode.TOO_MANY_SUBS,
                    f"at most {self.limits.max_subscriptions} subscriptions per connection",
                    command.id,
                )
            )
            return
        subscription = Subscription(self, command.topic)
        self.subscriptions[command.topic] = subscription
        # No checkpoint from here until the replay is queued: the replay must sit in the queue
        # ahead of every live message of a later publish (see Hub.subscribe).
        subscribed = self.hub.subscribe(subscription, command.since)
        self._queue.put_reply(encode_ok(command.id, self._encoding, **subscribed.fields))
        for body in subscribed.replay:
            self._queue.put_replay(subscription.pattern, command.topic, body, subscription.tail)

    def _reply_error(self, error: FrameError) -> None:
        log.debug("peer=%s err %s: %s", self.peer, error.code, error.msg)
        self._queue.put_reply(encode_err(error, self._encoding))

    async def _close_when_token_expires(self) -> None:
        left = seconds_left(self.identity)
        if left is None:
            return
        await trio.sleep(max(0.0, left))
        log.info("peer=%s subject=%s: token expired", self.peer, self.identity.subject)
        self.close(CLOSE_FORBIDDEN, "token expired")
