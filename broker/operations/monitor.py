"""The internal HTTP listener: metrics, health, and who is slow (``[metrics]`` in the config).

A small ASGI app served by hypercorn on Trio, in the broker's nursery, so it lives and dies
with the broker. It is for operators and Prometheus, not clients: it listens on its own port,
on 127.0.0.1 unless told otherwise, with no authentication (as NATS's monitoring port).

=============== ==========================================================================
``/metrics``    Prometheus text format (:mod:`broker.operations.metrics`).
``/healthz``    200 while the process serves HTTP at all (liveness).
``/readyz``     200 while :meth:`Broker.ready` says so, else 503 with the reason (readiness).
``/connz``      JSON: the connections ranked by ``?sort=queue|drops|oldest`` (default
                ``queue``), the top ``?limit=N`` (default 10), each with its peer, token
                subject, subscriptions, queue depth, drops and oldest queued message's age.
=============== ==========================================================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.core.stats import SortKey, metrics_clock, top_connections
from broker.exceptiongroups import first_leaf
from broker.operations.metrics import broker_registry

if TYPE_CHECKING:
    from hypercorn.typing import Framework

    from broker.io.server import Broker

log = logging.getLogger("broker.monitor")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Response = tuple[int, str, bytes]  # status, content type, body

TEXT = "text/plain; charset=utf-8"
DEFAULT_LIMIT = 10


class MonitorApp:
    """The ASGI app answering the four paths of the module doc for one broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.registry = broker_registry(broker)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Serve one ASGI ``http`` request; acknowledge ``lifespan`` events."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            status, content_type, body = 405, TEXT, b"method not allowed: use GET\n"
        else:
            status, content_type, body = self.respond(scope["path"], scope["query_string"])
        headers = [(b"content-type", content_type.encode()),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    def respond(self, path: str, query: bytes) -> Response:
        """The response to ``GET path?query``."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            ready, why = self.broker.ready()
            return (200 if ready else 503), TEXT, f"{why}\n".encode()
        if path == "/connz":
            return self.connz(parse_qs(query.decode("latin-1")))
        return 404, TEXT, b"not found: try /metrics, /healthz, /readyz or /connz\n"

    def connz(self, query: dict[str, list[str]]) -> Response:
        """``/connz``: the worst connections by ``sort``, as JSON."""
        try:
            key = SortKey(query.get("sort", [SortKey.QUEUE])[-1])
            limit = int(query.get("limit", [str(DEFAULT_LIMIT)])[-1])
            if limit < 0:
                raise ValueError(limit)
        except ValueError:
            sorts = "|".join(SortKey)
            return 400, TEXT, f"bad query: sort={sorts}, limit=N (N >= 0)\n".encode()
        now = metrics_clock()
        snapshots = [connection.snapshot(now) for connection in self.broker.connections]
        body = {
            "connections": len(snapshots),
            "sort": key.value,
            "limit": limit,
            "top": [asdict(snapshot) for snapshot in top_connections(snapshots, key, limit)],
        }
        return 200, "application/json", json.dumps(body).encode()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve_monitor(
    broker: Broker, host: str, port: int, *, task_status: trio.TaskStatus[str]
) -> None:
    """Serve :class:`MonitorApp` on ``host:port`` until cancelled; report its ``http://`` URL."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log.getChild("hypercorn")
    config.errorlog.setLevel(logging.WARNING)  # its "Running on" line repeats the broker's
    config.graceful_timeout = 1.0
    app = cast("Framework", MonitorApp(broker))  # typed with plain dicts, not hypercorn's
    async with trio.open_nursery() as nursery:
        try:
            binds: list[str] = await nursery.start(serve, app, config)
        except* OSError as group:  # say which address: the broker's own listener is fine
            error = first_leaf(group)
            raise OSError(error.errno, error.strerror, f"{host}:{port} ([metrics])") from None
        task_status.started(binds[0])
