"""Presence as the client sees it: members, pages of them, join and leave events. Pure; no I/O.

A topic whose ``[[topics]]`` rule says ``presence = true`` knows its *members*: the
connections subscribed to exactly that topic (docs/presence.md). :meth:`Client.presence
<broker_client.client.Client.presence>` reads them a page at a time (a :class:`Presence`);
a subscription made with ``join_leave=True`` also yields a :class:`Join` or :class:`Leave`
per member that comes or goes, between its messages, in the order they arrived. When some of
those events may be missing (the broker dropped some for a slow consumer, or the connection
was lost and made again), it yields a :class:`PresenceGap`: read :meth:`Client.presence
<broker_client.client.Client.presence>` again.

Keeping a member list from them, the usual way::

    async with client.subscribe("room.1", join_leave=True) as sub:
        here = {m.client: m async for m in client.members("room.1")}
        async for event in sub:
            match event:
                case Join(member=m):
                    here[m.client] = m
                case Leave(member=m):
                    here.pop(m.client, None)
                case PresenceGap():
                    here = {m.client: m async for m in client.members("room.1")}
                case Message():
                    ...

Applying each event to a map keyed by ``client`` is right however the events and the read
interleave: an event that came before the read sets what the read already says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The most members one ``presence`` answer carries (and the default ``limit``).
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Member:
    """One connection present on a topic.

    ``client`` is unique per connection, across every node and restart (one person with two
    tabs is two members); ``user`` is its token's subject (``None`` when anonymous); ``info``
    comes from its token when the token has one (trusted), else from its ``subscribe(...,
    info=...)``, else ``None``.
    """

    client: str
    user: str | None
    info: Any = None


@dataclass(frozen=True, slots=True)
class Presence:
    """One answer of :meth:`Client.presence <broker_client.client.Client.presence>`.

    ``count`` members are on the topic now; ``members`` holds up to the ``limit`` asked for,
    ordered by ``client``; ``cursor`` asks for the next page, ``None`` when no more remain.
    """

    count: int
    members: tuple[Member, ...]
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class _Change:
    """A member came or went on ``topic``; ``pattern`` is the subscription that was told."""

    topic: str
    member: Member
    pattern: str


@dataclass(frozen=True, slots=True)
class Join(_Change):
    """``member`` subscribed to ``topic``; ``pattern`` is the subscription that was told."""


@dataclass(frozen=True, slots=True)
class Leave(_Change):
    """``member`` left ``topic`` (unsubscribed, or its connection ended for any reason)."""


@dataclass(frozen=True, slots=True)
class PresenceGap:
    """Join and leave events of the subscription to ``pattern`` may be missing here, and
    ``why``: a member list kept from them may be wrong. Read the members again
    (:meth:`Client.members <broker_client.client.Client.members>`); the events after this
    one go on from there.
    """

    pattern: str
    why: str


def member_from_map(value: object) -> Member:
    """The :class:`Member` of a wire map ``{"client", "user", "info"}``."""
    fields: Mapping[str, Any] = value if isinstance(value, Mapping) else {}
    user = fields.get("user")
    return Member(str(fields.get("client", "")), None if user is None else str(user),
                  fields.get("info"))  # fmt: skip


def presence_from_reply(reply: Mapping[str, object]) -> Presence:
    """The :class:`Presence` of a ``presence`` op's ``ok`` reply."""
    count, members, cursor = reply.get("count"), reply.get("members"), reply.get("cursor")
    return Presence(
        count if isinstance(count, int) else 0,
        tuple(member_from_map(m) for m in members) if isinstance(members, list) else (),
        cursor if isinstance(cursor, str) else None,
    )


def event_from_frame(frame: Mapping[str, Any], pattern: str) -> Join | Leave:
    """The :class:`Join` or :class:`Leave` of a ``join`` or ``leave`` frame for ``pattern``."""
    kind = Join if frame.get("op") == "join" else Leave
    return kind(str(frame.get("topic", "")), member_from_map(frame.get("member")), pattern)
