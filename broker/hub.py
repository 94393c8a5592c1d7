"""The hub: who is subscribed to what, and fan-out of each published message.

:meth:`Hub.publish` finds the matching subscriptions in a :class:`~broker.topics.PatternTrie`,
encodes the message once per encoding in use, and offers it to each subscriber's
:class:`~broker.outbound.OutboundQueue` under the topic's ``on_full`` policy. It returns once
the message is queued for every matching subscription, which is when a ``pub`` with an ``id``
is acknowledged. Under ``block`` that may mean waiting for a slow subscriber, for at most
``slow_timeout``, after which that subscriber is closed with 4002 and the others carry on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from broker.frames import Encoding, encode_message_body, encode_message_tail
from broker.outbound import Offer, OutboundQueue, Policy
from broker.topics import PatternTrie, pattern_matches

# Per-delivery comparisons read module globals: an Enum member read through its class is ten
# times slower on Python 3.11 (see broker/outbound.py).
_FULL, _DISCONNECT = Offer.FULL, Offer.DISCONNECT


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

    def __post_init__(self) -> None:
        self.tail = encode_message_tail(self.pattern, self.subscriber.encoding)


@dataclass(frozen=True, slots=True)
class TopicRule:
    """``on_full`` policy for the topics matching ``pattern`` (the first matching rule wins)."""

    pattern: str
    on_full: Policy


class PolicyTable:
    """Resolves a topic's ``on_full`` policy from ordered rules, caching the answer per topic."""

    def __init__(self, rules: Sequence[TopicRule], default: Policy = Policy.BLOCK) -> None:
        self._rules = tuple(rules)
        self._default = default
        self._cache: dict[str, Policy] = {}

    def for_topic(self, topic: str) -> Policy:
        """The policy of the first rule matching ``topic``, else the default (``block``)."""
        policy = self._cache.get(topic)
        if policy is None:
            policy = next(
                (rule.on_full for rule in self._rules if pattern_matches(rule.pattern, topic)),
                self._default,
            )
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[topic] = policy
        return policy


class Hub:
    """Routes published messages to every matching subscription (see the module doc)."""

    def __init__(self, policies: PolicyTable, slow_timeout: float) -> None:
        self.policies = policies
        self.slow_timeout = slow_timeout
        self._trie: PatternTrie[Subscription] = PatternTrie()

    def subscription_count(self) -> int:
        """How many subscriptions exist, over all connections."""
        return len(self._trie)

    def subscribe(self, subscription: Subscription) -> None:
        """Start routing matching messages to ``subscription``."""
        self._trie.add(subscription.pattern, subscription)

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop routing to ``subscription``; messages already queued are still delivered."""
        self._trie.remove(subscription.pattern, subscription)

    async def publish(self, topic: str, data: Any) -> int:
        """Queue ``data`` on ``topic`` for every matching subscription; return how many matched.

        Returns once the message is queued (or dropped, per policy) for all of them.
        """
        policy = self.policies.for_topic(topic)
        bodies: dict[Encoding, bytes] = {}
        waiting: list[tuple[Subscription, bytes]] = []
        matched = 0
        for subscription in self._trie.match(topic):
            matched += 1
            subscriber = subscription.subscriber
            encoding = subscriber.encoding
            body = bodies.get(encoding)
            if body is None:
                body = bodies[encoding] = encode_message_body(topic, data, encoding)
            outcome = subscriber.queue.offer(
                subscription.pattern, topic, body, subscription.tail, policy
            )
            if outcome is _FULL:
                waiting.append((subscription, body))
            elif outcome is _DISCONNECT:
                subscriber.close_slow_consumer(f"outbound queue full on {topic!r} (disconnect)")
        for subscription, body in waiting:
            await self._offer_blocking(subscription, topic, body)
        return matched

    async def _offer_blocking(self, subscription: Subscription, topic: str, body: bytes) -> None:
        queue = subscription.subscriber.queue
        while True:
            outcome = queue.offer(
                subscription.pattern, topic, body, subscription.tail, Policy.BLOCK
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
