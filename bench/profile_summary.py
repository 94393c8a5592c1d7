#!/usr/bin/env python3
"""Summarise py-spy ``--format raw`` stacks: top functions by own and by total time.

bench/profile_summary.py bench/profiles/fanout.txt [N]
"""

from __future__ import annotations

import re
import sys
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/"):
        path = path.split(marker)[-1]
    return f"{match['func']} ({path})"


def package(name: str) -> str:
    path = name.rsplit("(", 1)[-1].rstrip(")")
    return path.split("/")[0] if "/" in path else path


def main() -> None:
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    with open(path, encoding="utf-8") as lines:
        stacks = list(lines)
    for line in stacks:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        packages[package(frames[-1])] += n
        for name in set(frames):
            total[name] += n
    print(f"{samples} samples; own time by package:")
    for name, n in packages.most_common(8):
        print(f"  {100 * n / samples:5.1f}%  {name}")
    print(f"top {top} functions by own time (own %, total %):")
    for name, n in own.most_common(top):
        print(f"  {100 * n / samples:5.1f}%  {100 * total[name] / samples:5.1f}%  {name}")


if __name__ == "__main__":
    main()
