"""Unit tests for broker.config and the config errors of the ``broker`` command."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.config import (
    Config,
    ConfigError,
    HistoryConfig,
    LimitsConfig,
    LogConfig,
    ServerConfig,
    config_from_dict,
    load_config,
)
from broker.core.outbound import Policy
from broker.core.rules import HistoryLimits, TopicRule
from broker.io.server import Broker
from broker.operations.cli import main

EXAMPLE = Path(__file__).parent.parent / "config" / "broker.toml"


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "broker.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults and the example ---------------------------------------------------------------


def test_no_file_gives_the_documented_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8765)
    assert config.server.max_message_size == 1024 * 1024
    assert (config.server.ping_interval, config.server.ping_timeout) == (20.0, 20.0)
    assert config.limits.max_subscriptions == 1024
    assert (config.limits.queue_messages, config.limits.queue_bytes) == (1024, 8 * 1024 * 1024)
    assert config.limits.slow_timeout == 5.0
    assert config.topics == ()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path) == Config(path=path)


def test_the_internet_facing_example_is_valid_and_asks_for_its_files() -> None:
    config = load_config(EXAMPLE.parent / "internet.toml")
    limits = config.limits
    assert limits.max_connections_per_ip == 200 and limits.publish_rate == 20
    assert config.auth.mode == "jwt" and config.auth.jwt.limits_claim == "limits"
    assert config.server.allowed_origins and config.metrics.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="public_key_file"):  # CHANGE ME paths
        Broker(config)


def test_defaults_cap_no_address_and_no_publish_rate() -> None:
    limits = LimitsConfig()
    assert limits.max_connections_per_ip == 0
    assert (limits.publish_rate, limits.publish_bytes_rate) == (0, 0)
    assert limits.max_connections == 65536


def test_example_config_loads_and_sets_every_key_to_its_default() -> None:
    config = load_config(EXAMPLE)
    assert config.server == ServerConfig()
    assert config.limits == LimitsConfig()
    assert config.log == LogConfig()
    assert config.topics == (
        TopicRule("ticks.>", Policy.DROP_OLDEST),
        TopicRule("prices.*", Policy.CONFLATE),
        TopicRule("chat.>", Policy.BLOCK, HistoryLimits(size=1000, ttl=3600.0), presence=True),
    )
    assert config.history == HistoryConfig()
    assert config.path == EXAMPLE


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    for section in (ServerConfig, LimitsConfig, LogConfig):
        for field in dataclasses.fields(section):
            assert f"\n{field.name} = " in text, field.name


def test_values_are_read_and_integers_allowed_for_seconds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        host = "0.0.0.0"
        port = 0
        ping_interval = 1
        [limits]
        queue_messages = 3
        slow_timeout = 0.25
        [log]
        level = "debug"
        format = "json"
        [[topics]]
        pattern = "a.*"
        [[topics]]
        pattern = "b.>"
        on_full = "disconnect"
        """,
    )
    config = load_config(path)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 0)
    assert config.server.ping_interval == 1.0
    assert isinstance(config.server.ping_interval, float)
    assert (config.limits.queue_messages, config.limits.slow_timeout) == (3, 0.25)
    assert (config.log.level, config.log.format) == ("debug", "json")
    assert config.topics == (TopicRule("a.*", Policy.BLOCK), TopicRule("b.>", Policy.DISCONNECT))


def test_every_policy_name_is_accepted() -> None:
    rules = [{"pattern": f"t{i}", "on_full": policy.value} for i, policy in enumerate(Policy)]
    assert [rule.on_full for rule in config_from_dict({"topics": rules}).topics] == list(Policy)


def test_config_is_frozen_and_replace_makes_a_copy() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    changed = config.replace(server=ServerConfig(port=1))
    assert (config.server.port, changed.server.port) == (8765, 1)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"sever": {}}, "sever: unknown key"),
        ({"server": {"prot": 1}}, "server.prot: unknown key"),
        ({"limits": {"queue_size": 1}}, "limits.queue_size: unknown key"),
        ({"log": {"colour": "auto"}}, "log.colour: unknown key"),
        ({"topics": [{"pattern": "a", "policy": "block"}]}, "topics[0].policy: unknown key"),
    ],
)
def test_unknown_key_is_named(raw: dict[str, Any], key: str) -> None:
    assert error_of(raw).startswith(key)


def test_unknown_key_error_lists_the_known_keys() -> None:
    known = "known here: api, auth, cluster, history, limits, log, metrics, server, tls, topics"
    assert known in error_of({"x": 1})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"server": {"port": "8765"}}, "server.port: expected an integer, got '8765'"),
        ({"server": {"port": 80.0}}, "server.port: expected an integer, got 80.0"),
        ({"server": {"host": 127}}, "server.host: expected a string, got 127"),
        ({"limits": {"queue_bytes": 1.5}}, "limits.queue_bytes: expected an integer, got 1.5"),
        ({"limits": {"slow_timeout": "5s"}}, "limits.slow_timeout: expected a number"),
        ({"log": {"level": 1}}, "log.level: expected a string, got 1"),
        ({"server": []}, "server: expected a table ([server])"),
        ({"limits": 3}, "limits: expected a table ([limits])"),
        ({"topics": {"pattern": "a"}}, "topics: expected an array of tables ([[topics]])"),
        ({"topics": ["a.>"]}, "topics[0]: expected a table"),
    ],
)
def test_wrong_type_is_named(raw: dict[str, Any], expected: str) -> None:
    assert error_of(raw).startswith(expected)


