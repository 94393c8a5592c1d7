"""The Python client against a real broker over loopback: round trips, errors, encodings."""

from __future__ import annotations

import trio
from broker_client import Client


async def test_publish_then_subscribe_round_trip(broker_client: Client) -> None:
    async with broker_client.subscribe("orders.*") as sub:
        await broker_client.publish("orders.created", {"id": 7})
        with trio.fail_after(5):
            msg = await sub.receive()
    assert (msg.topic, msg.data, msg.pattern) == ("orders.created", {"id": 7}, "orders.*")
