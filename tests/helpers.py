"""Starting brokers with a custom config inside a test."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import trio

from broker.config import Config, LimitsConfig, ServerConfig
from broker.core.outbound import Policy
from broker.core.rules import TopicRule
from broker.io.server import Broker


def make_config(
    topics: dict[str, str] | None = None, server: dict[str, Any] | None = None, **limits: Any
) -> Config:
    """A config on 127.0.0.1 port 0 with the given limits, server settings and topic policies."""
    rules = tuple(TopicRule(pattern, Policy(policy)) for pattern, policy in (topics or {}).items())
    return Config(
        server=dataclasses.replace(ServerConfig(host="127.0.0.1", port=0), **(server or {})),
        limits=dataclasses.replace(LimitsConfig(), **limits),
        topics=rules,
    )


async def start_broker(nursery: trio.Nursery, config: Config) -> Broker:
    """Start a broker in ``nursery`` and return it once it listens."""
    broker: Broker = await nursery.start(Broker(config).serve)
    return broker


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (broker state a test cannot await) until it holds; fail after 5 s."""
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - the state has no event to wait on
            await trio.sleep(0.001)
