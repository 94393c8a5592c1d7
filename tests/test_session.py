"""broker.core.session without sockets: every rule a client's session applies, each refusal.

A session gets a real hub, delivery and outbound queue; its "connection" is a fake that
records close requests. Frames go in as JSON lines (decoded as the connection decodes them),
and what the session answered is read back from the queue.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from broker.core.delivery import LocalDelivery, Unavailable
from broker.core.history import MemoryHistory
from broker.core.hub import Hub, Subscription
from broker.core.outbound import OutboundQueue, Policy
from broker.core.permissions import ANONYMOUS, Identity, Permissions
from broker.core.rules import HistoryLimits, PolicyTable, SessionLimits, TopicRule
from broker.core.session import Session
from broker.core.stats import BrokerStats
from broker.protocol.codes import CloseCode, ErrorCode
from broker.protocol.frames import Encoding

Frame = dict[str, Any]


@dataclass(eq=False)
class FakeClient:
    """A connection without a socket: a real queue, and the close requests it got."""

    queue: OutboundQueue = field(default_factory=lambda: OutboundQueue(4, 1 << 20))
    encoding: Encoding = Encoding.JSON
    closes: list[tuple[int, str]] = field(default_factory=list)

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        self.closes.append((code, reason))
        self.queue.close()

    def close_slow_consumer(self, why: str) -> None:
        self.close(CloseCode.SLOW_CONSUMER, why, flush=False)

    def frames(self) -> list[Frame]:
        """Everything queued for the client, as it would read it."""
        batch = self.queue.take_batch(1 << 30)
        return [json.loads(frame) for frame in batch.frames]


@dataclass
class Setup:
    client: FakeClient
    session: Session
    delivery: LocalDelivery
    stats: BrokerStats


def make_session(
    *,
    identity: Identity = ANONYMOUS,
    rules: tuple[TopicRule, ...] = (),
    client: FakeClient | None = None,
    **limits: Any,
) -> Setup:
    hub = Hub(PolicyTable(rules), slow_timeout=5.0)
    delivery = LocalDelivery(hub, MemoryHistory(hub.policies.history_for))
    client = client if client is not None else FakeClient()
    stats = BrokerStats()
    session = Session(client, delivery, identity, SessionLimits(**limits), stats, "peer", now=0.0)
    return Setup(client, session, delivery, stats)


def message(*frames: Frame) -> str:
    """``frames`` as one JSON WebSocket message."""
    return "\n".join(json.dumps(frame) for frame in frames)


async def run(setup: Setup, *frames: Frame, now: float = 0.0) -> list[Frame]:
    """Execute ``frames`` (one WebSocket message) as the connection does; the replies."""
    messages = [message(*frames)]
    waiting = setup.session.receive(messages, now)
    while waiting is not None:
        await setup.session.complete(waiting)
        waiting = setup.session.receive(messages, now, waiting)
    return setup.client.frames()


def pub(topic: str, data: Any = 1, id: int | None = 1) -> Frame:
    frame: Frame = {"op": "pub", "topic": topic, "data": data}
    if id is not None:
        frame["id"] = id
    return frame


def sub(topic: str, id: int = 1, **extra: Any) -> Frame:
    return {"op": "sub", "id": id, "topic": topic, **extra}


def err(code: str, id: int | None = None) -> tuple[str, str, int | None]:
    return ("err", code, id)


def summary(frames: list[Frame]) -> list[tuple[Any, ...]]:
    """Each reply as (op, id) or (err, code, id); messages as (msg, topic, data)."""
    out: list[tuple[Any, ...]] = []
    for frame in frames:
        if frame["op"] == "err":
            out.append(err(frame["code"], frame.get("id")))
        elif frame["op"] == "msg":
            out.append(("msg", frame["topic"], frame["data"]))
        else:
            out.append((frame["op"], frame.get("id")))
    return out


# --- publishing -----------------------------------------------------------------------------


async def test_a_pub_with_id_is_answered_ok_and_one_without_is_not() -> None:
    setup = make_session()
    assert summary(await run(setup, pub("a", id=1), pub("a", id=None), pub("a", id=2))) == [
        ("ok", 1),
        ("ok", 2),
    ]
    assert setup.stats.publishes["ok"] == 3 and setup.stats.frames_in == 3


async def test_a_pub_over_max_payload_is_too_large() -> None:
    setup = make_session(max_payload=80)
    replies = await run(setup, pub("a", "x" * 80, id=1), pub("a", "x", id=2))
    assert summary(replies) == [err("too_large", 1), ("ok", 2)]
    assert "exceeds max_payload (80)" in replies[0]["msg"]
    assert setup.stats.publishes["too_large"] == 1


async def test_pubs_over_the_rate_are_rate_limited_and_logged_once_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    setup = make_session(publish_rate=1, publish_burst=2)
    with caplog.at_level(logging.INFO, logger="broker.connection"):
        replies = await run(setup, *(pub("a", id=n) for n in range(5)), now=0.0)
        assert summary(replies) == [("ok", 0), ("ok", 1)] + [
            err("rate_limited", n) for n in range(2, 5)
        ]
        assert summary(await run(setup, pub("a", id=9), now=1.5)) == [("ok", 9)]  # refilled
        await run(setup, pub("a", id=10), pub("a", id=11), now=1.5)  # a second burst
    lines = [r.getMessage() for r in caplog.records if "publish rate" in r.getMessage()]
    assert len(lines) == 2 and "1 messages per second" in lines[0]


async def test_the_rate_is_checked_before_the_permission() -> None:
    identity = Identity("limited", Permissions(publish=("mine",), subscribe=()))
    setup = make_session(identity=identity, publish_rate=0.001, publish_burst=2)
    replies = await run(setup, pub("theirs", id=1), pub("theirs", id=2), pub("mine", id=3))
    assert summary(replies) == [err("forbidden", 1), err("forbidden", 2), err("rate_limited", 3)]


async def test_a_pub_outside_the_grants_is_forbidden_and_reaches_no_one() -> None:
    identity = Identity("alice", Permissions(publish=("chat.*",), subscribe=(">",)))
    setup = make_session(identity=identity)
    await run(setup, sub(">", id=1))
    replies = await run(setup, pub("news.x", id=2), pub("chat.x", "hi", id=3))
    assert summary(replies) == [err("forbidden", 2), ("msg", "chat.x", "hi"), ("ok", 3)]


async def test_a_pub_that_a_block_subscriber_holds_back_is_answered_after_room() -> None:
    setup = make_session()
    slow = FakeClient(OutboundQueue(1, 1 << 20))
    subscriber = Session(slow, setup.delivery, ANONYMOUS, SessionLimits(), BrokerStats(), "s", 0)
    waiting = subscriber.receive([message(sub("t"))], 0)
    assert waiting is not None
    await subscriber.complete(waiting)
    messages = [message(*(pub("t", n, id=n) for n in (6, 7, 8)))]
    waiting = setup.session.receive(messages, 0.0)  # 6 fills its queue of 1
    assert waiting is not None and waiting.command.id == 7  # past the bound: 8 waits its turn
    assert summary(setup.client.frames()) == [("ok", 6)]  # 7 is answered after room
    async with trio.open_nursery() as nursery:
        nursery.start_soon(setup.session.complete, waiting)
        await trio.testing.wait_all_tasks_blocked()
        assert summary(slow.frames()) == [("ok", 1), ("msg", "t", 6), ("msg", "t", 7)]
    assert summary(setup.client.frames()) == [("ok", 7)]
    assert setup.session.receive(messages, 0.0, waiting) is None  # then 8
    assert summary(setup.client.frames()) == [("ok", 8)]


async def test_other_nodes_unreachable_is_err_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup = make_session()

    class Far:
        async def complete(self) -> None:
            raise Unavailable("Redis is down")

    monkeypatch.setattr(setup.delivery, "publish", lambda *args, **kwargs: Far())
    replies = await run(setup, pub("a", id=4))
    assert summary(replies) == [err("unavailable", 4)] and "Redis is down" in replies[0]["msg"]
    assert setup.stats.publishes["unavailable"] == 1


async def test_a_bug_publishing_is_err_internal_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = make_session()
    real = setup.delivery.publish

    def failing(topic: str, data: Any, now: float, *, acknowledged: bool = True) -> Any:
        if topic == "boom":
            raise RuntimeError("a bug")
        return real(topic, data, now, acknowledged=acknowledged)

    monkeypatch.setattr(setup.delivery, "publish", failing)
    replies = await run(setup, pub("boom", id=1), pub("calm", id=2))
    assert summary(replies) == [err("internal", 1), ("ok", 2)]
    assert "a bug" in caplog.text


# --- subscribing ----------------------------------------------------------------------------


async def test_a_sub_not_covered_by_a_grant_is_forbidden() -> None:
    identity = Identity("bob", Permissions(publish=(), subscribe=("chat.*",)))
    setup = make_session(identity=identity)
    assert summary(await run(setup, sub("chat.>", id=1), sub("chat.a", id=2))) == [
        err("forbidden", 1),
        ("ok", 2),
    ]
    assert list(setup.session.subscriptions) == ["chat.a"]


async def test_a_repeated_sub_is_ok_and_one_subscription() -> None:
    setup = make_session(max_subscriptions=1)
    assert summary(await run(setup, sub("a", id=1), sub("a", id=2))) == [("ok", 1), ("ok", 2)]
    assert len(setup.delivery.hub.route("a")[1]) == 1


async def test_since_on_a_subscription_held_already_is_a_bad_request() -> None:
    setup = make_session()
    since = {"epoch": "e", "offset": 0}
    replies = await run(setup, sub("a", id=1), sub("a", id=2, since=since))
    assert summary(replies) == [("ok", 1), err("bad_request", 2)]
    assert "unsub first" in replies[1]["msg"]


@pytest.mark.parametrize(
    ("limits", "patterns", "named"),
    [
        ({"max_subscriptions": 2}, ["a", "b", "c"], "at most 2 subscriptions"),
        ({"max_subscription_bytes": 5}, ["aa", "bbb", "c"], "max_subscription_bytes"),
        ({"max_subscription_segments": 4}, ["a.b", "c.d", "e"], "max_subscription_segments"),
    ],
)
async def test_one_subscription_too_many_is_too_many_subs(
    limits: dict[str, Any], patterns: list[str], named: str
) -> None:
    setup = make_session(**limits)
    replies = await run(setup, *(sub(p, id=n) for n, p in enumerate(patterns)))
    assert summary(replies) == [("ok", 0), ("ok", 1), err("too_many_subs", 2)]
    assert named in replies[2]["msg"]
    await run(setup, {"op": "unsub", "id": 5, "topic": patterns[0]})
    assert summary(await run(setup, sub(patterns[2], id=6))) == [("ok", 6)]  # room again


async def test_a_pattern_the_delivery_cannot_follow_is_refused_with_its_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup = make_session()

    def refuse(pattern: str) -> tuple[ErrorCode, str] | None:
        if pattern.startswith(">"):
            return ErrorCode.NOT_ENABLED, "a wildcard within the shard key"
        return (ErrorCode.TOO_MANY_SUBS, "no more globs here") if "*" in pattern else None

    monkeypatch.setattr(setup.delivery, "refuse_subscribe", refuse)
    replies = await run(setup, sub("a.*", id=1), sub("a.b", id=2), sub(">", id=3))
    assert summary(replies) == [err("too_many_subs", 1), ("ok", 2), err("not_enabled", 3)]


async def test_unsub_drops_the_subscription_and_is_ok_even_when_unknown() -> None:
    setup = make_session()
    await run(setup, sub("a"))
    unsub = {"op": "unsub", "id": 2, "topic": "a"}
    assert summary(await run(setup, unsub, {**unsub, "id": 3})) == [("ok", 2), ("ok", 3)]
    assert setup.session.subscriptions == {} and setup.delivery.hub.subscription_count() == 0


async def test_a_sub_with_since_replays_what_it_missed() -> None:
    rule = TopicRule("chat.>", Policy.BLOCK, HistoryLimits(10))
    publisher = make_session(rules=(rule,))
    first = (await run(publisher, sub("chat.a")))[0]
    await run(publisher, {"op": "unsub", "id": 2, "topic": "chat.a"})
    await run(publisher, pub("chat.a", "one", id=3), pub("chat.a", "two", id=4))
    since = {"epoch": first["epoch"], "offset": 0}
    replies = await run(publisher, sub("chat.a", id=5, since=since))
    assert replies[0] == {"op": "ok", "id": 5, "epoch": first["epoch"], "offset": 2,
                          "recovered": True}  # fmt: skip
    assert [(m["offset"], m["data"]) for m in replies[1:]] == [(1, "one"), (2, "two")]


async def test_a_sub_whose_replay_cannot_be_encoded_is_err_internal_and_not_made() -> None:
    rule = TopicRule("chat.>", Policy.BLOCK, HistoryLimits(10))
    setup = make_session(rules=(rule,))
    position = setup.delivery.history.position("chat.bad", 0)
    setup.delivery.history.append("chat.bad", b"\xc1", 0)  # 0xc1 is never msgpack
    since = {"epoch": position.epoch, "offset": 0}
    assert summary(await run(setup, sub("chat.bad", since=since))) == [err("internal", 1)]
    assert setup.session.subscriptions == {}


async def test_end_drops_every_subscription_once_and_still_lists_them_for_the_log() -> None:
    setup = make_session()
    await run(setup, sub("a", id=1), sub("b.*", id=2))
    setup.session.end()
    setup.session.end()
    assert setup.delivery.hub.subscription_count() == 0
    assert list(setup.session.subscriptions) == ["a", "b.*"]


# --- bad frames -----------------------------------------------------------------------------


async def test_each_bad_frame_is_answered_and_max_in_a_row_closes_with_4008() -> None:
    setup = make_session(max_bad_frames=3)
    bad = {"op": "nope", "id": 1}
    replies = await run(setup, bad, bad, sub("a", id=2), bad, bad)
    assert summary(replies) == [err("unknown_op", 1)] * 2 + [("ok", 2)] + [err("unknown_op", 1)] * 2
    assert setup.client.closes == []  # a good frame ended the first run
    await run(setup, bad, pub("a", id=3), pub("a", id=4))
    assert setup.client.closes == [(CloseCode.POLICY, "3 bad frames in a row")]


async def test_once_closing_the_rest_of_a_read_is_not_executed() -> None:
    setup = make_session(max_bad_frames=1)
    read = [message({"op": "nope"}, sub("a")), message(sub("b"))]
    assert setup.session.receive(read, 0.0) is None
    assert setup.session.subscriptions == {}
    assert setup.client.closes == [(CloseCode.POLICY, "1 bad frames in a row")]


async def test_the_messages_of_a_read_run_in_order_and_count_their_bytes() -> None:
    setup = make_session()
    read = [message(pub("a", id=1)), message(pub("a", id=2), pub("a", id=3))]
    assert setup.session.receive(read, 0.0) is None
    assert summary(setup.client.frames()) == [("ok", 1), ("ok", 2), ("ok", 3)]
    assert setup.stats.bytes_in == sum(map(len, read))


def test_a_subscription_is_routed_to_its_client() -> None:
    client = FakeClient()
    subscription = Subscription(client, "a")
    assert subscription.queue is client.queue and subscription.encoding is Encoding.JSON
