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
  message at once, busy ones get batches, and nothing waits on a timer. A subscriber whose
  writer is asleep and whose queue is short is written by the publishing reader itself at
  the end of its read (:meth:`Connection.write_held`, docs/design.md "Direct writes").
- When the client's token expires, the connection is closed with 4003.

Every ``sub`` and ``pub`` is checked against the client's :class:`~broker.io.auth.Identity`
(``err forbidden``) and every ``pub`` against its publish rate (``err rate_limited``); the
connection stays open after either.

Each connection counts what it receives and writes into the broker's shared
:class:`~broker.core.stats.BrokerStats` (per frame or per batch, not per subscriber), and
:meth:`Connection.snapshot` describes it for ``/connz`` and the slow-consumer log line.

Closing is a request (:meth:`Connection.close`): the writer flushes or discards what is
queued, sends the close frame, and the nursery ends. Whatever ends it, the subscriptions are
removed from the hub on the way out.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import trio

from broker.config import IdentityLimits
from broker.core.backplane import BackplaneUnavailable
from broker.core.hub import Hub, Subscription
from broker.core.outbound import OutboundQueue, join_pairs
from broker.core.ratelimit import publish_limiter
from broker.core.stats import BrokerStats, ConnectionSnapshot, describe, metrics_clock
from broker.io.auth import ANONYMOUS, Identity, seconds_left
from broker.io.websocket import ConnectionClosed, MessageTooBig, PingTimeout, WebSocket
from broker.protocol.frames import (
    Command,
    Encoding,
    ErrorCode,
    FrameError,
    Pub,
    Sub,
    Unsub,
    decode_batch,
    encode_err,
    encode_lag,
    encode_ok,
)

log = logging.getLogger("broker.connection")

# A reader writes at most this many messages to an idle subscriber itself (write_held); a
# longer queue means a publisher far ahead: its writer, yielding while the queue grows,
# makes fewer and bigger writes (fanout: ~700 frames per write instead of ~300-400).
DIRECT_WRITE_MAX = 8

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
    max_subscription_bytes: int = 256 * 1024
    max_subscription_segments: int = 16384
    max_message_size: int = 1024 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 5.0
    publish_rate: float = 0.0  # 0: no limit
    publish_burst: float = 0.0
    publish_bytes_rate: float = 0.0
    publish_bytes_burst: float = 0.0

    def for_token(self, token: IdentityLimits) -> ConnectionLimits:
        """These limits with the publish limits a token sets in their place."""
        if token == _NO_TOKEN_LIMITS:
            return self
        return dataclasses.replace(
            self,
            publish_rate=_pick(token.publish_rate, self.publish_rate),
            publish_burst=_pick(token.publish_burst, self.publish_burst),
            publish_bytes_rate=_pick(token.publish_bytes_rate, self.publish_bytes_rate),
            publish_bytes_burst=_pick(token.publish_bytes_burst, self.publish_bytes_burst),
        )


_NO_TOKEN_LIMITS = IdentityLimits()


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


