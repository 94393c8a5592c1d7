"""Property tests for the three layers a peer's bytes reach before any broker logic:

1. the HTTP upgrade (:mod:`broker.handshake`): arbitrary and mutated requests end in an
   ``Upgrade``, ``None`` (more needed), a 4xx ``BadHandshake`` or ``EOFError``, whatever
   the bytes and however they are split;
2. the WebSocket frame layer (:class:`broker.websocket.WebSocket`): crafted frame streams
   end in the messages a reference model predicts, and a protocol violation is answered with
   wsproto's close frame;
3. the frame decoder (:func:`broker.frames.decode_batch`): never raises, and every ``Pub``
   it returns can be delivered in both encodings.

The examples are few so that the file stays fast in CI; ``bench/fuzz.py`` runs these same
properties with many more examples (and a live attack on a real broker).
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import hashlib
import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Pong,
    Request,
)
from wsproto.frame_protocol import CloseReason

from broker.io.websocket import ConnectionClosed, MessageTooBig, PingTimeout, read_handshake
from broker.protocol.frames import (
    MAX_DATA_DEPTH,
    MAX_ID,
    Encoding,
    ErrorCode,
    FrameError,
    Position,
    Pub,
    Sub,
    Unsub,
    decode_batch,
    encode_message_body,
    encode_message_tail,
    pack_data,
    unpack_data,
)
from broker.protocol.handshake import (
    MAX_REQUEST_HEAD,
    BadHandshake,
    Upgrade,
    UpgradeReader,
    accept_response,
    error_response,
)
from broker.protocol.topics import MAX_TOPIC_BYTES
from tests.test_frames import topics

#: Examples per property: few enough to keep the file within seconds in CI; bench/fuzz.py
#: sets ``FUZZ_EXAMPLES`` to run the same properties with many more.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
#: No deadline: a shared CI machine has slow moments, and a slow example is not a bug here.
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MSGPACK, JSON = Encoding.MSGPACK, Encoding.JSON
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TOKEN_ALPHABET = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# =============================================================================================
# 1. The HTTP upgrade
# =============================================================================================

#: Headers the broker reads or that change how HTTP frames the request: extra headers in a
#: "valid" request avoid them.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "content-length",
        "transfer-encoding",
    }
)

tokens = st.text(alphabet=TOKEN_ALPHABET, min_size=1, max_size=12)
#: A header value h11 accepts unchanged: visible ASCII and obs-text (0x80-0xff), with inner
#: spaces but none at the ends.
header_values = st.lists(
    st.binary(min_size=1, max_size=12).map(
        lambda raw: bytes(b if 0x21 <= b <= 0x7E or b >= 0x80 else 0x61 for b in raw)
    ),
    max_size=4,
).map(b" ".join)
extra_header_names = tokens.filter(lambda name: name.lower() not in RESERVED_HEADERS)


def random_case(draw: st.DrawFn, word: str) -> bytes:
    """``word`` with the case of each letter drawn."""
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(word, flips, strict=True)).encode()


@dataclass
class ValidRequest:
    """A well-formed upgrade request and what :class:`UpgradeReader` must make of it."""

    data: bytes
    expected: Upgrade
    head_size: int


@st.composite
def valid_requests(draw: st.DrawFn, trailing: bool = True) -> ValidRequest:
    """An upgrade request RFC 6455 accepts: random header order and case, extra headers, a
    random key and subprotocol list (possibly over several headers), optional OWS after the
    colon, and maybe bytes pipelined behind it."""
    key = base64.b64encode(draw(st.binary(min_size=16, max_size=16)))
    subprotocols = draw(st.lists(tokens, max_size=5))
    target = "/" + draw(st.text(alphabet=[chr(c) for c in range(0x21, 0x7F)], max_size=40))
    upgrade_value = draw(
        st.sampled_from(["websocket", "WebSocket", "h2c, websocket", "websocket, foo/1"])
    )
    connection_value = draw(
        st.sampled_from(["Upgrade", "upgrade", "keep-alive, Upgrade", "Upgrade,close"])
    )
    host = draw(st.sampled_from([b"broker", b"127.0.0.1:8765", b"[::1]"]))
    headers: list[tuple[bytes, bytes]] = [
        (random_case(draw, "Host"), host),
        (random_case(draw, "Upgrade"), upgrade_value.encode()),
        (random_case(draw, "Connection"), connection_value.encode()),
        (random_case(draw, "Sec-WebSocket-Key"), key),
        (random_case(draw, "Sec-WebSocket-Version"), b"13"),
    ]
    # the subprotocols over one or more headers, in order, with random list separators
    groups: list[list[str]] = []
    for name in subprotocols:
        if not groups or draw(st.booleans()):
            groups.append([])
        groups[-1].append(name)
    protocol_headers = [
        (
            random_case(draw, "Sec-WebSocket-Protocol"),
            draw(st.sampled_from([",", ", ", " ,  ", ",\t"])).join(group).encode(),
        )
        for group in groups
    ]
    extras = draw(
        st.lists(st.tuples(extra_header_names.map(str.encode), header_values), max_size=6)
    )
    others = draw(st.permutations(headers + extras))
    # protocol headers keep their relative order; they go anywhere among the others
    positions = sorted(
        draw(st.lists(st.integers(0, len(others)), min_size=len(protocol_headers),
                      max_size=len(protocol_headers)))
    )  # fmt: skip
    ordered: list[tuple[bytes, bytes]] = []
    pending = list(protocol_headers)
    for index, header in enumerate(others):
        while pending and positions[len(protocol_headers) - len(pending)] == index:
            ordered.append(pending.pop(0))
        ordered.append(header)
    ordered.extend(pending)
    separator = draw(st.sampled_from([b": ", b":", b":  ", b":\t"]))
    lines = [b"GET " + target.encode() + b" HTTP/1.1"]
    lines += [name + separator + value for name, value in ordered]
    head = b"\r\n".join([*lines, b"", b""])
    tail = draw(st.binary(max_size=40)) if trailing else b""
    expected = Upgrade(
        target=target,
        headers=tuple((name.lower(), value) for name, value in ordered),
        subprotocols=tuple(subprotocols),
        key=key,
        trailing=tail,
    )
    return ValidRequest(head + tail, expected, len(head))


def request_parts(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """The request line, header lines and what follows the head, of a request built here."""
    head, _, tail = data.partition(b"\r\n\r\n")
    line, *headers = head.split(b"\r\n")
    return line, headers, tail


def join_request(line: bytes, headers: Sequence[bytes], tail: bytes) -> bytes:
    """The inverse of :func:`request_parts`."""
    return b"\r\n".join([line, *headers, b"", b""]) + tail


any_bytes = st.binary(max_size=60)
methods = st.sampled_from(
    [b"GET", b"get", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"PRI", b"G\xc3\x89T"]
) | tokens.map(str.encode)
versions = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3", b"http/1.1",
     b"HTTP/1.1 ", b"HTTP/11", b"HTTP/1.1\x00", b""]
)  # fmt: skip
odd_keys = st.one_of(
    any_bytes,
    st.binary(max_size=40).map(base64.b64encode),  # base64, but not 16 bytes (mostly)
    st.just(b"dGhlIHNhbXBsZSBub25jZQ"),  # unpadded
    st.just(b"dGhlIHNhbXBs ZSBub25jZQ=="),  # a space inside
    st.just(b"dGhlIHNhbXBsZSBub25jZQ==\xff"),
    st.just(b"dGhlIHNhbXBsZSBub25jZQ==, dGhlIHNhbXBsZSBub25jZQ=="),
)
odd_versions = st.sampled_from([b"8", b"12", b"13, 8", b"13 ", b"013", b"\xff", b"", b"14"])
odd_hosts = (
    st.sampled_from(
        [b"\xff", b"\xff\xfe", b"xn--a", b"xn--", b"xn--zz-\xff", b"[::1", b"a:b:c", b"", b"\x00"]
    )
    | any_bytes
)
non_token_protocols = (
    st.sampled_from(
        [b"pubsub.v1.json, caf\xc3\xa9", b"a b", b"a;b", b"(x)", b"\xff", b"a,,b", b'"q"', b"a/b"]
    )
    | any_bytes
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid upgrade request with one to three mutations an attacker (or a broken client)
    might make: the request line, headers by the thousand or one of 64 KiB, bytes that are
    not ASCII (or not UTF-8) in names and values, odd hosts, keys, versions and
    subprotocols, bodies, bare LFs, obs-folds, random byte edits, pipelined bytes."""
    line, headers, tail = request_parts(draw(valid_requests()).data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 15))
        if kind == 0:  # the request line
            parts = [draw(methods), b"/" + draw(any_bytes), draw(versions)]
            line = draw(st.sampled_from([b" ", b"  ", b"\t"])).join(parts)
        elif kind == 1:  # many small headers (up to a few thousand)
            count = draw(st.integers(1, 4000))
            headers = headers + [b"X-%d: y" % n for n in range(count)]
        elif kind == 2:  # one huge header (up to 64 KiB)
            size = draw(st.integers(1, 65536))
            headers = [*headers, b"X-Big: " + b"x" * size]
        elif kind == 3:  # arbitrary bytes in a header value
            headers = [*headers, draw(tokens).encode() + b": " + draw(any_bytes)]
        elif kind == 4:  # arbitrary bytes in a header name
            headers = [*headers, draw(any_bytes) + b": v"]
        elif kind == 5:
            headers = [h for h in headers if not h.lower().startswith(b"host")]
            headers.append(b"Host: " + draw(odd_hosts))
        elif kind == 6:
            headers = [h for h in headers if not h.lower().startswith(b"sec-websocket-key")]
            headers.append(b"Sec-WebSocket-Key: " + draw(odd_keys))
        elif kind == 7:
            headers = [h for h in headers if not h.lower().startswith(b"sec-websocket-vers")]
            headers.append(b"Sec-WebSocket-Version: " + draw(odd_versions))
        elif kind == 8:
            headers = [*headers, b"Sec-WebSocket-Protocol: " + draw(non_token_protocols)]
        elif kind == 9 and headers:  # drop or duplicate a header
            index = draw(st.integers(0, len(headers) - 1))
            if draw(st.booleans()):
                headers = headers[:index] + headers[index + 1 :]
            else:
                headers = [*headers, headers[index]]
        elif kind == 10:  # a body, or framing headers
            framing = draw(
                st.sampled_from(
                    [b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: -1",
                     b"Content-Length: x", b"Transfer-Encoding: chunked",
                     b"Content-Length: 99999999999999999999"]
                )
            )  # fmt: skip
            headers = [*headers, framing]
        elif kind == 11:  # pipelined: another request, or anything
            tail += draw(st.sampled_from([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b""]))
            tail += draw(any_bytes)
        elif kind == 12:  # obs-fold and whitespace before a colon
            headers = [*headers, b"X-Fold: a", draw(st.sampled_from([b" b", b"\tb", b" "]))]
            headers = [*headers, b"X-Space : a"] if draw(st.booleans()) else headers
        else:  # random byte edits anywhere
            data = bytearray(join_request(line, headers, tail))
            for _ in range(draw(st.integers(1, 4))):
                if not data:
                    break
                at = draw(st.integers(0, len(data) - 1))
                edit = draw(st.integers(0, 2))
                if edit == 0:
                    data[at] = draw(st.integers(0, 255))
                elif edit == 1:
                    del data[at]
                else:
                    data[at:at] = draw(st.binary(min_size=1, max_size=4))
            if draw(st.booleans()):
                data = data.replace(b"\r\n", b"\n", draw(st.integers(1, 3)))
            return bytes(data)
    return join_request(line, headers, tail)


