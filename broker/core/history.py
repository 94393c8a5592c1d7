"""Message history per topic, so a reconnecting subscriber can recover what it missed.

A topic whose config keeps history numbers its messages: ``offset`` is 1 for the first message
and grows by 1 per message. Its ``epoch`` is a random string naming one generation of that
numbering; a new epoch (with offsets starting again from 1) means the kept history was lost
(the in-memory store was restarted, or the topic was evicted whole), so positions of the old
epoch mean nothing any more.

:class:`HistoryStore` is the core's whole view of a store: :meth:`~HistoryStore.append`,
:meth:`~HistoryStore.position`, :meth:`~HistoryStore.since`. Its calls are synchronous on
purpose: "read the history, then register the live subscription" must happen with no
checkpoint in between (see :meth:`broker.core.delivery.LocalDelivery.subscribe`).
:class:`MemoryHistory` is the embedded store. It keeps at most ``size`` messages per topic,
drops messages older than ``ttl`` seconds lazily (when the topic is next touched), and keeps
the whole store under ``max_bytes`` by evicting the least recently published topics first.

Only a publish creates a topic's state. A topic never published to (or evicted) reports the
store's *fresh* epoch and offset 0 without being stored, and its first publish numbers it in
that epoch, so a client that subscribed before the first message recovers it. The fresh epoch
changes whenever a topic is evicted (and on :meth:`~HistoryStore.clear`): a topic created
again never reuses an epoch it had. So subscribing, however often, costs the store nothing
and evicts no one; the price is that a client holding ``(fresh epoch, 0)`` across an eviction
is told ``recovered: false`` although nothing was published.

Messages are stored as their msgpack encoding (``data`` bytes), as a Redis store would store
them, so the msgpack ``msg`` frame of a replay is built without re-encoding.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from broker.core.rules import HistoryLimits
from broker.core.stats import BurstLog
from broker.protocol.frames import Position

log = logging.getLogger("broker.history")

# What one kept message or one topic costs on top of its bytes, roughly (object headers,
# deque slots, dict entries): the cap counts it so that many tiny messages or many empty
# topics cannot outgrow max_bytes either. A message: 153 bytes by tracemalloc (its Stored,
# offset, time, the bytes object's header, a deque slot); 64 counted half of what 180 000
# small messages really took (bench/refill.py).
MESSAGE_OVERHEAD = 160
TOPIC_OVERHEAD = 256


@dataclass(frozen=True, slots=True)
class Stored:
    """One kept message: its offset, its msgpack-encoded ``data``, and when it was published."""

    offset: int
    data: bytes
    time: float


@dataclass(frozen=True, slots=True)
class Replay:
    """The answer to :meth:`HistoryStore.since`.

    ``latest`` is the topic's current position; ``messages`` are the kept messages after the
    asked offset, oldest first; ``recovered`` is true when they are *all* the messages after it.
    """

    latest: Position
    messages: list[Stored]
    recovered: bool


class HistoryStore(Protocol):
    """Where history is kept; every call is synchronous (no checkpoint)."""

    def append(self, topic: str, data: bytes, now: float) -> int:
        """Keep ``data`` (a msgpack value) as the topic's next message; return its offset."""

    def position(self, topic: str, now: float) -> Position:
        """The topic's epoch and latest offset (0 before its first message)."""

    def since(self, topic: str, position: Position, now: float, limit: int | None = None) -> Replay:
        """The kept messages after ``position`` (none if its epoch is not the topic's), at
        most ``limit`` of them."""

    def clear(self) -> None:
        """Forget every topic (messages were lost): each starts a new epoch when next used."""


def new_epoch() -> str:
    """A fresh, random epoch name."""
    return secrets.token_hex(8)


