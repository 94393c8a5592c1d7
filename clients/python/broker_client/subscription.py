"""A subscription as the user sees it: an async iterator of :class:`Message` over a bounded buffer.

The client's reader puts each ``msg`` for this pattern into the buffer. When the buffer is full
the reader waits, so it stops reading the socket, TCP pushes back on the broker, and the
topic's ``on_full`` policy decides (block, drop with ``lag``, or disconnect). Memory never grows
without bound. Because one reader serves the whole connection, one full subscription pauses
the others on the same client too (like NATS's per-connection flow control): give a slow
consumer its own client if the others must not wait.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import trio

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


class Subscription:
    """Messages matching ``pattern``, in order; iterate with ``async for``.

    ``dropped`` counts messages the broker dropped for this subscription (its ``lag`` notices);
    ``gaps`` counts reconnects after which messages may be missing (recovery failed or was
    impossible); each of both also logs a warning. The iteration ends when the subscription or
    the client is closed, or raises the error that ended the client (``Forbidden``,
    ``ConnectionLost``).
    """

    def __init__(self, pattern: str, buffer_size: int, recovery: Recovery) -> None:
        self.pattern = pattern
        self.dropped = 0
        self.gaps = 0
        self._recovery = recovery
        self._send, self._receive = trio.open_memory_channel[Message](buffer_size)
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

    async def receive(self) -> Message:
        """The next message; raises ``StopAsyncIteration`` (or the client's error) at the end."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        return await self.receive()

    # --- called by the client ---

    def _deliver_nowait(self, message: Message) -> None:
        """Buffer ``message``; raises ``trio.WouldBlock`` when full."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._send.send_nowait(message)  # raises nothing if the consumer is gone

    async def _deliver(self, message: Message) -> None:
        """Buffer ``message``, waiting for room (this is the backpressure)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send.send(message)

    def _lag(self, dropped: int) -> None:
        self.dropped += dropped
        log.warning(
            "subscription %r: the broker dropped %d message(s) (%d in all): consumer too slow",
            self.pattern,
            dropped,
            self.dropped,
        )

    def _gap(self, why: str) -> None:
        self.gaps += 1
        log.warning("subscription %r: messages may be missing after the reconnect: %s",
                    self.pattern, why)  # fmt: skip

    def _end(self, error: BaseException | None = None) -> None:
        """No more messages: the iteration ends after the buffer, raising ``error`` if given."""
        self._error = error
        self._send.close()

    def _discard(self) -> None:
        """The consumer left: close the buffer so the reader never waits on it."""
        self._receive.close()
