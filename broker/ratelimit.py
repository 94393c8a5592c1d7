"""Token buckets for publish rate limits: pure, driven by the caller's clock.

A :class:`TokenBucket` holds up to ``burst`` tokens and gains ``rate`` per second; taking
more than it holds fails and takes nothing. A :class:`PublishLimiter` pairs a message bucket
with a byte bucket, so a connection is bounded in both messages and bytes per second.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    __slots__ = ("_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be greater than 0")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def tokens(self, now: float) -> float:
        """How many tokens there are at time ``now`` (seconds, monotonic)."""
        elapsed = max(0.0, now - self._updated)
        return min(self.burst, self._tokens + elapsed * self.rate)

    def can_take(self, amount: float, now: float) -> bool:
        """True if ``amount`` tokens are available at ``now``."""
        return self.tokens(now) >= amount

    def set(self, tokens: float, now: float) -> None:
        """Hold ``tokens`` as of ``now`` (what :meth:`tokens` said, less what was taken)."""
        self._tokens = tokens
        self._updated = max(now, self._updated)

    def take(self, amount: float, now: float) -> None:
        """Remove ``amount`` tokens (check :meth:`can_take` first; this may go negative)."""
        self._tokens = self.tokens(now) - amount
        self._updated = max(now, self._updated)


class PublishLimiter:
    """Messages per second and bytes per second for one connection's publishes."""

    __slots__ = ("bytes", "messages")

    def __init__(
        self, rate: float, burst: float, bytes_rate: float, bytes_burst: float, now: float
    ) -> None:
        self.messages = TokenBucket(rate, burst, now)
        self.bytes = TokenBucket(bytes_rate, bytes_burst, now)

    def try_publish(self, size: int, now: float) -> bool:
        """Account one publish of ``size`` bytes at ``now``; False (nothing taken) if over.

        A publish larger than the byte burst is admitted once the byte bucket is full, so a
        ``max_payload`` above ``publish_bytes_burst`` slows big publishes instead of refusing
        them for ever.
        """
        messages, data = self.messages, self.bytes
        have = messages.tokens(now)
        if have < 1:
            return False
        have_bytes = data.tokens(now)
        if have_bytes < min(size, data.burst):
            return False
        messages.set(have - 1, now)
        data.set(have_bytes - size, now)
        return True
