"""A FastAPI app (asyncio, on uvicorn) that publishes and relays through ``broker_client``.

Run a broker (``make run``), then this app::

    BROKER_URL=ws://127.0.0.1:8765/ uvicorn fastapi_app:app --app-dir examples

It needs FastAPI 0.135 or later (``fastapi.sse``, for the Server-Sent Events below) and
uvicorn, which ``make test`` installs (``make run`` does not).

- ``POST /orders`` with ``{"item": "tea", "quantity": 2}`` publishes the order to
  ``orders.created`` and answers 201 once the broker has queued it for every subscriber (502
  in the broker's words if it refused, or is out of reach).
- ``GET /orders/events`` relays ``orders.*`` to the app's own clients as Server-Sent Events
  (``event:`` the topic, ``data:`` the order as JSON), for those that should not reach the
  broker themselves; its first line, the comment ``: subscribed``, says it is live.
- ``GET /`` is a page that subscribes to ``orders.*`` on the broker itself, with the JS client
  (clients/js, served at ``/js/``), and lists the orders as they come.

The app holds one :class:`~broker_client.Client` for its whole life, opened and closed by
FastAPI's lifespan: every request shares its one WebSocket, and every ``/orders/events``
stream is a subscription of its own on it (leaving the stream unsubscribes). ``BROKER_URL``
(default ``ws://127.0.0.1:8765/``) is the broker, for the app and for the page.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, TypedDict

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from broker_client import Client, ClientError, connect

BROKER_URL = os.environ.get("BROKER_URL", "ws://127.0.0.1:8765/")
JS_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "js" / "src"

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Orders</title><link rel="icon" href="data:,"></head>
<body>
  <h1>New orders</h1>
  <p id="status">connecting…</p>
  <ol id="orders"></ol>
  <script type="module">
    import { Client } from "/js/client.js";
    const status = document.getElementById("status");
    const client = new Client(BROKER_URL, { onState: (state) => { status.textContent = state; } });
    await client.subscribe("orders.*", (message) => {
      const item = document.createElement("li");
      item.textContent = `${message.topic} ${JSON.stringify(message.data)}`;
      document.getElementById("orders").append(item);
    });
    status.textContent = "subscribed";
  </script>
</body>
</html>
""".replace("BROKER_URL", json.dumps(BROKER_URL))


class State(TypedDict):
    """What the lifespan gives every request (``request.state``)."""

    broker: Client


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[State]:
    """Connect to the broker before serving; close the connection after the last request."""
    async with connect(BROKER_URL) as client:
        yield {"broker": client}


app = FastAPI(title="Orders", lifespan=lifespan)
app.mount("/js", StaticFiles(directory=JS_CLIENT), name="js")


def broker(request: Request) -> Client:
    """The app's client (a dependency)."""
    client: Client = request.state.broker
    return client


Broker = Annotated[Client, Depends(broker)]


class Order(BaseModel):
    item: str
    quantity: int = 1


@app.exception_handler(ClientError)
async def broker_failed(request: Request, error: ClientError) -> JSONResponse:
    """The broker refused, or cannot be reached: say so, in its words."""
    return JSONResponse({"error": str(error)}, status_code=502)


@app.post("/orders", status_code=201)
async def place_order(order: Order, client: Broker) -> Order:
    """Publish the order; answer once the broker has accepted it."""
    await client.publish("orders.created", order.model_dump())
    return order


@app.get("/orders/events", response_class=EventSourceResponse)
async def order_events(client: Broker) -> AsyncIterable[ServerSentEvent]:
    """Every message on ``orders.*`` from now on, as an event named after its topic."""
    async with client.subscribe("orders.*") as orders:
        yield ServerSentEvent(comment="subscribed")
        async for message in orders:
            yield ServerSentEvent(event=message.topic, data=message.data)


@app.get("/", response_class=HTMLResponse)
async def orders_page() -> str:
    """The page that lists the orders, subscribed to the broker with the JS client."""
    return PAGE
