"""The client: one WebSocket to the broker, reconnected with backoff, behind a small API.

:func:`connect` opens the connection and runs the client's tasks in its own nursery: per
connection a **reader** (replies resolve waiting commands; messages go to subscription
buffers, waiting when one is full, so TCP pushes back on the broker) and a **writer** (sends
what is queued in the :class:`~broker_client.outbox.Outbox`, as one batch per WebSocket
message). When the connection drops, the client waits a :class:`Backoff` delay, reconnects,
subscribes again to every live pattern (ahead of anything queued) and then tells the user
(``on_reconnect``, :meth:`Client.wait_reconnected`).

Delivery is at most once across a drop: a ``publish`` whose frame was already sent on the lost
connection raises :class:`ConnectionLost` (it may or may not have been applied; retry if a
duplicate is harmless); one still queued is sent on the next connection. ``publish_nowait``
frames queued when the connection dropped are sent after the reconnect; those in a write that
failed are lost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from broker_client import codec
from broker_client.codec import Encoding
from broker_client.errors import (
    CannotConnect,
    ClientError,
    Closed,
    ConnectionLost,
    Forbidden,
    ReplyTimeout,
    error_from_frame,
)
from broker_client.outbox import Outbox, Pending
from broker_client.reconnect import Backoff
from broker_client.subscription import Message, Subscription

log = logging.getLogger("broker_client")

CLOSE_FORBIDDEN = 4003
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
HANDSHAKE_ERRORS = (OSError, HandshakeError, trio.TooSlowError)


class Client:
    """A connection to the broker. Make one with :func:`connect`, not directly."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        encoding: str = "msgpack",
        reconnect: bool = True,
        backoff: Backoff | None = None,
        reply_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        buffer_size: int = 100,
        outbox_size: int = 1000,
        on_reconnect: Callable[[Client], None] | None = None,
        ping_interval: float | None = 20.0,
    ) -> None:
        self.url = url
        self.encoding = Encoding(f"pubsub.v1.{encoding}")
        self.reconnect = reconnect
        self.backoff = backoff if backoff is not None else Backoff()
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.buffer_size = buffer_size
        self.on_reconnect = on_reconnect
        self.ping_interval = ping_interval
        self.reconnects = 0
        self._headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
        self._outbox = Outbox(outbox_size)
        self._pending: dict[int, Pending] = {}
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._next_id = 0
        self._websocket: WebSocketConnection | None = None
        self._reconnected = trio.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._started = False
        self._serve_scope: trio.CancelScope | None = None
        self._stalls = 0  # times the reader waited on a full subscription buffer
        self._stalled = False
        self._dead_peer = False  # the keep-alive gave up on this connection
        self._stopped = trio.Event()

    # --- the public API ---

    async def publish(self, topic: str, data: Any) -> None:
        """Publish ``data`` to ``topic``; returns once the broker has accepted it.

        Raises a :class:`~broker_client.errors.BrokerError` if the broker refuses it,
        :class:`ReplyTimeout` after ``reply_timeout``, :class:`ConnectionLost` if the
        connection dropped after the message was sent.
        """
        await self._request({"op": "pub", "topic": topic, "data": data})

    def publish_nowait(self, topic: str, data: Any) -> None:
        """Queue a fire-and-forget publish (no reply, no retry).

        Raises ``trio.WouldBlock`` when ``outbox_size`` frames are already waiting (the
        broker is slow or unreachable). A refusal by the broker is only logged.
        """
        self._check_open()
        frame = {"op": "pub", "topic": topic, "data": data}
        self._outbox.put_nowait(codec.encode(frame, self.encoding))

    @asynccontextmanager
    async def subscribe(self, pattern: str) -> AsyncIterator[Subscription]:
        """Subscribe to ``pattern`` for the ``async with`` block; iterate the result.

        Returns once the broker confirmed the subscription; raises ``InvalidTopic``,
        ``TooManySubscriptions`` and so on if it refused. Two subscriptions to the same
        pattern on one client share the broker's subscription and each get every message.
        """
        self._check_open()
        subscription = Subscription(pattern, self.buffer_size)
        sharing = self._subscriptions.setdefault(pattern, [])
        sharing.append(subscription)
        try:
            if len(sharing) == 1:
                await self._subscribe(pattern)
            yield subscription
        finally:
            subscription._discard()
            sharing.remove(subscription)
            if not sharing and self._subscriptions.get(pattern) is sharing:
                del self._subscriptions[pattern]
                self._unsubscribe_nowait(pattern)

    async def wait_reconnected(self) -> None:
        """Wait for the next successful reconnect (subscriptions restored)."""
        await self._reconnected.wait()

    @property
    def connected(self) -> bool:
        """True while a connection to the broker is open."""
        return self._websocket is not None and self._websocket.closed is None

    async def aclose(self) -> None:
        """Send what is queued (for up to ``reply_timeout``), then close with 1000."""
        if self._closing:
            return
        self._closing = True
        if self._serve_scope is not None:
            with trio.move_on_after(self.reply_timeout):
                await self._outbox.wait_flushed()
            self._serve_scope.cancel()  # run() then closes the WebSocket and returns
            with trio.move_on_after(self.connect_timeout):
                await self._stopped.wait()
        self._finish(Closed("the client is closed"))

    # --- commands and replies ---

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error

    async def _request(self, frame: dict[str, Any]) -> dict[str, object]:
        """Send ``frame`` with a fresh id and return the ``ok`` reply (see :meth:`publish`)."""
        self._check_open()
        self._next_id += 1
        frame["id"] = frame_id = self._next_id
        encoded = codec.encode(frame, self.encoding)
        pending = Pending()
        self._pending[frame_id] = pending
        try:
            with trio.move_on_after(self.reply_timeout):
                await self._outbox.put(encoded, pending)
                await pending.done.wait()
        finally:
            pending.abandoned = not pending.done.is_set()
            del self._pending[frame_id]
        if pending.error is not None:
            raise pending.error
        if pending.reply is None:
            raise ReplyTimeout(
                f"no reply to {frame['op']} {frame['topic']!r} within {self.reply_timeout} s"
            )
        if pending.reply.get("op") == "err":
            raise error_from_frame(pending.reply.get("code"), pending.reply.get("msg"))
        return pending.reply

    async def _subscribe(self, pattern: str) -> None:
        while True:
            try:
                await self._request({"op": "sub", "topic": pattern})
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
        except trio.WouldBlock:
            log.debug("outbox full: not unsubscribing %r; its messages will be ignored", pattern)

    # --- the connection's life ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then serve and reconnect until closed; reports started once connected.

        Raises :class:`CannotConnect` or :class:`Forbidden` if the first connection fails.
        Later failures never raise here: they end the client (see :meth:`_finish`).
        """
        try:
            await self._run(task_status)
        finally:
            self._stopped.set()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        attempt = 0
        while not self._closing:
            websocket: WebSocketConnection | None = None
            try:
                async with trio.open_nursery() as nursery:
                    websocket = await self._open(nursery)
                    attempt = 0
                    reconnected = self._started
                    if not reconnected:
                        self._started = True
                        task_status.started()
                    await self._serve(websocket, reconnected)
                    # closing: the closing handshake; a dead peer: drop the socket at once
                    with trio.move_on_after(self.connect_timeout if self._closing else 0):
                        await websocket.aclose()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # trio-websocket raises a rejection from its reader task, hence the group
                failed, rest = group.split(HANDSHAKE_ERRORS)
                if rest is not None or failed is None or self._websocket is not None:
                    raise
                error = self._handshake_error(_first_leaf(failed))
                if not self._started:
                    raise error from None
                if isinstance(error, Forbidden):
                    self._finish(error)
                    return
                log.warning("reconnect to %s failed: %s", self.url, error)
            else:
                assert websocket is not None
                ended = self._connection_ended(websocket)
                if ended is not None:
                    self._finish(ended)
                    return
            delay = self.backoff.delay(attempt)
            attempt += 1
            log.info("reconnecting to %s in %.2f s (attempt %d)", self.url, delay, attempt)
            await trio.sleep(delay)

    async def _open(self, nursery: trio.Nursery) -> WebSocketConnection:
        with trio.fail_after(self.connect_timeout):
            websocket = await connect_websocket_url(
                nursery,
                self.url,
                subprotocols=[self.encoding.value],
                extra_headers=self._headers,
                max_message_size=MAX_MESSAGE_SIZE,
            )
        self._websocket = websocket
        return websocket

    def _handshake_error(self, exc: BaseException) -> ClientError:
        if isinstance(exc, ConnectionRejected) and exc.status_code in (401, 403):
            body = (exc.body or b"").decode("utf-8", "replace").strip()
            return Forbidden(f"handshake rejected with HTTP {exc.status_code} {body}".strip())
        if isinstance(exc, ConnectionRejected):
            reason = f"handshake rejected with HTTP {exc.status_code}"
        elif isinstance(exc, trio.TooSlowError):
            reason = f"no handshake within {self.connect_timeout} s"
        elif isinstance(exc, OSError):
            reason = _os_reason(exc)
        else:
            reason = str(exc) or type(exc).__name__
        return CannotConnect(f"cannot connect to {self.url}: {reason}")

    async def _serve(self, websocket: WebSocketConnection, reconnected: bool) -> None:
        """Run the reader and writer until the connection ends; resubscribe if reconnected."""
        async with trio.open_nursery() as nursery:
            self._serve_scope = nursery.cancel_scope
            if reconnected:  # the subscriptions go first, ahead of anything queued
                nursery.start_soon(self._confirm_resubscribed, self._queue_resubscriptions())
            nursery.start_soon(self._write_loop, websocket, nursery.cancel_scope)
            nursery.start_soon(self._keepalive_loop, websocket, nursery.cancel_scope)
            await self._read_loop(websocket)
            nursery.cancel_scope.cancel()
        self._serve_scope = None

    def _queue_resubscriptions(self) -> dict[int, tuple[str, Pending]]:
        """Queue a ``sub`` for every live pattern ahead of everything; returns them by id."""
        queued: dict[int, tuple[str, Pending]] = {}
        for pattern in self._subscriptions:
            self._next_id += 1
            queued[self._next_id] = (pattern, Pending())
            self._pending[self._next_id] = queued[self._next_id][1]
        self._outbox.put_first([
            (codec.encode({"op": "sub", "id": frame_id, "topic": pattern}, self.encoding), pending)
            for frame_id, (pattern, pending) in queued.items()
        ])  # fmt: skip
        return queued

    async def _confirm_resubscribed(self, queued: dict[int, tuple[str, Pending]]) -> None:
        """Await the resubscriptions' replies, then tell the user we are back."""
        try:
            with trio.move_on_after(self.reply_timeout):
                for pattern, pending in queued.values():
                    await pending.done.wait()
                    if pending.reply is not None and pending.reply.get("op") == "err":
                        error = error_from_frame(
                            pending.reply.get("code"), pending.reply.get("msg")
                        )
                        log.error("resubscribing %r failed: %s", pattern, error)
                        for subscription in self._subscriptions.pop(pattern, []):
                            subscription._end(error)
        finally:
            for frame_id in queued:
                self._pending.pop(frame_id, None)
        self.reconnects += 1
        log.info("reconnected to %s; %d subscription(s) restored", self.url, len(queued))
        self._reconnected.set()
        self._reconnected = trio.Event()
        if self.on_reconnect is not None:
            try:
                self.on_reconnect(self)
            except Exception:
                log.exception("the on_reconnect hook failed")

    async def _write_loop(self, websocket: WebSocketConnection, scope: trio.CancelScope) -> None:
        while True:
            batch = await self._outbox.take_batch(MAX_MESSAGE_SIZE)
            for _, pending in batch:
                if pending is not None:
                    pending.written = True
            try:
                await websocket.send_message(codec.join([f for f, _ in batch], self.encoding))
            except ConnectionClosed:
                scope.cancel()
                return
            finally:
                self._outbox.sent()

    async def _keepalive_loop(
        self, websocket: WebSocketConnection, scope: trio.CancelScope
    ) -> None:
        """Ping every ``ping_interval``; no pong within as long again means a dead peer.

        While the reader waits on a full subscription buffer, pongs are not read either, so a
        late pong then is backpressure, not death, and does not count.
        """
        if self.ping_interval is None:
            return
        try:
            while True:
                await trio.sleep(self.ping_interval)
                stalls = self._stalls
                with trio.move_on_after(self.ping_interval) as ping:
                    await websocket.ping()
                if ping.cancelled_caught and not self._stalled and stalls == self._stalls:
                    self._dead_peer = True
                    scope.cancel()
                    return
        except ConnectionClosed:
            return

    async def _read_loop(self, websocket: WebSocketConnection) -> None:
        try:
            while True:
                for frame in codec.decode(await websocket.get_message()):
                    await self._dispatch(frame)
        except ConnectionClosed:
            return

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "msg":
            pattern = frame.get("sub")
            offset = frame.get("offset")
            message = Message(frame.get("topic", ""), frame.get("data"), str(pattern),
                              offset if isinstance(offset, int) else None)  # fmt: skip
            for subscription in list(self._subscriptions.get(str(pattern), ())):
                try:
                    subscription._deliver_nowait(message)
                except trio.WouldBlock:
                    log.debug("subscription %r is full: pausing the reader", pattern)
                    self._stalls += 1
                    self._stalled = True
                    try:
                        await subscription._deliver(message)
                    finally:
                        self._stalled = False
        elif op in ("ok", "err"):
            pending = self._pending.get(frame.get("id", -1))
            if pending is not None:
                pending.resolve(frame, None)
            elif op == "err":
                log.warning("the broker refused a command: %s: %s", frame.get("code"),
                            frame.get("msg"))  # fmt: skip
        elif op == "lag":
            dropped = frame.get("dropped")
            for subscription in self._subscriptions.get(str(frame.get("sub")), ()):
                subscription._lag(dropped if isinstance(dropped, int) else 0)

    def _connection_ended(self, websocket: WebSocketConnection) -> ClientError | None:
        """Fail what was in flight; return the error that ends the client, if this one does."""
        self._websocket = None
        reason = None if self._dead_peer else websocket.closed
        code = reason.code if reason is not None else None
        if self._dead_peer:
            detail = f"no pong within {self.ping_interval} s"
        elif reason is not None:
            detail = f"close code {code}: {reason.reason}"
        else:
            detail = "no close frame"
        self._dead_peer = False
        why = f"connection to {self.url} lost ({detail})"
        for pending in list(self._pending.values()):
            if pending.written:
                pending.resolve(None, ConnectionLost(why, code))
        if self._closing:
            return Closed("the client is closed")
        if code == CLOSE_FORBIDDEN:
            return Forbidden((reason.reason if reason else None) or "closed by the broker (4003)")
        if not self.reconnect:
            return ConnectionLost(why, code)
        log.warning("%s; reconnecting", why)
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
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription._end(end_with)


