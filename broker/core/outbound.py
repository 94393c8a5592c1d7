"""A subscriber connection's bounded outbound queue and the ``on_full`` policies.

The queue holds encoded frames waiting for the connection's writer. Messages (``msg``) are
bounded by count and bytes; when a message does not fit, the topic's policy decides:

=============== ===========================================================================
``block``       the message is queued anyway, past the bound, and :meth:`OutboundQueue.offer`
                answers ``OVER``: the publisher must wait for room
                (:meth:`OutboundQueue.wait_room`) before it publishes again, and gives up on
                the subscriber after ``slow_timeout`` of continuous fullness. So a queue
                holds at most one message past its bound per publisher, and a publish never
                stops half-way (its offsets reach every subscriber in order).
``drop_oldest`` the oldest queued messages *of the same subscription* make room; if even
                all of them would not, none is evicted and the new message is dropped.
``drop_newest`` the new message is dropped.
``conflate``    the new message replaces the queued one of the same subscription and topic,
                in its place; if it is too big for that, the old one is evicted and the rest
                is as ``drop_oldest``, as it is without one.
``disconnect``  :meth:`OutboundQueue.offer` answers ``DISCONNECT``: close the subscriber.
=============== ===========================================================================

A policy never evicts another subscription's messages, so a flood on one subscription cannot
cost a quiet one its messages. Every dropped or replaced message is counted per subscription
and reported by the writer as one ``lag`` frame ahead of the next batch. Replies (``ok``,
``err``) are never dropped; their own bound stops the reader of a client that does not read
its replies. A recovery's replay (:meth:`OutboundQueue.put_replay`) is queued past the bounds
and never dropped. Join and leave frames arrive a window at a time
(:meth:`OutboundQueue.offer_events`): one entry holding many frames, encoded once and shared
by every queue it is offered to, counted as its number of frames against the bound and in
``lag``. Pure logic plus :class:`trio.Event` wake-ups for publishers; no I/O.

The writer is a task the queue's :attr:`~OutboundQueue.owner` (whoever owns the socket)
starts when there is something to write (:meth:`QueueOwner.start_writer`), and that ends
with :meth:`~OutboundQueue.writer_done` when nothing is left: an idle queue has no writer
waiting. Before starting one the queue asks the owner to take the wake-up: an owner that
takes it (:meth:`QueueOwner.take_wake_up` answers True) has taken charge of the write (it
will :meth:`~OutboundQueue.take_direct` or :meth:`~OutboundQueue.wake_writer`), and the
queue asks it nothing more until then.

For observability each message carries the time it was published (``now``, read once per
publish by the hub from :func:`~broker.core.stats.metrics_clock`), so the age of the oldest queued
message and of each batch's oldest are known without a clock call per subscriber; drops are
also counted by policy into a mapping the broker shares between queues
(:attr:`OutboundQueue.drops`).
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass
from typing import Protocol, cast

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
    OVER = "over"  # block policy: queued past the bound; wait for room before the next
    DISCONNECT = "disconnect"  # disconnect policy: the subscriber must be closed
    CLOSED = "closed"  # the queue is closed; the subscriber is going away


# The hot path compares against these module globals: on Python 3.11 reading a member
# through its Enum class (``Policy.BLOCK``) costs ~0.14 us, ten times a global read, and
# ``offer`` runs once per delivery.
_BLOCK, _DROP_OLDEST, _DROP_NEWEST = Policy.BLOCK, Policy.DROP_OLDEST, Policy.DROP_NEWEST
_CONFLATE, _DISCONNECT = Policy.CONFLATE, Policy.DISCONNECT
_QUEUED, _DROPPED, _OVER = Offer.QUEUED, Offer.DROPPED, Offer.OVER


#: A queued byte string: the shared join/leave entries of a presence window are handed to a
#: watcher made during the window as a view of their end (:meth:`OutboundQueue.offer_events`).
Part = bytes | memoryview

#: ``_times`` entry of an evicted message (its parts are emptied; removed lazily).
_GONE = float("-inf")


@dataclass(slots=True)  # not frozen: one is built per write, and frozen ones build slowly
class Batch:
    """What the writer sends next: lag counts per subscription, then frames in queue order.

    ``parts`` holds each frame as two byte strings, its body and its tail (``b""`` for a
    reply), so that the writer joins the whole batch at once; :attr:`frames` joins each
    frame, and ``size`` is their length in bytes. ``messages`` counts the ``msg`` frames;
    ``oldest`` is when the oldest of them was published (``None`` if there are none).
    """

    lags: dict[str, int]
    parts: list[Part]
    messages: int = 0
    oldest: float | None = None
    size: int = 0  # bytes in parts

    @property
    def frames(self) -> list[bytes]:
        """The frames, each body joined to its tail."""
        return join_pairs(self.parts)


def join_pairs(parts: list[Part]) -> list[bytes]:
    """``[body, tail, body, tail, ...]`` as ``[body + tail, ...]``: whole frames."""
    return [cast(bytes, parts[i]) + parts[i + 1] for i in range(0, len(parts), 2)]  # bodies: bytes


class QueueOwner(Protocol):
    """Who writes what a queue holds: starts its writer, and is asked first."""

    def take_wake_up(self) -> bool:
        """True to write for the writer (then :meth:`OutboundQueue.take_direct` or
        :meth:`OutboundQueue.wake_writer`); False to let the queue wake it."""
        ...

    def start_writer(self) -> None:
        """Start a writer: the last one ended with :meth:`OutboundQueue.writer_done`, and
        there is something to write."""
        ...


class OutboundQueue:
    """A bounded queue of encoded frames with per-topic full policies (see the module doc).

    A queued frame costs two list slots (body, tail) and a time (``None`` for a reply): no
    object per delivery. Only ``drop_oldest`` and ``conflate`` messages are also indexed by
    subscription (and by subscription and topic), by their entry number, so that they can be
    evicted or replaced; an evicted entry is emptied in place and skipped when taken. An entry
    of several frames (join and leave) has its count in ``_counts``, by entry number.
    """

    __slots__ = (
        "_base",
        "_bytes",
        "_closed",
        "_counts",
        "_dead",
        "_evictable",
        "_handed_off",
        "_idle",
        "_lags",
        "_latest",
        "_messages",
        "_parts",
        "_replies",
        "_room",
        "_times",
        "dropped_total",
        "drops",
        "full_since",
        "max_bytes",
        "max_messages",
        "max_replies",
        "owner",
    )

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
        self._parts: list[Part] = []  # body, tail of each queued entry, oldest first
        self._times: list[float | None] = []  # per entry: published; None: reply; _GONE
        self._base = 0  # the entry number of _times[0] (numbers only grow)
        self._dead = 0  # evicted entries still in the lists
        self._messages = 0
        self._replies = 0
        self._bytes = 0
        # drop_oldest and conflate only: entry numbers (and topics) per subscription, oldest
        # first; conflate: (sub, topic) -> the entry number of its queued message.
        self._evictable: dict[str, deque[tuple[int, str]]] = {}
        self._latest: dict[tuple[str, str], int] = {}
        self._counts: dict[int, int] = {}  # entry number -> frames, for entries of several
        self._lags: dict[str, int] = {}
        self._closed = False
        # No writer runs (it ended with writer_done): the next frame has the owner start one.
        self._idle = False
        # Created by a waiter, set and dropped by the next wake-up: an idle queue holds none.
        self._room: trio.Event | None = None  # publishers wait for the writer to take a batch
        # Starts the writer, and is asked first when something arrives (see the module doc);
        # _handed_off: it took charge, and is not asked again until it is done.
        self.owner: QueueOwner | None = None
        self._handed_off = False
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
        return _first_time(self._times)

    def _fits(
        self, size: int, messages: int | None = None, queued: int | None = None, count: int = 1
    ) -> bool:
        """Whether ``count`` more messages of ``size`` bytes fit with ``messages`` messages of
        ``queued`` bytes already queued (by default, what is queued now)."""
        if messages is None:
            messages = self._messages
        if not messages:
            # An oversized message still passes through an empty queue; a window of join and
            # leave frames never holds more than the bound.
            return count <= self.max_messages
        if queued is None:
            queued = self._bytes
        return messages + count <= self.max_messages and queued + size <= self.max_bytes

    # --- producers ---

    def put_reply(self, frame: bytes) -> None:
        """Queue a reply frame. Never dropped; see :meth:`wait_reply_room` for the bound."""
        if self._closed:
            return
        self._parts += (frame, b"")
        self._times.append(None)
        self._replies += 1
        self._bytes += len(frame)
        self._wake_writer()

    def put_replay(self, sub: str, topic: str, frame: bytes, tail: bytes, now: float = 0.0) -> None:
        """Queue a recovered message whatever the bounds (a replay is bounded by the topic's
        history size instead); it is never dropped, and counts as queued for later offers."""
        if self._closed:
            return
        self._append(sub, topic, frame, tail, now, _BLOCK)

    def offer(
        self, sub: str, topic: str, frame: bytes, tail: bytes, policy: Policy, now: float = 0.0
    ) -> Offer:
        """Try to queue ``frame + tail``, a message of ``topic`` for subscription ``sub``,
        published at ``now`` (:func:`~broker.core.stats.metrics_clock`)."""
        if self._closed:
            return Offer.CLOSED
        size = len(frame) + len(tail)
        messages = self._messages
        if not messages or (messages < self.max_messages and self._bytes + size <= self.max_bytes):
            if policy is _BLOCK or policy is _DROP_NEWEST:  # the common case, inlined
                parts = self._parts
                parts.append(frame)
                parts.append(tail)
                self._times.append(now)
                self._messages = messages + 1
                self._bytes += size
                if self._idle and not self._handed_off:
                    self._wake_writer()
            else:
                self._append(sub, topic, frame, tail, now, policy)
            return _QUEUED
        if policy is _BLOCK:
            self._append(sub, topic, frame, tail, now, policy)
            return _OVER
        return self._offer_when_full(sub, topic, frame, tail, policy, now)

    def _offer_when_full(
        self,
        sub: str,
        topic: str,
        frame: bytes,
        tail: Part,
        policy: Policy,
        now: float,
        count: int = 1,
    ) -> Offer:
        """:meth:`offer` of ``count`` messages (``frame + tail``) that do not fit as they are,
        under any policy but ``block``."""
        if policy is _DISCONNECT:
            return Offer.DISCONNECT
        size = len(frame) + len(tail)
        latest = self._latest.get((sub, topic)) if policy is _CONFLATE else None
        if latest is not None:
            i = 2 * (latest - self._base)
            parts = self._parts
            grown = size - len(parts[i]) - len(parts[i + 1])
            if grown <= 0 or self._messages == 1 or self._bytes + grown <= self.max_bytes:
                self._bytes += grown
                parts[i], parts[i + 1] = frame, tail  # keeps its place and publish time
                self._count_lag(sub, policy)
                return _QUEUED
        own = self._evictable.get(sub) if policy is not _DROP_NEWEST else None
        # Evict only if evicting is enough: otherwise the new message alone is dropped.
        if own and self._fits_without(own, size, count):
            if latest is not None:  # too big to replace in place: the one it replaces goes first
                own.remove((latest, topic))
                self._evict(sub, latest, topic, policy)
            while not self._fits(size, count=count):
                self._evict(sub, *own.popleft(), policy)
            if not own:
                del self._evictable[sub]
            self._append(sub, topic, frame, tail, now, policy, count)
            return _QUEUED
        self._count_lag(sub, policy, count)
        return _DROPPED

    def offer_events(
        self,
        sub: str,
        topic: str,
        frames: bytes | memoryview,
        count: int,
        policy: Policy,
        now: float = 0.0,
    ) -> Offer:
        """Offer ``count`` ``join`` and ``leave`` frames of ``topic`` for ``sub``, encoded
        together as ``frames`` (whole frames: one entry, which other queues may share, or a
        view of the end of one).

        They fit or go together, counted as ``count`` messages. Nobody waits for them: under
        ``block`` they are queued past the bound, up to twice the bound, and dropped (as lag)
        beyond; under ``conflate`` one member's event never replaces another's, so it is as
        ``drop_oldest``. The writer is woken as for :meth:`offer`."""
        if self._closed:
            return Offer.CLOSED
        if self._latest:  # a later message of the topic must not replace one ahead of these
            self._latest.pop((sub, topic), None)
        # Queued as the entry's tail: a view is as good as bytes to every reader of _parts
        # (len, b"".join, and b"" + view in join_pairs). Not cast: compiled, a cast checks.
        size, body, tail = len(frames), b"", frames
        if policy is _BLOCK:
            messages = self._messages
            if messages + count <= 2 * self.max_messages and (
                not messages or self._bytes + size <= 2 * self.max_bytes
            ):
                self._append(sub, topic, body, tail, now, policy, count)
                return _QUEUED
            self._count_lag(sub, policy, count)
            return _DROPPED
        if policy is _CONFLATE:
            policy = _DROP_OLDEST
        if self._fits(size, count=count):
            self._append(sub, topic, body, tail, now, policy, count)
            return _QUEUED
        return self._offer_when_full(sub, topic, body, tail, policy, now, count)

    def _fits_without(self, own: deque[tuple[int, str]], size: int, count: int) -> bool:
        """Whether ``count`` more messages of ``size`` bytes would fit once every entry of
        ``own`` is evicted: found by evicting in thought from the oldest, stopping as soon as
        it fits (so a full queue costs each new message the entries it evicts, not a walk
        over all of them)."""
        parts, base, counts = self._parts, self._base, self._counts
        messages, queued = self._messages, self._bytes
        for number, _ in own:
            index = 2 * (number - base)
            messages -= counts.get(number, 1) if counts else 1
            queued -= len(parts[index]) + len(parts[index + 1])
            if self._fits(size, messages, queued, count):
                return True
        return False

    def _append(
        self,
        sub: str,
        topic: str,
        frame: bytes,
        tail: Part,
        now: float,
        policy: Policy,
        count: int = 1,
    ) -> None:
        number = self._base + len(self._times)
        self._parts += (frame, tail)
        self._times.append(now)
        self._messages += count
        if count != 1:
            self._counts[number] = count
        self._bytes += len(frame) + len(tail)
        if policy is _DROP_OLDEST or policy is _CONFLATE:
            own = self._evictable.get(sub)
            if own is None:
                own = self._evictable[sub] = deque()
            own.append((number, topic))
            if policy is _CONFLATE:
                self._latest[(sub, topic)] = number
        self._wake_writer()

    def _evict(self, sub: str, number: int, topic: str, policy: Policy) -> None:
        index = number - self._base
        parts = self._parts
        self._bytes -= len(parts[2 * index]) + len(parts[2 * index + 1])
        parts[2 * index] = parts[2 * index + 1] = b""
        self._times[index] = _GONE
        self._dead += 1
        count = self._counts.pop(number, 1) if self._counts else 1
        self._messages -= count
        if self._latest.get((sub, topic)) == number:
            del self._latest[(sub, topic)]
        self._count_lag(sub, policy, count)
        if self._dead > 64 and self._dead > len(self._times) // 2:
            self._compact()

    def _compact(self) -> None:
        """Remove the evicted entries, renumbering the indexed ones."""
        base, times, parts = self._base, self._times, self._parts
        renumbered: dict[int, int] = {}
        kept_parts: list[Part] = []
        kept_times: list[float | None] = []
        for index, time in enumerate(times):
            if time != _GONE:
                renumbered[base + index] = base + len(kept_times)
                kept_times.append(time)
                kept_parts += parts[2 * index : 2 * index + 2]
        self._parts, self._times, self._dead = kept_parts, kept_times, 0
        for own in self._evictable.values():
            own_items = [(renumbered[number], topic) for number, topic in own]
            own.clear()
            own.extend(own_items)
        for key, number in self._latest.items():
            self._latest[key] = renumbered[number]
        self._counts = {renumbered[number]: count for number, count in self._counts.items()}

    def _count_lag(self, sub: str, policy: Policy, count: int = 1) -> None:
        self._lags[sub] = self._lags.get(sub, 0) + count
        self.dropped_total += count
        self.drops[policy] += count
        self._wake_writer()  # a lag notice is worth a write even with nothing else queued

    # --- waiting ---

    def _wake_writer(self) -> None:
        if self._idle and not self._handed_off:
            owner = self.owner
            if owner is not None and owner.take_wake_up():
                self._handed_off = True
                return
            self._resume_writer()

    def _resume_writer(self) -> None:
        self._idle = False
        if self.owner is not None:
            self.owner.start_writer()

    def wake_writer(self) -> None:
        """Have the owner start a writer now if none runs, even with nothing queued (say, to
        finish a partial write)."""
        self._handed_off = False
        if self._idle:
            self._resume_writer()

    def writer_done(self) -> None:
        """The writer ends, having found nothing to write: the next frame (or
        :meth:`wake_writer`) asks the owner for another (:meth:`QueueOwner.start_writer`)."""
        self._idle = True

    def _wake_publishers(self) -> None:
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    async def _wait_room_event(self) -> None:
        if self._room is None:
            self._room = trio.Event()
        await self._room.wait()

    @property
    def full(self) -> bool:
        """Whether the queue holds its bound of messages or bytes (or more: see ``block``)."""
        return self._messages >= self.max_messages or self._bytes >= self.max_bytes

    async def wait_room(self) -> None:
        """Wait until the writer takes a batch (or the queue closes); ``full_since`` says since
        when publishers have been waiting."""
        if self._closed:
            return
        if self.full_since is None:
            self.full_since = trio.current_time()
        await self._wait_room_event()

    @property
    def replies_full(self) -> bool:
        """Whether :meth:`wait_reply_room` would wait."""
        return self._replies >= self.max_replies and not self._closed

    async def wait_reply_room(self) -> None:
        """Wait while more than ``max_replies`` replies are queued (the client is not reading)."""
        while self._replies >= self.max_replies and not self._closed:
            await self._wait_room_event()

    @property
    def pending(self) -> bool:
        """Whether there is something to write: frames or lag counts."""
        return bool(self._messages or self._replies or self._lags)

    # --- consumer ---

    def take_direct(
        self, max_frames: int, max_bytes: int
    ) -> tuple[list[Part], int, float | None, int] | None:
        """For a write by someone else than the writer (``Connection.write_held``): if
        no writer runs, at most ``max_frames`` frames in at most ``max_bytes`` are queued
        and there is no lag to report, take them all, as :meth:`take_batch` would, as
        ``(parts, messages, oldest, size)`` (no :class:`Batch` built). Otherwise take nothing
        and answer ``None``. Either way the writer's wake-up is no longer handed off."""
        self._handed_off = False
        times = self._times
        if (
            not self._idle
            or not times
            or len(times) > max_frames
            or self._bytes > max_bytes
            or self._dead
            or self._lags
            or self._evictable
        ):
            return None
        return self._take_everything()

    def _take_everything(self) -> tuple[list[Part], int, float | None, int]:
        """Take every entry when none is evicted or indexed: (parts, messages, oldest, size)."""
        times, parts, messages, size = self._times, self._parts, self._messages, self._bytes
        if not messages:
            oldest = None
        elif not self._replies:
            oldest = times[0]  # nothing evicted either: the first entry is a message
        else:
            oldest = _first_time(times)
        self._parts, self._times = [], []
        self._base += len(times)
        self._bytes = self._messages = self._replies = 0
        if self._counts:
            self._counts = {}
        self.full_since = None
        if self._room is not None:
            self._wake_publishers()
        return parts, messages, oldest, size

    def take_batch(self, max_bytes: int) -> Batch:
        """Take lag counts and the oldest frames, up to ``max_bytes`` (at least one frame)."""
        if self._bytes <= max_bytes and not (self._dead or self._lags or self._evictable):
            return Batch({}, *self._take_everything())  # the common case
        times = self._times
        if self._bytes <= max_bytes:  # everything: no per-frame work
            parts, taken_times = self._parts, times
            self._parts, self._times = [], []
            count, taken = len(times), self._bytes
            messages, replies, dead = self._messages, self._replies, self._dead
        else:
            parts, count, taken, messages, replies, dead = self._cut(max_bytes)
            taken_times = times[:count]
            del times[:count]
            del self._parts[: 2 * count]
        if dead:
            parts = [
                part
                for index, time in enumerate(taken_times)
                if time != _GONE
                for part in parts[2 * index : 2 * index + 2]
            ]
            self._dead -= dead
        self._base += count
        self._bytes -= taken
        self._messages -= messages
        self._replies -= replies
        if self._evictable or self._counts:
            self._forget_taken()
        lags, self._lags = self._lags, {}
        self.full_since = None
        self._wake_publishers()
        # queue order is publish order (conflate keeps the slot)
        oldest = _first_time(taken_times) if messages else None
        return Batch(lags, parts, messages, oldest, taken)

    def _cut(self, max_bytes: int) -> tuple[list[Part], int, int, int, int, int]:
        """How many entries fit in ``max_bytes`` (at least one frame): the taken parts, the
        count of entries, their bytes, the count of messages, of replies and of evicted
        entries among them."""
        parts, times, counts = self._parts, self._times, self._counts
        taken = messages = replies = dead = count = 0
        for count, time in enumerate(times):
            if time == _GONE:
                dead += 1
                continue
            size = len(parts[2 * count]) + len(parts[2 * count + 1])
            if (messages or replies) and taken + size > max_bytes:
                break
            taken += size
            if time is None:
                replies += 1
            elif counts:
                messages += counts.get(self._base + count, 1)
            else:
                messages += 1
        else:
            count = len(times)
        return parts[: 2 * count], count, taken, messages, replies, dead

    def _forget_taken(self) -> None:
        """Drop the index entries of taken messages."""
        base = self._base
        for sub, own in list(self._evictable.items()):
            while own and own[0][0] < base:
                own.popleft()
            if not own:
                del self._evictable[sub]
        for key, number in list(self._latest.items()):
            if number < base:
                del self._latest[key]
        for number in [number for number in self._counts if number < base]:
            del self._counts[number]

    def close(self) -> None:
        """Refuse new frames and wake every waiter; what is queued can still be taken."""
        self._closed = True
        self.wake_writer()
        self._wake_publishers()

    def clear(self) -> None:
        """Discard everything queued (a closing slow consumer gets no more messages)."""
        self._base += len(self._times)
        self._parts, self._times = [], []
        self._evictable.clear()
        self._latest.clear()
        self._counts.clear()
        self._lags.clear()
        self._messages = self._replies = self._bytes = self._dead = 0


def _first_time(times: list[float | None]) -> float | None:
    """The first message's publish time among ``times`` (skipping replies and evictions)."""
    for time in times:
        if time is not None and time != _GONE:
            return time
    return None
