#!/usr/bin/env python3
"""100 000 idle subscribed connections on one node (issue 22): memory, idle CPU, delivery.

    .venv/bin/python bench/connections.py                    # 100 000, or as many as fit
    .venv/bin/python bench/connections.py --connections 5000 --idle 60 --ping-interval 20
    .venv/bin/python bench/connections.py --connections 100000 --strict   # refuse if it can't

One broker process (this checkout's: its root goes first on ``PYTHONPATH``) pinned to core 0 with a
temp config: ``[server] ping_interval = --ping-interval`` (``ping_timeout`` stays 20 s),
``[limits] max_connections = 0``, no per-address or publish-rate limit. The load generator is
``--workers`` processes of this script (``--worker``) pinned to core 1: each keeps its share
of the connections on raw non-blocking sockets in one ``epoll`` loop, doing the WebSocket
handshake by hand (the ``sub`` rides behind the upgrade request, masked with a zero key) and
answering every ping with a pong; a connection costs it a socket and a small object, so one
process holds ~20 000 and the broker, not the generator, is what is measured. Connection
``i`` binds source address 127.0.0.(2 + i // --per-source): one source address has ~28 000
ephemeral ports towards one listener.

Phases: every connection connects, subscribes to its own topic ``bench.c.<i>`` and waits for
its ``ok`` (at most --concurrency handshakes in flight: the broker's ``max_handshakes`` is
1 000); then all stay idle for --idle seconds (several ping intervals: every connection is
pinged and answers); then one more connection publishes one message to every topic, in
batches, and every worker reports when each of its connections has its message.

Printed: the connect+subscribe rate (connections over first connect -> last ``ok``); broker
RSS per connection ((VmRSS after the idle period - VmRSS before the first connection) / N,
and the same right after subscribing); the broker's CPU over the idle period (utime+stime
from /proc, % of one core) with the pings answered meanwhile and CPU per ping; the time from
the first publish to the last delivery; messages lost (N - delivered), duplicated, and
connections the broker closed. Exits 1 if anything was lost or closed.

Open files: this script raises its soft limit to the hard limit (children inherit it). The
broker needs N + 65 descriptors (its clients, the publisher, ``SPARE_FILES``); the hard
limit cannot be raised without CAP_SYS_RESOURCE. When N does not fit, one line says why and
the run uses the largest N that fits (or, with ``--strict``, exits 2).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import msgpack
from processes import cpu_seconds, free_port, raise_open_files, rss_kib, stop, wait_listening

from broker.io.server import SPARE_FILES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PUBLISHERS = 1  # descriptors the broker needs besides the subscribers and SPARE_FILES
WORKER_SPARE = 32  # descriptors a worker needs besides its connections
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux: port at connect
PAYLOAD = b"x" * 16
NOTABLE = (" WARNING ", " ERROR ", "Traceback")  # broker log lines worth showing

CONFIG = """\
[server]
ping_interval = {ping}

[limits]
max_connections = 0
max_connections_per_ip = 0
publish_rate = 0
publish_burst = 0
publish_bytes_rate = 0
publish_bytes_burst = 0
"""

# --- the WebSocket client side, by hand (RFC 6455; the server never masks) ---

UPGRADE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: pubsub.v1.msgpack\r\n\r\n"
)


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One final client frame, masked with the zero key (so the payload goes as it is)."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def server_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take the whole frames at the start of ``buffer``: (opcode, payload) each."""
    frames = []
    pos, end = 0, len(buffer)
    while end - pos >= 2:
        length, at = buffer[pos + 1] & 0x7F, pos + 2
        if length == 126:
            if end - pos < 4:
                break
            length, at = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), pos + 4
        elif length == 127:
            if end - pos < 10:
                break
            length, at = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), pos + 10
        if at + length > end:
            break
        frames.append((buffer[pos] & 0x0F, bytes(buffer[at : at + length])))
        pos = at + length
    del buffer[:pos]
    return frames


