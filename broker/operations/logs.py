"""Log setup for the daemon: one line per event, as text for people or JSON for collectors.

Log lines carry what peers send (token subjects, subprotocol names, close reasons): the text
format escapes control characters in them, so that no peer can forge a line or move the
cursor of an operator's terminal. :class:`BurstLog` keeps a flood of one refusal to one line
per burst.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Hashable
from datetime import UTC, datetime


def escape_control(text: str) -> str:
    """``text`` with every character that does not print (newlines, terminal controls,
    bidi overrides) written as its Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class TextFormatter(logging.Formatter):
    """The text format: ``time LEVEL logger: message``, the message on one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``ts``, ``level``, ``logger``, ``msg`` (+ ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send the ``broker`` loggers to stderr at ``level`` in ``fmt`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("broker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class BurstLog:
    """Says which of a stream of like events to log: the first of each burst, where a burst
    ends after ``quiet`` seconds without one. Keyed by what makes events alike (a limit and
    who hit it); remembers at most ``max_keys`` keys."""

    def __init__(self, quiet: float = 10.0, max_keys: int = 4096) -> None:
        self.quiet = quiet
        self.max_keys = max_keys
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (last seen, not logged)

    def first(self, key: Hashable, now: float) -> int | None:
        """Count one event at ``now``: if it starts a burst, how many events of the previous
        burst went unlogged (to say so in the line); ``None`` if it is part of a burst."""
        last = self._last.get(key)
        if last is not None and now - last[0] <= self.quiet:
            self._last[key] = (now, last[1] + 1)
            return None
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]
