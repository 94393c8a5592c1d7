"""The sharded engine: the backplane on a Redis Cluster (or Valkey), with sharded pub/sub.

:class:`ShardedBackplane` is a :class:`~broker.cluster.backplane.RedisBackplane` whose one
Redis is a cluster of masters, each serving some of the 16384 slots. What differs:

- **Names.** A topic's *shard key* is its first ``shard_key_segments`` segments. Everything
  of a topic is named under the hash tag of its shard key, ``{prefix:key}``: its channel
  ``{prefix:key}:m:<topic>``, its history keys (:class:`~broker.cluster.history.RedisHistory`)
  and its key's *wildcard channel* ``{prefix:key}:w``. So they share one slot, and a history
  topic's Lua script runs on one shard as on one Redis. What is not a topic's (presence, the
  nodes' questions) is named under ``{prefix}``: one slot.
- **Pub/sub.** ``SPUBLISH``/``SSUBSCRIBE``: a message goes only to the shard serving its
  slot, and only nodes that follow it there receive it (classic ``PUBLISH`` in a cluster goes
  to every node of the cluster). A message of a topic longer than its shard key is also
  published on the key's wildcard channel, as ``[topic, envelope]``: a wildcard subscription
  (allowed only after the shard key: ``chat.room.*`` when the key is ``chat.room``) follows
  that channel and the hub filters. Redis has no sharded ``PSUBSCRIBE``; a pattern with a
  wildcard inside the shard key would have to follow every shard key there is, so ``sub``
  refuses it (``not_enabled``; :meth:`ShardedBackplane.refuse_to_follow`).
- **Connections.** A command connection and a subscriber connection per master, found from
  ``CLUSTER SHARDS`` asked of the first seed (or master known before) that answers. A
  command is sent to the master of its key's slot (:mod:`broker.cluster.slots`). ``MOVED``
  (the slot lives elsewhere now) updates the slot's owner, resends the command there and
  refreshes the map; ``ASK`` (a slot on the move) resends it there once after ``ASKING``.
- **Faults.** The node is connected while every master is; when one is lost (killed, a
  failover under way, a slot moved away from under a subscription, a master the map does
  not know), the whole engine is down, as one Redis down is (docs/cluster.md, "Faults"),
  until the map, asked again, has a reachable master for every slot: then it reconnects to
  every master, follows again what its clients want, and forgets what it may have missed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import msgpack
import trio

from broker.cluster.backplane import (
    _SUBSCRIBE_ACKS,
    Command,
    RedisBackplane,
    _Commands,
    _Pending,
)
from broker.cluster.resp import (
    ConnectionLost,
    ProtocolError,
    RedisAddress,
    RedisConnection,
    RedisError,
    Reply,
    encode_command,
)
from broker.cluster.slots import Node, Redirect, SlotMap, key_slot, parse_redirect, parse_shards
from broker.core.delivery import Unavailable
from broker.protocol.codes import ErrorCode
from broker.protocol.frames import Position
from broker.protocol.topics import is_wildcard

log = logging.getLogger("broker.cluster")

_SHARD_ACKS = (b"ssubscribe", b"sunsubscribe", *_SUBSCRIBE_ACKS)
_ASKING = encode_command("ASKING")
#: Topics whose names, slots and channels are remembered (then forgotten all at once).
ROUTES_CACHED = 65536


class Several:
    """Commands sent together to one shard, answered (to whoever waits) by the last one's
    reply: a message published on its topic's channel and its shard key's."""

    __slots__ = ("commands",)

    def __init__(self, commands: list[bytes]) -> None:
        self.commands = commands

    def encode(self) -> bytes:
        return b"".join(self.commands)


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a topic's things are: its hash tag (which starts its keys), its channel, its
    shard key's wildcard channel (empty when no wildcard can match it) and its name packed."""

    base: str
    channel: bytes
    wildcard: bytes
    packed_topic: bytes
    slot: int


