"""The Python client against a broker with TLS or auth: CA files, refusals, fresh tokens, 503."""

from __future__ import annotations

import logging
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trustme

from broker.config import TlsConfig
from broker.io.server import Broker
from broker_client import (
    Backoff,
    CannotConnect,
    Forbidden,
    Overloaded,
    Unauthorized,
    connect,
)
from tests.helpers import make_config, start_broker, wait_until
from tests.test_auth import jwt_auth, make_jwt, start_with_auth, tokens_auth

TINY = Backoff(base=0.001, max=0.01)

# --- TLS ---


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    return tmp_path / "ca.pem"


@pytest.fixture
async def tls_broker(nursery: trio.Nursery, tmp_path: Path, ca_file: Path) -> Broker:
    """A broker serving wss:// with a certificate from a throwaway CA written to ``ca_file``."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(ca_file))
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for pem in issued.cert_chain_pems:
        pem.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    return await start_broker(nursery, make_config().replace(tls=TlsConfig(str(cert), str(key))))


@pytest.mark.parametrize("how", ["ca_file", "ssl_context"])
async def test_a_client_trusting_the_ca_publishes_and_subscribes_over_wss(
    tls_broker: Broker, ca_file: Path, how: str
) -> None:
    trust = (
        {"ca_file": str(ca_file)}
        if how == "ca_file"
        else {"ssl_context": ssl.create_default_context(cafile=str(ca_file))}
    )
    async with connect(tls_broker.url, **trust) as client, client.subscribe("secure.*") as sub:
        await client.publish("secure.a", b"\x00bytes")
        with trio.fail_after(5):
            assert (await sub.receive()).data == b"\x00bytes"


async def test_an_untrusted_certificate_fails_at_once_with_a_clear_error(
    tls_broker: Broker,
) -> None:
    with pytest.raises(CannotConnect, match="certificate verification failed") as raised:
        with trio.fail_after(5):  # not the connect_timeout: trio-websocket issue #199
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


async def test_the_cli_takes_a_ca_file(tls_broker: Broker, ca_file: Path) -> None:
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
        await wait_until(lambda: any("t" in c.subscriptions for c in tls_broker.connections))
        published = await run("pub", "t", "hello", "--ca-file", str(ca_file))
        assert published.returncode == 0, published.stderr
    assert results[0].stdout == b't "hello"\n'


# --- auth ---


async def test_a_missing_or_unknown_token_is_unauthorized(nursery: trio.Nursery) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    for token in (None, "guess"):
        with pytest.raises(Unauthorized, match="HTTP 401"):
            async with connect(broker.url, token=token):
                pass  # pragma: no cover


async def test_a_token_granting_nothing_is_forbidden_not_unauthorized(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    with pytest.raises(Forbidden, match="HTTP 403") as raised:
        async with connect(broker.url, token="nobody-token"):
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
    nursery: trio.Nursery, tokens: list[str], ends: bool
) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    given = iter(tokens)
    asked: list[str] = []

    def token() -> str:
        asked.append(next(given))
        return asked[-1]

    async with (
        connect(broker.url, token=token, backoff=TINY) as client,
        client.subscribe("chat.x") as sub,
    ):
        (connection,) = broker.connections
        connection.close(1001, "server shutting down")
        if ends:
            with pytest.raises(Unauthorized, match="unknown token"), trio.fail_after(5):
                await sub.receive()
        else:
            with trio.fail_after(5):
                await client.wait_reconnected()
    assert asked == tokens


async def test_an_expired_jwt_is_replaced_by_a_fresh_one_from_the_token_function(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, jwt_auth())
    issued: list[str] = []

    async def fresh_token() -> str:
        lifetime = 1 if not issued else 600  # the first one expires while connected
        issued.append(make_jwt(exp=time.time() + lifetime))
        return issued[-1]

    async with (
        connect(broker.url, token=fresh_token, backoff=TINY) as client,
        client.subscribe("chat.x") as sub,
    ):
        await wait_until(lambda: client.reconnects == 1)  # after the 4003
        await client.publish("chat.x", "still here")
        with trio.fail_after(5):
            assert (await sub.receive()).data == "still here"
    assert len(issued) == 2


async def test_an_expired_jwt_given_as_a_string_ends_the_client_with_forbidden(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, jwt_auth())
    token = make_jwt(exp=time.time() + 1)
    async with connect(broker.url, token=token, backoff=TINY) as client:
        async with client.subscribe("chat.x") as sub:
            with pytest.raises(Forbidden, match="token expired"), trio.fail_after(5):
                await sub.receive()
        assert client.reconnects == 0


# --- overload ---


async def test_a_full_broker_is_retried_after_its_retry_after_until_it_has_room(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.io.server.CAP_RETRY_AFTER", 0.3)  # the broker's 5 s, shorter
    broker = await start_broker(nursery, make_config(max_connections=1))
    async with connect(broker.url) as first:
        with pytest.raises(Overloaded, match="HTTP 503: too many connections") as refused:
            async with connect(broker.url, backoff=TINY, connect_timeout=0.2):
                pass  # pragma: no cover
        assert (refused.value.status, refused.value.retry_after) == (503, 0.3)
        assert refused.value.reason == "too many connections (max_connections 1)"
        connected = trio.Event()
        caplog.clear()
        caplog.set_level(logging.INFO, logger="broker_client")

        async def second() -> None:
            async with connect(broker.url, backoff=Backoff(base=0.01, max=0.05)):
                connected.set()

        nursery.start_soon(second)
        await wait_until(lambda: any("HTTP 503" in r.getMessage() for r in caplog.records))
        await first.aclose()
    with trio.fail_after(5):
        await connected.wait()
    waits = re.findall(r"reconnecting to \S+ in ([0-9.]+) s", caplog.text)
    assert waits and min(map(float, waits)) >= 0.25  # the Retry-After, not the 0.01 s backoff
