"""Token buckets with explicit times: no clock, no sleeping."""

from __future__ import annotations

import pytest

from broker.ratelimit import PublishLimiter, TokenBucket


def test_a_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2, burst=4, now=100.0)
    for _ in range(4):
        assert bucket.can_take(1, 100.0)
        bucket.take(1, 100.0)
    assert not bucket.can_take(1, 100.0)
    assert not bucket.can_take(1, 100.4)  # 0.8 tokens
    assert bucket.can_take(1, 100.5)
    assert bucket.tokens(1000.0) == 4  # never more than the burst


def test_a_clock_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(rate=10, burst=1, now=5.0)
    bucket.take(1, 5.0)
    assert bucket.tokens(4.0) == 0


def test_rate_and_burst_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)


def test_the_limiter_refuses_when_messages_run_out_and_takes_nothing() -> None:
    limiter = PublishLimiter(rate=1, burst=2, bytes_rate=1000, bytes_burst=1000, now=0.0)
    assert limiter.try_publish(10, 0.0)
    assert limiter.try_publish(10, 0.0)
    assert not limiter.try_publish(10, 0.0)
    assert limiter.bytes.tokens(0.0) == 980  # the refused publish took no bytes
    assert limiter.try_publish(10, 1.0)


def test_the_limiter_refuses_when_bytes_run_out() -> None:
    limiter = PublishLimiter(rate=100, burst=100, bytes_rate=100, bytes_burst=150, now=0.0)
    assert limiter.try_publish(100, 0.0)
    assert not limiter.try_publish(100, 0.0)
    assert limiter.messages.tokens(0.0) == 99
    assert limiter.try_publish(100, 0.5)


def test_a_publish_bigger_than_the_byte_burst_waits_for_a_full_bucket() -> None:
    limiter = PublishLimiter(rate=100, burst=100, bytes_rate=100, bytes_burst=100, now=0.0)
    assert limiter.try_publish(300, 0.0)  # full bucket: admitted, the bucket goes into debt
    assert not limiter.try_publish(300, 2.0)  # still paying back: -200 + 200 = 0
    assert limiter.try_publish(300, 3.0)
