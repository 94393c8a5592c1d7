"""The OpenAPI description stays true: its paths and methods are the routes served, and every
status it documents for an endpoint is produced by a real request here (with an answer that
has the keys its schema requires)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from broker.config import ApiConfig
from broker.core.outbound import Policy
from broker.core.rules import HistoryLimits, TopicRule
from broker.io.api import ROUTES, STATUSES
from broker.io.openapi import OPENAPI
from tests.helpers import make_config, start_broker
from tests.rawsocket import stuck_subscriber

KEY = "openapi-test-key-0123456789"
MAX_PAYLOAD = 1024
#: A request each endpoint answers 200.
VALID: dict[str, Any] = {
    "/api/publish": {"topic": "t.a", "data": 1},
    "/api/broadcast": {"topics": ["t.a", "t.b"], "data": 1},
    "/api/presence": {"topic": "t.a"},
    "/api/history": {"topic": "t.a"},
    "/api/disconnect": {"user": "nobody"},
    "/api/info": None,
    "/api/openapi.json": None,
}


def documented() -> set[tuple[str, str, int]]:
    return {
        (path, method.upper(), int(status))
        for path, operations in OPENAPI["paths"].items()
        for method, operation in operations.items()
        for status in operation["responses"]
    }


def test_the_documented_paths_and_methods_are_the_routes_served() -> None:
    served = {(path, method) for path, method in ROUTES.items()}
    described = {(path, method) for path, method, _ in documented()}
    assert described == served
    assert set(VALID) == set(ROUTES)


def request_for(path: str, method: str, status: int) -> dict[str, Any]:
    """The keyword arguments of a request ``path`` answers with ``status`` (503: once the
    broker is shutting down)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = VALID[path]
    content = None if body is None else json.dumps(body).encode()
    if status == 401:
        del headers["Authorization"]
    elif status == 415:
        headers["Content-Type"] = "text/plain"
    elif status == 413:
        content = json.dumps({**body, "padding": "x" * MAX_PAYLOAD}).encode()
    elif status == 400:
        content = b"[]"
    elif status == 409:
        content = json.dumps({"topic": "plain"}).encode()
    return {"method": method, "url": path, "headers": headers, "content": content}


def required_keys(schema: dict[str, Any]) -> set[str]:
    if "$ref" in schema:
        schema = OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return set(schema.get("required", ()))


async def test_every_documented_status_is_produced(nursery: trio.Nursery) -> None:
    config = make_config(server={"drain_timeout": 30}).replace(
        topics=(TopicRule("t.>", Policy.BLOCK, HistoryLimits(10), presence=True),),
        api=ApiConfig(port=0, keys=(KEY,), max_payload=MAX_PAYLOAD),
    )
    broker = await start_broker(nursery, config)
    assert broker.port is not None
    produced: set[tuple[str, str, int]] = set()
    statuses = sorted(documented(), key=lambda item: item[2] == 503)  # 503s last
    async with httpx.AsyncClient(base_url=str(broker.api_url)) as http:
        served = await http.get("/api/openapi.json")
        assert served.json() == json.loads(json.dumps(OPENAPI))
        stuck = None
        for path, method, status in statuses:
            if status == 503 and stuck is None:
                stuck = await stuck_subscriber(broker.port, "x")  # the drain waits for it
                broker.shutdown()
            response = await http.request(**request_for(path, method, status))
            assert response.status_code == status, (path, method, status, response.text)
            answer = response.json()
            operation = OPENAPI["paths"][path][method.lower()]
            schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
            assert required_keys(schema) <= set(answer), (path, status, answer)
            produced.add((path, method, status))
        assert stuck is not None
        await stuck.stream.aclose()
    assert produced == documented()
    await broker.wait_stopped()


def test_every_error_code_documented_is_one_the_api_answers_with() -> None:
    schema = OPENAPI["components"]["schemas"]["Error"]["properties"]["error"]
    codes = set(schema["properties"]["code"]["enum"])
    assert {str(code) for code in STATUSES} | {"unauthorized", "not_found"} == codes
