"""Regenerate peerd's golden protocol vectors (the JSON files beside this script).

Usage (from the repository root)::

    python protocol/vectors/generate.py          # rewrite the JSON files
    python protocol/vectors/generate.py --check  # exit 1 if a committed file differs

Everything is derived from fixed seeds and fixed timestamps, and Ed25519 (RFC 8032) is
deterministic, so the output is byte-for-byte stable. The tests (tests/unit/test_vectors.py)
check the *committed* files against the implementation; they never regenerate them, so a
change of the wire format shows up as a failing test and a deliberate, reviewed diff here.

Conventions inside the JSON files (see protocol/SPEC.md §13):

* every byte string is lowercase hex;
* in ``message`` objects, a JSON number written with a ``.`` or an exponent is a float64 and
  one without is an integer; a msgpack ``bin`` value is written as ``{"$bin": "<hex>"}``;
  ``null`` is msgpack nil.

The hostile inputs are built by hand (msgpack-python would refuse to write most of them), and
each negative vector that needs a *valid signature over a bad payload* is re-signed with the
same key, so the decoder must reject it for the stated reason and not merely for the signature.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script: make `protocol` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import PROTOCOL_VERSION, codec
from protocol.committee import committee as draw_committee
from protocol.envelope import DOMAIN, MAX_ENVELOPE_BYTES, signing_bytes
from protocol.framing import MAX_FRAME, encode_frame
from protocol.messages import Advert, Award, Bid, Cancel, Lease, Message, Result, TaskAnnounce, Vote
from protocol.peerid import peer_id_from_public_key

HERE = Path(__file__).resolve().parent

#: Fixed Ed25519 seeds (private keys). "submitter" announces, awards and cancels; the three
#: "node" keys bid, lease, commit results and vote. Node i has the seed's (§4.3) C⁰ and L.
SEEDS: dict[str, bytes] = {
    "submitter": bytes(range(32)),
    "node1": bytes(range(32, 64)),
    "node2": bytes(range(64, 96)),
    "node3": bytes(range(96, 128)),
}
#: 2023-11-14T22:13:20Z in Unix milliseconds: every vector is issued at this instant.
T0 = 1_700_000_000_000
TASK_ID = "0123456789abcdef0123456789abcdef"
SHA_A = hashlib.sha256(b"peerd vector output A").hexdigest()
SHA_B = hashlib.sha256(b"peerd vector output B").hexdigest()
SHA_O = hashlib.sha256(b"peerd vector aggregate").hexdigest()
SHA_IN = hashlib.sha256(b"peerd vector input").hexdigest()


class Key:
    def __init__(self, name: str, seed: bytes) -> None:
        self.name = name
        self.seed = seed
        self.private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public = self.private.public_key().public_bytes_raw()
        self.peer_id = peer_id_from_public_key(self.public)

    def sign(self, kind: str, payload: bytes, version: int = PROTOCOL_VERSION) -> bytes:
        return self.private.sign(signing_bytes(kind, version, payload))

    def envelope(self, kind: str, payload: bytes, *, version: int = PROTOCOL_VERSION) -> bytes:
        """A canonical envelope around ``payload`` (which may itself be hostile), validly signed."""
        sig = self.sign(kind, payload, version)
        return codec.pack({"key": self.public, "payload": payload, "sig": sig, "type": kind, "v": version})


KEYS = {name: Key(name, seed) for name, seed in SEEDS.items()}


# --- hand-written msgpack (for encodings msgpack-python will not produce) ------------------


def mp_str(s: str) -> bytes:
    b = s.encode()
    if len(b) < 32:
        return bytes([0xA0 | len(b)]) + b
    if len(b) < 256:
        return b"\xd9" + bytes([len(b)]) + b
    return b"\xda" + struct.pack(">H", len(b)) + b


def mp_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A map from already-encoded (key, value) pairs, in the order given, duplicates kept."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in pairs)


def canonical_pairs(obj: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(mp_str(k), codec.pack(obj[k])) for k in sorted(obj, key=lambda s: s.encode())]


def replace_value(obj: dict[str, Any], key: str, encoded: bytes) -> bytes:
    """Canonical map bytes of ``obj`` except that ``key``'s value is the raw bytes ``encoded``."""
    return mp_map([(k, encoded if k == mp_str(key) else v) for k, v in canonical_pairs(obj)])


# --- JSON form of messages ------------------------------------------------------------------


