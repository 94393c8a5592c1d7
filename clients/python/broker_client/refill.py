"""Refill, as a small pure object: reading back what the broker dropped for a subscription.

On a topic whose ``on_full`` policy drops, a subscriber that falls behind loses messages at the
broker (a ``lag``), and the next message's offset jumps. On a concrete topic that keeps history
the topic still has them: a :class:`Refill` holds the message that jumped and the live ones
after it (up to a cap: the subscription's buffer size; past it they are not kept, only their
highest offset is noted), asks for the missing offsets one ``history`` read at a time (a
:class:`Read` of at most :data:`MAX_READ`), and hands everything over in offset order, as if
nothing had been dropped. Offsets that will never come (the topic no longer keeps them, its
history was lost, or the read failed) become a :class:`~broker_client.subscription.Gap`,
between the messages around them. So every offset is handed over exactly once, as a message
or inside a gap, and the refill holds at most the cap plus one answer, however far behind.

A live offset that goes back means the topic's numbering started again (a new epoch, which
``msg`` does not name): what was missing of the old numbering is a gap (``history_lost``), and
a refill in the new one reads without ``since`` (from the oldest kept), which names the new
epoch and brings the new numbering's earlier messages.

The client feeds it (sans-IO): :meth:`Refill.take` each live message, then, in a task of its
own while the refill is :attr:`~Refill.active`, hands over each :meth:`~Refill.next_item`,
makes each :meth:`~Refill.next_read` and gives the answer to :meth:`~Refill.answered`. The
position it hands over from and to is the subscription's
:class:`~broker_client.recovery.Recovery`, so a connection that drops mid-refill resumes
(``since``) right after the last message handed over.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker_client.recovery import Recovery
from broker_client.subscription import Gap, Message, Why

#: The most messages one ``history`` read asks for (the protocol's largest ``limit``).
MAX_READ = 1000


@dataclass(frozen=True, slots=True)
class Read:
    """One ``history`` read: the kept messages after offset ``after`` of ``epoch``, for the
    missing offsets up to ``end``."""

    epoch: str | None  # None: not known yet (the numbering started again); read from the oldest
    after: int
    end: int

    def frame(self, topic: str) -> dict[str, Any]:
        """The ``history`` frame (without ``id``) for ``topic``."""
        limit = max(1, min(MAX_READ, self.end - self.after))
        frame: dict[str, Any] = {"op": "history", "topic": topic, "limit": limit}
        if self.epoch is not None:
            frame["since"] = {"epoch": self.epoch, "offset": self.after}
        return frame


class Refill:
    """The refill of one subscription to ``topic``, whose position ``recovery`` keeps.

    ``wanted``: refill was asked for, on a concrete topic. ``cap`` bounds the live messages
    held meanwhile; ``reads`` counts the ``history`` reads made.
    """

    def __init__(self, topic: str, recovery: Recovery, cap: float, enabled: bool = True) -> None:
        self.topic = topic
        self.reads = 0
        self.wanted = enabled and recovery.concrete
        self._recovery = recovery
        self._cap = cap
        self._held: deque[tuple[int, Message]] | None = None  # held live; None: not refilling
        self._ready: deque[Message | Gap] = deque()  # to hand over, in offset order
        self._epoch: str | None = ""
        self._last = 0  # the offset of the last item handed over or ready
        self._highest = 0  # the highest offset seen live while refilling

    @property
    def enabled(self) -> bool:
        """True where it refills: asked to, on a concrete topic that keeps history (the
        broker named its epoch)."""
        return self.wanted and self._recovery.position is not None

    @property
    def active(self) -> bool:
        """True from a jump until every offset up to the highest seen is handed over."""
        return self._held is not None

    @property
    def highest(self) -> int:
        """The highest offset seen while refilling (0 when not)."""
        return self._highest if self._held is not None else 0

    def take(self, message: Message) -> bool:
        """A live message. ``True`` if the refill takes it: it starts one (the offset jumped,
        or the numbering started again) or holds it, or leaves it to a read (past the cap);
        ``False``: hand it over now. Call :meth:`Recovery.restarted` with :attr:`highest`
        first.
        """
        offset = message.offset
        if offset is None or not self.wanted:
            return False
        recovery = self._recovery
        if self._held is None:
            if recovery.renumbered:  # read the new epoch's name and earlier messages
                self._start(message, None, 0)
                return True
            after, position = recovery.missing_after(offset), recovery.position
            if after is None or position is None:
                return False
            self._start(message, position.epoch, after)
            return True
        if offset <= self._highest:  # the numbering started again while refilling
            self._give_up("history_lost")
            self._start(message, None, 0)
        else:
            self._highest = offset
            if len(self._held) < self._cap:
                self._held.append((offset, message))
        return True

    def _start(self, message: Message, epoch: str | None, after: int) -> None:
        """Refill from offset ``after`` of ``epoch`` up to ``message``, which is held."""
        offset = message.offset
        assert offset is not None
        self._held = deque([(offset, message)])
        self._epoch, self._last, self._highest = epoch, after, offset

    def next_item(self) -> Message | Gap | None:
        """The next message or gap to hand over, if one is ready (then call
        :meth:`handed_over`); the held messages that follow on from the last are."""
        if not self._ready:
            while self._held and self._held[0][0] == self._last + 1:
                self._pass(*self._held.popleft())
        return self._ready[0] if self._ready else None

    def handed_over(self) -> None:
        """The item :meth:`next_item` gave reached the subscriptions: it is the position now."""
        item = self._ready.popleft()
        self._recovery.delivered(item.last if isinstance(item, Gap) else item.offset)

    def next_read(self) -> Read | None:
        """Once :meth:`next_item` is ``None``: the read for the next missing offsets (up to
        the first held message, else the highest seen), or ``None`` when none is missing:
        the refill is over (or was stopped)."""
        if self._held is None:
            return None
        if self._held:
            end = self._held[0][0] - 1
        elif self._highest > self._last or self._epoch is None:  # or the epoch to learn
            end = self._highest
        else:
            self.stop()
            return None
        self.reads += 1
        return Read(self._epoch, self._last, end)

    def answered(self, read: Read, reply: Mapping[str, object]) -> None:
        """Take the ``ok`` of ``read``: its messages are ready, with a gap for the missing
        offsets it does not have (evicted), or for all that remain if the epoch changed."""
        if self._held is None:
            return
        epoch = reply.get("epoch")
        if read.epoch is None and isinstance(epoch, str):  # the new numbering's name
            self._epoch = epoch
            self._recovery.adopt(epoch)
        elif epoch != read.epoch or epoch is None:
            self._give_up("history_lost")
            return
        before = self._last
        messages = reply.get("messages")
        for entry in messages if isinstance(messages, list) else ():
            offset = entry.get("offset") if isinstance(entry, Mapping) else None
            if not isinstance(offset, int) or offset <= self._last:
                continue
            if offset > read.end:
                break
            self._pass(offset, Message(self.topic, entry.get("data"), self.topic, offset))
        # None of the missing ones: none is kept any more (a read that only learned the
        # epoch, from the oldest kept, may have brought none: the next asks from our offset).
        if self._last == before < read.end and read.epoch is not None:
            self._lose(read.end, "evicted")

    def failed(self) -> None:
        """The read failed: what it was for, and every offset still missing, is a gap."""
        if self._held is not None:
            self._give_up("read_failed")

    def stop(self) -> None:
        """End the refill where it is: what it held or had ready is let go (the position is
        the last item handed over, so a resubscription's ``since`` brings the rest)."""
        self._held = None
        self._ready.clear()
        self._highest = 0

    def _give_up(self, why: Why) -> None:
        """No more reads for what is missing now: the held messages are ready, and the
        offsets between and after them are gaps."""
        held, self._held = self._held or deque(), deque()
        if self._epoch is None:  # nor learn the epoch: the next resubscription names it
            self._epoch = ""
        for offset, message in held:
            self._pass(offset, message, why)
        if self._highest > self._last:
            self._lose(self._highest, why)

    def _pass(self, offset: int, message: Message, why: Why = "evicted") -> None:
        if offset > self._last + 1:
            self._lose(offset - 1, why)
        self._ready.append(message)
        self._last = offset

    def _lose(self, last: int, why: Why) -> None:
        self._ready.append(Gap(self.topic, self._last + 1, last, why))
        self._last = last
