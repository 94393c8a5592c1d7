"""The wire codec, sans I/O: WebSocket messages in, validated commands out; frames out as bytes.

One WebSocket message carries one frame or a batch: consecutive msgpack values, or JSON
objects one per line. :func:`decode_batch` turns a message into a list of commands and
:class:`FrameError` values, in order, so the connection answers each bad frame and carries
on with the rest. Everything outbound is encoded here too, and a published message is encoded
once per encoding (:func:`encode_message_body`); only the short per-subscription tail
(:func:`encode_message_tail`) differs between subscribers.
"""

from __future__ import annotations

import base64
import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from broker.protocol.codes import ErrorCode as ErrorCode  # re-exported: FrameError.code
from broker.protocol.topics import InvalidTopic, is_wildcard, validate_pattern, validate_topic

MAX_ID = 2**64 - 1
#: How deep ``data`` may nest maps and arrays: deeper values cannot be re-encoded for every
#: encoding (msgpack's encoder stops at 512, Python's recursion near 1000), so they are refused
#: at the door rather than stored and half delivered.
MAX_DATA_DEPTH = 64


class Encoding(enum.Enum):
    """A connection's encoding, named by its WebSocket subprotocol."""

    MSGPACK = "pubsub.v1.msgpack"
    JSON = "pubsub.v1.json"

    @property
    def binary(self) -> bool:
        """True if frames travel in binary WebSocket messages."""
        return self is Encoding.MSGPACK


SUBPROTOCOLS: Final = tuple(encoding.value for encoding in Encoding)


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a topic's history: the last offset seen, in the numbering named by ``epoch``
    (what ``since`` carries)."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Sub:
    """``sub``: subscribe to a (valid) pattern; ``since`` asks for a replay (concrete topics);
    ``join_leave`` for join and leave frames (presence topics), ``info`` for the member."""

    id: int
    topic: str
    since: Position | None = None
    join_leave: bool = False
    info: Any = None


@dataclass(frozen=True, slots=True)
class Unsub:
    """``unsub``: drop the subscription made with exactly this pattern."""

    id: int
    topic: str


@dataclass(slots=True)  # not frozen: a frozen dataclass takes 4x as long to build, per publish
class Pub:
    """``pub``: publish ``data`` to a concrete topic; ``size`` is the frame's encoded size."""

    id: int | None
    topic: str
    data: Any
    size: int


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """``presence``: a page of up to ``limit`` members of a concrete topic after ``cursor``
    (``limit`` 0: the count only)."""

    id: int
    topic: str
    limit: int = 1000
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """``history``: up to ``limit`` kept messages of a concrete topic after ``since`` (by
    default from the oldest kept)."""

    id: int
    topic: str
    since: Position | None = None
    limit: int = 100


