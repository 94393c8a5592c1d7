"""History shared by every node of a cluster: Redis Streams hold it, each node mirrors it.

In Redis, per topic: ``{prefix}:e:{topic}`` its epoch, ``{prefix}:o:{topic}`` its latest
offset, ``{prefix}:h:{topic}`` a stream of its last ``history_size`` messages (entry id
``0-<offset>``, fields ``d`` data and ``t`` time in ms). :data:`PUBLISH_SCRIPT` numbers a
message, appends it and ``PUBLISH``\\ es it in one atomic step, so every node receives a
topic's messages in offset order. Epochs are made in Redis (see :data:`_EPOCH_AND_NOW`), so
offsets and epochs are the same on every node. Only a publish stores keys for a topic, and
they expire after ``history_meta_ttl`` without one: subscribing stores nothing in Redis.

The hub's :class:`~broker.core.history.HistoryStore` calls are synchronous (docs/history.md), so
:class:`RedisHistory` answers them from a **mirror**: per topic, an unbroken run of the
latest messages, fed by the messages this node receives for it (:meth:`record`; the node
keeps a topic's mirror only while a local subscription follows the topic:
:class:`~broker.cluster.delivery.ClusterDelivery`). A topic is *warm* when its mirror is
known whole up to the latest message received, which only :meth:`load` makes it: it reads
epoch, offset and the kept tail from Redis. A mirror is cold when never loaded, evicted,
forgotten (:meth:`forget`, :meth:`clear`), or after a hole in what was received. Messages
already received but still in the backplane's buffer may be older than what a load read; they
are not kept twice, and the hub skips them for a subscription whose ``ok`` already covers them
(see :class:`~broker.core.hub.Subscription`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.cluster.backplane import RedisBackplane
from broker.cluster.resp import encode_command
from broker.core.delivery import Unavailable
from broker.core.history import KeptTopic, KeptTopics, Replay, Stored, new_epoch, replay_after
from broker.core.rules import HistoryLimits
from broker.protocol.frames import Position

log = logging.getLogger("broker.cluster")

#: Both scripts start here: the topic's epoch and Redis' clock in ms. A topic with no history
#: in Redis (never published to, or its keys expired) has the cluster's fresh epoch, made here
#: when there is none, which lives half of history_meta_ttl: so a topic whose keys expired
#: (after history_meta_ttl) never gets an epoch it had again. KEYS epoch, offset, stream,
#: fresh; ARGV[1] a new epoch, ARGV[2] the fresh epoch's life in ms.
_EPOCH_AND_NOW = """
local epoch = redis.call('GET', KEYS[1])
local stored = epoch
if not epoch then
  epoch = redis.call('GET', KEYS[4])
  if not epoch then
    epoch = ARGV[1]
    redis.call('SET', KEYS[4], epoch, 'PX', ARGV[2])
  end
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
"""

#: How both publish scripts end: trim the stream, make every key expire, answer.
# A publish to a topic stored nothing yet (or whose keys expired) stores its fresh epoch.
_STORE_EPOCH = """
if not stored then
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[2], KEYS[3])
end
local channel, packed_epoch = ARGV[5], cmsgpack.pack(epoch)"""

_PUBLISH_END = """
redis.call('XTRIM', KEYS[3], 'MAXLEN', ARGV[3])
local ttl, life = tonumber(ARGV[4]), tonumber(ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.max(ttl, life))
redis.call('PEXPIRE', KEYS[2], math.max(ttl, life))
redis.call('PEXPIRE', KEYS[3], ttl > 0 and ttl or life)
return {epoch, offset}
"""

#: KEYS as above; ARGV as above, then size, ttl ms (0: none), channel, the keys' life in ms,
#: and per message its data and envelope head (a msgpack array of 5 without its last two
#: items: epoch and offset). Numbers, keeps and publishes the messages in order; returns
#: {epoch, offset of the last}. Only a publish stores anything for the topic, and every key
#: it stores expires.
PUBLISH_SCRIPT = (
    _EPOCH_AND_NOW
    + _STORE_EPOCH
    + """