def decode(payload: bytes) -> list[dict[str, Any]]:
    """The msgpack frames of one binary WebSocket message (a batch is several)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(payload)
    return list(unpacker)


def handshake_done(buffer: bytearray) -> bool | None:
    """True once ``buffer`` starts with a whole 101 answer (removed from it), False if the
    upgrade was refused, None while the answer is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    ok = buffer.startswith(b"HTTP/1.1 101")
    del buffer[: end + 4]
    return ok


# --- a worker: its share of the connections in one epoll loop ---

CONNECTING, UPGRADING, SUBSCRIBING, IDLE, DELIVERED, CLOSED = range(6)


class Client:
    __slots__ = ("buffer", "index", "sock", "state")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.state = CONNECTING
        self.buffer = bytearray()


class Worker:
    """Connections ``first`` .. ``first + count - 1`` to ``port`` (see the module doc)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.port: int = args.port
        self.first: int = args.first
        self.count: int = args.count
        self.per_source: int = args.per_source
        self.concurrency: int = args.concurrency
        self.epoll = select.epoll()
        self.clients: dict[int, Client] = {}
        self.next = args.first
        self.in_flight = 0
        self.subscribed = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.closed = 0
        self.pings = 0
        self.pings_marked = 0
        self.idle_pings: int | None = None
        self.delivered = 0
        self.duplicates = 0
        self.wrong = 0
        self.last_delivery = 0.0
        self.deadline: float | None = None
        self.t_first = 0.0
        self.t_subscribed = 0.0
        self.stdin = bytearray()
        self.request = UPGRADE.format(port=args.port).encode()

    def report(self, event: str, **figures: Any) -> None:
        print(json.dumps({"event": event, **figures}), flush=True)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def open_more(self) -> None:
        while self.in_flight < self.concurrency and self.next < self.first + self.count:
            index = self.next
            self.next += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((f"127.0.0.{2 + index // self.per_source}", 0))
                code = sock.connect_ex(("127.0.0.1", self.port))
            except OSError as exc:
                code = exc.errno or -1
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                self.failed += 1
                self.error(errno.errorcode.get(code, str(code)))
                continue
            self.clients[sock.fileno()] = Client(index, sock)
            self.epoll.register(sock.fileno(), select.EPOLLOUT)
            self.in_flight += 1

    def settled(self, client: Client) -> None:
        """``client`` is subscribed or gave up: another may start."""
        self.in_flight -= 1
        if self.subscribed + self.failed == self.count:
            self.t_subscribed = time.monotonic()
            self.report("subscribed", subscribed=self.subscribed, failed=self.failed,
                        errors=self.errors, t_first=self.t_first,
                        t_done=self.t_subscribed)  # fmt: skip

    def drop(self, client: Client, why: str) -> None:
        state = client.state
        client.state = CLOSED
        self.epoll.unregister(client.sock.fileno())
        del self.clients[client.sock.fileno()]
        client.sock.close()
        self.error(why)
        if state < IDLE:
            self.failed += 1
            self.settled(client)
        else:
            self.closed += 1

    def writable(self, client: Client) -> None:
        fd = client.sock.fileno()
        code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.drop(client, errno.errorcode.get(code, str(code)))
            return
        sub = {"op": "sub", "id": 1, "topic": f"bench.c.{client.index}"}
        client.sock.send(self.request + client_frame(msgpack.packb(sub)))
        client.state = UPGRADING
        self.epoll.modify(fd, select.EPOLLIN)

    def readable(self, client: Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.drop(client, errno.errorcode.get(exc.errno or 0, "recv"))
            return
        if not data:
            self.drop(client, "eof")
            return
        buffer = client.buffer
        buffer += data
        if client.state == UPGRADING:
            done = handshake_done(buffer)
            if done is None:
                return
            if not done:
                self.drop(client, "refused")
                return
            client.state = SUBSCRIBING
        for opcode, payload in server_frames(buffer):
            if opcode == 0x9:
                self.pings += 1
                client.sock.send(client_frame(payload, 0xA))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.drop(client, f"closed {code}")
                return
            elif opcode == 0x2:
                for frame in decode(payload):
                    self.frame(client, frame)

    def frame(self, client: Client, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "ok" and client.state == SUBSCRIBING:
            client.state = IDLE
            self.subscribed += 1
            self.settled(client)
        elif op == "msg":
            if frame.get("topic") != f"bench.c.{client.index}" or frame.get("data") != PAYLOAD:
                self.wrong += 1
            elif client.state == DELIVERED:
                self.duplicates += 1
            else:
                client.state = DELIVERED
                self.delivered += 1
                self.last_delivery = time.monotonic()
                if self.delivered == self.subscribed:
                    self.report_delivery()
        else:
            self.error(f"frame {op}")

    def report_delivery(self) -> None:
        self.report("delivered", delivered=self.delivered, duplicates=self.duplicates,
                    wrong=self.wrong, closed=self.closed, t_last=self.last_delivery,
                    pings=self.pings, idle_pings=self.idle_pings, errors=self.errors)  # fmt: skip
        self.deadline = None

    def command(self, text: str) -> None:
        """From the parent: ``mark`` (the idle period starts), ``expect <deadline>`` (it
        ended; report deliveries by that monotonic time at the latest)."""
        words = text.split()
        if words[0] == "mark":
            self.pings_marked = self.pings
        elif words[0] == "expect":
            self.idle_pings = self.pings - self.pings_marked
            self.deadline = float(words[1])

    def run(self) -> None:
        self.epoll.register(0, select.EPOLLIN)
        self.t_first = time.monotonic()
        self.open_more()
        if self.count == self.failed:
            self.settled(Client(-1, socket.socket()))
        while True:
            timeout = -1.0 if self.deadline is None else max(0, self.deadline - time.monotonic())
            for fd, _ in self.epoll.poll(timeout):
                if fd == 0:
                    data = os.read(0, 4096)
                    if not data:
                        return  # the parent is done with us
                    self.stdin += data
                    while b"\n" in self.stdin:
                        text, _, rest = bytes(self.stdin).partition(b"\n")
                        self.stdin = bytearray(rest)
                        self.command(text.decode())
                    continue
                client = self.clients.get(fd)
                if client is None:
                    continue
                if client.state == CONNECTING:
                    self.writable(client)
                else:
                    self.readable(client)
            self.open_more()
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.report_delivery()


# --- the parent ---


def fit(wanted: int, hard: int) -> tuple[int, str | None]:
    """How many connections one broker process can hold under the open-files hard limit
    ``hard``, and why ``wanted`` does not fit (None if it does)."""
    most = hard - SPARE_FILES - PUBLISHERS
    if hard == resource.RLIM_INFINITY or wanted <= most:
        return wanted, None
    return most, (
        f"{wanted:_} connections do not fit: the open-files hard limit is {hard:_} "
        f"(ulimit -Hn) and this process may not raise it (setrlimit: no CAP_SYS_RESOURCE), "
        f"so the broker holds at most {most:_} ({hard:_} - {SPARE_FILES} spare - "
        f"{PUBLISHERS} publisher)"
    )


def publish_all(port: int, count: int, batch: int) -> float:
    """Publish one message to each of ``bench.c.0`` .. ``count - 1`` through one connection,
    ``batch`` pubs per WebSocket message; return the monotonic time of the first send. Waits
    for the ``ok`` of the last pub (it carries an ``id``), answering pings meanwhile."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(UPGRADE.format(port=port).encode())
    buffer = bytearray()
    while (done := handshake_done(buffer)) is None:
        buffer += sock.recv(65536)
    if not done:
        raise RuntimeError("the publisher's upgrade was refused")
    pack = msgpack.Packer()
    started = time.monotonic()
    for start in range(0, count, batch):
        stop_at = min(count, start + batch)
        pubs = [
            {"op": "pub", "topic": f"bench.c.{i}", "data": PAYLOAD} for i in range(start, stop_at)
        ]
        if stop_at == count:
            pubs[-1]["id"] = 1
        sock.sendall(client_frame(b"".join(map(pack.pack, pubs))))
    while True:
        for opcode, payload in server_frames(buffer):
            if opcode == 0x9:
                sock.sendall(client_frame(payload, 0xA))
            elif opcode == 0x2 and any(f.get("op") == "ok" for f in decode(payload)):
                sock.close()
                return started
            elif opcode == 0x2:
                raise RuntimeError(f"the publisher got {decode(payload)}")
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the broker closed the publisher")
        buffer += data


