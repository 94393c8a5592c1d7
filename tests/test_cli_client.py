"""``broker pub`` and ``broker sub`` as real processes, and the example, against a real broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from broker.config import AuthConfig, TokenGrant
from broker.io.server import Broker
from broker.operations.cli import parse_args
from broker_client import Client, connect
from tests.helpers import make_config, start_broker, wait_until

BROKER = [sys.executable, "-m", "broker"]
EXAMPLE = Path(__file__).parent.parent / "examples" / "publish_subscribe.py"


async def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*BROKER, *args], stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


async def test_pub_publishes_a_string_by_default(broker_client: Client) -> None:
    async with broker_client.subscribe("greetings") as sub:
        result = await run("pub", "greetings", "hello", "--url", broker_client.url)
        assert result.returncode == 0, result.stderr
        assert (result.stdout, result.stderr) == (b"", b"")
        with trio.fail_after(5):
            assert (await sub.receive()).data == "hello"


async def test_pub_json_count_and_stdin_lines(broker_client: Client) -> None:
    url = broker_client.url
    async with broker_client.subscribe("n") as sub:
        assert (
            await run("pub", "n", '{"id": 7}', "--json", "--count", "2", "--url", url)
        ).returncode == 0
        assert (await run("pub", "n", "--url", url, stdin=b"one\ntwo\n")).returncode == 0
        assert (await run("pub", "n", "--json", "--url", url, "--encoding", "json",
                          stdin=b"[1]\nnull\n")).returncode == 0  # fmt: skip
        with trio.fail_after(5):
            data = [(await sub.receive()).data for _ in range(6)]
    assert data == [{"id": 7}, {"id": 7}, "one", "two", [1], None]


async def test_sub_prints_topic_and_json_data_per_line(
    broker: Broker, broker_client: Client
) -> None:
    async with trio.open_nursery() as nursery:
        results: list[subprocess.CompletedProcess[bytes]] = []

        async def subscribe() -> None:
            results.append(await run("sub", "orders.*", "--count", "3", "--url", broker.url))

        nursery.start_soon(subscribe)
        await wait_until(lambda: any("orders.*" in c.subscriptions for c in broker.connections))
        await broker_client.publish("orders.created", {"id": 7})
        await broker_client.publish("orders.paid", "ok")
        await broker_client.publish("orders.blob", b"\x00\x01")
    (result,) = results
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        'orders.created {"id": 7}',
        'orders.paid "ok"',
        'orders.blob "AAE="',
    ]


async def test_sub_json_prints_one_object_per_line(broker: Broker, broker_client: Client) -> None:
    async with trio.open_nursery() as nursery:
        results: list[subprocess.CompletedProcess[bytes]] = []

        async def subscribe() -> None:
            results.append(await run("sub", "a.>", "--json", "--count", "1", "--url", broker.url))

        nursery.start_soon(subscribe)
        await wait_until(lambda: any("a.>" in c.subscriptions for c in broker.connections))
        await broker_client.publish("a.b.c", [1, 2])
    assert results[0].stdout == b'{"topic": "a.b.c", "sub": "a.>", "data": [1, 2]}\n'


async def test_unreachable_broker_is_one_line_and_exit_3(nursery: trio.Nursery) -> None:
    broker = await start_broker(nursery, make_config())
    url = broker.url
    broker.shutdown()
    await broker.wait_stopped()
    for command in (["pub", "x", "1"], ["sub", "x"]):
        result = await run(*command, "--url", url)
        assert result.returncode == 3
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"broker: cannot connect to {url}: ")


async def test_a_refused_connection_is_told_in_the_brokers_words_with_its_exit_status(
    nursery: trio.Nursery,
) -> None:
    capped = await start_broker(nursery, make_config(max_connections_per_ip=1))
    tokens = AuthConfig("tokens", (TokenGrant("t", "someone", subscribe=(">",)),))
    guarded = await start_broker(nursery, make_config().replace(auth=tokens))
    async with connect(capped.url):  # the one connection its address may have
        busy = await run("sub", "a", "--url", capped.url, "--connect-timeout", "0.3")
    assert busy.returncode == 5
    *retries, last = busy.stderr.decode().strip().splitlines()  # a line per retry, then why
    assert last == (
        f"broker: cannot connect to {capped.url}: the broker refused with HTTP 503: "
        "too many connections from 127.0.0.1 (max_connections_per_ip 1)"
    )
    assert all(line.startswith(f"connecting to {capped.url} failed: ") for line in retries)
    refused = await run("pub", "a", "1", "--url", guarded.url)
    assert refused.returncode == 4
    assert refused.stderr.decode().strip().endswith("HTTP 401: a token is required")
    assert "exit status:" in (await run("sub", "--help")).stdout.decode()


async def test_several_urls_land_on_the_one_that_serves(nursery: trio.Nursery) -> None:
    serving = await start_broker(nursery, make_config())
    gone = await start_broker(nursery, make_config())
    gone_url = gone.url
    gone.shutdown()
    await gone.wait_stopped()
    async with connect(serving.url) as reader, reader.subscribe("x") as sub:
        result = await run("pub", "x", "hi", "--url", gone_url, "--url", serving.url)
        assert result.returncode == 0, result.stderr
        with trio.fail_after(5):
            assert (await sub.receive()).data == "hi"


async def test_refused_publish_is_one_line_and_exit_1(broker_url: str) -> None:
    result = await run("pub", "orders.*", "1", "--url", broker_url)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "broker: invalid_topic: topic 'orders.*' contains a wildcard; publish to a concrete topic"
    ]


async def test_bad_json_data_is_a_usage_error(broker_url: str) -> None:
    result = await run("pub", "x", "{", "--json", "--url", broker_url)
    assert result.returncode == 2
    assert result.stderr.decode().startswith("broker: --json: '{' is not JSON")


def test_a_commands_flags_may_come_between_its_arguments() -> None:
    args = parse_args(["pub", "room.a", "--json", '{"a": 1}', "--count", "2"])
    assert (args.command, args.topic, args.data, args.json, args.count) == (
        "pub", "room.a", '{"a": 1}', True, 2,
    )  # fmt: skip
    assert parse_args(["pub", "--json", "room.a", "1"]).data == "1"
    assert parse_args(["pub", "room.a", "--json"]).data is None  # stdin lines


def test_an_unknown_flag_is_still_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["pub", "room.a", "--jsn", "1"])
    assert exited.value.code == 2
    assert "broker pub: error: unrecognized arguments: --jsn 1" in capsys.readouterr().err


async def test_help_explains_pub_and_sub() -> None:
    pub = (await run("pub", "--help")).stdout.decode()
    for flag in ("TOPIC", "DATA", "--json", "--count", "--url", "stdin"):
        assert flag in pub
    sub = (await run("sub", "--help")).stdout.decode()
    for flag in ("PATTERN", "--json", "--count", "--url"):
        assert flag in sub


async def test_example_runs_against_a_broker(broker_url: str) -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, str(EXAMPLE), broker_url], capture_stdout=True, capture_stderr=True
        )
    lines = result.stdout.decode().splitlines()
    assert lines == [
        "orders.created (matched orders.*): {'id': 0}",
        "orders.created (matched orders.*): {'id': 1}",
        "orders.created (matched orders.*): {'id': 2}",
        "done; the broker dropped 0 message(s) for us",
    ]
