"""The slot function, the slot map and redirections of Redis Cluster (pure: no Redis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.cluster.slots import Node, hash_tag, key_slot, parse_redirect, parse_shards


def test_slots_are_those_redis_computes() -> None:
    # Values from CLUSTER KEYSLOT on Redis 7.0 (and the Redis Cluster spec's examples).
    assert key_slot("foo") == 12182
    assert key_slot("bar") == 5061
    assert key_slot("123456789") == 12739  # the spec's CRC16 check value 0x31C3 % 16384
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        (b"{user1000}.following", b"user1000"),
        (b"foo{}{bar}", b"foo{}{bar}"),  # the first {} is empty: the whole key
        (b"foo{{bar}}zap", b"{bar"),
        (b"foo{bar}{zap}", b"bar"),
        (b"no tag", b"no tag"),
        (b"{open", b"{open"),
    ],
)
def test_hash_tags_follow_the_cluster_spec(key: bytes, tag: bytes) -> None:
    assert hash_tag(key) == tag


@given(st.binary(max_size=40), st.binary(max_size=40), st.binary(max_size=40))
def test_keys_sharing_a_hash_tag_share_a_slot(tag: bytes, before: bytes, after: bytes) -> None:
    tag = tag.replace(b"}", b"") or b"t"
    assert key_slot(before.replace(b"{", b"") + b"{" + tag + b"}" + after) == key_slot(tag)


def _node(port: int, role: bytes, health: bytes = b"online") -> list[object]:
    return [
        b"id",
        b"x",
        b"port",
        port,
        b"ip",
        b"127.0.0.1",
        b"endpoint",
        b"127.0.0.1",
        b"role",
        role,
        b"replication-offset",
        0,
        b"health",
        health,
    ]


def test_the_slot_map_comes_from_cluster_shards() -> None:
    reply = [
        [b"slots", [0, 5460], b"nodes", [_node(7000, b"master"), _node(7003, b"replica")]],
        [b"slots", [5461, 10922, 16000, 16383], b"nodes", [_node(7001, b"master")]],
        [
            b"slots",
            [10923, 15999],
            b"nodes",
            [_node(7002, b"master", b"fail"), _node(7005, b"replica")],
        ],
        [b"slots", [], b"nodes", [_node(7009, b"master")]],  # no slots (yet)
    ]
    slots = parse_shards(reply)
    assert slots.master(0) == slots.master(5460) == Node("127.0.0.1", 7000)
    assert slots.master(5461) == slots.master(16383) == Node("127.0.0.1", 7001)
    assert slots.master(10923) is None  # its master failed, no replica took over yet
    assert slots.uncovered() == 15999 - 10923 + 1
    assert slots.masters == (Node("127.0.0.1", 7000), Node("127.0.0.1", 7001))


@pytest.mark.parametrize("reply", [b"OK", [[b"slots"]], [[b"slots", [0, 99999], b"nodes", []]]])
def test_a_reply_that_is_no_slot_map_is_a_value_error(reply: object) -> None:
    with pytest.raises(ValueError):
        parse_shards(reply)


def test_redirections_name_the_slot_and_the_node() -> None:
    moved = parse_redirect("MOVED 3999 127.0.0.1:6381")
    assert moved is not None and moved.moved and moved.slot == 3999
    assert moved.node == Node("127.0.0.1", 6381)
    ask = parse_redirect("ASK 3999 ::1:6381")
    assert ask is not None and not ask.moved and ask.node == Node("::1", 6381)
    assert parse_redirect("ERR unknown command") is None
    assert parse_redirect("CLUSTERDOWN The cluster is down") is None
