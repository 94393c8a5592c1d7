"""The codes of the wire protocol: ``err`` codes and WebSocket close codes.

One definition for the broker and its Python client (``broker_client`` imports this module,
which imports nothing of the broker's).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``err`` frame."""

    BAD_REQUEST = "bad_request"  # undecodable frame, not a map, a missing or mistyped key
    UNKNOWN_OP = "unknown_op"
    INVALID_TOPIC = "invalid_topic"
    FORBIDDEN = "forbidden"
    TOO_LARGE = "too_large"
    TOO_MANY_SUBS = "too_many_subs"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # the cluster backplane is unreachable
    NOT_ENABLED = "not_enabled"  # the topic does not offer what was asked (presence)
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """The close codes the broker uses (RFC 6455 section 7.4, and the protocol's 4xxx)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # shutting down, or no pong within ping_timeout
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007  # text that is not UTF-8
    TOO_BIG = 1009  # a message over max_message_size
    ABNORMAL = 1006  # no close frame: the connection was lost (never sent)
    INTERNAL_ERROR = 1011  # a bug of the broker's, contained to this connection
    SLOW_CONSUMER = 4002
    FORBIDDEN = 4003  # the token expired
    POLICY = 4008  # too many bad frames in a row
    DISCONNECTED = 4010  # by the server API (its disconnect endpoint's default code)
