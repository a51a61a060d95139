"""The committed golden vectors in protocol/vectors/ agree with the implementation, both ways.

The files are never regenerated here: a change of the wire format must show up as a failing
test and then as a reviewed diff of the JSON (protocol/vectors/generate.py rewrites them).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
from dataclasses import dataclass
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
    "awards.json",
    "votes.json",
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
    assert blobproto.WINDOW == 16 * blobproto.CHUNK and blobproto.ACK_EVERY == 4 * blobproto.CHUNK
    assert "`WINDOW = 16 · CHUNK = 4 MiB`, `ACK_EVERY = 4 · CHUNK = 1 MiB`" in spec
    assert "`/peerd/bid/2.0.0`" in spec and "`/peerd/blob/2.0.0`" in spec and blobproto.PROTOCOL_ID in spec
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
    assert math.isclose(sum(caps[p] * bids[p].load for p in bids), 4100.466)  # docs/design.md §4, not 3366.56
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


def test_envelope_vectors_tell_one_story() -> None:
    """The award, lease, result and vote vectors agree on who holds which shard: the lease and
    the result name the shard the award gives their signer, and the vote's inputs are the
    award's (peer, shard) pairs with the committed hash and weight (issue: the award gave
    shard 0 to node3, the lease and result had node1 on shard 0, and the vote swapped them)."""
    from protocol.certificate import holders_of, vote_is_well_formed

    data = load("envelopes.json")
    by_kind = {v["kind"]: open_envelope(bytes.fromhex(v["envelope_hex"])) for v in data["vectors"]}
    announce, award = by_kind["announce"].message, by_kind["award"].message
    lease, result, vote = by_kind["lease"], by_kind["result"], by_kind["vote"]
    assert isinstance(announce, TaskAnnounce) and isinstance(award, Award) and isinstance(vote.message, Vote)
    holders = holders_of(award)
    for signed in (lease, result):
        m = signed.message
        assert m.task_id == award.task_id and m.epoch == award.epoch  # type: ignore[attr-defined]
        assert holders[m.shard] == signed.signer  # type: ignore[attr-defined]
    assert sorted((i["peer_id"], i["shard"]) for i in vote.message.inputs) == sorted(
        (p, s) for s, p in holders.items()
    )
    mine = next(i for i in vote.message.inputs if i["peer_id"] == result.signer)
    assert mine["shard"] == result.message.shard  # type: ignore[attr-defined]
    assert mine["sha256"] == result.message.outputs["weights"]["sha256"]  # type: ignore[attr-defined]
    assert mine["weight"] == result.message.weight  # type: ignore[attr-defined]
    assert vote.message.rule == announce.aggregation and vote.message.round == result.message.round  # type: ignore[attr-defined]
    vote_is_well_formed(vote, awards=[award], rule=announce.aggregation)


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
    """The daemon's receiver (peerd/inbox.py: §5.3 duplicate check, §5, §6) gives each step's
    outcome — `duplicate` for the exact same envelope, `replayed` for another envelope whose
    seq is not above the highest (issue: SPEC said `duplicate`, replay.json `replayed`)."""
    from peerd.counters import Counters
    from peerd.inbox import Inbox

    data = load("replay.json")
    assert data["skew_ms"] == CLOCK_SKEW_MS
    clock = [0]
    counters = Counters()
    inbox = Inbox(counters, now_ms=lambda: clock[0])
    outcomes = []
    for step in data["steps"]:
        clock[0] = step["now_ms"]
        before = counters.snapshot()
        signed = inbox.admit(bytes.fromhex(step["envelope_hex"]), sender=None, kinds=frozenset(MESSAGE_TYPES))
        changed = [k for k, n in counters.snapshot().items() if n != before.get(k, 0)]
        if signed is not None:
            assert changed == [f"accepted.{signed.kind}"]
            outcomes.append("accept")
        else:
            assert len(changed) == 1 and changed[0].startswith("dropped."), changed
            outcomes.append(changed[0].removeprefix("dropped."))
    assert outcomes == [s["expect"] for s in data["steps"]]
    assert {"accept", "duplicate", "replayed", "expired", "from_future", "absurd"} <= set(outcomes)


def test_replay_guard_alone_follows_section_6() -> None:
    """§6 on its own (no duplicate check) drops every non-accepted step of replay.json with the
    same reason, except that the exact duplicate falls through to `replayed`."""
    data = load("replay.json")
    guard = ReplayGuard()
    for step in data["steps"]:
        signed = open_envelope(bytes.fromhex(step["envelope_hex"]))
        try:
            guard.accept(signed, step["now_ms"])
            got = "accept"
        except ProtocolError as exc:
            got = exc.reason
        assert got == ("replayed" if step["expect"] == "duplicate" else step["expect"])


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


@pytest.mark.parametrize("vector", load("blob.json")["invalid"], ids=lambda v: v["name"])
def test_blob_invalid(vector: dict[str, Any]) -> None:
    from protocol import blobproto

    with pytest.raises(RemoteProtocolError) as ei:
        blobproto.decode(bytes.fromhex(vector["hex"]))
    assert ei.value.reason == vector["reason"]


@pytest.mark.parametrize("session", load("blob.json")["sessions"], ids=lambda v: v["name"])
def test_blob_session_fails(session: dict[str, Any]) -> None:
    """Each flow-control run fails at its last event, with its reason, and not before."""
    from protocol import blobproto

    events = session["events"]
    with pytest.raises(RemoteProtocolError) as ei:
        if session["side"] == "sender":
            sw = blobproto.SendWindow(session["offset"], session["size"])
            for i, (what, arg) in enumerate(events):
                if what == "sent":
                    sw.on_sent(arg)
                else:
                    msg = blobproto.decode(bytes.fromhex(arg))
                    assert isinstance(msg, blobproto.Ack)
                    sw.on_ack(msg)
                assert i < len(events) - 1, "the last event must fail"
        else:
            rw = blobproto.ReceiveWindow(session["offset"], session["size"])
            for i, (what, arg) in enumerate(events):
                msg = blobproto.decode(bytes.fromhex(arg))
                if what == "chunk":
                    assert isinstance(msg, blobproto.Chunk)
                    rw.on_chunk(msg)
                else:
                    assert what == "end" and isinstance(msg, blobproto.End)
                    rw.on_end(msg, session["sha256"])
                assert i < len(events) - 1, "the last event must fail"
    assert ei.value.reason == session["reason"]


def test_blob_vectors_cover_every_reason() -> None:
    data = load("blob.json")
    reasons = {v["reason"] for v in data["invalid"]} | {s["reason"] for s in data["sessions"]}
    assert reasons >= {
        "malformed",
        "unknown_type",
        "bad_field",
        "bad_digest",
        "bad_chunk",
        "non_canonical",
        "bad_ack",
        "too_large",
        "short",
        "hash_mismatch",
    }


# --- awards and re-awards (SPEC §10.3) ------------------------------------------------------


def _award_outcome(announce: Any, case: dict[str, Any]) -> tuple[str, str | None]:
    from protocol.awards import EmbeddedBidError, check_signed_award

    award = open_envelope(bytes.fromhex(case["award_hex"]), kinds=frozenset({"award"}))
    previous: Award | None = None
    if case["previous_hex"] is not None:
        prev = open_envelope(bytes.fromhex(case["previous_hex"]), kinds=frozenset({"award"})).message
        assert isinstance(prev, Award)
        previous = prev
    try:
        check_signed_award(announce, award, previous)
    except EmbeddedBidError as exc:
        return exc.reason, exc.embedded
    except RemoteProtocolError as exc:
        return exc.reason, None
    return "accept", None


@pytest.mark.parametrize("case", load("awards.json")["cases"], ids=lambda c: c["name"])
def test_award_vector(case: dict[str, Any]) -> None:
    data = load("awards.json")
    announce = open_envelope(bytes.fromhex(data["announce_hex"]), kinds=frozenset({"announce"}))
    assert announce.signer == data["submitter"]
    assert _award_outcome(announce, case) == (case["expect"], case.get("embedded"))


def test_award_vectors_cover_the_rule() -> None:
    """Positive epoch-0 and re-award vectors (with and without a spare bidder), and negatives
    for each part of §10.3."""
    cases = {c["name"]: c for c in load("awards.json")["cases"]}
    accepted = {n for n, c in cases.items() if c["expect"] == "accept"}
    assert {"epoch0", "reaward_spare", "reaward_no_spare", "epoch0_caps"} <= accepted
    assert {cases["caps_ignored"]["expect"], cases["caps_non_bidder"]["expect"]} == {"bad_award"}
    assert {c["expect"] for c in cases.values()} == {"accept", "forged_award", "bad_award"}
    rejected_reawards = [c for c in cases.values() if c["expect"] != "accept" and c["previous_hex"]]
    assert len(rejected_reawards) >= 5
    assert {c.get("embedded") for c in cases.values()} >= {"bad_signature", "unexpected_kind"}


# --- votes and certificates (SPEC §11.1) ------------------------------------------------------


@pytest.mark.parametrize("case", load("votes.json")["cases"], ids=lambda c: c["name"])
def test_vote_vector(case: dict[str, Any]) -> None:
    from protocol.certificate import check_certificate, vote_is_well_formed

    data = load("votes.json")
    announce = open_envelope(bytes.fromhex(data["announce_hex"])).message
    assert isinstance(announce, TaskAnnounce)
    every = [open_envelope(bytes.fromhex(h)).message for h in data["awards_hex"]]
    assert all(isinstance(a, Award) for a in every)
    awards = [every[i] for i in case["awards"]]  # the awards at hand (SPEC §11.1 "The award in force")
    votes = [bytes.fromhex(h) for h in case["votes_hex"]]
    try:
        if case["check"] == "vote":
            (raw,) = votes
            vote_is_well_formed(open_envelope(raw), awards=awards, rule=announce.aggregation)  # type: ignore[arg-type]
        else:
            assert case["check"] == "certificate"
            check_certificate(
                votes,
                task_id=announce.task_id,
                round_no=case["round"],
                awards=awards,  # type: ignore[arg-type]
                rule=announce.aggregation,
            )
        got = "accept"
    except RemoteProtocolError as exc:
        got = exc.reason
    assert got == case["expect"]


def test_vote_vectors_cover_every_reason() -> None:
    expects = {c["expect"] for c in load("votes.json")["cases"]}
    assert expects == {
        "accept",
        "no_quorum",
        "bad_certificate",
        "bad_committee",
        "not_in_committee",
        "bad_signature",
    }


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


def _arrays(spec: list[dict[str, Any]]) -> list[Any]:
    import numpy as np

    return [np.array(a["values"], dtype=a["dtype"]).reshape(a["shape"]) for a in spec]


def test_tensor_vectors() -> None:
    from protocol.tensors import decode_arrays, encode_arrays

    data = load("tensors.json")
    assert {a["dtype"] for t in data["tensors"] for a in t["arrays"]} == {
        "<f2",
        "<f4",
        "<f8",
        "<i4",
        "<i8",
        "|u1",
    }
    for t in data["tensors"]:
        arrays = _arrays(t["arrays"])
        raw = bytes.fromhex(t["hex"])
        assert encode_arrays(arrays) == raw
        assert hashlib.sha256(raw).hexdigest() == t["sha256"]
        back = decode_arrays(raw)
        assert [(b.dtype.str, list(b.shape), b.ravel().tolist()) for b in back] == [
            (a["dtype"], a["shape"], a["values"]) for a in t["arrays"]
        ]


# --- aggregation (SPEC §11.3) ------------------------------------------------------------------
#
# AggInput = (peer_id, shard, committed weight, arrays); an outcome is the output tensor list's
# hex, or "error:<reason>".
AggInput = tuple[str, int, float, list[Any]]


def _agg_cases() -> list[dict[str, Any]]:
    return list(load("tensors.json")["aggregation"])


def _agg_inputs(case: dict[str, Any]) -> list[AggInput]:
    from protocol.tensors import decode_arrays

    out = []
    for i in case["inputs"]:
        arrays = decode_arrays(bytes.fromhex(i["tensors_hex"]))
        if "arrays" in i:  # the JSON values and the hex are the same tensors
            assert [(a.dtype.str, list(a.shape), a.ravel().tolist()) for a in arrays] == [
                (a["dtype"], a["shape"], a["values"]) for a in i["arrays"]
            ]
        out.append((i["peer_id"], i["shard"], i["weight"], arrays))
    return out


def _expected(case: dict[str, Any]) -> str:
    e = case["expect"]
    return f"error:{e['error']}" if "error" in e else str(e["hex"])


def _code_outcome(rule: str, inputs: list[AggInput]) -> str:
    from protocol.aggregation import aggregate, effective_weight
    from protocol.certificate import input_key
    from protocol.tensors import encode_arrays

    try:
        out = aggregate(
            rule, [(input_key(p, s), effective_weight(w), a) for p, s, w, a in inputs], trim_ratio=0.2
        )
    except RemoteProtocolError as exc:
        return f"error:{exc.reason}"
    return encode_arrays(out).hex()


def test_aggregation_vectors_cover_every_variant_source() -> None:
    cases = _agg_cases()
    assert load("tensors.json")["trim_ratio"] == 0.2
    by_rule: dict[str, set[str]] = {}
    for c in cases:
        dtypes = {a["dtype"] for i in c["inputs"] for a in i.get("arrays", [])}
        by_rule.setdefault(c["rule"], set()).update(dtypes)
    for rule in ("sum", "weighted_mean", "trimmed_mean", "median"):
        assert {"<f8"} <= by_rule[rule] and by_rule[rule] & {"<i4", "<i8", "|u1"}, rule
    counts = {(c["rule"], len(c["inputs"]) % 2) for c in cases if "error" not in c["expect"]}
    assert {("median", 0), ("median", 1), ("trimmed_mean", 0), ("trimmed_mean", 1)} <= counts


@pytest.mark.parametrize("case", _agg_cases(), ids=lambda c: c["name"])
def test_aggregation_vector(case: dict[str, Any]) -> None:
    """The code gives each case's expected bytes (or drop reason), whatever the input order."""
    inputs = _agg_inputs(case)
    for order in (inputs, list(reversed(inputs)), sorted(inputs, key=lambda i: (-i[1], i[0]))):
        assert _code_outcome(case["rule"], order) == _expected(case)
    if "error" not in case["expect"]:
        raw = bytes.fromhex(case["expect"]["hex"])
        assert hashlib.sha256(raw).hexdigest() == case["expect"]["sha256"]
        from protocol.tensors import decode_arrays

        assert [(a.dtype.str, list(a.shape), a.ravel().tolist()) for a in decode_arrays(raw)] == [
            (a["dtype"], a["shape"], a["values"]) for a in case["expect"]["arrays"]
        ]