Outcome = tuple[str, Any]


def feed(chunks: Sequence[bytes], *, then_eof: bool = False) -> Outcome:
    """What an :class:`UpgradeReader` makes of ``chunks`` fed one by one: ``("upgrade",
    Upgrade)`` with ``trailing`` holding everything after the head (also chunks it was not
    fed), ``("refused", status)``, ``("pending", None)``, or ``("eof", None)`` if
    ``then_eof`` and it was still pending. Anything else it raises propagates."""
    reader = UpgradeReader()
    try:
        for index, chunk in enumerate(chunks):
            upgrade = reader.receive(chunk)
            assert upgrade is None or isinstance(upgrade, Upgrade), upgrade
            if upgrade is not None:
                rest = b"".join(chunks[index + 1 :])
                return "upgrade", dataclasses.replace(upgrade, trailing=upgrade.trailing + rest)
        if then_eof:
            with pytest.raises(EOFError):
                reader.receive(b"")
            return "eof", None
    except BadHandshake as refused:
        return "refused", refused.status
    return "pending", None


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length), without empty pieces."""
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def head_size(data: bytes) -> int:
    """The size of the request head in ``data`` (up to and with its blank line), or all of
    ``data`` if it has none."""
    end = min(
        (i + len(sep) for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n") if (i := data.find(sep)) >= 0),
        default=len(data),
    )
    return end


#: KNOWN BROKER BUG (see test_an_unsupported_transfer_coding_is_refused_with_a_4xx): h11 hints
#: 501 for a Transfer-Encoding other than one "chunked", and UpgradeReader passes it on.
#: Remove this allowance once that test passes.
def refusal_status_ok(status: int, data: bytes) -> bool:
    """Whether ``status`` is a status ``UpgradeReader`` may refuse ``data`` with: 4xx."""
    return 400 <= status <= 499


def check_any_request_bytes(data: bytes, cuts: Sequence[int]) -> None:
    """The handshake properties for any bytes ``data``, also fed in pieces cut at ``cuts``.

    - the reader returns an ``Upgrade`` or ``None``, raises ``BadHandshake`` with a 4xx or
      ``EOFError`` at the end of the stream, and nothing else;
    - the answer for a refusal is a whole HTTP response with that status (h11 client);
    - the pieces give the same outcome as the whole;
    - a head over ``MAX_REQUEST_HEAD`` is never accepted.
    """
    whole = feed([data] if data else [], then_eof=True)
    pieces = feed(split(data, cuts), then_eof=True)
    for kind, value in (whole, pieces):
        if kind == "refused":
            assert refusal_status_ok(value, data), (value, data[:200])
        if kind == "upgrade":
            assert head_size(data) <= MAX_REQUEST_HEAD
    assert whole == pieces, (whole, pieces)
    if whole[0] == "refused":  # the answer the server sends for it
        with pytest.raises(BadHandshake) as refused:
            UpgradeReader().receive(data)
        bad = refused.value
        check_error_response(bad.status, f"{bad}\n".encode(), bad.headers)
    if whole[0] == "upgrade":
        check_accept_response(whole[1])


def check_accept_response(upgrade: Upgrade, subprotocol: str | None = None) -> None:
    """``accept_response`` for ``upgrade`` is a 101 an HTTP client takes, with the
    ``Sec-WebSocket-Accept`` RFC 6455 computes from the key and the chosen subprotocol."""
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(
            method="GET",
            target="/",
            headers=[("Host", "b"), ("Upgrade", "websocket"), ("Connection", "Upgrade")],
        )
    )
    client.receive_data(accept_response(upgrade, subprotocol))
    response = client.next_event()
    assert isinstance(response, h11.InformationalResponse), response
    assert response.status_code == 101
    headers = list(response.headers)
    accept = base64.b64encode(hashlib.sha1(upgrade.key + WS_GUID).digest())
    assert (b"sec-websocket-accept", accept) in headers
    assert (b"upgrade", b"websocket") in headers
    protocols = [value for name, value in headers if name == b"sec-websocket-protocol"]
    assert protocols == ([] if subprotocol is None else [subprotocol.encode()])
    assert client.next_event() is h11.PAUSED  # the connection switched protocols


def check_error_response(status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """``error_response`` is one whole HTTP response: the status, the headers, the body, and
    the end of the message, as an h11 client reads it."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "b")]))
    client.receive_data(error_response(status, body, headers))
    client.receive_data(b"")  # the connection closes after it
    response = client.next_event()
    assert isinstance(response, h11.Response), response
    assert response.status_code == status
    received = list(response.headers)
    for name, value in headers:
        assert (name.lower(), value) in received
    assert (b"connection", b"close") in received
    data = b""
    while isinstance(event := client.next_event(), h11.Data):
        data += event.data
    assert data == body
    assert isinstance(event, h11.EndOfMessage), event


