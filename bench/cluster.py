"""Cross-node throughput and latency next to single-node, with real broker processes.

    .venv/bin/python bench/cluster.py [--messages 20000] [--size 100]

Starts its own redis-server on a free port and three ``broker serve`` processes: ``single``
(no cluster) and the cluster nodes ``a`` and ``b``. For each case it measures, with one
publisher and one subscriber:

- throughput: the publisher sends ``--messages`` pubs without waiting (then one with an id),
  and the clock stops when the subscriber has them all;
- latency: one message at a time, the time from sending the pub to the subscriber reading it
  (both ends in this process, so one clock), as p50 / p99 over ``--rounds``;
- CPU per message during the throughput run, in microseconds, of the publisher's node, the
  subscriber's node (one figure when they are the same), Redis, and this process (both
  clients): on a shared machine the throughput varies from one minute to the next, the CPU a
  message costs much less. On two cores the throughput is about 2 / (their sum).

Cases: ``single`` (pub and sub on the single node), ``same node`` (both on cluster node a:
delivered locally, plus a PUBLISH to Redis), ``cross node`` (pub on b, sub on a: through
Redis); and each again on a topic that keeps history (``hist.>``, 1000 messages: on a cluster
node numbered in Redis by a Lua script, and delivered from Redis on every node).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.redis_server import running_redis
from tests.wire import connect


async def start_node(
    nursery: trio.Nursery, directory: Path, name: str, backend: str | None
) -> tuple[trio.Process, str]:
    path = directory / f"{name}.toml"
    cluster = f'[cluster]\nbackend = "{backend}"\nnode_id = "{name}"\n' if backend else ""
    path.write_text(f'{cluster}[limits]\nqueue_messages = 100000\nqueue_bytes = 1000000000\n'
                    f'[[topics]]\npattern = "hist.>"\nhistory_size = 1000\n')  # fmt: skip
    return await serve_node(nursery, path, name, redis=backend is not None)


async def serve_node(
    nursery: trio.Nursery, config: Path, name: str, *, redis: bool
) -> tuple[trio.Process, str]:
    """Start ``broker serve --config config`` on a free port; once it listens (and, with
    ``redis``, is connected to Redis), return it and its URL. Its warnings and errors are
    shown, prefixed with ``name``, while ``nursery`` runs."""
    command = [sys.executable, "-m", "broker", "serve", "--config", str(config), "--port", "0"]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    assert process.stderr is not None
    buffer, url, connected = b"", "", not redis
    with trio.fail_after(20):
        while not (url and connected):
            chunk = await process.stderr.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"{name} exited: {buffer.decode()}")
            buffer += chunk
            for line in buffer.decode().splitlines():
                if "listening on ws://" in line:
                    url = line.split("listening on ", 1)[1].split(" ", 1)[0]
                connected = connected or "connected to Redis" in line

    async def drain() -> None:  # and show what the node warns about
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some(65536):
            for line in chunk.decode(errors="replace").splitlines():
                if " WARNING " in line or " ERROR " in line:
                    print(f"[{name}] {line}", file=sys.stderr)

    nursery.start_soon(drain)
    return process, url


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput(pub_url: str, sub_url: str, topic: str, messages: int, size: int) -> float:
    async with connect(sub_url) as subscriber, connect(pub_url) as publisher:
        subscriber.timeout = 60
        await subscriber.subscribe(topic)
        payload = b"x" * size
        received = 0
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def publish() -> None:
                for first in range(0, messages, 500):
                    count = min(500, messages - first)
                    frames = [{"op": "pub", "topic": topic, "data": payload}] * count
                    await publisher.send(*frames)
                await publisher.publish(topic, b"", id=1)

            nursery.start_soon(publish)
            while received < messages + 1:
                frame = await subscriber.next()
                received += frame.get("op") == "msg"
        return messages / (trio.current_time() - start)


async def latency(pub_url: str, sub_url: str, topic: str, rounds: int, size: int) -> list[float]:
    async with connect(sub_url) as subscriber, connect(pub_url) as publisher:
        await subscriber.subscribe(topic)
        payload = b"x" * size
        samples = []
        for _ in range(rounds):
            start = trio.current_time()
            await publisher.send({"op": "pub", "topic": topic, "data": payload})
            await subscriber.expect("msg")
            samples.append(trio.current_time() - start)
        return samples


Node = tuple[trio.Process, str]


async def measure(
    name: str, publisher: Node, subscriber: Node, redis: int | None, args: argparse.Namespace
) -> None:
    history = name.endswith("history")
    pids = [publisher[0].pid] + ([subscriber[0].pid] if subscriber is not publisher else [])
    pids += [redis] if redis is not None else []
    pids.append(os.getpid())
    before = [cpu_seconds(pid) for pid in pids]
    topic = "hist.t" if history else "bench.t"
    rate = await throughput(publisher[1], subscriber[1], topic, args.messages, args.size)
    cpu = [
        (cpu_seconds(pid) - old) / args.messages * 1e6
        for pid, old in zip(pids, before, strict=True)
    ]
    topic = "hist.l" if history else "bench.l"
    samples = sorted(await latency(publisher[1], subscriber[1], topic, args.rounds, args.size))
    p50 = statistics.median(samples) * 1000
    p99 = samples[int(len(samples) * 0.99) - 1] * 1000
    print(f"{name:<20} {rate:>9,.0f} msg/s  p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  "
          f"CPU us/msg {' / '.join(f'{us:.0f}' for us in cpu)}")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    async with running_redis() as redis, trio.open_nursery() as nursery:
        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(scratch)
            single = await start_node(nursery, directory, "single", None)
            a = await start_node(nursery, directory, "a", redis.url)
            b = await start_node(nursery, directory, "b", redis.url)
            processes = [single[0], a[0], b[0]]
            try:
                print(f"{args.messages} messages of {args.size} bytes; {args.rounds} rounds; "
                      "CPU: publisher's node / subscriber's node / Redis / clients")  # fmt: skip
                assert redis.process is not None
                for kind in ("", ", history"):
                    await measure("single" + kind, single, single, None, args)
                    await measure("same node" + kind, a, a, redis.process.pid, args)
                    await measure("cross node" + kind, b, a, redis.process.pid, args)
            finally:
                for process in processes:
                    process.terminate()
                for process in processes:
                    await process.wait()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=500)
    trio.run(main, parser.parse_args())
