"""broker.protocol.handshake, no sockets: every upgrade request ends in an Upgrade or a refusal."""

from __future__ import annotations

import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from broker.protocol.handshake import (
    MAX_REQUEST_HEAD,
    BadHandshake,
    Upgrade,
    UpgradeReader,
    accept_response,
    error_response,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
HEADERS = {
    b"Host": b"broker",
    b"Upgrade": b"websocket",
    b"Connection": b"Upgrade",
    b"Sec-WebSocket-Key": KEY,
    b"Sec-WebSocket-Version": b"13",
}


def request(
    line: bytes = b"GET /?token=t HTTP/1.1", tail: bytes = b"", **replace: bytes | None
) -> bytes:
    """An upgrade request; ``replace`` (header names with ``_`` for ``-``) changes or, with
    ``None``, drops headers."""
    headers = dict(HEADERS)
    for name, value in replace.items():
        key = name.replace("_", "-").encode()
        if value is None:
            del headers[key]
        else:
            headers[key] = value
    lines = [line, *(name + b": " + value for name, value in headers.items())]
    return b"\r\n".join([*lines, b"", b""]) + tail


def read(data: bytes) -> Upgrade:
    upgrade = UpgradeReader().receive(data)
    assert upgrade is not None
    return upgrade


def refusal(data: bytes) -> int:
    with pytest.raises(BadHandshake) as refused:
        UpgradeReader().receive(data)
    return refused.value.status


def test_a_valid_request_is_an_upgrade_with_its_target_headers_and_subprotocols() -> None:
    upgrade = read(request(Sec_WebSocket_Protocol=b"pubsub.v1.json, chat"))
    assert upgrade.target == "/?token=t"
    assert upgrade.query("token") == "t"
    assert upgrade.header(b"host") == "broker"
    assert upgrade.subprotocols == ("pubsub.v1.json", "chat")
    assert upgrade.trailing == b""


def test_a_request_in_pieces_is_read_once_complete() -> None:
    data = request()
    reader = UpgradeReader()
    for i in range(len(data) - 1):
        assert reader.receive(data[i : i + 1]) is None
    upgrade = reader.receive(data[-1:])
    assert upgrade is not None and upgrade.key == KEY


def test_bytes_after_the_request_are_kept_for_the_websocket() -> None:
    frame = b"\x82\x85\x00\x00\x00\x00hello"
    assert read(request(tail=frame)).trailing == frame


def test_the_end_of_the_stream_before_a_whole_request_is_an_eof() -> None:
    reader = UpgradeReader()
    assert reader.receive(b"GET / HTTP/1.1\r\n") is None
    with pytest.raises(EOFError):
        reader.receive(b"")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), 400),  # a TLS ClientHello
        (b"garbage\r\n\r\n", 400),
        (request(b"GET / HTTP/1.0"), 400),
        (request(b"POST / HTTP/1.1"), 405),
        (request(Upgrade=None), 426),  # a browser, or curl, on the WebSocket port
        (request(Connection=b"keep-alive"), 426),
        (request(Connection=b"upgr\xffade"), 426),
        (request(Host=None), 400),
        (request(Sec_WebSocket_Version=b"8"), 426),
        (request(Sec_WebSocket_Version=None), 426),
        (request(Sec_WebSocket_Key=None), 400),
        (request(Sec_WebSocket_Key=b"short"), 400),
        (request(Sec_WebSocket_Key=b"not base64 at all!!!!!!="), 400),
        (request(Sec_WebSocket_Key=b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), 400),  # 24 bytes
        (request(Sec_WebSocket_Protocol=b"pubsub.v1.json, caf\xc3\xa9"), 400),
        (request(Sec_WebSocket_Protocol=b"a b"), 400),
        (request(Content_Length=b"5", tail=b"hello"), 400),
        (request(X_Big=b"x" * (64 * 1024)), 431),  # in one read, whole
    ],
)
def test_a_request_rfc_6455_refuses_is_answered_with_its_status(data: bytes, status: int) -> None:
    assert refusal(data) == status


def test_a_head_over_the_limit_arriving_in_pieces_is_refused_with_431() -> None:
    reader = UpgradeReader()
    assert reader.receive(b"GET / HTTP/1.1\r\n") is None
    with pytest.raises(BadHandshake) as refused:
        for _ in range(MAX_REQUEST_HEAD // 100 + 1):
            reader.receive(b"X-Filler: " + b"x" * 88 + b"\r\n")
    assert refused.value.status == 431


def test_thousands_of_small_headers_are_bounded_by_the_head_limit() -> None:
    many = b"".join(b"X-%d: y\r\n" % n for n in range(5000))
    assert refusal(request(tail=b"")[:-2] + many + b"\r\n") == 431


@pytest.mark.parametrize(
    "header",
    [
        {"Host": b"\xff\xfe"},  # wsproto decoded Host as IDNA and raised
        {"Host": b"xn--a"},
        {"Sec_WebSocket_Extensions": b"permessage-deflate; \xff"},
        {"Origin": b"https://\xe9xample.com"},
    ],
)
def test_header_bytes_the_broker_does_not_read_are_not_decoded(header: dict[str, bytes]) -> None:
    read(request(**header))


def test_the_accept_response_completes_a_wsproto_clients_handshake() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    data = client.send(Request(host="broker", target="/", subprotocols=["pubsub.v1.json"]))
    upgrade = read(data)
    client.receive_data(accept_response(upgrade, "pubsub.v1.json"))
    [accepted] = list(client.events())
    assert isinstance(accepted, AcceptConnection)
    assert accepted.subprotocol == "pubsub.v1.json"


@pytest.mark.parametrize("status", [400, 401, 426, 431, 503, 599])
def test_an_error_response_is_a_whole_http_response(status: int) -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "b")]))
    client.receive_data(error_response(status, b"why\n", [(b"Retry-After", b"5")]))
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    assert (b"retry-after", b"5") in list(response.headers)
    data = client.next_event()
    assert isinstance(data, h11.Data) and data.data == b"why\n"
    assert isinstance(client.next_event(), h11.EndOfMessage)
