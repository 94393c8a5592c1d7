"""The JavaScript client's own tests (``clients/js/test``), run by Node against real brokers.

Node gets five brokers and a dead address: ``BROKER_URL``, whose ``history.>`` topics keep
history (``history.small.>`` only the last 3 messages) and whose ``presence.>`` topics have
presence; ``TOKENS_BROKER_URL``, in tokens mode with
one token (``js-token``, allowed ``js.>``); ``CAPPED_BROKER_URL``, which takes one connection per
IP address (the next handshake gets 503 with ``Retry-After``); ``REFILL_BROKER_URL``, whose
``refill.>`` topics are ``drop_oldest`` with 10 000 messages of history (``refill.short.>`` 100)
behind outbound queues of 16 messages, so a subscriber that stops reading loses messages at
once; ``EVICTING_BROKER_URL``, whose history holds 4000 bytes in all (``[history] max_bytes``)
and whose ``evict.>`` topics keep their last 5 messages, so a topic published to least recently
is evicted whole and starts a new epoch; and ``UNREACHABLE_URL``, a port bound but not
listening, so connecting is refused at once.
``clients/js/test/helpers.js`` names the same settings.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from broker.config import AuthConfig, Config, HistoryConfig, TokenGrant
from broker.core.outbound import Policy
from broker.core.rules import HistoryLimits, TopicRule
from tests.helpers import make_config, start_broker

JS_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "js"


@pytest.fixture
def broker_config() -> Config:
    """The ``broker`` fixture's config: history for ``history.>``, presence for
    ``presence.>``, the defaults elsewhere."""
    return make_config().replace(
        topics=(
            TopicRule("history.small.>", Policy.BLOCK, HistoryLimits(3)),
            TopicRule("history.>", Policy.BLOCK, HistoryLimits(1000)),
            TopicRule("presence.>", Policy.DROP_OLDEST, presence=True),
        )
    )


async def test_js_client_suite_passes_against_the_broker(
    broker_url: str, nursery: trio.Nursery
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JS client's tests need Node 20+")
    if not (JS_CLIENT / "node_modules").is_dir():
        pytest.fail("clients/js/node_modules is missing: run `make test` (it runs npm ci)")
    grant = TokenGrant("js-token", "js", publish=("js.>",), subscribe=("js.>",))
    tokens = await start_broker(nursery, make_config().replace(auth=AuthConfig("tokens", (grant,))))
    capped = await start_broker(nursery, make_config(max_connections_per_ip=1))
    refill = await start_broker(
        nursery,
        make_config(queue_messages=16).replace(
            topics=(
                TopicRule("refill.short.>", Policy.DROP_OLDEST, HistoryLimits(100)),
                TopicRule("refill.>", Policy.DROP_OLDEST, HistoryLimits(10_000)),
            )
        ),
    )
    evicting = await start_broker(
        nursery,
        make_config().replace(
            topics=(TopicRule("evict.>", Policy.BLOCK, HistoryLimits(5)),),
            history=HistoryConfig(max_bytes=4000),
        ),
    )
    test_files = sorted(str(path) for path in (JS_CLIENT / "test").glob("*.test.js"))
    # Bound without listen(): the port stays ours, and a connection to it is refused.
    with socket.socket() as unreachable, trio.fail_after(120):
        unreachable.bind(("127.0.0.1", 0))
        env = {
            **os.environ,
            "BROKER_URL": broker_url,
            "TOKENS_BROKER_URL": tokens.url,
            "CAPPED_BROKER_URL": capped.url,
            "REFILL_BROKER_URL": refill.url,
            "EVICTING_BROKER_URL": evicting.url,
            "UNREACHABLE_URL": f"ws://127.0.0.1:{unreachable.getsockname()[1]}/",
        }
        result = await trio.run_process(
            [node, "--test", *test_files],
            cwd=JS_CLIENT,
            env=env,
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, f"node --test failed:\n{output}"
    # A skipped describe() block is not counted in "# skipped", but its line says "# SKIP".
    assert "# fail 0" in output and "# SKIP" not in output, output
