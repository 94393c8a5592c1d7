"""The client's side of the wire codec: frames (dicts) to WebSocket messages and back."""

from __future__ import annotations

import enum
import json
from typing import Any

import msgpack


class Encoding(enum.Enum):
    """The encoding a client speaks, named by its WebSocket subprotocol."""

    MSGPACK = "pubsub.v1.msgpack"
    JSON = "pubsub.v1.json"


def encode(frame: dict[str, Any], encoding: Encoding) -> bytes:
    """Encode one frame. Raises ``TypeError``/``ValueError`` for data the encoding cannot carry
    (bytes in JSON, for instance), so the caller learns at once.
    """
    if encoding is Encoding.MSGPACK:
        packed: bytes = msgpack.packb(frame)
        return packed
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def join(frames: list[bytes], encoding: Encoding) -> bytes | str:
    """Join encoded frames into one WebSocket message (a batch)."""
    if encoding is Encoding.MSGPACK:
        return b"".join(frames)
    return b"\n".join(frames).decode()


def decode(message: bytes | str) -> list[dict[str, Any]]:
    """The frames of one WebSocket message; values that are not maps are skipped."""
    if isinstance(message, str):
        values = [json.loads(line) for line in message.split("\n") if line.strip()]
    else:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(message))
        unpacker.feed(message)
        values = list(unpacker)
    return [value for value in values if isinstance(value, dict)]
