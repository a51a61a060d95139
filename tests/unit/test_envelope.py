"""Signed envelopes (protocol/envelope.py; SPEC.md "Envelope" and "Signing bytes")."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import PROTOCOL_VERSION, codec
from protocol.envelope import (
    DOMAIN,
    MAX_ENVELOPE_BYTES,
    Signer,
    message_digest,
    open_envelope,
    signing_bytes,
)
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.fuzz import sample_messages
from protocol.messages import MESSAGE_TYPES, Award, Bid, Message
from protocol.peerid import peer_id_from_public_key

SEED = bytes(range(32))
SIGNER = Signer(SEED)
KEY = Ed25519PrivateKey.from_private_bytes(SEED)
SAMPLES: dict[str, Any] = {m.KIND: m for m in sample_messages()}
TASK = "0123456789abcdef0123456789abcdef"


def _envelope(kind: str, payload: bytes, /, *, version: int = PROTOCOL_VERSION, **override: Any) -> bytes:
    """An envelope around any payload, signed with SEED (for hostile payloads)."""
    outer: dict[str, Any] = {
        "key": SIGNER.public_key,
        "payload": payload,
        "sig": KEY.sign(signing_bytes(kind, version, payload)),
        "type": kind,
        "v": version,
    }
    outer.update(override)
    return codec.pack(outer)


def _reason(raw: bytes, **kw: Any) -> str:
    with pytest.raises(RemoteProtocolError) as ei:
        open_envelope(raw, **kw)
    return str(ei.value.reason)


def test_signing_bytes_layout() -> None:
    assert DOMAIN == b"peerd-sig\x00"
    sb = signing_bytes("bid", 1, b"\x80")
    assert sb == b"peerd-sig\x00" + b"bid" + b"\x00" + b"\x00\x01" + b"\x80"
    assert signing_bytes("advert", 258, b"") == b"peerd-sig\x00advert\x00\x01\x02"


def test_signing_bytes_are_unambiguous_across_kinds() -> None:
    """No kind is a prefix of another followed by 0x00, so (kind, payload) pairs never collide."""
    kinds = sorted(MESSAGE_TYPES)
    for a, b in itertools.permutations(kinds, 2):
        assert not signing_bytes(b, 1, b"").startswith(signing_bytes(a, 1, b"")[: len(DOMAIN) + len(a) + 1])


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_seal_and_open(kind: str) -> None:
    msg = SAMPLES[kind]
    raw = SIGNER.seal(msg)
    signed = open_envelope(raw)
    assert signed.message == msg
    assert signed.kind == kind
    assert signed.signer == SIGNER.peer_id == peer_id_from_public_key(SIGNER.public_key)
    assert signed.public_key == SIGNER.public_key
    assert signed.raw == raw
    assert signed.digest == hashlib.sha256(raw).hexdigest() == message_digest(raw)
    outer = codec.unpack(raw)
    assert set(outer) == {"key", "payload", "sig", "type", "v"}
    assert outer["type"] == kind and outer["v"] == PROTOCOL_VERSION
    assert outer["payload"] == codec.pack(msg.to_wire())
    # The signature is plain RFC 8032 Ed25519 over the signing bytes.
    KEY.public_key().verify(outer["sig"], signing_bytes(kind, PROTOCOL_VERSION, outer["payload"]))


def test_sealing_is_deterministic() -> None:
    assert SIGNER.seal(SAMPLES["bid"]) == SIGNER.seal(SAMPLES["bid"])
    assert Signer(SEED).seal(SAMPLES["bid"]) == SIGNER.seal(SAMPLES["bid"])


@pytest.mark.parametrize("seed", [b"", b"\x00" * 31, b"\x00" * 33])
def test_signer_needs_a_32_byte_seed(seed: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        Signer(seed)


def test_kinds_filter() -> None:
    raw = SIGNER.seal(SAMPLES["bid"])
    assert open_envelope(raw, kinds=frozenset({"bid", "lease"})).kind == "bid"
    assert _reason(raw, kinds=frozenset({"advert"})) == "unexpected_kind"


@pytest.mark.parametrize(("src", "dst"), list(itertools.permutations(sorted(SAMPLES), 2)))
def test_signature_never_transfers_to_another_kind(src: str, dst: str) -> None:
    """Domain separation: a valid signature and payload of one kind, relabelled as another."""
    outer = codec.unpack(SIGNER.seal(SAMPLES[src]))
    assert _reason(codec.pack({**outer, "type": dst})) == "bad_signature"


def test_signature_is_bound_to_the_version() -> None:
    payload = codec.pack(SAMPLES["bid"].to_wire())
    # Signed for the next version but labelled this one (and for the previous one, likewise).
    for other in (PROTOCOL_VERSION + 1, PROTOCOL_VERSION - 1):
        raw = _envelope("bid", payload, sig=KEY.sign(signing_bytes("bid", other, payload)))
        assert _reason(raw) == "bad_signature"
    raw = _envelope("bid", payload, sig=KEY.sign(signing_bytes("bid", PROTOCOL_VERSION + 1, payload)))
    assert _reason(raw) == "bad_signature"


def test_every_single_bit_flip_is_rejected() -> None:
    """Flip each bit of a valid envelope in turn: none may verify (as anything)."""
    raw = SIGNER.seal(SAMPLES["bid"])
    reasons: set[str] = set()
    for i in range(len(raw) * 8):
        mutated = bytearray(raw)
        mutated[i // 8] ^= 1 << (i % 8)
        try:
            open_envelope(bytes(mutated))
        except ProtocolError as exc:
            reasons.add(exc.reason)
        else:
            pytest.fail(f"bit {i} flipped and the envelope still verified")
    assert "bad_signature" in reasons and "malformed" in reasons


def test_other_key_cannot_claim_the_signature() -> None:
    other = Signer(bytes(range(1, 33)))
    outer = codec.unpack(SIGNER.seal(SAMPLES["bid"]))
    assert _reason(codec.pack({**outer, "key": other.public_key})) == "bad_signature"


def test_integer_in_a_float_field_is_rejected_even_when_signed() -> None:
    """Regression: the codec accepted {"c0": 5}, the converter turned it into 5.0, and one
    message then had two signed encodings. The message is now re-encoded and compared."""
    wire = {**SAMPLES["bid"].to_wire(), "c0": 5, "load": 0}
    assert _reason(_envelope("bid", codec.pack(wire))) == "non_canonical"
    fine = {**wire, "c0": 5.0, "load": 0.0}
    assert open_envelope(_envelope("bid", codec.pack(fine))).message == dataclasses.replace(
        SAMPLES["bid"], c0=5.0, load=0.0
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (msgpack.packb(dict(reversed(list(SAMPLES["bid"].to_wire().items())))), "non_canonical"),
        (codec.pack({**SAMPLES["bid"].to_wire(), "x": 1}), "malformed"),
        (codec.pack({**SAMPLES["bid"].to_wire(), "c0": -1.0}), "absurd"),
        (codec.pack([1]), "malformed"),
        (b"", "malformed"),
        (b"\xc1", "malformed"),
    ],
)
def test_bad_payload_under_a_valid_signature(payload: bytes, reason: str) -> None:
    assert _reason(_envelope("bid", payload)) == reason


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"v": 0}, "unsupported_version"),
        ({"v": 1}, "unsupported_version"),  # version 1: before the award's new fields (SPEC §14)
        ({"v": 3}, "unsupported_version"),
        ({"v": -1}, "unsupported_version"),
        ({"v": "1"}, "malformed"),
        ({"v": True}, "malformed"),
        ({"type": "nope"}, "unexpected_kind"),
        ({"type": ""}, "unexpected_kind"),
        ({"type": b"bid"}, "malformed"),
        ({"key": b"\x00" * 31}, "malformed"),
        ({"key": "k" * 32}, "malformed"),
        ({"sig": b"\x00" * 65}, "malformed"),
        ({"payload": None}, "malformed"),
    ],
)
def test_bad_outer_fields(override: dict[str, Any], reason: str) -> None:
    payload = codec.pack(SAMPLES["bid"].to_wire())
    assert _reason(_envelope("bid", payload, **override)) == reason


def test_unknown_version_is_checked_before_kind_and_signature() -> None:
    payload = codec.pack(SAMPLES["bid"].to_wire())
    assert (
        _reason(_envelope("bid", payload, v=9, type="future-kind", sig=b"\x00" * 64)) == "unsupported_version"
    )


def test_size_cap() -> None:
    raw = SIGNER.seal(SAMPLES["bid"])
    assert open_envelope(raw, max_bytes=len(raw)).message == SAMPLES["bid"]
    assert _reason(raw, max_bytes=len(raw) - 1) == "oversized"
    huge = _envelope("bid", b"\x00" * MAX_ENVELOPE_BYTES)
    assert _reason(huge) == "oversized"


def test_seal_refuses_an_oversized_envelope() -> None:
    award = dataclasses.replace(SAMPLES["award"], bids=[b"\x00" * 4096] * 16)
    with pytest.raises(LocalProtocolError) as ei:
        SIGNER.seal(award)
    assert ei.value.reason == "oversized"


def test_award_quotes_bid_envelopes_verbatim() -> None:
    bids = [
        Signer(bytes([i]) * 32).seal(
            Bid(seq=1, issued_at=0, expires_at=1, task_id=TASK, c0=1.0 + i, load=0.0)
        )
        for i in range(3)
    ]
    award = dataclasses.replace(SAMPLES["award"], bids=bids)
    opened = open_envelope(SIGNER.seal(award)).message
    assert isinstance(opened, Award)
    assert opened.bids == tuple(bids)
    quoted = [open_envelope(b, kinds=frozenset({"bid"})).message for b in opened.bids]
    assert [m.c0 for m in quoted if isinstance(m, Bid)] == [1.0, 2.0, 3.0]


def test_signed_is_a_value() -> None:
    a = open_envelope(SIGNER.seal(SAMPLES["cancel"]))
    b = open_envelope(SIGNER.seal(SAMPLES["cancel"]))
    assert a.digest == b.digest and a.message == b.message
    msg: Message = a.message
    assert msg.KIND == "cancel"