Command = Sub | Unsub | Pub | PresenceQuery | HistoryQuery
#: The most bytes a ``sub`` frame's ``info`` may take, msgpack-encoded.
MAX_INFO_SIZE = 1024


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame that cannot be executed: answer it with ``err`` and go on."""

    code: ErrorCode
    msg: str
    id: int | None = None


def decode_batch(message: bytes | str, encoding: Encoding) -> list[Command | FrameError]:
    """Decode one WebSocket message into its frames, each a command or a :class:`FrameError`.

    Frames are returned in order. Bytes that do not decode end the batch with a single
    ``bad_request`` for the undecodable rest; frames decoded before them still count.
    """
    if encoding is Encoding.MSGPACK:
        if not isinstance(message, bytes):
            return [FrameError(ErrorCode.BAD_REQUEST, "text message on the msgpack subprotocol")]
        return _decode_msgpack(message)
    if not isinstance(message, str):
        return [FrameError(ErrorCode.BAD_REQUEST, "binary message on the json subprotocol")]
    return _decode_json(message)


def _decode_msgpack(message: bytes) -> list[Command | FrameError]:
    if message.startswith(_PUB_WITHOUT_ID):
        pub = _decode_plain_pub(message)
        if pub is not None:
            return [pub]
    try:
        value = _unpackb(message, raw=False, strict_map_key=False)  # one frame: the most common
    except Exception:  # several frames, or bytes that do not decode: value by value
        return _decode_msgpack_values(message)
    return [validate_frame(value, len(message))]


#: How every client encodes a ``pub`` without ``id``: ``{"op": "pub", "topic": T, "data": D}``.
_PUB_WITHOUT_ID = b"\x83\xa2op\xa3pub\xa5topic"
_DATA_KEY = b"\xa4data"


def _decode_plain_pub(message: bytes) -> Pub | None:
    """The :class:`Pub` that ``message`` (starting with :data:`_PUB_WITHOUT_ID`) holds, read
    without building the map; None for anything not plainly one valid ``pub`` (a topic that is
    not a valid string of at most 255 bytes, more after ``data``, ``data`` nested too deep...):
    the general path then decodes it and says what is wrong. Same commands as the general
    path, without the map and its four strings."""
    at = len(_PUB_WITHOUT_ID)
    size = len(message)
    if size < at + 7:
        return None
    header = message[at]
    if 0xA0 <= header <= 0xBF:  # fixstr
        start, length = at + 1, header & 0x1F
    elif header == 0xD9 and size > at + 1:  # str 8
        start, length = at + 2, message[at + 1]
    else:
        return None
    end = start + length
    if message[end : end + 5] != _DATA_KEY:
        return None
    try:
        topic = message[start:end].decode()
        validate_topic(topic)
    except (UnicodeDecodeError, InvalidTopic):
        return None
    value = end + 5
    kind = message[value] if value < size else -1
    if kind == 0xC4 and size > value + 1 and message[value + 1] == size - value - 2:  # bin 8
        data: Any = message[value + 2 :]
    else:
        try:
            data = _unpackb(message[value:], raw=False, strict_map_key=False)
        except Exception:  # several values, or bytes that do not decode
            return None
        if type(data) in _CONTAINERS and not _within_depth(data):
            return None
    return Pub(None, topic, data, size)


def _decode_msgpack_values(message: bytes) -> list[Command | FrameError]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(message))
    unpacker.feed(message)
    frames: list[Command | FrameError] = []
    start = 0
    while start < len(message):
        try:
            value = unpacker.unpack()
        except msgpack.OutOfData:
            frames.append(_undecodable(len(message) - start, "truncated msgpack value"))
            return frames
        except Exception as exc:  # msgpack raises several types for malformed input
            frames.append(_undecodable(len(message) - start, str(exc) or type(exc).__name__))
            return frames
        end = unpacker.tell()
        frames.append(validate_frame(value, end - start))
        start = end
    return frames


_unpackb = msgpack.unpackb


def _decode_json(message: str) -> list[Command | FrameError]:
    frames: list[Command | FrameError] = []
    lines = message.split("\n")
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            value = STRICT_JSON.decode(line)
        except (ValueError, RecursionError) as exc:
            rest = sum(len(rest_line) + 1 for rest_line in lines[index:]) - 1
            frames.append(_undecodable(rest, f"invalid JSON: {exc}"))
            return frames
        frame = validate_frame(value, len(line) if line.isascii() else len(line.encode()))
        if not spells_text(line, value):
            frame = FrameError(ErrorCode.BAD_REQUEST, "a lone surrogate is not text", frame.id)
        frames.append(frame)
    return frames


def spells_text(json_text: str, value: Any) -> bool:
    """Whether ``value``, decoded from ``json_text``, holds only text: JSON escapes can spell
    a lone surrogate, which no encoder can send on."""
    if not _SURROGATE_ESCAPE.search(json_text):
        return True
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Strict JSON: NaN and Infinity are not numbers a JSON peer could read back.
def _msgpack_int(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"integer {text[:30]} is outside what msgpack carries (-2^63..2^64-1)")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is too large for a double")
    return value


#: The protocol's strict JSON (docs/protocol.md): what a peer could not read back (NaN,
#: Infinity, 1e999, integers msgpack cannot carry) is refused with a ValueError.
STRICT_JSON = json.JSONDecoder(
    parse_constant=_reject_constant, parse_int=_msgpack_int, parse_float=_finite_float
)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _undecodable(size: int, why: str) -> FrameError:
    return FrameError(ErrorCode.BAD_REQUEST, f"undecodable frame ({size} bytes dropped): {why}")


def validate_frame(value: Any, size: int) -> Command | FrameError:
    """Check one decoded frame against the protocol and build its command."""
    if not isinstance(value, dict):
        return FrameError(ErrorCode.BAD_REQUEST, f"a frame must be a map, not {_kind(value)}")
    raw_id = value.get("id")
    frame_id: int | None = None
    if raw_id is not None:
        if type(raw_id) is not int or not 0 <= raw_id <= MAX_ID:
            return FrameError(ErrorCode.BAD_REQUEST, "'id' must be an unsigned 64-bit integer")
        frame_id = raw_id
    op = value.get("op")
    if not isinstance(op, str):
        return FrameError(ErrorCode.BAD_REQUEST, "missing 'op' (a string)", frame_id)
    if op not in ("sub", "unsub", "pub", "presence", "history"):
        return FrameError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}", frame_id)
    if op != "pub" and frame_id is None:
        return FrameError(ErrorCode.BAD_REQUEST, f"'{op}' needs an 'id'")
    topic = value.get("topic")
    if not isinstance(topic, str):
        return FrameError(ErrorCode.BAD_REQUEST, "missing 'topic' (a string)", frame_id)
    if (op == "presence" or op == "history") and is_wildcard(topic):
        return FrameError(
            ErrorCode.INVALID_TOPIC,
            f"'{op}' answers for one concrete topic, not for the pattern {topic!r}",
            frame_id,
        )
    try:
        if op == "pub" or op == "presence" or op == "history":
            validate_topic(topic)
        else:
            validate_pattern(topic)
    except InvalidTopic as exc:
        return FrameError(ErrorCode.INVALID_TOPIC, str(exc), frame_id)
    if op == "pub":
        if "data" not in value:
            return FrameError(ErrorCode.BAD_REQUEST, "'pub' needs 'data'", frame_id)
        data = value["data"]
        if type(data) in _CONTAINERS and not _within_depth(data):
            return FrameError(
                ErrorCode.BAD_REQUEST,
                f"'data' nests maps and arrays more than {MAX_DATA_DEPTH} deep",
                frame_id,
            )
        return Pub(frame_id, topic, data, size)
    assert frame_id is not None
    if op == "sub":
        since = value.get("since")
        if since is None and len(value) <= 3:
            return Sub(frame_id, topic)  # the usual sub: op, id, topic
        return _validate_sub(frame_id, topic, since, value)
    if op == "presence":
        return _validate_presence(frame_id, topic, value)
    if op == "history":
        return _validate_history(frame_id, topic, value)
    return Unsub(frame_id, topic)


def _validate_sub(
    frame_id: int, topic: str, since: Any, value: dict[Any, Any]
) -> Command | FrameError:
    join_leave = value.get("join_leave", False)
    if type(join_leave) is not bool:
        return FrameError(ErrorCode.BAD_REQUEST, "'join_leave' must be true or false", frame_id)
    info = value.get("info")
    if info is not None:
        if type(info) in _CONTAINERS and not _within_depth(info):
            return FrameError(ErrorCode.BAD_REQUEST, "'info' nests too deep", frame_id)
        size = len(_pack(info))
        if size > MAX_INFO_SIZE:
            return FrameError(
                ErrorCode.TOO_LARGE,
                f"'info' takes {size} bytes; at most {MAX_INFO_SIZE} are allowed",
                frame_id,
            )
    position = None
    if since is not None:
        checked = _validate_since(frame_id, topic, since)
        if isinstance(checked, FrameError):
            return checked
        position = checked
    return Sub(frame_id, topic, position, join_leave, info)


def _validate_presence(frame_id: int, topic: str, value: dict[Any, Any]) -> Command | FrameError:
    limit = value.get("limit", 1000)
    if type(limit) is not int or not 0 <= limit <= 1000:
        return FrameError(ErrorCode.BAD_REQUEST, "'limit' must be an integer 0..1000", frame_id)
    cursor = value.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        return FrameError(
            ErrorCode.BAD_REQUEST, "'cursor' must be a string from an answer", frame_id
        )
    return PresenceQuery(frame_id, topic, limit, cursor)


_CONTAINERS = (dict, list, tuple)  # tuple: a msgpack array used as a map key


def _within_depth(value: Any) -> bool:
    """Whether ``value`` nests containers (keys too) at most :data:`MAX_DATA_DEPTH` deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DATA_DEPTH:
            return False
        children = [*item.keys(), *item.values()] if type(item) is dict else item
        stack.extend((child, depth + 1) for child in children if type(child) in _CONTAINERS)
    return True


