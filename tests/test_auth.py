"""Authentication end to end: static tokens and JWTs at the handshake, grants per frame."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.config import AuthConfig, ConfigError, JwtConfig, TokenGrant, config_from_dict
from broker.io.auth import AuthError, JwtAuth, NoAuth, StaticTokens, token_from_request
from broker.io.server import Broker
from broker.protocol.handshake import Upgrade
from tests.helpers import make_config, start_broker
from tests.wire import bearer, connect, rejection

SECRET = "a-test-secret-that-is-at-least-32-bytes-long"
ALICE = TokenGrant("alice-token", "alice", publish=("chat.*",), subscribe=("chat.*", "news.>"))
NOBODY = TokenGrant("nobody-token", "nobody")


async def start_with_auth(nursery: trio.Nursery, auth: AuthConfig) -> Broker:
    return await start_broker(nursery, make_config().replace(auth=auth))


def tokens_auth() -> AuthConfig:
    return AuthConfig(mode="tokens", tokens=(ALICE, NOBODY))


def jwt_auth(**overrides: Any) -> AuthConfig:
    settings: dict[str, Any] = {"secret": SECRET, "audience": "broker", "issuer": "tests"}
    return AuthConfig(mode="jwt", jwt=JwtConfig(**{**settings, **overrides}))


def make_jwt(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    now = time.time()
    payload = {
        "sub": "bob",
        "aud": "broker",
        "iss": "tests",
        "exp": now + 600,
        "publish": ["chat.*"],
        "subscribe": ["chat.>"],
        **claims,
    }
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm)


def hmac_signed(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """A JWT signed by hand, for what PyJWT refuses to sign (an RSA public key as HMAC key)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- static tokens ---


async def test_no_token_is_refused_with_401_and_a_bearer_challenge(nursery: trio.Nursery) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    refused = await rejection(broker.url)
    assert refused.status_code == 401
    assert (b"www-authenticate", b'Bearer realm="broker"') in [
        (name.lower(), value) for name, value in refused.headers
    ]


async def test_an_unknown_token_is_refused_with_401(nursery: trio.Nursery) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    assert (await rejection(broker.url, extra_headers=bearer("guess"))).status_code == 401


async def test_a_token_in_the_header_or_the_query_string_lets_the_client_in(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    async with connect(broker.url, extra_headers=bearer("alice-token")) as client:
        await client.subscribe("chat.room")
        await client.publish("chat.room", "hi")
        await client.expect("msg", topic="chat.room", data="hi")
    async with connect(broker.url + "?token=alice-token") as client:
        await client.subscribe("chat.*")


async def test_a_token_that_grants_nothing_is_refused_with_403(nursery: trio.Nursery) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    assert (await rejection(broker.url, extra_headers=bearer("nobody-token"))).status_code == 403


async def test_a_subscribe_not_covered_by_a_grant_is_forbidden_and_the_connection_stays_open(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    async with connect(broker.url, extra_headers=bearer("alice-token")) as client:
        for id, pattern in enumerate(["chat.>", ">", "secret.x", "news"], start=1):
            await client.send({"op": "sub", "id": id, "topic": pattern})
            await client.expect("err", id=id, code="forbidden")
        await client.subscribe("news.*.sport", id=10)  # covered by news.>
        await client.subscribe("chat.lobby", id=11)
        assert broker.hub.subscription_count() == 2


async def test_a_publish_outside_the_grants_is_forbidden_and_reaches_nobody(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, tokens_auth())
    async with connect(broker.url, extra_headers=bearer("alice-token")) as client:
        await client.subscribe("news.>")
        await client.send({"op": "pub", "id": 2, "topic": "news.today", "data": "fake"})
        await client.expect("err", id=2, code="forbidden")
        await client.send({"op": "pub", "id": 3, "topic": "chat.a.b", "data": "deep"})
        await client.expect("err", id=3, code="forbidden")
        await client.subscribe("chat.a", id=4)
        await client.publish("chat.a", "allowed", id=5)
        await client.expect("msg", topic="chat.a", data="allowed")  # and nothing before it


# --- JWT ---


async def test_a_valid_jwt_lets_the_client_in_with_the_grants_in_its_claims(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, jwt_auth())
    async with connect(broker.url, extra_headers=bearer(make_jwt())) as client:
        await client.subscribe("chat.>")
        await client.publish("chat.x", 1)
        await client.expect("msg", topic="chat.x", data=1)
        await client.send({"op": "pub", "id": 7, "topic": "chat.x.y", "data": 2})
        await client.expect("err", id=7, code="forbidden")
        assert [c.identity.subject for c in broker.connections] == ["bob"]


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(make_jwt(exp=time.time() - 60), id="expired"),
        pytest.param(make_jwt(nbf=time.time() + 600), id="not-yet-valid"),
        pytest.param(make_jwt(key="another-secret-that-is-also-32-bytes-long"), id="forged"),
        pytest.param(make_jwt(aud="someone-else"), id="wrong-audience"),
        pytest.param(make_jwt(aud=None), id="no-audience"),
        pytest.param(make_jwt(iss="mallory"), id="wrong-issuer"),
        pytest.param(make_jwt(exp=None), id="no-expiry"),
        pytest.param(make_jwt(publish="chat.*"), id="malformed-grant"),
        pytest.param(make_jwt(subscribe=["a.>.b"]), id="invalid-pattern"),
        pytest.param(jwt.encode({"sub": "x", "exp": 2**40}, "", "none"), id="alg-none"),
        pytest.param("not.a.jwt", id="garbage"),
    ],
)
async def test_an_invalid_jwt_is_refused_with_401(nursery: trio.Nursery, token: str) -> None:
    broker = await start_with_auth(nursery, jwt_auth())
    assert (await rejection(broker.url, extra_headers=bearer(token))).status_code == 401


