"""The soak test (bench/soak.py): a short run passes, and its ledger catches what it must.

The short run starts its own broker and 300 clients for 20 s of traffic (about 22 s of wall
time on a 2-core machine): aborts, bad frames, msgpack and JSON, wildcards, with and without
acks. The ledger tests feed it events by hand, to show that a "0" from the soak means
something: a loss, a duplicate and a reordering are each counted, and nothing that the
broker is allowed to skip is counted as lost.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
SUMMARY = re.compile(r"^soak clients=.*$", re.MULTILINE)


def figures(summary: str) -> dict[str, str]:
    """The ``key=value`` figures of the summary line."""
    return dict(re.findall(r"([a-z_%]+)=(\S+)", summary))


def test_a_short_soak_loses_duplicates_and_reorders_nothing() -> None:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--clients", "300", "--seconds", "20", "--progress", "0"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    match = SUMMARY.search(done.stdout)
    assert match is not None, output
    summary = match.group(0)
    assert "lost=0 duplicated=0 reordered=0 " in summary, output
    got = figures(summary)
    assert got["slow_consumer_closes"] == "0", output
    assert got["tracebacks"] == "0", output
    assert got["fds_end"] == got["fds_baseline"], output
    # Not a vacuous pass: the run did publish, deliver, abort and send bad frames.
    for key in ("published", "delivered", "aborts", "bad_frames"):
        assert int(got[key]) > 0, (key, output)
    assert int(got["acked"].rstrip(")")) > 0, output


# --- the ledger on its own ---


def load_soak() -> ModuleType:
    """bench/soak.py as a module (bench/ is not a package)."""
    if str(SOAK.parent) not in sys.path:  # it imports bench/processes.py, as when run
        sys.path.append(str(SOAK.parent))
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def subscribe(soak: ModuleType, ledger: Any, conn: Any, pattern: str) -> Any:
    """A subscription of ``conn`` to ``pattern`` whose ``ok`` was just read."""
    subscription = soak.Subscription(conn, pattern)
    conn.by_pattern.setdefault(pattern, []).append(subscription)
    ledger.on_sub_ok(subscription)
    return subscription


def test_the_ledger_counts_losses_duplicates_and_reorderings() -> None:
    soak = load_soak()
    ledger = soak.Ledger()
    publisher, subscriber = soak.Conn(1, None, None, True), soak.Conn(2, None, None, False)
    stream = ledger.stream(publisher, "soak.r1.2")
    early = stream.add(soak.tick())  # sent before the sub's ok: need not arrive
    subscription = subscribe(soak, ledger, subscriber, "soak.r1.*")
    seqs = [stream.add(soak.tick()) for _ in range(5)]
    for seq in [early, *seqs]:
        ledger.on_ack(stream, seq)
    for seq in [seqs[0], seqs[2], seqs[1], seqs[1]]:  # seqs[3] and seqs[4] never come
        ledger.on_message(subscriber, "soak.r1.*", "soak.r1.2", [1, "soak.r1.2", seq, ""])
    ledger.on_unsub_sent(subscription)
    ledger.on_unsub_ok(subscription)
    assert (ledger.lost.count, ledger.duplicated.count, ledger.reordered.count) == (2, 1, 1)
    assert ledger.expected == 5  # the early one is not expected
    missing = [f"seq {seq} " for seq in seqs[3:]]
    assert all(seq in text for seq, text in zip(missing, ledger.lost.examples, strict=True))


def test_the_ledger_expects_only_what_the_broker_owes() -> None:
    soak = load_soak()
    ledger = soak.Ledger()
    publisher, subscriber = soak.Conn(1, None, None, True), soak.Conn(2, None, None, True)
    stream = ledger.stream(publisher, "soak.r3.4")
    other = ledger.stream(publisher, "soak.r9.9")  # matches no pattern held
    subscription = subscribe(soak, ledger, subscriber, "soak.*.4")
    unacked = stream.add(soak.tick())  # published without id: never required
    acked_late = stream.add(soak.tick())  # its ok comes after the unsub was sent
    elsewhere = other.add(soak.tick())
    ledger.on_ack(other, elsewhere)
    ledger.on_unsub_sent(subscription)
    ledger.on_ack(stream, acked_late)
    ledger.on_unsub_ok(subscription)
    assert ledger.lost.count == 0 and ledger.expected == 0, ledger.lost.examples
    # An aborted subscriber's subscriptions are not checked for losses at all.
    dropped = subscribe(soak, ledger, subscriber, "soak.r3.4")
    required = stream.add(soak.tick())
    ledger.on_ack(stream, required)
    assert dropped.expect  # it was expected...
    ledger.on_conn_end(subscriber, "aborted")
    assert ledger.lost.count == 0 and ledger.abandoned_subscriptions == 1  # ...but not owed
    assert unacked not in (required, acked_late)


def test_the_ledger_flags_a_message_for_a_pattern_not_held() -> None:
    soak = load_soak()
    ledger = soak.Ledger()
    publisher, subscriber = soak.Conn(1, None, None, True), soak.Conn(2, None, None, True)
    stream = ledger.stream(publisher, "soak.r0.0")
    subscription = subscribe(soak, ledger, subscriber, "soak.r0.0")
    before = stream.add(soak.tick())
    ledger.on_unsub_sent(subscription)
    ledger.on_unsub_ok(subscription)
    after = stream.add(soak.tick())
    # Published before the unsub's ok: it may still come (a publish that waited for room).
    ledger.on_message(subscriber, "soak.r0.0", "soak.r0.0", [1, "soak.r0.0", before, ""])
    assert (ledger.late, ledger.misrouted.count) == (1, 0)
    # Published after the unsub's ok: the broker had no subscription to deliver it to.
    ledger.on_message(subscriber, "soak.r0.0", "soak.r0.0", [1, "soak.r0.0", after, ""])
    assert ledger.misrouted.count == 1
    # A topic the pattern does not match.
    ledger.on_message(subscriber, "soak.r0.*", "soak.r0.0", [1, "soak.r0.1", 1, ""])
    assert ledger.misrouted.count == 2
