"""The Redis client's pure parts: RESP2 parsing and encoding, URLs, glob escaping."""

from __future__ import annotations

import pytest
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from broker.cluster.backplane import glob_escape
from broker.cluster.resp import (
    NEED_DATA,
    ProtocolError,
    RedisAddress,
    RedisConnection,
    RedisError,
    encode_command,
    reply_reader,
)


def parse_all(data: bytes) -> list[object]:
    reader = reply_reader()
    reader.feed(data)
    replies = []
    while (reply := reader.gets()) is not NEED_DATA:
        replies.append(reply)
    return replies


def test_every_reply_type_is_parsed() -> None:
    data = (
        b"+OK\r\n-ERR wrong\r\n:42\r\n$5\r\nhe\r\no\r\n$-1\r\n*-1\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n"
    )
    ok, error, number, bulk, null_bulk, null_array, array = parse_all(data)
    assert (ok, number, bulk, null_bulk, null_array) == (b"OK", 42, b"he\r\no", None, None)
    assert isinstance(error, RedisError) and str(error) == "ERR wrong"
    assert array == [b"a", [1]]


@given(st.binary(max_size=64), st.lists(st.integers(1, 8), min_size=1))
def test_a_reply_split_anywhere_parses_once_whole(payload: bytes, cuts: list[int]) -> None:
    message = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$%d\r\n%s\r\n" % (len(payload), payload)
    reader = reply_reader()
    replies = []
    position = 0
    for cut in cuts * 40:
        reader.feed(message[position : position + cut])
        position += cut
        while (reply := reader.gets()) is not NEED_DATA:
            replies.append(reply)
    reader.feed(message[position:])
    while (reply := reader.gets()) is not NEED_DATA:
        replies.append(reply)
    assert replies == [[b"message", b"c", payload]]
    assert not reader.has_data()


def test_many_replies_in_one_feed_parse_in_order() -> None:
    pushes = b"".join(
        b"*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$1\r\nc\r\n$%d\r\n%d\r\n" % (len(str(n)), n)
        for n in range(1000)
    )
    replies = parse_all(pushes + b":7\r\n-ERR x\r\n")
    assert replies[:1000] == [[b"pmessage", b"*", b"c", str(n).encode()] for n in range(1000)]
    assert replies[1000] == 7 and isinstance(replies[1001], RedisError)


def test_bytes_that_are_not_resp_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_all(b"?what\r\n")
    with pytest.raises(ProtocolError):
        parse_all(b"$x\r\n")


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode_command("SET", b"k", 7) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n"
    assert parse_all(encode_command("é", b"")) == [[("é").encode(), b""]]


def test_redis_urls() -> None:
    assert RedisAddress.from_url("redis://h") == RedisAddress("h", 6379, 0)
    address = RedisAddress.from_url("redis://user:p%40ss@10.0.0.1:7000/3")
    assert address == RedisAddress("10.0.0.1", 7000, 3, "user", "p@ss")
    for bad in ("http://h", "redis://", "redis://h/x", "redis://h:99999"):
        with pytest.raises(ValueError):
            RedisAddress.from_url(bad)


def test_glob_escape_leaves_plain_text_alone() -> None:
    assert glob_escape("chat.room-1") == "chat.room-1"
    assert glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"


async def test_a_connection_hands_over_every_whole_reply_one_read_brought() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    connection = RedisConnection(ours)
    await theirs.send_all(b":1\r\n:2\r\n$3\r\nab")
    assert await connection.receive_all() == [1, 2]
    await theirs.send_all(b"c\r\n+OK\r\n")
    assert await connection.receive() == b"abc"
    assert await connection.receive_all() == [b"OK"]
