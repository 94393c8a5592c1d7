"""Refill in the Python client: what the broker dropped for a slow subscription, read back with
``history`` and handed over in offset order; what the topic no longer keeps, told as a
:class:`Gap` between the messages around it.

Against a broker process whose ``refill.>`` topics are ``drop_oldest`` with 10 000 messages of
history (``refill.short.>``: 100), behind outbound queues of 16 messages, each test on a topic
of its own (its offsets start at 1, and each message's data is its offset). A subscriber is
slow because its consumer takes nothing while its client's buffer is small: the client's
reader waits for room, stops reading the socket, and the broker drops. A scripted server
(:mod:`tests.fake_server`) shows what a real broker does only by chance: pages, the cap, a
failed read, a new epoch. Every async test runs under asyncio and under Trio.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import anyio.abc
import pytest

from broker.pytest_plugin import BrokerProcess
from broker_client import Client, Gap, Message, Position, Subscription, connect
from broker_client.codec import Encoding, decode, encode
from broker_client.recovery import Recovery
from broker_client.refill import Read, Refill
from tests.anyio_helpers import wait_until
from tests.anyio_proxy import start_proxy
from tests.fake_server import Peer, Request, start_fake
from tests.test_client_recovery import TINY

pytestmark = pytest.mark.anyio

CONFIG = """
[limits]
queue_messages = 16

[[topics]]
pattern = "refill.short.>"
on_full = "drop_oldest"
history_size = 100

