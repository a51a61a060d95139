"""Signed envelopes: sign bytes, not objects (docs/design.md §3.2).

Wire form (canonical msgpack map)::

    {"key": <32-byte Ed25519 public key>, "payload": <canonical msgpack of the message>,
     "sig": <64-byte Ed25519 signature>, "type": <kind, e.g. "advert">, "v": 1}

The signature covers ``signing_bytes(kind, version, payload)``::

    b"peerd-sig\\x00" ‖ kind (ASCII) ‖ 0x00 ‖ version (u16 big-endian) ‖ payload

so a signature made for one kind of message (say a bid) can never be replayed as
another kind (say a vote) — domain separation. Parsing order matters and is fixed:
size cap → outer decode (canonical) → version → kind → signature over the exact
payload bytes → payload decode (canonical) → field validation → re-encode the message
and compare with the payload (canonical field types, e.g. float64 never an integer). Nothing is decoded from
a payload whose signature has not been checked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol import PROTOCOL_VERSION, codec
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import MESSAGE_TYPES, Message
from protocol.peerid import peer_id_from_public_key

DOMAIN = b"peerd-sig\x00"
#: Largest envelope accepted (an award listing 64 signed bids is ~20 KiB).
MAX_ENVELOPE_BYTES = 64 * 1024
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})


def signing_bytes(kind: str, version: int, payload: bytes) -> bytes:
    return DOMAIN + kind.encode("ascii") + b"\x00" + version.to_bytes(2, "big") + payload


@dataclass(frozen=True)
class Signed:
    """A verified message and who signed it. ``digest`` identifies the exact envelope."""

    message: Message
    signer: str
    public_key: bytes
    raw: bytes
    digest: str

    @property
    def kind(self) -> str:
        return self.message.KIND


def message_digest(raw: bytes) -> str:
    """The ID of an envelope: used to verify each unique message once (docs/design.md §8)."""
    return hashlib.sha256(raw).hexdigest()


class Signer:
    """Holds an Ed25519 key; the only place private key bytes are used."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise LocalProtocolError("an Ed25519 seed is 32 bytes", reason="bad_key")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._key.public_key().public_bytes_raw()
        self.peer_id = peer_id_from_public_key(self.public_key)

    def seal(self, message: Message) -> bytes:
        """Encode and sign ``message``; returns the envelope bytes."""
        payload = codec.pack(message.to_wire())
        sig = self._key.sign(signing_bytes(message.KIND, PROTOCOL_VERSION, payload))
        raw = codec.pack(
            {
                "key": self.public_key,
                "payload": payload,
                "sig": sig,
                "type": message.KIND,
                "v": PROTOCOL_VERSION,
            }
        )
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise LocalProtocolError(
                f"{message.KIND} envelope of {len(raw)} bytes is too large", reason="oversized"
            )
        return raw


def _field(obj: dict[str, Any], name: str, typ: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise RemoteProtocolError(
            f"envelope field {name!r} missing or not {typ.__name__}", reason="malformed"
        )
    return value


def open_envelope(
    raw: bytes, *, kinds: frozenset[str] | None = None, max_bytes: int = MAX_ENVELOPE_BYTES
) -> Signed:
    """Verify and decode an envelope. Only :class:`ProtocolError` escapes."""
    outer = codec.unpack(raw, max_bytes=max_bytes)
    if not isinstance(outer, dict) or set(outer) != {"key", "payload", "sig", "type", "v"}:
        raise RemoteProtocolError("not a peerd envelope", reason="malformed")
    version = _field(outer, "v", int)
    if version not in SUPPORTED_VERSIONS:
        raise RemoteProtocolError(f"unsupported protocol version {version}", reason="unsupported_version")
    kind = _field(outer, "type", str)
    cls = MESSAGE_TYPES.get(kind)
    if cls is None or (kinds is not None and kind not in kinds):
        raise RemoteProtocolError(f"unexpected message kind {kind[:32]!r}", reason="unexpected_kind")
    key = _field(outer, "key", bytes)
    payload = _field(outer, "payload", bytes)
    sig = _field(outer, "sig", bytes)
    if len(key) != 32 or len(sig) != 64:
        raise RemoteProtocolError("bad key or signature length", reason="malformed")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, signing_bytes(kind, version, payload))
    except (InvalidSignature, ValueError):
        raise RemoteProtocolError(f"bad signature on {kind}", reason="bad_signature") from None
    message = cls.from_wire(codec.unpack(payload, max_bytes=max_bytes))
    # The payload is canonical msgpack, but field converters may still coerce (an integer
    # in a float field becomes a float). Re-encoding the *message* and comparing closes
    # that gap, so each message has exactly one signed encoding: dedupe by envelope hash
    # and "sign bytes, not objects" (docs/design.md §3.2) both rely on it.
    if codec.pack(message.to_wire()) != payload:
        raise RemoteProtocolError(f"{kind} payload is not in canonical form", reason="non_canonical")
    return Signed(message, peer_id_from_public_key(key), key, bytes(raw), message_digest(bytes(raw)))
