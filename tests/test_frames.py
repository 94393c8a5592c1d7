"""broker.protocol.frames: decoding batches, validating frames, encoding replies and msgs."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.protocol import frames
from broker.protocol.frames import (
    MAX_ID,
    Encoding,
    ErrorCode,
    FrameError,
    Position,
    Pub,
    Sub,
    Unsub,
    decode_batch,
    encode_err,
    encode_lag,
    encode_message_body,
    encode_message_tail,
    encode_ok,
    join_batch,
    validate_frame,
)
from broker.protocol.topics import MAX_TOPIC_BYTES

MSGPACK, JSON = Encoding.MSGPACK, Encoding.JSON


def pack(*frames: Any) -> bytes:
    return b"".join(msgpack.packb(frame) for frame in frames)


def lines(*frames: Any) -> str:
    return "\n".join(json.dumps(frame) for frame in frames)


def decode_frames(data: bytes | str, encoding: Encoding) -> list[Any]:
    """Decode what the broker sends, as a client would: every frame of one WebSocket message."""
    if encoding is MSGPACK:
        assert isinstance(data, bytes)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(data)
        return list(unpacker)
    text = data if isinstance(data, str) else data.decode()
    return [json.loads(line) for line in text.split("\n")]


def encode(frames: list[Any], encoding: Encoding) -> bytes | str:
    return pack(*frames) if encoding is MSGPACK else lines(*frames)


SUB = {"op": "sub", "id": 1, "topic": "chat.*"}
PUB = {"op": "pub", "topic": "chat.a", "data": "hi"}

# --- decode_batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_single_frame_decodes_to_its_command(encoding: Encoding) -> None:
    assert decode_batch(encode([SUB], encoding), encoding) == [Sub(1, "chat.*")]


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_batch_decodes_every_frame_in_order(encoding: Encoding) -> None:
    frames = [
        SUB,
        {"op": "pub", "id": 2, "topic": "chat.a", "data": [1, 2]},
        {"op": "unsub", "id": 3, "topic": "chat.*"},
        PUB,
    ]
    decoded = decode_batch(encode(frames, encoding), encoding)
    assert [type(command) for command in decoded] == [Sub, Pub, Unsub, Pub]
    assert [getattr(command, "id", None) for command in decoded] == [1, 2, 3, None]
    pub = decoded[1]
    assert isinstance(pub, Pub)
    assert (pub.id, pub.topic, pub.data) == (2, "chat.a", [1, 2])


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_bad_frame_in_a_batch_gets_an_error_and_the_rest_still_count(encoding: Encoding) -> None:
    decoded = decode_batch(encode([SUB, [1, 2], PUB], encoding), encoding)
    assert decoded[0] == Sub(1, "chat.*")
    assert isinstance(decoded[1], FrameError)
    assert decoded[1].code is ErrorCode.BAD_REQUEST
    assert isinstance(decoded[2], Pub)


def test_pub_size_is_the_encoded_size_of_its_own_frame() -> None:
    first, second = msgpack.packb(SUB), msgpack.packb(PUB)
    assert decode_batch(first + second, MSGPACK)[1] == Pub(None, "chat.a", "hi", len(second))
    text = lines(SUB, PUB)
    assert decode_batch(text, JSON)[1] == Pub(None, "chat.a", "hi", len(json.dumps(PUB)))


@pytest.mark.parametrize(
    "rest",
    [
        b"\xc1" + pack(SUB),  # 0xc1 is never used in msgpack; what follows is dropped too
        b"\x92\x01",  # an array of two with one element: truncated
        b"\xa5ab",  # a 5-byte string with 2 bytes
        b"\x81\xa1a",  # a map missing its value
    ],
)
def test_undecodable_msgpack_rest_ends_the_batch_with_one_bad_request(rest: bytes) -> None:
    decoded = decode_batch(pack(SUB, PUB) + rest, MSGPACK)
    assert decoded[:2] == [Sub(1, "chat.*"), Pub(None, "chat.a", "hi", len(msgpack.packb(PUB)))]
    assert len(decoded) == 3
    error = decoded[2]
    assert isinstance(error, FrameError)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.id is None
    assert "undecodable" in error.msg


def test_invalid_utf8_string_in_msgpack_is_undecodable_not_a_crash() -> None:
    decoded = decode_batch(pack(SUB) + b"\xa2\xff\xfe", MSGPACK)
    assert decoded[0] == Sub(1, "chat.*")
    assert [type(frame) for frame in decoded] == [Sub, FrameError]


@pytest.mark.parametrize("rest", ["{", "not json", '{"op": "pub"', "[1,", '{"a": NaN'])
def test_undecodable_json_rest_ends_the_batch_with_one_bad_request(rest: str) -> None:
    decoded = decode_batch(lines(SUB, PUB) + "\n" + rest + "\n" + lines(SUB, SUB), JSON)
    assert [type(frame) for frame in decoded] == [Sub, Pub, FrameError]
    error = decoded[2]
    assert isinstance(error, FrameError)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.msg.startswith("undecodable frame (")


def test_undecodable_rest_counts_the_bytes_dropped() -> None:
    rest = "oops\n" + lines(SUB)
    decoded = decode_batch(lines(SUB) + "\n" + rest, JSON)
    assert decoded[-1] == FrameError(
        ErrorCode.BAD_REQUEST,
        f"undecodable frame ({len(rest)} bytes dropped): invalid JSON: "
        "Expecting value: line 1 column 1 (char 0)",
    )


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_non_finite_literals_are_undecodable(literal: str) -> None:
    # Strict JSON: a JSON subscriber could not read such a number back.
    (error,) = decode_batch(f'{{"op":"pub","topic":"a","data":{literal}}}', JSON)
    assert isinstance(error, FrameError)
    assert error.code is ErrorCode.BAD_REQUEST
    assert f"{literal} is not JSON" in error.msg


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1" * 400 + ".0"])
def test_json_numbers_too_large_for_a_double_are_undecodable(number: str) -> None:
    (error,) = decode_batch(f'{{"op":"pub","topic":"a","data":{number}}}', JSON)
    assert isinstance(error, FrameError) and "too large for a double" in error.msg


@pytest.mark.parametrize("number", [str(2**64), str(-(2**63) - 1), "1" * 400])
def test_json_integers_msgpack_cannot_carry_are_undecodable(number: str) -> None:
    (error,) = decode_batch(f'{{"op":"pub","topic":"a","data":[{number}]}}', JSON)
    assert isinstance(error, FrameError)
    assert "outside what msgpack carries" in error.msg


def test_json_integers_at_the_msgpack_limits_are_fine() -> None:
    (pub,) = decode_batch(f'{{"op":"pub","topic":"a","data":[{2**64 - 1},{-(2**63)}]}}', JSON)
    assert isinstance(pub, Pub)
    assert pub.data == [2**64 - 1, -(2**63)]


def test_json_lone_surrogate_is_bad_request_with_the_frames_id() -> None:
    (error,) = decode_batch('{"op":"pub","id":4,"topic":"a","data":["\\ud800"]}', JSON)
    assert error == FrameError(ErrorCode.BAD_REQUEST, "a lone surrogate is not text", 4)


def test_json_escaped_surrogate_pair_is_one_character() -> None:
    (pub,) = decode_batch('{"op":"pub","topic":"a","data":"\\ud83d\\ude00"}', JSON)
    assert isinstance(pub, Pub)
    assert pub.data == "\U0001f600"


@pytest.mark.parametrize("text", ["", "\n", "\n\n   \n", " \r\n\t"])
def test_blank_json_message_is_no_frames(text: str) -> None:
    assert decode_batch(text, JSON) == []


def test_blank_json_lines_between_frames_are_skipped() -> None:
    text = "\n\n" + json.dumps(SUB) + "\n  \n\n" + json.dumps(PUB) + "\n"
    assert [type(frame) for frame in decode_batch(text, JSON)] == [Sub, Pub]


def test_json_frames_may_end_with_crlf() -> None:
    assert decode_batch(json.dumps(SUB) + "\r\n", JSON) == [Sub(1, "chat.*")]


def test_empty_msgpack_message_is_no_frames() -> None:
    assert decode_batch(b"", MSGPACK) == []


def test_text_message_on_msgpack_is_one_bad_request() -> None:
    assert decode_batch(lines(SUB), MSGPACK) == [
        FrameError(ErrorCode.BAD_REQUEST, "text message on the msgpack subprotocol")
    ]


def test_binary_message_on_json_is_one_bad_request() -> None:
    assert decode_batch(lines(SUB).encode(), JSON) == [
        FrameError(ErrorCode.BAD_REQUEST, "binary message on the json subprotocol")
    ]


def test_deeply_nested_json_is_a_bad_request_not_a_crash() -> None:
    decoded = decode_batch('{"op":"pub","topic":"a","data":' + "[" * 100_000, JSON)
    assert [type(frame) for frame in decoded] == [FrameError]


# --- validate_frame -------------------------------------------------------------------------


def check(value: Any) -> Any:
    return validate_frame(value, 10)


def test_valid_frames_become_commands() -> None:
    assert check({"op": "sub", "id": 0, "topic": "a.>"}) == Sub(0, "a.>")
    since = {"epoch": "e", "offset": 3}
    command = check({"op": "sub", "id": 1, "topic": "a", "since": since})
    assert command == Sub(1, "a", Position("e", 3))
    assert check({"op": "unsub", "id": MAX_ID, "topic": "a.*"}) == Unsub(MAX_ID, "a.*")
    assert check({"op": "pub", "topic": "a", "data": None}) == Pub(None, "a", None, 10)
    assert check({"op": "pub", "id": 7, "topic": "a", "data": b"\x00"}) == Pub(7, "a", b"\x00", 10)


def test_unknown_extra_keys_are_ignored() -> None:
    assert check({"op": "sub", "id": 1, "topic": "a", "x": 1, 5: "int key"}) == Sub(1, "a")


def error_of(value: Any) -> FrameError:
    result = check(value)
    assert isinstance(result, FrameError), result
    return result


@pytest.mark.parametrize("value", [[1], "sub", b"sub", 3, None, 1.5, True])
def test_frame_that_is_not_a_map_is_a_bad_request(value: Any) -> None:
    error = error_of(value)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.id is None
    assert "must be a map" in error.msg


@pytest.mark.parametrize("frame", [{}, {"id": 1, "topic": "a"}, {"op": 1, "id": 1}, {"op": None}])
def test_missing_or_mistyped_op_is_a_bad_request(frame: dict[str, Any]) -> None:
    error = error_of(frame)
    assert (error.code, error.msg) == (ErrorCode.BAD_REQUEST, "missing 'op' (a string)")


@pytest.mark.parametrize("bad_id", [-1, MAX_ID + 1, 1.0, "1", True, False, [1], b"\x01"])
def test_id_that_is_not_an_unsigned_64_bit_int_is_a_bad_request(bad_id: Any) -> None:
    error = error_of({"op": "sub", "id": bad_id, "topic": "a"})
    assert error.code is ErrorCode.BAD_REQUEST
    assert "'id'" in error.msg
    assert error.id is None  # an unusable id is not echoed


@pytest.mark.parametrize("op", ["subscribe", "ping", "", "SUB", "ok", "msg"])
def test_unknown_op_is_unknown_op_and_echoes_the_id(op: str) -> None:
    assert error_of({"op": op, "id": 9}) == FrameError(
        ErrorCode.UNKNOWN_OP, f"unknown op {op!r}", 9
    )
    assert error_of({"op": op}).id is None


@pytest.mark.parametrize("op", ["sub", "unsub"])
def test_sub_and_unsub_need_an_id(op: str) -> None:
    assert error_of({"op": op, "topic": "a"}) == FrameError(
        ErrorCode.BAD_REQUEST, f"'{op}' needs an 'id'"
    )


@pytest.mark.parametrize("op", ["sub", "unsub", "pub"])
@pytest.mark.parametrize("topic", [None, 5, b"a", ["a"]])
def test_missing_or_mistyped_topic_is_a_bad_request(op: str, topic: Any) -> None:
    frame: dict[str, Any] = {"op": op, "id": 4, "data": 1}
    if topic is not None:
        frame["topic"] = topic
    assert error_of(frame) == FrameError(ErrorCode.BAD_REQUEST, "missing 'topic' (a string)", 4)


def test_pub_without_data_is_a_bad_request() -> None:
    assert error_of({"op": "pub", "id": 2, "topic": "a"}) == FrameError(
        ErrorCode.BAD_REQUEST, "'pub' needs 'data'", 2
    )


@pytest.mark.parametrize("topic", ["a.*", "a.>", "*", ">", "a*", "a.b>"])
def test_publishing_to_a_wildcard_is_invalid_topic(topic: str) -> None:
    error = error_of({"op": "pub", "id": 3, "topic": topic, "data": 1})
    assert (error.code, error.id) == (ErrorCode.INVALID_TOPIC, 3)


@pytest.mark.parametrize("op", ["sub", "unsub", "pub"])
@pytest.mark.parametrize(
    "topic",
    ["", ".", "a.", ".a", "a..b", "a b", "a\tb", "a\x00b", "x" * (MAX_TOPIC_BYTES + 1)],
)
def test_malformed_topic_is_invalid_topic_for_every_op(op: str, topic: str) -> None:
    error = error_of({"op": op, "id": 5, "topic": topic, "data": 1})
    assert (error.code, error.id) == (ErrorCode.INVALID_TOPIC, 5)


@pytest.mark.parametrize("op", ["sub", "unsub"])
@pytest.mark.parametrize("pattern", [">.a", "a.>.b", "a*", "a.b*c", "a.>x"])
def test_bad_pattern_is_invalid_topic(op: str, pattern: str) -> None:
    error = error_of({"op": op, "id": 6, "topic": pattern})
    assert (error.code, error.id) == (ErrorCode.INVALID_TOPIC, 6)


def test_topic_of_exactly_255_bytes_is_valid_and_256_is_not() -> None:
    topic = "é" * 127 + "a"  # 255 bytes of UTF-8
    assert isinstance(check({"op": "pub", "topic": topic, "data": 0}), Pub)
    error = error_of({"op": "pub", "topic": topic + "a", "data": 0})
    assert error.code is ErrorCode.INVALID_TOPIC
    assert "256 bytes" in error.msg


# --- encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_err_echoes_the_id_of_the_bad_frame(encoding: Encoding) -> None:
    error = error_of({"op": "nope", "id": 12})
    assert decode_frames(encode_err(error, encoding), encoding) == [
        {"op": "err", "id": 12, "code": "unknown_op", "msg": "unknown op 'nope'"}
    ]


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_err_has_no_id_when_the_bad_frame_had_none(encoding: Encoding) -> None:
    (frame,) = decode_frames(encode_err(error_of({"op": "nope"}), encoding), encoding)
    assert frame == {"op": "err", "code": "unknown_op", "msg": "unknown op 'nope'"}


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_id_zero_is_echoed(encoding: Encoding) -> None:
    (frame,) = decode_frames(encode_err(error_of({"op": "nope", "id": 0}), encoding), encoding)
    assert frame["id"] == 0


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_ok_and_lag_frames(encoding: Encoding) -> None:
    assert decode_frames(encode_ok(MAX_ID, encoding, epoch="e", offset=0), encoding) == [
        {"op": "ok", "id": MAX_ID, "epoch": "e", "offset": 0}
    ]
    assert decode_frames(encode_lag("a.>", 3, encoding), encoding) == [
        {"op": "lag", "sub": "a.>", "dropped": 3}
    ]


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_message_body_plus_tail_is_one_complete_msg_frame(encoding: Encoding) -> None:
    body = encode_message_body("chat.ü", {"text": "héllo", "n": [1, 2.5, None]}, encoding)
    frame = body + encode_message_tail("chat.*", encoding)
    assert decode_frames(frame, encoding) == [
        {
            "op": "msg",
            "topic": "chat.ü",
            "sub": "chat.*",
            "data": {"text": "héllo", "n": [1, 2.5, None]},
        }
    ]


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_one_body_serves_many_subscriptions(encoding: Encoding) -> None:
    body = encode_message_body("a.b", 1, encoding)
    frames = [body + encode_message_tail(pattern, encoding) for pattern in ("a.b", "a.*", ">")]
    decoded = decode_frames(join_batch(frames, encoding), encoding)
    assert [frame["sub"] for frame in decoded] == ["a.b", "a.*", ">"]
    assert all(frame["topic"] == "a.b" and frame["data"] == 1 for frame in decoded)


@pytest.mark.parametrize("encoding", [MSGPACK, JSON])
def test_joined_batch_decodes_back_through_decode_batch(encoding: Encoding) -> None:
    frames = [
        msgpack.packb(frame) if encoding is MSGPACK else json.dumps(frame).encode()
        for frame in (SUB, PUB)
    ]
    payload = join_batch(frames, encoding)
    assert isinstance(payload, bytes) is encoding.binary
    assert [type(frame) for frame in decode_batch(payload, encoding)] == [Sub, Pub]


def test_json_msg_keeps_non_ascii_as_is() -> None:
    body = encode_message_body("a", "ü", JSON)
    assert "ü".encode() in body


def json_data_of(data: Any) -> Any:
    frame = encode_message_body("t", data, JSON) + encode_message_tail("t", JSON)
    return json.loads(frame)["data"]


def test_bytes_reach_json_subscribers_as_base64() -> None:
    assert json_data_of(b"\x00\xffhi") == "AP9oaQ=="
    assert json_data_of({"blob": bytearray(b"\x01")}) == {"blob": "AQ=="}


def test_non_string_map_keys_become_json_strings() -> None:
    assert json_data_of({1: "a", 2.5: "b", None: "c", False: "d", b"k": "e"}) == {
        "1": "a",
        "2.5": "b",
        "null": "c",
        "false": "d",
        "k": "e",
    }


def test_map_with_an_array_key_is_a_bad_request_not_a_crash() -> None:
    # Python cannot hold a list as a dict key, so such a map does not decode.
    (error,) = decode_batch(pack({"op": "pub", "topic": "t", "data": {(1, "x"): 0}}), MSGPACK)
    assert isinstance(error, FrameError)
    assert error.code is ErrorCode.BAD_REQUEST


def test_non_finite_floats_become_null_for_json() -> None:
    assert json_data_of([math.nan, math.inf, -math.inf, 1.5]) == [None, None, None, 1.5]


def test_non_finite_float_in_msgpack_stays_as_is() -> None:
    frame = encode_message_body("t", math.inf, MSGPACK) + encode_message_tail("t", MSGPACK)
    assert decode_frames(frame, MSGPACK)[0]["data"] == math.inf


def test_msgpack_ext_reaches_json_as_its_code_and_base64_data() -> None:
    assert json_data_of(msgpack.ExtType(5, b"\x01\x02")) == [5, "AQI="]


def test_msgpack_timestamp_reaches_json_as_its_repr() -> None:
    (pub,) = decode_batch(
        pack({"op": "pub", "topic": "t", "data": msgpack.Timestamp(1, 2)}), MSGPACK
    )
    assert isinstance(pub, Pub)
    assert json_data_of(pub.data) == repr(msgpack.Timestamp(1, 2))


def test_a_published_ext_value_reaches_msgpack_subscribers_unchanged() -> None:
    ext = msgpack.ExtType(5, b"\x01\x02")
    (pub,) = decode_batch(pack({"op": "pub", "topic": "t", "data": ext}), MSGPACK)
    assert isinstance(pub, Pub)
    frame = encode_message_body("t", pub.data, MSGPACK) + encode_message_tail("t", MSGPACK)
    assert decode_frames(frame, MSGPACK)[0]["data"] == ext


def test_msgpack_only_values_published_with_msgpack_reach_json_subscribers() -> None:
    data = {"raw": b"\x00", 7: [1.5, math.nan], "nested": {b"k": {3: b"v"}}}
    (pub,) = decode_batch(pack({"op": "pub", "topic": "t", "data": data}), MSGPACK)
    assert isinstance(pub, Pub)
    assert json_data_of(pub.data) == {
        "raw": "AA==",
        "7": [1.5, None],
        "nested": {"k": {"3": "dg=="}},
    }


# --- round trips ----------------------------------------------------------------------------

segments = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cf", "Cs", "Zs", "Zl", "Zp")).filter(
        lambda char: char not in ".*>" and not char.isspace()
    ),
    min_size=1,
    max_size=8,
)
topics = (
    st.lists(segments, min_size=1, max_size=6)
    .map(".".join)
    .filter(lambda topic: len(topic.encode()) <= MAX_TOPIC_BYTES)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)  # fmt: skip
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary()
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(-(2**63), 2**64 - 1), children,
                      max_size=4),
    max_leaves=20,
)  # fmt: skip


@given(topic=topics, pattern=topics, data=json_values)
def test_json_msg_round_trips(topic: str, pattern: str, data: Any) -> None:
    frame = encode_message_body(topic, data, JSON) + encode_message_tail(pattern, JSON)
    assert json.loads(frame) == {"op": "msg", "topic": topic, "sub": pattern, "data": data}


@given(topic=topics, pattern=topics, data=msgpack_values)
def test_msgpack_msg_round_trips(topic: str, pattern: str, data: Any) -> None:
    frame = encode_message_body(topic, data, MSGPACK) + encode_message_tail(pattern, MSGPACK)
    assert decode_frames(frame, MSGPACK) == [
        {"op": "msg", "topic": topic, "sub": pattern, "data": data}
    ]


@given(data=msgpack_values)
def test_any_msgpack_value_can_be_sent_to_a_json_subscriber(data: Any) -> None:
    frame = encode_message_body("t", data, JSON) + encode_message_tail("t", JSON)
    assert json.loads(frame)["topic"] == "t"


@given(
    frames=st.lists(
        st.fixed_dictionaries(
            {"op": st.just("pub"), "topic": topics, "data": msgpack_values},
            optional={"id": st.integers(0, MAX_ID)},
        ),
        max_size=5,
    )
)
def test_msgpack_batch_of_pubs_decodes_to_the_same_pubs(frames: list[dict[str, Any]]) -> None:
    decoded = decode_batch(pack(*frames), MSGPACK)
    assert [(p.id, p.topic, p.data, p.size) for p in decoded if isinstance(p, Pub)] == [
        (frame.get("id"), frame["topic"], frame["data"], len(msgpack.packb(frame)))
        for frame in frames
    ]


@given(junk=st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(junk: bytes) -> None:
    decoded = decode_batch(pack(SUB) + junk, MSGPACK)
    assert decoded[0] == Sub(1, "chat.*")
    undecodable = [f for f in decoded if isinstance(f, FrameError) and "undecodable" in f.msg]
    assert len(undecodable) <= 1
    if undecodable:
        assert decoded[-1] is undecodable[0]


@given(junk=st.text(max_size=64))
def test_arbitrary_text_never_raises(junk: str) -> None:
    decoded = decode_batch(lines(SUB) + "\n" + junk, JSON)
    assert decoded[0] == Sub(1, "chat.*")
    undecodable = [f for f in decoded if isinstance(f, FrameError) and "undecodable" in f.msg]
    assert len(undecodable) <= 1
    if undecodable:
        assert decoded[-1] is undecodable[0]


# --- the pub fast path ----------------------------------------------------------------------

_DATA = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(max_size=300),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=80,
)
_TOPICS = st.sampled_from(
    ["a", "chat.room.1", "a.*", "a..b", " x", "é" * 127, "é" * 128]
) | st.text(max_size=300)


def _general(message: bytes) -> list[Any]:
    """decode_batch of one msgpack message without the pub fast path."""
    try:
        value = msgpack.unpackb(message, raw=False, strict_map_key=False)
    except Exception:
        return frames._decode_msgpack_values(message)
    return [frames.validate_frame(value, len(message))]


@given(topic=_TOPICS, data=_DATA, extra=st.sampled_from([b"", b"\xc0", b"\xc1", b"\x81"]))
def test_a_plain_pub_decodes_as_the_general_path_does(topic: str, data: Any, extra: bytes) -> None:
    message = msgpack.packb({"op": "pub", "topic": topic, "data": data}) + extra
    assert decode_batch(message, Encoding.MSGPACK) == _general(message)


@given(message=st.binary(max_size=40).map(lambda rest: b"\x83\xa2op\xa3pub\xa5topic" + rest))
def test_any_bytes_after_the_pub_prefix_decode_as_the_general_path_does(message: bytes) -> None:
    assert decode_batch(message, Encoding.MSGPACK) == _general(message)


def test_a_pub_nested_too_deep_is_refused_by_the_fast_path_too() -> None:
    data: Any = 1
    for _ in range(frames.MAX_DATA_DEPTH + 1):
        data = [data]
    message = msgpack.packb({"op": "pub", "topic": "a", "data": data})
    [refused] = decode_batch(message, Encoding.MSGPACK)
    assert isinstance(refused, FrameError) and "deep" in refused.msg