def _validate_history(frame_id: int, topic: str, value: dict[Any, Any]) -> Command | FrameError:
    limit = value.get("limit", 100)
    if type(limit) is not int or not 1 <= limit <= 1000:
        return FrameError(ErrorCode.BAD_REQUEST, "'limit' must be an integer 1..1000", frame_id)
    since = value.get("since")
    if since is None:
        return HistoryQuery(frame_id, topic, None, limit)
    position = _validate_since(frame_id, topic, since)
    if isinstance(position, FrameError):
        return position
    return HistoryQuery(frame_id, topic, position, limit)


def _validate_since(frame_id: int, topic: str, since: Any) -> Position | FrameError:
    if is_wildcard(topic):
        return FrameError(
            ErrorCode.BAD_REQUEST,
            f"'since' needs a concrete topic, not the pattern {topic!r}: recover each topic "
            "with its own subscription",
            frame_id,
        )
    epoch = since.get("epoch") if isinstance(since, dict) else None
    offset = since.get("offset") if isinstance(since, dict) else None
    if not isinstance(epoch, str) or type(offset) is not int or not 0 <= offset <= MAX_ID:
        return FrameError(
            ErrorCode.BAD_REQUEST,
            "'since' must be a map {epoch: string, offset: unsigned integer}",
            frame_id,
        )
    return Position(epoch, offset)


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bytes: "binary", int: "an integer"}.get(
        type(value), type(value).__name__
    )


