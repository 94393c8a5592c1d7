"""A Trio pub/sub broker: WebSocket clients, NATS-style topics, msgpack or JSON frames.

Embed it with::

    async with trio.open_nursery() as nursery:
        broker = await nursery.start(Broker(load_config("broker.toml")).serve)
        ...
        broker.shutdown()
"""

from broker.config import Config, ConfigError, load_config
from broker.io.server import Broker

__all__ = ["Broker", "Config", "ConfigError", "load_config"]
__version__ = "0.1.0"
