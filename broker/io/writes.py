"""Direct writes: a reader writes to idle subscribers itself, once, at the end of what it ran.

Waking a connection's writer task for every message costs a task switch per subscriber per
publish. Instead, while a reader runs the commands of one read (:meth:`DirectWrites.run`),
each subscriber queue that gets data for a writer asleep hands its wake-up here
(:meth:`DirectWrites.take`, asked by the queue through its owner); when the run ends, each of them
is written once, by the reader, if its socket takes it without waiting (see
:meth:`broker.io.connection.Connection.write_held`), else its writer is woken.

:meth:`~DirectWrites.run` calls a plain function: nothing can await while wake-ups are held,
and no other task can run meanwhile, so only the holder's own offers are ever taken. The
hub never writes: it only queues, and the queues' owners (the connections, in this layer)
write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class HeldWriter(Protocol):
    """A connection whose wake-up was taken: it writes at the end of the run."""

    def write_held(self) -> None:
        """Write what was queued for it (or wake its writer)."""


class DirectWrites:
    """The broker's one place where wake-ups are held and writes made at the end of a run."""

    __slots__ = ("_held", "_holding")

    def __init__(self) -> None:
        self._held: list[HeldWriter] = []
        self._holding = False

    def run(self, function: Callable[..., T], *args: object) -> T:
        """Call ``function(*args)`` (a plain, synchronous function) holding wake-ups; then
        let every connection whose wake-up it took write."""
        self._holding = True
        try:
            return function(*args)
        finally:
            self._holding = False
            held = self._held
            if held:
                self._held = []
                for writer in held:
                    writer.write_held()

    def take(self, writer: HeldWriter) -> bool:
        """During :meth:`run`, take ``writer``'s wake-up (it writes at the end) and answer
        True; otherwise False (its queue wakes its writer)."""
        if self._holding:
            self._held.append(writer)
            return True
        return False
