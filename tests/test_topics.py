"""Unit tests for broker.protocol.topics: validation, the reference matcher, and the PatternTrie."""

from __future__ import annotations

from collections import Counter
from itertools import product
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import broker.protocol.topics as topic_module
from broker.protocol.topics import (
    MAX_TOPIC_BYTES,
    InvalidTopic,
    PatternTrie,
    is_wildcard,
    pattern_matches,
    validate_pattern,
    validate_topic,
)

# --- a brute-force reference written from the NATS rules -----------------------------------


def nats_matches(pattern: str, topic: str) -> bool:
    """`*` is exactly one segment, `>` one or more trailing segments; the rest is literal."""

    def walk(p: list[str], t: list[str]) -> bool:
        if not p:
            return not t
        if p[0] == ">":
            return len(t) >= 1
        if not t:
            return False
        if p[0] == "*" or p[0] == t[0]:
            return walk(p[1:], t[1:])
        return False

    return walk(pattern.split("."), topic.split("."))


# --- validation ----------------------------------------------------------------------------

GOOD_TOPICS = [
    "a",
    "a.b.c",
    "chat.room-1",
    "orders_v2.EU",
    "$SYS.health",
    "1.2.3",
    "ünïcödé.トピック",
    "a" * MAX_TOPIC_BYTES,
    "é" * 127 + "a",  # 254 + 1 = 255 bytes
    "€" * 85,  # 3 bytes each: 255 bytes
    "😀" * 63 + "abc",  # 4 bytes each: 252 + 3 = 255 bytes
    ".".join(["a"] * 128),  # 255 bytes of one-letter segments
]

