#!/usr/bin/env python3
"""Outside conformance check of the pub/sub broker against its wire protocol document.

Usage: python check.py ws://127.0.0.1:8765/

Written from the protocol document alone. Prints one line per case, `PASS name` or
`FAIL name: expected ..., got ...`, and exits 0 only if every case passes. Run it against a
broker with the default configuration; it takes a few seconds.

Not checked here, because they need broker control, non-default config or long waits:
shutdown (HTTP 503, close 1001 "server shutting down"), keep-alive (close 1001 "ping timeout"),
`handshake_timeout`, the `on_full` policies, slow consumers (close 4002), `lag` frames, the
unread-replies bound, and `too_large` with a lowered `max_payload`. The codes `internal`,
`forbidden`, `rate_limited`, `unavailable` and close 4003 cannot be provoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

JSON = "pubsub.v1.json"
MSGPACK = "pubsub.v1.msgpack"
TIMEOUT = 5.0  # seconds, for every single wait
CASE_TIMEOUT = 15.0  # seconds, for a whole case
MIB = 1024 * 1024
MAX_MESSAGE_SIZE = MIB
MAX_SUBSCRIPTIONS = 1024
MAX_BAD_FRAMES = 10
U64_MAX = 2**64 - 1
NO_ID = "<no id>"
UNSUPPORTED_BODY = "unsupported subprotocol; offer one of pubsub.v1.msgpack, pubsub.v1.json"

Frame = dict[str, Any]

URL = "ws://127.0.0.1:8765/"
RESULTS: list[tuple[str, str | None]] = []
OPEN_CLIENTS: list[Client] = []


class Fail(Exception):
    """A case did not get what the document promises."""


def expect(condition: bool, expected: str, got: object) -> None:
    if not condition:
        text = repr(got)
        if len(text) > 300:
            text = text[:300] + "..."
        raise Fail(f"expected {expected}, got {text}")


def record(name: str, failure: str | None) -> None:
    RESULTS.append((name, failure))
    print(f"PASS {name}" if failure is None else f"FAIL {name}: {failure}", flush=True)


def dumps(frame: Any) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


class Client:
    """One WebSocket connection speaking the broker protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.json = ws.subprotocol == JSON
        self.pending: list[Frame] = []
        self.batch_sizes: list[int] = []  # frames per received WebSocket message
        self.raw_sizes: list[int] = []  # length of each received WebSocket message
        self.next_id = 1_000_000

    @classmethod
    async def open(cls, subprotocols: list[str] | None = None, url: str | None = None) -> Client:
        if subprotocols is None:
            subprotocols = [JSON]
        ws = await connect(
            url or URL,
            subprotocols=subprotocols or None,  # [] means: offer none
            max_size=None,
            open_timeout=TIMEOUT,
            close_timeout=2,
        )
        client = cls(ws)
        OPEN_CLIENTS.append(client)
        return client

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
        self.raw_sizes.append(len(raw))
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
        self.batch_sizes.append(len(frames))
        return frames

    async def frame(self) -> Frame:
        while not self.pending:
            self.pending.extend(await self.recv_message())
        return self.pending.pop(0)

    async def until_ok(self, id_: int) -> list[Frame]:
        """Read until the `ok` with this id; return the frames that came before it."""
        before = []
        while True:
            frame = await self.frame()
            if frame.get("op") == "ok" and frame.get("id") == id_:
                return before
            before.append(frame)

    async def sync(self) -> list[Frame]:
        """Round-trip a harmless command; return everything queued for us before its reply."""
        self.next_id += 1
        await self.send({"op": "unsub", "id": self.next_id, "topic": "sync.never"})
        return await self.until_ok(self.next_id)

    async def call(self, frame: Frame) -> Frame:
        """Send one command and return the next frame (its reply on a quiet connection)."""
        await self.send(frame)
        return await self.frame()

    async def ok(self, frame: Frame) -> None:
        reply = await self.call(frame)
        expect(reply == {"op": "ok", "id": frame["id"]}, f"ok for {frame}", reply)

    async def closed(self) -> tuple[list[Frame], ConnectionClosed]:
        """Read until the broker closes; return the frames before the close and the close."""
        frames = list(self.pending)
        self.pending.clear()
        try:
            while True:
                frames.extend(await self.recv_message())
        except ConnectionClosed as exc:
            return frames, exc

    async def close(self) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                await self.ws.close()
        except (TimeoutError, ConnectionClosed, OSError):
            pass


def shape(frame: Frame) -> tuple[Any, ...]:
    """A comparable summary of a reply: ('ok', id), ('err', code, id) or ('msg', sub, topic)."""
    op = frame.get("op")
    if op == "ok":
        return ("ok", frame.get("id", NO_ID))
    if op == "err":
        expect(isinstance(frame.get("msg"), str), "err.msg to be a string", frame)
        expect(set(frame) <= {"op", "code", "msg", "id"}, "err keys op, code, msg, id", frame)
        return ("err", frame.get("code"), frame.get("id", NO_ID))
    if op == "msg":
        return ("msg", frame.get("sub"), frame.get("topic"))
    return (op,)


# ---------------------------------------------------------------- case registry

CASES: list[tuple[str, Callable[[], Awaitable[None]]]] = []


