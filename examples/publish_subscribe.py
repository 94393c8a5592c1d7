"""Publish and subscribe with the Python client.

Start a broker (``make run``), then run ``python examples/publish_subscribe.py [URL]``.
It subscribes to ``orders.*``, publishes three orders, prints them as they arrive, and exits.
"""

from __future__ import annotations

import sys

import trio

from broker_client import Client, connect


def announce(client: Client) -> None:
    print(f"reconnected to {client.url}; subscriptions restored")


async def main(url: str) -> None:
    async with connect(url, on_reconnect=announce) as client:
        async with client.subscribe("orders.*") as orders:
            for order_id in range(3):
                await client.publish("orders.created", {"id": order_id})  # acked
            client.publish_nowait("metrics.orders", 3)  # fire-and-forget
            received = 0
            async for msg in orders:
                print(f"{msg.topic} (matched {msg.pattern}): {msg.data}")
                received += 1
                if received == 3:
                    break
        print(f"done; the broker dropped {orders.dropped} message(s) for us")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8765")
