"""Who may publish to which topics and subscribe to which patterns.

A :class:`Permissions` holds two lists of patterns (the ``*``/``>`` syntax of
:mod:`broker.protocol.topics`). Publishing to a topic is allowed if a ``publish`` pattern
matches it.
Subscribing to a pattern is allowed only if one ``subscribe`` pattern *covers* it: every topic
the requested pattern can match, the granted one matches too. So ``chat.>`` covers ``chat.*``
and ``chat.a.b``, but ``chat.*`` does not cover ``chat.>`` (which also matches ``chat.a.b``).
A subscription is never split across several grants: ``a.*`` and ``a.*.>`` together match
everything ``a.>`` does, yet ``a.>`` is refused, because one subscription is one pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.core.rules import IdentityLimits
from broker.protocol.topics import pattern_matches


def covers(granted: str, requested: str) -> bool:
    """True if every topic the valid pattern ``requested`` matches, ``granted`` matches too."""
    granted_segments = granted.split(".")
    requested_segments = requested.split(".")
    for index, segment in enumerate(granted_segments):
        if segment == ">":  # matches whatever ``requested`` has from here on (>= 1 segment)
            return len(requested_segments) > index
        if index >= len(requested_segments):
            return False  # ``requested`` matches topics shorter than ``granted`` needs
        wanted = requested_segments[index]
        if wanted == ">":
            return False  # ``requested`` matches longer topics; only a ``>`` grant covers them
        if segment != "*" and segment != wanted:
            return False  # a literal grant covers only that literal, not ``*``
    return len(granted_segments) == len(requested_segments)


@dataclass(frozen=True, slots=True)
class Permissions:
    """The ``publish`` and ``subscribe`` pattern lists granted to one client."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    @classmethod
    def allow_all(cls) -> Permissions:
        """Publish and subscribe anywhere (what ``auth.mode = "none"`` grants)."""
        return cls(publish=(">",), subscribe=(">",))

    @property
    def empty(self) -> bool:
        """True if nothing at all is granted."""
        return not self.publish and not self.subscribe

    def may_publish(self, topic: str) -> bool:
        """True if a ``publish`` pattern matches the concrete ``topic``."""
        for pattern in self.publish:  # noqa: SIM110 (no generator: this runs once per pub)
            if pattern_matches(pattern, topic):
                return True
        return False

    def may_subscribe(self, pattern: str) -> bool:
        """True if one ``subscribe`` pattern covers ``pattern`` (see :func:`covers`)."""
        return any(covers(granted, pattern) for granted in self.subscribe)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client: its name, its grants, when its token expires (Unix time),
    and the limits its token sets."""

    subject: str
    permissions: Permissions
    expires_at: float | None = None
    limits: IdentityLimits = field(default_factory=IdentityLimits)
    info: Any = None  # the token's own presence info (trusted), if it has one
    anonymous: bool = False  # no token: auth mode "none"

    @property
    def user(self) -> str | None:
        """The token's subject, as presence shows it (``None`` when anonymous)."""
        return None if self.anonymous else self.subject


ANONYMOUS = Identity("anonymous", Permissions.allow_all(), anonymous=True)
