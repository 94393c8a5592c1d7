#!/usr/bin/env python3
"""Presence at scale: 10 000 members join one topic, all reconnect at once, a page walk.

    .venv/bin/python bench/presence.py                      # one node, on_full = drop_oldest
    .venv/bin/python bench/presence.py --policy block       # the room topic under block
    .venv/bin/python bench/presence.py --nodes 2            # two nodes sharing a Redis
    .venv/bin/python bench/presence.py --members 2000 --only watch --profile bench/profiles \\
        --profile-phase reconnect                           # py-spy the broker in one phase

Two runs, each on fresh broker processes (``taskset -c 0 .venv/bin/broker serve --config C
--port P --log-level warning``; C has one ``[[topics]]`` rule ``room.>`` with
``presence = true`` and ``on_full = --policy``, and lifts the per-address connection limit),
driven by the Node load generator ``bench/loadgen/presence.mjs`` pinned to core 1:

- ``watch``: every member subscribes with ``join_leave`` (each member also watches):
  ``join`` (all subscribe at once), then ``reconnect`` (every socket dropped, every member
  reconnects and subscribes again: a deploy), then ``pages`` (a presence page walk);
- ``cheap``: members subscribe without ``join_leave``; one more connection watches through
  ``room.*``: the same three phases.

Each phase prints the time to settle (every ``ok`` back, the presence count right on every
node, then every member's own ``presence`` answer back: all its join/leave frames are in),
the join/leave frames the clients read and the messages counted in ``lag`` frames, the
broker's CPU seconds and RSS (before / after / peak, from /proc) and the generator's own
CPU. ``--nodes 2`` starts a ``redis-server`` on a free port (no persistence) and two
cluster nodes, both on core 0 (Redis on core 1 with the generator); members alternate
between the nodes. The open-files limit is raised to the hard limit for every process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from processes import free_port, raise_open_files, stop, wait_listening

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BROKER = ROOT / ".venv" / "bin" / "broker"
PYSPY = ROOT / ".venv" / "bin" / "py-spy"
PYTHON = ROOT / ".venv" / "bin" / "python"
GC_OFF = "import gc, sys; gc.disable(); from broker.operations.cli import main; sys.exit(main())"
LOADGEN = HERE / "loadgen" / "presence.mjs"
RUNS = ("watch", "cheap")

CONFIG = """\
[limits]
max_connections_per_ip = 0
queue_messages = {queue}

