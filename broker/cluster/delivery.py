"""Delivery across the nodes of a cluster, through Redis (docs/cluster.md).

:class:`ClusterDelivery` is the :class:`~broker.core.delivery.Delivery` a node uses when the
config has ``[cluster]``. It shares the node's hub with the others through a
:class:`Backplane` (Redis pub/sub, :class:`~broker.cluster.backplane.RedisBackplane`) and keeps
history in a :class:`SharedHistory` (Redis Streams, :class:`~broker.cluster.history.RedisHistory`):

- a plain topic's message is offered to this node's subscribers at once, then handed to
  Redis for the others (who get it from :meth:`ClusterDelivery.deliver`);
- a history topic's message is numbered in Redis and comes back to every node, this one
  included, in offset order; a ``pub`` with ``id`` is answered once it is back here;
- a subscription first makes sure Redis brings this node what it matches (and loads the
  topic's history), then registers as on one node. A message it already got in its replay
  but still on its way from Redis is not delivered to it twice (:meth:`_not_covered`);
- a node follows in Redis only what its own clients subscribe to, history topics included,
  and mirrors a history topic only while a local subscription to it (concrete) holds it
  (:meth:`ClusterDelivery.subscribe`): so the messages it receives are those its clients
  want, and :attr:`ClusterDelivery.unwanted` counts the others (a Redis glob matching more
  than its pattern; a message still on its way when its last subscriber left).

A new backplane (NATS, say) implements :class:`Backplane`; a new shared history store,
:class:`SharedHistory`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from broker.core.delivery import HistoryPage, Subscribed, Unavailable, read_history, recover
from broker.core.history import HistoryStore
from broker.core.hub import UNPACK, Blocked, Hub, Subscription
from broker.core.presence import Presence
from broker.core.rules import HistoryLimits
from broker.core.stats import metrics_clock
from broker.protocol.codes import ErrorCode
from broker.protocol.frames import Position, pack_data
from broker.protocol.topics import is_wildcard

#: Hands a message published on another node to this node's subscribers:
#: ``deliver(topic, packed_data, position)``; ``position`` is set for numbered messages.
Deliver = Callable[[str, bytes, Position | None], Awaitable[object]]
#: Called when messages from other nodes may have been missed (after an outage).
Missed = Callable[[], None]


class Backplane(Protocol):
    """How this node's hub reaches the other nodes'."""

    @property
    def connected(self) -> bool:
        """Whether the other nodes can be reached now."""

    @property
    def why_down(self) -> str:
        """Why not, when they cannot."""

    def follow(self, pattern: str) -> None:
        """One more local subscription to ``pattern``; must not block."""

    def unfollow(self, pattern: str) -> None:
        """One local subscription to ``pattern`` fewer; must not block."""

    def refuse_to_follow(self, pattern: str) -> tuple[ErrorCode, str] | None:
        """Why this node cannot follow one more subscription to ``pattern``, if it cannot:
        the ``err`` code and message to answer the ``sub`` with."""

    async def wait_followed(self, pattern: str) -> None:
        """Return once messages published anywhere on topics matching ``pattern`` reach this
        node (at once if the backplane is down: they cannot reach it anyway)."""

    def followed(self, pattern: str) -> bool:
        """Whether messages published anywhere on topics matching ``pattern`` reach this node
        now (and will while it is followed, until an outage: see ``missed``)."""

    def publish_nowait(self, topic: str, packed: bytes) -> bool:
        """Queue a message for the other nodes, behind those queued before, if that needs
        no wait; False if it would, or cannot be done now: then :meth:`publish`."""

    async def publish(self, topic: str, packed: bytes, *, wait: bool = True) -> None:
        """Hand a message (``packed``: its msgpack ``data``) to the other nodes; raises
        :class:`Unavailable`. Without ``wait`` it may return once it is queued, in order."""

    async def run(
        self, deliver: Deliver, missed: Missed, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Feed other nodes' messages to ``deliver`` until cancelled; call ``missed`` when some
        may have been lost."""


