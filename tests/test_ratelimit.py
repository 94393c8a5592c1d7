"""Publish rate limits with explicit times: no clock, no sleeping."""

from __future__ import annotations

import pytest

from broker.core.ratelimit import PublishLimiter, publish_limiter


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


def test_rates_and_bursts_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        PublishLimiter(rate=-1, burst=1, bytes_rate=1, bytes_burst=1, now=0)
    with pytest.raises(ValueError):
        PublishLimiter(rate=1, burst=1, bytes_rate=1, bytes_burst=-1, now=0)


def test_a_rate_of_zero_is_no_limit_and_no_limiter_at_all() -> None:
    assert publish_limiter(0, 0, 0, 0, now=0) is None
    limiter = PublishLimiter(rate=0, burst=0, bytes_rate=10, bytes_burst=10, now=0)
    assert all(limiter.try_publish(1, now=0) for _ in range(10))  # only bytes count
    assert not limiter.try_publish(1, now=0)
    messages_only = PublishLimiter(rate=2, burst=0, bytes_rate=0, bytes_burst=0, now=0)
    assert [messages_only.try_publish(10**9, now=0) for _ in range(3)] == [True, True, False]
    assert messages_only.try_publish(10**9, now=0.5)  # the burst defaults to a second's worth


def test_a_slow_rate_without_a_burst_still_lets_one_message_through() -> None:
    limiter = PublishLimiter(rate=0.5, burst=0, bytes_rate=0, bytes_burst=0, now=0)
    assert limiter.try_publish(1, now=0)
    assert not limiter.try_publish(1, now=1)
    assert limiter.try_publish(1, now=2)


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
