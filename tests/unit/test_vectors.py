"""The committed golden vectors in protocol/vectors/ agree with the implementation, both ways.

The files are never regenerated here: a change of the wire format must show up as a failing
test and then as a reviewed diff of the JSON (protocol/vectors/generate.py rewrites them).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol import PROTOCOL_VERSION, codec
from protocol.envelope import DOMAIN, Signer, open_envelope, signing_bytes
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.framing import MAX_FRAME, FrameDecoder, encode_frame
from protocol.messages import MESSAGE_TYPES, Award, Bid, TaskAnnounce, Vote
from protocol.peerid import peer_id_from_public_key, public_key_from_peer_id
from protocol.replay import CLOCK_SKEW_MS, ReplayGuard

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"
EXPECTED_FILES = {
    "envelopes.json",
    "negative.json",
    "codec.json",
    "framing.json",
    "peerids.json",
    "replay.json",
    "committee.json",
    "tensors.json",
    "blob.json",
}


@cache
def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def test_every_vector_file_is_checked() -> None:
    present = {p.name for p in VECTORS.glob("*.json")}
    assert present == EXPECTED_FILES, "every vector file is read by a test, and every expected one exists"


def test_generator_is_deterministic_input() -> None:
    """The generator must not depend on the clock or randomness (it would not be reproducible)."""
    source = (VECTORS / "generate.py").read_text(encoding="utf-8")
    for forbidden in ("time.time", "import random", "urandom", "datetime", "generate_private_key"):
        assert forbidden not in source


def test_spec_documents_every_remote_reason() -> None:
    """Every reason tag a decoder in protocol/ can report to a peer appears in SPEC.md §12."""
    spec = (VECTORS.parent / "SPEC.md").read_text(encoding="utf-8")
    reasons: dict[str, str] = {}
    for path in sorted(VECTORS.parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name not in ("RemoteProtocolError", "TransportError", "FieldError", "_fail", "_malformed"):
                continue
            tags = [kw.value for kw in node.keywords if kw.arg == "reason"]
            if name == "_fail" and len(node.args) > 1:
                tags.append(node.args[1])
            for tag in tags:
                if isinstance(tag, ast.Constant) and isinstance(tag.value, str):
                    reasons[tag.value] = path.name
    assert {"bad_signature", "non_canonical", "replayed"} <= set(reasons)
    missing = {r: f for r, f in reasons.items() if f"`{r}`" not in spec}
    assert not missing, f"reason tags raised but not documented in SPEC.md: {missing}"


def test_spec_states_the_constants_the_code_uses() -> None:
    from protocol import blobproto
    from protocol.envelope import MAX_ENVELOPE_BYTES

    spec = (VECTORS.parent / "SPEC.md").read_text(encoding="utf-8")

    def spaced(n: int) -> str:  # SPEC.md writes 65536 as "65 536"
        return f"{n:,}".replace(",", " ")

    assert f"MAX_FRAME = {spaced(MAX_FRAME)}" in spec
    assert f"{spaced(MAX_ENVELOPE_BYTES)} bytes" in spec
    assert f"SKEW = {spaced(CLOCK_SKEW_MS)}" in spec
    assert f"CHUNK = {spaced(blobproto.CHUNK)}" in spec
    assert blobproto.WINDOW == 8 * blobproto.CHUNK and blobproto.ACK_EVERY == blobproto.WINDOW // 2
    assert "`/peerd/bid/1.0.0`" in spec and "`/peerd/blob/1.0.0`" in spec and blobproto.PROTOCOL_ID in spec
    for kind, cls in MESSAGE_TYPES.items():
        ms = cls.MAX_TTL_MS
        days = ms // 86_400_000
        assert f"| `{kind}` | {spaced(ms)} ms" in spec or (days == 31 and f"| `{kind}` | 31 days |" in spec)


# --- envelopes -------------------------------------------------------------------------------


def test_keys() -> None:
    data = load("envelopes.json")
    assert data["version"] == PROTOCOL_VERSION
    assert bytes.fromhex(data["domain_hex"]) == DOMAIN
    for k in data["keys"].values():
        signer = Signer(bytes.fromhex(k["seed_hex"]))
        assert signer.public_key.hex() == k["public_key_hex"]
        assert signer.peer_id == k["peer_id"]


def _envelope_ids() -> list[str]:
    return [v["kind"] for v in load("envelopes.json")["vectors"]]


def test_one_vector_per_kind() -> None:
    assert sorted(_envelope_ids()) == sorted(MESSAGE_TYPES)


@pytest.mark.parametrize("index", range(len(MESSAGE_TYPES)))
def test_envelope_vector(index: int) -> None:
    data = load("envelopes.json")
    v = data["vectors"][index]
    key = data["keys"][v["signer"]]
    seed = bytes.fromhex(key["seed_hex"])
    cls = MESSAGE_TYPES[v["kind"]]
    payload = bytes.fromhex(v["payload_hex"])
    sb = bytes.fromhex(v["signing_bytes_hex"])
    sig = bytes.fromhex(v["signature_hex"])
    raw = bytes.fromhex(v["envelope_hex"])

    # Encode direction: message → payload → signing bytes → signature → envelope.
    msg = cls(**from_json(v["message"]))
    assert codec.pack(msg.to_wire()) == payload
    assert signing_bytes(v["kind"], PROTOCOL_VERSION, payload) == sb
    assert sb == DOMAIN + v["kind"].encode() + b"\x00" + PROTOCOL_VERSION.to_bytes(2, "big") + payload
    assert Ed25519PrivateKey.from_private_bytes(seed).sign(sb) == sig
    assert Signer(seed).seal(msg) == raw
    assert msg.scope() == v["scope"]

    # Decode direction: envelope → verified message.
    signed = open_envelope(raw)
    assert signed.message == msg
    assert signed.signer == v["peer_id"] == key["peer_id"]
    assert signed.digest == v["envelope_sha256"]
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(key["public_key_hex"])).verify(sig, sb)
    assert codec.unpack(payload) == from_json(v["message"])


def test_award_vector_is_the_seed_example() -> None:
    """The award lists three signed bids (the seed's §4.3 nodes) and assigns task 1 (R = 3000)."""
    data = load("envelopes.json")
    by_kind = {v["kind"]: v for v in data["vectors"]}
    award = open_envelope(bytes.fromhex(by_kind["award"]["envelope_hex"])).message
    announce = open_envelope(bytes.fromhex(by_kind["announce"]["envelope_hex"])).message
    assert isinstance(award, Award)
    assert isinstance(announce, TaskAnnounce)
    signed_bids = [open_envelope(b, kinds=frozenset({"bid"})) for b in award.bids]
    bids = {s.signer: s.message for s in signed_bids if isinstance(s.message, Bid)}
    assert list(bids) == sorted(bids) and len(bids) == 3  # listed in peer-ID order
    assert sorted((b.c0, b.load) for b in bids.values()) == [(1000.0, 0.5), (1500.0, 0.8), (2000.0, 1.2)]
    demand = announce.work / (announce.deadline_ms / 1000)
    assert demand == 3000.0
    k = announce.net["k"]
    caps = {p: b.c0 + k * b.load for p, b in bids.items()}
    assert math.isclose(sum(caps[p] * bids[p].load for p in bids), 4100.466)  # DESIGN §4, not 3366.56
    chosen = [a["peer_id"] for a in award.assignments]
    assert chosen == sorted(chosen) and len(chosen) == 2
    assert math.isclose(sum(caps[p] for p in chosen), 3000.34)
    assert math.isclose(sum(caps[p] * bids[p].load for p in chosen), 2900.338)
    total = caps[chosen[0]] + caps[chosen[1]]
    assert [a["share"] for a in award.assignments] == [caps[p] / total for p in chosen]

    from protocol import allocation

    result = allocation.choose(
        [allocation.Candidate(p, b.c0, b.load) for p, b in bids.items()],
        demand=demand,
        max_shards=announce.max_shards,
        params=allocation.NetworkParams(k=k, dc_min=announce.net["dc_min"], dc_max=math.inf),
    )
    assert list(result.chosen) == chosen
    assert list(result.shares) == [a["share"] for a in award.assignments]
    assert not result.under_capacity and award.under_capacity is False
    # And the daemon's own award check (protocol/awards.py) accepts it as signed.
    from protocol.awards import check_award

    submitter = data["keys"]["submitter"]["peer_id"]
    check_award(announce, award, submitter, submitter, signed_bids)


def test_vote_vector_names_the_drawn_committee() -> None:
    data = load("envelopes.json")
    by_kind = {v["kind"]: v for v in data["vectors"]}
    signed = open_envelope(bytes.fromhex(by_kind["vote"]["envelope_hex"]))
    vote = signed.message
    assert isinstance(vote, Vote)
    award = open_envelope(bytes.fromhex(by_kind["award"]["envelope_hex"])).message
    assert isinstance(award, Award)
    participants = sorted(a["peer_id"] for a in award.assignments)
    assert sorted(i["peer_id"] for i in vote.inputs) == participants
    from protocol.certificate import tally, vote_is_well_formed
    from protocol.committee import committee, quorum

    assert list(vote.committee) == sorted(committee(vote.task_id, vote.round, participants, 3))
    vote_is_well_formed(signed)
    assert quorum(len(vote.committee)) == 2
    assert tally([signed]) is None  # one vote of two is not a majority


# --- negative vectors ------------------------------------------------------------------------


def _negative() -> list[dict[str, Any]]:
    return list(load("negative.json")["vectors"])


def test_negative_vectors_cover_the_brief() -> None:
    names = {v["name"] for v in _negative()}
    required = {
        "bad_signature",
        "outer_key_order",
        "payload_key_order",
        "payload_float32",
        "outer_duplicate_key",
        "payload_duplicate_key",
        "unknown_version",
        "unknown_kind",
        "oversized",
        "truncated",
        "wrong_kind_domain_reuse",
    }
    assert required <= names


@pytest.mark.parametrize("vector", _negative(), ids=lambda v: v["name"])
def test_negative_vector(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["input_hex"])
    with pytest.raises(RemoteProtocolError) as ei:
        if vector["decoder"] == "open_envelope":
            open_envelope(raw)
        else:
            assert vector["decoder"] == "FrameDecoder"
            dec = FrameDecoder()
            dec.feed(raw)
            dec.next_frame()
    assert ei.value.reason == vector["reason"]


# --- codec, framing, peer IDs, replay, blobs -----------------------------------------------


@pytest.mark.parametrize("vector", load("codec.json")["valid"], ids=lambda v: v["hex"][:24])
def test_codec_valid(vector: dict[str, Any]) -> None:
    value = from_json(vector["value"])
    data = bytes.fromhex(vector["hex"])
    assert codec.pack(value) == data
    assert codec.unpack(data) == value


@pytest.mark.parametrize("vector", load("codec.json")["invalid"], ids=lambda v: v["name"])
def test_codec_invalid(vector: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        codec.unpack(bytes.fromhex(vector["hex"]))
    assert ei.value.reason == vector["reason"]


def test_framing_vectors() -> None:
    data = load("framing.json")
    assert data["max_frame"] == MAX_FRAME
    stream = b""
    for f in data["frames"]:
        payload = bytes.fromhex(f["payload_hex"])
        assert encode_frame(payload).hex() == f["frame_hex"]
        stream += bytes.fromhex(f["frame_hex"])
    dec = FrameDecoder()
    dec.feed(stream)
    got = []
    while (frame := dec.next_frame()) is not None:
        got.append(frame.hex())
    assert got == [f["payload_hex"] for f in data["frames"]]


@pytest.mark.parametrize("vector", load("peerids.json")["vectors"], ids=lambda v: v["name"])
def test_peerid_vector(vector: dict[str, Any]) -> None:
    seed = bytes.fromhex(vector["seed_hex"])
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert pub.hex() == vector["public_key_hex"]
    assert bytes.fromhex(vector["multihash_hex"]) == b"\x00\x24\x08\x01\x12\x20" + pub
    assert peer_id_from_public_key(pub) == vector["peer_id"]
    assert public_key_from_peer_id(vector["peer_id"]) == pub


def test_replay_script() -> None:
    data = load("replay.json")
    assert data["skew_ms"] == CLOCK_SKEW_MS
    guard = ReplayGuard()
    outcomes = []
    for step in data["steps"]:
        signed = open_envelope(bytes.fromhex(step["envelope_hex"]))
        try:
            guard.accept(signed, step["now_ms"])
            outcomes.append("accept")
        except ProtocolError as exc:
            outcomes.append(exc.reason)
    assert outcomes == [s["expect"] for s in data["steps"]]
    assert {"accept", "replayed", "expired", "from_future", "absurd"} <= set(outcomes)


def test_blob_vectors() -> None:
    from protocol import blobproto

    classes = {
        c.__name__: c
        for c in (blobproto.GetRequest, blobproto.GetHeader, blobproto.Chunk, blobproto.Ack, blobproto.End)
    }
    for m in load("blob.json")["messages"]:
        msg = classes[m["type"]](**from_json(m["fields"]))
        assert blobproto.encode(msg).hex() == m["hex"]
        assert blobproto.decode(bytes.fromhex(m["hex"])) == msg


def test_committee_vectors() -> None:
    from protocol.committee import committee, draw_key, quorum

    data = load("committee.json")
    task, participants = data["task_id"], data["participants"]
    assert len(data["rounds"]) >= 2
    for r in data["rounds"]:
        for p in participants:
            raw = bytes.fromhex(r["draw_input_hex"][p])
            assert raw == task.encode() + b"\x00" + r["round"].to_bytes(8, "big") + b"\x00" + p.encode()
            assert (
                draw_key(task, r["round"], p).hex() == r["draw_key_hex"][p] == hashlib.sha256(raw).hexdigest()
            )
        by_key = sorted(participants, key=lambda p: r["draw_key_hex"][p])[:3]
        assert list(committee(task, r["round"], participants, 3)) == by_key == r["committee_by_key"]
        assert r["committee_sorted"] == sorted(by_key)
        assert quorum(len(by_key)) == r["quorum"] == 2


def test_tensor_and_aggregation_vectors() -> None:
    import numpy as np

    from protocol.aggregation import aggregate
    from protocol.tensors import decode_arrays, encode_arrays

    data = load("tensors.json")
    for t in data["tensors"]:
        arrays = [np.array(a["values"], dtype=a["dtype"]).reshape(a["shape"]) for a in t["arrays"]]
        raw = bytes.fromhex(t["hex"])
        assert encode_arrays(arrays) == raw
        assert hashlib.sha256(raw).hexdigest() == t["sha256"]
        back = decode_arrays(raw)
        assert [(b.dtype.str, list(b.shape), b.ravel().tolist()) for b in back] == [
            (a["dtype"], a["shape"], a["values"]) for a in t["arrays"]
        ]
    agg = data["aggregation"]
    inputs = [(i["peer_id"], i["weight"], [np.array(i["values"], dtype=i["dtype"])]) for i in agg["inputs"]]
    assert {r["rule"] for r in agg["results"]} == {"sum", "weighted_mean", "trimmed_mean", "median"}
    outputs = set()
    for r in agg["results"]:
        # Input order must not matter (canonical order is by peer ID).
        for order in (inputs, list(reversed(inputs))):
            out = aggregate(r["rule"], order, trim_ratio=agg["trim_ratio"])
            assert encode_arrays(out).hex() == r["output_hex"]
        assert out[0].tolist() == r["output_values"]
        assert hashlib.sha256(bytes.fromhex(r["output_hex"])).hexdigest() == r["output_sha256"]
        outputs.add(r["output_sha256"])
    assert len(outputs) == 4  # the inputs tell every rule apart
