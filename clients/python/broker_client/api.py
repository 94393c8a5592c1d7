"""The broker's server API from Python, for code that holds no WebSocket (docs/api.md).

A Django or Flask view, a worker or a script publishes with one HTTP request, through
:class:`Api` (synchronous; one instance may be shared by threads) or :class:`AsyncApi` (the same
methods, awaited, under asyncio or Trio). Each keeps its connections open between calls
(an ``httpx`` client), and raises this package's exceptions: :class:`~broker_client.errors.
Unauthorized` for a wrong key, :class:`~broker_client.errors.InvalidTopic`,
:class:`~broker_client.errors.TooLarge`, :class:`~broker_client.errors.NotEnabled`,
:class:`~broker_client.errors.Unavailable` (Redis unreachable, or the node shutting down),
:class:`~broker_client.errors.BadRequest`; :class:`~broker_client.errors.CannotConnect` when the
API cannot be reached, :class:`~broker_client.errors.ReplyTimeout` when it does not answer in
time. Each error's ``status`` is the HTTP status.

::

    from broker_client.api import Api

    api = Api("http://127.0.0.1:8767", key=os.environ["BROKER_API_KEY"])
    api.publish("orders.created", {"id": 7})   # once queued for every subscriber

The key defaults to the ``BROKER_API_KEY`` environment variable. Bodies are msgpack by
default (``data`` may hold bytes); ``encoding="json"`` sends JSON.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import httpx
import msgpack

from broker_client.errors import (
    BadRequest,
    BrokerError,
    CannotConnect,
    ReplyTimeout,
    Unauthorized,
    error_from_frame,
    first_line,
)
from broker_client.presence import MAX_PAGE, Member, Presence, presence_from_reply
from broker_client.recovery import Position
from broker_client.transport import verifying_context

__all__ = ["Api", "AsyncApi", "History", "Info", "KeptMessage", "Node"]

KEY_VARIABLE = "BROKER_API_KEY"
MEDIA_TYPES = {"msgpack": "application/msgpack", "json": "application/json"}


@dataclass(frozen=True, slots=True)
class KeptMessage:
    """One message a topic keeps: its ``offset`` and its ``data``."""

    offset: int
    data: Any


@dataclass(frozen=True, slots=True)
class History:
    """A page of a topic's history: its ``latest`` position, up to ``limit`` kept
    ``messages`` (oldest first), and, when ``since`` was given, whether they start right after
    it (``recovered``: ``False`` means some were no longer kept, or the epoch changed)."""

    latest: Position
    messages: tuple[KeptMessage, ...]
    recovered: bool | None = None


@dataclass(frozen=True, slots=True)
class Node:
    """One broker node's figures (``uptime`` in seconds)."""

    node: str
    version: str
    connections: int
    subscriptions: int
    uptime: float


@dataclass(frozen=True, slots=True)
class Info:
    """The broker's ``version``, its ``connections`` and ``subscriptions`` over every node,
    and each node's own."""

    version: str
    connections: int
    subscriptions: int
    nodes: tuple[Node, ...]


Published = Position | None
"""What a publish did: the message's :class:`Position` on a topic that keeps history, else None."""