[[topics]]
pattern = "refill.>"
on_full = "drop_oldest"
history_size = 10000
"""
#: Messages published while the subscriber takes nothing: far more than its queue of 16.
N = 3000

Item = Message | Gap


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(CONFIG) as process:
        yield process


@pytest.fixture(scope="module")
def topics() -> Iterator[int]:
    return itertools.count()


@pytest.fixture
def topic(topics: Iterator[int]) -> str:
    """A ``refill.>`` topic no test used before."""
    return f"refill.t{next(topics)}"


async def publish_range(publisher: Client, topic: str, first: int, last: int) -> None:
    """Publish ``first``..``last`` without waiting for each; return once the broker acked the
    last, so every one is queued for every subscriber (under ``block``, a subscriber that
    takes nothing would hold this)."""
    for n in range(first, last):
        publisher.publish_nowait(topic, n)
    await publisher.publish(topic, last)


def accounted(items: Sequence[Item]) -> list[int]:
    """Each offset ``items`` account for, in order: a message's, and each of a gap's."""
    offsets: list[int] = []
    for item in items:
        if isinstance(item, Gap):
            offsets.extend(range(item.first, item.last + 1))
        else:
            assert item.data == item.offset
            offsets.append(item.data)
    return offsets


async def take(sub: Subscription[Item], count: int) -> list[Item]:
    """What ``sub`` yields until it accounts for ``count`` offsets."""
    items: list[Item] = []
    with anyio.fail_after(30):
        while count > 0:
            items.append(await sub.receive())
            count -= len(accounted(items[-1:]))
    return items


async def take_until_refilling(sub: Subscription[Item]) -> list[Item]:
    """Take what ``sub`` yields until a refill runs (it then waits for room in the buffer)."""
    items: list[Item] = []
    with anyio.fail_after(10):
        while not sub.refilling:
            items.append(await sub.receive())
    return items


# --- against the broker ---


@pytest.mark.parametrize("buffer_size", [4, 100])
async def test_a_stalled_subscriber_gets_every_message_in_order_and_never_holds_the_publisher(
    broker: BrokerProcess, topic: str, buffer_size: int, task_group: anyio.abc.TaskGroup
) -> None:
    async with (
        connect(broker.url, buffer_size=buffer_size) as client,
        client.subscribe(topic, gaps=True) as sub,
        connect(broker.url, outbox_size=2 * N) as publisher,
    ):
        with anyio.fail_after(5):  # every ack comes while the subscriber takes nothing
            await publish_range(publisher, topic, 1, N)
        task_group.start_soon(publish_range, publisher, topic, N + 1, 2 * N)  # as it catches up
        items = await take(sub, 2 * N)
        assert [item.offset for item in items if isinstance(item, Message)] == [
            *range(1, 2 * N + 1)
        ]
        assert sub.dropped > 1000, f"the broker dropped {sub.dropped}: too few to prove anything"
        assert sub.refills >= 3, f"{sub.refills} reads of at most 1000 each"
        assert (sub.refilling, sub.gaps, sub.buffered) == (False, 0, 0)
        assert sub.position is not None and sub.position.offset == 2 * N


async def test_a_subscriber_slower_than_the_history_covers_is_told_exactly_which_offsets_were_lost(
    broker: BrokerProcess, topics: Iterator[int]
) -> None:
    topic = f"refill.short.t{next(topics)}"  # keeps its last 100 messages
    gaps: list[str] = []
    async with (
        connect(broker.url, buffer_size=4, on_gap=lambda _, why: gaps.append(why)) as client,
        client.subscribe(topic, gaps=True) as sub,
        connect(broker.url, outbox_size=N) as publisher,
    ):
        await publish_range(publisher, topic, 1, N)
        items = await take(sub, N)
        assert accounted(items) == [*range(1, N + 1)]  # each offset once, in order
        lost = [item for item in items if isinstance(item, Gap)]
        assert lost and all(gap.why == "evicted" and gap.topic == topic for gap in lost)
        received = {item.offset for item in items if isinstance(item, Message)}
        assert received >= set(range(N - 99, N + 1)), "every message still kept arrived"
        assert sub.gaps == len(lost) and gaps == [str(gap) for gap in lost]
        assert gaps[0].startswith(f"messages {lost[0].first}..{lost[0].last} of {topic} will ")


async def test_without_gaps_true_a_subscription_yields_messages_alone_and_is_told_otherwise(
    broker: BrokerProcess, topics: Iterator[int]
) -> None:
    topic = f"refill.short.t{next(topics)}"
    told: list[str] = []
    async with (
        connect(broker.url, buffer_size=4, on_gap=lambda _, why: told.append(why)) as client,
        client.subscribe(topic) as sub,  # code written for messages never meets a Gap
        connect(broker.url, outbox_size=N) as publisher,
    ):
        await publish_range(publisher, topic, 1, N)
        offsets: list[int] = []
        with anyio.fail_after(30):
            while not offsets or offsets[-1] < N:
                message = await sub.receive()
                assert message.offset is not None and message.data == message.offset
                offsets.append(message.offset)
        assert offsets == sorted(offsets) and offsets[-100:] == [*range(N - 99, N + 1)]
        assert sub.gaps == len(told) > 0  # the missing ones are counted, logged and told


async def test_an_unsubscribe_mid_refill_ends_it_where_it_was(
    broker: BrokerProcess, topic: str
) -> None:
    async with (
        connect(broker.url, buffer_size=4) as client,
        connect(broker.url, outbox_size=N) as publisher,
    ):
        async with client.subscribe(topic, gaps=True) as sub:
            await publish_range(publisher, topic, 1, N)
            taken = await take_until_refilling(sub)
            # Its position is what it handed over: what was taken, then what waits in the buffer.
            await wait_until(lambda: sub.position is not None
                             and sub.position.offset == len(taken) + sub.buffered)  # fmt: skip
            assert accounted(taken) == [*range(1, len(taken) + 1)]
            reads = sub.refills
        assert not sub.refilling
        async with client.subscribe(topic) as again:  # a fresh subscription, live from here
            await publisher.publish(topic, N + 1)
            with anyio.fail_after(5):
                assert (await again.receive()) == Message(topic, N + 1, topic, N + 1)
            assert (again.refilling, again.refills) == (False, 0)
        assert sub.refills == reads


async def test_a_connection_cut_mid_refill_recovers_exactly_without_a_gap_or_a_duplicate(
    broker: BrokerProcess, topic: str, task_group: anyio.abc.TaskGroup
) -> None:
    proxy = await start_proxy(task_group, broker.port)
    async with (
        connect(proxy.url, buffer_size=4, backoff=TINY) as client,
        client.subscribe(topic, gaps=True) as sub,
        connect(broker.url, outbox_size=N) as publisher,
    ):
        await publish_range(publisher, topic, 1, N)
        items = await take_until_refilling(sub)
        proxy.down()  # the refill is let go: the resubscription's since brings the rest
        await wait_until(lambda: not client.connected and not sub.refilling)
        proxy.up()
        await wait_until(lambda: client.reconnects == 1)
        await publish_range(publisher, topic, N + 1, N + 100)
        items += await take(sub, N + 100 - len(accounted(items)))
        assert [item.offset for item in items if isinstance(item, Message)] == [*range(1, N + 101)]
        assert (sub.recovered, sub.gaps) == (True, 0)


async def test_a_wildcard_and_refill_false_see_the_offsets_jump(
    broker: BrokerProcess, topic: str
) -> None:
    async with (
        connect(broker.url, buffer_size=4) as client,
        client.subscribe("refill.>") as wildcard,
        connect(broker.url, buffer_size=4) as other,
        other.subscribe(topic, refill=False) as plain,
        connect(broker.url, outbox_size=N) as publisher,
    ):
        await publish_range(publisher, topic, 1, N)
        for sub in (wildcard, plain):
            offsets: list[int] = []
            with anyio.fail_after(10):
                while N not in offsets:
                    offsets += accounted([await sub.receive()])
            assert offsets == sorted(offsets) and len(offsets) < N - 1000  # jumps, no gap told
            assert (sub.refilling, sub.refills) == (False, 0)
        with pytest.raises(ValueError, match="refill=False"):
            async with other.subscribe(topic):
                pass  # pragma: no cover


# --- against a scripted server ---


ROOM = "room.r"


def msg(offset: int) -> dict[str, Any]:
    return {"op": "msg", "topic": ROOM, "sub": ROOM, "data": offset, "offset": offset}


def message(offset: int) -> Message:
    return Message(ROOM, offset, ROOM, offset)


def kept(first: int, last: int) -> list[dict[str, int]]:
    return [{"offset": n, "data": n} for n in range(first, last + 1)]


class Script:
    """The server's side of one scripted connection: frames in, batches of frames out."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._frames: list[dict[str, Any]] = []

    async def next(self) -> dict[str, Any]:
        while not self._frames:
            self._frames.extend(decode(await self.peer.get_message()))
        return self._frames.pop(0)

    async def send(self, *frames: dict[str, Any]) -> None:
        await self.peer.send_message(b"".join(encode(f, Encoding.MSGPACK) for f in frames))

    async def read(self, after: int, limit: int, **answer: Any) -> None:
        """Expect a ``history`` read after ``after`` for ``limit``; send ``answer`` in its ok."""
        frame = await self.next()
        since = {"epoch": "e", "offset": after}
        assert frame == {"op": "history", "id": frame["id"], "topic": ROOM, "since": since,
                         "limit": limit}  # fmt: skip
        await self.send({"op": "ok", "id": frame["id"], "epoch": "e", "offset": 2505, **answer})


