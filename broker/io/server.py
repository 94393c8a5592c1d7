"""The broker: a nursery holding the WebSocket listener and one task per client connection.

:meth:`Broker.serve` listens (``wss://`` when ``[tls]`` is set) and reads each WebSocket
handshake (:mod:`broker.io.websocket`, within ``handshake_timeout``), admits it
(connection limits, ``Origin``, the token: see :meth:`Broker.admit`), negotiates the encoding
(the subprotocol picks it), and runs a :class:`~broker.io.connection.Connection` per client.
:meth:`Broker.shutdown` stops accepting, lets every connection flush what is queued for up
to ``drain_timeout``, closes each with 1001, and lets :meth:`serve` return.

With ``[metrics] port`` set, :meth:`serve` also runs the internal HTTP listener
(:mod:`broker.operations.monitor`: ``/metrics``, ``/healthz``, ``/readyz``, ``/connz``) in the same
nursery; :attr:`Broker.stats` holds the counters it reports. With ``[api]``, it runs the server
API for backends (:mod:`broker.io.api`) there too.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import resource
import secrets
import socket
import ssl
import time
from collections import Counter
from collections.abc import Hashable, Sequence

import trio

from broker import compiled
from broker.cluster.backplane import RedisBackplane
from broker.cluster.delivery import ClusterDelivery
from broker.cluster.history import RedisHistory
from broker.cluster.presence import RedisPresence
from broker.cluster.resp import RedisAddress
from broker.cluster.sharded import ShardedBackplane
from broker.config import Config, ConfigError, TlsConfig
from broker.core.delivery import Delivery, LocalDelivery
from broker.core.history import MemoryHistory
from broker.core.hub import Hub
from broker.core.permissions import Identity
from broker.core.rules import PolicyTable, TopicRule
from broker.core.stats import BrokerStats, BurstLog
from broker.exceptiongroups import first_leaf
from broker.io.api import answer_other_nodes, serve_api
from broker.io.auth import AuthError, build_authenticator, token_from_request
from broker.io.connection import Connection
from broker.io.websocket import (
    ConnectionClosed,
    Handshake,
    Pinger,
    WebSocket,
    peer_address,
    read_handshake,
)
from broker.io.writes import DirectWrites
from broker.operations.monitor import serve_monitor
from broker.protocol.codes import CloseCode
from broker.protocol.frames import SUBPROTOCOLS, Encoding
from broker.protocol.handshake import BadHandshake, error_response

log = logging.getLogger("broker.server")

#: File descriptors the broker needs besides its clients' (listeners, Redis, logs, metrics).
SPARE_FILES = 64

#: What a peer that goes away (or whose TLS breaks) raises, at any stage: its doing, not ours.
PEER_GONE = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ConnectionClosed,
    EOFError,
    OSError,
)


def choose_encoding(offered: tuple[str, ...]) -> Encoding | None:
    """The encoding for the subprotocols a client offered: its first known one, msgpack if none.

    ``None`` means the client offered only subprotocols this broker does not speak.
    """
    if not offered:
        return Encoding.MSGPACK
    for name in offered:
        if name in SUBPROTOCOLS:
            return Encoding(name)
    return None


#: Seconds a client refused for a connection cap should wait (``Retry-After``): long enough
#: not to hammer a full broker, short enough to take a slot soon after one frees.
CAP_RETRY_AFTER = 5


class Refused(Exception):
    """A handshake refused with HTTP ``status``; ``str()`` is the reason sent in the body,
    ``label`` the reason's name in metrics (one of a few), ``who`` whom the limit counts
    (the token's subject; by default the client's IP address), ``retry_after`` the seconds
    to wait before trying this broker again (``Retry-After``, on every 503)."""

    def __init__(
        self,
        status: int,
        reason: str,
        label: str,
        *,
        who: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.label = label
        self.who = who
        if retry_after is None and status == 503:
            retry_after = CAP_RETRY_AFTER
        self.retry_after = retry_after


def origin_allowed(origin: str | None, allowed: Sequence[str]) -> bool:
    """True if no allow-list is set, no ``Origin`` was sent (not a browser), or it is listed."""
    if not allowed or origin is None:
        return True
    return origin.lower().rstrip("/") in {entry.lower().rstrip("/") for entry in allowed}


def is_loopback(host: str) -> bool:
    """True if listening on ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A TLS server context for ``[tls]``; unreadable or mismatched files, or a key that
    needs a pass phrase (the daemon has no one to ask), are a ConfigError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    def no_pass_phrase() -> bytes:
        raise ConfigError(
            f"tls.key: {tls.key} is encrypted, and the broker cannot ask for its pass phrase: "
            "give it an unencrypted key (openssl pkey -in KEY -out PLAIN_KEY)"
        )

    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: {path}: no such file")
    try:
        context.load_cert_chain(tls.cert, tls.key, password=no_pass_phrase)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls: cannot load cert {tls.cert} and key {tls.key} (a PEM certificate chain and "
            f"its PEM private key): {exc}"
        ) from None
    return context


