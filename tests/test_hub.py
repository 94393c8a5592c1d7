"""broker.core.hub and rules: policy lookup, and fan-out to in-memory subscribers (through
the one-node LocalDelivery, as the broker publishes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from broker.core.delivery import LocalDelivery
from broker.core.history import MemoryHistory
from broker.core.hub import Hub, Subscription
from broker.core.outbound import Offer, OutboundQueue, Policy
from broker.core.rules import PolicyTable, TopicRule
from broker.protocol.frames import Encoding
from broker.protocol.topics import pattern_matches

SLOW_TIMEOUT = 5.0


@dataclass(eq=False)
class FakeSubscriber:
    """A connection without a socket: a real queue, and a record of slow-consumer closes."""

    encoding: Encoding = Encoding.MSGPACK
    queue: OutboundQueue = field(default_factory=lambda: OutboundQueue(16, 1 << 20))
    closed: list[str] = field(default_factory=list)

    def close_slow_consumer(self, why: str) -> None:
        self.closed.append(why)
        self.queue.clear()
        self.queue.close()

    def received(self) -> list[dict[str, Any]]:
        """Take everything queued and decode it as the client would."""
        frames = self.queue.take_batch(1 << 30).frames  # an entry may hold several frames
        if self.encoding is Encoding.JSON:
            return [json.loads(line) for frame in frames for line in frame.split(b"\n")]
        return [value for frame in frames for value in msgpack.Unpacker(BytesIO(frame))]


def make_hub(rules: dict[str, Policy] | None = None) -> Hub:
    table = PolicyTable([TopicRule(pattern, policy) for pattern, policy in (rules or {}).items()])
    return Hub(table, SLOW_TIMEOUT)


def subscribe(hub: Hub, subscriber: FakeSubscriber, pattern: str) -> Subscription:
    subscription = Subscription(subscriber, pattern)
    hub.add(subscription)
    return subscription


async def publish(hub: Hub, topic: str, data: Any) -> int:
    """Publish as one node does, waiting for room if asked; how many subscriptions matched."""
    rest = LocalDelivery(hub, MemoryHistory(hub.policies.history_for)).publish(topic, data, 0.0)
    if rest is not None:
        await rest.complete()
    return len(hub.route(topic)[1])


def msg(topic: str, sub: str, data: Any) -> dict[str, Any]:
    return {"op": "msg", "topic": topic, "sub": sub, "data": data}


# --- PolicyTable ----------------------------------------------------------------------------


def test_first_matching_rule_wins() -> None:
    table = PolicyTable(
        [
            TopicRule("ticks.fx.*", Policy.CONFLATE),
            TopicRule("ticks.>", Policy.DROP_OLDEST),
            TopicRule("ticks.fx.eur", Policy.DISCONNECT),  # shadowed by the first rule
        ]
    )
    assert table.for_topic("ticks.fx.eur") is Policy.CONFLATE
    assert table.for_topic("ticks.eq.ibm") is Policy.DROP_OLDEST
    assert table.for_topic("ticks.fx.eur.bid") is Policy.DROP_OLDEST


def test_topic_no_rule_matches_uses_block() -> None:
    table = PolicyTable([TopicRule("ticks.>", Policy.DROP_OLDEST)])
    assert table.for_topic("ticks") is Policy.BLOCK
    assert table.for_topic("chat.a") is Policy.BLOCK
    assert PolicyTable([]).for_topic("a") is Policy.BLOCK


def test_default_policy_can_be_changed() -> None:
    assert PolicyTable([], default=Policy.DROP_NEWEST).for_topic("a") is Policy.DROP_NEWEST


def test_policy_is_cached_per_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = pattern_matches

    def counting(pattern: str, topic: str) -> bool:
        calls.append((pattern, topic))
        return real(pattern, topic)

    monkeypatch.setattr("broker.core.rules.pattern_matches", counting)
    table = PolicyTable([TopicRule("a.*", Policy.CONFLATE), TopicRule("b.>", Policy.DROP_NEWEST)])
    assert table.for_topic("b.x") is Policy.DROP_NEWEST
    assert len(calls) == 2
    for _ in range(3):
        assert table.for_topic("b.x") is Policy.DROP_NEWEST
        assert table.for_topic("c") is Policy.BLOCK  # the default is cached too
    assert len(calls) == 4


def test_policy_cache_is_bounded() -> None:
    table = PolicyTable([TopicRule("a.>", Policy.CONFLATE)])
    for n in range(70_000):
        table.for_topic(f"a.{n}")
    assert len(table._cache) <= 65536
    assert table.for_topic("a.1") is Policy.CONFLATE


# --- routing --------------------------------------------------------------------------------


async def test_each_matching_subscription_gets_the_message_once() -> None:
    hub = make_hub()
    exact, star, tail, other = (FakeSubscriber() for _ in range(4))
    subscribe(hub, exact, "chat.a")
    subscribe(hub, star, "chat.*")
    subscribe(hub, tail, ">")
    subscribe(hub, other, "chat.b")
    assert await publish(hub, "chat.a", "hi") == 3
    assert exact.received() == [msg("chat.a", "chat.a", "hi")]
    assert star.received() == [msg("chat.a", "chat.*", "hi")]
    assert tail.received() == [msg("chat.a", ">", "hi")]
    assert other.received() == []


async def test_publish_with_no_subscribers_matches_none() -> None:
    hub = make_hub()
    subscribe(hub, FakeSubscriber(), "a.*")
    assert await publish(hub, "a", 1) == 0
    assert await publish(hub, "a.b.c", 1) == 0


async def test_overlapping_patterns_of_one_connection_each_get_a_copy() -> None:
    hub = make_hub()
    subscriber = FakeSubscriber()
    for pattern in ("a.b", "a.*", "a.>", "*.b"):
        subscribe(hub, subscriber, pattern)
    assert await publish(hub, "a.b", 7) == 4
    received = subscriber.received()
    assert sorted(frame["sub"] for frame in received) == ["*.b", "a.*", "a.>", "a.b"]
    assert all(frame["topic"] == "a.b" and frame["data"] == 7 for frame in received)


async def test_messages_arrive_in_publish_order() -> None:
    hub = make_hub()
    subscriber = FakeSubscriber()
    subscribe(hub, subscriber, "t.*")
    for n in range(10):
        await publish(hub, f"t.{n % 3}", n)
    assert [frame["data"] for frame in subscriber.received()] == list(range(10))


async def test_unsubscribe_stops_routing_but_keeps_what_is_queued() -> None:
    hub = make_hub()
    subscriber = FakeSubscriber()
    star = subscribe(hub, subscriber, "a.*")
    subscribe(hub, subscriber, "a.>")
    await publish(hub, "a.b", 1)
    hub.remove(star)
    assert hub.subscription_count() == 1
    assert await publish(hub, "a.b", 2) == 1
    received = sorted(subscriber.received(), key=lambda frame: (frame["sub"], frame["data"]))
    assert received == [msg("a.b", "a.*", 1), msg("a.b", "a.>", 1), msg("a.b", "a.>", 2)]


async def test_same_pattern_from_two_connections_are_two_subscriptions() -> None:
    hub = make_hub()
    first, second = FakeSubscriber(), FakeSubscriber()
    subscription = subscribe(hub, first, "a")
    subscribe(hub, second, "a")
    assert hub.subscription_count() == 2
    hub.remove(subscription)
    assert await publish(hub, "a", 0) == 1
    assert (first.received(), second.received()) == ([], [msg("a", "a", 0)])


async def test_subscriptions_made_or_dropped_after_a_publish_change_the_next_one() -> None:
    # The hub remembers each topic's matches: every subscription change must reach them.
    hub = make_hub()
    exact, star = FakeSubscriber(), FakeSubscriber()
    assert await publish(hub, "a.b", 0) == 0
    exact_sub = subscribe(hub, exact, "a.b")
    assert await publish(hub, "a.b", 1) == 1
    star_sub = subscribe(hub, star, "a.*")
    assert await publish(hub, "a.b", 2) == 2
    hub.remove(exact_sub)
    assert await publish(hub, "a.b", 3) == 1
    hub.remove(star_sub)
    assert await publish(hub, "a.b", 4) == 0
    assert [frame["data"] for frame in exact.received()] == [1, 2]
    assert [frame["data"] for frame in star.received()] == [2, 3]


async def test_a_blocked_publish_is_queued_at_once_and_only_its_rest_waits() -> None:
    hub = make_hub()
    ready = FakeSubscriber()
    subscribe(hub, ready, "a")
    delivery = LocalDelivery(hub, MemoryHistory(hub.policies.history_for))
    assert delivery.publish("a", 1, 0.0) is None
    assert ready.received() == [msg("a", "a", 1)]
    slow = full_subscriber(hub, "a")
    rest = delivery.publish("a", 2, 0.0)  # queued for both now; slow's publisher must wait
    assert rest is not None
    assert ready.received() == [msg("a", "a", 2)]
    old, new = slow.queue.take_batch(1 << 20).frames  # the message past the bound is there
    assert old == b"old" and msgpack.unpackb(new) == msg("a", "a", 2)
    await rest.complete()  # the take made room: returns at once


async def test_each_subscriber_gets_its_own_encoding() -> None:
    hub = make_hub()
    binary, text = FakeSubscriber(Encoding.MSGPACK), FakeSubscriber(Encoding.JSON)
    subscribe(hub, binary, "t")
    subscribe(hub, text, "t")
    await publish(hub, "t", {"blob": b"\x01", "n": 1})
    assert binary.received() == [msg("t", "t", {"blob": b"\x01", "n": 1})]
    assert text.received() == [msg("t", "t", {"blob": "AQ==", "n": 1})]


async def test_message_is_encoded_once_per_encoding_and_the_body_shared() -> None:
    hub = make_hub()
    binary = [FakeSubscriber(Encoding.MSGPACK) for _ in range(3)]
    text = [FakeSubscriber(Encoding.JSON) for _ in range(2)]
    for subscriber in binary + text:
        subscribe(hub, subscriber, "t.*")
        subscribe(hub, subscriber, ">")
    assert await publish(hub, "t.x", "payload") == 10

    # Every queued entry of one encoding holds the very same body object: encoded once.
    def body_ids(subscribers: list[FakeSubscriber]) -> set[int]:
        return {id(body) for s in subscribers for body in s.queue.take_batch(1 << 20).parts[::2]}

    assert len(body_ids(binary)) == 1
    assert len(body_ids(text)) == 1


# --- policies -------------------------------------------------------------------------------


def full_subscriber(
    hub: Hub, pattern: str, encoding: Encoding = Encoding.MSGPACK
) -> FakeSubscriber:
    subscriber = FakeSubscriber(encoding, OutboundQueue(1, 1 << 20))
    subscribe(hub, subscriber, pattern)
    assert subscriber.queue.offer(pattern, "x", b"old", b"", Policy.BLOCK) is Offer.QUEUED
    return subscriber


async def test_block_waits_for_room_then_queues(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub()
    slow = full_subscriber(hub, "chat.>")
    published = trio.Event()

    async def publisher() -> None:
        await publish(hub, "chat.a", "hi")
        published.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        await trio.sleep(SLOW_TIMEOUT - 1)
        assert not published.is_set()
        old, new = slow.queue.take_batch(1 << 20).frames  # the writer makes room
        assert old == b"old" and msgpack.unpackb(new) == msg("chat.a", "chat.>", "hi")
        await trio.testing.wait_all_tasks_blocked()
        assert published.is_set()
    assert slow.closed == []


async def test_block_closes_a_subscriber_full_past_slow_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub()
    slow = full_subscriber(hub, "chat.>")
    healthy = FakeSubscriber()
    subscribe(hub, healthy, "chat.*")
    start = trio.current_time()
    assert await publish(hub, "chat.a", "hi") == 2
    assert trio.current_time() - start == pytest.approx(SLOW_TIMEOUT)
    assert slow.closed == [f"outbound queue full for {SLOW_TIMEOUT:g} s (block)"]
    assert healthy.received() == [msg("chat.a", "chat.*", "hi")]


async def test_block_timeout_counts_from_when_the_queue_first_filled(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub()
    slow = full_subscriber(hub, "chat.>")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish, hub, "chat.a", 1)
        await trio.sleep(3)
        start = trio.current_time()
        # A second publisher gives up with the first: the subscriber made no progress.
        await publish(hub, "chat.b", 2)
        assert trio.current_time() - start == pytest.approx(SLOW_TIMEOUT - 3)
    assert slow.closed


async def test_block_publish_returns_when_the_subscriber_goes_away(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = make_hub()
    slow = full_subscriber(hub, "chat.>")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish, hub, "chat.a", 1)
        await trio.testing.wait_all_tasks_blocked()
        slow.queue.close()  # the connection closed for its own reasons
    assert trio.current_time() < SLOW_TIMEOUT
    assert slow.closed == []


async def test_disconnect_closes_a_full_subscriber_at_once() -> None:
    hub = make_hub({"feed.>": Policy.DISCONNECT})
    slow = full_subscriber(hub, "feed.>")
    healthy = FakeSubscriber()
    subscribe(hub, healthy, "feed.*")
    with trio.testing.assert_no_checkpoints():
        assert await publish(hub, "feed.a", 1) == 2
    assert slow.closed == ["outbound queue full on 'feed.a' (disconnect)"]
    assert slow.received() == []
    assert healthy.received() == [msg("feed.a", "feed.*", 1)]


@pytest.mark.parametrize("policy", [Policy.DROP_OLDEST, Policy.DROP_NEWEST, Policy.CONFLATE])
async def test_drop_policies_never_wait_and_report_lag(policy: Policy) -> None:
    hub = make_hub({"ticks.>": policy})
    slow = full_subscriber(hub, "ticks.>")
    with trio.testing.assert_no_checkpoints():
        await publish(hub, "ticks.a", 1)
    assert slow.queue.take_batch(1 << 20).lags == {"ticks.>": 1}
    assert slow.closed == []


async def test_policy_follows_the_topic_not_the_subscription() -> None:
    hub = make_hub({"ticks.>": Policy.DROP_NEWEST})
    slow = full_subscriber(hub, ">")
    with trio.testing.assert_no_checkpoints():
        await publish(hub, "ticks.a", 1)  # drop_newest: dropped, no wait
    with trio.move_on_after(0) as scope:  # block: would wait
        await publish(hub, "chat.a", 1)
    assert scope.cancelled_caught
    assert slow.queue.take_batch(1 << 20).lags == {">": 1}
