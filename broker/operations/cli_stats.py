"""``broker stats``: name the slow subscribers of a running broker, from its ``/connz``.

It reads the internal HTTP listener (``[metrics] port``; see
:mod:`broker.operations.monitor`) and prints
the connections with the deepest queues (or the most drops, or the oldest queued message:
``--sort``), one line each with peer address, token subject and subscriptions. A broker that
cannot be reached is one ``broker: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from broker.core.stats import SortKey, format_subscriptions
from broker.operations.argtypes import count, seconds

DEFAULT_URL = "http://127.0.0.1:8766"
COLUMNS = ("PEER", "SUBJECT", "QUEUED", "BYTES", "DROPPED", "OLDEST", "SUBSCRIPTIONS")


def add_stats_command(commands: Any) -> None:
    """Add the ``stats`` subcommand to ``broker``'s subparsers."""
    stats = commands.add_parser(
        "stats",
        help="list the connections with the deepest queues, most drops or oldest messages",
        description="Read a running broker's /connz (its [metrics] listener) and print the "
        "top connections: peer, token subject, queued messages and bytes, messages dropped, "
        "age of the oldest queued message, subscriptions.",
    )
    stats.add_argument("--url", default=DEFAULT_URL,
                       help=f"the broker's metrics listener (default {DEFAULT_URL})")  # fmt: skip
    stats.add_argument("--sort", choices=list(SortKey), default="queue",
                       help="rank by queue depth, drops or oldest age (default queue)")  # fmt: skip
    stats.add_argument("--limit", type=count, default=10, metavar="N",
                       help="show the top N connections (default 10)")  # fmt: skip
    stats.add_argument("--json", action="store_true", help="print /connz's JSON as it is")
    stats.add_argument("--timeout", type=seconds, default=5.0, metavar="SECONDS",
                       help="give up on the broker after this long (default 5)")  # fmt: skip


def run_stats(args: argparse.Namespace) -> int:
    """Run ``broker stats``; returns the exit status."""
    url = f"{args.url.rstrip('/')}/connz?sort={args.sort}&limit={args.limit}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read()
        report = json.loads(body)
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        reason = getattr(exc, "reason", exc)
        print(f"broker: cannot read {url}: {reason}", file=sys.stderr)
        if isinstance(reason, ConnectionRefusedError):
            print(
                "broker: nothing listens there. `broker stats` reads the broker's metrics "
                "listener, which is off unless its config has\n\n    [metrics]\n    port = "
                f"{urllib.parse.urlsplit(args.url).port or 8766}\n\nand --url points to it "
                "(docs/metrics.md).",
                file=sys.stderr,
            )
        if getattr(exc, "code", None) == 426:  # an HTTPError from the WebSocket port
            print("broker: that is the broker's WebSocket port; `broker stats` reads its "
                  "[metrics] listener (docs/metrics.md)", file=sys.stderr)  # fmt: skip
        return 1
    if not (isinstance(report, dict) and {"connections", "sort", "top"} <= report.keys()):
        print(f"broker: {url} is not a broker's /connz: is --url the broker's [metrics] "
              "listener (docs/metrics.md)?", file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    """``/connz``'s JSON as a heading and an aligned table."""
    top = report["top"]
    heading = f"{report['connections']} connection(s); top {len(top)} by {report['sort']}"
    rows = [COLUMNS]
    for connection in top:
        age = connection["oldest_age"]
        rows.append((
            connection["peer"],
            connection["subject"],
            str(connection["queue_messages"]),
            str(connection["queue_bytes"]),
            str(connection["dropped"]),
            "-" if age is None else f"{age:.2f}s",
            format_subscriptions(connection["subscriptions"]),
        ))  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS) - 1)]
    lines = [heading]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)
