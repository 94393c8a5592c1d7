#!/usr/bin/env python3
"""Refill: a slow subscriber that loses nothing and slows no one (issue 20).

    .venv/bin/python bench/refill.py                        # the three runs, 20 000 msg/s
    .venv/bin/python bench/refill.py --only refill --rate 10000 --slow 10
    .venv/bin/python bench/refill.py --only refill --history-size 30000   # too short: gaps told

One publisher publishes ``--rate`` messages a second (a ``pub`` with ``id`` each, at most
``--window`` unanswered) for ``--seconds`` to one topic; one fast subscriber and one slow one,
all three through our JS client (``clients/js/src``, msgpack) in the Node load generator
``bench/loadgen/refill.mjs`` pinned to core 1. From ``--warm`` s for ``--slow`` s the slow
subscriber's application takes messages at a tenth of the rate (``--factor``): its socket is
paused whenever it is ahead of that pace. Then it reads at full speed and catches up. Needs
Node 20+ and the node_modules of ``bench/loadgen`` and ``clients/js`` (``make test`` installs
both).

Three runs, each on a fresh ``broker serve`` process pinned to core 0 (a temp config:
``queue_messages = --queue-messages``, ``[metrics]`` on a free port, one ``[[topics]]`` rule).
A topic with history is filled to its ``history_size`` before anyone subscribes, so that the
broker's memory "before" holds a full history and what grows is what the slow subscriber costs.

- ``refill``: ``on_full = "drop_oldest"`` with ``history_size`` (default: twice what the slow
  subscriber falls behind): the broker drops for it, the client reads the drops back;
- ``block``: the same topic under ``block``: the broker holds the publisher instead;
- ``drop``: ``drop_oldest`` without history: the slow subscriber loses messages, told by ``lag``.

One table row per run: the publisher's acknowledged rate (over the whole run, in the slow
phase, in its worst second) and the longest a message waited from its scheduled time to its
``ok`` (``held``); the slow subscriber's application: messages received of those published,
whether in order, messages it never got, the broker's drops (``lag``), gaps reported
(``onGap``), history reads (the client's ``subscription.refills`` / the broker's
``broker_history_reads_total``, every subscriber's), seconds after the slow phase until it is
within 50 ms of the schedule; the broker's RSS (before the first publish, and its peak; in
brackets the bytes its history counts against ``max_bytes``) and CPU. ``check`` is
``ok`` when every message reached the slow application in order or was reported as lost
(``onGap`` where the topic keeps history, ``lag`` where it does not); the script exits 1 if not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from processes import free_port, stop, wait_listening

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BROKER = ROOT / ".venv" / "bin" / "broker"
LOADGEN = HERE / "loadgen" / "refill.mjs"
NODE_MODULES = [HERE / "loadgen" / "node_modules", ROOT / "clients" / "js" / "node_modules"]
RUNS = {  # name: (on_full, keeps history)
    "refill": ("drop_oldest", True),
    "block": ("block", True),
    "drop": ("drop_oldest", False),
}

CONFIG = """\
[limits]
queue_messages = {queue}

[metrics]
port = {metrics}