class SharedHistory(HistoryStore, Protocol):
    """A history store shared by the nodes: it numbers messages itself, asynchronously, and
    answers the synchronous calls for a topic once :meth:`load` made it warm."""

    def publish_nowait(self, topic: str, packed: bytes, limits: HistoryLimits) -> bool:
        """Queue a message for numbering, keeping and sending to every node, behind those
        queued before, if that needs no wait; False if it would, or cannot be done now."""

    async def publish(
        self, topic: str, packed: bytes, limits: HistoryLimits, *, wait: bool
    ) -> Position | None:
        """Number, keep and send a message to every node; its position (``None`` without
        ``wait``). Raises :class:`Unavailable`."""

    def record(self, topic: str, position: Position, data: bytes, now: float) -> None:
        """Keep a message received from the shared store, numbered at ``position``."""

    def is_warm(self, topic: str) -> bool:
        """True if the synchronous calls can answer for ``topic`` now."""

    async def load(self, topic: str, now: float) -> None:
        """Make ``topic`` warm. Raises :class:`Unavailable`."""

    def forget(self, topic: str) -> None:
        """Drop what is kept of ``topic``: it is cold until loaded again."""

    async def copy(self, topic: str, now: float) -> HistoryStore:
        """A store answering for ``topic`` alone, as the shared store has it now, leaving
        this one alone. Raises :class:`Unavailable`."""


class SharedPresence(Presence, Protocol):
    """Presence shared by the nodes (:class:`~broker.cluster.presence.RedisPresence`)."""

    async def run(self) -> None:
        """Keep the shared presence up to date until cancelled."""

    def came_back(self) -> None:
        """The shared store is reachable again after an outage."""


class Later:
    """A :class:`~broker.core.delivery.Pending`: ``function(*args)``, run when completed."""

    __slots__ = ("args", "function")

    def __init__(self, function: Callable[..., Awaitable[Position | None]], *args: Any) -> None:
        self.function = function
        self.args = args

    async def complete(self) -> Position | None:
        """Run it; what it answers (the position Redis gave the message, if it numbered it)."""
        return await self.function(*self.args)


