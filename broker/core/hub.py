"""The hub: who is subscribed to what, and the fan-out of each message to its subscribers.

:meth:`Hub.route` finds a topic's rule and the matching subscriptions (a
:class:`~broker.protocol.topics.PatternTrie`, cached per topic); :meth:`Hub.offer` encodes the
message once per encoding in use and offers it to each subscription's
:class:`~broker.core.outbound.OutboundQueue` under the topic's ``on_full`` policy, without a
checkpoint. What a full ``block`` subscriber costs its publisher is returned, for
:meth:`Hub.wait_for_room`: at most ``slow_timeout``, after which that subscriber is closed
with 4002 and the others carry on.

The hub neither numbers messages nor shares them with other nodes, and never touches a
socket: a :class:`~broker.core.delivery.Delivery` decides what to offer and when, and the
queues' owners write.
"""

from __future__ import annotations

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

#: Seconds within which join and leave frames are written together (:meth:`Hub.announce`).
ANNOUNCE_WINDOW = 0.02


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
    tail: bytes = field(init=False)
    queue: OutboundQueue = field(init=False)  # the subscriber's, read once per delivery
    encoding: Encoding = field(init=False)

    def __post_init__(self) -> None:
        self.queue, self.encoding = self.subscriber.queue, self.subscriber.encoding
        self.tail = encode_message_tail(self.pattern, self.encoding)


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
        # Queues given join or leave frames since their writers were last woken for them.
        self._announced: set[OutboundQueue] = set()
        self._announcing = trio.Event()

    def subscription_count(self) -> int:
        """How many subscriptions exist, over all clients."""
        return len(self._trie)

    def add(self, subscription: Subscription) -> None:
        """Start routing matching messages to ``subscription``."""
        self._trie.add(subscription.pattern, subscription)
        self._forget_routes(self._routes, subscription.pattern)
        if subscription.join_leave:
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
        """Offer a ``join`` or ``leave`` (``op``) of ``member`` on ``topic`` to each matching
        subscription that asked for them, under the topic's policy; nobody waits for it
        (:meth:`~broker.core.outbound.OutboundQueue.offer_event`). Their writers are woken
        by :meth:`write_announcements`, within :data:`ANNOUNCE_WINDOW`."""
        rule = self.policies.rule_for(topic)
        subscriptions = self._watcher_routes.get(topic)
        if subscriptions is None:
            if len(self._watcher_routes) >= 65536:
                self._watcher_routes.clear()
            subscriptions = self._watcher_routes[topic] = tuple(self._watchers.match(topic))
        if not subscriptions:
            return
        announced = self._announced
        if not announced:
            self._announcing.set()
        bodies: dict[Encoding, bytes] = {}
        for subscription in subscriptions:
            encoding = subscription.encoding
            body = bodies.get(encoding)
            if body is None:
                body = bodies[encoding] = encode_presence_body(op, topic, member, encoding)
            queue = subscription.queue
            outcome = queue.offer_event(
                subscription.pattern, topic, body, subscription.tail, rule.on_full, now
            )
            announced.add(queue)
            if outcome is _DISCONNECT:
                subscription.subscriber.close_slow_consumer(
                    f"outbound queue full on {topic!r} (disconnect)"
                )

    async def write_announcements(self) -> None:
        """Until cancelled: every :data:`ANNOUNCE_WINDOW`, wake the writers of the queues
        given join or leave frames meanwhile. So when many members join at once (everyone
        reconnecting after a deploy), a subscriber gets them in one write per window, not one
        write per join."""
        while True:
            await self._announcing.wait()
            await trio.sleep(ANNOUNCE_WINDOW)
            self._announcing = trio.Event()
            announced, self._announced = self._announced, set()
            for queue in announced:
                queue.wake_writer_if_asleep()

    async def wait_for_room(self, blocked: Blocked) -> None:
        """Wait until each of the ``blocked`` subscriptions' queues has room again; close
        with 4002 any that stays full for ``slow_timeout``."""
        for subscription in blocked:
            queue = subscription.queue
            while queue.full and not queue.closed:
                since = queue.full_since if queue.full_since is not None else trio.current_time()
                with trio.move_on_at(since + self.slow_timeout):
                    await queue.wait_room()
                    continue
                subscription.subscriber.close_slow_consumer(
                    f"outbound queue full for {self.slow_timeout:g} s (block)"
                )
                break
