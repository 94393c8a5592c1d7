#!/usr/bin/env python3
"""Server API publish throughput: requests/s with keep-alive, over 1 connection and over 16.

    .venv/bin/python bench/api.py                        # 5 s per row, JSON bodies
    .venv/bin/python bench/api.py --seconds 10 --encoding msgpack
    .venv/bin/python bench/api.py --no-baseline          # without the hypercorn rows

The broker runs as ``broker serve`` (a config with ``[api]`` on a free port, log level
warning), pinned to core 0; this script drives it from core 1 with raw keep-alive HTTP/1.1
connections, each sending one ``POST /api/publish`` (``{"topic": "bench.api", "data":
{"n": 1}}``) and reading its answer before the next (no pipelining). Rows: 1 and 16
connections to a topic nobody subscribes to, and 16 connections with one WebSocket subscriber
reading every message (``bench.sub``). Each row prints the requests answered per second, the
broker's CPU (from /proc: 100 % is one core busy) and its CPU per request, and this
generator's own CPU, which shows when the generator, not the broker, was the limit.

The baseline rows run hypercorn (the ASGI server of the metrics listener) alone, with an app
that answers ``{}`` to every request: the HTTP server's own cost, which the broker's API pays
on top of publishing. They are why the API runs on its own h11 server (broker/io/http.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import trio
from processes import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
KEY = "bench-api-key-0123456789"
CONFIG = f'[api]\nport = 0\nkeys = ["{KEY}"]\n'
TICK = os.sysconf("SC_CLK_TCK")

HYPERCORN_APP = """
import sys, trio
from hypercorn.config import Config
from hypercorn.trio import serve

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})

config = Config()
config.bind = ["127.0.0.1:" + sys.argv[1]]
config.accesslog = None
config.keep_alive_max_requests = 2**62
trio.run(serve, app, config)
"""


@dataclass
class Row:
    """One measurement."""

    name: str
    requests: int
    seconds: float
    server_cpu: float
    client_cpu: float

    def cells(self) -> list[str]:
        rate = self.requests / self.seconds
        per_request = self.server_cpu / max(self.requests, 1) * 1e6
        return [
            self.name,
            f"{rate:,.0f}",
            f"{self.server_cpu / self.seconds:.0%}",
            f"{per_request:,.0f} us",
            f"{self.client_cpu / self.seconds:.0%}",
        ]


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def request_bytes(encoding: str, topic: str) -> bytes:
    body = {"topic": topic, "data": {"n": 1}}
    if encoding == "json":
        content, media = json.dumps(body).encode(), b"application/json"
    else:
        content, media = msgpack.packb(body), b"application/msgpack"
    return (
        b"POST /api/publish HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer %s\r\n"
        b"content-type: %s\r\ncontent-length: %d\r\n\r\n%s"
    ) % (KEY.encode(), media, len(content), content)


LENGTH = re.compile(rb"content-length: *(\d+)", re.IGNORECASE)


async def keep_posting(port: int, request: bytes, stop: trio.Event, done: list[int]) -> None:
    """Send ``request`` and read its answer, again and again, on one connection until ``stop``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buffer = b""
    async with stream:
        while not stop.is_set():
            await stream.send_all(request)
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end >= 0:
                    length = LENGTH.search(buffer, 0, end)
                    assert length is not None, buffer[:200]
                    whole = end + 4 + int(length[1])
                    if len(buffer) >= whole:
                        assert buffer.startswith(b"HTTP/1.1 200"), buffer[:200]
                        buffer = buffer[whole:]
                        break
                chunk = await stream.receive_some(65536)
                assert chunk, "the server closed the connection"
                buffer += chunk
            done[0] += 1


