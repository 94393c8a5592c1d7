#!/usr/bin/env python3
"""A long fuzz run: the properties of tests/test_fuzz.py with many more examples, and a live
attack on a real broker. Not run in CI.

    .venv/bin/python bench/fuzz.py                 # 5 minutes
    .venv/bin/python bench/fuzz.py --minutes 10 --seed 7
    .venv/bin/python bench/fuzz.py --only live --minutes 1 --attackers 16

It needs the test dependencies (Hypothesis, pytest: both halves use tests/test_fuzz.py), which
``make run`` does not install: run ``make test`` once, or ``.venv/bin/pip install -e '.[test]'``.
Without them it says so in one line and exits with status 2.

For ``--minutes`` overall, two things run side by side (one per core):

- **properties** (a child process): every Hypothesis property of tests/test_fuzz.py (the
  handshake parser, the WebSocket frame layer, the frame decoder), round after round with
  ``--examples`` examples a round and a new seed each round. A failing property prints
  Hypothesis's falsifying example and is not run again.
- **live** (this process): a broker started in-process (``Broker(config).serve`` in a Trio
  nursery, on 127.0.0.1 and a free port), a well-behaved publisher publishing one message a
  second to a topic of its own and a well-behaved subscriber receiving them, and
  ``--attackers`` tasks that open real loopback TCP connections, one after the other, and
  - send random or mutated upgrade requests, whole or in pieces (``handshakes``);
  - complete a real handshake, then send random frames: commands valid and not, in msgpack
    and JSON, garbage, and WebSocket protocol violations, fragmented at random, in random
    pieces, reading the answers or not (``frames``);
  - reset the connection (TCP RST) at a random moment of either (``resets``);
  - send half a request and wait for the handshake timeout (``slow``).

A failure is: an exception escaping the broker's ``serve`` task, a log record at ERROR or
above from a ``broker`` logger, an internal error counted in the broker's stats, a message the
good subscriber missed (not received within 10 s of its ``ok``), the good connections
closing, a valid upgrade request not answered 101, a slow handshake not dropped in time, or a
failing property. The last line printed is the summary; the exit status is 1 if there was
any failure, else 0.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import importlib
import json
import logging
import math
import os
import random
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.test_fuzz

from broker.config import Config, LimitsConfig, ServerConfig  # noqa: E402
from broker.core.outbound import Policy  # noqa: E402
from broker.core.rules import HistoryLimits, TopicRule  # noqa: E402
from broker.io.server import Broker  # noqa: E402

#: Which layer each property of tests/test_fuzz.py exercises (for the counts printed); a
#: property not listed here still runs, counted as "other".
LAYERS = {
    "handshakes": (
        "test_arbitrary_bytes_end_in_an_upgrade_a_4xx_or_more_needed_however_split",
        "test_mutated_upgrade_requests_end_in_an_upgrade_or_a_4xx_however_split",
        "test_a_valid_request_is_accepted_whole_and_in_pieces_with_its_fields",
        "test_a_wsproto_clients_request_is_accepted_and_the_101_completes_its_handshake",
        "test_a_head_over_the_limit_is_refused_with_431_however_split",
        "test_an_error_response_is_one_whole_http_response_with_its_status_headers_and_body",
    ),
    "frame streams": (
        "test_crafted_frame_streams_end_as_rfc_6455_says_however_split",
        "test_arbitrary_bytes_after_the_handshake_end_in_a_close_or_message_too_big",
        "test_frame_streams_with_random_byte_edits_end_in_a_close_or_message_too_big",
        "test_a_message_over_max_message_size_raises_and_those_before_it_are_returned",
    ),
    "decoder values": (
        "test_any_msgpack_value_published_is_refused_or_delivered_to_both_encodings",
        "test_any_json_value_published_is_refused_or_delivered_to_both_encodings",
        "test_arbitrary_bytes_as_a_msgpack_message_decode_without_raising",
        "test_arbitrary_text_as_a_json_message_decodes_without_raising",
        "test_a_msgpack_batch_of_n_valid_frames_decodes_to_n_commands_in_order",
        "test_a_json_batch_of_n_valid_frames_decodes_to_n_commands_in_order",
        "test_frames_with_odd_ops_ids_topics_and_since_decode_to_well_typed_commands_or_errors",
        "test_a_msgpack_batch_with_random_byte_edits_decodes_without_raising",
    ),
}
PROPERTIES_MARK = "FUZZ-PROPERTIES "  # the child's result line: this, then JSON
HANDSHAKE_TIMEOUT = 2.0  # the live broker's, so that slow attackers are dropped quickly
MISSED_AFTER = 10.0  # seconds after its ok a good message counts as missed
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


# --- properties ------------------------------------------------------------------------------


def run_properties(minutes: float, seed: int, examples: int) -> dict[str, Any]:
    """Run every Hypothesis property of tests/test_fuzz.py, ``examples`` at a time with a new
    seed each round, for ``minutes``; the examples run per layer and the failures."""
    os.environ["FUZZ_EXAMPLES"] = str(examples)  # read when tests.test_fuzz is imported
    import hypothesis

    import tests.test_fuzz as properties

    counts: Counter[str] = Counter()
    failures: list[str] = []
    tests: list[tuple[str, Callable[[], None]]] = []
    for name in sorted(vars(properties)):
        test = getattr(properties, name)
        if not name.startswith("test_") or not hasattr(test, "hypothesis"):
            continue
        layer = next((key for key, names in LAYERS.items() if name in names), "other")
        inner = test.hypothesis.inner_test

        @functools.wraps(inner)  # Hypothesis reports a falsifying example under its name
        def counting(*args: Any, _inner: Any = inner, _layer: str = layer, **kwargs: Any) -> Any:
            counts[_layer] += 1
            return _inner(*args, **kwargs)

        test.hypothesis.inner_test = counting
        tests.append((name, test))
    deadline = time.monotonic() + minutes * 60
    rounds = 0
    while tests and time.monotonic() < deadline:
        for name, test in list(tests):
            if time.monotonic() >= deadline:
                break
            try:
                hypothesis.seed(seed * 1_000_003 + rounds)(test)()
            except Exception as exc:
                notes = "\n".join(getattr(exc, "__notes__", []))
                print(f"PROPERTY FAILED: {name}: {exc!r}\n{notes}", file=sys.stderr, flush=True)
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
                tests.remove((name, test))
        rounds += 1
    return {"counts": dict(counts), "failures": failures, "rounds": rounds}


# --- random inputs for the live attack -------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SUBPROTOCOL_OFFERS: tuple[list[str], ...] = (
    [],
    ["pubsub.v1.msgpack"],
    ["pubsub.v1.json"],
    ["chat", "pubsub.v1.json"],
    ["pubsub.v1.msgpack", "pubsub.v1.json"],
)


def random_case(rng: random.Random, word: str) -> str:
    """``word`` in random case."""
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)


def valid_request(rng: random.Random, subprotocols: list[str]) -> bytes:
    """An upgrade request the broker must accept, in random header order and case."""
    headers = [
        (random_case(rng, "Host"), "127.0.0.1"),
        (random_case(rng, "Upgrade"), rng.choice(["websocket", "WebSocket"])),
        (random_case(rng, "Connection"), rng.choice(["Upgrade", "keep-alive, Upgrade"])),
        (random_case(rng, "Sec-WebSocket-Key"), base64.b64encode(rng.randbytes(16)).decode()),
        (random_case(rng, "Sec-WebSocket-Version"), "13"),
        *[("X-" + str(n), "v" * rng.randint(0, 20)) for n in range(rng.randint(0, 5))],
    ]
    if subprotocols:
        headers.append((random_case(rng, "Sec-WebSocket-Protocol"), ", ".join(subprotocols)))
    rng.shuffle(headers)
    target = "/" + rng.choice(["", "?token=x", "a/b?c=%ff&token=", "?" + "q" * 100])
    lines = [f"GET {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def mutated_request(rng: random.Random) -> bytes:
    """A valid request with one to three random mutations (see tests/test_fuzz.py)."""
    data = valid_request(rng, rng.choice(SUBPROTOCOL_OFFERS))
    head, _, _ = data.partition(b"\r\n\r\n")
    line, *headers = head.split(b"\r\n")
    tail = b""
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(12)
        if kind == 0:
            method = rng.choice([b"GET", b"POST", b"get", b"PRI", b"HEAD", rng.randbytes(3)])
            version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"", b"x"])
            line = b" ".join([method, b"/" + rng.randbytes(rng.randint(0, 10)), version])
        elif kind == 1:
            headers += [b"X-%d: y" % n for n in range(rng.choice([10, 1000, 3000, 6000]))]
        elif kind == 2:
            headers.append(b"X-Big: " + b"x" * rng.choice([100, 16000, 17000, 65536]))
        elif kind == 3:
            headers.append(b"X-Bytes: " + rng.randbytes(rng.randint(1, 20)))
        elif kind == 4:
            headers.append(rng.randbytes(rng.randint(1, 10)) + b": v")
        elif kind == 5:
            host = rng.choice([b"\xff", b"xn--a", b"\xff\xfe", b"", b"[::1"])
            headers = [h for h in headers if not h.lower().startswith(b"host")]
            headers.append(b"Host: " + host)
        elif kind == 6:
            key = rng.choice(
                [b"short", b"", rng.randbytes(24), base64.b64encode(rng.randbytes(15))]
            )
            headers = [h for h in headers if not h.lower().startswith(b"sec-websocket-key")]
            headers.append(b"Sec-WebSocket-Key: " + key)
        elif kind == 7:
            version_value = rng.choice([b"8", b"13, 8", b"\xff", b"", b"14"])
            headers = [h for h in headers if not h.lower().startswith(b"sec-websocket-vers")]
            headers.append(b"Sec-WebSocket-Version: " + version_value)
        elif kind == 8:
            protocols = rng.choice([b"a b", b"caf\xc3\xa9", b"(x)", b"\xff", b"unknown"])
            headers.append(b"Sec-WebSocket-Protocol: " + protocols)
        elif kind == 9 and headers:
            headers.pop(rng.randrange(len(headers)))
        elif kind == 10:
            headers.append(
                rng.choice([b"Content-Length: 5", b"Transfer-Encoding: chunked", b"Origin: \xff"])
            )
        else:
            tail += rng.randbytes(rng.randint(0, 40))
    edited = bytearray(b"\r\n".join([line, *headers, b"", b""]) + tail)
    if rng.random() < 0.2 and edited:
        for _ in range(rng.randint(1, 4)):
            edited[rng.randrange(len(edited))] = rng.randrange(256)
    return bytes(edited)


def random_text(rng: random.Random, size: int) -> str:
    """Random text, some of it outside ASCII (no surrogates)."""
    alphabet = "ab.*>é€😀 \t\u200b\x00\\\"'"
    return "".join(rng.choice(alphabet) for _ in range(size))


def random_scalar(rng: random.Random, binary: bool) -> Any:
    """A random leaf value; ``binary``: msgpack-only kinds too."""
    kinds: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.choice([0, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)]),
        lambda: rng.choice([0.5, -0.0, 1e308, math.inf, -math.inf, math.nan, rng.random()]),
        lambda: random_text(rng, rng.randint(0, 12)),
    ]
    if binary:
        kinds += [
            lambda: rng.randbytes(rng.randint(0, 12)),
            lambda: msgpack.ExtType(rng.randint(0, 127), rng.randbytes(rng.randint(0, 8))),
            lambda: msgpack.Timestamp(rng.randint(-(2**40), 2**40), rng.randint(0, 999_999_999)),
        ]
    return rng.choice(kinds)()


def random_value(rng: random.Random, binary: bool, depth: int = 0) -> Any:
    """A random value, now and then nested around the broker's depth limit (64)."""
    if depth == 0 and rng.random() < 0.05:
        value = random_scalar(rng, binary)
        for _ in range(rng.randint(60, 70)):
            value = [value] if rng.random() < 0.5 else {"k": value}
        return value
    if depth > 3 or rng.random() < 0.4:
        return random_scalar(rng, binary)
    if rng.random() < 0.5:
        return [random_value(rng, binary, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [random_scalar(rng, binary) for _ in range(rng.randint(0, 4))]  # all hashable
    if not binary:
        keys = [str(key) for key in keys]
    return {key: random_value(rng, binary, depth + 1) for key in keys}


def attacker_topic(rng: random.Random, pattern: bool) -> str:
    """A topic (or pattern) in the attackers' own space ``x.``: never the good topic."""
    space = rng.choice(["x.b", "x.h", "x.d", "x.c"])
    leaf = rng.choice(["1", "2", "é", "long" * rng.randint(1, 60)])
    if pattern and rng.random() < 0.5:
        return space + rng.choice([".*", ".>"])
    if rng.random() < 0.05:  # invalid ones
        return rng.choice(["", "x..a", "x. a", "x.*a", ">.x", "x.\u200b", "x." + "t" * 300])
    return f"{space}.{leaf}"


def random_command(rng: random.Random, binary: bool) -> Any:
    """A sub, unsub or pub frame (mostly valid), or something that is not a frame at all."""
    roll = rng.random()
    frame_id: Any = rng.choice([None, rng.randint(0, 2**64 - 1), -1, "7", 1.0, True])
    if roll < 0.45:
        frame: dict[str, Any] = {"op": "pub", "topic": attacker_topic(rng, False)}
        frame["data"] = random_value(rng, binary)
    elif roll < 0.7:
        frame = {"op": "sub", "topic": attacker_topic(rng, True)}
        if rng.random() < 0.3:
            frame["since"] = rng.choice(
                [{"epoch": random_text(rng, 4), "offset": rng.randint(0, 30)}, 5, {"epoch": 1}]
            )
    elif roll < 0.85:
        frame = {"op": "unsub", "topic": attacker_topic(rng, True)}
    elif roll < 0.95:
        frame = {"op": rng.choice(["msg", "ok", "", "PUB"]), "topic": "x.b.1"}
    else:
        return rng.choice([[], 7, "pub", None, {"op": None}])
    if frame_id is not None or rng.random() < 0.5:
        frame["id"] = frame_id
    return frame


def app_message(rng: random.Random, binary: bool) -> tuple[int, bytes]:
    """One WebSocket message's opcode and payload: a batch of commands in the connection's
    encoding, garbage, or the wrong kind of message."""
    roll = rng.random()
    if roll < 0.08:
        return 2, rng.randbytes(rng.randint(0, 100))  # garbage (binary)
    if roll < 0.12:
        return 1, random_text(rng, rng.randint(0, 60)).encode()  # garbage (text)
    commands = [random_command(rng, binary) for _ in range(rng.randint(1, 6))]
    if binary:
        try:
            payload = b"".join(msgpack.packb(command) for command in commands)
        except (ValueError, TypeError, OverflowError):
            payload = msgpack.packb({"op": "pub", "topic": "x.b.1", "data": 1})
        return (1 if roll < 0.15 else 2), payload
    lines = [json.dumps(command) for command in commands]
    if rng.random() < 0.1:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(["{", "NaN", '"\\ud800"', "1e999"]))
    return (2 if roll < 0.15 else 1), "\n".join(lines).encode()


def random_frames(rng: random.Random, binary: bool) -> bytes:
    """The bytes of a random frame stream: messages (fragmented at random), pings and pongs,
    and now and then a protocol violation or a close frame (as tests/test_fuzz.py crafts)."""
    from tests.test_fuzz import CLOSE, CONTINUATION, PING, PONG, WireFrame

    frames: list[WireFrame] = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        mask = rng.randbytes(4)
        if roll < 0.7:
            opcode, payload = app_message(rng, binary)
            cuts = sorted(rng.randint(0, len(payload)) for _ in range(rng.randint(0, 2)))
            pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
            for index, piece in enumerate(pieces):
                last = index == len(pieces) - 1
                frames.append(
                    WireFrame(opcode if index == 0 else CONTINUATION, piece, fin=last, mask=mask)
                )
        elif roll < 0.85:
            frames.append(WireFrame(rng.choice([PING, PONG]), rng.randbytes(rng.randint(0, 125)),
                                    mask=mask))  # fmt: skip
        elif roll < 0.95:
            frames.append(
                rng.choice(
                    [
                        WireFrame(2, b"unmasked", masked=False),
                        WireFrame(rng.choice([3, 7, 0xB, 0xF]), b"x", mask=mask),
                        WireFrame(2, b"x", rsv=rng.randint(1, 7), mask=mask),
                        WireFrame(PING, b"x", fin=False, mask=mask),
                        WireFrame(PING, b"p" * 126, mask=mask),
                        WireFrame(CONTINUATION, b"x", mask=mask),
                        WireFrame(1, b"\xff\xfe", mask=mask),
                        WireFrame(1, b"ab\xe2", fin=False, mask=mask),
                        WireFrame(2, b"x", length_form="64", mask=mask),
                        WireFrame(2, b"x", length_form="64", declared=2**63 + 5, mask=mask),
                        WireFrame(2, b"abc", length_form="64", declared=2**40, mask=mask),
                        WireFrame(2, b"big" * 400_000, mask=mask),  # over max_message_size
                    ]
                )
            )
        else:
            body = rng.choice(
                [b"", b"\x03", struct.pack("!H", 1000) + b"bye", struct.pack("!H", 999),
                 struct.pack("!H", 1005), struct.pack("!H", 4000) + b"\xff", rng.randbytes(5)]
            )  # fmt: skip
            frames.append(WireFrame(CLOSE, body, mask=mask))
    return b"".join(frame.encode() for frame in frames)


# --- the live attack ---------------------------------------------------------------------------


class Live:
    """The live attack's state: its counts and failures."""

    def __init__(self, seed: int, attackers: int, verbose: bool) -> None:
        self.seed = seed
        self.attackers = attackers
        self.verbose = verbose
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()  # handshake answers, by status line
        self.closes: Counter[str] = Counter()  # how frame attacks ended
        self.failures: list[str] = []
        self.port = 0
        self.published = 0
        self.received: dict[int, float] = {}  # good message number: when it arrived
        self.acked: dict[int, float] = {}  # good message number: when its ok arrived
        self.sent: dict[int, float] = {}  # good message number: when it was sent
        self.max_latency = 0.0

    def fail(self, what: str) -> None:
        """Record a failure (printed at once)."""
        self.failures.append(what)
        print(f"FAILURE: {what}", file=sys.stderr, flush=True)

    # the broker's log

    def watch_logs(self) -> logging.Handler:
        """Count the broker's WARNING records and fail on ERROR ones."""
        live = self

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                live.counts[f"log {record.levelname.lower()}"] += 1
                if record.levelno >= logging.ERROR:
                    text = record.getMessage()
                    if record.exc_info:
                        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
                    live.fail(f"ERROR log from {record.name}: {text}")
                elif live.verbose:
                    print(f"log: {record.levelname} {record.name}: {record.getMessage()}")

        handler = Watch(logging.WARNING)
        logger = logging.getLogger("broker")
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        return handler

    # the well-behaved pair

    async def good_subscriber(
        self, url: str, topic: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe (JSON) and record every message's arrival."""
        from trio_websocket import ConnectionClosed, open_websocket_url

        try:
            async with open_websocket_url(url, subprotocols=["pubsub.v1.json"]) as ws:
                await ws.send_message(json.dumps({"op": "sub", "id": 1, "topic": topic}))
                with trio.fail_after(10):
                    assert json.loads(await ws.get_message()) == {"op": "ok", "id": 1}
                task_status.started()
                while True:
                    message = await ws.get_message()
                    for line in str(message).split("\n"):
                        frame = json.loads(line)
                        if frame.get("op") != "msg" or frame.get("topic") != topic:
                            self.fail(f"good subscriber got an unexpected frame: {line[:200]}")
                            continue
                        number = frame["data"]
                        if number in self.received:
                            self.fail(f"good subscriber got message {number} twice")
                        self.received[number] = trio.current_time()
        except ConnectionClosed as exc:
            self.fail(f"the good subscriber's connection closed: {exc.reason}")

    async def good_publisher(self, url: str, topic: str) -> None:
        """Publish ``n`` (msgpack, with id ``n``) every second and check it arrives."""
        from trio_websocket import ConnectionClosed, open_websocket_url

        try:
            async with open_websocket_url(url, subprotocols=["pubsub.v1.msgpack"]) as ws:
                number = 0
                while True:
                    sent = trio.current_time()
                    frame = {"op": "pub", "id": number, "topic": topic, "data": number}
                    self.sent[number] = sent
                    await ws.send_message(msgpack.packb(frame))
                    self.published = number + 1
                    with trio.move_on_after(MISSED_AFTER) as waited:
                        reply = msgpack.unpackb(await ws.get_message(), raw=False)
                    if waited.cancelled_caught or reply != {"op": "ok", "id": number}:
                        self.fail(f"the good publisher's pub {number} got no ok (got {reply!r})")
                    self.acked[number] = trio.current_time()
                    self.check_arrivals(trio.current_time())
                    number += 1
                    await trio.sleep(max(0.0, sent + 1.0 - trio.current_time()))
        except ConnectionClosed as exc:
            self.fail(f"the good publisher's connection closed: {exc.reason}")

    def check_arrivals(self, now: float, final: bool = False) -> None:
        """Fail for each acknowledged good message not received within MISSED_AFTER."""
        for number, acked in list(self.acked.items()):
            arrived = self.received.get(number)
            if arrived is not None:
                self.max_latency = max(self.max_latency, arrived - self.sent[number])
                del self.acked[number]
            elif final or now - acked > MISSED_AFTER:
                self.fail(f"the good subscriber missed message {number}")
                del self.acked[number]

    # attackers

    async def connect(self) -> trio.SocketStream:
        """A new TCP connection to the broker."""
        self.counts["connections"] += 1
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def reset(self, stream: trio.SocketStream) -> None:
        """Close ``stream`` with a TCP RST (SO_LINGER 0)."""
        self.counts["resets"] += 1
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    async def send_in_pieces(
        self, rng: random.Random, stream: trio.SocketStream, data: bytes
    ) -> None:
        """``data`` in one to four pieces, with short pauses between them."""
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 3)))
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            if b > a:
                await stream.send_all(data[a:b])
                if rng.random() < 0.3:
                    await trio.sleep(rng.random() * 0.02)

    async def read_answer(self, stream: trio.SocketStream, patience: float) -> bytes:
        """What the broker sends until it closes, ``patience`` seconds pass, 64 KiB came, or a
        whole ``101`` head came (the WebSocket then stays open)."""
        data = b""
        with trio.move_on_after(patience), contextlib.suppress(*PEER_GONE):
            while len(data) < 65536 and (chunk := await stream.receive_some(65536)):
                data += chunk
                if data.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in data:
                    break
        return data

    async def handshake_attack(self, rng: random.Random) -> None:
        """Send a random or mutated upgrade request; check the answer is HTTP."""
        self.counts["handshakes"] += 1
        valid = rng.random() < 0.25
        data = valid_request(rng, rng.choice(SUBPROTOCOL_OFFERS)) if valid else mutated_request(rng)
        if rng.random() < 0.1:
            data = rng.randbytes(rng.randint(1, 300))
            valid = False
        stream = await self.connect()
        try:
            await self.send_in_pieces(rng, stream, data)
            if rng.random() < 0.15:
                await self.reset(stream)
                return
            answer = await self.read_answer(stream, HANDSHAKE_TIMEOUT + 3)
        except PEER_GONE:
            self.statuses["(gone while sending)"] += 1
            return
        finally:
            await stream.aclose()
        status = answer.split(b"\r\n", 1)[0][:40].decode("latin-1")
        self.statuses[status or "(closed, no answer)"] += 1
        if answer and not answer.startswith(b"HTTP/1.1 "):
            self.fail(f"handshake answered with non-HTTP bytes {answer[:80]!r} to {data[:200]!r}")
        if valid and not answer.startswith(b"HTTP/1.1 101 "):
            self.fail(f"a valid upgrade request was answered {status!r}: {data[:300]!r}")

    async def open_websocket(
        self, rng: random.Random
    ) -> tuple[trio.SocketStream, bool, bytes] | None:
        """A connection after a real handshake (random subprotocol): the stream, whether its
        encoding is msgpack, and what came after the 101."""
        offer = rng.choice(SUBPROTOCOL_OFFERS)
        stream = await self.connect()
        try:
            await stream.send_all(valid_request(rng, offer))
            answer = b""
            with trio.fail_after(HANDSHAKE_TIMEOUT + 3):
                while b"\r\n\r\n" not in answer:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    answer += chunk
        except (*PEER_GONE, trio.TooSlowError) as exc:
            await stream.aclose()
            self.fail(f"a valid handshake got no answer: {exc!r}")
            return None
        head, _, rest = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            await stream.aclose()
            self.fail(f"a valid handshake was answered {head[:60]!r}")
            return None
        binary = b"pubsub.v1.json" not in head
        return stream, binary, rest

    async def frames_attack(self, rng: random.Random) -> None:
        """After a real handshake, random frames in random pieces; read the answers (or
        not), then close, close abruptly, or reset."""
        self.counts["frame streams"] += 1
        opened = await self.open_websocket(rng)
        if opened is None:
            return
        stream, binary, _ = opened
        reading = rng.random() < 0.8
        answered = bytearray()
        ended = trio.Event()  # the broker closed the connection

        async def read() -> None:
            try:
                while chunk := await stream.receive_some(65536):
                    if len(answered) < 1 << 20:
                        answered.extend(chunk)
                answered.extend(b"<EOF>")
            except trio.ClosedResourceError:
                pass  # closed on this side
            except (trio.BrokenResourceError, OSError):
                answered.extend(b"<RST>")
            ended.set()

        try:
            async with trio.open_nursery() as nursery:
                if reading:
                    nursery.start_soon(read)
                with contextlib.suppress(*PEER_GONE):
                    for _ in range(rng.randint(1, 4)):
                        await self.send_in_pieces(rng, stream, random_frames(rng, binary))
                if reading:
                    with trio.move_on_after(rng.choice([0.0, 0.05, 0.5, 2.0])):
                        await ended.wait()
                ending = rng.choice(["reset", "close", "close frame"])
                if ending == "reset":
                    await self.reset(stream)
                elif ending == "close frame":
                    from tests.test_fuzz import CLOSE, WireFrame

                    with contextlib.suppress(*PEER_GONE):
                        await stream.send_all(WireFrame(CLOSE, b"\x03\xe8").encode())
                    if reading:
                        with trio.move_on_after(1):
                            await ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            await stream.aclose()
        self.closes[close_code(bytes(answered)) if reading else "(not read)"] += 1

    async def slow_attack(self, rng: random.Random) -> None:
        """Half a request, then nothing: the broker must drop it within its timeout."""
        self.counts["slow"] += 1
        stream = await self.connect()
        data = valid_request(rng, [])
        try:
            await stream.send_all(data[: rng.randint(0, len(data) - 5)])
            started = trio.current_time()
            answer = await self.read_answer(stream, HANDSHAKE_TIMEOUT + 5)
            waited = trio.current_time() - started
        except PEER_GONE:
            return
        finally:
            await stream.aclose()
        if answer or waited > HANDSHAKE_TIMEOUT + 3:
            self.fail(f"a slow handshake was not dropped in time ({waited:.1f} s, {answer[:60]!r})")

    async def attacker(self, index: int, deadline: float) -> None:
        """Attack after attack until ``deadline``."""
        rng = random.Random(self.seed * 1000 + index)
        while trio.current_time() < deadline:
            roll = rng.random()
            try:
                with trio.move_on_after(15):
                    if roll < 0.45:
                        await self.handshake_attack(rng)
                    elif roll < 0.97:
                        await self.frames_attack(rng)
                    else:
                        await self.slow_attack(rng)
            except PEER_GONE as exc:
                self.counts["gone while connecting"] += 1
                if self.verbose:
                    print(f"attacker {index}: {exc!r}")
            except Exception as exc:  # a bug of this script's, reported as such
                self.fail(f"attacker {index} crashed (bench/fuzz.py's own bug?): {exc!r}")

    async def run(self, minutes: float) -> None:
        """Start the broker, the good pair and the attackers; stop after ``minutes``."""
        rules = (
            TopicRule("x.h.>", Policy.DROP_OLDEST, HistoryLimits(20)),
            TopicRule("x.d.>", Policy.DROP_NEWEST),
            TopicRule("x.c.>", Policy.CONFLATE),
        )
        config = Config(
            server=ServerConfig(host="127.0.0.1", port=0, handshake_timeout=HANDSHAKE_TIMEOUT),
            limits=LimitsConfig(),
            topics=rules,
        )
        handler = self.watch_logs()
        broker = Broker(config)
        topic = f"good.{random.Random(self.seed).randrange(1 << 32):x}"
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve)
                assert broker.port is not None
                self.port = broker.port
                async with trio.open_nursery() as clients:
                    await clients.start(self.good_subscriber, broker.url, topic)
                    publisher = trio.CancelScope()

                    async def publish() -> None:
                        with publisher:
                            await self.good_publisher(broker.url, topic)

                    clients.start_soon(publish)
                    deadline = trio.current_time() + minutes * 60
                    async with trio.open_nursery() as attackers:
                        for index in range(self.attackers):
                            attackers.start_soon(self.attacker, index, deadline)
                        await self.report_progress(deadline, broker)
                    publisher.cancel()
                    with trio.move_on_after(MISSED_AFTER):  # the last good messages
                        while set(self.acked) - set(self.received):  # noqa: ASYNC110
                            await trio.sleep(0.05)
                    clients.cancel_scope.cancel()
                self.check_arrivals(trio.current_time(), final=True)
                with trio.move_on_after(10):
                    while broker.connections:  # noqa: ASYNC110 - no event to wait on
                        await trio.sleep(0.1)
                if broker.connections:
                    self.fail(f"{len(broker.connections)} connections left 10 s after the end")
                broker.shutdown()
                with trio.fail_after(30):
                    await broker.wait_stopped()
        except Exception as exc:
            self.fail("an exception escaped the broker's nursery:\n" + "".join(
                traceback.format_exception(exc)))  # fmt: skip
        finally:
            logging.getLogger("broker").removeHandler(handler)
        if broker.stats.internal_errors:
            self.fail(f"the broker counted {broker.stats.internal_errors} internal errors")

    async def report_progress(self, deadline: float, broker: Broker) -> None:
        """A progress line a minute until ``deadline``."""
        while (left := deadline - trio.current_time()) > 0:
            await trio.sleep(min(60.0, left))
            print(
                f"live: {self.counts['connections']} connections, "
                f"{len(self.received)}/{self.published} good messages, "
                f"{len(broker.connections)} open, {len(self.failures)} failures",
                flush=True,
            )