# --- encoding -------------------------------------------------------------------------------


def encode_frame(frame: dict[str, Any], encoding: Encoding) -> bytes:
    """Encode one control frame (``ok``, ``err``, ``lag``)."""
    if encoding is Encoding.MSGPACK:
        return _pack(frame)
    return _json_dumps(frame).encode()


def encode_ok(frame_id: int, encoding: Encoding, **fields: Any) -> bytes:
    """Encode ``ok`` for the command with ``frame_id``, with any extra fields."""
    return encode_frame({"op": "ok", "id": frame_id, **fields}, encoding)


def encode_err(error: FrameError, encoding: Encoding) -> bytes:
    """Encode ``err`` for ``error``; ``id`` is left out when the bad frame had none."""
    frame: dict[str, Any] = {"op": "err", "code": str(error.code), "msg": error.msg}
    if error.id is not None:
        frame["id"] = error.id
    return encode_frame(frame, encoding)


def encode_lag(pattern: str, dropped: int, encoding: Encoding) -> bytes:
    """Encode ``lag``: ``dropped`` messages for subscription ``pattern`` were dropped."""
    return encode_frame({"op": "lag", "sub": pattern, "dropped": dropped}, encoding)


# One Packer for every encode (``packb`` builds a new one per call); its buffer is reset after
# each pack, also when packing fails.
_PACK = msgpack.Packer().pack


