"""A Trio client for the pub/sub broker: publish, subscribe, reconnect, backpressure.

::

    async with connect("ws://127.0.0.1:8765") as client:
        await client.publish("orders.created", {"id": 7})
        async with client.subscribe("orders.*") as sub:
            async for msg in sub:
                print(msg.topic, msg.data)
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
    Overloaded,
    RateLimited,
    ReplyTimeout,
    TooLarge,
    TooManySubscriptions,
    Unauthorized,
    Unavailable,
    UnknownOp,
)
from broker_client.reconnect import Backoff
from broker_client.recovery import Position
from broker_client.subscription import Message, Subscription

__all__ = [
    "Backoff",
    "BadRequest",
    "BrokerError",
    "CannotConnect",
    "Client",
    "ClientError",
    "Closed",
    "ConnectionLost",
    "Forbidden",
    "Internal",
    "InvalidTopic",
    "Message",
    "Overloaded",
    "Position",
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
