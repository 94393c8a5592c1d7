"""The broker's life: keep-alive, graceful shutdown, and the daemon as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from wsproto.events import Ping

from tests.helpers import make_config, start_broker, wait_until
from tests.rawsocket import RawClient, open_raw, stuck_subscriber
from tests.wire import connect

PYTHON = [sys.executable, "-m", "broker"]


async def test_peer_that_never_answers_pings_is_closed(nursery: trio.Nursery) -> None:
    config = make_config(server={"ping_interval": 0.05, "ping_timeout": 0.1, "drain_timeout": 0.2})
    broker = await start_broker(nursery, config)
    assert broker.port is not None
    raw = await open_raw(broker.port)
    assert isinstance(raw, RawClient)
    with trio.fail_after(5):
        await raw.wait_eof()  # it never feeds wsproto, so it never pongs
    await wait_until(lambda: not broker.connections)


async def test_peer_that_answers_pings_stays_connected(nursery: trio.Nursery) -> None:
    config = make_config(server={"ping_interval": 0.02, "ping_timeout": 0.5})
    broker = await start_broker(nursery, config)
    assert broker.port is not None
    raw = await open_raw(broker.port)
    assert isinstance(raw, RawClient)
    pings = 0
    with trio.fail_after(10):  # the pinger's wheel turns every 0.25 s: about 0.6 s a ping
        while pings < 3:  # well past ping_timeout, answered each time
            for event in await raw.events():
                if isinstance(event, Ping):
                    pings += 1
                    await raw.stream.send_all(raw.ws.send(event.response()))
    [connection] = broker.connections
    # A ping a full socket takes only part of is finished by the connection's writer
    # (tests/test_websocket.py has the socket that refuses it).
    assert connection.websocket.wake_writer == connection.queue.wake_writer


async def test_shutdown_flushes_queued_messages_then_closes_with_1001(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, make_config())
    async with connect(broker.url) as sub:
        await sub.subscribe("news")
        async with connect(broker.url) as pub:
            for n in range(50):
                await pub.send({"op": "pub", "topic": "news", "data": n})
            await pub.publish("news", "last", id=99)  # all 51 are queued for sub now
            broker.shutdown()
            received = [(await sub.expect("msg"))["data"] for _ in range(51)]
            assert received == [*range(50), "last"]
            assert await sub.expect_close() == 1001
            assert await pub.expect_close() == 1001
    with trio.fail_after(5):
        await broker.wait_stopped()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", broker.port or 0)


async def start_daemon(*args: str) -> tuple[trio.Process, str, bytearray]:
    """Run ``broker serve`` on a free port; return the process, its URL and its stderr so far."""
    process = await trio.lowlevel.open_process(
        [*PYTHON, "serve", "--port", "0", *args], stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    log = bytearray()
    with trio.fail_after(20):
        while b"listening on " not in log:
            chunk = await process.stderr.receive_some()
            assert chunk, f"broker exited early: {log.decode()}"
            log += chunk
    url = log.decode().split("listening on ", 1)[1].split()[0]
    return process, url, log


async def read_rest(process: trio.Process, log: bytearray) -> str:
    assert process.stderr is not None
    while chunk := await process.stderr.receive_some():
        log += chunk
    return log.decode()


async def test_daemon_serves_and_exits_0_on_sigterm_closing_clients_with_1001() -> None:
    process, url, log = await start_daemon("--log-level", "info")
    try:
        async with connect(url) as client:
            await client.subscribe("chat.*")
            process.send_signal(signal.SIGHUP)  # no reload: logged, and served through
            assert process.stderr is not None
            with trio.fail_after(10):
                while b"received SIGHUP" not in log:
                    log += await process.stderr.receive_some()
            await client.publish("chat.a", "hi", id=2)
            await client.expect("msg", data="hi")
            process.send_signal(signal.SIGTERM)
            client.timeout = 10
            assert await client.expect_close() == 1001
        with trio.fail_after(10):
            text = await read_rest(process, log)
            assert await process.wait() == 0
    finally:
        process.kill()
    assert "connect peer=127.0.0.1" in text
    assert "code=1001" in text
    assert "received SIGTERM" in text


async def test_daemon_logs_json_lines_when_asked() -> None:
    process, _, log = await start_daemon("--log-format", "json")
    process.send_signal(signal.SIGINT)
    with trio.fail_after(10):
        text = await read_rest(process, log)
        assert await process.wait() == 0

    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["msg"].startswith("listening on ws://127.0.0.1:")
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])


BAD_CONFIGS = [
    ("[server]\nportt = 1\n", "server.portt: unknown key"),
    ("[limits]\nqueue_messages = 'many'\n", "limits.queue_messages: expected an integer"),
    ("[limits]\nslow_timeout = -1\n", "limits.slow_timeout: must be greater than 0"),
    ("[[topics]]\npattern = 'a.>.b'\non_full = 'block'\n", "topics[0].pattern"),
    ("[[topics]]\npattern = 'a.>'\non_full = 'drop_everything'\n", "topics[0].on_full"),
    ("[server\n", "not valid TOML"),
    ("[log]\nlevel = 'loud'\n", "log.level"),
]


@pytest.mark.parametrize(("content", "expected"), BAD_CONFIGS)
async def test_bad_config_stops_startup_with_one_line_and_exit_2(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(content)
    result = await trio.run_process(
        [*PYTHON, "serve", "--config", str(path)], capture_stdout=True, capture_stderr=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("broker: config error: ")
    assert expected in lines[0]


async def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = await trio.run_process(
        [*PYTHON, "serve", "--config", str(tmp_path / "nope.toml")],
        capture_stderr=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert b"no such file" in result.stderr


async def test_example_config_is_valid() -> None:
    from broker.config import load_config

    config = load_config(Path(__file__).parent.parent / "config" / "broker.toml")
    assert config.server.port == 8765


async def test_busy_port_is_one_line_and_exit_1(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, make_config())
    result = await trio.run_process(
        [*PYTHON, "serve", "--port", str(broker.port)], capture_stderr=True, check=False
    )
    assert result.returncode == 1
    assert result.stderr.decode().strip().startswith("broker: cannot listen on 127.0.0.1:")
    assert len(result.stderr.decode().strip().splitlines()) == 1


async def test_help_explains_serve() -> None:
    result = await trio.run_process([*PYTHON, "serve", "--help"], capture_stdout=True)
    text = result.stdout.decode()
    for flag in ("--config", "--host", "--port", "--log-level", "--log-format"):
        assert flag in text


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    from broker.operations.cli import build_parser, config_from_args

    path = tmp_path / "broker.toml"
    path.write_text('[server]\nhost = "0.0.0.0"\nport = 9000\n[log]\nlevel = "debug"\n')
    args = build_parser().parse_args(["serve", "--config", str(path), "--port", "9100"])
    config = config_from_args(args)
    assert (config.server.host, config.server.port, config.log.level) == ("0.0.0.0", 9100, "debug")
    assert os.fspath(config.path or "") == str(path)


async def test_the_disconnect_log_counts_the_subscriptions_the_client_held(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await start_broker(nursery, make_config())
    caplog.set_level("INFO", logger="broker.server")
    async with connect(broker.url) as client:
        await client.subscribe("a.*", id=1)
        await client.subscribe("b", id=2)
    await wait_until(lambda: not broker.connections)
    assert any("subs=2 " in record.getMessage() for record in caplog.records)


def connection_tasks() -> int:
    """The tasks serving connections: each one's own (trio's ``_run_handler``) and those it
    started."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, nurseries = 0, list(root.child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            if task.name.endswith("._run_handler"):
                count += 1 + sum(len(n.child_tasks) for n in task.child_nurseries)
            else:
                nurseries += task.child_nurseries
    return count


