"""Observability end to end: /metrics after a known workload, health, and naming the slow one.

Brokers run with the internal HTTP listener on a free port; a real HTTP client (httpx) scrapes
it, and ``broker stats`` runs as a subprocess. The counting cores are tested without sockets.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from broker.config import (
    AuthConfig,
    ClusterConfig,
    Config,
    ConfigError,
    MetricsConfig,
    TokenGrant,
    config_from_dict,
)
from broker.core.outbound import Policy
from broker.core.rules import TopicRule
from broker.core.stats import (
    BrokerStats,
    ConnectionSnapshot,
    Histogram,
    SortKey,
    describe,
    format_subscriptions,
    top_connections,
)
from broker.io.server import Broker
from broker.operations.cli import main
from broker.operations.cli_stats import COLUMNS
from tests.helpers import make_config, start_broker, wait_until
from tests.rawsocket import RawClient, open_raw, stuck_subscriber
from tests.redis_server import running_redis
from tests.wire import bearer, connect

PAYLOAD = b"x" * 65536  # a few hundred of these overflow any loopback buffer
SLOW = TokenGrant("slow-token", "slowpoke", subscribe=(">",))
FAST = TokenGrant("fast-token", "speedy", subscribe=(">",))
PUBLISHER = TokenGrant("pub-token", "feeder", publish=(">",))


def with_metrics(config: Config) -> Config:
    """``config`` with the metrics listener on 127.0.0.1 and a free port."""
    return config.replace(metrics=MetricsConfig(port=0))


async def scrape(broker: Broker) -> dict[str, float]:
    """GET /metrics; every sample as ``name{label="value",...}`` -> value."""
    assert broker.metrics_url is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{broker.metrics_url}/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def get(broker: Broker, path: str) -> httpx.Response:
    assert broker.metrics_url is not None
    async with httpx.AsyncClient() as client:
        return await client.get(f"{broker.metrics_url}{path}")


# --- end to end ---


async def test_metrics_count_a_known_workload(nursery: trio.Nursery) -> None:
    config = with_metrics(make_config(max_payload=1000))
    broker = await start_broker(nursery, config)
    assert broker.port is not None
    refused = await open_raw(broker.port, ("no.such.subprotocol",))
    assert not isinstance(refused, RawClient)
    async with (
        connect(broker.url) as msgpack_sub,
        connect(broker.url, "json") as json_sub,
        connect(broker.url) as publisher,
    ):
        for subscriber in (msgpack_sub, json_sub):
            await subscriber.send({"op": "sub", "id": 1, "topic": "orders.*"})
            await subscriber.expect("ok", id=1)
        for n in range(5):
            await publisher.send({"op": "pub", "id": n, "topic": "orders.new", "data": n})
            await publisher.expect("ok", id=n)
        await publisher.send({"op": "pub", "id": 5, "topic": "nobody.listens", "data": 0})
        await publisher.expect("ok", id=5)
        await publisher.send({"op": "pub", "id": 6, "topic": "orders.new", "data": "x" * 2000})
        await publisher.expect("err", id=6, code="too_large")
        for subscriber in (msgpack_sub, json_sub):
            for n in range(5):
                assert (await subscriber.expect("msg"))["data"] == n
        await wait_until(lambda: broker.stats.messages_out == 10)  # the writers have returned

        metrics = await scrape(broker)

    assert metrics["broker_ready"] == 1
    assert metrics["broker_connections"] == 3
    assert metrics["broker_connections_accepted_total"] == 3
    assert metrics['broker_connections_rejected_total{reason="subprotocol"}'] == 1
    assert metrics['broker_connections_rejected_total{reason="unauthorized"}'] == 0
    assert metrics["broker_subscriptions"] == 2
    assert metrics["broker_messages_in_total"] == 7
    assert metrics['broker_publishes_total{result="ok"}'] == 6
    assert metrics['broker_publishes_total{result="too_large"}'] == 1
    assert metrics["broker_messages_out_total"] == 10
    assert metrics["broker_bytes_in_total"] > 2000
    assert metrics["broker_bytes_out_total"] > 0
    assert metrics['broker_messages_dropped_total{policy="drop_oldest"}'] == 0
    assert metrics["broker_slow_consumer_disconnects_total"] == 0
    batches = metrics["broker_fanout_latency_seconds_count"]
    assert 1 <= batches <= 10  # one observation per batch holding messages
    assert metrics['broker_fanout_latency_seconds_bucket{le="+Inf"}'] == batches
    assert metrics["broker_outbound_queue_depth_count"] >= batches
    assert not any("orders" in name for name in metrics)  # no label per topic


async def test_drops_and_slow_consumer_disconnects_are_counted(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(topics={"ticks.>": "drop_newest"}, queue_messages=4, slow_timeout=0.1)
    broker = await start_broker(nursery, with_metrics(tokens(config)))
    dropping = await stuck_subscriber_as(broker, "ticks.*", SLOW)
    blocking = await stuck_subscriber_as(broker, "feed", SLOW)
    async with connect(broker.url, extra_headers=bearer(PUBLISHER.token)) as publisher:
        await publish(publisher, "ticks.a", 50)
        await publish(publisher, "feed", 50)  # waits slow_timeout, then closes the subscriber
    assert await blocking.wait_close_code() == 4002
    metrics = await scrape(broker)
    assert metrics['broker_messages_dropped_total{policy="drop_newest"}'] > 0
    assert metrics["broker_slow_consumer_disconnects_total"] == 1
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow cons")]
    assert "subject=slowpoke subs=feed queued=5 " in line  # the bound, and one past it
    assert "oldest=" in line and "closing with 4002" in line
    await dropping.stream.aclose()


async def test_a_slow_subscriber_tops_broker_stats_with_its_subject(
    nursery: trio.Nursery,
) -> None:
    config = make_config(topics={"ticks.>": "drop_oldest"}, queue_messages=8)
    broker = await start_broker(nursery, with_metrics(tokens(config)))
    async with (
        connect(broker.url, extra_headers=bearer(FAST.token)) as fast,
        connect(broker.url, extra_headers=bearer(PUBLISHER.token)) as publisher,
    ):
        await fast.subscribe("ticks.>")
        slow = await stuck_subscriber_as(broker, "ticks.*", SLOW)
        fast.timeout = 30
        for _ in range(10):  # the fast one keeps up (or is told what it lost), the slow one not
            await publish(publisher, "ticks.a", 20)
            await account_for(fast, 21)
        connz = (await get(broker, "/connz?sort=drops&limit=2")).json()
        assert connz["connections"] == 3 and len(connz["top"]) == 2
        assert connz["top"][0]["subject"] == "slowpoke"
        assert connz["top"][0]["dropped"] > 0

        assert broker.metrics_url is not None
        with trio.fail_after(60):
            result = await trio.run_process(
                [sys.executable, "-m", "broker", "stats", "--url", broker.metrics_url],
                capture_stdout=True,
                capture_stderr=True,
            )
        lines = result.stdout.decode().splitlines()
        assert lines[0] == "3 connection(s); top 3 by queue"
        assert tuple(lines[1].split()) == COLUMNS
        peer, subject, queued, _, dropped, oldest, subscriptions = lines[2].split()
        assert (subject, queued, subscriptions) == ("slowpoke", "8", "ticks.*")
        assert int(dropped) > 0 and oldest.endswith("s")
        assert peer.startswith("127.0.0.1:")
        await slow.stream.aclose()


async def test_healthz_and_readyz_answer_while_the_broker_serves(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, with_metrics(make_config()))
    assert (await get(broker, "/healthz")).status_code == 200
    ready = await get(broker, "/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert (await get(broker, "/nothing")).status_code == 404
    assert (await get(broker, "/connz?sort=age")).status_code == 400
    broker.shutdown()
    assert broker.ready() == (False, "shutting down")
    await broker.wait_stopped()
    with pytest.raises(httpx.ConnectError):  # the listener stopped with the broker
        await get(broker, "/healthz")


async def test_a_busy_metrics_port_fails_the_start_naming_the_metrics_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        broker = Broker(make_config().replace(metrics=MetricsConfig(port=port)))
        where = f"127.0.0.1:{port} ([metrics])"
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, check=lambda e: e.filename == where),
                                flatten_subgroups=True):  # fmt: skip
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve)


def test_a_broker_is_not_ready_before_it_listens() -> None:
    assert Broker(make_config()).ready() == (False, "not listening yet")


def test_broker_stats_without_a_metrics_listener_says_how_to_turn_it_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        assert main(["stats", "--url", f"http://127.0.0.1:{port}"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"broker: cannot read http://127.0.0.1:{port}/connz")
    assert f"[metrics]\n    port = {port}" in error and "docs/metrics.md" in error


# --- what an operator's dashboard reads ----------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana" / "broker.json"
METRIC = re.compile(r"\b(?:broker|process|python)_[a-z_]+")
BY_LABELS = re.compile(r"\bby \(([^)]*)\)\s*\(\s*[a-z_]*\(?\s*((?:broker|process)_[a-z_]+)")


async def test_metrics_include_the_process_figures(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, with_metrics(make_config()))
    metrics = await scrape(broker)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds"):  # fmt: skip
        assert metrics[name] > 0, name
    assert any(name.startswith("python_info{") for name in metrics)


async def test_presence_members_and_topics_are_counted_without_a_label_per_topic(
    nursery: trio.Nursery,
) -> None:
    room = TopicRule("room.>", Policy.BLOCK, presence=True)
    broker = await start_broker(nursery, with_metrics(make_config().replace(topics=(room,))))
    async with connect(broker.url) as one, connect(broker.url) as two:
        for client, topics in ((one, ["room.a", "room.b"]), (two, ["room.a", "other"])):
            for id, topic in enumerate(topics, start=1):
                await client.send({"op": "sub", "id": id, "topic": topic})
                await client.expect("ok", id=id)
        metrics = await scrape(broker)
    assert metrics["broker_presence_members"] == 3
    assert metrics["broker_presence_topics"] == 2
    assert not any("room" in name for name in metrics)


async def test_every_query_of_the_grafana_dashboard_reads_metrics_the_broker_serves(
    nursery: trio.Nursery,
) -> None:
    served: dict[str, set[str]] = {}  # name -> label names, over a node and a cluster node
    async with running_redis() as redis:
        cluster = ClusterConfig(backend=redis.url)
        for config in (make_config(), make_config().replace(cluster=cluster)):
            broker = await start_broker(nursery, with_metrics(config))
            await wait_until(lambda: broker.ready()[0])  # noqa: B023 - awaited at once
            for sample in await scrape(broker):
                name, _, labels = sample.partition("{")
                keys = {pair.split("=")[0] for pair in labels.rstrip("}").split(",") if pair}
                served.setdefault(name, set()).update(keys)
            broker.shutdown()
            await broker.wait_stopped()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [target["expr"] for panel in panels for target in panel["targets"]]
    assert len(queries) >= 20
    for query in queries:
        names = METRIC.findall(query)
        assert names, query
        for name in names:
            assert name in served, f"{name} (in {query!r}) is not served"
        for labels, name in BY_LABELS.findall(query):
            for label in (label.strip() for label in labels.split(",")):
                assert label == "le" or label in served[name], f"{name} has no label {label}"


def tokens(config: Config) -> Config:
    return config.replace(auth=AuthConfig(mode="tokens", tokens=(SLOW, FAST, PUBLISHER)))


async def stuck_subscriber_as(broker: Broker, pattern: str, grant: TokenGrant) -> RawClient:
    """Subscribe ``pattern`` as ``grant`` on a raw socket, then stop reading."""
    assert broker.port is not None
    return await stuck_subscriber(broker.port, pattern, target=f"/?token={grant.token}")


async def publish(publisher: Any, topic: str, count: int) -> None:
    """Publish ``count`` large messages to ``topic``, then wait for the ack of one more."""
    for start in range(0, count, 10):  # ten 64 KiB frames fit one WebSocket message
        frames = ({"op": "pub", "topic": topic, "data": PAYLOAD} for _ in range(start, count)[:10])
        await publisher.send(*frames)
    await publisher.send({"op": "pub", "id": 99, "topic": topic, "data": 0})
    publisher.timeout = 30
    await publisher.expect("ok", id=99)


async def account_for(client: Any, count: int) -> None:
    """Read until ``count`` messages were received or reported dropped by a ``lag`` frame."""
    seen = 0
    while seen < count:
        frame = await client.next()
        seen += frame["dropped"] if frame["op"] == "lag" else 1
    assert seen == count


# --- the pure parts ---


def test_histogram_counts_values_at_or_below_each_bound() -> None:
    histogram = Histogram([1, 10])
    for value in (0.5, 1, 2, 10, 11):
        histogram.observe(value)
    assert histogram.cumulative() == [(1, 2), (10, 4), (float("inf"), 5)]
    assert (histogram.count, histogram.sum) == (5, 24.5)


def test_count_write_puts_each_depth_where_observe_would() -> None:
    stats = BrokerStats()
    expected = Histogram(stats.queue_depth.bounds)
    for depth in range(20000):
        stats.count_write(depth, 1, 10, None)
        expected.observe(depth)
    assert stats.queue_depth.counts == expected.counts
    assert stats.queue_depth.sum == expected.sum


def snapshot(peer: str, queued: int = 0, dropped: int = 0, age: float | None = None) -> Any:
    return ConnectionSnapshot(peer, "s", ("a.*",), queued, queued * 10, dropped, age, 0, 1.0)


def test_top_connections_ranks_by_the_chosen_key_worst_first() -> None:
    one, two, three = snapshot("1", 5, 0, 1.0), snapshot("2", 1, 9, None), snapshot("3", 2, 1, 7.0)
    assert top_connections([one, two, three], SortKey.QUEUE, 2) == [one, three]
    assert top_connections([one, two, three], SortKey.DROPS, 10) == [two, three, one]
    assert top_connections([one, two, three], SortKey.OLDEST, 1) == [three]


def test_describe_names_the_slow_subscriber_in_one_line() -> None:
    text = describe(ConnectionSnapshot("1.2.3.4:5", "bob", ("a", "b"), 3, 30, 7, 1.5, 9, 2.0))
    assert text == "peer=1.2.3.4:5 subject=bob subs=a,b queued=3 queued_bytes=30 dropped=7 " \
        "oldest=1.500s"  # fmt: skip
    assert format_subscriptions([f"t{n}" for n in range(7)]) == "t0,t1,t2,t3,t4,+2 more"
    assert format_subscriptions([]) == "-"


def test_metrics_config_is_off_without_a_port_and_validated() -> None:
    assert not config_from_dict({}).metrics.enabled
    config = config_from_dict({"metrics": {"port": 9100, "host": "0.0.0.0"}})
    assert config.metrics == MetricsConfig("0.0.0.0", 9100) and config.metrics.enabled
    assert config_from_dict({"metrics": {"port": 0}}).metrics.port == 0
    for table, key in [
        ({"port": 70000}, "metrics.port"),
        ({"port": "9100"}, "metrics.port"),
        ({"host": 1}, "metrics.host"),
        ({"path": "/m"}, "metrics.path"),
    ]:
        with pytest.raises(ConfigError, match=key):
            config_from_dict({"metrics": table})


async def test_two_brokers_in_one_process_keep_their_own_metrics(
    nursery: trio.Nursery,
) -> None:
    first = await start_broker(nursery, with_metrics(make_config()))
    second = await start_broker(nursery, with_metrics(make_config()))
    async with connect(first.url):
        await wait_until(lambda: len(first.connections) == 1)
        assert (await scrape(first))["broker_connections"] == 1
        assert (await scrape(second))["broker_connections"] == 0


async def test_readyz_and_backplane_gauge_report_an_unreachable_redis(
    nursery: trio.Nursery, unreachable_port: int
) -> None:
    config = with_metrics(make_config()).replace(
        cluster=ClusterConfig(backend=f"redis://127.0.0.1:{unreachable_port}/0")
    )
    broker = await start_broker(nursery, config)
    ready = await get(broker, "/readyz")
    assert ready.status_code == 503
    assert "backplane" in ready.text
    metrics = await scrape(broker)
    assert metrics["broker_backplane_up"] == 0
    assert metrics["broker_backplane_unwanted_messages_total"] == 0