BAD_COMMON = [
    pytest.param("", id="empty"),
    pytest.param("a" * (MAX_TOPIC_BYTES + 1), id="256-ascii"),
    pytest.param("é" * 128, id="256-bytes-2-byte-chars"),
    pytest.param("é" * 127 + "ab", id="256-bytes-mixed"),
    pytest.param("€" * 86, id="258-bytes-3-byte-chars"),
    pytest.param("😀" * 64, id="256-bytes-4-byte-chars"),
    pytest.param(".", id="only-dot"),
    pytest.param(".a", id="leading-dot"),
    pytest.param("a.", id="trailing-dot"),
    pytest.param("a..b", id="empty-middle-segment"),
    pytest.param("..", id="only-dots"),
    pytest.param("a b", id="space"),
    pytest.param(" a", id="leading-space"),
    pytest.param("a ", id="trailing-space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\rb", id="carriage-return"),
    pytest.param("a\x0bb", id="vertical-tab"),
    pytest.param("a\x0cb", id="form-feed"),
    pytest.param("a\u00a0b", id="no-break-space"),
    pytest.param("a\u2003b", id="em-space"),
    pytest.param("a\u3000b", id="ideographic-space"),
    pytest.param("a\u2028b", id="line-separator"),
    pytest.param("a\u2029b", id="paragraph-separator"),
    pytest.param("a\x85b", id="next-line"),
    pytest.param("a\u1680b", id="ogham-space"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\x1bb", id="escape"),
    pytest.param("a\u200bb", id="zero-width-space"),
    pytest.param("a\u200db", id="zero-width-joiner"),
    pytest.param("a\u202eb", id="right-to-left-override"),
    pytest.param("a\u2066b", id="left-to-right-isolate"),
    pytest.param("\ufeffa", id="byte-order-mark"),
    pytest.param("a\x7fb", id="delete"),
    pytest.param("a\x9fb", id="c1-control"),
    pytest.param("a\ud800b", id="lone-surrogate"),
]


@pytest.mark.parametrize("topic", GOOD_TOPICS)
def test_validate_topic_accepts_concrete_topics(topic: str) -> None:
    validate_topic(topic)


@pytest.mark.parametrize("topic", GOOD_TOPICS)
def test_every_valid_topic_is_also_a_valid_pattern(topic: str) -> None:
    validate_pattern(topic)


def test_good_topic_table_reaches_exactly_255_bytes_with_multibyte_utf8() -> None:
    multibyte = [topic for topic in GOOD_TOPICS if not topic.isascii()]
    assert {len(topic.encode()) for topic in multibyte} >= {MAX_TOPIC_BYTES}


@pytest.mark.parametrize("name", BAD_COMMON)
def test_validate_topic_rejects_malformed_names(name: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic(name)


@pytest.mark.parametrize("name", BAD_COMMON)
def test_validate_pattern_rejects_malformed_names(name: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_pattern(name)


def test_remembered_valid_topics_are_bounded_and_never_hold_a_bad_one() -> None:
    for n in range(topic_module._VALID_TOPICS_MAX + 10):
        validate_topic(f"t.{n}")
    assert 0 < len(topic_module._VALID_TOPICS) <= topic_module._VALID_TOPICS_MAX
    for name in ("", "a..b", "a b", "a.*", "a.>", "a\x00b"):
        with pytest.raises(InvalidTopic):
            validate_topic(name)
        with pytest.raises(InvalidTopic):
            validate_topic(name)  # refused again: a refusal is never remembered


def test_topic_limit_counts_utf8_bytes_not_characters() -> None:
    validate_topic("é" * 127 + "a")  # 128 characters, 255 bytes
    with pytest.raises(InvalidTopic, match="256 bytes"):
        validate_topic("é" * 128)  # 128 characters, 256 bytes


@pytest.mark.parametrize("value", [None, b"a.b", 1, ["a"]])
def test_non_string_topic_or_pattern_is_invalid_topic(value: Any) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic(value)
    with pytest.raises(InvalidTopic):
        validate_pattern(value)


def test_invalid_topic_is_a_value_error() -> None:
    assert issubclass(InvalidTopic, ValueError)


@pytest.mark.parametrize(
    "topic", ["*", ">", "a.*", "a.>", "*.a", "a.*.b", "a*", "a>", "a*b", "a.b>", ">.a"]
)
def test_validate_topic_rejects_wildcards_in_a_publish_topic(topic: str) -> None:
    with pytest.raises(InvalidTopic, match="wildcard"):
        validate_topic(topic)


GOOD_PATTERNS = [
    "a",
    "a.b",
    "*",
    ">",
    "a.*",
    "a.>",
    "*.*",
    "*.>",
    "*.a",
    "a.*.c",
    "a.*.>",
    "*.*.*.>",
    "é" * 126 + "a.>",  # 252 + 3 = 255 bytes
    ".".join(["*"] * 127) + ".>",  # 255 bytes
]


@pytest.mark.parametrize("pattern", GOOD_PATTERNS)
def test_validate_pattern_accepts_nats_patterns(pattern: str) -> None:
    validate_pattern(pattern)


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("a.>.b", id="gt-not-last"),
        pytest.param(">.a", id="gt-first-of-two"),
        pytest.param(">.>", id="two-gts"),
        pytest.param("a.>.*", id="star-after-gt"),
        pytest.param("a*", id="star-inside-segment-end"),
        pytest.param("*a", id="star-inside-segment-start"),
        pytest.param("a*b", id="star-inside-segment-middle"),
        pytest.param("**", id="double-star"),
        pytest.param("a.b*", id="star-inside-last-segment"),
        pytest.param("a>", id="gt-inside-segment"),
        pytest.param(">a", id="gt-prefix"),
        pytest.param(">>", id="double-gt"),
        pytest.param("a.>b", id="gt-inside-last-segment"),
        pytest.param("a.*>", id="star-gt-one-segment"),
        pytest.param("a..*", id="empty-segment-before-star"),
        pytest.param(".>", id="leading-dot-gt"),
        pytest.param("*.", id="star-trailing-dot"),
        pytest.param("a. *", id="space-before-star"),
        pytest.param("é" * 127 + ".>", id="256-bytes"),
    ],
)
def test_validate_pattern_rejects_bad_patterns(pattern: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_pattern(pattern)


def test_gt_not_last_error_names_the_rule() -> None:
    with pytest.raises(InvalidTopic, match="last"):
        validate_pattern("a.>.b")


def test_wildcard_inside_segment_error_names_the_segment() -> None:
    with pytest.raises(InvalidTopic, match="a\\*b"):
        validate_pattern("x.a*b")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("a", False), ("a.b", False), ("*", True), (">", True), ("a.*.b", True), ("a.>", True)],
)
def test_is_wildcard(pattern: str, expected: bool) -> None:
    assert is_wildcard(pattern) is expected