async def test_an_idle_connection_is_one_task_and_a_writer_runs_only_while_needed(
    nursery: trio.Nursery,
) -> None:
    # Memory per idle connection (issue 22): the reader is the connection's task; a writer
    # is started only while a direct write cannot do, and ends when nothing is queued.
    broker = await start_broker(nursery, make_config())
    assert broker.port is not None
    stuck = await stuck_subscriber(broker.port, "big")  # tiny receive buffer, not reading
    async with connect(broker.url) as subscriber, connect(broker.url) as publisher:
        await subscriber.subscribe("small")
        await trio.testing.wait_all_tasks_blocked()
        assert connection_tasks() == 3
        for n in range(200):
            await publisher.send({"op": "pub", "topic": "small", "data": n})
        received: list[int] = []
        while len(received) < 200:
            received += [frame["data"] for frame in await subscriber.receive_batch()]
        assert received == list(range(200))
        await trio.testing.wait_all_tasks_blocked()
        assert connection_tasks() == 3
        big = b"x" * 900_000
        for n in range(6):  # 5.4 MB: more than the socket buffers can hold (4 MiB at most)
            await publisher.publish("big", big, id=n + 1)
        await trio.testing.wait_all_tasks_blocked()
        assert connection_tasks() == 4  # a writer waits to send the rest
        frames: list[dict[str, object]] = []
        with trio.fail_after(10):
            while len(frames) < 6:
                frames += (await stuck.read_frames())[0]
        assert [frame["data"] for frame in frames] == [big] * 6
        await trio.testing.wait_all_tasks_blocked()
        assert connection_tasks() == 3  # it ended with the queue empty
