#!/usr/bin/env python3
"""Soak test: N clients hammer a fresh broker for M seconds while a ledger checks every message.

    .venv/bin/python bench/soak.py                         # 1 000 clients for 600 s
    .venv/bin/python bench/soak.py --clients 100 --seconds 20

The script starts its own broker (``broker serve`` on a free port, pinned to core 0; the
driver pins itself to core 1 when there are two cores or more) with a config that lifts the
per-IP connection cap and the publish rate limits, and runs every client in this one Trio
process on thin WebSocket connections of its own (wsproto on a bare socket: no automatic
reconnect or resubscribe that would blur the ledger). All the while, the clients:

- subscribe and unsubscribe concrete topics ``soak.r<room>.<n>`` and the patterns
  ``soak.r<room>.*``, ``soak.r<room>.>``, ``soak.*.<n>``, ``*.r<room>.<n>`` and ``soak.>``;
- publish in bursts, with ``id`` (acknowledged) and without, one frame per WebSocket
  message or several per message;
- some abort their socket (TCP RST) at random moments, including right after a burst of
  publishes (acks in flight) or right after a ``sub``, and reconnect;
- some send bad frames (undecodable bytes, a frame that is not a map, an unknown op, a
  ``pub`` to a wildcard, a message of the wrong type), each followed by a good frame, and
  must get one ``err`` per bad frame and stay connected;
- speak msgpack or JSON (chosen per connection), and close and reconnect in an orderly way.

The ledger (see :class:`Ledger`) orders events with one counter in this single-threaded
process, so "before" and "after" between a publisher's send and a subscriber's receive are
exact. Every ``data`` is ``[publisher, topic, seq, padding]``, with ``seq`` counted per
(publisher connection, topic). Per subscription (one connection's subscription to one
pattern, from its ``ok`` to its ``unsub`` or the end of its connection) it finds:

- duplicated: the same (publisher, topic, seq) twice;
- reordered: a (publisher, topic) sequence going backwards;
- lost: a message that had to arrive and did not. A message has to reach a subscription
  when it was published after the subscriber read the ``sub``'s ``ok`` (the broker
  registers the subscription before it answers), it was acknowledged before the subscriber
  sent its ``unsub`` (the ``ok`` of a ``pub`` means it is queued for every matching
  subscriber), and the subscription ended in an orderly way: its ``unsub``'s ``ok`` was read
  (the broker answers in order, so by then everything queued before it was read). Every
  client unsubscribes everything before it closes, including at the end of the run;
  subscriptions whose connection was aborted or closed by the broker are checked for
  duplicates and order only. Publishes without ``id`` are checked for duplicates and order.

It also counts messages delivered where they should not be (wrong topic or pattern, or for
a pattern that was not held when they were published), ``lag`` frames (none under
``block``), replies it did not expect, and closes it did not ask for (4002 slow consumer
counted on its own). At the end it closes every client, waits for the broker's open file
descriptors to come back to the count it had before any client, reads its RSS, stops it
with SIGTERM, and reads its log for WARNING/ERROR lines and tracebacks. The exit status is 0
only if nothing was lost, duplicated or reordered, the descriptors came back, and none of
the other checks failed (each failure is named).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import trio
from processes import free_port, wait_listening
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BROKER = ROOT / ".venv" / "bin" / "broker"

ROOMS: Final = 50
PER_ROOM: Final = 20
TOPICS: Final = tuple(f"soak.r{room}.{n}" for room in range(ROOMS) for n in range(PER_ROOM))

# The defaults of some limits would refuse or throttle one driver on one address (per-IP
# connections, publish rate): lift them explicitly, whatever the defaults are today. The
# block timer is raised so that a driver busy for a moment is not taken for a dead
# subscriber (4002 closes are still counted and must be 0).
BROKER_CONF: Final = """\
[limits]
max_connections = 1000000
max_connections_per_ip = 1000000
publish_rate = 1e9
publish_burst = 1000000000
publish_bytes_rate = 1000000000000
publish_bytes_burst = 1000000000000
slow_timeout = 30
"""

MSGPACK_PROTOCOL: Final = "pubsub.v1.msgpack"
JSON_PROTOCOL: Final = "pubsub.v1.json"
NOP_PATTERN: Final = "soak.nop"  # never subscribed: its unsub is a good frame answered ok
END_TIMEOUT: Final = 60.0  # seconds for a client to settle, unsubscribe and close at the end
SAMPLES: Final = 8  # examples kept of each kind of failure, for the report

TRANSPORT_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)

tick = itertools.count(1).__next__
"""The ledger's clock: one counter in this single-threaded process, so every event has its own
place in one total order (no two equal timestamps, no clock resolution to worry about)."""


# --- topics and patterns ---------------------------------------------------------------------


def all_patterns() -> dict[str, frozenset[str]]:
    """Every pattern a client may subscribe, with the topics it matches (NATS semantics)."""
    by_room = {room: [f"soak.r{room}.{n}" for n in range(PER_ROOM)] for room in range(ROOMS)}
    by_n = {n: [f"soak.r{room}.{n}" for room in range(ROOMS)] for n in range(PER_ROOM)}
    patterns: dict[str, frozenset[str]] = {topic: frozenset([topic]) for topic in TOPICS}
    for topic in TOPICS:
        patterns["*" + topic[4:]] = frozenset([topic])  # *.r<room>.<n>
    for room, topics in by_room.items():
        patterns[f"soak.r{room}.*"] = frozenset(topics)
        patterns[f"soak.r{room}.>"] = frozenset(topics)
    for n, topics in by_n.items():
        patterns[f"soak.*.{n}"] = frozenset(topics)
    patterns["soak.>"] = frozenset(TOPICS)
    return patterns


PATTERNS: Final = all_patterns()


def random_pattern(rng: random.Random) -> str:
    """A pattern to subscribe: mostly concrete topics and narrow wildcards, a few ``soak.>``."""
    room, n = rng.randrange(ROOMS), rng.randrange(PER_ROOM)
    pick = rng.random()
    if pick < 0.40:
        return f"soak.r{room}.{n}"
    if pick < 0.45:
        return f"*.r{room}.{n}"
    if pick < 0.65:
        return f"soak.r{room}.*"
    if pick < 0.75:
        return f"soak.r{room}.>"
    if pick < 0.995:
        return f"soak.*.{n}"
    return "soak.>"


# --- the ledger ------------------------------------------------------------------------------

PENDING, ACTIVE, UNSUBBING, DONE, ABANDONED = range(5)  # a subscription's states


class Stream:
    """The messages of one (publisher connection, topic): per ``seq``, when it was sent (the
    tick before its bytes went out) and whether its ``ok`` was read."""

    __slots__ = ("acked", "publisher", "send_ticks", "topic")

    def __init__(self, publisher: int, topic: str) -> None:
        self.publisher = publisher
        self.topic = topic
        self.send_ticks = array("q", [0])  # index = seq; seq 0 is not used
        self.acked = bytearray(1)

    def add(self, sent: int) -> int:
        """Number a new message sent at tick ``sent``; return its seq."""
        self.send_ticks.append(sent)
        self.acked.append(0)
        return len(self.acked) - 1


class Received:
    """The seqs of one stream one subscription received: ``first``..``last`` minus ``gaps``
    (inclusive ranges), plus ``early`` ones that came after ``first``."""

    __slots__ = ("early", "first", "gaps", "last")

    def __init__(self, seq: int) -> None:
        self.first = self.last = seq
        self.gaps: list[tuple[int, int]] = []
        self.early: set[int] = set()

    def has(self, seq: int) -> bool:
        """Whether ``seq`` was received."""
        if seq in self.early:
            return True
        if not self.first <= seq <= self.last:
            return False
        return not any(low <= seq <= high for low, high in self.gaps)

    def add(self, seq: int) -> str | None:
        """Record ``seq``; ``"dup"`` or ``"reorder"`` if it is one, else ``None``."""
        last = self.last
        if seq == last + 1:
            self.last = seq
            return None
        if seq > last:
            self.gaps.append((last + 1, seq - 1))
            self.last = seq
            return None
        if seq < self.first:
            if seq in self.early:
                return "dup"
            self.early.add(seq)
            return "reorder"
        for index, (low, high) in enumerate(self.gaps):
            if low <= seq <= high:
                pieces = [(low, seq - 1), (seq + 1, high)]
                self.gaps[index : index + 1] = [(a, b) for a, b in pieces if a <= b]
                return "reorder"
        return "dup"


class Subscription:
    """One connection's subscription to one pattern, from its ``sub`` to its end."""

    __slots__ = ("conn", "end_tick", "expect", "ok_tick", "pattern", "received", "state")

    def __init__(self, conn: Conn, pattern: str) -> None:
        self.conn = conn
        self.pattern = pattern
        self.state = PENDING
        self.ok_tick = 0  # when its ok was read
        self.end_tick = 0  # when its unsub was sent
        self.received: dict[Stream, Received] = {}
        # per stream, the first and last seq that must arrive (acked in between: all must)
        self.expect: dict[Stream, list[int]] = {}


