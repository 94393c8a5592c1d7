"""The broker URLs a client may use, and which to try next: a small pure object.

A client given several URLs (the nodes of a cluster, say) tries them in a shuffled order, so
that clients spread over the nodes. It stays on the one it is connected to; when a
connection attempt fails (unreachable, refused with 503, timed out) it moves on to the next
at once, and only once every URL has failed in a row does it wait its backoff delay. A
broker's ``Retry-After`` keeps its URL from being tried again before then.
"""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Endpoint:
    """One broker URL, parsed for the connection: where to connect, what to ask for."""

    url: str
    host: str
    port: int
    host_header: str  # the URL's host[:port], for the Host header
    resource: str  # the path and query
    tls: bool  # wss://
    not_before: float = 0.0  # do not try before this (event loop) time: its Retry-After

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """The endpoint of a ``ws://`` or ``wss://`` URL; ValueError for anything else."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"the URL must be ws://HOST[:PORT] or wss://HOST[:PORT], not {url!r}")
        tls = parts.scheme == "wss"
        return cls(
            url=url,
            host=parts.hostname,
            port=parts.port or (443 if tls else 80),
            host_header=parts.netloc.rpartition("@")[2],
            resource=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            tls=tls,
        )


class Endpoints:
    """The client's URLs in the order it tries them, and where it is in that order."""

    def __init__(self, urls: str | Sequence[str], *, shuffle: bool = True) -> None:
        listed = [urls] if isinstance(urls, str) else list(urls)
        if not listed:
            raise ValueError("give the broker's URL, or a list of them")
        self.all = [Endpoint.parse(url) for url in listed]
        if shuffle:
            random.shuffle(self.all)
        self._index = 0
        self._failed_in_a_row = 0

    @property
    def current(self) -> Endpoint:
        """The URL to connect to next (the one connected to, while connected)."""
        return self.all[self._index]

    def connected(self) -> None:
        """A connection to :attr:`current` succeeded: a new round of failures starts."""
        self._failed_in_a_row = 0

    def failed(self, now: float, retry_after: float | None = None) -> bool:
        """A connection attempt to :attr:`current` failed at ``now`` (event loop time); move on.
        True while some URL has not failed in a row yet (try it at once); False once all
        have (wait the backoff delay, then start a new round)."""
        if retry_after is not None:
            self.current.not_before = now + retry_after
        self._failed_in_a_row += 1
        self._index = (self._index + 1) % len(self.all)
        if self._failed_in_a_row < len(self.all):
            return True
        self._failed_in_a_row = 0
        return False

    def wait(self, now: float) -> float:
        """Seconds until :attr:`current` may be tried (its broker's Retry-After)."""
        return max(0.0, self.current.not_before - now)
