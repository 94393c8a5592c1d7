"""``broker pub``, ``sub`` and ``presence``: poke a running broker from a shell, through the client.

``pub`` publishes DATA (a string, or JSON with ``--json``) once, ``--count`` times, or each
line of stdin, each acked, so a refusal is reported; with ``--api URL`` it publishes through
the server API (HTTP, an API key) instead of a WebSocket. ``sub`` prints one line per message,
``TOPIC DATA`` with DATA as JSON (or a JSON object per line with ``--json``), until ^C or
``--count`` lines; with ``--join-leave`` also ``TOPIC join MEMBER`` and ``TOPIC leave
MEMBER`` (DATA is JSON, so never the bare word ``join``). ``presence`` prints the members of a
topic with presence, ``CLIENT USER INFO`` per line (every page), or their number with
``--count-only``. A failure is one ``broker: ...`` line on stderr, in the broker's words
when it refused, and an exit status that says what kind it was (:data:`EXIT_STATUSES`).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from broker.operations.argtypes import seconds
from broker_client import (
    CannotConnect,
    Client,
    ClientError,
    Forbidden,
    Join,
    Leave,
    Overloaded,
    PresenceGap,
    connect,
)
from broker_client.api import KEY_VARIABLE, AsyncApi

DEFAULT_URL = "ws://127.0.0.1:8765"

#: The exit statuses of ``broker pub``, ``sub`` and ``presence``, in ``--help`` and the README.
EXIT_STATUSES = {
    0: "done",
    1: "the broker refused a command (err), or the connection was lost",
    2: "bad arguments",
    3: "cannot connect: no URL reachable, timed out, or TLS failed",
    4: "refused: not allowed (HTTP 401 or 403 at the handshake; close 4003 or 4010)",
    5: "refused: busy or shutting down (HTTP 503, retried until --connect-timeout)",
    6: "refused for another reason (HTTP 400...), or not a broker (a web page...)",
    130: "interrupted (^C)",
}
EPILOG = "exit status:\n" + "\n".join(
    f"  {status:<4} {meaning}" for status, meaning in EXIT_STATUSES.items()
)


def add_client_commands(commands: Any) -> None:
    """Add the ``pub``, ``sub`` and ``presence`` subcommands to ``broker``'s subparsers."""
    pub = commands.add_parser(
        "pub",
        help="publish a message to a running broker",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Publish DATA to TOPIC and wait for the broker to accept it. DATA is sent "
        "as a string; with --json it is parsed as JSON first ('{\"id\": 7}', '42', 'null'). "
        "Without DATA, each line of stdin is published as one message. With --api, publish "
        "through the broker's server API (HTTP) instead of a WebSocket, with an API key "
        f"(--api-key, or better ${KEY_VARIABLE}: a flag shows in the process list).",
    )
    pub.add_argument("topic", metavar="TOPIC", help="a concrete topic, e.g. orders.created")
    pub.add_argument("data", metavar="DATA", nargs="?", help="the message (default: stdin lines)")
    pub.add_argument("--json", action="store_true", help="parse DATA (or each line) as JSON")
    pub.add_argument("--count", type=int, default=1, metavar="N", help="publish DATA N times")
    pub.add_argument("--api", metavar="URL",
                     help="the server API's URL (http://127.0.0.1:8767, [api] in the broker's "
                     "config), instead of --url")  # fmt: skip
    pub.add_argument("--api-key", metavar="KEY",
                     help=f"one of the server API's keys (default: ${KEY_VARIABLE})")  # fmt: skip
    _add_connection_flags(pub)

    sub = commands.add_parser(
        "sub",
        help="print the messages matching a pattern",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Subscribe to PATTERN ('*' matches one segment, '>' the rest) and print "
        "'TOPIC DATA' per message, DATA as JSON (bytes as base64), until ^C. On a topic with "
        "presence, subscribing to exactly that topic makes this command a member of it "
        "(see 'broker presence'). With --join-leave, also print 'TOPIC join MEMBER' and "
        "'TOPIC leave MEMBER' when a member comes to or leaves a matching presence topic "
        '(MEMBER as JSON: {"client", "user", "info"}; this command\'s own join included). '
        "When the broker dropped some of them (a slow consumer) or the connection was made "
        "again, a line on stderr says the list they make may be wrong: run 'broker presence'.",
    )
    sub.add_argument("pattern", metavar="PATTERN", help="e.g. 'orders.*' or 'metrics.>'")
    sub.add_argument("--json", action="store_true",
                     help='print {"topic", "sub", "data"} as one JSON object per line; with '
                     '--join-leave, {"op": "join" or "leave", "topic", "sub", "member"} for '
                     "joins and leaves")  # fmt: skip
    sub.add_argument("--count", type=int, metavar="N",
                     help="exit after N lines (messages, and joins and leaves)")  # fmt: skip
    sub.add_argument("--join-leave", action="store_true",
                     help="also print when members join or leave (a topic with presence; "
                     "else the broker refuses: not_enabled, exit status 1)")  # fmt: skip
    sub.add_argument("--info", metavar="JSON",
                     help="on a topic with presence, what the other members see as this "
                     'one\'s info, as JSON (e.g. \'{"name": "ada"}\'; at most 1 KiB; a '
                     "token's info wins)")  # fmt: skip
    _add_connection_flags(sub)

    presence = commands.add_parser(
        "presence",
        help="print who is subscribed to a topic with presence",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the members of TOPIC, a concrete topic whose [[topics]] rule says "
        "'presence = true': the connections subscribed to exactly TOPIC now, one line per "
        "member, 'CLIENT USER INFO' (CLIENT is unique per connection; USER is its token's "
        "subject, INFO what it shows, both as JSON, null when none), ordered by CLIENT and "
        "read page by page until the last. With --count-only, print how many there are. A "
        "topic without presence is refused: 'broker: not_enabled: ...', exit status 1.",
    )
    presence.add_argument("topic", metavar="TOPIC", help="a concrete topic, e.g. room.lobby")
    presence.add_argument("--json", action="store_true",
                          help='print {"client", "user", "info"} as one JSON object per '
                          "line")  # fmt: skip
    presence.add_argument("--count-only", action="store_true",
                          help="print only the number of members (one page of 0 members: "
                          "cheap on a big topic)")  # fmt: skip
    _add_connection_flags(presence)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action="append",
        help=f"the broker (default {DEFAULT_URL}); give it once per node of a cluster to try "
        "them in a shuffled order, moving on when one is unreachable or busy",
    )
    parser.add_argument(
        "--connect-timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long the WebSocket handshake may take, and a busy broker (HTTP 503) is "
        "retried, before giving up (default 10)",
    )
    parser.add_argument("--encoding", choices=("msgpack", "json"), default="msgpack",
                        help="wire encoding (default msgpack)")  # fmt: skip
    parser.add_argument("--token", help="sent as 'Authorization: Bearer TOKEN'")
    parser.add_argument(
        "--ca-file", metavar="PEM", help="trust this CA for wss:// (default: the system's CAs)"
    )