@dataclass(frozen=True)
class Variant:
    """One reading of SPEC §11.3; the defaults are the right one, every other value a plausible
    mistake of a second implementation."""

    order: str = "peer_shard"  # "reverse" | "shard_unpadded" (key f"{peer}/{shard}" unpadded)
    start_first: bool = False  # a sum starts from the first term instead of +0.0
    acc: str = "<f8"  # "<f4": float32 accumulation (forbidden)
    cast_via_f4: bool = False  # float64 → float32 → float16 (double rounding)
    normalise_first: bool = False  # weighted_mean as Σ (w/Σw)·x
    zero_weight_as_is: bool = False  # a committed weight 0 counts as 0, not 1.0
    trim_floor: bool = False  # t = ⌊0.2·n⌋
    trim_in_peer_order: bool = False  # kept values summed in input order, not sorted order
    trim_reciprocal: bool = False  # sum · (1/k) instead of sum / k
    median: str = "half_sum"  # "lower" | "upper" | "lo_plus_half_diff" | "half_each"
    median_int_floor: bool = False  # integer median of an even count as (lo + hi) // 2
    keep_neg_zero: bool = False  # no -0.0 → +0.0 before sorting
    int_round: str = "even"  # "away" | "floor" | "trunc"
    int_exact: bool = False  # integers summed exactly (as integers), not in float64
    int_wrap: bool = False  # integer results wrap around instead of saturating