[[topics]]
pattern = "room.>"
on_full = "{policy}"
presence = true
"""
CLUSTER = """
[cluster]
backend = "redis://127.0.0.1:{port}/0"
node_id = "{name}"
"""

# What each phase line shows, in order (keys of the generator's JSON).
SHOWN = {
    "connect": ["members", "connect_s", "broker_cpu_s", "rss_before_mib", "rss_after_mib",
                "gen_cpu_pct", "bystander_max_ms"],
    "join": ["settle_s", "subscribed_s", "counts", "joins", "leaves", "lag_dropped", "frames",
             "frames_if_none_dropped", "ws_msgs", "broker_cpu_s", "broker_cpu_pct",
             "rss_before_mib", "rss_after_mib", "rss_peak_mib", "gen_cpu_pct",
             "gen_stall_max_ms", "bystander_max_ms", "closed_by_broker", "close_codes", "errs",
             "dup_joins", "dup_leaves"],
    "pages": ["count", "walk1000_ms", "walk1000_pages", "walk1000_members", "walk100_ms",
              "walk100_pages", "walk100_members", "broker_cpu_s", "bystander_max_ms"],
}  # fmt: skip
SHOWN["reconnect"] = [*SHOWN["join"], "connect_retries", "socket_errors"]


def start_redis(processes: list[subprocess.Popen[bytes]]) -> int:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (make redis, or apt-get install redis)")
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", "1", server, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    processes.append(proc)
    wait_listening(port, proc)
    return port


def start_broker(
    tmp: Path, name: str, args: argparse.Namespace, redis: int | None,
    processes: list[subprocess.Popen[bytes]],
) -> tuple[subprocess.Popen[bytes], int, Path]:  # fmt: skip
    conf = tmp / f"{name}.toml"
    text = CONFIG.format(policy=args.policy, queue=args.queue_messages)
    if redis is not None:
        text += CLUSTER.format(port=redis, name=name)
    conf.write_text(text)
    port = free_port()
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        broker = [str(BROKER)]
        if args.gc_off:  # a diagnostic: the same broker with Python's cyclic GC disabled
            broker = [str(PYTHON), "-c", GC_OFF]
        proc = subprocess.Popen(
            ["taskset", "-c", "0", *broker, "serve", "--config", str(conf),
             "--port", str(port), "--log-level", args.log_level],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    processes.append(proc)
    wait_listening(port, proc)
    return proc, port, log


class Profiler:
    """py-spy ``record`` on every broker, for the whole run or for one phase (``--profile``)."""

    def __init__(self, args: argparse.Namespace, mode: str) -> None:
        self.directory: Path | None = args.profile
        self.phase: str = args.profile_phase
        self.name = f"presence-{mode}-{self.phase}-{args.nodes}n"
        self.phases = ["connect", *args.phases.split(",")]
        self.spies: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def start_run(self, pids: list[int]) -> None:
        self.pids = pids
        if self.phase in ("all", "connect"):
            self._on()

    def phase_done(self, phase: str) -> None:
        """The generator printed ``phase``'s figures (and went on to the next phase)."""
        if self.phase == phase:
            self.stop()
        elif (
            self.phase in self.phases
            and phase in self.phases
            and self.phases.index(self.phase) == self.phases.index(phase) + 1
        ):
            self._on()  # py-spy takes about a second to attach: that much is missed

    def _on(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for pid, node in zip(self.pids, "ab", strict=False):
            out = self.directory / f"{self.name}-{node}.txt"
            self.spies.append(subprocess.Popen(
                [str(PYSPY), "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                 "--nonblocking", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        time.sleep(1.0)

    def stop(self) -> None:
        for spy in self.spies:
            spy.send_signal(signal.SIGINT)
        for spy in self.spies:
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
        self.spies.clear()


def run(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One run on fresh brokers: the generator's phases, as the dicts it printed."""
    processes: list[subprocess.Popen[bytes]] = []
    profiler = Profiler(args, mode)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        try:
            redis = start_redis(processes) if args.nodes > 1 else None
            nodes = [start_broker(tmp, name, args, redis, processes)
                     for name in "ab"[: args.nodes]]  # fmt: skip
            profiler.start_run([proc.pid for proc, _, _ in nodes])
            command = [
                "taskset", "-c", "1", "node", str(LOADGEN),
                "--urls", ",".join(f"ws://127.0.0.1:{port}/" for _, port, _ in nodes),
                "--pids", ",".join(str(proc.pid) for proc, _, _ in nodes),
                "--mode", mode, "--members", str(args.members), "--phases", args.phases,
                "--timeout", str(args.timeout), "--concurrency", str(args.concurrency),
            ]  # fmt: skip
            if args.walks != 1:
                command += ["--walks", str(args.walks)]
            if args.check:
                command += ["--check", "1"]
            if args.nodes > 1:
                command += ["--count-timeout", str(args.count_timeout)]
            generator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            assert generator.stdout is not None
            for text in generator.stdout:
                if text.startswith("{"):
                    result = json.loads(text)
                    results.append(result)
                    print(line(mode, result), flush=True)
                    profiler.phase_done(result["phase"])
            if generator.wait() != 0:
                print(f"# {mode}: the load generator exited with {generator.returncode}")
            for proc, _, log in nodes:
                if proc.poll() is not None:
                    print(f"# {mode}: a broker exited with {proc.returncode} during the run")
                report_log(mode, log)
        finally:
            profiler.stop()
            for proc in reversed(processes):
                stop(proc)
    return results


def report_log(mode: str, log: Path) -> None:
    """The broker's warnings (a count and the first few) and any traceback."""
    lines = log.read_text(errors="replace").splitlines()
    notable = [text for text in lines if " WARNING " in text or " ERROR " in text]
    tracebacks = sum("Traceback" in text for text in lines)
    pings = sum("did not answer a ping" in text for text in lines)  # at info
    if pings:
        print(f"# {mode} {log.stem}: {pings} connections closed for not answering a ping in time")
    if notable or tracebacks:
        print(f"# {mode} {log.stem}: {len(notable)} warning/error lines, {tracebacks} tracebacks")
        for text in notable[:5]:
            print(f"#   {text[:300]}")
    if tracebacks:  # the last one whole: a broker must never have one for a peer's fault
        start = max(i for i, text in enumerate(lines) if "Traceback" in text)
        for text in lines[max(0, start - 2) : start + 40]:
            print(f"#   {text[:300]}")


def line(mode: str, result: dict[str, Any]) -> str:
    phase = result["phase"]
    parts = [f"{mode:<6}", f"{phase:<10}"]
    if phase in ("join", "reconnect") and not result.get("settled"):
        parts.append(f"NOT-SETTLED(timed out in {result.get('timed_out_in')})")
    for key in SHOWN[phase]:
        if key in result:
            value = result[key]
            if isinstance(value, int) and value >= 10000:
                value = f"{value:,}".replace(",", "_")
            parts.append(f"{key}={value}")
    return "  ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=10000)
    parser.add_argument(
        "--policy",
        default="drop_oldest",
        choices=["drop_oldest", "block", "drop_newest", "conflate", "disconnect"],
    )
    parser.add_argument("--nodes", type=int, choices=[1, 2], default=1)
    parser.add_argument("--only", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument(
        "--phases",
        default="join,reconnect,pages",
        help="comma-separated, in order: join, reconnect, pages",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=150,
        help="seconds a phase may take to settle before it is given up",
    )
    parser.add_argument(
        "--count-timeout",
        type=float,
        default=15,
        help="--nodes 2: seconds to wait for every node to count every member",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=500,
        help="handshakes in flight (the broker's max_handshakes is 1000)",
    )
    parser.add_argument("--queue-messages", type=int, default=1024, help="[limits] queue_messages")
    parser.add_argument("--profile", type=Path, help="py-spy record each broker; raw stacks here")
    parser.add_argument(
        "--profile-phase",
        default="all",
        choices=["all", "connect", "join", "reconnect", "pages"],
        help="with --profile: record only during this phase",
    )
    parser.add_argument(
        "--walks", type=int, default=1, help="page walks per page size; the best is shown"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="decode every join/leave and count duplicates (slower generator)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the brokers' (info names each ping timeout; the log costs broker CPU)",
    )
    parser.add_argument(
        "--gc-off",
        action="store_true",
        help="diagnostic: run the broker with Python's cyclic GC disabled",
    )
    args = parser.parse_args()
    limit = raise_open_files()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "broker"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    if dirty:
        commit += " (+ uncommitted changes in broker/)"
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  commit {commit}  "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; broker(s) on core 0, "
          f"generator{' and Redis' if args.nodes > 1 else ''} on core 1; members={args.members} "
          f"nodes={args.nodes} on_full={args.policy} queue_messages={args.queue_messages} "
          f"open files={limit}{' gc=off' if args.gc_off else ''}", flush=True)  # fmt: skip
    for mode in args.only:
        run(mode, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
