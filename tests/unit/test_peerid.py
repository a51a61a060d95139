"""libp2p peer IDs of Ed25519 keys, without libp2p (protocol/peerid.py; SPEC.md "Peer IDs")."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import RemoteProtocolError
from protocol.peerid import b58decode, b58encode, peer_id_from_public_key, public_key_from_peer_id
from protocol.schema import PEER_ID


def _pub(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        # From the IETF base58 draft (draft-msporny-base58) and Bitcoin's base58 tests.
        (b"Hello World!", "2NEpo7TZRRrLZSi2U"),
        (
            b"The quick brown fox jumps over the lazy dog.",
            "USm3fpXnKG5EUBx2ndxBDMPVciP5hGey2Jh4NDv6gmeo1LkMeiKrLJUUBk6Z",
        ),
        (bytes.fromhex("0000287fb4cd"), "11233QC4"),
        (b"", ""),
        (b"\x00", "1"),
        (b"\x00\x00\x00", "111"),
    ],
)
def test_base58_known_values(raw: bytes, text: str) -> None:
    assert b58encode(raw) == text
    assert b58decode(text) == raw


@given(st.binary(max_size=64))
def test_base58_round_trip(raw: bytes) -> None:
    assert b58decode(b58encode(raw)) == raw


@pytest.mark.parametrize("char", ["0", "O", "I", "l", "+", "/", " ", "é"])
def test_base58_rejects_characters_outside_the_alphabet(char: str) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        b58decode("12D3" + char)
    assert ei.value.reason == "bad_peer_id"


def test_derivation_by_hand() -> None:
    """Identity multihash (0x00, length 36) of the protobuf PublicKey{Type=Ed25519, Data=key}."""
    pub = _pub(bytes(range(32)))
    expected = b58encode(bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + pub)
    pid = peer_id_from_public_key(pub)
    assert pid == expected
    assert pid.startswith("12D3KooW") and len(pid) == 52
    assert public_key_from_peer_id(pid) == pub


@given(st.binary(min_size=32, max_size=32))
def test_every_ed25519_peer_id_has_the_schema_shape(pub: bytes) -> None:
    pid = peer_id_from_public_key(pub)
    assert PEER_ID(pid) == pid  # the message schema accepts every real Ed25519 peer ID
    assert public_key_from_peer_id(pid) == pub


def test_matches_libp2p() -> None:
    """Cross-check with py-libp2p itself (the daemon's transport identity)."""
    pytest.importorskip("libp2p")
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    for i in range(4):
        seed = hashlib.sha256(b"peerd peer id %d" % i).digest()
        kp = create_new_key_pair(seed)
        assert kp.public_key.to_bytes() == _pub(seed)
        assert ID.from_pubkey(kp.public_key).to_base58() == peer_id_from_public_key(_pub(seed))


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_public_key_length(length: int) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        peer_id_from_public_key(b"\x01" * length)
    assert ei.value.reason == "bad_key"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash (RSA-style) peer ID
        "16Uiu2HAm" + "1" * 44,  # secp256k1-style prefix
        "12D3KooW" + "1" * 44,  # right shape, wrong bytes
        "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB" + "1",  # one character too many
        "1" + "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB",  # extra leading zero byte
        "x" * 65,
    ],
)
def test_public_key_from_peer_id_rejects(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        public_key_from_peer_id(text)
    assert ei.value.reason == "bad_peer_id"


@pytest.mark.parametrize("value", [None, 5, b"12D3KooW", ["12D3KooW"]])
def test_public_key_from_peer_id_rejects_non_strings(value: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        public_key_from_peer_id(value)
