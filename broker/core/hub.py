"""The hub: who is subscribed to what, and fan-out of each published message.

:meth:`Hub.publish` finds the matching subscriptions in a
:class:`~broker.protocol.topics.PatternTrie`,
encodes the message once per encoding in use, and offers it to each subscriber's
:class:`~broker.core.outbound.OutboundQueue` under the topic's ``on_full`` policy. It returns once
the message is queued for every matching subscription, which is when a ``pub`` with an ``id``
is acknowledged. Under ``block`` that may mean waiting for a slow subscriber, for at most
``slow_timeout``, after which that subscriber is closed with 4002 and the others carry on.

For topics whose rule keeps history, :meth:`Hub.publish` first appends the message to the
:class:`~broker.core.history.HistoryStore`, which numbers it, and every ``msg`` frame of it carries
that ``offset`` (the same for every subscriber, so it is still encoded once per encoding).
:meth:`Hub.subscribe` with a ``since`` position reads the kept tail and registers the live
subscription in one step with no checkpoint: see its doc for why that means no gap and no
duplicate. The publishes of one history topic run one at a time, so that its offsets reach
every subscriber in order even when some wait for room under ``block``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from broker.core.backplane import Backplane, BackplaneUnavailable, NoBackplane
from broker.core.history import HistoryLimits, HistoryStore, MemoryHistory, Position, SharedHistory
from broker.core.outbound import HeldWakes, Offer, OutboundQueue, Policy
from broker.core.stats import metrics_clock
from broker.protocol.frames import (
    Encoding,
    encode_message_body,
    encode_message_tail,
    pack_data,
    unpack_data,
)
from broker.protocol.topics import PatternTrie, is_wildcard, pattern_matches

# Per-delivery comparisons read module globals: an Enum member read through its class is ten
# times slower on Python 3.11 (see broker/outbound.py).
_QUEUED, _FULL, _DISCONNECT = Offer.QUEUED, Offer.FULL, Offer.DISCONNECT
_MSGPACK, _JSON = Encoding.MSGPACK, Encoding.JSON

#: ``data`` for :meth:`Hub._fan_out` when only ``packed`` is known: decoded if a JSON
#: subscriber needs the value (msgpack frames reuse ``packed`` as it is).
UNPACK: Any = object()


class Subscriber(Protocol):
    """The hub's view of a connection: its queue, its encoding, and a way to drop it."""

    @property
    def queue(self) -> OutboundQueue: ...

    @property
    def encoding(self) -> Encoding: ...

    def close_slow_consumer(self, why: str) -> None:
        """Close this connection with 4002 (slow consumer); must not block."""


@dataclass(eq=False, slots=True)
class Subscription:
    """One connection's subscription to one pattern, with its ``sub`` tail pre-encoded."""

    subscriber: Subscriber
    pattern: str
    tail: bytes = field(init=False)
    queue: OutboundQueue = field(init=False)  # the subscriber's, read once per delivery
    encoding: Encoding = field(init=False)
    #: With a shared (cluster) history: the position its ``ok`` reported. Messages at or
    #: before it that were still on their way to this node are not delivered to it again.
    after: Position | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.queue, self.encoding = self.subscriber.queue, self.subscriber.encoding
        self.tail = encode_message_tail(self.pattern, self.encoding)


@dataclass(frozen=True, slots=True)
class TopicRule:
    """Settings for the topics matching ``pattern`` (the first matching rule wins):
    the ``on_full`` policy and the history kept (``None``: none)."""

    pattern: str
    on_full: Policy
    history: HistoryLimits | None = None


class PolicyTable:
    """Resolves a topic's rule from ordered rules, caching the answer per topic."""

    def __init__(self, rules: Sequence[TopicRule], default: Policy = Policy.BLOCK) -> None:
        self._rules = tuple(rules)
        self._default = TopicRule(">", default)
        self._cache: dict[str, TopicRule] = {}

    def rule_for(self, topic: str) -> TopicRule:
        """The first rule matching ``topic``, else the default (``block``, no history)."""
        rule = self._cache.get(topic)
        if rule is None:
            rule = next(
                (rule for rule in self._rules if pattern_matches(rule.pattern, topic)),
                self._default,
            )
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[topic] = rule
        return rule

    def for_topic(self, topic: str) -> Policy:
        """The ``on_full`` policy of ``topic``."""
        return self.rule_for(topic).on_full

    def history_for(self, topic: str) -> HistoryLimits | None:
        """The history ``topic`` keeps, or ``None``."""
        return self.rule_for(topic).history