class _Calls:
    """What :class:`Api` and :class:`AsyncApi` share: the requests they make, and what they
    make of the answers."""

    def __init__(self, url: str, key: str | None, encoding: Literal["msgpack", "json"]) -> None:
        key = key if key is not None else os.environ.get(KEY_VARIABLE)
        if not key:
            raise ValueError(f"an API key is needed: pass key=..., or set {KEY_VARIABLE}")
        if encoding not in MEDIA_TYPES:
            raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")
        self.url = url.rstrip("/").removesuffix("/api")
        self.encoding = encoding
        self.headers = {
            "Authorization": f"Bearer {key}",
            "Accept": MEDIA_TYPES[encoding],
            "Content-Type": MEDIA_TYPES[encoding],
        }

    def request(self, endpoint: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """The keyword arguments of ``httpx``'s ``request`` for one endpoint."""
        if body is None:
            return {"method": "GET", "url": f"{self.url}/api/{endpoint}"}
        if self.encoding == "msgpack":
            content = msgpack.packb(body, use_bin_type=True)
        else:
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        return {"method": "POST", "url": f"{self.url}/api/{endpoint}", "content": content}

    def answer(self, response: httpx.Response) -> dict[str, Any]:
        """The answer's map; raises the error it carries."""
        try:
            value = _decode(response)
        except ValueError:
            value = None
        if response.status_code == 200 and isinstance(value, dict):
            return value
        error = value.get("error") if isinstance(value, dict) else None
        if isinstance(error, Mapping):
            code, message = str(error.get("code")), str(error.get("message"))
        else:  # not the broker's API: its WebSocket port (405), a web server...
            said = f"HTTP {response.status_code}"
            if text := first_line(response.text):
                said += f": {text}"
            code = "unknown"
            message = (
                f"{response.request.url} is not the broker's server API ({said}): is the URL its "
                "[api] listener (docs/api.md)?"
            )
        exception: BrokerError
        if response.status_code == 401:
            exception = Unauthorized(message)
        elif code in ("not_found", "unknown"):
            exception = BadRequest(message, code)  # a wrong URL, or not the broker's API
        else:
            exception = error_from_frame(code, message)
        exception.status = response.status_code
        raise exception


def _decode(response: httpx.Response) -> Any:
    media = response.headers.get("content-type", "").split(";", 1)[0].strip()
    if media == "application/msgpack":
        return msgpack.unpackb(response.content, raw=False, strict_map_key=False)
    if media == "application/json":
        return json.loads(response.content)
    raise ValueError(media)


def _verify(ca_file: str | None) -> ssl.SSLContext | bool:
    return True if ca_file is None else verifying_context(ca_file)


def _transport_error(error: httpx.TransportError, url: str) -> Exception:
    if isinstance(error, httpx.TimeoutException):
        return ReplyTimeout(f"the server API at {url} did not answer in time ({error!r})")
    return CannotConnect(f"cannot reach the server API at {url}: {error}")


def _position(answer: dict[str, Any]) -> Published:
    epoch, offset = answer.get("epoch"), answer.get("offset")
    return Position(epoch, offset) if isinstance(epoch, str) and isinstance(offset, int) else None


def _result(item: Any) -> Published | BrokerError:
    error = item.get("error") if isinstance(item, dict) else None
    if isinstance(error, Mapping):
        return error_from_frame(error.get("code"), error.get("message"))
    return _position(item) if isinstance(item, dict) else None


def _publish(topic: str, data: Any) -> dict[str, Any]:
    return {"topic": topic, "data": data}


def _presence(topic: str, limit: int | None, cursor: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"topic": topic}
    if limit is not None:
        body["limit"] = limit
    if cursor is not None:
        body["cursor"] = cursor
    return body


def _history(topic: str, since: Position | None, limit: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"topic": topic}
    if since is not None:
        body["since"] = {"epoch": since.epoch, "offset": since.offset}
    if limit is not None:
        body["limit"] = limit
    return body


def _history_page(answer: dict[str, Any]) -> History:
    messages = answer.get("messages")
    recovered = answer.get("recovered")
    return History(
        Position(str(answer.get("epoch")), int(answer.get("offset", 0))),
        tuple(KeptMessage(m["offset"], m.get("data")) for m in messages or ()),
        recovered if isinstance(recovered, bool) else None,
    )


def _disconnect(user: str, code: int | None, reason: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"user": user}
    if code is not None:
        body["code"] = code
    if reason is not None:
        body["reason"] = reason
    return body


def _info(answer: dict[str, Any]) -> Info:
    nodes = tuple(
        Node(str(n.get("node")), str(n.get("version")), int(n.get("connections", 0)),
             int(n.get("subscriptions", 0)), float(n.get("uptime", 0.0)))
        for n in answer.get("nodes", ())
    )  # fmt: skip
    return Info(
        str(answer.get("version")),
        int(answer.get("connections", 0)),
        int(answer.get("subscriptions", 0)),
        nodes,
    )


class Api:
    """The server API, synchronously (see the module doc). ``url`` is the API listener's
    (``http://host:port``), ``key`` one of its keys (default: ``$BROKER_API_KEY``);
    ``timeout`` bounds each request in seconds (a publish waits for room under ``block``
    for up to the broker's ``slow_timeout``); ``ca_file`` is a CA to trust for ``https://``
    (default: the system's). Close it, or use it as a context manager."""

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        encoding: Literal["msgpack", "json"] = "msgpack",
        timeout: float = 30.0,
        ca_file: str | None = None,
    ) -> None:
        self._calls = _Calls(url, key, encoding)
        self._http = httpx.Client(
            headers=self._calls.headers, timeout=timeout, verify=_verify(ca_file)
        )

    def publish(self, topic: str, data: Any) -> Published:
        """Publish ``data`` on ``topic``; returns once it is queued for every matching
        subscriber (the message's position on a topic that keeps history)."""
        return _position(self._call("publish", _publish(topic, data)))

    def broadcast(self, topics: list[str], data: Any) -> list[Published | BrokerError]:
        """Publish ``data`` on each of ``topics`` (1 to 1000), in order; per topic, what
        :meth:`publish` returns, or the error that topic got (not raised)."""
        answer = self._call("broadcast", {"topics": list(topics), "data": data})
        return [_result(item) for item in answer.get("results", ())]

    def presence(
        self, topic: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Presence:
        """A page of ``topic``'s members (up to ``limit``, after ``cursor``)."""
        return presence_from_reply(self._call("presence", _presence(topic, limit, cursor)))

    def members(self, topic: str, *, page_size: int = MAX_PAGE) -> Iterator[Member]:
        """Every member of ``topic``, reading one page of ``page_size`` at a time (one
        present through the whole walk comes exactly once)."""
        cursor = None
        while True:
            page = self.presence(topic, limit=page_size, cursor=cursor)
            yield from page.members
            if page.cursor is None:
                return
            cursor = page.cursor

    def history(
        self, topic: str, *, since: Position | None = None, limit: int | None = None
    ) -> History:
        """Up to ``limit`` (default 100) kept messages of ``topic`` after ``since`` (default:
        from the oldest kept)."""
        return _history_page(self._call("history", _history(topic, since, limit)))

    def disconnect(self, user: str, *, code: int | None = None, reason: str | None = None) -> int:
        """Close every connection of ``user`` (a token's subject) on every node, with
        ``code`` (4000..4999, default 4010) and ``reason``; how many there were."""
        return int(self._call("disconnect", _disconnect(user, code, reason))["disconnected"])

    def info(self) -> Info:
        """Every node's connections and subscriptions, and the broker's version."""
        return _info(self._call("info", None))

    def close(self) -> None:
        """Close the connections kept open."""
        self._http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, endpoint: str, body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            response = self._http.request(**self._calls.request(endpoint, body))
        except httpx.TransportError as error:
            raise _transport_error(error, self._calls.url) from error
        return self._calls.answer(response)


class AsyncApi:
    """The server API for asyncio or Trio: :class:`Api`'s methods, awaited (``members`` is
    an async iterator). Close it with ``await api.aclose()``, or ``async with``."""

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        encoding: Literal["msgpack", "json"] = "msgpack",
        timeout: float = 30.0,
        ca_file: str | None = None,
    ) -> None:
        self._calls = _Calls(url, key, encoding)
        self._http = httpx.AsyncClient(
            headers=self._calls.headers, timeout=timeout, verify=_verify(ca_file)
        )

    async def publish(self, topic: str, data: Any) -> Published:
        """See :meth:`Api.publish`."""
        return _position(await self._call("publish", _publish(topic, data)))

    async def broadcast(self, topics: list[str], data: Any) -> list[Published | BrokerError]:
        """See :meth:`Api.broadcast`."""
        answer = await self._call("broadcast", {"topics": list(topics), "data": data})
        return [_result(item) for item in answer.get("results", ())]

    async def presence(
        self, topic: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Presence:
        """See :meth:`Api.presence`."""
        return presence_from_reply(await self._call("presence", _presence(topic, limit, cursor)))

    async def members(self, topic: str, *, page_size: int = MAX_PAGE) -> AsyncIterator[Member]:
        """See :meth:`Api.members`."""
        cursor = None
        while True:
            page = await self.presence(topic, limit=page_size, cursor=cursor)
            for member in page.members:
                yield member
            if page.cursor is None:
                return
            cursor = page.cursor

    async def history(
        self, topic: str, *, since: Position | None = None, limit: int | None = None
    ) -> History:
        """See :meth:`Api.history`."""
        return _history_page(await self._call("history", _history(topic, since, limit)))

    async def disconnect(
        self, user: str, *, code: int | None = None, reason: str | None = None
    ) -> int:
        """See :meth:`Api.disconnect`."""
        answer = await self._call("disconnect", _disconnect(user, code, reason))
        return int(answer["disconnected"])

    async def info(self) -> Info:
        """See :meth:`Api.info`."""
        return _info(await self._call("info", None))

    async def aclose(self) -> None:
        """Close the connections kept open."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncApi:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _call(self, endpoint: str, body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            response = await self._http.request(**self._calls.request(endpoint, body))
        except httpx.TransportError as error:
            raise _transport_error(error, self._calls.url) from error
        return self._calls.answer(response)
