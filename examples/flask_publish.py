"""A Flask app that publishes to browsers through the broker's server API.

Run the broker with the API on, then this app::

    broker serve --config config/api.toml
    BROKER_API_KEY=dev-only-key-change-me-0123 python examples/flask_publish.py

Open http://127.0.0.1:5000/: the page subscribes to ``orders.created`` over a WebSocket, with
the JS client (clients/js). Then place an order, from a shell or any backend::

    curl -X POST -H 'Content-Type: application/json' -d '{"item": "tea"}' \\
      http://127.0.0.1:5000/orders

The view publishes with one HTTP request (:class:`broker_client.api.Api`: one instance, shared
by Flask's threads, keeps its connections to the broker open) and answers 201 once the broker
has queued the order for every subscriber. No event loop, no WebSocket in the view.

Settings come from the environment: ``BROKER_API_KEY`` (required), ``BROKER_API``
(default ``http://127.0.0.1:8767``), ``BROKER_URL`` (what the page connects to, default
``ws://127.0.0.1:8765/``) and ``PORT`` (default 5000; 0 picks a free one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flask import Flask, Response, request, send_from_directory
from werkzeug.serving import make_server

from broker_client import BrokerError
from broker_client.api import Api

JS_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "js" / "src"
TOPIC = "orders.created"

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
    await client.subscribe(TOPIC, (message) => {
      const item = document.createElement("li");
      item.textContent = JSON.stringify(message.data);
      document.getElementById("orders").append(item);
    });
    status.textContent = "subscribed";
  </script>
</body>
</html>
"""


def create_app(api: Api, broker_url: str) -> Flask:
    """The app: ``GET /`` (the page), ``POST /orders`` (publish one), ``/js/`` (the client)."""
    app = Flask(__name__)
    page = PAGE.replace("BROKER_URL", json.dumps(broker_url)).replace("TOPIC", json.dumps(TOPIC))

    @app.get("/")
    def orders_page() -> Response:
        return Response(page, mimetype="text/html")

    @app.post("/orders")
    def place_order() -> tuple[dict[str, object], int]:
        order = request.get_json(silent=True)
        if not isinstance(order, dict):
            return {"error": "send the order as a JSON object"}, 400
        try:
            position = api.publish(TOPIC, order)
        except BrokerError as error:  # refused, or Redis unreachable: say so, do not hide it
            return {"error": str(error)}, 502
        return {"published": True, "offset": position.offset if position else None}, 201

    @app.get("/js/<name>")
    def js_client(name: str) -> Response:
        return send_from_directory(JS_CLIENT, name)

    return app


def main() -> None:
    """Serve the app until ^C; print its URL first."""
    api = Api(os.environ.get("BROKER_API", "http://127.0.0.1:8767"))
    app = create_app(api, os.environ.get("BROKER_URL", "ws://127.0.0.1:8765/"))
    server = make_server("127.0.0.1", int(os.environ.get("PORT", "5000")), app, threaded=True)
    print(f"orders page on http://127.0.0.1:{server.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        api.close()


if __name__ == "__main__":
    main()