@pytest.mark.parametrize(
    ("section", "key"),
    [("server", "port"), ("limits", "queue_messages"), ("limits", "slow_timeout")],
)
def test_bool_is_not_a_number(section: str, key: str) -> None:
    assert error_of({section: {key: True}}).startswith(f"{section}.{key}: expected")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"server": {"port": 65536}}, "server.port: 65536 is not a TCP port (0..65535)"),
        ({"server": {"port": -1}}, "server.port: -1 is not a TCP port (0..65535)"),
        ({"server": {"max_message_size": 0}}, "server.max_message_size: must be greater than 0"),
        ({"server": {"drain_timeout": -1.0}}, "server.drain_timeout: must be greater than 0"),
        ({"limits": {"queue_messages": -5}}, "limits.queue_messages: must be greater than 0"),
        ({"limits": {"slow_timeout": 0}}, "limits.slow_timeout: must be greater than 0"),
        ({"limits": {"slow_timeout": float("nan")}}, "limits.slow_timeout: must be greater"),
        ({"limits": {"publish_rate": float("inf")}}, "limits.publish_rate: must be finite"),
        ({"server": {"ping_interval": float("inf")}}, "server.ping_interval: must be finite"),
        ({"log": {"level": "verbose"}}, "log.level: 'verbose' is not one of debug, info, warn"),
        ({"log": {"format": "xml"}}, "log.format: 'xml' is not one of text, json"),
    ],
)
def test_out_of_range_value_is_named(raw: dict[str, Any], expected: str) -> None:
    assert error_of(raw).startswith(expected)


@pytest.mark.parametrize("pattern", ["", "a..b", "a.>.b", "a*", "a b"])
def test_bad_topic_pattern_is_named(pattern: str) -> None:
    message = error_of({"topics": [{"pattern": "ok.>"}, {"pattern": pattern}]})
    assert message.startswith("topics[1].pattern: ")


def test_a_pattern_given_twice_is_refused_since_its_second_rule_never_applies() -> None:
    message = error_of({"topics": [{"pattern": "a.>"}, {"pattern": "b"}, {"pattern": "a.>"}]})
    assert message == (
        "topics[2].pattern: 'a.>' is topics[0]'s pattern already; this rule would never apply "
        "(merge the two)"
    )


@pytest.mark.parametrize("table", [{}, {"pattern": 5}, {"on_full": "block"}])
def test_missing_topic_pattern_is_named(table: dict[str, Any]) -> None:
    assert error_of({"topics": [table]}).startswith("topics[0].pattern: required")


def test_a_topic_rule_may_keep_presence_and_says_so_when_mistyped() -> None:
    config = config_from_dict({"topics": [{"pattern": "room.>", "presence": True}]})
    assert config.topics[0].presence is True
    message = error_of({"topics": [{"pattern": "room.>", "presence": "yes"}]})
    assert message.startswith("topics[0].presence: expected true or false")
    assert config_from_dict({"cluster": {"presence_ttl": 5}}).cluster.presence_ttl == 5
    assert error_of({"cluster": {"presence_ttl": 0}}).startswith("cluster.presence_ttl: must be")


@pytest.mark.parametrize("on_full", ["drop", "BLOCK", "", 1, ["block"]])
def test_bad_policy_name_is_named_with_the_choices(on_full: Any) -> None:
    message = error_of({"topics": [{"pattern": "a", "on_full": on_full}]})
    assert message.startswith(f"topics[0].on_full: {on_full!r} is not a policy")
    assert "block, drop_oldest, drop_newest, conflate, disconnect" in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file$"):
        load_config(path)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory: root can read any file, not a directory


@pytest.mark.parametrize(
    "text",
    [
        "[server\nport = 1",
        "[server]\nport = 1\nport = 2",
        "[server]\nport = ",
        "port 8765",
        b"[log]\nlevel = '\xff'\n",  # TOML is UTF-8
    ],
)
def test_bad_toml_is_a_config_error(tmp_path: Path, text: str | bytes) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not valid TOML: ")


def test_file_errors_are_prefixed_with_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nqueue_messages = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: limits.queue_messages: must be greater than 0, got 0"


# --- the command ----------------------------------------------------------------------------


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    status = main(list(argv))
    captured = capsys.readouterr()
    assert captured.out == ""
    return status, captured.err.splitlines()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[server]\nport = 'x'\n", "server.port"),
        ("[limits]\nslow_timeout = -1\n", "limits.slow_timeout"),
        ("[[topics]]\npattern = 'a.>.b'\n", "topics[0].pattern"),
        ("[[topics]]\npattern = 'a'\non_full = 'drop'\n", "topics[0].on_full"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_cli_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    path = write(tmp_path, text)
    status, lines = run_main(capsys, "serve", "--config", str(path))
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"broker: config error: {path}: ")
    assert named in lines[0]


def test_cli_missing_config_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = run_main(capsys, "serve", "--config", str(tmp_path / "missing.toml"))
    assert (status, len(lines)) == (2, 1)
    assert "no such file" in lines[0]


def test_cli_port_flag_out_of_range_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, lines = run_main(capsys, "serve", "--port", "70000")
    assert status == 2
    assert lines == ["broker: config error: --port: 70000 is not a TCP port (0..65535)"]


def test_cli_config_error_prints_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    path = write(tmp_path, b"[limits]\nqueue_messages = true\n[log]\nlevel = '\xff'\n")
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("broker: config error: ")
