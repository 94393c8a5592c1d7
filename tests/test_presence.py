"""Presence on one node: members, pages, join and leave (docs/presence.md).

The roster and the pattern overlap are tested without sockets; the rest over real WebSockets
against a broker whose ``room.>`` topics keep presence (``quiet.>`` has none).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing

from broker.config import AuthConfig, TokenGrant
from broker.core.hub import ANNOUNCE_COST, ANNOUNCE_WINDOW, Hub, Subscription
from broker.core.outbound import OutboundQueue, Policy
from broker.core.presence import Member, Roster, new_client_id
from broker.core.rules import PolicyTable, TopicRule
from broker.io.server import Broker
from broker.protocol.frames import Encoding
from broker.protocol.topics import patterns_overlap
from tests.helpers import make_config, start_broker, wait_until
from tests.rawsocket import RawClient, open_raw
from tests.test_hub import FakeSubscriber, publish
from tests.wire import WireClient, bearer, connect

ROOM = TopicRule("room.>", Policy.DROP_OLDEST, presence=True)


def presence_config(**limits: Any) -> Any:
    return make_config(**limits).replace(topics=(ROOM,))


# --- the pure part ---


def member(client: str, user: str | None = None) -> Member:
    return Member(client, user, None)


def test_a_roster_pages_in_client_order_and_each_staying_member_once() -> None:
    roster = Roster()
    for client in ["c", "a", "e", "b", "d"]:
        assert roster.join("t", member(client))
    assert not roster.join("t", member("a"))  # there already
    first = roster.page("t", 2)
    assert (first.count, [m.client for m in first.members], first.cursor) == (5, ["a", "b"], "b")
    roster.leave("t", "a")  # before the cursor: changes nothing ahead
    roster.leave("t", "c")  # ahead: never returned
    roster.join("t", member("bb"))  # ahead of the cursor: returned
    rest = roster.page("t", 10, first.cursor)
    assert [m.client for m in rest.members] == ["bb", "d", "e"] and rest.cursor is None
    assert rest.count == 4 and roster.members == 4


def test_a_roster_forgets_an_empty_topic_and_answers_a_count_only_page() -> None:
    roster = Roster()
    roster.join("t", member("a"))
    assert roster.page("t", 0).members == [] and roster.page("t", 0).count == 1
    assert roster.leave("t", "a") == member("a") and roster.leave("t", "a") is None
    assert len(roster) == 0 and roster.page("t").count == 0


def test_client_ids_are_unique_and_sort_in_the_order_they_were_made() -> None:
    ids = [new_client_id() for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("room.>", "room.a", True),
        ("room.>", "*.a", True),
        ("room.>", ">", True),
        ("room.>", "room", False),
        ("room.*", "room.a.b", False),
        ("room.*", "*.*", True),
        ("a.b", "a.c", False),
        ("a.*.c", "a.b.>", True),
    ],
)
def test_patterns_overlap_when_some_topic_matches_both(
    first: str, second: str, overlap: bool
) -> None:
    assert patterns_overlap(first, second) is overlap
    assert patterns_overlap(second, first) is overlap


def test_presence_covers_concrete_topics_by_their_rule_and_wildcards_by_overlap() -> None:
    table = PolicyTable([TopicRule("room.quiet", Policy.BLOCK), ROOM])
    assert table.presence_covers("room.a") and table.presence_covers("room.*")
    assert table.presence_covers(">") and not table.presence_covers("chat.*")
    assert not table.presence_covers("room.quiet")  # the first rule wins


# --- over real sockets ---


async def sub(client: WireClient, topic: str, id: int, **fields: Any) -> dict[str, Any]:
    await client.send({"op": "sub", "id": id, "topic": topic, **fields})
    return await client.reply(id)


async def presence(client: WireClient, topic: str, id: int, **fields: Any) -> dict[str, Any]:
    await client.send({"op": "presence", "id": id, "topic": topic, **fields})
    return await client.reply(id)


async def test_members_join_and_leave_on_unsub_and_on_close(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, presence_config())
    async with connect(broker.url) as watcher:
        assert (await sub(watcher, "room.1", 1, join_leave=True))["op"] == "ok"
        own = await watcher.expect("join")  # its own join included
        assert own["topic"] == "room.1" and own["sub"] == "room.1"
        assert own["member"]["user"] is None and own["member"]["info"] is None
        async with connect(broker.url) as guest:
            await sub(guest, "room.1", 1, info={"name": "ada"})
            joined = await watcher.expect("join")
            assert joined["member"]["info"] == {"name": "ada"}
            answer = await presence(watcher, "room.1", 2)
            assert answer["count"] == 2 and "cursor" not in answer
            assert {m["client"] for m in answer["members"]} == {
                own["member"]["client"],
                joined["member"]["client"],
            }
            await guest.send({"op": "unsub", "id": 2, "topic": "room.1"})
            assert (await watcher.expect("leave"))["member"] == joined["member"]
            await sub(guest, "room.1", 3)
            rejoined = (await watcher.expect("join"))["member"]
            assert rejoined["client"] == joined["member"]["client"]  # the same connection
        assert (await watcher.expect("leave"))["member"]["client"] == rejoined["client"]
        assert (await presence(watcher, "room.1", 4))["count"] == 1


@pytest.mark.parametrize("ending", ["reset", "half-close", "silence"])
async def test_a_member_whose_connection_dies_leaves_and_the_others_carry_on(
    nursery: trio.Nursery, ending: str
) -> None:
    """Each way a connection can end without a close frame: a TCP reset, a half-close (FIN,
    nothing more), silence (no pong: the keep-alive gives up)."""
    config = presence_config()
    if ending == "silence":
        config = make_config(server={"ping_interval": 0.2, "ping_timeout": 0.2}).replace(
            topics=(ROOM,)
        )
    broker = await start_broker(nursery, config)
    async with connect(broker.url) as watcher:
        await sub(watcher, "room.k", 1, join_leave=True)
        await watcher.expect("join")
        raw = await open_raw(broker.port or 0, ("pubsub.v1.msgpack",))
        assert isinstance(raw, RawClient)
        await raw.send_frames({"op": "sub", "id": 1, "topic": "room.k"})
        await watcher.expect("join")
        if ending == "reset":
            raw.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            raw.stream.socket.close()  # no close frame, no FIN
        elif ending == "half-close":
            await raw.stream.send_eof()  # FIN, and the socket stays open for reading
        left = await watcher.expect("leave")  # silence: after ping_interval + ping_timeout
        assert left["topic"] == "room.k"
        assert (await presence(watcher, "room.k", 2))["count"] == 1
        await watcher.publish("room.k", "still here", id=3)
        assert (await watcher.expect("msg"))["data"] == "still here"
        await raw.stream.aclose()


async def test_wildcards_are_not_members_but_may_watch_join_and_leave(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, presence_config())
    async with connect(broker.url) as watcher, connect(broker.url) as member_client:
        await sub(watcher, "room.*", 1, join_leave=True)
        await sub(member_client, "room.a", 1)
        joined = await watcher.expect("join")
        assert (joined["topic"], joined["sub"]) == ("room.a", "room.*")
        assert (await presence(watcher, "room.a", 2))["count"] == 1  # the wildcard is not in it


async def test_pages_of_a_large_room_return_every_member_once(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, presence_config())
    async with trio.open_nursery() as members:
        clients: list[WireClient] = []
        for _ in range(25):
            client = await members.start(_member, broker.url, "room.big")
            clients.append(client)
        async with connect(broker.url) as asker:
            seen: list[str] = []
            cursor = None
            for id in range(1, 100):
                answer = await presence(
                    asker, "room.big", id, limit=10, **({"cursor": cursor} if cursor else {})
                )
                assert answer["count"] == 25 and len(answer["members"]) <= 10
                seen += [m["client"] for m in answer["members"]]
                cursor = answer.get("cursor")
                if cursor is None:
                    break
            assert len(seen) == len(set(seen)) == 25
            only_count = await presence(asker, "room.big", 200, limit=0)
            assert only_count["count"] == 25 and only_count["members"] == []
        members.cancel_scope.cancel()


async def _member(url: str, topic: str, *, task_status: Any) -> None:
    async with connect(url) as client:
        await sub(client, topic, 1)
        task_status.started(client)
        await trio.sleep_forever()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"op": "presence", "id": 1, "topic": "quiet.a"}, "not_enabled"),
        ({"op": "presence", "id": 1, "topic": "room.*"}, "invalid_topic"),
        ({"op": "presence", "id": 1, "topic": "room.a", "limit": 1001}, "bad_request"),
        ({"op": "presence", "id": 1, "topic": "room.a", "cursor": 5}, "bad_request"),
        ({"op": "sub", "id": 1, "topic": "quiet.a", "join_leave": True}, "not_enabled"),
        ({"op": "sub", "id": 1, "topic": "room.a", "join_leave": "yes"}, "bad_request"),
        ({"op": "sub", "id": 1, "topic": "room.a", "info": "x" * 1100}, "too_large"),
    ],
)
async def test_bad_presence_requests_get_their_error_and_the_connection_goes_on(
    nursery: trio.Nursery, frame: dict[str, Any], code: str
) -> None:
    broker = await start_broker(nursery, presence_config())
    async with connect(broker.url) as client:
        await client.send(frame)
        assert (await client.reply(1))["code"] == code
        assert (await sub(client, "room.ok", 2))["op"] == "ok"
        assert (await presence(client, "room.ok", 3))["count"] == 1


async def test_presence_needs_the_subscribe_permission_and_shows_the_token(
    nursery: trio.Nursery,
) -> None:
    grants = (
        TokenGrant("t-ada", "ada", subscribe=("room.>",), info={"role": "admin"}),
        TokenGrant("t-bob", "bob", publish=("x",)),
    )
    config = presence_config().replace(auth=AuthConfig("tokens", grants))
    broker = await start_broker(nursery, config)
    async with connect(broker.url, extra_headers=bearer("t-ada")) as ada:
        await sub(ada, "room.1", 1, join_leave=True, info={"role": "forged"})
        joined = (await ada.expect("join"))["member"]
        assert joined["user"] == "ada" and joined["info"] == {"role": "admin"}  # the token's
    async with connect(broker.url, extra_headers=bearer("t-bob")) as bob:
        refused = await presence(bob, "room.1", 1)
        assert (refused["code"], refused["msg"]) == (
            "forbidden",
            "not allowed to subscribe to 'room.1', which reading its presence needs",
        )


async def test_join_and_leave_cost_nothing_where_nobody_asked(nursery: trio.Nursery) -> None:
    broker: Broker = await start_broker(nursery, presence_config())
    async with connect(broker.url) as a, connect(broker.url) as b:
        await sub(a, "room.q", 1)
        await sub(b, "room.q", 1)
        await b.publish("room.q", "hello", id=2)
        assert (await a.expect("msg"))["data"] == "hello"  # no join frame came first
        await wait_until(lambda: broker.delivery.presence.members == 2)


# --- join and leave in one write per window (no sockets, trio's autojump clock) ---


async def test_a_join_storm_reaches_a_watcher_in_one_write_per_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub(PolicyTable([ROOM]), 5.0)
    watcher = FakeSubscriber(queue=OutboundQueue(1024, 1 << 20))
    hub.add(Subscription(watcher, "room.1", join_leave=True))
    woken = 0

    class Writer:
        """The watcher's connection: a writer started takes everything queued, then ends."""

        def take_wake_up(self) -> bool:
            return False

        def start_writer(self) -> None:
            nonlocal woken
            woken += 1
            frames = watcher.received()
            assert len(frames) == 500 and {f["op"] for f in frames} == {"join"}
            watcher.queue.writer_done()

    watcher.queue.owner = Writer()
    watcher.queue.writer_done()  # no writer runs
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.write_announcements)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(500):  # 500 joins in less than a window
            hub.announce("room.1", "join", Member(f"c{n}", None, None).as_map(), 0.0)
            await trio.sleep(ANNOUNCE_WINDOW / 1000)
        assert woken == 0
        await trio.sleep(ANNOUNCE_WINDOW)
        assert woken == 1  # one wake-up, one batch, for 500 joins
        nursery.cancel_scope.cancel()


