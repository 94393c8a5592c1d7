"""The Python client against a broker with TLS or auth: CA files, refusals, fresh tokens, 503.

The client's tests run under asyncio and under Trio, against broker processes (one per
config, shared by the module); the CLI's under Trio.
"""

from __future__ import annotations

import logging
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
import trio
import trustme

from broker.pytest_plugin import BrokerProcess
from broker_client import (
    Backoff,
    CannotConnect,
    Forbidden,
    Overloaded,
    Unauthorized,
    connect,
)
from broker_client.api import AsyncApi
from tests.anyio_helpers import METRICS, wait_for_subscriptions, wait_until
from tests.anyio_proxy import start_proxy
from tests.fake_server import Request, start_fake
from tests.test_auth import SECRET, make_jwt

pytestmark = pytest.mark.anyio

TINY = Backoff(base=0.001, max=0.01)
TOKENS = """
[auth]
mode = "tokens"

[[auth.tokens]]
token = "alice-token"
subject = "alice"
publish = ["chat.*"]
subscribe = ["chat.*", "news.>"]

[[auth.tokens]]
token = "nobody-token"
subject = "nobody"
"""
JWT = f"""
[auth]
mode = "jwt"

[auth.jwt]
secret = "{SECRET}"
audience = "broker"
issuer = "tests"
"""

