"""Recovery across reconnects, as a small pure object: where a subscription is in its history.

On a concrete topic that keeps history the broker's ``ok`` names the topic's ``epoch`` and
latest ``offset``, and each ``msg`` carries its ``offset``. A :class:`Recovery` remembers the
last offset delivered, gives the ``since`` to resubscribe with after a reconnect, and reads
the broker's answer: did the reconnect lose messages, and why. Offsets only grow, by 1 per
message, and the broker replays only what is newer, so a live offset that is not above the
last one means the topic's numbering started again (its history was lost: a new epoch, which
``msg`` does not name): :meth:`Recovery.restarted` tells it, and the epoch is learned anew.

A reconnect is never silent: a subscription that cannot recover (a topic that keeps no
history, or a wildcard: a position belongs to one topic, and the broker refuses ``since`` on a
pattern) is told, after each reconnect, that what was published meanwhile is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a topic's history: ``offset`` counts messages within ``epoch``."""

    epoch: str
    offset: int


def is_concrete(pattern: str) -> bool:
    """True for a topic, False for a pattern with a ``*`` or ``>`` segment."""
    return not any(segment in ("*", ">") for segment in pattern.split("."))


class Recovery:
    """The history position of one broker subscription (sans-IO: the client feeds it).

    ``position`` is the last message delivered (``None`` until the broker named an epoch);
    ``recovered`` is the answer of the last resubscription: ``True`` nothing was missed,
    ``False`` messages may be missing, ``None`` nothing to recover (no history, no reconnect).
    ``renumbered``: the topic's offsets started again, and its new epoch is not known yet.
    """

    def __init__(self, pattern: str) -> None:
        self.concrete = is_concrete(pattern)
        self.recovered: bool | None = None
        self.renumbered = False
        self._epoch: str | None = None
        self._offset = 0
        # From a resubscription that told messages after _offset were no longer kept, until
        # the next message: the topic's latest offset then. The kept tail replayed next may
        # jump up to it, which is no news.
        self._told_until = 0

    @property
    def position(self) -> Position | None:
        """The topic's epoch and the offset of the last message delivered, once known."""
        return None if self._epoch is None else Position(self._epoch, self._offset)

    def since(self) -> dict[str, object] | None:
        """The ``since`` of a resubscription: only a concrete topic with a known epoch has one."""
        if not self.concrete or self._epoch is None:
            return None
        return {"epoch": self._epoch, "offset": self._offset}

    def missing_after(self, offset: int) -> int | None:
        """The offset after which messages before ``offset`` (a live one) are missing and
        untold, or ``None``: it follows on from the last delivered, or jumps no further than
        a resubscription told (or the epoch is not known)."""
        if self._epoch is None:
            return None
        last = max(self._offset, self._told_until)
        return last if offset > last + 1 else None

    def restarted(self, offset: object, seen: int = 0) -> str | None:
        """Why messages may be missing if a live ``offset`` is not above the last delivered
        (nor above ``seen``, the highest a refill holds): the topic's numbering started again.
        The epoch is then unknown (:attr:`renumbered`) until a ``history`` read
        (:meth:`adopt`) or the next resubscription names it."""
        if not (self.concrete and self._epoch is not None and isinstance(offset, int)):
            return None
        last = max(self._offset, seen)
        if offset > last:
            return None
        self.renumber()
        return (
            f"the topic's history was lost (its offsets started again at {offset}): what was "
            f"published after offset {last} of its old epoch may be missing"
        )

    def renumber(self) -> None:
        """The topic's offsets started again: forget the epoch until :meth:`adopt`."""
        self._epoch, self._offset, self._told_until = None, 0, 0
        self.renumbered = True

    def adopt(self, epoch: str) -> None:
        """After :meth:`renumber`: the new numbering's epoch, named by a ``history`` answer."""
        if self.renumbered:
            self._epoch, self.renumbered = epoch, False

    def delivered(self, offset: object) -> None:
        """A message reached the subscriptions: it is the last one seen (call it after, not
        before: a message whose delivery was cancelled by a drop must be asked for again).
        """
        if isinstance(offset, int) and self.concrete:
            self._offset = offset
        self._told_until = 0

    def subscribed(self, reply: Mapping[str, object]) -> None:
        """Take the ``ok`` of the first ``sub``."""
        self._take_position(reply)

    def resubscribed(self, reply: Mapping[str, object]) -> str | None:
        """Take the ``ok`` of a resubscription; returns why messages may be missing, if so."""
        why = self._loss(reply)
        if why is not None:
            self.recovered = False
        elif "recovered" in reply:
            self.recovered = True
        kept_epoch = reply.get("recovered") is False and reply.get("epoch") == self._epoch
        self._take_position(reply)
        latest = reply.get("offset")
        self._told_until = latest if kept_epoch and isinstance(latest, int) else 0
        return why

    def forget(self, why: str) -> str:
        """The position is unknown (the resubscription went unanswered): deliver every offset
        from now on, and resubscribe without ``since`` next time. Returns ``why``.
        """
        self._epoch, self.recovered, self._told_until = None, False, 0
        return why

    def _loss(self, reply: Mapping[str, object]) -> str | None:
        recovered = reply.get("recovered")
        if recovered is True:
            return None
        epoch = reply.get("epoch")
        if recovered is False:
            if epoch is None:
                return "the topic keeps no history any more"
            if epoch != self._epoch:
                return f"the topic's history was lost (new epoch {epoch})"
            return f"messages after offset {self._offset} were no longer kept"
        # No since was sent: nothing published while the client was away comes back.
        if not self.concrete:
            return (
                "reconnected: a wildcard subscription cannot recover what was published while "
                "the client was away (subscribe to each topic that keeps history for that)"
            )
        if epoch is None:
            return (
                "reconnected: the topic keeps no history, so what was published on it while "
                "the client was away is not replayed"
            )
        return "reconnected: what was published while the client was away may be missing"

    def _take_position(self, reply: Mapping[str, object]) -> None:
        # The broker goes on after our offset if it kept the epoch and had reached the offset
        # (what it replays is newer); otherwise after its latest, which becomes ours.
        epoch, latest = reply.get("epoch"), reply.get("offset")
        if not isinstance(epoch, str) or not isinstance(latest, int):
            return
        if epoch != self._epoch or latest < self._offset:
            self._epoch, self._offset = epoch, latest
        self.renumbered = False