def to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    """Inverse of :func:`to_json` (used by the tests)."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


# --- the valid messages ---------------------------------------------------------------------

#: The seed's §4.3 worked example: (C⁰, L) per node, network parameter k = 0.2.
SEED_EXAMPLE = {"node1": (1000.0, 0.5), "node2": (1500.0, 0.8), "node3": (2000.0, 1.2)}


M = TypeVar("M", bound=Message)


def build(cls: type[M], **fields: Any) -> M:
    """``cls(**fields)``; lists stand in for the tuple-typed fields (the converters accept both)."""
    return cls(**fields)


def _times(seq: int, ttl_ms: int) -> dict[str, int]:
    return {"seq": seq, "issued_at": T0, "expires_at": T0 + ttl_ms}


def messages() -> list[tuple[str, Message]]:
    """(signer name, message) for one valid message of every kind, in a fixed order."""
    node1 = KEYS["node1"]
    bids = {
        name: build(Bid, **_times(11, 60_000), task_id=TASK_ID, c0=c0, load=load)
        for name, (c0, load) in SEED_EXAMPLE.items()
    }
    bid_envelopes = {name: KEYS[name].envelope("bid", codec.pack(b.to_wire())) for name, b in bids.items()}
    # Task 1 of §4.3: R = 3000 → S = {node1, node3}; shares ∝ C (C = C⁰ + 0.2·L).
    c1 = 1000.0 + 0.2 * 0.5
    c3 = 2000.0 + 0.2 * 1.2
    chosen = sorted([("node1", c1), ("node3", c3)], key=lambda nc: KEYS[nc[0]].peer_id)
    total = chosen[0][1] + chosen[1][1]
    assignments = [
        {"shard": i, "peer_id": KEYS[name].peer_id, "share": c / total, "inputs": {}}
        for i, (name, c) in enumerate(chosen)
    ]
    # One story across the vectors: the lease and the result are node1's for the shard the
    # award gives node1, and the vote's inputs are the award's (peer, shard) pairs.
    shard_of = {name: i for i, (name, _) in enumerate(chosen)}
    # The round's participants are the award's peers; the committee is drawn from them
    # (SPEC.md §11.1): with two participants both sit on it, and the quorum is 2.
    committee = sorted(draw_committee(TASK_ID, 1, [KEYS[n].peer_id for n, _ in chosen], 3))
    outputs = {"node1": (SHA_A, 1000.0), "node3": (SHA_B, 2000.0)}
    return [
        (
            "node1",
            build(
                Advert,
                **_times(7, 30_000),
                c0=1000.0,
                load=0.5,
                cpu={"cores": 16, "model": "AMD EPYC 9354 32-Core Processor", "gflops": 412.5},
                memory={"total_mb": 128_000, "available_mb": 96_000},
                gpus=[
                    {
                        "index": 0,
                        "model": "NVIDIA H100 80GB HBM3",
                        "vram_total_mb": 81_559,
                        "vram_free_mb": 80_000,
                        "util_pct": 0.0,
                        "gflops": 587.5,
                    }
                ],
                offer={
                    "cores": 8,
                    "gpus": [0],
                    "memory_mb": 64_000,
                    "kinds": ["echo", "keras-train", "sleep"],
                    "draining": False,
                    "slots": 2,
                    "busy": 1,
                },
                params={"k": 0.2, "dc_min": 0.0, "dc_max": None},
                addrs=[f"/ip4/192.0.2.1/tcp/4001/p2p/{node1.peer_id}"],
                version="0.1.0",
            ),
        ),
        (
            "submitter",
            build(
                TaskAnnounce,
                **_times(3, 3_600_000),
                task_id=TASK_ID,
                kind="keras-train",
                work=30_000.0,
                deadline_ms=10_000,
                max_shards=2,
                resources={"gpu": False, "memory_mb": 2_048},
                aggregation="weighted_mean",
                rounds=1,
                params={"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.001},
                inputs={"train": {"sha256": SHA_IN, "size": 407_000}},
                bid_window_ms=500,
                net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
            ),
        ),
        ("node1", bids["node1"]),
        (
            "submitter",
            build(
                Award,
                **_times(4, 3_600_000),
                task_id=TASK_ID,
                epoch=0,
                bids=[bid_envelopes[n] for n in sorted(bid_envelopes, key=lambda n: KEYS[n].peer_id)],
                assignments=assignments,
                under_capacity=False,
                excluded=[],
            ),
        ),
        (
            "node1",
            build(
                Lease,
                **_times(12, 60_000),
                task_id=TASK_ID,
                epoch=0,
                shard=shard_of["node1"],
                round=1,
                state="running",
                detail="",
            ),
        ),
        (
            "node1",
            build(
                Result,
                **_times(13, 3_600_000),
                task_id=TASK_ID,
                epoch=0,
                shard=shard_of["node1"],
                round=1,
                ok=True,
                error=None,
                outputs={"weights": {"sha256": outputs["node1"][0], "size": 407_000}},
                weight=outputs["node1"][1],
                metrics={"accuracy": 0.875, "loss": 0.25},
            ),
        ),
        (
            "node1",
            build(
                Vote,
                **_times(14, 3_600_000),
                task_id=TASK_ID,
                round=1,
                rule="weighted_mean",
                committee=committee,
                inputs=sorted(
                    [
                        {
                            "peer_id": KEYS[name].peer_id,
                            "shard": shard_of[name],
                            "sha256": outputs[name][0],
                            "weight": outputs[name][1],
                        }
                        for name in shard_of
                    ],
                    key=lambda i: (i["peer_id"], i["shard"]),
                ),
                excluded=[],
                output={"sha256": SHA_O, "size": 407_000},
                attempt=0,
            ),
        ),
        (
            "submitter",
            build(Cancel, **_times(5, 60_000), task_id=TASK_ID, reason="cancelled by the submitter"),
        ),
    ]


def envelope_vectors() -> dict[str, Any]:
    out = []
    for signer_name, msg in messages():
        key = KEYS[signer_name]
        payload = codec.pack(msg.to_wire())
        sb = signing_bytes(msg.KIND, PROTOCOL_VERSION, payload)
        sig = key.private.sign(sb)
        raw = codec.pack(
            {"key": key.public, "payload": payload, "sig": sig, "type": msg.KIND, "v": PROTOCOL_VERSION}
        )
        out.append(
            {
                "kind": msg.KIND,
                "signer": signer_name,
                "peer_id": key.peer_id,
                "message": to_json(msg.to_wire()),
                "scope": msg.scope(),
                "payload_hex": payload.hex(),
                "signing_bytes_hex": sb.hex(),
                "signature_hex": sig.hex(),
                "envelope_hex": raw.hex(),
                "envelope_sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
    return {
        "description": "One valid signed envelope per message kind (protocol/SPEC.md §5).",
        "version": PROTOCOL_VERSION,
        "domain_hex": DOMAIN.hex(),
        "keys": {
            name: {"seed_hex": k.seed.hex(), "public_key_hex": k.public.hex(), "peer_id": k.peer_id}
            for name, k in KEYS.items()
        },
        "vectors": out,
    }


# --- negative vectors -----------------------------------------------------------------------


def negative_vectors() -> dict[str, Any]:
    n1 = KEYS["node1"]
    bid = build(Bid, **_times(11, 60_000), task_id=TASK_ID, c0=1000.0, load=0.5)
    wire = bid.to_wire()
    payload = codec.pack(wire)
    good = n1.envelope("bid", payload)
    outer: dict[str, Any] = {
        "key": n1.public,
        "payload": payload,
        "sig": n1.sign("bid", payload),
        "type": "bid",
        "v": PROTOCOL_VERSION,
    }
    vecs: list[dict[str, Any]] = []

    def add(name: str, raw: bytes, reason: str, note: str) -> None:
        vecs.append(
            {"name": name, "decoder": "open_envelope", "input_hex": raw.hex(), "reason": reason, "note": note}
        )

    def resigned(payload_bytes: bytes, note: str, name: str, reason: str) -> None:
        add(name, n1.envelope("bid", payload_bytes), reason, note + " (validly signed)")

    sig = bytearray(outer["sig"])
    sig[0] ^= 0x01
    add(
        "bad_signature",
        codec.pack({**outer, "sig": bytes(sig)}),
        "bad_signature",
        "first signature bit flipped",
    )
    tampered = codec.pack({**wire, "load": 0.0})
    add(
        "tampered_payload",
        codec.pack({**outer, "payload": tampered}),
        "bad_signature",
        "payload changed (load 0.5 → 0.0) after signing",
    )
    other = KEYS["node2"]
    add(
        "wrong_key",
        codec.pack({**outer, "key": other.public}),
        "bad_signature",
        "signature by node1 presented with node2's key (claiming another identity)",
    )
    add(
        "wrong_kind_domain_reuse",
        codec.pack({**outer, "type": "vote"}),
        "bad_signature",
        "a valid bid signature and payload presented as a vote: the domain (kind) differs",
    )
    add(
        "outer_key_order",
        mp_map(list(reversed(canonical_pairs(outer)))),
        "non_canonical",
        "envelope map keys in reverse order",
    )
    add(
        "outer_duplicate_key",
        mp_map([*canonical_pairs(outer), (mp_str("v"), codec.pack(1))]),
        "non_canonical",
        "envelope map with key 'v' twice",
    )
    add(
        "outer_wide_int",
        replace_value(outer, "v", b"\xcd\x00\x02"),
        "non_canonical",
        "version 2 written as uint16 instead of a positive fixint",
    )
    add("unknown_version", codec.pack({**outer, "v": 3}), "unsupported_version", "protocol version 3")
    add(
        "old_version",
        codec.pack({**outer, "v": 1}),
        "unsupported_version",
        "protocol version 1 (before the award's certified and caps fields, SPEC §14)",
    )
    add(
        "unknown_kind", codec.pack({**outer, "type": "gossip"}), "unexpected_kind", "type 'gossip' is no kind"
    )
    add("truncated", good[:-1], "malformed", "valid envelope minus its last byte")
    add("trailing_bytes", good + b"\xc0", "malformed", "valid envelope followed by one nil")
    add("empty", b"", "malformed", "zero bytes")
    add("not_a_map", codec.pack([1, 2, 3]), "malformed", "an array, not a map")
    add("extra_field", codec.pack({**outer, "x": 0}), "malformed", "envelope with a sixth key")
    add("missing_field", codec.pack({k: v for k, v in outer.items() if k != "sig"}), "malformed", "no 'sig'")
    add("short_key", codec.pack({**outer, "key": n1.public[:31]}), "malformed", "31-byte public key")
    add("short_sig", codec.pack({**outer, "sig": outer["sig"][:63]}), "malformed", "63-byte signature")
    add(
        "payload_as_str",
        replace_value(outer, "payload", mp_str("x")),
        "malformed",
        "payload is a msgpack str, not bin",
    )
    add("version_as_bool", codec.pack({**outer, "v": True}), "malformed", "version true instead of 1")
    big = codec.pack({**outer, "payload": b"\x00" * MAX_ENVELOPE_BYTES})
    add("oversized", big, "oversized", f"{len(big)}-byte envelope (cap {MAX_ENVELOPE_BYTES})")

    # Hostile payloads under valid signatures: the signature check passes, decoding must not.
    resigned(
        mp_map(list(reversed(canonical_pairs(wire)))),
        "payload keys in reverse order",
        "payload_key_order",
        "non_canonical",
    )
    resigned(
        mp_map([*canonical_pairs(wire), (mp_str("load"), codec.pack(0.5))]),
        "payload with 'load' twice",
        "payload_duplicate_key",
        "non_canonical",
    )
    resigned(
        replace_value(wire, "load", b"\xca" + struct.pack(">f", 0.5)),
        "load 0.5 as float32 instead of float64",
        "payload_float32",
        "non_canonical",
    )
    resigned(
        replace_value(wire, "c0", codec.pack(1000)),
        "c0 as the integer 1000 instead of the float64 1000.0",
        "payload_int_for_float",
        "non_canonical",
    )
    resigned(
        replace_value(wire, "c0", codec.pack(10**7)),
        "c0 as the integer 10000000, above the field's bound 1e6: the type check accepts the "
        "integer and judges its value (SPEC §3), so absurd comes before non_canonical",
        "payload_int_for_float_out_of_bounds",
        "absurd",
    )
    resigned(
        replace_value(wire, "seq", b"\xcf" + struct.pack(">Q", 11)),
        "seq 11 as uint64 instead of a positive fixint",
        "payload_wide_int",
        "non_canonical",
    )
    resigned(
        codec.pack({**wire, "extra": 1}),
        "unknown payload field 'extra'",
        "payload_unknown_field",
        "malformed",
    )
    resigned(
        codec.pack({k: v for k, v in wire.items() if k != "load"}),
        "payload without 'load'",
        "payload_missing_field",
        "malformed",
    )
    resigned(
        codec.pack({**wire, "c0": -1.0}), "negative capacity c0 = -1.0", "payload_negative_capacity", "absurd"
    )
    resigned(codec.pack({**wire, "c0": 1e300}), "capacity c0 = 1e300", "payload_huge_capacity", "absurd")
    resigned(codec.pack({**wire, "load": float("nan")}), "load is NaN", "payload_nan", "absurd")
    resigned(codec.pack({**wire, "load": float("inf")}), "load is +inf", "payload_inf", "absurd")
    resigned(codec.pack({**wire, "seq": 0}), "seq 0 (sequences start at 1)", "payload_seq_zero", "absurd")
    resigned(
        codec.pack({**wire, "expires_at": T0 - 1}),
        "expires_at before issued_at",
        "payload_expires_first",
        "absurd",
    )
    resigned(
        codec.pack({**wire, "task_id": "ABC"}),
        "task_id not 32 lowercase hex",
        "payload_bad_task_id",
        "malformed",
    )
    resigned(codec.pack({**wire, "load": True}), "load is a boolean", "payload_bool_for_float", "malformed")
    resigned(codec.pack([1, 2]), "payload is an array", "payload_not_a_map", "malformed")
    resigned(payload[:-1], "payload truncated by one byte", "payload_truncated", "malformed")
    cancel = build(Cancel, **_times(5, 60_000), task_id=TASK_ID, reason="x")
    long_reason = codec.pack({**cancel.to_wire(), "reason": "x" * 257})
    add(
        "payload_oversized_string",
        KEYS["submitter"].envelope("cancel", long_reason),
        "oversized",
        "cancel reason of 257 characters (max 256), validly signed",
    )

    frames = [
        {
            "name": "frame_oversized_header",
            "decoder": "FrameDecoder",
            "input_hex": struct.pack(">I", MAX_FRAME + 1).hex(),
            "reason": "oversized",
            "note": "a header announcing MAX_FRAME + 1 bytes is rejected before any payload arrives",
        },
        {
            "name": "frame_max_header",
            "decoder": "FrameDecoder",
            "input_hex": "ffffffff",
            "reason": "oversized",
            "note": "a header announcing 2**32 - 1 bytes",
        },
    ]
    return {
        "description": "Inputs every decoder must reject, with the reason tag it must report "
        "(protocol/SPEC.md §12).",
        "vectors": vecs + frames,
    }


# --- codec, framing, peer IDs, replay -------------------------------------------------------


def codec_vectors() -> dict[str, Any]:
    valid: list[Any] = [
        None,
        True,
        False,
        0,
        127,
        128,
        255,
        256,
        65_535,
        65_536,
        2**32,
        2**63 - 1,
        -1,
        -32,
        -33,
        -128,
        -129,
        -(2**63),
        0.0,
        -0.0,
        0.5,
        1000.1,
        1e300,
        "",
        "peerd",
        "é",
        "x" * 32,
        b"",
        b"\x00\xff",
        [],
        [1, "a", None],
        {},
        {"b": 1, "a": 2, "aa": 3, "B": 4, "é": 5, "z": {"y": [1.5]}},
    ]
    good = [{"value": to_json(v), "hex": codec.pack(v).hex()} for v in valid]
    nested = b"\x91" * 17 + b"\xc0"  # 17 nested one-element arrays around nil: nil sits at depth 17
    bad = [
        ("uint8_small", b"\xcc\x05", "non_canonical", "5 as uint8 instead of a positive fixint"),
        ("int8_positive", b"\xd0\x05", "non_canonical", "5 as int8"),
        ("uint16_small", b"\xcd\x00\xff", "non_canonical", "255 as uint16 instead of uint8"),
        ("int16_negative", b"\xd1\xff\xff", "non_canonical", "-1 as int16 instead of a negative fixint"),
        ("float32", b"\xca" + struct.pack(">f", 0.5), "non_canonical", "0.5 as float32"),
        ("str8_short", b"\xd9\x03abc", "non_canonical", "'abc' as str8 instead of fixstr"),
        ("bin16_short", b"\xc5\x00\x01\x00", "non_canonical", "b'\\x00' as bin16 instead of bin8"),
        ("array16_short", b"\xdc\x00\x01\xc0", "non_canonical", "[nil] as array16 instead of fixarray"),
        ("map16_short", b"\xde\x00\x01\xa1a\x01", "non_canonical", "{'a': 1} as map16"),
        ("map_unsorted", b"\x82\xa1b\x01\xa1a\x02", "non_canonical", "{'b': 1, 'a': 2}: keys out of order"),
        ("map_duplicate", b"\x82\xa1a\x01\xa1a\x02", "non_canonical", "key 'a' twice"),
        ("map_int_key", b"\x81\x01\x02", "malformed", "integer map key"),
        ("map_bin_key", b"\x81\xc4\x01a\x01", "non_canonical", "bin map key"),
        ("too_deep", nested, "non_canonical", "a value nested 17 levels deep (limit 16)"),
        ("ext", b"\xd4\x01\x00", "malformed", "an ext value (fixext1)"),
        ("timestamp_ext", b"\xd6\xff\x00\x00\x00\x00", "malformed", "msgpack timestamp ext"),
        ("reserved_c1", b"\xc1", "malformed", "the never-used byte 0xc1"),
        ("truncated_str", b"\xa5abc", "malformed", "fixstr of 5 with 3 bytes"),
        ("trailing", b"\xc0\xc0", "malformed", "two objects"),
        ("empty", b"", "malformed", "no bytes at all"),
        ("invalid_utf8", b"\xa2\xc3\x28", "malformed", "str that is not UTF-8"),
    ]
    return {
        "description": "Canonical msgpack (protocol/SPEC.md §3): values and their only valid "
        "encoding, then encodings a decoder must reject.",
        "valid": good,
        "invalid": [{"name": n, "hex": h.hex(), "reason": r, "note": note} for n, h, r, note in bad],
    }


def framing_vectors() -> dict[str, Any]:
    payloads = [b"", b"\x00", b"peerd", bytes(range(256))]
    return {
        "description": "Stream framing: 4-byte big-endian length, then the payload; MAX_FRAME = 1 MiB.",
        "max_frame": MAX_FRAME,
        "frames": [{"payload_hex": p.hex(), "frame_hex": encode_frame(p).hex()} for p in payloads],
    }


def peerid_vectors() -> dict[str, Any]:
    out = []
    for name, k in KEYS.items():
        out.append(
            {
                "name": name,
                "seed_hex": k.seed.hex(),
                "public_key_hex": k.public.hex(),
                "multihash_hex": (bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + k.public).hex(),
                "peer_id": k.peer_id,
            }
        )
    return {
        "description": "libp2p peer IDs of Ed25519 keys: base58btc(identity multihash(protobuf PublicKey)).",
        "vectors": out,
    }


def replay_vectors() -> dict[str, Any]:
    """A script of envelopes fed, in order, to ONE fresh receiver with the given clock."""
    n1, n2 = KEYS["node1"], KEYS["node2"]
    other_task = "fedcba9876543210fedcba9876543210"

    def advert(seq: int, issued: int, ttl: int, key: Key = n1, load: float = 0.5) -> bytes:
        msg = build(
            Advert,
            seq=seq,
            issued_at=issued,
            expires_at=issued + ttl,
            c0=1000.0,
            load=load,
            cpu={"cores": 1, "model": "", "gflops": 1.0},
            memory={"total_mb": 1, "available_mb": 1},
            gpus=[],
            offer={
                "cores": 1,
                "gpus": [],
                "memory_mb": 1,
                "kinds": [],
                "draining": False,
                "slots": 1,
                "busy": 0,
            },
            params={"k": 0.2, "dc_min": 0.0, "dc_max": None},
            addrs=[],
            version="0.1.0",
        )
        return key.envelope("advert", codec.pack(msg.to_wire()))

    def bid(seq: int, task: str) -> bytes:
        msg = build(Bid, seq=seq, issued_at=T0, expires_at=T0 + 60_000, task_id=task, c0=1.0, load=0.0)
        return n1.envelope("bid", codec.pack(msg.to_wire()))

    steps = [
        (advert(5, T0, 30_000), T0, "accept", "first advert of node1"),
        (
            advert(5, T0, 30_000),
            T0 + 1,
            "duplicate",
            "the same envelope again: dropped by its ID before any cryptography (SPEC §5.3)",
        ),
        (advert(5, T0, 30_000, load=0.6), T0 + 1, "replayed", "another advert with the same sequence"),
        (advert(4, T0, 30_000), T0 + 2, "replayed", "a lower sequence"),
        (advert(6, T0 + 1000, 30_000), T0 + 1000, "accept", "the next sequence"),
        (advert(9, T0, 30_000, n2), T0 + 1000, "accept", "another signer has its own sequence"),
        (advert(7, T0 - 100_000, 30_000), T0 + 1000, "expired", "expired 70 s ago (skew 30 s)"),
        (advert(8, T0 - 61_000, 30_000), T0, "expired", "expires_at + 30 s skew = now - 1 ms"),
        (advert(10, T0 - 60_000, 30_000), T0, "accept", "expires_at + 30 s skew = now: still valid"),
        (advert(11, T0 + 31_000, 30_000), T0, "from_future", "issued 31 s ahead of the receiver's clock"),
        (advert(12, T0 + 30_000, 30_000), T0, "accept", "issued exactly 30 s ahead: within the skew"),
        (advert(13, T0, 120_001), T0, "absurd", "lifetime 120 001 ms > MAX_TTL of advert (120 000 ms)"),
        (bid(3, TASK_ID), T0, "accept", "bid seq 3 for task A"),
        (bid(2, other_task), T0, "accept", "bid seq 2 for task B: scopes are independent"),
        (bid(2, TASK_ID), T0, "replayed", "bid seq 2 for task A is below 3"),
    ]
    return {
        "description": "Duplicates, replay and freshness (protocol/SPEC.md §5.3, §6): feed the envelopes "
        "in order to one receiver whose clock reads now_ms; expect 'accept' or the drop reason.",
        "skew_ms": 30_000,
        "steps": [
            {"envelope_hex": raw.hex(), "now_ms": now, "expect": expect, "note": note}
            for raw, now, expect, note in steps
        ],
    }


def blob_vectors() -> dict[str, Any]:
    from protocol import blobproto

    msgs: list[Any] = [
        blobproto.GetRequest(SHA_A, 0),
        blobproto.GetRequest(SHA_A, 262_144),
        blobproto.GetHeader("ok", 407_000),
        blobproto.GetHeader("not_found", 0),
        blobproto.Chunk(b"peerd"),
        blobproto.Ack(1_048_576),
        blobproto.End(SHA_A),
    ]
    return {
        "description": "Blob protocol messages (/peerd/blob/2.0.0, protocol/SPEC.md §9): "
        "each is one frame payload. 'invalid': payloads a decoder must reject, with the reason; "
        "'sessions': flow-control runs (SPEC §9.3 steps 4-5) on one side that must fail with the reason.",
        "messages": [
            {
                "type": type(m).__name__,
                "fields": to_json({f: getattr(m, f) for f in m.__dataclass_fields__}),
                "hex": blobproto.encode(m).hex(),
            }
            for m in msgs
        ],
    }


def committee_vectors() -> dict[str, Any]:
    from protocol.committee import committee, draw_key, quorum

    participants = sorted(k.peer_id for k in KEYS.values())
    rounds = []
    for r in (0, 1, 2):
        keys = {p: draw_key(TASK_ID, r, p).hex() for p in participants}
        drawn = committee(TASK_ID, r, participants, 3)
        rounds.append(
            {
                "round": r,
                "draw_input_hex": {
                    p: (TASK_ID.encode() + b"\x00" + r.to_bytes(8, "big") + b"\x00" + p.encode()).hex()
                    for p in participants
                },
                "draw_key_hex": keys,
                "committee_by_key": list(drawn),
                "committee_sorted": sorted(drawn),
                "quorum": quorum(len(drawn)),
            }
        )
    return {
        "description": "Committee draw (protocol/SPEC.md §11): the 3 participants with the smallest "
        "sha256(task_id ‖ 0x00 ‖ round u64 BE ‖ 0x00 ‖ peer_id).",
        "task_id": TASK_ID,
        "participants": participants,
        "rounds": rounds,
    }


#: Extra fixed keys: aggregation cases need up to 8 distinct participants.
AGG_KEYS = [KEYS[n] for n in ("node1", "node2", "node3", "submitter")] + [
    Key(f"agg{i}", bytes((128 + 32 * i + j) % 256 for j in range(32))) for i in range(4)
]


def det_values(label: str, count: int, kind: str) -> list[Any]:
    """Deterministic pseudo-random values (sha256 of a label, no RNG): floats of mixed signs
    and magnitudes (so float addition is visibly non-associative), or small integers."""
    out: list[Any] = []
    for i in range(count):
        h = hashlib.sha256(f"{label}/{i}".encode()).digest()
        if kind == "f":
            mantissa = (int.from_bytes(h[:8], "big") >> 11) / 2.0**53 * 2.0 - 1.0
            out.append(mantissa * 10.0 ** (h[8] % 9 - 4))
        else:
            out.append(int.from_bytes(h[:4], "big") % 2001 - 1000)
    return out


def _arrays_json(arrays: list[Any]) -> list[dict[str, Any]]:
    return [{"dtype": a.dtype.str, "shape": list(a.shape), "values": a.ravel().tolist()} for a in arrays]


def aggregation_cases() -> list[dict[str, Any]]:
    """Cases that tell every plausible wrong reading of SPEC §11.3 apart from the right one
    (tests/unit/test_vectors.py implements the wrong readings and checks that each one
    disagrees with at least one case)."""
    import numpy as np

    from protocol.aggregation import aggregate, effective_weight
    from protocol.certificate import input_key
    from protocol.errors import RemoteProtocolError
    from protocol.tensors import encode_arrays

    cases: list[dict[str, Any]] = []

    def case(name: str, rule: str, note: str, rows: list[tuple[int, int, float, list[Any]]]) -> None:
        """rows: (peer index into AGG_KEYS, shard, committed weight, arrays)."""
        inputs = []
        agg_in = []
        for k, shard, weight, arrays in rows:
            peer = AGG_KEYS[k].peer_id
            item: dict[str, Any] = {
                "peer_id": peer,
                "shard": shard,
                "weight": weight,
                "tensors_hex": encode_arrays(arrays).hex(),
            }
            if all(np.isfinite(a).all() for a in arrays):
                item["arrays"] = _arrays_json(arrays)  # NaN and ±inf have no JSON form: hex only
            inputs.append(item)
            agg_in.append((input_key(peer, shard), effective_weight(weight), arrays))
        try:
            out = aggregate(rule, agg_in)
        except RemoteProtocolError as exc:
            expect: dict[str, Any] = {"error": exc.reason}
        else:
            raw = encode_arrays(out)
            expect = {
                "arrays": _arrays_json(out),
                "hex": raw.hex(),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        cases.append({"name": name, "rule": rule, "note": note, "inputs": inputs, "expect": expect})

    def f8(*v: float) -> Any:
        return np.array(v, dtype="<f8")

    def rnd(label: str, n: int, dtype: str) -> Any:
        return np.array(det_values(label, n, "f" if dtype[1] == "f" else "i"), dtype=dtype)

    # sum: the starting value (+0.0, so an all -0.0 coordinate sums to +0.0), the order
    # (peer ID, then shard numerically: agg1 holds shards 2 and 10), float64 accumulation.
    neg0 = np.array([-0.0], dtype="<f8")
    case(
        "sum_f8",
        "sum",
        "5 inputs, peer agg1 holding shards 2 and 10; last coordinate -0.0 everywhere",
        [
            (
                k,
                s,
                w,
                [
                    np.concatenate([rnd(f"sum_f8/{k}/{s}", 64, "<f8"), neg0]),
                    rnd(f"sum_f8m/{k}/{s}", 4, "<f8").reshape(2, 2),
                ],
            )
            for k, s, w in ((0, 0, 1.0), (5, 10, 2.0), (2, 1, 0.0), (5, 2, 3.0), (6, 3, 1.0))
        ],
    )
    case(
        "sum_f4",
        "sum",
        "float32 inputs: accumulated in float64, cast once",
        [(k, k, 1.0, [rnd(f"sum_f4/{k}", 16, "<f4")]) for k in range(6)],
    )
    case(
        "sum_f2_direct_cast",
        "sum",
        "1 + 2^-11 + 2^-24 is just above a float16 tie: cast directly from float64 it rounds up; "
        "through float32 (or accumulated in float32) it becomes the tie and rounds down to 1.0",
        [
            (0, 0, 1.0, [np.array([1.0, 1.0], dtype="<f2")]),
            (1, 1, 1.0, [np.array([2.0**-11, 0.5], dtype="<f2")]),
            (2, 2, 1.0, [np.array([2.0**-24, 0.25], dtype="<f2")]),
        ],
    )
    case(
        "sum_i8_beyond_2p53",
        "sum",
        "int64 is converted to and accumulated in float64, not summed exactly: 2^53 + 1 becomes 2^53 "
        "on conversion, and 2^53, 1, 1 sum to 2^53 or 2^53 + 2 depending on the order; "
        "2^62 + 2^62 saturates at 2^63 - 1",
        [
            (0, 0, 1.0, [np.array([2**53, 2**62, -5, 2**53 + 1], dtype="<i8")]),
            (1, 1, 1.0, [np.array([1, 2**62, 7, 0], dtype="<i8")]),
            (2, 2, 1.0, [np.array([1, 0, -1, 0], dtype="<i8")]),
        ],
    )
    case(
        "sum_i4_u1_saturate",
        "sum",
        "integer sums saturate at the dtype's range (no wrap-around)",
        [
            (0, 0, 1.0, [np.array([2**30, -(2**30), 5], dtype="<i4"), np.array([200, 3], dtype="|u1")]),
            (1, 1, 1.0, [np.array([2**30, -(2**30) - 1, 6], dtype="<i4"), np.array([100, 4], dtype="|u1")]),
        ],
    )
    # weighted_mean: (Σ w·x) / Σw, not Σ (w/Σw)·x; weight 0 counts as 1.0.
    case(
        "weighted_mean_f8",
        "weighted_mean",
        "Σ w·x / Σ w differs in the last bits from normalising the weights first; "
        "one committed weight is 0.0 and counts as 1.0; last coordinate -0.0 everywhere",
        [
            (k, k, w, [np.concatenate([rnd(f"wm_f8/{k}", 24, "<f8"), neg0])])
            for k, w in ((0, 1000.0), (1, 3000.0), (2, 0.0), (3, 700.0), (4, 1234.5))
        ],
    )
    case(
        "weighted_mean_f4",
        "weighted_mean",
        "float32 inputs with weights that are not powers of two",
        [(k, k, w, [rnd(f"wm_f4/{k}", 16, "<f4")]) for k, w in ((0, 3.0), (1, 7.0), (2, 11.0))],
    )
    case(
        "weighted_mean_i4_rounding",
        "weighted_mean",
        "means of .5 round half to even: 0.5→0, 1.5→2, -1.5→-2, -2.5→-2, 5.5→6; 2.4→2, -2.6→-3",
        [
            (0, 0, 1.0, [np.array([0, 1, -1, -2, 5, 2, -3], dtype="<i4")]),
            (1, 1, 1.0, [np.array([1, 2, -2, -3, 6, 3, -2], dtype="<i4")]),
        ],
    )
    case(
        "weighted_mean_i4_weights",
        "weighted_mean",
        "integer inputs with unequal weights",
        [(k, k, w, [rnd(f"wm_i4/{k}", 12, "<i4")]) for k, w in ((0, 2.0), (1, 5.0), (2, 9.0))],
    )
    # trimmed_mean: t = min(⌈0.2·n − 1e-9⌉, ⌊(n−1)/2⌋); the kept values summed in ascending
    # sorted order; divided by the count (not multiplied by its reciprocal).
    for n in (4, 5, 8):
        case(
            f"trimmed_mean_f8_n{n}",
            "trimmed_mean",
            f"n = {n}: t = {math.ceil(0.2 * n - 1e-9)} from each end",
            [(k, k, 1.0, [rnd(f"tm_f8_{n}/{k}", 24, "<f8")]) for k in range(n)],
        )
    case(
        "trimmed_mean_i4_n5",
        "trimmed_mean",
        "integer inputs, n = 5 (t = 1): the mean of 3 rounds half to even",
        [(k, k, 1.0, [rnd(f"tm_i4/{k}", 12, "<i4")]) for k in range(5)],
    )
    # median
    case(
        "median_f8_odd",
        "median",
        "n = 5: the middle value; -0.0 becomes +0.0 before sorting",
        [
            (k, k, 1.0, [np.concatenate([rnd(f"med_odd/{k}", 16, "<f8"), f8([-0.0, 5.0, -5.0][k % 3])])])
            for k in range(5)
        ],
    )
    case(
        "median_f8_even",
        "median",
        "n = 4: 0.5·(lo + hi); second-to-last coordinate: lo = hi = 5e-324, where 0.5·lo + 0.5·hi = 0; "
        "last coordinate: -0.0 in the middle",
        [
            (
                k,
                k,
                1.0,
                [
                    np.concatenate(
                        [
                            rnd(f"med_even/{k}", 24, "<f8"),
                            f8([5e-324, 5e-324, 0.0, 1.0][k]),
                            f8([-0.0, -0.0, -1.0, 1.0][k]),
                        ]
                    )
                ],
            )
            for k in range(4)
        ],
    )
    case(
        "median_i4_even",
        "median",
        "n = 4 integers: 0.5·(2 + 3) = 2.5 → 2 and 0.5·(3 + 4) = 3.5 → 4 (half to even), "
        "0.5·(-3 + -2) = -2.5 → -2",
        [
            (k, k, 1.0, [np.array(v, dtype="<i4")])
            for k, v in enumerate(([1, 3, -4], [2, 4, -3], [3, 5, -2], [4, 6, -1]))
        ],
    )
    case(
        "median_u1_odd",
        "median",
        "n = 3 uint8",
        [
            (k, k, 1.0, [np.array(v, dtype="|u1")])
            for k, v in enumerate(([0, 255, 7], [9, 1, 7], [200, 2, 8]))
        ],
    )
    # Errors: what a committee member reports (SPEC §11.3, §12).
    case(
        "error_sum_f8_overflow",
        "sum",
        "1.5e308 + 1.5e308 is +inf in float64",
        [(0, 0, 1.0, [f8(1.5e308)]), (1, 1, 1.0, [f8(1.5e308)])],
    )
    case(
        "error_sum_f4_overflow",
        "sum",
        "3e38 + 3e38 fits float64 but not float32",
        [(0, 0, 1.0, [np.array([3e38], dtype="<f4")]), (1, 1, 1.0, [np.array([3e38], dtype="<f4")])],
    )
    case(
        "error_median_even_overflow",
        "median",
        "0.5·(lo + hi) with lo = hi = 1.5e308: lo + hi overflows (0.5·lo + 0.5·hi would not)",
        [(0, 0, 1.0, [f8(1.5e308)]), (1, 1, 1.0, [f8(1.5e308)])],
    )
    case(
        "error_shape_mismatch",
        "sum",
        "one input has 3 values where the others have 2",
        [(0, 0, 1.0, [f8(1.0, 2.0)]), (1, 1, 1.0, [f8(1.0, 2.0, 3.0)])],
    )
    case(
        "error_dtype_mismatch",
        "sum",
        "one input is float32 where the other is float64",
        [(0, 0, 1.0, [f8(1.0)]), (1, 1, 1.0, [np.array([1.0], dtype="<f4")])],
    )
    case(
        "error_non_finite",
        "median",
        "an input holds NaN (tensors_hex only: JSON has no NaN)",
        [(0, 0, 1.0, [f8(1.0)]), (1, 1, 1.0, [f8(float("nan"))]), (2, 2, 1.0, [f8(2.0)])],
    )
    return cases


def tensor_vectors() -> dict[str, Any]:
    import numpy as np

    from protocol.tensors import encode_arrays

    cases = {
        "float32_matrix_and_vector": [
            np.array([[1.0, -2.5], [0.25, 3.0]], dtype="<f4"),
            np.array([0.5, -0.0, 7.0], dtype="<f4"),
        ],
        "float64_and_float16": [
            np.array([0.1, -1e-300, 5e-324], dtype="<f8"),
            np.array([65504.0, -6e-08], dtype="<f2"),
        ],
        "int32_int64_scalar": [np.array([-(2**31), 2**31 - 1], dtype="<i4"), np.array(42, dtype="<i8")],
        "uint8_empty": [np.zeros((0, 3), dtype="|u1")],
        "empty_list": [],
    }
    tensors = [
        {
            "name": name,
            "arrays": _arrays_json(arrays),
            "hex": encode_arrays(arrays).hex(),
            "sha256": hashlib.sha256(encode_arrays(arrays)).hexdigest(),
        }
        for name, arrays in cases.items()
    ]
    return {
        "description": "Tensor lists (protocol/SPEC.md §11.2), and aggregation cases (§11.3): each "
        "input is (peer_id, shard, committed weight, tensor list); aggregate them in ascending "
        "(peer_id, shard) order with trim_ratio 0.2 and a committed weight of 0 counting as 1.0; "
        "expect the output tensor list, or the drop reason. Inputs are listed in no particular order.",
        "tensors": tensors,
        "trim_ratio": 0.2,
        "aggregation": aggregation_cases(),
    }


# --- awards, re-awards and votes (SPEC §10.3, §11.1) --------------------------------------


def _story() -> dict[str, Any]:
    """The announce, the seed-example bids and the epoch-0 award of envelopes.json."""
    msgs = dict((m.KIND, (signer, m)) for signer, m in messages())
    announce = msgs["announce"][1]
    award = msgs["award"][1]
    assert isinstance(announce, TaskAnnounce) and isinstance(award, Award)
    return {
        "announce": announce,
        "announce_raw": KEYS["submitter"].envelope("announce", codec.pack(announce.to_wire())),
        "award": award,
        "bids": list(award.bids),
    }


def _award_fields(award: Award) -> dict[str, Any]:
    wire = award.to_wire()
    return {k: wire[k] for k in wire}


def _seal_award(fields: dict[str, Any], signer: str = "submitter") -> bytes:
    msg = build(Award, **fields)
    return KEYS[signer].envelope("award", codec.pack(msg.to_wire()))


def award_vectors() -> dict[str, Any]:
    from protocol.awards import reassign

    st = _story()
    base = _award_fields(st["award"])
    pid = {n: k.peer_id for n, k in KEYS.items()}
    by_shard = sorted(base["assignments"], key=lambda a: a["shard"])
    from protocol.awards import allocate, open_quoted_bids

    alloc = allocate(st["announce"], open_quoted_bids(st["award"]))
    bidders = [(b.peer_id, b.cost) for b in alloc.scored]
    capacity = {b.peer_id: b.capacity for b in alloc.scored}

    def fields(**over: Any) -> dict[str, Any]:
        return {**base, **over}

    def reaward(prev: dict[str, Any], lost: list[str], epoch: int) -> dict[str, Any]:
        excluded = sorted(set(prev["excluded"]) | {pid[n] for n in lost})
        moved = reassign(prev["assignments"], set(excluded), bidders, task_id=TASK_ID, capacity=capacity)
        return {**prev, "epoch": epoch, "seq": 4 + epoch, "excluded": excluded, "assignments": moved}

    epoch1 = reaward(base, ["node3"], 1)  # node3 lost: its shard goes to the spare bidder node2
    epoch2 = reaward(epoch1, ["node1"], 2)  # node1 lost too: no spare left, node2 holds both
    assert {a["peer_id"] for a in epoch1["assignments"]} == {pid["node1"], pid["node2"]}
    assert {a["peer_id"] for a in epoch2["assignments"]} == {pid["node2"]}
    raw_e0, raw_e1 = _seal_award(base), _seal_award(epoch1)
    lost = next(a["shard"] for a in by_shard if a["peer_id"] == pid["node3"])  # node3's shard

    cases: list[dict[str, Any]] = []

    def case(
        name: str, award: bytes, expect: str, note: str, previous: bytes | None = None, **extra: Any
    ) -> None:
        cases.append(
            {
                "name": name,
                "award_hex": award.hex(),
                "previous_hex": previous.hex() if previous else None,
                "expect": expect,
                "note": note,
                **extra,
            }
        )

    def swap(assignments: list[dict[str, Any]], **per_shard: Any) -> list[dict[str, Any]]:
        return [{**a, **per_shard.get(f"s{a['shard']}", {})} for a in assignments]

    case("epoch0", raw_e0, "accept", "the envelopes.json award: the seed's task 1, shards to node3 and node1")
    case(
        "epoch0_share_within_tolerance",
        _seal_award(fields(assignments=swap(by_shard, s0={"share": by_shard[0]["share"] + 1e-10}))),
        "accept",
        "a share 1e-10 off C_i/ΣC is within the 1e-9 tolerance",
    )
    case(
        "reaward_spare",
        raw_e1,
        "accept",
        "epoch 1: node3 is lost; its shard goes to the cheapest quoted bidder holding none (node2)",
        raw_e0,
    )
    case(
        "reaward_no_spare",
        _seal_award(epoch2),
        "accept",
        "epoch 2: node1 is lost too; no spare bidder is left, so its shard goes to the cheapest "
        "remaining holder, node2, which then holds both shards",
        raw_e1,
    )
    case(
        "reaward_without_previous",
        _seal_award(
            {
                **epoch1,
                "assignments": swap(
                    epoch1["assignments"],
                    **{f"s{lost}": {"peer_id": pid["node1"]}, f"s{1 - lost}": {"peer_id": pid["node2"]}},
                ),
            }
        ),
        "accept",
        "a receiver without the previous epoch checks only that every holder is a quoted, "
        "non-excluded bidder and the shards are 0..n-1 (here node1 and node2 swapped: the exact "
        "check would refuse it)",
    )
    # --- epoch 0 ---
    case(
        "forged",
        _seal_award(base, "node1"),
        "forged_award",
        "the award is signed by node1, not the submitter",
    )
    case(
        "other_task",
        _seal_award(fields(task_id="fedcba9876543210fedcba9876543210")),
        "bad_award",
        "the award names another task than the announce",
    )
    bad_sig = bytearray(st["bids"][1])
    bad_sig[-20] ^= 0x01  # a byte of the signature (the envelope's "sig" precedes "type" and "v")
    case(
        "embedded_bad_signature",
        _seal_award(fields(bids=[st["bids"][0], bytes(bad_sig), st["bids"][2]])),
        "bad_award",
        "one quoted bid's signature does not verify: the whole award is rejected",
        embedded="bad_signature",
    )
    cancel = build(Cancel, **_times(5, 60_000), task_id=TASK_ID, reason="x")
    case(
        "embedded_unexpected_kind",
        _seal_award(
            fields(bids=[*st["bids"], KEYS["submitter"].envelope("cancel", codec.pack(cancel.to_wire()))])
        ),
        "bad_award",
        "the award quotes a cancel envelope among its bids",
        embedded="unexpected_kind",
    )
    other_bid = build(
        Bid, **_times(12, 60_000), task_id="fedcba9876543210fedcba9876543210", c0=1500.0, load=0.8
    )
    case(
        "bid_for_other_task",
        _seal_award(
            fields(
                bids=[
                    st["bids"][0],
                    KEYS["node2"].envelope("bid", codec.pack(other_bid.to_wire())),
                    st["bids"][2],
                ]
            )
        ),
        "bad_award",
        "node2's quoted bid is for another task: quoted bids are exactly the usable ones, none is skipped",
    )
    again = build(Bid, **_times(12, 60_000), task_id=TASK_ID, c0=1500.0, load=0.8)
    case(
        "two_bids_of_one_signer",
        _seal_award(fields(bids=[*st["bids"], KEYS["node2"].envelope("bid", codec.pack(again.to_wire()))])),
        "bad_award",
        "node2 is quoted twice (seq 11 and 12): one bid per signer, none is skipped",
    )
    wrong = sorted([pid["node1"], pid["node2"]])
    case(
        "wrong_set",
        _seal_award(fields(assignments=[{**a, "peer_id": p} for a, p in zip(by_shard, wrong, strict=True)])),
        "bad_award",
        "node1 and node2 instead of the rule's node1 and node3 (ΣC = 2500.26 < R = 3000)",
    )
    case(
        "shares_swapped",
        _seal_award(
            fields(
                assignments=swap(
                    by_shard, s0={"share": by_shard[1]["share"]}, s1={"share": by_shard[0]["share"]}
                )
            )
        ),
        "bad_award",
        "the two shares exchanged",
    )
    case(
        "share_beyond_tolerance",
        _seal_award(fields(assignments=swap(by_shard, s0={"share": by_shard[0]["share"] + 1e-8}))),
        "bad_award",
        "a share 1e-8 off C_i/ΣC",
    )
    case(
        "under_capacity_wrong",
        _seal_award(fields(under_capacity=True)),
        "bad_award",
        "under_capacity set although ΣC ≥ R",
    )
    case(
        "excluded_at_epoch0",
        _seal_award(fields(excluded=[pid["node2"]])),
        "bad_award",
        "epoch 0 excludes a peer",
    )
    case(
        "shards_not_from_zero",
        _seal_award(fields(assignments=swap(by_shard, s0={"shard": 2}))),
        "bad_award",
        "shards numbered 1 and 2 instead of 0 and 1",
    )
    # --- caps (SPEC §10.2): the seed's task 1 with node3's C capped at 1600 ---
    from protocol.awards import assignments_of

    caps = {pid["node3"]: 1600.0}
    capped = allocate(st["announce"], open_quoted_bids(st["award"]), caps)
    assert {pid["node2"], pid["node3"]} == set(capped.chosen)
    case(
        "epoch0_caps",
        _seal_award(fields(caps=caps, assignments=assignments_of(capped))),
        "accept",
        "node3 capped at 1600: {1,3} (ΣC 2600.1) no longer covers R = 3000; the rule takes {2,3} "
        "(ΣC 3100.16, T 3120.128), shares 1500.16 : 1600",
    )
    case(
        "caps_ignored",
        _seal_award(fields(caps=caps)),
        "bad_award",
        "the award carries node3's cap but assigns as if uncapped ({1,3})",
    )
    case(
        "caps_non_bidder",
        _seal_award(fields(caps={pid["submitter"]: 5.0})),
        "bad_award",
        "the caps name a peer that quoted no bid",
    )
    # --- re-awards (epoch 1, checked against epoch 0 unless the note says otherwise) ---
    e1 = epoch1["assignments"]
    lost_shard, kept_shard = lost, 1 - lost
    case(
        "reaward_excluded_keeps_shard",
        _seal_award({**epoch1, "assignments": by_shard}),
        "bad_award",
        "node3 is excluded but still holds its shard",
    )
    case(
        "reaward_to_non_bidder",
        _seal_award({**epoch1, "assignments": swap(e1, **{f"s{lost_shard}": {"peer_id": pid["submitter"]}})}),
        "bad_award",
        "node3's shard goes to the submitter, which quoted no bid (checked even without the previous epoch)",
    )
    case(
        "reaward_wrong_replacement",
        _seal_award({**epoch1, "assignments": swap(e1, **{f"s{lost_shard}": {"peer_id": pid["node1"]}})}),
        "bad_award",
        "node3's shard goes to node1, a holder, although node2 is a spare bidder",
        raw_e0,
    )
    case(
        "reaward_moves_good_shard",
        _seal_award({**epoch1, "assignments": swap(e1, **{f"s{kept_shard}": {"peer_id": pid["node2"]}})}),
        "bad_award",
        "node1, in good standing, loses its shard to node2 as well",
        raw_e0,
    )
    case(
        "reaward_changes_share",
        _seal_award(
            {**epoch1, "assignments": swap(e1, s0={"share": e1[1]["share"]}, s1={"share": e1[0]["share"]})}
        ),
        "bad_award",
        "the re-award exchanges the two shares (shares are those of epoch 0)",
        raw_e0,
    )
    case(
        "reaward_changes_under_capacity",
        _seal_award({**epoch1, "under_capacity": True}),
        "bad_award",
        "the re-award sets under_capacity, which epoch 0 did not",
        raw_e0,
    )
    case(
        "reaward_drops_a_shard",
        _seal_award({**epoch1, "assignments": [{**a, "shard": 0} for a in e1 if a["shard"] == kept_shard]}),
        "bad_award",
        "only one shard is left (the shard count is fixed by epoch 0)",
        raw_e0,
    )
    case(
        "reaward_forgives",
        _seal_award(
            {
                **epoch2,
                "excluded": [pid["node1"]],
                "assignments": swap(epoch2["assignments"], **{f"s{lost_shard}": {"peer_id": pid["node3"]}}),
            }
        ),
        "bad_award",
        "epoch 2 drops node3, excluded at epoch 1, from `excluded` and gives it a shard back",
        raw_e1,
    )
    return {
        "description": "Awards and re-awards (protocol/SPEC.md §10.3): check each award envelope against "
        "the announce (the task's submitter is its signer) and, where previous_hex is given, the award of "
        "the previous epoch; expect 'accept' or the drop reason ('embedded' names the quoted bid's own "
        "reason, counted as dropped.embedded_<reason>).",
        "announce_hex": st["announce_raw"].hex(),
        "submitter": pid["submitter"],
        "cases": cases,
    }


def vote_vectors() -> dict[str, Any]:
    from protocol.certificate import holders_of

    st = _story()
    aw = award_vectors()
    by_name = {c["name"]: c for c in aw["cases"]}
    raw_e0 = bytes.fromhex(by_name["epoch0"]["award_hex"])
    raw_e1 = bytes.fromhex(by_name["reaward_spare"]["award_hex"])
    from protocol.envelope import open_envelope

    e0, e1 = open_envelope(raw_e0).message, open_envelope(raw_e1).message
    assert isinstance(e0, Award) and isinstance(e1, Award)
    # The same re-award sealed after round 1 was certified: it quotes round 1 (SPEC §7.5), so
    # round 1 stays epoch 0's and epoch 1's holders start at round 2 (§11.1 "The award in force").
    quote = {
        "round": 1,
        "output": {"sha256": SHA_O, "size": 407_000},
        "signers": sorted([KEYS["node1"].peer_id, KEYS["node3"].peer_id]),
    }
    raw_e1q = _seal_award({**_award_fields(e1), "certified": quote})
    e1q = open_envelope(raw_e1q).message
    assert isinstance(e1q, Award)
    pid = {n: k.peer_id for n, k in KEYS.items()}
    name_of = {v: k for k, v in pid.items()}
    sha = {"node1": SHA_A, "node2": hashlib.sha256(b"peerd vector output C").hexdigest(), "node3": SHA_B}
    weight = {"node1": 1000.0, "node2": 1500.0, "node3": 2000.0}

    def inputs_of(award: Award, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return sorted(
            (
                {"peer_id": p, "shard": s, "sha256": sha[name_of[p]], "weight": weight[name_of[p]]}
                for s, p in holders_of(award).items()
                if name_of[p] not in skip
            ),
            key=lambda i: (i["peer_id"], i["shard"]),
        )

    def vote(signer: str, award: Award = e0, seq: int = 20, rnd: int = 1, **over: Any) -> bytes:
        participants = sorted(set(holders_of(award).values()))
        fields: dict[str, Any] = {
            **_times(seq, 3_600_000),
            "task_id": TASK_ID,
            "round": rnd,
            "rule": "weighted_mean",
            "committee": sorted(draw_committee(TASK_ID, rnd, participants, 3)),
            "inputs": inputs_of(award),
            "excluded": [],
            "output": {"sha256": SHA_O, "size": 407_000},
            "attempt": 0,
            **over,
        }
        return KEYS[signer].envelope("vote", codec.pack(build(Vote, **fields).to_wire()))

    cases: list[dict[str, Any]] = []

    def case(
        name: str,
        check: str,
        votes: list[bytes],
        expect: str,
        note: str,
        awards: tuple[int, ...] = (0,),
        rnd: int = 1,
    ) -> None:
        cases.append(
            {
                "name": name,
                "check": check,
                "round": rnd,
                "awards": list(awards),
                "votes_hex": [v.hex() for v in votes],
                "expect": expect,
                "note": note,
            }
        )

    n1, n3 = vote("node1"), vote("node3")
    e0_shards = {name_of[p]: s for s, p in holders_of(e0).items()}
    case(
        "certificate",
        "certificate",
        [n1, n3],
        "accept",
        "node1 and node3, both committee members, sign one ballot",
    )
    case(
        "certificate_attempts_differ",
        "certificate",
        [n1, vote("node3", seq=21, attempt=1)],
        "accept",
        "attempt is not part of the ballot",
    )
    exclude3: dict[str, Any] = {
        "inputs": inputs_of(e0, skip=("node3",)),
        "excluded": [{"peer_id": pid["node3"], "reason": "missing at the round deadline"}],
    }
    case(
        "certificate_with_exclusion",
        "certificate",
        [vote("node1", **exclude3), vote("node3", **exclude3)],
        "accept",
        "node3 is excluded: still a participant (it names the committee), not an input",
    )
    e1_committee = sorted(draw_committee(TASK_ID, 1, sorted(set(holders_of(e1).values())), 3))
    case(
        "certificate_after_reaward",
        "certificate",
        [vote("node1", e1, committee=e1_committee), vote("node2", e1, committee=e1_committee)],
        "accept",
        "after the epoch-1 re-award node1 and node2 hold the shards, and the committee is drawn from them",
        awards=(0, 1),
    )
    case(
        "superseded_by_reaward",
        "certificate",
        [n1, n3],
        "bad_committee",
        "epoch 0's holders certify round 1, but the epoch-1 re-award does not quote round 1 as "
        "certified: round 1 is epoch 1's (its submitter never saw these votes)",
        awards=(0, 1),
    )
    case(
        "certified_before_reaward",
        "certificate",
        [n1, n3],
        "accept",
        "the epoch-1 re-award quotes round 1 as certified with this output: round 1 stays epoch 0's",
        awards=(0, 2),
    )
    case(
        "second_certificate_after_quoting_reaward",
        "certificate",
        [vote("node1", e1, committee=e1_committee), vote("node2", e1, committee=e1_committee)],
        "bad_committee",
        "epoch 1's holders certify round 1 again although their award quotes round 1 as certified "
        "(a re-awarded holder that missed round 1's votes): refused",
        awards=(0, 2),
    )
    other_out: dict[str, Any] = {"output": {"sha256": SHA_A, "size": 407_000}}
    case(
        "quoted_output_differs",
        "vote",
        [vote("node1", **other_out)],
        "bad_certificate",
        "epoch 0's committee, but another output than the one the re-award quotes for round 1",
        awards=(0, 2),
    )
    case(
        "next_round_after_quoting_reaward",
        "certificate",
        [vote("node1", e1, rnd=2), vote("node2", e1, rnd=2)],
        "accept",
        "round 2, after the quoted round 1, is epoch 1's: its holders' committee certifies it",
        awards=(0, 2),
        rnd=2,
    )
    case("no_quorum_one_vote", "certificate", [n1], "no_quorum", "one vote of a committee of two")
    case(
        "no_quorum_one_signer_twice",
        "certificate",
        [n1, vote("node1", seq=21, attempt=1)],
        "no_quorum",
        "node1's two attempts count once",
    )
    case(
        "no_quorum_ballots_differ",
        "certificate",
        [n1, vote("node3", output={"sha256": SHA_A, "size": 407_000})],
        "no_quorum",
        "the two votes name different outputs",
    )
    case(
        "other_round",
        "certificate",
        [
            n1,
            vote(
                "node3",
                round=2,
                committee=sorted(draw_committee(TASK_ID, 2, sorted(set(holders_of(e0).values())), 3)),
            ),
        ],
        "bad_certificate",
        "node3's vote is for round 2 in a certificate of round 1",
    )
    bad = bytearray(n3)
    bad[-20] ^= 0x01
    case(
        "bad_signature",
        "certificate",
        [n1, bytes(bad)],
        "bad_signature",
        "node3's vote signature does not verify",
    )
    case(
        "wrong_rule",
        "vote",
        [vote("node1", rule="sum")],
        "bad_certificate",
        "the vote's rule is sum; the announce says weighted_mean",
    )
    case(
        "shard_twice",
        "vote",
        [vote("node1", inputs=[{**i, "shard": e0_shards["node1"]} for i in inputs_of(e0)])],
        "bad_certificate",
        "both inputs name node1's shard",
    )
    case(
        "wrong_committee",
        "vote",
        [vote("node1", committee=[pid["node1"]])],
        "bad_committee",
        "node1 alone is not the drawn committee",
    )
    case(
        "self_certify",
        "vote",
        [vote("node1", committee=[pid["node1"]], inputs=inputs_of(e0, skip=("node3",)))],
        "bad_committee",
        "node1 lists only itself: its committee of one is drawn correctly from that, "
        "but no award has node1 as its only holder",
    )
    case(
        "shards_swapped",
        "vote",
        [vote("node1", inputs=[{**i, "shard": 1 - i["shard"]} for i in inputs_of(e0)])],
        "bad_committee",
        "the right participants, but each input names the other's shard",
    )
    case(
        "not_in_committee",
        "vote",
        [vote("node2")],
        "not_in_committee",
        "node2 signs a vote of a committee of node1 and node3",
    )
    return {
        "description": "Votes and certificates (protocol/SPEC.md §11.1): with the announce and the "
        "task's signed awards at hand (`awards`: indices into `awards_hex`), check each vote ('vote') "
        "or the set of votes as a certificate of round `round` ('certificate'); expect 'accept' or "
        "the reason. awards_hex: epoch 0; the epoch-1 re-award sealed before round 1 was certified "
        "(`certified` nil); the same re-award quoting round 1 as certified.",
        "announce_hex": st["announce_raw"].hex(),
        "awards_hex": [raw_e0.hex(), raw_e1.hex(), raw_e1q.hex()],
        "cases": cases,
    }


def blob_negative_vectors() -> dict[str, Any]:
    """Blob messages a decoder must reject, and flow-control sessions that must fail."""
    from protocol import blobproto

    def mp(obj: dict[str, Any]) -> bytes:
        return codec.pack(obj)

    ack = blobproto.encode(blobproto.Ack(5))
    invalid = [
        ("not_msgpack", b"\xc1", "malformed", "the never-used byte 0xc1"),
        ("not_a_map", codec.pack("ack"), "malformed", "a str, not a map"),
        ("trailing", ack + b"\xc0", "malformed", "a valid ack followed by nil"),
        ("unknown_type", mp({"type": "put"}), "unknown_type", "type 'put'"),
        ("no_type", mp({"received": 5}), "unknown_type", "no type key"),
        ("missing_field", mp({"type": "ack"}), "bad_field", "ack without received"),
        ("extra_field", mp({"received": 5, "type": "ack", "x": 1}), "bad_field", "ack with a third key"),
        ("str_for_int", mp({"received": "5", "type": "ack"}), "bad_field", "received as a string"),
        ("bool_for_int", mp({"received": True, "type": "ack"}), "bad_field", "received as true"),
        ("negative_int", mp({"received": -1, "type": "ack"}), "bad_field", "received -1"),
        (
            "unknown_status",
            mp({"size": 0, "status": "maybe", "type": "header"}),
            "bad_field",
            "status 'maybe'",
        ),
        (
            "bad_digest",
            mp({"offset": 0, "sha256": SHA_A.upper(), "type": "get"}),
            "bad_digest",
            "uppercase hex",
        ),
        ("short_digest", mp({"sha256": SHA_A[:63], "type": "end"}), "bad_digest", "63 hex characters"),
        ("empty_chunk", mp({"data": b"", "type": "chunk"}), "bad_chunk", "a chunk of 0 bytes"),
        ("str_for_bin", mp({"data": "abc", "type": "chunk"}), "bad_field", "chunk data as str"),
        (
            "key_order",
            mp_map(list(reversed(canonical_pairs({"received": 5, "type": "ack"})))),
            "non_canonical",
            "keys reversed",
        ),
        (
            "wide_int",
            replace_value({"received": 5, "type": "ack"}, "received", b"\xcd\x00\x05"),
            "non_canonical",
            "5 as uint16",
        ),
    ]
    end_a = blobproto.encode(blobproto.End(SHA_A)).hex()

    def chunk(n: int) -> str:
        return blobproto.encode(blobproto.Chunk(b"x" * n)).hex()

    sessions = [
        {
            "name": "ack_decreases",
            "side": "sender",
            "offset": 0,
            "size": 10,
            "events": [
                ["sent", 10],
                ["ack", blobproto.encode(blobproto.Ack(10)).hex()],
                ["ack", blobproto.encode(blobproto.Ack(5)).hex()],
            ],
            "reason": "bad_ack",
            "note": "an ack below the previous one",
        },
        {
            "name": "ack_beyond_sent",
            "side": "sender",
            "offset": 0,
            "size": 10,
            "events": [["sent", 4], ["ack", blobproto.encode(blobproto.Ack(5)).hex()]],
            "reason": "bad_ack",
            "note": "an ack of 5 bytes when 4 were sent",
        },
        {
            "name": "past_size",
            "side": "receiver",
            "offset": 0,
            "size": 4,
            "sha256": SHA_A,
            "events": [["chunk", chunk(5)]],
            "reason": "too_large",
            "note": "5 bytes of a blob announced as 4",
        },
        {
            "name": "end_early",
            "side": "receiver",
            "offset": 0,
            "size": 10,
            "sha256": SHA_A,
            "events": [["chunk", chunk(5)], ["end", end_a]],
            "reason": "short",
            "note": "end after 5 of 10 bytes",
        },
        {
            "name": "end_names_another_blob",
            "side": "receiver",
            "offset": 3,
            "size": 5,
            "sha256": SHA_B,
            "events": [["chunk", chunk(2)], ["end", end_a]],
            "reason": "hash_mismatch",
            "note": "a resumed transfer (offset 3) whose end names another blob than the one requested",
        },
    ]
    return {
        "invalid": [{"name": n, "hex": h.hex(), "reason": r, "note": note} for n, h, r, note in invalid],
        "sessions": sessions,
    }


def render() -> dict[str, str]:
    files: dict[str, Any] = {
        "envelopes.json": envelope_vectors(),
        "negative.json": negative_vectors(),
        "codec.json": codec_vectors(),
        "framing.json": framing_vectors(),
        "peerids.json": peerid_vectors(),
        "replay.json": replay_vectors(),
        "committee.json": committee_vectors(),
        "tensors.json": tensor_vectors(),
        "blob.json": {**blob_vectors(), **blob_negative_vectors()},
        "awards.json": award_vectors(),
        "votes.json": vote_vectors(),
    }
    return {
        name: json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        for name, body in files.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--check", action="store_true", help="compare with the committed files instead of writing"
    )
    args = ap.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("vectors differ from the generator: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
