"""``broker_client.api`` (sync, and async under Trio and asyncio) and ``broker pub --api``
against a real broker's server API."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import trio

from broker.config import Config
from broker.io.server import Broker
from broker_client import (
    BadRequest,
    BrokerError,
    CannotConnect,
    InvalidTopic,
    NotEnabled,
    Position,
    TooLarge,
    Unauthorized,
)
from broker_client.api import Api, AsyncApi, KeptMessage
from tests.test_api import KEY, api_config
from tests.wire import bearer, connect

BROKER = [sys.executable, "-m", "broker"]


@pytest.fixture
def broker_config() -> Config:
    return api_config()


def api_url(broker: Broker) -> str:
    assert broker.api_url is not None
    return broker.api_url


def use_sync_api(url: str) -> list[object]:
    """Every method of :class:`Api`, as a Flask view would call them (in a worker thread)."""
    with Api(url, KEY) as api:
        first = api.publish("chat.sync", {"n": 1})
        assert isinstance(first, Position) and first.offset == 1
        assert api.publish("news", b"\x00") is None
        results = api.broadcast(["chat.sync", "bad topic", "news"], "all")
        assert results[0] == Position(first.epoch, 2) and results[2] is None
        assert isinstance(results[1], InvalidTopic)
        history = api.history("chat.sync", since=first)
        assert history.messages == (KeptMessage(2, "all"),) and history.recovered is True
        assert history.latest == Position(first.epoch, 2)
        members = [m.user for m in api.members("chat.lobby", page_size=1)]
        count = api.presence("chat.lobby", limit=0).count
        info = api.info()  # before the disconnect: bob's connection ends soon after it
        disconnected = api.disconnect("bob", reason="bye")
        return [members, count, disconnected, info.connections, [n.node for n in info.nodes]]


async def test_the_sync_api_publishes_reads_and_disconnects(broker: Broker) -> None:
    async with (
        connect(broker.url, extra_headers=bearer("alice-token")) as alice,
        connect(broker.url, extra_headers=bearer("bob-token")) as bob,
    ):
        await alice.subscribe("chat.lobby")
        await bob.subscribe("chat.lobby")
        members, count, disconnected, connections, nodes = await trio.to_thread.run_sync(
            use_sync_api, api_url(broker)
        )
        assert sorted(members) == ["alice", "bob"] and count == 2  # type: ignore[call-overload]
        assert (disconnected, connections, nodes) == (1, 2, [broker.node_id])
        assert await bob.expect_close() == 4010


async def use_async_api(url: str, encoding: str) -> list[object]:
    data = b"\x01" if encoding == "msgpack" else "\x01"  # JSON cannot carry bytes
    async with AsyncApi(url, KEY, encoding=encoding) as api:  # type: ignore[arg-type]
        position = await api.publish("chat.async", data)
        assert isinstance(position, Position)
        [result] = await api.broadcast(["chat.async"], 2)
        history = await api.history("chat.async", limit=5)
        members = [member async for member in api.members("chat.async")]
        info = await api.info()
        return [history.messages, result, position.offset, members, info.version != ""]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_the_async_api_under_trio(broker: Broker, encoding: str) -> None:
    messages, result, offset, members, versioned = await use_async_api(api_url(broker), encoding)
    data = b"\x01" if encoding == "msgpack" else "\x01"
    assert messages == (KeptMessage(1, data), KeptMessage(2, 2))
    assert isinstance(result, Position) and result.offset == 2
    assert (offset, members, versioned) == (1, [], True)


async def test_the_async_api_under_asyncio(broker: Broker) -> None:
    url = api_url(broker)
    run = lambda: asyncio.run(use_async_api(url, "msgpack"))  # noqa: E731
    messages, *_ = await trio.to_thread.run_sync(run)
    assert messages == (KeptMessage(1, b"\x01"), KeptMessage(2, 2))


async def test_errors_are_the_clients_exception_classes_with_the_http_status(
    broker: Broker,
) -> None:
    url = api_url(broker)
    cases: list[tuple[type[BrokerError], int, AsyncApi, str]] = [
        (Unauthorized, 401, AsyncApi(url, "not-a-key-0123456789"), "news"),
        (InvalidTopic, 400, AsyncApi(url, KEY), "chat.*"),
        (NotEnabled, 409, AsyncApi(url, KEY), "news"),
        (BadRequest, 404, AsyncApi(f"{url}/elsewhere", KEY), "news"),
    ]
    for kind, status, api, topic in cases:
        async with api:
            with pytest.raises(kind) as raised:
                await api.history(topic)
        assert raised.value.status == status
    async with AsyncApi(url, KEY) as api:
        with pytest.raises(TooLarge) as too_large:
            await api.publish("news", b"x" * broker.config.api.max_payload)
        assert too_large.value.status == 413
    async with AsyncApi("http://127.0.0.1:1", KEY) as api:
        with pytest.raises(CannotConnect):
            await api.info()


def test_the_key_comes_from_the_environment_or_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BROKER_API_KEY", raising=False)
    with pytest.raises(ValueError, match="BROKER_API_KEY"):
        Api("http://127.0.0.1:1")
    monkeypatch.setenv("BROKER_API_KEY", KEY)
    with Api("http://127.0.0.1:1/api/") as api:
        assert api._calls.headers["Authorization"] == f"Bearer {KEY}"
        assert api._calls.url == "http://127.0.0.1:1"


async def broker_pub(*args: str, key: str | None = KEY, stdin: bytes = b"") -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "BROKER_API_KEY"}
    if key is not None:
        env["BROKER_API_KEY"] = key
    with trio.fail_after(30):
        result = await trio.run_process(
            [*BROKER, "pub", *args], stdin=stdin, env=env, capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
    return result.returncode, result.stderr.decode()


async def test_broker_pub_api_publishes_and_says_why_not_with_its_exit_status(
    broker: Broker,
) -> None:
    url = api_url(broker)
    async with connect(broker.url, extra_headers=bearer("bob-token")) as sub:
        await sub.subscribe("news")
        assert await broker_pub("--api", url, "news", '{"a": 1}', "--json") == (0, "")
        await sub.expect("msg", data={"a": 1})
        assert await broker_pub("--api", url, "news", stdin=b"one\ntwo\n") == (0, "")
        await sub.expect("msg", data="one")
        await sub.expect("msg", data="two")
        assert await broker_pub("--api", url, "--api-key", KEY, "news", "x", key=None) == (0, "")
        await sub.expect("msg", data="x")
    status, said = await broker_pub("--api", url, "news", "x", key=None)
    assert (status, said) == (2, "broker: --api needs a key: --api-key KEY, or $BROKER_API_KEY\n")
    status, said = await broker_pub("--api", url, "news", "x", key="wrong-key-0123456789")
    assert status == 4 and said.startswith("broker: unauthorized: ")
    status, said = await broker_pub("--api", url, "news.*", "x")
    assert status == 1 and said.startswith("broker: invalid_topic: ")
    status, said = await broker_pub("--api", "http://127.0.0.1:1", "news", "x")
    assert status == 3 and said.startswith("broker: cannot reach the server API")
    status, said = await broker_pub("--api", url, "--url", broker.url, "news", "x")
    assert status == 2 and "not both" in said
