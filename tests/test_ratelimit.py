"""Publish rate limits with explicit times: no clock, no sleeping."""

from __future__ import annotations

import pytest

from broker.ratelimit import PublishLimiter


def test_the_buckets_start_full_and_refill_at_their_rate() -> None:
    limiter = PublishLimiter(rate=2, burst=4, bytes_rate=1000, bytes_burst=1000, now=100.0)
    for _ in range(4):
        assert limiter.try_publish(1, 100.0)
    assert not limiter.try_publish(1, 100.0)
    assert not limiter.try_publish(1, 100.4)  # 0.8 messages
    assert limiter.try_publish(1, 100.5)
    assert limiter.tokens(1000.0) == (4, 1000)  # never more than the burst


def test_a_clock_going_backwards_adds_nothing() -> None:
    limiter = PublishLimiter(rate=10, burst=1, bytes_rate=10, bytes_burst=10, now=5.0)
    assert limiter.try_publish(10, 5.0)
    assert limiter.tokens(4.0) == (0, 0)
    assert not limiter.try_publish(1, 4.0)


def test_rates_and_bursts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PublishLimiter(rate=0, burst=1, bytes_rate=1, bytes_burst=1, now=0)
    with pytest.raises(ValueError):
        PublishLimiter(rate=1, burst=1, bytes_rate=1, bytes_burst=0, now=0)


def test_the_limiter_refuses_when_messages_run_out_and_takes_nothing() -> None:
    limiter = PublishLimiter(rate=1, burst=2, bytes_rate=1000, bytes_burst=1000, now=0.0)
    assert limiter.try_publish(10, 0.0)
    assert limiter.try_publish(10, 0.0)
    assert not limiter.try_publish(10, 0.0)
    assert limiter.tokens(0.0) == (0, 980)  # the refused publish took no bytes
    assert limiter.try_publish(10, 1.0)


def test_the_limiter_refuses_when_bytes_run_out() -> None:
    limiter = PublishLimiter(rate=100, burst=100, bytes_rate=100, bytes_burst=150, now=0.0)
    assert limiter.try_publish(100, 0.0)
    assert not limiter.try_publish(100, 0.0)
    assert limiter.tokens(0.0) == (99, 50)
    assert limiter.try_publish(100, 0.5)


def test_a_publish_bigger_than_the_byte_burst_waits_for_a_full_bucket() -> None:
    limiter = PublishLimiter(rate=100, burst=100, bytes_rate=100, bytes_burst=100, now=0.0)
    assert limiter.try_publish(300, 0.0)  # full bucket: admitted, the bucket goes into debt
    assert not limiter.try_publish(300, 2.0)  # still paying back: -200 + 200 = 0
    assert limiter.try_publish(300, 3.0)
