#!/usr/bin/env python3
"""Split py-spy ``--format raw`` stacks of the broker's publish path into stages.

    bench/profile_stages.py bench/profiles/small-topics.txt [US_PER_MESSAGE]

Each sample goes to the stage of the innermost frame on its stack that names one (so a
dataclass ``__init__`` under ``validate_frame`` is validation, ``os.write`` under
``send_now`` the write system call); with the CPU microseconds per routed message of the run
profiled, each share is also shown in microseconds. py-spy without ``--native`` charges a
system call's kernel time to the Python line that made it.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

# (stage, functions): a frame names a stage if it is "function (file)" with one of these
# functions in one of these files (a bare name matches any file).
# fmt: off
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("write syscall", ("WebSocket.send_now", "_SocketType._nonblocking_helper", "os.write")),
    ("read syscall", ("SocketStream.receive_some",)),
    ("WebSocket parse", ("wsproto/", "WebSocket._process", "WebSocket.receive")),
    ("frame validation", ("validate_frame", "validate_topic", "_check_common", "_within_depth")),
    ("msgpack decode", ("_decode_msgpack", "decode_batch")),
    ("encode", ("encode_message_body", "message_body_from_pub", "_pack", "encode_ok")),
    ("route", ("Hub.route", "PatternTrie.match", "LocalDelivery.publish", "rule_for")),
    ("queue", ("OutboundQueue.offer", "OutboundQueue._append", "OutboundQueue._wake_writer",
               "DirectWrites.take", "Connection.take_wake_up", "Hub.offer")),
    ("direct writes", ("Connection.write_held", "take_direct", "count_write", "DirectWrites.run",
                       "DirectWrites.flush_writes", "frame_header", "can_send_now")),
    ("writer task", ("Connection._write_loop", "wait_batch", "take_batch", "send_message",
                     "Connection._frames", "finish_send")),
    ("session", ("Session.", "PublishLimiter", "TokenBucket", "may_publish", "Counter.")),
    ("scheduler", ("trio/", "outcome/", "unrolled_run")),
]
# fmt: on
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def stage_of(frame: str) -> str | None:
    """The stage ``frame`` names, if any."""
    match = FRAME.match(frame)
    func, path = (match["func"], match["file"]) if match else (frame, "")
    for stage, names in STAGES:
        for name in names:
            if name.endswith("/") and f"/{name}" in f"/{path}":
                return stage
            if func == name or (name.endswith(".") and func.startswith(name)):
                return stage
    return None


def main() -> None:
    path = sys.argv[1]
    us_per_message = float(sys.argv[2]) if len(sys.argv) > 2 else None
    stages: Counter[str] = Counter()
    samples = 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            n = int(count)
            samples += n
            found = next(
                (s for s in map(stage_of, reversed(stack.split(";"))) if s is not None), "other"
            )
            stages[found] += n
    print(f"{samples} samples")
    for stage, n in stages.most_common():
        share = n / samples
        us = f"  {share * us_per_message:5.2f} us" if us_per_message else ""
        print(f"  {100 * share:5.1f}%{us}  {stage}")


if __name__ == "__main__":
    main()