@dataclass
class Sample:
    """Examples of one kind of failure, for the report."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        """Count one; keep its description if there are few so far."""
        self.count += 1
        if len(self.examples) < SAMPLES:
            self.examples.append(text)


class Ledger:
    """Everything published and received, and the verdicts (see the module doc).

    The "must arrive" rule is applied when a publisher reads the ``ok`` of a ``pub``: every
    subscription that is active at that moment (``ok`` read, ``unsub`` not yet sent, its
    connection alive) and whose ``ok`` was read before the ``pub`` was sent now expects that
    message. When the subscription's ``unsub`` is answered, everything it expected must have
    been received. Both conditions are comparisons of ticks of one counter, so they are
    exact; a message the rule does not cover may arrive or not (it is still checked for
    duplicates and order).
    """

    def __init__(self) -> None:
        self.streams: dict[tuple[int, str], Stream] = {}
        self.active: dict[str, set[Subscription]] = {topic: set() for topic in TOPICS}
        self.published = self.with_id = self.acked = self.delivered = 0
        self.checked_subscriptions = self.abandoned_subscriptions = self.expected = 0
        self.late = 0  # arrived after the unsub's ok, but published before it (allowed)
        self.lags = 0
        self.bad_frames = self.bad_frame_errors = 0
        self.bad_unanswered = 0  # on connections aborted before the err came
        self.unconfirmed = 0  # pubs with id whose connection ended before the ok
        self.lost = Sample()
        self.duplicated = Sample()
        self.reordered = Sample()
        self.misrouted = Sample()
        self.unexpected = Sample()  # replies and frames that should not have come
        self.ends: Counter[str] = Counter()  # how connections ended
        self.encodings: Counter[str] = Counter()  # connections per subprotocol offered
        self.connections = self.aborts = self.connect_failures = 0
        self.subscriptions_made = self.unsubscriptions = 0

    # publishers

    def stream(self, conn: Conn, topic: str) -> Stream:
        """The stream of ``conn``'s messages on ``topic``."""
        stream = conn.streams.get(topic)
        if stream is None:
            stream = conn.streams[topic] = Stream(conn.serial, topic)
            self.streams[conn.serial, topic] = stream
        return stream

    def on_ack(self, stream: Stream, seq: int) -> None:
        """A publisher read the ``ok`` of ``seq``: every active subscription whose ``ok`` came
        before the message was sent must receive it."""
        stream.acked[seq] = 1
        self.acked += 1
        sent = stream.send_ticks[seq]
        for subscription in self.active[stream.topic]:
            if subscription.ok_tick < sent:
                span = subscription.expect.get(stream)
                if span is None:
                    subscription.expect[stream] = [seq, seq]
                else:
                    span[1] = seq  # the oks of one connection come in order

    # subscribers

    def on_sub_ok(self, subscription: Subscription) -> None:
        """The subscription's ``ok`` was read: from now on it is active."""
        subscription.ok_tick = tick()
        subscription.state = ACTIVE
        self.subscriptions_made += 1
        for topic in PATTERNS[subscription.pattern]:
            self.active[topic].add(subscription)

    def on_unsub_sent(self, subscription: Subscription) -> None:
        """The subscription's ``unsub`` is about to be sent: acks read after now add nothing."""
        self._deactivate(subscription)
        subscription.end_tick = tick()
        subscription.state = UNSUBBING

    def on_unsub_ok(self, subscription: Subscription) -> None:
        """The ``unsub``'s ``ok`` was read, so everything queued before it was read: check."""
        conn = subscription.conn
        subscription.state = DONE
        conn.by_pattern[subscription.pattern].remove(subscription)
        conn.unsub_ok_tick[subscription.pattern] = tick()
        conn.ended[subscription.pattern] = subscription  # for messages that come late
        self.unsubscriptions += 1
        self.checked_subscriptions += 1
        for stream, (low, high) in subscription.expect.items():
            got = subscription.received.get(stream)
            acked = stream.acked
            self.expected += sum(acked[low : high + 1])
            if got is not None and got.first <= low and got.last >= high and not got.gaps:
                continue
            for seq in range(low, high + 1):
                if acked[seq] and (got is None or not got.has(seq)):
                    self.lost.add(
                        f"publisher {stream.publisher} {stream.topic} seq {seq} (sent at tick "
                        f"{stream.send_ticks[seq]}) not received by connection {conn.serial} "
                        f"on {subscription.pattern!r} (ok at tick {subscription.ok_tick}, unsub "
                        f"at {subscription.end_tick})"
                    )
        subscription.expect = {}

    def on_conn_end(self, conn: Conn, how: str) -> None:
        """``conn`` ended without (or before) its subscriptions' unsubs: they are not checked
        for losses; its unanswered pubs are unconfirmed."""
        self.ends[how] += 1
        for subscriptions in conn.by_pattern.values():
            for subscription in subscriptions:
                if subscription.state in (ACTIVE, UNSUBBING):
                    self.abandoned_subscriptions += 1
                self._deactivate(subscription)
                subscription.state = ABANDONED
                subscription.expect = {}
        conn.by_pattern.clear()
        kinds = Counter(kind for kind, _ in conn.pending.values())
        self.unconfirmed += kinds["pub"]
        unanswered = kinds["bad"] + conn.no_id_errors
        if how == "aborted":
            self.bad_unanswered += unanswered
        elif unanswered:
            self.unexpected.add(f"connection {conn.serial}: {unanswered} bad frames unanswered")
        conn.pending.clear()
        conn.no_id_errors = 0

    def _deactivate(self, subscription: Subscription) -> None:
        if subscription.state == ACTIVE:
            for topic in PATTERNS[subscription.pattern]:
                self.active[topic].discard(subscription)

    def on_message(self, conn: Conn, pattern: Any, topic: Any, data: Any) -> None:
        """A ``msg`` frame arrived on ``conn``."""
        self.delivered += 1
        try:
            publisher, data_topic, seq = data[0], data[1], data[2]
            stream = self.streams[publisher, data_topic]
            sent = stream.send_ticks[seq]
        except (TypeError, KeyError, IndexError, ValueError):
            self.misrouted.add(f"connection {conn.serial}: unknown data {data!r} on {topic!r}")
            return
        matches = PATTERNS.get(pattern, ()) if isinstance(pattern, str) else ()
        if data_topic != topic or seq <= 0 or topic not in matches:
            self.misrouted.add(
                f"connection {conn.serial}: {data!r} came as topic {topic!r} for {pattern!r}"
            )
            return
        holder = conn.holder(pattern)
        if holder is None:  # a message for a pattern no longer held (or not yet)
            ended = conn.ended.get(pattern)
            if ended is None or sent > conn.unsub_ok_tick[pattern]:
                self.misrouted.add(
                    f"connection {conn.serial}: {data!r} (sent at tick {sent}) for "
                    f"{pattern!r}, which it did not hold then"
                )
                return
            self.late += 1
            holder = ended
        received = holder.received.get(stream)
        if received is None:
            holder.received[stream] = Received(seq)
            return
        if seq == received.last + 1:  # the usual case, inlined
            received.last = seq
            return
        verdict = received.add(seq)
        if verdict is not None:
            where = (
                f"publisher {publisher} {topic} seq {seq} on connection {conn.serial} "
                f"{pattern!r} (had {received.first}..{received.last})"
            )
            (self.duplicated if verdict == "dup" else self.reordered).add(where)