def run_client_command(args: argparse.Namespace) -> int:
    """Run ``pub``, ``sub`` or ``presence``; returns the exit status."""
    command = {"pub": publish_command, "sub": subscribe_command,
               "presence": presence_command}[args.command]  # fmt: skip
    _log_as_broker_lines()
    try:
        trio.run(command, args)
    except ClientError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return exit_status(exc)
    except ValueError as exc:  # bad --json or --info input, bad --count
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `broker sub ... | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


async def publish_command(args: argparse.Namespace) -> None:
    """``broker pub``: publish DATA ``--count`` times, or each stdin line."""
    if args.count < 1:
        raise ValueError("--count must be at least 1")
    parse = functools.partial(_parse_json, flag="--json") if args.json else str
    payloads = [parse(args.data)] * args.count if args.data is not None else None
    if args.api is not None or args.api_key is not None:
        await _publish_through_api(args, parse, payloads)
        return
    async with _connect(args) as client:
        if payloads is not None:
            for data in payloads:
                await client.publish(args.topic, data)
            return
        stdin = trio.wrap_file(sys.stdin)
        async for line in stdin:
            await client.publish(args.topic, parse(line.rstrip("\n")))


async def _publish_through_api(
    args: argparse.Namespace, parse: Callable[[str], Any], payloads: list[Any] | None
) -> None:
    """``broker pub --api``: the same, through the server API."""
    if args.api is None:
        raise ValueError("--api-key needs --api URL")
    if args.url:
        raise ValueError("give --url (a WebSocket) or --api (the server API), not both")
    if not (args.api_key or os.environ.get(KEY_VARIABLE)):
        raise ValueError(f"--api needs a key: --api-key KEY, or ${KEY_VARIABLE}")
    async with AsyncApi(
        args.api,
        args.api_key,
        encoding=args.encoding,
        timeout=args.connect_timeout,
        ca_file=args.ca_file,
    ) as api:
        if payloads is not None:
            for data in payloads:
                await api.publish(args.topic, data)
            return
        async for line in trio.wrap_file(sys.stdin):
            await api.publish(args.topic, parse(line.rstrip("\n")))


async def subscribe_command(args: argparse.Namespace) -> None:
    """``broker sub``: print each message (and join and leave) until ^C or ``--count`` lines."""
    if args.count is not None and args.count < 1:
        raise ValueError("--count must be at least 1")
    info = None if args.info is None else _parse_json(args.info, flag="--info")
    seen = 0
    async with (
        _connect(args) as client,
        client.subscribe(args.pattern, join_leave=args.join_leave, info=info) as subscription,
    ):
        async for item in subscription:
            if isinstance(item, PresenceGap):
                print(f"broker: {item.pattern}: joins and leaves may be missing ({item.why}); "
                      "'broker presence TOPIC' lists who is here", file=sys.stderr)  # fmt: skip
                continue
            if isinstance(item, Join | Leave):
                op = "join" if isinstance(item, Join) else "leave"
                member = dataclasses.asdict(item.member)
                if args.json:
                    line = _dumps({"op": op, "topic": item.topic, "sub": item.pattern,
                                   "member": member})  # fmt: skip
                else:
                    line = f"{item.topic} {op} {_dumps(member)}"
            elif args.json:
                line = _dumps({"topic": item.topic, "sub": item.pattern, "data": item.data})
            else:
                line = f"{item.topic} {_dumps(item.data)}"
            print(line, flush=True)
            seen += 1
            if seen == args.count:
                return


async def presence_command(args: argparse.Namespace) -> None:
    """``broker presence``: print the members of a topic (every page), or their number."""
    async with _connect(args) as client:
        if args.count_only:
            print((await client.presence(args.topic, limit=0)).count, flush=True)
            return
        async for member in client.members(args.topic):
            if args.json:
                line = _dumps(dataclasses.asdict(member))
            else:
                line = f"{member.client} {_dumps(member.user)} {_dumps(member.info)}"
            print(line, flush=True)


def exit_status(error: ClientError) -> int:
    """The exit status for what ended the command (see :data:`EXIT_STATUSES`)."""
    if isinstance(error, Forbidden) and (error.status or error.close_code) is not None:
        return 4  # refused at the handshake, or closed: its token expired or was revoked
    if isinstance(error, Overloaded):
        return 5
    if isinstance(error, CannotConnect):
        return 3 if error.status is None else 6
    return 1


def _log_as_broker_lines() -> None:
    """The client library's warnings (a lost connection, a reconnect) as ``broker: ...`` lines
    on stderr, like the command's own errors (not Python's bare fallback). The error that
    ends the client is left out: the command prints it once, with its exit status."""
    library = logging.getLogger("broker_client")
    if not library.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("broker: %(message)s"))
        handler.addFilter(lambda record: record.levelno < logging.ERROR or bool(record.exc_info))
        library.addHandler(handler)
        library.setLevel(logging.WARNING)
        library.propagate = False


def _connect(args: argparse.Namespace) -> AbstractAsyncContextManager[Client]:
    return connect(
        args.url or [DEFAULT_URL],
        token=args.token,
        encoding=args.encoding,
        ca_file=args.ca_file,
        connect_timeout=args.connect_timeout,
    )


def _parse_json(text: str, flag: str) -> Any:
    """``text`` as strict JSON whose numbers msgpack carries; :class:`ValueError` naming ``flag``
    otherwise (``NaN``, ``1e999``, an integer over 64 bits)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:  # a JSONDecodeError, or NaN/Infinity
        raise ValueError(f"{flag}: {text!r} is not JSON: {exc}") from None
    if (bad := _unencodable_number(value)) is not None:
        raise ValueError(
            f"{flag}: {bad} is outside what the broker carries (finite numbers; integers "
            "from -2**63 to 2**64-1)"
        )
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _unencodable_number(value: Any) -> str | None:
    """The first number in ``value`` that msgpack (or strict JSON) cannot carry, if any."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -(1 << 63) <= value < 1 << 64 else str(value)
    if isinstance(value, float):
        return None if math.isfinite(value) else repr(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        if (bad := _unencodable_number(item)) is not None:
            return bad
    return None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_bytes_as_base64)


def _bytes_as_base64(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    return repr(value)
