"""Presence across the nodes of a cluster, kept in Redis (docs/presence.md).

Every node keeps its own members in a :class:`~broker.core.presence.Roster` and announces
their join and leave to its own subscribers at once, as one node does. It also hands each
change to Redis, in order, in batches (one script per batch, :data:`APPLY`), which keeps:

- per topic, a sorted set of the members' ``client`` ids (``{prefix}:pz:{topic}``, for pages
  in ``client`` order) and a hash of their encoded members (``{prefix}:ph:{topic}``);
- per node, the ``topic\\0client`` pairs it owns (``{prefix}:po:{node}``), and a key that says
  it is alive (``{prefix}:pn:{node}``), which expires ``presence_ttl / 2`` after the node
  last refreshed it (every ``presence_ttl / 6``);

and publishes the changes that changed something on one channel (``{prefix}:presence``), so
that every other node announces them to its subscribers. Every node also looks, every
``presence_ttl / 6``, for nodes whose alive key has expired (:data:`REAP`: killed, cut off)
and removes their members, publishing their leave: a vanished node's members leave everywhere
within ``presence_ttl``, with no help from it. A node that finds its own alive key gone
(after an outage, or Redis lost its data) announces all its members again.

While Redis is down, changes wait (a join and a leave of the same member that both wait
cancel out: nobody else saw the join), and ``presence`` answers ``err unavailable``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import msgpack
import trio

from broker.cluster.backplane import RedisBackplane
from broker.cluster.resp import Reply, encode_command
from broker.core.delivery import Unavailable
from broker.core.hub import Hub
from broker.core.presence import LocalPresence, Member, Page
from broker.core.stats import metrics_clock

log = logging.getLogger("broker.cluster")

#: ARGV: prefix, node, alive ms, then (op, topic, client, packed member) per change, op being
#: join, leave or rejoin (a join announced again). Keeps the changes and publishes those that
#: changed something; returns how many did.
APPLY = """
local prefix, node, alive = ARGV[1], ARGV[2], tonumber(ARGV[3])
local owned = prefix .. ':po:' .. node
redis.call('SET', prefix .. ':pn:' .. node, 1, 'PX', alive)
redis.call('SADD', prefix .. ':pnodes', node)
local events = {}
for i = 4, #ARGV, 4 do
  local op, topic, client, member = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local order, members = prefix .. ':pz:' .. topic, prefix .. ':ph:' .. topic
  if op ~= 'leave' then  -- join, or rejoin (announced again)
    redis.call('SADD', owned, topic .. '\\0' .. client)
    redis.call('HSET', members, client, member)
    if redis.call('ZADD', order, 0, client) == 1 then
      events[#events + 1] = {'join', topic, member}
    end
  else
    redis.call('SREM', owned, topic .. '\\0' .. client)
    redis.call('HDEL', members, client)
    if redis.call('ZREM', order, client) == 1 then
      events[#events + 1] = {op, topic, member}
    end
  end
end
if #events > 0 then
  redis.call('PUBLISH', prefix .. ':presence', cmsgpack.pack({node, events}))
end
return #events
"""

#: ARGV: prefix. Removes the members of every node whose alive key expired, publishing their
#: leave (as from that node); returns how many left.
REAP = """
local prefix = ARGV[1]
local left = 0
for _, node in ipairs(redis.call('SMEMBERS', prefix .. ':pnodes')) do
  if redis.call('EXISTS', prefix .. ':pn:' .. node) == 0 then
    local owned = prefix .. ':po:' .. node
    local events = {}
    for _, entry in ipairs(redis.call('SMEMBERS', owned)) do
      local cut = string.find(entry, '\\0', 1, true)
      local topic, client = string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
      local members = prefix .. ':ph:' .. topic
      local member = redis.call('HGET', members, client)
      redis.call('HDEL', members, client)
      if redis.call('ZREM', prefix .. ':pz:' .. topic, client) == 1 and member then
        events[#events + 1] = {'leave', topic, member}
      end
    end
    redis.call('DEL', owned)
    redis.call('SREM', prefix .. ':pnodes', node)
    if #events > 0 then
      redis.call('PUBLISH', prefix .. ':presence', cmsgpack.pack({node, events}))
    end
    left = left + #events
  end
end
return left
"""

#: ARGV: prefix, node, alive ms. Refreshes the node's alive key; 0 if it had expired.
REFRESH = """
local key = ARGV[1] .. ':pn:' .. ARGV[2]
local existed = redis.call('EXISTS', key)
redis.call('SET', key, 1, 'PX', tonumber(ARGV[3]))
return existed
"""

#: ARGV: prefix, topic, limit, cursor ('' for the first page). Returns count, the page's
#: encoded members, and the next cursor (or false).
PAGE = """
local order = ARGV[1] .. ':pz:' .. ARGV[2]
local limit = tonumber(ARGV[3])
local count = redis.call('ZCARD', order)
if limit == 0 then return {count, {}, false} end
local low = ARGV[4] == '' and '-' or '(' .. ARGV[4]
local clients = redis.call('ZRANGEBYLEX', order, low, '+', 'LIMIT', 0, limit + 1)
local more = #clients > limit
if more then table.remove(clients) end
if #clients == 0 then return {count, {}, false} end
local members = redis.call('HMGET', ARGV[1] .. ':ph:' .. ARGV[2], unpack(clients))
return {count, members, more and clients[#clients] or false}
"""

#: Changes sent to Redis in one script at most.
BATCH = 1000


class RedisPresence(LocalPresence):
    """Presence shared through Redis: this node's members as one node keeps them, and
    every node's in Redis (see the module doc)."""

    def __init__(
        self, backplane: RedisBackplane, hub: Hub, prefix: str, ttl: float, *, enabled: bool
    ) -> None:
        """``enabled``: some topic rule has presence; if none has, this does nothing in
        Redis (no channel followed, no alive key)."""
        super().__init__(hub)  # this node's own members
        self._backplane = backplane
        self._prefix = prefix
        self.ttl = ttl
        # Changes not yet in Redis, oldest first: (topic, client) -> (op, member).
        self._waiting: dict[tuple[str, str], tuple[str, Member]] = {}
        self._changed = trio.Event()
        self._refresh_now = trio.Event()
        self.channel = f"{prefix}:presence"
        self.enabled = enabled
        if enabled:
            backplane.listen(self.channel, self._received)

    # --- the session's side ---

    def join(self, topic: str, member: Member, now: float) -> None:
        """Add ``member`` here, announce it here, and hand it to Redis."""
        if self._joined(topic, member, now):
            self._wait(topic, "join", member)

    def leave(self, topic: str, member: Member, now: float) -> None:
        """Remove ``member`` here, announce it here, and hand it to Redis."""
        if self._left(topic, member, now):
            key = (topic, member.client)
            if self._waiting.get(key, ("",))[0] == "join":
                del self._waiting[key]  # Redis never had it: nobody else saw the join
            else:
                self._wait(topic, "leave", member)

    def _wait(self, topic: str, op: str, member: Member) -> None:
        self._waiting[(topic, member.client)] = (op, member)
        self._changed.set()

    async def page(self, topic: str, limit: int, cursor: str | None) -> Page:
        """A page of ``topic``'s members on every node, from Redis."""
        reply = await self._eval(PAGE, self._prefix, topic, limit, cursor or "")
        if not (isinstance(reply, list) and len(reply) == 3 and isinstance(reply[0], int)):
            raise Unavailable(f"unexpected answer from Redis: {reply!r:.80}")
        count, packed, next_cursor = reply
        assert isinstance(count, int)
        items = packed if isinstance(packed, list) else []
        members = [_member(item) for item in items if isinstance(item, bytes)]
        cursor = next_cursor.decode() if isinstance(next_cursor, bytes) else None
        return Page(count, members, cursor)

    def came_back(self) -> None:
        """Redis is reachable again after an outage: check at once whether this node's
        members are still there."""
        self._refresh_now.set()

    async def _eval(self, script: str, *args: bytes | str | int) -> Reply:
        """Run one of the scripts above in Redis. Every key they use starts with the prefix,
        which on a sharded engine is a hash tag (``{broker}``): so they are all in one slot,
        which the one key the script declares (the prefix) routes it to; and they publish
        with the backplane's verb (SPUBLISH there) on a channel of that slot."""
        verb = self._backplane.publish_verb
        if verb != "PUBLISH":
            script = script.replace("'PUBLISH'", f"'{verb}'")
        command = encode_command("EVAL", script, 1, self._prefix, *args)
        return await self._backplane.call(command, key=self._prefix)

    # --- other nodes' changes ---

    def _received(self, payload: bytes) -> None:
        """A batch of changes from the presence channel: announce another node's here."""
        try:
            origin, events = msgpack.unpackb(payload, raw=True)
            if origin.decode() == self._backplane.node_id:
                return  # announced here when it happened
            now = metrics_clock()
            for op, topic, member in events:
                self._hub.announce(topic.decode(), op.decode(), _member(member).as_map(), now)
        except Exception:
            log.warning("cluster: a malformed presence message on %s ignored", self.channel)

    # --- running ---

    async def run(self) -> None:
        """Hand changes to Redis, keep this node alive there, and reap vanished nodes, until
        cancelled."""
        if not self.enabled:
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_changes)
            await self._keep_alive()

    async def _send_changes(self) -> None:
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            while self._waiting:
                batch = list(self._waiting.items())[:BATCH]
                for key, _ in batch:
                    del self._waiting[key]
                try:
                    await self._apply([(key[0], op, member) for key, (op, member) in batch])
                except Unavailable:
                    # Put back what no newer change replaced, ahead of the newer ones.
                    newer, self._waiting = self._waiting, dict(batch)
                    self._waiting.update(newer)
                    await self._backplane.wait_connected()

    async def _apply(self, changes: list[tuple[str, str, Member]]) -> None:
        args: list[bytes | str | int] = [self._prefix, self._backplane.node_id, self._alive_ms]
        for topic, op, member in changes:
            args += (op, topic, member.client, msgpack.packb(member.as_map()))
        await self._eval(APPLY, *args)

    @property
    def _alive_ms(self) -> int:
        return max(1, int(self.ttl * 500))  # the alive key lives half of presence_ttl

    async def _keep_alive(self) -> None:
        period = self.ttl / 6
        while True:
            with trio.move_on_after(period * random.uniform(0.8, 1.0)):
                await self._refresh_now.wait()
            self._refresh_now = trio.Event()
            if not self._backplane.connected:
                continue
            try:
                await self._refresh()
                left = await self._eval(REAP, self._prefix)
                if isinstance(left, int) and left:
                    log.info("cluster: %d member(s) of vanished node(s) left", left)
            except Unavailable:
                continue

    async def _refresh(self) -> None:
        refreshed = await self._eval(REFRESH, self._prefix, self._backplane.node_id, self._alive_ms)
        if refreshed == 0 and self.roster.members:
            # Expired: this node may have been reaped (or Redis lost its data). Announce
            # every member again; only those Redis no longer had are published.
            log.warning(
                "cluster: this node's presence had expired in Redis; announcing its %d "
                "member(s) again",
                self.roster.members,
            )
            for topic, member in self.roster.items():  # in order with later changes
                self._waiting.setdefault((topic, member.client), ("rejoin", member))
            self._changed.set()


def _member(packed: bytes) -> Member:
    fields: dict[str, Any] = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return Member(fields["client"], fields["user"], fields["info"])