def unique_node_id(name: str) -> str:
    """This process's id among the nodes: ``name`` (``[cluster] node_id``, for logs and
    Redis' CLIENT LIST) and a random suffix. Each node skips what carries its own id, so two
    nodes given one name by a shared config must still differ."""
    suffix = secrets.token_hex(4)
    return f"{name}-{suffix}" if name else suffix


def build_delivery(config: Config) -> Delivery:
    """The delivery the config asks for: through Redis with ``[cluster]``, else one node."""
    hub = Hub(PolicyTable(config.topics), config.limits.slow_timeout)
    history_for = hub.policies.history_for
    cluster = config.cluster
    backplane: RedisBackplane
    if cluster.seeds:
        backplane = ShardedBackplane(
            [RedisAddress.from_url(seed) for seed in cluster.seeds],
            unique_node_id(cluster.node_id),
            cluster.prefix,
            shard_key_segments=cluster.shard_key_segments,
        )
    elif cluster.backend:
        backplane = RedisBackplane(
            RedisAddress.from_url(cluster.backend),
            unique_node_id(cluster.node_id),
            cluster.prefix,
            max_patterns=cluster.max_patterns,
        )
    else:
        return LocalDelivery(hub, MemoryHistory(history_for, config.history.max_bytes))
    history = RedisHistory(
        backplane, history_for, cluster.prefix, config.history.max_bytes, cluster.history_meta_ttl
    )
    presence = RedisPresence(
        backplane,
        hub,
        backplane.global_base(),
        cluster.presence_ttl,
        enabled=any(rule.presence for rule in config.topics),
    )
    return ClusterDelivery(hub, backplane, history, presence)


