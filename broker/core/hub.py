"""The hub: who is subscribed to what, and the fan-out of each message to its subscribers.

:meth:`Hub.route` finds a topic's rule and the matching subscriptions (a
:class:`~broker.protocol.topics.PatternTrie`, cached per topic); :meth:`Hub.offer` encodes the
message once per encoding in use and offers it to each subscription's
:class:`~broker.core.outbound.OutboundQueue` under the topic's ``on_full`` policy, without a
checkpoint. What a full ``block`` subscriber costs its publisher is returned, for
:meth:`Hub.wait_for_room`: at most ``slow_timeout``, after which that subscriber is closed
with 4002 and the others carry on.

Join and leave frames (:meth:`Hub.announce`) are gathered for a window (20 ms; longer when
many subscriptions watch, see :data:`ANNOUNCE_COST`), then offered to each subscription that
asked for them as one queue entry, encoded once per pattern and encoding and shared by every
queue (:meth:`Hub.flush_announcements`): a room where everyone watches costs watchers x
windows offers, not watchers x joins. A message published to a topic first flushes that
topic's, so it never overtakes a join or leave announced before it.

The hub neither numbers messages nor shares them with other nodes, and never touches a
socket: a :class:`~broker.core.delivery.Delivery` decides what to offer and when, and the
queues' owners write.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from broker.core.outbound import Offer, OutboundQueue, Policy
from broker.core.rules import PolicyTable, TopicRule
from broker.protocol.frames import (
    Encoding,
    encode_message_body,
    encode_message_tail,
    encode_presence_body,
    unpack_data,
)
from broker.protocol.topics import PatternTrie, is_wildcard

# Per-delivery comparisons read module globals: an Enum member read through its class is ten
# times slower on Python 3.11 (see broker/core/outbound.py).
_QUEUED, _OVER, _DISCONNECT = Offer.QUEUED, Offer.OVER, Offer.DISCONNECT
_MSGPACK, _JSON = Encoding.MSGPACK, Encoding.JSON

#: ``data`` for :meth:`Hub.offer` when only ``packed`` is known: decoded if a JSON subscriber
#: needs the value (msgpack frames reuse ``packed`` as it is).
UNPACK: Any = object()

#: What :meth:`Hub.offer` returns: the subscriptions a message was queued for past their bound.
Blocked = list["Subscription"]

#: Seconds within which join and leave frames are written together (:meth:`Hub.announce`):
#: at least ANNOUNCE_WINDOW, and ANNOUNCE_COST per subscription the last window was offered
#: to (what offering and then writing one window to one subscriber costs, doubled: so a room
#: where everyone watches spends at most about half the core on join and leave), up to
#: MAX_ANNOUNCE_WINDOW (1 s for 10 000 watchers).
ANNOUNCE_WINDOW = 0.02
ANNOUNCE_COST = 100e-6
MAX_ANNOUNCE_WINDOW = 1.0

#: What separates frames within one queue entry, per encoding (the writer joins entries so).
_SEPARATOR = {_MSGPACK: b"", _JSON: b"\n"}


class Subscriber(Protocol):
    """The hub's view of a client: its queue, its encoding, and a way to drop it."""

    @property
    def queue(self) -> OutboundQueue: ...

    @property
    def encoding(self) -> Encoding: ...

    def close_slow_consumer(self, why: str) -> None:
        """Close this client with 4002 (slow consumer); must not block."""


@dataclass(eq=False, slots=True)
class Subscription:
    """One client's subscription to one pattern, with its ``sub`` tail pre-encoded."""

    subscriber: Subscriber
    pattern: str
    join_leave: bool = False  # also gets join and leave frames (presence topics)
    # The number of the first join or leave it gets: none announced before it was added.
    announced_from: int = field(default=0, init=False)
    tail: bytes = field(init=False)
    queue: OutboundQueue = field(init=False)  # the subscriber's, read once per delivery
    encoding: Encoding = field(init=False)

    def __post_init__(self) -> None:
        self.queue, self.encoding = self.subscriber.queue, self.subscriber.encoding
        self.tail = encode_message_tail(self.pattern, self.encoding)


@dataclass(slots=True)
class _Window:
    """The join and leave of one topic announced since the last flush, oldest first."""

    since: float  # when the first was announced (metrics clock)
    numbers: list[int] = field(default_factory=list)  # each one's number, increasing
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (op, member)


