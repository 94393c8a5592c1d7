"""A subscriber connection's bounded outbound queue and the ``on_full`` policies.

The queue holds encoded frames waiting for the connection's writer. Messages (``msg``) are
bounded by count and bytes; when a message does not fit, the topic's policy decides:

=============== ===========================================================================
``block``       :meth:`OutboundQueue.offer` answers ``FULL``; the publisher waits for room
                (:meth:`OutboundQueue.wait_room`) and gives up on the subscriber after
                ``slow_timeout`` of continuous fullness.
``drop_oldest`` the oldest queued messages *of the same subscription* make room; if it has
                none queued, the new message is dropped instead.
``drop_newest`` the new message is dropped.
``conflate``    the new message replaces the queued one of the same subscription and topic;
                without one, as ``drop_oldest``.
``disconnect``  :meth:`OutboundQueue.offer` answers ``DISCONNECT``: close the subscriber.
=============== ===========================================================================

A policy never evicts another subscription's messages, so a flood on one subscription cannot
cost a quiet one its messages. Every dropped or replaced message is counted per subscription
and reported by the writer as one ``lag`` frame ahead of the next batch. Replies (``ok``,
``err``) are never dropped; their own bound stops the reader of a client that does not read
its replies. A recovery's replay (:meth:`OutboundQueue.put_replay`) is queued past the bounds
and never dropped. Pure logic plus :class:`trio.Event` wake-ups; no I/O.

For observability each message carries the time it was published (``now``, read once per
publish by the hub from :func:`~broker.stats.metrics_clock`), so the age of the oldest queued
message and of each batch's oldest are known without a clock call per subscriber; drops are
also counted by policy into a mapping the broker shares between queues
(:attr:`OutboundQueue.drops`).
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass

import trio


class Policy(enum.StrEnum):
    """What happens to a message for a subscriber whose queue is full."""

    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    CONFLATE = "conflate"
    DISCONNECT = "disconnect"


class Offer(enum.Enum):
    """The outcome of :meth:`OutboundQueue.offer`."""

    QUEUED = "queued"  # in the queue (possibly after evicting or replacing older messages)
    DROPPED = "dropped"  # not queued; counted as lag
    FULL = "full"  # block policy: wait for room, then offer again
    DISCONNECT = "disconnect"  # disconnect policy: the subscriber must be closed
    CLOSED = "closed"  # the queue is closed; the subscriber is going away


# The hot path compares against these module globals: on Python 3.11 reading a member
# through its Enum class (``Policy.BLOCK``) costs ~0.14 us, ten times a global read, and
# ``offer`` runs once per delivery.
_BLOCK, _DROP_OLDEST, _DROP_NEWEST = Policy.BLOCK, Policy.DROP_OLDEST, Policy.DROP_NEWEST
_CONFLATE, _DISCONNECT = Policy.CONFLATE, Policy.DISCONNECT
_QUEUED, _DROPPED, _FULL = Offer.QUEUED, Offer.DROPPED, Offer.FULL


@dataclass(slots=True)
class _Entry:
    frame: bytes
    tail: bytes  # the per-subscription part of a msg frame; b"" for replies
    sub: str | None  # subscription pattern; None for replies
    topic: str
    size: int  # len(frame) + len(tail)
    time: float = 0.0  # when the message was published (metrics_clock); 0.0 for replies
    live: bool = True
    evictable: bool = False  # in _evictable (drop_oldest, conflate)


@dataclass(frozen=True, slots=True)
class Batch:
    """What the writer sends next: lag counts per subscription, then frames in queue order.

    ``messages`` counts the ``msg`` frames among ``frames``; ``oldest`` is when the oldest of
    them was published (``None`` if there are none).
    """

    lags: dict[str, int]
    frames: list[bytes]
    messages: int = 0
    oldest: float | None = None


class OutboundQueue:
    """A bounded queue of encoded frames with per-topic full policies (see the module doc)."""

    def __init__(
        self,
        max_messages: int,
        max_bytes: int,
        max_replies: int | None = None,
        drops: Counter[str] | None = None,
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_replies = max_replies if max_replies is not None else max_messages
        self._entries: deque[_Entry] = deque()
        self._dead = 0  # evicted entries still in _entries (removed lazily)
        self._messages = 0
        self._replies = 0
        self._bytes = 0
        self._evictable: dict[str, deque[_Entry]] = {}  # per subscription, oldest first
        self._latest: dict[tuple[str, str], _Entry] = {}  # conflate: (sub, topic) -> entry
        self._lags: dict[str, int] = {}
        self._closed = False
        # Created by a waiter, set and dropped by the next wake-up: an idle queue holds none.
        self._readable: trio.Event | None = None  # the writer waits for something to send
        self._room: trio.Event | None = None  # publishers wait for the writer to take a batch
        self.full_since: float | None = None
        self.dropped_total = 0
        self.drops: Counter[str] = drops if drops is not None else Counter()  # by policy

    # --- state ---

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __len__(self) -> int:
        return self._messages + self._replies

    def statistics(self) -> dict[str, int]:
        """Current depth and totals, for logs and metrics."""
        return {
            "messages": self._messages,
            "replies": self._replies,
            "bytes": self._bytes,
            "dropped_total": self.dropped_total,
        }

    def oldest_time(self) -> float | None:
        """When the oldest queued message was published, or ``None`` if none is queued."""
        for entry in self._entries:
            if entry.live and entry.sub is not None:
                return entry.time
        return None

    def _fits(self, size: int) -> bool:
        if self._messages == 0:
            return True  # an oversized message still passes through an empty queue
        return self._messages < self.max_messages and self._bytes + size <= self.max_bytes

    # --- producers ---

    def put_reply(self, frame: bytes) -> None:
        """Queue a reply frame. Never dropped; see :meth:`wait_reply_room` for the bound."""
        if self._closed:
            return
        self._entries.append(_Entry(frame, b"", None, "", len(frame)))
        self._replies += 1
        self._bytes += len(frame)
        self._wake_writer()

    def put_replay(self, sub: str, topic: str, frame: bytes, tail: bytes, now: float = 0.0) -> None:
        """Queue a recovered message whatever the bounds (a replay is bounded by the topic's
        history size instead); it is never dropped, and counts as queued for later offers."""
        if self._closed:
            return
        self._append(_Entry(frame, tail, sub, topic, len(frame) + len(tail), now), _BLOCK)

    def offer(
        self, sub: str, topic: str, frame: bytes, tail: bytes, policy: Policy, now: float = 0.0
    ) -> Offer:
        """Try to queue ``frame + tail``, a message of ``topic`` for subscription ``sub``,
        published at ``now`` (:func:`~broker.stats.metrics_clock`)."""
        if self._closed:
            return Offer.CLOSED
        size = len(frame) + len(tail)
        entry = _Entry(frame, tail, sub, topic, size, now)
        messages = self._messages
        if not messages or (messages < self.max_messages and self._bytes + size <= self.max_bytes):
            if policy is _BLOCK or policy is _DROP_NEWEST:  # the common case, inlined
                self._entries.append(entry)
                self._messages = messages + 1
                self._bytes += size
                if self._readable is not None:
                    self._wake_writer()
            else:
                self._append(entry, policy)
            return _QUEUED
        if policy is _BLOCK:
            return _FULL
        if policy is _DISCONNECT:
            return Offer.DISCONNECT
        if policy is _CONFLATE:
            queued = self._latest.get((sub, topic))
            if queued is not None:
                self._bytes += entry.size - queued.size
                queued.frame, queued.tail, queued.size = frame, tail, size
                self._count_lag(sub, policy)
                return _QUEUED
        if policy is not _DROP_NEWEST:
            own = self._evictable.get(sub)
            while own and not self._fits(entry.size):
                self._evict(own.popleft(), policy)
            if self._fits(entry.size):
                self._append(entry, policy)
                return _QUEUED
        self._count_lag(sub, policy)
        return _DROPPED

    def _append(self, entry: _Entry, policy: Policy) -> None:
        self._entries.append(entry)
        self._messages += 1
        self._bytes += entry.size
        assert entry.sub is not None
        if policy is _DROP_OLDEST or policy is _CONFLATE:
            entry.evictable = True
            self._evictable.setdefault(entry.sub, deque()).append(entry)
            if policy is _CONFLATE:
                self._latest[(entry.sub, entry.topic)] = entry
        self._wake_writer()

    def _evict(self, entry: _Entry, policy: Policy) -> None:
        assert entry.sub is not None
        entry.live = False
        self._dead += 1
        self._messages -= 1
        self._bytes -= entry.size
        if self._latest.get((entry.sub, entry.topic)) is entry:
            del self._latest[(entry.sub, entry.topic)]
        self._count_lag(entry.sub, policy)
        if self._dead > 64 and self._dead > len(self._entries) // 2:
            self._entries = deque(e for e in self._entries if e.live)
            self._dead = 0

    def _count_lag(self, sub: str, policy: Policy) -> None:
        self._lags[sub] = self._lags.get(sub, 0) + 1
        self.dropped_total += 1
        self.drops[policy] += 1
        self._wake_writer()  # a lag notice is worth a write even with nothing else queued

    # --- waiting ---

    def _wake_writer(self) -> None:
        readable = self._readable
        if readable is not None:
            self._readable = None
            readable.set()

    def _wake_publishers(self) -> None:
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    async def _wait_room_event(self) -> None:
        if self._room is None:
            self._room = trio.Event()
        await self._room.wait()

    async def wait_room(self) -> None:
        """Wait until the writer takes a batch (or the queue closes)."""
        if self._closed:
            return
        if self.full_since is None:
            self.full_since = trio.current_time()
        await self._wait_room_event()

    async def wait_reply_room(self) -> None:
        """Wait while more than ``max_replies`` replies are queued (the client is not reading)."""
        while self._replies >= self.max_replies and not self._closed:
            await self._wait_room_event()

    async def wait_batch(self) -> None:
        """Wait until there is something to write, or the queue is closed."""
        while not (self._messages or self._replies or self._lags or self._closed):
            if self._readable is None:
                self._readable = trio.Event()
            await self._readable.wait()

    # --- consumer ---

    def take_batch(self, max_bytes: int) -> Batch:
        """Take lag counts and the oldest frames, up to ``max_bytes`` (at least one frame)."""
        frames: list[bytes] = []
        taken = messages = replies = 0
        oldest: float | None = None
        entries = self._entries
        while entries:
            entry = entries[0]
            if not entry.live:
                entries.popleft()
                self._dead -= 1
                continue
            size = entry.size
            if frames and taken + size > max_bytes:
                break
            entries.popleft()
            taken += size
            tail = entry.tail
            frames.append(entry.frame + tail if tail else entry.frame)
            if entry.sub is None:
                replies += 1
            else:
                if oldest is None:  # queue order is publish order (conflate keeps the slot)
                    oldest = entry.time
                messages += 1
                if entry.evictable:
                    self._forget(entry)
        self._bytes -= taken
        self._messages -= messages
        self._replies -= replies
        lags, self._lags = self._lags, {}
        self.full_since = None
        self._wake_publishers()
        return Batch(lags, frames, messages, oldest)

    def _forget(self, entry: _Entry) -> None:
        assert entry.sub is not None
        own = self._evictable.get(entry.sub)
        if own and own[0] is entry:
            own.popleft()
            if not own:
                del self._evictable[entry.sub]
        if self._latest.get((entry.sub, entry.topic)) is entry:
            del self._latest[(entry.sub, entry.topic)]

    def close(self) -> None:
        """Refuse new frames and wake every waiter; what is queued can still be taken."""
        self._closed = True
        self._wake_writer()
        self._wake_publishers()

    def clear(self) -> None:
        """Discard everything queued (a closing slow consumer gets no more messages)."""
        self._entries.clear()
        self._evictable.clear()
        self._latest.clear()
        self._lags.clear()
        self._messages = self._replies = self._bytes = self._dead = 0