WRONG_VARIANTS = {
    "reverse_order": Variant(order="reverse"),
    "shard_key_unpadded": Variant(order="shard_unpadded"),
    "sum_starts_from_first_term": Variant(start_first=True),
    "float32_accumulation": Variant(acc="<f4"),
    "float16_cast_through_float32": Variant(cast_via_f4=True),
    "weighted_mean_normalises_first": Variant(normalise_first=True),
    "zero_weight_counts_zero": Variant(zero_weight_as_is=True),
    "trim_count_floor": Variant(trim_floor=True),
    "trimmed_sum_in_peer_order": Variant(trim_in_peer_order=True),
    "trimmed_multiplies_by_reciprocal": Variant(trim_reciprocal=True),
    "median_even_lower": Variant(median="lower"),
    "median_even_upper": Variant(median="upper"),
    "median_even_lo_plus_half_diff": Variant(median="lo_plus_half_diff"),
    "median_even_half_each": Variant(median="half_each"),
    "median_int_floor_division": Variant(median_int_floor=True),
    "no_negative_zero_normalisation": Variant(keep_neg_zero=True),
    "int_round_half_away": Variant(int_round="away"),
    "int_round_floor": Variant(int_round="floor"),
    "int_round_trunc": Variant(int_round="trunc"),
    "int_exact_sum": Variant(int_exact=True),
    "int_wraps": Variant(int_wrap=True),
}


