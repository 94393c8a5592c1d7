"""Reading what a nursery raised: Trio wraps task errors in (nested) exception groups."""

from __future__ import annotations

from typing import TypeVar, cast

E = TypeVar("E", bound=BaseException)


def first_leaf(group: BaseExceptionGroup[E]) -> E:
    """The first exception in ``group`` that is not itself a group, however deep it sits."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return cast(E, exc)
