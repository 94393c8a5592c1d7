"""Presence in the Python client and the CLI: members, pages, join and leave events, and what
a reconnect or a slow consumer does to them — over real sockets, against a broker process
whose ``room.>`` topics keep presence (``quiet.>`` has none). The client's tests run under
asyncio and under Trio, each in rooms of its own (``room``); the CLI's under Trio.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.abc
import pytest
import trio

from broker.pytest_plugin import BrokerProcess
from broker_client import (
    BrokerError,
    Client,
    Event,
    Join,
    Leave,
    Member,
    Message,
    NotEnabled,
    Presence,
    PresenceGap,
    Subscription,
    TooLarge,
    connect,
)
from broker_client.errors import error_from_frame
from tests.anyio_helpers import METRICS, wait_for_subscriptions, wait_until
from tests.anyio_proxy import start_proxy
from tests.test_cli_client import run
from tests.test_client_recovery import TINY

PRESENCE = METRICS + '[[topics]]\npattern = "room.>"\non_full = "drop_oldest"\npresence = true\n'
NOT_ENABLED = "not_enabled: 'quiet.a' has no presence (a [[topics]] rule with presence = true)"
CLI_ONLY_UNDER_TRIO = pytest.mark.parametrize("anyio_backend", ["trio"])  # as it runs

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(PRESENCE) as process:
        yield process


@pytest.fixture(scope="module")
def rooms() -> Iterator[str]:
    return (f"room.t{n}" for n in itertools.count())


@pytest.fixture
def room(rooms: Iterator[str]) -> str:
    """A presence topic prefix no test used before: its members and watchers are the test's."""
    return next(rooms)


async def next_item(sub: Subscription[Any]) -> Any:
    with anyio.fail_after(5):
        return await sub.receive()


async def join_members(stack: AsyncExitStack, url: str, topic: str, count: int) -> list[Client]:
    """``count`` clients, each a member of ``topic`` (with its index as info) until ``stack``
    closes."""
    clients = []
    for n in range(count):
        client = await stack.enter_async_context(connect(url))
        await stack.enter_async_context(client.subscribe(topic, info={"n": n}))
        clients.append(client)
    return clients


def test_not_enabled_maps_to_its_own_error_class() -> None:
    error = error_from_frame("not_enabled", "no presence here")
    assert isinstance(error, NotEnabled) and isinstance(error, BrokerError)
    assert (error.code, error.message) == ("not_enabled", "no presence here")


# --- the client ---


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_a_join_leave_subscription_sees_members_come_and_go_between_messages(
    broker: BrokerProcess, room: str, encoding: str
) -> None:
    async with (
        connect(broker.url, encoding=encoding) as watcher,
        watcher.subscribe(room, join_leave=True) as sub,
    ):
        own = await next_item(sub)
        assert isinstance(own, Join) and (own.topic, own.pattern) == (room, room)
        assert own.member.user is None and own.member.info is None
        async with connect(broker.url) as guest:
            async with guest.subscribe(room, info={"name": "ada"}):
                await guest.publish(room, "hello")
            joined, message, left = [await next_item(sub) for _ in range(3)]
        assert joined == Join(room, joined.member, room)
        assert joined.member.info == {"name": "ada"} and joined.member != own.member
        assert message == Message(room, "hello", room)
        assert left == Leave(room, joined.member, room)
        page = await watcher.presence(room)
        assert page == Presence(1, (own.member,), None)


async def test_a_wildcard_watches_every_room_without_being_a_member(
    broker: BrokerProcess, room: str
) -> None:
    async with (
        connect(broker.url) as watcher,
        watcher.subscribe(f"{room}.*", join_leave=True) as sub,
        connect(broker.url) as guest,
        guest.subscribe(f"{room}.a"),
        guest.subscribe(f"{room}.b"),
    ):
        events = [await next_item(sub) for _ in range(2)]
        assert [(type(e), e.topic, e.pattern) for e in events] == [
            (Join, f"{room}.a", f"{room}.*"),
            (Join, f"{room}.b", f"{room}.*"),
        ]
        assert (await watcher.presence(f"{room}.a", limit=0)).count == 1  # the guest alone


async def test_members_reads_every_page_and_presence_gives_one_page_with_a_cursor(
    broker: BrokerProcess, room: str
) -> None:
    async with AsyncExitStack() as stack:
        await join_members(stack, broker.url, room, 25)
        async with connect(broker.url) as asker:
            first = await asker.presence(room, limit=10)
            assert first.count == 25 and len(first.members) == 10 and first.cursor is not None
            second = await asker.presence(room, limit=10, cursor=first.cursor)
            assert second.members[0].client > first.members[-1].client  # ordered by client
            members = [m async for m in asker.members(room, page_size=10)]
            assert len({m.client for m in members}) == 25
            assert sorted(m.info["n"] for m in members) == list(range(25))
            assert [m.client for m in members] == sorted(m.client for m in members)
            everyone = await asker.presence(room)  # one page of up to 1000
            assert everyone.cursor is None and list(everyone.members) == members


