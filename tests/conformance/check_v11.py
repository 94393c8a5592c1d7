#!/usr/bin/env python3
"""Outside conformance check of presence and the `history` op, from docs/protocol.md alone.

Usage: python check_v11.py ws://127.0.0.1:8765/

Written from the protocol document alone (its "Presence" section, the `presence` and `history`
ops, the error codes and "Decisions where the contract is silent"), in the style of check.py.
Prints one line per case, `PASS name` or `FAIL name: expected ..., got ...`, and exits 0 only
if every case passes.

Run it against a broker whose config has exactly this topic rule (auth mode `none`, so every
member's `user` is null), and no other rule: other topics keep no history and no presence.

    [[topics]]
    pattern = "chat.>"
    on_full = "block"
    history_size = 1000
    history_ttl = 3600
    presence = true

Every case uses its own topics (a random suffix), so cases do not see each other's members.
Nothing waits a fixed time: a case waits for the frames it expects, each within TIMEOUT. The
only waits for something that must NOT come use a fence (a later frame that the broker must
send after it, such as the member's own leave on the same topic) where one exists.

Not checked here, because they need broker control, other config or long waits: `forbidden`
(auth mode none grants everything), `unavailable` and `presence_ttl` (need `[cluster]`),
a member leaving on ping timeout (20 s), `history_ttl` expiry (1 h), `lag` on join_leave
subscriptions (needs a subscriber that stops reading), and a second presence rule ("even if an
earlier rule takes that topic").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

JSON = "pubsub.v1.json"
MSGPACK = "pubsub.v1.msgpack"
TIMEOUT = 5.0  # seconds, for every single wait
CASE_TIMEOUT = 30.0  # seconds, for a whole case
MAX_BAD_FRAMES = 10
INFO_MAX = 1024  # a sub's info may take 1 KiB encoded as msgpack
PRESENCE_LIMIT_MAX = 1000
HISTORY_LIMIT_MAX = 1000
HISTORY_LIMIT_DEFAULT = 100
HISTORY_SIZE = 1000  # from the config above
NO_ID = "<no id>"
BR = "bad_request"

Frame = dict[str, Any]

URL = "ws://127.0.0.1:8765/"
RESULTS: list[tuple[str, str | None]] = []
OPEN_CLIENTS: list[Client] = []


class Fail(Exception):
    """A case did not get what the document promises."""


def expect(condition: bool, expected: str, got: object) -> None:
    if not condition:
        text = repr(got)
        if len(text) > 400:
            text = text[:400] + "..."
        raise Fail(f"expected {expected}, got {text}")


def record(name: str, failure: str | None) -> None:
    RESULTS.append((name, failure))
    print(f"PASS {name}" if failure is None else f"FAIL {name}: {failure}", flush=True)


def dumps(frame: Any) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def presence_topic(kind: str) -> str:
    """A fresh concrete topic under chat.> (presence and history)."""
    return f"chat.{kind}-{secrets.token_hex(4)}"


def plain_topic(kind: str) -> str:
    """A fresh concrete topic no rule covers (no presence, no history)."""
    return f"plain.{kind}-{secrets.token_hex(4)}"


def keeps_history(pattern: str) -> bool:
    segments = pattern.split(".")
    return len(segments) >= 2 and segments[0] == "chat" and not {"*", ">"} & set(segments)


class Client:
    """One WebSocket connection speaking the broker protocol.

    Replies (`ok`/`err`) are matched by id; every other frame (`msg`, `join`, `leave`, `lag`)
    is kept in order in `events`, with the number of the WebSocket message that carried it.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.json = ws.subprotocol == JSON
        self.pending: list[tuple[int, Frame]] = []
        self.events: list[tuple[int, Frame]] = []
        self.messages = 0  # WebSocket messages received
        self.next_id = 1_000_000

    @classmethod
    async def open(cls, protocol: str = JSON) -> Client:
        ws = await connect(
            URL, subprotocols=[protocol], max_size=None, open_timeout=TIMEOUT, close_timeout=2
        )
        client = cls(ws)
        OPEN_CLIENTS.append(client)
        return client

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def encode(self, frames: tuple[Frame, ...]) -> str | bytes:
        if self.json:
            return "\n".join(dumps(frame) for frame in frames)
        return b"".join(msgpack.packb(frame) for frame in frames)

    async def send(self, *frames: Frame) -> None:
        """Send the frames as one WebSocket message (a batch if more than one)."""
        await self.send_raw(self.encode(frames))

    async def send_raw(self, data: str | bytes) -> None:
        async with asyncio.timeout(TIMEOUT):
            await self.ws.send(data)

    async def recv_message(self) -> list[Frame]:
        async with asyncio.timeout(TIMEOUT):
            raw = await self.ws.recv()
        if self.json:
            expect(isinstance(raw, str), "a text message on JSON", type(raw).__name__)
            lines = raw.split("\n")
            expect(all(line.strip() for line in lines), "no blank lines from the broker", raw)
            frames = [json.loads(line) for line in lines]
        else:
            expect(isinstance(raw, bytes), "a binary message on msgpack", type(raw).__name__)
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            unpacker.feed(raw)
            frames = list(unpacker)
        for frame in frames:
            expect(isinstance(frame, dict), "every received frame to be a map", frame)
        self.messages += 1
        return frames

    async def frame(self) -> tuple[int, Frame]:
        while not self.pending:
            frames = await self.recv_message()
            self.pending.extend((self.messages, frame) for frame in frames)
        return self.pending.pop(0)

    async def reply(self, id_: Any) -> Frame:
        """Read until the `ok`/`err` with this id (NO_ID: without id); keep other frames."""
        while True:
            number, frame = await self.frame()
            if frame.get("op") in ("ok", "err"):
                got = frame.get("id", NO_ID)
                expect(got == id_, f"the reply to id {id_} (replies come in order)", frame)
                return frame
            self.events.append((number, frame))

    async def request(self, frame: Frame) -> Frame:
        await self.send(frame)
        return await self.reply(frame.get("id", NO_ID))

    async def event(self) -> Frame:
        """The next frame that is not a reply."""
        return (await self.numbered_event())[1]

    async def numbered_event(self) -> tuple[int, Frame]:
        if self.events:
            return self.events.pop(0)
        number, frame = await self.frame()
        expect(frame.get("op") not in ("ok", "err"), "an event, not a reply", frame)
        return number, frame

    async def sync(self) -> None:
        """Round-trip a harmless command, so that everything queued before it is in `events`."""
        id_ = self.new_id()
        await self.send({"op": "unsub", "id": id_, "topic": "sync.never"})
        reply = await self.reply(id_)
        expect(reply == {"op": "ok", "id": id_}, f"ok {id_}", reply)

    async def drain_events(self) -> list[Frame]:
        await self.sync()
        events = [frame for _, frame in self.events]
        self.events.clear()
        return events

    async def ok(self, frame: Frame) -> Frame:
        """Send a command that must succeed; check the `ok`'s keys; return it."""
        frame = {"id": self.new_id(), **frame}
        reply = await self.request(frame)
        expect(reply.get("op") == "ok", f"ok for {frame}", reply)
        if frame["op"] == "sub" and keeps_history(frame["topic"]):
            keys = {"op", "id", "epoch", "offset"} | ({"recovered"} if "since" in frame else set())
            expect(set(reply) == keys, f"ok keys {sorted(keys)} for {frame}", reply)
            expect(isinstance(reply["epoch"], str), "a string epoch", reply)
            expect(type(reply["offset"]) is int and reply["offset"] >= 0, "an offset", reply)
        elif frame["op"] in ("sub", "unsub", "pub"):
            expect(reply == {"op": "ok", "id": frame["id"]}, f"a plain ok for {frame}", reply)
        return reply

    async def sub(self, topic: str, **extra: Any) -> Frame:
        return await self.ok({"op": "sub", "topic": topic, **extra})

    async def resub(self, topic: str, **extra: Any) -> None:
        """Repeat a sub this connection holds. Its ok's keys are judged by the case
        "history: a repeated sub on a concrete topic with history is answered with epoch and
        offset", so that the presence cases judge only presence."""
        frame = {"op": "sub", "id": self.new_id(), "topic": topic, **extra}
        reply = await self.request(frame)
        expect(reply.get("op") == "ok" and reply.get("id") == frame["id"], f"ok {frame}", reply)

    async def unsub(self, topic: str) -> None:
        await self.ok({"op": "unsub", "topic": topic})

    async def err(self, frame: Frame, code: str) -> None:
        """Send a command that must fail with `code` (and echo its id, if it has a valid one)."""
        reply = await self.request(frame)
        check_err(reply, code, frame.get("id", NO_ID))

    async def presence(self, topic: str, **extra: Any) -> Frame:
        frame = {"op": "presence", "id": self.new_id(), "topic": topic, **extra}
        reply = await self.request(frame)
        check_presence(reply, frame)
        return reply

    async def history(self, topic: str, **extra: Any) -> Frame:
        frame = {"op": "history", "id": self.new_id(), "topic": topic, **extra}
        reply = await self.request(frame)
        check_history(reply, frame)
        return reply

    async def close(self) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                await self.ws.close()
        except (TimeoutError, ConnectionClosed, OSError):
            pass


