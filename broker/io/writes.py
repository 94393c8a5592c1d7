"""Direct writes: a reader writes to idle subscribers itself, once, at the end of what it ran.

Waking (or starting) a connection's writer task for every message costs a task switch per
subscriber per publish. Instead, while a reader runs the commands of one read
(:meth:`DirectWrites.run`), each subscriber queue that gets data while no writer runs hands
its wake-up here (:meth:`DirectWrites.take`, asked by the queue through its owner); when the
run ends, each of them is written once, by the reader, if its socket takes it without waiting (see
:meth:`broker.io.connection.Connection.write_held`), else its writer is started. While
:meth:`DirectWrites.flush_writes` runs (the server runs it), those writes wait for it instead:
it makes them once per scheduler pass, so a subscriber that several readers gave messages in
one pass gets one write (small-topics, 4 publishers: 0.04-0.07 writes per routed message
instead of 0.11-0.18).

:meth:`~DirectWrites.run` calls a plain function: nothing can await while wake-ups are taken,
and no other task can run meanwhile, so only the holder's own offers are ever taken. A queue
whose wake-up was taken wakes its writer for nothing else until it is written (or closed). The
hub never writes: it only queues, and the queues' owners (the connections, in this layer)
write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

T = TypeVar("T")


class HeldWriter(Protocol):
    """A connection whose wake-up was taken: it writes at the end of the run."""

    def write_held(self) -> None:
        """Write what was queued for it (or wake its writer)."""


class DirectWrites:
    """The broker's one place where wake-ups are held and writes made at the end of a run."""

    __slots__ = ("_deferring", "_flush", "_held", "_holding")

    def __init__(self) -> None:
        self._held: list[HeldWriter] = []
        self._holding = False
        self._deferring = False  # while flush_writes runs: it writes, once per scheduler pass
        self._flush: trio.Event | None = None  # set when something is held for it

    def run(self, function: Callable[..., T], *args: object) -> T:
        """Call ``function(*args)`` (a plain, synchronous function) holding wake-ups; then
        let every connection whose wake-up it took write (while :meth:`flush_writes` runs:
        in its next turn, together with those of every other run before it)."""
        self._holding = True
        try:
            return function(*args)
        finally:
            self._holding = False
            if self._held:
                if not self._deferring:
                    self._write_held()
                elif self._flush is not None:
                    self._flush.set()
                    self._flush = None

    def _write_held(self) -> None:
        held, self._held = self._held, []
        for writer in held:
            writer.write_held()

    async def flush_writes(self) -> None:
        """Until cancelled, make the held writes of every run in one scheduler pass together,
        in the next one: a subscriber given messages by several readers in one pass gets one
        write, not one per reader."""
        self._deferring = True
        try:
            while True:
                self._flush = trio.Event()
                if not self._held:
                    await self._flush.wait()
                else:
                    await trio.lowlevel.checkpoint()
                self._write_held()
        finally:
            self._deferring = False
            self._flush = None
            self._write_held()

    def take(self, writer: HeldWriter) -> bool:
        """During :meth:`run`, take ``writer``'s wake-up (it writes at the end) and answer
        True; otherwise False (its queue wakes its writer)."""
        if self._holding:
            self._held.append(writer)
            return True
        return False