async def test_a_count_only_answer_carries_no_members(broker: BrokerProcess, room: str) -> None:
    async with AsyncExitStack() as stack:
        await join_members(stack, broker.url, room, 3)
        async with connect(broker.url) as asker:
            assert await asker.presence(room, limit=0) == Presence(3, (), None)
            assert await asker.presence(f"{room}.empty") == Presence(0, (), None)
            with pytest.raises(ValueError, match="limit"):
                await asker.presence(room, limit=1001)


async def test_a_topic_without_presence_is_refused_with_not_enabled_in_the_brokers_words(
    broker: BrokerProcess,
) -> None:
    async with connect(broker.url) as client:
        with pytest.raises(NotEnabled) as refused:
            await client.presence("quiet.a")
        assert str(refused.value) == NOT_ENABLED
        with pytest.raises(NotEnabled, match="'join_leave' needs one"):
            async with client.subscribe("quiet.>", join_leave=True):
                pass
        async with client.subscribe("quiet.a") as sub:  # the client goes on
            await client.publish("quiet.a", 1)
            assert (await next_item(sub)).data == 1


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_info_round_trips_to_the_other_members(
    broker: BrokerProcess, room: str, encoding: str
) -> None:
    info = {"name": "Zoë", "tags": ["a", "b"], "age": 7, "away": False, "nothing": None}
    async with (
        connect(broker.url, encoding=encoding) as member,
        member.subscribe(room, info=info),
        connect(broker.url, encoding=encoding) as asker,
    ):
        (shown,) = (await asker.presence(room)).members
        assert shown.info == info and shown.user is None
        with pytest.raises(TooLarge, match="'info' takes"):
            async with asker.subscribe(f"{room}.j", info="x" * 1100):
                pass


async def test_a_second_subscription_to_a_pattern_shares_its_join_leave_or_is_refused(
    broker: BrokerProcess, room: str
) -> None:
    async with (
        connect(broker.url) as client,
        client.subscribe(room, join_leave=True) as watching,
        client.subscribe(room) as plain,  # shares the broker's subscription
    ):
        assert isinstance(await next_item(watching), Join)
        await client.publish(room, "m")
        assert (await next_item(watching)).data == "m"
        assert await next_item(plain) == Message(room, "m", room)  # no Join for it
        with pytest.raises(ValueError, match="with info None"):
            async with client.subscribe(room, info={"name": "other"}):
                pass
    async with connect(broker.url) as client, client.subscribe(f"{room}.t"):
        with pytest.raises(ValueError, match="without join_leave"):
            async with client.subscribe(f"{room}.t", join_leave=True):
                pass


async def test_a_reconnect_resubscribes_with_join_leave_and_info_and_says_events_were_lost(
    broker: BrokerProcess, room: str, task_group: anyio.abc.TaskGroup
) -> None:
    proxy = await start_proxy(task_group, broker.port)
    async with (
        connect(proxy.url, backoff=TINY) as client,
        client.subscribe(room, join_leave=True, info={"name": "ada"}) as sub,
        connect(broker.url) as observer,
        observer.subscribe(room, join_leave=True) as observed,
    ):
        before = (await next_item(sub)).member
        assert (await next_item(sub)).member == (await next_item(observed)).member  # observer's
        proxy.down()
        assert await next_item(observed) == Leave(room, before, room)
        proxy.up()
        await wait_until(lambda: client.reconnects == 1)
        gap, rejoined = await next_item(sub), await next_item(sub)
        assert isinstance(gap, PresenceGap) and gap.pattern == room
        assert "reconnected" in gap.why
        assert isinstance(rejoined, Join) and rejoined.member.info == {"name": "ada"}
        assert rejoined.member.client != before.client  # a new connection is a new member
        assert await next_item(observed) == Join(room, rejoined.member, room)
        async with connect(broker.url) as guest, guest.subscribe(room):
            assert isinstance(await next_item(sub), Join)  # join_leave survived the reconnect
        assert isinstance(await next_item(sub), Leave)
        members = {m.client for m in (await client.presence(room)).members}
        assert rejoined.member.client in members and before.client not in members


@pytest.fixture(scope="module")
def lagging_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(PRESENCE + "[limits]\nqueue_messages = 4\n") as process:
        yield process


async def test_events_dropped_for_a_slow_consumer_are_told_by_a_presence_gap(
    lagging_broker: BrokerProcess,
) -> None:
    count, payload = 200, b"x" * 65536  # 13 MB: more than loopback buffers hold
    url = lagging_broker.url
    items: list[Event] = []
    async with (
        connect(url, buffer_size=1) as client,
        client.subscribe("room.lag", join_leave=True) as sub,
    ):
        async with connect(url) as publisher:
            for n in range(count):
                await publisher.publish("room.lag", [n, payload])
        async with anyio.create_task_group() as consumer:  # only now does the subscriber read

            async def consume() -> None:
                async for item in sub:
                    items.append(item)

            consumer.start_soon(consume)
            await wait_until(lambda: messages(items) + sub.dropped >= count)
            consumer.cancel_scope.cancel()
    gaps = [item for item in items if isinstance(item, PresenceGap)]
    assert sub.dropped > 0 and gaps and all("dropped" in gap.why for gap in gaps)
    first_gap = items.index(gaps[0])
    offsets = [i.data[0] for i in items if isinstance(i, Message)]
    assert offsets == sorted(offsets)
    assert any(isinstance(i, Message) for i in items[first_gap:])  # delivery goes on after it