def close_code(answer: bytes) -> str:
    """The code of the close frame in what the server sent, if any (server frames are
    unmasked), as text; else how the connection ended: "(eof, no close)" (the broker
    closed it), "(reset)" (an RST came: the broker closed with unread data) or "(open)"."""
    data, at = answer.removesuffix(b"<EOF>").removesuffix(b"<RST>"), 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = struct.unpack("!H", data[at : at + 2])[0], at + 2
        elif length == 127:
            length, at = struct.unpack("!Q", data[at : at + 8])[0], at + 8
        if opcode == 0x8:
            body = data[at : at + length]
            return str(struct.unpack("!H", body[:2])[0]) if len(body) >= 2 else "close, no code"
        at += length
    if answer.endswith(b"<EOF>"):
        return "(eof, no close)"
    return "(reset)" if answer.endswith(b"<RST>") else "(open)"


# --- main --------------------------------------------------------------------------------------


def missing_test_dependencies() -> list[str]:
    """The modules tests/test_fuzz.py needs that only the test extra installs, if absent."""
    missing = []
    for name in ("hypothesis", "pytest"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


def main() -> int:
    """Parse the options, run, print the summary; the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long overall (5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (a random one)")
    parser.add_argument(
        "--attackers", type=int, default=8, help="concurrent attacking connections (8)"
    )
    parser.add_argument(
        "--examples", type=int, default=300, help="Hypothesis examples per property per round (300)"
    )
    parser.add_argument(
        "--only", choices=["properties", "live"], help="run only one half (default: both)"
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--verbose", action="store_true", help="print every warning and more")
    args = parser.parse_args()
    if missing := missing_test_dependencies():
        print(
            f"bench/fuzz.py: needs the test dependencies ({', '.join(missing)} missing): run "
            "`make test` once, or `.venv/bin/pip install -e '.[test]'`",
            file=sys.stderr,
        )
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)

    if args.only == "properties" and args.json:  # the child of a full run
        result = run_properties(args.minutes, seed, args.examples)
        print(PROPERTIES_MARK + json.dumps(result), flush=True)
        return 0

    started = time.monotonic()
    child = None
    properties: dict[str, Any] = {"counts": {}, "failures": [], "rounds": 0}
    if args.only != "live":
        command = [sys.executable, str(Path(__file__).resolve()), "--only", "properties"]
        command += ["--json"]
        command += ["--minutes", str(args.minutes), "--seed", str(seed)]
        command += ["--examples", str(args.examples)]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    live = Live(seed, args.attackers, args.verbose)
    if args.only != "properties":
        trio.run(live.run, args.minutes)
    if child is not None:
        output, _ = child.communicate()
        lines = [line for line in output.splitlines() if line.startswith(PROPERTIES_MARK)]
        if child.returncode != 0 or not lines:
            properties["failures"] = [f"the properties process failed ({child.returncode})"]
        else:
            properties = json.loads(lines[-1].removeprefix(PROPERTIES_MARK))
    failures = live.failures + properties["failures"]

    if args.only != "properties":
        print("handshake answers:", dict(live.statuses.most_common()))
        print("frame attacks ended with:", dict(live.closes.most_common()))
        print("live counts:", dict(live.counts.most_common()))
    for failure in failures:
        print("FAILED:", failure.splitlines()[0][:300])
    counts = Counter(properties["counts"])
    live_counts = live.counts
    minutes = (time.monotonic() - started) / 60
    parts = [f"fuzz: {minutes:.1f} min, seed {seed}"]
    if args.only != "live":
        parts.append(
            f"properties: {counts['handshakes']} handshakes, {counts['frame streams']} frame "
            f"streams, {counts['decoder values']} decoder values"
            + (f", {counts['other']} other" if counts["other"] else "")
        )
    if args.only != "properties":
        parts.append(
            f"live: {live_counts['connections']} connections ({live_counts['handshakes']} "
            f"handshakes, {live_counts['frame streams']} frame streams, "
            f"{live_counts['resets']} resets, {live_counts['slow']} slow), "
            f"{len(live.received)}/{live.published} good messages received "
            f"(at most {live.max_latency * 1000:.0f} ms after the pub)"
        )
    parts.append(f"{len(failures)} failures")
    print("; ".join(parts), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
