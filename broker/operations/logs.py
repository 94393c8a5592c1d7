"""Log setup for the daemon: one line per event, as text for people or JSON for collectors.

Log lines carry what peers send (token subjects, subprotocol names, close reasons): the text
format escapes control characters in them, so that no peer can forge a line or move the
cursor of an operator's terminal.
"""

from __future__ import annotations

import json
import logging
import sys
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
