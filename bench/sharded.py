"""The sharded engine on a Redis Cluster: 1, 2 and 3 broker nodes, aggregate deliveries.

    .venv/bin/python bench/sharded.py [--messages 20000] [--topics 6] [--size 100]

Starts a Redis Cluster of three masters (no replicas) from redis-server on free ports, then,
for 1, 2 and 3 ``broker serve`` processes on it (``[cluster] seeds``): every node has one
subscriber, subscribed to ``--topics`` plain topics spread over the three shards, and one
publisher, which sends ``--messages`` pubs without waiting, round robin over the topics (then
one with an id). Every message reaches every node's subscriber: with N nodes, N x N x
messages deliveries, (N - 1) / N of them across nodes. It prints:

- aggregate deliveries/s (the clock stops when every subscriber has every message);
- cross-node latency p50/p99: one message at a time, published on the first node, read on
  the last (on the same node when there is one), over ``--rounds``;
- Redis CPU per message published (the three masters together, during the throughput run),
  and each broker node's CPU per delivery it made;
- the messages each node received from Redis that no local client wanted
  (``broker_backplane_unwanted_messages_total``): 0 for plain topics.

Then the same single-publisher, single-subscriber cross-node throughput as bench/cluster.py,
for comparing with one node.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster import cpu_seconds, latency, serve_node, throughput
from broker.cluster.slots import key_slot
from tests.redis_cluster import RedisCluster, running_cluster
from tests.redis_server import free_port
from tests.wire import WireClient, connect

Node = tuple[trio.Process, str, int]  # process, ws URL, metrics port


async def start_node(
    nursery: trio.Nursery, directory: Path, name: str, seeds: tuple[str, ...]
) -> Node:
    path = directory / f"{name}.toml"
    metrics = free_port()
    path.write_text(
        f"[cluster]\nseeds = [{', '.join(repr(s).replace(chr(39), chr(34)) for s in seeds)}]\n"
        f'node_id = "{name}"\n[metrics]\nport = {metrics}\n'
        "[limits]\nqueue_messages = 100000\nqueue_bytes = 1000000000\n"
    )
    process, url = await serve_node(nursery, path, name, redis=True)
    return process, url, metrics


def unwanted(node: Node) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{node[2]}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("broker_backplane_unwanted_messages_total"):
                return int(float(line.split()[-1]))
    return -1


def spread_topics(cluster: RedisCluster, count: int) -> list[str]:
    """``count`` topics whose shard keys are spread round robin over the masters."""
    masters: dict[int, list[str]] = {}
    owner: dict[tuple[int, int], int] = {}
    for line in cluster.cli(cluster.ports[0], "CLUSTER", "NODES").splitlines():
        fields = line.split()
        for ranges in fields[8:]:
            low, _, high = ranges.partition("-")
            owner[(int(low), int(high or low))] = int(fields[1].split(":")[1].split("@")[0])
    for n in range(10000):
        topic = f"b{n}.t"
        slot = key_slot("{broker:" + f"b{n}" + "}")
        port = next(p for (low, high), p in owner.items() if low <= slot <= high)
        masters.setdefault(port, []).append(topic)
        if all(len(t) >= count for t in masters.values()) and len(masters) == len(owner):
            break
    lists = list(masters.values())
    return [lists[i % len(lists)][i // len(lists)] for i in range(count)]


async def aggregate(nodes: list[Node], topics: list[str], args: argparse.Namespace) -> float:
    """Every node publishes ``args.messages`` over ``topics``; every node subscribes to all."""
    async with trio.open_nursery() as nursery:
        subscribers: list[WireClient] = []
        publishers: list[WireClient] = []
        for node in nodes:
            subscribers.append(await nursery.start(_client, node[1]))
            publishers.append(await nursery.start(_client, node[1]))
        for subscriber in subscribers:
            subscriber.timeout = 120
            for topic in topics:
                await subscriber.subscribe(topic)
        payload = b"x" * args.size
        expected = len(nodes) * (args.messages + 1)
        start = trio.current_time()

        async def publish(publisher: WireClient) -> None:
            for first in range(0, args.messages, 500):
                count = min(500, args.messages - first)
                frames = [{"op": "pub", "topic": topics[(first + i) % len(topics)],
                           "data": payload} for i in range(count)]  # fmt: skip
                await publisher.send(*frames)
            await publisher.publish(topics[0], b"", id=1)

        async def receive(subscriber: WireClient) -> None:
            received = 0
            while received < expected:
                frame = await subscriber.next()
                received += frame.get("op") == "msg"

        async with trio.open_nursery() as inner:
            for publisher in publishers:
                inner.start_soon(publish, publisher)
            for subscriber in subscribers:
                inner.start_soon(receive, subscriber)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    return len(nodes) * len(nodes) * args.messages / elapsed


async def _client(url: str, *, task_status: trio.TaskStatus[WireClient]) -> None:
    async with connect(url) as client:
        task_status.started(client)
        await trio.sleep_forever()


async def measure(
    used: list[Node], topics: list[str], redis_pids: list[int], args: argparse.Namespace
) -> None:
    count = len(used)
    pids = [node[0].pid for node in used]
    before_redis = sum(cpu_seconds(pid) for pid in redis_pids)
    before = [cpu_seconds(pid) for pid in pids]
    before_unwanted = [unwanted(node) for node in used]
    rate = await aggregate(used, topics, args)
    published = count * args.messages
    redis_us = (sum(cpu_seconds(pid) for pid in redis_pids) - before_redis) / published * 1e6
    deliveries_per_node = published  # every node delivers every message once
    node_us = [
        (cpu_seconds(pid) - old) / deliveries_per_node * 1e6
        for pid, old in zip(pids, before, strict=True)
    ]
    samples = sorted(await latency(used[0][1], used[-1][1], topics[1], args.rounds, args.size))
    p50 = statistics.median(samples) * 1000
    p99 = samples[int(len(samples) * 0.99) - 1] * 1000
    extra = [unwanted(node) - old for node, old in zip(used, before_unwanted, strict=True)]
    where = "cross" if count > 1 else "same"
    print(f"{count} node(s): {rate:>9,.0f} deliveries/s  {where}-node p50 {p50:.2f} ms "
          f"p99 {p99:.2f} ms  Redis {redis_us:.1f} us/msg  node CPU us/delivery "
          f"{' / '.join(f'{us:.1f}' for us in node_us)}  unwanted {extra}")  # fmt: skip


async def pair(
    publisher: Node, subscriber: Node, topic: str, redis_pids: list[int], args: argparse.Namespace
) -> None:
    """bench/cluster.py's cross-node case: one publisher, one subscriber on another node."""
    pids = [publisher[0].pid, subscriber[0].pid]
    before = [cpu_seconds(pid) for pid in pids]
    before_redis = sum(cpu_seconds(pid) for pid in redis_pids)
    rate = await throughput(publisher[1], subscriber[1], topic, args.pairs, args.size)
    cpu = [
        (cpu_seconds(pid) - old) / args.pairs * 1e6 for pid, old in zip(pids, before, strict=True)
    ]
    redis_us = (sum(cpu_seconds(pid) for pid in redis_pids) - before_redis) / args.pairs * 1e6
    print(f"one publisher on n1, one subscriber on n0: {rate:,.0f} msg/s  CPU us/msg: "
          f"pub node {cpu[0]:.1f} / sub node {cpu[1]:.1f} / Redis {redis_us:.1f}")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    with running_cluster(masters=3, replicas=0) as cluster:
        topics = spread_topics(cluster, args.topics)
        redis_pids = [process.pid for process in cluster.processes.values()]
        print(f"Redis Cluster of 3 masters; {args.topics} plain topics over them; "
              f"{args.messages} messages of {args.size} bytes per publisher")  # fmt: skip
        async with trio.open_nursery() as nursery:
            with tempfile.TemporaryDirectory() as scratch:
                directory = Path(scratch)
                nodes = [await start_node(nursery, directory, f"n{i}", cluster.seeds)
                         for i in range(3)]  # fmt: skip
                try:
                    for count in (1, 2, 3):
                        await measure(nodes[:count], topics, redis_pids, args)
                    await pair(nodes[1], nodes[0], topics[2], redis_pids, args)
                finally:
                    for node in nodes:
                        node[0].terminate()
                    for node in nodes:
                        await node[0].wait()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--topics", type=int, default=6)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=20000, help="messages, one pub, one sub")
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    trio.run(main, parser.parse_args())