cut_lists = st.lists(st.integers(0, 2**16), max_size=8)


@FAST
@given(data=st.binary(max_size=300), cuts=cut_lists)
def test_arbitrary_bytes_end_in_an_upgrade_a_4xx_or_more_needed_however_split(
    data: bytes, cuts: list[int]
) -> None:
    check_any_request_bytes(data, cuts)


@FAST
@given(data=mutated_requests(), cuts=cut_lists)
def test_mutated_upgrade_requests_end_in_an_upgrade_or_a_4xx_however_split(
    data: bytes, cuts: list[int]
) -> None:
    check_any_request_bytes(data, cuts)


@FAST
@given(request=valid_requests(), cuts=cut_lists, data=st.data())
def test_a_valid_request_is_accepted_whole_and_in_pieces_with_its_fields(
    request: ValidRequest, cuts: list[int], data: st.DataObject
) -> None:
    assert feed([request.data]) == ("upgrade", request.expected)
    assert feed(split(request.data, cuts)) == ("upgrade", request.expected)
    chosen = data.draw(st.sampled_from([None, *request.expected.subprotocols]))
    check_accept_response(request.expected, chosen)


@FAST
@given(
    subprotocols=st.lists(tokens, max_size=4),
    extra=st.lists(st.tuples(extra_header_names, header_values), max_size=4),
    data=st.data(),
)
def test_a_wsproto_clients_request_is_accepted_and_the_101_completes_its_handshake(
    subprotocols: list[str], extra: list[tuple[str, bytes]], data: st.DataObject
) -> None:
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(
        Request(
            host="broker",
            target="/?token=t",
            subprotocols=subprotocols,
            extra_headers=[(name.encode(), value) for name, value in extra],
        )
    )
    kind, upgrade = feed([request])
    assert kind == "upgrade"
    assert upgrade.subprotocols == tuple(subprotocols)
    chosen = data.draw(st.sampled_from([None, *subprotocols]))
    client.receive_data(accept_response(upgrade, chosen))
    [accepted] = list(client.events())
    assert isinstance(accepted, AcceptConnection)
    assert accepted.subprotocol == chosen