async def test_a_refill_reads_pages_holds_its_buffer_size_and_tells_what_it_could_not_read(
    task_group: anyio.abc.TaskGroup, caplog: pytest.LogCaptureFixture
) -> None:
    async def serve(request: Request) -> None:
        script = Script(await request.accept(subprotocol="pubsub.v1.msgpack"))
        sub = await script.next()
        await script.send({"op": "ok", "id": sub["id"], "epoch": "e", "offset": 0}, msg(1))
        # 2..2502 dropped; 2503 and 2504 are held (buffer_size 2), 2505 is not.
        await script.send({"op": "lag", "sub": ROOM, "dropped": 2501},
                          msg(2503), msg(2504), msg(2505))  # fmt: skip
        await script.read(1, 1000, messages=kept(2, 1001), recovered=True)
        await script.read(1001, 1000, messages=kept(1002, 1501), recovered=True)  # 256 KiB
        await script.read(1501, 1000, messages=kept(1502, 2001), recovered=True)
        # 2002..2099 are no longer kept, and the answer goes past what was asked for.
        await script.read(2001, 501, messages=kept(2100, 2600), recovered=False)
        failed = await script.next()  # for 2505, which was not held
        assert (failed["since"]["offset"], failed["limit"]) == (2504, 1)
        await script.send({"op": "err", "id": failed["id"], "code": "unavailable",
                           "msg": "the cluster backplane is unreachable"})  # fmt: skip
        await gave_up.wait()  # else the refill gives up on what comes meanwhile too
        await script.send(msg(2506), msg(2508))  # no refill for 2506; one for 2507
        lost = await script.next()
        assert (lost["since"]["offset"], lost["limit"]) == (2506, 1)
        new_epoch = {"op": "ok", "id": lost["id"], "epoch": "e2", "offset": 3, "messages": []}
        await script.send(new_epoch, msg(2509))
        while True:  # until the client leaves
            await script.next()

    gave_up = anyio.Event()
    async with (
        connect(await start_fake(task_group, serve), buffer_size=2) as client,
        client.subscribe(ROOM, gaps=True) as sub,
    ):
        items = await take(sub, 2505)
        gave_up.set()
        items += await take(sub, 4)
    assert items == [
        *(message(n) for n in range(1, 2002)),
        Gap(ROOM, 2002, 2099, "evicted"),
        *(message(n) for n in range(2100, 2505)),
        Gap(ROOM, 2505, 2505, "read_failed"),
        message(2506),
        Gap(ROOM, 2507, 2507, "history_lost"),
        message(2508),
        message(2509),
    ]
    assert (sub.refills, sub.refilling, sub.gaps, sub.dropped) == (6, False, 3, 2501)
    assert sub.position is not None and sub.position.offset == 2509
    assert "reading the history of 'room.r' failed: unavailable: the cluster" in caplog.text


