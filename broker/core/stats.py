"""Counting what the broker does, cheaply enough to leave on the hot path.

:class:`BrokerStats` is a bag of plain integers shared by the server, the hub's queues and
every connection; they add to it once per frame received, once per batch written, and once per
drop, never once per message per subscriber, and nothing here takes a lock or does I/O.
:mod:`broker.operations.metrics` reads it at scrape time. :class:`Histogram` is the same idea for
distributions: fixed bucket bounds, one list increment per observation. Times for metrics
(a message's publish, its write, a queue's oldest) come from :func:`metrics_clock`.

:class:`ConnectionSnapshot` is what an operator needs to name a slow subscriber (peer, token
subject, subscriptions, queue depth, drops, age of the oldest queued message):
:func:`top_connections` ranks them for ``/connz`` and ``broker stats``, and
:func:`describe` formats one for the slow-consumer log line.
"""

from __future__ import annotations

import enum
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

# The metrics clock: real seconds (not a test's virtual trio clock), and a call costs about a
# quarter of trio.current_time(), which matters once per publish.
metrics_clock = time.perf_counter

# Messages queued for a subscriber when its writer takes a batch.
QUEUE_DEPTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
# The bucket of each depth up to 1024: count_write looks it up instead of a bisect (-2 % of
# the instructions of a small write).
_DEPTH_BUCKET = bytes(bisect_left(QUEUE_DEPTH_BUCKETS, depth) for depth in range(1025))
# Seconds from a publish to the write of the batch holding it.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip


class Histogram:
    """Counts of observed values per bucket (``value <= bound``), plus their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one ``value``."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(bound, values <= bound)`` per bucket, ending with ``(inf, count)``."""
        pairs, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


@dataclass(slots=True)
class BrokerStats:
    """The broker's running totals since start (each only ever grows)."""

    connections_accepted: int = 0
    connections_rejected: Counter[str] = field(default_factory=Counter)  # by reason
    handshakes_failed: Counter[str] = field(default_factory=Counter)  # by reason
    internal_errors: int = 0  # broker bugs contained to one connection
    frames_in: int = 0  # pub frames received, whatever became of them
    bytes_in: int = 0  # WebSocket message bytes received
    publishes: Counter[str] = field(default_factory=Counter)  # by result: "ok" or an err code
    messages_out: int = 0  # msg frames written to subscribers
    bytes_out: int = 0  # WebSocket message bytes written
    drops: Counter[str] = field(default_factory=Counter)  # messages dropped, by on_full policy
    slow_consumer_disconnects: int = 0
    history_reads: int = 0  # history ops answered (a refill is a series of them)
    history_messages: int = 0  # messages those answers carried
    queue_depth: Histogram = field(default_factory=lambda: Histogram(QUEUE_DEPTH_BUCKETS))
    fanout_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    def count_write(self, depth: int, messages: int, size: int, oldest: float | None) -> None:
        """Count one write to a subscriber: ``messages`` msg frames in ``size`` bytes, taken
        from a queue ``depth`` deep, the oldest published at ``oldest`` (``None``: no msg)."""
        # Once per write, so both histograms are counted here rather than through observe().
        self.messages_out += messages
        self.bytes_out += size
        histogram = self.queue_depth
        bucket = _DEPTH_BUCKET[depth] if depth <= 1024 else bisect_left(histogram.bounds, depth)
        histogram.counts[bucket] += 1
        histogram.sum += depth
        if oldest is not None:
            age = metrics_clock() - oldest
            histogram = self.fanout_latency
            histogram.counts[bisect_left(histogram.bounds, age)] += 1
            histogram.sum += age

    def count_history_read(self, messages: int) -> None:
        """Count one ``history`` answer (a client's op or the server API's) of ``messages``."""
        self.history_reads += 1
        self.history_messages += messages


class SortKey(enum.StrEnum):
    """What ``/connz`` and ``broker stats`` rank connections by."""

    QUEUE = "queue"  # messages queued
    DROPS = "drops"  # messages dropped so far
    OLDEST = "oldest"  # age of the oldest queued message


@dataclass(frozen=True, slots=True)
class ConnectionSnapshot:
    """One connection's state at one moment, for ``/connz`` and the slow-consumer log."""

    peer: str
    subject: str
    subscriptions: tuple[str, ...]
    queue_messages: int
    queue_bytes: int
    dropped: int
    oldest_age: float | None  # seconds the oldest queued message has waited; None if none
    messages_out: int
    connected_for: float


def _rank(snapshot: ConnectionSnapshot, key: SortKey) -> tuple[float, ...]:
    age = snapshot.oldest_age or 0.0
    if key is SortKey.DROPS:
        return (snapshot.dropped, snapshot.queue_messages, age)
    if key is SortKey.OLDEST:
        return (age, snapshot.queue_messages, snapshot.dropped)
    return (snapshot.queue_messages, snapshot.queue_bytes, snapshot.dropped, age)


def top_connections(
    snapshots: Iterable[ConnectionSnapshot], key: SortKey, limit: int
) -> list[ConnectionSnapshot]:
    """The ``limit`` worst connections by ``key`` (ties broken by the other two), worst first."""
    return sorted(snapshots, key=lambda snapshot: _rank(snapshot, key), reverse=True)[:limit]


def format_subscriptions(subscriptions: Sequence[str], limit: int = 5) -> str:
    """The patterns comma-separated, the first ``limit`` of them and how many more."""
    shown = ",".join(subscriptions[:limit])
    more = len(subscriptions) - limit
    return f"{shown},+{more} more" if more > 0 else shown or "-"


def describe(snapshot: ConnectionSnapshot) -> str:
    """The facts that name a slow subscriber, as ``key=value`` pairs for one log line."""
    age = "-" if snapshot.oldest_age is None else f"{snapshot.oldest_age:.3f}s"
    return (
        f"peer={snapshot.peer} subject={snapshot.subject} "
        f"subs={format_subscriptions(snapshot.subscriptions)} "
        f"queued={snapshot.queue_messages} queued_bytes={snapshot.queue_bytes} "
        f"dropped={snapshot.dropped} oldest={age}"
    )


class BurstLog:
    """Says which of a stream of like events to log: the first of each burst, where a burst
    ends after ``quiet`` seconds without one. Keyed by what makes events alike (a limit and
    who hit it); remembers at most ``max_keys`` keys."""

    def __init__(self, quiet: float = 10.0, max_keys: int = 4096) -> None:
        self.quiet = quiet
        self.max_keys = max_keys
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (last seen, not logged)

    def first(self, key: Hashable, now: float) -> int | None:
        """Count one event at ``now``: if it starts a burst, how many events of the previous
        burst went unlogged (to say so in the line); ``None`` if it is part of a burst."""
        last = self._last.get(key)
        if last is not None and now - last[0] <= self.quiet:
            self._last[key] = (now, last[1] + 1)
            return None
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]