class Broker:
    """A single-node broker; run :meth:`serve` in a nursery (``await nursery.start(...)``)."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config()
        self.delivery = build_delivery(self.config)
        self.hub = self.delivery.hub
        self.writes = DirectWrites()
        self.pinger = Pinger()  # every plain-TCP client's keep-alive, in one task
        self.authenticator = build_authenticator(self.config.auth)
        self.ssl_context = server_ssl_context(self.config.tls) if self.config.tls.enabled else None
        self.connections: set[Connection] = set()
        self.admitted_per_ip: Counter[str] = Counter()  # accepted or being accepted
        self.admitted_per_subject: Counter[str] = Counter()
        self._handshaking: dict[trio.CancelScope, None] = {}  # in progress, oldest first
        self._refusals = BurstLog()
        self.port: int | None = None
        self.stats = BrokerStats()
        self.metrics_url: str | None = None  # the internal HTTP listener's, once it listens
        self.api_url: str | None = None  # the server API's, once it listens
        self.api_requests: Counter[tuple[str, int]] = Counter()  # by (endpoint, status)
        self.started = time.monotonic()
        # The server API's disconnect and info reach the other nodes through the backplane,
        # and theirs this one, whether or not it serves the API itself.
        self.other_nodes: RedisBackplane | None = None
        if isinstance(self.delivery, ClusterDelivery):
            assert isinstance(self.delivery.backplane, RedisBackplane)
            self.other_nodes = self.delivery.backplane
            self.node_id = self.other_nodes.node_id
            answer_other_nodes(self, self.other_nodes)
        else:
            self.node_id = self.config.cluster.node_id or socket.gethostname()
        self._shutdown = trio.Event()
        self._connection_ended = trio.Event()
        self._stopped = trio.Event()

    @property
    def url(self) -> str:
        """The ``ws://`` URL clients connect to (once :meth:`serve` has started)."""
        if self.port is None:
            raise RuntimeError("the broker is not listening yet")
        host = self.config.server.host
        host = f"[{host}]" if ":" in host else host
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{host}:{self.port}/"

    def shutdown(self) -> None:
        """Begin a graceful shutdown; :meth:`serve` returns once it is done."""
        self._shutdown.set()

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._shutdown.is_set()

    def ready(self) -> tuple[bool, str]:
        """Whether the broker accepts connections now, and why not: ``/readyz`` answers this.

        False before it listens and once it shuts down. A subsystem that the broker needs to
        be useful (Redis, in a cluster) extends this check.
        """
        if self.port is None:
            return False, "not listening yet"
        if self.shutting_down:
            return False, "shutting down"
        status = self.delivery.status()
        if status is not None and not status[0]:
            return status
        return True, "ready"

    async def wait_stopped(self) -> None:
        """Wait until :meth:`serve` has returned."""
        await self._stopped.wait()

    async def serve(
        self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until :meth:`shutdown`; reports ``self`` once listening."""
        server = self.config.server
        async with trio.open_nursery() as nursery:
            listener_scope = trio.CancelScope()

            async def listen(*, task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
                with listener_scope:
                    listeners = await trio.open_tcp_listeners(server.port, host=server.host)
                    task_status.started(listeners)
                    served: list[trio.abc.Listener[trio.abc.Stream]] = list(listeners)
                    if self.ssl_context is not None:
                        served = [trio.SSLListener(lst, self.ssl_context) for lst in listeners]
                    await trio.serve_listeners(self._serve_stream, served, handler_nursery=nursery)

            await nursery.start(self.delivery.run)
            nursery.start_soon(self.writes.flush_writes)
            nursery.start_soon(self.pinger.run)
            listeners: list[trio.SocketListener] = await nursery.start(listen)
            metrics = self.config.metrics
            if metrics.port is not None:
                self.metrics_url = await nursery.start(
                    serve_monitor, self, metrics.host, metrics.port
                )
            if self.config.api.enabled:
                self.api_url = await nursery.start(
                    serve_api,
                    self,
                    self.config.api,
                    self.ssl_context if self.config.api.tls else None,
                    self.other_nodes,
                )
            self.port = listeners[0].socket.getsockname()[1]
            self._log_startup()
            task_status.started(self)
            await self._shutdown.wait()
            listener_scope.cancel()
            await self._drain()
            nursery.cancel_scope.cancel()
        self._stopped.set()
        log.info("stopped")

    async def _drain(self) -> None:
        timeout = self.config.server.drain_timeout
        log.info(
            "shutting down: closing %d connection(s) with 1001, draining for up to %g s",
            len(self.connections),
            timeout,
        )
        for connection in list(self.connections):
            connection.close(CloseCode.GOING_AWAY, "server shutting down")
        with trio.move_on_after(2 * timeout):  # a flush, then the closing handshake
            while self.connections:
                await self._connection_ended.wait()
                self._connection_ended = trio.Event()

    def _log_startup(self) -> None:
        config = self.config
        rules = ", ".join(_describe(rule) for rule in config.topics) or "none"
        log.info(
            "listening on %s (config: %s; on_full: %s, default block; slow_timeout %g s)",
            self.url,
            config.path or "defaults",
            rules,
            config.limits.slow_timeout,
        )
        log.info("auth mode: %s", config.auth.mode)
        log.info(
            "hot path: %s",
            "compiled (mypyc)"
            if compiled()
            else "pure Python (not compiled: no C compiler at install, or BROKER_PURE_PYTHON)",
        )
        files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        clients = max(0, files - SPARE_FILES)
        if files != resource.RLIM_INFINITY and clients < config.limits.max_connections:
            log.info(
                "the open-file limit (%d) allows about %d clients at once, fewer than "
                "limits.max_connections (%d): raise it with ulimit -n or LimitNOFILE=",
                files,
                clients,
                config.limits.max_connections,
            )
        if self.metrics_url is not None:
            log.info(
                "metrics and health on %s (/metrics /healthz /readyz /connz)", self.metrics_url
            )
            if not is_loopback(config.metrics.host):
                log.warning(
                    "the metrics listener on %s, a non-loopback address, has no authentication: "
                    "/connz shows token subjects, client addresses and subscriptions to anyone "
                    "who can reach it. Keep it on a private network or firewall it.",
                    config.metrics.host,
                )
        if self.api_url is not None:
            log.info("server API on %s (/api/publish /api/broadcast /api/presence /api/history "
                     "/api/disconnect /api/info; docs/api.md)", self.api_url)  # fmt: skip
            if not config.api.tls and not is_loopback(config.api.host):
                log.warning(
                    "THE SERVER API on %s, a non-loopback address, has no TLS: its keys, which "
                    "may publish anywhere and disconnect anyone, cross the network in clear "
                    "text. Set [tls] (the API serves it too), or keep the API on 127.0.0.1.",
                    config.api.host,
                )
        if config.auth.mode == "none" and not is_loopback(config.server.host):
            log.warning(
                "AUTH IS OFF on %s, a non-loopback address: anyone who can reach it may publish "
                "and subscribe to every topic. Set [auth] mode in the config (docs/security.md).",
                config.server.host,
            )

    async def _serve_stream(self, stream: trio.abc.Stream) -> None:
        """One accepted TCP (or TLS) stream, from its first byte to its close: the boundary
        around each connection.

        Whatever the peer does, at whatever stage, ends here: a peer that goes away is
        logged at debug level and counted; a bad handshake is answered, counted and logged
        once per burst; an error of the broker's own (a bug) is logged with its traceback,
        counted, and closes this connection alone (with 1011 once it is a WebSocket). Only
        cancellation reaches the server's nursery.
        """
        remote = peer_address(stream)
        ip, peer = (
            ("unknown", "unknown") if remote is None else (remote[0], f"{remote[0]}:{remote[1]}")
        )
        try:
            admitted = await self._handshake(stream, ip, peer)
            if admitted is not None:
                await self._serve_admitted(*admitted, peer, ip)
        except* PEER_GONE as group:
            log.debug("peer=%s went away: %r", peer, first_leaf(group))
        except* Exception:
            self.stats.internal_errors += 1
            log.exception("peer=%s: internal error; the connection is dropped", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(
        self, stream: trio.abc.Stream, ip: str, peer: str
    ) -> tuple[Handshake, Encoding, Identity] | None:
        """Read the upgrade request and admit or refuse it, within ``handshake_timeout`` and
        among at most ``max_handshakes`` in progress (the oldest is dropped for a new one).
        What to accept, or ``None`` once the stream is done with."""
        failures = self.stats.handshakes_failed
        scope = trio.CancelScope(
            deadline=trio.current_time() + self.config.server.handshake_timeout
        )
        handshaking = self._handshaking
        handshaking[scope] = None
        if len(handshaking) > self.config.server.max_handshakes:
            oldest = next(iter(handshaking))
            del handshaking[oldest]
            oldest.cancel()
            failures["dropped"] += 1
            self._log_once_per_burst(
                "max_handshakes",
                logging.WARNING,
                "%d handshakes in progress (server.max_handshakes): dropping the oldest",
                len(handshaking) + 1,
            )
        try:
            with scope:
                try:
                    request = await read_handshake(stream)
                except BadHandshake as bad:
                    failures["bad_request"] += 1
                    self._log_once_per_burst(
                        ("bad_request", ip), logging.INFO, "rejected peer=%s: %d %s", peer,
                        bad.status, bad,
                    )  # fmt: skip
                    await stream.send_all(
                        error_response(bad.status, f"{bad}\n".encode(), bad.headers)
                    )
                    return None
                except PEER_GONE:
                    failures["gone"] += 1
                    return None
                admitted = await self._admit_or_reject(request, ip, peer)
                return None if admitted is None else (request, *admitted)
        finally:
            if handshaking.pop(scope, 0) is None and scope.cancelled_caught:
                failures["timeout"] += 1
                log.debug("peer=%s: no handshake within %g s", peer,
                          self.config.server.handshake_timeout)  # fmt: skip
        return None

    async def _admit_or_reject(
        self, request: Handshake, ip: str, peer: str
    ) -> tuple[Encoding, Identity] | None:
        """The handshake's encoding and identity if it is admitted; else it is answered with
        the refusal (counted, and logged once per burst) and the answer is ``None``."""
        encoding = choose_encoding(request.upgrade.subprotocols)
        try:
            if encoding is None:
                offered = ", ".join(request.upgrade.subprotocols)
                log.debug("peer=%s offered only unknown subprotocols: %s", peer, offered)
                supported = ", ".join(SUBPROTOCOLS)
                raise Refused(
                    400, f"unsupported subprotocol; offer one of {supported}", "subprotocol"
                )
            return encoding, self.admit(request, ip)
        except Refused as refused:
            self.stats.connections_rejected[refused.label] += 1
            self._log_once_per_burst(
                (refused.label, refused.who or ip), logging.INFO, "rejected peer=%s: %d %s", peer,
                refused.status, refused,
            )  # fmt: skip
            headers = []
            if refused.status == 401:
                headers.append((b"WWW-Authenticate", b'Bearer realm="broker"'))
            if refused.retry_after is not None:
                headers.append((b"Retry-After", str(refused.retry_after).encode()))
            await request.reject(refused.status, f"{refused}\n".encode(), headers)
        except Exception:  # a bug of ours (in an authenticator, say): this handshake's alone
            self.stats.internal_errors += 1
            log.exception("peer=%s: internal error while admitting; answered 500", peer)
            await request.reject(500, b"internal error\n")
        return None

    def _log_once_per_burst(self, key: Hashable, level: int, message: str, *args: object) -> None:
        """Log the first of a burst of like events (``key``: which limit, and whom), saying
        how many of the previous burst went unlogged (they are all counted in metrics)."""
        skipped = self._refusals.first(key, trio.current_time())
        if skipped is not None:
            more = f" ({skipped} more like it before were not logged)" if skipped else ""
            log.log(level, message + more, *args)

    def admit(self, request: Handshake, ip: str) -> Identity:
        """Who the handshake's client is, if it may connect now; raises :class:`Refused`.

        Checked cheapest first: shutting down and connection limits (503), a browser
        ``Origin`` not in ``allowed_origins`` (403), the token (401 or 403), then the
        connections its token allows (503).
        """
        limits = self.config.limits
        if self._shutdown.is_set():  # gone once drained: another node now, or this one later
            gone_in = math.ceil(2 * self.config.server.drain_timeout)
            raise Refused(503, "shutting down", "shutting_down", retry_after=gone_in)
        if limits.max_connections and self.admitted_per_ip.total() >= limits.max_connections:
            raise Refused(
                503,
                f"too many connections (max_connections {limits.max_connections})",
                "max_connections",
            )
        per_ip = limits.max_connections_per_ip
        if per_ip and self.admitted_per_ip[ip] >= per_ip:
            raise Refused(
                503,
                f"too many connections from {ip} (max_connections_per_ip {per_ip})",
                "max_connections_per_ip",
            )
        origin = request.upgrade.header(b"origin")
        if not origin_allowed(origin, self.config.server.allowed_origins):
            raise Refused(403, f"origin {origin} is not allowed", "origin")
        try:
            identity = self.authenticator.authenticate(token_from_request(request.upgrade))
        except AuthError as exc:
            label = "unauthorized" if exc.status == 401 else "forbidden"
            raise Refused(exc.status, str(exc), label) from None
        cap = identity.limits.max_connections
        if cap and self.admitted_per_subject[identity.subject] >= cap:
            raise Refused(
                503,
                f"too many connections for {identity.subject!r} (its token allows {cap})",
                "identity_max_connections",
                who=identity.subject,
            )
        return identity

    async def _serve_admitted(
        self, request: Handshake, encoding: Encoding, identity: Identity, peer: str, ip: str
    ) -> None:
        limits = self.config.limits.for_token(identity.limits)
        server = self.config.server
        subject = identity.subject
        self.admitted_per_ip[ip] += 1
        self.admitted_per_subject[subject] += 1
        try:
            with trio.fail_after(self.config.server.handshake_timeout):  # writing the 101
                websocket: WebSocket = await request.accept(
                    encoding.value if request.upgrade.subprotocols else None,
                    max_message_size=server.max_message_size,
                    ping_interval=server.ping_interval,
                    ping_timeout=server.ping_timeout,
                    pinger=self.pinger,
                )
            connection = Connection(
                websocket, encoding, self.delivery, self.writes, limits, server, peer, identity,
                self.stats,
            )  # fmt: skip
            self.connections.add(connection)
            self.stats.connections_accepted += 1
            log.info("connect peer=%s subject=%s encoding=%s", peer, subject, encoding.value)
            started = trio.current_time()
            try:
                await connection.serve()
            except* PEER_GONE as group:  # what the connection did not expect from its peer
                log.debug("peer=%s went away: %r", peer, first_leaf(group))
            except* Exception:
                self.stats.internal_errors += 1
                log.exception("peer=%s: internal error; closing the connection with 1011", peer)
                connection.close_code = CloseCode.INTERNAL_ERROR
                connection.close_reason = "internal error"
                await websocket.aclose(
                    CloseCode.INTERNAL_ERROR, "internal error", server.drain_timeout
                )
            finally:
                self.pinger.discard(websocket)  # however it ended
                self.connections.discard(connection)
                self._connection_ended.set()
                log.info(
                    "disconnect peer=%s code=%s reason=%r subs=%d after %.1f s",
                    peer,
                    connection.close_code,
                    connection.close_reason,
                    len(connection.subscriptions),
                    trio.current_time() - started,
                )
        finally:
            _release(self.admitted_per_ip, ip)
            _release(self.admitted_per_subject, subject)


def _release(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if not counts[key]:
        del counts[key]


def _describe(rule: TopicRule) -> str:
    kept = []
    if rule.history is not None:
        ttl = f" ttl {rule.history.ttl:g} s" if rule.history.ttl is not None else ""
        kept.append(f"history {rule.history.size}{ttl}")
    if rule.presence:
        kept.append("presence")
    return f"{rule.pattern}={rule.on_full}" + (f" ({', '.join(kept)})" if kept else "")