@dataclass(eq=False, slots=True)
class KeptTopic:
    """One topic's kept messages: an unbroken run ending at ``latest``, numbered in ``epoch``.

    ``cost`` is its share of ``max_bytes``; ``warm`` (a cluster node's mirror) says that the
    run holds every kept message up to ``latest``.
    """

    epoch: str
    latest: int = 0  # the latest offset given out (or received)
    kept: deque[Stored] = field(default_factory=deque)  # contiguous offsets, oldest first
    cost: int = 0
    warm: bool = True


class KeptTopics:
    """Topics kept in memory, least recently used first, and what they cost against
    ``max_bytes``: the bookkeeping that :class:`MemoryHistory` and a cluster node's mirror
    (:class:`~broker.cluster.history.RedisHistory`) share. Each message costs its size plus
    :data:`MESSAGE_OVERHEAD`, each topic its name plus :data:`TOPIC_OVERHEAD`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._topics: OrderedDict[str, KeptTopic] = OrderedDict()

    def __len__(self) -> int:
        return len(self._topics)

    def get(self, topic: str) -> KeptTopic | None:
        """The topic, if it is kept."""
        return self._topics.get(topic)

    def add(self, topic: str, epoch: str, latest: int = 0) -> KeptTopic:
        """Keep ``topic`` anew (forgetting what was kept of it), as the most recently used."""
        self.forget(topic)
        state = self._topics[topic] = KeptTopic(epoch, latest, cost=TOPIC_OVERHEAD + len(topic))
        self.bytes += state.cost
        return state

    def forget(self, topic: str) -> KeptTopic | None:
        """Stop keeping ``topic``; what was kept of it, if anything."""
        state = self._topics.pop(topic, None)
        if state is not None:
            self.bytes -= state.cost
        return state

    def used(self, topic: str) -> None:
        """``topic`` was just used: it is evicted last."""
        self._topics.move_to_end(topic)

    def keep(self, state: KeptTopic, message: Stored, size: int) -> None:
        """Append ``message`` to ``state``'s run, which keeps at most ``size`` messages."""
        state.kept.append(message)
        cost = MESSAGE_OVERHEAD + len(message.data)
        state.cost += cost
        self.bytes += cost
        while len(state.kept) > size:
            self.drop_oldest(state)

    def drop_oldest(self, state: KeptTopic) -> None:
        """Drop the oldest message of ``state``'s run."""
        cost = MESSAGE_OVERHEAD + len(state.kept.popleft().data)
        state.cost -= cost
        self.bytes -= cost

    def expire(self, state: KeptTopic, limits: HistoryLimits | None, now: float) -> None:
        """Drop the messages of ``state`` older than its ``ttl`` at ``now``."""
        if limits is not None and limits.ttl is not None:
            expired = now - limits.ttl
            while state.kept and state.kept[0].time <= expired:
                self.drop_oldest(state)

    def evict(self, current: str) -> Iterator[tuple[str, KeptTopic]]:
        """While over ``max_bytes``, forget the least recently used topics but ``current``;
        yield each."""
        while self.bytes > self.max_bytes and len(self._topics) > 1:
            oldest = next(iter(self._topics))
            if oldest == current:
                self._topics.move_to_end(current)
                continue
            state = self._topics.pop(oldest)
            self.bytes -= state.cost
            yield oldest, state

    def clear(self) -> None:
        """Forget every topic."""
        self._topics.clear()
        self.bytes = 0

    def statistics(self) -> dict[str, int]:
        """Topics and messages kept, and bytes counted against ``max_bytes``."""
        return {
            "topics": len(self._topics),
            "messages": sum(len(state.kept) for state in self._topics.values()),
            "bytes": self.bytes,
        }


