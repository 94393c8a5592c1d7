"""The permission rules: pattern coverage against a brute-force reference, and Permissions."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.permissions import Permissions, covers
from broker.protocol.topics import pattern_matches, validate_pattern

# Patterns use the literals a and b; topics also use c, a literal no pattern names, so that a
# ``*`` or ``>`` is never mistaken for a literal. Topics are one segment longer than the longest
# pattern, so ``>`` (any length) and ``*`` (one segment) always differ somewhere.
PATTERN_SEGMENTS = ("a", "b", "*", ">")
MAX_PATTERN_SEGMENTS = 3
TOPICS = [
    ".".join(segments)
    for length in range(1, MAX_PATTERN_SEGMENTS + 2)
    for segments in itertools.product("abc", repeat=length)
]


def _patterns() -> list[str]:
    patterns = []
    for length in range(1, MAX_PATTERN_SEGMENTS + 1):
        for segments in itertools.product(PATTERN_SEGMENTS, repeat=length):
            if ">" not in segments[:-1]:
                patterns.append(".".join(segments))
    return patterns


PATTERNS = _patterns()
MATCHES = {pattern: {t for t in TOPICS if pattern_matches(pattern, t)} for pattern in PATTERNS}


def covers_by_brute_force(granted: str, requested: str) -> bool:
    """The definition: every topic ``requested`` matches, ``granted`` matches too."""
    return MATCHES[requested] <= MATCHES[granted]


def test_the_reference_universe_is_what_the_tests_assume() -> None:
    for pattern in PATTERNS:
        validate_pattern(pattern)
        assert MATCHES[pattern], f"{pattern} matches nothing in the universe"
    assert len(PATTERNS) == 4 + 3 * 4 + 9 * 4  # '>' only last


@pytest.mark.parametrize("granted", PATTERNS)
def test_covers_agrees_with_brute_force_for_every_pair(granted: str) -> None:
    for requested in PATTERNS:
        assert covers(granted, requested) == covers_by_brute_force(granted, requested), (
            granted,
            requested,
        )


pattern_strategy = st.sampled_from(PATTERNS)


@given(pattern_strategy)
def test_a_pattern_covers_itself(pattern: str) -> None:
    assert covers(pattern, pattern)


@given(pattern_strategy, pattern_strategy, pattern_strategy)
def test_coverage_is_transitive(a: str, b: str, c: str) -> None:
    if covers(a, b) and covers(b, c):
        assert covers(a, c)


@given(pattern_strategy, st.sampled_from(TOPICS))
def test_a_granted_pattern_matches_every_topic_a_covered_pattern_matches(
    granted: str, topic: str
) -> None:
    for requested in PATTERNS:
        if covers(granted, requested) and pattern_matches(requested, topic):
            assert pattern_matches(granted, topic)


@pytest.mark.parametrize(
    ("granted", "requested", "expected"),
    [
        ("chat.*", "chat.>", False),  # the example: chat.> also matches chat.a.b
        ("chat.>", "chat.*", True),
        ("chat.>", "chat.a.b", True),
        ("chat.>", "chat", False),
        ("chat.*", "chat.room", True),
        ("chat.room", "chat.*", False),
        (">", "anything.at.all", True),
        (">", ">", True),
        ("*", ">", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.*.*", False),
        ("a.*.>", "a.>", False),
        ("a.b", "a.b.c", False),
    ],
)
def test_covers_examples(granted: str, requested: str, expected: bool) -> None:
    assert covers(granted, requested) is expected


def test_permissions_check_publish_by_match_and_subscribe_by_coverage() -> None:
    permissions = Permissions(publish=("chat.*",), subscribe=("chat.*", "news.>"))
    assert permissions.may_publish("chat.room")
    assert not permissions.may_publish("chat.room.x")
    assert not permissions.may_publish("news.today")
    assert permissions.may_subscribe("chat.*")
    assert permissions.may_subscribe("news.*.sport")
    assert not permissions.may_subscribe("chat.>")
    assert not permissions.may_subscribe(">")


def test_allow_all_and_empty() -> None:
    everything = Permissions.allow_all()
    assert everything.may_publish("x") and everything.may_subscribe(">")
    assert not everything.empty
    nothing = Permissions()
    assert nothing.empty
    assert not nothing.may_publish("x") and not nothing.may_subscribe("x")
