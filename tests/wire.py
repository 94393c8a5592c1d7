"""A bare protocol client for end-to-end tests: frames in, frames out, nothing hidden."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

Frame = dict[str, Any]


class WireClient:
    """Sends frames (one batch per call) and reads frames back one at a time."""

    def __init__(self, websocket: WebSocketConnection, encoding: str) -> None:
        self.websocket = websocket
        self.encoding = encoding
        self.messages_received = 0
        self.timeout = 5.0  # seconds any one read may take before the test fails
        self._pending: list[Frame] = []

    def encode(self, *frames: Any) -> bytes | str:
        if self.encoding == "json":
            return "\n".join(json.dumps(frame) for frame in frames)
        return b"".join(msgpack.packb(frame) for frame in frames)

    async def send(self, *frames: Any) -> None:
        await self.websocket.send_message(self.encode(*frames))

    async def receive_batch(self) -> list[Frame]:
        """The frames of the next WebSocket message."""
        message = await self.websocket.get_message()
        self.messages_received += 1
        if isinstance(message, str):
            return [json.loads(line) for line in message.split("\n")]
        return _unpack(message)

    async def next(self) -> Frame:
        """The next frame, whichever message it came in."""
        with trio.fail_after(self.timeout):
            while not self._pending:
                self._pending.extend(await self.receive_batch())
        return self._pending.pop(0)

    async def expect(self, op: str, **fields: Any) -> Frame:
        """The next frame, asserting its ``op`` and any given fields."""
        frame = await self.next()
        assert frame.get("op") == op, f"expected {op} {fields}, got {frame}"
        for key, value in fields.items():
            assert frame.get(key) == value, f"expected {key}={value!r} in {frame}"
        return frame

    async def reply(self, id: int) -> Frame:
        """The ``ok``/``err`` for ``id``; frames before it stay queued for :meth:`next`."""
        skipped: list[Frame] = []
        while True:
            frame = await self.next()
            if frame.get("op") in ("ok", "err") and frame.get("id") == id:
                self._pending[:0] = skipped
                return frame
            skipped.append(frame)

    async def subscribe(self, pattern: str, id: int = 1) -> None:
        await self.send({"op": "sub", "id": id, "topic": pattern})
        reply = await self.reply(id)
        assert reply["op"] == "ok", reply

    async def publish(self, topic: str, data: Any, id: int = 1) -> None:
        await self.send({"op": "pub", "id": id, "topic": topic, "data": data})
        reply = await self.reply(id)
        assert reply["op"] == "ok", reply

    async def expect_close(self) -> int:
        """Read until the broker closes the connection; return the close code."""
        from trio_websocket import ConnectionClosed

        with trio.fail_after(self.timeout):
            try:
                while True:
                    await self.websocket.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason.code


def _unpack(message: bytes) -> list[Frame]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(message)
    return list(unpacker)


@asynccontextmanager
async def connect(
    url: str,
    encoding: str = "msgpack",
    *,
    subprotocols: list[str] | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[WireClient]:
    """Open a WebSocket to the broker offering the given encoding's subprotocol."""
    if subprotocols is None:
        subprotocols = [f"pubsub.v1.{encoding}"]
    async with open_websocket_url(
        url,
        ssl_context,
        subprotocols=subprotocols,
        extra_headers=extra_headers,
        max_message_size=16 * 1024 * 1024,
    ) as websocket:
        yield WireClient(websocket, encoding)


async def rejection(url: str, **kwargs: Any) -> ConnectionRejected:
    """Connect expecting the broker to refuse the handshake; the refusal (status, headers)."""
    try:
        async with connect(url, **kwargs):
            pass
    except ConnectionRejected as exc:
        return exc
    raise AssertionError(f"the broker accepted a connection to {url} it should refuse")


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    """The ``Authorization`` header for ``token``."""
    return [(b"Authorization", f"Bearer {token}".encode())]
