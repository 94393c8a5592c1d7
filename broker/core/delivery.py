"""How a message reaches its subscribers: numbered or not, on this node or on every node.

A :class:`Delivery` is chosen once, at start: :class:`LocalDelivery` is the embedded one-node
broker; :class:`~broker.cluster.delivery.ClusterDelivery` shares messages through Redis. The
session publishes and subscribes through it and never asks which one it has.

:meth:`Delivery.publish` does at once all it can: on one node that is everything. A message
is routed by the :class:`~broker.core.hub.Hub`, numbered first if its topic keeps history
(:class:`~broker.core.history.HistoryStore`), and offered to every matching subscription, with
no checkpoint in between, so a topic's offsets reach every subscriber in order. What is left
(waiting for room under ``block``; in a cluster, Redis) comes back as a :class:`Pending`,
which the caller must :meth:`~Pending.complete` before it publishes again. On one node a
pending publish has already reached every subscriber's queue: dropping it loses no message,
only the publisher's backpressure.

:meth:`Delivery.subscribe` reads the history and registers the subscription without a
checkpoint in between: see :func:`recover` for why that means no gap and no duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import trio

from broker.core.history import HistoryStore, Replay, Stored
from broker.core.hub import Blocked, Hub, Subscription
from broker.core.presence import LocalPresence, Presence
from broker.protocol.codes import ErrorCode
from broker.protocol.frames import Encoding, Position, encode_message_body, pack_data, unpack_data
from broker.protocol.topics import is_wildcard


class Unavailable(Exception):
    """Other nodes cannot be reached now; ``str()`` says why, for the ``err`` frame."""


@dataclass(frozen=True, slots=True)
class Subscribed:
    """What :meth:`Delivery.subscribe` did: the ``ok`` reply's extra fields, and the replay.

    ``replay`` holds the encoded bodies (without the ``sub`` tail) of the recovered messages,
    oldest first; the caller must queue them before its next checkpoint.
    """

    fields: dict[str, Any]
    replay: list[bytes]


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A ``history`` answer: the topic's ``latest`` position, up to ``limit`` kept messages
    after the asked position, and (when a position was asked) whether they start right after
    it (``recovered``)."""

    latest: Position
    messages: list[Stored]
    recovered: bool | None

    def fields(self) -> dict[str, Any]:
        """The ``ok`` reply's fields."""
        fields: dict[str, Any] = {
            "epoch": self.latest.epoch,
            "offset": self.latest.offset,
            "messages": [
                {"offset": stored.offset, "data": unpack_data(stored.data)}
                for stored in self.messages
            ],
        }
        if self.recovered is not None:
            fields["recovered"] = self.recovered
        return fields


#: The most message data (msgpack bytes) one ``history`` answer carries: past it the page
#: ends early (always with one message at least), and the client reads on from its last
#: offset. Keeps an answer well inside a client's 1 MiB message, in JSON too.
HISTORY_PAGE_BYTES = 256 * 1024


def read_history(
    history: HistoryStore, topic: str, since: Position | None, limit: int
) -> HistoryPage:
    """Up to ``limit`` kept messages of ``topic`` after ``since`` (from the oldest kept if
    ``None``), read now, and at most :data:`HISTORY_PAGE_BYTES` of their data."""
    now = trio.current_time()
    asked = since if since is not None else Position(history.position(topic, now).epoch, 0)
    replay = history.since(topic, asked, now, limit)
    messages, size = replay.messages, 0
    for count, stored in enumerate(messages):
        size += len(stored.data)
        if size > HISTORY_PAGE_BYTES and count:
            messages = messages[:count]
            break
    return HistoryPage(replay.latest, messages, replay.recovered if since is not None else None)


class Pending(Protocol):
    """The rest of a publish that could not finish at once."""

    async def complete(self) -> Position | None:
        """Finish the publish, and answer the message's place in its topic's history if it
        was numbered here (``None`` if not, or if it was numbered when published); raises
        :class:`Unavailable` if other nodes could not be reached (the message reached this
        node's subscribers)."""


class Delivery(Protocol):
    """How messages reach subscribers (see the module doc)."""

    @property
    def hub(self) -> Hub: ...

    @property
    def history(self) -> HistoryStore: ...

    @property
    def presence(self) -> Presence: ...

    def publish(self, topic: str, data: Any, now: float, *, acknowledged: bool) -> Pending | None:
        """Publish ``data`` on ``topic`` (published at ``now``, :func:`metrics_clock` time);
        what is left to :meth:`~Pending.complete`, or ``None`` once it is done. Not
        ``acknowledged`` (a ``pub`` without ``id``), a cluster may hand it on without waiting
        for Redis' answer."""

    async def subscribe(self, subscription: Subscription, since: Position | None) -> Subscribed:
        """Start routing to ``subscription``, recovering from ``since`` (see :func:`recover`).
        Raises :class:`Unavailable` if its history cannot be read now."""

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop routing to ``subscription``; messages already queued are still delivered."""

    async def read_history(self, topic: str, since: Position | None, limit: int) -> HistoryPage:
        """Kept messages of a concrete topic with history (see :func:`read_history`). Raises
        :class:`Unavailable` if its history cannot be read now."""

    def refuse_subscribe(self, pattern: str) -> tuple[ErrorCode, str] | None:
        """Why this node cannot take one more subscription to ``pattern``, if it cannot: the
        ``err`` code (``too_many_subs``, ``not_enabled``) and message."""

    def status(self) -> tuple[bool, str] | None:
        """Whether what it depends on beyond this node is reachable, and why not; ``None``
        if it depends on nothing."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Do its background work until cancelled (reports started first)."""


