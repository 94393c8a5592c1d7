"""The server API end to end: real HTTP requests to a real broker's [api] listener, real
WebSocket clients on the other side (docs/api.md)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
import trustme

from broker.config import (
    ApiConfig,
    AuthConfig,
    Config,
    ConfigError,
    TlsConfig,
    TokenGrant,
    config_from_dict,
)
from broker.core.outbound import Policy
from broker.core.rules import HistoryLimits, TopicRule
from broker.io import http as broker_http
from broker.io.server import Broker
from broker_client import ConnectionLost, Forbidden
from broker_client import connect as client_connect
from broker_client.api import AsyncApi
from tests.helpers import make_config, start_broker, wait_until
from tests.rawsocket import open_tcp, stuck_subscriber
from tests.wire import bearer, connect

KEY = "test-api-key-0123456789"
OTHER_KEY = "another-api-key-9876543210"
ALICE = TokenGrant("alice-token", "alice", publish=(">",), subscribe=(">",), info={"n": 1})
BOB = TokenGrant("bob-token", "bob", publish=(">",), subscribe=(">",))
RULES = (
    TopicRule("chat.>", Policy.BLOCK, HistoryLimits(100), presence=True),
    TopicRule("feed", Policy.BLOCK),
)


def api_config(**limits: Any) -> Config:
    """Tokens for alice and bob, history and presence on chat.>, the API on a free port."""
    return make_config(**limits).replace(
        topics=RULES,
        auth=AuthConfig(mode="tokens", tokens=(ALICE, BOB)),
        api=ApiConfig(port=0, keys=(KEY, OTHER_KEY), max_payload=64 * 1024),
    )


@pytest.fixture
def broker_config() -> Config:
    return api_config()


@pytest.fixture
async def http(broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    """A keep-alive HTTP client for ``broker``'s API, with a key."""
    assert broker.api_url is not None
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=broker.api_url, headers=headers) as client:
        yield client


def encode(body: Any, encoding: str) -> tuple[bytes, dict[str, str]]:
    if encoding == "json":
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    return msgpack.packb(body), {"Content-Type": "application/msgpack"}


def decode(response: httpx.Response) -> Any:
    if response.headers["content-type"] == "application/msgpack":
        return msgpack.unpackb(response.content)
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def call(
    http: httpx.AsyncClient, endpoint: str, body: Any, encoding: str = "json"
) -> tuple[int, Any]:
    """POST ``body`` to ``/api/{endpoint}``; the status and the decoded answer."""
    content, headers = encode(body, encoding)
    response = await http.post(f"/api/{endpoint}", content=content, headers=headers)
    return response.status_code, decode(response)


def error(code: str, response: tuple[int, Any]) -> int:
    """Assert ``response`` is an error of ``code``; its status."""
    status, answer = response
    assert set(answer) == {"error"} and answer["error"]["code"] == code, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    return status


# --- publish ---


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_a_publish_reaches_websocket_subscribers_with_its_history_offset(
    broker: Broker, http: httpx.AsyncClient, encoding: str
) -> None:
    async with (
        connect(broker.url, "json", extra_headers=bearer("alice-token")) as json_sub,
        connect(broker.url, extra_headers=bearer("bob-token")) as msgpack_sub,
    ):
        await json_sub.send({"op": "sub", "id": 1, "topic": "chat.room"})
        ok = await json_sub.reply(1)
        await msgpack_sub.subscribe("chat.*")
        for n in (1, 2):
            status, answer = await call(
                http, "publish", {"topic": "chat.room", "data": n}, encoding
            )
            assert (status, answer) == (200, {"epoch": ok["epoch"], "offset": n})
        for n in (1, 2):
            await json_sub.expect("msg", topic="chat.room", data=n, offset=n, sub="chat.room")
            await msgpack_sub.expect("msg", topic="chat.room", data=n, offset=n, sub="chat.*")


