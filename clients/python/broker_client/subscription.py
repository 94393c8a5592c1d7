"""A subscription as the user sees it: an async iterator of :class:`Message` over a bounded buffer.

The client's reader puts each ``msg`` for this pattern into the buffer (and, for a
subscription made with ``join_leave=True``, each :class:`~broker_client.presence.Join` and
:class:`~broker_client.presence.Leave`, in the order they arrived). When the buffer is full
the reader waits, so it stops reading the socket, TCP pushes back on the broker, and the
topic's ``on_full`` policy decides (block, drop with ``lag``, or disconnect). Memory never grows
without bound. On a concrete topic with history, a refill (:mod:`broker_client.refill`) then
puts there what the broker dropped, read back (and, with ``gaps=True``, a :class:`Gap` for what
it could not). Because one reader serves the whole connection, one full subscription pauses
the others on the same client too (like NATS's per-connection flow control): give a slow
consumer its own client if the others must not wait.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal

import anyio

from broker_client.presence import Join, Leave, PresenceGap
from broker_client.recovery import Position, Recovery

log = logging.getLogger("broker_client")


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message: its ``topic``, its ``data``, and the ``pattern`` that matched.

    ``offset`` is its place in the topic's history, on topics whose history the broker keeps.
    """

    topic: str
    data: Any
    pattern: str
    offset: int | None = None


Why = Literal["evicted", "history_lost", "read_failed"]
"""Why a :class:`Gap`'s offsets will never come."""

_WHY: dict[str, str] = {
    "evicted": "the topic no longer keeps them",
    "history_lost": "the topic's history was lost (a new epoch)",
    "read_failed": "the history read failed",
}


@dataclass(frozen=True, slots=True)
class Gap:
    """Offsets ``first`` to ``last`` (both included) of ``topic`` will never come: a refill
    found them, and a subscription made with ``gaps=True`` yields this between the messages
    around them (see :meth:`Client.subscribe <broker_client.client.Client.subscribe>`).

    ``why`` is ``"evicted"`` when the topic no longer keeps them (more than its
    ``history_size`` were published since, or they outlived ``history_ttl``),
    ``"history_lost"`` when its history was lost (a new epoch), ``"read_failed"`` when the
    broker refused the ``history`` read (``unavailable`` in a cluster whose Redis is down) or
    did not answer it within ``reply_timeout``.
    """

    topic: str
    first: int
    last: int
    why: Why

    def __str__(self) -> str:
        span = f"{self.first}..{self.last}"
        return f"messages {span} of {self.topic} will never come: {_WHY[self.why]}"


Event = Message | Join | Leave | PresenceGap | Gap
"""What a subscription made with ``join_leave=True`` yields."""

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    from broker_client.refill import Refill

    # What a subscription yields: a plain one, Message (or Message | Gap with gaps=True;
    # Message is PEP 696's default, so that a bare ``Subscription`` annotation means
    # ``Subscription[Message]``); one with join_leave, Event.
    Item = TypeVar("Item", default=Message)
else:
    from typing import TypeVar

    Item = TypeVar("Item")  # Python 3.11's TypeVar takes no default; only checkers read it


class Subscription(Generic[Item]):
    """Messages matching ``pattern``, in order; iterate with ``async for``.

    On a concrete topic with history it refills (unless subscribed with ``refill=False``):
    messages the broker dropped for it are read back and yielded in offset order; offsets
    that will never come are counted in ``gaps`` and, if subscribed with ``gaps=True``,
    yielded as a :class:`Gap`; ``refills`` counts the reads.

    ``dropped`` counts messages the broker dropped for this subscription (its ``lag`` notices);
    ``gaps`` counts reconnects after which messages may be missing (recovery failed or was
    impossible) and the gaps a refill found; each of both also logs a warning. The iteration
    ends when the subscription or the client is closed, or raises the error that ended the
    client (``Forbidden``, ``ConnectionLost``).

    With ``join_leave`` (a ``Subscription[Event]``), the iteration also yields a
    :class:`~broker_client.presence.Join` or :class:`~broker_client.presence.Leave` for each
    member that comes to or leaves a matching presence topic, and a
    :class:`~broker_client.presence.PresenceGap` where some of those may be missing (a
    ``lag``: the broker dropped messages or events for it; a reconnect). ``dropped`` then
    counts dropped events too.
    """

    def __init__(
        self,
        pattern: str,
        buffer_size: int,
        recovery: Recovery,
        refill: Refill,
        join_leave: bool = False,
        yields_gaps: bool = False,
    ) -> None:
        self.pattern = pattern
        self.join_leave = join_leave
        self.yields_gaps = yields_gaps  # a refill's Gap is yielded, not only counted
        self.dropped = 0
        self.gaps = 0
        self._recovery = recovery
        self._refill = refill
        self._send, self._receive = anyio.create_memory_object_stream[Item](buffer_size)
        self._error: BaseException | None = None

    @property
    def buffered(self) -> int:
        """Messages received from the broker and not yet taken by the consumer."""
        return self._receive.statistics().current_buffer_used

    @property
    def position(self) -> Position | None:
        """The topic's ``epoch`` and the ``offset`` of the last message received, if it has
        history (a concrete topic whose ``[[topics]]`` rule sets ``history_size``).
        """
        return self._recovery.position

    @property
    def recovered(self) -> bool | None:
        """The last reconnect's outcome: ``True`` nothing was missed, ``False`` messages may
        be missing, ``None`` no reconnect yet or nothing to recover (no history).
        """
        return self._recovery.recovered

    @property
    def refilling(self) -> bool:
        """True while a refill is reading back what the broker dropped (the live messages
        meanwhile wait, up to the buffer's size, or are read back too)."""
        return self._refill.active

    @property
    def refills(self) -> int:
        """The ``history`` reads its refills made (each of up to 1000 messages)."""
        return self._refill.reads

    async def receive(self) -> Item:
        """The next message (or event); raises ``StopAsyncIteration`` (or the client's
        error) at the end."""
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None

    def __aiter__(self) -> Subscription[Item]:
        return self

    async def __anext__(self) -> Item:
        return await self.receive()

    # --- called by the client ---

    def _deliver_nowait(self, item: Item) -> None:
        """Buffer ``item``; raises ``anyio.WouldBlock`` when full."""
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._send.send_nowait(item)  # raises nothing if the consumer is gone

    async def _deliver(self, item: Item) -> None:
        """Buffer ``item``, waiting for room (this is the backpressure)."""
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._send.send(item)

    def _lag(self, dropped: int) -> None:
        self.dropped += dropped
        refilled = " (read back from the topic's history)" if self._refill.enabled else ""
        log.warning(
            "subscription %r: the broker dropped %d message(s) (%d in all): consumer too slow%s",
            self.pattern,
            dropped,
            self.dropped,
            refilled,
        )

    def _gap(self, why: str) -> None:
        self.gaps += 1
        log.warning("subscription %r: messages may be missing after the reconnect: %s",
                    self.pattern, why)  # fmt: skip

    def _lost(self, gap: Gap) -> None:
        self.gaps += 1
        log.warning("subscription %r: %s (%s)", self.pattern, gap, gap.why)

    def _end(self, error: BaseException | None = None) -> None:
        """No more messages: the iteration ends after the buffer, raising ``error`` if given."""
        self._error = error
        self._send.close()

    def _discard(self) -> None:
        """The consumer left: close the buffer so the reader never waits on it."""
        self._receive.close()
        self._send.close()