def _ref_aggregate(rule: str, inputs: list[AggInput], v: Variant) -> str:
    """A second, independent implementation of SPEC §11.3 (element by element, plain loops),
    with the mistakes of ``v`` switched on. Returns the outcome like :func:`_code_outcome`."""
    import numpy as np

    if v.order == "peer_shard":
        items = sorted(inputs, key=lambda i: (i[0], i[1]))
    elif v.order == "reverse":
        items = sorted(inputs, key=lambda i: (i[0], i[1]), reverse=True)
    else:
        items = sorted(inputs, key=lambda i: f"{i[0]}/{i[1]}")
    first = items[0][3]
    for _, _, _, arrays in items:
        if len(arrays) != len(first) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(arrays, first, strict=True)
        ):
            return "error:shape_mismatch"
        if any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in arrays):
            return "error:non_finite"
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is an outcome here
        return _ref_compute(rule, items, v)


def _ref_compute(rule: str, items: list[AggInput], v: Variant) -> str:
    import numpy as np

    from protocol.tensors import encode_arrays

    first = items[0][3]
    acc_t = np.dtype(v.acc).type
    n = len(items)
    weights = [w if (w > 0 or v.zero_weight_as_is) else 1.0 for _, _, w, _ in items]
    outputs = []
    for pos, like in enumerate(first):
        cols = [a[pos].ravel() for _, _, _, a in items]
        size = like.size
        result: list[Any] = []
        for e in range(size):
            xs = [c[e] for c in cols]
            if v.int_exact and like.dtype.kind in "iu" and rule == "sum":
                result.append(sum(int(x) for x in xs))
                continue
            fx = [acc_t(x) for x in xs]
            if rule in ("trimmed_mean", "median") and not v.keep_neg_zero:
                fx = [x + acc_t(0.0) for x in fx]  # -0.0 + 0.0 = +0.0
            if rule == "sum":
                acc = fx[0] if v.start_first else acc_t(0.0)
                for x in fx[1:] if v.start_first else fx:
                    acc = acc_t(acc + x)
            elif rule == "weighted_mean":
                total = acc_t(0.0)
                for w in weights:
                    total = acc_t(total + acc_t(w))
                terms = [
                    acc_t(acc_t(w) / total) * x if v.normalise_first else acc_t(w) * x
                    for w, x in zip(weights, fx, strict=True)
                ]
                acc = terms[0] if v.start_first else acc_t(0.0)
                for t in terms[1:] if v.start_first else terms:
                    acc = acc_t(acc + t)
                acc = acc if v.normalise_first else acc_t(acc / total)
            elif rule == "trimmed_mean":
                t = math.floor(0.2 * n) if v.trim_floor else math.ceil(0.2 * n - 1e-9)
                t = min(t, (n - 1) // 2)
                ranked = sorted(range(n), key=lambda i: (fx[i], i))  # stable: ties keep input order
                kept = ranked[t : n - t]
                order = sorted(kept) if v.trim_in_peer_order else kept
                acc = acc_t(0.0)
                for i in order:
                    acc = acc_t(acc + fx[i])
                k = acc_t(n - 2 * t)
                acc = acc_t(acc * acc_t(acc_t(1.0) / k)) if v.trim_reciprocal else acc_t(acc / k)
            else:
                srt = sorted(fx)
                mid = n // 2
                if n % 2:
                    acc = srt[mid]
                else:
                    lo, hi = srt[mid - 1], srt[mid]
                    if v.median_int_floor and like.dtype.kind in "iu":
                        acc = acc_t((int(lo) + int(hi)) // 2)
                    elif v.median == "lower":
                        acc = lo
                    elif v.median == "upper":
                        acc = hi
                    elif v.median == "lo_plus_half_diff":
                        acc = acc_t(lo + acc_t(0.5) * acc_t(hi - lo))
                    elif v.median == "half_each":
                        acc = acc_t(acc_t(0.5) * lo + acc_t(0.5) * hi)
                    else:
                        acc = acc_t(acc_t(0.5) * acc_t(lo + hi))
            result.append(acc)
        if like.dtype.kind == "f":
            vals = np.array(result, dtype=np.float64)
            if not np.isfinite(vals).all():
                return "error:overflow"
            via_f4 = v.cast_via_f4 and like.dtype == np.float16
            out = (vals.astype(np.float32) if via_f4 else vals).astype(like.dtype)
            if not np.isfinite(out).all():
                return "error:overflow"
        else:
            info = np.iinfo(like.dtype)
            ints = []
            for x in result:
                if isinstance(x, int):
                    r = x
                else:
                    f = float(x)
                    if not math.isfinite(f):
                        return "error:overflow"
                    r = {
                        "even": round(f),  # Python rounds half to even
                        "away": int(math.copysign(math.floor(abs(f) + 0.5), f)),
                        "floor": math.floor(f),
                        "trunc": math.trunc(f),
                    }[v.int_round]
                if v.int_wrap:
                    span = int(info.max) - int(info.min) + 1
                    r = (r - int(info.min)) % span + int(info.min)
                ints.append(min(max(r, int(info.min)), int(info.max)))
            out = np.array(ints, dtype=like.dtype)
        outputs.append(out.reshape(like.shape))
    return encode_arrays(outputs).hex()


@pytest.mark.parametrize("case", _agg_cases(), ids=lambda c: c["name"])
def test_reference_reading_of_the_spec_matches_every_vector(case: dict[str, Any]) -> None:
    """The straightforward reading of SPEC §11.3 (the reference below, with no mistake switched
    on) agrees with every case, so each wrong variant differs from it in one point only."""
    assert _ref_aggregate(case["rule"], _agg_inputs(case), Variant()) == _expected(case)


@pytest.mark.parametrize("name", sorted(WRONG_VARIANTS))
def test_vectors_tell_every_wrong_variant_apart(name: str) -> None:
    """Each plausible misreading of SPEC §11.3 disagrees with at least one vector — so an
    implementation that passes tensors.json does not carry it (issue: every wrong variant used
    to pass the four old aggregation vectors, float32 accumulation included)."""
    v = WRONG_VARIANTS[name]
    wrong = [c["name"] for c in _agg_cases() if _ref_aggregate(c["rule"], _agg_inputs(c), v) != _expected(c)]
    assert wrong, f"variant {name} passes every aggregation vector"
