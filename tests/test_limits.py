"""Limits that protect the broker from hostile or buggy clients, end to end.

Already covered elsewhere: the handshake timeout and slowloris clients (test_faults.py),
max_subscriptions (test_bad_input.py, ``too_many_subs``), and the bytes and segments of a
connection's subscriptions (test_hardening.py).
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import AsyncExitStack
from typing import Any, cast

import jwt
import pytest
import trio

from broker.config import (
    AuthConfig,
    Config,
    ConfigError,
    JwtConfig,
    TokenGrant,
    config_from_dict,
)
from broker.core.rules import IdentityLimits
from broker.io.server import Broker, Refused
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


# --- defaults that let ordinary users in (issue 16) -------------------------------------


async def test_by_default_an_office_behind_one_nat_all_gets_in(broker: Broker) -> None:
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(broker.url)) for _ in range(150)]
        await clients[-1].subscribe("office")
        await clients[0].publish("office", "hello")
        await clients[-1].expect("msg", topic="office", data="hello")


async def test_by_default_a_service_may_publish_a_burst_of_3000_messages_of_8_kib(
    broker: Broker,
) -> None:
    async with connect(broker.url) as service, connect(broker.url) as reader:
        await reader.subscribe("ticks")
        payload = b"x" * 8192
        for start in range(0, 3000, 100):
            frames = [{"op": "pub", "topic": "ticks", "data": payload} for _ in range(99)]
            await service.send(*frames, {"op": "pub", "id": start, "topic": "ticks", "data": b""})
            assert (await service.reply(start))["op"] == "ok"
            for _ in range(100):
                await reader.expect("msg", topic="ticks")


# --- limits per token ---------------------------------------------------------------------

BROWSER = TokenGrant(
    "browser-token",
    "browser",
    publish=(">",),
    subscribe=(">",),
    limits=IdentityLimits(publish_rate=0.001, publish_burst=2, max_connections=2),
)
SERVICE = TokenGrant("service-token", "service", publish=(">",), subscribe=(">",))


async def start_with_tokens(nursery: trio.Nursery, **limits: Any) -> Broker:
    config = make_config(**limits).replace(auth=AuthConfig("tokens", (BROWSER, SERVICE)))
    return await start_broker(nursery, config)


async def test_a_token_carries_its_own_publish_rate(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await start_with_tokens(nursery)
    async with (
        connect(broker.url + "?token=browser-token") as browser,
        connect(broker.url + "?token=service-token") as service,
    ):
        with caplog.at_level(logging.INFO, logger="broker.connection"):
            await browser.send(
                *({"op": "pub", "id": n, "topic": "t", "data": n} for n in range(50))
            )
            codes = [(await browser.reply(n)).get("code", "ok") for n in range(50)]
        assert codes == ["ok", "ok"] + ["rate_limited"] * 48
        await service.send(*({"op": "pub", "id": n, "topic": "t", "data": n} for n in range(50)))
        assert {(await service.reply(n))["op"] for n in range(50)} == {"ok"}
    lines = [r.getMessage() for r in caplog.records if "publish rate" in r.getMessage()]
    assert len(lines) == 1  # once per burst, not per frame
    assert "subject=browser" in lines[0] and "0.001 messages per second" in lines[0]


async def test_a_token_caps_the_connections_its_subject_holds(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await start_with_tokens(nursery)
    url = broker.url + "?token=browser-token"
    async with connect(url), connect(url):
        with caplog.at_level(logging.INFO, logger="broker.server"):
            for _ in range(5):
                refused = await rejection(url)
                assert refused.status_code == 503
                assert b"'browser'" in (refused.body or b"")
        async with connect(broker.url + "?token=service-token"):  # others are unaffected
            pass
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1 and "its token allows 2" in rejected[0]
    assert broker.stats.connections_rejected["identity_max_connections"] == 5
    await wait_until(lambda: not broker.admitted_per_subject)
    async with connect(url), connect(url):  # the slots came back
        pass


async def test_a_jwt_limits_claim_sets_that_clients_limits(nursery: trio.Nursery) -> None:
    auth = AuthConfig(mode="jwt", jwt=JwtConfig(secret="s" * 32))
    broker = await start_broker(nursery, make_config().replace(auth=auth))

    def token(**claims: Any) -> str:
        payload = {"sub": "tab", "exp": time.time() + 60, "publish": [">"], **claims}
        return jwt.encode(payload, "s" * 32, "HS256")

    limited = broker.url + "?token=" + token(limits={"publish_rate": 0.001, "publish_burst": 1})
    async with connect(limited) as client:
        await client.publish("t", 1, id=1)
        await client.send({"op": "pub", "id": 2, "topic": "t", "data": 2})
        await client.expect("err", id=2, code="rate_limited")
    one = broker.url + "?token=" + token(limits={"max_connections": 1})
    async with connect(one):
        assert (await rejection(one)).status_code == 503
    for bad in ({"publish_rate": -1}, {"rate": 5}, [1]):
        refused = await rejection(broker.url + "?token=" + token(limits=bad))
        assert refused.status_code == 401


def test_token_limits_are_read_from_the_config_and_checked() -> None:
    def config(**token: Any) -> Config:
        table = {"token": "t", "subject": "s", **token}
        return config_from_dict({"auth": {"mode": "tokens", "tokens": [table]}})

    [grant] = config(publish_rate=5, max_connections=3).auth.tokens
    assert grant.limits == IdentityLimits(publish_rate=5.0, max_connections=3)
    with pytest.raises(ConfigError, match=re.escape("auth.tokens[0].publish_rate")):
        config(publish_rate=-1)
    with pytest.raises(ConfigError, match="publish_rate"):  # the message lists what is known
        config(rate=1)


async def test_refused_handshakes_are_logged_once_per_burst_and_all_counted(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await start_broker(nursery, make_config(max_connections_per_ip=1))
    async with connect(broker.url):
        with caplog.at_level(logging.INFO, logger="broker.server"):
            for _ in range(20):
                assert (await rejection(broker.url)).status_code == 503
    assert sum("rejected" in r.getMessage() for r in caplog.records) == 1
    assert broker.stats.connections_rejected["max_connections_per_ip"] == 20


async def test_every_503_says_when_to_come_back(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, make_config(max_connections_per_ip=1))
    async with connect(broker.url):
        refused = await rejection(broker.url)
        assert refused.status_code == 503
        assert (b"retry-after", b"5") in [(k.lower(), v) for k, v in refused.headers]
    broker.shutdown()  # a handshake in flight now gets 503: the node is gone once drained
    with pytest.raises(Refused) as draining:
        broker.admit(cast(Any, None), "127.0.0.1")
    assert (draining.value.status, draining.value.retry_after) == (503, 10)  # 2 x drain_timeout