def check_err(reply: Frame, code: str, id_: Any) -> None:
    expect(reply.get("op") == "err", f"err {code}", reply)
    expect(set(reply) <= {"op", "code", "msg", "id"}, "err keys op, code, msg, id", reply)
    expect(isinstance(reply.get("msg"), str), "err.msg to be a string", reply)
    got = (reply.get("code"), reply.get("id", NO_ID))
    expect(got == (code, id_), f"err {code} with id {id_}", reply)


def check_member(member: Any) -> None:
    expect(isinstance(member, dict), "a member map", member)
    expect(set(member) == {"client", "user", "info"}, "member keys client, user, info", member)
    expect(isinstance(member["client"], str) and member["client"], "a client string", member)
    expect(member["user"] is None, "user null in auth mode none", member)


def check_presence(reply: Frame, frame: Frame) -> None:
    expect(reply.get("op") == "ok" and reply.get("id") == frame["id"], f"ok for {frame}", reply)
    allowed = {"op", "id", "count", "members", "cursor"}
    expect(set(reply) <= allowed and "count" in reply, f"presence ok keys in {allowed}", reply)
    expect(type(reply["count"]) is int and reply["count"] >= 0, "an integer count", reply)
    limit = frame.get("limit", PRESENCE_LIMIT_MAX)
    if limit == 0:
        expect(reply.get("members", []) == [], "no members for limit 0 (count only)", reply)
        expect("cursor" not in reply, "no cursor for limit 0 (count only)", reply)
        return
    members = reply.get("members")
    expect(isinstance(members, list), "a members list", reply)
    expect(len(members) <= limit, f"at most {limit} members", reply)
    for member in members:
        check_member(member)
    clients = [member["client"] for member in members]
    expect(clients == sorted(clients), "members ordered by client", clients)
    expect(len(set(clients)) == len(clients), "no member twice in one answer", clients)
    if "cursor" in reply:
        expect(reply["cursor"] is not None, "a cursor value when present", reply)


def check_history(reply: Frame, frame: Frame) -> None:
    expect(reply.get("op") == "ok" and reply.get("id") == frame["id"], f"ok for {frame}", reply)
    keys = {"op", "id", "epoch", "offset", "messages"} | (
        {"recovered"} if "since" in frame else set()
    )
    expect(set(reply) == keys, f"history ok keys {sorted(keys)}", reply)
    expect(isinstance(reply["epoch"], str), "a string epoch", reply)
    expect(type(reply["offset"]) is int and reply["offset"] >= 0, "an integer offset", reply)
    if "since" in frame:
        expect(type(reply["recovered"]) is bool, "recovered true or false", reply)
    messages = reply["messages"]
    expect(isinstance(messages, list), "a messages list", reply)
    for message in messages:
        expect(isinstance(message, dict), "a message map", message)
        expect(set(message) == {"offset", "data"}, "message keys offset, data", message)
        expect(type(message["offset"]) is int, "an integer offset", message)
    offsets = [message["offset"] for message in messages]
    expect(offsets == sorted(set(offsets)), "messages oldest first, each once", offsets)
    expect(not offsets or offsets[-1] <= reply["offset"], "no offset past the latest", reply)
    limit = frame.get("limit", HISTORY_LIMIT_DEFAULT)
    expect(len(messages) <= limit, f"at most {limit} messages", len(messages))


# ---------------------------------------------------------------- case registry

CASES: list[tuple[str, Callable[[], Awaitable[None]]]] = []