@FAST
@given(
    request=valid_requests(trailing=False),
    padding=st.sampled_from(["one", "many", "target"]),
    extra=st.integers(1, 3 * MAX_REQUEST_HEAD),
    cuts=cut_lists,
)
def test_a_head_over_the_limit_is_refused_with_431_however_split(
    request: ValidRequest, padding: str, extra: int, cuts: list[int]
) -> None:
    line, headers, tail = request_parts(request.data)
    over = MAX_REQUEST_HEAD - request.head_size + extra  # bytes to add to pass the limit
    if padding == "one":
        headers = [*headers, b"X-Pad: " + b"p" * over]
    elif padding == "many":
        headers = headers + [b"X-P: " + b"p" * 93] * (over // 100 + 1)
    else:
        method, target, version = line.split(b" ")
        line = b" ".join([method, target + b"t" * over, version])
    data = join_request(line, headers, tail)
    assert head_size(data) > MAX_REQUEST_HEAD
    assert feed([data]) == ("refused", 431)
    assert feed(split(data, cuts)) == ("refused", 431)


@FAST
@given(
    status=st.integers(400, 599),
    body=st.binary(max_size=300),
    headers=st.lists(
        st.tuples(
            tokens.filter(
                lambda name: (
                    name.lower()
                    not in {"content-length", "transfer-encoding", "connection", "content-type"}
                )
            ).map(str.encode),
            header_values,
        ),
        max_size=5,
    ),
)
def test_an_error_response_is_one_whole_http_response_with_its_status_headers_and_body(
    status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    check_error_response(status, body, headers)


REFUSALS = {
    405: [(b"Allow", b"GET")],
    426: [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
}


@pytest.mark.parametrize(("status", "headers"), REFUSALS.items())
def test_the_refusals_with_headers_are_whole_http_responses(
    status: int, headers: list[tuple[bytes, bytes]]
) -> None:
    check_error_response(status, b"why\n", headers)


@pytest.mark.parametrize(
    "framing",
    [b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"],
)
def test_an_unsupported_transfer_coding_is_refused_with_a_4xx(framing: bytes) -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + framing
        + b"\r\n\r\n"
    )
    kind, status = feed([data])
    assert kind == "refused"
    assert 400 <= status <= 499


def test_a_malformed_head_over_the_limit_is_refused_with_431_even_in_one_read() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 20000 + b"\r\nno colon\r\n\r\n"
    assert feed(split(data, [17000])) == ("refused", 431)
    assert feed([data]) == ("refused", 431)


# =============================================================================================
# 2. WebSocket frames
# =============================================================================================

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KNOWN_OPCODES = frozenset({CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG})
#: Close codes a peer may send (RFC 6455 7.4, as wsproto reads them): the ones it knows,
#: except those that only describe a local event, and 3000-4999.
PEER_CLOSE_CODES = sorted(
    {int(code) for code in CloseReason} - {1005, 1006, 1015} | set(range(3000, 5000))
)


@dataclass(frozen=True)
class WireFrame:
    """One frame as a client puts it on the wire, including ways a client may get it wrong.

    ``length_form`` picks the length encoding (``"min"``, or a forced 16- or 64-bit one);
    ``declared``, if set, is a length other than the payload's: the frame then swallows
    whatever follows it, so it can only be the last.
    """

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    mask: bytes = b"\x00\x00\x00\x00"
    length_form: str = "min"
    declared: int | None = None

    @property
    def length(self) -> int:
        """The length the header announces."""
        return len(self.payload) if self.declared is None else self.declared

    @property
    def short_length(self) -> int:
        """The 7-bit length field of the header."""
        form = self.length_form
        if form == "min":
            form = "7" if self.length < 126 else "16" if self.length < 65536 else "64"
        return {"7": self.length, "16": 126, "64": 127}[form]

    def encode(self) -> bytes:
        """The frame's bytes."""
        first = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        second = (0x80 if self.masked else 0) | self.short_length
        header = bytes((first, second))
        if self.short_length == 126:
            header += struct.pack("!H", self.length)
        elif self.short_length == 127:
            header += struct.pack("!Q", self.length)
        if not self.masked:
            return header + self.payload
        size = len(self.payload)
        key = (self.mask * (size // 4 + 1))[:size]
        masked = (int.from_bytes(self.payload) ^ int.from_bytes(key)).to_bytes(size)
        return header + self.mask + masked


@dataclass
class Expected:
    """What the server side must make of a frame stream followed by the end of the stream.

    ``end`` is ``("eof", 1006)`` (the stream ended first), ``("closed", code)`` (the peer's
    close frame) or ``("violation", code)`` (wsproto's verdict: 1002, or 1007 for bad UTF-8).
    """

    messages: list[bytes | str] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    end: tuple[str, int] = ("eof", 1006)


def header_violation(frame: WireFrame) -> bool:
    """Whether the frame's header alone breaks RFC 6455 for a client's frame."""
    control = frame.opcode >= 0x8
    return (
        frame.opcode not in KNOWN_OPCODES
        or (control and not frame.fin)
        or (control and frame.short_length > 125)
        or (frame.short_length == 126 and frame.length < 126)
        or (frame.short_length == 127 and frame.length < 65536)
        or frame.length >> 63 != 0
        or frame.rsv != 0
        or not frame.masked
    )


def model(frames: Sequence[WireFrame]) -> Expected:
    """A reference reading of a client's frame stream (RFC 6455 sections 5 and 7): the
    messages it completes, the pings to answer, and how it ends."""
    expected = Expected()
    opcode: int | None = None  # of the fragmented message in progress
    parts: list[Any] = []
    decoder: codecs.IncrementalDecoder | None = None
    for frame in frames:
        if header_violation(frame):
            expected.end = ("violation", 1002)
            return expected
        if frame.opcode == PING:
            expected.pongs.append(frame.payload)
        elif frame.opcode == CLOSE:
            expected.end = close_verdict(frame.payload)
            return expected
        elif frame.declared is not None and not frame.payload:
            return expected  # wsproto looks at a data frame once some of its payload is in
        elif frame.opcode != PONG:
            if (opcode is None) != (frame.opcode != CONTINUATION):
                expected.end = ("violation", 1002)  # a continuation of nothing, or no continuation
                return expected
            if opcode is None:
                opcode, parts = frame.opcode, []
                decoder = codecs.getincrementaldecoder("utf-8")() if opcode == TEXT else None
            finished = frame.fin and frame.declared is None
            if decoder is not None:
                try:
                    parts.append(decoder.decode(frame.payload, finished))
                except UnicodeDecodeError:
                    expected.end = ("violation", 1007)
                    return expected
            else:
                parts.append(frame.payload)
            if finished:
                expected.messages.append("".join(parts) if opcode == TEXT else b"".join(parts))
                opcode = None
        if frame.declared is not None:
            return expected  # it never ends: the stream ends first
    return expected


def close_verdict(body: bytes) -> tuple[str, int]:
    """How a close frame with ``body`` ends the connection (RFC 6455 5.5.1, 7.4)."""
    if not body:
        return ("closed", 1005)  # no status code
    if len(body) == 1:
        return ("violation", 1002)
    code = struct.unpack("!H", body[:2])[0]
    if code not in PEER_CLOSE_CODES:
        return ("violation", 1002)
    try:
        body[2:].decode("utf-8")
    except UnicodeDecodeError:
        return ("violation", 1007)
    return ("closed", code)


masks = st.binary(min_size=4, max_size=4)
forms = st.sampled_from(["min"] * 18 + ["16", "64"])  # mostly minimal
control_payloads = st.binary(max_size=125)
bad_utf8 = st.sampled_from(
    [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]
)


@st.composite
def data_messages(draw: st.DrawFn, *, valid: bool = False, max_size: int = 300) -> list[WireFrame]:
    """One data message in one or more fragments (cut anywhere, inside a UTF-8 character
    too), with pings and pongs between them; unless ``valid``, sometimes with invalid UTF-8
    or left unfinished (so that a new message starts in the middle of it)."""
    text = draw(st.booleans())
    if text:
        payload = draw(st.text(max_size=max_size // 2)).encode()[:max_size]
        if not valid and draw(st.integers(0, 7)) == 0:
            at = draw(st.integers(0, len(payload)))
            payload = payload[:at] + draw(bad_utf8) + payload[at:]
    elif not valid and draw(st.integers(0, 20)) == 0:
        payload = b"\x01" * draw(st.integers(65536, 70000))  # a 64-bit length
    else:
        payload = draw(st.binary(max_size=max_size))
    pieces = split(payload, draw(st.lists(st.integers(0, 2**16), max_size=3)))
    pieces = pieces or [b""]
    finished = valid or draw(st.integers(0, 7)) > 0
    frames: list[WireFrame] = []
    for index, piece in enumerate(pieces):
        if draw(st.integers(0, 3)) == 0:
            frames.append(
                WireFrame(draw(st.sampled_from([PING, PONG])), draw(control_payloads),
                          mask=draw(masks))
            )  # fmt: skip
        last = index == len(pieces) - 1
        frames.append(
            WireFrame(
                (TEXT if text else BINARY) if index == 0 else CONTINUATION,
                piece,
                fin=last and finished,
                mask=draw(masks),
                length_form="min" if valid or len(piece) > 65535 else draw(forms),
            )
        )
    return frames


close_frames = st.one_of(
    st.builds(
        lambda code, reason, mask: WireFrame(CLOSE, struct.pack("!H", code) + reason, mask=mask),
        st.sampled_from(PEER_CLOSE_CODES),
        st.text(max_size=30).map(str.encode).filter(lambda reason: len(reason) <= 123),
        masks,
    ),
    st.builds(lambda mask: WireFrame(CLOSE, b"", mask=mask), masks),  # no status code
    st.builds(lambda body, mask: WireFrame(CLOSE, body, mask=mask), st.binary(max_size=125), masks),
    st.builds(  # bad code
        lambda code, mask: WireFrame(CLOSE, struct.pack("!H", code), mask=mask),
        st.integers(0, 65535),
        masks,
    ),
    st.builds(  # a good code, a reason that is not UTF-8
        lambda code, bad, mask: WireFrame(CLOSE, struct.pack("!H", code) + b"ok" + bad, mask=mask),
        st.sampled_from(PEER_CLOSE_CODES),
        bad_utf8,
        masks,
    ),
    st.builds(lambda byte, mask: WireFrame(CLOSE, byte, mask=mask), st.binary(min_size=1,
              max_size=1), masks),  # a 1-byte body
)  # fmt: skip
control_frames = st.builds(WireFrame, st.sampled_from([PING, PONG]), control_payloads, mask=masks)
odd_frames = st.one_of(
    st.builds(  # unmasked
        WireFrame,
        st.sampled_from([TEXT, BINARY, PING, CLOSE]),
        st.binary(max_size=20),
        masked=st.just(False),
    ),
    st.builds(  # reserved opcodes
        WireFrame,
        st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]),
        st.binary(max_size=20),
        fin=st.booleans(),
        mask=masks,
    ),
    st.builds(  # RSV1-3
        WireFrame,
        st.sampled_from([TEXT, BINARY, PING, PONG, CLOSE, CONTINUATION]),
        st.just(b"x"),
        rsv=st.integers(1, 7),
        mask=masks,
    ),
    st.builds(  # a fragmented control frame
        WireFrame, st.sampled_from([PING, PONG, CLOSE]), control_payloads, fin=st.just(False),
        mask=masks,
    ),
    st.builds(  # a control frame over 125 bytes
        WireFrame, st.sampled_from([PING, PONG, CLOSE]), st.binary(min_size=126, max_size=200),
        mask=masks,
    ),
    st.builds(  # a control frame with a 16- or 64-bit length
        WireFrame, st.sampled_from([PING, PONG, CLOSE]), control_payloads,
        length_form=st.sampled_from(["16", "64"]), mask=masks,
    ),
    st.builds(  # a continuation out of the blue
        WireFrame, st.just(CONTINUATION), st.binary(max_size=20), fin=st.booleans(), mask=masks
    ),
)  # fmt: skip
last_frames = st.one_of(
    st.builds(  # a 64-bit length with the top bit set
        WireFrame,
        st.sampled_from([TEXT, BINARY, CONTINUATION]),
        length_form=st.just("64"),
        declared=st.integers(2**63, 2**64 - 1),
        mask=masks,
    ),
    st.builds(  # a length up to 2^63-1 that the stream never delivers
        WireFrame,
        st.sampled_from([TEXT, BINARY, CONTINUATION]),
        st.text(alphabet="abc", max_size=50).map(str.encode),
        length_form=st.sampled_from(["min", "64"]),
        declared=st.integers(65536, 2**63 - 1),
        fin=st.booleans(),
        mask=masks,
    ),
)  # fmt: skip
frame_streams = st.tuples(
    st.lists(
        st.integers(0, 19).flatmap(  # weighted: mostly messages, a few closes and odd frames
            lambda n: (
                data_messages()
                if n < 14
                else control_frames
                if n < 17
                else close_frames
                if n < 18
                else odd_frames
            )
        ),
        max_size=8,
    ),
    st.none() | last_frames,
).map(
    lambda parts: [
        *(frame for part in parts[0] for frame in (part if isinstance(part, list) else [part])),
        *([parts[1]] if parts[1] is not None else []),
    ]
)


@dataclass
class Run:
    """What one :class:`~broker.websocket.WebSocket` did with a client's byte stream."""

    batches: list[list[bytes | str]]
    ended: BaseException | None
    client_events: list[Event]

    @property
    def messages(self) -> list[bytes | str]:
        """Every message returned, in order."""
        return [message for batch in self.batches for message in batch]


async def serve_bytes(chunks: Sequence[bytes], with_request: int, max_message_size: int) -> Run:
    """Complete a real handshake over a memory stream pair (sending the first
    ``with_request`` chunks in the same write as the request), then feed ``chunks`` to the
    server side one read at a time, then the end of the stream; call ``receive()`` until it
    raises. Returns what it returned and raised, and what the client got back."""
    server_stream, client_stream = trio.testing.memory_stream_pair()
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="broker", target="/"))
    await client_stream.send_all(request + b"".join(chunks[:with_request]))
    handshake = await read_handshake(server_stream)
    websocket = await handshake.accept(
        None, max_message_size=max_message_size, ping_interval=3600, ping_timeout=3600
    )
    batches: list[list[bytes | str]] = []
    ended: list[BaseException] = []

    async def receive_until_it_raises() -> None:
        try:
            while True:
                batches.append(list(await websocket.receive()))
        except (ConnectionClosed, MessageTooBig, PingTimeout) as exc:
            ended.append(exc)

    with trio.fail_after(600):  # mock time: a hang fails the test before any ping is due
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_it_raises)
            for chunk in chunks[with_request:]:
                await trio.testing.wait_all_tasks_blocked()  # one read per chunk
                await client_stream.send_all(chunk)
            await trio.testing.wait_all_tasks_blocked()
            await client_stream.send_eof()
    await server_stream.send_eof()
    output = b""
    while data := await client_stream.receive_some():
        output += data
    client.receive_data(output)
    events = list(client.events())
    assert isinstance(events[0], AcceptConnection), events
    return Run(batches, ended[0] if ended else None, events[1:])


def run_websocket(
    data: bytes, cuts: Sequence[int], with_request: int, max_message_size: int = 1 << 20
) -> Run:
    """:func:`serve_bytes` for ``data`` cut at ``cuts``, in its own Trio run on a mock clock
    that jumps ahead whenever every task waits (nothing here waits on real time)."""
    chunks = split(data, cuts)
    with_request = min(with_request, len(chunks))

    async def main() -> Run:
        return await serve_bytes(chunks, with_request, max_message_size)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def check_run_is_allowed(run: Run) -> None:
    """What any input may lead to: batches of text and binary messages, never empty, then
    ``ConnectionClosed`` or ``MessageTooBig`` (never ``PingTimeout``: no time passes), and a
    close frame with the code the server reports when it read one or found a violation."""
    assert all(batch for batch in run.batches)
    assert all(isinstance(message, bytes | str) for message in run.messages)
    assert isinstance(run.ended, ConnectionClosed | MessageTooBig), repr(run.ended)
    assert all(isinstance(event, Pong | CloseConnection) for event in run.client_events)
    closes = [event for event in run.client_events if isinstance(event, CloseConnection)]
    if isinstance(run.ended, ConnectionClosed) and run.ended.code != 1006:
        assert [close.code for close in closes] == [run.ended.code]
        assert isinstance(run.client_events[-1], CloseConnection)
    else:
        assert closes == []


def check_run_matches_model(run: Run, expected: Expected) -> None:
    """The messages, pongs, exception and close frame are those the model predicts."""
    check_run_is_allowed(run)
    assert run.messages == expected.messages
    assert isinstance(run.ended, ConnectionClosed)
    assert run.ended.code == expected.end[1], (run.ended, expected.end)
    pongs = [event.payload for event in run.client_events if isinstance(event, Pong)]
    assert pongs == expected.pongs


stream_cuts = st.lists(st.integers(0, 2**20), max_size=10)


@FAST
@given(frames=frame_streams, cuts=stream_cuts, with_request=st.integers(0, 2))
def test_crafted_frame_streams_end_as_rfc_6455_says_however_split(
    frames: list[WireFrame], cuts: list[int], with_request: int
) -> None:
    data = b"".join(frame.encode() for frame in frames)
    check_run_matches_model(run_websocket(data, cuts, with_request), model(frames))


@FAST
@given(data=st.binary(max_size=400), cuts=stream_cuts, with_request=st.integers(0, 1))
def test_arbitrary_bytes_after_the_handshake_end_in_a_close_or_message_too_big(
    data: bytes, cuts: list[int], with_request: int
) -> None:
    check_run_is_allowed(run_websocket(data, cuts, with_request, max_message_size=200))


@FAST
@given(
    frames=frame_streams,
    edits=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1,
                   max_size=4),
    cuts=stream_cuts,
)  # fmt: skip
def test_frame_streams_with_random_byte_edits_end_in_a_close_or_message_too_big(
    frames: list[WireFrame], edits: list[tuple[int, int]], cuts: list[int]
) -> None:
    data = bytearray(b"".join(frame.encode() for frame in frames))
    for at, byte in edits:
        if data:
            data[at % len(data)] = byte
    check_run_is_allowed(run_websocket(bytes(data), cuts, 0, max_message_size=1000))


@FAST
@given(
    messages=st.lists(data_messages(valid=True, max_size=150), max_size=6),
    cuts=stream_cuts,
    with_request=st.integers(0, 2),
)
def test_a_message_over_max_message_size_raises_and_those_before_it_are_returned(
    messages: list[list[WireFrame]], cuts: list[int], with_request: int
) -> None:
    limit = 100
    frames = [frame for message in messages for frame in message]
    expected = model(frames)
    sizes = [len(message) for message in expected.messages]
    run = run_websocket(b"".join(f.encode() for f in frames), cuts, with_request, limit)
    check_run_is_allowed(run)
    if all(size <= limit for size in sizes):
        check_run_matches_model(run, expected)
        return
    assert isinstance(run.ended, MessageTooBig)
    # the messages before the first one too big, or fewer: those that arrived in the same
    # read as it are dropped with it
    first_too_big = next(i for i, size in enumerate(sizes) if size > limit)
    assert run.messages == expected.messages[: len(run.messages)]
    assert len(run.messages) <= first_too_big


# =============================================================================================
# 3. The frame decoder
# =============================================================================================

int64s = st.integers(-(2**63), 2**64 - 1)  # what msgpack carries
msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    int64s,
    st.floats(),  # NaN and the infinities too
    st.floats(width=32).map(lambda x: struct.unpack("!f", struct.pack("!f", x))[0]),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.builds(msgpack.ExtType, st.integers(0, 127),  # negative codes are reserved
              st.binary(max_size=10)),
    st.builds(msgpack.Timestamp, st.integers(-(2**63), 2**63 - 1), st.integers(0, 999_999_999)),
)  # fmt: skip
#: Map keys as msgpack decodes them; an array key (a tuple here) comes back as a list, which
#: no dict can hold: the frame is undecodable.
msgpack_keys = msgpack_scalars | st.lists(msgpack_scalars, max_size=2).map(tuple)


