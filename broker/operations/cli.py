"""The ``broker`` command: a thin shell over :class:`~broker.config.Config` and :class:`Broker`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import resource
import signal
import sys
from collections.abc import Sequence

import trio

from broker import __version__
from broker.config import LOG_FORMATS, LOG_LEVELS, Config, ConfigError, load_config
from broker.exceptiongroups import first_leaf
from broker.io.server import Broker
from broker.operations.cli_client import add_client_commands, run_client_command
from broker.operations.cli_stats import add_stats_command, run_stats
from broker.operations.logs import setup_logging

log = logging.getLogger("broker")

DESCRIPTION = """\
A Trio pub/sub broker. WebSocket clients subscribe to topics (NATS-style patterns with
'*' and '>') and receive every message published to them, msgpack- or JSON-encoded,
with bounded queues and a per-topic policy for slow subscribers."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``broker`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="broker", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the broker daemon",
        description="Run the broker until SIGINT or SIGTERM, then drain and exit 0. "
        "With no config file it listens on 127.0.0.1:8765 with the documented defaults. "
        "Flags override the file.",
    )
    serve.add_argument("--config", metavar="PATH", help="TOML config file (see config/broker.toml)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port to listen on; 0 picks a free one "
                       "(default 8765)")  # fmt: skip
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default: info")
    serve.add_argument("--log-format", choices=LOG_FORMATS, help="default: text")
    add_client_commands(commands)
    add_stats_command(commands)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``broker``'s command line (``sys.argv`` by default). A command's flags may also come
    between its arguments (``broker pub TOPIC --json DATA``), which argparse alone refuses
    when an optional argument follows the flag."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        words = list(sys.argv[1:] if argv is None else argv)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = commands.choices[args.command]
        before = words[: words.index(args.command)]  # only -h and --version go there
        if unknown := [word for word in extra if word in before]:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        rest = words[words.index(args.command) + 1 :]
        args = command.parse_intermixed_args(rest, argparse.Namespace(command=args.command))
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config file named by ``--config`` and apply the flags over it."""
    config = load_config(args.config)
    server = config.server
    if args.host is not None:
        server = dataclasses.replace(server, host=args.host)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port: {args.port} is not a TCP port (0..65535)")
        server = dataclasses.replace(server, port=args.port)
    log_config = config.log
    if args.log_level is not None:
        log_config = dataclasses.replace(log_config, level=args.log_level)
    if args.log_format is not None:
        log_config = dataclasses.replace(log_config, format=args.log_format)
    return config.replace(server=server, log=log_config)


async def run_until_signalled(broker: Broker) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully; a second signal stops at once.
    SIGHUP (a reload, to systemd and to NATS users; a closed terminal) is logged and served
    through: the broker has no config reload, and dying at once would drop every client."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.warning(
                        "received SIGHUP: the broker does not reload its config (restart it to "
                        "apply a change); still serving"
                    )
                    continue
                if broker.shutting_down:
                    log.warning("second %s: stopping without draining", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
                log.info("received %s", signal.Signals(signum).name)
                broker.shutdown()
                nursery.start_soon(_stop_listening_for_signals, nursery, broker)

    log.info("bye")


async def _stop_listening_for_signals(nursery: trio.Nursery, broker: Broker) -> None:
    await broker.wait_stopped()
    nursery.cancel_scope.cancel()


def raise_open_file_limit() -> None:
    """Raise this process's open-file limit to the most the system allows, as Go programs
    do: every connection needs a file descriptor, and the usual soft limit of 1024 would
    refuse clients long before ``max_connections`` (the broker logs what the limit allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``broker`` command; returns the exit status."""
    args = parse_args(argv)
    if args.command == "stats":
        return run_stats(args)
    if args.command != "serve":
        return run_client_command(args)
    try:
        config = config_from_args(args)
        broker = Broker(config)  # loads the TLS and JWT key files
    except ConfigError as exc:
        print(f"broker: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)
    raise_open_file_limit()
    # What is loaded by now (modules, the config, keys) lives as long as the process: out of
    # the cyclic GC's sight, each full collection costs only the running broker's objects
    # (bench/instructions latency: 4 % fewer instructions per delivery).
    gc.freeze()
    # A young generation of 20 000 objects instead of 700: fewer objects that live a moment
    # (a wake-up, a read) survive into the older generations and bring on full collections,
    # which at 20 000 connections cost ~0.4 s each (bench/connections.py, 19 935 idle
    # connections pinged every 20 s: 85-95 -> 29 us of CPU per ping, 8.4-9.4 -> 2.9 % of a
    # core; bench/run: the same CPU per message, latency p50 ~0.03 ms higher).
    gc.set_threshold(20_000, 10, 10)
    status = 0
    try:
        trio.run(run_until_signalled, broker)
    except* OSError as group:
        error = first_leaf(group)
        where = error.filename or f"{config.server.host}:{config.server.port}"
        print(f"broker: cannot listen on {where}: {error.strerror or error}", file=sys.stderr)
        status = 1
    return status