# --- one connection --------------------------------------------------------------------------


class Gone(Exception):
    """The connection ended while a client waited on it."""


class Conn:
    """One client connection: a bare socket, wsproto, what is pending and what it holds."""

    def __init__(
        self, serial: int, stream: trio.SocketStream, ws: WSConnection, binary: bool
    ) -> None:
        self.serial = serial  # also its publisher id
        self.stream = stream
        self.ws = ws
        self.binary = binary
        self.send_lock = trio.Lock()
        self.next_id = 1
        # id -> ("pub", (stream, seq)) | ("sub", sub) | ("unsub", sub) | ("bad", code) | ("nop", 0)
        self.pending: dict[int, tuple[str, Any]] = {}
        self.no_id_errors = 0  # bad frames sent without an id, whose err has not come yet
        self.by_pattern: dict[str, list[Subscription]] = {}
        self.unsub_ok_tick: dict[str, int] = {}
        self.ended: dict[str, Subscription] = {}
        self.streams: dict[str, Stream] = {}
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.partial: list[bytes | bytearray | str] = []
        self.scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.closing = False  # we sent our close frame
        self.aborting = False
        self.close_code: int | None = None  # the close frame the broker sent (or 1006)
        self.dead = False
        self.finished = trio.Event()  # set when the connection is over
        self._changed: trio.Event | None = None  # set when a reply comes or the connection ends

    # sending

    def new_id(self, kind: str, what: Any) -> int:
        """A fresh request id, pending as ``kind``."""
        request = self.next_id
        self.next_id += 1
        self.pending[request] = (kind, what)
        return request

    async def send(self, frames: list[dict[str, Any]]) -> None:
        """Send ``frames`` as one WebSocket message in this connection's encoding."""
        if self.binary:
            await self.send_event(BytesMessage(data=b"".join(map(msgpack.packb, frames))))
        else:
            text = "\n".join(json.dumps(frame, separators=(",", ":")) for frame in frames)
            await self.send_event(TextMessage(data=text))

    async def send_event(self, event: Event) -> None:
        """Send one wsproto event (whole, never interleaved with another)."""
        async with self.send_lock:
            if self.dead:
                raise Gone
            await self.stream.send_all(self.ws.send(event))

    async def send_quietly(self, event: Event) -> None:
        """Send a control frame from the reader's side; a failure is the reader's to see."""
        with contextlib.suppress(Gone, LocalProtocolError, *TRANSPORT_ERRORS):
            await self.send_event(event)

    # waiting for replies

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_pending(self, at_most: int = 0) -> None:
        """Wait until at most ``at_most`` requests await their reply (no bad frame either)."""
        while len(self.pending) > at_most or (not at_most and self.no_id_errors):
            if self.dead:
                raise Gone
            self._changed = trio.Event()
            await self._changed.wait()

    def mark_dead(self) -> None:
        """The connection is over: wake whoever waits on it."""
        self.dead = True
        self.finished.set()
        self._wake()
        self.scope.cancel()

    # receiving

    def holder(self, pattern: str) -> Subscription | None:
        """The subscription that a ``msg`` for ``pattern`` belongs to now, if any."""
        for subscription in self.by_pattern.get(pattern, ()):
            if subscription.state == ACTIVE or subscription.state == UNSUBBING:
                return subscription
        return None

    async def read_loop(self, ledger: Ledger) -> None:
        """Read until the connection closes, feeding the ledger."""
        ws = self.ws
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                self.close_code = 1006
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, (BytesMessage, TextMessage)):
                    self.partial.append(event.data)
                    if event.message_finished:
                        parts, self.partial = self.partial, []
                        if isinstance(parts[0], bytes):
                            self.on_binary(b"".join(parts), ledger)  # type: ignore[arg-type]
                        else:
                            self.on_text("".join(parts), ledger)  # type: ignore[arg-type]
                elif isinstance(event, Ping):
                    assert self.nursery is not None
                    self.nursery.start_soon(self.send_quietly, event.response())
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    if not self.closing:  # the broker began the closing handshake: answer
                        with trio.move_on_after(5):
                            await self.send_event(event.response())
                    return

    def on_binary(self, message: bytes, ledger: Ledger) -> None:
        """One binary WebSocket message: a batch of msgpack frames."""
        if not self.binary:
            ledger.unexpected.add(f"connection {self.serial}: binary message on JSON")
            return
        self.unpacker.feed(message)
        try:
            frames = list(self.unpacker)
        except ValueError as exc:  # msgpack's errors for malformed input
            ledger.unexpected.add(f"connection {self.serial}: undecodable message: {exc}")
            self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            return
        for frame in frames:
            self.on_frame(frame, ledger)

    def on_text(self, message: str, ledger: Ledger) -> None:
        """One text WebSocket message: JSON frames, one per line."""
        if self.binary:
            ledger.unexpected.add(f"connection {self.serial}: text message on msgpack")
            return
        for line in message.split("\n"):
            try:
                frame = json.loads(line)
            except ValueError as exc:  # every line the broker sends must be a frame
                ledger.unexpected.add(f"connection {self.serial}: bad JSON line {line!r}: {exc}")
                continue
            self.on_frame(frame, ledger)

    def on_frame(self, frame: Any, ledger: Ledger) -> None:
        """One frame from the broker."""
        op = frame.get("op") if isinstance(frame, dict) else None
        if op == "msg":
            ledger.on_message(self, frame.get("sub"), frame.get("topic"), frame.get("data"))
        elif op == "ok":
            self.on_reply(frame.get("id"), None, frame, ledger)
        elif op == "err":
            self.on_reply(frame.get("id"), frame.get("code"), frame, ledger)
        elif op == "lag":
            ledger.lags += 1
        else:
            ledger.unexpected.add(f"connection {self.serial}: unexpected frame {frame!r}")

    def on_reply(self, request: Any, code: Any, frame: Any, ledger: Ledger) -> None:
        """An ``ok`` (``code`` None) or an ``err``."""
        self._wake()
        if request is None:
            if code == "bad_request" and self.no_id_errors:
                self.no_id_errors -= 1
                ledger.bad_frame_errors += 1
            else:
                ledger.unexpected.add(f"connection {self.serial}: {frame!r}")
            return
        kind, what = self.pending.pop(request, ("?", None))
        if kind == "bad" and code == what:
            ledger.bad_frame_errors += 1
        elif code is not None or kind in ("bad", "?"):
            ledger.unexpected.add(f"connection {self.serial}: {frame!r} answering {kind}")
        elif kind == "pub":
            ledger.on_ack(*what)
        elif kind == "sub":
            ledger.on_sub_ok(what)
        elif kind == "unsub":
            ledger.on_unsub_ok(what)