class _ShardCommands(_Commands):
    """The command connection to one master: as :class:`_Commands`, and it remembers what
    it sent, so that a reply redirecting a command (``MOVED``, ``ASK``) resends it there."""

    def __init__(
        self, connection: RedisConnection, timeout: float, backplane: ShardedBackplane
    ) -> None:
        super().__init__(connection, timeout, depth=1024)
        self._backplane = backplane
        # What each waiting entry sent: one command, or several (answered by the last).
        self._commands: deque[bytes | list[bytes]] = deque()
        self._replies = 0  # replies read so far to the oldest entry
        self._redirect: Redirect | None = None  # the first its replies said

    def requeue(self, commands: list[bytes], pending: _Pending | None) -> bool:
        """Queue commands redirected here, if there is room now."""
        if self.broken.is_set():
            return False
        try:
            self._in.send_nowait((Several(commands), pending))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def write_loop(self) -> None:
        waiting, sent = self._waiting, self._commands
        async for payload, pending in self._out:
            batch: list[bytes] = []
            while True:
                if isinstance(payload, Several):
                    batch += payload.commands
                    sent.append(payload.commands)
                else:
                    encoded = payload if isinstance(payload, bytes) else payload.encode()
                    batch.append(encoded)
                    sent.append(encoded)
                waiting.append(pending)
                if len(batch) >= 1024:
                    break
                try:
                    payload, pending = self._out.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if self.broken.is_set():
                self._fail_waiting()
                return
            await self._connection.send(b"".join(batch))

    async def read_loop(self) -> None:
        waiting, sent = self._waiting, self._commands
        while True:
            for reply in await self._connection.receive_all():
                if not waiting:
                    if self.broken.is_set():
                        return
                    raise ProtocolError(f"a reply nobody asked for: {reply!r:.80}")
                if isinstance(reply, RedisError) and self._redirect is None:
                    self._redirect = parse_redirect(str(reply))
                head = sent[0]
                if not isinstance(head, bytes):
                    self._replies += 1
                    if self._replies < len(head):
                        continue  # one of several commands: the last one's reply answers
                    self._replies = 0
                commands, pending = sent.popleft(), waiting.popleft()
                redirect, self._redirect = self._redirect, None
                if redirect is not None:
                    if isinstance(commands, bytes):
                        commands = [commands]
                    self._backplane.redirected(redirect, commands, pending)
                else:
                    self._answer(pending, reply)

    def _fail_waiting(self) -> None:
        super()._fail_waiting()
        self._commands.clear()
        self._replies = 0


@dataclass(eq=False)
class _Shard:
    """One master's connections, and the subscriptions to change on it."""

    node: Node
    commands: _ShardCommands
    subscriber: RedisConnection
    dirty: set[bytes] = field(default_factory=set)
    changed: trio.Event = field(default_factory=trio.Event)
    ping_unanswered: bool = False


