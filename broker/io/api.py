"""The server API: HTTP endpoints for backends, on their own listener (``[api]``, docs/api.md).

A backend that holds no WebSocket (a Django or Flask view, a worker, a shell script) publishes,
reads presence and history, disconnects a user and reads the cluster's figures with one HTTP
request each, authenticated by an API key. The endpoints are :data:`ROUTES`, described by
:data:`~broker.io.openapi.OPENAPI` (served at ``GET /api/openapi.json``, without a key).

A request is checked cheapest first: its path (404), its method (405), its key (401; compared
in constant time, never logged), whether the broker is shutting down (503), its
``Content-Type`` (415), its size (413: by ``Content-Length`` before a byte of the body is
read, else as the body arrives, never past ``max_payload``), its body (400: not JSON or
msgpack, or not a map), then what the endpoint asks (400, 409, 503). Bodies are checked as
the protocol checks frames (:func:`~broker.protocol.frames.validate_frame`, the same codes and
messages), and a publish is a ``pub`` with ``id``: :meth:`Delivery.publish`, then its
:class:`~broker.core.delivery.Pending` awaited, so the answer comes once the message is queued
for every matching subscriber under each topic's policy (and handed to Redis in a cluster).
An API key may publish anywhere and is not rate limited: it is the backend's, not a client's.

``disconnect`` and ``info`` answer for every node: a cluster node asks the others through the
backplane (:class:`OtherNodes`), and answers their questions with :func:`disconnect_here` and
:func:`node_info` (:func:`answer_other_nodes`), whether or not it serves the API itself.

Served by :mod:`broker.io.http` (h11, keep-alive) in the broker's nursery; during a graceful
shutdown it answers 503 until the broker stops.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgpack
import trio

from broker import __version__
from broker.config import ApiConfig
from broker.core.delivery import Unavailable, WaitForRoom
from broker.core.stats import metrics_clock
from broker.io.http import Body, BodyTooLarge, Request, Response, serve_http
from broker.io.openapi import OPENAPI
from broker.protocol.codes import CloseCode, ErrorCode
from broker.protocol.frames import (
    STRICT_JSON,
    Encoding,
    FrameError,
    HistoryQuery,
    PresenceQuery,
    Pub,
    encode_frame,
    spells_text,
    validate_frame,
)

if TYPE_CHECKING:
    from broker.io.server import Broker

log = logging.getLogger("broker.api")

#: Every endpoint and its method.
ROUTES: Final = {
    "/api/publish": "POST",
    "/api/broadcast": "POST",
    "/api/presence": "POST",
    "/api/history": "POST",
    "/api/disconnect": "POST",
    "/api/info": "GET",
    "/api/openapi.json": "GET",
}
#: The most topics one ``broadcast`` publishes to.
MAX_BROADCAST = 1000
#: What a disconnected client is told when the request gives no ``reason``.
DISCONNECT_REASON = "disconnected by the server API"
#: The longest close reason, in UTF-8 bytes (a close frame's payload is at most 125 bytes).
MAX_REASON = 123
#: Seconds a client told 503 during a shutdown should wait before trying this node again.
SHUTDOWN_RETRY_AFTER = 10

MEDIA_TYPES: Final = {
    "application/json": Encoding.JSON,
    "application/msgpack": Encoding.MSGPACK,
    "application/x-msgpack": Encoding.MSGPACK,
    "application/vnd.msgpack": Encoding.MSGPACK,
}
CONTENT_TYPES: Final = {
    Encoding.JSON: b"application/json",
    Encoding.MSGPACK: b"application/msgpack",
}

#: The HTTP status of each error code.
STATUSES: Final = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.INVALID_TOPIC: 400,
    ErrorCode.NOT_ENABLED: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class ApiError(Exception):
    """A request answered with HTTP ``status`` and ``{"error": {"code", "message"}}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = list(headers)

    @classmethod
    def from_frame_error(cls, error: FrameError) -> ApiError:
        """The answer to a body the protocol's checks refused."""
        return cls(STATUSES[error.code], str(error.code), error.msg)

    def body(self) -> dict[str, Any]:
        """The error body."""
        return {"error": {"code": self.code, "message": str(self)}}


class OtherNodes(Protocol):
    """The other nodes of a cluster (:class:`~broker.cluster.backplane.RedisBackplane`)."""

    def answer(self, kind: str, handler: Callable[[Any], Any]) -> None:
        """Answer the other nodes' questions of ``kind`` with ``handler(request)``."""

    async def ask(self, kind: str, request: Any) -> list[Any]:
        """Every other node's answer to a question of ``kind``; raises :class:`Unavailable`."""


# --- what every node answers -------------------------------------------------------------------