# --- the reference matcher -----------------------------------------------------------------

MATCH_TABLE = [
    ("chat.*", "chat.a", True),
    ("chat.*", "chat.a.b", False),
    ("chat.*", "chat", False),
    ("chat.>", "chat.a", True),
    ("chat.>", "chat.a.b", True),
    ("chat.>", "chat", False),
    ("chat.>", "other.a", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.b", "a.b", True),
    ("a.b", "a", False),
    ("a", "a.b", False),
    ("a.b", "a.c", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
    ("a.*.c", "a.c", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.>", "a.b", False),
    ("a.*.>", "a.b.c", True),
    ("a.*.>", "a.b.c.d", True),
    ("*.*", "a.b", True),
    ("*.*", "a.b.c", False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_pattern_matches_follows_nats_semantics(pattern: str, topic: str, expected: bool) -> None:
    assert pattern_matches(pattern, topic) is expected
    assert nats_matches(pattern, topic) is expected  # the test's own reference agrees


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_trie_agrees_with_the_match_table(pattern: str, topic: str, expected: bool) -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add(pattern, "v")
    assert list(trie.match(topic)) == (["v"] if expected else [])


# --- hypothesis strategies -----------------------------------------------------------------

SEGMENTS = ["a", "b", "c"]
TOPICS = [".".join(parts) for n in range(1, 5) for parts in product(SEGMENTS, repeat=n)]

topics = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    body = draw(st.lists(st.sampled_from([*SEGMENTS, "*"]), min_size=0, max_size=3))
    if draw(st.booleans()) or not body:
        body.append(">")
    return ".".join(body)


values = st.integers(min_value=0, max_value=4)
pairs = st.tuples(patterns(), values)


def test_strategies_produce_valid_names() -> None:
    for topic in TOPICS:
        validate_topic(topic)


@settings(max_examples=300, deadline=None)
@given(patterns(), topics)
def test_pattern_matches_agrees_with_brute_force_reference(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    assert pattern_matches(pattern, topic) == nats_matches(pattern, topic)


def expected_matches(pairs: set[tuple[str, int]], topic: str) -> Counter[int]:
    return Counter(value for pattern, value in pairs if nats_matches(pattern, topic))


@settings(max_examples=100, deadline=None)
@given(st.lists(pairs, max_size=12))
def test_trie_matches_every_pair_whose_pattern_matches(added: list[tuple[str, int]]) -> None:
    trie: PatternTrie[int] = PatternTrie()
    for pattern, value in added:
        trie.add(pattern, value)
    model = set(added)
    assert len(trie) == len(model)
    for topic in TOPICS:
        assert Counter(trie.match(topic)) == expected_matches(model, topic), topic
        reference = Counter(v for p, v in model if pattern_matches(p, topic))
        assert Counter(trie.match(topic)) == reference, topic


operations = st.lists(st.tuples(st.sampled_from(["add", "remove"]), patterns(), values))


@settings(max_examples=100, deadline=None)
@given(operations)
def test_trie_add_remove_sequences_match_a_set_model(ops: list[tuple[str, str, int]]) -> None:
    trie: PatternTrie[int] = PatternTrie()
    model: set[tuple[str, int]] = set()
    removed: set[tuple[str, int]] = set()
    for op, pattern, value in ops:
        if op == "add":
            trie.add(pattern, value)
            model.add((pattern, value))
            removed.discard((pattern, value))
        else:
            trie.remove(pattern, value)
            if (pattern, value) in model:
                removed.add((pattern, value))
            model.discard((pattern, value))
        assert len(trie) == len(model)
    for topic in TOPICS:
        assert Counter(trie.match(topic)) == expected_matches(model, topic), topic
    # Removing everything that is left leaves an empty, fully pruned trie.
    for pattern, value in sorted(model):
        trie.remove(pattern, value)
    assert len(trie) == 0
    assert trie._root.is_empty()
    assert not trie._root.children
    for topic in TOPICS:
        assert list(trie.match(topic)) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(pairs, min_size=1, max_size=10), st.data())
def test_removed_values_never_match_again(
    added: list[tuple[str, int]], data: st.DataObject
) -> None:
    trie: PatternTrie[object] = PatternTrie()
    tokens = {pair: object() for pair in added}
    for (pattern, _), token in tokens.items():
        trie.add(pattern, token)
    gone = data.draw(st.sets(st.sampled_from(sorted(tokens))))
    for pattern, value in gone:
        trie.remove(pattern, tokens[(pattern, value)])
    gone_tokens = {id(tokens[pair]) for pair in gone}
    for topic in TOPICS:
        matched = list(trie.match(topic))
        assert not any(id(token) in gone_tokens for token in matched)
        assert len(matched) == sum(
            1 for pair in tokens if pair not in gone and nats_matches(pair[0], topic)
        )


# --- trie details --------------------------------------------------------------------------


def test_value_added_under_two_patterns_is_yielded_twice() -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add("a.*", "v")
    trie.add("a.>", "v")
    assert list(trie.match("a.b")) == ["v", "v"]
    assert list(trie.match("a.b.c")) == ["v"]
    assert len(trie) == 2


def test_adding_the_same_pattern_twice_is_a_no_op() -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add("a.b", "v")
    trie.add("a.b", "v")
    trie.add("a.>", "w")
    trie.add("a.>", "w")
    assert len(trie) == 2
    assert sorted(trie.match("a.b")) == ["v", "w"]
    trie.remove("a.b", "v")
    assert list(trie.match("a.b")) == ["w"]


def test_different_values_under_one_pattern_are_all_yielded_in_insertion_order() -> None:
    trie: PatternTrie[str] = PatternTrie()
    for value in ["x", "y", "z"]:
        trie.add("a.b", value)
    assert list(trie.match("a.b")) == ["x", "y", "z"]


def test_removing_an_unknown_pair_is_ignored() -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add("a.b.c", "v")
    trie.remove("a.b.c", "other")
    trie.remove("a.b", "v")
    trie.remove("a.b.c.d", "v")
    trie.remove("a.>", "v")
    trie.remove("x.y", "v")
    trie.remove(">", "v")
    assert len(trie) == 1
    assert list(trie.match("a.b.c")) == ["v"]


def test_removing_a_deep_pattern_prunes_its_branch_but_keeps_shared_prefixes() -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add("a.b", "short")
    trie.add("a.b.c.d", "deep")
    trie.remove("a.b.c.d", "deep")
    b_node = trie._root.children["a"].children["b"]
    assert not b_node.children
    assert list(trie.match("a.b")) == ["short"]
    trie.remove("a.b", "short")
    assert not trie._root.children


def test_removing_a_tail_pattern_prunes_its_branch() -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add("a.b.>", "v")
    trie.add(">", "w")
    trie.remove("a.b.>", "v")
    assert not trie._root.children
    assert list(trie.match("a.b.c")) == ["w"]
    trie.remove(">", "w")
    assert trie._root.is_empty()
    assert len(trie) == 0


def test_star_and_literal_children_both_match() -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add("a.b", "literal")
    trie.add("a.*", "star")
    trie.add("*.b", "star-first")
    trie.add("*.*", "both")
    assert sorted(trie.match("a.b")) == ["both", "literal", "star", "star-first"]
    assert sorted(trie.match("x.b")) == ["both", "star-first"]
    assert list(trie.match("a")) == []


def test_gt_alone_matches_every_topic_and_star_alone_only_single_segments() -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add(">", "all")
    trie.add("*", "one")
    assert sorted(trie.match("x")) == ["all", "one"]
    assert list(trie.match("x.y.z")) == ["all"]


def test_gt_pattern_does_not_match_its_own_prefix() -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.add("chat.>", "v")
    assert list(trie.match("chat")) == []
    assert list(trie.match("chat.a")) == ["v"]
