"""A client for the pub/sub broker, under asyncio or Trio: publish, subscribe, reconnect,
backpressure.

::

    async with connect("ws://127.0.0.1:8765") as client:
        await client.publish("orders.created", {"id": 7})
        async with client.subscribe("orders.*") as sub:
            async for msg in sub:
                print(msg.topic, msg.data)

The same code runs in ``trio.run`` and in ``asyncio.run`` (or any framework on either, such as
FastAPI): the client is written on anyio, and its WebSocket is trio-websocket under Trio and
websockets under asyncio (:mod:`broker_client.transport`), chosen by the running loop.

On a concrete topic that keeps history, a subscription refills: what the broker dropped for
it (it fell behind) is read back and yielded in order; offsets that will never come are
counted in ``sub.gaps`` and told to ``on_gap``, and with ``subscribe(topic, gaps=True)`` also
yielded as a :class:`Gap` (see :mod:`broker_client.refill`).

On topics with presence, ``await client.presence(topic)`` (or ``client.members(topic)``)
says who is subscribed, and ``client.subscribe(topic, join_leave=True)`` also yields
:class:`Join` and :class:`Leave` events (see :mod:`broker_client.presence`).
"""

from broker_client.client import Client, connect
from broker_client.errors import (
    BadRequest,
    BrokerError,
    CannotConnect,
    ClientError,
    Closed,
    ConnectionLost,
    Forbidden,
    Internal,
    InvalidTopic,
    NotEnabled,
    Overloaded,
    RateLimited,
    ReplyTimeout,
    TooLarge,
    TooManySubscriptions,
    Unauthorized,
    Unavailable,
    UnknownOp,
)
from broker_client.presence import Join, Leave, Member, Presence, PresenceGap
from broker_client.reconnect import Backoff
from broker_client.recovery import Position
from broker_client.subscription import Event, Gap, Message, Subscription

__all__ = [
    "Backoff",
    "BadRequest",
    "BrokerError",
    "CannotConnect",
    "Client",
    "ClientError",
    "Closed",
    "ConnectionLost",
    "Event",
    "Forbidden",
    "Gap",
    "Internal",
    "InvalidTopic",
    "Join",
    "Leave",
    "Member",
    "Message",
    "NotEnabled",
    "Overloaded",
    "Position",
    "Presence",
    "PresenceGap",
    "RateLimited",
    "ReplyTimeout",
    "Subscription",
    "TooLarge",
    "TooManySubscriptions",
    "Unauthorized",
    "Unavailable",
    "UnknownOp",
    "connect",
]