def containers(
    keys: st.SearchStrategy[Any], size: int
) -> Callable[[st.SearchStrategy[Any]], st.SearchStrategy[Any]]:
    """The ``extend`` of a recursive strategy: arrays of ``children``, and maps of them with
    ``keys``, up to ``size`` items."""

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(children, max_size=size) | st.dictionaries(keys, children, max_size=size)

    return extend


msgpack_values = st.recursive(msgpack_scalars, containers(msgpack_keys, 4), max_leaves=25)


@st.composite
def deep_values(draw: st.DrawFn, leaf: st.SearchStrategy[Any] = msgpack_scalars) -> Any:
    """A value nested ``depth`` arrays and maps deep, around MAX_DATA_DEPTH and beyond."""
    depth = draw(st.integers(MAX_DATA_DEPTH - 3, 2 * MAX_DATA_DEPTH + 10) | st.integers(0, 8))
    value = draw(leaf)
    for _ in range(depth):
        kind = draw(st.integers(0, 2))
        value = [value] if kind == 0 else {"k": value} if kind == 1 else [1, {"": value}, 2]
    return value


def depth(value: Any) -> int:
    """How many arrays and maps deep ``value`` nests (keys included)."""
    if isinstance(value, dict):
        return 1 + max((depth(item) for pair in value.items() for item in pair), default=0)
    if isinstance(value, list | tuple) and not isinstance(value, msgpack.ExtType):
        return 1 + max((depth(item) for item in value), default=0)
    return 0


