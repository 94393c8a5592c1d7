"""``broker pub`` and ``broker sub`` as real processes, and the example, against a real broker."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from broker.config import AuthConfig, TokenGrant
from broker.io.server import Broker
from broker.operations.cli import parse_args
from broker.operations.cli_client import _parse_json
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
    assert all(line.startswith(f"broker: connecting to {capped.url} failed: ") for line in retries)
    refused = await run("pub", "a", "1", "--url", guarded.url)
    assert refused.returncode == 4
    assert refused.stderr.decode().splitlines() == [  # one line: not the library's too
        f"broker: unauthorized: cannot connect to {guarded.url}: the broker refused with HTTP 401: "
        "a token is required"
    ]
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


async def test_json_data_the_broker_cannot_carry_is_a_usage_error(broker_url: str) -> None:
    result = await run("pub", "x", "99999999999999999999999", "--json", "--url", broker_url)
    assert result.returncode == 2  # msgpack's OverflowError was a traceback
    assert result.stderr.decode().splitlines() == [
        "broker: --json: 99999999999999999999999 is outside what the broker carries (finite "
        "numbers; integers from -2**63 to 2**64-1)"
    ]
    assert _parse_json('{"n": [1, -9223372036854775808, 18446744073709551615]}', "--json")
    for text in ("NaN", "[1, -Infinity]", '{"big": 1e999}', "-9223372036854775809"):
        with pytest.raises(ValueError, match=r"^--json: "):
            _parse_json(text, "--json")  # NaN went out as null to JSON subscribers


async def test_a_ca_file_that_is_missing_or_not_pem_is_a_usage_error(tmp_path: Path) -> None:
    missing, url = tmp_path / "missing.pem", "wss://127.0.0.1:1"  # refused before connecting
    result = await run("pub", "x", "1", "--url", url, "--ca-file", str(missing))
    assert (result.returncode, result.stderr.decode()) == (
        2, f"broker: CA file {missing}: no such file\n",
    )  # fmt: skip
    (not_pem := tmp_path / "not.pem").write_text("hello")
    result = await run("sub", "x", "--url", url, "--ca-file", str(not_pem))
    assert result.returncode == 2
    assert result.stderr.decode().startswith(f"broker: CA file {not_pem}: not a readable PEM")


async def serve_http(nursery: trio.Nursery, body: bytes, content_type: str) -> str:
    """A one-page HTTP server on a free port (what a mistyped --url may point to); its URL."""

    async def answer(stream: trio.SocketStream) -> None:
        request = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in request and (chunk := await stream.receive_some()):
                request += chunk
            head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            await stream.send_all(head.encode() + body)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), answer, 0)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_a_url_that_is_not_a_broker_is_told_so_in_one_line(nursery: trio.Nursery) -> None:
    page = await serve_http(nursery, b"<html>\n<h1>Directory listing</h1>\n</html>\n", "text/html")
    result = await run("pub", "x", "1", "--url", f"ws://{page}/")
    assert result.returncode == 6
    assert result.stderr.decode().splitlines() == [  # not the whole page, 40 lines of it
        f"broker: cannot connect to ws://{page}/: it answered HTTP 200 instead of accepting a "
        "WebSocket: is it the broker's URL (not a web page, the metrics or the API port)? It "
        "said: <html>"
    ]
    other = await serve_http(nursery, b'{"status": "ok"}', "application/json")
    result = await run("stats", "--url", f"http://{other}")
    assert result.returncode == 1  # a KeyError traceback before
    assert result.stderr.decode() == (
        f"broker: http://{other}/connz?sort=queue&limit=10 is not a broker's /connz: is --url "
        "the broker's [metrics] listener (docs/metrics.md)?\n"
    )


async def test_pub_api_pointed_at_the_websocket_port_says_it_is_not_the_api(
    broker_url: str,
) -> None:
    api = broker_url.replace("ws://", "http://").rstrip("/")
    result = await run("pub", "x", "1", "--api", api, "--api-key", "k")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"broker: unknown: {api}/api/publish is not the broker's server API (HTTP 405: a "
        "WebSocket upgrade is a GET): is the URL its [api] listener (docs/api.md)?"
    ]


async def test_a_sub_over_the_brokers_max_message_size_ends_instead_of_looping(
    nursery: trio.Nursery,
) -> None:
    broker = await start_broker(nursery, make_config(server={"max_message_size": 2000}))
    result = await run("sub", "a." + "b" * 3000, "--url", broker.url)
    assert result.returncode == 1  # it reconnected and resubscribed 12 times a second, for ever
    assert result.stderr.decode().splitlines() == [
        "broker: too_large: the broker closed the connection with close code 1009: Exceeded "
        "maximum message size: 2000 bytes: this client sent a WebSocket message over the "
        "broker's server.max_message_size (a subscription or a frame too big, or "
        "max_message_size set higher than the broker's)"
    ]


def test_an_unknown_flag_before_the_command_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--bogus", "pub", "room.a", "1"])  # it was dropped, and the command ran
    assert exited.value.code == 2
    assert "broker: error: unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "soon"])
def test_a_connect_timeout_that_is_no_duration_is_a_usage_error(
    seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["pub", "room.a", "1", "--connect-timeout", seconds])
    assert exited.value.code == 2  # '0' failed every handshake, exit 3; the others said `seconds`
    assert (
        f"argument --connect-timeout: must be a number of seconds above 0, got '{seconds}'"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("flag", "value", "wanted"),
    [
        ("--timeout", "0", "a number of seconds above 0"),  # it printed EINPROGRESS
        ("--limit", "-3", "a whole number, 0 or more"),  # it was taken as 0
        ("--limit", "ten", "a whole number, 0 or more"),
    ],
)
def test_a_stats_limit_or_timeout_out_of_range_is_a_usage_error(
    flag: str, value: str, wanted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["stats", flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}: must be {wanted}, got '{value}'" in capsys.readouterr().err


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