[[topics]]
pattern = "ticks.>"
on_full = "{policy}"
"""

HEADER = (
    "| run | on_full | history | pub msg/s: all / slow phase / worst 1 s | held max ms "
    "| slow app got / published | order | never got | lag (broker dropped) | onGap msgs "
    "| history reads: slow client / broker | catch-up s | broker RSS MiB before -> peak (history) "
    "| broker CPU | check |"
)


def history_size(args: argparse.Namespace) -> int:
    """``--history-size``, or twice what the slow subscriber falls behind in its slow phase."""
    behind: float = args.rate * args.slow * (1 - 1 / args.factor)
    return int(args.history_size) or max(1000, math.ceil(2 * behind))


def run(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """One run on a fresh broker: the generator's figures, or None if it failed."""
    policy, keeps_history = RUNS[name]
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        port, metrics = free_port(), free_port()
        config = CONFIG.format(queue=args.queue_messages, metrics=metrics, policy=policy)
        if keeps_history:
            config += f"history_size = {history_size(args)}\n"
        (tmp / "broker.toml").write_text(config)
        log = tmp / "broker.log"
        with open(log, "wb") as out:
            broker = subprocess.Popen(
                ["taskset", "-c", "0", str(BROKER), "serve", "--config", str(tmp / "broker.toml"),
                 "--port", str(port), "--log-level", args.log_level],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_listening(port, broker)
            wait_listening(metrics, broker)
            generator = subprocess.run(
                ["taskset", "-c", "1", "node", str(LOADGEN),
                 "--url", f"ws://127.0.0.1:{port}/", "--pid", str(broker.pid),
                 "--metrics", f"http://127.0.0.1:{metrics}/metrics",
                 "--rate", str(args.rate), "--seconds", str(args.seconds),
                 "--warm", str(args.warm), "--slow", str(args.slow), "--factor", str(args.factor),
                 "--size", str(args.size), "--window", str(args.window),
                 "--buffer-size", str(args.buffer_size), "--drain", str(args.drain),
                 "--prefill", str(history_size(args) if keeps_history else 0)],
                stdout=subprocess.PIPE, text=True, check=False,
            )  # fmt: skip
        finally:
            stop(broker)
        lines = [text for text in generator.stdout.splitlines() if text.startswith("{")]
        if generator.returncode != 0 or not lines:
            print(f"# {name}: the load generator exited with {generator.returncode}")
            return None
        for text in log.read_text(errors="replace").splitlines():
            if " WARNING " in text or " ERROR " in text or "Traceback" in text:
                print(f"# {name} broker: {text[:300]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


def check(result: dict[str, Any]) -> str:
    """``ok`` if every message reached the slow application in order or was reported lost."""
    slow = result["slow"]
    told = slow["gap_messages"] if slow["refill_on"] else slow["lag_dropped"]
    problems = []
    if not result["settled"]:
        problems.append("not settled")
    if slow["out_of_order"]:
        problems.append(f"{slow['out_of_order']} out of order")
    if slow["missing"] != told:
        problems.append(f"{slow['missing']} missing, {told} reported")
    if result["pub_errors"]:
        problems.append(f"{result['pub_errors']} publish errors")
    return "ok" if not problems else "FAIL: " + ", ".join(problems)


def number(value: float | None) -> str:
    """``12 345`` (a thin space between thousands), ``-`` for None."""
    return "-" if value is None else f"{value:,}".replace(",", " ")


def row(name: str, result: dict[str, Any]) -> str:
    policy, keeps_history = RUNS[name]
    slow = result["slow"]
    rates = " / ".join(number(result[key]) for key in ("pub_rate", "pub_rate_slow", "pub_worst_1s"))
    history = f"{result['history_mib']}" if result["history_mib"] is not None else "-"
    cells = [
        name, policy, "yes" if keeps_history else "no", rates, number(result["held_max_ms"]),
        f"{number(slow['received'])} / {number(result['published'])}",
        "in order" if slow["out_of_order"] == 0 else f"{slow['out_of_order']} out of order",
        number(slow["missing"]), number(slow["lag_dropped"]), number(slow["gap_messages"]),
        f"{number(slow['refills'])} / {number(result['history_reads'])}",
        number(slow["catch_up_s"]),
        f"{result['rss_before_mib']} -> {result['rss_peak_mib']} ({history})",
        f"{result['broker_cpu_s']} s ({result['broker_cpu_pct']} %)", check(result),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def details(name: str, result: dict[str, Any]) -> str:
    """What the table leaves out: the fast subscriber, the publisher's backlog, the generator."""
    fast = result["fast"]
    return (
        f"# {name}: fast subscriber got {number(fast['received'])} (never got {fast['missing']}, "
        f"lag {fast['lag_dropped']}, reads {fast['refills']}); publisher held p99 "
        f"{result['held_p99_ms']} ms, backlog max {number(result['backlog_max'])}; slow lag max "
        f"{number(result['slow']['lag_max'])}; history answers carried "
        f"{number(result['history_read_messages'])} messages; generator CPU "
        f"{result['gen_cpu_pct']} %, stall max {result['gen_stall_max_ms']} ms; "
        f"{result['wall_s']} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--rate", type=float, default=20000, help="messages published a second")
    parser.add_argument("--seconds", type=float, default=12, help="seconds of publishing")
    parser.add_argument("--warm", type=float, default=1, help="seconds before the slow phase")
    parser.add_argument("--slow", type=float, default=5, help="seconds the slow one is slow")
    parser.add_argument("--factor", type=float, default=10, help="how many times slower it is")
    parser.add_argument("--size", type=int, default=64, help="payload bytes (at least 4)")
    parser.add_argument("--window", type=int, default=1000, help="publishes unanswered at most")
    parser.add_argument("--queue-messages", type=int, default=1024, help="[limits] queue_messages")
    parser.add_argument(
        "--history-size",
        type=int,
        default=0,
        help="history_size (default: twice what the slow subscriber falls behind)",
    )
    parser.add_argument(
        "--buffer-size", type=int, default=1000, help="the JS client's bufferSize (refill)"
    )
    parser.add_argument(
        "--drain", type=float, default=30, help="seconds allowed after publishing to settle"
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args()
    missing = [str(path) for path in NODE_MODULES if not path.is_dir()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `make test` (it runs npm ci)")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  commit {commit}  "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; broker on core 0, "
          f"generator on core 1; rate={args.rate:g}/s for {args.seconds:g} s, slow 1/"
          f"{args.factor:g} from {args.warm:g} s for {args.slow:g} s; payload {args.size} B; "
          f"queue_messages={args.queue_messages} history_size={history_size(args)} "
          f"bufferSize={args.buffer_size}", flush=True)  # fmt: skip
    results = {name: run(name, args) for name in args.only}
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for name, result in results.items():
        if result is not None:
            print(row(name, result))
    for name, result in results.items():
        if result is not None:
            print(details(name, result))
    failed = any(result is None or check(result) != "ok" for result in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