# --- the pure part ---


def refill_after(offset: int, cap: int = 10) -> Refill:
    recovery = Recovery(ROOM)
    recovery.subscribed({"epoch": "e", "offset": offset})
    return Refill(ROOM, recovery, cap)


def handed_over(refill: Refill) -> list[Item]:
    items = []
    while (item := refill.next_item()) is not None:
        items.append(item)
        refill.handed_over()
    return items


def test_no_jump_no_refill_and_the_replay_of_a_reported_loss_is_no_jump() -> None:
    refill = refill_after(4)
    assert not refill.take(message(5)) and not refill.active
    recovery = Recovery(ROOM)
    recovery.subscribed({"epoch": "e", "offset": 4})
    recovery.resubscribed({"epoch": "e", "offset": 50, "recovered": False})  # 5.. evicted
    told = Refill(ROOM, recovery, 10)
    assert not told.take(message(46))  # the kept tail's first
    recovery.delivered(46)
    assert told.take(message(48)) and told.active  # a drop after it


def test_a_read_cut_short_reads_on_from_its_last_offset_then_hands_over_the_held() -> None:
    refill = refill_after(0, cap=1)
    for offset in (5, 6, 7):  # 6 and 7 past the cap: read back
        assert refill.take(message(offset))
    assert handed_over(refill) == [] and refill.next_read() == Read("e", 0, 4)
    refill.answered(Read("e", 0, 4), {"epoch": "e", "offset": 7, "messages": kept(1, 2)})
    assert [m.offset for m in handed_over(refill) if isinstance(m, Message)] == [1, 2]
    assert refill.next_read() == Read("e", 2, 4)
    refill.answered(Read("e", 2, 4), {"epoch": "e", "offset": 7, "messages": kept(3, 7)})
    assert [m.offset for m in handed_over(refill) if isinstance(m, Message)] == [3, 4, 5]
    assert refill.next_read() == Read("e", 5, 7)
    assert Read("e", 5, 7).frame(ROOM)["limit"] == 2
    refill.answered(Read("e", 5, 7), {"epoch": "e", "offset": 7, "messages": kept(6, 7)})
    assert [m.offset for m in handed_over(refill) if isinstance(m, Message)] == [6, 7]
    assert refill.next_read() is None and not refill.active and refill.reads == 3


def test_an_answer_without_the_missing_offsets_is_a_gap_and_a_stop_lets_go() -> None:
    refill = refill_after(0)
    assert refill.take(message(3))
    read = refill.next_read()
    assert read is not None
    refill.answered(read, {"epoch": "e", "offset": 3, "messages": []})
    assert handed_over(refill) == [Gap(ROOM, 1, 2, "evicted"), message(3)]
    assert refill.take(message(9))
    refill.stop()
    assert not refill.active and refill.next_item() is None and refill.next_read() is None
    assert str(Gap(ROOM, 1, 2, "evicted")) == (
        "messages 1..2 of room.r will never come: the topic no longer keeps them"
    )


