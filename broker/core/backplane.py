"""The cluster backplane: how the hubs of several broker nodes share published messages.

The hub sees a backplane through :class:`Backplane`: it :meth:`~Backplane.publish`\\ es every
message accepted from a local client, and it :meth:`~Backplane.follow`\\ s the patterns its
local clients subscribe to (reference-counted, in step with local subscriptions), so the
backplane only brings this node the messages some local client wants. :meth:`~Backplane.run`
hands each message published on another node to ``deliver`` (the hub's local fan-out), one at
a time in arrival order, through a bounded buffer.

:class:`NoBackplane` is the embedded single-node mode: nothing leaves the process and it costs
nothing. :class:`~broker.cluster.backplane.RedisBackplane` shares messages through Redis pub/sub.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from broker.core.history import Position

#: The hub's local fan-out of a message from another node: ``deliver(topic, packed_data,
#: position)``; ``position`` is set for messages numbered by a shared history.
Deliver = Callable[[str, bytes, Position | None], Awaitable[object]]
#: Called when messages from other nodes may have been missed (after an outage).
Missed = Callable[[], None]


class BackplaneUnavailable(Exception):
    """The backplane cannot take messages now; ``str()`` says why, for the ``err`` frame."""


class Backplane(Protocol):
    """What the hub needs from a backplane (see the module doc)."""

    @property
    def active(self) -> bool:
        """False when there is no backplane at all, so the hub can skip its work."""

    def follow(self, pattern: str) -> None:
        """One more local subscription to ``pattern``; must not block."""

    def refuse_to_follow(self, pattern: str) -> str | None:
        """Why this node cannot follow one more subscription to ``pattern``, if it cannot."""

    def unfollow(self, pattern: str) -> None:
        """One local subscription to ``pattern`` fewer; must not block."""

    async def wait_followed(self, pattern: str) -> None:
        """Return once messages published anywhere on topics matching ``pattern`` reach this
        node (at once if the backplane is down: they cannot reach it anyway)."""

    async def publish(self, topic: str, packed: bytes, *, wait: bool = True) -> None:
        """Hand a locally accepted message (``packed`` = its msgpack ``data``) to the other
        nodes; raises :class:`BackplaneUnavailable` if they cannot be reached. Without
        ``wait`` it may return once the message is queued, in order, for the other nodes."""

    async def run(
        self,
        deliver: Deliver,
        missed: Missed,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Feed other nodes' messages to ``deliver`` until cancelled; call ``missed`` when
        some may have been lost (Redis was unreachable for a while)."""


class NoBackplane:
    """The single-node mode: no other node, nothing to share."""

    active = False

    def follow(self, pattern: str) -> None:
        """Nothing to do."""

    def refuse_to_follow(self, pattern: str) -> None:
        """Every pattern can be followed."""

    def unfollow(self, pattern: str) -> None:
        """Nothing to do."""

    async def wait_followed(self, pattern: str) -> None:
        """Nothing to wait for."""

    async def publish(self, topic: str, packed: bytes, *, wait: bool = True) -> None:
        """No other node to reach."""

    async def run(
        self,
        deliver: Deliver,
        missed: Missed,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Returns at once."""
        task_status.started()


GLOB_SPECIAL = "\\*?[]"


def glob_escape(text: str) -> str:
    """``text`` with Redis glob specials escaped, so it matches only itself."""
    return "".join("\\" + char if char in GLOB_SPECIAL else char for char in text)


#: A glob keeps at most this many wildcards: Redis matches every glob against every channel
#: published, and a glob of many stars costs it far more than one of two.
GLOB_WILDCARDS = 2


def redis_glob(prefix: str, pattern: str) -> str:
    """A Redis PSUBSCRIBE glob matching at least the channels of the topics ``pattern`` matches.

    Redis' ``*`` also matches dots, so ``chat.*`` brings ``chat.a.b`` too: the hub's own
    matcher filters again on delivery. ``>`` (one or more segments) becomes ``?*``. The glob
    ends at the pattern's :data:`GLOB_WILDCARDS`-th wildcard (``a.*.b.*.c.*`` follows
    ``a.*.b.*``), which covers the rest.
    """
    segments: list[str] = []
    wildcards = 0
    for segment in pattern.split("."):
        if segment in ("*", ">"):
            wildcards += 1
            segments.append("*" if segment == "*" else "?*")
            if wildcards == GLOB_WILDCARDS:
                break
        else:
            segments.append(glob_escape(segment))
    return glob_escape(prefix) + ".".join(segments)
