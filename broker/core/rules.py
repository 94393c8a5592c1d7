"""What the config says about topics and about each client's limits, as the core uses it.

:class:`TopicRule` (per topic pattern: the ``on_full`` policy and the history kept) and
:class:`PolicyTable`, which finds a topic's rule; :class:`SessionLimits`, the bounds one
client's session enforces, and :class:`IdentityLimits`, those a token may set in their place.
These are the one definition of each default: ``broker.config`` builds its ``[limits]``,
``[[topics]]`` and token sections from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from broker.core.outbound import Policy
from broker.protocol.topics import is_wildcard, pattern_matches, patterns_overlap


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """How much history a topic keeps: at most ``size`` messages, none older than ``ttl`` s."""

    size: int
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class TopicRule:
    """Settings for the topics matching ``pattern`` (the first matching rule wins):
    the ``on_full`` policy, the history kept (``None``: none), and whether the broker keeps
    its subscribers' presence (docs/presence.md)."""

    pattern: str
    on_full: Policy
    history: HistoryLimits | None = None
    presence: bool = False


class PolicyTable:
    """Resolves a topic's rule from ordered rules, caching the answer per topic."""

    def __init__(self, rules: Sequence[TopicRule], default: Policy = Policy.BLOCK) -> None:
        self._rules = tuple(rules)
        self._default = TopicRule(">", default)
        self._cache: dict[str, TopicRule] = {}

    @property
    def rules(self) -> tuple[TopicRule, ...]:
        """The rules, in order."""
        return self._rules

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

    def presence_covers(self, pattern: str) -> bool:
        """Whether ``pattern`` may match a topic with presence: a concrete topic whose rule
        says so, or a wildcard overlapping a presence rule's pattern."""
        if not is_wildcard(pattern):
            return self.rule_for(pattern).presence
        return any(
            rule.presence and patterns_overlap(rule.pattern, pattern) for rule in self._rules
        )


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one client's session may do: its subscriptions, its queue, its publishes.

    0 means no limit for the publish rates (see :mod:`broker.core.ratelimit`).
    """

    max_subscriptions: int = 1024
    # Its subscriptions' patterns together, in bytes and in segments (what the routing trie
    # costs); one more subscription gets err too_many_subs.
    max_subscription_bytes: int = 256 * 1024
    max_subscription_segments: int = 16384
    queue_messages: int = 1024  # the outbound queue's bound; also the unread replies' bound
    queue_bytes: int = 8 * 1024 * 1024
    max_payload: int = 1024 * 1024  # encoded size of one pub frame; more gets err too_large
    max_bad_frames: int = 10  # bad frames in a row before closing with 4008
    publish_rate: float = 0.0  # pub frames per second (token bucket); 0: no limit
    publish_burst: int = 0  # 0 with a rate: one second's worth
    publish_bytes_rate: int = 0  # pub bytes per second; 0: no limit
    publish_bytes_burst: int = 0

    def for_token(self, token: IdentityLimits) -> SessionLimits:
        """These limits with the publish limits a token sets in their place."""
        overrides = {
            key: value
            for key in ("publish_rate", "publish_burst", "publish_bytes_rate",
                        "publish_bytes_burst")
            if (value := getattr(token, key)) is not None
        }  # fmt: skip
        return dataclasses.replace(self, **overrides) if overrides else self


@dataclass(frozen=True, slots=True)
class IdentityLimits:
    """Limits that one token carries for whoever presents it (a ``[[auth.tokens]]`` entry
    or a JWT's limits claim), in place of the ``[limits]`` of the same name; ``None`` keeps
    the broker's. ``max_connections`` caps the connections open at once with the token's
    subject. 0 means no limit, as in ``[limits]``."""

    publish_rate: float | None = None
    publish_burst: int | None = None
    publish_bytes_rate: int | None = None
    publish_bytes_burst: int | None = None
    max_connections: int | None = None
