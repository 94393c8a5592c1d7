"""``broker serve`` as a real process on free ports, for the examples that run against one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio


@dataclass
class BrokerProcess:
    """A running ``broker serve``: its WebSocket URL, its server API's (if on) and its log."""

    process: trio.Process
    url: str = ""
    api_url: str | None = None
    log: list[str] = field(default_factory=list)


async def _read_log(
    broker: BrokerProcess, api: bool, *, task_status: trio.TaskStatus[None]
) -> None:
    """Collect the log; report started once the broker listens (and its API, if ``api``)."""
    stream = broker.process.stderr
    assert stream is not None
    buffer = b""
    with trio.fail_after(20):
        while not broker.url or (api and broker.api_url is None):
            chunk = await stream.receive_some(4096)
            assert chunk, "the broker exited:\n" + "\n".join(broker.log) + buffer.decode()
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in (raw.decode() for raw in lines):
                broker.log.append(line)
                if "server API on " in line:
                    broker.api_url = line.split("server API on ", 1)[1].split(" ", 1)[0]
                if "listening on " in line:
                    broker.url = line.split("listening on ", 1)[1].split(" ", 1)[0]
    task_status.started()
    while chunk := await stream.receive_some(4096):
        broker.log.extend(chunk.decode(errors="replace").splitlines())


@asynccontextmanager
async def broker_process(config: str, directory: Path) -> AsyncIterator[BrokerProcess]:
    """``broker serve`` with the TOML ``config`` (its ports: 0 for free ones), until the end
    of the block (then SIGTERM, and SIGKILL if it does not stop)."""
    path = directory / "broker.toml"
    path.write_text(config)
    command = [sys.executable, "-m", "broker", "serve", "--config", str(path), "--port", "0"]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    broker = BrokerProcess(process)
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(_read_log, broker, "[api]" in config)
            yield broker
        finally:
            process.terminate()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
