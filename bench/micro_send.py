#!/usr/bin/env python3
"""Cost of one WebSocket send per connection layer, on Trio (is trio-websocket the limit?).

    .venv/bin/python bench/micro_send.py [connections] [messages] [frames_per_message]

For each layer, ``connections`` Node sinks (bench/loadgen/sink.mjs, pinned to core 1) connect;
one writer task per connection sends ``messages`` WebSocket messages, each carrying
``frames_per_message`` 70-byte frames; this process is pinned to core 0. Prints CPU microseconds per
send and the sends/s and frames/s that one core would sustain, best of 3:

- ``trio-websocket``: ``WebSocketConnection.send_message`` (what the broker does today);
- ``wsproto+stream``: ``wsproto.WSConnection.send`` then ``trio.SocketStream.send_all``;
- ``prebuilt+stream``: a hand-built unmasked frame header, then ``send_all`` (the floor);
- ``websockets``: websockets 17's Trio server, ``ServerConnection.send`` (if installed).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio_websocket
import wsproto
from wsproto.events import AcceptConnection, BytesMessage, Request

SINK = Path(__file__).resolve().parent / "loadgen" / "sink.mjs"
Send = Callable[[bytes], Awaitable[None]]


def frame_header(size: int) -> bytes:
    """An unmasked, final, binary WebSocket frame header for a payload of ``size`` bytes."""
    if size < 126:
        return bytes((0x82, size))
    if size < 1 << 16:
        return bytes((0x82, 126)) + size.to_bytes(2, "big")
    return bytes((0x82, 127)) + size.to_bytes(8, "big")


async def run_layer(layer: str, connections: int, messages: int, payload: bytes) -> float:
    """CPU seconds (this process) for every connection to send ``messages`` of ``payload``.

    CPU time, not wall time: the machine is shared, and CPU per send is what a layer costs.
    """
    ready: list[Send] = []
    all_ready = trio.Event()
    done = trio.Event()

    async def ready_then_wait(send: Send) -> None:
        ready.append(send)
        if len(ready) == connections:
            all_ready.set()
        await done.wait()

    async def wsproto_handler(stream: trio.SocketStream, *, prebuilt: bool) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        while True:
            ws.receive_data(await stream.receive_some())
            if any(isinstance(event, Request) for event in ws.events()):
                break
        await stream.send_all(ws.send(AcceptConnection()))
        header = frame_header(len(payload))

        async def send(data: bytes) -> None:
            if prebuilt:
                await stream.send_all(header + data)
            else:
                await stream.send_all(ws.send(BytesMessage(data=data)))

        await ready_then_wait(send)

    async def trio_websocket_handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ready_then_wait(ws.send_message)

    async with trio.open_nursery() as nursery:
        if layer == "trio-websocket":
            server = await nursery.start(
                trio_websocket.serve_websocket, trio_websocket_handler, "127.0.0.1", 0, None
            )
            port = server.port
        elif layer == "websockets":
            from websockets.trio.server import serve

            async def websockets_handler(ws) -> None:  # type: ignore[no-untyped-def]
                await ready_then_wait(ws.send)

            server = await nursery.start(
                lambda task_status: serve(
                    websockets_handler, host="127.0.0.1", port=0, compression=None,
                    task_status=task_status,
                )
            )  # fmt: skip
            port = server.listeners[0].socket.getsockname()[1]
        else:
            prebuilt = layer == "prebuilt+stream"

            async def handler(stream: trio.SocketStream) -> None:
                await wsproto_handler(stream, prebuilt=prebuilt)

            listeners = await nursery.start(trio.serve_tcp, handler, 0)
            port = listeners[0].socket.getsockname()[1]
        sink = await trio.lowlevel.open_process(
            ["taskset", "-c", "1", "node", str(SINK), f"ws://127.0.0.1:{port}/", str(connections)]
        )
        await all_ready.wait()

        async def writer(send: Send, finished: list[None]) -> None:
            for _ in range(messages):
                await send(payload)
            finished.append(None)

        start = time.process_time()
        finished: list[None] = []
        async with trio.open_nursery() as writers:
            for send in ready:
                writers.start_soon(writer, send, finished)
        elapsed = time.process_time() - start
        sink.kill()
        await sink.wait()
        nursery.cancel_scope.cancel()
    return elapsed


def main() -> None:
    connections = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    frames = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    payload = b"\x84" + b"a" * 69
    payload *= frames
    os.sched_setaffinity(0, {0})
    layers = ["trio-websocket", "wsproto+stream", "prebuilt+stream"]
    try:
        import websockets.trio.server  # noqa: F401

        layers.append("websockets")
    except ImportError:
        pass
    for layer in layers:
        best = min(trio.run(run_layer, layer, connections, messages, payload) for _ in range(3))
        sends = connections * messages / best
        print(
            f"{layer:<16} conns={connections} frames/send={frames}  "
            f"sends/s={sends:,.0f}  frames/s={sends * frames:,.0f}  us/send={1e6 / sends:.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
