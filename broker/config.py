"""The broker's configuration: one typed object, loaded from TOML and validated once at start.

Every key has a default, so an empty file (or none) gives the embedded single-node broker on
127.0.0.1:8765. Errors raise :class:`ConfigError` naming the offending key and what is wrong
with it. ``config/broker.toml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.history import HistoryLimits
from broker.hub import TopicRule
from broker.outbound import Policy
from broker.topics import InvalidTopic, validate_pattern


class ConfigError(Exception):
    """The configuration is invalid; ``str()`` names the key and the problem in one line."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: where to listen and the transport's limits and timers."""

    host: str = "127.0.0.1"
    port: int = 8765
    max_message_size: int = 1024 * 1024  # bytes in one WebSocket message; more closes with 1009
    handshake_timeout: float = 10.0  # seconds for a client to complete the WebSocket handshake
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    drain_timeout: float = 5.0  # on shutdown (and on any close), how long queued data may flush


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: per-connection bounds."""

    max_subscriptions: int = 1024
    queue_messages: int = 1024
    queue_bytes: int = 8 * 1024 * 1024
    slow_timeout: float = 5.0
    max_payload: int = 1024 * 1024  # encoded size of one pub frame; more gets err too_large
    max_bad_frames: int = 10  # bad frames in a row before closing with 4008


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: verbosity and format of the broker's log lines."""

    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """``[history]``: the in-memory history store (topics keep history per ``[[topics]]``)."""

    max_bytes: int = 64 * 1024 * 1024  # all topics together; least recently published evicted


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``path`` is the file it came from, if any."""

    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    topics: tuple[TopicRule, ...] = ()
    path: Path | None = None

    def replace(self, **sections: Any) -> Config:
        """A copy with some sections replaced (``server=...``, ``limits=...``)."""
        return dataclasses.replace(self, **sections)


def load_config(path: str | Path | None) -> Config:
    """Load and validate the TOML file at ``path``; ``None`` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return config_from_dict(raw, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(raw: Mapping[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document (a dict) into a :class:`Config`."""
    sections = {
        "server": ServerConfig,
        "limits": LimitsConfig,
        "log": LogConfig,
        "history": HistoryConfig,
    }
    _reject_unknown(raw, [*sections, "topics"], "")
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a table ([{name}])")
        built[name] = _build_section(cls, table, name)
    server, limits, log = built["server"], built["limits"], built["log"]
    if not 0 <= server.port <= 65535:
        raise ConfigError(f"server.port: {server.port} is not a TCP port (0..65535)")
    if log.level not in LOG_LEVELS:
        raise ConfigError(f"log.level: {log.level!r} is not one of {', '.join(LOG_LEVELS)}")
    if log.format not in LOG_FORMATS:
        raise ConfigError(f"log.format: {log.format!r} is not one of {', '.join(LOG_FORMATS)}")
    topics = _build_topics(raw.get("topics", []))
    return Config(server, limits, log, built["history"], topics, path)


def _reject_unknown(table: Mapping[str, Any], known: list[str], prefix: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{prefix}{key}: unknown key (known here: {', '.join(sorted(known))})"
            )


def _build_section(cls: Any, table: Mapping[str, Any], name: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(table, list(fields), f"{name}.")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = type(fields[key].default)
        values[key] = _check_value(f"{name}.{key}", value, kind)
    return cls(**values)


def _check_value(key: str, value: Any, kind: type) -> Any:
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    numeric = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        wanted = "an integer" if kind is int else "a number of seconds"
        raise ConfigError(f"{key}: expected {wanted}, got {value!r}")
    if key != "server.port" and value <= 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
    return kind(value)


def _build_topics(raw: Any) -> tuple[TopicRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError("topics: expected an array of tables ([[topics]])")
    policies = ", ".join(policy.value for policy in Policy)
    rules = []
    for index, table in enumerate(raw):
        where = f"topics[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        _reject_unknown(table, ["pattern", "on_full", "history_size", "history_ttl"], f"{where}.")
        pattern = table.get("pattern")
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}.pattern: required, a topic pattern such as 'ticks.>'")
        try:
            validate_pattern(pattern)
        except InvalidTopic as exc:
            raise ConfigError(f"{where}.pattern: {exc}") from None
        on_full = table.get("on_full", Policy.BLOCK.value)
        try:
            policy = Policy(on_full)
        except ValueError:
            raise ConfigError(
                f"{where}.on_full: {on_full!r} is not a policy (one of {policies})"
            ) from None
        rules.append(TopicRule(pattern, policy, _build_history(table, where)))
    return tuple(rules)


def _build_history(table: Mapping[str, Any], where: str) -> HistoryLimits | None:
    size, ttl = table.get("history_size"), table.get("history_ttl")
    if size is None:
        if ttl is not None:
            raise ConfigError(f"{where}.history_ttl: needs history_size (the messages kept)")
        return None
    size = _check_value(f"{where}.history_size", size, int)
    if ttl is not None:
        ttl = _check_value(f"{where}.history_ttl", ttl, float)
    return HistoryLimits(size, ttl)