def test_a_refilled_message_count_never_passes_the_cap() -> None:
    refill = refill_after(0, cap=3)
    for offset in range(2, 100):
        refill.take(message(offset))
    assert refill.next_read() == Read("e", 0, 1)
    refill.answered(Read("e", 0, 1), {"epoch": "e", "offset": 99, "messages": kept(1, 1)})
    assert [m.offset for m in handed_over(refill) if isinstance(m, Message)] == [1, 2, 3, 4]
    assert refill.next_read() == Read("e", 4, 99)  # the rest, past the cap, is read back


def test_a_jump_after_a_resubscription_that_replayed_nothing_is_refilled() -> None:
    new_epoch = Recovery(ROOM)
    new_epoch.subscribed({"epoch": "e", "offset": 3})
    assert "new epoch" in (new_epoch.resubscribed({"epoch": "f", "offset": 0, "recovered": False})
                           or "")  # fmt: skip
    refill = Refill(ROOM, new_epoch, 10)
    assert refill.take(message(4)) and refill.next_read() == Read("f", 0, 3)  # 1..3 dropped
    expired = Recovery(ROOM)  # the same epoch, every message after ours expired: none replayed
    expired.subscribed({"epoch": "e", "offset": 3})
    expired.resubscribed({"epoch": "e", "offset": 9, "recovered": False})
    refill = Refill(ROOM, expired, 10)
    assert refill.take(message(12)) and refill.next_read() == Read("e", 9, 11)  # 4..9 were told


def test_an_offset_that_goes_back_starts_a_refill_that_learns_the_new_epoch() -> None:
    refill = refill_after(6)
    recovery = refill._recovery
    assert recovery.restarted(3, refill.highest) is not None  # told by the client
    assert refill.take(message(3)) and handed_over(refill) == []
    read = refill.next_read()
    assert read == Read(None, 0, 2) and "since" not in read.frame(ROOM)  # from the oldest kept
    refill.answered(read, {"epoch": "f", "offset": 3, "messages": kept(2, 3)})
    assert handed_over(refill) == [Gap(ROOM, 1, 1, "evicted"), message(2), message(3)]
    assert refill.next_read() is None and recovery.position == Position("f", 3)
    # Starting again at 1: nothing is missing, but the read still names the epoch.
    refill = refill_after(6)
    assert refill._recovery.restarted(1) and refill.take(message(1))
    assert handed_over(refill) == [message(1)]
    read = refill.next_read()
    assert read == Read(None, 1, 1) and read.frame(ROOM)["limit"] == 1
    refill.answered(read, {"epoch": "f", "offset": 1, "messages": kept(1, 1)})
    assert handed_over(refill) == [] and refill.next_read() is None
    assert refill._recovery.position == Position("f", 1)


def test_an_offset_that_goes_back_while_refilling_ends_the_old_numbering_with_a_gap() -> None:
    refill = refill_after(4)
    assert refill.take(message(7)) and refill.take(message(8))
    assert refill._recovery.restarted(2, refill.highest) is not None
    assert refill.take(message(2))
    assert handed_over(refill) == [Gap(ROOM, 5, 6, "history_lost"), message(7), message(8)]
    read = refill.next_read()
    assert read == Read(None, 0, 1)
    refill.answered(read, {"epoch": "f", "offset": 2, "messages": []})  # nothing kept: no gap
    assert refill.next_read() == Read("f", 0, 1)  # asked again, of the epoch now known
    refill.answered(Read("f", 0, 1), {"epoch": "f", "offset": 2, "messages": []})
    assert handed_over(refill) == [Gap(ROOM, 1, 1, "evicted"), message(2)]
    # A read of an unknown epoch that fails gives up learning it: no read after.
    refill = refill_after(4)
    assert refill._recovery.restarted(1) and refill.take(message(1))
    handed_over(refill)
    refill.failed()
    assert refill.next_read() is None and not refill.active