def case(name: str) -> Callable[[Callable[[], Awaitable[None]]], Callable[[], Awaitable[None]]]:
    def register(func: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        CASES.append((name, func))
        return func

    return register


def reply_case(name: str, protocol: str, raw: str | bytes, expected: list[tuple[Any, ...]]) -> None:
    """Send one raw WebSocket message; the replies before a sync must equal `expected`."""

    async def run() -> None:
        client = await Client.open([protocol])
        await client.send_raw(raw)
        got = [shape(frame) for frame in await client.sync()]
        expect(got == expected, str(expected), got)

    CASES.append((name, run))


# ---------------------------------------------------------------- connecting


@case("connect: pubsub.v1.json gives JSON text messages")
async def connect_json() -> None:
    client = await Client.open([JSON])
    expect(client.ws.subprotocol == JSON, JSON, client.ws.subprotocol)
    await client.send_raw(dumps({"op": "sub", "id": 1, "topic": "a"}))
    async with asyncio.timeout(TIMEOUT):
        raw = await client.ws.recv()
    expect(raw == '{"op":"ok","id":1}' or json.loads(raw) == {"op": "ok", "id": 1}, "ok 1", raw)


@case("connect: pubsub.v1.msgpack gives msgpack binary messages")
async def connect_msgpack() -> None:
    client = await Client.open([MSGPACK])
    expect(client.ws.subprotocol == MSGPACK, MSGPACK, client.ws.subprotocol)
    await client.send_raw(msgpack.packb({"op": "sub", "id": 1, "topic": "a"}))
    async with asyncio.timeout(TIMEOUT):
        raw = await client.ws.recv()
    expect(isinstance(raw, bytes), "binary", type(raw).__name__)
    expect(msgpack.unpackb(raw) == {"op": "ok", "id": 1}, "ok 1", raw)


@case("connect: no subprotocol means msgpack and no Sec-WebSocket-Protocol header")
async def connect_none() -> None:
    client = await Client.open([])
    header = client.ws.response.headers.get("Sec-WebSocket-Protocol")
    expect(header is None, "no Sec-WebSocket-Protocol header", header)
    await client.send_raw(msgpack.packb({"op": "sub", "id": 7, "topic": "a"}))
    async with asyncio.timeout(TIMEOUT):
        raw = await client.ws.recv()
    expect(isinstance(raw, bytes), "binary", type(raw).__name__)
    expect(msgpack.unpackb(raw) == {"op": "ok", "id": 7}, "ok 7", raw)


@case("connect: only unknown subprotocols is HTTP 400 with the documented body")
async def connect_unknown() -> None:
    try:
        await Client.open(["pubsub.v2.json", "chat"])
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = exc.response.body.decode("utf-8", "replace").strip()
        want = (400, UNSUPPORTED_BODY)
        expect((status, body) == want, f"HTTP {want}", (status, body))
        return
    raise Fail("expected HTTP 400, got an open connection")


def subprotocol_case(offered: list[str], chosen: str) -> None:
    async def run() -> None:
        client = await Client.open(offered)
        expect(client.ws.subprotocol == chosen, chosen, client.ws.subprotocol)
        await client.ok({"op": "sub", "id": 1, "topic": "a"})

    CASES.append((f"connect: offered {offered} picks {chosen}", run))


subprotocol_case([JSON, MSGPACK], JSON)
subprotocol_case([MSGPACK, JSON], MSGPACK)
subprotocol_case(["unknown.v9", JSON, MSGPACK], JSON)
subprotocol_case(["unknown.v9", MSGPACK, "other"], MSGPACK)


@case("connect: path and query string are ignored")
async def connect_path() -> None:
    base = URL.split("?")[0].rstrip("/")
    client = await Client.open([JSON], url=f"{base}/some/path?x=1&y=2")
    await client.ok({"op": "sub", "id": 1, "topic": "a"})


# ---------------------------------------------------------------- commands and replies


def both(name: str, func: Callable[[str], Awaitable[None]]) -> None:
    for protocol in (JSON, MSGPACK):
        label = "json" if protocol == JSON else "msgpack"

        async def run(protocol: str = protocol) -> None:
            await func(protocol)

        CASES.append((f"{name} [{label}]", run))


async def sub_pub_unsub(protocol: str) -> None:
    sub = await Client.open([protocol])
    pub = await Client.open([protocol])
    await sub.ok({"op": "sub", "id": 1, "topic": "room.1"})
    await pub.ok({"op": "pub", "id": 2, "topic": "room.1", "data": {"text": "hi"}})
    got = await sub.sync()
    want = [{"op": "msg", "topic": "room.1", "data": {"text": "hi"}, "sub": "room.1"}]
    expect(got == want, f"{want} (exact keys)", got)
    await sub.ok({"op": "unsub", "id": 3, "topic": "room.1"})
    await pub.ok({"op": "pub", "id": 4, "topic": "room.1", "data": 1})
    got = await sub.sync()
    expect(got == [], "no msg after unsub", got)


both("sub/pub/unsub with ids and replies", sub_pub_unsub)


async def ids_echoed(protocol: str) -> None:
    client = await Client.open([protocol])
    for id_ in (0, 1, 2**32, 2**53 + 1, U64_MAX):
        await client.ok({"op": "sub", "id": id_, "topic": "ids.x"})
        await client.ok({"op": "pub", "id": id_, "topic": "nobody.here", "data": None})


both("ids 0 .. 2^64-1 are echoed exactly", ids_echoed)


async def pub_without_id(protocol: str) -> None:
    client = await Client.open([protocol])
    await client.send({"op": "pub", "topic": "a.b", "data": "fire and forget"})
    await client.send({"op": "pub", "id": None, "topic": "a.b", "data": "null id"})
    got = await client.sync()
    expect(got == [], "no reply to pub without id (or with id null)", got)


both("pub without id (or id null) gets no ok", pub_without_id)


@case("pub with no subscriber is answered ok")
async def pub_nobody() -> None:
    client = await Client.open([JSON])
    await client.ok({"op": "pub", "id": 5, "topic": "nobody.listens", "data": [1, 2]})


@case("pub with data null is accepted")
async def pub_data_null() -> None:
    client = await Client.open([JSON])
    await client.ok({"op": "pub", "id": 5, "topic": "nobody.listens", "data": None})


@case("sub with since on a topic without history is ok, recovered false")
async def sub_since() -> None:
    client = await Client.open([JSON])
    reply = await client.call(
        {"op": "sub", "id": 1, "topic": "since.x", "since": {"epoch": "e", "offset": 3}}
    )
    expect(reply == {"op": "ok", "id": 1, "recovered": False}, "ok, recovered false", reply)


@case("malformed since, and since on a wildcard, are bad_request")
async def sub_since_bad() -> None:
    client = await Client.open([JSON])
    for i, since in enumerate(["x", 5, {"epoch": 1}, [1, 2], -3, {"epoch": "e", "offset": -1}]):
        reply = await client.call({"op": "sub", "id": i, "topic": "since.y", "since": since})
        expect(shape(reply) == ("err", "bad_request", i), f"bad_request for since={since!r}", reply)
    good = {"epoch": "e", "offset": 0}
    reply = await client.call({"op": "sub", "id": 9, "topic": "since.*", "since": good})
    expect(shape(reply) == ("err", "bad_request", 9), "bad_request for since on a wildcard", reply)


@case("unknown extra keys are ignored")
async def extra_keys() -> None:
    client = await Client.open([JSON])
    await client.ok({"op": "sub", "id": 1, "topic": "x.y", "token": "abc", "v": 2})
    pub = await Client.open([JSON])
    await pub.ok({"op": "pub", "id": 2, "topic": "x.y", "data": 1, "offset": 9})
    got = await client.sync()
    expect(got == [{"op": "msg", "topic": "x.y", "data": 1, "sub": "x.y"}], "one msg", got)


@case("duplicate sub is ok and delivers once")
async def duplicate_sub() -> None:
    client = await Client.open([JSON])
    await client.ok({"op": "sub", "id": 1, "topic": "dup.x"})
    await client.ok({"op": "sub", "id": 2, "topic": "dup.x"})
    pub = await Client.open([MSGPACK])
    await pub.ok({"op": "pub", "id": 3, "topic": "dup.x", "data": "once"})
    got = [shape(frame) for frame in await client.sync()]
    expect(got == [("msg", "dup.x", "dup.x")], "one msg", got)


@case("unsub of a pattern not held is ok")
async def unsub_unknown() -> None:
    client = await Client.open([JSON])
    await client.ok({"op": "unsub", "id": 1, "topic": "never.held"})
    await client.ok({"op": "unsub", "id": 2, "topic": "never.*"})


@case("unsub chat.> does not remove chat.*")
async def unsub_exact() -> None:
    client = await Client.open([JSON])
    await client.ok({"op": "sub", "id": 1, "topic": "chat.*"})
    await client.ok({"op": "sub", "id": 2, "topic": "chat.>"})
    await client.ok({"op": "unsub", "id": 3, "topic": "chat.>"})
    pub = await Client.open([MSGPACK])
    await pub.ok({"op": "pub", "id": 4, "topic": "chat.a", "data": 0})
    got = [shape(frame) for frame in await client.sync()]
    expect(got == [("msg", "chat.*", "chat.a")], "one msg via chat.*", got)


@case("own pub: msg comes before the ok")
async def own_pub() -> None:
    client = await Client.open([JSON])
    await client.ok({"op": "sub", "id": 1, "topic": "self.t"})
    await client.send({"op": "pub", "id": 2, "topic": "self.t", "data": "me"})
    got = [shape(await client.frame()), shape(await client.frame())]
    expect(got == [("msg", "self.t", "self.t"), ("ok", 2)], "msg then ok", got)


@case("after unsub, an already queued msg is still delivered")
async def unsub_queued() -> None:
    client = await Client.open([MSGPACK])
    await client.send(
        {"op": "sub", "id": 1, "topic": "q.u"},
        {"op": "pub", "topic": "q.u", "data": 1},
        {"op": "unsub", "id": 2, "topic": "q.u"},
        {"op": "pub", "id": 3, "topic": "q.u", "data": 2},
    )
    got = [shape(frame) for frame in await client.until_ok(3)]
    want = [("ok", 1), ("msg", "q.u", "q.u"), ("ok", 2)]
    expect(got == want, str(want), got)


@case("every subscribed connection gets its copy")
async def fan_out() -> None:
    subs = [await Client.open([protocol]) for protocol in (JSON, MSGPACK, JSON)]
    for sub in subs:
        await sub.ok({"op": "sub", "id": 1, "topic": "fan.out"})
    pub = await Client.open([JSON])
    await pub.ok({"op": "pub", "id": 2, "topic": "fan.out", "data": {"n": 1}})
    for sub in subs:
        got = await sub.sync()
        want = [{"op": "msg", "topic": "fan.out", "data": {"n": 1}, "sub": "fan.out"}]
        expect(got == want, str(want), got)


# ---------------------------------------------------------------- wildcards

MATCH_TOPICS = [
    "chat",
    "chat.a",
    "chat.b",
    "chat.a.b",
    "chat.room1",
    "chat.room2",
    "chat.room1.x",
    "chat.a.typing",
    "chat.a.b.typing",
    "news",
    "news.x",
    "Chat.a",
    "CHAT",
    "chatter.a",
]
MATCH_PATTERNS = {
    "chat.room1": {"chat.room1"},
    "chat.*": {"chat.a", "chat.b", "chat.room1", "chat.room2"},
    "chat.*.typing": {"chat.a.typing"},
    "chat.>": {t for t in MATCH_TOPICS if t.startswith("chat.")},
    ">": set(MATCH_TOPICS),
    "*": {"chat", "news", "CHAT"},
    "*.*": {t for t in MATCH_TOPICS if t.count(".") == 1},
    "*.a.>": {"chat.a.b", "chat.a.typing", "chat.a.b.typing"},
}


@case("wildcards: one subscriber holding every pattern")
async def wildcards() -> None:
    client = await Client.open([JSON])
    for i, pattern in enumerate(MATCH_PATTERNS):
        await client.ok({"op": "sub", "id": i, "topic": pattern})
    pub = await Client.open([MSGPACK])
    await pub.send(*({"op": "pub", "topic": topic, "data": topic} for topic in MATCH_TOPICS))
    await pub.sync()
    frames = await client.sync()
    seen: dict[str, list[str]] = {pattern: [] for pattern in MATCH_PATTERNS}
    for frame in frames:
        expect(frame.get("data") == frame.get("topic"), "data matching topic", frame)
        seen.setdefault(frame["sub"], []).append(frame["topic"])
    for pattern, want in MATCH_PATTERNS.items():
        name = f"wildcards: {pattern!r} matches {sorted(want)} and nothing else, once each"
        got = seen.get(pattern, [])
        ok = sorted(got) == sorted(want)
        record(name, None if ok else f"expected {sorted(want)}, got {sorted(got)}")


@case("overlapping patterns: one msg per matching subscription")
async def overlapping() -> None:
    client = await Client.open([MSGPACK])
    patterns = ["ov.*", "ov.>", "ov.room1", ">", "*.room1", "ov.room1"]  # last is a duplicate
    for i, pattern in enumerate(patterns):
        await client.ok({"op": "sub", "id": i, "topic": pattern})
    pub = await Client.open([JSON])
    await pub.ok({"op": "pub", "id": 9, "topic": "ov.room1", "data": "x"})
    got = sorted(shape(frame) for frame in await client.sync())
    want = sorted(("msg", pattern, "ov.room1") for pattern in set(patterns))
    expect(got == want, str(want), got)


# ---------------------------------------------------------------- ordering and batches


@case("per-publisher order, across topics, to JSON and msgpack subscribers")
async def ordering() -> None:
    wide = await Client.open([JSON])
    await wide.ok({"op": "sub", "id": 1, "topic": "ord.>"})
    narrow = await Client.open([MSGPACK])
    for i, topic in enumerate(("ord.a", "ord.b", "ord.c")):
        await narrow.ok({"op": "sub", "id": i, "topic": topic})
    pub = await Client.open([MSGPACK])
    topics = ("ord.a", "ord.b", "ord.c")
    for n in range(150):  # one pub per WebSocket message
        await pub.send({"op": "pub", "topic": topics[n % 3], "data": n})
    await pub.send(*({"op": "pub", "topic": topics[n % 3], "data": n} for n in range(150, 300)))
    await pub.sync()
    for sub in (wide, narrow):
        got = [frame["data"] for frame in await sub.sync()]
        expect(got == list(range(300)), "data 0..299 in order", got)


@case("client batch: several frames in one message, replies in order [json]")
async def client_batch_json() -> None:
    client = await Client.open([JSON])
    raw = "\n".join(dumps({"op": "sub", "id": i, "topic": f"cb.{i}"}) for i in range(5))
    await client.send_raw(raw)
    got = [shape(await client.frame()) for _ in range(5)]
    expect(got == [("ok", i) for i in range(5)], "ok 0..4", got)


@case("client batch: several frames in one message, replies in order [msgpack]")
async def client_batch_msgpack() -> None:
    client = await Client.open([MSGPACK])
    await client.send(*({"op": "sub", "id": i, "topic": f"cb.{i}"} for i in range(5)))
    got = [shape(await client.frame()) for _ in range(5)]
    expect(got == [("ok", i) for i in range(5)], "ok 0..4", got)


reply_case(
    "JSON blank lines, whitespace-only lines, \\r\\n and a trailing newline are skipped",
    JSON,
    '\n  \n{"op":"sub","id":1,"topic":"bl.a"}\r\n\t\n{"op":"sub","id":2,"topic":"bl.b"}\n',
    [("ok", 1), ("ok", 2)],
)


@case("empty messages are ignored (text on JSON, binary on msgpack)")
async def empty_message() -> None:
    for protocol, empty in ((JSON, ""), (MSGPACK, b"")):
        client = await Client.open([protocol])
        await client.send_raw(empty)
        got = await client.sync()
        expect(got == [], "no reply", got)


@case("broker batches queued frames; every received batch decodes [json and msgpack]")
async def broker_batches() -> None:
    subs = [await Client.open([JSON]), await Client.open([MSGPACK])]
    for sub in subs:
        await sub.ok({"op": "sub", "id": 1, "topic": "bat.x"})
    pub = await Client.open([MSGPACK])
    await pub.send(*({"op": "pub", "topic": "bat.x", "data": n} for n in range(100)))
    await pub.sync()
    for sub in subs:
        got = [frame["data"] for frame in await sub.sync()]
        expect(got == list(range(100)), "data 0..99", got)
        expect(max(sub.batch_sizes) > 1, "some message holding several frames", sub.batch_sizes)


@case("outgoing messages stay within max_message_size when batching")
async def outgoing_size() -> None:
    sub = await Client.open([MSGPACK])
    await sub.ok({"op": "sub", "id": 1, "topic": "osz.x"})
    pub = await Client.open([MSGPACK])
    for _ in range(4):
        await pub.send({"op": "pub", "topic": "osz.x", "data": bytes(400_000)})
    await pub.sync()
    got = await sub.sync()
    expect(len(got) == 4, "4 msgs", len(got))
    expect(max(sub.raw_sizes) <= MAX_MESSAGE_SIZE, "every message <= 1 MiB", sub.raw_sizes)


@case("exactly 1 MiB message is accepted; the bigger msg to JSON goes out alone")
async def exact_limit() -> None:
    sub = await Client.open([JSON])
    await sub.ok({"op": "sub", "id": 1, "topic": "big.x"})
    pub = await Client.open([MSGPACK])
    frame = {"op": "pub", "id": 2, "topic": "big.x", "data": b""}
    size = MAX_MESSAGE_SIZE - len(msgpack.packb(frame)) - 3  # bin8 header -> bin32 header
    frame["data"] = bytes(size)
    small = {"op": "pub", "topic": "big.x", "data": "small"}
    raw = msgpack.packb(frame)
    expect(len(raw) == MAX_MESSAGE_SIZE, "test setup of exactly 1 MiB", len(raw))
    await pub.send_raw(raw)
    expect(shape(await pub.frame()) == ("ok", 2), "ok 2", "other")
    await pub.send(small)
    first = await sub.recv_message()
    expect(len(first) == 1 and sub.raw_sizes[-1] > MAX_MESSAGE_SIZE, "big msg alone", sub.raw_sizes)
    expect(len(first[0]["data"]) == 4 * ((size + 2) // 3), "base64 data", len(first[0]["data"]))
    got = [frame["data"] for frame in await sub.sync()]
    expect(got == ["small"], "then the small msg", got)


# ---------------------------------------------------------------- encodings interop

INTEROP = [
    ("binary -> base64", b"\x00\xff", "AP8="),
    ("binary nested in list and map", [b"\x01", {"k": b""}], ["AQ==", {"k": ""}]),
    ("int map key -> string", {1: "one"}, {"1": "one"}),
    ("bool map key -> string", {True: "t"}, {"true": "t"}),
    ("binary map key -> its UTF-8 text", {b"ab": 1}, {"ab": 1}),
    ("undecodable binary key -> \\xNN escapes", {b"a\xff": 1}, {"a\\xff": 1}),
    ("NaN -> null", float("nan"), None),
    ("Infinity -> null", float("inf"), None),
    ("-Infinity -> null", float("-inf"), None),
    ("ext type -> [code, base64]", msgpack.ExtType(5, b"\x01\x02"), [5, "AQI="]),
    ("timestamp -> repr string", msgpack.Timestamp(1, 2), "Timestamp(seconds=1, nanoseconds=2)"),
    (
        "plain values unchanged",
        [None, True, -5, 1.5, U64_MAX, "é", {"a": []}],
        [None, True, -5, 1.5, U64_MAX, "é", {"a": []}],
    ),
]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b and type(a) is type(b)


@case("interop: msgpack publisher to JSON and msgpack subscribers")
async def interop() -> None:
    json_sub = await Client.open([JSON])
    mp_sub = await Client.open([MSGPACK])
    for sub in (json_sub, mp_sub):
        await sub.ok({"op": "sub", "id": 1, "topic": "interop.*"})
    pub = await Client.open([MSGPACK])
    for i, (_, data, _) in enumerate(INTEROP):
        await pub.ok({"op": "pub", "id": i, "topic": f"interop.t{i}", "data": data})
    json_got = {frame["topic"]: frame["data"] for frame in await json_sub.sync()}
    mp_got = {frame["topic"]: frame["data"] for frame in await mp_sub.sync()}
    for i, (label, data, want) in enumerate(INTEROP):
        topic = f"interop.t{i}"
        got = json_got.get(topic, "<missing>")
        failure = None if got == want else f"expected {want!r}, got {got!r}"
        record(f"interop to JSON: {label}", failure)
        got = mp_got.get(topic, "<missing>")
        failure = None if same(data, got) else f"expected {data!r} unchanged, got {got!r}"
        record(f"interop to msgpack: {label} passed on unchanged", failure)


@case("interop: JSON publisher to msgpack subscriber, unicode topic")
async def interop_json() -> None:
    sub = await Client.open([MSGPACK])
    await sub.ok({"op": "sub", "id": 1, "topic": "ünï.*"})
    pub = await Client.open([JSON])
    data = {"a": [1, 2.5, "x", None, True, {"b": {}}], "big": U64_MAX}
    await pub.ok({"op": "pub", "id": 2, "topic": "ünï.cödé", "data": data})
    got = await sub.sync()
    want = [{"op": "msg", "topic": "ünï.cödé", "data": data, "sub": "ünï.*"}]
    expect(got == want, str(want), got)


# ---------------------------------------------------------------- errors: bad_request

J = JSON
M = MSGPACK
BR = "bad_request"


def sub_json(id_: str) -> str:
    return '{"op":"sub","id":' + id_ + ',"topic":"a"}'


reply_case("bad_request: undecodable JSON", J, "{nope", [("err", BR, NO_ID)])
reply_case(
    "bad_request: frames before undecodable bytes count, one err for the rest [json]",
    J,
    sub_json("1") + "\n{nope\n" + sub_json("2") + "\n" + sub_json("3"),
    [("ok", 1), ("err", BR, NO_ID)],
)
reply_case(
    "bad_request: frames before undecodable bytes count, one err for the rest [msgpack]",
    M,
    msgpack.packb({"op": "sub", "id": 1, "topic": "a"})
    + b"\xc1\xc1"
    + msgpack.packb({"op": "sub", "id": 2, "topic": "a"}),
    [("ok", 1), ("err", BR, NO_ID)],
)
reply_case(
    "bad_request: truncated msgpack frame",
    M,
    msgpack.packb({"op": "sub", "id": 1, "topic": "a"})
    + msgpack.packb({"op": "sub", "id": 2, "topic": "a"})[:-1],
    [("ok", 1), ("err", BR, NO_ID)],
)
for token in ("NaN", "Infinity", "-Infinity"):
    reply_case(
        f"bad_request: JSON token {token} is undecodable, rest of message dropped",
        J,
        '{"op":"pub","id":1,"topic":"a","data":' + token + "}\n" + sub_json("2"),
        [("err", BR, NO_ID)],
    )
reply_case(
    "bad_request: lone surrogate in JSON data, with id; later frames handled",
    J,
    '{"op":"pub","id":1,"topic":"a","data":"\\ud800"}\n' + sub_json("2"),
    [("err", BR, 1), ("ok", 2)],
)
for label, raw in (("list", "[1,2]"), ("string", '"sub"'), ("number", "7"), ("null", "null")):
    reply_case(f"bad_request: frame is a {label} [json]", J, raw, [("err", BR, NO_ID)])
reply_case("bad_request: frame is a list [msgpack]", M, msgpack.packb([1]), [("err", BR, NO_ID)])
reply_case("bad_request: frame is an int [msgpack]", M, msgpack.packb(3), [("err", BR, NO_ID)])
for label, id_ in (
    ("true", "true"),
    ("1.0", "1.0"),
    ("string", '"1"'),
    ("-1", "-1"),
    ("2^64", str(2**64)),
    ("list", "[1]"),
):
    reply_case(
        f"bad_request: id {label} [json], err without id", J, sub_json(id_), [("err", BR, NO_ID)]
    )
for label, id_value in (("true", True), ("1.0", 1.0), ("string", "1"), ("-1", -1)):
    reply_case(
        f"bad_request: id {label} [msgpack], err without id",
        M,
        msgpack.packb({"op": "pub", "id": id_value, "topic": "a", "data": 1}),
        [("err", BR, NO_ID)],
    )
reply_case("bad_request: sub with id null", J, sub_json("null"), [("err", BR, NO_ID)])
reply_case(
    "bad_request: unsub with id null",
    J,
    '{"op":"unsub","id":null,"topic":"a"}',
    [("err", BR, NO_ID)],
)
reply_case("bad_request: op missing", J, '{"id":5,"topic":"a"}', [("err", BR, 5)])
reply_case("bad_request: op not a string", J, '{"op":5,"id":5,"topic":"a"}', [("err", BR, 5)])
reply_case("bad_request: op null", J, '{"op":null,"id":5,"topic":"a"}', [("err", BR, 5)])
reply_case(
    "bad_request: op as msgpack bin",
    M,
    msgpack.packb({"op": b"sub", "id": 5, "topic": "a"}),
    [("err", BR, 5)],
)
reply_case(
    "bad_request: keys as msgpack bin",
    M,
    msgpack.packb({b"op": "sub", b"id": 5, b"topic": "a"}),
    [("err", BR, NO_ID)],
)
reply_case("bad_request: sub without id", J, '{"op":"sub","topic":"a"}', [("err", BR, NO_ID)])
reply_case("bad_request: unsub without id", J, '{"op":"unsub","topic":"a"}', [("err", BR, NO_ID)])
reply_case("bad_request: sub topic missing", J, '{"op":"sub","id":6}', [("err", BR, 6)])
reply_case("bad_request: unsub topic missing", J, '{"op":"unsub","id":6}', [("err", BR, 6)])
reply_case("bad_request: pub topic missing", J, '{"op":"pub","id":6,"data":1}', [("err", BR, 6)])
reply_case("bad_request: topic a number", J, '{"op":"sub","id":6,"topic":5}', [("err", BR, 6)])
reply_case("bad_request: topic null", J, '{"op":"sub","id":6,"topic":null}', [("err", BR, 6)])
reply_case(
    "bad_request: topic as msgpack bin",
    M,
    msgpack.packb({"op": "sub", "id": 6, "topic": b"a"}),
    [("err", BR, 6)],
)
reply_case(
    "bad_request: pub without data, with id", J, '{"op":"pub","id":7,"topic":"a"}', [("err", BR, 7)]
)
reply_case(
    "bad_request: pub without data, without id", J, '{"op":"pub","topic":"a"}', [("err", BR, NO_ID)]
)
reply_case(
    "bad_request: pretty-printed JSON frame is undecodable, rest dropped",
    J,
    '{\n"op":"sub","id":1,"topic":"a"\n}\n' + sub_json("2"),
    [("err", BR, NO_ID)],
)
reply_case(
    "bad_request: msgpack str that is not UTF-8 (encoded lone surrogate) is undecodable",
    M,
    msgpack.packb({"op": "sub", "id": 1, "topic": "a"})
    + b"\x83\xa2op\xa3sub\xa2id\x02\xa5topic\xa3\xed\xa0\x80",
    [("ok", 1), ("err", BR, NO_ID)],
)
reply_case("bad_request: text message on msgpack", M, sub_json("1"), [("err", BR, NO_ID)])
reply_case(
    "bad_request: binary message on JSON",
    J,
    msgpack.packb({"op": "sub", "id": 1}),
    [("err", BR, NO_ID)],
)

# check order: map, id, op, id required by sub/unsub, topic type, topic rules, data
reply_case("order: bad id before bad op", J, '{"op":5,"id":"x"}', [("err", BR, NO_ID)])
reply_case(
    "order: bad id before topic rules",
    J,
    '{"op":"sub","id":true,"topic":"a..b"}',
    [("err", BR, NO_ID)],
)
reply_case(
    "order: unknown op before missing id",
    J,
    '{"op":"foo","topic":"a"}',
    [("err", "unknown_op", NO_ID)],
)
reply_case(
    "order: unknown op before topic rules",
    J,
    '{"op":"foo","id":1,"topic":"a..b"}',
    [("err", "unknown_op", 1)],
)
reply_case(
    "order: missing sub id before topic type", J, '{"op":"sub","topic":5}', [("err", BR, NO_ID)]
)
reply_case("order: topic type before data", J, '{"op":"pub","id":4,"topic":5}', [("err", BR, 4)])
reply_case(
    "order: topic rules before data",
    J,
    '{"op":"pub","id":4,"topic":"a.*"}',
    [("err", "invalid_topic", 4)],
)

# ---------------------------------------------------------------- errors: unknown_op

for op in ("foo", "SUB", "", "msg", "ok", "Pub"):
    reply_case(
        f"unknown_op: op {op!r}",
        J,
        dumps({"op": op, "id": 3, "topic": "a"}),
        [("err", "unknown_op", 3)],
    )
reply_case("unknown_op: without id", J, '{"op":"foo"}', [("err", "unknown_op", NO_ID)])
reply_case(
    "unknown_op: [msgpack]",
    M,
    msgpack.packb({"op": "publish", "id": 3}),
    [("err", "unknown_op", 3)],
)

# ---------------------------------------------------------------- topics: invalid and valid

INVALID_PATTERNS = {
    "empty": "",
    "a..b": "a..b",
    ".a": ".a",
    "a.": "a.",
    "single dot": ".",
    "256 bytes": "a" * 256,
    "128 x é (256 UTF-8 bytes)": "é" * 128,
    "space": "a b",
    "tab": "a\tb",
    "newline": "a\nb",
    "no-break space U+00A0": "a\u00a0b",
    "em space U+2003": "a\u2003b",
    "ideographic space U+3000": "a\u3000b",
    "line separator U+2028": "a\u2028b",
    "U+0000": "a\x00b",
    "U+001F": "a\x1fb",
    "U+007F": "a\x7fb",
    "U+0085": "a\x85b",
    "U+009F": "a\x9fb",
    "zero-width space U+200B": "a\u200bb",
    "right-to-left override U+202E": "a\u202eb",
    "a*b": "a*b",
    "x>": "x>",
    "*x": "*x",
    ">.a": ">.a",
    "a.>.b": "a.>.b",
    "**": "**",
    ">>": ">>",
    "a.b*": "a.b*",
}
VALID_PATTERNS = {
    "one segment": "a",
    "255 bytes": "a" * 255,
    "127 x é + 'a' (255 bytes)": "é" * 127 + "a",
    "unicode": "ünï.cödé",
    "punctuation": "a-b_c:d/e#f@g",
    "*": "*",
    ">": ">",
    "a.*.b": "a.*.b",
    "*.>": "*.>",
}
for label, topic in INVALID_PATTERNS.items():
    for op in ("sub", "unsub"):
        reply_case(
            f"invalid_topic: {op} {label}",
            J,
            dumps({"op": op, "id": 8, "topic": topic}),
            [("err", "invalid_topic", 8)],
        )
    if "*" not in topic and ">" not in topic:
        reply_case(
            f"invalid_topic: pub {label}",
            M,
            msgpack.packb({"op": "pub", "id": 8, "topic": topic, "data": 1}),
            [("err", "invalid_topic", 8)],
        )
for topic in ("*", ">", "a.*", "a.>", "a*b", "a>b", "*.a", ">.a"):
    reply_case(
        f"invalid_topic: pub with wildcard {topic!r}",
        J,
        dumps({"op": "pub", "id": 8, "topic": topic, "data": 1}),
        [("err", "invalid_topic", 8)],
    )
for label, topic in VALID_PATTERNS.items():
    reply_case(
        f"valid pattern accepted: {label}",
        J,
        dumps({"op": "sub", "id": 9, "topic": topic}),
        [("ok", 9)],
    )
    if "*" not in topic and ">" not in topic:
        reply_case(
            f"valid topic accepted by pub: {label}",
            M,
            msgpack.packb({"op": "pub", "id": 9, "topic": topic, "data": 1}),
            [("ok", 9)],
        )


@case("lone surrogate in a JSON topic is rejected with its id (bad_request or invalid_topic)")
async def surrogate_topic() -> None:
    client = await Client.open([JSON])
    await client.send_raw('{"op":"sub","id":4,"topic":"a\\udc80b"}')
    got = [shape(frame) for frame in await client.sync()]
    allowed = ([("err", BR, 4)], [("err", "invalid_topic", 4)])
    expect(got in allowed, "bad_request or invalid_topic with id 4", got)


# ---------------------------------------------------------------- too_many_subs


@case("too_many_subs: limit 1024; duplicates do not count; unsub frees a slot")
async def too_many_subs() -> None:
    client = await Client.open([JSON])
    # Duplicates first: they must not count against the limit.
    dups = [{"op": "sub", "id": 5000 + i, "topic": "lim.0"} for i in range(5)]
    subs = [{"op": "sub", "id": i, "topic": f"lim.{i}"} for i in range(MAX_SUBSCRIPTIONS)]
    await client.send(*dups, *subs)
    got = [shape(await client.frame()) for _ in range(len(dups) + len(subs))]
    want = [("ok", frame["id"]) for frame in dups + subs]
    expect(got == want, "5 duplicate oks then 1024 oks", got[-3:])

    async def step(name: str, frame: Frame, want: tuple[Any, ...]) -> None:
        await client.send(frame)
        got = shape(await client.frame())
        record(name, None if got == want else f"expected {want}, got {got}")

    await step(
        "too_many_subs: 1025th pattern refused with its id",
        {"op": "sub", "id": 2000, "topic": "lim.new"},
        ("err", "too_many_subs", 2000),
    )
    await step(
        "too_many_subs: duplicate sub at the limit is ok",
        {"op": "sub", "id": 2001, "topic": "lim.7"},
        ("ok", 2001),
    )
    bad = [{"op": "nope", "id": 3000 + i} for i in range(MAX_BAD_FRAMES - 1)]
    await client.send(*bad, {"op": "sub", "id": 2002, "topic": "lim.new"}, *bad)
    got = [shape(frame) for frame in await client.sync()]
    want = [("err", "unknown_op", 3000 + i) for i in range(9)]
    want = [*want, ("err", "too_many_subs", 2002), *want]
    ok = got == want
    record(
        "bad-frame count is reset by a frame failing with too_many_subs",
        None if ok else f"expected 19 errs and an open connection, got {got}",
    )
    await step(
        "too_many_subs: unsub frees a slot (unsub ok)",
        {"op": "unsub", "id": 2003, "topic": "lim.7"},
        ("ok", 2003),
    )
    await step(
        "too_many_subs: new pattern accepted after unsub",
        {"op": "sub", "id": 2004, "topic": "lim.new"},
        ("ok", 2004),
    )


# ---------------------------------------------------------------- sizes: 1009 and too_large


async def expect_close(client: Client, code: int, reason: str) -> list[Frame]:
    frames, exc = await client.closed()
    rcvd = exc.rcvd
    got = (rcvd.code, rcvd.reason) if rcvd else None
    ok = rcvd is not None and rcvd.code == code and re.fullmatch(reason, rcvd.reason)
    expect(bool(ok), f"close {code} {reason!r}", got)
    return frames


SIZE_REASON = r"Exceeded maximum message size: \d+ bytes"


@case("close 1009: msgpack message of 1 MiB + 1 byte; nothing in it handled")
async def oversize_msgpack() -> None:
    sub = await Client.open([JSON])
    await sub.ok({"op": "sub", "id": 1, "topic": "os.x"})
    pub = await Client.open([MSGPACK])
    first = msgpack.packb({"op": "pub", "id": 1, "topic": "os.x", "data": "first"})
    big = {"op": "pub", "id": 2, "topic": "os.x", "data": b""}
    big["data"] = bytes(MAX_MESSAGE_SIZE + 1 - len(first) - len(msgpack.packb(big)) - 3)
    raw = first + msgpack.packb(big)
    expect(len(raw) == MAX_MESSAGE_SIZE + 1, "test setup of 1 MiB + 1", len(raw))
    with contextlib.suppress(ConnectionClosed):
        await pub.send_raw(raw)
    frames = await expect_close(pub, 1009, SIZE_REASON)
    expect(frames == [], "no reply before the close", frames)
    got = await sub.sync()
    expect(got == [], "no msg delivered from the over-size message", got)


@case("close 1009: JSON text of 1 MiB + 1 characters")
async def oversize_json() -> None:
    client = await Client.open([JSON])
    frame = '{"op":"sub","id":1,"topic":"a","pad":"PAD"}'
    pad = "x" * (MAX_MESSAGE_SIZE + 1 - len(frame) + len("PAD"))
    with contextlib.suppress(ConnectionClosed):
        await client.send_raw(frame.replace("PAD", pad))
    await expect_close(client, 1009, SIZE_REASON)


@case("JSON max_message_size counts characters: 600k x é (1.2 MB UTF-8) sub is ok")
async def json_chars() -> None:
    client = await Client.open([JSON])
    await client.send_raw(dumps({"op": "sub", "id": 1, "topic": "a", "pad": "é" * 600_000}))
    got = shape(await client.frame())
    expect(got == ("ok", 1), "ok 1", got)


@case("too_large: JSON pub under 1 Mi characters but over 1 MiB UTF-8; stays open, resets count")
async def too_large_json() -> None:
    client = await Client.open([JSON])
    bad = "\n".join(dumps({"op": "nope", "id": i}) for i in range(MAX_BAD_FRAMES - 1))
    await client.send_raw(bad)
    big = dumps({"op": "pub", "id": 1, "topic": "a", "data": "é" * 600_000})
    await client.send_raw(big)
    await client.send_raw(bad)
    got = [shape(frame) for frame in await client.sync()]
    want = [("err", "unknown_op", i) for i in range(9)]
    want = [*want, ("err", "too_large", 1), *want]
    expect(got == want, "9 unknown_op, too_large 1, 9 unknown_op, open connection", got)


# ---------------------------------------------------------------- 4008 and close echo

BAD_MIX = [
    '{"op":"sub","id":true,"topic":"a"}',  # bad_request
    '{"op":"x","id":1}',  # unknown_op
    '{"op":"sub","id":2,"topic":"a..b"}',  # invalid_topic
    "[1]",  # bad_request
    '{"op":"y","id":3}',
    '{"op":"unsub","id":4,"topic":"a*"}',
    '{"op":"pub","id":5,"topic":"a"}',
    '{"op":"z"}',
    '{"op":"pub","id":6,"topic":"a.>","data":1}',
    '{"topic":"a"}',
]
BAD_MIX_CODES = [
    ("err", BR, NO_ID),
    ("err", "unknown_op", 1),
    ("err", "invalid_topic", 2),
    ("err", BR, NO_ID),
    ("err", "unknown_op", 3),
    ("err", "invalid_topic", 4),
    ("err", BR, 5),
    ("err", "unknown_op", NO_ID),
    ("err", "invalid_topic", 6),
    ("err", BR, NO_ID),
]
REASON_4008 = f"{MAX_BAD_FRAMES} bad frames in a row"


@case("close 4008: 10 bad frames in one message, errs first, rest not handled")
async def bad_one_message() -> None:
    client = await Client.open([JSON])
    await client.send_raw("\n".join([*BAD_MIX, sub_json("99")]))
    frames = await expect_close(client, 4008, REASON_4008)
    got = [shape(frame) for frame in frames]
    expect(got == BAD_MIX_CODES, f"{BAD_MIX_CODES} and no ok 99", got)


@case("close 4008: 10 bad frames in separate messages")
async def bad_separate() -> None:
    client = await Client.open([JSON])
    for line in BAD_MIX:
        await client.send_raw(line)
    frames = await expect_close(client, 4008, REASON_4008)
    got = [shape(frame) for frame in frames]
    expect(got == BAD_MIX_CODES, str(BAD_MIX_CODES), got)


@case("close 4008: undecodable rest and wrong message type count as one bad frame each")
async def bad_undecodable() -> None:
    client = await Client.open([MSGPACK])
    nope = msgpack.packb({"op": "nope"})
    await client.send_raw(nope * 7 + b"\xc1" + nope)  # 7 unknown_op + 1 undecodable rest
    await client.send_raw("text on msgpack")  # 9th
    await client.send_raw(b"\xc1")  # 10th
    frames = await expect_close(client, 4008, REASON_4008)
    got = [shape(frame) for frame in frames]
    want = [("err", "unknown_op", NO_ID)] * 7 + [("err", BR, NO_ID)] * 3
    expect(got == want, str(want), got)


@case("bad-frame count is reset by a valid frame")
async def bad_reset() -> None:
    client = await Client.open([JSON])
    await client.send_raw("\n".join([*BAD_MIX[:9], sub_json("50"), *BAD_MIX[:9]]))
    got = [shape(frame) for frame in await client.sync()]
    want = [*BAD_MIX_CODES[:9], ("ok", 50), *BAD_MIX_CODES[:9]]
    expect(got == want, "9 errs, ok 50, 9 errs, and the connection open", got)


def close_echo_case(code: int) -> None:
    async def run() -> None:
        client = await Client.open([JSON])
        async with asyncio.timeout(TIMEOUT):
            await client.ws.close(code, "bye")
        got = client.ws.close_code
        expect(got == code, f"the broker to echo close code {code}", got)

    CASES.append((f"close: broker echoes the client's close code {code}", run))


close_echo_case(1000)
close_echo_case(4000)
close_echo_case(3999)


# ---------------------------------------------------------------- runner


async def run_case(name: str, func: Callable[[], Awaitable[None]]) -> None:
    before = len(RESULTS)
    try:
        async with asyncio.timeout(CASE_TIMEOUT):
            await func()
    except Fail as exc:
        record(name, str(exc))
    except TimeoutError:
        record(name, f"expected a reply within {TIMEOUT} s, got a timeout")
    except ConnectionClosed as exc:
        record(name, f"expected an open connection, got closed ({exc})")
    except Exception as exc:  # report anything else as a failure
        record(name, f"expected no error, got {type(exc).__name__}: {exc}")
    else:
        if len(RESULTS) == before:  # cases that record sub-results print those instead
            record(name, None)
    finally:
        while OPEN_CLIENTS:
            await OPEN_CLIENTS.pop().close()


async def main() -> int:
    for name, func in CASES:
        await run_case(name, func)
    failed = [name for name, failure in RESULTS if failure is not None]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: check.py ws://HOST:PORT/")
    URL = sys.argv[1]
    sys.exit(asyncio.run(main()))