def has_tuple_key(value: Any) -> bool:
    """Whether a map in ``value`` has an array (tuple) key."""
    if isinstance(value, dict):
        return any(
            (isinstance(key, tuple) and not isinstance(key, msgpack.ExtType)) or has_tuple_key(item)
            for key, item in value.items()
        )
    if isinstance(value, list):
        return any(has_tuple_key(item) for item in value)
    return False


def _strict_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_deliverable(pub: Pub) -> None:
    """``pub`` can be delivered to every encoding (the decoder's contract): the msgpack
    ``msg`` unpacks to the same data, the JSON one is strict JSON in valid UTF-8, and the
    packed form history keeps unpacks to a value that encodes in both again."""
    packed = pack_data(pub.data)
    for data in (pub.data, unpack_data(packed)):
        body = encode_message_body(pub.topic, data, MSGPACK)
        assert encode_message_body(pub.topic, data, MSGPACK, packed=packed) == body
        frame = msgpack.unpackb(
            body + encode_message_tail("p", MSGPACK), raw=False, strict_map_key=False
        )
        assert frame["topic"] == pub.topic and frame["sub"] == "p"
        assert pack_data(frame["data"]) == packed
        text = encode_message_body(pub.topic, data, JSON, offset=7) + encode_message_tail("p", JSON)
        frame = json.loads(text.decode("utf-8"), parse_constant=_strict_constant)
        assert (frame["op"], frame["topic"], frame["offset"]) == ("msg", pub.topic, 7)


