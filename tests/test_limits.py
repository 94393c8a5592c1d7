"""Limits that protect the broker from hostile or buggy clients, end to end.

Already covered elsewhere: the handshake timeout against slowloris clients
(test_bad_input.py::test_tcp_client_that_never_handshakes_is_dropped) and
max_subscriptions, which is also the per-connection topic limit (test_bad_input.py,
``too_many_subs``).
"""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

from broker.config import AuthConfig, ConfigError, TokenGrant, config_from_dict
from tests.helpers import make_config, start_broker, wait_until
from tests.wire import connect, rejection


async def test_connections_over_max_connections_are_refused_with_503(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, make_config(max_connections=2))
    async with connect(broker.url) as first:
        async with connect(broker.url):
            assert (await rejection(broker.url)).status_code == 503
        await wait_until(lambda: len(broker.connections) == 1)
        async with connect(broker.url) as again:  # a slot is free again
            await again.subscribe("x")
        await first.subscribe("y")


async def test_a_connection_flood_from_one_ip_is_refused_and_others_keep_working(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, make_config(max_connections_per_ip=3))
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(broker.url)) for _ in range(3)]
        statuses: list[int] = []

        async def attempt() -> None:
            statuses.append((await rejection(broker.url)).status_code)

        async with trio.open_nursery() as flood:
            for _ in range(20):
                flood.start_soon(attempt)
        assert statuses == [503] * 20
        assert len(broker.connections) == 3
        await clients[0].subscribe("still.alive")
        await clients[1].publish("still.alive", "yes")
        await clients[0].expect("msg", topic="still.alive", data="yes")
    await wait_until(lambda: not broker.admitted_per_ip)


async def test_publishes_over_the_message_rate_get_rate_limited_and_the_connection_stays_open(
    nursery: trio.Nursery,
) -> None:
    # A rate this low refills nothing during the test: the burst is all there is.
    broker = await start_broker(nursery, make_config(publish_rate=0.001, publish_burst=3))
    async with connect(broker.url) as client:
        await client.subscribe("t", id=100)
        await client.send(*({"op": "pub", "id": n, "topic": "t", "data": n} for n in range(5)))
        replies = [(await client.reply(n)) for n in range(5)]
        assert [r["op"] for r in replies] == ["ok", "ok", "ok", "err", "err"]
        assert {r.get("code") for r in replies[3:]} == {"rate_limited"}
        assert [(await client.expect("msg"))["data"] for _ in range(3)] == [0, 1, 2]
        await client.subscribe("u", id=101)  # subscribing is not rate limited


async def test_forbidden_publishes_count_against_the_rate(nursery: trio.Nursery) -> None:
    grant = TokenGrant("t", "limited", publish=("mine",))
    config = make_config(publish_rate=0.001, publish_burst=2)
    broker = await start_broker(nursery, config.replace(auth=AuthConfig("tokens", (grant,))))
    async with connect(broker.url + "?token=t") as client:
        for id, (topic, code) in enumerate(
            [("theirs", "forbidden"), ("theirs", "forbidden"), ("mine", "rate_limited")]
        ):
            await client.send({"op": "pub", "id": id, "topic": topic, "data": 0})
            await client.expect("err", id=id, code=code)


async def test_publishes_over_the_byte_rate_get_rate_limited(nursery: trio.Nursery) -> None:
    config = make_config(publish_bytes_rate=1, publish_bytes_burst=150)  # a 60-byte pub is ~90
    broker = await start_broker(nursery, config)
    async with connect(broker.url) as client:
        await client.publish("t", "x" * 60, id=1)
        await client.send({"op": "pub", "id": 2, "topic": "t", "data": "x" * 60})
        await client.expect("err", id=2, code="rate_limited")
        await client.publish("t", "", id=3)  # a small one still fits what is left


async def test_a_browser_origin_not_allowed_is_refused_with_403(nursery: trio.Nursery) -> None:
    config = make_config(server={"allowed_origins": ("https://app.example",)})
    broker = await start_broker(nursery, config)

    def origin(value: str) -> list[tuple[bytes, bytes]]:
        return [(b"Origin", value.encode())]

    refused = await rejection(broker.url, extra_headers=origin("https://evil.example"))
    assert refused.status_code == 403
    async with connect(broker.url, extra_headers=origin("https://APP.example")) as client:
        await client.subscribe("x")
    async with connect(broker.url) as client:  # no Origin: not a browser
        await client.subscribe("x")


@pytest.mark.parametrize(
    ("section", "table", "key"),
    [
        ("limits", {"max_connections": -1}, "limits.max_connections"),
        ("limits", {"max_connections_per_ip": -1}, "limits.max_connections_per_ip"),
        ("limits", {"publish_rate": "fast"}, "limits.publish_rate"),
        ("limits", {"publish_burst": 1.5}, "limits.publish_burst"),
        ("limits", {"publish_bytes_rate": -5}, "limits.publish_bytes_rate"),
        ("limits", {"max_subscription_segments": 0}, "limits.max_subscription_segments"),
        ("server", {"max_handshakes": 0}, "server.max_handshakes"),
        ("server", {"allowed_origins": "https://a"}, "server.allowed_origins"),
        ("server", {"allowed_origins": [1]}, "server.allowed_origins"),
    ],
)
def test_invalid_limits_name_the_key(section: str, table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict({section: table})


def test_limits_are_loaded_from_toml_tables() -> None:
    config = config_from_dict(
        {
            "limits": {"max_connections": 5, "publish_rate": 2},
            "server": {"allowed_origins": ["https://a"]},
        }
    )
    assert config.limits.max_connections == 5
    assert config.limits.publish_rate == 2.0
    assert config.server.allowed_origins == ("https://a",)