def read_event(worker: subprocess.Popen[str], event: str) -> dict[str, Any]:
    assert worker.stdout is not None
    for text in worker.stdout:
        figures: dict[str, Any] = json.loads(text)
        if figures["event"] == event:
            return figures
    raise RuntimeError(f"a worker exited ({worker.wait()}) before reporting {event!r}")


def tell(workers: list[subprocess.Popen[str]], command: str) -> None:
    for worker in workers:
        stdin: TextIO | None = worker.stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()


def pinned(core: int) -> list[str]:
    """``taskset -c core`` where there are two cores or more and taskset exists."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core)]
    return []


def run(args: argparse.Namespace, hard: int) -> dict[str, Any]:
    n = args.connections
    per_worker = (65536 if hard == resource.RLIM_INFINITY else hard) - WORKER_SPARE
    workers_wanted = args.workers or math.ceil(n / per_worker)
    shares = [n // workers_wanted + (w < n % workers_wanted) for w in range(workers_wanted)]
    figures: dict[str, Any] = {"n": n, "workers": workers_wanted,
                               "sources": math.ceil(n / args.per_source)}  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        conf = tmp / "broker.toml"
        conf.write_text(CONFIG.format(ping=args.ping_interval))
        port = free_port()
        log = tmp / "broker.log"
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        with open(log, "wb") as out:
            broker = subprocess.Popen(
                [*pinned(0), sys.executable, "-m", "broker", "serve", "--config", str(conf),
                 "--port", str(port), "--log-level", "warning"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        workers: list[subprocess.Popen[str]] = []
        try:
            wait_listening(port, broker)
            time.sleep(0.2)  # let the probe connection go
            figures["rss_before_kib"] = rss_kib(broker.pid)
            first = 0
            for share in shares:
                workers.append(subprocess.Popen(
                    [*pinned(1), sys.executable, __file__, "--worker", "--port", str(port),
                     "--first", str(first), "--count", str(share),
                     "--per-source", str(args.per_source),
                     "--concurrency", str(max(1, args.concurrency // len(shares)))],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                ))  # fmt: skip
                first += share
            subscribed = [read_event(worker, "subscribed") for worker in workers]
            figures["subscribed"] = sum(s["subscribed"] for s in subscribed)
            figures["failed"] = sum(s["failed"] for s in subscribed)
            figures["connect_errors"] = merge(s["errors"] for s in subscribed)
            connect_s = max(s["t_done"] for s in subscribed) - min(s["t_first"] for s in subscribed)
            figures["connect_s"] = connect_s
            figures["rss_subscribed_kib"] = rss_kib(broker.pid)
            tell(workers, "mark")
            cpu, started = cpu_seconds(broker.pid), time.monotonic()
            time.sleep(args.idle)
            figures["idle_cpu_s"] = cpu_seconds(broker.pid) - cpu
            figures["idle_s"] = time.monotonic() - started
            figures["rss_idle_kib"] = rss_kib(broker.pid)
            tell(workers, f"expect {time.monotonic() + args.deliver_timeout}")
            cpu = cpu_seconds(broker.pid)
            published = publish_all(port, n, args.batch)
            delivered = [read_event(worker, "delivered") for worker in workers]
            figures["deliver_cpu_s"] = cpu_seconds(broker.pid) - cpu
            figures["deliver_s"] = max(d["t_last"] for d in delivered) - published
            for key in ("delivered", "duplicates", "wrong", "closed", "pings", "idle_pings"):
                figures[key] = sum(d[key] for d in delivered)
            figures["errors"] = merge(d["errors"] for d in delivered)
            figures["broker_alive"] = broker.poll() is None
        finally:
            for worker in workers:
                if worker.stdin is not None:
                    worker.stdin.close()
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            stop(broker, timeout=30)
            lines = log.read_text(errors="replace").splitlines()
            figures["broker_log"] = [
                text for text in lines if any(word in text for word in NOTABLE)
            ]
    return figures


def merge(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in counts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def number(value: float) -> str:
    """``12 345`` (a space between thousands)."""
    return f"{value:,}".replace(",", " ")


def table(figures: dict[str, Any]) -> str:
    n = figures["n"]
    subscribed = max(1, figures["subscribed"])
    per_conn = (figures["rss_idle_kib"] - figures["rss_before_kib"]) / subscribed
    right_after = (figures["rss_subscribed_kib"] - figures["rss_before_kib"]) / subscribed
    idle_pct = 100 * figures["idle_cpu_s"] / figures["idle_s"]
    pings = figures["idle_pings"]
    per_ping = 1e6 * figures["idle_cpu_s"] / pings if pings else float("nan")
    lost = figures["subscribed"] - figures["delivered"]
    header = ("| N | workers / source addresses | connect+sub rate | RSS/conn after idle "
              "(right after sub) | idle CPU (pings/s, CPU/ping) | deliver to all | lost "
              "| dup / wrong / closed |")  # fmt: skip
    row = [
        f"{number(n)}" + (f" ({number(figures['failed'])} failed)" if figures["failed"] else ""),
        f"{figures['workers']} / {figures['sources']}",
        f"{number(round(figures['subscribed'] / figures['connect_s']))}/s "
        f"({figures['connect_s']:.1f} s)",
        f"{per_conn:.1f} KiB ({right_after:.1f})",
        f"{idle_pct:.1f} % of a core over {figures['idle_s']:.0f} s "
        f"({pings / figures['idle_s']:.0f}/s, {per_ping:.0f} us)",
        f"{figures['deliver_s'] * 1000:.0f} ms ({figures['deliver_cpu_s']:.2f} s CPU)",
        f"{lost}",
        f"{figures['duplicates']} / {figures['wrong']} / {figures['closed']}",
    ]
    rule = "|" + "---|" * (header.count("|") - 1)
    return "\n".join([header, rule, "| " + " | ".join(row) + " |"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="N that does not fit the open-files limit: the largest that does, said in one "
        "line (--strict: exit 2 instead).",
    )
    parser.add_argument("--connections", type=int, default=100000, help="N (default 100 000)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 2 if N does not fit, instead of running the largest that does",
    )
    parser.add_argument(
        "--ping-interval", type=float, default=10, help="the broker's ping_interval, s (default 10)"
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=30,
        help="seconds idle between the last ok and the publish (default 30)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="generator processes (default: as few as the open-files limit allows)",
    )
    parser.add_argument(
        "--per-source",
        type=int,
        default=25000,
        help="connections per loopback source address 127.0.0.x (default 25 000)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=500,
        help="handshakes in flight, over all workers (default 500)",
    )
    parser.add_argument("--batch", type=int, default=256, help="pubs per WebSocket message")
    parser.add_argument(
        "--deliver-timeout",
        type=float,
        default=60,
        help="seconds after the idle period for every message to arrive",
    )
    worker = parser.add_argument_group("worker (internal: one generator process)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--port", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--first", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    hard = raise_open_files()
    if args.worker:
        Worker(args).run()
        return 0
    n, why = fit(args.connections, hard)
    if why is not None:
        if args.strict:
            print(f"# {why}; --strict: not run", flush=True)
            return 2
        print(f"# {why}; running {n:_}", flush=True)
        args.connections = n
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}; broker on core 0, generator on core 1; "
          f"N={args.connections:_} ping_interval={args.ping_interval:g} s idle={args.idle:g} s "
          f"open files={hard:_}", flush=True)  # fmt: skip
    figures = run(args, hard)
    print(table(figures))
    for text in figures["broker_log"][:5]:
        print(f"# broker: {text[:300]}")
    errors = {**figures["connect_errors"], **figures["errors"]}
    if errors:
        print(f"# connection errors: {errors}")
    lost = figures["subscribed"] - figures["delivered"]
    bad = [lost, *(figures[key] for key in ("failed", "closed", "duplicates", "wrong"))]
    return 1 if any(bad) or not figures["broker_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