async def open_conn(port: int, serial: int, subprotocols: list[str]) -> Conn:
    """Connect to the broker and complete the WebSocket handshake (raises OSError if refused)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(host=f"127.0.0.1:{port}", target="/", subprotocols=subprotocols)
        await stream.send_all(ws.send(request))
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise OSError("the broker closed the connection during the handshake")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    expected = subprotocols[0] if subprotocols else None
                    if event.subprotocol != expected:
                        raise OSError(f"subprotocol {event.subprotocol!r}, not {expected!r}")
                    binary = not subprotocols or subprotocols[0] == MSGPACK_PROTOCOL
                    return Conn(serial, stream, ws, binary)
                if isinstance(event, (RejectConnection, RejectData)):
                    status = getattr(event, "status_code", "?")
                    raise OSError(f"handshake refused with HTTP {status}")
    except BaseException:
        sock.close()
        raise


async def abort(conn: Conn) -> None:
    """Close the socket with a TCP RST (SO_LINGER 0), whatever is in flight."""
    conn.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await conn.stream.aclose()


def held_or_coming(conn: Conn, pattern: str) -> bool:
    """Whether ``conn`` holds ``pattern`` or has sent its ``sub`` (not just its ``unsub``)."""
    return any(s.state != UNSUBBING for s in conn.by_pattern.get(pattern, ()))


# --- the clients -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How busy the clients are (rates are per client; means of exponential intervals)."""

    port: int
    burst_every: float  # seconds between publish bursts
    burst_max: int = 8  # messages in a burst: 1..burst_max
    with_id: float = 0.7  # share of pubs with an id
    churn_every: tuple[float, float] = (5.0, 25.0)  # seconds between unsub/sub changes
    flaky_share: float = 0.2  # clients that abort their sockets
    abort_every: float = 30.0
    bad_share: float = 0.1  # clients that send bad frames
    bad_every: float = 5.0
    reconnect_every: float = 300.0  # orderly close and reconnect
    max_outstanding: int = 64  # requests awaiting a reply before a publisher waits