async def test_an_expired_jwt_is_told_as_expired(nursery: trio.Nursery) -> None:
    broker = await start_with_auth(nursery, jwt_auth())
    refused = await rejection(broker.url, extra_headers=bearer(make_jwt(exp=time.time() - 60)))
    assert (refused.status_code, refused.body) == (401, b"token expired\n")  # not PyJWT's words


async def test_a_jwt_for_some_audience_is_refused_when_the_broker_names_none(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, jwt_auth(audience=""))
    assert (await rejection(broker.url, extra_headers=bearer(make_jwt()))).status_code == 401
    async with connect(broker.url, extra_headers=bearer(make_jwt(aud=None))) as client:
        await client.subscribe("chat.x")


async def test_a_jwt_without_grants_is_refused_with_403(nursery: trio.Nursery) -> None:
    broker = await start_with_auth(nursery, jwt_auth())
    token = make_jwt(publish=None, subscribe=None)
    assert (await rejection(broker.url, extra_headers=bearer(token))).status_code == 403


async def test_rs256_checks_the_signature_with_the_configured_public_key(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "public.pem").write_bytes(public_pem)
    auth = jwt_auth(algorithm="RS256", secret="", public_key_file=str(tmp_path / "public.pem"))
    broker = await start_with_auth(nursery, auth)
    async with connect(broker.url, extra_headers=bearer(make_jwt(key, "RS256"))) as client:
        await client.subscribe("chat.x")
    forged = make_jwt(other, "RS256")
    assert (await rejection(broker.url, extra_headers=bearer(forged))).status_code == 401
    hs256 = hmac_signed({"alg": "HS256"}, {"sub": "x", "exp": 2**40}, public_pem)
    assert (await rejection(broker.url, extra_headers=bearer(hs256))).status_code == 401


async def test_a_token_that_expires_while_connected_closes_the_connection_with_4003(
    nursery: trio.Nursery,
) -> None:
    broker = await start_with_auth(nursery, jwt_auth())
    token = make_jwt(exp=time.time() + 2)
    async with connect(broker.url, extra_headers=bearer(token)) as client:
        await client.subscribe("chat.x")
        client.timeout = 30
        assert await client.expect_close() == 4003


# --- the pure parts ---


def request(target: str, *headers: tuple[bytes, bytes]) -> Upgrade:
    return Upgrade(target, headers, (), b"dGhlIHNhbXBsZSBub25jZQ==")


def test_the_header_wins_over_the_query_string() -> None:
    header = (b"authorization", b"Bearer from-header")
    assert token_from_request(request("/?token=from-query", header)) == "from-header"
    assert token_from_request(request("/?token=from-query")) == "from-query"
    assert token_from_request(request("/", (b"authorization", b"Basic dXNlcg=="))) is None
    assert token_from_request(request("/")) is None


@pytest.mark.parametrize("target", ["//[", "//[::1/", "/?token=%zz&token=b", "/?" + "a&" * 2000])
def test_a_token_is_found_or_not_in_any_target(target: str) -> None:
    token_from_request(request(target))  # no exception: a bad target is no token