def check_decoded(items: Sequence[Any]) -> None:
    """What any message decodes to: commands whose fields have their protocol types, and
    errors; at most one undecodable rest, last; every ``Pub`` deliverable."""
    for index, item in enumerate(items):
        assert isinstance(item, Sub | Unsub | Pub | FrameError), item
        if isinstance(item, FrameError):
            assert isinstance(item.code, ErrorCode)
            assert item.id is None or (type(item.id) is int and 0 <= item.id <= MAX_ID)
            if item.msg.startswith("undecodable"):
                assert index == len(items) - 1
            continue
        assert isinstance(item.topic, str) and item.topic
        assert 0 < len(item.topic.encode()) <= MAX_TOPIC_BYTES
        if isinstance(item, Pub):
            assert item.id is None or (type(item.id) is int and 0 <= item.id <= MAX_ID)
            assert item.size > 0
            check_deliverable(item)
        else:
            assert type(item.id) is int and 0 <= item.id <= MAX_ID
        if isinstance(item, Sub) and item.since is not None:
            assert type(item.since.epoch) is str
            assert type(item.since.offset) is int and 0 <= item.since.offset <= MAX_ID
            assert "*" not in item.topic and ">" not in item.topic


def pub_frame(data: Any) -> dict[str, Any]:
    """``{"op": "pub", "topic": "t", "data": data}``."""
    return {"op": "pub", "topic": "t", "data": data}


@FAST
@given(data=msgpack_values | deep_values())
def test_any_msgpack_value_published_is_refused_or_delivered_to_both_encodings(data: Any) -> None:
    [item] = decode_batch(msgpack.packb(pub_frame(data)), MSGPACK)
    check_decoded([item])
    if has_tuple_key(data):
        assert isinstance(item, FrameError) and item.msg.startswith("undecodable")
    elif depth(data) > MAX_DATA_DEPTH:
        assert isinstance(item, FrameError) and item.code is ErrorCode.BAD_REQUEST
        assert "deep" in item.msg
    else:
        assert isinstance(item, Pub)
        assert pack_data(item.data) == msgpack.packb(data)  # the same value, NaN included


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # also beyond what msgpack carries
    st.floats(),  # NaN and the infinities become non-standard tokens
    st.text(st.characters(), max_size=10),  # lone surrogates too: json.dumps escapes them
)
json_values = st.recursive(
    json_scalars, containers(st.text(st.characters(), max_size=5), 4), max_leaves=25
)


def walk(value: Any) -> list[Any]:
    """Every scalar and map key in ``value``."""
    if isinstance(value, dict):
        return [*value, *(leaf for item in value.values() for leaf in walk(item))]
    if isinstance(value, list):
        return [leaf for item in value for leaf in walk(item)]
    return [value]


@FAST
@given(data=json_values | deep_values(json_scalars), ensure_ascii=st.booleans())
def test_any_json_value_published_is_refused_or_delivered_to_both_encodings(
    data: Any, ensure_ascii: bool
) -> None:
    leaves = walk(data)
    has_surrogate = any(
        isinstance(leaf, str) and any("\ud800" <= c <= "\udfff" for c in leaf) for leaf in leaves
    )
    # the wire carries UTF-8: a lone surrogate can only come as an escape
    text = json.dumps(pub_frame(data), ensure_ascii=ensure_ascii or has_surrogate)
    [item] = decode_batch(text, JSON)
    check_decoded([item])
    if any(
        (isinstance(leaf, float) and not math.isfinite(leaf))
        or (type(leaf) is int and not -(2**63) <= leaf < 2**64)
        for leaf in leaves
    ):
        assert isinstance(item, FrameError) and item.msg.startswith("undecodable")
    elif has_surrogate:
        assert isinstance(item, FrameError) and "surrogate" in item.msg
    elif depth(data) > MAX_DATA_DEPTH:
        assert isinstance(item, FrameError) and "deep" in item.msg
    else:
        assert isinstance(item, Pub)
        assert json.dumps(item.data) == json.dumps(data)  # the same value, -0.0 included


@FAST
@given(junk=st.binary(max_size=200))
def test_arbitrary_bytes_as_a_msgpack_message_decode_without_raising(junk: bytes) -> None:
    check_decoded(decode_batch(junk, MSGPACK))


@FAST
@given(junk=st.text(max_size=200))  # text as wsproto delivers it: no lone surrogates
def test_arbitrary_text_as_a_json_message_decodes_without_raising(junk: str) -> None:
    check_decoded(decode_batch(junk, JSON))


