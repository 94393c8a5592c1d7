"""The broker's Prometheus metrics, read from its plain counters at scrape time.

:class:`BrokerCollector` is a ``prometheus_client`` custom collector: nothing on the message
path calls ``prometheus_client`` (its metric objects take a lock per update); the broker
counts in :class:`~broker.core.stats.BrokerStats` and current state is read off the broker when
Prometheus asks. Each broker has its own :class:`~prometheus_client.CollectorRegistry`
(:func:`broker_registry`), so several brokers in one process do not clash.

Labels have a bounded set of values (a reason, a result code, a policy): never a topic, a
client or a subject. ``docs/metrics.md`` lists every metric; the process's own figures
(``process_*``, ``python_info``) come from prometheus_client's collectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from broker.core.outbound import Policy
from broker.core.stats import Histogram
from broker.protocol.codes import ErrorCode

if TYPE_CHECKING:
    from broker.io.server import Broker

# Label values reported even while zero, so that dashboards and rate() see them from the start.
REJECT_REASONS = ("shutting_down", "max_connections", "max_connections_per_ip", "origin",
                  "unauthorized", "forbidden", "subprotocol",
                  "identity_max_connections")  # fmt: skip
HANDSHAKE_FAILURES = ("timeout", "dropped", "bad_request", "gone")
PUBLISH_RESULTS = ("ok", ErrorCode.TOO_LARGE, ErrorCode.RATE_LIMITED, ErrorCode.FORBIDDEN,
                   ErrorCode.INTERNAL)  # fmt: skip
DROP_POLICIES = (Policy.DROP_OLDEST, Policy.DROP_NEWEST, Policy.CONFLATE)


class BrokerCollector:
    """Collects one :class:`~broker.io.server.Broker`'s metrics when scraped."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        """Every metric of ``docs/metrics.md``, as of now."""
        broker, stats = self.broker, self.broker.stats
        yield _gauge("broker_ready", "1 if the broker accepts connections (see /readyz).",
                     1 if broker.ready()[0] else 0)  # fmt: skip
        status = broker.delivery.status()
        if status is not None:  # a cluster
            yield _gauge("broker_backplane_up", "1 while the Redis cluster backplane is connected.",
                         1 if status[0] else 0)  # fmt: skip
            unwanted = getattr(broker.delivery, "unwanted", None)
            if unwanted is not None:
                yield _counter("broker_backplane_unwanted_messages",
                               "Messages this node received from Redis that no local "
                               "subscription wanted (a glob matching more than its pattern, or "
                               "one on its way when the last subscriber left).",
                               unwanted)  # fmt: skip
        yield _gauge("broker_connections", "Client connections open now.", len(broker.connections))
        yield _counter("broker_connections_accepted", "Client connections accepted.",
                       stats.connections_accepted)  # fmt: skip
        yield _labelled(
            "broker_connections_rejected",
            "Handshakes refused, by reason.",
            "reason",
            stats.connections_rejected,
            REJECT_REASONS,
        )
        yield _labelled(
            "broker_handshakes_failed",
            "Connections that never became a WebSocket: no request within handshake_timeout, "
            "dropped for a newer one over max_handshakes, a bad request, or the peer gone.",
            "reason",
            stats.handshakes_failed,
            HANDSHAKE_FAILURES,
        )
        yield _counter("broker_internal_errors",
                       "Broker bugs contained to one connection (each closed it, or dropped "
                       "its handshake, with the traceback logged).",
                       stats.internal_errors)  # fmt: skip
        yield _gauge("broker_subscriptions", "Subscriptions over all connections now.",
                     broker.hub.subscription_count())  # fmt: skip
        presence = broker.delivery.presence
        yield _gauge("broker_presence_members",
                     "Presence members held by this node's connections, over all topics.",
                     presence.members)  # fmt: skip
        yield _gauge("broker_presence_topics", "Topics with presence members on this node.",
                     presence.topics)  # fmt: skip
        yield _counter("broker_messages_in", "pub frames received (whatever their result).",
                       stats.frames_in)  # fmt: skip
        yield _counter("broker_bytes_in", "WebSocket message bytes received from clients.",
                       stats.bytes_in)  # fmt: skip
        yield _labelled(
            "broker_publishes",
            "pub frames by result: ok, or the err code they were refused with.",
            "result",
            stats.publishes,
            PUBLISH_RESULTS,
        )
        yield _counter("broker_messages_out", "msg frames written to subscribers.",
                       stats.messages_out)  # fmt: skip
        yield _counter("broker_bytes_out", "WebSocket message bytes written to clients.",
                       stats.bytes_out)  # fmt: skip
        yield _labelled(
            "broker_messages_dropped",
            "Messages dropped or replaced in a full outbound queue, by on_full policy.",
            "policy",
            stats.drops,
            DROP_POLICIES,
        )
        yield _counter("broker_slow_consumer_disconnects",
                       "Subscribers closed with 4002 (slow consumer).",
                       stats.slow_consumer_disconnects)  # fmt: skip
        queued = sum(len(connection.queue) for connection in broker.connections)
        yield _gauge("broker_outbound_queued", "Frames queued for all clients now.", queued)
        yield _histogram(
            "broker_outbound_queue_depth",
            "Frames in a client's outbound queue each time its writer takes a batch.",
            stats.queue_depth,
        )
        yield _histogram(
            "broker_fanout_latency_seconds",
            "Per batch written, seconds from the publish of its oldest message to the write.",
            stats.fanout_latency,
        )
        yield _counter("broker_history_reads", "history ops answered (a refill is a series).",
                       stats.history_reads)  # fmt: skip
        yield _counter("broker_history_read_messages", "Messages carried by history answers.",
                       stats.history_messages)  # fmt: skip
        yield from _history(broker)
        if broker.config.api.enabled:
            yield _api_requests(broker)


def broker_registry(broker: Broker) -> CollectorRegistry:
    """A fresh registry holding ``broker``'s collector and prometheus_client's process and
    platform collectors (CPU seconds, resident memory, open file descriptors, start time,
    the Python version); the global registry is left alone."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled(
    name: str, documentation: str, label: str, counts: Mapping[str, int], known: tuple[str, ...]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value in sorted({*known, *counts}):
        family.add_metric([str(value)], counts.get(value, 0))
    return family


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if bound == float("inf") else repr(float(bound)), count)
               for bound, count in histogram.cumulative()]  # fmt: skip
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum)


def _api_requests(broker: Broker) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "broker_api_requests",
        "Server API requests answered, by endpoint (or 'other') and HTTP status.",
        labels=["endpoint", "status"],
    )
    for (endpoint, status), count in sorted(broker.api_requests.items()):
        family.add_metric([endpoint, str(status)], count)
    return family


def _history(broker: Broker) -> Iterator[Metric]:
    statistics = getattr(broker.delivery.history, "statistics", None)  # the in-memory store
    if statistics is None:
        return
    kept: dict[str, int] = statistics()
    yield _gauge("broker_history_topics", "Topics with kept history.", kept["topics"])
    yield _gauge("broker_history_messages", "Messages kept in history.", kept["messages"])
    yield _gauge("broker_history_bytes", "Bytes of history counted against history.max_bytes.",
                 kept["bytes"])  # fmt: skip
    yield _counter("broker_history_evicted_topics",
                   "Topics evicted whole to stay under history.max_bytes.",
                   kept["evicted_topics"])  # fmt: skip
