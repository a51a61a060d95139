"""libp2p peer IDs for Ed25519 keys, computed without libp2p.

A peer's signer key *is* its libp2p identity key, so the sender of every signed message
is derived from the key that signed it, never from a field inside the message
(docs/design.md §3.2). Per the libp2p peer-id spec, an Ed25519 public key is protobuf-encoded
(``08 01 12 20 || key``: KeyType=Ed25519, Data=32 bytes), and since that is at most 42
bytes it is wrapped in an *identity* multihash (``00 24``) and printed in base58btc.
"""

from __future__ import annotations

from protocol.errors import RemoteProtocolError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_ED25519_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise RemoteProtocolError(f"invalid base58 character {c!r}", reason="bad_peer_id") from None
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer ID (``12D3KooW…``) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise RemoteProtocolError("an Ed25519 public key is 32 bytes", reason="bad_key")
    return b58encode(_ED25519_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of :func:`peer_id_from_public_key`; only Ed25519 identity peer IDs are accepted."""
    if not isinstance(peer_id, str) or len(peer_id) > 64:
        raise RemoteProtocolError("peer ID is not a short string", reason="bad_peer_id")
    raw = b58decode(peer_id)
    if len(raw) != 38 or not raw.startswith(_ED25519_PREFIX):
        raise RemoteProtocolError("not an Ed25519 libp2p peer ID", reason="bad_peer_id")
    return raw[6:]