BAD_FRAMES: Final = ("undecodable", "not_a_map", "unknown_op", "wildcard_pub", "wrong_type")


class Client:
    """One simulated client: connects, acts at random, reconnects, until told to stop."""

    def __init__(
        self,
        index: int,
        plan: Plan,
        ledger: Ledger,
        rng: random.Random,
        stop: trio.Event,
        limiter: trio.CapacityLimiter,
        on_ready: Callable[[], None],
    ) -> None:
        self.index = index
        self.plan = plan
        self.ledger = ledger
        self.rng = rng
        self.stop = stop
        self.limiter = limiter
        self.on_ready: Callable[[], None] | None = on_ready
        self.flaky = rng.random() < plan.flaky_share
        self.bad = rng.random() < plan.bad_share
        self.failed: str | None = None

    async def run(self, serials: Iterable[int]) -> None:
        """Connect, act, reconnect, until the stop event; then close in an orderly way."""
        serial_iter = iter(serials)
        failures = 0
        while not self.stop.is_set():
            pick = self.rng.random()
            offer = [MSGPACK_PROTOCOL] if pick < 0.45 else [] if pick < 0.55 else [JSON_PROTOCOL]
            try:
                async with self.limiter:
                    conn = await open_conn(self.plan.port, next(serial_iter), offer)
            except OSError as exc:
                self.ledger.connect_failures += 1
                failures += 1
                if failures >= 20:
                    self.failed = f"client {self.index} cannot connect: {exc}"
                    return
                await trio.sleep(0.1 * failures)
                continue
            failures = 0
            self.ledger.connections += 1
            self.ledger.encodings[offer[0][10:] if offer else "none"] += 1
            await self.session(conn)
            if not self.stop.is_set():
                await trio.sleep(self.rng.uniform(0.0, 0.5))

    async def session(self, conn: Conn) -> None:
        """Run one connection: a reader and this client's actions, until it ends."""
        how = "broken"
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    conn.nursery = nursery
                    nursery.start_soon(self._guard, conn, conn.read_loop, self.ledger)
                    nursery.start_soon(self._guard, conn, self.act, conn)
        finally:
            if conn.aborting:
                how = "aborted"
                with trio.CancelScope(shield=True):
                    await abort(conn)
            else:
                if conn.closing and conn.close_code == 1000:
                    how = "closed"
                elif conn.close_code is not None:
                    how = f"closed by broker {conn.close_code}"
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(conn.stream)
            conn.mark_dead()
            self.ledger.on_conn_end(conn, how)

    async def _guard(self, conn: Conn, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``task``; when it ends (or the transport fails), end the whole connection."""
        try:
            await task(*args)
        except (Gone, LocalProtocolError, *TRANSPORT_ERRORS):
            pass  # the transport failed, or a send raced the broker's close frame
        finally:
            conn.mark_dead()

    # the actions

    async def act(self, conn: Conn) -> None:
        """What this client does on ``conn`` until it aborts, closes or is stopped."""
        rng, plan = self.rng, self.plan
        homes = rng.sample(TOPICS, 3)
        await self.subscribe(conn, rng.randint(1, 3))
        if self.on_ready is not None:
            await conn.wait_pending()
            self.on_ready()
            self.on_ready = None
        now = trio.current_time()
        next_burst = now + rng.expovariate(1 / plan.burst_every)
        next_churn = now + rng.uniform(*plan.churn_every)
        next_bad = now + rng.expovariate(1 / plan.bad_every) if self.bad else float("inf")
        abort_at = now + rng.expovariate(1 / plan.abort_every) if self.flaky else float("inf")
        close_at = now + rng.expovariate(1 / plan.reconnect_every)
        while True:
            with trio.move_on_at(min(next_burst, next_churn, next_bad, abort_at, close_at)):
                await self.stop.wait()
            if self.stop.is_set():
                await self.close(conn)
                return
            now = trio.current_time()
            if now >= abort_at:
                await self.abort_somehow(conn, homes)
                return
            if now >= close_at:
                await self.close(conn)
                return
            if now >= next_burst:
                await self.burst(conn, rng.choice(homes))
                next_burst = now + rng.expovariate(1 / plan.burst_every)
            if now >= next_churn:
                await self.churn(conn)
                next_churn = now + rng.uniform(*plan.churn_every)
            if now >= next_bad:
                await self.send_bad(conn)
                next_bad = now + rng.expovariate(1 / plan.bad_every)

    def new_pattern(self, conn: Conn) -> str:
        """A pattern ``conn`` neither holds nor is subscribing (it may be unsubscribing it)."""
        while True:
            pattern = random_pattern(self.rng)
            if not held_or_coming(conn, pattern):
                return pattern

    def sub_frames(self, conn: Conn, patterns: list[str]) -> list[dict[str, Any]]:
        """``sub`` frames for ``patterns``, recorded in the ledger as about to be sent.

        A second ``sub`` of a pattern the connection holds changes nothing at the broker (one
        subscription, one copy of each message), so the ledger must never send one.
        """
        frames = []
        for pattern in patterns:
            assert not held_or_coming(conn, pattern), pattern
            subscription = Subscription(conn, pattern)
            conn.by_pattern.setdefault(pattern, []).append(subscription)
            request = conn.new_id("sub", subscription)
            frames.append({"op": "sub", "id": request, "topic": pattern})
        return frames

    def unsub_frames(self, conn: Conn, subscriptions: list[Subscription]) -> list[dict[str, Any]]:
        """``unsub`` frames for active ``subscriptions``, recorded as about to be sent."""
        frames = []
        for subscription in subscriptions:
            self.ledger.on_unsub_sent(subscription)
            request = conn.new_id("unsub", subscription)
            frames.append({"op": "unsub", "id": request, "topic": subscription.pattern})
        return frames

    async def subscribe(self, conn: Conn, count: int = 1) -> None:
        """Subscribe ``count`` new patterns in one message (the reader reads their oks)."""
        frames: list[dict[str, Any]] = []
        for _ in range(count):  # one at a time: each is held once it is in the ledger
            frames += self.sub_frames(conn, [self.new_pattern(conn)])
        await conn.send(frames)

    def active(self, conn: Conn) -> list[Subscription]:
        """``conn``'s active subscriptions."""
        return [s for subs in conn.by_pattern.values() for s in subs if s.state == ACTIVE]

    async def churn(self, conn: Conn) -> None:
        """Drop a subscription and take another (sometimes the same pattern again at once);
        a connection holds 1 to 3."""
        rng = self.rng
        held = self.active(conn)
        count = len(held) + sum(
            1 for subs in conn.by_pattern.values() for s in subs if s.state == PENDING
        )
        if held and (count >= 3 or rng.random() < 0.5):
            gone = rng.choice(held)
            frames = self.unsub_frames(conn, [gone])
            if rng.random() < 0.15:  # unsub then sub the same pattern, in one message
                await conn.send(frames + self.sub_frames(conn, [gone.pattern]))
                return
            await conn.send(frames)
            count -= 1
        if count < 3 and (count == 0 or rng.random() < 0.7):
            await self.subscribe(conn)

    async def burst(self, conn: Conn, topic: str) -> None:
        """Publish 1..burst_max messages on ``topic``, some with ids, in one or many messages."""
        rng, plan = self.rng, self.plan
        await conn.wait_pending(plan.max_outstanding)
        stream = self.ledger.stream(conn, topic)
        together = rng.random() < 0.5
        frames: list[dict[str, Any]] = []
        for _ in range(rng.randint(1, plan.burst_max)):
            seq = stream.add(tick())  # ticked before its bytes go out
            size = rng.choice((0, 8, 64)) if rng.random() < 0.99 else rng.randint(4096, 16384)
            pad: bytes | str = rng.randbytes(size) if conn.binary else "x" * size
            frame: dict[str, Any] = {"op": "pub", "topic": topic, "data": [conn.serial, topic,
                                                                           seq, pad]}  # fmt: skip
            if rng.random() < plan.with_id:
                frame["id"] = conn.new_id("pub", (stream, seq))
                self.ledger.with_id += 1
            self.ledger.published += 1
            if together:
                frames.append(frame)
            else:
                await conn.send([frame])
        if frames:
            await conn.send(frames)

    async def send_bad(self, conn: Conn) -> None:
        """One bad frame in a message of its own, then a good one (a bad-frame run stays 1)."""
        kind = self.rng.choice(BAD_FRAMES)
        binary = conn.binary
        self.ledger.bad_frames += 1
        if kind == "unknown_op":
            await conn.send([{"op": "frobnicate", "id": conn.new_id("bad", "unknown_op")}])
        elif kind == "wildcard_pub":
            request = conn.new_id("bad", "invalid_topic")
            await conn.send([{"op": "pub", "id": request, "topic": "soak.*.1", "data": 0}])
        else:  # bad_request, without an id
            conn.no_id_errors += 1
            event: Event
            if kind == "undecodable":
                event = BytesMessage(data=b"\xc1") if binary else TextMessage(data="{nope")
            elif kind == "not_a_map":
                event = BytesMessage(data=msgpack.packb([1])) if binary else TextMessage("[1]")
            else:  # wrong_type
                event = TextMessage(data="{}") if binary else BytesMessage(data=b"\x80")
            await conn.send_event(event)
        await conn.send([{"op": "unsub", "id": conn.new_id("nop", 0), "topic": NOP_PATTERN}])

    async def abort_somehow(self, conn: Conn, homes: list[str]) -> None:
        """Abort the socket: at once, right after a burst (acks in flight), or right after a
        ``sub`` (its ok in flight)."""
        way = self.rng.random()
        if way < 0.3:
            await self.burst(conn, self.rng.choice(homes))
        elif way < 0.5:
            await self.subscribe(conn)
        self.ledger.aborts += 1
        conn.aborting = True
        conn.mark_dead()

    async def close(self, conn: Conn) -> None:
        """Orderly: wait for every reply, unsubscribe everything (so that every subscription
        is checked), then the closing handshake."""
        with trio.move_on_after(END_TIMEOUT) as timer:
            await conn.wait_pending()
            held = self.active(conn)
            if held:
                await conn.send(self.unsub_frames(conn, held))
                await conn.wait_pending()
            conn.closing = True
            await conn.send_event(CloseConnection(code=1000))
            await conn.finished.wait()  # the reader read the broker's close frame (or EOF)
        if timer.cancelled_caught:
            self.ledger.ends["stuck closing"] += 1
            conn.aborting = True
            conn.mark_dead()


# --- the broker process ----------------------------------------------------------------------


class BrokerProcess:
    """The broker under test, as a subprocess with its log in a file."""

    def __init__(self, workdir: Path, log_path: Path, pin: bool) -> None:
        self.port = free_port()
        config = workdir / "soak.toml"
        config.write_text(BROKER_CONF)
        self.log_path = log_path
        command = [str(BROKER), "serve"] if BROKER.exists() else [sys.executable, "-m", "broker"]
        if not BROKER.exists():
            command.append("serve")
        command += ["--config", str(config), "--port", str(self.port), "--log-level", "info"]
        if pin:
            command = ["taskset", "-c", "0", *command]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_listening(self) -> None:
        """Return once the broker accepts TCP connections (raise if it exits or is too slow)."""
        wait_listening(self.port, self.proc)

    def fds(self) -> int:
        """How many file descriptors the broker has open."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_fds(self, at_most: int, timeout: float) -> int:
        """Poll the fd count until it is at most ``at_most`` or ``timeout`` passes; return it."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.fds()
            if count <= at_most or time.monotonic() >= deadline:
                return count
            time.sleep(0.05)

    def stable_fds(self, timeout: float = 5.0) -> int:
        """The fd count once it has not changed for 0.5 s (after the listening probe)."""
        deadline = time.monotonic() + timeout
        last, since = self.fds(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.fds()
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since >= 0.5:
                break
        return last

    def status(self, key: str) -> int:
        """A ``kB`` figure of /proc/PID/status (``VmRSS``, ``VmHWM``), in KiB."""
        with open(f"/proc/{self.pid}/status") as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {key} in /proc/{self.pid}/status")

    def cpu_seconds(self) -> float:
        """User + system CPU time the broker used so far."""
        with open(f"/proc/{self.pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        """Whether the broker is still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for the exit status (``None`` if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                return None
        self._log.close()
        return self.proc.returncode


LEVEL = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (WARNING|ERROR|CRITICAL) ")


def read_log(path: Path) -> tuple[list[str], int]:
    """The broker log's WARNING/ERROR/CRITICAL lines, and how many lines say ``Traceback``."""
    warnings: list[str] = []
    tracebacks = 0
    with path.open("rb") as file:
        for line in file:
            if LEVEL.match(line):
                warnings.append(line.decode(errors="replace").rstrip())
            if b"Traceback" in line:
                tracebacks += 1
    return warnings, tracebacks


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Figures:
    """What the run measured, besides the ledger."""

    rss_start: int = 0  # KiB, after the clients connected and warmed up
    rss_steady_end: int = 0  # KiB, just before the clients close
    rss_end: int = 0  # KiB, after every client closed
    rss_peak: int = 0
    fds_baseline: int = 0
    fds_connected: int = 0
    fds_end: int = 0
    broker_cpu: float = 0.0
    driver_cpu: float = 0.0
    max_stall: float = 0.0  # the driver's worst scheduling delay, seconds
    stall_at: float = 0.0  # when it happened, seconds since the clients started connecting
    wall: float = 0.0
    failed: list[str] = field(default_factory=list)


async def drive(args: argparse.Namespace, broker: BrokerProcess, ledger: Ledger) -> Figures:
    """Run the clients for ``args.seconds`` and close them all; return the figures."""
    figures = Figures()
    master = random.Random(args.seed)
    plan = Plan(port=broker.port, burst_every=args.clients * 4.5 / args.rate)
    stop = trio.Event()
    ready = trio.Event()
    waiting = [args.clients]
    serials = itertools.count(1)

    def on_ready() -> None:
        waiting[0] -= 1
        if not waiting[0]:
            ready.set()

    async def watch(cancel: trio.CancelScope) -> None:
        """Track the driver's scheduling delay; stop everything if the broker dies."""
        while True:
            before = trio.current_time()
            await trio.sleep(0.1)
            stall = trio.current_time() - before - 0.1
            if stall > figures.max_stall:
                figures.max_stall, figures.stall_at = stall, time.monotonic() - started
            if not broker.alive():
                figures.failed.append(f"the broker died (exit {broker.proc.returncode})")
                cancel.cancel()
                return

    limiter = trio.CapacityLimiter(32)  # handshakes at once
    clients = [
        Client(i, plan, ledger, random.Random(master.random()), stop, limiter, on_ready)
        for i in range(args.clients)
    ]
    started = time.monotonic()
    warmup = min(10.0, args.seconds / 10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        async with trio.open_nursery() as crowd:
            for client in clients:
                crowd.start_soon(client.run, serials)
            with trio.move_on_after(120) as connecting:
                await ready.wait()
            if connecting.cancelled_caught:
                figures.failed.append(f"{waiting[0]} clients not ready after 120 s")
            else:
                await run_traffic(args, figures, broker, ledger, started, warmup)
            stop.set()  # every client closes: the nursery waits for them
        nursery.cancel_scope.cancel()
    figures.failed += [client.failed for client in clients if client.failed is not None]
    figures.wall = time.monotonic() - started
    progress(args, "closed", started, ledger, broker)
    return figures


async def run_traffic(
    args: argparse.Namespace,
    figures: Figures,
    broker: BrokerProcess,
    ledger: Ledger,
    started: float,
    warmup: float,
) -> None:
    """Let the connected clients run for ``args.seconds``, measuring the broker."""
    progress(args, "connected", started, ledger, broker)
    figures.fds_connected = broker.fds()
    end = trio.current_time() + args.seconds
    await trio.sleep(warmup)
    figures.rss_start = broker.status("VmRSS")
    broker_cpu, driver_cpu, steady = broker.cpu_seconds(), time.process_time(), time.monotonic()
    every = args.progress or float("inf")
    while trio.current_time() < end:
        await trio.sleep(min(every, end - trio.current_time()))
        if trio.current_time() < end:
            progress(args, "running", started, ledger, broker)
    figures.rss_steady_end = broker.status("VmRSS")
    elapsed = time.monotonic() - steady
    figures.broker_cpu = (broker.cpu_seconds() - broker_cpu) / elapsed
    figures.driver_cpu = (time.process_time() - driver_cpu) / elapsed


def progress(
    args: argparse.Namespace, stage: str, started: float, ledger: Ledger, broker: BrokerProcess
) -> None:
    """A progress line on stderr."""
    if not args.progress:
        return
    rss = broker.status("VmRSS") / 1024 if broker.alive() else 0.0
    fds = broker.fds() if broker.alive() else 0
    print(
        f"soak: {time.monotonic() - started:6.1f} s {stage}: published={ledger.published} "
        f"acked={ledger.acked} delivered={ledger.delivered} connections={ledger.connections} "
        f"aborts={ledger.aborts} lost={ledger.lost.count} rss_mib={rss:.1f} fds={fds}",
        file=sys.stderr,
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Soak the broker: many clients for a long time, with a ledger of every "
        "message (lost, duplicated, reordered), the broker's RSS and file descriptors, and its "
        "log. Exit status 0 only if every check passed.",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1000,
        help="concurrent clients (connections), each publishing, subscribing, and some "
        "aborting or sending bad frames (default 1000)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=600.0,
        help="how long the traffic runs once every client is connected, the warm-up (a tenth "
        "of it, at most 10 s) included; connecting and the final drain come on top (default 600)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the clients' random choices (what, when, which encoding); the "
        "interleaving with the broker still varies from run to run (default 1)",
    )
    parser.add_argument(
        "--keep-log",
        type=Path,
        metavar="PATH",
        help="write the broker's log (stdout and stderr, level info) to PATH and keep it; "
        "without it the log goes to a temporary file, kept only if the run fails",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="messages published per second by all clients together (default 200; each is "
        "delivered to every matching subscription, about 54 of them with 1000 clients)",
    )
    parser.add_argument(
        "--progress",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="print a progress line on stderr this often (0: never; default 60)",
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.rate <= 0:
        parser.error("--clients, --seconds and --rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print the summary; return the exit status."""
    args = parse_args(argv)
    pin = len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") is not None
    if pin:
        os.sched_setaffinity(0, {1})  # the broker gets core 0
    ledger = Ledger()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        log_path = args.keep_log if args.keep_log is not None else Path(tmp) / "broker.log"
        broker = BrokerProcess(Path(tmp), log_path, pin)
        try:
            broker.wait_listening()
            baseline = broker.stable_fds()
            figures = trio.run(drive, args, broker, ledger)
            figures.fds_baseline = baseline
            if broker.alive():
                # Waits for the baseline itself: a close still in flight must not count.
                figures.fds_end = broker.wait_fds(baseline, timeout=30.0)
                figures.rss_end = broker.status("VmRSS")
                figures.rss_peak = broker.status("VmHWM")
        finally:
            status = broker.stop()
        warnings, tracebacks = read_log(log_path)
        failed = verdict(ledger, figures, status, tracebacks)
        report(args, ledger, figures, status, warnings, tracebacks, failed)
        if failed and args.keep_log is None:
            kept = Path(tempfile.gettempdir()) / f"soak-broker-{int(time.time())}.log"
            shutil.copy(log_path, kept)
            print(f"soak: the broker's log is kept in {kept}")
    return 1 if failed else 0


# A listening socket, epoll and the like are open before any client; after every client closed
# the count must come back to that. The slack allows for descriptors the broker's runtime
# may open once, lazily, on first use after the baseline (none seen so far: the runs in
# bench/README.md ended at the baseline exactly), not for one per connection.
FD_SLACK: Final = 2


def verdict(ledger: Ledger, figures: Figures, status: int | None, tracebacks: int) -> list[str]:
    """Why the run failed (empty if it passed)."""
    failed = list(figures.failed)
    for name, sample in (
        ("lost", ledger.lost),
        ("duplicated", ledger.duplicated),
        ("reordered", ledger.reordered),
        ("misrouted", ledger.misrouted),
        ("unexpected frames or replies", ledger.unexpected),
    ):
        if sample.count:
            failed.append(f"{sample.count} {name}")
    if figures.fds_end > figures.fds_baseline + FD_SLACK:
        failed.append(f"fds {figures.fds_end} after every client closed, baseline "
                      f"{figures.fds_baseline} (+{FD_SLACK} allowed)")  # fmt: skip
    unasked = {how: n for how, n in ledger.ends.items() if how not in ("aborted", "closed")}
    if unasked:
        failed.append(f"connections ended without being asked: {unasked}")
    if ledger.lags:
        failed.append(f"{ledger.lags} lag frames under block")
    if ledger.bad_frame_errors + ledger.bad_unanswered != ledger.bad_frames and not unasked:
        failed.append(
            f"{ledger.bad_frames} bad frames sent, {ledger.bad_frame_errors} errs, "
            f"{ledger.bad_unanswered} unanswered on aborted connections"
        )
    if tracebacks:
        failed.append(f"{tracebacks} tracebacks in the broker's log")
    if status != 0:
        failed.append(f"the broker exited with {status} after SIGTERM")
    if not ledger.checked_subscriptions:
        failed.append("no subscription was checked")
    return failed


def report(
    args: argparse.Namespace,
    ledger: Ledger,
    figures: Figures,
    status: int | None,
    warnings: list[str],
    tracebacks: int,
    failed: list[str],
) -> None:
    """Print the details, then the one-line summary."""
    mib = 1024.0
    growth = 100.0 * (figures.rss_end - figures.rss_start) / max(figures.rss_start, 1)
    steady = 100.0 * (figures.rss_steady_end - figures.rss_start) / max(figures.rss_start, 1)
    slow = ledger.ends.get("closed by broker 4002", 0)
    for name, sample in (
        ("lost", ledger.lost),
        ("duplicated", ledger.duplicated),
        ("reordered", ledger.reordered),
        ("misrouted", ledger.misrouted),
        ("unexpected", ledger.unexpected),
    ):
        for example in sample.examples:
            print(f"  {name}: {example}")
    for line in warnings[:10]:
        print(f"  broker: {line}")
    print(
        f"details: connections={ledger.connections} connect_failures={ledger.connect_failures} "
        f"ends={dict(ledger.ends)} subprotocols={dict(ledger.encodings)} "
        f"subscriptions={ledger.subscriptions_made} "
        f"checked={ledger.checked_subscriptions} "
        f"abandoned={ledger.abandoned_subscriptions} expected={ledger.expected} "
        f"late={ledger.late} published_with_id={ledger.with_id} "
        f"fire_and_forget={ledger.published - ledger.with_id} "
        f"unconfirmed={ledger.unconfirmed} bad_frame_errs={ledger.bad_frame_errors} "
        f"lags={ledger.lags} misrouted={ledger.misrouted.count} "
        f"unexpected={ledger.unexpected.count} "
        f"rss_steady_end_mib={figures.rss_steady_end / mib:.1f} "
        f"rss_steady_growth_%={steady:.1f} rss_peak_mib={figures.rss_peak / mib:.1f} "
        f"fds_connected={figures.fds_connected} broker_cpu_%={100 * figures.broker_cpu:.0f} "
        f"driver_cpu_%={100 * figures.driver_cpu:.0f} "
        f"driver_max_stall_ms={1000 * figures.max_stall:.0f} "
        f"(at {figures.stall_at:.1f} s) broker_exit={status} "
        f"wall_s={figures.wall:.1f}"
    )
    print("verdict: " + ("PASS" if not failed else "FAIL: " + "; ".join(failed)))
    print(
        f"soak clients={args.clients} seconds={args.seconds:g} published={ledger.published} "
        f"(acked={ledger.acked} unacked={ledger.published - ledger.acked}) "
        f"delivered={ledger.delivered} lost={ledger.lost.count} "
        f"duplicated={ledger.duplicated.count} reordered={ledger.reordered.count} "
        f"slow_consumer_closes={slow} aborts={ledger.aborts} bad_frames={ledger.bad_frames} "
        f"rss_start_mib={figures.rss_start / mib:.1f} rss_end_mib={figures.rss_end / mib:.1f} "
        f"rss_growth_%={growth:.1f} fds_baseline={figures.fds_baseline} "
        f"fds_end={figures.fds_end} broker_warnings={len(warnings)} tracebacks={tracebacks}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