def watch(hub: Hub, pattern: str, encoding: Encoding = Encoding.MSGPACK) -> FakeSubscriber:
    watcher = FakeSubscriber(encoding=encoding, queue=OutboundQueue(1024, 1 << 20))
    hub.add(Subscription(watcher, pattern, join_leave=True))
    return watcher


def announce(hub: Hub, op: str, client: str) -> None:
    hub.announce("room.1", op, member(client).as_map(), 0.0)


def seen(watcher: FakeSubscriber) -> list[tuple[str, str]]:
    return [(f["op"], f.get("member", {}).get("client", f["sub"])) for f in watcher.received()]


async def test_the_window_grows_with_the_watchers_it_reached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub(PolicyTable([ROOM]), 5.0)
    watchers = [watch(hub, "room.1") for _ in range(2000)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.write_announcements)
        announce(hub, "join", "a")
        await trio.sleep(ANNOUNCE_WINDOW + 0.001)
        assert seen(watchers[0]) == [("join", "a")]  # 20 ms for the first
        assert hub.announce_window == pytest.approx(2000 * ANNOUNCE_COST)  # 0.2 s next
        announce(hub, "join", "b")
        await trio.sleep(0.19)
        assert seen(watchers[0]) == []
        await trio.sleep(0.02)
        assert seen(watchers[0]) == [("join", "b")]
        assert seen(watchers[-1]) == [("join", "a"), ("join", "b")]
        nursery.cancel_scope.cancel()


