"""A minimal Redis client on Trio: RESP2 encoding and parsing, and a connection over TCP.

Parsing and encoding are hiredis's (C, sans-IO: :func:`reply_reader`, :func:`encode_command`).
:class:`RedisConnection` is the thin I/O layer around them: it reads from the socket only when
no whole reply is buffered, so a reader that stops asking stops reading, TCP pushes back on
Redis, and nothing piles up in this process. That is why the broker does not use coredis
(which runs on Trio through anyio): its connections read eagerly into unbounded buffers, and
a slow hub would grow memory without limit instead of pushing back (docs/cluster.md, "Why a
small Redis client").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias
from urllib.parse import unquote, urlsplit

import hiredis
import trio

NEED_DATA: Final = object()  # what a reply_reader() answers when no whole reply is buffered

#: Bytes buffered without a whole reply past which the connection is given up: Redis' own
#: proto-max-bulk-len default, and a read's worth more (hiredis itself sets no limit).
MAX_BUFFERED = 512 * 1024 * 1024 + 64 * 1024
READ_SIZE = 64 * 1024


class RedisError(Exception):
    """An error reply (``-ERR ...``) from Redis; a value, not a broken connection."""


Reply: TypeAlias = "int | bytes | list[Reply] | RedisError | None"


class ProtocolError(Exception):
    """Redis sent bytes that are not RESP2; the connection cannot be used any more."""


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings (strings are UTF-8 encoded)."""
    return hiredis.pack_command(args)  # type: ignore[arg-type,no-any-return]


def reply_reader() -> hiredis.Reader:
    """A sans-IO RESP2 parser: ``feed(data)`` the bytes read, then ``gets()`` each whole reply
    in turn until it answers :data:`NEED_DATA`. Replies are ``bytes`` (simple and bulk
    strings), ``int``, ``None``, ``list`` (arrays) and :class:`RedisError` (error replies,
    returned rather than raised); bytes that are not RESP raise :class:`ProtocolError`."""
    return hiredis.Reader(
        protocolError=ProtocolError, replyError=RedisError, notEnoughData=NEED_DATA
    )


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
        self._reader = reply_reader()

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
        """The next reply, reading from the socket only when no whole reply is buffered."""
        gets = self._reader.gets
        reply = gets()
        while reply is NEED_DATA:
            await self._read()
            reply = gets()
        return reply  # type: ignore[no-any-return]

    async def receive_all(self) -> list[Reply]:
        """Every whole reply buffered, one at least, reading from the socket only when none
        is: so at most what one read brought in, parsed in one go."""
        replies = [await self.receive()]
        gets = self._reader.gets
        while (reply := gets()) is not NEED_DATA:
            replies.append(reply)
        return replies

    async def _read(self) -> None:
        try:
            data = await self._stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"reading from Redis: {exc}") from None
        if not data:
            raise ConnectionLost("Redis closed the connection")
        reader = self._reader
        reader.feed(data)  # type: ignore[arg-type]  # a bytearray is fine: it reads a buffer
        if reader.len() > MAX_BUFFERED:
            raise ProtocolError(f"more than {MAX_BUFFERED} bytes without a whole reply")

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
