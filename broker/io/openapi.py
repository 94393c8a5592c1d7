"""The server API's OpenAPI 3.1 description, served at ``GET /api/openapi.json``.

Written by hand, next to nothing else: ``tests/test_api_openapi.py`` checks that its paths and
methods are :data:`broker.io.api.ROUTES`, and that each status it documents is produced by a
request of the suite.
"""

from __future__ import annotations

from typing import Any, Final

from broker import __version__

MEDIA_TYPES = ("application/json", "application/msgpack")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {media: {"schema": schema} for media in MEDIA_TYPES}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _content(_ref("Error"))}


ERRORS: Final = {
    "400": _error(
        "`bad_request` (the body is not JSON or msgpack, not a map, or a key is "
        "missing or mistyped) or `invalid_topic`"
    ),
    "401": _error("`unauthorized`: no `Authorization: Bearer KEY` with one of the [api] keys"),
    "413": _error("`too_large`: the body exceeds [api] max_payload (refused unread)"),
    "415": _error("`bad_request`: the Content-Type is not application/json or application/msgpack"),
    "503": _error(
        "`unavailable`: the cluster backplane (Redis) is unreachable, or the "
        "broker is shutting down (then with Retry-After)"
    ),
}
NOT_ENABLED: Final = _error("`not_enabled`: the topic does not offer it (see its [[topics]] rule)")


def _post(summary: str, request: str, answer: str, *extra: tuple[str, dict[str, Any]]) -> Any:
    statuses = dict(ERRORS)
    statuses.update(extra)
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _content(_ref(request))},
            "responses": {
                "200": {"description": "done", "content": _content(_ref(answer))},
                **dict(sorted(statuses.items())),
            },
        }
    }


TOPIC: Final = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "description": "a concrete topic: segments separated by '.', no wildcard",
}
DATA: Final = {"description": "any value (bytes too, in msgpack)"}
POSITION: Final = {
    "type": "object",
    "required": ["epoch", "offset"],
    "properties": {"epoch": {"type": "string"}, "offset": {"type": "integer", "minimum": 0}},
}

OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Trio pub/sub broker: server API",
        "version": __version__,
        "description": "HTTP endpoints for backends (docs/api.md). Bodies are JSON or msgpack "
        "(by Content-Type); answers use the request's encoding (for GET: Accept). Every "
        "endpoint but this document needs an API key. An unknown path is 404 `not_found`; "
        "a wrong method is 405 `bad_request` (with Allow). Errors: "
        '{"error": {"code": C, "message": M}}.',
    },
    "security": [{"apiKey": []}],
    "paths": {
        "/api/publish": _post(
            "Publish one message, as a `pub` with `id`: answered once it is queued for every "
            "matching subscriber",
            "Publish",
            "Published",
        ),
        "/api/broadcast": _post(
            "Publish one message to up to 1000 topics, in order; a result per topic",
            "Broadcast",
            "Broadcasted",
        ),
        "/api/presence": _post(
            "A page of a presence topic's members",
            "PresenceQuery",
            "Presence",
            ("409", NOT_ENABLED),
        ),
        "/api/history": _post(
            "Kept messages of a history topic",
            "HistoryQuery",
            "History",
            ("409", NOT_ENABLED),
        ),
        "/api/disconnect": _post(
            "Close a user's connections on every node",
            "Disconnect",
            "Disconnected",
        ),
        "/api/info": {
            "get": {
                "summary": "Every node's connections and subscriptions, and the version",
                "responses": {
                    "200": {"description": "done", "content": _content(_ref("Info"))},
                    "401": ERRORS["401"],
                    "503": ERRORS["503"],
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document (no API key needed)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "one of [api] keys"}
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {
                                "type": "string",
                                "enum": [
                                    "bad_request",
                                    "invalid_topic",
                                    "unauthorized",
                                    "not_found",
                                    "too_large",
                                    "not_enabled",
                                    "unavailable",
                                    "internal",
                                ],
                            },
                            "message": {"type": "string"},
                        },
                    }
                },
            },
            "Publish": {
                "type": "object",
                "required": ["topic", "data"],
                "properties": {"topic": TOPIC, "data": DATA},
            },
            "Published": {
                "description": "{} on a topic without history; else the message's position",
                "oneOf": [{"type": "object", "maxProperties": 0}, POSITION],
            },
            "Broadcast": {
                "type": "object",
                "required": ["topics", "data"],
                "properties": {
                    "topics": {"type": "array", "items": TOPIC, "minItems": 1, "maxItems": 1000},
                    "data": DATA,
                },
            },
            "Broadcasted": {
                "type": "object",
                "required": ["results"],
                "properties": {
                    "results": {
                        "type": "array",
                        "description": "one per topic, in order",
                        "items": {"oneOf": [_ref("Published"), _ref("Error")]},
                    }
                },
            },
            "PresenceQuery": {
                "type": "object",
                "required": ["topic"],
                "properties": {
                    "topic": TOPIC,
                    "limit": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 1000},
                    "cursor": {"type": "string", "description": "from an earlier answer"},
                },
            },
            "Member": {
                "type": "object",
                "required": ["client", "user", "info"],
                "properties": {
                    "client": {"type": "string"},
                    "user": {"type": ["string", "null"]},
                    "info": {},
                },
            },
            "Presence": {
                "type": "object",
                "required": ["count", "members"],
                "properties": {
                    "count": {"type": "integer", "minimum": 0},
                    "members": {"type": "array", "items": _ref("Member")},
                    "cursor": {"type": "string", "description": "present when more remain"},
                },
            },
            "HistoryQuery": {
                "type": "object",
                "required": ["topic"],
                "properties": {
                    "topic": TOPIC,
                    "since": POSITION,
                    "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
            },
            "History": {
                "type": "object",
                "required": ["epoch", "offset", "messages"],
                "properties": {
                    "epoch": {"type": "string"},
                    "offset": {"type": "integer", "description": "the topic's latest"},
                    "messages": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["offset", "data"],
                            "properties": {"offset": {"type": "integer"}, "data": DATA},
                        },
                    },
                    "recovered": {"type": "boolean", "description": "only with since"},
                },
            },
            "Disconnect": {
                "type": "object",
                "required": ["user"],
                "properties": {
                    "user": {"type": "string", "description": "a token's subject"},
                    "code": {"type": "integer", "minimum": 4000, "maximum": 4999, "default": 4010},
                    "reason": {
                        "type": "string",
                        "maxLength": 123,
                        "default": "disconnected by the server API",
                    },
                },
            },
            "Disconnected": {
                "type": "object",
                "required": ["disconnected"],
                "properties": {"disconnected": {"type": "integer", "minimum": 0}},
            },
            "Node": {
                "type": "object",
                "required": ["node", "version", "connections", "subscriptions", "uptime"],
                "properties": {
                    "node": {"type": "string"},
                    "version": {"type": "string"},
                    "connections": {"type": "integer"},
                    "subscriptions": {"type": "integer"},
                    "uptime": {"type": "number", "description": "seconds"},
                },
            },
            "Info": {
                "type": "object",
                "required": ["version", "connections", "subscriptions", "nodes"],
                "properties": {
                    "version": {"type": "string"},
                    "connections": {"type": "integer", "description": "over every node"},
                    "subscriptions": {"type": "integer", "description": "over every node"},
                    "nodes": {"type": "array", "items": _ref("Node")},
                },
            },
        },
    },
}
