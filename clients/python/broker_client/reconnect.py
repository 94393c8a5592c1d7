"""The reconnect delay policy: exponential backoff with jitter, as a small pure object."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between reconnect attempts: ``base * 2**attempt``, capped at ``max``.

    ``jitter`` (0..1) takes a random share off each delay so that many clients dropped at once
    do not all come back in the same instant: the delay lies in ``[d * (1 - jitter), d]``.
    """

    base: float = 0.1
    max: float = 10.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base < 0 or self.max < self.base or not 0 <= self.jitter <= 1:
            raise ValueError("Backoff needs 0 <= base <= max and 0 <= jitter <= 1")

    def delay(self, attempt: int, rand: float | None = None) -> float:
        """Seconds to wait before reconnect ``attempt`` (0 for the first retry).

        ``rand`` in [0, 1) fixes the jitter (tests); by default it is random.
        """
        if rand is None:
            rand = random.random()
        ceiling: float = min(self.max, self.base * 2.0 ** min(attempt, 64))
        return ceiling * (1 - self.jitter * rand)
