"""Every signed message kind (protocol/messages.py; SPEC.md "Messages")."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from protocol import codec
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.fuzz import sample_messages
from protocol.messages import (
    MESSAGE_TYPES,
    Advert,
    Award,
    Bid,
    Cancel,
    Lease,
    Message,
    Result,
    TaskAnnounce,
    Vote,
)

#: Typed as Any: the tests replace fields of every kind through one table.
SAMPLES: dict[str, Any] = {m.KIND: m for m in sample_messages()}
TASK = "0123456789abcdef0123456789abcdef"
PID = SAMPLES["vote"].committee[0]

#: The per-kind constants SPEC.md documents; a change here is a protocol change.
SPEC_CONSTANTS = {
    "advert": (1, 120_000),
    "announce": (2, 31 * 86_400_000),
    "bid": (3, 600_000),
    "award": (4, 31 * 86_400_000),
    "lease": (5, 600_000),
    "result": (6, 31 * 86_400_000),
    "vote": (7, 31 * 86_400_000),
    "cancel": (8, 31 * 86_400_000),
}


def test_every_kind_is_covered() -> None:
    assert set(MESSAGE_TYPES) == set(SAMPLES) == set(SPEC_CONSTANTS)
    for kind, cls in MESSAGE_TYPES.items():
        assert cls.KIND == kind
        assert (cls.TYPE, cls.MAX_TTL_MS) == SPEC_CONSTANTS[kind]


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_round_trip(kind: str) -> None:
    msg = SAMPLES[kind]
    wire = codec.pack(msg.to_wire())
    back = type(msg).from_wire(codec.unpack(wire))
    assert back == msg
    assert codec.pack(back.to_wire()) == wire


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_wire_keys_are_the_fields(kind: str) -> None:
    msg = SAMPLES[kind]
    names = {f.name for f in dataclasses.fields(msg)}
    # Omittable fields (Award.caps) are left out when None (SPEC §7.1).
    absent = {n for n in msg.OMITTABLE if getattr(msg, n) is None}
    assert set(msg.to_wire()) == names - absent
    assert {"seq", "issued_at", "expires_at"} <= names


def test_scopes() -> None:
    assert SAMPLES["advert"].scope() == ""
    for kind in ("announce", "bid", "award", "cancel"):
        assert SAMPLES[kind].scope() == TASK
    assert SAMPLES["lease"].scope() == f"{TASK}/0"
    assert SAMPLES["result"].scope() == f"{TASK}/0"
    assert SAMPLES["vote"].scope() == f"{TASK}/0"
    lease = dataclasses.replace(SAMPLES["lease"], shard=3)
    assert lease.scope() == f"{TASK}/3"
    vote = dataclasses.replace(SAMPLES["vote"], round=7)
    assert vote.scope() == f"{TASK}/7"


def test_local_values_are_normalised() -> None:
    bid = Bid(seq=1, issued_at=0, expires_at=0, task_id=TASK, c0=5, load=0)
    assert isinstance(bid.c0, float) and isinstance(bid.load, float)
    assert isinstance(SAMPLES["advert"].gpus, tuple)
    assert isinstance(SAMPLES["vote"].committee, tuple)


# --- absurd values: LocalProtocolError when built, RemoteProtocolError when parsed ----------

BAD_VALUES: list[tuple[str, str, Any, str]] = [
    ("advert", "c0", -1.0, "absurd"),
    ("advert", "c0", 1e7, "absurd"),
    ("advert", "c0", math.nan, "absurd"),
    ("advert", "c0", math.inf, "absurd"),
    ("advert", "c0", "100", "malformed"),
    ("advert", "c0", True, "malformed"),
    ("advert", "load", -0.5, "absurd"),
    ("advert", "load", 1001.0, "absurd"),
    ("advert", "cpu", {"cores": -1, "model": "x", "gflops": 1.0}, "absurd"),
    ("advert", "cpu", {"cores": 4097, "model": "x", "gflops": 1.0}, "absurd"),
    ("advert", "cpu", {"cores": 1, "model": "x" * 129, "gflops": 1.0}, "oversized"),
    ("advert", "cpu", {"cores": 1, "model": "x", "gflops": 1.0, "extra": 1}, "malformed"),
    ("advert", "cpu", {"cores": 1, "model": "x"}, "malformed"),
    ("advert", "memory", {"total_mb": 2**40, "available_mb": 0}, "absurd"),
    ("advert", "gpus", [SAMPLES["advert"].gpus[0]] * 17, "oversized"),
    ("advert", "gpus", [{**SAMPLES["advert"].gpus[0], "util_pct": 101.0}], "absurd"),
    ("advert", "addrs", ["x" * 257], "oversized"),
    ("advert", "addrs", ["/ip4/127.0.0.1/tcp/1"] * 17, "oversized"),
    ("advert", "version", "v" * 33, "oversized"),
    ("advert", "params", {"k": -0.1, "dc_min": 0.0, "dc_max": None}, "absurd"),
    ("advert", "seq", 0, "absurd"),
    ("advert", "seq", 2**63, "absurd"),
    ("advert", "seq", 1.0, "malformed"),
    ("advert", "issued_at", -1, "absurd"),
    ("advert", "issued_at", 2**53 + 1, "absurd"),
    ("announce", "task_id", "0123456789ABCDEF0123456789ABCDEF", "malformed"),
    ("announce", "task_id", "0" * 33, "oversized"),
    ("announce", "kind", "rm-rf", "malformed"),
    ("announce", "work", 0.0, "absurd"),
    ("announce", "work", 1e16, "absurd"),
    ("announce", "deadline_ms", 0, "absurd"),
    ("announce", "max_shards", 65, "absurd"),
    ("announce", "aggregation", "mean", "malformed"),
    ("announce", "rounds", 1001, "absurd"),
    ("announce", "bid_window_ms", 60_001, "absurd"),
    ("announce", "params", {"p": math.nan}, "absurd"),
    ("announce", "params", {"bad key": 1}, "malformed"),
    ("announce", "params", {"p": list(range(257))}, "oversized"),
    ("announce", "params", {"p": [[[[[[[[1]]]]]]]]}, "oversized"),
    ("announce", "inputs", {"data": {"sha256": "AB" * 32, "size": 1}}, "malformed"),
    ("announce", "inputs", {"data": {"sha256": "ab" * 32, "size": -1}}, "absurd"),
    ("bid", "c0", 0.0, "absurd"),
    ("bid", "load", math.inf, "absurd"),
    ("award", "epoch", 10_001, "absurd"),
    ("award", "bids", [b"x" * 4097], "oversized"),
    ("award", "bids", [b"x"] * 65, "oversized"),
    ("award", "assignments", [{"shard": 0, "peer_id": "nobody", "share": 1.0, "inputs": {}}], "malformed"),
    ("award", "assignments", [{"shard": 0, "peer_id": PID, "share": 1.5, "inputs": {}}], "absurd"),
    ("award", "assignments", [{"shard": 64, "peer_id": PID, "share": 1.0, "inputs": {}}], "absurd"),
    ("award", "under_capacity", 0, "malformed"),
    ("lease", "state", "stolen", "malformed"),
    ("lease", "detail", "d" * 513, "oversized"),
    ("result", "error", "e" * 513, "oversized"),
    ("result", "weight", -1.0, "absurd"),
    ("result", "metrics", {"loss": math.nan}, "absurd"),
    ("result", "metrics", {f"m{i}": 1.0 for i in range(33)}, "oversized"),
    ("vote", "committee", [PID] * 17, "oversized"),
    ("vote", "rule", "none-of-the-above", "malformed"),
    ("vote", "attempt", 17, "absurd"),
    ("vote", "output", {"sha256": "ab" * 32}, "malformed"),
    ("cancel", "reason", "r" * 257, "oversized"),
]


@pytest.mark.parametrize(("kind", "field", "value", "reason"), BAD_VALUES)
def test_constructor_rejects(kind: str, field: str, value: Any, reason: str) -> None:
    msg = SAMPLES[kind]
    with pytest.raises(LocalProtocolError) as ei:
        dataclasses.replace(msg, **{field: value})
    assert ei.value.reason == reason
    assert field in str(ei.value)


@pytest.mark.parametrize(("kind", "field", "value", "reason"), BAD_VALUES)
def test_from_wire_rejects(kind: str, field: str, value: Any, reason: str) -> None:
    msg = SAMPLES[kind]
    wire = {**msg.to_wire(), field: value}
    with pytest.raises(RemoteProtocolError) as ei:
        type(msg).from_wire(wire)
    assert ei.value.reason == reason


def test_expiry_before_issue() -> None:
    with pytest.raises(LocalProtocolError) as ei:
        Bid(seq=1, issued_at=10, expires_at=9, task_id=TASK, c0=1.0, load=0.0)
    assert ei.value.reason == "absurd"
    wire = {**SAMPLES["bid"].to_wire(), "issued_at": 10, "expires_at": 9}
    with pytest.raises(RemoteProtocolError):
        Bid.from_wire(wire)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_from_wire_requires_exactly_the_fields(kind: str) -> None:
    cls = MESSAGE_TYPES[kind]
    wire = SAMPLES[kind].to_wire()
    with pytest.raises(RemoteProtocolError, match="unknown fields"):
        cls.from_wire({**wire, "extra": 1})
    for name in wire:
        partial = {k: v for k, v in wire.items() if k != name}
        if name in cls.OMITTABLE:  # may be absent (SPEC §7.1): absent is None
            assert getattr(cls.from_wire(partial), name) is None
            continue
        with pytest.raises(RemoteProtocolError, match="missing fields") as ei:
            cls.from_wire(partial)
        assert ei.value.reason == "malformed"


@pytest.mark.parametrize("obj", [None, [], "advert", 1, b"\x80"])
def test_from_wire_rejects_non_maps(obj: Any) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        Advert.from_wire(obj)
    assert ei.value.reason == "malformed"


def test_optional_fields() -> None:
    res = dataclasses.replace(SAMPLES["result"], ok=False, error="worker crashed")
    assert Result.from_wire(codec.unpack(codec.pack(res.to_wire()))) == res
    adv = dataclasses.replace(SAMPLES["advert"], params={"k": 0.2, "dc_min": 0.0, "dc_max": 50.0})
    assert Advert.from_wire(codec.unpack(codec.pack(adv.to_wire()))).params["dc_max"] == 50.0


def test_boundaries_are_inclusive() -> None:
    ann = SAMPLES["announce"]
    for field, value in [("max_shards", 64), ("rounds", 1000), ("bid_window_ms", 60_000), ("work", 1e15)]:
        assert getattr(dataclasses.replace(ann, **{field: value}), field) == value
    assert dataclasses.replace(SAMPLES["advert"], c0=1e6, load=1000.0).load == 1000.0
    assert dataclasses.replace(SAMPLES["cancel"], reason="r" * 256).reason == "r" * 256


def _vote(**changes: Any) -> Vote:
    vote = dataclasses.replace(SAMPLES["vote"], **changes)
    assert isinstance(vote, Vote)
    return vote


def test_ballot_ignores_what_may_differ_between_honest_voters() -> None:
    base = _vote()
    assert _vote(attempt=3).ballot() == base.ballot()
    assert _vote(seq=99).ballot() == base.ballot()
    assert _vote(excluded=[{"peer_id": PID, "reason": "late"}]).ballot() == base.ballot()
    assert _vote(output={**base.output, "size": 11}).ballot() == base.ballot()


@pytest.mark.parametrize(
    "changes",
    [
        {"task_id": "f" * 32},
        {"round": 1},
        {"rule": "median"},
        {"committee": []},
        {"inputs": []},
        {"output": {"sha256": "cd" * 32, "size": 10}},
    ],
)
def test_ballot_separates_what_must_match(changes: dict[str, Any]) -> None:
    assert _vote(**changes).ballot() != _vote().ballot()


def test_ballot_is_hashable() -> None:
    assert len({_vote().ballot(), _vote(attempt=1).ballot()}) == 1


def test_message_base_class_is_not_a_kind() -> None:
    assert Message.KIND == "" and "" not in MESSAGE_TYPES
    assert {Advert, TaskAnnounce, Bid, Award, Lease, Result, Vote, Cancel} == set(MESSAGE_TYPES.values())
