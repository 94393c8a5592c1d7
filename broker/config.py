"""The broker's configuration: one typed object, loaded from TOML and validated once at start.

Every key has a default, so an empty file (or none) gives the embedded single-node broker on
127.0.0.1:8765. Errors raise :class:`ConfigError` naming the offending key and what is wrong
with it. ``config/broker.toml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.cluster.resp import RedisAddress
from broker.core.outbound import Policy
from broker.core.rules import HistoryLimits, IdentityLimits, SessionLimits, TopicRule
from broker.protocol.topics import InvalidTopic, validate_pattern


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
    allowed_origins: tuple[str, ...] = ()  # browser Origins allowed; empty allows any
    max_handshakes: int = 1000  # handshakes in progress; one more drops the oldest of them


@dataclass(frozen=True, slots=True)
class LimitsConfig(SessionLimits):
    """``[limits]``: what each client's session may do (:class:`SessionLimits`, where each
    key's default is), how long a ``block`` subscriber may stay full, and how many clients
    may connect (0: no limit)."""

    slow_timeout: float = 5.0
    max_connections: int = 65536  # in total; one more is refused with HTTP 503
    max_connections_per_ip: int = 0  # from one client address; one more gets HTTP 503


#: Keys where 0 turns the limit off (every other number must be greater than 0).
NO_LIMIT_KEYS = frozenset(
    f"limits.{key}"
    for key in ("max_connections", "max_connections_per_ip", "publish_rate", "publish_burst",
                "publish_bytes_rate", "publish_bytes_burst")
)  # fmt: skip


IDENTITY_LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(IdentityLimits))


def identity_limits(table: Mapping[str, Any], where: str) -> IdentityLimits:
    """The :class:`IdentityLimits` set by the :data:`IDENTITY_LIMIT_KEYS` of ``table`` (other
    keys are the caller's business); raises ConfigError naming ``where.key``."""
    values: dict[str, Any] = {}
    for key in IDENTITY_LIMIT_KEYS:
        if key in table:
            kind = float if key == "publish_rate" else int
            values[key] = _check_value(f"{where}.{key}", table[key], kind, zero_allowed=True)
    return IdentityLimits(**values)


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """One ``[[auth.tokens]]`` entry: a static token, who it is, and what it may do."""

    token: str = ""
    subject: str = ""
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    limits: IdentityLimits = field(default_factory=IdentityLimits)
    info: Any = None  # shown as the member's info on presence topics (docs/presence.md)


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """``[auth.jwt]``: how JWTs are verified and where their permissions are."""

    algorithm: str = "HS256"
    secret: str = ""  # HS256
    public_key_file: str = ""  # RS256: a PEM public key
    audience: str = ""  # if set, the token's aud must contain it
    issuer: str = ""  # if set, the token's iss must equal it
    publish_claim: str = "publish"
    subscribe_claim: str = "subscribe"
    limits_claim: str = "limits"  # a map of IdentityLimits keys, when the token has it


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[auth]``: who may connect (``mode``) and with which permissions."""

    mode: str = "none"
    tokens: tuple[TokenGrant, ...] = ()
    jwt: JwtConfig = field(default_factory=JwtConfig)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: a certificate chain and its key (PEM files) make the broker serve ``wss://``."""

    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        """True if TLS is configured."""
        return bool(self.cert)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: verbosity and format of the broker's log lines."""

    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """``[history]``: the in-memory history store (topics keep history per ``[[topics]]``)."""

    max_bytes: int = 64 * 1024 * 1024  # all topics together; least recently published evicted


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``[cluster]``: share messages with other broker nodes through Redis (docs/cluster.md).

    No ``backend`` and no ``seeds``: the embedded single-node broker. ``backend`` names one
    Redis; ``seeds`` some nodes of a Redis Cluster (the sharded engine,
    :mod:`broker.cluster.sharded`). ``node_id`` names this node in Redis and in the logs
    (random when empty); ``prefix`` starts every Redis channel name.
    """

    backend: str = ""  # redis://host:port/db
    seeds: tuple[str, ...] = ()  # redis://host:port of some Redis Cluster nodes
    # On a Redis Cluster, a topic's first segments that pick its shard; wildcards only after.
    shard_key_segments: int = 1
    node_id: str = ""
    prefix: str = "broker"
    # Wildcard patterns this node follows in Redis (each costs Redis a match per PUBLISH);
    # a sub needing one more gets err too_many_subs.
    max_patterns: int = 1024
    # Seconds an idle topic's history keys live in Redis (refreshed by each publish).
    history_meta_ttl: float = 30 * 24 * 3600.0
    # Seconds after which the members of a node that stopped refreshing them (killed, cut
    # off) leave on every other node (docs/presence.md).
    presence_ttl: float = 30.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the internal HTTP listener (``/metrics``, ``/healthz``, ``/readyz``,
    ``/connz``); off while ``port`` is ``None`` (no ``port`` key), 0 picks a free port."""

    host: str = "127.0.0.1"
    port: int | None = None

    @property
    def enabled(self) -> bool:
        """True if the listener is configured."""
        return self.port is not None


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """``[api]``: the server API for backends (docs/api.md), HTTP on its own listener; off
    while ``port`` is ``None`` (no ``[api]`` table). Every request carries one of ``keys``;
    a body over ``max_payload`` bytes is refused unread (413); ``tls`` serves HTTPS with
    ``[tls]``'s certificate (the default when ``[tls]`` is set)."""

    host: str = "127.0.0.1"
    port: int | None = None
    keys: tuple[str, ...] = ()
    max_payload: int = 1024 * 1024
    tls: bool = False

    @property
    def enabled(self) -> bool:
        """True if the listener is configured."""
        return self.port is not None


#: The fewest characters an API key may have: a short one could be guessed.
MIN_API_KEY = 16

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
AUTH_MODES = ("none", "tokens", "jwt")
JWT_ALGORITHMS = ("HS256", "RS256")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``path`` is the file it came from, if any."""

    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    topics: tuple[TopicRule, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
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
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML must be UTF-8
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
        "tls": TlsConfig,
        "cluster": ClusterConfig,
    }
    _reject_unknown(raw, [*sections, "topics", "auth", "metrics", "api"], "")
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a table ([{name}])")
        built[name] = _build_section(cls, table, name)
    server, limits, log, tls = built["server"], built["limits"], built["log"], built["tls"]
    if not 0 <= server.port <= 65535:
        raise ConfigError(f"server.port: {server.port} is not a TCP port (0..65535)")
    if log.level not in LOG_LEVELS:
        raise ConfigError(f"log.level: {log.level!r} is not one of {', '.join(LOG_LEVELS)}")
    if log.format not in LOG_FORMATS:
        raise ConfigError(f"log.format: {log.format!r} is not one of {', '.join(LOG_FORMATS)}")
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError("tls: set both cert and key (PEM files), or neither")
    _check_cluster(built["cluster"])
    topics = _build_topics(raw.get("topics", []))
    auth = _build_auth(raw.get("auth", {}))
    metrics = _build_metrics(raw.get("metrics", {}))
    api = _build_api(raw["api"], tls) if "api" in raw else ApiConfig()
    return Config(
        server=server,
        limits=limits,
        log=log,
        history=built["history"],
        topics=topics,
        auth=auth,
        tls=tls,
        cluster=built["cluster"],
        metrics=metrics,
        api=api,
        path=path,
    )


def _check_cluster(cluster: ClusterConfig) -> None:
    if cluster.backend and cluster.seeds:
        raise ConfigError(
            "cluster: set backend (one Redis) or seeds (a Redis Cluster's nodes), not both"
        )
    for seed in cluster.seeds:
        try:
            address = RedisAddress.from_url(seed)
        except ValueError as exc:
            raise ConfigError(f"cluster.seeds: {exc} (expected redis://host:port)") from None
        if address.db:
            raise ConfigError(f"cluster.seeds: {seed!r}: a Redis Cluster has database 0 only")
    if cluster.seeds and any(char in "{}" for char in cluster.prefix):
        raise ConfigError(
            f"cluster.prefix: {cluster.prefix!r} must not contain braces on a Redis Cluster "
            "(they make its hash tags)"
        )
    if cluster.backend:
        try:
            RedisAddress.from_url(cluster.backend)
        except ValueError as exc:
            raise ConfigError(f"cluster.backend: {exc} (expected redis://host:port/db)") from None
    for key in ("node_id", "prefix"):
        value = getattr(cluster, key)
        if any(char.isspace() for char in value) or (key == "prefix" and not value):
            raise ConfigError(f"cluster.{key}: {value!r} must be non-empty, without whitespace")
    if any(char in "*?[]\\" for char in cluster.prefix):
        raise ConfigError(
            f"cluster.prefix: {cluster.prefix!r} must not contain Redis glob characters (*?[]\\)"
        )


def _reject_unknown(table: Mapping[str, Any], known: list[str], prefix: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{prefix}{key}: unknown key (known here: {', '.join(sorted(known))})"
            )


def _build_section(cls: Any, table: Mapping[str, Any], name: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    _reject_unknown(table, list(fields), f"{name}.")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = type(fields[key].default)
        where = f"{name}.{key}"
        values[key] = _check_value(where, value, kind, zero_allowed=where in NO_LIMIT_KEYS)
    return cls(**values)


def _check_value(key: str, value: Any, kind: type, *, zero_allowed: bool = False) -> Any:
    if kind is tuple:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{key}: expected an array of strings, got {value!r}")
        return tuple(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    numeric = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        wanted = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key}: expected {wanted}, got {value!r}")
    if zero_allowed:
        if not value >= 0:  # NaN too
            raise ConfigError(f"{key}: must be 0 (no limit) or more, got {value!r}")
    elif key != "server.port" and not value > 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
    if value == math.inf:  # TOML's inf: no limit or timeout here means "never"
        raise ConfigError(f"{key}: must be finite, got inf (for 'never', use a large number)")
    return kind(value)


def _build_metrics(raw: Any) -> MetricsConfig:
    if not isinstance(raw, dict):
        raise ConfigError("metrics: expected a table ([metrics])")
    _reject_unknown(raw, ["host", "port"], "metrics.")
    host = _check_value("metrics.host", raw.get("host", "127.0.0.1"), str)
    port = raw.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
    ):
        raise ConfigError(f"metrics.port: {port!r} is not a TCP port (0..65535)")
    return MetricsConfig(host, port)


def _build_api(raw: Any, tls: TlsConfig) -> ApiConfig:
    if not isinstance(raw, dict):
        raise ConfigError("api: expected a table ([api])")
    _reject_unknown(raw, ["host", "port", "keys", "max_payload", "tls"], "api.")
    host = _check_value("api.host", raw.get("host", "127.0.0.1"), str)
    if "port" not in raw:
        raise ConfigError("api.port: required with [api] (a TCP port; 0 picks a free one)")
    port = raw["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"api.port: {port!r} is not a TCP port (0..65535)")
    keys = _check_value("api.keys", raw.get("keys", []), tuple)
    if not keys:
        raise ConfigError(
            "api.keys: the server API needs at least one key (every request must carry one); "
            "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    for index, key in enumerate(keys):
        if len(key) < MIN_API_KEY or not all("!" <= char <= "~" for char in key):
            raise ConfigError(
                f"api.keys[{index}]: a key is at least {MIN_API_KEY} printable ASCII "
                "characters, without spaces (secrets.token_urlsafe(32) makes one)"
            )
    if len(set(keys)) != len(keys):
        raise ConfigError("api.keys: the same key is given twice")
    max_payload = _check_value("api.max_payload", raw.get("max_payload", 1024 * 1024), int)
    use_tls = raw.get("tls", tls.enabled)
    if not isinstance(use_tls, bool):
        raise ConfigError(f"api.tls: expected true or false, got {use_tls!r}")
    if use_tls and not tls.enabled:
        raise ConfigError("api.tls: true needs [tls] cert and key (the API serves them too)")
    return ApiConfig(host, port, keys, max_payload, use_tls)


def _build_auth(raw: Any) -> AuthConfig:
    if not isinstance(raw, dict):
        raise ConfigError("auth: expected a table ([auth])")
    _reject_unknown(raw, ["mode", "tokens", "jwt"], "auth.")
    mode = raw.get("mode", "none")
    if mode not in AUTH_MODES:
        raise ConfigError(f"auth.mode: {mode!r} is not one of {', '.join(AUTH_MODES)}")
    tokens = _build_tokens(raw.get("tokens", []))
    if mode == "tokens" and not tokens:
        raise ConfigError("auth.tokens: mode is 'tokens' but no [[auth.tokens]] is given")
    jwt_table = raw.get("jwt", {})
    if not isinstance(jwt_table, dict):
        raise ConfigError("auth.jwt: expected a table ([auth.jwt])")
    jwt: JwtConfig = _build_section(JwtConfig, jwt_table, "auth.jwt")
    if mode == "jwt":
        if jwt.algorithm not in JWT_ALGORITHMS:
            raise ConfigError(
                f"auth.jwt.algorithm: {jwt.algorithm!r} is not one of {', '.join(JWT_ALGORITHMS)}"
            )
        if jwt.algorithm == "HS256" and len(jwt.secret.encode()) < 32:
            raise ConfigError("auth.jwt.secret: required with HS256, at least 32 bytes")
        if jwt.algorithm == "RS256" and not jwt.public_key_file:
            raise ConfigError("auth.jwt.public_key_file: required with algorithm RS256")
    return AuthConfig(mode, tokens, jwt)


def _build_tokens(raw: Any) -> tuple[TokenGrant, ...]:
    if not isinstance(raw, list):
        raise ConfigError("auth.tokens: expected an array of tables ([[auth.tokens]])")
    grants = []
    seen: set[str] = set()
    for index, table in enumerate(raw):
        where = f"auth.tokens[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        for key in ("token", "subject"):
            if not isinstance(table.get(key), str) or not table[key]:
                raise ConfigError(f"{where}.{key}: required, a non-empty string")
        _reject_unknown(table, ["token", "subject", "publish", "subscribe", "info",
                                 *IDENTITY_LIMIT_KEYS], f"{where}.")  # fmt: skip
        limits = identity_limits(table, where)
        plain = {
            key: value
            for key, value in table.items()
            if key not in IDENTITY_LIMIT_KEYS and key != "info"
        }
        grant: TokenGrant = _build_section(TokenGrant, plain, where)
        grant = dataclasses.replace(grant, limits=limits, info=table.get("info"))
        if grant.token in seen:
            raise ConfigError(f"{where}.token: the same token is given twice")
        seen.add(grant.token)
        for key in ("publish", "subscribe"):
            _check_patterns(f"{where}.{key}", getattr(grant, key))
        grants.append(grant)
    return tuple(grants)


def _check_patterns(key: str, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        try:
            validate_pattern(pattern)
        except InvalidTopic as exc:
            raise ConfigError(f"{key}: {exc}") from None


def _build_topics(raw: Any) -> tuple[TopicRule, ...]:
    if not isinstance(raw, list):
        raise ConfigError("topics: expected an array of tables ([[topics]])")
    policies = ", ".join(policy.value for policy in Policy)
    rules: list[TopicRule] = []
    for index, table in enumerate(raw):
        where = f"topics[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        known = ["pattern", "on_full", "history_size", "history_ttl", "presence"]
        _reject_unknown(table, known, f"{where}.")
        pattern = table.get("pattern")
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}.pattern: required, a topic pattern such as 'ticks.>'")
        try:
            validate_pattern(pattern)
        except InvalidTopic as exc:
            raise ConfigError(f"{where}.pattern: {exc}") from None
        first = next((i for i, rule in enumerate(rules) if rule.pattern == pattern), None)
        if first is not None:  # the first rule a topic matches applies: this one never would
            raise ConfigError(
                f"{where}.pattern: {pattern!r} is topics[{first}]'s pattern already; "
                "this rule would never apply (merge the two)"
            )
        on_full = table.get("on_full", Policy.BLOCK.value)
        try:
            policy = Policy(on_full)
        except ValueError:
            raise ConfigError(
                f"{where}.on_full: {on_full!r} is not a policy (one of {policies})"
            ) from None
        presence = table.get("presence", False)
        if not isinstance(presence, bool):
            raise ConfigError(f"{where}.presence: expected true or false, got {presence!r}")
        rules.append(TopicRule(pattern, policy, _build_history(table, where), presence))
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