class MemoryHistory:
    """The in-memory :class:`HistoryStore` (see the module doc).

    ``limits_for(topic)`` gives a topic's :class:`HistoryLimits`; only topics for which it is
    not ``None`` may be appended to. ``evicted_topics`` counts the topics evicted by the cap.
    """

    def __init__(
        self,
        limits_for: Callable[[str], HistoryLimits | None],
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.limits_for = limits_for
        self._topics = KeptTopics(max_bytes)  # least recently published first
        self._fresh = new_epoch()  # the epoch of every topic not stored (see the module doc)
        self.evicted_topics = 0
        self._eviction_log = BurstLog(quiet=60.0)

    @property
    def max_bytes(self) -> int:
        """What all topics together may cost."""
        return self._topics.max_bytes

    def statistics(self) -> dict[str, int]:
        """Topics and messages kept, bytes counted against ``max_bytes``, topics evicted."""
        return {**self._topics.statistics(), "evicted_topics": self.evicted_topics}

    def append(self, topic: str, data: bytes, now: float) -> int:
        """Keep ``data`` as the topic's next message; return its offset."""
        limits = self.limits_for(topic)
        if limits is None:
            raise ValueError(f"topic {topic!r} keeps no history")
        topics = self._topics
        state = self._touch(topic, limits, now)
        if state is None:
            state = topics.add(topic, self._fresh)
        state.latest += 1
        topics.keep(state, Stored(state.latest, data, now), limits.size)
        topics.used(topic)
        self._enforce_cap(topic, state)
        return state.latest

    def position(self, topic: str, now: float) -> Position:
        """The topic's epoch and latest offset; the fresh epoch and 0 for a topic not stored."""
        state = self._touch(topic, self.limits_for(topic), now)
        return Position(self._fresh, 0) if state is None else Position(state.epoch, state.latest)

    def since(self, topic: str, position: Position, now: float, limit: int | None = None) -> Replay:
        """The kept messages after ``position.offset``, if ``position.epoch`` is current,
        at most ``limit`` of them."""
        state = self._touch(topic, self.limits_for(topic), now)
        if state is None:
            latest = Position(self._fresh, 0)
            return Replay(latest, [], position == latest)
        return replay_after(state, position, limit)

    def clear(self) -> None:
        """Forget every topic: each starts a new epoch when next used."""
        self._topics.clear()
        self._fresh = new_epoch()

    # --- internals ---

    def _touch(self, topic: str, limits: HistoryLimits | None, now: float) -> KeptTopic | None:
        """The topic's state, expired messages dropped; ``None`` if it is not stored."""
        state = self._topics.get(topic)
        if state is not None:
            self._topics.expire(state, limits, now)
        return state

    def _enforce_cap(self, current: str, state: KeptTopic) -> None:
        """Evict whole topics, least recently published first, until under ``max_bytes``.

        The topic being written is never evicted whole; if it alone is over the cap, its
        oldest messages go instead (its epoch stays, so a recovery sees the gap).
        """
        topics = self._topics
        for evicted, gone in topics.evict(current):
            self._fresh = new_epoch()  # the evicted topic may come back: not in its epoch
            self.evicted_topics += 1
            if self._eviction_log.first("evicted", time.monotonic()) is not None:
                log.info(
                    "history: evicting the least recently published topics to stay under "
                    "max_bytes=%d, starting with %r (%d messages, %d bytes); %d topic(s) "
                    "evicted so far (logged once a minute at most)",
                    topics.max_bytes,
                    evicted,
                    len(gone.kept),
                    gone.cost,
                    self.evicted_topics,
                )
        while topics.bytes > topics.max_bytes and state.kept:
            topics.drop_oldest(state)


def replay_after(state: KeptTopic, position: Position, limit: int | None = None) -> Replay:
    """The kept messages of ``state`` after ``position``, if its epoch is ``state``'s, at
    most ``limit`` of them (a ``history`` page copies its page, not the whole tail)."""
    latest = Position(state.epoch, state.latest)
    if position.epoch != state.epoch or not 0 <= position.offset <= state.latest:
        return Replay(latest, [], False)
    first = state.kept[0].offset if state.kept else state.latest + 1
    start = max(position.offset + 1 - first, 0)
    messages = list(itertools.islice(state.kept, start, None if limit is None else start + limit))
    return Replay(latest, messages, position.offset + 1 >= first)