@dataclass(frozen=True, slots=True)
class Subscribed:
    """What :meth:`Hub.subscribe` did: the ``ok`` reply's extra fields, and the replay.

    ``replay`` holds the encoded bodies (without the ``sub`` tail) of the recovered messages,
    oldest first; the caller must queue them before its next checkpoint.
    """

    fields: dict[str, Any]
    replay: list[bytes]


class Hub:
    """Routes published messages to every matching subscription (see the module doc)."""

    def __init__(
        self,
        policies: PolicyTable,
        slow_timeout: float,
        history: HistoryStore | None = None,
        backplane: Backplane | None = None,
    ) -> None:
        self.policies = policies
        self.slow_timeout = slow_timeout
        self.history = history if history is not None else MemoryHistory(policies.history_for)
        self.wakes = HeldWakes()  # see OutboundQueue.waker: readers write to idle subscribers
        self.backplane: Backplane = backplane if backplane is not None else NoBackplane()
        self._trie: PatternTrie[Subscription] = PatternTrie()
        # Per topic published lately: its rule and matching subscriptions, in trie order. A
        # change to a concrete subscription forgets its topic; a wildcard one forgets all.
        self._routes: dict[str, tuple[TopicRule, tuple[Subscription, ...]]] = {}
        self._in_order: dict[str, trio.StrictFIFOLock] = {}  # history topics being published
        # Shared history: publishes waiting for their message to come back, per topic, and
        # the latest position delivered here of those topics (only while someone waits).
        self._expecting: Counter[str] = Counter()
        self._delivered: dict[str, Position] = {}
        self._delivery = trio.Event()  # set (and replaced) on each delivery of those topics

    def subscription_count(self) -> int:
        """How many subscriptions exist, over all connections."""
        return len(self._trie)

    def subscribe(self, subscription: Subscription, since: Position | None = None) -> Subscribed:
        """Start routing matching messages to ``subscription``; recover from ``since``.

        On a concrete topic with history, the reply fields carry the topic's ``epoch`` and
        latest ``offset``; with ``since`` also ``recovered``, and ``replay`` holds the kept
        messages after ``since``. ``since`` on a topic without history gives
        ``recovered: false`` and no replay.

        No gap, no duplicate: this method reads the history and adds the subscription without
        a checkpoint, and :meth:`publish` appends to the history and offers to every matching
        subscription without one either. So each publish happens wholly before this call (its
        offset is in the replay, it did not see the subscription) or wholly after (its offset
        is above ``offset``, and it is queued live). The caller queues ``replay`` before its
        next checkpoint, hence before any live message of a later publish.
        """
        subscribed = self._recover(subscription, since)  # raises before anything is changed
        pattern = subscription.pattern
        self._trie.add(pattern, subscription)
        self._forget_routes(pattern)
        self.backplane.follow(pattern)
        return subscribed

    def _recover(self, subscription: Subscription, since: Position | None) -> Subscribed:
        """What :meth:`subscribe` answers: the ``ok`` fields and the replay."""
        pattern = subscription.pattern
        if is_wildcard(pattern) or self.policies.history_for(pattern) is None:
            return Subscribed({} if since is None else {"recovered": False}, [])
        now = trio.current_time()
        shared = isinstance(self.history, SharedHistory)
        if since is None:
            position = self.history.position(pattern, now)
            if shared:
                subscription.after = position
            return Subscribed({"epoch": position.epoch, "offset": position.offset}, [])
        replay = self.history.since(pattern, since, now)
        latest = replay.latest
        if shared:
            subscription.after = latest
        encoding = subscription.subscriber.encoding
        binary = encoding is Encoding.MSGPACK
        bodies = [
            encode_message_body(
                pattern,
                None if binary else unpack_data(stored.data),
                encoding,
                stored.offset,
                stored.data if binary else None,
            )
            for stored in replay.messages
        ]
        fields = {"epoch": latest.epoch, "offset": latest.offset, "recovered": replay.recovered}
        return Subscribed(fields, bodies)

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop routing to ``subscription``; messages already queued are still delivered."""
        self._trie.remove(subscription.pattern, subscription)
        self._forget_routes(subscription.pattern)
        self.backplane.unfollow(subscription.pattern)

    def _forget_routes(self, pattern: str) -> None:
        if is_wildcard(pattern):
            self._routes.clear()
        else:
            self._routes.pop(pattern, None)

    def _route(self, topic: str) -> tuple[TopicRule, tuple[Subscription, ...]]:
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

    async def publish(self, topic: str, data: Any, *, acknowledged: bool = True) -> int:
        """Queue ``data`` on ``topic`` for every matching subscription; return how many matched.

        Returns once the message is queued (or dropped, per policy) for all of them, and,
        with a cluster backplane, handed to it for the other nodes; raises
        :class:`~broker.core.backplane.BackplaneUnavailable` (after the local delivery) if the
        backplane could not take it. Not ``acknowledged`` (a ``pub`` without ``id``), it
        returns once the message is queued, in order, for the backplane, without waiting for
        Redis' answer: a publisher that asks for no ``ok`` is not held up by a round trip.
        """
        if not self.backplane.active:
            rule, subscriptions = self._route(topic)
            if rule.history is None:
                matched, rest = self._offer_all(
                    subscriptions, topic, data, rule.on_full, None, None, metrics_clock()
                )
                return matched if rest is None else await rest
            self.wakes.release()
            return await self._publish_here(topic, data, None)
        self.wakes.release()
        packed = pack_data(data)
        limits = self.policies.history_for(topic)
        if limits is not None and isinstance(self.history, SharedHistory):
            # Numbered in Redis and delivered here as on every node, in offset order.
            self._expecting[topic] += 1  # before the publish: its echo may beat its answer
            try:
                try:
                    position = await self.history.publish(topic, packed, limits, wait=acknowledged)
                except BackplaneUnavailable as exc:
                    raise BackplaneUnavailable(
                        f"{exc}; not delivered: the messages of {topic!r} are numbered in Redis"
                    ) from None
                if position is not None:
                    await self._wait_delivered(topic, position)
            finally:
                self._expecting[topic] -= 1
                if not self._expecting[topic]:
                    del self._expecting[topic]
                    self._delivered.pop(topic, None)
            return 0
        matched = await self._publish_here(topic, data, packed)
        try:
            await self.backplane.publish(topic, packed, wait=acknowledged)
        except BackplaneUnavailable as exc:
            raise BackplaneUnavailable(
                f"{exc}; delivered to this node's subscribers only"
            ) from None
        return matched

    def publish_nowait(
        self, topic: str, data: Any, *, acknowledged: bool = True
    ) -> Coroutine[Any, Any, int] | None:
        """:meth:`publish` without a coroutine when it need not wait: ``None`` once ``data``
        is queued for every matching subscription; otherwise what to await to finish the
        publish (room under ``block``, a history topic, a cluster backplane)."""
        if self.backplane.active:
            return self.publish(topic, data, acknowledged=acknowledged)
        rule, subscriptions = self._route(topic)
        if rule.history is not None:
            return self.publish(topic, data, acknowledged=acknowledged)
        return self._offer_all(
            subscriptions, topic, data, rule.on_full, None, None, metrics_clock()
        )[1]

    async def _offer_waiting(
        self, waiting: list[tuple[Subscription, bytes]], topic: str, now: float, matched: int
    ) -> int:
        """Wait for room for each (subscription, body) that was full under ``block``; return
        ``matched``, the publish's count."""
        self.wakes.release()  # a reader holding wake-ups is about to wait
        for subscription, body in waiting:
            await self._offer_blocking(subscription, topic, body, now)
        return matched

    async def prepare_subscribe(self, pattern: str) -> None:
        """What a subscription to ``pattern`` needs before :meth:`subscribe` (a checkpoint):
        with a shared history, the topic's history loaded. Raises BackplaneUnavailable."""
        history = self.history
        if (
            isinstance(history, SharedHistory)
            and not is_wildcard(pattern)
            and self.policies.history_for(pattern) is not None
            and not history.is_warm(pattern)
        ):
            await history.load(pattern, trio.current_time())

    async def deliver(self, topic: str, packed: bytes, position: Position | None = None) -> int:
        """Queue a message published on another node (``packed``: its msgpack ``data``;
        ``position``: its place in a shared history) for this node's matching subscriptions;
        return how many matched."""
        history = self.history
        if not isinstance(history, SharedHistory):
            return await self._publish_here(topic, unpack_data(packed), packed)
        rule = self.policies.rule_for(topic)
        now = metrics_clock()  # when it reached this node, for latency metrics
        if position is None or rule.history is None:
            return await self._fan_out(topic, UNPACK, rule.on_full, None, packed, now)
        history.record(topic, position, packed, trio.current_time())
        matched = await self._fan_out(
            topic, UNPACK, rule.on_full, position.offset, packed, now, position.epoch
        )
        if topic in self._expecting:
            self._delivered[topic] = position
            self._delivery.set()
            self._delivery = trio.Event()
        return matched

    async def _wait_delivered(self, topic: str, position: Position) -> None:
        """Wait until the message at ``position`` was delivered here (so a ``pub`` is
        acknowledged after its local subscribers have it, as on a single node)."""
        with trio.move_on_after(self.slow_timeout + 10):
            while True:
                seen = self._delivered.get(topic)
                if seen is not None and (
                    seen.epoch != position.epoch or seen.offset >= position.offset
                ):
                    return
                await self._delivery.wait()
        raise BackplaneUnavailable(
            f"message {position.offset} of {topic!r} is kept in Redis but did not come back "
            f"to this node within {self.slow_timeout + 10:g} s"
        )

    def messages_missed(self) -> None:
        """Messages from other nodes may have been lost: what the history store holds here
        may have holes, so it forgets it (a shared store reloads from Redis when next used)."""
        self.history.clear()

    async def _publish_here(self, topic: str, data: Any, packed: bytes | None) -> int:
        rule = self.policies.rule_for(topic)
        now = metrics_clock()  # when this message was published, for latency metrics
        if rule.history is None:
            return await self._fan_out(topic, data, rule.on_full, None, packed, now)
        # Offsets must reach every subscriber in order, so the publishes of a history topic go
        # one at a time: otherwise, under block, a newer message could be queued while an
        # older one waits for room. (The append and the offers still happen without a
        # checkpoint between them, which Hub.subscribe relies on.)
        lock = self._in_order.get(topic)
        if lock is None:
            lock = self._in_order[topic] = trio.StrictFIFOLock()
        try:
            async with lock:
                packed = packed if packed is not None else pack_data(data)
                offset = self.history.append(topic, packed, trio.current_time())
                return await self._fan_out(topic, data, rule.on_full, offset, packed, now)
        finally:
            if not lock.locked() and self._in_order.get(topic) is lock:
                del self._in_order[topic]

    async def _fan_out(
        self,
        topic: str,
        data: Any,
        policy: Policy,
        offset: int | None,
        packed: bytes | None,
        now: float,
        epoch: str | None = None,
    ) -> int:
        matched, rest = self._offer_all(
            self._route(topic)[1], topic, data, policy, offset, packed, now, epoch
        )
        return matched if rest is None else await rest

    def _offer_all(
        self,
        subscriptions: tuple[Subscription, ...],
        topic: str,
        data: Any,
        policy: Policy,
        offset: int | None,
        packed: bytes | None,
        now: float,
        epoch: str | None = None,
    ) -> tuple[int, Coroutine[Any, Any, int] | None]:
        """Offer the message to each of ``subscriptions`` (those matching ``topic``) without
        waiting: how many matched, and what to await for those full under ``block`` (``None``
        if none was)."""
        waiting: list[tuple[Subscription, bytes]] | None = None
        binary_body = text_body = None  # the frame body per encoding, once it is needed
        covered = 0  # subscriptions whose ok (or replay) already covers this message
        for subscription in subscriptions:
            if offset is not None and subscription.after is not None:  # a recent cluster sub
                after = subscription.after
                if after.epoch == epoch and offset <= after.offset:
                    covered += 1
                    continue
                subscription.after = None  # past it: no more checks
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
            if outcome is _FULL:
                if waiting is None:
                    waiting = []
                waiting.append((subscription, body))
            elif outcome is _DISCONNECT:
                subscription.subscriber.close_slow_consumer(
                    f"outbound queue full on {topic!r} (disconnect)"
                )
        matched = len(subscriptions) - covered
        return matched, self._offer_waiting(waiting, topic, now, matched) if waiting else None

    async def _offer_blocking(
        self, subscription: Subscription, topic: str, body: bytes, now: float
    ) -> None:
        queue = subscription.subscriber.queue
        while True:
            outcome = queue.offer(
                subscription.pattern, topic, body, subscription.tail, Policy.BLOCK, now
            )
            if outcome is not Offer.FULL:
                return
            full_since = queue.full_since if queue.full_since is not None else trio.current_time()
            with trio.move_on_at(full_since + self.slow_timeout):
                await queue.wait_room()
                continue
            subscription.subscriber.close_slow_consumer(
                f"outbound queue full for {self.slow_timeout:g} s (block)"
            )
            return
