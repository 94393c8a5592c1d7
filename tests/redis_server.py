"""A real ``redis-server`` owned by one test: its own free port, no persistence, restartable."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from broker.cluster.resp import ConnectionLost, RedisAddress, RedisConnection

REDIS_SERVER = shutil.which("redis-server")


def free_port(*also: int) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, with the ports ``also`` above it.

    It is below the kernel's ephemeral range, which port 0 and every outgoing connection take
    from, so no test's client socket can take it before the server binds it, nor while it is
    restarted.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral = int(ranges.read().split()[0])
    top = ephemeral - max(also, default=0)
    for _ in range(1000):
        port = _ports.randrange(10000, top)
        try:
            for offset in (0, *also):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise AssertionError(f"no free port between 10000 and {top}")


_ports = random.Random()


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port``; :meth:`stop` and :meth:`start` again
    keep the port, so brokers see a Redis restart (with its data gone)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start the server and return once it answers PING."""
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (make test installs it)")
        options = f"--port {self.port} --bind 127.0.0.1 --appendonly no --loglevel warning"
        self.process = await trio.lowlevel.open_process(
            [REDIS_SERVER, *options.split(), "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        with trio.fail_after(10):
            while True:
                try:
                    connection = await RedisConnection.open(RedisAddress("127.0.0.1", self.port), 1)
                except (OSError, ConnectionLost):
                    await trio.sleep(0.02)
                    continue
                try:
                    if await connection.call("PING") == b"PONG":
                        return
                finally:
                    await connection.aclose()

    async def stop(self) -> None:
        """Kill the server (SIGKILL: its clients see their connections drop) and reap it."""
        if self.process is not None:
            self.process.kill()
            with trio.fail_after(10):
                await self.process.wait()
            self.process = None

    async def command(self, *args: str | int | bytes) -> object:
        """Run one command on a fresh connection (to inspect the server from a test)."""
        connection = await RedisConnection.open(RedisAddress("127.0.0.1", self.port), 5)
        try:
            with trio.fail_after(5):
                return await connection.call(*args)
        finally:
            await connection.aclose()


@asynccontextmanager
async def running_redis() -> AsyncIterator[RedisServer]:
    """A started :class:`RedisServer`, killed on the way out."""
    server = RedisServer()
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()
