"""What can go wrong, as specific exceptions, each with the broker's own words.

Errors the broker reports (an ``err`` frame, a 4003 close, a 401/403 handshake) are
:class:`BrokerError` subclasses, one per protocol error code, carrying the broker's ``code`` and
``message``. Errors of the connection itself (:class:`CannotConnect`, :class:`ConnectionLost`,
:class:`ReplyTimeout`, :class:`Closed`) are :class:`ClientError` subclasses too. A refused
handshake keeps its HTTP ``status``, the broker's reason (the response's body) and its
``retry_after``; a closed connection its ``close_code`` and ``close_reason``.
"""

from __future__ import annotations

from broker.protocol.codes import ErrorCode


class ClientError(Exception):
    """Base of every exception this package raises.

    ``status`` (the HTTP status of a refused handshake) and ``close_code``/``close_reason``
    (of the close that ended a connection) are set where they are what happened, else
    ``None``.
    """

    status: int | None = None
    close_code: int | None = None
    close_reason: str | None = None


class BrokerError(ClientError):
    """The broker refused a command; ``code`` is the protocol's error code, ``message`` its text."""

    code: str = "unknown"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(f"{code or self.code}: {message}")
        if code is not None:
            self.code = code
        self.message = message


class BadRequest(BrokerError):
    """``bad_request``: the frame was malformed (a client bug)."""

    code: str = ErrorCode.BAD_REQUEST


class UnknownOp(BrokerError):
    """``unknown_op``: the broker does not know this operation."""

    code: str = ErrorCode.UNKNOWN_OP


class InvalidTopic(BrokerError):
    """``invalid_topic``: not a valid topic (or pattern); publish needs a concrete topic."""

    code: str = ErrorCode.INVALID_TOPIC


class Forbidden(BrokerError):
    """``forbidden``: not allowed, or the token was rejected (401/403, close 4003)."""

    code: str = ErrorCode.FORBIDDEN


class Unauthorized(Forbidden):
    """HTTP 401 at the handshake: no valid token (missing, unknown, forged or expired).

    A :class:`Forbidden`, so ``except Forbidden`` catches every refusal of the token.
    """

    code: str = "unauthorized"  # an HTTP 401, not an err code


class TooLarge(BrokerError):
    """``too_large``: the published message exceeds the broker's ``max_payload``, or a
    subscription's ``info`` takes over 1 KiB encoded."""

    code: str = ErrorCode.TOO_LARGE


class TooManySubscriptions(BrokerError):
    """``too_many_subs``: this connection already has the most subscriptions allowed."""

    code: str = ErrorCode.TOO_MANY_SUBS


class RateLimited(BrokerError):
    """``rate_limited``: slow down and retry later."""

    code: str = ErrorCode.RATE_LIMITED


class Unavailable(BrokerError):
    """``unavailable``: the cluster backplane is down; only this node's subscribers got it."""

    code: str = ErrorCode.UNAVAILABLE


class NotEnabled(BrokerError):
    """``not_enabled``: the topic does not offer what was asked: ``presence`` or
    ``join_leave`` where no ``[[topics]]`` rule says ``presence = true``."""

    code: str = ErrorCode.NOT_ENABLED


class Internal(BrokerError):
    """``internal``: the broker failed; the connection stays usable."""

    code: str = ErrorCode.INTERNAL


ERRORS_BY_CODE: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (BadRequest, UnknownOp, InvalidTopic, Forbidden, TooLarge, TooManySubscriptions,
                RateLimited, Unavailable, NotEnabled, Internal)
}  # fmt: skip


def error_from_frame(code: object, message: object) -> BrokerError:
    """The exception for an ``err`` frame; unknown codes give a plain :class:`BrokerError`."""
    code, message = str(code), str(message)
    return ERRORS_BY_CODE.get(code, BrokerError)(message, code)


def first_line(text: str) -> str:
    """The first line of an answer from something that is not the broker (a web page, a
    proxy), at most 200 characters: enough to recognise it, not its whole HTML."""
    return (text.strip().splitlines() or [""])[0][:200]


class CannotConnect(ClientError):
    """The first connection to the broker failed: unreachable, timed out, TLS, or refused by
    the broker, then with its HTTP ``status``, its ``reason`` (the response's body) and its
    ``retry_after`` (seconds, from ``Retry-After``)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class Overloaded(CannotConnect):
    """HTTP 503 at the handshake: the broker is at a connection limit or shutting down (its
    ``reason`` says which).

    Transient: the client tries its other URLs, and retries this one after its
    ``retry_after`` and a backoff delay (the first connection for up to ``connect_timeout``);
    it raises this only when it gives up.
    """


class ConnectionLost(ClientError):
    """The connection dropped while a reply was awaited (the command may or may not have been
    applied), or for good when reconnecting is off. ``close_code`` and ``close_reason`` are
    the broker's close frame's, if it sent one.
    """

    def __init__(
        self, message: str, close_code: int | None = None, close_reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.close_reason = close_reason


class ReplyTimeout(ClientError, TimeoutError):
    """The broker did not answer within the client's ``reply_timeout``."""


class Closed(ClientError):
    """The client is closed: it was used after its ``async with`` block ended."""