def test_a_watcher_made_mid_window_gets_nothing_announced_before_it() -> None:
    hub = Hub(PolicyTable([ROOM]), 5.0)
    early = watch(hub, "room.1")
    announce(hub, "join", "a")
    late = watch(hub, "room.1", Encoding.JSON)  # then its own join, as a session does
    announce(hub, "join", "late")
    announce(hub, "leave", "a")
    hub.flush_announcements()
    assert seen(early) == [("join", "a"), ("join", "late"), ("leave", "a")]
    assert seen(late) == [("join", "late"), ("leave", "a")]  # its own join comes first


async def test_a_message_never_overtakes_a_join_announced_before_it() -> None:
    hub = Hub(PolicyTable([ROOM]), 5.0)
    watcher = watch(hub, "room.1")
    announce(hub, "join", "a")
    await publish(hub, "room.1", "hello")  # within the window: the join is flushed first
    assert seen(watcher) == [("join", "a"), ("msg", "room.1")]
    hub.flush_announcements()  # nothing left to offer
    assert seen(watcher) == []


def test_watchers_of_one_pattern_and_encoding_share_one_entry_per_window() -> None:
    hub = Hub(PolicyTable([ROOM]), 5.0)
    a, b, wide = watch(hub, "room.1"), watch(hub, "room.1"), watch(hub, "room.*")
    text = watch(hub, "room.1", Encoding.JSON)
    for n in range(3):
        announce(hub, "join", f"c{n}")
    hub.flush_announcements()
    (shared,) = a.queue.take_batch(1 << 20).parts[::2]
    (same,) = b.queue.take_batch(1 << 20).parts[::2]
    assert same is shared  # one copy in memory for every watcher
    joins = [("join", f"c{n}") for n in range(3)]
    assert seen(text) == joins
    frames = wide.received()
    assert [f["member"]["client"] for f in frames] == ["c0", "c1", "c2"]
    assert {f["sub"] for f in frames} == {"room.*"}


async def test_a_wildcard_presence_or_history_query_is_told_why_in_its_own_words(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="broker.server")
    broker = await start_broker(nursery, presence_config())
    assert any("room.>=drop_oldest (presence)" in r.getMessage() for r in caplog.records)
    async with connect(broker.url) as client:
        for id, op in enumerate(("presence", "history"), start=1):
            await client.send({"op": op, "id": id, "topic": "room.*"})
            reply = await client.reply(id)
            assert reply["code"] == "invalid_topic"
            assert (
                reply["msg"]
                == f"'{op}' answers for one concrete topic, not for the pattern 'room.*'"
            )
