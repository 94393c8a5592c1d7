"""The in-memory history store, the since/offset codec and the history config, without sockets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.config import ConfigError, config_from_dict, load_config
from broker.core.history import MESSAGE_OVERHEAD, TOPIC_OVERHEAD, MemoryHistory
from broker.core.rules import HistoryLimits
from broker.protocol.frames import (
    Encoding,
    ErrorCode,
    FrameError,
    Position,
    Sub,
    encode_message_body,
    encode_message_tail,
    pack_data,
    validate_frame,
)


def store(size: int = 100, ttl: float | None = None, max_bytes: int = 1 << 30) -> MemoryHistory:
    """A store where every topic keeps ``size`` messages for ``ttl`` seconds."""
    return MemoryHistory(lambda topic: HistoryLimits(size, ttl), max_bytes)


def offsets(history: MemoryHistory, topic: str, after: int, now: float = 0.0) -> list[int]:
    epoch = history.position(topic, now).epoch
    return [m.offset for m in history.since(topic, Position(epoch, after), now).messages]


def test_offsets_start_at_one_and_grow_by_one_per_topic() -> None:
    history = store()
    assert history.position("a", 0).offset == 0
    assert [history.append("a", b"x", 0) for _ in range(3)] == [1, 2, 3]
    assert history.append("b", b"x", 0) == 1
    assert history.position("a", 0).offset == 3


def test_epoch_is_stable_while_history_is_kept() -> None:
    history = store()
    epoch = history.position("a", 0).epoch
    history.append("a", b"x", 0)
    assert history.position("a", 0) == Position(epoch, 1)
    assert store().position("a", 0).epoch != epoch  # a restarted store: a new epoch


def test_reading_positions_stores_nothing_and_evicts_no_one() -> None:
    history = store(max_bytes=TOPIC_OVERHEAD + 1 + MESSAGE_OVERHEAD + 100)
    history.append("a", bytes(100), 0)
    epoch = history.position("a", 0).epoch
    for n in range(10_000):  # a client subscribing and unsubscribing to new topics
        fresh = history.position(f"t{n}", 0)
        assert fresh.offset == 0
        assert history.since(f"t{n}", fresh, 0).recovered
    assert history.statistics()["topics"] == 1
    assert history.position("a", 0) == Position(epoch, 1)


def test_a_subscriber_before_the_first_message_recovers_it() -> None:
    history = store()
    before = history.position("a", 0)  # what a sub's ok said
    history.append("a", pack_data("first"), 0)
    replay = history.since("a", before, 0)
    assert replay.recovered and [m.offset for m in replay.messages] == [1]


def test_a_topic_created_again_after_eviction_never_reuses_an_epoch() -> None:
    cost = TOPIC_OVERHEAD + 1 + MESSAGE_OVERHEAD + 100
    history = store(max_bytes=cost)
    history.append("a", bytes(100), 0)
    old = history.position("a", 0)
    history.append("b", bytes(100), 0)  # evicts "a"
    assert history.position("a", 0).epoch != old.epoch
    history.append("a", bytes(100), 0)  # created again: offset 1 of a new epoch
    assert history.position("a", 0).epoch != old.epoch
    assert not history.since("a", old, 0).recovered


def test_since_replays_the_messages_after_the_offset() -> None:
    history = store()
    for i in range(5):
        history.append("a", pack_data(i), float(i))
    epoch = history.position("a", 5).epoch
    replay = history.since("a", Position(epoch, 2), 5)
    assert [(m.offset, msgpack.unpackb(m.data)) for m in replay.messages] == [
        (3, 2),
        (4, 3),
        (5, 4),
    ]
    assert replay.recovered
    assert replay.latest == Position(epoch, 5)


def test_since_at_the_latest_offset_recovers_with_nothing_to_replay() -> None:
    history = store()
    history.append("a", b"x", 0)
    replay = history.since("a", history.position("a", 0), 0)
    assert replay.messages == [] and replay.recovered


def test_since_on_a_topic_never_published_recovers_from_zero() -> None:
    history = store()
    replay = history.since("a", history.position("a", 0), 0)
    assert replay.recovered and replay.latest.offset == 0


@pytest.mark.parametrize("offset", [-1, 4])
def test_since_an_offset_outside_the_epoch_is_not_recovered(offset: int) -> None:
    history = store()
    for _ in range(3):
        history.append("a", b"x", 0)
    epoch = history.position("a", 0).epoch
    replay = history.since("a", Position(epoch, offset), 0)
    assert replay.messages == [] and not replay.recovered


def test_since_another_epoch_replays_nothing_and_is_not_recovered() -> None:
    history = store()
    history.append("a", b"x", 0)
    replay = history.since("a", Position("not-the-epoch", 0), 0)
    assert replay.messages == [] and not replay.recovered
    assert replay.latest.offset == 1


def test_size_keeps_the_newest_messages_and_a_recovery_from_before_them_sees_the_gap() -> None:
    history = store(size=3)
    for _ in range(5):
        history.append("a", b"x", 0)
    epoch = history.position("a", 0).epoch
    gap = history.since("a", Position(epoch, 1), 0)
    assert [m.offset for m in gap.messages] == [3, 4, 5] and not gap.recovered
    whole = history.since("a", Position(epoch, 2), 0)
    assert [m.offset for m in whole.messages] == [3, 4, 5] and whole.recovered


def test_ttl_drops_old_messages_but_keeps_the_epoch_and_the_numbering() -> None:
    history = store(ttl=10)
    history.append("a", b"old", 0)
    history.append("a", b"old", 5)
    history.append("a", b"new", 12)
    epoch = history.position("a", 12).epoch
    assert offsets(history, "a", 0, now=12) == [2, 3]
    replay = history.since("a", Position(epoch, 0), 15)  # offset 2 (t=5) expired at t=15
    assert [m.offset for m in replay.messages] == [3] and not replay.recovered
    assert history.since("a", Position(epoch, 2), 15).recovered
    assert history.position("a", 100) == Position(epoch, 3)
    assert history.statistics()["messages"] == 0
    assert history.append("a", b"x", 100) == 4


def test_memory_cap_evicts_least_recently_published_topics_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic_cost = TOPIC_OVERHEAD + 1 + 3 * (MESSAGE_OVERHEAD + 100)
    cap = 3 * topic_cost + MESSAGE_OVERHEAD + 100
    history = store(max_bytes=cap)
    for topic in "abc":
        for _ in range(3):
            history.append(topic, bytes(100), 0)
    history.append("a", bytes(100), 0)  # now "b" is the least recently published
    old_epoch_b = history.position("b", 0).epoch
    with caplog.at_level(logging.INFO, logger="broker.history"):
        history.append("d", bytes(100), 0)
    stats = history.statistics()
    assert stats["evicted_topics"] == 1 and stats["bytes"] <= cap
    assert offsets(history, "a", 0) == [1, 2, 3, 4]
    assert history.position("c", 0).offset == 3
    replay = history.since("b", Position(old_epoch_b, 3), 0)
    assert not replay.recovered and replay.latest.offset == 0
    assert replay.latest.epoch != old_epoch_b
    assert "starting with 'b'" in caplog.text and "1 topic(s) evicted so far" in caplog.text


def test_evictions_are_logged_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    history = store(max_bytes=TOPIC_OVERHEAD + 5 + MESSAGE_OVERHEAD + 100)
    with caplog.at_level(logging.INFO, logger="broker.history"):
        for n in range(1000):
            history.append(f"t{n:04}", bytes(100), 0)
    assert history.statistics()["evicted_topics"] == 999
    assert caplog.text.count("evicting") == 1


def test_one_topic_over_the_cap_loses_its_oldest_messages_not_its_epoch() -> None:
    history = store(max_bytes=TOPIC_OVERHEAD + 1 + 2 * (MESSAGE_OVERHEAD + 100))
    epoch = history.position("a", 0).epoch
    for _ in range(5):
        history.append("a", bytes(100), 0)
    assert offsets(history, "a", 0) == [4, 5]
    assert history.position("a", 0).epoch == epoch
    assert history.statistics()["evicted_topics"] == 0


def test_appending_to_a_topic_without_history_is_refused() -> None:
    history = MemoryHistory(lambda topic: None)
    with pytest.raises(ValueError, match="keeps no history"):
        history.append("a", b"x", 0)


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 200), st.floats(0, 3)), max_size=60),
    st.integers(1, 6),
    st.integers(1, 3000),
)
def test_store_invariants_hold_for_any_sequence(
    appends: list[tuple[str, int, float]], size: int, max_bytes: int
) -> None:
    history = store(size=size, ttl=5, max_bytes=max_bytes)
    now = 0.0
    for topic, length, step in appends:
        now += step
        history.append(topic, bytes(length), now)
        assert history.statistics()["bytes"] <= max(max_bytes, TOPIC_OVERHEAD + 1)
        for name in "abc":
            latest = history.position(name, now)
            replay = history.since(name, Position(latest.epoch, 0), now)
            kept = [m.offset for m in replay.messages]
            assert len(kept) <= size
            assert kept == list(range(latest.offset - len(kept) + 1, latest.offset + 1))
            assert all(m.time > now - 5 for m in replay.messages)
            assert replay.recovered == (kept[:1] == [1] or latest.offset == 0)


# --- codec ----------------------------------------------------------------------------------


def test_sub_with_since_decodes_to_a_position() -> None:
    frame = {"op": "sub", "id": 1, "topic": "chat.a", "since": {"epoch": "e", "offset": 7}}
    assert validate_frame(frame, 0) == Sub(1, "chat.a", Position("e", 7))


@pytest.mark.parametrize(
    "since",
    [5, "e", {"epoch": "e"}, {"offset": 1}, {"epoch": 1, "offset": 1}, {"epoch": "e", "offset": -1},
     {"epoch": "e", "offset": 1.0}, {"epoch": "e", "offset": True}],
)  # fmt: skip
def test_a_malformed_since_is_a_bad_request(since: Any) -> None:
    frame = {"op": "sub", "id": 1, "topic": "chat.a", "since": since}
    error = validate_frame(frame, 0)
    assert isinstance(error, FrameError) and error.code is ErrorCode.BAD_REQUEST
    assert "'since' must be a map" in error.msg and error.id == 1


@pytest.mark.parametrize("pattern", ["chat.*", "chat.>"])
def test_since_on_a_wildcard_is_a_bad_request(pattern: str) -> None:
    frame = {"op": "sub", "id": 1, "topic": pattern, "since": {"epoch": "e", "offset": 0}}
    error = validate_frame(frame, 0)
    assert isinstance(error, FrameError) and error.code is ErrorCode.BAD_REQUEST
    assert "needs a concrete topic" in error.msg


@pytest.mark.parametrize("data", [None, 1, "x", b"\x00\xff", [1, {"k": 2.5}]])
def test_message_with_offset_decodes_in_both_encodings(data: Any) -> None:
    packed = pack_data(data)
    for encoding in Encoding:
        frame_bytes = encode_message_body("t", data, encoding, 42, packed)
        frame_bytes += encode_message_tail("t.>", encoding)
        if encoding is Encoding.MSGPACK:
            frame = msgpack.unpackb(frame_bytes, raw=False)
            assert frame == {"op": "msg", "topic": "t", "data": data, "offset": 42, "sub": "t.>"}
            assert frame_bytes == encode_message_body("t", data, encoding, 42) + b"\xa3sub\xa3t.>"
        else:
            import json

            frame = json.loads(frame_bytes)
            assert frame["offset"] == 42 and frame["sub"] == "t.>" and frame["topic"] == "t"


# --- config ---------------------------------------------------------------------------------


def test_history_config_is_read_from_topic_rules() -> None:
    config = config_from_dict(
        {
            "history": {"max_bytes": 1000},
            "topics": [
                {"pattern": "chat.>", "history_size": 50, "history_ttl": 60},
                {"pattern": "feed.>", "history_size": 5},
                {"pattern": "ticks.>", "on_full": "drop_oldest"},
            ],
        }
    )
    assert config.history.max_bytes == 1000
    assert [rule.history for rule in config.topics] == [
        HistoryLimits(50, 60.0),
        HistoryLimits(5, None),
        None,
    ]
    assert config_from_dict({}).history.max_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"topics": [{"pattern": "a", "history_size": 0}]}, "topics[0].history_size: must be"),
        ({"topics": [{"pattern": "a", "history_size": "9"}]}, "topics[0].history_size: expected"),
        ({"topics": [{"pattern": "a", "history_size": 2.5}]}, "topics[0].history_size: expected"),
        ({"topics": [{"pattern": "a", "history_ttl": 5}]}, "topics[0].history_ttl: needs"),
        (
            {"topics": [{"pattern": "a", "history_size": 1, "history_ttl": -1}]},
            "topics[0].history_ttl: must be",
        ),
        ({"history": {"max_bytes": 0}}, "history.max_bytes: must be"),
        ({"history": {"size": 1}}, "history.size: unknown key"),
    ],
)
def test_bad_history_config_names_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(raw)


def test_example_config_keeps_chat_history() -> None:
    config = load_config(Path(__file__).parent.parent / "config" / "broker.toml")
    assert config.history.max_bytes == 64 * 1024 * 1024
    histories = {rule.pattern: rule.history for rule in config.topics}
    assert histories["chat.>"] == HistoryLimits(1000, 3600.0)
    assert histories["ticks.>"] is None
