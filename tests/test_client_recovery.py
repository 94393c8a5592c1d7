"""The Python client resumes subscriptions after a reconnect: every message once, in order,
and a loud signal (``recovered``, ``gaps``, ``on_gap``, a warning) when it cannot.

The client reaches the broker through a :class:`~tests.anyio_proxy.Proxy` that the tests cut.
Every async test runs under asyncio and under Trio, against broker processes whose ``chat.>``
topics keep history, each test on a topic of its own (so its offsets start at 1).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest

from broker.pytest_plugin import BrokerProcess
from broker_client import Backoff, Client, Message, Position, Subscription, connect
from broker_client.recovery import Recovery
from tests.anyio_helpers import wait_until
from tests.anyio_proxy import Proxy, start_proxy

pytestmark = pytest.mark.anyio

TINY = Backoff(base=0.001, max=0.01)
TOPIC = "chat.room"  # the pure tests' topic


def history(size: int = 1000) -> str:
    """The config of brokers whose ``chat.>`` topics keep ``size`` messages."""
    return f'[[topics]]\npattern = "chat.>"\non_full = "block"\nhistory_size = {size}\n'


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(history()) as process:
        yield process


@pytest.fixture(scope="module")
def topics() -> Iterator[str]:
    return (f"chat.t{n}" for n in itertools.count())


@pytest.fixture
def topic(topics: Iterator[str]) -> str:
    """A topic with history that no test used before."""
    return next(topics)


@pytest.fixture
async def proxy(broker: BrokerProcess, task_group: anyio.abc.TaskGroup) -> Proxy:
    """A proxy in front of the module's broker."""
    return await start_proxy(task_group, broker.port)


# --- the pure part ---


def take(recovery: Recovery, offset: int | None) -> str | None:
    """What the client's reader does with a ``msg`` (a refill aside): learn whether the
    topic's numbering started again (returned: why messages may be missing), deliver it."""
    why = recovery.restarted(offset)
    recovery.delivered(offset)
    return why


def test_recovery_remembers_the_last_offset_delivered() -> None:
    recovery = Recovery(TOPIC)
    assert recovery.since() is None and recovery.position is None
    recovery.subscribed({"op": "ok", "epoch": "e1", "offset": 4})
    assert [take(recovery, n) for n in (5, 6, 7)] == [None, None, None]
    assert recovery.since() == {"epoch": "e1", "offset": 7}
    assert recovery.resubscribed({"epoch": "e1", "offset": 9, "recovered": True}) is None
    assert recovery.recovered is True
    assert [take(recovery, n) for n in (8, 9)] == [None, None]  # the replay
    assert recovery.position == Position("e1", 9)


def test_an_offset_that_goes_back_is_a_new_numbering_told_and_then_learned() -> None:
    recovery = Recovery(TOPIC)
    recovery.subscribed({"epoch": "e1", "offset": 4})
    assert take(recovery, 5) is None and take(recovery, 6) is None
    why = take(recovery, 1)  # the topic was evicted whole, then published to again
    assert why == (
        "the topic's history was lost (its offsets started again at 1): what was published "
        "after offset 6 of its old epoch may be missing"
    )
    assert recovery.renumbered and recovery.position is None and recovery.since() is None
    assert take(recovery, 2) is None  # told once
    recovery.adopt("e2")  # a history read named the new epoch
    assert not recovery.renumbered and recovery.since() == {"epoch": "e2", "offset": 2}
    assert recovery.restarted(3, seen=3) is not None  # behind what a refill holds


def test_recovery_after_eviction_keeps_its_offset_so_the_kept_tail_is_delivered() -> None:
    recovery = Recovery(TOPIC)
    recovery.subscribed({"epoch": "e1", "offset": 2})
    why = recovery.resubscribed({"epoch": "e1", "offset": 50, "recovered": False})
    assert why == "messages after offset 2 were no longer kept" and recovery.recovered is False
    assert take(recovery, 46) is None and recovery.position == Position("e1", 46)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"epoch": "e2", "offset": 1, "recovered": False}, "history was lost (new epoch e2)"),
        ({"epoch": "e1", "offset": 3, "recovered": False}, "no longer kept"),  # 3 < our 8
    ],
)
def test_recovery_restarts_from_the_latest_offset_when_its_own_is_void(
    reply: dict[str, object], why: str
) -> None:
    recovery = Recovery(TOPIC)
    recovery.subscribed({"epoch": "e1", "offset": 8})
    assert why in (recovery.resubscribed(reply) or "")
    latest = int(str(reply["offset"]))
    assert take(recovery, latest + 1) is None  # the next one is new, not a restart
    assert recovery.position == Position(str(reply["epoch"]), latest + 1)


def test_an_unanswered_resubscription_forgets_the_position_rather_than_skip_messages() -> None:
    recovery = Recovery(TOPIC)
    recovery.subscribed({"epoch": "e1", "offset": 8})
    assert recovery.forget("no answer") == "no answer" and recovery.recovered is False
    assert take(recovery, 1) is None and recovery.since() is None  # a new epoch's first


