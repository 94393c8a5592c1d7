"""The client's bounded send queue, shared by every connection the client makes.

Frames wait here until a writer sends them, so publishing during a reconnect buffers (up to
the bound) instead of failing. A frame whose caller gave up (timeout, cancellation) before it
was sent is skipped, so a publish that raised is never delivered behind the caller's back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio
import trio


class OutboxFull(anyio.WouldBlock, trio.WouldBlock):
    """The outbox holds ``outbox_size`` frames: an ``anyio.WouldBlock``, and a
    ``trio.WouldBlock`` as the client raised before it ran under asyncio too."""


class Pending:
    """A command awaiting its reply: set by the reader (``reply``) or the client (``error``).

    ``on_ok`` is called with an ``ok`` reply as the reader takes it, before the frames behind it.
    """

    def __init__(self, on_ok: Callable[[dict[str, object]], None] | None = None) -> None:
        self.on_ok = on_ok
        self.done = anyio.Event()
        self.reply: dict[str, object] | None = None
        self.error: BaseException | None = None
        self.written = False  # handed to a connection: a drop before the reply loses it
        self.abandoned = False  # the caller gave up: do not send it

    def resolve(self, reply: dict[str, object] | None, error: BaseException | None) -> None:
        """Answer the waiting caller (first answer wins)."""
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()
            if reply is not None and reply.get("op") == "ok" and self.on_ok is not None:
                self.on_ok(reply)


Item = tuple[bytes, Pending | None]


class Outbox:
    """A FIFO of encoded frames holding at most ``max_frames``."""

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self._items: deque[Item] = deque()
        self._in_flight = 0
        self._changed: anyio.Event | None = None  # made when someone waits: set on a change

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, frame: bytes, pending: Pending | None = None) -> None:
        """Queue ``frame``; raises :class:`OutboxFull` when the outbox is full."""
        if len(self._items) >= self.max_frames:
            raise OutboxFull
        self._items.append((frame, pending))
        self._notify()

    async def put(self, frame: bytes, pending: Pending | None = None) -> None:
        """Queue ``frame``, waiting for room."""
        while len(self._items) >= self.max_frames:
            await self._wait()
        self.put_nowait(frame, pending)

    def put_first(self, items: list[Item]) -> None:
        """Queue ``items`` ahead of everything (resubscriptions after a reconnect)."""
        self._items.extendleft(reversed(items))
        self._notify()

    async def take_batch(self, max_bytes: int) -> list[Item]:
        """Wait for frames, then take what is queued, up to ``max_bytes`` (at least one frame).

        Call :meth:`sent` once the batch is written.
        """
        while True:
            while not self._items:
                await self._wait()
            batch: list[Item] = []
            size = 0
            while self._items and (not batch or size + len(self._items[0][0]) <= max_bytes):
                frame, pending = self._items.popleft()
                if pending is not None and pending.abandoned:
                    continue
                batch.append((frame, pending))
                size += len(frame)
            if batch:
                self._in_flight = len(batch)
                self._notify()
                return batch

    def sent(self) -> None:
        """The batch from :meth:`take_batch` is written (or lost)."""
        self._in_flight = 0
        self._notify()

    async def wait_flushed(self, gone: Callable[[], bool]) -> None:
        """Wait until nothing is queued or being written, or ``gone()`` (the connection that
        would write it ended: checked at each change and each :meth:`wake`)."""
        while (self._items or self._in_flight) and not gone():
            await self._wait()

    def wake(self) -> None:
        """Make :meth:`wait_flushed` check ``gone()`` again."""
        self._notify()

    async def _wait(self) -> None:
        """Wait for the next change (a frame queued or taken, a batch written)."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