concrete_topics = topics  # valid concrete topics, from test_frames.py
patterns = concrete_topics | st.builds(
    lambda topic, star, tail: ".".join(
        ["*" if star and i == 0 else s for i, s in enumerate(topic.split("."))]
        + ([">"] if tail else [])
    ),
    concrete_topics,
    st.booleans(),
    st.booleans(),
).filter(lambda pattern: len(pattern.encode()) <= MAX_TOPIC_BYTES)
ids = st.integers(0, MAX_ID)
positions: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"epoch": st.text(max_size=8), "offset": ids}
)


@st.composite
def valid_frames(draw: st.DrawFn, data: st.SearchStrategy[Any]) -> tuple[dict[str, Any], Any]:
    """A valid ``sub``, ``unsub`` or ``pub`` frame and the command it must decode to (a
    ``Pub``'s ``size`` left at 0: it depends on the encoding)."""
    op = draw(st.sampled_from(["sub", "unsub", "pub"]))
    if op == "pub":
        frame_id = draw(st.none() | ids)
        frame = pub_frame(draw(data)) | {"topic": draw(concrete_topics)}
        if frame_id is not None or draw(st.booleans()):
            frame["id"] = frame_id
        return frame, Pub(frame_id, frame["topic"], frame["data"], 0)
    frame_id = draw(ids)
    if op == "unsub":
        topic = draw(patterns)
        return {"op": op, "id": frame_id, "topic": topic}, Unsub(frame_id, topic)
    if draw(st.booleans()):
        topic = draw(concrete_topics)
        since = draw(positions)
        frame = {"op": op, "id": frame_id, "topic": topic, "since": since}
        return frame, Sub(frame_id, topic, Position(since["epoch"], since["offset"]))
    topic = draw(patterns)
    return {"op": op, "id": frame_id, "topic": topic, "since": None}, Sub(frame_id, topic)


def same_command(got: Any, expected: Any) -> bool:
    """Equal commands, comparing ``Pub`` data by its msgpack bytes (NaN != NaN)."""
    if isinstance(expected, Pub):
        return (
            isinstance(got, Pub)
            and (got.id, got.topic) == (expected.id, expected.topic)
            and pack_data(got.data) == pack_data(expected.data)
        )
    return bool(got == expected)


small_msgpack_values = st.recursive(msgpack_scalars, containers(msgpack_scalars, 3), max_leaves=10)
#: What a JSON frame of a valid batch carries: no NaN, infinities or integers msgpack cannot
#: carry (those make the line undecodable).
small_json_values = st.recursive(
    st.none() | st.booleans() | int64s | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    containers(st.text(max_size=4), 3),
    max_leaves=10,
)  # fmt: skip


@FAST
@given(frames=st.lists(valid_frames(small_msgpack_values), max_size=8))
def test_a_msgpack_batch_of_n_valid_frames_decodes_to_n_commands_in_order(
    frames: list[tuple[dict[str, Any], Any]],
) -> None:
    packed = [msgpack.packb(frame) for frame, _ in frames]
    decoded = decode_batch(b"".join(packed), MSGPACK)
    check_decoded(decoded)
    assert len(decoded) == len(frames)
    for got, (_, expected), raw in zip(decoded, frames, packed, strict=True):
        assert same_command(got, expected), (got, expected)
        if isinstance(got, Pub):
            assert got.size == len(raw)


@FAST
@given(
    frames=st.lists(valid_frames(small_json_values), max_size=8),
    ends=st.lists(st.sampled_from(["\n", "\r\n", "\n\n", "\n \t\n"]), min_size=8, max_size=8),
    ensure_ascii=st.booleans(),
)
def test_a_json_batch_of_n_valid_frames_decodes_to_n_commands_in_order(
    frames: list[tuple[dict[str, Any], Any]], ends: list[str], ensure_ascii: bool
) -> None:
    lines = [json.dumps(frame, ensure_ascii=ensure_ascii) for frame, _ in frames]
    text = "".join(line + end for line, end in zip(lines, ends, strict=False))
    decoded = decode_batch(text, JSON)
    check_decoded(decoded)
    assert len(decoded) == len(frames)
    for got, (_, expected), line, end in zip(decoded, frames, lines, ends, strict=False):
        assert same_command(got, expected), (got, expected)
        if isinstance(got, Pub):
            assert got.size == len((line + end.split("\n")[0]).encode())


odd_scalars = st.one_of(
    st.none(), st.booleans(), int64s, st.just(MAX_ID), st.just(-1), st.floats(),
    st.text(max_size=6), st.binary(max_size=6), st.just(1.0),
)  # fmt: skip
odd_topics = (
    odd_scalars
    | patterns
    | st.sampled_from(
        ["", ".", "a..b", "a b", "a.>.b", "a*", ">", "*", "a\u200bb", "t" * 256, "é" * 128]
    )
)
odd_since = st.one_of(
    odd_scalars,
    positions,
    st.dictionaries(st.sampled_from(["epoch", "offset", "x"]), odd_scalars, max_size=3),
    st.fixed_dictionaries({"epoch": odd_scalars, "offset": odd_scalars}),
)
odd_frames_to_decode = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["sub", "unsub", "pub", "msg", "SUB", ""]) | odd_scalars,
        "id": odd_scalars | ids,
        "topic": odd_topics,
        "since": odd_since,
        "data": odd_scalars,
    },
)


@FAST
@given(frames=st.lists(odd_frames_to_decode, min_size=1, max_size=6))
def test_frames_with_odd_ops_ids_topics_and_since_decode_to_well_typed_commands_or_errors(
    frames: list[dict[str, Any]],
) -> None:
    decoded = decode_batch(b"".join(msgpack.packb(frame) for frame in frames), MSGPACK)
    check_decoded(decoded)
    assert len(decoded) == len(frames)  # each frame is one command or one error
    for got, frame in zip(decoded, frames, strict=True):
        if not isinstance(got, FrameError):
            assert got.id == frame.get("id") and got.topic == frame["topic"]
            assert frame["op"] == {Sub: "sub", Unsub: "unsub", Pub: "pub"}[type(got)]
    jsonable = [f for f in frames if all(not isinstance(v, bytes) for v in walk(f))]
    lines = "\n".join(json.dumps(frame) for frame in jsonable)
    check_decoded(decode_batch(lines, JSON))


@FAST
@given(
    frames=st.lists(valid_frames(small_msgpack_values), min_size=1, max_size=5),
    edits=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1,
                   max_size=3),
)  # fmt: skip
def test_a_msgpack_batch_with_random_byte_edits_decodes_without_raising(
    frames: list[tuple[dict[str, Any], Any]], edits: list[tuple[int, int]]
) -> None:
    data = bytearray(b"".join(msgpack.packb(frame) for frame, _ in frames))
    for at, byte in edits:
        data[at % len(data)] = byte
    check_decoded(decode_batch(bytes(data), MSGPACK))