def test_a_wildcard_never_asks_for_since_and_reports_a_possible_loss_at_each_reconnect() -> None:
    recovery = Recovery("chat.>")
    recovery.subscribed({"op": "ok"})
    assert "wildcard" in (recovery.resubscribed({"op": "ok"}) or "")
    assert recovery.recovered is False
    assert take(recovery, 5) is None and take(recovery, 5) is None  # of different topics
    assert recovery.since() is None
    assert "wildcard" in (recovery.resubscribed({"op": "ok"}) or "")


def test_a_topic_without_history_is_told_at_each_reconnect_what_it_missed() -> None:
    recovery = Recovery("news.a")
    recovery.subscribed({"op": "ok"})
    assert take(recovery, None) is None and recovery.since() is None
    assert "keeps no history" in (recovery.resubscribed({"op": "ok"}) or "")
    assert recovery.recovered is False
    history_lost = Recovery(TOPIC)
    history_lost.subscribed({"epoch": "e1", "offset": 0})
    assert history_lost.resubscribed({"recovered": False}) == "the topic keeps no history any more"


# --- against the broker ---


async def test_async_for_sees_every_offset_once_in_order_across_cuts_during_publishing(
    broker: BrokerProcess, proxy: Proxy, topic: str, task_group: anyio.abc.TaskGroup
) -> None:
    received: list[Message] = []
    published = 0
    stop = anyio.Event()

    async def publish_until_stopped() -> None:
        nonlocal published
        async with connect(broker.url) as publisher:
            while not stop.is_set():
                await publisher.publish(topic, published)
                published += 1

    async with connect(proxy.url, backoff=TINY) as client, client.subscribe(topic) as sub:

        async def consume() -> None:
            async for msg in sub:
                received.append(msg)

        task_group.start_soon(consume)
        async with anyio.create_task_group() as publishing:
            publishing.start_soon(publish_until_stopped)
            for cut in range(1, 4):
                await wait_until(lambda: len(received) >= 50 * cut)  # noqa: B023
                proxy.down()
                mark = published
                await wait_until(lambda: published >= mark + 30)  # noqa: B023 - missed
                proxy.up()
                await wait_until(lambda: client.reconnects == cut)  # noqa: B023
            stop.set()
        await wait_until(lambda: len(received) >= published)
        assert [m.offset for m in received] == list(range(1, published + 1))
        assert [m.data for m in received] == list(range(published))
        assert sub.recovered is True and sub.gaps == 0
        assert sub.position is not None and sub.position.offset == published


