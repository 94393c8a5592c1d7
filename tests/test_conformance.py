"""The outside conformance checks (tests/conformance/), run against a real broker.

check.py and check_v11.py were written from docs/protocol.md alone, with the ``websockets``
library and msgpack, by someone who did not read the broker's code: they judge the broker by
its contract. Each runs in its own process, as an outside client would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from broker.core.outbound import Policy
from broker.core.rules import HistoryLimits, TopicRule
from tests.helpers import make_config, start_broker

CHECK = Path(__file__).parent / "conformance" / "check.py"
CHECK_V11 = Path(__file__).parent / "conformance" / "check_v11.py"


async def run_check(check: Path, url: str) -> None:
    """Run one check in its own process; every case must print PASS."""
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, str(check), url],
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
    output = result.stdout.decode()
    failures = [line for line in output.splitlines() if not line.startswith("PASS")]
    assert result.returncode == 0, "\n".join(failures)
    assert "PASS" in output


async def test_broker_passes_the_protocol_conformance_check(broker_url: str) -> None:
    await run_check(CHECK, broker_url)


async def test_broker_passes_the_presence_and_history_conformance_check() -> None:
    # The config check_v11.py's docstring names: chat.> keeps history and presence.
    rule = TopicRule("chat.>", Policy.BLOCK, HistoryLimits(1000, 3600.0), presence=True)
    config = make_config().replace(topics=(rule,))
    async with trio.open_nursery() as nursery:
        broker = await start_broker(nursery, config)
        await run_check(CHECK_V11, broker.url)
        nursery.cancel_scope.cancel()