# --- TLS ---


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ca") / "ca.pem"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, ca_file: Path) -> Iterator[BrokerProcess]:
    """A broker serving wss:// with a certificate from a throwaway CA written to ``ca_file``."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(ca_file))
    issued = ca.issue_cert("127.0.0.1")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    for pem in issued.cert_chain_pems:
        pem.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    with BrokerProcess(f'{METRICS}[tls]\ncert = "{cert}"\nkey = "{key}"\n') as process:
        yield process


@pytest.mark.parametrize("how", ["ca_file", "ssl_context"])
async def test_a_client_trusting_the_ca_publishes_and_subscribes_over_wss(
    tls_broker: BrokerProcess, ca_file: Path, how: str
) -> None:
    trust = (
        {"ca_file": str(ca_file)}
        if how == "ca_file"
        else {"ssl_context": ssl.create_default_context(cafile=str(ca_file))}
    )
    async with connect(tls_broker.url, **trust) as client, client.subscribe("secure.*") as sub:
        await client.publish("secure.a", b"\x00bytes")
        with anyio.fail_after(5):
            assert (await sub.receive()).data == b"\x00bytes"


async def test_an_untrusted_certificate_fails_at_once_with_a_clear_error(
    tls_broker: BrokerProcess,
) -> None:
    with pytest.raises(CannotConnect, match="certificate verification failed") as raised:
        with anyio.fail_after(5):  # not the connect_timeout: trio-websocket issue #199
            async with connect(tls_broker.url, connect_timeout=60):
                pass  # pragma: no cover
    assert "wss://127.0.0.1" in str(raised.value)


async def test_tls_options_need_a_wss_url_and_only_one_of_them() -> None:
    with pytest.raises(ValueError, match="wss://"):
        async with connect("ws://127.0.0.1:1", ca_file="ca.pem"):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="not both"):
        async with connect("wss://x", ca_file="ca.pem", ssl_context=ssl.create_default_context()):
            pass  # pragma: no cover


async def test_a_ca_file_missing_or_not_pem_is_a_value_error_naming_it(tmp_path: Path) -> None:
    missing, not_pem = tmp_path / "missing.pem", tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match=f"^CA file {missing}: no such file$"):
        async with connect("wss://127.0.0.1:1", ca_file=str(missing)):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match=f"^CA file {not_pem}: not a readable PEM certificate"):
        AsyncApi("https://127.0.0.1:1", "key", ca_file=str(not_pem))  # it was a bare SSLError


@pytest.mark.parametrize("anyio_backend", ["trio"])  # the CLI's own
async def test_the_cli_takes_a_ca_file(tls_broker: BrokerProcess, ca_file: Path) -> None:
    async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable, "-m", "broker", *args, "--url", tls_broker.url]
        with trio.fail_after(30):
            return await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                          check=False)  # fmt: skip

    refused = await run("pub", "t", "x")
    assert refused.returncode == 3 and b"certificate verification failed" in refused.stderr
    async with trio.open_nursery() as nursery:
        results: list[subprocess.CompletedProcess[bytes]] = []

        async def subscribe() -> None:
            results.append(await run("sub", "t", "--count", "1", "--ca-file", str(ca_file)))

        nursery.start_soon(subscribe)
        await wait_for_subscriptions(tls_broker, lambda subscribed: {"t"} in subscribed)
        published = await run("pub", "t", "hello", "--ca-file", str(ca_file))
        assert published.returncode == 0, published.stderr
    assert results[0].stdout == b't "hello"\n'


# --- auth ---


@pytest.fixture(scope="module")
def tokens_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(TOKENS) as process:
        yield process


async def test_a_missing_or_unknown_token_is_unauthorized(tokens_broker: BrokerProcess) -> None:
    for token in (None, "guess"):
        with pytest.raises(Unauthorized, match="HTTP 401"):
            async with connect(tokens_broker.url, token=token):
                pass  # pragma: no cover


async def test_a_token_granting_nothing_is_forbidden_not_unauthorized(
    tokens_broker: BrokerProcess,
) -> None:
    with pytest.raises(Forbidden, match="HTTP 403") as raised:
        async with connect(tokens_broker.url, token="nobody-token"):
            pass  # pragma: no cover
    assert not isinstance(raised.value, Unauthorized)


@pytest.mark.parametrize(
    ("tokens", "ends"),
    [
        (["alice-token", "revoked", "revoked"], True),
        (["alice-token", "stale", "alice-token"], False),
    ],
)
async def test_a_token_refused_on_reconnect_gets_one_fresh_try_then_ends_the_client(
    tokens_broker: BrokerProcess, task_group: anyio.abc.TaskGroup, tokens: list[str], ends: bool
) -> None:
    proxy = await start_proxy(task_group, tokens_broker.port)
    given = iter(tokens)
    asked: list[str] = []

    def token() -> str:
        asked.append(next(given))
        return asked[-1]

    async with (
        connect(proxy.url, token=token, backoff=TINY) as client,
        client.subscribe("chat.x") as sub,
    ):
        proxy.down()  # the connection drops...
        proxy.up()  # ...and the next one gets through
        if ends:
            with pytest.raises(Unauthorized, match="unknown token"), anyio.fail_after(5):
                await sub.receive()
        else:
            with anyio.fail_after(5):
                await client.wait_reconnected()
    assert asked == tokens


@pytest.fixture(scope="module")
def jwt_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(JWT) as process:
        yield process


async def test_an_expired_jwt_is_replaced_by_a_fresh_one_from_the_token_function(
    jwt_broker: BrokerProcess,
) -> None:
    issued: list[str] = []

    async def fresh_token() -> str:
        lifetime = 1 if not issued else 600  # the first one expires while connected
        issued.append(make_jwt(exp=time.time() + lifetime))
        return issued[-1]

    async with (
        connect(jwt_broker.url, token=fresh_token, backoff=TINY) as client,
        client.subscribe("chat.x") as sub,
    ):
        await wait_until(lambda: client.reconnects == 1)  # after the 4003
        await client.publish("chat.x", "still here")
        with anyio.fail_after(5):
            assert (await sub.receive()).data == "still here"
    assert len(issued) == 2


async def test_an_expired_jwt_given_as_a_string_ends_the_client_with_forbidden(
    jwt_broker: BrokerProcess,
) -> None:
    token = make_jwt(exp=time.time() + 1)
    async with connect(jwt_broker.url, token=token, backoff=TINY) as client:
        async with client.subscribe("chat.x") as sub:
            with pytest.raises(Forbidden, match="token expired") as ended, anyio.fail_after(5):
                await sub.receive()
        assert (ended.value.close_code, ended.value.close_reason) == (4003, "token expired")
        assert (client.reconnects, client.connected) == (0, False)


# --- overload ---


@pytest.fixture(scope="module")
def full_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess("[limits]\nmax_connections = 1\n") as process:
        yield process


async def test_a_full_broker_refuses_with_503_its_reason_and_a_retry_after(
    full_broker: BrokerProcess,
) -> None:
    async with connect(full_broker.url):
        with pytest.raises(Overloaded, match="HTTP 503: too many connections") as refused:
            async with connect(full_broker.url, backoff=TINY, connect_timeout=0.2):
                pass  # pragma: no cover
    assert (refused.value.status, refused.value.retry_after) == (503, 5.0)
    assert refused.value.reason == "too many connections (max_connections 1)"


async def test_a_503_is_retried_after_its_retry_after_until_the_broker_has_room(
    task_group: anyio.abc.TaskGroup, caplog: pytest.LogCaptureFixture
) -> None:
    full = True

    async def full_until_told(request: Request) -> None:
        if full:
            await request.reject(503, body=b"full", headers=[(b"Retry-After", b"0.3")])
            return
        peer = await request.accept(subprotocol="pubsub.v1.msgpack")
        while True:  # until the client closes
            await peer.get_message()

    url = await start_fake(task_group, full_until_told)
    connected = anyio.Event()
    caplog.set_level(logging.INFO, logger="broker_client")

    async def second() -> None:
        async with connect(url, backoff=Backoff(base=0.01, max=0.05)):
            connected.set()

    task_group.start_soon(second)
    await wait_until(lambda: any("HTTP 503" in r.getMessage() for r in caplog.records))
    full = False
    with anyio.fail_after(5):
        await connected.wait()
    waits = re.findall(r"reconnecting to \S+ in ([0-9.]+) s", caplog.text)
    assert waits and min(map(float, waits)) >= 0.25  # the Retry-After, not the 0.01 s backoff