def _pack(value: Any) -> bytes:
    packed: bytes = _PACK(value)
    return packed


def pack_data(data: Any) -> bytes:
    """The msgpack encoding of a message's ``data`` (what history keeps)."""
    return _pack(data)


def unpack_data(packed: bytes) -> Any:
    """The ``data`` value of :func:`pack_data`'s output."""
    return msgpack.unpackb(packed, raw=False, strict_map_key=False)


_MSGPACK: Final = Encoding.MSGPACK  # a global read: an Enum member read costs 10x
_MSGPACK_OP_MSG: Final = _pack("op") + _pack("msg")
_MSGPACK_TOPIC_KEY: Final = _pack("topic")
_MSGPACK_DATA_KEY: Final = _pack("data")
_MSGPACK_OFFSET_KEY: Final = _pack("offset")
_MSGPACK_SUB_KEY: Final = _pack("sub")


def encode_message_body(
    topic: str,
    data: Any,
    encoding: Encoding,
    offset: int | None = None,
    packed: bytes | None = None,
) -> bytes:
    """Encode the shared part of a ``msg`` frame: everything except ``sub``.

    ``offset`` is given for topics with history. ``packed``, if given, is ``pack_data(data)``
    already computed (msgpack then reuses it). ``body + encode_message_tail(pattern, encoding)``
    is one complete ``msg`` frame.
    """
    if encoding is _MSGPACK:
        parts = [
            b"\x84" if offset is None else b"\x85",
            _MSGPACK_OP_MSG,
            _MSGPACK_TOPIC_KEY,
            _pack(topic),
            _MSGPACK_DATA_KEY,
            packed if packed is not None else _pack(data),
        ]
        if offset is not None:
            parts += (_MSGPACK_OFFSET_KEY, _pack(offset))
        return b"".join(parts)
    head = f'{{"op":"msg","topic":{_json_dumps(topic)},"data":{_json_dumps(data)},'
    return (head if offset is None else f'{head}"offset":{offset},').encode()


def encode_presence_body(op: str, topic: str, member: dict[str, Any], encoding: Encoding) -> bytes:
    """Encode a ``join`` or ``leave`` frame (``op``) but its ``sub``: the
    :func:`encode_message_tail` of each subscription completes it, as for ``msg``."""
    if encoding is _MSGPACK:
        return b"".join(
            (b"\x84", _pack("op"), _pack(op), _MSGPACK_TOPIC_KEY, _pack(topic), _pack("member"),
             _pack(member))
        )  # fmt: skip
    return f'{{"op":"{op}","topic":{_json_dumps(topic)},"member":{_json_dumps(member)},'.encode()


def encode_message_tail(pattern: str, encoding: Encoding) -> bytes:
    """Encode the per-subscription part of a ``msg`` frame (its ``sub``), once per subscription."""
    if encoding is Encoding.MSGPACK:
        return _MSGPACK_SUB_KEY + _pack(pattern)
    return f'"sub":{_json_dumps(pattern)}}}'.encode()


def join_batch(frames: list[bytes], encoding: Encoding) -> bytes | str:
    """Join encoded frames into the payload of one WebSocket message."""
    if encoding is Encoding.MSGPACK:
        return b"".join(frames)
    return b"\n".join(frames).decode()


def _json_dumps(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(value), separators=(",", ":"), ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    """Map msgpack-only values onto JSON: bytes become base64 strings, keys become strings."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {_json_key(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):  # an ExtType is a tuple: [code, base64 data]
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)  # msgpack timestamps have no JSON form


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", "backslashreplace")
    return json.dumps(_jsonable(key))
