"""Recovery across reconnects, as a small pure object: where a subscription is in its history.

On a concrete topic that keeps history the broker's ``ok`` names the topic's ``epoch`` and
latest ``offset``, and each ``msg`` carries its ``offset``. A :class:`Recovery` remembers the
last offset delivered, gives the ``since`` to resubscribe with after a reconnect, drops
replayed messages already delivered (a safety net: the broker replays only what is newer),
and reads the broker's answer: did the reconnect lose messages, and why.

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
    ``loss_reported`` is true from a resubscription that reported a loss until the next
    message: its offset may jump over what was reported (the kept tail replayed after an
    eviction), which is no news.
    """

    def __init__(self, pattern: str) -> None:
        self.concrete = is_concrete(pattern)
        self.recovered: bool | None = None
        self.loss_reported = False
        self._epoch: str | None = None
        self._offset = 0

    @property
    def position(self) -> Position | None:
        """The topic's epoch and the offset of the last message delivered, once known."""
        return None if self._epoch is None else Position(self._epoch, self._offset)

    def since(self) -> dict[str, object] | None:
        """The ``since`` of a resubscription: only a concrete topic with a known epoch has one."""
        if not self.concrete or self._epoch is None:
            return None
        return {"epoch": self._epoch, "offset": self._offset}

    def is_new(self, offset: object) -> bool:
        """``False`` for a replayed message that was already delivered."""
        return not (
            self.concrete
            and self._epoch is not None
            and isinstance(offset, int)
            and offset <= self._offset
        )

    def delivered(self, offset: object) -> None:
        """A message reached the subscriptions: it is the last one seen (call it after, not
        before: a message whose delivery was cancelled by a drop must be asked for again).
        """
        if isinstance(offset, int) and self.concrete:
            self._offset = offset
        self.loss_reported = False

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
        self._take_position(reply)
        self.loss_reported = why is not None
        return why

    def forget(self, why: str) -> str:
        """The position is unknown (the resubscription went unanswered): deliver every offset
        from now on, and resubscribe without ``since`` next time. Returns ``why``.
        """
        self._epoch, self.recovered = None, False
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
