"""A real Redis Cluster owned by the tests: 3 masters and 3 replicas from ``redis-server`` on
free ports, in a temporary directory, made with ``redis-cli --cluster create``.

It is synchronous (plain processes), so one cluster can serve a whole test module; each test
keeps apart from the others with its own ``cluster.prefix``. A test that breaks the cluster
(:meth:`RedisCluster.kill`) starts its own.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from broker.cluster.slots import key_slot
from tests.redis_server import free_port

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

#: Milliseconds without an answer after which the cluster takes a master for failed: low, so
#: that a failover test waits about a second for the replica to take over.
NODE_TIMEOUT_MS = 500


class RedisCluster:
    """``masters`` masters, each with ``replicas`` replicas, on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.ports: list[int] = []
        while len(self.ports) < masters * (1 + replicas):
            port = free_port(10000)
            taken = {*self.ports, *(p + 10000 for p in self.ports)}
            if port not in taken and port + 10000 not in taken:
                self.ports.append(port)
        self.replicas = replicas
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self._directory = tempfile.TemporaryDirectory(prefix="redis-cluster-")

    @property
    def seeds(self) -> tuple[str, ...]:
        """The URLs of every node (the broker's ``cluster.seeds``)."""
        return tuple(f"redis://127.0.0.1:{port}" for port in self.ports)

    def start(self) -> None:
        """Start every node, make the cluster, and return once every node says it is ok."""
        if REDIS_SERVER is None or REDIS_CLI is None:
            pytest.skip("redis-server is not installed (make test installs it)")
        for port in self.ports:
            directory = Path(self._directory.name) / str(port)
            directory.mkdir()
            self.processes[port] = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                    "--cluster-replica-validity-factor",
                    "0",  # a replica may always take over
                    "--repl-diskless-sync-delay",
                    "0",  # replicas copy their master at once
                    "--dir",
                    str(directory),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
            )
        for port in self.ports:
            self._wait(lambda port=port: self.cli(port, "PING") == "PONG")
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
        self.wait_ok()

    def wait_ok(self, ports: list[int] | None = None) -> None:
        """Return once every running node (or those of ``ports``) has ``cluster_state:ok``
        and knows every slot's master as the others do."""
        for port in ports or list(self.processes):
            self._wait(lambda port=port: "cluster_state:ok" in self.cli(port, "CLUSTER", "INFO"))

    def cli(self, port: int, *args: str) -> str:
        """One command to one node through ``redis-cli``; its output ('' if it fails)."""
        assert REDIS_CLI is not None
        done = subprocess.run(
            [REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    def owners(self) -> list[tuple[int, int, int]]:
        """Every slot range and the port of its master, as the cluster says now."""
        ranges = []
        for line in self.cli(self.running[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            port = int(fields[1].split(":")[1].split("@")[0])
            for text in fields[8:]:
                low, _, high = text.partition("-")
                if low.isdigit():
                    ranges.append((int(low), int(high or low), port))
        return ranges

    def master_of(self, key: str, owners: list[tuple[int, int, int]] | None = None) -> int:
        """The port of the master that serves ``key``'s slot (from ``owners`` if given)."""
        slot = key_slot(key)
        for low, high, port in owners if owners is not None else self.owners():
            if low <= slot <= high:
                return port
        raise LookupError(f"no master serves slot {slot}")

    async def command(self, port: int, *args: str) -> str:
        """:meth:`cli` from a Trio task, without blocking the brokers running beside it."""
        return await trio.to_thread.run_sync(self.cli, port, *args)

    async def master(self, key: str) -> int:
        """:meth:`master_of` from a Trio task."""
        return await trio.to_thread.run_sync(self.master_of, key)

    @property
    def running(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def kill(self, port: int) -> None:
        """SIGKILL one node (a master: its replica takes over after the node timeout)."""
        process = self.processes[port]
        process.kill()
        process.wait(timeout=10)

    def stop(self) -> None:
        """Kill every node and remove the directory."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait(timeout=10)
        self._directory.cleanup()

    @staticmethod
    def _wait(condition: object, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while not condition():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not get ready in time")
            time.sleep(0.05)


@contextmanager
def running_cluster(masters: int = 3, replicas: int = 1) -> Iterator[RedisCluster]:
    """A started :class:`RedisCluster`, killed on the way out."""
    cluster = RedisCluster(masters, replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
