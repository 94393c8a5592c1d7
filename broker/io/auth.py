"""Who is connecting: turn the handshake's token into an :class:`Identity`, or refuse.

The token comes from ``Authorization: Bearer <token>`` or, for browsers, ``?token=<token>``
(the header wins when both are given). An :class:`Authenticator` checks it:

- :class:`NoAuth` lets everyone in with every permission (``auth.mode = "none"``);
- :class:`StaticTokens` knows a fixed set of tokens from the config, each with its grants;
- :class:`JwtAuth` verifies a JWT (HS256 or RS256, ``exp`` required, ``nbf``, and ``aud`` /
  ``iss`` when configured) and reads the grants from two claims.

Refusals follow RFC 6750: :class:`AuthError` with status 401 when the client has no valid
credentials (no token, an unknown or malformed token, a bad signature, expired or not yet
valid, the wrong audience or issuer), 403 when the token is valid but grants nothing at all.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.config import (
    IDENTITY_LIMIT_KEYS,
    AuthConfig,
    ConfigError,
    JwtConfig,
    TokenGrant,
    identity_limits,
)
from broker.core.permissions import ANONYMOUS, Identity, Permissions
from broker.core.rules import IdentityLimits
from broker.protocol.handshake import Upgrade
from broker.protocol.topics import InvalidTopic, validate_pattern


class AuthError(Exception):
    """The handshake is refused with HTTP ``status`` (401 or 403); ``str()`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Authenticator(Protocol):
    """Checks the token a client presented (``None`` if it presented none)."""

    def authenticate(self, token: str | None) -> Identity:
        """The client's identity; raises :class:`AuthError` to refuse the handshake."""
        ...


class NoAuth:
    """Everyone is :data:`ANONYMOUS`, allowed everything; a token, if any, is ignored."""

    def authenticate(self, token: str | None) -> Identity:
        """Always :data:`ANONYMOUS`."""
        return ANONYMOUS


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class StaticTokens:
    """A fixed table of tokens from ``[[auth.tokens]]``; they never expire."""

    def __init__(self, grants: Sequence[TokenGrant]) -> None:
        # Keyed by digest, so the lookup's timing says nothing about the secret tokens.
        self._identities = {
            _digest(grant.token): Identity(
                grant.subject,
                Permissions(grant.publish, grant.subscribe),
                None,
                grant.limits,
                grant.info,
            )
            for grant in grants
        }

    def authenticate(self, token: str | None) -> Identity:
        """The identity the token was configured with."""
        if token is None:
            raise AuthError(401, "a token is required")
        identity = self._identities.get(_digest(token))
        if identity is None:
            raise AuthError(401, "unknown token")
        return _allowed_something(identity)


class JwtAuth:
    """Verifies JWTs signed with one key; grants come from two claims (lists of patterns)."""

    def __init__(self, config: JwtConfig, key: Any) -> None:
        self._config = config
        self._key = key

    def authenticate(self, token: str | None) -> Identity:
        """The identity in a valid JWT: ``sub`` (or "unknown"), the grants, ``exp``."""
        if token is None:
            raise AuthError(401, "a token is required")
        config = self._config
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[config.algorithm],
                audience=config.audience or None,
                issuer=config.issuer or None,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None  # as a close 4003 says it
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {exc}") from None
        except Exception as exc:  # the token is the peer's: whatever PyJWT chokes on is bad
            raise AuthError(401, f"invalid token: {type(exc).__name__}") from None
        permissions = Permissions(
            _claim_patterns(claims, config.publish_claim),
            _claim_patterns(claims, config.subscribe_claim),
        )
        subject = claims.get("sub")
        identity = Identity(
            subject if isinstance(subject, str) else "unknown",
            permissions,
            _expiry(claims["exp"]),
            _claim_limits(claims, config.limits_claim),
            claims.get("info"),
        )
        return _allowed_something(identity)


def _expiry(exp: Any) -> float:
    """The ``exp`` claim as a Unix time (PyJWT checked it is a number in the future)."""
    try:
        expires_at = float(exp)
    except (OverflowError, TypeError, ValueError):
        expires_at = math.inf
    if not math.isfinite(expires_at):
        raise AuthError(401, "invalid token: 'exp' is not a finite time")
    return expires_at


def _claim_limits(claims: Mapping[str, Any], name: str) -> IdentityLimits:
    value = claims.get(name)
    if value is None:
        return IdentityLimits()
    unknown = set(value) - set(IDENTITY_LIMIT_KEYS) if isinstance(value, dict) else None
    if unknown is None or unknown:
        raise AuthError(
            401, f"invalid token: claim {name!r} must be a map of {', '.join(IDENTITY_LIMIT_KEYS)}"
        )
    try:
        return identity_limits(value, f"claim {name!r}")
    except ConfigError as exc:
        raise AuthError(401, f"invalid token: {exc}") from None


def _allowed_something(identity: Identity) -> Identity:
    if identity.permissions.empty:
        raise AuthError(403, f"{identity.subject!r} may neither publish nor subscribe")
    return identity


def _claim_patterns(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AuthError(401, f"invalid token: claim {name!r} must be a list of topic patterns")
    for pattern in value:
        try:
            validate_pattern(pattern)
        except InvalidTopic as exc:
            raise AuthError(401, f"invalid token: claim {name!r}: {exc}") from None
    return tuple(value)


def token_from_request(upgrade: Upgrade) -> str | None:
    """The bearer token of a handshake: the ``Authorization`` header, else ``?token=``."""
    authorization = upgrade.header(b"authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return upgrade.query("token")


def build_authenticator(config: AuthConfig) -> Authenticator:
    """The authenticator ``[auth]`` asks for; a key file that cannot be used is a ConfigError."""
    if config.mode == "tokens":
        return StaticTokens(config.tokens)
    if config.mode == "jwt":
        jwt_config = config.jwt
        if jwt_config.algorithm == "HS256":
            return JwtAuth(jwt_config, jwt_config.secret.encode())
        path = jwt_config.public_key_file
        try:
            with open(path, "rb") as file:
                key = load_pem_public_key(file.read())
        except OSError as exc:
            raise ConfigError(f"auth.jwt.public_key_file: cannot read {path}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"auth.jwt.public_key_file: {path}: not a PEM key: {exc}") from None
        if not isinstance(key, RSAPublicKey):
            raise ConfigError(
                f"auth.jwt.public_key_file: {path} holds a {type(key).__name__.lstrip('_')}, "
                "but RS256 verifies with an RSA public key"
            )
        return JwtAuth(jwt_config, key)
    return NoAuth()


def seconds_left(identity: Identity) -> float | None:
    """Seconds until the identity's token expires (negative if it has), ``None`` if never."""
    if identity.expires_at is None:
        return None
    return identity.expires_at - time.time()
