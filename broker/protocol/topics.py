"""Topics and subscription patterns: validation, matching, and the trie the hub routes with.

A topic is 1..255 bytes of UTF-8: segments separated by ``.``, no empty segment, no
whitespace, control or invisible formatting character (zero-width spaces and joiners, bidi
overrides: a topic must read as what it is). A pattern may also use ``*`` (exactly one segment) and
``>`` (one or more trailing segments, last position only), with NATS semantics. ``*`` and
``>`` are only wildcards as a whole segment; inside a segment (``a*b``) they are rejected
rather than taken literally, so a typo never silently subscribes to nothing.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

MAX_TOPIC_BYTES = 255

T = TypeVar("T")


class InvalidTopic(ValueError):
    """A topic or pattern breaks the rules; the message says which rule."""


def _check_common(name: str, what: str) -> list[str]:
    ascii_only = name.isascii()
    size = len(name) if ascii_only else len(name.encode("utf-8", "surrogatepass"))
    if size == 0:
        raise InvalidTopic(f"{what} is empty")
    if size > MAX_TOPIC_BYTES:
        raise InvalidTopic(f"{what} is {size} bytes; the limit is {MAX_TOPIC_BYTES}")
    # In ASCII, every whitespace or control character but the space is unprintable.
    if (
        (not name.isprintable() or " " in name)
        if ascii_only
        else any(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)
    ):
        raise InvalidTopic(
            f"{what} {name!r} contains whitespace, a control or an invisible formatting character"
        )
    segments = name.split(".")
    if "" in segments:
        raise InvalidTopic(f"{what} {name!r} has an empty segment")
    return segments


# Topics that passed validate_topic lately: a publisher mostly repeats its topics, and a set
# lookup costs a tenth of the checks. Bounded: emptied when full.
_VALID_TOPICS: set[str] = set()
_VALID_TOPICS_MAX = 16384


def validate_topic(topic: object) -> None:
    """Raise :class:`InvalidTopic` unless ``topic`` is a concrete topic one may publish to."""
    if not isinstance(topic, str):
        raise InvalidTopic("topic must be a string")
    if topic in _VALID_TOPICS:
        return
    _check_common(topic, "topic")
    if "*" in topic or ">" in topic:
        raise InvalidTopic(f"topic {topic!r} contains a wildcard; publish to a concrete topic")
    if len(_VALID_TOPICS) >= _VALID_TOPICS_MAX:
        _VALID_TOPICS.clear()
    _VALID_TOPICS.add(topic)


def validate_pattern(pattern: object) -> None:
    """Raise :class:`InvalidTopic` unless ``pattern`` is a valid subscription pattern."""
    if not isinstance(pattern, str):
        raise InvalidTopic("pattern must be a string")
    segments = _check_common(pattern, "pattern")
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment in ("*", ">"):
            if segment == ">" and index != last:
                raise InvalidTopic(f"pattern {pattern!r}: '>' is only allowed as the last segment")
        elif "*" in segment or ">" in segment:
            raise InvalidTopic(
                f"pattern {pattern!r}: wildcards must be a whole segment, not part of {segment!r}"
            )


def is_wildcard(pattern: str) -> bool:
    """True if ``pattern`` (already valid) contains ``*`` or ``>``."""
    return "*" in pattern or ">" in pattern


def pattern_matches(pattern: str, topic: str) -> bool:
    """True if the valid ``pattern`` matches the valid concrete ``topic``."""
    if pattern == ">":
        return True  # every topic has at least one segment (and auth "none" grants ">")
    pattern_segments = pattern.split(".")
    topic_segments = topic.split(".")
    for index, segment in enumerate(pattern_segments):
        if segment == ">":
            return len(topic_segments) > index
        if index >= len(topic_segments):
            return False
        if segment != "*" and segment != topic_segments[index]:
            return False
    return len(topic_segments) == len(pattern_segments)


def patterns_overlap(first: str, second: str) -> bool:
    """True if some concrete topic matches both valid patterns."""
    a, b = first.split("."), second.split(".")
    for index in range(min(len(a), len(b))):
        if a[index] == ">" or b[index] == ">":
            return True  # the other has a segment here, so a topic can match both
        if a[index] != b[index] and a[index] != "*" and b[index] != "*":
            return False
    return len(a) == len(b)


# Every node starts with this one empty dict in each of its slots, and gets a dict of its
# own only when something is added there: a node of a deep pattern costs ~150 bytes instead
# of ~370 (three empty dicts each). Never added to.
_NONE: dict[Any, Any] = {}


class _Node(Generic[T]):
    __slots__ = ("children", "tail", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = _NONE
        self.values: dict[T, None] = _NONE  # subscribers whose pattern ends here (ordered set)
        self.tail: dict[T, None] = _NONE  # subscribers whose pattern ends here with ">"

    def is_empty(self) -> bool:
        return not (self.children or self.values or self.tail)

    def child(self, segment: str) -> _Node[T]:
        """The child for ``segment``, created if absent."""
        children = self.children
        if children is _NONE:
            children = self.children = {}
        node = children.get(segment)
        if node is None:
            node = children[segment] = _Node()
        return node


class PatternTrie(Generic[T]):
    """Maps subscription patterns to values and finds every value whose pattern matches a topic.

    Matching walks one path per literal segment plus the ``*`` branch, so its cost depends on
    the topic's depth and the matching patterns, not on how many subscriptions exist.
    A value is yielded once per pattern it was added under.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, value: T) -> None:
        """Register ``value`` under the valid ``pattern`` (adding it twice is a no-op)."""
        node = self._root
        segments = pattern.split(".")
        for segment in segments[:-1]:
            node = node.child(segment)
        if segments[-1] == ">":
            if node.tail is _NONE:
                node.tail = {}
            slot = node.tail
        else:
            node = node.child(segments[-1])
            if node.values is _NONE:
                node.values = {}
            slot = node.values
        if value not in slot:
            slot[value] = None
            self._count += 1

    def remove(self, pattern: str, value: T) -> None:
        """Unregister ``value`` from ``pattern``; unknown pairs are ignored. Prunes empty nodes."""
        segments = pattern.split(".")
        path = [self._root]
        node = self._root
        for segment in segments[:-1]:
            child = node.children.get(segment)
            if child is None:
                return
            path.append(child)
            node = child
        last = segments[-1]
        if last == ">":
            slot = node.tail
        else:
            leaf = node.children.get(last)
            if leaf is None:
                return
            path.append(leaf)
            slot = leaf.values
        if slot.pop(value, 0) is None:
            self._count -= 1
        # Prune from the deepest node up, so the trie never keeps dead branches.
        keys = segments[: len(path) - 1]
        for depth in range(len(path) - 1, 0, -1):
            if not path[depth].is_empty():
                break
            del path[depth - 1].children[keys[depth - 1]]

    def match(self, topic: str) -> Iterator[T]:
        """Yield the value of every (pattern, value) pair whose pattern matches ``topic``."""
        segments = topic.split(".")
        depth = len(segments)
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if node.tail:
                yield from node.tail
            if index == depth - 1:
                segment = segments[index]
                leaf = node.children.get(segment)
                if leaf is not None and leaf.values:
                    yield from leaf.values
                star = node.children.get("*")
                if star is not None and star.values:
                    yield from star.values
                continue
            child = node.children.get(segments[index])
            if child is not None:
                stack.append((child, index + 1))
            star = node.children.get("*")
            if star is not None:
                stack.append((star, index + 1))
