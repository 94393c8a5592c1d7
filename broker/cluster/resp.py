"""A minimal Redis client on Trio: RESP2 encoding and parsing, and a connection over TCP.

:class:`ReplyParser` is sans-IO: feed it bytes, take whole replies out. :class:`RedisConnection`
is the thin I/O layer: it reads from the socket only when asked for the next reply, so a
reader that stops asking stops reading, TCP pushes back on Redis, and nothing piles up in
this process. That is why the broker does not use coredis (which runs on Trio through anyio):
its connections read eagerly into unbounded buffers, and a slow hub would grow memory without
limit instead of pushing back (docs/cluster.md, "Why a small Redis client").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias
from urllib.parse import unquote, urlsplit

import trio

NEED_DATA: Final = object()  # ReplyParser.next_reply: no whole reply buffered yet

MAX_BULK = 512 * 1024 * 1024  # Redis' own proto-max-bulk-len default
READ_SIZE = 64 * 1024


class RedisError(Exception):
    """An error reply (``-ERR ...``) from Redis; a value, not a broken connection."""


Reply: TypeAlias = "int | bytes | list[Reply] | RedisError | None"


class ProtocolError(Exception):
    """Redis sent bytes that are not RESP2; the connection cannot be used any more."""


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings (strings are UTF-8 encoded)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class ReplyParser:
    """Turns RESP2 bytes into replies: ``bytes`` (simple and bulk strings), ``int``, ``None``,
    ``list`` (arrays) and :class:`RedisError` (error replies, returned rather than raised)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the next reply begins

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes read from the connection."""
        if self._start and self._start > len(self._buffer) // 2:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def buffered(self) -> int:
        """Bytes fed and not yet parsed into a reply."""
        return len(self._buffer) - self._start

    def next_reply(self) -> Reply | object:
        """The next whole reply, or :data:`NEED_DATA`; raises :class:`ProtocolError`."""
        parsed = self._parse(self._start)
        if parsed is None:
            return NEED_DATA
        reply, self._start = parsed
        return reply

    def _line(self, start: int) -> tuple[bytes, int] | None:
        end = self._buffer.find(b"\r\n", start)
        if end < 0:
            if len(self._buffer) - start > 64 * 1024:
                raise ProtocolError("a RESP header line longer than 64 KiB")
            return None
        return bytes(self._buffer[start:end]), end + 2

    def _parse(self, start: int) -> tuple[Reply, int] | None:
        line = self._line(start)
        if line is None:
            return None
        header, position = line
        kind, rest = header[:1], header[1:]
        if kind == b"+":
            return rest, position
        if kind == b"-":
            return RedisError(rest.decode("utf-8", "replace")), position
        try:
            number = int(rest) if kind in (b":", b"$", b"*") else None
        except ValueError:
            number = None
        if number is None:
            raise ProtocolError(f"not a RESP2 reply: {bytes(header[:40])!r}")
        if kind == b":":
            return number, position
        if number < 0:
            return None, position  # null bulk string or null array
        if kind == b"$":
            if number > MAX_BULK:
                raise ProtocolError(f"a bulk string of {number} bytes")
            end = position + number
            if len(self._buffer) < end + 2:
                return None
            if self._buffer[end : end + 2] != b"\r\n":
                raise ProtocolError("a bulk string not ended by CRLF")
            return bytes(self._buffer[position:end]), end + 2
        items: list[Reply] = []
        for _ in range(number):
            parsed = self._parse(position)
            if parsed is None:
                return None
            item, position = parsed
            items.append(item)
        return items, position


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where Redis is, from a ``redis://[[user]:password@]host[:port][/db]`` URL."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """Parse ``url``; raises ``ValueError`` saying what is wrong with it."""
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"{url!r} is not a redis:// URL")
        if not parts.hostname:
            raise ValueError(f"{url!r} names no host")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url!r} has a bad port") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"{url!r}: the path must be a database number such as /0")
        return cls(
            parts.hostname,
            port,
            int(path or 0),
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class RedisConnection:
    """One TCP connection to Redis. Sends are not concurrency-safe: one task writes, one reads.

    A closed or broken connection raises ``trio.BrokenResourceError``/``EndOfStream``-like
    errors as :class:`ConnectionLost`; callers treat that as Redis being unavailable.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._parser = ReplyParser()

    @classmethod
    async def open(
        cls, address: RedisAddress, seconds: float, name: str | None = None
    ) -> RedisConnection:
        """Connect, authenticate, select the database and set the client ``name`` (shown by
        ``CLIENT LIST``), all within ``seconds``."""
        with trio.fail_after(seconds):
            stream = await trio.open_tcp_stream(address.host, address.port)
            connection = cls(stream)
            try:
                if address.password is not None:
                    auth = [address.username] if address.username else []
                    await connection.call("AUTH", *auth, address.password)
                if address.db:
                    await connection.call("SELECT", address.db)
                if name is not None:
                    await connection.call("CLIENT", "SETNAME", name)
            except BaseException:
                await connection.aclose()
                raise
        return connection

    async def send(self, payload: bytes) -> None:
        """Write encoded commands (see :func:`encode_command`)."""
        try:
            await self._stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"sending to Redis: {exc}") from None

    async def receive(self) -> Reply:
        """The next reply, reading from the socket only as much as it needs."""
        while True:
            reply = self._parser.next_reply()
            if reply is not NEED_DATA:
                return reply  # type: ignore[return-value]
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionLost(f"reading from Redis: {exc}") from None
            if not data:
                raise ConnectionLost("Redis closed the connection")
            self._parser.feed(data)

    async def call(self, *args: bytes | str | int) -> Reply:
        """Send one command and return its reply; an error reply is raised as RedisError."""
        await self.send(encode_command(*args))
        reply = await self.receive()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def aclose(self) -> None:
        """Close the socket."""
        await self._stream.aclose()


class ConnectionLost(Exception):
    """The connection to Redis failed or was closed; open a new one."""
