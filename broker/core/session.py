"""One client's session, without I/O: WebSocket messages in, replies out, the broker changed.

A :class:`Session` holds what the protocol says about one client: its subscriptions (and the
presence topics it is a member of), its limits, its permissions, its publish rate and its run
of bad frames. :meth:`Session.receive` decodes the WebSocket messages of one read and runs
their commands in order, answering each into the client's outbound queue (``ok``, ``err``;
the replay of a recovering ``sub``), publishing and subscribing through the
:class:`~broker.core.delivery.Delivery`. It never
waits: a command that must (a publish a ``block`` subscriber holds back, a publish or a
subscription that needs other nodes) stops the run and comes back as a :class:`Waiting`,
which the caller finishes with :meth:`Session.complete` before it goes on with the rest.
The connection around a session (:mod:`broker.io.connection`) only reads, writes and times.

The rules, in the order they are checked:

=========== ==================================================================================
``pub``     ``max_payload`` (``too_large``), the publish rate (``rate_limited``: checked before
            the permission, so refused publishes count too), the permission (``forbidden``)
``sub``     the permission (``forbidden``), ``since`` on a subscription held already
            (``bad_request``), ``join_leave`` where no presence topic matches
            (``not_enabled``), ``max_subscriptions``, ``max_subscription_bytes``,
            ``max_subscription_segments``, and what the delivery can follow
            (``too_many_subs``); a repeated ``sub`` is answered ``ok``
``presence`` the subscribe permission (``forbidden``), a topic with presence (``not_enabled``)
``history``  the subscribe permission (``forbidden``), a topic with history (``not_enabled``)
bad frames ``err`` for each; ``max_bad_frames`` in a row close the client with 4008
=========== ==================================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.core.delivery import Delivery, Pending, Unavailable
from broker.core.hub import Subscriber, Subscription
from broker.core.permissions import Identity
from broker.core.presence import Member, new_client_id
from broker.core.ratelimit import publish_limiter
from broker.core.rules import SessionLimits
from broker.core.stats import BrokerStats, metrics_clock
from broker.protocol.codes import CloseCode, ErrorCode
from broker.protocol.frames import (
    Command,
    FrameError,
    HistoryQuery,
    PresenceQuery,
    Pub,
    Sub,
    Unsub,
    decode_batch,
    encode_err,
    encode_ok,
)
from broker.protocol.topics import is_wildcard

log = logging.getLogger("broker.connection")


class Client(Subscriber, Protocol):
    """What a session needs of its connection: its queue and encoding, and a way to close it
    (the first request wins; with ``flush``, what is queued is sent first)."""

    def close(self, code: CloseCode, reason: str, *, flush: bool = True) -> None: ...


@dataclass(frozen=True, slots=True)
class Waiting:
    """The command :meth:`Session.receive` stopped at, and where to go on after it: finish it
    with :meth:`Session.complete`, then pass it to :meth:`Session.receive` again.

    ``rest`` is what is left of a publish (``None`` for a ``sub``, which is made whole
    there); the rest of the read is ``commands[index:]`` of ``messages[message]``, then the
    messages after it.
    """

    command: Pub | Sub | PresenceQuery | HistoryQuery
    rest: Pending | None
    messages: Sequence[bytes | str]
    message: int
    commands: list[Command | FrameError]
    index: int


class Session:
    """One client's protocol state and rules (see the module doc)."""

    __slots__ = (
        "_bad_in_a_row",
        "_client",
        "_client_id",
        "_delivery",
        "_ended",
        "_limiter",
        "_members",
        "_peer",
        "_rate_limited",
        "_subscribed_bytes",
        "_subscribed_segments",
        "identity",
        "limits",
        "stats",
        "subscriptions",
    )

    def __init__(
        self,
        client: Client,
        delivery: Delivery,
        identity: Identity,
        limits: SessionLimits,
        stats: BrokerStats,
        peer: str,
        now: float,
        client_id: str | None = None,
    ) -> None:
        """``now``: :func:`trio.current_time` (the publish rate's clock); ``client_id``
        names the client as a presence member (a new one, made when first needed, by
        default)."""
        self._client = client
        self._client_id = client_id
        self._delivery = delivery
        self.identity = identity
        self.limits = limits
        self.stats = stats
        self._peer = peer
        self._limiter = publish_limiter(
            limits.publish_rate,
            limits.publish_burst,
            limits.publish_bytes_rate,
            limits.publish_bytes_burst,
            now,
        )
        self._rate_limited = False  # refusing publishes over the rate now (logged once)
        self._bad_in_a_row = 0
        self._subscribed_bytes = self._subscribed_segments = 0  # over all subscriptions
        self.subscriptions: dict[str, Subscription] = {}
        # The presence topics this client is a member of (made at its first: a client that
        # never joins one pays nothing for presence).
        self._members: dict[str, Member] | None = None
        self._ended = False

    @property
    def client_id(self) -> str:
        """The client's id as a presence member: unique per connection, on every node."""
        if self._client_id is None:
            self._client_id = new_client_id()
        return self._client_id

    # --- commands ---

    def receive(
        self, messages: Sequence[bytes | str], now: float, waiting: Waiting | None = None
    ) -> Waiting | None:
        """Execute the frames of ``messages`` (the WebSocket messages one read completed) in
        order, ``now`` being when they were read (:func:`trio.current_time`, for the rate),
        until one must wait: that one, or ``None`` once all ran. With ``waiting`` (completed),
        go on after it. Stops once the client is closing (its queue closed)."""
        queue, stats, encoding = self._client.queue, self.stats, self._client.encoding
        if waiting is None:
            message, commands, start = 0, None, 0
        else:
            message, commands, start = waiting.message, waiting.commands, waiting.index
        while message < len(messages):
            if queue.closed:
                return None  # closing: the rest is not executed
            if commands is None:
                data = messages[message]
                stats.bytes_in += len(data)
                commands, start = decode_batch(data, encoding), 0
            index, command, rest = self._execute(commands, start, now)
            if command is not None:
                return Waiting(command, rest, messages, message, commands, index)
            message, commands = message + 1, None
        return None

    def _execute(
        self, commands: list[Command | FrameError], start: int, now: float
    ) -> tuple[int, Pub | Sub | PresenceQuery | HistoryQuery | None, Pending | None]:
        """Run ``commands[start:]``; the index after the one that must wait, that one and
        the rest of its publish (or the length and ``None``, ``None``)."""
        queue = self._client.queue
        for index in range(start, len(commands)):
            if queue.closed:
                break
            command = commands[index]
            if type(command) is Pub:  # most frames
                self._bad_in_a_row = 0
                rest = self._publish(command, now)
                if rest is not None:
                    return index + 1, command, rest
            elif type(command) is FrameError:
                self._refuse(command)
            elif type(command) is PresenceQuery or type(command) is HistoryQuery:
                self._bad_in_a_row = 0
                refusal = self._refuse_query(command)
                if refusal is None:
                    return index + 1, command, None
                self._reply_error(refusal)
            else:
                assert isinstance(command, Sub | Unsub)
                self._bad_in_a_row = 0
                try:
                    if not self._settle(command):
                        assert isinstance(command, Sub)
                        return index + 1, command, None
                except Exception:
                    self._internal_error(command)
        return len(commands), None, None

    def _settle(self, command: Sub | Unsub) -> bool:
        """Execute and answer ``command`` now if it can be (an ``unsub``; a ``sub`` refused,
        or held already); False for a ``sub`` that :meth:`complete` must make."""
        if isinstance(command, Unsub):
            self._unsubscribe(command)
        elif (refusal := self._refuse_subscribe(command)) is not None:
            self._reply_error(refusal)
        elif command.topic in self.subscriptions and not self._keeps_history(command.topic):
            self._client.queue.put_reply(encode_ok(command.id, self._client.encoding))
        else:
            return False  # a new subscription, or a held one whose ok needs the position
        return True

    def _keeps_history(self, topic: str) -> bool:
        return self._delivery.hub.policies.history_for(topic) is not None and not is_wildcard(topic)

    async def complete(self, waiting: Waiting) -> None:
        """Finish the command :meth:`receive` stopped at, and answer it."""
        command = waiting.command
        try:
            if waiting.rest is not None:
                assert isinstance(command, Pub)
                await waiting.rest.complete()
                self._published(command)
            elif isinstance(command, PresenceQuery):
                page = await self._delivery.presence.page(
                    command.topic, command.limit, command.cursor
                )
                client = self._client
                client.queue.put_reply(encode_ok(command.id, client.encoding, **page.fields()))
            elif isinstance(command, HistoryQuery):
                kept = await self._delivery.read_history(
                    command.topic, command.since, command.limit
                )
                self.stats.count_history_read(len(kept.messages))
                client = self._client
                client.queue.put_reply(encode_ok(command.id, client.encoding, **kept.fields()))
            else:
                assert isinstance(command, Sub)
                await self._subscribe(command)
        except Unavailable as exc:
            if isinstance(command, Pub):
                self.stats.publishes[ErrorCode.UNAVAILABLE] += 1
            self._reply_error(FrameError(ErrorCode.UNAVAILABLE, str(exc), command.id))
        except Exception:
            self._internal_error(command)

    def end(self) -> None:
        """The client is gone: drop every subscription, and leave every presence topic.
        :attr:`subscriptions` still lists what it held (for the disconnect log); a second
        call does nothing."""
        if self._ended:
            return
        self._ended = True
        for subscription in self.subscriptions.values():
            self._delivery.unsubscribe(subscription)
        members, self._members = self._members, None
        now = metrics_clock()
        for topic, member in (members or {}).items():
            self._delivery.presence.leave(topic, member, now)

    # --- publishing ---

    def _publish(self, command: Pub, now: float) -> Pending | None:
        """Check ``command`` and publish it; what is left to complete, or ``None`` once it
        is done and answered."""
        self.stats.frames_in += 1
        refusal = self._refuse_publish(command, now)
        if refusal is not None:
            self.stats.publishes[refusal.code] += 1
            self._reply_error(refusal)
            return None
        try:
            rest = self._delivery.publish(
                command.topic, command.data, metrics_clock(), acknowledged=command.id is not None
            )
        except Exception:
            self._internal_error(command)
            return None
        if rest is None:
            self._published(command)
        return rest

    def _published(self, command: Pub) -> None:
        self.stats.publishes["ok"] += 1
        if command.id is not None:
            self._client.queue.put_reply(encode_ok(command.id, self._client.encoding))

    def _refuse_publish(self, command: Pub, now: float) -> FrameError | None:
        limits = self.limits
        if command.size > limits.max_payload:
            return FrameError(
                ErrorCode.TOO_LARGE,
                f"publish of {command.size} bytes exceeds max_payload ({limits.max_payload})",
                command.id,
            )
        # The rate comes first, so that forbidden publishes cannot be sent without limit either.
        limiter = self._limiter
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
                     "err rate_limited", self._peer, self.identity.subject, rates)  # fmt: skip
        return FrameError(ErrorCode.RATE_LIMITED, f"over the publish rate ({rates})", command.id)

    # --- subscribing ---

    def _refuse_subscribe(self, command: Sub) -> FrameError | None:
        """Why ``command`` is refused, if it is (see the module doc)."""
        topic = command.topic
        if not self.identity.permissions.may_subscribe(topic):
            return FrameError(
                ErrorCode.FORBIDDEN, f"not allowed to subscribe to {topic!r}", command.id
            )
        if command.join_leave and not self._delivery.hub.policies.presence_covers(topic):
            return FrameError(
                ErrorCode.NOT_ENABLED,
                f"no topic matching {topic!r} has presence: 'join_leave' needs one",
                command.id,
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
        if too_many is not None:
            return FrameError(ErrorCode.TOO_MANY_SUBS, too_many, command.id)
        refusal = self._delivery.refuse_subscribe(topic)
        if refusal is None:
            return None
        return FrameError(refusal[0], refusal[1], command.id)

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

    async def _subscribe(self, command: Sub) -> None:
        """Subscribe (``command`` passed :meth:`_refuse_subscribe`) and queue the ``ok`` and
        the replay."""
        client = self._client
        if command.topic in self.subscriptions:  # held already: ok with the topic's position
            latest = (await self._delivery.read_history(command.topic, None, 1)).latest
            fields = {"epoch": latest.epoch, "offset": latest.offset}
            client.queue.put_reply(encode_ok(command.id, client.encoding, **fields))
            return
        subscription = Subscription(client, command.topic, command.join_leave)
        subscribed = await self._delivery.subscribe(subscription, command.since)
        # No checkpoint from the subscription until the replay is queued: the replay must
        # sit in the queue ahead of every live message of a later publish (recover's doc).
        self.subscriptions[command.topic] = subscription
        self._subscribed_bytes += len(command.topic)
        self._subscribed_segments += command.topic.count(".") + 1
        queue = client.queue
        queue.put_reply(encode_ok(command.id, client.encoding, **subscribed.fields))
        now = metrics_clock()
        for body in subscribed.replay:
            queue.put_replay(subscription.pattern, command.topic, body, subscription.tail, now)
        if self._delivery.hub.policies.rule_for(command.topic).presence and not is_wildcard(
            command.topic
        ):
            identity = self.identity
            info = identity.info if identity.info is not None else command.info
            member = Member(self.client_id, identity.user, info)
            if self._members is None:
                self._members = {}
            self._members[command.topic] = member
            self._delivery.presence.join(command.topic, member, now)

    def _refuse_query(self, command: PresenceQuery | HistoryQuery) -> FrameError | None:
        """Why a ``presence`` or ``history`` query is refused, if it is: both need the
        subscribe permission, and a topic that offers what is asked."""
        topic = command.topic
        if not self.identity.permissions.may_subscribe(topic):
            asked = "presence" if isinstance(command, PresenceQuery) else "history"
            return FrameError(
                ErrorCode.FORBIDDEN,
                f"not allowed to subscribe to {topic!r}, which reading its {asked} needs",
                command.id,
            )
        rule = self._delivery.hub.policies.rule_for(topic)
        if isinstance(command, PresenceQuery) and not rule.presence:
            return FrameError(
                ErrorCode.NOT_ENABLED,
                f"{topic!r} has no presence (a [[topics]] rule with presence = true)",
                command.id,
            )
        if isinstance(command, HistoryQuery) and rule.history is None:
            return FrameError(
                ErrorCode.NOT_ENABLED,
                f"{topic!r} keeps no history (a [[topics]] rule with history_size)",
                command.id,
            )
        return None

    def _unsubscribe(self, command: Unsub) -> None:
        dropped = self.subscriptions.pop(command.topic, None)
        if dropped is not None:
            self._delivery.unsubscribe(dropped)
            self._subscribed_bytes -= len(dropped.pattern)
            self._subscribed_segments -= dropped.pattern.count(".") + 1
            member = self._members.pop(command.topic, None) if self._members else None
            if member is not None:
                self._delivery.presence.leave(command.topic, member, metrics_clock())
        self._client.queue.put_reply(encode_ok(command.id, self._client.encoding))

    # --- errors ---

    def _refuse(self, error: FrameError) -> None:
        """Answer a bad frame; close the client if it was one too many in a row."""
        self._reply_error(error)
        self._bad_in_a_row += 1
        if self._bad_in_a_row >= self.limits.max_bad_frames:
            log.info("peer=%s sent %d bad frames in a row", self._peer, self._bad_in_a_row)
            self._client.close(CloseCode.POLICY, f"{self._bad_in_a_row} bad frames in a row")

    def _internal_error(self, command: Command) -> None:
        log.exception("peer=%s: internal error on %r", self._peer, command)
        if isinstance(command, Pub):
            self.stats.publishes[ErrorCode.INTERNAL] += 1
        self._reply_error(FrameError(ErrorCode.INTERNAL, "internal error", command.id))

    def _reply_error(self, error: FrameError) -> None:
        log.debug("peer=%s err %s: %s", self._peer, error.code, error.msg)
        self._client.queue.put_reply(encode_err(error, self._client.encoding))
