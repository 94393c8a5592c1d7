"""The Redis backplane: broker nodes share published messages through Redis pub/sub.

Each node keeps two connections to Redis:

- a **command** connection, on which :meth:`RedisBackplane.publish` sends ``PUBLISH`` (one
  writer task pipelines what callers queue, one reader task hands replies back in order), so a
  ``pub`` is acknowledged only once Redis has taken the message;
- a **subscriber** connection, ``SUBSCRIBE``\\ d to one channel per concrete topic and
  ``PSUBSCRIBE``\\ d to one glob per wildcard pattern that local clients hold
  (:func:`redis_glob`; reference-counted: a channel or glob is subscribed
  once per node, and unsubscribed when its last local subscriber leaves). Redis matches every
  glob against every message published, so a node follows at most ``max_patterns`` globs
  (:meth:`RedisBackplane.refuse_to_follow`).

Every message carries its origin node id and a per-node sequence number (and, on topics with
history, the epoch and offset given by :mod:`broker.cluster.history`). The origin node delivers
its plain messages to its own subscribers at once (in :class:`~broker.core.hub.Hub`) and skips
them when Redis echoes them; numbered ones it delivers from the echo, as every node does, so
that every node sees them in offset order. When several of a node's subscriptions match one message,
Redis sends it once per match, back to back; the node delivers it once (the hub then gives it
to every matching local subscription, as on a single node).

Between Redis and the hub there is one bounded buffer (``buffer`` messages). When it is full,
because the hub waits under ``block`` for a slow local subscriber, the subscriber connection
stops reading, TCP pushes back on Redis, and Redis buffers for us up to its
``client-output-buffer-limit pubsub``; past it Redis closes the connection, which is handled
as an outage (see docs/cluster.md).

Nodes can also ask each other (:meth:`RedisBackplane.ask`, answered by the handlers given to
:meth:`RedisBackplane.answer`): the server API's ``disconnect`` and ``info`` reach every node
this way. A question is published on ``{prefix}:ask``; each node answers on the asker's own
``{prefix}:answer:{node}`` channel, and the asker waits for as many answers as Redis counted
receivers of its question (its own copy included), for at most ``timeout``.

Outages: while Redis is unreachable the node keeps serving its local clients, publishes raise
:class:`~broker.core.delivery.Unavailable` (the ``pub`` is answered ``err unavailable``
after local delivery), the outage is logged once, and the node reconnects with exponential
backoff and resubscribes to everything its clients hold.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import trio

from broker.cluster.delivery import Deliver, Missed
from broker.cluster.resp import (
    ConnectionLost,
    ProtocolError,
    RedisAddress,
    RedisConnection,
    RedisError,
    Reply,
    encode_command,
)
from broker.core.delivery import Unavailable
from broker.core.stats import BurstLog
from broker.exceptiongroups import first_leaf
from broker.protocol.codes import ErrorCode
from broker.protocol.frames import Position
from broker.protocol.topics import is_wildcard

log = logging.getLogger("broker.cluster")


def _is_glob(name: bytes) -> bool:
    """Whether a Redis name of :meth:`RedisBackplane.redis_name` is a glob (neither topics
    nor the prefix contain ``*``; every glob does)."""
    return b"*" in name


#: What a lost, refused or broken connection to Redis raises: an outage, not a bug.
_FAILURES = (OSError, ConnectionLost, ProtocolError, RedisError, trio.TooSlowError)
_SUBSCRIBE_ACKS = (b"subscribe", b"psubscribe", b"unsubscribe", b"punsubscribe")


class Deferred(Protocol):
    """A command encoded only when the writer takes it, so that more can join it until then
    (:class:`~broker.cluster.history.RedisHistory` batches a topic's publishes this way)."""

    def encode(self) -> bytes:
        """The command; called once, after which nothing joins it."""


#: What the command connection's queue takes: an encoded command, or one encoded late.
Command = bytes | Deferred


@dataclass(eq=False, slots=True)
class _Pending:
    """One command's reply, filled in by the reader (or failed when the connection goes)."""

    done: trio.Event = field(default_factory=trio.Event)
    reply: Reply = None
    error: str | None = None


class _Commands:
    """The command connection: callers queue commands, one task writes, one reads replies.

    A command whose reply nobody waits for is queued with ``None`` for its pending reply,
    so a fire-and-forget publish costs no event and no await (:meth:`queue`)."""

    def __init__(self, connection: RedisConnection, timeout: float, depth: int) -> None:
        self._connection = connection
        self._timeout = timeout
        self._in, self._out = trio.open_memory_channel[tuple[Command, _Pending | None]](depth)
        self._waiting: deque[_Pending | None] = deque()
        self.broken = trio.Event()
        self.why = ""
        self.last: Command | None = None  # the command queued last
        self._refusals = BurstLog(quiet=60.0)  # error replies to commands nobody waits for

    def queue(self, payload: Command) -> bool:
        """Queue one command, in order, whose reply is ignored, if there is room now; False
        if there is not (or the connection is gone): then :meth:`call`."""
        if self.broken.is_set():
            return False
        try:
            self._in.send_nowait((payload, None))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.last = payload
        return True

    async def call(self, payload: Command, *, wait: bool = True) -> Reply:
        """Send one encoded command and return its reply; raises Unavailable.

        Without ``wait`` it returns once the command is queued (in order), and its reply is
        ignored: failures after that show as the outage they cause.
        """
        if self.broken.is_set():
            raise Unavailable(self.why)
        pending = _Pending() if wait else None
        with trio.move_on_after(self._timeout):
            try:
                try:
                    self._in.send_nowait((payload, pending))  # no checkpoint per message
                except trio.WouldBlock:
                    self.last = None  # others may queue while this one waits
                    await self._in.send((payload, pending))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise Unavailable(self.why) from None
            self.last = payload
            if pending is None:
                return None
            await pending.done.wait()
        if pending is None:
            self.fail(f"Redis took no command within {self._timeout:g} s")
            raise Unavailable(self.why)
        if not pending.done.is_set():
            # A grace for the reader: when this node's own event loop stalled past the
            # deadline (a storm of work), the reply may be waiting in the socket, unread.
            with trio.move_on_after(self._timeout / 10):
                await pending.done.wait()
        if not pending.done.is_set():
            self.fail(f"no reply from Redis within {self._timeout:g} s")
            raise Unavailable(self.why)
        if pending.error is not None:
            raise Unavailable(pending.error)
        if isinstance(pending.reply, RedisError):
            raise Unavailable(f"Redis answered: {pending.reply}")
        return pending.reply

    async def write_loop(self) -> None:
        """Send queued commands, everything queued at once in one write (pipelining)."""
        waiting = self._waiting
        async for payload, pending in self._out:
            batch = [payload if isinstance(payload, bytes) else payload.encode()]
            waiting.append(pending)
            while len(batch) < 1024:
                try:
                    payload, pending = self._out.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                batch.append(payload if isinstance(payload, bytes) else payload.encode())
                waiting.append(pending)
            if self.broken.is_set():  # handed over just before fail() emptied the queue
                self._fail_waiting()
                return
            await self._connection.send(b"".join(batch))

    async def read_loop(self) -> None:
        """Hand each reply to the oldest command (dropped if nobody waits for it)."""
        waiting = self._waiting
        while True:
            for reply in await self._connection.receive_all():
                if not waiting:
                    if self.broken.is_set():
                        return  # a late reply to a command failed by fail(): the outage
                    raise ProtocolError(f"a reply nobody asked for: {reply!r:.80}")
                self._answer(waiting.popleft(), reply)

    def _answer(self, pending: _Pending | None, reply: Reply) -> None:
        """Hand ``reply`` to whoever waits for it; nobody waits for a publish without ``id``,
        whose refusal is logged (its messages are lost: say so)."""
        if pending is not None:
            pending.reply = reply
            pending.done.set()
        elif isinstance(reply, RedisError):
            unlogged = self._refusals.first(None, trio.current_time())
            if unlogged is not None:
                log.warning("cluster: Redis refused publishes without id (%s); "
                            "%d more refusals since the last such line", reply,
                            unlogged)  # fmt: skip

    def fail(self, why: str) -> None:
        """The connection is gone: fail every waiting and queued command with ``why``."""
        if self.broken.is_set():
            return
        self.why = why
        self.broken.set()
        self._in.close()
        while True:
            try:
                self._waiting.append(self._out.receive_nowait()[1])
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        for pending in self._waiting:
            if pending is not None:
                pending.error = self.why
                pending.done.set()
        self._waiting.clear()


@dataclass(eq=False, slots=True)
class _Question:
    """A question this node asked every node: the answers so far, and how many to wait for
    (``None`` until Redis said how many nodes received it)."""

    answers: list[Any] = field(default_factory=list)
    counted: int = 0  # answers, and this node's own copy of the question
    receivers: int | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def count(self, answer: Any = None, *, own: bool = False) -> None:
        if not own:
            self.answers.append(answer)
        self.counted += 1
        self.changed.set()
        self.changed = trio.Event()

    @property
    def complete(self) -> bool:
        return self.receivers is not None and self.counted >= self.receivers


#: Answers to other nodes' questions waiting to be sent (more are dropped: their askers stop
#: waiting after ``timeout``).
ANSWERS_QUEUED = 1024


class RedisBackplane:
    """A :class:`~broker.core.backplane.Backplane` over Redis pub/sub (see the module doc)."""

    #: The command that publishes on a channel (SPUBLISH in :mod:`broker.cluster.sharded`).
    publish_verb = "PUBLISH"

    def __init__(
        self,
        address: RedisAddress,
        node_id: str,
        prefix: str = "broker",
        *,
        buffer: int = 1024,
        max_patterns: int = 1024,
        timeout: float = 5.0,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
    ) -> None:
        self.address = address
        self.where = f"Redis at {address}"  # in logs and in why it is down
        self.node_id = node_id
        self.timeout = timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_patterns = max_patterns
        self._base = prefix
        self._prefix = f"{prefix}:m:"
        self._ask_channel = f"{prefix}:ask"
        self._answer_prefix = f"{prefix}:answer:"
        # By Redis name (a channel, or a glob: see _globs).
        self._wanted: Counter[bytes] = Counter()  # -> local subscriptions that need it
        self._globs: set[bytes] = set()  # the names in _wanted that are globs
        self._dirty: set[bytes] = set()  # names whose Redis subscription may need a change
        self._sent: set[bytes] = set()  # names subscribed on the current connection
        self._pending: Counter[bytes] = Counter()  # -> (un)subscribe acks not yet seen
        self._changed = trio.Event()
        self._progress = trio.Event()
        self._commands: _Commands | None = None  # set while connected
        self._seq = 0
        self._to_hub, self._from_redis = trio.open_memory_channel[
            tuple[str, bytes, Position | None]
        ](buffer)
        self.down_since: float | None = None
        self.why_down = "not connected yet"
        self.stats: Counter[str] = Counter()
        self._missed: Missed = lambda: None
        self._ping_unanswered = False  # a PING was sent on the subscriber connection
        self._hub_behind = False  # the subscriber reader waits for room in the buffer
        self._ever_connected = False
        self._listeners: dict[bytes, Callable[[bytes], None]] = {}  # by channel
        # Asking every node: this node's handlers by kind, its questions in flight by id,
        # and the answers it owes other nodes (origin, encoded answer), sent by _answer_loop.
        self._answerers: dict[str, Callable[[Any], Any]] = {}
        self._questions: dict[int, _Question] = {}
        self._question_ids = 0
        self._answers_in, self._answers_out = trio.open_memory_channel[tuple[str, bytes]](
            ANSWERS_QUEUED
        )

    @property
    def connected(self) -> bool:
        """True while both connections to Redis are up."""
        return self._commands is not None

    def statistics(self) -> dict[str, int]:
        """Counters (published, received, duplicates, own, outages) and the buffer's use."""
        return {
            **self.stats,
            "buffered": self._to_hub.statistics().current_buffer_used,
            "patterns": len(self._globs),
            "channels": len(self._wanted) - len(self._globs),
        }

    # --- the hub's side ---

    def follow(self, pattern: str) -> None:
        """Count one more local subscription to ``pattern``; subscribe in Redis if first."""
        name = self.redis_name(pattern)
        self._wanted[name] += 1
        if self._wanted[name] == 1:
            if is_wildcard(pattern):
                self._globs.add(name)
            self._mark_dirty(name)

    def refuse_to_follow(self, pattern: str) -> tuple[ErrorCode, str] | None:
        """Why a subscription to ``pattern`` would be one glob too many, if it would."""
        if not is_wildcard(pattern) or len(self._globs) < self.max_patterns:
            return None
        if self.redis_name(pattern) in self._wanted:
            return None
        return ErrorCode.TOO_MANY_SUBS, (
            f"this node already follows {len(self._globs)} wildcard patterns in Redis, its "
            "limit (cluster.max_patterns): subscribe to concrete topics, or to a pattern "
            "already in use"
        )

    def _mark_dirty(self, name: bytes) -> None:
        """``name``'s Redis subscription may need a change."""
        self._dirty.add(name)
        self._changed.set()

    def unfollow(self, pattern: str) -> None:
        """Count one local subscription fewer; unsubscribe in Redis when none is left."""
        name = self.redis_name(pattern)
        self._wanted[name] -= 1
        if self._wanted[name] <= 0:
            del self._wanted[name]
            self._globs.discard(name)
            self._mark_dirty(name)

    async def wait_followed(self, pattern: str) -> None:
        """Return once Redis confirmed the subscription covering ``pattern`` (or it is down,
        or ``timeout`` passed)."""
        with trio.move_on_after(self.timeout):
            while self.connected and not self.followed(pattern):
                await self._progress.wait()

    def followed(self, pattern: str) -> bool:
        """Whether Redis confirmed the subscription covering ``pattern`` on the current
        connection (so every message published from then on comes), and it is still
        wanted."""
        name = self.redis_name(pattern)
        return (
            self.connected
            and name in self._sent
            and not self._pending[name]
            and name not in self._dirty
        )

    def listen(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Hand every message of Redis ``channel`` (one of the broker's own, not a topic's)
        to ``handler``, which must not block; from now on and after every reconnect."""
        name = channel.encode()
        self._listeners[name] = handler
        self._wanted[name] += 1
        self._mark_dirty(name)

    async def wait_connected(self) -> None:
        """Return once both connections to Redis are up."""
        while not self.connected:
            await self._progress.wait()

    def redis_name(self, pattern: str) -> bytes:
        """The Redis channel (a concrete topic) or glob (a wildcard pattern) of ``pattern``."""
        if is_wildcard(pattern):
            return redis_glob(self._prefix, pattern).encode()
        return (self._prefix + pattern).encode()

    def publish_nowait(self, topic: str, packed: bytes) -> bool:
        """Queue the message for Redis (``PUBLISH``), behind those queued before, if that
        needs no wait; False if it would, or if Redis is down: then :meth:`publish`."""
        if not self.queue(self._publish_command(topic, packed)):
            return False
        self.stats["published"] += 1
        return True

    async def publish(self, topic: str, packed: bytes, *, wait: bool = True) -> None:
        """``PUBLISH`` the message; raises Unavailable if Redis does not take it.

        Without ``wait``, returns once the message is queued for Redis, in order."""
        await self.call(self._publish_command(topic, packed), wait=wait)
        self.stats["published"] += 1

    def _publish_command(self, topic: str, packed: bytes) -> bytes:
        envelope = msgpack.packb([self.node_id, self._next_seq(), packed], use_bin_type=True)
        return encode_command("PUBLISH", self._prefix + topic, envelope)

    def queue(self, command: Command, key: str | None = None) -> bool:
        """Queue a command whose reply is ignored on the command connection, in order, if
        that needs no wait; False if it would, or if Redis is down. ``key``: one of the keys
        (or the shard channel) it uses, for a sharded engine to route it by (ignored here)."""
        commands = self._commands
        return commands is not None and commands.queue(command)

    def queued_last(self, command: Command) -> bool:
        """Whether ``command`` is the last queued on the command connection."""
        commands = self._commands
        return commands is not None and commands.last is command

    async def call(self, command: Command, *, wait: bool = True, key: str | None = None) -> Reply:
        """Run an encoded command on the command connection (see :meth:`_Commands.call`);
        ``key`` as for :meth:`queue`."""
        commands = self._commands
        if commands is None:
            raise Unavailable(self.why_down)
        return await commands.call(command, wait=wait)

    def channel(self, topic: str) -> str:
        """The Redis channel of ``topic``."""
        return self._prefix + topic

    def key_base(self, topic: str) -> str:
        """What starts the names of ``topic``'s keys (in Redis, by
        :class:`~broker.cluster.history.RedisHistory`)."""
        return self._base

    def wildcard_route(self, topic: str) -> tuple[bytes, bytes]:
        """On a sharded engine, the channel a topic's messages also go on for wildcards, and
        the topic packed; none here (globs follow the topics' own channels)."""
        return b"", b""

    def global_base(self) -> str:
        """What starts the names of the keys that are not a topic's (presence's)."""
        return self._base

    def envelope_head(self, packed: bytes) -> bytes:
        """The start of a message numbered in Redis: a msgpack array of five items, of which
        the script appends the last two (epoch and offset)."""
        items = (self.node_id, self._next_seq(), packed)
        return b"\x95" + b"".join(msgpack.packb(item, use_bin_type=True) for item in items)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # --- asking every node ---

    def answer(self, kind: str, handler: Callable[[Any], Any]) -> None:
        """Answer the questions of ``kind`` other nodes :meth:`ask` with ``handler(request)``,
        from now on: a plain function (it must not block) whose answer msgpack can encode."""
        if not self._answerers:
            self.listen(self._ask_channel, self._asked)
            self.listen(self._answer_prefix + self.node_id, self._answered)
        self._answerers[kind] = handler

    async def ask(self, kind: str, request: Any) -> list[Any]:
        """Ask every other node's ``kind`` handler (see :meth:`answer`); their answers, in
        the order they came, once every node Redis delivered the question to has answered
        or ``timeout`` has passed (a node that has not is left out). Raises
        :class:`Unavailable` if Redis cannot be reached."""
        self._question_ids += 1
        question_id = self._question_ids
        question = self._questions[question_id] = _Question()
        packed = msgpack.packb([self.node_id, question_id, kind, request], use_bin_type=True)
        try:
            command = encode_command(self.publish_verb, self._ask_channel, packed)
            receivers = await self.call(command, key=self._ask_channel)
            if not isinstance(receivers, int):
                raise Unavailable(f"unexpected answer from Redis to PUBLISH: {receivers!r:.80}")
            question.receivers = receivers
            with trio.move_on_after(self.timeout):
                while not question.complete:
                    await question.changed.wait()
        finally:
            del self._questions[question_id]
        return question.answers

    def _asked(self, payload: bytes) -> None:
        """A question on the ask channel: answer it (this node's own: count it)."""
        try:
            origin, question_id, kind, request = msgpack.unpackb(payload, raw=False)
        except Exception:
            log.warning("cluster: a malformed question on %s ignored", self._ask_channel)
            return
        if origin == self.node_id:
            question = self._questions.get(question_id)
            if question is not None:
                question.count(own=True)
            return
        handler = self._answerers.get(kind)
        try:  # a kind this node does not know is answered None, so the asker need not wait
            answer = None if handler is None else handler(request)
        except Exception:
            log.exception("cluster: answering a %r question from node %s failed", kind, origin)
            answer = None
        try:
            packed = msgpack.packb([question_id, answer], use_bin_type=True)
            self._answers_in.send_nowait((origin, packed))
        except trio.WouldBlock:
            log.warning("cluster: %d answers to other nodes queued; one to %s is dropped",
                        ANSWERS_QUEUED, origin)  # fmt: skip
        except Exception:
            log.exception("cluster: cannot encode the answer to a %r question", kind)

    def _answered(self, payload: bytes) -> None:
        """An answer to one of this node's questions."""
        try:
            question_id, answer = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:
            log.warning("cluster: a malformed answer to node %s ignored", self.node_id)
            return
        question = self._questions.get(question_id)
        if question is not None:
            question.count(answer)

    async def _answer_loop(self) -> None:
        """Send the answers :meth:`_asked` queued, in order; one Redis cannot take is lost
        (its asker stops waiting after ``timeout``)."""
        async for origin, packed in self._answers_out:
            channel = self._answer_prefix + origin
            command = encode_command(self.publish_verb, channel, packed)
            with contextlib.suppress(Unavailable):
                await self.call(command, wait=False, key=channel)

    # --- the connection's life ---

    async def run(
        self,
        deliver: Deliver,
        missed: Missed,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, serve, and after any failure reconnect with backoff, until cancelled;
        call ``missed`` each time the connection comes back after an outage."""
        self._missed = missed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver_loop, deliver)
            nursery.start_soon(self._answer_loop)
            task_status.started()
            backoff = self.min_backoff
            while True:
                why = f"{self.where}: disconnected"
                try:
                    await self._serve_connected()
                except* _FAILURES as group:
                    exc = first_leaf(group)
                    why = f"{self.where}: {exc or type(exc).__name__}"
                except* Exception as group:  # a bug of ours: this connection's, not the node's
                    log.error("cluster: internal error on the Redis connection", exc_info=group)
                    why = f"{self.where}: internal error ({first_leaf(group)!r})"
                if self._ever_connected and self.down_since is None:
                    backoff = self.min_backoff  # it was up: start the backoff again
                self._went_down(why)
                await trio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.max_backoff)

    def _went_down(self, why: str) -> None:
        self.why_down = f"cluster backplane unavailable ({why})"
        if self.down_since is None:
            self.down_since = trio.current_time()
            self.stats["outages"] += 1
            log.warning(
                "cluster: %s; serving local clients only, publishes answer err unavailable; "
                "reconnecting with backoff (up to %g s)",
                why,
                self.max_backoff,
            )
        else:
            log.debug("cluster: still down: %s", why)

    async def _serve_connected(self) -> None:
        name = f"broker-{self.node_id}"
        commands_connection = await RedisConnection.open(self.address, self.timeout, name)
        try:
            subscriber = await RedisConnection.open(self.address, self.timeout, name)
            commands = _Commands(commands_connection, self.timeout, depth=1024)
            try:
                async with trio.open_nursery() as nursery:
                    self._sent.clear()
                    self._pending.clear()
                    self._ping_unanswered = False
                    self._dirty = set(self._wanted)
                    self._changed.set()
                    nursery.start_soon(commands.write_loop)
                    nursery.start_soon(commands.read_loop)
                    nursery.start_soon(self._raise_when_broken, commands)
                    nursery.start_soon(self._read_subscriber, subscriber)
                    nursery.start_soon(self._sync_follows, subscriber)
                    self._commands = commands
                    self._came_up()
            finally:
                self._commands = None
                commands.fail(f"cluster backplane unavailable (Redis at {self.address}: lost)")
                self._wake_waiters()
                await trio.aclose_forcefully(subscriber)  # type: ignore[arg-type]
        finally:
            await trio.aclose_forcefully(commands_connection)  # type: ignore[arg-type]

    def _came_up(self) -> None:
        self._ever_connected = True
        if self.down_since is None:
            log.info("cluster: node %s connected to %s", self.node_id, self.where)
        else:
            self._missed()
            log.warning(
                "cluster: %s reachable again after %.1f s; resubscribing %d channel(s) and glob(s)",
                self.where,
                trio.current_time() - self.down_since,
                len(self._wanted),
            )
        self.down_since = None

    @staticmethod
    async def _raise_when_broken(commands: _Commands) -> None:
        await commands.broken.wait()
        raise ConnectionLost(commands.why)

    def _wake_waiters(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _sync_follows(self, connection: RedisConnection) -> None:
        """Keep the subscriber connection's Redis subscriptions in step with ``_wanted``."""
        while True:
            self._changed = trio.Event()
            verbs: dict[str, list[bytes]] = {}
            for name in self._dirty:
                wanted, subscribed = name in self._wanted, name in self._sent
                if wanted == subscribed:
                    continue
                verb = "SUBSCRIBE" if wanted else "UNSUBSCRIBE"
                if _is_glob(name):
                    verb = "P" + verb
                verbs.setdefault(verb, []).append(name)
                self._pending[name] += 1
                if wanted:
                    self._sent.add(name)
                else:
                    self._sent.discard(name)
            self._dirty.clear()
            self._wake_waiters()  # a follow that needed no command may be satisfied now
            if verbs:
                payload = b"".join(encode_command(verb, *names) for verb, names in verbs.items())
                await connection.send(payload)
            with trio.move_on_after(self.timeout):
                await self._changed.wait()
                continue
            # Idle for `timeout`: PING, so that a half-open connection is noticed. An
            # unanswered PING is an outage, unless the reader is waiting on the hub.
            if self._ping_unanswered and not self._hub_behind:
                raise ConnectionLost(f"no answer to PING within {self.timeout:g} s")
            self._ping_unanswered = True
            await connection.send(encode_command("PING"))

    async def _read_subscriber(self, connection: RedisConnection) -> None:
        """Read the subscriber connection: acks update the follow state, messages go to the
        hub through the bounded buffer (waiting when it is full)."""
        prefix = self._prefix.encode()
        own = b"\x93" + msgpack.packb(self.node_id)  # how this node's plain messages start
        last: tuple[str, int] | None = None
        while True:
            replies = await connection.receive_all()
            self._ping_unanswered = False
            for reply in replies:
                message = self._pushed(reply)
                if message is None:
                    continue
                channel, payload = message
                listener = self._listeners.get(channel)
                if listener is not None:
                    listener(payload)
                    continue
                if payload.startswith(own):
                    self.stats["own"] += 1  # delivered here already; numbered ones come back
                    continue
                try:
                    fields = msgpack.unpackb(payload, raw=False)
                    origin, seq, packed = fields[:3]
                    position = Position(fields[3], fields[4]) if len(fields) == 5 else None
                    topic = channel.removeprefix(prefix).decode()
                except Exception:  # not a broker's message: someone else publishes on our prefix
                    self.stats["malformed"] += 1
                    continue
                if (origin, seq) == last:
                    self.stats["duplicates"] += 1
                    continue
                last = (origin, seq)
                self.stats["received"] += 1
                try:
                    self._to_hub.send_nowait((topic, packed, position))
                except trio.WouldBlock:
                    self._hub_behind = True  # not reading: Redis' answers wait in the socket
                    try:
                        await self._to_hub.send((topic, packed, position))
                    finally:
                        self._hub_behind = False

    def _pushed(self, reply: Reply) -> tuple[bytes, bytes] | None:
        """The channel and payload of a message Redis pushed; ``None`` for anything else on
        the subscriber connection (a PONG, a (un)subscribe acknowledgement: counted here)."""
        if reply == b"PONG" or (isinstance(reply, list) and reply and reply[0] == b"pong"):
            self.stats["pongs"] += 1  # a plain PONG when subscribed to nothing
            return None
        if not isinstance(reply, list) or len(reply) < 3:
            raise ProtocolError(f"unexpected on the subscriber connection: {reply!r:.80}")
        kind = reply[0]
        if kind in _SUBSCRIBE_ACKS:
            self._acknowledged(reply[1])
            return None
        if kind == b"message":
            channel, payload = reply[1], reply[2]
        elif kind == b"pmessage" and len(reply) == 4:
            channel, payload = reply[2], reply[3]
        else:
            return None
        if not (isinstance(channel, bytes) and isinstance(payload, bytes)):
            return None
        return channel, payload

    def _acknowledged(self, name: Reply) -> None:
        if not isinstance(name, bytes) or name not in self._pending:
            return
        self._pending[name] -= 1
        if self._pending[name] <= 0:
            del self._pending[name]
        self._wake_waiters()

    async def _deliver_loop(self, deliver: Deliver) -> None:
        """Hand buffered messages to the hub: all those already buffered without a checkpoint
        between them (unless the hub waits), so subscribers' writers send them as one batch,
        as for a batch of local publishes."""
        async for item in self._from_redis:
            while True:
                try:
                    await deliver(*item)
                except Exception:
                    log.exception("cluster: delivering a message on %r failed", item[0])
                try:
                    item = self._from_redis.receive_nowait()
                except trio.WouldBlock:
                    break


GLOB_SPECIAL = "\\*?[]"


def glob_escape(text: str) -> str:
    """``text`` with Redis glob specials escaped, so it matches only itself."""
    return "".join("\\" + char if char in GLOB_SPECIAL else char for char in text)


#: A glob keeps at most this many wildcards: Redis matches every glob against every channel
#: published, and a glob of many stars costs it far more than one of two.
GLOB_WILDCARDS = 2


def redis_glob(prefix: str, pattern: str) -> str:
    """A Redis PSUBSCRIBE glob matching at least the channels of the topics ``pattern`` matches.

    Redis' ``*`` also matches dots, so ``chat.*`` brings ``chat.a.b`` too: the hub's own
    matcher filters again on delivery. ``>`` (one or more segments) becomes ``?*``. The glob
    ends at the pattern's :data:`GLOB_WILDCARDS`-th wildcard (``a.*.b.*.c.*`` follows
    ``a.*.b.*``), which covers the rest.
    """
    segments: list[str] = []
    wildcards = 0
    for segment in pattern.split("."):
        if segment in ("*", ">"):
            wildcards += 1
            segments.append("*" if segment == "*" else "?*")
            if wildcards == GLOB_WILDCARDS:
                break
        else:
            segments.append(glob_escape(segment))
    return glob_escape(prefix) + ".".join(segments)