class Connection:
    """Serves one accepted WebSocket until either side closes it (see the module doc)."""

    __slots__ = (
        "_bad_in_a_row",
        "_encoding",
        "_publish_limiter",
        "_queue",
        "_rate_limited",
        "_scope",
        "_subscribed_bytes",
        "_subscribed_segments",
        "_text",
        "close_code",
        "close_reason",
        "hub",
        "identity",
        "limits",
        "messages_out",
        "peer",
        "started",
        "stats",
        "subscriptions",
        "websocket",
    )

    def __init__(
        self,
        websocket: WebSocket,
        encoding: Encoding,
        hub: Hub,
        limits: ConnectionLimits,
        peer: str,
        identity: Identity = ANONYMOUS,
        stats: BrokerStats | None = None,
    ) -> None:
        self.websocket = websocket
        self._encoding = encoding
        self._text = encoding is not Encoding.MSGPACK  # JSON frames travel as text messages
        self.hub = hub
        self.limits = limits
        self.peer = peer
        self.identity = identity
        self._publish_limiter = publish_limiter(
            limits.publish_rate,
            limits.publish_burst,
            limits.publish_bytes_rate,
            limits.publish_bytes_burst,
            trio.current_time(),
        )
        self._rate_limited = False  # refusing publishes over the rate now (logged once)
        self.stats = stats if stats is not None else BrokerStats()
        self._queue = OutboundQueue(
            limits.queue_messages, limits.queue_bytes, drops=self.stats.drops
        )
        self.started = metrics_clock()
        self.messages_out = 0
        self.subscriptions: dict[str, Subscription] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self._scope: trio.CancelScope | None = None  # the reader's and writer's, while they run
        self._bad_in_a_row = 0
        self._subscribed_bytes = self._subscribed_segments = 0  # over all subscriptions
        self._queue.waker = self  # writes to it at the end of a read (hub.wakes)
        self._queue.wakes = hub.wakes

    @property
    def queue(self) -> OutboundQueue:
        """This connection's outbound queue."""
        return self._queue

    @property
    def encoding(self) -> Encoding:
        """The encoding negotiated at the handshake."""
        return self._encoding

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

        With ``flush``, what is already queued is sent first (bounded by ``close_timeout``
        or, on shutdown, the drain timeout); without, it is discarded.
        """
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = code, reason
        if not flush:
            self._queue.clear()
        self._queue.close()
        if self._scope is not None:  # the flush (or a write in progress) gets close_timeout
            self._scope.deadline = trio.current_time() + self.limits.close_timeout

    def close_slow_consumer(self, why: str) -> None:
        """Close with 4002, discarding what is queued (called by the hub)."""
        if self.close_code is None:
            self.stats.slow_consumer_disconnects += 1
            facts = describe(self.snapshot(metrics_clock()))
            log.warning("slow consumer %s: %s; closing with 4002", facts, why)
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer", flush=False)

    # --- the connection's life ---

    async def serve(self) -> None:
        """Run the reader and writer until the connection ends, then clean up."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self.close_code is not None:
                    self._scope.deadline = trio.current_time() + self.limits.close_timeout
                nursery.start_soon(self._read_loop)
                if seconds_left(self.identity) is not None:
                    nursery.start_soon(self._close_when_token_expires)
                await self._write_loop()
                nursery.cancel_scope.cancel()
        finally:
            self._scope = None
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
        websocket = self.websocket
        while True:
            await queue.wait_batch()
            if websocket.sending_rest:
                try:
                    await websocket.finish_send()
                except ConnectionClosed:
                    return
            # While the queue keeps growing, let its producers run once more: under load the
            # batch grows (fewer, bigger writes); when idle this costs one scheduler pass.
            for _ in range(4):
                queued = len(queue)
                await trio.lowlevel.cancel_shielded_checkpoint()
                if len(queue) == queued:
                    break
            depth = len(queue)
            batch = queue.take_batch(self.limits.max_message_size)
            if not batch.parts and not batch.lags:
                if queue.closed:
                    return  # closed, and flushed or discarded
                continue  # woken to finish a direct write only
            frames, size = self._frames(batch.lags, batch.parts, batch.size)
            try:
                await websocket.send_message(frames, self._text, size)
            except ConnectionClosed:
                return
            self.messages_out += batch.messages
            self.stats.count_write(depth, batch.messages, size, batch.oldest)

    def write_held(self) -> None:
        """Write the queue directly if the writer is still asleep, the queue is short and the
        socket takes it without waiting; otherwise leave it to the writer (woken if asleep),
        which also reports lags and finishes a partial write."""
        queue = self._queue
        queue.wake_held = False
        websocket = self.websocket
        taken = None
        if websocket.can_send_now():
            taken = queue.take_direct(DIRECT_WRITE_MAX, self.limits.max_message_size)
        if taken is None:
            queue.wake_writer()
            return
        parts, messages, oldest, size = taken
        depth = len(parts) // 2
        if self._text:  # a binary message is the parts as they are (see _frames)
            parts, size = self._frames({}, parts, size)
        if not websocket.send_now(parts, self._text, size):
            queue.wake_writer(kick=True)  # the socket took part: the writer sends the rest
        self.messages_out += messages
        self.stats.count_write(depth, messages, size, oldest)

    def _frames(
        self, lags: dict[str, int], parts: list[bytes], size: int
    ) -> tuple[list[bytes], int]:
        """What to send as one message for ``lags`` and the ``parts`` of ``size`` bytes (see
        :class:`~broker.core.outbound.Batch`), and its size."""
        if not lags and not self._text:
            return parts, size  # each frame's body and tail, joined by the send
        encoding = self._encoding
        frames = [encode_lag(sub, n, encoding) for sub, n in lags.items()]
        size += sum(map(len, frames))
        if self._text:
            frames = [b"\n".join(frames + join_pairs(parts))]
            return frames, len(frames[0])
        return frames + parts, size

    async def _read_loop(self) -> None:
        try:
            wakes = self.hub.wakes
            queue = self._queue
            stats = self.stats
            while True:
                messages = await self.websocket.receive()
                wakes.hold()  # what this read queues is written at its end (wakes.release)
                now = trio.current_time()  # for the rate limit: all of a read arrived at once
                try:
                    for message in messages:
                        stats.bytes_in += len(message)
                        for item in decode_batch(message, self._encoding):
                            if queue.closed:
                                return  # closing: the rest of the batch is not executed
                            if isinstance(item, Pub):  # most frames: no coroutine if it can
                                self._bad_in_a_row = 0
                                rest = self._publish(item, now)
                                if rest is not None:
                                    await rest
                                    now = trio.current_time()
                            elif isinstance(item, FrameError):
                                if self._refuse(item):
                                    return
                            else:
                                self._bad_in_a_row = 0
                                await self._execute_or_reply(item)
                                now = trio.current_time()
                        if queue.replies_full:  # a peer not reading replies: no hold
                            wakes.release()
                            await queue.wait_reply_room()
                            wakes.hold()
                finally:
                    wakes.release()
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

    async def _execute_or_reply(self, item: Sub | Unsub) -> None:
        try:
            await self._execute(item)
        except Exception:
            self._internal_error(item)

    def _internal_error(self, item: Command) -> None:
        log.exception("peer=%s: internal error on %r", self.peer, item)
        if isinstance(item, Pub):
            self.stats.publishes[ErrorCode.INTERNAL] += 1
        self._reply_error(FrameError(ErrorCode.INTERNAL, "internal error", item.id))

    def _refuse(self, error: FrameError) -> bool:
        """Answer a bad frame; True if this was one too many in a row."""
        self._reply_error(error)
        self._bad_in_a_row += 1
        if self._bad_in_a_row >= self.limits.max_bad_frames:
            log.info("peer=%s sent %d bad frames in a row", self.peer, self._bad_in_a_row)
            self.close(CLOSE_POLICY, f"{self._bad_in_a_row} bad frames in a row")
            return True
        return False

    def _publish(self, command: Pub, now: float) -> Coroutine[Any, Any, None] | None:
        """Check ``command`` and publish it (``now``: trio time, for the rate limit). Returns
        what is left to await (the publish waits for room, history or the backplane), or
        ``None`` once it is queued for every subscriber and answered."""
        self.stats.frames_in += 1
        refusal = self._refuse_publish(command, now)
        if refusal is not None:
            self.stats.publishes[refusal.code] += 1
            self._reply_error(refusal)
            return None
        try:
            rest = self.hub.publish_nowait(
                command.topic, command.data, acknowledged=command.id is not None
            )
        except Exception:
            self._internal_error(command)
            return None
        if rest is not None:
            return self._finish_publish(command, rest)
        self._published(command)
        return None

    async def _finish_publish(self, command: Pub, rest: Coroutine[Any, Any, int]) -> None:
        try:
            await rest
        except BackplaneUnavailable as exc:
            self.stats.publishes[ErrorCode.UNAVAILABLE] += 1
            self._reply_error(FrameError(ErrorCode.UNAVAILABLE, str(exc), command.id))
            return
        except Exception:
            self._internal_error(command)
            return
        self._published(command)

    def _published(self, command: Pub) -> None:
        self.stats.publishes["ok"] += 1
        if command.id is not None:
            self._queue.put_reply(encode_ok(command.id, self._encoding))

    async def _execute(self, command: Sub | Unsub) -> None:
        if isinstance(command, Unsub):
            dropped = self.subscriptions.pop(command.topic, None)
            if dropped is not None:
                self._unsubscribed(dropped)
            self._queue.put_reply(encode_ok(command.id, self._encoding))
            return
        refusal = self._refuse_subscribe(command)
        if refusal is not None:
            self._reply_error(refusal)
        elif command.topic in self.subscriptions:
            self._queue.put_reply(encode_ok(command.id, self._encoding))
        elif self.hub.backplane.active:
            await self._follow_then_subscribe(command)
        else:
            self._subscribe(command)

    def _refuse_publish(self, command: Pub, now: float) -> FrameError | None:
        if command.size > self.limits.max_payload:
            return FrameError(
                ErrorCode.TOO_LARGE,
                f"publish of {command.size} bytes exceeds max_payload ({self.limits.max_payload})",
                command.id,
            )
        # The rate comes first, so that forbidden publishes cannot be sent without limit either.
        limiter = self._publish_limiter
        if limiter is not None:
            if not limiter.try_publish(command.size, now):
                return self._over_rate(command)
            self._rate_limited = False
        if not self.identity.permissions.may_publish(command.topic):
            return FrameError(
                ErrorCode.FORBIDDEN, f"not allowed to publish to {command.topic!r}", command.id
            )
        return None

    def _over_rate(self, command: Pub) -> FrameError:
        limits = self.limits
        rates = ", ".join(
            f"{rate:g} {unit} per second"
            for rate, unit in ((limits.publish_rate, "messages"),
                               (limits.publish_bytes_rate, "bytes")) if rate
        )  # fmt: skip
        if not self._rate_limited:  # once per burst of refusals, not per frame
            self._rate_limited = True
            log.info("peer=%s subject=%s is over its publish rate (%s): refusing with "
                     "err rate_limited", self.peer, self.identity.subject, rates)  # fmt: skip
        return FrameError(ErrorCode.RATE_LIMITED, f"over the publish rate ({rates})", command.id)

    def _refuse_subscribe(self, command: Sub) -> FrameError | None:
        """Why ``command`` is refused, if it is: not allowed, ``since`` on a subscription
        held already, or one subscription too many (for this connection, or for the
        patterns this node can follow in a cluster)."""
        topic = command.topic
        if not self.identity.permissions.may_subscribe(topic):
            return FrameError(
                ErrorCode.FORBIDDEN, f"not allowed to subscribe to {topic!r}", command.id
            )
        if topic in self.subscriptions:
            if command.since is None:
                return None  # a repeated sub: ok
            return FrameError(
                ErrorCode.BAD_REQUEST,
                f"already subscribed to {topic!r}; 'since' only applies to a new subscription "
                "(unsub first)",
                command.id,
            )
        too_many = self._over_subscription_limits(topic)
        if too_many is None:
            too_many = self.hub.backplane.refuse_to_follow(topic)
        return (
            None if too_many is None else FrameError(ErrorCode.TOO_MANY_SUBS, too_many, command.id)
        )

    async def _follow_then_subscribe(self, command: Sub) -> None:
        """With a cluster backplane, make sure messages from other nodes reach this one before
        the ``ok``: a message published anywhere after the ``ok`` is then delivered."""
        backplane = self.hub.backplane
        self.hub.wakes.release()  # this reader is about to wait
        backplane.follow(command.topic)  # held while waiting; the subscription holds its own
        try:
            await backplane.wait_followed(command.topic)
            try:
                await self.hub.prepare_subscribe(command.topic)
            except BackplaneUnavailable as exc:
                self._reply_error(FrameError(ErrorCode.UNAVAILABLE, str(exc), command.id))
                return
            self._subscribe(command)  # no checkpoint since the history was loaded
        finally:
            backplane.unfollow(command.topic)

    def _subscribe(self, command: Sub) -> None:
        """Subscribe (``command`` passed :meth:`_refuse_subscribe`) and queue the ``ok`` and
        the replay."""
        subscription = Subscription(self, command.topic)
        # No checkpoint from here until the replay is queued: the replay must sit in the queue
        # ahead of every live message of a later publish (see Hub.subscribe).
        subscribed = self.hub.subscribe(subscription, command.since)
        self.subscriptions[command.topic] = subscription
        self._subscribed_bytes += len(command.topic)
        self._subscribed_segments += command.topic.count(".") + 1
        self._queue.put_reply(encode_ok(command.id, self._encoding, **subscribed.fields))
        now = metrics_clock()
        for body in subscribed.replay:
            self._queue.put_replay(
                subscription.pattern, command.topic, body, subscription.tail, now
            )

    def _over_subscription_limits(self, pattern: str) -> str | None:
        """Why one more subscription to ``pattern`` is too many, if it is."""
        limits = self.limits
        if len(self.subscriptions) >= limits.max_subscriptions:
            return f"at most {limits.max_subscriptions} subscriptions per connection"
        size = self._subscribed_bytes + len(pattern)
        if size > limits.max_subscription_bytes:
            return (
                f"the patterns of this connection's subscriptions would total {size} bytes; "
                f"the limit is {limits.max_subscription_bytes} (max_subscription_bytes)"
            )
        segments = self._subscribed_segments + pattern.count(".") + 1
        if segments > limits.max_subscription_segments:
            return (
                f"the patterns of this connection's subscriptions would have {segments} "
                f"segments; the limit is {limits.max_subscription_segments} "
                "(max_subscription_segments)"
            )
        return None

    def _unsubscribed(self, subscription: Subscription) -> None:
        self.hub.unsubscribe(subscription)
        self._subscribed_bytes -= len(subscription.pattern)
        self._subscribed_segments -= subscription.pattern.count(".") + 1

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