class WaitForRoom:
    """The rest of a publish that some ``block`` subscriber's queue took past its bound."""

    __slots__ = ("blocked", "hub")

    def __init__(self, hub: Hub, blocked: Blocked) -> None:
        self.hub = hub
        self.blocked = blocked

    async def complete(self) -> None:
        """Wait for room (see :meth:`Hub.wait_for_room`); numbered when published."""
        await self.hub.wait_for_room(self.blocked)


class LocalDelivery:
    """The one-node broker: every message is delivered here, now (see the module doc)."""

    def __init__(self, hub: Hub, history: HistoryStore) -> None:
        self._hub = hub
        self._history = history
        self._presence = LocalPresence(hub)

    @property
    def hub(self) -> Hub:
        """The hub it routes with."""
        return self._hub

    @property
    def history(self) -> HistoryStore:
        """Where history is kept."""
        return self._history

    @property
    def presence(self) -> LocalPresence:
        """Who is present, on this node."""
        return self._presence

    def publish(
        self, topic: str, data: Any, now: float, *, acknowledged: bool = True
    ) -> WaitForRoom | None:
        """Route, number (a history topic) and offer the message now; the wait for room a
        ``block`` subscriber asks for, if any."""
        hub = self._hub
        rule, subscriptions = hub.route(topic)
        if rule.history is None:
            blocked = hub.offer(subscriptions, topic, data, rule.on_full, None, None, now)
        else:
            packed = pack_data(data)
            offset = self._history.append(topic, packed, trio.current_time())
            blocked = hub.offer(subscriptions, topic, data, rule.on_full, offset, packed, now)
        return None if blocked is None else WaitForRoom(hub, blocked)

    async def subscribe(self, subscription: Subscription, since: Position | None) -> Subscribed:
        """Recover from ``since`` and start routing, with no checkpoint."""
        subscribed, _ = recover(self._history, self._hub, subscription, since)
        self._hub.add(subscription)
        return subscribed

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop routing to ``subscription``."""
        self._hub.remove(subscription)

    async def read_history(self, topic: str, since: Position | None, limit: int) -> HistoryPage:
        """Read the history kept here."""
        return read_history(self._history, topic, since, limit)

    def refuse_subscribe(self, pattern: str) -> None:
        """One node takes any pattern."""

    def status(self) -> None:
        """One node depends on nothing else."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write join and leave frames (:meth:`Hub.write_announcements`) until cancelled."""
        task_status.started()
        await self._hub.write_announcements()


def recover(
    history: HistoryStore, hub: Hub, subscription: Subscription, since: Position | None
) -> tuple[Subscribed, Position | None]:
    """What a subscription's ``ok`` says and what it replays, and the topic's position.

    On a concrete topic with history, the ``ok`` fields carry the topic's ``epoch`` and latest
    ``offset``; with ``since`` also ``recovered``, and the replay holds the kept messages after
    ``since``. ``since`` on a topic without history gives ``recovered: false`` and no replay.
    Raises before anything is changed if the replay cannot be encoded.

    No gap, no duplicate: the caller reads this and registers the subscription with no
    checkpoint in between, and a publish appends to the history and offers to every matching
    subscription with none either. So each publish happens wholly before (its offset is in
    the replay, it did not see the subscription) or wholly after (its offset is above
    ``offset``, and it is queued live). The caller queues the replay before its next
    checkpoint, hence before any live message of a later publish.
    """
    pattern = subscription.pattern
    if is_wildcard(pattern) or hub.policies.history_for(pattern) is None:
        return Subscribed({} if since is None else {"recovered": False}, []), None
    now = trio.current_time()
    if since is None:
        position = history.position(pattern, now)
        return Subscribed({"epoch": position.epoch, "offset": position.offset}, []), position
    replay = history.since(pattern, since, now)
    latest = replay.latest
    fields = {"epoch": latest.epoch, "offset": latest.offset, "recovered": replay.recovered}
    return Subscribed(fields, _replay_bodies(pattern, replay, subscription.encoding)), latest


def _replay_bodies(topic: str, replay: Replay, encoding: Encoding) -> list[bytes]:
    binary = encoding is Encoding.MSGPACK
    return [
        encode_message_body(
            topic,
            None if binary else unpack_data(stored.data),
            encoding,
            stored.offset,
            stored.data if binary else None,
        )
        for stored in replay.messages
    ]