def case(name: str) -> Callable[[Callable[[], Awaitable[None]]], Callable[[], Awaitable[None]]]:
    def register(func: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        CASES.append((name, func))
        return func

    return register


def both(name: str) -> Callable[[Callable[[str], Awaitable[None]]], None]:
    """Register a case once per encoding."""

    def register(func: Callable[[str], Awaitable[None]]) -> None:
        for protocol in (JSON, MSGPACK):
            label = "json" if protocol == JSON else "msgpack"

            async def run(protocol: str = protocol) -> None:
                await func(protocol)

            CASES.append((f"{name} [{label}]", run))

    return register


def join_frame(op: str, topic: str, sub: str, member: Frame) -> Frame:
    return {"op": op, "topic": topic, "sub": sub, "member": member}


async def expect_event(client: Client, want: Frame, what: str) -> None:
    got = await client.event()
    expect(got == want, f"{what}: {want}", got)


async def member_of(client: Client, topic: str, info: Any) -> Frame:
    """Subscribe `client` to `topic` with `info`; return its member map (via presence)."""
    await client.sub(topic, info=info)
    answer = await client.presence(topic)
    mine = [member for member in answer["members"] if member["info"] == info]
    expect(len(mine) == 1, f"exactly one member with info {info!r}", answer)
    return mine[0]


# ---------------------------------------------------------------- presence: basics


@both("presence: empty topic is ok with count 0 and members []")
async def presence_empty(protocol: str) -> None:
    client = await Client.open(protocol)
    answer = await client.presence(presence_topic("empty"))
    expect(answer.get("members") == [] and answer["count"] == 0, "count 0, members []", answer)
    expect("cursor" not in answer, "no cursor", answer)


@both("presence: member fields; info from the sub frame, else null; user null")
async def member_fields(protocol: str) -> None:
    topic = presence_topic("fields")
    infos: list[Any] = [{"name": "ada"}, "plain", 42, [1, "two", None], {"nested": {"a": [True]}}]
    for info in infos:
        member = await Client.open(protocol)
        await member.sub(topic, info=info)
    for frame in ({}, {"info": None}):  # no info, and info null
        member = await Client.open(protocol)
        await member.sub(topic, **frame)
    query = await Client.open(protocol)
    answer = await query.presence(topic)
    expect(answer["count"] == len(infos) + 2, f"count {len(infos) + 2}", answer)
    got = sorted((dumps(member["info"]) for member in answer["members"]), key=str)
    want = sorted([dumps(info) for info in infos] + ["null", "null"], key=str)
    expect(got == want, f"infos {want}", got)
    expect("cursor" not in answer, "no cursor when all fit", answer)


@both("presence: client is unique per connection and the same across its topics")
async def client_ids(protocol: str) -> None:
    first, second = presence_topic("ids1"), presence_topic("ids2")
    conns = [await Client.open(protocol) for _ in range(4)]
    for i, conn in enumerate(conns):
        await conn.sub(first, info=i)
        await conn.sub(second, info=i)
    answers = [await conns[0].presence(topic) for topic in (first, second)]
    by_info = [{m["info"]: m["client"] for m in answer["members"]} for answer in answers]
    expect(len(set(by_info[0].values())) == 4, "4 distinct client strings", by_info[0])
    expect(by_info[0] == by_info[1], "each connection's client the same on both topics", by_info)


@both("presence: a wildcard subscription makes no member")
async def wildcard_no_member(protocol: str) -> None:
    base = presence_topic("wild")
    topic = f"{base}.room"
    client = await Client.open(protocol)
    for pattern in (f"{base}.*", f"{base}.>", "chat.>", "*.*.*", ">"):
        await client.sub(pattern, info="wild")
    await client.sub("chat.*.room", join_leave=True)
    answer = await client.presence(topic)
    expect(answer["count"] == 0 and answer["members"] == [], "no member", answer)
    await client.sub(topic, info="concrete")
    answer = await client.presence(topic)
    infos = [member["info"] for member in answer["members"]]
    expect(answer["count"] == 1 and infos == ["concrete"], "one member, info 'concrete'", answer)


@both("presence: member leaves on unsub, not on unsub of an overlapping wildcard")
async def leave_on_unsub(protocol: str) -> None:
    topic = presence_topic("unsub")
    member = await Client.open(protocol)
    query = await Client.open(protocol)
    await member.sub(topic)
    await member.sub("chat.*")
    await member.unsub("chat.*")
    answer = await query.presence(topic)
    expect(answer["count"] == 1, "still a member after unsub chat.*", answer)
    await member.unsub(topic)
    answer = await query.presence(topic)
    expect(answer["count"] == 0 and answer["members"] == [], "no member after unsub", answer)


@both("presence: a second sub with other info or join_leave changes nothing")
async def repeated_sub(protocol: str) -> None:
    base = presence_topic("resub")
    topic, fence = f"{base}.room", f"{base}.>"
    watcher = await Client.open(protocol)
    await watcher.sub(fence, join_leave=True)
    me = await member_of(watcher, topic, {"v": 1})
    await expect_event(watcher, join_frame("join", topic, fence, me), "own join")
    await watcher.resub(topic, info={"v": 2}, join_leave=True)  # changes nothing
    answer = await watcher.presence(topic)
    expect(answer["members"] == [me] and answer["count"] == 1, f"only {me}, info v 1", answer)
    other = await Client.open(protocol)
    them = await member_of(other, topic, "other")
    # The join reaches the fence subscription only; the repeated sub did not ask for join_leave.
    await expect_event(watcher, join_frame("join", topic, fence, them), "one join")
    await other.unsub(topic)
    await expect_event(watcher, join_frame("leave", topic, fence, them), "one leave")
    rest = await watcher.drain_events()
    expect(rest == [], "nothing on the repeated sub", rest)


@both("presence: a repeated sub with join_leave false keeps join_leave")
async def repeated_sub_keeps(protocol: str) -> None:
    topic = presence_topic("keep")
    watcher = await Client.open(protocol)
    await watcher.sub(topic, join_leave=True, info="w")
    own = await watcher.event()
    expect(own.get("op") == "join" and own["member"]["info"] == "w", "own join", own)
    await watcher.resub(topic, join_leave=False, info="changed")
    other = await Client.open(protocol)
    them = await member_of(other, topic, "o")
    await expect_event(watcher, join_frame("join", topic, topic, them), "join still sent")
    answer = await watcher.presence(topic)
    infos = sorted(member["info"] for member in answer["members"])
    expect(infos == ["o", "w"], "info 'w' unchanged", answer)


@both("presence: a sub refused with too_large makes no member")
async def too_large_no_member(protocol: str) -> None:
    topic = presence_topic("big")
    client = await Client.open(protocol)
    frame = {"op": "sub", "id": 5, "topic": topic, "info": "x" * 2000}
    await client.err(frame, "too_large")
    answer = await client.presence(topic)
    expect(answer["count"] == 0, "count 0", answer)


# ---------------------------------------------------------------- presence: limit and cursor


async def members_with_infos(protocol: str, topic: str, n: int) -> dict[str, Client]:
    conns = {}
    for i in range(n):
        conn = await Client.open(protocol)
        await conn.sub(topic, info=f"m{i}")
        conns[f"m{i}"] = conn
    return conns


@both("presence: limit 0 answers the count only")
async def limit_zero(protocol: str) -> None:
    topic = presence_topic("zero")
    await members_with_infos(protocol, topic, 3)
    query = await Client.open(protocol)
    answer = await query.presence(topic, limit=0)  # checks: no members, no cursor
    expect(answer["count"] == 3, "count 3", answer)


@both("presence: default limit, limit 1000, limit = count: all members, no cursor")
async def limit_all(protocol: str) -> None:
    topic = presence_topic("all")
    await members_with_infos(protocol, topic, 5)
    query = await Client.open(protocol)
    for extra in ({}, {"limit": 1000}, {"limit": 5}):
        answer = await query.presence(topic, **extra)
        infos = sorted(member["info"] for member in answer["members"])
        expect(infos == [f"m{i}" for i in range(5)], f"all 5 members for {extra}", answer)
        expect(answer["count"] == 5 and "cursor" not in answer, "count 5, no cursor", answer)


@both("presence: paging with cursor returns every member once, in client order")
async def paging(protocol: str) -> None:
    topic = presence_topic("page")
    await members_with_infos(protocol, topic, 7)
    query = await Client.open(protocol)
    full = await query.presence(topic)
    pages = []
    answer = await query.presence(topic, limit=3)
    pages.append(answer)
    while "cursor" in answer:
        expect(len(pages) < 5, "at most 3 pages", pages)
        answer = await query.presence(topic, limit=3, cursor=answer["cursor"])
        pages.append(answer)
    sizes = [len(page["members"]) for page in pages]
    expect(sizes == [3, 3, 1], "pages of 3, 3, 1 (the last without cursor)", pages)
    expect(all(page["count"] == 7 for page in pages), "count 7 on every page", pages)
    walked = [member for page in pages for member in page["members"]]
    expect(walked == full["members"], "the pages together = the full answer", walked)


@both("presence: paging while members leave and join returns each who stayed exactly once")
async def paging_changes(protocol: str) -> None:
    topic = presence_topic("churn")
    conns = await members_with_infos(protocol, topic, 10)
    present = set(conns)  # infos of the members now
    left: set[str] = set()  # members that left; they must not be listed afterwards
    query = await Client.open(protocol)
    listed: list[str] = []
    answer = await query.presence(topic, limit=3)
    added = 0
    for _ in range(12):
        expect(answer["count"] == len(present), f"count {len(present)} (members now)", answer)
        infos = [member["info"] for member in answer["members"]]
        stale = set(infos) & left
        expect(not stale, "no member listed after it left", stale)
        listed.extend(infos)
        if "cursor" not in answer:
            break
        # Between pages: the last listed member (where a cursor points) and the next unlisted
        # one (in client order, by the answer of a full presence) leave; two new members join.
        full = [m["info"] for m in (await query.presence(topic))["members"]]
        unlisted = [info for info in full if info not in listed]
        for info in [*infos[-1:], *unlisted[:1]]:
            await conns[info].unsub(topic)
            present.discard(info)
            left.add(info)
        for _ in range(2):
            info = f"new{added}"
            added += 1
            conn = await Client.open(protocol)
            await conn.sub(topic, info=info)
            conns[info] = conn
            present.add(info)
        answer = await query.presence(topic, limit=3, cursor=answer["cursor"])
    else:
        raise Fail(f"expected the last page within 12 pages, got {listed}")
    stayed = [f"m{i}" for i in range(10) if f"m{i}" in present]
    counts = {info: listed.count(info) for info in stayed}
    expect(all(n == 1 for n in counts.values()), "each member that stayed exactly once", counts)
    dup = [info for info in set(listed) if listed.count(info) > 1]
    expect(not dup, "no member listed twice", listed)


@case("presence: limit out of 0..1000 or not an integer is bad_request")
async def presence_bad_limit() -> None:
    client = await Client.open(JSON)
    topic = presence_topic("lim")
    for i, limit in enumerate((-1, 1001, 2**32, "5", 1.5, True, [3])):
        frame = {"op": "presence", "id": i, "topic": topic, "limit": limit}
        await client.err(frame, BR)


@case("presence: limit 1000 accepted [msgpack]")
async def presence_limit_max() -> None:
    client = await Client.open(MSGPACK)
    answer = await client.presence(presence_topic("max"), limit=PRESENCE_LIMIT_MAX)
    expect(answer["count"] == 0, "count 0", answer)


# ---------------------------------------------------------------- presence: errors


@both("presence: not_enabled on topics no presence rule covers")
async def presence_not_enabled(protocol: str) -> None:
    client = await Client.open(protocol)
    for i, topic in enumerate((plain_topic("np"), "chat", "chatter.x", "Chat.x")):
        await client.err({"op": "presence", "id": i, "topic": topic}, "not_enabled")


@case("presence: a wildcard or malformed topic is invalid_topic")
async def presence_invalid_topic() -> None:
    client = await Client.open(JSON)
    for i, topic in enumerate(("chat.*", "chat.>", ">", "chat..x", "chat.a b", "")):
        await client.err({"op": "presence", "id": i, "topic": topic}, "invalid_topic")


@case("presence: without id, and without topic, are bad_request")
async def presence_bad_request() -> None:
    client = await Client.open(JSON)
    await client.err({"op": "presence", "topic": presence_topic("noid")}, BR)
    await client.err({"op": "presence", "id": 3}, BR)
    await client.err({"op": "presence", "id": 4, "topic": 7}, BR)


# ---------------------------------------------------------------- join_leave


@both("join_leave: own join, then others' join and leave, exact frames")
async def join_leave_frames(protocol: str) -> None:
    topic = presence_topic("jl")
    watcher = await Client.open(protocol)
    await watcher.sub(topic, join_leave=True, info={"name": "ada"})
    own = await watcher.event()
    expect(own.get("op") == "join" and set(own) == {"op", "topic", "sub", "member"}, "join", own)
    check_member(own["member"])
    want = join_frame("join", topic, topic, {**own["member"], "info": {"name": "ada"}})
    expect(own == want, str(want), own)
    other = await Client.open(MSGPACK if protocol == JSON else JSON)
    them = await member_of(other, topic, "bob")
    expect(them["client"] != own["member"]["client"], "another client", them)
    await expect_event(watcher, join_frame("join", topic, topic, them), "bob's join")
    await other.unsub(topic)
    await expect_event(watcher, join_frame("leave", topic, topic, them), "bob's leave")
    answer = await watcher.presence(topic)
    expect(answer["members"] == [own["member"]], "only ada left", answer)


@both("join_leave: the first join after the sub's ok is its own, with others joining at once")
async def first_join_own(protocol: str) -> None:
    for round_ in range(10):
        topic = presence_topic("race")
        others = [await Client.open(protocol) for _ in range(3)]
        watcher = await Client.open(protocol)
        # o0 and o1 join just before the watcher subscribes, o2 just after: the broker may
        # handle them in any order, but none of their joins may come before the watcher's own.
        for i, other in enumerate(others[:2]):
            await other.send({"op": "sub", "id": 1, "topic": topic, "info": f"o{i}"})
        await watcher.send({"op": "sub", "id": 1, "topic": topic, "join_leave": True, "info": "w"})
        await others[2].send({"op": "sub", "id": 1, "topic": topic, "info": "o2"})
        reply = await watcher.reply(1)
        expect(set(reply) == {"op", "id", "epoch", "offset"}, "ok for the sub", reply)
        for other in others:
            await other.reply(1)
        first = await watcher.event()
        expect(
            first.get("op") == "join" and first.get("member", {}).get("info") == "w",
            f"round {round_}: the watcher's own join first",
            first,
        )
        # o3 joins and leaves after everyone's ok: its join must come, then its leave (fence).
        late = await Client.open(protocol)
        await late.sub(topic, info="o3")
        await late.unsub(topic)
        seen: list[Any] = []
        while True:
            event = await watcher.event()
            expect(event.get("op") in ("join", "leave"), "join or leave", event)
            if event["op"] == "leave":
                expect(event["member"]["info"] == "o3", "no leave but o3's", event)
                break
            seen.append(event["member"]["info"])
        expect(seen[-1:] == ["o3"], "o3's join just before its leave", seen)
        once = len(seen) == len(set(seen)) and set(seen) <= {"o0", "o1", "o2", "o3"}
        expect(once, "each other member's join at most once", seen)


@both("join_leave: on a wildcard, no own join; events carry the concrete topic and the pattern")
async def join_leave_wildcard(protocol: str) -> None:
    base = presence_topic("wjl")
    pattern = f"{base}.*"
    watcher = await Client.open(protocol)
    await watcher.sub(pattern, join_leave=True, info="watcher")
    plain = await Client.open(protocol)
    await plain.sub(pattern)  # a wildcard without join_leave gets no events
    await plain.sub(f"{base}.>", join_leave=True)  # its fence
    member = await Client.open(protocol)
    topic = f"{base}.room"
    me = await member_of(member, topic, "m")
    await expect_event(watcher, join_frame("join", topic, pattern, me), "the member's join first")
    await member.unsub(topic)
    await expect_event(watcher, join_frame("leave", topic, pattern, me), "the member's leave")
    await expect_event(plain, join_frame("join", topic, f"{base}.>", me), "fence join")
    await expect_event(plain, join_frame("leave", topic, f"{base}.>", me), "fence leave")
    for client in (watcher, plain):
        rest = await client.drain_events()
        expect(rest == [], "no other event", rest)
    answer = await watcher.presence(topic)
    expect(answer["count"] == 0, "the wildcard watchers are not members", answer)


async def event_on(client: Client, topic: str) -> Frame:
    """The next event about `topic` (broad patterns may also see other cases' late leaves)."""
    while True:
        frame = await client.event()
        if frame.get("topic") == topic:
            return frame


@case("join_leave: '>' and '*.*' watchers see joins on chat topics, one copy per subscription")
async def join_leave_broad() -> None:
    topic = presence_topic("broad")
    patterns = (">", "*.*", "chat.*", topic)
    watcher = await Client.open(JSON)
    for pattern in patterns:
        await watcher.sub(pattern, join_leave=True, info="w")
    got = [await event_on(watcher, topic) for _ in patterns]  # its own join, once per sub
    member = got[0].get("member")
    want = {pattern: join_frame("join", topic, pattern, member) for pattern in patterns}
    by_sub = {frame.get("sub"): frame for frame in got}
    expect(by_sub == want, "one own join per subscription", got)
    other = await Client.open(MSGPACK)
    await other.sub(topic, info=1)
    await other.close()  # close frame: a leave for each subscription
    events = [await event_on(watcher, topic) for _ in range(2 * len(patterns))]
    for pattern in patterns:
        mine = [(e["op"], e["member"]["info"]) for e in events if e["sub"] == pattern]
        expect(mine == [("join", 1), ("leave", 1)], f"join then leave via {pattern}", events)


@both("join_leave: a member leaves when its connection closes (close frame)")
async def leave_on_close(protocol: str) -> None:
    topic = presence_topic("close")
    watcher = await Client.open(protocol)
    await watcher.sub(topic, join_leave=True, info="w")
    await watcher.event()
    member = await Client.open(protocol)
    me = await member_of(member, topic, "m")
    await expect_event(watcher, join_frame("join", topic, topic, me), "join")
    await member.close()
    await expect_event(watcher, join_frame("leave", topic, topic, me), "leave on close")
    answer = await watcher.presence(topic)
    expect(answer["count"] == 1, "only the watcher left", answer)


@both("join_leave: a member leaves when its connection is reset (no close frame)")
async def leave_on_reset(protocol: str) -> None:
    topic = presence_topic("reset")
    watcher = await Client.open(protocol)
    await watcher.sub(topic, join_leave=True, info="w")
    await watcher.event()
    member = await Client.open(protocol)
    me = await member_of(member, topic, "m")
    await expect_event(watcher, join_frame("join", topic, topic, me), "join")
    member.ws.transport.abort()  # drop the TCP connection without a close frame
    await expect_event(watcher, join_frame("leave", topic, topic, me), "leave on reset")
    answer = await watcher.presence(topic)
    expect(answer["count"] == 1, "only the watcher left", answer)


@both("join_leave: join and leave never merged; one member's in order; one 20 ms window")
async def never_merged(protocol: str) -> None:
    topic = presence_topic("flap")
    watcher = await Client.open(protocol)
    await watcher.sub(topic, join_leave=True, info="w")
    await watcher.event()
    member = await Client.open(protocol)
    frames = []
    for n in range(3):
        frames.append({"op": "sub", "id": 10 + n, "topic": topic, "info": "m"})
        frames.append({"op": "unsub", "id": 20 + n, "topic": topic})
    await member.send(*frames[:-1])  # join, leave, join, leave, join in one batch
    for frame in frames[:-1]:
        await member.reply(frame["id"])
    numbered = [await watcher.numbered_event() for _ in range(5)]
    ops = [(frame.get("op"), frame.get("member", {}).get("info")) for _, frame in numbered]
    want = [("join", "m"), ("leave", "m")] * 2 + [("join", "m")]
    expect(ops == want, str(want), ops)
    messages = {number for number, _ in numbered}
    expect(len(messages) <= 2, "the 5 events in one window (at most 2 messages)", messages)
    answer = await watcher.presence(topic)
    expect(answer["count"] == 2, "the member present at the end", answer)


@both("join_leave: a closing member leaves every presence topic it was in")
async def leave_all_on_close(protocol: str) -> None:
    base = presence_topic("multi")
    topics = [f"{base}.a", f"{base}.b", f"{base}.c"]
    watcher = await Client.open(protocol)
    await watcher.sub(f"{base}.*", join_leave=True)
    member = await Client.open(protocol)
    for topic in topics:
        await member.sub(topic, info="m")
    joins = [await watcher.event() for _ in topics]
    expect(sorted(e.get("topic") for e in joins) == topics, f"a join on each of {topics}", joins)
    await member.close()
    leaves = [await watcher.event() for _ in topics]
    got = sorted((e.get("op"), e.get("topic"), e.get("member")) for e in leaves)
    want = sorted(("leave", e["topic"], e["member"]) for e in joins)
    expect(got == want, "a leave on each topic, same member", leaves)
    for topic in topics:
        answer = await watcher.presence(topic)
        expect(answer["count"] == 0, f"no member left on {topic}", answer)


@case("join_leave: a '>' watcher gets no events for topics without presence")
async def no_events_without_presence() -> None:
    watcher = await Client.open(JSON)
    await watcher.sub(">", join_leave=True)
    plain = plain_topic("np")
    other = await Client.open(MSGPACK)
    await other.sub(plain, info="p")
    await other.unsub(plain)
    fence = presence_topic("fence")
    await other.sub(fence, info="f")
    await other.unsub(fence)
    seen = []
    while True:  # until the fence member's leave
        event = await watcher.event()
        seen.append(event)
        if (event.get("op"), event.get("topic")) == ("leave", fence):
            break
    expect(all(event.get("topic") != plain for event in seen), f"nothing on {plain}", seen)


@both("join_leave: after unsub of the watching subscription, no more events for it")
async def no_events_after_unsub(protocol: str) -> None:
    base = presence_topic("off")
    topic = f"{base}.room"
    watcher = await Client.open(protocol)
    await watcher.sub(f"{base}.*", join_leave=True)
    await watcher.sub(f"{base}.>", join_leave=True)  # the fence
    await watcher.unsub(f"{base}.*")
    member = await Client.open(protocol)
    me = await member_of(member, topic, "m")
    await member.unsub(topic)
    got = [await watcher.event(), await watcher.event()]
    want = [join_frame(op, topic, f"{base}.>", me) for op in ("join", "leave")]
    expect(got == want, "join and leave via the fence only", got)
    rest = await watcher.drain_events()
    expect(rest == [], "nothing else", rest)


@both("join_leave: a duplicate sub sends no second join")
async def no_second_join(protocol: str) -> None:
    topic = presence_topic("dupj")
    watcher = await Client.open(protocol)
    await watcher.sub(topic, join_leave=True, info="w")
    await watcher.event()
    member = await Client.open(protocol)
    me = await member_of(member, topic, "m")
    await member.resub(topic, info="m")
    await member.unsub(topic)
    got = [await watcher.event(), await watcher.event()]
    want = [join_frame("join", topic, topic, me), join_frame("leave", topic, topic, me)]
    expect(got == want, "join then leave, nothing between", got)


@case("join_leave: not_enabled where no presence topic can match; the sub is not held")
async def join_leave_not_enabled() -> None:
    client = await Client.open(JSON)
    patterns = (plain_topic("x"), "chat", "news.*", "*", "chatter.>", "Chat.>", "plain.>")
    for i, pattern in enumerate(patterns):
        await client.err(
            {"op": "sub", "id": i, "topic": pattern, "join_leave": True}, "not_enabled"
        )
    topic = plain_topic("held")
    await client.err({"op": "sub", "id": 9, "topic": topic, "join_leave": True}, "not_enabled")
    publisher = await Client.open(MSGPACK)
    await publisher.ok({"op": "pub", "topic": topic, "data": 1})
    rest = await client.drain_events()
    expect(rest == [], "no msg: the refused sub is not held", rest)


@case("join_leave: accepted on patterns that overlap chat.>, and false anywhere")
async def join_leave_accepted() -> None:
    client = await Client.open(MSGPACK)
    for pattern in (">", "*.*", "*.>", "chat.*", "chat.>", "*.x", "chat.a.>", "*.*.*"):
        await client.sub(pattern, join_leave=True)
    for pattern in (plain_topic("f"), "news.*", "*", "chat"):
        await client.sub(pattern, join_leave=False)


# ---------------------------------------------------------------- info size


@case("info: 1024 bytes as msgpack ok, 1025 too_large [msgpack]")
async def info_size_msgpack() -> None:
    client = await Client.open(MSGPACK)
    for size, ok in ((1024, True), (1025, False)):
        info = "x" * (size - 3)  # str 16: 3 bytes of header
        expect(len(msgpack.packb(info)) == size, f"test setup of {size} bytes", size)
        topic = presence_topic("isz")
        if ok:
            await client.sub(topic, info=info)
        else:
            await client.err({"op": "sub", "id": 7, "topic": topic, "info": info}, "too_large")


@case("info: measured as msgpack on JSON (2043 JSON bytes ok, 1001 JSON bytes too_large)")
async def info_size_json() -> None:
    client = await Client.open(JSON)
    small = [1] * 1021  # msgpack: 3 + 1021 = 1024 bytes; JSON: 2043 bytes
    big = [0.5] * 250  # msgpack: 3 + 9 * 250 = 2253 bytes; JSON: 1001 bytes
    expect(len(msgpack.packb(small)) == INFO_MAX and len(dumps(small)) > INFO_MAX, "setup", 0)
    expect(len(msgpack.packb(big)) > INFO_MAX and len(dumps(big)) < INFO_MAX, "setup", 0)
    await client.sub(presence_topic("ij"), info=small)
    await client.err(
        {"op": "sub", "id": 8, "topic": presence_topic("ij"), "info": big}, "too_large"
    )


@case("info: too_large on any sub (wildcard, topic without presence)")
async def info_size_anywhere() -> None:
    client = await Client.open(JSON)
    info = "y" * 1100
    for i, topic in enumerate(("chat.*", plain_topic("ib"))):
        await client.err({"op": "sub", "id": i, "topic": topic, "info": info}, "too_large")


# ---------------------------------------------------------------- bad-frame count


@case("bad-frame count: not_enabled (presence, history, join_leave) is not a bad frame")
async def not_enabled_resets() -> None:
    bad = [{"op": "nope", "id": 3000 + i} for i in range(MAX_BAD_FRAMES - 1)]
    middles = [
        {"op": "presence", "id": 1, "topic": plain_topic("p")},
        {"op": "history", "id": 2, "topic": plain_topic("h")},
        {"op": "sub", "id": 3, "topic": plain_topic("s"), "join_leave": True},
    ]
    for middle in middles:
        client = await Client.open(JSON)
        await client.send(*bad, middle, *bad)
        for frame in bad:
            check_err(await client.reply(frame["id"]), "unknown_op", frame["id"])
        check_err(await client.reply(middle["id"]), "not_enabled", middle["id"])
        for frame in bad:
            check_err(await client.reply(frame["id"]), "unknown_op", frame["id"])
        await client.sync()  # the connection is still open


@case("bad-frame count: presence and history ok reset it")
async def ok_resets() -> None:
    bad = [{"op": "nope", "id": 3000 + i} for i in range(MAX_BAD_FRAMES - 1)]
    for middle in (
        {"op": "presence", "id": 1, "topic": presence_topic("p")},
        {"op": "history", "id": 2, "topic": presence_topic("h")},
    ):
        client = await Client.open(MSGPACK)
        await client.send(*bad, middle, *bad)
        for frame in bad:
            check_err(await client.reply(frame["id"]), "unknown_op", frame["id"])
        reply = await client.reply(middle["id"])
        expect(reply.get("op") == "ok", "ok", reply)
        for frame in bad:
            check_err(await client.reply(frame["id"]), "unknown_op", frame["id"])
        await client.sync()


# ---------------------------------------------------------------- history


async def publish(protocol: str, topic: str, data: list[Any]) -> None:
    publisher = await Client.open(protocol)
    await publisher.send(*({"op": "pub", "topic": topic, "data": item} for item in data))
    await publisher.sync()  # every pub before the sync is handled (and has no reply)
    rest = await publisher.drain_events()
    expect(rest == [], "no err for the pubs", rest)


@both("history: a topic without messages has offset 0 and no messages")
async def history_empty(protocol: str) -> None:
    client = await Client.open(protocol)
    answer = await client.history(presence_topic("he"))
    expect(answer["offset"] == 0 and answer["messages"] == [], "offset 0, messages []", answer)


@both("history: messages oldest first with offsets 1.., epoch and offset as the sub's ok")
async def history_basic(protocol: str) -> None:
    topic = presence_topic("hb")
    client = await Client.open(protocol)
    first = await client.history(topic)
    data: list[Any] = [{"text": "hi"}, "two", 3, [4], None]
    await publish(MSGPACK if protocol == JSON else JSON, topic, data)
    answer = await client.history(topic)
    want = [{"offset": i + 1, "data": item} for i, item in enumerate(data)]
    expect(answer["messages"] == want, str(want), answer)
    expect(
        answer["offset"] == 5 and answer["epoch"] == first["epoch"], "offset 5, same epoch", answer
    )
    ok = await client.sub(topic)
    expect((ok["epoch"], ok["offset"]) == (answer["epoch"], 5), "the sub's ok: same epoch, 5", ok)


@both("history: limit default 100, limit 1, limit 1000; paging by since, recovered true")
async def history_limit_paging(protocol: str) -> None:
    topic = presence_topic("hl")
    await publish(protocol, topic, [f"d{n}" for n in range(1, 251)])
    client = await Client.open(protocol)
    answer = await client.history(topic)
    offsets = [m["offset"] for m in answer["messages"]]
    expect(offsets == list(range(1, 101)), "offsets 1..100 by default", offsets)
    expect(answer["offset"] == 250, "latest offset 250", answer)
    expect(all(m["data"] == f"d{m['offset']}" for m in answer["messages"]), "data", answer)
    one = await client.history(topic, limit=1)
    expect(one["messages"] == [{"offset": 1, "data": "d1"}], "the oldest only", one)
    full = await client.history(topic, limit=HISTORY_LIMIT_MAX)
    expect([m["offset"] for m in full["messages"]] == list(range(1, 251)), "all 250", full)
    epoch = answer["epoch"]
    walked: list[int] = []
    since = 0
    for _ in range(5):
        page = await client.history(topic, since={"epoch": epoch, "offset": since}, limit=100)
        expect(page["recovered"] is True and page["epoch"] == epoch, "recovered, same epoch", page)
        offsets = [m["offset"] for m in page["messages"]]
        if not offsets:
            break
        walked.extend(offsets)
        since = offsets[-1]
    expect(walked == list(range(1, 251)), "pages 1..100, 101..200, 201..250, then []", walked)


@both("history: since with another epoch is recovered false, nothing replayed")
async def history_other_epoch(protocol: str) -> None:
    topic = presence_topic("hx")
    await publish(protocol, topic, [1, 2, 3])
    client = await Client.open(protocol)
    answer = await client.history(topic, since={"epoch": "not-the-epoch", "offset": 1})
    expect(answer["recovered"] is False, "recovered false", answer)
    expect(answer["messages"] == [] and answer["offset"] == 3, "no messages, offset 3", answer)


@case("history: after eviction, since before the kept tail is recovered false, tail replayed")
async def history_evicted() -> None:
    topic = presence_topic("hev")
    total = HISTORY_SIZE + 10
    await publish(MSGPACK, topic, list(range(1, total + 1)))
    client = await Client.open(JSON)
    oldest = total - HISTORY_SIZE + 1  # 11
    answer = await client.history(topic, limit=5)
    got = [m["offset"] for m in answer["messages"]]
    expect(got == list(range(oldest, oldest + 5)), f"the oldest kept first ({oldest}..)", got)
    epoch = answer["epoch"]
    for since, recovered in ((0, False), (oldest - 2, False), (oldest - 1, True)):
        page = await client.history(topic, since={"epoch": epoch, "offset": since}, limit=1000)
        got = [m["offset"] for m in page["messages"]]
        expect(page["recovered"] is recovered, f"since {since}: recovered {recovered}", page)
        expect(got == list(range(oldest, total + 1)), f"since {since}: {oldest}..{total}", got)
        expect(all(m["data"] == m["offset"] for m in page["messages"]), "data", page)


@both("history: same order and offsets as the msgs a subscriber got, two publishers")
async def history_order(protocol: str) -> None:
    topic = presence_topic("ho")
    subscriber = await Client.open(protocol)
    ok = await subscriber.sub(topic)
    expect(ok["offset"] == 0, "offset 0 before the first message", ok)
    pubs = [await Client.open(JSON), await Client.open(MSGPACK)]
    for n in range(20):
        await pubs[n % 2].send({"op": "pub", "topic": topic, "data": [n % 2, n]})
    for pub in pubs:
        await pub.sync()
    got = []
    for _ in range(20):
        frame = await subscriber.event()
        expect(set(frame) == {"op", "topic", "data", "sub", "offset"}, "msg with offset", frame)
        got.append({"offset": frame["offset"], "data": frame["data"]})
    expect([m["offset"] for m in got] == list(range(1, 21)), "offsets 1..20 in order", got)
    for i in (0, 1):
        mine = [m["data"][1] for m in got if m["data"][0] == i]
        expect(mine == sorted(mine), f"publisher {i}'s messages in publish order", mine)
    answer = await subscriber.history(topic)
    expect(answer["messages"] == got, "history = the msgs received", answer["messages"])


@both("history: sub with since replays the kept messages, then live")
async def sub_since_replay(protocol: str) -> None:
    topic = presence_topic("hs")
    client = await Client.open(protocol)
    epoch = (await client.history(topic))["epoch"]
    await publish(protocol, topic, ["a", "b", "c"])
    ok = await client.sub(topic, since={"epoch": epoch, "offset": 1})
    expect(ok["recovered"] is True and ok["offset"] == 3, "recovered true, offset 3", ok)
    await publish(protocol, topic, ["d"])
    got = [await client.event() for _ in range(3)]
    want = [
        {"op": "msg", "topic": topic, "data": data, "sub": topic, "offset": offset}
        for offset, data in ((2, "b"), (3, "c"), (4, "d"))
    ]
    expect(got == want, str(want), got)
    frame = {"op": "sub", "id": 7, "topic": topic, "since": {"epoch": epoch, "offset": 0}}
    await client.err(frame, BR)  # since on a pattern already held


@both("history: a repeated sub on a concrete topic with history is answered with epoch and offset")
async def resub_ok_keys(protocol: str) -> None:
    # protocol.md: "A `sub` on such a concrete topic is answered with `ok` carrying `epoch`
    # and `offset`"; a repeated sub "is answered `ok` and changes nothing".
    topic = presence_topic("hr")
    client = await Client.open(protocol)
    first = await client.sub(topic)
    await publish(protocol, topic, ["x"])
    again = await client.sub(topic)  # checks the keys op, id, epoch, offset
    expect(again["epoch"] == first["epoch"] and again["offset"] == 1, "same epoch, offset 1", again)


@case("history: a sub on a wildcard under chat.> has a plain ok; msgs carry offset")
async def wildcard_ok_plain() -> None:
    base = presence_topic("hw")
    client = await Client.open(JSON)
    await client.sub(f"{base}.*")  # checks the ok is exactly {op, id}
    await publish(JSON, f"{base}.x", ["p"])
    frame = await client.event()
    want = {"op": "msg", "topic": f"{base}.x", "data": "p", "sub": f"{base}.*", "offset": 1}
    expect(frame == want, str(want), frame)


@both("history: not_enabled on topics that keep none")
async def history_not_enabled(protocol: str) -> None:
    client = await Client.open(protocol)
    for i, topic in enumerate((plain_topic("nh"), "chat", "chatter.x")):
        await client.err({"op": "history", "id": i, "topic": topic}, "not_enabled")


@case("history: a wildcard or malformed topic is invalid_topic")
async def history_invalid_topic() -> None:
    client = await Client.open(JSON)
    for i, topic in enumerate(("chat.*", "chat.>", "*", "chat..x", "chat.\u200bx", "")):
        await client.err({"op": "history", "id": i, "topic": topic}, "invalid_topic")


@case("history: limit out of 1..1000 or not an integer is bad_request")
async def history_bad_limit() -> None:
    client = await Client.open(MSGPACK)
    topic = presence_topic("hbl")
    for i, limit in enumerate((0, -1, 1001, "5", 1.5, True, [3])):
        await client.err({"op": "history", "id": i, "topic": topic, "limit": limit}, BR)


@case("history: a malformed since is bad_request")
async def history_bad_since() -> None:
    client = await Client.open(JSON)
    topic = presence_topic("hbs")
    sinces: list[Any] = [
        "x",
        5,
        [1, 2],
        {"epoch": 1, "offset": 0},
        {"epoch": "e"},
        {"offset": 0},
        {"epoch": "e", "offset": -1},
        {"epoch": "e", "offset": 1.5},
        {"epoch": "e", "offset": "1"},
    ]
    for i, since in enumerate(sinces):
        await client.err({"op": "history", "id": i, "topic": topic, "since": since}, BR)


@case("history: without id, and without topic, are bad_request")
async def history_bad_request() -> None:
    client = await Client.open(JSON)
    await client.err({"op": "history", "topic": presence_topic("noid")}, BR)
    await client.err({"op": "history", "id": 3}, BR)
    await client.err({"op": "history", "id": 4, "topic": ["chat.x"]}, BR)


# ---------------------------------------------------------------- runner


async def run_case(name: str, func: Callable[[], Awaitable[None]]) -> None:
    before = len(RESULTS)
    try:
        async with asyncio.timeout(CASE_TIMEOUT):
            await func()
    except Fail as exc:
        record(name, str(exc))
    except TimeoutError:
        record(name, f"expected a frame within {TIMEOUT} s, got a timeout")
    except ConnectionClosed as exc:
        record(name, f"expected an open connection, got closed ({exc})")
    except Exception as exc:  # report anything else as a failure
        record(name, f"expected no error, got {type(exc).__name__}: {exc}")
    else:
        if len(RESULTS) == before:
            record(name, None)
    finally:
        while OPEN_CLIENTS:
            with contextlib.suppress(Exception):
                await OPEN_CLIENTS.pop().close()


async def main() -> int:
    for name, func in CASES:
        await run_case(name, func)
    failed = [name for name, failure in RESULTS if failure is not None]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: check_v11.py ws://HOST:PORT/")
    URL = sys.argv[1]
    sys.exit(asyncio.run(main()))