def messages(items: list[Event]) -> int:
    return sum(isinstance(item, Message) for item in items)


# --- the CLI ---


@CLI_ONLY_UNDER_TRIO
async def test_cli_presence_prints_every_member_and_the_count(
    broker: BrokerProcess, room: str
) -> None:
    async with AsyncExitStack() as stack:
        await join_members(stack, broker.url, room, 3)
        async with connect(broker.url) as asker:
            members = [m async for m in asker.members(room)]
        listed = await run("presence", room, "--url", broker.url)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.decode().splitlines() == [
            f'{m.client} null {{"n": {m.info["n"]}}}' for m in members
        ]
        as_json = await run("presence", room, "--json", "--url", broker.url)
        assert [json.loads(line) for line in as_json.stdout.decode().splitlines()] == [
            {"client": m.client, "user": None, "info": m.info} for m in members
        ]
        counted = await run("presence", room, "--count-only", "--url", broker.url)
        assert (counted.returncode, counted.stdout) == (0, b"3\n")


@CLI_ONLY_UNDER_TRIO
async def test_cli_presence_on_a_topic_without_presence_exits_1_in_the_brokers_words(
    broker: BrokerProcess,
) -> None:
    for extra in ([], ["--count-only"]):
        result = await run("presence", "quiet.a", *extra, "--url", broker.url)
        assert result.returncode == 1
        assert result.stderr.decode().splitlines() == [f"broker: {NOT_ENABLED}"]
    refused = await run("sub", "quiet.a", "--join-leave", "--url", broker.url)
    assert refused.returncode == 1
    assert "not_enabled" in refused.stderr.decode()


@CLI_ONLY_UNDER_TRIO
async def test_cli_sub_join_leave_prints_joins_and_leaves_between_messages(
    broker: BrokerProcess, room: str
) -> None:
    results = []

    async def subscribe() -> None:
        args = ("sub", room, "--join-leave", "--info", '{"name": "cli"}', "--count", "4")
        results.append(await run(*args, "--url", broker.url))

    async with trio.open_nursery() as running, connect(broker.url) as guest:
        running.start_soon(subscribe)
        await wait_for_subscriptions(broker, lambda subscribed: {room} in subscribed)
        async with guest.subscribe(room, info="guest"):
            await guest.publish(room, {"hi": 1})
        (cli,) = (await guest.presence(room)).members  # the guest has left
    (result,) = results
    assert result.returncode == 0, result.stderr
    own, joined, message, left = result.stdout.decode().splitlines()
    cli_member = {"client": cli.client, "user": None, "info": {"name": "cli"}}
    assert own == f"{room} join {json.dumps(cli_member)}"
    assert joined.startswith(f'{room} join {{"client": ') and joined.endswith('"info": "guest"}')
    assert message == f'{room} {{"hi": 1}}'
    assert left == joined.replace(" join ", " leave ")


@CLI_ONLY_UNDER_TRIO
async def test_cli_sub_join_leave_json_mirrors_the_wire_frames(
    broker: BrokerProcess, room: str
) -> None:
    results = []

    async def subscribe() -> None:
        results.append(await run("sub", f"{room}.*", "--join-leave", "--json", "--count", "1",
                                 "--url", broker.url))  # fmt: skip

    async with trio.open_nursery() as running:
        running.start_soon(subscribe)
        await wait_for_subscriptions(broker, lambda subscribed: {f"{room}.*"} in subscribed)
        async with connect(broker.url) as guest, guest.subscribe(f"{room}.x"):
            (member,) = (await guest.presence(f"{room}.x")).members
    assert json.loads(results[0].stdout) == {
        "op": "join",
        "topic": f"{room}.x",
        "sub": f"{room}.*",
        "member": {"client": member.client, "user": None, "info": None},
    }


@CLI_ONLY_UNDER_TRIO
async def test_cli_help_explains_presence_and_join_leave() -> None:
    presence = (await run("presence", "--help")).stdout.decode()
    for words in ("TOPIC", "--json", "--count-only", "--url", "not_enabled", "exit status:"):
        assert words in presence
    sub = (await run("sub", "--help")).stdout.decode()
    for words in ("--join-leave", "--info", "join MEMBER"):
        assert words in sub
    assert "presence" in (await run("--help")).stdout.decode()


def test_member_is_a_plain_value() -> None:
    assert Member("c", None) == Member("c", None, None)
    assert {Member("c", "ada", "x")} == {Member("c", "ada", "x")}
