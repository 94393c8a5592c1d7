"""Publish rate limits: token buckets, pure, driven by the caller's clock.

A :class:`PublishLimiter` holds two buckets, one of messages and one of bytes, so a connection
can be bounded in both messages and bytes per second. Each holds up to its burst and gains its
rate per second; a publish takes one message and its size in bytes, or, if either bucket is
short, nothing. A rate of 0 turns its bucket off (no limit); a burst of 0 with a rate is one
second's worth (at least one message). :func:`publish_limiter` gives ``None`` when both are off.
"""

from __future__ import annotations

_OFF = float("inf")  # a bucket that never runs short (elapsed time is > 0 when multiplied)


class PublishLimiter:
    """Messages per second and bytes per second for one connection's publishes; starts full."""

    __slots__ = ("_bytes", "_messages", "_updated", "burst", "bytes_burst", "bytes_rate", "rate")

    def __init__(
        self, rate: float, burst: float, bytes_rate: float, bytes_burst: float, now: float
    ) -> None:
        if min(rate, burst, bytes_rate, bytes_burst) < 0:
            raise ValueError("rates and bursts must be 0 (no limit) or more")
        self.rate, self.burst = (rate, burst or max(rate, 1.0)) if rate else (_OFF, _OFF)
        self.bytes_rate, self.bytes_burst = (
            (bytes_rate, bytes_burst or bytes_rate) if bytes_rate else (_OFF, _OFF)
        )
        self._messages, self._bytes = self.burst, self.bytes_burst
        self._updated = now

    def tokens(self, now: float) -> tuple[float, float]:
        """The messages and bytes available at ``now`` (seconds, monotonic)."""
        self._refill(now)
        return self._messages, self._bytes

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:  # a clock going backwards adds nothing
            self._updated = now
            messages = self._messages + elapsed * self.rate
            self._messages = messages if messages < self.burst else self.burst
            data = self._bytes + elapsed * self.bytes_rate
            self._bytes = data if data < self.bytes_burst else self.bytes_burst

    def try_publish(self, size: int, now: float) -> bool:
        """Account one publish of ``size`` bytes at ``now``; False (nothing taken) if over.

        A publish larger than the byte burst is admitted once the byte bucket is full, so a
        ``max_payload`` above ``publish_bytes_burst`` slows big publishes instead of refusing
        them for ever (the bucket goes into debt).
        """
        if now > self._updated:
            self._refill(now)
        if self._messages < 1:
            return False
        if self._bytes < (size if size < self.bytes_burst else self.bytes_burst):
            return False
        self._messages -= 1
        self._bytes -= size
        return True


def publish_limiter(
    rate: float, burst: float, bytes_rate: float, bytes_burst: float, now: float
) -> PublishLimiter | None:
    """A :class:`PublishLimiter`, or ``None`` if both rates are 0 (no limit at all)."""
    if not rate and not bytes_rate:
        return None
    return PublishLimiter(rate, burst, bytes_rate, bytes_burst, now)