def disconnect_here(broker: Broker, user: str, code: int, reason: str) -> int:
    """Close this node's connections of ``user`` (a token's subject) with ``code`` and
    ``reason``, discarding what is queued for them; how many were open (not closing already)."""
    closed = 0
    for connection in list(broker.connections):
        if connection.identity.user == user and connection.close_code is None:
            connection.close(code, reason, flush=False)
            closed += 1
    if closed:
        log.info("server API: closing %d connection(s) of user %r with %d", closed, user, code)
    return closed


def node_info(broker: Broker) -> dict[str, Any]:
    """This node's line of ``/api/info``."""
    return {
        "node": broker.node_id,
        "version": __version__,
        "connections": len(broker.connections),
        "subscriptions": broker.hub.subscription_count(),
        "uptime": round(time.monotonic() - broker.started, 3),
    }


def answer_other_nodes(broker: Broker, nodes: OtherNodes) -> None:
    """Answer the other nodes' ``disconnect`` and ``info`` questions for ``broker``."""

    def disconnect(request: Any) -> int:
        return disconnect_here(broker, request["user"], request["code"], request["reason"])

    nodes.answer("disconnect", disconnect)
    nodes.answer("info", lambda _: node_info(broker))


# --- bodies ------------------------------------------------------------------------------------


def decode_body(body: bytes, encoding: Encoding) -> dict[str, Any]:
    """The map a request's body holds; raises :class:`ApiError` (400) if it holds none."""
    try:
        if encoding is Encoding.MSGPACK:
            value = msgpack.unpackb(body, raw=False, strict_map_key=False)
        else:
            text = body.decode()
            value = STRICT_JSON.decode(text)  # a body may span lines (pretty-printed)
            if not spells_text(text, value):
                raise UnicodeError
    except UnicodeError:
        raise ApiError(400, ErrorCode.BAD_REQUEST, "the body is not valid UTF-8 text") from None
    except (ValueError, RecursionError) as exc:  # msgpack's errors are ValueErrors too
        kind = "msgpack" if encoding is Encoding.MSGPACK else "JSON"
        message = f"the body is not one {kind} value: {exc or type(exc).__name__}"
        raise ApiError(400, ErrorCode.BAD_REQUEST, message) from None
    if not isinstance(value, dict):
        raise ApiError(400, ErrorCode.BAD_REQUEST, "the body must be a map (a JSON object)")
    return value


def encode_answer(answer: dict[str, Any], encoding: Encoding) -> bytes:
    """An answer's body, in ``encoding`` (JSON shows bytes as base64, as to JSON clients)."""
    return encode_frame(answer, encoding)


def _command(
    op: str, body: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...]
) -> Any:
    """The command the protocol makes of ``body``'s keys as an ``op`` frame; raises
    :class:`ApiError` with the protocol's code and words when it refuses it."""
    for key in required:
        if key not in body:
            raise ApiError(400, ErrorCode.BAD_REQUEST, f"missing {key!r}")
    frame = {key: body[key] for key in (*required, *optional) if key in body}
    frame["op"] = op
    if op != "pub":
        frame["id"] = 0
    checked = validate_frame(frame, 0)
    if isinstance(checked, FrameError):
        raise ApiError.from_frame_error(checked)
    return checked


# --- the app -----------------------------------------------------------------------------------


