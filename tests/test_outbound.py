"""broker.core.outbound: the bounded queue, its five on_full policies, and its waits."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from broker.core.outbound import Offer, OutboundQueue, Policy

BLOCK, DROP_OLDEST, DROP_NEWEST = Policy.BLOCK, Policy.DROP_OLDEST, Policy.DROP_NEWEST
CONFLATE, DISCONNECT = Policy.CONFLATE, Policy.DISCONNECT
EVERYTHING = 1 << 30


def offer(queue: OutboundQueue, sub: str, topic: str, text: str, policy: Policy) -> Offer:
    """Offer the message ``text`` (body) with tail ``|sub``, so taken frames read ``text|sub``."""
    return queue.offer(sub, topic, text.encode(), f"|{sub}".encode(), policy)


def take_all(queue: OutboundQueue) -> list[str]:
    return [frame.decode() for frame in queue.take_batch(EVERYTHING).frames]


def fill(queue: OutboundQueue, sub: str, topic: str, count: int, policy: Policy) -> None:
    for n in range(count):
        assert offer(queue, sub, topic, f"{topic}{n}", policy) is Offer.QUEUED


# --- queueing within the bounds -------------------------------------------------------------


def test_messages_are_taken_in_queue_order_with_their_tails() -> None:
    queue = OutboundQueue(10, 1000)
    offer(queue, "a.*", "a.x", "m1", BLOCK)
    queue.put_reply(b"ok")
    offer(queue, ">", "a.x", "m1", DROP_OLDEST)
    assert take_all(queue) == ["m1|a.*", "ok", "m1|>"]
    assert len(queue) == 0


def test_a_message_is_queued_under_every_policy_while_there_is_room() -> None:
    queue = OutboundQueue(len(Policy), 1000)
    for policy in Policy:
        assert offer(queue, "s", f"t.{policy}", "m", policy) is Offer.QUEUED
    assert len(queue) == len(Policy)


def test_statistics_count_messages_replies_bytes_and_drops() -> None:
    queue = OutboundQueue(1, 1000)
    offer(queue, "s", "t", "abc", DROP_NEWEST)  # 3 + len("|s") = 5 bytes
    offer(queue, "s", "t", "def", DROP_NEWEST)  # dropped
    queue.put_reply(b"ok!")
    assert queue.statistics() == {"messages": 1, "replies": 1, "bytes": 8, "dropped_total": 1}
    queue.take_batch(EVERYTHING)
    assert queue.statistics() == {"messages": 0, "replies": 0, "bytes": 0, "dropped_total": 1}


# --- the bounds and block --------------------------------------------------------------------


def test_block_queues_past_the_message_bound_and_answers_over() -> None:
    queue = OutboundQueue(2, 1000)
    fill(queue, "s", "t", 2, BLOCK)
    assert queue.full
    assert offer(queue, "s", "t", "m", BLOCK) is Offer.OVER
    assert queue.statistics()["messages"] == 3
    assert take_all(queue) == ["t0|s", "t1|s", "m|s"]
    assert not queue.full


def test_block_answers_over_at_the_byte_bound() -> None:
    queue = OutboundQueue(100, 10)
    assert offer(queue, "s", "t", "12345678", BLOCK) is Offer.QUEUED  # 10 bytes with "|s"
    assert offer(queue, "s", "t", "", BLOCK) is Offer.OVER  # 2 more would exceed 10


def test_a_message_exactly_filling_the_byte_bound_fits() -> None:
    queue = OutboundQueue(100, 12)
    offer(queue, "s", "t", "12345678", BLOCK)
    assert offer(queue, "s", "t", "", BLOCK) is Offer.QUEUED
    assert queue.statistics()["bytes"] == 12


def test_an_oversized_message_passes_through_an_empty_queue() -> None:
    queue = OutboundQueue(1, 4)
    assert offer(queue, "s", "t", "x" * 100, BLOCK) is Offer.QUEUED
    assert offer(queue, "s", "t", "y", BLOCK) is Offer.OVER


def test_disconnect_answers_disconnect_when_full() -> None:
    queue = OutboundQueue(1, 1000)
    fill(queue, "s", "t", 1, DISCONNECT)
    assert offer(queue, "s", "t", "m", DISCONNECT) is Offer.DISCONNECT
    assert queue.statistics()["dropped_total"] == 0
    assert take_all(queue) == ["t0|s"]


# --- drop_newest -----------------------------------------------------------------------------


def test_drop_newest_drops_the_new_message_and_counts_lag() -> None:
    queue = OutboundQueue(2, 1000)
    fill(queue, "s", "t", 2, DROP_NEWEST)
    assert offer(queue, "s", "t", "new", DROP_NEWEST) is Offer.DROPPED
    assert offer(queue, "s", "t", "newer", DROP_NEWEST) is Offer.DROPPED
    batch = queue.take_batch(EVERYTHING)
    assert batch.lags == {"s": 2}
    assert [frame.decode() for frame in batch.frames] == ["t0|s", "t1|s"]


# --- drop_oldest -----------------------------------------------------------------------------


def test_drop_oldest_evicts_the_oldest_message_of_the_same_subscription() -> None:
    queue = OutboundQueue(3, 1000)
    offer(queue, "a", "t", "a0", DROP_OLDEST)
    offer(queue, "b", "t", "b0", DROP_OLDEST)
    offer(queue, "a", "t", "a1", DROP_OLDEST)
    assert offer(queue, "a", "t", "a2", DROP_OLDEST) is Offer.QUEUED
    batch = queue.take_batch(EVERYTHING)
    assert batch.lags == {"a": 1}
    assert [frame.decode() for frame in batch.frames] == ["b0|b", "a1|a", "a2|a"]


def test_drop_oldest_never_evicts_another_subscriptions_messages() -> None:
    queue = OutboundQueue(2, 1000)
    fill(queue, "busy", "t", 2, DROP_OLDEST)
    assert offer(queue, "quiet", "t", "q", DROP_OLDEST) is Offer.DROPPED
    batch = queue.take_batch(EVERYTHING)
    assert batch.lags == {"quiet": 1}
    assert [frame.decode() for frame in batch.frames] == ["t0|busy", "t1|busy"]


def test_drop_oldest_evicts_as_many_as_the_byte_bound_needs() -> None:
    queue = OutboundQueue(100, 20)
    for n in range(4):
        offer(queue, "s", "t", f"m{n}", DROP_OLDEST)  # 5 bytes each: 20 in all
    assert offer(queue, "s", "t", "big-one", DROP_OLDEST) is Offer.QUEUED  # 9 bytes
    batch = queue.take_batch(EVERYTHING)
    assert batch.lags == {"s": 2}
    assert [frame.decode() for frame in batch.frames] == ["m2|s", "m3|s", "big-one|s"]


def test_drop_oldest_evicts_nothing_when_evicting_all_it_may_would_not_make_room() -> None:
    queue = OutboundQueue(100, 24)
    offer(queue, "s", "t", "m0", DROP_OLDEST)  # 4 bytes
    offer(queue, "other", "t", "0123456789abc", BLOCK)  # 19 bytes: 23 in all
    assert offer(queue, "s", "t", "m1-longer", DROP_OLDEST) is Offer.DROPPED  # 11 bytes
    batch = queue.take_batch(EVERYTHING)
    assert batch.lags == {"s": 1}  # the new one only: m0 was not evicted for nothing
    assert [frame.decode() for frame in batch.frames] == ["m0|s", "0123456789abc|other"]


def test_drop_oldest_does_not_evict_messages_queued_under_block() -> None:
    # One wildcard subscription sees topics with different policies.
    queue = OutboundQueue(2, 1000)
    fill(queue, ">", "chat.a", 2, BLOCK)
    assert offer(queue, ">", "ticks.a", "tick", DROP_OLDEST) is Offer.DROPPED
    assert take_all(queue) == ["chat.a0|>", "chat.a1|>"]


def test_lag_counts_per_subscription_and_resets_once_reported() -> None:
    queue = OutboundQueue(2, 1000)
    fill(queue, "a", "t", 1, DROP_OLDEST)
    fill(queue, "b", "t", 1, DROP_OLDEST)
    for n in range(3):
        offer(queue, "a", "t", f"a{n}", DROP_OLDEST)
    offer(queue, "b", "t", "b", DROP_OLDEST)
    assert queue.take_batch(EVERYTHING).lags == {"a": 3, "b": 1}
    assert queue.take_batch(EVERYTHING).lags == {}
    assert queue.dropped_total == 4


# --- conflate --------------------------------------------------------------------------------


def test_conflate_replaces_the_queued_message_of_the_same_topic_in_place() -> None:
    queue = OutboundQueue(3, 1000)
    offer(queue, "p.*", "p.eur", "eur1", CONFLATE)
    offer(queue, "p.*", "p.usd", "usd1", CONFLATE)
    offer(queue, "other", "x", "x", BLOCK)
    assert offer(queue, "p.*", "p.eur", "eur2", CONFLATE) is Offer.QUEUED
    assert offer(queue, "p.*", "p.eur", "eur3", CONFLATE) is Offer.QUEUED
    assert offer(queue, "p.*", "p.usd", "usd2", CONFLATE) is Offer.QUEUED
    batch = queue.take_batch(EVERYTHING)
    assert batch.lags == {"p.*": 3}
    assert [frame.decode() for frame in batch.frames] == ["eur3|p.*", "usd2|p.*", "x|other"]


def test_conflate_is_per_subscription() -> None:
    queue = OutboundQueue(2, 1000)
    offer(queue, "a", "t", "a1", CONFLATE)
    offer(queue, "b", "t", "b1", CONFLATE)
    offer(queue, "a", "t", "a2", CONFLATE)
    assert take_all(queue) == ["a2|a", "b1|b"]


def test_conflate_keeps_byte_count_right_when_sizes_differ() -> None:
    queue = OutboundQueue(1, 1000)
    offer(queue, "s", "t", "short", CONFLATE)
    offer(queue, "s", "t", "much longer", CONFLATE)
    assert queue.statistics()["bytes"] == len("much longer|s")
    take_all(queue)
    assert queue.statistics()["bytes"] == 0


def test_conflate_too_big_to_replace_in_place_evicts_it_and_goes_last() -> None:
    queue = OutboundQueue(100, 20)
    offer(queue, "s", "p.a", "a1", CONFLATE)  # 4 bytes
    offer(queue, "s", "p.b", "b1", CONFLATE)
    offer(queue, "s", "p.c", "c1", CONFLATE)  # 12 in all
    assert offer(queue, "s", "p.a", "a2-much-longer", CONFLATE) is Offer.QUEUED  # 16 bytes
    batch = queue.take_batch(EVERYTHING)
    assert batch.lags == {"s": 2}  # a1 evicted, then b1 for room; c1 stays
    assert [frame.decode() for frame in batch.frames] == ["c1|s", "a2-much-longer|s"]
    assert queue.statistics()["bytes"] == 0


def test_conflate_without_a_queued_message_of_the_topic_evicts_the_oldest() -> None:
    queue = OutboundQueue(2, 1000)
    offer(queue, "p.*", "p.a", "a", CONFLATE)
    offer(queue, "p.*", "p.b", "b", CONFLATE)
    assert offer(queue, "p.*", "p.c", "c", CONFLATE) is Offer.QUEUED
    assert take_all(queue) == ["b|p.*", "c|p.*"]
    # p.a's entry is gone: a new p.a message is queued afresh, not "replacing" it.
    offer(queue, "p.*", "p.a", "a2", CONFLATE)
    assert take_all(queue) == ["a2|p.*"]


def test_conflate_does_not_replace_a_message_already_taken() -> None:
    queue = OutboundQueue(1, 1000)
    offer(queue, "s", "t", "v1", CONFLATE)
    assert take_all(queue) == ["v1|s"]
    offer(queue, "s", "u", "u1", CONFLATE)
    assert offer(queue, "s", "t", "v2", CONFLATE) is Offer.QUEUED
    assert take_all(queue) == ["v2|s"]


def test_conflate_with_only_other_subscriptions_queued_drops_the_new_message() -> None:
    queue = OutboundQueue(1, 1000)
    offer(queue, "a", "t", "a", CONFLATE)
    assert offer(queue, "b", "t", "b", CONFLATE) is Offer.DROPPED
    assert queue.take_batch(EVERYTHING).lags == {"b": 1}


# --- replies ---------------------------------------------------------------------------------


def test_replies_are_never_dropped_even_past_the_bounds() -> None:
    queue = OutboundQueue(2, 10, max_replies=2)
    fill(queue, "s", "t", 2, DROP_NEWEST)
    for n in range(10):
        queue.put_reply(f"ok{n}".encode())
    frames = take_all(queue)
    assert frames == ["t0|s", "t1|s", *(f"ok{n}" for n in range(10))]


def test_max_replies_defaults_to_the_message_bound() -> None:
    assert OutboundQueue(7, 100).max_replies == 7
    assert OutboundQueue(7, 100, max_replies=3).max_replies == 3


async def test_wait_reply_room_waits_while_max_replies_are_queued() -> None:
    queue = OutboundQueue(10, 1000, max_replies=2)
    queue.put_reply(b"1")
    await queue.wait_reply_room()  # one queued, room for another: no wait
    queue.put_reply(b"2")
    done = trio.Event()

    async def reader() -> None:
        await queue.wait_reply_room()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        offer(queue, "s", "t", "m", BLOCK)  # messages do not free reply room
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        queue.take_batch(EVERYTHING)
    assert done.is_set()


async def test_wait_reply_room_returns_when_the_queue_closes() -> None:
    queue = OutboundQueue(10, 1000, max_replies=1)
    queue.put_reply(b"1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.wait_reply_room)
        await trio.testing.wait_all_tasks_blocked()
        queue.close()


# --- take_batch ------------------------------------------------------------------------------


def test_take_batch_stops_before_max_bytes() -> None:
    queue = OutboundQueue(10, 1000)
    for n in range(5):
        offer(queue, "s", "t", f"m{n}", BLOCK)  # 4 bytes each
    assert [f.decode() for f in queue.take_batch(11).frames] == ["m0|s", "m1|s"]
    assert [f.decode() for f in queue.take_batch(12).frames] == ["m2|s", "m3|s", "m4|s"]


def test_take_batch_takes_at_least_one_frame_however_large() -> None:
    queue = OutboundQueue(10, 1000)
    offer(queue, "s", "t", "x" * 50, BLOCK)
    offer(queue, "s", "t", "y", BLOCK)
    assert queue.take_batch(1).frames == [b"x" * 50 + b"|s"]
    assert queue.take_batch(1).frames == [b"y|s"]


def test_take_batch_of_an_empty_queue_is_empty() -> None:
    batch = OutboundQueue(1, 1).take_batch(EVERYTHING)
    assert (batch.lags, batch.frames) == ({}, [])


def test_lag_is_reported_with_the_batch_that_carries_the_next_message() -> None:
    # The writer sends a batch's lags before its frames, so a subscriber sees its lag
    # before its next msg.
    queue = OutboundQueue(1, 1000)
    offer(queue, "s", "t", "old", DROP_OLDEST)
    offer(queue, "s", "t", "new", DROP_OLDEST)
    batch = queue.take_batch(EVERYTHING)
    assert (batch.lags, batch.frames) == ({"s": 1}, [b"new|s"])


def test_lazily_deleted_entries_are_compacted() -> None:
    queue = OutboundQueue(1000, 1 << 20)
    fill(queue, "quiet", "t", 1, BLOCK)  # keeps the queue from ever emptying at the front
    queue.max_messages = 2
    for n in range(10_000):
        offer(queue, "busy", "t", f"m{n}", DROP_OLDEST)
    assert queue.statistics()["messages"] == 2
    assert len(queue._times) < 200  # evicted entries do not pile up
    assert take_all(queue) == ["t0|quiet", "m9999|busy"]


def test_conflate_replaces_the_right_message_after_a_compaction() -> None:
    queue = OutboundQueue(1000, 1 << 20)
    fill(queue, "quiet", "t", 1, BLOCK)
    queue.max_messages = 3
    for n in range(200):  # evictions (the oldest of "busy") pile up, then get compacted
        offer(queue, "busy", f"t{n % 7}", f"m{n}", CONFLATE)
    assert len(queue._times) < 100
    # Queued now: t0|quiet, m198 (topic t2), m199 (topic t3).
    offer(queue, "busy", "t2", "new", CONFLATE)  # replaces m198 in its place
    assert take_all(queue) == ["t0|quiet", "new|busy", "m199|busy"]
    assert queue.statistics()["messages"] == 0


# --- join and leave: entries of several frames ----------------------------------------------


def events(queue: OutboundQueue, sub: str, texts: list[str], policy: Policy) -> Offer:
    """Offer ``texts`` as one entry of join/leave frames (``text|sub``, one per line)."""
    frames = "\n".join(f"{text}|{sub}" for text in texts).encode()
    return queue.offer_events(sub, "t", frames, len(texts), policy)


def test_an_entry_of_events_counts_as_its_frames_against_the_bound() -> None:
    queue = OutboundQueue(4, 1 << 20)
    assert events(queue, "s", ["j1", "j2", "j3"], DROP_NEWEST) is Offer.QUEUED
    assert queue.statistics()["messages"] == 3 and not queue.full
    assert events(queue, "s", ["j4", "j5"], DROP_NEWEST) is Offer.DROPPED  # 3 + 2 > 4
    assert offer(queue, "s", "t", "m", DROP_NEWEST) is Offer.QUEUED
    batch = queue.take_batch(EVERYTHING)
    assert batch.messages == 4 and batch.lags == {"s": 2}
    assert batch.frames == [b"j1|s\nj2|s\nj3|s", b"m|s"]


def test_a_window_larger_than_the_bound_never_passes_even_an_empty_queue() -> None:
    queue = OutboundQueue(2, 1 << 20)
    assert events(queue, "s", ["a", "b", "c"], DROP_OLDEST) is Offer.DROPPED
    assert queue.take_batch(EVERYTHING).lags == {"s": 3}


def test_drop_oldest_evicts_whole_entries_of_the_same_subscription_for_a_window() -> None:
    queue = OutboundQueue(4, 1 << 20)
    assert events(queue, "s", ["a", "b"], DROP_OLDEST) is Offer.QUEUED
    assert offer(queue, "other", "t", "x", DROP_OLDEST) is Offer.QUEUED
    assert events(queue, "s", ["c"], DROP_OLDEST) is Offer.QUEUED  # fills the bound
    assert events(queue, "s", ["d", "e"], DROP_OLDEST) is Offer.QUEUED  # evicts a, b
    batch = queue.take_batch(EVERYTHING)
    assert batch.lags == {"s": 2} and batch.messages == 4
    assert batch.frames == [b"x|other", b"c|s", b"d|s\ne|s"]


def test_block_takes_events_up_to_twice_the_bound_and_drops_beyond() -> None:
    queue = OutboundQueue(2, 1 << 20)
    fill(queue, "s", "t", 2, BLOCK)
    assert events(queue, "s", ["a", "b"], BLOCK) is Offer.QUEUED  # 4: twice the bound
    assert events(queue, "s", ["c"], BLOCK) is Offer.DROPPED
    assert queue.take_batch(EVERYTHING).lags == {"s": 1}


def test_a_partial_take_and_a_compaction_keep_each_entrys_count() -> None:
    queue = OutboundQueue(100, 1 << 20)
    for n in range(70):  # evicted below, so that the queue compacts
        offer(queue, "old", "t", f"o{n}", DROP_OLDEST)
    assert events(queue, "s", ["a", "b", "c"], BLOCK) is Offer.QUEUED
    queue.max_messages = 6
    assert events(queue, "old", ["e1", "e2", "e3"], DROP_OLDEST) is Offer.QUEUED  # evicts 70
    assert queue.statistics()["messages"] == 6
    first = queue.take_batch(1)  # one entry
    assert first.frames == [b"a|s\nb|s\nc|s"] and first.messages == 3
    assert first.lags == {"old": 70}
    assert queue.take_batch(EVERYTHING).messages == 3
    assert queue.statistics()["messages"] == 0


def test_a_conflated_message_never_replaces_one_queued_ahead_of_a_join_of_its_topic() -> None:
    queue = OutboundQueue(2, 1 << 20)
    assert offer(queue, "s", "t", "old", CONFLATE) is Offer.QUEUED
    assert events(queue, "s", ["join"], CONFLATE) is Offer.QUEUED  # the queue is full
    assert offer(queue, "s", "t", "new", CONFLATE) is Offer.QUEUED  # evicts "old", goes last
    batch = queue.take_batch(EVERYTHING)
    assert batch.frames == [b"join|s", b"new|s"] and batch.lags == {"s": 1}


# --- close and clear -------------------------------------------------------------------------


def test_close_refuses_new_frames_but_keeps_what_is_queued() -> None:
    queue = OutboundQueue(10, 1000)
    offer(queue, "s", "t", "m", BLOCK)
    queue.close()
    assert queue.closed
    assert offer(queue, "s", "t", "late", BLOCK) is Offer.CLOSED
    queue.put_reply(b"late reply")
    assert take_all(queue) == ["m|s"]


def test_clear_discards_everything_queued() -> None:
    queue = OutboundQueue(1, 1000)
    offer(queue, "s", "t", "m", CONFLATE)
    offer(queue, "s", "u", "n", DROP_NEWEST)
    queue.put_reply(b"ok")
    queue.clear()
    assert len(queue) == 0
    assert queue.statistics() == {"messages": 0, "replies": 0, "bytes": 0, "dropped_total": 1}
    batch = queue.take_batch(EVERYTHING)
    assert (batch.lags, batch.frames) == ({}, [])
    # Nothing stale survives: the same topic queues afresh rather than conflating.
    offer(queue, "s", "t", "m2", CONFLATE)
    assert take_all(queue) == ["m2|s"]


# --- waiting ---------------------------------------------------------------------------------


async def wait_in_background(
    nursery: trio.Nursery, wait: Callable[[], Awaitable[object]]
) -> trio.Event:
    """Start ``wait()`` and return an event set when it returns, once it is blocked."""
    done = trio.Event()

    async def waiter() -> None:
        await wait()
        done.set()

    nursery.start_soon(waiter)
    await trio.testing.wait_all_tasks_blocked()
    return done


@pytest.mark.parametrize(
    "make_readable",
    [
        lambda q: offer(q, "s", "t", "m", BLOCK),
        lambda q: q.put_reply(b"ok"),
        lambda q: q.close(),
    ],
    ids=["message", "reply", "close"],
)
def test_a_writer_is_started_when_there_is_something_to_write(
    make_readable: Callable[[OutboundQueue], object],
) -> None:
    queue = OutboundQueue(1, 1000)
    owner = queue.owner = Owner(takes=False)
    queue.writer_done()  # no writer runs
    assert owner.started == 0
    make_readable(queue)
    assert owner.started == 1


def test_a_writer_is_started_again_after_the_last_one_ended() -> None:
    queue = OutboundQueue(10, 1000)
    owner = queue.owner = Owner(takes=False)
    offer(queue, "s", "t", "m", BLOCK)  # a writer runs (started by its connection)
    take_all(queue)
    offer(queue, "s", "t", "n", BLOCK)
    assert owner.started == 0  # it runs still: nobody starts another
    take_all(queue)
    queue.writer_done()
    queue.put_reply(b"ok")
    assert owner.started == 1


def test_a_partial_take_leaves_something_to_write() -> None:
    queue = OutboundQueue(10, 1000)
    fill(queue, "s", "t", 3, BLOCK)
    queue.take_batch(1)
    assert queue.pending  # the writer goes on rather than ending


async def test_wait_room_waits_until_a_batch_is_taken(autojump_clock: trio.abc.Clock) -> None:
    queue = OutboundQueue(1, 1000)
    fill(queue, "s", "t", 1, BLOCK)
    async with trio.open_nursery() as nursery:
        done = await wait_in_background(nursery, queue.wait_room)
        assert queue.full_since == trio.current_time()
        await trio.sleep(3)  # virtual time
        assert not done.is_set()
        assert queue.full_since == trio.current_time() - 3
        take_all(queue)
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()
    assert queue.full_since is None
    assert offer(queue, "s", "t", "m", BLOCK) is Offer.QUEUED


async def test_wait_room_wakes_every_waiter_and_keeps_the_first_full_since(
    autojump_clock: trio.abc.Clock,
) -> None:
    queue = OutboundQueue(1, 1000)
    fill(queue, "s", "t", 1, BLOCK)
    async with trio.open_nursery() as nursery:
        first = await wait_in_background(nursery, queue.wait_room)
        since = queue.full_since
        await trio.sleep(1)
        second = await wait_in_background(nursery, queue.wait_room)
        assert queue.full_since == since
        take_all(queue)
        await trio.testing.wait_all_tasks_blocked()
        assert first.is_set() and second.is_set()


async def test_wait_room_returns_when_the_queue_closes() -> None:
    queue = OutboundQueue(1, 1000)
    fill(queue, "s", "t", 1, BLOCK)
    async with trio.open_nursery() as nursery:
        done = await wait_in_background(nursery, queue.wait_room)
        queue.close()
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()
    await queue.wait_room()  # closed: returns at once


# --- properties ------------------------------------------------------------------------------

SUBS = ("a", "b", "c")
TOPICS = ("t1", "t2", "t3")


class QueueMachine(RuleBasedStateMachine):
    """Random offers, replies and partial takes against a small queue.

    As in the broker, each topic has one policy for the life of the queue. Checks: every
    accepted message is delivered, reported as lag, or still queued; per subscription and
    topic, delivery is in offer order; without conflate, per subscription too; the bounds
    always hold, past by at most one ``block`` message (whose publisher then waits).
    """

    def __init__(self) -> None:
        super().__init__()
        self.queue = OutboundQueue(4, 60, max_replies=3)
        self.serial = itertools.count()
        self.accepted = 0
        self.delivered: list[tuple[str, str, int]] = []
        self.lagged = 0
        self.policies: dict[str, Policy] = {}
        self.events_under_block = False

    @initialize(
        policies=st.lists(
            st.sampled_from([BLOCK, DROP_OLDEST, DROP_NEWEST, CONFLATE]),
            min_size=len(TOPICS),
            max_size=len(TOPICS),
        )
    )
    def choose_policies(self, policies: list[Policy]) -> None:
        self.policies = dict(zip(TOPICS, policies, strict=True))
        self.conflated = CONFLATE in policies

    @rule(
        sub=st.sampled_from(SUBS),
        topic=st.sampled_from(TOPICS),
        padding=st.integers(0, 30),
    )
    def offer(self, sub: str, topic: str, padding: int) -> None:
        if self.policies[topic] is BLOCK and self.queue.full:
            return  # its publisher waits for room (Hub.wait_for_room)
        n = next(self.serial)
        text = f"{topic}:{n}:{'x' * padding}"
        outcome = offer(self.queue, sub, topic, text, self.policies[topic])
        assert outcome in (Offer.QUEUED, Offer.DROPPED, Offer.OVER)
        self.accepted += 1

    @rule(sub=st.sampled_from(SUBS), topic=st.sampled_from(TOPICS), count=st.integers(1, 3))
    def offer_events(self, sub: str, topic: str, count: int) -> None:
        texts = [f"{topic}:{next(self.serial)}:" for _ in range(count)]
        frames = "\n".join(f"{text}|{sub}" for text in texts).encode()
        outcome = self.queue.offer_events(sub, topic, frames, count, self.policies[topic])
        assert outcome in (Offer.QUEUED, Offer.DROPPED)
        self.accepted += count
        self.events_under_block |= self.policies[topic] is BLOCK

    @precondition(lambda self: self.queue.statistics()["replies"] < 3)
    @rule()
    def reply(self) -> None:
        self.queue.put_reply(b"ok")

    @rule(max_bytes=st.integers(1, 80))
    def take(self, max_bytes: int) -> None:
        batch = self.queue.take_batch(max_bytes)
        self.lagged += sum(batch.lags.values())
        sizes = [len(frame) for frame in batch.frames]
        assert len(sizes) <= 1 or sum(sizes) <= max_bytes
        for frame in (line for entry in batch.frames for line in entry.split(b"\n")):
            if frame != b"ok":
                body, sub = frame.decode().split("|")
                topic, n, _ = body.split(":")
                self.delivered.append((sub, topic, int(n)))

    @invariant()
    def messages_are_conserved(self) -> None:
        queued = self.queue.statistics()["messages"]
        pending_lag = sum(self.queue._lags.values())
        assert self.accepted == len(self.delivered) + self.lagged + pending_lag + queued

    @invariant()
    def order_is_kept(self) -> None:
        keys: list[tuple[str, str | None]] = [(sub, topic) for sub in SUBS for topic in TOPICS]
        if not self.conflated:
            keys = [(sub, None) for sub in SUBS]
        for sub, topic in keys:
            serials = [n for s, t, n in self.delivered if s == sub and topic in (None, t)]
            assert serials == sorted(serials)

    @invariant()
    def bounds_hold(self) -> None:
        stats = self.queue.statistics()
        if self.events_under_block:  # join and leave under block: up to twice the bound
            assert stats["messages"] <= 2 * 4 + 1
            return
        assert stats["messages"] <= 4 + 1  # one block message past the bound
        if stats["messages"] > 1:
            assert stats["bytes"] <= 60 + 50 + stats["replies"] * len(b"ok")


QueueMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
test_queue_machine = QueueMachine.TestCase


# --- the owner asked first (a reader writing to idle subscribers itself) --------------------


class Owner:
    """Takes every wake-up (``takes``) or none; counts the asks and the writers started."""

    def __init__(self, takes: bool) -> None:
        self.takes, self.asked, self.started = takes, 0, 0

    def take_wake_up(self) -> bool:
        self.asked += 1
        return self.takes

    def start_writer(self) -> None:
        self.started += 1


def test_a_wake_up_the_owner_takes_starts_no_writer() -> None:
    queue = OutboundQueue(10, 1000)
    owner = queue.owner = Owner(takes=True)
    queue.writer_done()  # no writer runs
    offer(queue, "s", "t", "m", BLOCK)
    offer(queue, "s", "t", "n", BLOCK)
    assert owner.asked == 1  # asked once, until it is done
    taken = queue.take_direct(8, 1000)
    assert taken is not None and taken[1] == 2
    assert owner.started == 0  # written for it: no writer
    offer(queue, "s", "t", "o", BLOCK)
    assert owner.asked == 2  # done with the first: asked again
    queue.wake_writer()  # e.g. to finish a partial write
    assert owner.started == 1


def test_an_owner_that_declines_has_a_writer_started() -> None:
    queue = OutboundQueue(10, 1000)
    owner = queue.owner = Owner(takes=False)
    queue.writer_done()
    offer(queue, "s", "t", "m", BLOCK)
    assert owner.started == 1
