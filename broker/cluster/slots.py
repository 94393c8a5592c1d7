"""Redis Cluster's slots, sans-IO: which slot a key or shard channel is in, who serves each
slot (from ``CLUSTER SHARDS``), and what a redirection (``MOVED``, ``ASK``) says.

The sharded engine (:mod:`broker.cluster.sharded`) does the I/O. Redis' slot is the CRC16
(XMODEM) of the key's hash tag (the text between its first ``{`` and the first ``}`` after
it, when not empty; else the whole key) modulo 16384; ``binascii.crc_hqx`` is that CRC16, as
in redis-py's ``redis.crc``.
"""

from __future__ import annotations

from binascii import crc_hqx
from dataclasses import dataclass
from typing import Final

SLOTS: Final = 16384


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` Redis hashes: its hash tag if it has a non-empty one, else itself."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: bytes | str) -> int:
    """The slot of a key or shard channel, as ``CLUSTER KEYSLOT`` answers."""
    if isinstance(key, str):
        key = key.encode()
    return crc_hqx(hash_tag(key), 0) % SLOTS


@dataclass(frozen=True, slots=True)
class Node:
    """A Redis node's address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SlotMap:
    """Who serves each slot: ``masters[owner[slot]]``; ``owner`` is -1 for a slot nobody
    serves (the cluster is missing a shard)."""

    masters: tuple[Node, ...]
    owner: tuple[int, ...]

    def master(self, slot: int) -> Node | None:
        """The master serving ``slot``, if one does."""
        index = self.owner[slot]
        return None if index < 0 else self.masters[index]

    def uncovered(self) -> int:
        """How many slots no master serves."""
        return self.owner.count(-1)


def _fields(flat: object) -> dict[bytes, object]:
    """A RESP2 map (a flat array: key, value, key, value...) as a dict."""
    if not isinstance(flat, list) or len(flat) % 2:
        raise ValueError(f"expected a map as a flat array, got {flat!r:.80}")
    return dict(zip(flat[::2], flat[1::2], strict=True))


def parse_shards(reply: object) -> SlotMap:
    """The slot map from a ``CLUSTER SHARDS`` reply (RESP2): each shard's slot ranges and
    its master (its node whose role is master and whose health is not ``fail``). Raises
    ``ValueError`` for a reply that is not one."""
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SHARDS answered {reply!r:.80}")
    masters: list[Node] = []
    owner = [-1] * SLOTS
    for shard in reply:
        fields = _fields(shard)
        ranges, nodes = fields.get(b"slots"), fields.get(b"nodes")
        if not isinstance(ranges, list) or not isinstance(nodes, list):
            raise ValueError(f"a shard without slots or nodes: {shard!r:.80}")
        master = None
        for raw in nodes:
            node = _fields(raw)
            if node.get(b"role") == b"master" and node.get(b"health") not in (b"fail", b"failed"):
                host = node.get(b"ip") or node.get(b"endpoint")
                port = node.get(b"port")
                if isinstance(host, bytes) and isinstance(port, int):
                    master = Node(host.decode(), port)
        pairs = list(zip(ranges[::2], ranges[1::2], strict=True))
        for low, high in pairs:
            if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high < SLOTS):
                raise ValueError(f"a bad slot range {low!r}-{high!r}")
        if master is None or not pairs:
            continue  # a shard whose master failed and no replica took over yet, or empty
        index = len(masters)
        masters.append(master)
        for low, high in pairs:
            owner[low : high + 1] = [index] * (high - low + 1)
    return SlotMap(tuple(masters), tuple(owner))


@dataclass(frozen=True, slots=True)
class Redirect:
    """An error reply that sends a command elsewhere: ``MOVED`` (the slot lives there now:
    update the map) or ``ASK`` (this once, there, after ``ASKING``: a slot on the move)."""

    moved: bool
    slot: int
    node: Node


def parse_redirect(error: str) -> Redirect | None:
    """The redirection an error reply says (``MOVED 3999 127.0.0.1:6381``), if it is one."""
    parts = error.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK") or not parts[1].isdigit():
        return None
    host, _, port = parts[2].rpartition(":")
    if not port.isdigit():
        return None
    return Redirect(parts[0] == "MOVED", int(parts[1]), Node(host, int(port)))
