"""TLS: with ``[tls]`` the broker serves ``wss://``; certificates come from a throwaway CA."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

import broker_client
from broker.config import ConfigError, TlsConfig, config_from_dict
from broker.io.server import Broker
from broker_client import CannotConnect
from tests.helpers import make_config, start_broker
from tests.rawsocket import open_tcp
from tests.wire import connect


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA, tmp_path: Path) -> TlsConfig:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for pem in server_cert.cert_chain_pems:
        pem.write_to_path(str(cert), append=True)
    server_cert.private_key_pem.write_to_path(str(key))
    return TlsConfig(cert=str(cert), key=str(key))


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_a_client_trusting_the_ca_talks_to_the_broker_over_wss(
    nursery: trio.Nursery, ca: trustme.CA, tls: TlsConfig
) -> None:
    broker = await start_broker(nursery, make_config().replace(tls=tls))
    assert broker.url.startswith("wss://127.0.0.1:")
    async with connect(broker.url, ssl_context=client_context(ca)) as client:
        await client.subscribe("secure.>")
        await client.publish("secure.a", b"\x00bytes")
        await client.expect("msg", topic="secure.a", data=b"\x00bytes")


async def test_a_client_that_does_not_trust_the_ca_fails_the_tls_handshake(
    nursery: trio.Nursery, tls: TlsConfig
) -> None:
    # A raw TLS stream: trio-websocket 0.12's client only reports this failure as a
    # ConnectionTimeout once its connect timeout (60 s) runs out.
    broker = await start_broker(nursery, make_config().replace(tls=tls))
    assert broker.port is not None
    untrusting = client_context(trustme.CA())
    stream = trio.SSLStream(await open_tcp(broker.port), untrusting, server_hostname="127.0.0.1")
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as raised:
        await stream.do_handshake()
    assert causes_include(raised.value, ssl.SSLCertVerificationError)


def causes_include(error: BaseException | None, kind: type[BaseException]) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


async def test_a_plain_text_client_on_the_tls_port_is_dropped_and_others_carry_on(
    nursery: trio.Nursery, ca: trustme.CA, tls: TlsConfig
) -> None:
    config = make_config(server={"handshake_timeout": 0.5}).replace(tls=tls)
    broker = await start_broker(nursery, config)
    assert broker.port is not None
    stream = await open_tcp(broker.port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n")
    with trio.fail_after(10):
        while await stream.receive_some(65536):
            pass  # whatever the TLS layer answers, then EOF
    async with connect(broker.url, ssl_context=client_context(ca)) as client:
        await client.subscribe("x")


def test_tls_needs_both_cert_and_key() -> None:
    with pytest.raises(ConfigError, match=re.escape("tls:")):
        config_from_dict({"tls": {"cert": "cert.pem"}})


def test_unreadable_tls_files_are_a_config_error(tmp_path: Path, tls: TlsConfig) -> None:
    missing = str(tmp_path / "missing.pem")
    for config, said in (
        (TlsConfig(cert=missing, key=tls.key), f"tls.cert: {missing}: no such file"),
        (TlsConfig(cert=tls.cert, key=missing), f"tls.key: {missing}: no such file"),
        (TlsConfig(cert=tls.cert, key=tls.cert), f"tls: cannot load cert {tls.cert} and key"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            Broker(make_config().replace(tls=config))


async def test_a_ws_url_to_a_tls_broker_is_told_to_use_wss(
    nursery: trio.Nursery, tls: TlsConfig
) -> None:
    broker = await start_broker(nursery, make_config().replace(tls=tls))
    plain = broker.url.replace("wss://", "ws://")
    with pytest.raises(CannotConnect, match=re.escape("if the broker serves TLS, the URL is wss")):
        async with broker_client.connect(plain, reconnect=False):
            pass


def test_an_encrypted_key_is_a_config_error_not_a_pass_phrase_prompt(
    tmp_path: Path, tls: TlsConfig
) -> None:
    key = serialization.load_pem_private_key(Path(tls.key).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = make_config().replace(tls=TlsConfig(cert=tls.cert, key=str(encrypted)))
    with pytest.raises(ConfigError, match="is encrypted"):
        Broker(config)  # with a terminal, OpenSSL used to prompt here and ignore SIGTERM