class ApiApp:
    """The server API's endpoints for one broker, as an HTTP handler (see the module doc)."""

    def __init__(self, broker: Broker, config: ApiConfig, nodes: OtherNodes | None) -> None:
        self.broker = broker
        self.config = config
        self.nodes = nodes
        self._keys = [key.encode() for key in config.keys]
        self._endpoints: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "/api/publish": self.publish,
            "/api/broadcast": self.broadcast,
            "/api/presence": self.presence,
            "/api/history": self.history,
            "/api/disconnect": self.disconnect,
        }

    async def __call__(self, request: Request, body: Body) -> Response:
        """Answer one request (see the module doc for the order of the checks)."""
        encoding = _accepted(request.header(b"accept"))
        headers: list[tuple[bytes, bytes]] = []
        try:
            status, encoding, answer = await self._respond(request, body)
        except ApiError as error:
            status, answer, headers = error.status, error.body(), error.headers
            if status >= 500 or status == 401:
                log.debug("server API: peer=%s %s %s: %d %s", request.peer, request.method,
                          request.path, status, error)  # fmt: skip
        endpoint = request.path if request.path in ROUTES else "other"
        self.broker.api_requests[(endpoint, status)] += 1
        return Response(status, encode_answer(answer, encoding), CONTENT_TYPES[encoding], headers)

    async def _respond(self, request: Request, body: Body) -> tuple[int, Encoding, dict[str, Any]]:
        """The status, encoding and answer of one request; raises :class:`ApiError`."""
        path, method = request.path, request.method
        expected = ROUTES.get(path)
        if expected is None:
            raise ApiError(404, "not_found", f"no endpoint {path}: see /api/openapi.json")
        if method != expected:
            raise ApiError(405, ErrorCode.BAD_REQUEST, f"{path} takes {expected}, not {method}",
                           [(b"allow", expected.encode())])  # fmt: skip
        if path == "/api/openapi.json":
            return 200, Encoding.JSON, OPENAPI
        self._authorize(request.header(b"authorization"))
        if self.broker.shutting_down:
            raise ApiError(503, ErrorCode.UNAVAILABLE, "shutting down: try another node",
                           [(b"retry-after", str(SHUTDOWN_RETRY_AFTER).encode())])  # fmt: skip
        if method == "GET":
            return 200, _accepted(request.header(b"accept")), await self.info()
        encoding = _content_type(request.header(b"content-type"))
        try:
            raw = await body.read(self.config.max_payload)
        except BodyTooLarge:
            raise ApiError(413, ErrorCode.TOO_LARGE,
                           f"the body exceeds max_payload ({self.config.max_payload} bytes)"
                           ) from None  # fmt: skip
        return 200, encoding, await self._endpoints[path](decode_body(raw, encoding))

    def _authorize(self, header: bytes | None) -> None:
        """Raise :class:`ApiError` (401) unless an ``Authorization`` header carries one of the
        keys. Compared in constant time: a wrong key takes as long to refuse whichever of its
        bytes differ."""
        scheme, _, token = (header or b"").partition(b" ")
        token = token.strip()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(token, key)
        if found and scheme.lower() == b"bearer":
            return
        why = "is not one of [api] keys" if header else "is required"
        raise ApiError(401, "unauthorized", f"an API key {why}: send 'Authorization: Bearer KEY'",
                       [(b"www-authenticate", b'Bearer realm="broker-api"')])  # fmt: skip

    # --- the endpoints ---

    async def publish(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/api/publish``: ``topic``, ``data``."""
        command: Pub = _command("pub", body, ("topic", "data"), ())
        return await self._publish(command.topic, command.data)

    async def _publish(self, topic: str, data: Any) -> dict[str, Any]:
        """Publish as a ``pub`` with ``id``; ``{}``, or the message's position on a topic
        that keeps history. Raises :class:`ApiError` (503) if Redis is unreachable."""
        delivery = self.broker.delivery
        history = delivery.hub.policies.history_for(topic)
        rest = delivery.publish(topic, data, metrics_clock(), acknowledged=True)
        position = None
        if history is not None and (rest is None or isinstance(rest, WaitForRoom)):
            # Numbered in this node's history just now, with no checkpoint since: its offset.
            position = delivery.history.position(topic, trio.current_time())
        if rest is not None:
            try:
                position = await rest.complete() or position  # numbered in Redis: its own
            except Unavailable as exc:
                raise ApiError(503, ErrorCode.UNAVAILABLE, str(exc)) from None
        return {} if position is None else {"epoch": position.epoch, "offset": position.offset}

    async def broadcast(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/api/broadcast``: ``topics`` (1..1000), ``data``; a result per topic, in order."""
        topics = body.get("topics")
        if not isinstance(topics, list) or not 1 <= len(topics) <= MAX_BROADCAST:
            raise ApiError(
                400,
                ErrorCode.BAD_REQUEST,
                f"'topics' must be a list of 1 to {MAX_BROADCAST} topics",
            )
        if "data" not in body:
            raise ApiError(400, ErrorCode.BAD_REQUEST, "missing 'data'")
        results: list[dict[str, Any]] = []
        for topic in topics:
            try:
                frame = {"topic": topic, "data": body["data"]}
                command: Pub = _command("pub", frame, ("topic", "data"), ())
                results.append(await self._publish(command.topic, command.data))
            except ApiError as error:
                if isinstance(topic, str) and error.code == ErrorCode.BAD_REQUEST:
                    raise  # the data's fault, found at the first topic: nothing published
                results.append(error.body())
        return {"results": results}

    async def presence(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/api/presence``: ``topic``, optional ``limit``, ``cursor``."""
        command: PresenceQuery = _command("presence", body, ("topic",), ("limit", "cursor"))
        if not self.broker.delivery.hub.policies.rule_for(command.topic).presence:
            raise ApiError(
                409,
                ErrorCode.NOT_ENABLED,
                f"{command.topic!r} has no presence (a [[topics]] rule with presence = true)",
            )
        try:
            page = await self.broker.delivery.presence.page(
                command.topic, command.limit, command.cursor
            )
        except Unavailable as exc:
            raise ApiError(503, ErrorCode.UNAVAILABLE, str(exc)) from None
        return page.fields()

    async def history(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/api/history``: ``topic``, optional ``since``, ``limit``."""
        command: HistoryQuery = _command("history", body, ("topic",), ("since", "limit"))
        if self.broker.delivery.hub.policies.history_for(command.topic) is None:
            raise ApiError(
                409,
                ErrorCode.NOT_ENABLED,
                f"{command.topic!r} keeps no history (a [[topics]] rule with history_size)",
            )
        try:
            kept = await self.broker.delivery.read_history(
                command.topic, command.since, command.limit
            )
        except Unavailable as exc:
            raise ApiError(503, ErrorCode.UNAVAILABLE, str(exc)) from None
        self.broker.stats.count_history_read(len(kept.messages))
        return kept.fields()

    async def disconnect(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/api/disconnect``: ``user``, optional ``code`` (4000..4999), ``reason``."""
        user, code = body.get("user"), body.get("code", int(CloseCode.DISCONNECTED))
        reason = body.get("reason", DISCONNECT_REASON)
        if not isinstance(user, str) or not user:
            raise ApiError(400, ErrorCode.BAD_REQUEST, "'user' must be a token's subject")
        if type(code) is not int or not 4000 <= code <= 4999:
            raise ApiError(400, ErrorCode.BAD_REQUEST, "'code' must be an integer 4000..4999")
        if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON:
            raise ApiError(
                400,
                ErrorCode.BAD_REQUEST,
                f"'reason' must be a string of at most {MAX_REASON} UTF-8 bytes",
            )
        closed = disconnect_here(self.broker, user, code, reason)
        if self.nodes is not None:
            request = {"user": user, "code": code, "reason": reason}
            try:
                answers = await self.nodes.ask("disconnect", request)
            except Unavailable as exc:
                raise ApiError(
                    503,
                    ErrorCode.UNAVAILABLE,
                    f"{exc}; {closed} connection(s) closed on this node only",
                ) from None
            closed += sum(answer for answer in answers if type(answer) is int)
        return {"disconnected": closed}

    async def info(self) -> dict[str, Any]:
        """``GET /api/info``: every node's figures, and their sums."""
        nodes = [node_info(self.broker)]
        if self.nodes is not None:
            try:
                answers = await self.nodes.ask("info", None)
            except Unavailable as exc:
                raise ApiError(503, ErrorCode.UNAVAILABLE, str(exc)) from None
            nodes += [answer for answer in answers if isinstance(answer, dict)]
        nodes.sort(key=lambda node: str(node.get("node")))
        return {
            "version": __version__,
            "connections": sum(node.get("connections", 0) for node in nodes),
            "subscriptions": sum(node.get("subscriptions", 0) for node in nodes),
            "nodes": nodes,
        }


def _accepted(accept: bytes | None) -> Encoding:
    """The encoding an ``Accept`` header asks for first (JSON if it names neither)."""
    for item in (accept or b"").decode("latin-1").split(","):
        encoding = MEDIA_TYPES.get(item.split(";", 1)[0].strip().lower())
        if encoding is not None:
            return encoding
    return Encoding.JSON


def _content_type(header: bytes | None) -> Encoding:
    """The encoding a ``Content-Type`` names; raises :class:`ApiError` (415) for others."""
    media = (header or b"").decode("latin-1").split(";", 1)[0].strip().lower()
    encoding = MEDIA_TYPES.get(media)
    if encoding is None:
        raise ApiError(415, ErrorCode.BAD_REQUEST,
                       "Content-Type must be application/json or application/msgpack"
                       + (f", not {media}" if media else ""))  # fmt: skip
    return encoding


async def serve_api(
    broker: Broker,
    config: ApiConfig,
    ssl_context: ssl.SSLContext | None,
    nodes: OtherNodes | None,
    *,
    task_status: trio.TaskStatus[str],
) -> None:
    """Serve :class:`ApiApp` on ``config``'s address (HTTPS with ``ssl_context``) until
    cancelled; report its URL."""
    assert config.port is not None
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as error:  # say which address: the broker's own listener is fine
        where = f"{config.host}:{config.port} ([api])"
        raise OSError(error.errno, error.strerror, where) from None
    served: list[trio.abc.Listener[trio.abc.Stream]] = list(listeners)
    if ssl_context is not None:
        served = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in listeners]
    host, port = listeners[0].socket.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    task_status.started(f"{'https' if ssl_context else 'http'}://{host}:{port}")
    await serve_http(ApiApp(broker, config, nodes), served, broker.stats)