async def subscribe(
    url: str, topic: str, received: list[int], *, task_status: trio.TaskStatus[None]
) -> None:
    """A WebSocket subscriber to ``topic`` that counts what it reads."""
    from trio_websocket import open_websocket_url

    async with open_websocket_url(
        url, subprotocols=["pubsub.v1.msgpack"], max_message_size=1 << 24
    ) as websocket:
        await websocket.send_message(msgpack.packb({"op": "sub", "id": 1, "topic": topic}))
        await websocket.get_message()  # the ok
        task_status.started()
        while True:
            unpacker = msgpack.Unpacker()
            unpacker.feed(await websocket.get_message())
            received[0] += sum(1 for _ in unpacker)


async def measure(
    name: str,
    port: int,
    pid: int,
    connections: int,
    request: bytes,
    seconds: float,
    ws_url: str | None = None,
) -> Row:
    """Post on ``connections`` connections for ``seconds`` (after a 1 s warm-up)."""
    done, received = [0], [0]
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        if ws_url is not None:
            await nursery.start(subscribe, ws_url, "bench.sub", received)
        for _ in range(connections):
            nursery.start_soon(keep_posting, port, request, stop, done)
        await trio.sleep(1.0)
        count, server, client, started = (
            done[0],
            cpu_seconds(pid),
            time.process_time(),
            time.monotonic(),
        )
        await trio.sleep(seconds)
        row = Row(
            name,
            done[0] - count,
            time.monotonic() - started,
            cpu_seconds(pid) - server,
            time.process_time() - client,
        )
        stop.set()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    if ws_url is not None:
        assert received[0] >= row.requests, (received[0], row.requests)
    return row


def start(
    command: list[str], ready: Callable[[str], bool], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], list[str]]:
    """Start ``command`` on core 0; its stderr lines up to the one ``ready`` accepts."""
    process = subprocess.Popen(
        ["taskset", "-c", "0", *command], stderr=subprocess.PIPE, text=True, env=env
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise SystemExit("the server exited:\n" + "".join(lines))
        lines.append(line)
        if ready(line):
            return process, lines
    raise SystemExit("the server did not start:\n" + "".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per row (default 5)")
    parser.add_argument("--encoding", choices=("json", "msgpack"), default="json")
    parser.add_argument("--no-baseline", action="store_true", help="skip the hypercorn rows")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "api.toml"
        config.write_text(CONFIG)
        broker, log = start(
            [
                str(PYTHON),
                "-m",
                "broker",
                "serve",
                "--config",
                str(config),
                "--port",
                "0",
                "--log-level",
                "info",
            ],
            lambda line: "server API on " in line,
        )
        try:
            text = "".join(log)
            api_port = int(re.findall(r"server API on http://127\.0\.0\.1:(\d+)", text)[0])
            ws_url = re.findall(r"listening on (ws://\S+)", text)[0]
            for connections, topic, url in (
                (1, "bench.api", None),
                (16, "bench.api", None),
                (16, "bench.sub", ws_url),
            ):
                name = f"broker API, {connections} connection{'s' * (connections > 1)}"
                name += ", 1 subscriber" if url else ""
                request = request_bytes(args.encoding, topic)
                rows.append(
                    trio.run(
                        measure, name, api_port, broker.pid, connections, request, args.seconds, url
                    )
                )
        finally:
            broker.terminate()
            broker.wait()
        if not args.no_baseline:
            port = free_port()
            server, _ = start(
                [str(PYTHON), "-c", HYPERCORN_APP, str(port)], lambda line: "Running on" in line
            )
            try:
                for connections in (1, 16):
                    name = f"hypercorn alone, {connections} connection{'s' * (connections > 1)}"
                    request = request_bytes(args.encoding, "bench.api")
                    rows.append(
                        trio.run(
                            measure, name, port, server.pid, connections, request, args.seconds
                        )
                    )
            finally:
                server.terminate()
                server.wait()
    print(
        f"server API, POST /api/publish ({args.encoding}), keep-alive, {args.seconds:g} s per row"
    )
    header = ["", "requests/s", "broker CPU", "CPU per request", "generator CPU"]
    table = [header, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print(
            "  ".join(
                cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(line)
            )
        )


if __name__ == "__main__":
    main()
