"""The client: one WebSocket to the broker, reconnected with backoff, behind a small API.

:func:`connect` opens the connection and runs the client's tasks in its own task group: per
connection a **reader** (replies resolve waiting commands; messages go to subscription
buffers, waiting when one is full, so TCP pushes back on the broker) and a **writer** (sends
what is queued in the :class:`~broker_client.outbox.Outbox`, as one batch per WebSocket
message). When the connection drops, the client waits a :class:`Backoff` delay, reconnects,
subscribes again to every live pattern (ahead of anything queued; with ``since`` where the
topic keeps history, see :mod:`broker_client.recovery`; with ``join_leave`` and ``info`` as
first asked) and then tells the user (``on_reconnect``, :meth:`Client.wait_reconnected`;
``on_gap`` if messages were missed; a :class:`PresenceGap` in each ``join_leave``
subscription, whose events of the outage are lost). On a concrete topic with history, what
the broker drops for a slow subscription is read back with ``history`` by a **refill** task
(:mod:`broker_client.refill`), one per subscription while it runs, in the connection's task
group.

It runs under Trio and under asyncio alike (on anyio); the WebSocket itself is a
:mod:`~broker_client.transport`: trio-websocket under Trio, websockets under asyncio.

Delivery is at most once across a drop: a ``publish`` whose frame was already sent on the lost
connection raises :class:`ConnectionLost` (it may or may not have been applied; retry if a
duplicate is harmless); one still queued is sent on the next connection. ``publish_nowait``
frames queued when the connection dropped are sent after the reconnect; those in a write that
failed are lost.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal, NoReturn, overload

import anyio
import anyio.abc

from broker.protocol.codes import CloseCode
from broker_client import codec
from broker_client.codec import Encoding
from broker_client.endpoints import Endpoints
from broker_client.errors import (
    CannotConnect,
    ClientError,
    Closed,
    ConnectionLost,
    Forbidden,
    Overloaded,
    ReplyTimeout,
    TooLarge,
    Unauthorized,
    error_from_frame,
    first_line,
)
from broker_client.outbox import Item, Outbox, Pending
from broker_client.presence import (
    MAX_PAGE,
    Member,
    Presence,
    PresenceGap,
    event_from_frame,
    presence_from_reply,
)
from broker_client.reconnect import Backoff
from broker_client.recovery import Recovery
from broker_client.refill import Refill
from broker_client.subscription import Event, Gap, Message, Subscription
from broker_client.transport import (
    Handshake,
    Refused,
    Transport,
    TransportClosed,
    Unreachable,
    open_transport,
    verifying_context,
)

log = logging.getLogger("broker_client")

#: The largest WebSocket message taken from the broker (it sends up to its max_message_size).
MAX_RECEIVE_SIZE = 16 * 1024 * 1024
#: Closes that reconnecting as it is would not change: the token expired (4003), the server
#: API disconnected this user (4010).
FINAL_CLOSES = frozenset({CloseCode.FORBIDDEN, 4010})
#: The HTTP statuses the broker refuses a WebSocket handshake with (docs/protocol.md).
BROKER_REFUSALS = frozenset({400, 401, 403, 503})

Token = str | Callable[[], str | Awaitable[str]] | None
"""A bearer token, or a function returning a fresh one (called before every connection)."""


class _Route:
    """One subscription at the broker, shared by the client's subscriptions to its pattern.

    ``join_leave``, ``info`` and ``refill`` are those of the first: the broker keeps one
    subscription per pattern and connection, and answers a repeated ``sub`` without changing
    it; the messages, and what a refill reads back, go to each of them.
    """

    def __init__(
        self,
        pattern: str,
        join_leave: bool = False,
        info: Any = None,
        refill: bool = True,
        buffer_size: float = 100,
    ) -> None:
        self.pattern = pattern
        self.join_leave = join_leave
        self.info = info
        self.recovery = Recovery(pattern)
        self.refill = Refill(pattern, self.recovery, buffer_size, refill)
        self.refill_scope: anyio.CancelScope | None = None  # the running refill task's
        self.subscriptions: list[Subscription[Any]] = []

    def sub_frame(self) -> dict[str, Any]:
        """The ``sub`` frame (without ``id``) that makes this subscription at the broker."""
        frame: dict[str, Any] = {"op": "sub", "topic": self.pattern}
        if self.join_leave:
            frame["join_leave"] = True
        if self.info is not None:
            frame["info"] = self.info
        return frame

    def stop_refill(self) -> None:
        """End the refill, if one runs: its task is cancelled, what it held let go."""
        self.refill.stop()
        if self.refill_scope is not None:
            self.refill_scope.cancel()

    def refuse(self, join_leave: bool, info: Any, refill: bool) -> str | None:
        """Why one more subscription with these options cannot share this one, if it cannot."""
        if join_leave and not self.join_leave:
            return (
                f"already subscribed to {self.pattern!r} without join_leave on this client "
                "(the broker keeps one subscription per pattern and connection): ask for "
                "join_leave in the first subscription, or use another client"
            )
        if info is not None and info != self.info:
            return (
                f"already subscribed to {self.pattern!r} with info {self.info!r} on this "
                "client: a member has one info per topic"
            )
        if (refill and self.recovery.concrete) != self.refill.wanted:
            return (
                f"already subscribed to {self.pattern!r} with refill={not refill} on this "
                "client: its subscriptions share one stream of messages"
            )
        return None


class Client:
    """A connection to the broker. Make one with :func:`connect`, not directly."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: Token = None,
        encoding: str = "msgpack",
        reconnect: bool = True,
        backoff: Backoff | None = None,
        reply_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        buffer_size: int = 100,
        outbox_size: int = 1000,
        max_message_size: int = 1024 * 1024,
        on_reconnect: Callable[[Client], None] | None = None,
        on_gap: Callable[[Subscription[Any], str], None] | None = None,
        ping_interval: float | None = 20.0,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
    ) -> None:
        self._endpoints = Endpoints(url)
        if encoding not in ("msgpack", "json"):
            raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")
        if not math.isfinite(reply_timeout) or reply_timeout <= 0:
            raise ValueError("reply_timeout must be a positive number of seconds")
        tls = any(endpoint.tls for endpoint in self._endpoints.all)
        if not tls and (ssl_context is not None or ca_file is not None):
            raise ValueError("ssl_context and ca_file need a wss:// URL")
        if ssl_context is not None and ca_file is not None:
            raise ValueError("give ssl_context or ca_file, not both")
        if tls and ssl_context is None:
            ssl_context = verifying_context(ca_file)
        self._ssl_context = ssl_context
        self.encoding = Encoding(f"pubsub.v1.{encoding}")
        self.reconnect = reconnect
        self.backoff = backoff if backoff is not None else Backoff()
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.buffer_size = buffer_size
        self.max_message_size = max_message_size
        self.on_reconnect = on_reconnect
        self.on_gap = on_gap
        self.ping_interval = ping_interval
        self.reconnects = 0
        self._token = token
        self._outbox = Outbox(outbox_size)
        self._pending: dict[int, Pending] = {}
        self._routes: dict[str, _Route] = {}
        self._presence_gaps: list[tuple[_Route, str]] = []  # for the reader to deliver
        self._next_id = 0
        self._transport: Transport | None = None
        self._reconnected = anyio.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._started = False
        # While reconnecting: why the last connection ended, and the last attempt's failure
        # (a reply that times out meanwhile says so).
        self._lost_why: str | None = None
        self._connect_failure: str | None = None
        self._tasks: anyio.abc.TaskGroup | None = None  # the connection's, while it serves
        self._stalls = 0  # times the reader waited on a full subscription buffer
        self._stalled = False
        self._dead_peer = False  # the keep-alive gave up on this connection
        self._stopped = anyio.Event()

    # --- the public API ---

    @property
    def url(self) -> str:
        """The broker URL connected to (or to be tried next)."""
        return self._endpoints.current.url

    @property
    def urls(self) -> list[str]:
        """Every broker URL this client may use, in the order it tries them."""
        return [endpoint.url for endpoint in self._endpoints.all]

    async def publish(self, topic: str, data: Any) -> None:
        """Publish ``data`` to ``topic``; returns once the broker has accepted it.

        Raises a :class:`~broker_client.errors.BrokerError` if the broker refuses it,
        :class:`ReplyTimeout` after ``reply_timeout``, :class:`ConnectionLost` if the
        connection dropped after the message was sent.
        """
        await self._request({"op": "pub", "topic": topic, "data": data})

    def publish_nowait(self, topic: str, data: Any) -> None:
        """Queue a fire-and-forget publish (no reply, no retry).

        Raises ``anyio.WouldBlock`` (under Trio also a ``trio.WouldBlock``) when
        ``outbox_size`` frames are already waiting (the broker is slow or unreachable). A
        refusal by the broker is only logged.
        """
        self._check_open()
        self._outbox.put_nowait(self._encode({"op": "pub", "topic": topic, "data": data}))

    @overload
    def subscribe(
        self,
        pattern: str,
        *,
        join_leave: Literal[False] = False,
        info: Any = None,
        refill: bool = True,
        gaps: Literal[False] = False,
    ) -> AbstractAsyncContextManager[Subscription[Message]]: ...

    @overload
    def subscribe(
        self,
        pattern: str,
        *,
        join_leave: Literal[False] = False,
        info: Any = None,
        refill: bool = True,
        gaps: Literal[True],
    ) -> AbstractAsyncContextManager[Subscription[Message | Gap]]: ...

    @overload
    def subscribe(
        self,
        pattern: str,
        *,
        join_leave: bool,
        info: Any = None,
        refill: bool = True,
        gaps: bool = False,
    ) -> AbstractAsyncContextManager[Subscription[Event]]: ...

    @asynccontextmanager
    async def subscribe(
        self,
        pattern: str,
        *,
        join_leave: bool = False,
        info: Any = None,
        refill: bool = True,
        gaps: bool = False,
    ) -> AsyncIterator[Subscription[Any]]:
        """Subscribe to ``pattern`` for the ``async with`` block; iterate the result.

        Returns once the broker confirmed the subscription; raises ``InvalidTopic``,
        ``TooManySubscriptions`` and so on if it refused. Two subscriptions to the same
        pattern on one client share the broker's subscription and each get every message.

        On a concrete topic that keeps history, with ``refill`` (the default), messages the
        broker dropped for this subscription (a drop policy: it fell behind) are read back
        with ``history`` and yielded in offset order, as if none had been dropped; offsets
        that will never come (no longer kept, the history lost, a failed read) are counted
        in the subscription's ``gaps``, logged and given to the client's ``on_gap``, and with
        ``gaps=True`` also yielded as a :class:`Gap` between the messages around them (so
        that code written for messages alone never meets one). One read at a time, of up to
        1000 messages; live messages meanwhile are held up to ``buffer_size``, and read back
        too past it. A wildcard never refills; ``refill=False`` turns it off (the offsets then
        jump).

        On a presence topic (docs/presence.md) the subscription makes this client a member
        (a concrete topic only), showing ``info`` (any value, at most 1 KiB encoded, else
        ``TooLarge``) unless its token carries one. With ``join_leave`` it also yields a
        :class:`~broker_client.presence.Join` or :class:`~broker_client.presence.Leave` per
        member that comes or goes on a matching presence topic (its own join included), and a
        :class:`PresenceGap` where some may be missing; ``NotEnabled`` if no topic matching
        ``pattern`` has presence. A second subscription to a pattern may not ask for
        ``join_leave``, another ``info`` or another ``refill`` than the first (``ValueError``).
        """
        self._check_open()
        route = self._routes.get(pattern)
        if route is None:
            route = _Route(pattern, join_leave, info, refill, self.buffer_size)
            self._routes[pattern] = route
        elif (refusal := route.refuse(join_leave, info, refill)) is not None:
            raise ValueError(refusal)
        subscription: Subscription[Any] = Subscription(
            pattern, self.buffer_size, route.recovery, route.refill, join_leave, gaps
        )
        route.subscriptions.append(subscription)
        try:
            if len(route.subscriptions) == 1:
                await self._subscribe(route)
            yield subscription
        finally:
            subscription._discard()
            route.subscriptions.remove(subscription)
            if not route.subscriptions and self._routes.get(pattern) is route:
                del self._routes[pattern]
                route.stop_refill()
                self._unsubscribe_nowait(pattern)

    async def presence(
        self, topic: str, *, limit: int = MAX_PAGE, cursor: str | None = None
    ) -> Presence:
        """One page of the members of ``topic`` (a concrete topic with presence).

        Returns the ``count`` of members now and up to ``limit`` (0..1000; 0 for the count
        alone) of them, ordered by ``client``, with the ``cursor`` to pass for the next page
        (``None`` when no more remain; :meth:`members` follows them for you). Raises
        ``NotEnabled`` for a topic without presence, ``Forbidden`` without the permission to
        subscribe to it, ``InvalidTopic`` for a wildcard.
        """
        if not 0 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 0..{MAX_PAGE}, not {limit!r}")
        frame: dict[str, Any] = {"op": "presence", "topic": topic, "limit": limit}
        if cursor is not None:
            frame["cursor"] = cursor
        return presence_from_reply(await self._request(frame))

    async def members(self, topic: str, *, page_size: int = MAX_PAGE) -> AsyncIterator[Member]:
        """Every member of ``topic``, reading one page of ``page_size`` at a time.

        A member present through the whole walk comes exactly once; one that joins or leaves
        meanwhile may or may not come. Raises as :meth:`presence`.
        """
        if not 1 <= page_size <= MAX_PAGE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE}, not {page_size!r}")
        cursor = None
        while True:
            page = await self.presence(topic, limit=page_size, cursor=cursor)
            for member in page.members:
                yield member
            if page.cursor is None:
                return
            cursor = page.cursor

    async def wait_reconnected(self) -> None:
        """Wait for the next successful reconnect (subscriptions restored)."""
        await self._reconnected.wait()

    @property
    def connected(self) -> bool:
        """True while a connection to the broker is open."""
        return self._transport is not None and self._transport.closed is None

    async def aclose(self) -> None:
        """Send what is queued (for up to ``reply_timeout``), then close with 1000."""
        if self._closing:
            return
        self._closing = True
        if self._tasks is not None:
            with anyio.move_on_after(self.reply_timeout):
                await self._outbox.wait_flushed(lambda: self._tasks is None)
        if self._tasks is not None:  # (the connection may have ended meanwhile)
            self._tasks.cancel_scope.cancel()  # run() then closes the WebSocket and returns
            with anyio.move_on_after(self.connect_timeout):
                await self._stopped.wait()
        self._finish(Closed("the client is closed"))

    # --- commands and replies ---

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error

    async def _request(
        self, frame: dict[str, Any], on_ok: Callable[[dict[str, object]], None] | None = None
    ) -> dict[str, object]:
        """Send ``frame`` with a fresh id and return the ``ok`` reply (see :meth:`publish`)."""
        self._check_open()
        self._next_id += 1
        frame["id"] = frame_id = self._next_id
        encoded = self._encode(frame)
        pending = Pending(on_ok)
        self._pending[frame_id] = pending
        try:
            with anyio.move_on_after(self.reply_timeout):
                await self._outbox.put(encoded, pending)
                await pending.done.wait()
        finally:
            pending.abandoned = not pending.done.is_set()
            del self._pending[frame_id]
        if pending.error is not None:
            raise pending.error
        if pending.reply is None:
            offline = [why for why in (self._lost_why, self._connect_failure) if why]
            raise ReplyTimeout(
                f"no reply to {frame['op']} {frame['topic']!r} within {self.reply_timeout} s"
                + (f": not connected ({'; then '.join(offline)})" if offline else "")
            )
        if pending.reply.get("op") == "err":
            raise error_from_frame(pending.reply.get("code"), pending.reply.get("msg"))
        return pending.reply

    def _encode(self, frame: dict[str, Any]) -> bytes:
        """``frame`` encoded; raises :class:`TooLarge` if it would not fit in the one
        WebSocket message the broker takes (it would close the connection with 1009)."""
        encoded = codec.encode(frame, self.encoding)
        if len(encoded) > self.max_message_size:
            raise TooLarge(
                f"the {frame['op']} frame is {len(encoded)} bytes encoded, over "
                f"max_message_size ({self.max_message_size}): the broker would close the "
                "connection (1009). Set max_message_size to the broker's "
                "server.max_message_size (1 MiB by default) if it is larger"
            )
        return encoded

    async def _subscribe(self, route: _Route) -> None:
        while True:
            try:
                await self._request(route.sub_frame(), route.recovery.subscribed)
                return
            except ConnectionLost:
                if not self.reconnect or self._error is not None:
                    raise
                # the reconnect subscribes again; wait for its ok through the outbox

    def _unsubscribe_nowait(self, pattern: str) -> None:
        if self._error is not None:
            return
        self._next_id += 1
        frame = {"op": "unsub", "id": self._next_id, "topic": pattern}
        try:
            self._outbox.put_nowait(codec.encode(frame, self.encoding))
        except anyio.WouldBlock:
            log.debug("outbox full: not unsubscribing %r; its messages will be ignored", pattern)

    # --- the connection's life ---

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, then serve and reconnect until closed; reports started once connected.

        Raises :class:`CannotConnect` or :class:`Forbidden` if the first connection fails.
        Later failures never raise here: they end the client (see :meth:`_finish`).
        """
        try:
            await self._run(task_status)
        finally:
            self._stopped.set()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        attempt = 0  # rounds in which every URL failed, since the last connection
        give_up_at = anyio.current_time() + self.connect_timeout  # the first connection's 503s
        endpoints = self._endpoints
        token_refused = False  # the last handshake's token was refused
        while not self._closing:
            try:
                async with await self._open() as transport:
                    self._transport = transport
                    self._lost_why = self._connect_failure = None
                    attempt, token_refused = 0, False
                    endpoints.connected()
                    reconnected = self._started
                    if not reconnected:
                        self._started = True
                        task_status.started()
                    await self._serve(transport, reconnected)
                    if self._closing:  # the closing handshake; a dead peer is dropped at once
                        with anyio.move_on_after(self.connect_timeout):
                            await transport.aclose()
            except (Refused, Unreachable, CannotConnect) as exc:
                error = self._handshake_error(exc)
                if self._final(error, token_refused):  # waiting would not change it
                    if not self._started:
                        raise error from None
                    self._finish(error)
                    return
                if error.status in (401, 403):  # the token function's token: one fresh try
                    token_refused = True
                    continue
                retry_after = getattr(error, "retry_after", None)
                failed_url = self.url
                self._connect_failure = f"connecting to {failed_url} failed: {error}"
                if endpoints.failed(anyio.current_time(), retry_after):
                    log.warning("connecting to %s failed: %s; trying %s", failed_url, error,
                                self.url)  # fmt: skip
                    continue  # another URL, at once
                delay = max(self.backoff.delay(attempt), endpoints.wait(anyio.current_time()))
                if not self._started and not (
                    isinstance(error, Overloaded) and anyio.current_time() + delay < give_up_at
                ):
                    raise error from None
                log.warning("connecting to %s failed: %s", failed_url, error)
            else:
                ended = self._connection_ended(transport)
                if ended is not None:
                    self._finish(ended)
                    return
                delay = self.backoff.delay(attempt)
            attempt += 1
            delay = max(delay, endpoints.wait(anyio.current_time()))
            log.info("reconnecting to %s in %.2f s (attempt %d)", self.url, delay, attempt)
            await anyio.sleep(delay)

    def _final(self, error: ClientError, token_refused: bool) -> bool:
        """Whether a refused handshake will be refused again however long the client waits:
        any 4xx; but a 401 or 403 to a token from the token function gets one more try with a
        fresh one (a token that expired on the way, say)."""
        status = error.status
        if status is None or not 400 <= status < 500:
            return False
        fresh_token_may_help = callable(self._token) and self.reconnect and not token_refused
        return not (status in (401, 403) and fresh_token_may_help)

    async def _open(self) -> AbstractAsyncContextManager[Transport]:
        """The connection to the current URL, with a fresh token, to enter."""
        token = await self._current_token()
        return open_transport(
            Handshake(
                self._endpoints.current,
                subprotocols=[self.encoding.value],
                headers=[("Authorization", f"Bearer {token}")] if token else [],
                ssl_context=self._ssl_context,
                connect_timeout=self.connect_timeout,
                max_message_size=MAX_RECEIVE_SIZE,
            )
        )

    async def _current_token(self) -> str | None:
        """The token to connect with: the one given, or a fresh one from the token function."""
        if not callable(self._token):
            return self._token
        try:
            token = self._token()
            return await token if inspect.isawaitable(token) else token
        except Exception as exc:
            raise CannotConnect(f"the token function failed: {exc!r}") from exc

    def _handshake_error(self, exc: Refused | Unreachable | CannotConnect) -> ClientError:
        """The exception for a connection attempt that failed, in the broker's words if it
        refused."""
        if isinstance(exc, ClientError):
            return exc
        if isinstance(exc, Unreachable):
            return CannotConnect(f"cannot connect to {self.url}: {exc}")
        status = exc.status
        body = exc.body.decode("utf-8", "replace").strip()
        if status not in BROKER_REFUSALS:  # a web server, say, or the metrics listener
            first = first_line(body)
            return CannotConnect(
                f"cannot connect to {self.url}: it answered HTTP {status} instead of accepting "
                "a WebSocket: is it the broker's URL (not a web page, the metrics or the API "
                "port)?" + (f" It said: {first}" if first else ""),
                status=status,
                reason=body,
            )
        said = f"HTTP {status}: {body}" if body else f"HTTP {status}"
        message = f"cannot connect to {self.url}: the broker refused with {said}"
        if status in (401, 403):
            error: ClientError = (Unauthorized if status == 401 else Forbidden)(message)
            error.status = status
            return error
        refused = Overloaded if status == 503 else CannotConnect
        return refused(message, status=status, reason=body, retry_after=_retry_after(exc))

    async def _serve(self, transport: Transport, reconnected: bool) -> None:
        """Run the reader and writer (and refills) until the connection ends; resubscribe if
        reconnected."""
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                if reconnected:  # the subscriptions go first, ahead of anything queued
                    tasks.start_soon(self._confirm_resubscribed, self._queue_resubscriptions())
                tasks.start_soon(self._write_loop, transport, tasks.cancel_scope)
                tasks.start_soon(self._keepalive_loop, transport, tasks.cancel_scope)
                await self._read_loop(transport)
                tasks.cancel_scope.cancel()
        finally:
            self._tasks = None
            self._outbox.wake()  # aclose no longer waits for a flush
            for route in self._routes.values():  # a resubscription's since brings the rest
                route.stop_refill()

    def _queue_resubscriptions(self) -> dict[int, tuple[_Route, Pending]]:
        """Queue a ``sub`` for every live pattern ahead of everything, with ``since`` where the
        topic keeps history; returns them by id.
        """
        queued: dict[int, tuple[_Route, Pending]] = {}
        items: list[Item] = []
        for route in self._routes.values():
            self._next_id += 1
            frame = route.sub_frame()
            frame["id"] = self._next_id
            if (since := route.recovery.since()) is not None:
                frame["since"] = since
            pending = Pending(functools.partial(self._resubscribed, route))
            queued[self._next_id] = (route, pending)
            self._pending[self._next_id] = pending
            items.append((codec.encode(frame, self.encoding), pending))
        self._outbox.put_first(items)
        return queued

    def _resubscribed(self, route: _Route, reply: dict[str, object]) -> None:
        """The broker took a resubscription (the reader, before the frames behind the ``ok``)."""
        self._tell_gap(route, route.recovery.resubscribed(reply))
        if route.join_leave:  # the reader delivers it before the frames behind the ok
            self._presence_gaps.append((route, "reconnected: join and leave events of the "
                                        "time the client was away are lost"))  # fmt: skip

    def _tell_gap(self, route: _Route, why: str | None) -> None:
        if why is None:
            return
        for subscription in route.subscriptions:
            subscription._gap(why)
            if self.on_gap is not None:
                _call_hook("on_gap", self.on_gap, subscription, why)

    async def _confirm_resubscribed(self, queued: dict[int, tuple[_Route, Pending]]) -> None:
        """Await the resubscriptions' replies, then tell the user we are back."""
        try:
            with anyio.move_on_after(self.reply_timeout):
                for route, pending in queued.values():
                    await pending.done.wait()
                    if pending.reply is not None and pending.reply.get("op") == "err":
                        error = error_from_frame(
                            pending.reply.get("code"), pending.reply.get("msg")
                        )
                        log.error("resubscribing %r failed: %s", route.pattern, error)
                        if self._routes.get(route.pattern) is route:
                            del self._routes[route.pattern]
                        for subscription in route.subscriptions:
                            subscription._end(error)
        finally:
            for frame_id in queued:
                self._pending.pop(frame_id, None)
        for route, pending in queued.values():
            if not pending.done.is_set():  # its ok, if late, will not update the position
                why = f"no answer to the resubscription within {self.reply_timeout} s"
                self._tell_gap(route, route.recovery.forget(why))
                if route.join_leave:  # the reader delivers it with the next frame it reads
                    self._presence_gaps.append((route, why))
        self.reconnects += 1
        log.info("reconnected to %s; %d subscription(s) restored", self.url, len(queued))
        self._reconnected.set()
        self._reconnected = anyio.Event()
        if self.on_reconnect is not None:
            _call_hook("on_reconnect", self.on_reconnect, self)

    async def _write_loop(self, transport: Transport, scope: anyio.CancelScope) -> None:
        while True:
            batch = await self._outbox.take_batch(self.max_message_size)
            for _, pending in batch:
                if pending is not None:
                    pending.written = True
            try:
                await transport.send(codec.join([f for f, _ in batch], self.encoding))
            except TransportClosed:
                scope.cancel()
                return
            finally:
                self._outbox.sent()

    async def _keepalive_loop(self, transport: Transport, scope: anyio.CancelScope) -> None:
        """Ping every ``ping_interval``; no pong within as long again means a dead peer.

        While the reader waits on a full subscription buffer, pongs are not read either, so a
        late pong then is backpressure, not death, and does not count.
        """
        if self.ping_interval is None:
            return
        try:
            while True:
                await anyio.sleep(self.ping_interval)
                stalls = self._stalls
                with anyio.move_on_after(self.ping_interval) as ping:
                    await transport.ping()
                if ping.cancelled_caught and not self._stalled and stalls == self._stalls:
                    self._dead_peer = True
                    scope.cancel()
                    return
        except TransportClosed:
            return

    async def _read_loop(self, transport: Transport) -> None:
        try:
            while True:
                for frame in codec.decode(await transport.receive()):
                    await self._dispatch(frame)
        except TransportClosed:
            return

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "msg":
            pattern, offset = str(frame.get("sub")), frame.get("offset")
            route = self._routes.get(pattern)
            if route is None:
                return  # no longer subscribed
            # An offset that goes back: the topic's numbering started again (a new epoch).
            self._tell_gap(route, route.recovery.restarted(offset, route.refill.highest))
            message = Message(frame.get("topic", ""), frame.get("data"), pattern,
                              offset if isinstance(offset, int) else None)  # fmt: skip
            refilling = route.refill.active
            if route.refill.take(message):  # a jump: the refill task hands over from here
                if not refilling:
                    assert self._tasks is not None  # the reader runs in them
                    route.refill_scope = anyio.CancelScope()
                    self._tasks.start_soon(self._refill, route, route.refill_scope)
                return
            await self._hand_over(message, list(route.subscriptions))
            route.recovery.delivered(offset)
        elif op == "join" or op == "leave":
            route = self._routes.get(str(frame.get("sub")))
            if route is not None and route.join_leave:
                await self._hand_over(event_from_frame(frame, route.pattern),
                                      [s for s in route.subscriptions if s.join_leave])  # fmt: skip
        elif op in ("ok", "err"):
            pending = self._pending.get(frame.get("id", -1))
            if pending is not None:
                pending.resolve(frame, None)
            elif op == "err":
                log.warning("the broker refused a command: %s: %s", frame.get("code"),
                            frame.get("msg"))  # fmt: skip
        elif op == "lag":
            dropped = frame.get("dropped")
            route = self._routes.get(str(frame.get("sub")))
            for subscription in route.subscriptions if route else ():
                subscription._lag(dropped if isinstance(dropped, int) else 0)
            if route is not None and route.join_leave:
                why = f"the broker dropped {dropped} message(s) or join/leave event(s)"
                self._presence_gaps.append((route, why))
        while self._presence_gaps:
            route, why = self._presence_gaps.pop(0)
            if self._routes.get(route.pattern) is route:
                gap = PresenceGap(route.pattern, why)
                await self._hand_over(gap, [s for s in route.subscriptions if s.join_leave])

    async def _refill(self, route: _Route, scope: anyio.CancelScope) -> None:
        """Hand over what the broker dropped for ``route``, read back with ``history``, and
        the live messages held meanwhile, in offset order, until nothing is missing. The only
        one to hand over to ``route`` while it runs; cancelled with the subscription (``scope``)
        or the connection, which then leaves the rest to the resubscription's ``since``."""
        refill = route.refill
        with scope:
            while True:
                while (item := refill.next_item()) is not None:
                    for subscription in list(route.subscriptions):
                        if isinstance(item, Gap) and not subscription.yields_gaps:
                            continue  # told by _tell_lost only
                        await subscription._deliver(item)  # waits for room: not the reader
                    refill.handed_over()
                    if isinstance(item, Gap):
                        self._tell_lost(route, item)
                read = refill.next_read()
                if read is None:
                    return
                try:
                    reply = await self._request(read.frame(route.pattern))
                except ClientError as error:
                    if isinstance(error, ConnectionLost) or self._error is not None:
                        refill.stop()  # gone with the connection or the client
                        return
                    log.warning("reading the history of %r failed: %s", route.pattern, error)
                    refill.failed()
                else:
                    refill.answered(read, reply)

    def _tell_lost(self, route: _Route, gap: Gap) -> None:
        """A refill's gap went into the subscriptions: count it, log it, tell ``on_gap``."""
        for subscription in route.subscriptions:
            subscription._lost(gap)
            if self.on_gap is not None:
                _call_hook("on_gap", self.on_gap, subscription, str(gap))

    async def _hand_over(self, item: Event, subscriptions: list[Subscription[Any]]) -> None:
        """Buffer ``item`` in each of ``subscriptions``; wait for room in a full one, so that
        the reader stops reading (the backpressure)."""
        for subscription in subscriptions:
            try:
                subscription._deliver_nowait(item)
            except anyio.WouldBlock:
                log.debug("subscription %r is full: pausing the reader", subscription.pattern)
                self._stalls += 1
                self._stalled = True
                try:
                    await subscription._deliver(item)
                finally:
                    self._stalled = False

    def _connection_ended(self, transport: Transport) -> ClientError | None:
        """Fail what was in flight; return the error that ends the client, if this one does."""
        self._transport = None
        closed = None if self._dead_peer else transport.closed
        code = closed.code if closed is not None else None
        said = (closed.reason or None) if closed is not None else None
        if self._dead_peer:
            detail = f"no pong within {self.ping_interval} s"
        elif closed is not None:
            detail = f"close code {code}" + (f": {said}" if said else "")
        else:
            detail = "no close frame"
        self._dead_peer = False
        why = f"connection to {self.url} lost ({detail})"
        too_big = None
        if code == CloseCode.TOO_BIG and not self._closing:  # a reconnect would send it again
            too_big = TooLarge(
                f"the broker closed the connection with {detail}: this client sent a "
                "WebSocket message over the broker's server.max_message_size (a subscription "
                "or a frame too big, or max_message_size set higher than the broker's)"
            )
            too_big.close_code, too_big.close_reason = code, said
        for pending in list(self._pending.values()):
            if pending.written:  # with what was written, the frame the broker refused
                pending.resolve(None, too_big or ConnectionLost(why, code, said))
        if self._closing:
            return Closed("the client is closed")
        if too_big is not None:
            return too_big
        if code in FINAL_CLOSES and not (callable(self._token) and self.reconnect):
            error = Forbidden(f"the broker closed the connection with {detail}")
            error.close_code, error.close_reason = code, said
            return error
        if not self.reconnect:
            return ConnectionLost(why, code, said)
        log.warning("%s; reconnecting", why)
        self._lost_why = why
        return None

    def _finish(self, error: BaseException) -> None:
        """End the client: fail every waiting command and end every subscription with ``error``."""
        if self._error is not None:
            return
        self._error = error
        if not isinstance(error, Closed):
            log.error("client for %s stopped: %s", self.url, error)
        for pending in self._pending.values():
            pending.resolve(None, error)
        end_with = None if isinstance(error, Closed) else error
        for route in self._routes.values():
            for subscription in route.subscriptions:
                subscription._end(end_with)


