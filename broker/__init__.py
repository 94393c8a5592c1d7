"""A Trio pub/sub broker: WebSocket clients, NATS-style topics, msgpack or JSON frames.

Embed it with::

    async with trio.open_nursery() as nursery:
        broker = await nursery.start(Broker(load_config("broker.toml")).serve)
        ...
        broker.shutdown()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.config import Config, ConfigError, load_config
    from broker.io.server import Broker

__all__ = ["Broker", "Config", "ConfigError", "load_config"]
__version__ = "0.1.0"

_PUBLIC = {"Broker": "broker.io.server", "Config": "broker.config",
           "ConfigError": "broker.config", "load_config": "broker.config"}  # fmt: skip


def __getattr__(name: str) -> Any:
    """The public names, imported when first used: ``broker_client`` imports
    ``broker.protocol.codes`` and should not load the whole broker for it."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
