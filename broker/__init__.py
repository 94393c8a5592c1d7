"""A Trio pub/sub broker: WebSocket clients, NATS-style topics, msgpack or JSON frames.

Embed it with::

    async with trio.open_nursery() as nursery:
        broker = await nursery.start(Broker(load_config("broker.toml")).serve)
        ...
        broker.shutdown()

The hot modules may be compiled with mypyc (setup.py); ``BROKER_PURE_PYTHON=1`` in the
environment imports their .py files instead, e.g. to profile or debug them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
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


def compiled() -> bool:
    """Whether the hot modules run compiled (mypyc) rather than as pure Python."""
    hub = importlib.import_module("broker.core.hub")
    return not (hub.__file__ or "").endswith(".py")


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds ``broker.*`` modules by their .py file, ahead of an extension module beside it."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith("broker.") or path is None:
            return None
        leaf = name.rpartition(".")[2]
        for directory in path:
            source = os.path.join(directory, leaf + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(name, source)
        return None  # a package: the usual finders


if os.environ.get("BROKER_PURE_PYTHON"):
    sys.meta_path.insert(0, _SourceFirst())