class ClusterDelivery:
    """Delivery through a backplane and a shared history (see the module doc)."""

    def __init__(
        self, hub: Hub, backplane: Backplane, history: SharedHistory, presence: SharedPresence
    ) -> None:
        self._hub = hub
        self.backplane = backplane
        self._history = history
        self._presence = presence
        # Recent subscriptions on history topics: the position their ok reported (messages
        # up to it that were still on their way from Redis are not delivered to them).
        self._after: dict[Subscription, Position] = {}
        # Publishes waiting for their numbered message to come back, per topic, and the
        # latest position delivered here of those topics (only while someone waits).
        self._expecting: Counter[str] = Counter()
        self._delivered: dict[str, Position] = {}
        self._delivery = trio.Event()  # set (and replaced) on each delivery of those topics
        # Concrete history topics this node mirrors -> the local subscriptions (and subscribes
        # under way) holding the mirror; each took its hold once Redis confirmed following.
        self._held: Counter[str] = Counter()
        #: Messages received from Redis that no local subscription matched (and no mirror
        #: kept): what following costs this node beyond what its clients want.
        self.unwanted = 0

    @property
    def hub(self) -> Hub:
        """The hub this node routes with."""
        return self._hub

    @property
    def history(self) -> SharedHistory:
        """This node's mirror of the shared history."""
        return self._history

    @property
    def presence(self) -> SharedPresence:
        """Who is present, on every node."""
        return self._presence

    # --- publishing ---

    def publish(self, topic: str, data: Any, now: float, *, acknowledged: bool) -> Later | None:
        """Offer a plain topic's message here now, then share it; number a history topic's
        in Redis first (it is delivered here when it comes back). A publish nobody waits
        for (not ``acknowledged``) that can be queued for Redis at once is done: so a
        burst of them costs no await each, and goes to Redis in one write."""
        hub = self._hub
        rule, subscriptions = hub.route(topic)
        packed = pack_data(data)
        if rule.history is not None:
            if not acknowledged and self.history.publish_nowait(topic, packed, rule.history):
                return None
            return Later(self._publish_numbered, topic, packed, rule.history, acknowledged)
        blocked = hub.offer(subscriptions, topic, data, rule.on_full, None, packed, now)
        if blocked is None and not acknowledged and self.backplane.publish_nowait(topic, packed):
            return None
        return Later(self._share, topic, packed, acknowledged, blocked)

    async def _share(
        self, topic: str, packed: bytes, acknowledged: bool, blocked: Blocked | None
    ) -> None:
        if blocked is not None:
            await self._hub.wait_for_room(blocked)
        try:
            await self.backplane.publish(topic, packed, wait=acknowledged)
        except Unavailable as exc:
            raise Unavailable(f"{exc}; delivered to this node's subscribers only") from None

    async def _publish_numbered(
        self, topic: str, packed: bytes, limits: HistoryLimits, acknowledged: bool
    ) -> Position | None:
        self._expecting[topic] += 1  # before the publish: its echo may beat its answer
        try:
            try:
                position = await self.history.publish(topic, packed, limits, wait=acknowledged)
            except Unavailable as exc:
                raise Unavailable(
                    f"{exc}; not delivered: the messages of {topic!r} are numbered in Redis"
                ) from None
            if position is not None and self._hub.route(topic)[1]:
                await self._wait_delivered(topic, position)  # local subscribers follow it
            return position
        finally:
            self._expecting[topic] -= 1
            if not self._expecting[topic]:
                del self._expecting[topic]
                self._delivered.pop(topic, None)

    async def _wait_delivered(self, topic: str, position: Position) -> None:
        """Wait until the message at ``position`` was delivered here (so a ``pub`` is
        acknowledged after its local subscribers have it, as on a single node), or no local
        subscription wants it any more."""
        limit = self._hub.slow_timeout + 10
        with trio.move_on_after(limit):
            while True:
                seen = self._delivered.get(topic)
                if seen is not None and (
                    seen.epoch != position.epoch or seen.offset >= position.offset
                ):
                    return
                if not self._hub.route(topic)[1]:
                    return  # they left: it may never come back here
                await self._delivery.wait()
        raise Unavailable(
            f"message {position.offset} of {topic!r} is kept in Redis but did not come back "
            f"to this node within {limit:g} s"
        )

    async def deliver(self, topic: str, packed: bytes, position: Position | None = None) -> None:
        """Offer a message that came from Redis (``packed``: its msgpack ``data``;
        ``position``: its place in the shared history) to this node's subscribers."""
        hub = self._hub
        rule, subscriptions = hub.route(topic)
        now = metrics_clock()  # when it reached this node, for latency metrics
        if not subscriptions and topic not in self._held:
            self.unwanted += 1
        if position is None or rule.history is None:
            blocked = hub.offer(subscriptions, topic, UNPACK, rule.on_full, None, packed, now)
        else:
            if topic in self._held:
                self.history.record(topic, position, packed, trio.current_time())
            if self._after:
                subscriptions = self._not_covered(subscriptions, position)
            blocked = hub.offer(
                subscriptions, topic, UNPACK, rule.on_full, position.offset, packed, now
            )
            if topic in self._expecting:
                self._delivered[topic] = position
                self._delivery.set()
                self._delivery = trio.Event()
        if blocked is not None:
            await hub.wait_for_room(blocked)

    def _not_covered(
        self, subscriptions: tuple[Subscription, ...], position: Position
    ) -> tuple[Subscription, ...]:
        """Those of ``subscriptions`` whose ``ok`` (and replay) did not include ``position``;
        a subscription past its ``ok`` position is not checked again."""
        kept = []
        for subscription in subscriptions:
            after = self._after.get(subscription)
            if after is not None:
                if after.epoch == position.epoch and position.offset <= after.offset:
                    continue
                del self._after[subscription]
            kept.append(subscription)
        return tuple(kept)

    def messages_missed(self) -> None:
        """Messages from other nodes may have been lost: the mirrored history may have holes,
        so it is forgotten (and loaded from Redis again when next used); presence is checked."""
        self.history.clear()
        self._presence.came_back()

    # --- subscribing ---

    async def subscribe(self, subscription: Subscription, since: Position | None) -> Subscribed:
        """Follow what ``subscription`` matches in Redis and, for a concrete history topic,
        hold its mirror and load it if cold; then recover and register it with no checkpoint
        in between.

        The mirror is exact because it is held only once Redis confirmed following the
        topic, it is kept (:meth:`deliver` records) only while held, and it is forgotten when
        the last hold goes: so a warm mirror has missed nothing since it was loaded, and a
        cold one is loaded after following started, which brings every later message. Raises
        :class:`Unavailable` if a history topic cannot be followed now."""
        pattern, backplane = subscription.pattern, self.backplane
        mirrored = self._mirrored(pattern)
        backplane.follow(pattern)  # held while waiting; the subscription holds its own
        held = False
        try:
            await backplane.wait_followed(pattern)
            if mirrored:
                if not backplane.connected:
                    raise Unavailable(backplane.why_down)
                if not backplane.followed(pattern):
                    raise Unavailable(f"Redis did not confirm following {pattern!r} in time")
                self._held[pattern] += 1
                held = True
                if not self.history.is_warm(pattern):
                    await self.history.load(pattern, trio.current_time())
            subscribed, position = recover(self.history, self._hub, subscription, since)
            self._hub.add(subscription)
            backplane.follow(pattern)
            held = False  # the subscription holds it now, until unsubscribe
            if position is not None:
                self._after[subscription] = position
            return subscribed
        finally:
            backplane.unfollow(pattern)
            if held:
                self._release(pattern)

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop routing to ``subscription`` and following it in Redis (and mirroring its
        topic, if it held the last hold)."""
        pattern = subscription.pattern
        self._hub.remove(subscription)
        self.backplane.unfollow(pattern)
        self._after.pop(subscription, None)
        if self._mirrored(pattern):
            self._release(pattern)
        if self._expecting:  # a publish waiting for its echo may now wait for nobody
            self._delivery.set()
            self._delivery = trio.Event()

    def _mirrored(self, pattern: str) -> bool:
        return not is_wildcard(pattern) and self._hub.policies.history_for(pattern) is not None

    def _release(self, topic: str) -> None:
        self._held[topic] -= 1
        if self._held[topic] <= 0:
            del self._held[topic]
            self.history.forget(topic)  # no longer followed for it: it would go stale

    async def read_history(self, topic: str, since: Position | None, limit: int) -> HistoryPage:
        """Read this node's mirror of the topic's history if it is warm, else a copy read
        from Redis now (which warms nothing: only a subscription keeps a mirror)."""
        history = self.history
        if not history.is_warm(topic):
            copy = await history.copy(topic, trio.current_time())
            return read_history(copy, topic, since, limit)
        return read_history(history, topic, since, limit)

    def refuse_subscribe(self, pattern: str) -> tuple[ErrorCode, str] | None:
        """What the backplane says about following one more ``pattern``."""
        return self.backplane.refuse_to_follow(pattern)

    # --- running ---

    def status(self) -> tuple[bool, str]:
        """Whether Redis is reachable, and why not."""
        backplane = self.backplane
        return (True, "connected") if backplane.connected else (False, backplane.why_down)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the backplane (and presence) until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hub.write_announcements)
            nursery.start_soon(self._presence.run)
            await nursery.start(self.backplane.run, self.deliver, self.messages_missed)
            task_status.started()