def _os_reason(exc: OSError) -> str:
    """The useful part of a connect error: trio wraps each address's error in a group."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return exc.strerror or str(exc)


@asynccontextmanager
async def connect(
    url: str = "ws://127.0.0.1:8765",
    *,
    token: str | None = None,
    encoding: str = "msgpack",
    reconnect: bool = True,
    backoff: Backoff | None = None,
    reply_timeout: float = 10.0,
    connect_timeout: float = 10.0,
    buffer_size: int = 100,
    outbox_size: int = 1000,
    on_reconnect: Callable[[Client], None] | None = None,
    ping_interval: float | None = 20.0,
) -> AsyncIterator[Client]:
    """Connect to the broker at ``url`` and yield a :class:`Client`; close it on exit.

    ``encoding`` is ``"msgpack"`` (default) or ``"json"``; ``token`` is sent as
    ``Authorization: Bearer``. ``buffer_size`` bounds each subscription's buffer,
    ``outbox_size`` the frames waiting to be sent. With ``reconnect`` (default) a dropped
    connection is retried for ever with ``backoff`` delays; close code 4003 or a 401/403
    handshake ends the client with :class:`Forbidden` instead. A ping every ``ping_interval``
    seconds (``None``: never) unanswered for as long again counts as a drop. Raises
    :class:`CannotConnect` if the first connection fails.
    """
    if encoding not in ("msgpack", "json"):
        raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")
    if not math.isfinite(reply_timeout) or reply_timeout <= 0:
        raise ValueError("reply_timeout must be a positive number of seconds")
    client = Client(
        url, token=token, encoding=encoding, reconnect=reconnect, backoff=backoff,
        reply_timeout=reply_timeout, connect_timeout=connect_timeout, buffer_size=buffer_size,
        outbox_size=outbox_size, on_reconnect=on_reconnect, ping_interval=ping_interval,
    )  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    return next(_leaves(group))


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the one exception a nursery wrapped, as it was (the user's own, or ours)."""
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