def _call_hook(name: str, hook: Callable[..., object], *args: object) -> None:
    """Call a user's hook from the client's tasks: its failure is logged, never spread."""
    try:
        hook(*args)
    except Exception:
        log.exception("the %s hook failed", name)


def _retry_after(refused: Refused) -> float | None:
    """The seconds of a refusal's ``Retry-After`` header, if it has one in seconds."""
    value = refused.header("Retry-After")
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None


@asynccontextmanager
async def connect(
    url: str | Sequence[str] = "ws://127.0.0.1:8765",
    *,
    token: Token = None,
    encoding: str = "msgpack",
    reconnect: bool = True,
    backoff: Backoff | None = None,
    reply_timeout: float = 10.0,
    connect_timeout: float = 10.0,
    buffer_size: int = 100,
    outbox_size: int = 1000,
    max_message_size: int = 1024 * 1024,
    on_reconnect: Callable[[Client], None] | None = None,
    on_gap: Callable[[Subscription[Any], str], None] | None = None,
    ping_interval: float | None = 20.0,
    ssl_context: ssl.SSLContext | None = None,
    ca_file: str | None = None,
) -> AsyncIterator[Client]:
    """Connect to the broker at ``url`` and yield a :class:`Client`; close it on exit.

    ``url`` may be a list: the nodes of a cluster, tried in a shuffled order, moving on to the
    next when one is unreachable or refuses with 503. ``encoding`` is ``"msgpack"`` (default)
    or ``"json"``. ``token`` is sent as ``Authorization: Bearer``; a function (sync or async)
    returning a token is called before every connection. ``buffer_size`` bounds each
    subscription's buffer, ``outbox_size`` the frames waiting to be sent.
    ``max_message_size`` is the broker's ``server.max_message_size``: what the client sends in
    one WebSocket message (a batch of frames) stays within it, and a publish whose frame alone
    exceeds it raises :class:`TooLarge` instead of getting the connection closed (1009).
    With ``reconnect`` (default) a dropped connection is retried for ever with ``backoff``
    delays (never sooner than a 503's ``Retry-After``), and subscriptions resume where they
    were on topics with
    history; ``on_gap(subscription, why)`` is called when they cannot, after every
    reconnect for those that keep no history, and for each :class:`Gap` a refill finds (see
    :meth:`Client.subscribe`). A refusal that waiting would not change (HTTP
    400, 401, 403 at the handshake; close 4003 or 4010) ends the client with
    :class:`Unauthorized`, :class:`Forbidden` or :class:`CannotConnect`, in the broker's
    words, unless ``token`` is a function (it is then asked for a fresh token); a close 1009
    (this client sent a message over the broker's limit) with :class:`TooLarge`. A ping every
    ``ping_interval`` seconds (``None``: never) unanswered for as long again counts as a
    drop. ``wss://`` URLs verify the broker's certificate against ``ca_file`` (PEM) or
    ``ssl_context``, by default the system's CAs. Raises :class:`CannotConnect` if the first
    connection fails on every URL (:class:`Overloaded` after ``connect_timeout`` of HTTP
    503s).
    """
    client = Client(
        url, token=token, encoding=encoding, reconnect=reconnect, backoff=backoff,
        reply_timeout=reply_timeout, connect_timeout=connect_timeout, buffer_size=buffer_size,
        outbox_size=outbox_size, max_message_size=max_message_size, on_reconnect=on_reconnect,
        on_gap=on_gap,
        ping_interval=ping_interval, ssl_context=ssl_context, ca_file=ca_file,
    )  # fmt: skip
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(client.run)
            try:
                yield client
            finally:
                with anyio.CancelScope(shield=True):
                    await client.aclose()
                tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the one exception a task group wrapped, as it was (the user's own, or ours)."""
    leaves = list(_leaves(group))
    if len(leaves) != 1:
        raise group
    error, context = leaves[0], leaves[0].__context__
    try:
        raise error
    finally:
        error.__context__ = context  # as it was, not the group we caught
        del error, context


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
