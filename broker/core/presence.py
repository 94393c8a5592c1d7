"""Presence: who is subscribed to a presence topic now, as pages of members. Pure; no I/O.

A connection is a *member* of a concrete topic whose rule says ``presence = true`` while it
holds a subscription made with exactly that topic. A :class:`Roster` keeps one node's members
per topic, ordered by their ``client`` id, so that a page of members is a slice after a
cursor (the last ``client`` of the page before): paging through a topic that changes
meanwhile returns each member that stayed present exactly once, and costs memory for one
page only. Join and leave *events* are the hub's (:meth:`broker.core.hub.Hub.announce`);
where members are kept across nodes is the delivery's (:class:`Presence`).
"""

from __future__ import annotations

import bisect
import itertools
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from broker.core.hub import Hub

#: The most members one ``presence`` answer carries (and its default ``limit``).
MAX_PAGE = 1000

# A client id: this process's random prefix, then a counter in fixed-width hex, so that one
# process's ids sort in the order it made them (a roster appends them).
_PROCESS = secrets.token_hex(6)
_COUNTER = itertools.count(1)


def new_client_id() -> str:
    """A ``client`` id no other connection has had, on any node, before or after a restart."""
    return f"{_PROCESS}-{next(_COUNTER):010x}"


@dataclass(frozen=True, slots=True)
class Member:
    """One connection present on a topic: its ``client`` id (unique per connection across
    every node and restart), its token's ``user`` (``None`` when anonymous) and its ``info``."""

    client: str
    user: str | None
    info: Any

    def as_map(self) -> dict[str, Any]:
        """The member as the wire carries it."""
        return {"client": self.client, "user": self.user, "info": self.info}


@dataclass(frozen=True, slots=True)
class Page:
    """A ``presence`` answer: ``count`` members now, up to ``limit`` of them, and the
    ``cursor`` to ask for the next page with (``None`` when no more remain)."""

    count: int
    members: list[Member]
    cursor: str | None

    def fields(self) -> dict[str, Any]:
        """The ``ok`` reply's fields."""
        fields: dict[str, Any] = {
            "count": self.count,
            "members": [member.as_map() for member in self.members],
        }
        if self.cursor is not None:
            fields["cursor"] = self.cursor
        return fields


class Roster:
    """Members per topic, ordered by ``client`` id (see the module doc)."""

    __slots__ = ("_topics", "members")

    def __init__(self) -> None:
        # Per topic: members by client id, and the client ids sorted (for pages).
        self._topics: dict[str, tuple[dict[str, Member], list[str]]] = {}
        self.members = 0  # over all topics

    def __len__(self) -> int:
        """How many topics have members."""
        return len(self._topics)

    def join(self, topic: str, member: Member) -> bool:
        """Add ``member`` to ``topic``; False if it was there already."""
        entry = self._topics.get(topic)
        if entry is None:
            entry = self._topics[topic] = ({}, [])
        by_client, order = entry
        if member.client in by_client:
            return False
        by_client[member.client] = member
        if not order or order[-1] < member.client:
            order.append(member.client)  # one node's ids grow: the usual case
        else:
            bisect.insort(order, member.client)
        self.members += 1
        return True

    def leave(self, topic: str, client: str) -> Member | None:
        """Remove ``client`` from ``topic``; the member it was, or ``None``."""
        entry = self._topics.get(topic)
        if entry is None:
            return None
        by_client, order = entry
        member = by_client.pop(client, None)
        if member is None:
            return None
        del order[bisect.bisect_left(order, client)]
        if not by_client:
            del self._topics[topic]
        self.members -= 1
        return member

    def count(self, topic: str) -> int:
        """How many members ``topic`` has."""
        entry = self._topics.get(topic)
        return 0 if entry is None else len(entry[0])

    def page(self, topic: str, limit: int = MAX_PAGE, cursor: str | None = None) -> Page:
        """Up to ``limit`` members of ``topic`` after ``cursor``, in ``client`` order."""
        entry = self._topics.get(topic)
        if entry is None:
            return Page(0, [], None)
        by_client, order = entry
        start = 0 if cursor is None else bisect.bisect_right(order, cursor)
        clients = order[start : start + limit]
        more = start + limit < len(order)
        return Page(
            len(order),
            [by_client[client] for client in clients],
            clients[-1] if more and clients else None,
        )

    def topics_of(self, client: str) -> list[str]:
        """The topics ``client`` is a member of (slow: for tests and re-announcing)."""
        return [topic for topic, (by_client, _) in self._topics.items() if client in by_client]

    def items(self) -> list[tuple[str, Member]]:
        """Every (topic, member) pair, for re-announcing them elsewhere."""
        return [
            (topic, member) for topic, (by, _) in self._topics.items() for member in by.values()
        ]


class Presence(Protocol):
    """Where members are kept: this node's :class:`Roster`, or shared by every node."""

    def join(self, topic: str, member: Member, now: float) -> None:
        """``member`` subscribed to ``topic``: add it, and announce its join everywhere."""

    def leave(self, topic: str, member: Member, now: float) -> None:
        """``member`` left ``topic``: remove it, and announce its leave everywhere."""

    async def page(self, topic: str, limit: int, cursor: str | None) -> Page:
        """A page of ``topic``'s members on every node. Raises
        :class:`~broker.core.delivery.Unavailable` if other nodes cannot be asked now."""

    @property
    def members(self) -> int:
        """How many members this node holds, over all topics."""

    @property
    def topics(self) -> int:
        """How many topics have members on this node."""


class LocalPresence:
    """One node's presence: its :class:`Roster`, and join and leave announced by its hub."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self.roster = Roster()

    def join(self, topic: str, member: Member, now: float) -> None:
        """Add ``member`` and announce its join to the subscriptions that asked."""
        self._joined(topic, member, now)

    def leave(self, topic: str, member: Member, now: float) -> None:
        """Remove ``member`` and announce its leave to the subscriptions that asked."""
        self._left(topic, member, now)

    def _joined(self, topic: str, member: Member, now: float) -> bool:
        """Add and announce ``member``; False if it was there already."""
        if not self.roster.join(topic, member):
            return False
        self._hub.announce(topic, "join", member.as_map(), now)
        return True

    def _left(self, topic: str, member: Member, now: float) -> bool:
        """Remove and announce ``member``; False if it was not there."""
        if self.roster.leave(topic, member.client) is None:
            return False
        self._hub.announce(topic, "leave", member.as_map(), now)
        return True

    async def page(self, topic: str, limit: int, cursor: str | None) -> Page:
        """A page of the roster."""
        return self.roster.page(topic, limit, cursor)

    @property
    def members(self) -> int:
        """Members over all topics."""
        return self.roster.members

    @property
    def topics(self) -> int:
        """Topics with members."""
        return len(self.roster)