async def test_a_publish_on_a_topic_without_history_answers_an_empty_map(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    async with connect(broker.url, extra_headers=bearer("bob-token")) as sub:
        await sub.subscribe("news.>")
        assert await call(http, "publish", {"topic": "news.eu", "data": {"a": [1]}}) == (200, {})
        await sub.expect("msg", topic="news.eu", data={"a": [1]})


async def test_the_answer_uses_the_requests_encoding_and_data_keeps_its_type(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    async with (
        connect(broker.url, "json", extra_headers=bearer("alice-token")) as json_sub,
        connect(broker.url, extra_headers=bearer("bob-token")) as msgpack_sub,
    ):
        await json_sub.subscribe("bin")
        await msgpack_sub.subscribe("bin")
        content, headers = encode({"topic": "bin", "data": b"\x00\xff"}, "msgpack")
        response = await http.post("/api/publish", content=content, headers=headers)
        assert response.headers["content-type"] == "application/msgpack"
        assert msgpack.unpackb(response.content) == {}
        await msgpack_sub.expect("msg", data=b"\x00\xff")
        await json_sub.expect("msg", data="AP8=")  # as any binary to a JSON subscriber
        status, answer = await call(http, "history", {"topic": "chat.x"}, "msgpack")
        assert status == 200 and answer["messages"] == []


async def test_a_publish_waits_for_a_block_subscriber_like_a_pub_with_id(
    nursery: trio.Nursery,
) -> None:
    config = api_config(queue_messages=4, slow_timeout=0.3).replace(auth=AuthConfig())
    broker = await start_broker(nursery, config)
    assert broker.port is not None and broker.api_url is not None
    stuck = await stuck_subscriber(broker.port, "feed")
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/msgpack"}
    body = msgpack.packb({"topic": "feed", "data": b"x" * 60000})
    started = trio.current_time()
    async with httpx.AsyncClient(base_url=broker.api_url, headers=headers) as http:
        for _ in range(40):  # far more than a 4-message queue and the socket buffers hold
            assert (await http.post("/api/publish", content=body)).status_code == 200
    # Some publish waited for room until slow_timeout closed the stuck subscriber.
    assert trio.current_time() - started >= 0.3
    assert await stuck.wait_close_code() == 4002


# --- broadcast ---


async def test_broadcast_publishes_to_each_topic_in_order_with_a_result_per_topic(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    async with connect(broker.url, extra_headers=bearer("bob-token")) as sub:
        await sub.subscribe(">")
        topics = ["news", "chat.a", "bad topic", 7, "chat.*", "chat.a"]
        status, answer = await call(http, "broadcast", {"topics": topics, "data": "hi"})
        assert status == 200
        epoch = answer["results"][1]["epoch"]
        assert answer["results"][0] == {}
        assert answer["results"][1] == {"epoch": epoch, "offset": 1}
        assert answer["results"][2]["error"]["code"] == "invalid_topic"
        assert answer["results"][3]["error"]["code"] == "bad_request"
        assert answer["results"][4]["error"]["code"] == "invalid_topic"
        assert answer["results"][5] == {"epoch": epoch, "offset": 2}
        for topic in ("news", "chat.a", "chat.a"):
            await sub.expect("msg", topic=topic, data="hi")


async def test_broadcast_refuses_a_bad_request_whole_and_publishes_nothing(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    deep: Any = "x"
    for _ in range(100):
        deep = [deep]
    async with connect(broker.url, extra_headers=bearer("bob-token")) as sub:
        await sub.subscribe(">")
        for body in (
            {"topics": [], "data": 1},
            {"topics": ["a"] * 1001, "data": 1},
            {"topics": "news", "data": 1},
            {"topics": ["news"]},
            {"topics": ["bad topic", "news"], "data": deep},  # too deep for every topic
        ):
            assert error("bad_request", await call(http, "broadcast", body)) == 400
        assert await call(http, "broadcast", {"topics": ["a"] * 1000, "data": 1}) == (
            200,
            {"results": [{}] * 1000},
        )
        await sub.expect("msg", topic="a", data=1)  # the 1000, not any refused one first


# --- presence and history ---


async def test_presence_pages_through_the_members_with_their_user_and_info(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    async with (
        connect(broker.url, extra_headers=bearer("alice-token")) as alice,
        connect(broker.url, extra_headers=bearer("bob-token")) as bob,
    ):
        await alice.subscribe("chat.lobby")
        await bob.send({"op": "sub", "id": 1, "topic": "chat.lobby", "info": "b"})
        await bob.reply(1)
        status, page = await call(http, "presence", {"topic": "chat.lobby", "limit": 1})
        assert status == 200 and page["count"] == 2 and len(page["members"]) == 1
        status, rest = await call(
            http, "presence", {"topic": "chat.lobby", "cursor": page["cursor"]}, "msgpack"
        )
        assert status == 200 and "cursor" not in rest
        members = {m["user"]: m for m in page["members"] + rest["members"]}
        assert members["alice"]["info"] == {"n": 1} and members["bob"]["info"] == "b"
        assert await call(http, "presence", {"topic": "chat.lobby", "limit": 0}) == (
            200,
            {"count": 2, "members": []},
        )


async def test_presence_errors_are_the_protocols(http: httpx.AsyncClient) -> None:
    assert error("not_enabled", await call(http, "presence", {"topic": "news"})) == 409
    assert error("invalid_topic", await call(http, "presence", {"topic": "chat.*"})) == 400
    for body in (
        {},
        {"topic": 3},
        {"topic": "chat.a", "limit": 1001},
        {"topic": "chat.a", "cursor": 5},
    ):
        assert error("bad_request", await call(http, "presence", body)) == 400


async def test_history_reads_kept_messages_after_a_position(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    offsets = [(await call(http, "publish", {"topic": "chat.h", "data": n}))[1] for n in range(5)]
    epoch = offsets[0]["epoch"]
    status, page = await call(http, "history", {"topic": "chat.h", "limit": 2})
    assert status == 200
    assert page == {
        "epoch": epoch,
        "offset": 5,
        "messages": [{"offset": 1, "data": 0}, {"offset": 2, "data": 1}],
    }
    since = {"epoch": epoch, "offset": 3}
    status, page = await call(http, "history", {"topic": "chat.h", "since": since}, "msgpack")
    assert page["messages"] == [{"offset": 4, "data": 3}, {"offset": 5, "data": 4}]
    assert page["recovered"] is True
    since = {"epoch": "another", "offset": 3}
    status, page = await call(http, "history", {"topic": "chat.h", "since": since})
    assert page["recovered"] is False and page["messages"] == []
    assert error("not_enabled", await call(http, "history", {"topic": "news"})) == 409
    assert error("invalid_topic", await call(http, "history", {"topic": "chat.>"})) == 400
    for body in (
        {"topic": "chat.h", "limit": 0},
        {"topic": "chat.h", "since": 5},
        {"topic": "chat.h", "since": {"epoch": epoch, "offset": -1}},
    ):
        assert error("bad_request", await call(http, "history", body)) == 400


# --- disconnect and info ---


async def test_disconnect_closes_the_users_connections_with_4010(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    async with (
        connect(broker.url, extra_headers=bearer("alice-token")) as one,
        connect(broker.url, "json", extra_headers=bearer("alice-token")) as two,
        connect(broker.url, extra_headers=bearer("bob-token")) as bob,
    ):
        await one.subscribe("chat.lobby")
        assert await call(http, "disconnect", {"user": "alice"}) == (200, {"disconnected": 2})
        for client in (one, two):
            assert await client.expect_close() == 4010
            assert client.websocket.closed is not None
            assert client.websocket.closed.reason == "disconnected by the server API"
        await bob.publish("chat.lobby", "still here", id=5)  # bob's connection is untouched
        await wait_until(lambda: len(broker.connections) == 1)
        assert await call(http, "disconnect", {"user": "alice"}) == (200, {"disconnected": 0})
        _, page = await call(http, "presence", {"topic": "chat.lobby"})
        assert page["count"] == 0  # alice left the room when her connection closed


async def test_disconnect_takes_a_code_and_reason_and_checks_them(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    async with connect(broker.url, extra_headers=bearer("bob-token")) as bob:
        body = {"user": "bob", "code": 4444, "reason": "banned for a day"}
        assert await call(http, "disconnect", body, "msgpack") == (200, {"disconnected": 1})
        assert await bob.expect_close() == 4444
        assert bob.websocket.closed is not None
        assert bob.websocket.closed.reason == "banned for a day"
    bad: list[dict[str, Any]] = [
        {},
        {"user": ""},
        {"user": 5},
        {"user": "bob", "code": 1000},
        {"user": "bob", "code": 5000},
        {"user": "bob", "code": "4010"},
        {"user": "bob", "reason": "é" * 62},
        {"user": "bob", "reason": 1},
    ]
    for body in bad:
        assert error("bad_request", await call(http, "disconnect", body)) == 400


async def test_the_python_client_is_told_it_was_disconnected_by_the_server_api(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    async with client_connect(broker.url, token="bob-token") as client:
        await client.publish("chat.x", 1)
        assert await call(http, "disconnect", {"user": "bob"}) == (200, {"disconnected": 1})
        with pytest.raises((Forbidden, ConnectionLost)) as raised:
            with trio.fail_after(5):
                while True:  # ends as the connection does: 4010 is final, not reconnected
                    await client.publish("chat.x", 2)
                    await trio.sleep(0.01)
        assert raised.value.close_code == 4010
        assert "disconnected by the server API" in str(raised.value)


async def test_info_counts_connections_and_subscriptions(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    async with connect(broker.url, extra_headers=bearer("bob-token")) as bob:
        await bob.subscribe("a")
        await bob.subscribe("b.*", id=2)
        response = await http.get("/api/info")
        info = decode(response)
        assert response.status_code == 200
        assert info["connections"] == 1 and info["subscriptions"] == 2
        [node] = info["nodes"]
        assert node["node"] == broker.node_id and node["connections"] == 1
        assert info["version"] == node["version"] != ""
        response = await http.get("/api/info", headers={"Accept": "application/msgpack"})
        assert msgpack.unpackb(response.content)["subscriptions"] == 2


# --- what every request is checked for ---


async def test_a_request_without_a_valid_key_is_401(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert broker.api_url is not None
    async with httpx.AsyncClient(base_url=broker.api_url) as http:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-0123456789"},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": KEY},
            {"Authorization": f"Bearer {KEY}x"},
        ):
            response = await http.get("/api/info", headers=headers)
            assert error("unauthorized", (response.status_code, response.json())) == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
        for key in (KEY, OTHER_KEY):
            response = await http.get("/api/info", headers={"Authorization": f"bearer {key}"})
            assert response.status_code == 200
        assert (await http.get("/api/openapi.json")).status_code == 200  # needs no key
    assert "wrong-key" not in caplog.text and KEY not in caplog.text  # keys are never logged


async def test_unknown_paths_wrong_methods_and_content_types_are_refused(
    http: httpx.AsyncClient,
) -> None:
    for path in ("/", "/api", "/api/publish/", "/metrics", "/api/nope"):
        response = await http.post(path, json={})
        assert error("not_found", (response.status_code, response.json())) == 404
    response = await http.get("/api/publish")
    assert error("bad_request", (response.status_code, response.json())) == 405
    assert response.headers["allow"] == "POST"
    response = await http.post("/api/info", json={})
    assert (response.status_code, response.headers["allow"]) == (405, "GET")
    body = b'{"topic": "a", "data": 1}'
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = await http.post("/api/publish", content=body, headers=headers)
        assert error("bad_request", (response.status_code, response.json())) == 415
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        response = await http.post(
            "/api/publish", content=body, headers={"Content-Type": content_type}
        )
        assert response.status_code == 200


@pytest.mark.parametrize(
    ("content", "encoding"),
    [
        (b"", "json"),
        (b"{", "json"),
        (b"[1, 2]", "json"),
        (b'"a string"', "json"),
        (b'{"topic": "a", "data": NaN}', "json"),
        (b'{"topic": "a", "data": 1e999}', "json"),
        (b'{"topic": "a", "data": 18446744073709551616}', "json"),
        (b'{"topic": "a", "data": "\\ud800"}', "json"),
        (b'{"topic": "a", "data": 1} {}', "json"),
        (b"\xff\xfe", "json"),
        (b"", "msgpack"),
        (b"\xc1", "msgpack"),
        (msgpack.packb([1]), "msgpack"),
        (msgpack.packb({"topic": "a", "data": 1}) + b"\x00", "msgpack"),
        (b"\x81\xa5topic\xa2\xff\xfe", "msgpack"),  # a str that is not UTF-8
    ],
)
async def test_a_body_that_is_not_one_map_is_bad_request(
    http: httpx.AsyncClient, content: bytes, encoding: str
) -> None:
    headers = {"Content-Type": f"application/{encoding}"}
    response = await http.post("/api/publish", content=content, headers=headers)
    assert error("bad_request", (response.status_code, decode(response))) == 400


async def test_a_body_over_max_payload_is_413_and_never_read_whole(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    limit = broker.config.api.max_payload
    body = json.dumps({"topic": "a", "data": "x" * limit}).encode()
    response = await http.post(
        "/api/publish", content=body, headers={"Content-Type": "application/json"}
    )
    assert error("too_large", (response.status_code, response.json())) == 413
    assert response.headers["connection"] == "close"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(limit // 1000 + 10):
            yield b" " * 1000

    response = await http.post(
        "/api/publish", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert error("too_large", (response.status_code, response.json())) == 413
    fits = json.dumps({"topic": "a", "data": "x" * (limit - 100)}).encode()
    response = await http.post(
        "/api/publish", content=fits, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200


async def test_a_huge_content_length_is_refused_before_any_body_is_sent(broker: Broker) -> None:
    assert broker.api_url is not None
    stream = await open_tcp(int(broker.api_url.rsplit(":", 1)[1]))
    await stream.send_all(
        b"POST /api/publish HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: 99999999999\r\n"
        b"expect: 100-continue\r\n\r\n"
    )
    answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def test_requests_reuse_one_keep_alive_connection_and_may_be_pipelined(
    broker: Broker,
) -> None:
    assert broker.api_url is not None
    stream = await open_tcp(int(broker.api_url.rsplit(":", 1)[1]))
    body = b'{"topic":"a","data":1}'
    request = (
        b"POST /api/publish HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: %d\r\n\r\n%s"
    ) % (len(body), body)
    await stream.send_all(
        request * 3 + b"GET /api/info HTTP/1.1\r\nhost: x\r\n"
        b"connection: close\r\nauthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    )
    answers = await read_until_closed(stream)
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 4
    assert answers.count(b"\r\n\r\n{}") == 3


async def test_garbage_and_peers_gone_mid_request_harm_nothing(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    assert broker.api_url is not None
    port = int(broker.api_url.rsplit(":", 1)[1])
    for garbage in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100 + b"\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
        b"GET /api/info\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"GET /api/info HTTP/1.1\r\n" + b"x-big: " + b"y" * 20000 + b"\r\n\r\n",
    ):
        stream = await open_tcp(port)
        await stream.send_all(garbage)
        answer = await read_until_closed(stream)
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), answer[:80]
    for partial in (
        b"POST /api/publish HTTP/1.1\r\nhost: x\r\n",
        b"POST /api/publish HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer "
        + KEY.encode()
        + b'\r\ncontent-length: 100\r\n\r\n{"topic": "a", "da',
    ):
        stream = await open_tcp(port)
        await stream.send_all(partial)
        await stream.aclose()  # gone mid-request
    assert broker.stats.internal_errors == 0
    assert await call(http, "publish", {"topic": "a", "data": 1}) == (200, {})


async def test_during_a_graceful_shutdown_every_endpoint_answers_503(nursery: trio.Nursery) -> None:
    config = api_config().replace(
        auth=AuthConfig(), server=dataclasses.replace(make_config().server, drain_timeout=30)
    )
    broker = await start_broker(nursery, config)
    assert broker.port is not None
    stuck = await stuck_subscriber(broker.port, "x")  # keeps the drain going
    async with httpx.AsyncClient(
        base_url=str(broker.api_url), headers={"Authorization": f"Bearer {KEY}"}
    ) as http:
        broker.shutdown()
        response = await http.post("/api/publish", json={"topic": "a", "data": 1})
        assert error("unavailable", (response.status_code, response.json())) == 503
        assert response.headers["retry-after"] == "10"
    await stuck.stream.aclose()
    await broker.wait_stopped()


async def test_the_server_api_counts_requests_in_metrics(
    broker: Broker, http: httpx.AsyncClient
) -> None:
    from broker.operations.metrics import broker_registry

    await call(http, "publish", {"topic": "a", "data": 1})
    await http.get("/nope")
    registry = broker_registry(broker)
    assert (
        registry.get_sample_value(
            "broker_api_requests_total", {"endpoint": "/api/publish", "status": "200"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "broker_api_requests_total", {"endpoint": "other", "status": "404"}
        )
        == 1
    )


async def test_connections_beyond_the_cap_are_answered_503_and_closed(
    broker: Broker, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_http, "MAX_CONNECTIONS", 2)  # 1024 sockets is too many here
    assert broker.api_url is not None
    port = int(broker.api_url.rsplit(":", 1)[1])
    idle = [await open_tcp(port), await open_tcp(port)]
    answer = await read_until_closed(await open_tcp(port))
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"unavailable"' in answer
    for stream in idle:
        await stream.aclose()
    with trio.fail_after(5):  # served again once the server has seen them go
        while (await http.get("/api/info")).status_code != 200:  # noqa: ASYNC110 - no event
            await trio.sleep(0.01)


# --- config ---


def test_an_api_section_needs_a_port_and_a_good_key() -> None:
    good = {"port": 0, "keys": [KEY]}
    assert config_from_dict({"api": good}).api == ApiConfig(port=0, keys=(KEY,))
    assert not config_from_dict({}).api.enabled
    for table, words in (
        ({"port": 0}, "api.keys: the server API needs at least one key"),
        ({"port": 0, "keys": []}, "needs at least one key"),
        ({"keys": [KEY]}, "api.port: required"),
        ({"port": 0, "keys": ["short"]}, "api.keys[0]: a key is at least 16"),
        ({"port": 0, "keys": [KEY + " x"]}, "without spaces"),
        ({"port": 0, "keys": [KEY, KEY]}, "the same key is given twice"),
        ({"port": 70000, "keys": [KEY]}, "api.port"),
        ({**good, "tls": True}, "api.tls: true needs [tls]"),
        ({**good, "max_payload": 0}, "api.max_payload"),
        ({**good, "bogus": 1}, "api.bogus: unknown key"),
    ):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            config_from_dict({"api": table})


def test_the_api_serves_tls_by_default_when_the_broker_does() -> None:
    tls = {"cert": "/etc/cert.pem", "key": "/etc/key.pem"}
    api = {"port": 0, "keys": [KEY]}
    assert config_from_dict({"tls": tls, "api": api}).api.tls is True
    assert config_from_dict({"tls": tls, "api": {**api, "tls": False}}).api.tls is False
    assert config_from_dict({"api": api}).api.tls is False


async def test_the_api_over_https_with_the_brokers_certificate(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for pem in issued.cert_chain_pems:
        pem.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    config = api_config().replace(
        tls=TlsConfig(str(cert), str(key)),
        api=ApiConfig(port=0, keys=(KEY,), tls=True),
    )
    broker = await start_broker(nursery, config)
    assert broker.api_url is not None and broker.api_url.startswith("https://127.0.0.1:")
    async with AsyncApi(broker.api_url, KEY, ca_file=str(tmp_path / "ca.pem")) as api:
        assert (await api.info()).connections == 0
    plain = broker.api_url.replace("https://", "http://")
    async with httpx.AsyncClient() as http:  # plain HTTP to the TLS port: refused, harmlessly
        with pytest.raises(httpx.TransportError):
            await http.get(f"{plain}/api/info")
    assert broker.stats.internal_errors == 0


@pytest.mark.parametrize(("host", "tls", "warned"), [("0.0.0.0", False, True),
                                                     ("10.1.2.3", True, False),
                                                     ("127.0.0.1", False, False),
                                                     ("::1", False, False)])  # fmt: skip
def test_an_api_beyond_loopback_without_tls_is_warned_about_at_start(
    caplog: pytest.LogCaptureFixture, host: str, tls: bool, warned: bool
) -> None:
    broker = Broker(api_config().replace(api=ApiConfig(host=host, port=0, keys=(KEY,), tls=tls)))
    broker.port, broker.api_url = 8765, f"http://{host}:8766"  # as if listening: nothing binds
    broker._log_startup()
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert any("THE SERVER API" in w and "has no TLS" in w for w in warnings) is warned
    assert KEY not in caplog.text
