"""The outside conformance check (tests/conformance/check.py), run against a real broker.

check.py was written from docs/protocol.md alone, with the ``websockets`` library and
msgpack, by someone who did not read the broker's code: it judges the broker by its contract.
It runs in its own process, as an outside client would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

CHECK = Path(__file__).parent / "conformance" / "check.py"


async def test_broker_passes_the_protocol_conformance_check(broker_url: str) -> None:
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, str(CHECK), broker_url],
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
    output = result.stdout.decode()
    failures = [line for line in output.splitlines() if not line.startswith("PASS")]
    assert result.returncode == 0, "\n".join(failures)
    assert "PASS" in output