class ShardedBackplane(RedisBackplane):
    """The backplane on a Redis Cluster (see the module doc)."""

    publish_verb = "SPUBLISH"

    def __init__(
        self,
        seeds: list[RedisAddress],
        node_id: str,
        prefix: str = "broker",
        *,
        shard_key_segments: int = 1,
        buffer: int = 1024,
        timeout: float = 5.0,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
    ) -> None:
        if not seeds:
            raise ValueError("a Redis Cluster needs at least one seed node")
        super().__init__(
            seeds[0],
            node_id,
            prefix,
            buffer=buffer,
            timeout=timeout,
            min_backoff=min_backoff,
            max_backoff=max_backoff,
        )
        self.seeds = seeds
        self.where = "Redis Cluster (seeds " + ", ".join(f"{s.host}:{s.port}" for s in seeds) + ")"
        self.shard_key_segments = shard_key_segments
        self._cluster_prefix = prefix
        self._base = "{" + prefix + "}"  # presence, questions: one slot
        self._ask_channel = f"{self._base}:ask"
        self._answer_prefix = f"{self._base}:answer:"
        self._routes: dict[str, _Route] = {}
        self._names: dict[bytes, str | None] = {}  # followed -> its topic (None: wildcard)
        self._shards: list[_Shard] | None = None  # set while connected
        self._owner: list[int] = []  # slot -> index in _shards
        self._known: list[Node] = []  # masters of the last map: tried first next time
        self._refresh = trio.Event()
        self._queued_last: Command | None = None

    # --- names ---

    def route(self, topic: str) -> _Route:
        """Where ``topic``'s things are (see the module doc)."""
        route = self._routes.get(topic)
        if route is None:
            segments = topic.split(".")
            count = self.shard_key_segments
            base = "{" + self._cluster_prefix + ":" + ".".join(segments[:count]) + "}"
            wildcard = (base + ":w").encode() if len(segments) > count else b""
            channel = f"{base}:m:{topic}".encode()
            route = _Route(base, channel, wildcard, msgpack.packb(topic), key_slot(base))
            if len(self._routes) >= ROUTES_CACHED:
                self._routes.clear()
            self._routes[topic] = route
        return route

    def channel(self, topic: str) -> str:
        return self.route(topic).channel.decode()

    def key_base(self, topic: str) -> str:
        return self.route(topic).base

    def wildcard_route(self, topic: str) -> tuple[bytes, bytes]:
        """The shard key's wildcard channel of ``topic`` (empty if none) and its packed name:
        the sharded history script's two extra arguments."""
        route = self.route(topic)
        return route.wildcard, route.packed_topic

    def redis_name(self, pattern: str) -> bytes:
        """The shard channel that brings what ``pattern`` matches: a concrete topic's own, a
        wildcard pattern's shard key's (see :meth:`refuse_to_follow`)."""
        if not is_wildcard(pattern):
            return self.route(pattern).channel
        key = ".".join(pattern.split(".")[: self.shard_key_segments])
        return ("{" + self._cluster_prefix + ":" + key + "}:w").encode()

    def refuse_to_follow(self, pattern: str) -> tuple[ErrorCode, str] | None:
        """A wildcard inside the shard key: its topics are on every shard, and Redis Cluster
        has no sharded pattern subscription; refused rather than served partly."""
        if not is_wildcard(pattern):
            return None
        segments = pattern.split(".")
        count = self.shard_key_segments
        if len(segments) > count and not any(s in ("*", ">") for s in segments[:count]):
            return None
        return ErrorCode.NOT_ENABLED, (
            f"{pattern!r} has a wildcard within the shard key: on this Redis Cluster a "
            f"topic's first {count} segment(s) pick its shard (cluster.shard_key_segments), "
            "and wildcards are allowed only after them, such as "
            f"{'.'.join([*'abcdefgh'[:count], '>'])!r}"
        )

    def follow(self, pattern: str) -> None:
        name = self.redis_name(pattern)
        self._names[name] = None if is_wildcard(pattern) else pattern
        super().follow(pattern)

    def unfollow(self, pattern: str) -> None:
        super().unfollow(pattern)
        name = self.redis_name(pattern)
        if name not in self._wanted:
            self._names.pop(name, None)

    # --- commands ---

    @property
    def connected(self) -> bool:
        """True while connected to every master."""
        return self._shards is not None

    def _shard(self, key: str | bytes | None) -> _Shard | None:
        shards = self._shards
        if shards is None:
            return None
        index = self._owner[key_slot(self._base if key is None else key)]
        return None if index < 0 else shards[index]

    def queue(self, command: Command, key: str | None = None) -> bool:
        shard = self._shard(key)
        if shard is None or not shard.commands.queue(command):
            return False
        self._queued_last = command
        return True

    def queued_last(self, command: Command) -> bool:
        return self._shards is not None and self._queued_last is command

    async def call(self, command: Command, *, wait: bool = True, key: str | None = None) -> Reply:
        shard = self._shard(key)
        if shard is None:
            raise Unavailable(self.why_down)
        self._queued_last = None
        return await shard.commands.call(command, wait=wait)

    def publish_nowait(self, topic: str, packed: bytes) -> bool:
        route = self.route(topic)
        shards = self._shards
        if shards is None or (index := self._owner[route.slot]) < 0:
            return False
        command = self._publish_command(route, packed)
        if not shards[index].commands.queue(command):
            return False
        self._queued_last = command
        self.stats["published"] += 1
        return True

    async def publish(self, topic: str, packed: bytes, *, wait: bool = True) -> None:
        route = self.route(topic)
        await self.call(self._publish_command(route, packed), wait=wait, key=route.base)
        self.stats["published"] += 1

    def _publish_command(self, route: _Route, packed: bytes) -> Command:  # type: ignore[override]
        """``SPUBLISH`` on the topic's channel; and on its key's wildcard channel, if any."""
        envelope = msgpack.packb([self.node_id, self._next_seq(), packed], use_bin_type=True)
        command = encode_command("SPUBLISH", route.channel, envelope)
        if not route.wildcard:
            return command
        wrapped = b"\x92" + route.packed_topic + msgpack.packb(envelope, use_bin_type=True)
        return Several([command, encode_command("SPUBLISH", route.wildcard, wrapped)])

    def redirected(
        self, redirect: Redirect, commands: list[bytes], pending: _Pending | None
    ) -> None:
        """A reply said the command is served elsewhere: resend it there (see the module
        doc); called by the connection that read the reply."""
        shards = self._shards or []
        target = next((i for i, s in enumerate(shards) if s.node == redirect.node), None)
        if target is None:
            why = f"Redis Cluster sent slot {redirect.slot} to {redirect.node}, not in its map"
            if pending is not None:
                pending.error = why
                pending.done.set()
            raise ConnectionLost(why)
        if redirect.moved:
            self._owner[redirect.slot] = target
            self._refresh.set()
            self.stats["moved"] += 1
        else:
            commands = [part for command in commands for part in (_ASKING, command)]
            self.stats["asked"] += 1
        if not shards[target].commands.requeue(commands, pending) and pending is not None:
            pending.error = (
                f"cannot resend a command redirected to {redirect.node}: its queue is full"
            )
            pending.done.set()

    # --- subscriptions ---

    def _mark_dirty(self, name: bytes) -> None:
        shard = self._shard(name)
        if shard is not None:  # else the next connection follows everything wanted
            shard.dirty.add(name)
            shard.changed.set()

    def followed(self, pattern: str) -> bool:
        name = self.redis_name(pattern)
        shard = self._shard(name)
        return (
            shard is not None
            and name in self._sent
            and not self._pending[name]
            and name not in shard.dirty
        )

    # --- the connections' life ---

    async def _discover(self) -> SlotMap:
        """The slot map from the first node that answers with one covering every slot."""
        why = "no seed node answered"
        seed = self.seeds[0]
        candidates = [RedisAddress(n.host, n.port, 0, seed.username, seed.password)
                      for n in self._known] + list(self.seeds)  # fmt: skip
        for address in dict.fromkeys(candidates):
            try:
                connection = await RedisConnection.open(address, self.timeout)
            except (OSError, ConnectionLost, ProtocolError, RedisError, trio.TooSlowError) as exc:
                why = f"{address}: {exc or type(exc).__name__}"
                continue
            try:
                with trio.fail_after(self.timeout):
                    slots = parse_shards(await connection.call("CLUSTER", "SHARDS"))
            except (
                ConnectionLost,
                ProtocolError,
                RedisError,
                ValueError,
                trio.TooSlowError,
            ) as exc:
                why = f"{address}: CLUSTER SHARDS: {exc or type(exc).__name__}"
                if "cluster support disabled" in str(exc):
                    why += (
                        " (cluster.seeds is for a Redis Cluster; for one Redis, set "
                        "cluster.backend instead)"
                    )
                continue
            finally:
                await trio.aclose_forcefully(connection)  # type: ignore[arg-type]
            if slots.uncovered():
                why = f"{address}: {slots.uncovered()} slots have no reachable master"
                continue
            return slots
        raise ConnectionLost(f"no slot map: {why}")

    async def _serve_connected(self) -> None:
        slots = await self._discover()
        self._known = list(slots.masters)
        seed = self.seeds[0]
        name = f"broker-{self.node_id}"
        shards: list[_Shard] = []
        connections: list[RedisConnection] = []
        try:
            for node in slots.masters:
                address = RedisAddress(node.host, node.port, 0, seed.username, seed.password)
                commands = await RedisConnection.open(address, self.timeout, name)
                connections.append(commands)
                subscriber = await RedisConnection.open(address, self.timeout, name)
                connections.append(subscriber)
                shards.append(
                    _Shard(node, _ShardCommands(commands, self.timeout, self), subscriber)
                )
            async with trio.open_nursery() as nursery:
                self._sent.clear()
                self._pending.clear()
                self._owner = list(slots.owner)
                self._queued_last = None  # a batch queued before cannot take more
                self._shards = shards
                for wanted in self._wanted:
                    self._mark_dirty(wanted)
                for shard in shards:
                    nursery.start_soon(shard.commands.write_loop)
                    nursery.start_soon(shard.commands.read_loop)
                    nursery.start_soon(self._raise_when_broken, shard.commands)
                    nursery.start_soon(self._read_shard, shard)
                    nursery.start_soon(self._sync_shard, shard)
                nursery.start_soon(self._refresh_loop, shards)
                self._came_up()
        finally:
            self._shards = None
            for shard in shards:
                shard.commands.fail(
                    f"cluster backplane unavailable ({self.where}: {shard.node} lost)"
                )
            self._wake_waiters()
            for connection in connections:
                await trio.aclose_forcefully(connection)  # type: ignore[arg-type]

    async def _refresh_loop(self, shards: list[_Shard]) -> None:
        """Ask for the slot map again after a ``MOVED``: a master that joined or left means
        connecting again (an outage); else the slots' owners are updated."""
        while True:
            await self._refresh.wait()
            self._refresh = trio.Event()
            try:
                reply = await shards[0].commands.call(encode_command("CLUSTER", "SHARDS"))
                slots = parse_shards(reply)
            except (Unavailable, ValueError) as exc:
                raise ConnectionLost(f"refreshing the slot map: {exc}") from None
            nodes = [shard.node for shard in shards]
            if set(slots.masters) != set(nodes) or slots.uncovered():
                raise ConnectionLost("its masters changed; connecting again")
            self._owner = [-1 if i < 0 else nodes.index(slots.masters[i]) for i in slots.owner]

    async def _sync_shard(self, shard: _Shard) -> None:
        """Keep one master's shard channel subscriptions in step with what is wanted; PING
        it when idle (see :meth:`RedisBackplane._sync_follows`)."""
        while True:
            shard.changed = trio.Event()
            commands = []
            for name in shard.dirty:
                wanted, subscribed = name in self._wanted, name in self._sent
                if wanted == subscribed:
                    continue
                commands.append(encode_command("SSUBSCRIBE" if wanted else "SUNSUBSCRIBE", name))
                self._pending[name] += 1
                if wanted:
                    self._sent.add(name)
                else:
                    self._sent.discard(name)
            shard.dirty.clear()
            self._wake_waiters()
            if commands:
                await shard.subscriber.send(b"".join(commands))
            with trio.move_on_after(self.timeout):
                await shard.changed.wait()
                continue
            if shard.ping_unanswered and not self._hub_behind:
                raise ConnectionLost(
                    f"no answer to PING from {shard.node} within {self.timeout:g} s"
                )
            shard.ping_unanswered = True
            await shard.subscriber.send(encode_command("PING"))

    async def _read_shard(self, shard: _Shard) -> None:
        """Read one master's subscriber connection (see :meth:`RedisBackplane._read_subscriber`):
        a topic's channel brings its envelope, a wildcard channel ``[topic, envelope]``."""
        own = b"\x93" + msgpack.packb(self.node_id)
        last: dict[str, int] = {}  # origin -> the seq it sent last on this shard
        names, listeners, stats = self._names, self._listeners, self.stats
        while True:
            replies = await shard.subscriber.receive_all()
            shard.ping_unanswered = False
            for reply in replies:
                message = self._shard_pushed(reply)
                if message is None:
                    continue
                channel, payload = message
                listener = listeners.get(channel)
                if listener is not None:
                    listener(payload)
                    continue
                topic = names.get(channel, "")
                try:
                    if topic is None:  # a wildcard channel
                        raw_topic, payload = msgpack.unpackb(payload, raw=True)
                        topic = raw_topic.decode()
                    elif not topic:
                        stats["stale"] += 1  # unfollowed meanwhile
                        continue
                    if payload.startswith(own):
                        stats["own"] += 1
                        continue
                    fields = msgpack.unpackb(payload, raw=False)
                    origin, seq, packed = fields[:3]
                    position = Position(fields[3], fields[4]) if len(fields) == 5 else None
                except Exception:
                    stats["malformed"] += 1
                    continue
                if last.get(origin) == seq:  # the same message on its topic's channel and its key's
                    stats["duplicates"] += 1
                    continue
                last[origin] = seq
                stats["received"] += 1
                try:
                    self._to_hub.send_nowait((topic, packed, position))
                except trio.WouldBlock:
                    self._hub_behind = True
                    try:
                        await self._to_hub.send((topic, packed, position))
                    finally:
                        self._hub_behind = False

    def _shard_pushed(self, reply: Reply) -> tuple[bytes, bytes] | None:
        if reply == b"PONG" or (isinstance(reply, list) and reply and reply[0] == b"pong"):
            self.stats["pongs"] += 1
            return None
        if isinstance(reply, RedisError):
            raise ConnectionLost(f"Redis Cluster refused a subscription: {reply}")
        if not isinstance(reply, list) or len(reply) < 3:
            raise ProtocolError(f"unexpected on the subscriber connection: {reply!r:.80}")
        kind = reply[0]
        if kind in _SHARD_ACKS:
            name = reply[1]
            if kind == b"sunsubscribe" and isinstance(name, bytes) and not self._pending[name]:
                raise ConnectionLost(
                    f"Redis Cluster moved the slot of {name.decode(errors='replace')}"
                )
            self._acknowledged(name)
            return None
        if kind == b"smessage" or kind == b"message":
            channel, payload = reply[1], reply[2]
            if isinstance(channel, bytes) and isinstance(payload, bytes):
                return channel, payload
        return None