local count = (#ARGV - 6) / 2
local offset = redis.call('INCRBY', KEYS[2], count) - count
for i = 7, #ARGV, 2 do
  offset = offset + 1
  redis.call('XADD', KEYS[3], '0-' .. offset, 'd', ARGV[i], 't', ms)
  redis.call('PUBLISH', channel, ARGV[i + 1] .. packed_epoch .. cmsgpack.pack(offset))
end"""
    + _PUBLISH_END
)

#: The sharded engine's (:mod:`broker.cluster.sharded`): as :data:`PUBLISH_SCRIPT`, with
#: SPUBLISH, and two more ARGV before the messages': the topic's shard key channel ('' for
#: none) and the topic (packed), on which each message also goes as {topic, message}.
SHARDED_PUBLISH_SCRIPT = (
    _EPOCH_AND_NOW
    + _STORE_EPOCH
    + """
local wildcard, packed_topic = ARGV[7], ARGV[8]
local count = (#ARGV - 8) / 2
local offset = redis.call('INCRBY', KEYS[2], count) - count
for i = 9, #ARGV, 2 do
  offset = offset + 1
  redis.call('XADD', KEYS[3], '0-' .. offset, 'd', ARGV[i], 't', ms)
  local message = ARGV[i + 1] .. packed_epoch .. cmsgpack.pack(offset)
  redis.call('SPUBLISH', channel, message)
  if wildcard ~= '' then
    redis.call('SPUBLISH', wildcard, '\\146' .. packed_topic .. cmsgpack.pack(message))
  end
end"""
    + _PUBLISH_END
)

#: KEYS as above; ARGV as above, then the first offset wanted. Stores nothing.
#: Returns {epoch, latest offset, now in ms, entries}.
LOAD_SCRIPT = (
    _EPOCH_AND_NOW
    + """
if not stored then return {epoch, 0, ms, {}} end
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
return {epoch, latest, ms, redis.call('XRANGE', KEYS[3], '0-' .. ARGV[3], '+')}
"""
)


#: At most this many messages are numbered by one script call: Redis runs nothing else
#: meanwhile (about 4 us a message: bench/cluster.py).
BATCH = 128


class _Publishes:
    """Messages of one topic that one :data:`PUBLISH_SCRIPT` call numbers, keeps and
    publishes, in order: more join it until the command writer encodes it."""

    __slots__ = ("encoded", "history", "limits", "messages", "topic")

    def __init__(self, history: RedisHistory, topic: str, limits: HistoryLimits) -> None:
        self.history = history
        self.topic = topic
        self.limits = limits
        self.messages: list[bytes] = []  # data, envelope head; per message
        self.encoded = False

    def encode(self) -> bytes:
        """The script call (see :class:`~broker.cluster.backplane.Deferred`)."""
        self.encoded = True
        limits, history = self.limits, self.history
        ttl = 0 if limits.ttl is None else max(1, int(limits.ttl * 1000))
        backplane = history.backplane
        channel = backplane.channel(self.topic)
        if backplane.publish_verb == "PUBLISH":
            return history.script(
                PUBLISH_SCRIPT, self.topic, limits.size, ttl, channel, history.meta_ttl_ms,
                *self.messages,
            )  # fmt: skip
        wildcard, packed_topic = backplane.wildcard_route(self.topic)
        return history.script(
            SHARDED_PUBLISH_SCRIPT, self.topic, limits.size, ttl, channel,
            history.meta_ttl_ms, wildcard, packed_topic, *self.messages,
        )  # fmt: skip


class RedisHistory:
    """The cluster's :class:`~broker.core.history.HistoryStore` (see the module doc)."""

    def __init__(
        self,
        backplane: RedisBackplane,
        limits_for: Callable[[str], HistoryLimits | None],
        prefix: str = "broker",
        max_bytes: int = 64 * 1024 * 1024,
        meta_ttl: float = 30 * 24 * 3600.0,
    ) -> None:
        self.backplane = backplane
        self.limits_for = limits_for
        self.meta_ttl_ms = max(2, int(meta_ttl * 1000))
        self._prefix = prefix
        self._topics = KeptTopics(max_bytes)  # the mirror, least recently used first
        self._batch: _Publishes | None = None  # the publishes queued last

    def keys(self, topic: str) -> tuple[str, str, str, str]:
        """The Redis keys of ``topic``: epoch, latest offset, stream; and the fresh epoch
        (on a sharded engine, all four in the slot of the topic's shard key)."""
        base = self.backplane.key_base(topic)
        return (f"{base}:e:{topic}", f"{base}:o:{topic}", f"{base}:h:{topic}", f"{base}:fresh")

    def script(self, script: str, topic: str, *args: bytes | str | int) -> bytes:
        """``EVAL`` of ``script`` on ``topic``'s keys (see :data:`_EPOCH_AND_NOW`)."""
        return encode_command(
            "EVAL", script, 4, *self.keys(topic), new_epoch(), self.meta_ttl_ms // 2, *args
        )

    # --- publishing (async: Redis numbers the message) ---

    def publish_nowait(self, topic: str, packed: bytes, limits: HistoryLimits) -> bool:
        """Queue the message for numbering, keeping and publishing in Redis (its reply
        ignored), behind those queued before, if that needs no wait; False if it would, or
        if Redis is down: then :meth:`publish`. Consecutive messages of a topic queued
        before the connection's writer takes them go as one script call."""
        backplane, batch = self.backplane, self._batch
        if (
            batch is None
            or batch.topic != topic
            or batch.encoded
            or len(batch.messages) >= 2 * BATCH
            or not backplane.queued_last(batch)
        ):
            batch = _Publishes(self, topic, limits)
            if not backplane.queue(batch, key=self.backplane.key_base(topic)):
                return False
            self._batch = batch
        batch.messages += (packed, backplane.envelope_head(packed))
        return True

    async def publish(
        self, topic: str, packed: bytes, limits: HistoryLimits, *, wait: bool
    ) -> Position | None:
        """Number, keep and publish a message in one step in Redis; its position (``None``
        without ``wait``). Raises Unavailable."""
        batch = _Publishes(self, topic, limits)
        batch.messages += (packed, self.backplane.envelope_head(packed))
        reply = await self.backplane.call(batch, wait=wait, key=self.backplane.key_base(topic))
        if not wait:
            return None
        if not (isinstance(reply, list) and len(reply) == 2):
            raise Unavailable(f"unexpected answer from Redis: {reply!r:.80}")
        epoch, offset = reply
        assert isinstance(epoch, bytes) and isinstance(offset, int)
        return Position(epoch.decode(), offset)

    # --- the mirror ---

    def is_warm(self, topic: str) -> bool:
        """True if :meth:`position` and :meth:`since` can answer for ``topic`` without a load."""
        mirror = self._topics.get(topic)
        return mirror is not None and mirror.warm

    def record(self, topic: str, position: Position, data: bytes, now: float) -> None:
        """Keep a message this node received (in offset order per topic)."""
        limits = self.limits_for(topic)
        if limits is None:
            return
        topics = self._topics
        mirror = topics.get(topic)
        if mirror is None or mirror.epoch != position.epoch:
            # never seen, or a new epoch: the run starts here, cold (it may have started
            # before this node followed the topic: only a load makes it warm)
            mirror = topics.add(topic, position.epoch, position.offset - 1)
            mirror.warm = False
        if position.offset <= mirror.latest:
            return  # already loaded from Redis
        if position.offset != mirror.latest + 1:
            while mirror.kept:  # a hole: the run restarts here, not whole any more
                topics.drop_oldest(mirror)
            mirror.warm = False
        mirror.latest = position.offset
        topics.keep(mirror, Stored(position.offset, data, now), limits.size)
        topics.used(topic)
        self._enforce_cap(topic)

    async def load(self, topic: str, now: float) -> None:
        """Make ``topic`` warm: read its epoch, latest offset and kept messages from Redis.
        Raises Unavailable."""
        limits = self.limits_for(topic)
        if limits is None or self.is_warm(topic):
            return
        command = self.script(LOAD_SCRIPT, topic, 0)
        reply = await self.backplane.call(command, key=self.backplane.key_base(topic))
        # no checkpoint from here to the caller's subscribe (Hub.subscribe's proof)
        if not (isinstance(reply, list) and len(reply) == 4):
            raise Unavailable(f"unexpected answer from Redis: {reply!r:.80}")
        raw_epoch, latest, redis_ms, entries = reply
        assert isinstance(raw_epoch, bytes) and isinstance(latest, int)
        assert isinstance(redis_ms, int) and isinstance(entries, list)
        epoch = raw_epoch.decode()
        loaded: list[Stored] = []
        for entry in entries:
            assert isinstance(entry, list) and isinstance(entry[0], bytes)
            fields = entry[1]
            assert isinstance(fields, list)
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            data, ms = values[b"d"], int(values[b"t"])  # type: ignore[arg-type]
            assert isinstance(data, bytes)
            offset = int(entry[0].split(b"-")[1])
            loaded.append(Stored(offset, data, now - (redis_ms - ms) / 1000))
        topics = self._topics
        old = topics.get(topic)
        newer = [m for m in old.kept if m.offset > latest] if old and old.epoch == epoch else []
        mirror = topics.add(topic, epoch, latest)
        for message in loaded:
            topics.keep(mirror, message, limits.size)
        for message in newer:  # received while the load was in flight
            if message.offset == mirror.latest + 1:
                mirror.latest = message.offset
                topics.keep(mirror, message, limits.size)
        self._enforce_cap(topic)

    def position(self, topic: str, now: float) -> Position:
        """The topic's epoch and latest offset (the topic must be warm: see :meth:`load`)."""
        mirror = self._warm(topic, now)
        return Position(mirror.epoch, mirror.latest)

    def since(self, topic: str, position: Position, now: float, limit: int | None = None) -> Replay:
        """The kept messages after ``position``, if its epoch is current (warm topic), at
        most ``limit`` of them."""
        return replay_after(self._warm(topic, now), position, limit)

    def append(self, topic: str, data: bytes, now: float) -> int:
        """Not used in a cluster: Redis numbers messages (see :meth:`publish`)."""
        raise NotImplementedError("in a cluster, history is appended by RedisHistory.publish")

    async def copy(self, topic: str, now: float) -> RedisHistory:
        """A store holding only ``topic``'s history as Redis has it now, loaded apart from
        this mirror (which it leaves alone). Raises Unavailable."""
        copy = RedisHistory(
            self.backplane, self.limits_for, self._prefix, meta_ttl=self.meta_ttl_ms / 1000
        )
        await copy.load(topic, now)
        return copy

    def forget(self, topic: str) -> None:
        """Drop the mirror of ``topic``: it is cold until loaded again."""
        self._topics.forget(topic)

    def clear(self) -> None:
        """Messages may have been missed (an outage): every topic must be loaded again."""
        self._topics.clear()

    # --- internals ---

    def _warm(self, topic: str, now: float) -> KeptTopic:
        mirror = self._topics.get(topic)
        if mirror is None or not mirror.warm:
            raise Unavailable(f"the history of {topic!r} is not loaded from Redis")
        self._topics.expire(mirror, self.limits_for(topic), now)
        return mirror

    def _enforce_cap(self, current: str) -> None:
        """Over ``max_bytes``, forget the least recently used topics (they are loaded from
        Redis again when next needed), never the current one."""
        for _ in self._topics.evict(current):
            pass