async def test_a_broker_restart_is_a_new_epoch_reported_as_a_gap_and_delivery_goes_on(
    broker: BrokerProcess, proxy: Proxy, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    gaps: list[tuple[Subscription, str]] = []

    def on_gap(subscription: Subscription, why: str) -> None:
        gaps.append((subscription, why))

    async with (
        connect(proxy.url, backoff=TINY, on_gap=on_gap) as client,
        client.subscribe(topic) as sub,
    ):
        async with connect(broker.url) as publisher:
            for n in range(3):
                await publisher.publish(topic, n)
        with anyio.fail_after(5):
            assert [(await sub.receive()).offset for _ in range(3)] == [1, 2, 3]
        old_epoch = sub.position.epoch if sub.position else None

        proxy.down()
        await broker.restart()  # its history was in memory: gone
        proxy.up()
        await wait_until(lambda: client.reconnects == 1)

        assert sub.recovered is False and sub.gaps == 1
        ((gapped, why),) = gaps
        assert gapped is sub and "new epoch" in why
        assert any("messages may be missing" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING)  # fmt: skip
        async with connect(broker.url) as publisher:
            await publisher.publish(topic, "fresh")
        with anyio.fail_after(5):
            msg = await sub.receive()
        assert (msg.data, msg.offset) == ("fresh", 1)  # offset 1 again, not taken for a repeat
        assert sub.position is not None and sub.position.epoch != old_epoch


@pytest.fixture(scope="module")
def small_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(history(size=5)) as process:
        yield process


async def test_evicted_messages_are_a_gap_and_the_kept_tail_is_still_delivered(
    small_broker: BrokerProcess, topic: str, task_group: anyio.abc.TaskGroup
) -> None:
    proxy = await start_proxy(task_group, small_broker.port)
    async with (
        connect(proxy.url, backoff=TINY) as client,
        client.subscribe(topic) as sub,
        connect(small_broker.url) as publisher,
    ):
        await publisher.publish(topic, 0)
        with anyio.fail_after(5):
            assert (await sub.receive()).offset == 1
        proxy.down()
        for n in range(1, 21):
            await publisher.publish(topic, n)  # offsets 2..21; 17..21 kept
        proxy.up()
        await wait_until(lambda: client.reconnects == 1)
        assert sub.recovered is False and sub.gaps == 1
        with anyio.fail_after(5):
            assert [(await sub.receive()).offset for _ in range(5)] == [17, 18, 19, 20, 21]


@pytest.fixture(scope="module")
def evicting_broker() -> Iterator[BrokerProcess]:
    """A broker whose history holds ~4 KB: a topic published to least recently is evicted
    whole, and starts a new epoch (offsets from 1 again) when published to next."""
    with BrokerProcess(history(size=5) + "[history]\nmax_bytes = 4000\n") as process:
        yield process


async def test_a_topic_evicted_whole_while_subscribed_is_told_and_its_new_epoch_recovers(
    evicting_broker: BrokerProcess, topic: str, task_group: anyio.abc.TaskGroup
) -> None:
    proxy = await start_proxy(task_group, evicting_broker.port)
    told: list[str] = []
    async with (
        connect(proxy.url, backoff=TINY, on_gap=lambda _, why: told.append(why)) as client,
        client.subscribe(topic) as sub,
        connect(evicting_broker.url) as publisher,
    ):
        for n in range(5):
            await publisher.publish(topic, f"old{n}")
        with anyio.fail_after(5):
            assert [(await sub.receive()).offset for _ in range(5)] == [1, 2, 3, 4, 5]
        old = sub.position
        for other in range(5):  # published later: ours is the least recently published
            for _ in range(5):
                await publisher.publish(f"{topic}.other{other}", "x" * 100)
        for n in range(7):
            await publisher.publish(topic, f"new{n}")
        with anyio.fail_after(5):
            fresh = [await sub.receive() for _ in range(7)]
        assert [(m.data, m.offset) for m in fresh] == [(f"new{n}", n + 1) for n in range(7)]
        assert told == [
            "the topic's history was lost (its offsets started again at 1): what was "
            "published after offset 5 of its old epoch may be missing"
        ]
        await wait_until(lambda: sub.position is not None)  # a history read named the epoch
        assert sub.position is not None and old is not None
        assert sub.position.epoch != old.epoch and sub.position.offset == 7

        proxy.down()
        await wait_until(lambda: not client.connected)
        await publisher.publish(topic, "new7")
        await publisher.publish(topic, "new8")
        proxy.up()
        await wait_until(lambda: client.reconnects == 1)
        with anyio.fail_after(5):
            assert [(await sub.receive()).data for _ in range(2)] == ["new7", "new8"]
        assert sub.recovered is True and len(told) == 1


async def test_a_client_closed_by_a_cancelled_scope_mid_subscribe_closes_cleanly(
    broker: BrokerProcess, topic: str
) -> None:
    with anyio.CancelScope() as scope:  # its aclose runs cancelled
        async with connect(broker.url) as client, client.subscribe(topic):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught and not client.connected


async def test_a_reconnect_is_never_silent_for_what_cannot_recover(
    broker: BrokerProcess, proxy: Proxy, topic: str
) -> None:
    async with (
        connect(proxy.url, backoff=TINY) as client,
        client.subscribe("chat.>") as wildcard,
        client.subscribe("news.>") as no_history,
        client.subscribe(topic) as concrete,
        connect(broker.url) as publisher,
    ):
        await publisher.publish(topic, "a")
        await publisher.publish("news.x", "b")
        with anyio.fail_after(5):
            for sub in (wildcard, no_history, concrete):
                await sub.receive()
        await reconnect_through(proxy, client)
        assert (wildcard.recovered, wildcard.gaps) == (False, 1)
        assert (no_history.recovered, no_history.gaps) == (False, 1)  # told, not silent
        assert (concrete.recovered, concrete.gaps) == (True, 0)
        await publisher.publish(topic, "after")  # the wildcard is live again
        with anyio.fail_after(5):
            assert (await wildcard.receive()).data == "after"


async def reconnect_through(proxy: Proxy, client: Client) -> None:
    """Cut the client's connection and wait for its reconnect."""
    count = client.reconnects
    proxy.down()
    await wait_until(lambda: not client.connected)
    proxy.up()
    await wait_until(lambda: client.reconnects == count + 1)


async def test_a_message_whose_delivery_a_drop_cancelled_is_asked_for_again(
    broker: BrokerProcess, proxy: Proxy, topic: str
) -> None:
    async with (
        connect(proxy.url, backoff=TINY, buffer_size=1) as client,
        client.subscribe(topic) as sub,
        connect(broker.url) as publisher,
    ):
        for n in range(3):
            await publisher.publish(topic, n)
        await wait_until(lambda: sub.buffered == 1)
        await anyio.wait_all_tasks_blocked()  # the reader waits to deliver offset 2
        proxy.down()
        await wait_until(lambda: not client.connected)
        client.publish_nowait("elsewhere", "x")  # the failed write ends the connection
        proxy.up()
        await wait_until(lambda: client.reconnects == 1)
        with anyio.fail_after(5):
            assert [(await sub.receive()).offset for _ in range(3)] == [1, 2, 3]
        assert sub.recovered is True