def test_static_tokens_and_no_auth_without_sockets() -> None:
    tokens = StaticTokens([ALICE, NOBODY])
    assert tokens.authenticate("alice-token").subject == "alice"
    with pytest.raises(AuthError) as missing:
        tokens.authenticate(None)
    assert missing.value.status == 401
    assert NoAuth().authenticate(None).permissions.may_subscribe(">")


def test_a_jwt_identity_carries_its_expiry() -> None:
    authenticator = JwtAuth(JwtConfig(secret=SECRET), SECRET.encode())
    identity = authenticator.authenticate(make_jwt(aud=None, iss=None, exp=2_000_000_000))
    assert identity.subject == "bob" and identity.expires_at == 2_000_000_000


# --- configuration ---


def test_auth_config_is_loaded_from_toml_tables() -> None:
    config = config_from_dict(
        {
            "auth": {
                "mode": "tokens",
                "tokens": [{"token": "t", "subject": "s", "publish": ["a.*"], "subscribe": [">"]}],
            }
        }
    )
    assert config.auth.tokens == (TokenGrant("t", "s", ("a.*",), (">",)),)


@pytest.mark.parametrize(
    ("auth", "key"),
    [
        ({"mode": "ldap"}, "auth.mode"),
        ({"mode": "tokens"}, "auth.tokens"),
        ({"tokens": [{"subject": "s"}]}, "auth.tokens[0].token"),
        ({"tokens": [{"token": "t", "subject": "s", "publish": "a"}]}, "auth.tokens[0].publish"),
        ({"tokens": [{"token": "t", "subject": "s", "subscribe": ["a.>.b"]}]}, "subscribe"),
        ({"tokens": [{"token": "t", "subject": "s", "role": "x"}]}, "auth.tokens[0].role"),
        ({"tokens": [{"token": "t", "subject": "a"}, {"token": "t", "subject": "b"}]}, "[1].token"),
        ({"mode": "jwt", "jwt": {"secret": "short"}}, "auth.jwt.secret"),
        ({"mode": "jwt", "jwt": {"algorithm": "HS512", "secret": SECRET}}, "auth.jwt.algorithm"),
        ({"mode": "jwt", "jwt": {"algorithm": "RS256"}}, "auth.jwt.public_key_file"),
        ({"jwt": {"leeway": 5}}, "auth.jwt.leeway"),
    ],
)
def test_invalid_auth_config_names_the_key(auth: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict({"auth": auth})


def test_an_unreadable_public_key_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        auth = jwt_auth(algorithm="RS256", public_key_file=str(path))
        with pytest.raises(ConfigError, match=re.escape("auth.jwt.public_key_file")):
            Broker(make_config().replace(auth=auth))


def test_an_ec_key_for_rs256_is_a_config_error(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path = tmp_path / "ec.pem"
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    auth = jwt_auth(algorithm="RS256", secret="", public_key_file=str(path))
    with pytest.raises(ConfigError, match="RSA public key"):
        Broker(make_config().replace(auth=auth))


def test_whatever_pyjwt_raises_on_a_token_is_a_401() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    authenticator = JwtAuth(JwtConfig(algorithm="RS256"), ec_key.public_key())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"sub": "x", "exp": time.time() + 60}, rsa_key, "RS256")
    with pytest.raises(AuthError) as refused:  # PyJWT raised TypeError here
        authenticator.authenticate(token)
    assert refused.value.status == 401


@pytest.mark.parametrize("exp", [10**400, 2**1024, -(10**400)])
def test_an_expiry_beyond_any_clock_is_a_401(exp: int) -> None:
    authenticator = JwtAuth(JwtConfig(secret=SECRET), SECRET.encode())
    with pytest.raises(AuthError) as refused:
        authenticator.authenticate(make_jwt(exp=exp, aud=None, iss=None))
    assert refused.value.status == 401


@pytest.mark.parametrize(
    ("host", "mode", "warned"),
    [("0.0.0.0", "none", True), ("::", "none", True), ("192.0.2.1", "none", True),
     ("127.0.0.1", "none", False), ("::1", "none", False), ("localhost", "none", False),
     ("0.0.0.0", "tokens", False)],
)  # fmt: skip
def test_no_auth_on_a_non_loopback_address_is_logged_loudly(
    caplog: pytest.LogCaptureFixture, host: str, mode: str, warned: bool
) -> None:
    config = make_config(server={"host": host})
    broker = Broker(config.replace(auth=AuthConfig(mode=mode, tokens=(ALICE,))))
    broker.port = 8765  # as if listening: the startup lines need a URL
    broker._log_startup()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warnings) is warned
    if warned:
        assert "AUTH IS OFF" in warnings[0].getMessage()
