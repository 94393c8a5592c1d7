#!/usr/bin/env python3
"""Issue 22's publish path from the socket's bytes on: WebSocket frames, decode, checks, hub,
queues and the writes to the subscribers' sockets, without the network or the load generator.

    .venv/bin/python bench/micro_small_topics.py                 # CPU us per routed message
    .venv/bin/python bench/micro_small_topics.py --stage parse   # the WebSocket frames only
    .venv/bin/python bench/micro_small_topics.py --per-message 64 --messages-per-read 94

1 000 subscribers, each a real :class:`~broker.io.connection.Connection` on its own topic
``bench.t.<i>``, whose WebSocket is a real one on one end of a socketpair nobody reads (the
kernel keeps what is written: a run writes a few KiB per subscriber). ``--publishers`` (4)
publishers take turns, each with a stream that serves prepared reads of
``--messages-per-read`` masked client WebSocket messages, each holding ``--per-message``
``pub`` frames without ``id`` (64-byte payloads) to seeded-random topics.

The defaults are bench/run's small-topics as the broker sees it (counted in its reader, 200 000
messages): reads of ~2 900 messages on average, most messages in reads of 4 000-16 000 (the
load generator stays up to 64 000 messages ahead), ~10 frames per write. With 6 000 messages
per read the same broker code here writes 0.099 times per routed message, as in that run
(0.098, perf), at the same CPU per routed message.

``--stage`` stops the path early, so that differences between stages say what each costs:

- ``parse``: the publisher's :meth:`WebSocket.receive` only (wsproto, unmasking);
- ``decode``: and :func:`~broker.protocol.frames.decode_batch` of each message (msgpack and
  the frame checks);
- ``full`` (default): the publisher's reader loop: the session, the hub, the queues, the
  direct writes (an ``os.write`` each), the writer tasks.

bench/instructions runs this under valgrind and prints instructions per routed message.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import time

import msgpack
import trio
import trio.testing
from micro_reader import LIMITS, SERVER, start_writer  # bench/ is the script's directory

from broker.core.delivery import LocalDelivery
from broker.core.history import MemoryHistory
from broker.core.hub import Hub
from broker.core.rules import PolicyTable
from broker.core.stats import BrokerStats
from broker.io.connection import Connection
from broker.io.websocket import WebSocket
from broker.io.writes import DirectWrites
from broker.protocol.frames import Encoding, decode_batch

STAGES = ("parse", "decode", "full")
SUBSCRIBERS = 1000


def client_message(payload: bytes, rng: random.Random) -> bytes:
    """One masked, final binary WebSocket frame carrying ``payload`` (RFC 6455 5.3)."""
    key = rng.randbytes(4)
    n = len(payload)
    if n < 126:
        header = bytes((0x82, 0x80 | n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x82, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
    mask = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return header + key + masked


def prepared_reads(reads: int, messages_per_read: int, per_message: int, seed: int) -> list[bytes]:
    """The bytes of each read: messages of ``per_message`` pubs to seeded-random topics."""
    rng = random.Random(seed)
    frames = [
        msgpack.packb({"op": "pub", "topic": f"bench.t.{i}", "data": b"a" * 64})
        for i in range(SUBSCRIBERS)
    ]
    return [
        b"".join(
            client_message(
                b"".join(frames[rng.randrange(SUBSCRIBERS)] for _ in range(per_message)), rng
            )
            for _ in range(messages_per_read)
        )
        for _ in range(reads)
    ]


class PreparedStream(trio.abc.Stream):
    """Serves the prepared reads to ``receive_some`` (a checkpoint each), then waits forever."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads
        self.served = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.served == len(self.reads):
            await trio.sleep_forever()
        self.served += 1
        await trio.lowlevel.checkpoint()
        return self.reads[self.served - 1]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def websocket(stream: trio.abc.Stream) -> WebSocket:
    """An open server-side WebSocket on ``stream`` that never pings (under valgrind a run
    takes longer than the default ping interval)."""
    return WebSocket(
        stream, Encoding.MSGPACK.value, SERVER.max_message_size,
        ping_interval=1e9, ping_timeout=1e9,
    )  # fmt: skip


async def run(reads: list[bytes], stage: str, routed: int, publishers: int) -> float:
    """CPU seconds per routed message of serving ``reads`` (shared out between
    ``publishers``) up to ``stage``; prints writes per routed message."""
    hub = Hub(PolicyTable([]), slow_timeout=5.0)
    stats = BrokerStats()
    delivery = LocalDelivery(hub, MemoryHistory(hub.policies.history_for))
    writes = DirectWrites()
    peers = []  # the unread ends of the subscribers' socketpairs
    subscribers = []
    for i in range(SUBSCRIBERS if stage == "full" else 0):
        ours, theirs = socket.socketpair()
        peers.append(theirs)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        subscriber = Connection(
            websocket(stream),
            Encoding.MSGPACK,
            delivery,
            writes,
            LIMITS,
            SERVER,
            "sub",
            stats=stats,
        )
        sub = msgpack.packb({"op": "sub", "id": 1, "topic": f"bench.t.{i}"})
        waiting = subscriber.session.receive([sub], 0.0)
        assert waiting is not None
        await subscriber.session.complete(waiting)
        subscriber.queue.take_batch(1 << 20)  # the ok
        subscribers.append(subscriber)
    streams = [PreparedStream(reads[p::publishers]) for p in range(publishers)]
    readers = [
        Connection(websocket(stream), Encoding.MSGPACK, delivery, writes, LIMITS, SERVER, "pub")
        for stream in streams
    ]
    start = time.process_time()
    if stage == "full":
        async with trio.open_nursery() as nursery:
            for subscriber in subscribers:
                start_writer(nursery, subscriber)
            flush_writes = getattr(writes, "flush_writes", None)  # as the server runs it, if any
            if flush_writes is not None:
                nursery.start_soon(flush_writes)
            await trio.testing.wait_all_tasks_blocked()
            start = time.process_time()
            for reader in readers:
                nursery.start_soon(reader._read_loop)
            while any(stream.served < len(stream.reads) for stream in streams):
                await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()
            elapsed = time.process_time() - start
            nursery.cancel_scope.cancel()
        written = stats.queue_depth.count
        print(f"    {written / routed:.3f} writes and {stats.messages_out / routed:.3f} messages "
              "written per routed message")  # fmt: skip
    else:
        for p in range(len(reads)):
            for message in await readers[p % publishers].websocket.receive():
                if stage == "decode":
                    decode_batch(message, Encoding.MSGPACK)
        elapsed = time.process_time() - start
    for peer in peers:
        peer.close()
    return elapsed / routed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=STAGES, default="full")
    parser.add_argument("--reads", type=int, default=8)
    parser.add_argument("--messages-per-read", type=int, default=6000)
    parser.add_argument("--per-message", type=int, default=1, help="pub frames per message")
    parser.add_argument("--publishers", type=int, default=4, help="reads are shared out")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is shown")
    args = parser.parse_args()
    # The same reads whatever --reads (up to 8): bench/instructions subtracts runs of 4 and 8.
    pool = prepared_reads(max(8, args.reads), args.messages_per_read, args.per_message, args.seed)
    reads = pool[: args.reads]
    routed = args.reads * args.messages_per_read * args.per_message
    best = min(
        trio.run(run, reads, args.stage, routed, args.publishers) for _ in range(args.repeat)
    )
    print(f"{args.stage}: best {best * 1e6:.2f} us per routed message ({routed} routed)")


if __name__ == "__main__":
    main()