class Hub:
    """Routes messages to every matching subscription (see the module doc)."""

    def __init__(self, policies: PolicyTable, slow_timeout: float) -> None:
        self.policies = policies
        self.slow_timeout = slow_timeout
        self._trie: PatternTrie[Subscription] = PatternTrie()
        # Per topic published lately: its rule and matching subscriptions, in trie order. A
        # change to a concrete subscription forgets its topic; a wildcard one forgets all.
        self._routes: dict[str, tuple[TopicRule, tuple[Subscription, ...]]] = {}
        # The join_leave subscriptions alone, and per topic announced lately those matching
        # it: a join looks at the room's watchers, not at every member (as _routes would).
        self._watchers: PatternTrie[Subscription] = PatternTrie()
        self._watcher_routes: dict[str, tuple[Subscription, ...]] = {}
        # Join and leave not yet offered, per topic; set while there are any.
        self._windows: dict[str, _Window] = {}
        self._announcing = trio.Event()
        self._announced = 0  # join and leave announced so far: the next one's number
        self.announce_window = ANNOUNCE_WINDOW  # the next one's length

    def subscription_count(self) -> int:
        """How many subscriptions exist, over all clients."""
        return len(self._trie)

    def add(self, subscription: Subscription) -> None:
        """Start routing matching messages to ``subscription``."""
        self._trie.add(subscription.pattern, subscription)
        self._forget_routes(self._routes, subscription.pattern)
        if subscription.join_leave:
            subscription.announced_from = self._announced
            self._watchers.add(subscription.pattern, subscription)
            self._forget_routes(self._watcher_routes, subscription.pattern)

    def remove(self, subscription: Subscription) -> None:
        """Stop routing to ``subscription``; messages already queued are still delivered."""
        self._trie.remove(subscription.pattern, subscription)
        self._forget_routes(self._routes, subscription.pattern)
        if subscription.join_leave:
            self._watchers.remove(subscription.pattern, subscription)
            self._forget_routes(self._watcher_routes, subscription.pattern)

    @staticmethod
    def _forget_routes(routes: dict[str, Any], pattern: str) -> None:
        if is_wildcard(pattern):
            routes.clear()
        else:
            routes.pop(pattern, None)

    def route(self, topic: str) -> tuple[TopicRule, tuple[Subscription, ...]]:
        """The rule of ``topic`` and the subscriptions matching it."""
        route = self._routes.get(topic)
        if route is None:
            if len(self._routes) >= 65536:
                self._routes.clear()
            route = self._routes[topic] = (
                self.policies.rule_for(topic),
                tuple(self._trie.match(topic)),
            )
        return route

    def offer(
        self,
        subscriptions: tuple[Subscription, ...],
        topic: str,
        data: Any,
        policy: Policy,
        offset: int | None,
        packed: bytes | None,
        now: float,
    ) -> Blocked | None:
        """Offer the message to each of ``subscriptions`` (those matching ``topic``) without
        waiting; the ``block`` ones it was queued for past their bound (``None`` if none),
        whose publisher must :meth:`wait_for_room` before it publishes again.

        ``data`` may be :data:`UNPACK` when ``packed`` (its msgpack encoding) is given;
        ``offset`` is the message's place in the topic's history, if it keeps one; ``now``
        when it was published (:func:`~broker.core.stats.metrics_clock`).
        """
        if self._windows and topic in self._windows:
            self.flush_announcements(topic)  # a join or leave announced before goes first
        blocked: Blocked | None = None
        binary_body = text_body = None  # the frame body per encoding, once it is needed
        for subscription in subscriptions:
            if subscription.encoding is _MSGPACK:
                body = binary_body
                if body is None:
                    body = binary_body = encode_message_body(topic, data, _MSGPACK, offset, packed)
            else:
                body = text_body
                if body is None:
                    if data is UNPACK:
                        assert packed is not None
                        data = unpack_data(packed)  # JSON needs the value; msgpack reuses packed
                    body = text_body = encode_message_body(topic, data, _JSON, offset, packed)
            outcome = subscription.queue.offer(
                subscription.pattern, topic, body, subscription.tail, policy, now
            )
            if outcome is _QUEUED:
                continue
            if outcome is _OVER:
                if blocked is None:
                    blocked = []
                blocked.append(subscription)
            elif outcome is _DISCONNECT:
                subscription.subscriber.close_slow_consumer(
                    f"outbound queue full on {topic!r} (disconnect)"
                )
        return blocked

    def announce(self, topic: str, op: str, member: dict[str, Any], now: float) -> None:
        """Announce a ``join`` or ``leave`` (``op``) of ``member`` on ``topic`` (at ``now``,
        :func:`~broker.core.stats.metrics_clock`) to the subscriptions that asked for them:
        offered at the end of the current window by :meth:`write_announcements`, or before
        the topic's next message. Nobody waits for it."""
        if not len(self._watchers):
            return
        window = self._windows.get(topic)
        if window is None:
            if not self._windows:
                self._announcing.set()
            window = self._windows[topic] = _Window(now)
        window.numbers.append(self._announced)
        window.events.append((op, member))
        self._announced += 1

    def flush_announcements(self, topic: str | None = None) -> int:
        """Offer what was announced since the last flush (of ``topic`` only, if given) to each
        matching subscription that asked, under the topic's policy: all of a topic's, in order,
        as one entry (:meth:`~broker.core.outbound.OutboundQueue.offer_events`), but none
        announced before the subscription was made. Answers how many offers it made."""
        if topic is None:
            windows, self._windows = self._windows, {}
        else:
            windows = {topic: self._windows.pop(topic)}
        return sum(self._offer_window(topic, window) for topic, window in windows.items())

    def _offer_window(self, topic: str, window: _Window) -> int:
        subscriptions = self._watcher_routes.get(topic)
        if subscriptions is None:
            if len(self._watcher_routes) >= 65536:
                self._watcher_routes.clear()
            subscriptions = self._watcher_routes[topic] = tuple(self._watchers.match(topic))
        on_full = self.policies.rule_for(topic).on_full
        numbers, total = window.numbers, len(window.numbers)
        # Per pattern and encoding: the whole window's frames, and where each one starts.
        entries: dict[tuple[str, Encoding], tuple[bytes, list[int]]] = {}
        bodies: dict[Encoding, list[bytes]] = {}  # each event's frame but its sub
        offers = 0
        for subscription in subscriptions:
            first = subscription.announced_from
            start = 0 if first <= numbers[0] else bisect_left(numbers, first)
            if start == total:
                continue  # made after all of them
            encoding = subscription.encoding
            entry = entries.get((subscription.pattern, encoding))
            if entry is None:
                encoded = bodies.get(encoding)
                if encoded is None:
                    encoded = bodies[encoding] = [
                        encode_presence_body(op, topic, member, encoding)
                        for op, member in window.events
                    ]
                entry = entries[(subscription.pattern, encoding)] = _joined(
                    encoded, subscription.tail, _SEPARATOR[encoding]
                )
            frames, starts = entry
            offers += 1
            outcome = subscription.queue.offer_events(
                subscription.pattern,
                topic,
                # one made meanwhile gets the rest, without a copy
                frames if not start else memoryview(frames)[starts[start] :],
                total - start,
                on_full,
                window.since,
            )
            if outcome is _DISCONNECT:
                subscription.subscriber.close_slow_consumer(
                    f"outbound queue full on {topic!r} (disconnect)"
                )
        return offers

    async def write_announcements(self) -> None:
        """Until cancelled: at the end of each window (:attr:`announce_window`, from the
        first join or leave on), :meth:`flush_announcements`. So when many members join at
        once (everyone reconnecting after a deploy), a subscriber gets a window's joins as
        one entry, in one write, and the hub pays one offer per subscriber per window, not
        one per join."""
        while True:
            await self._announcing.wait()
            await trio.sleep(self.announce_window)
            self._announcing = trio.Event()
            offers = self.flush_announcements()
            self.announce_window = min(
                MAX_ANNOUNCE_WINDOW, max(ANNOUNCE_WINDOW, offers * ANNOUNCE_COST)
            )

    async def wait_for_room(self, blocked: Blocked) -> None:
        """Wait until each of the ``blocked`` subscriptions' queues has room again; close
        with 4002 any that stays full for ``slow_timeout``."""
        for subscription in blocked:
            queue = subscription.queue
            while queue.full and not queue.closed:
                since = queue.full_since if queue.full_since is not None else trio.current_time()
                with trio.move_on_at(since + self.slow_timeout) as waited:
                    await queue.wait_room()
                if waited.cancelled_caught:
                    subscription.subscriber.close_slow_consumer(
                        f"outbound queue full for {self.slow_timeout:g} s (block)"
                    )
                    break


def _joined(bodies: list[bytes], tail: bytes, separator: bytes) -> tuple[bytes, list[int]]:
    """Each of ``bodies`` completed by ``tail``, joined by ``separator``, and where each
    frame starts in the result."""
    frames = [body + tail for body in bodies]
    starts, at = [], 0
    for frame in frames:
        starts.append(at)
        at += len(frame) + len(separator)
    return separator.join(frames), starts
