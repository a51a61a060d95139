"""Awards as a pure function of signed bids (protocol/awards.py, docs/design.md §4, SPEC §10.3).

Everything here is sans-IO: real Ed25519 keys sign real bid envelopes, the award is built
the way the submitter builds it, and :func:`check_award` — what every contractor and
``peerctl verify`` run — must accept exactly the honest award and reject any tampering.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.allocation import Candidate, NetworkParams, choose, tie_key
from protocol.awards import allocate, assignments_of, check_award, net_params, reassign, usable_bids
from protocol.envelope import Signed, Signer, open_envelope
from protocol.errors import RemoteProtocolError
from protocol.messages import Award, Bid, TaskAnnounce

NOW = 1_700_000_000_000
TASK = "ab" * 16
OTHER_TASK = "cd" * 16
NET = {"k": 0.2, "dc_min": 0.0, "dc_max": None}
_seq = itertools.count(1)


def signer(n: int) -> Signer:
    return Signer(bytes([n]) * 32)


SUBMITTER = signer(200)


def announce(
    *, work: float = 3000.0, deadline_ms: int = 1000, max_shards: int = 3, task_id: str = TASK
) -> TaskAnnounce:
    return TaskAnnounce(
        seq=next(_seq), issued_at=NOW, expires_at=NOW + 600_000, task_id=task_id, kind="echo", work=work,
        deadline_ms=deadline_ms, max_shards=max_shards, resources={"gpu": False, "memory_mb": 0},
        aggregation="none", rounds=1, params={}, inputs={}, bid_window_ms=300, net=dict(NET),
    )


def bid(who: Signer, c0: float, load: float, *, task_id: str = TASK, seq: int | None = None) -> Signed:
    msg = Bid(seq=next(_seq) if seq is None else seq, issued_at=NOW, expires_at=NOW + 60_000,
              task_id=task_id, c0=c0, load=load)
    return open_envelope(who.seal(msg), kinds=frozenset({"bid"}))


def seal_award(ann: TaskAnnounce, signed_bids: list[Signed], /, *, epoch: int = 0, by: Signer = SUBMITTER,
               **override: Any) -> tuple[Award, Signed]:
    """The award the submitter would gossip (Submitter._bidding), with wire fields overridden."""
    usable = usable_bids(ann, signed_bids)
    alloc = allocate(ann, usable)
    fields: dict[str, Any] = {
        "task_id": ann.task_id, "epoch": epoch, "bids": [b.raw for b in usable],
        "assignments": assignments_of(alloc), "under_capacity": alloc.under_capacity, "excluded": [],
    }
    fields.update(override)
    msg = Award(seq=next(_seq), issued_at=NOW, expires_at=NOW + 600_000, **fields)
    signed = open_envelope(by.seal(msg), kinds=frozenset({"award"}))
    assert isinstance(signed.message, Award)
    return signed.message, signed


def recheck(
    award: Award, ann: TaskAnnounce, *, signer_id: str | None = None, previous: Award | None = None
) -> None:
    """What a receiver does: verify every quoted bid envelope, then check the award."""
    quoted = [open_envelope(raw, kinds=frozenset({"bid"})) for raw in award.bids]
    check_award(ann, award, SUBMITTER.peer_id, signer_id or SUBMITTER.peer_id, quoted, previous)


# --- the seed's worked example (§4.3), as signed bids ------------------------------------------

N1, N2, N3 = signer(1), signer(2), signer(3)


def seed_bids() -> list[Signed]:
    return [bid(N1, 1000.0, 0.5), bid(N2, 1500.0, 0.8), bid(N3, 2000.0, 1.2)]


def test_seed_task_1_from_signed_bids() -> None:
    ann = announce(work=3000.0, deadline_ms=1000)  # R = 3000
    alloc = allocate(ann, seed_bids())
    assert set(alloc.chosen) == {N1.peer_id, N3.peer_id}
    assert not alloc.under_capacity
    assert alloc.total_capacity == pytest.approx(3000.34, abs=1e-9)
    assert alloc.total_cost == pytest.approx(2900.338, abs=1e-9)
    # Σ C·L over all three bids is 4100.466 (the seed's printed 3366.56 is an arithmetic error).
    assert math.fsum(s.cost for s in alloc.scored) == pytest.approx(4100.466, abs=1e-9)


def test_seed_task_2_from_signed_bids() -> None:
    ann = announce(work=2500.0, deadline_ms=1000)
    alloc = allocate(ann, seed_bids())
    assert set(alloc.chosen) == {N1.peer_id, N2.peer_id}
    assert alloc.total_capacity == pytest.approx(2500.26, abs=1e-9)
    assert alloc.total_cost == pytest.approx(1700.178, abs=1e-9)


def test_allocate_is_choose_over_the_bid_numbers() -> None:
    ann = announce()
    bids = seed_bids()
    alloc = allocate(ann, bids)
    direct = choose(
        [Candidate(b.signer, b.message.c0, b.message.load) for b in bids],  # type: ignore[attr-defined]
        demand=3000.0, max_shards=3, params=NetworkParams(k=0.2, dc_min=0.0, dc_max=math.inf),
    )
    assert alloc == direct


def test_award_recomputes_from_its_listed_signed_bids() -> None:
    ann = announce()
    _, signed = seal_award(ann, seed_bids())
    # A receiver sees only the award's bytes: it re-opens every quoted bid and recomputes.
    received = open_envelope(signed.raw, kinds=frozenset({"award"})).message
    assert isinstance(received, Award)
    recheck(received, ann)
    quoted = [open_envelope(raw, kinds=frozenset({"bid"})) for raw in received.bids]
    again = allocate(ann, quoted)
    assert tuple(a["peer_id"] for a in sorted(received.assignments, key=lambda a: a["shard"])) == again.chosen
    assert [a["share"] for a in sorted(received.assignments, key=lambda a: a["shard"])] == list(again.shares)
    assert sum(a["share"] for a in received.assignments) == pytest.approx(1.0)
    # Shares ∝ C within the chosen set: N1 has C=1000.1, N3 C=2000.24.
    by_peer = {a["peer_id"]: a["share"] for a in received.assignments}
    assert by_peer[N3.peer_id] / by_peer[N1.peer_id] == pytest.approx(2000.24 / 1000.1)


def test_the_award_does_not_depend_on_bid_order() -> None:
    ann = announce()
    bids = seed_bids()
    outcomes = {allocate(ann, list(p)).chosen for p in itertools.permutations(bids)}
    assert len(outcomes) == 1


def test_usable_bids_one_per_peer_highest_sequence_this_task_only() -> None:
    ann = announce()
    old = bid(N1, 1000.0, 0.5, seq=10)
    new = bid(N1, 1000.0, 0.1, seq=11)
    other = bid(N2, 1500.0, 0.8, task_id=OTHER_TASK)
    usable = usable_bids(ann, [new, old, other, bid(N3, 2000.0, 1.2)])
    assert [b.signer for b in usable] == sorted([N1.peer_id, N3.peer_id])
    assert next(b for b in usable if b.signer == N1.peer_id) is new


# --- tampered awards are rejected ---------------------------------------------------------------


def _swap_first_two(assignments: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    out = [dict(a) for a in assignments]
    out[0]["peer_id"], out[1]["peer_id"] = out[1]["peer_id"], out[0]["peer_id"]
    return out


TAMPERINGS: dict[str, Any] = {
    # Give the shard to the bidder the rule did not choose.
    "wrong peer": lambda aw: {"assignments": [{**a, "peer_id": N2.peer_id} if i == 0 else dict(a)
                                              for i, a in enumerate(aw.assignments)]},
    "swapped peers": lambda aw: {"assignments": _swap_first_two(aw.assignments)},
    "share not ∝ C": lambda aw: {"assignments": [{**a, "share": 0.5} for a in aw.assignments]},
    "under_capacity flipped": lambda aw: {"under_capacity": not aw.under_capacity},
    "epoch 0 excludes": lambda aw: {"excluded": [N2.peer_id]},
    "shard numbers not 0..n-1": lambda aw: {
        "assignments": [{**a, "shard": a["shard"] + 1} for a in aw.assignments]
    },
    "a shard dropped": lambda aw: {"assignments": list(aw.assignments[:1])},
    "a bid quoted twice": lambda aw: {"bids": [*aw.bids, aw.bids[0]]},
    "a bid for another task": lambda aw: {
        "bids": [*aw.bids, bid(signer(9), 10.0, 0.0, task_id=OTHER_TASK).raw]
    },
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_a_tampered_award_is_rejected(name: str) -> None:
    ann = announce()
    honest, _ = seal_award(ann, seed_bids())
    recheck(honest, ann)  # the untouched award passes, so the rejection below is the tampering's
    tampered, _ = seal_award(ann, seed_bids(), **TAMPERINGS[name](honest))
    with pytest.raises(RemoteProtocolError) as err:
        recheck(tampered, ann)
    assert err.value.reason == "bad_award"


def test_choosing_a_costlier_covering_set_is_rejected() -> None:
    # R = 2500: {1, 2} (T = 1700.178) is the cheapest cover. {1, 3} also covers R (T = 2900.338);
    # an award that quotes all three bids but picks {1, 3}, with shares ∝ C, is still caught.
    ann = announce(work=2500.0)
    honest, _ = seal_award(ann, seed_bids())
    assert {a["peer_id"] for a in honest.assignments} == {N1.peer_id, N2.peer_id}
    pair = sorted([(N1.peer_id, 1000.1), (N3.peer_id, 2000.24)])
    total = pair[0][1] + pair[1][1]
    lie, _ = seal_award(ann, seed_bids(), assignments=[
        {"shard": i, "peer_id": p, "share": c / total, "inputs": {}} for i, (p, c) in enumerate(pair)])
    with pytest.raises(RemoteProtocolError) as err:
        recheck(lie, ann)
    assert err.value.reason == "bad_award"


def test_an_award_signed_by_someone_else_is_forged() -> None:
    ann = announce()
    award, _ = seal_award(ann, seed_bids(), by=signer(77))
    with pytest.raises(RemoteProtocolError) as err:
        recheck(award, ann, signer_id=signer(77).peer_id)
    assert err.value.reason == "forged_award"


def test_an_award_for_another_task_is_rejected() -> None:
    ann = announce()
    other = announce(task_id=OTHER_TASK)
    award, _ = seal_award(other, [bid(N1, 1000.0, 0.5, task_id=OTHER_TASK)])
    with pytest.raises(RemoteProtocolError) as err:
        recheck(award, ann)
    assert err.value.reason == "bad_award"


def test_tampered_award_bytes_fail_the_signature() -> None:
    ann = announce()
    _, signed = seal_award(ann, seed_bids())
    outer = msgpack.unpackb(signed.raw, raw=False)
    payload = bytearray(outer["payload"])
    payload[len(payload) // 2] ^= 0x01  # somewhere inside the quoted bids
    outer["payload"] = bytes(payload)
    with pytest.raises(RemoteProtocolError) as err:
        open_envelope(codec.pack(outer), kinds=frozenset({"award"}))
    assert err.value.reason == "bad_signature"


def test_a_tampered_quoted_bid_fails_its_own_signature() -> None:
    b = bid(N1, 1000.0, 0.5)
    outer = msgpack.unpackb(b.raw, raw=False)
    payload = bytes(outer["payload"])
    # Raise the bidder's c0 from 1000.0 to 3000.0 (msgpack float64 cb 40 8f 40 .. -> cb 40 a7 70 ..).
    cheaper = payload.replace(b"\xcb\x40\x8f\x40\x00", b"\xcb\x40\xa7\x70\x00", 1)
    assert cheaper != payload
    outer["payload"] = cheaper
    with pytest.raises(RemoteProtocolError) as err:
        open_envelope(codec.pack(outer), kinds=frozenset({"bid"}))
    assert err.value.reason == "bad_signature"


# --- re-awards (epoch > 0) ---------------------------------------------------------------------

A, B, C, D = signer(11), signer(12), signer(13), signer(14)


def two_shard_task() -> tuple[TaskAnnounce, list[Signed], Award]:
    """R = 150: A (C=100) and B (C=60) together cover it, so epoch 0 is {A, B}."""
    ann = announce(work=150.0, deadline_ms=1000, max_shards=3)
    bids = [bid(A, 100.0, 0.0), bid(B, 60.0, 0.0)]
    award, _ = seal_award(ann, bids)
    assert {a["peer_id"] for a in award.assignments} == {A.peer_id, B.peer_id}
    return ann, bids, award


def costs_of(ann: TaskAnnounce, bids: list[Signed]) -> list[tuple[str, float]]:
    return [(s.peer_id, s.cost) for s in allocate(ann, usable_bids(ann, bids)).scored]


def capacity_of(ann: TaskAnnounce, bids: list[Signed]) -> dict[str, float]:
    return {s.peer_id: s.capacity for s in allocate(ann, usable_bids(ann, bids)).scored}


def re_award(
    ann: TaskAnnounce, bids: list[Signed], previous: Award, lost: set[str], **override: Any
) -> Award:
    """What Submitter._reaward seals."""
    excluded = sorted(set(previous.excluded) | lost)
    new = reassign(
        list(previous.assignments),
        set(excluded),
        costs_of(ann, bids),
        task_id=ann.task_id,
        capacity=capacity_of(ann, bids),
    )
    assert new, "the replacement rule found nobody"
    fields: dict[str, Any] = {
        "assignments": new, "under_capacity": previous.under_capacity, "excluded": excluded
    }
    fields.update(override)
    award, _ = seal_award(ann, bids, epoch=previous.epoch + 1, **fields)
    return award


def test_reassign_moves_only_the_lost_shard_to_the_cheapest_spare() -> None:
    shards = [{"shard": 0, "peer_id": "a", "share": 0.6, "inputs": {}},
              {"shard": 1, "peer_id": "b", "share": 0.4, "inputs": {}}]
    out = reassign(shards, {"a"}, [("a", 0.0), ("b", 0.0), ("c", 5.0), ("d", 1.0)], task_id=TASK)
    assert out == [{"shard": 0, "peer_id": "d", "share": 0.6, "inputs": {}}, shards[1]]


def test_reassign_cost_ties_go_to_the_larger_capacity_first() -> None:
    shards = [{"shard": 0, "peer_id": "a", "share": 1.0, "inputs": {}}]
    bidders = [("a", 0.0), ("z", 0.0), ("m", 0.0)]  # idle peers: every cost is 0
    for task in ("t1", "t2", "t3"):
        out = reassign(shards, {"a"}, bidders, task_id=task, capacity={"z": 50.0, "m": 10.0})
        assert out[0]["peer_id"] == "z"


def test_reassign_ties_go_by_the_task_and_peer_hash_not_the_peer_id() -> None:
    # Equal costs: the smaller H(task_id ‖ peer_id) wins (SPEC §10.2), so no key ground for a
    # small peer ID takes every re-award; which one wins changes with the task.
    shards = [{"shard": 0, "peer_id": "a", "share": 1.0, "inputs": {}}]
    bidders = [("a", 0.0), ("z", 1.0), ("m", 1.0)]
    for task in ("t1", "t2", "t3", "t4", "t5", "t6"):
        want = min(("z", "m"), key=lambda p: tie_key(task, p))
        assert reassign(shards, {"a"}, bidders, task_id=task)[0]["peer_id"] == want
    tasks = ("t1", "t2", "t3", "t4", "t5", "t6")
    assert {reassign(shards, {"a"}, bidders, task_id=t)[0]["peer_id"] for t in tasks} == {"m", "z"}


def test_reassign_without_spares_goes_to_the_cheapest_holder() -> None:
    shards = [{"shard": i, "peer_id": p, "share": 1 / 3, "inputs": {}} for i, p in enumerate("abc")]
    out = reassign(shards, {"b"}, [("a", 3.0), ("b", 0.0), ("c", 2.0)], task_id=TASK)
    assert [s["peer_id"] for s in out] == ["a", "c", "c"]


def test_reassign_two_lost_shards_one_spare_both_go_to_it() -> None:
    # The spare that takes the first lost shard is a holder for the second: the re-award must
    # not give up (it used to return [] here, and the task waited on fresh bid rounds).
    shards = [{"shard": 0, "peer_id": "a", "share": 0.5, "inputs": {}},
              {"shard": 1, "peer_id": "b", "share": 0.5, "inputs": {}}]
    out = reassign(shards, {"a", "b"}, [("a", 0.0), ("b", 0.0), ("c", 1.0)], task_id=TASK)
    assert [s["peer_id"] for s in out] == ["c", "c"]


def test_reassign_with_every_bidder_lost_is_empty() -> None:
    shards = [{"shard": 0, "peer_id": "a", "share": 1.0, "inputs": {}}]
    assert reassign(shards, {"a"}, [("a", 0.0)], task_id=TASK) == []


def test_an_honest_re_award_passes_with_and_without_the_previous_epoch() -> None:
    ann, bids, award0 = two_shard_task()
    bids = [*bids, bid(C, 30.0, 0.0)]  # a spare bidder (late: not quoted in epoch 0)
    award1 = re_award(ann, bids, award0, {A.peer_id})
    assert {a["peer_id"] for a in award1.assignments} == {C.peer_id, B.peer_id}
    recheck(award1, ann)
    recheck(award1, ann, previous=award0)
    # And a second loss builds on the first: epoch 2 from epoch 1.
    award2 = re_award(ann, bids, award1, {B.peer_id})
    in_order = sorted(award2.assignments, key=lambda a: a["shard"])
    assert [a["peer_id"] for a in in_order] == [C.peer_id, C.peer_id]
    recheck(award2, ann, previous=award1)


def test_a_re_award_with_more_bids_than_epoch_0_keeps_epoch_0_shards() -> None:
    # Epoch 0 needed two nodes. A late, big bidder would alone cover R, so the rule over the
    # re-award's bids would choose ONE node: the shard count must still come from epoch 0.
    ann, bids, award0 = two_shard_task()
    bids = [*bids, bid(D, 500.0, 0.0)]
    assert len(allocate(ann, bids).chosen) == 1
    award1 = re_award(ann, bids, award0, {A.peer_id})
    assert len(award1.assignments) == 2
    recheck(award1, ann)
    recheck(award1, ann, previous=award0)


REAWARD_TAMPERINGS: dict[str, Any] = {
    # The rule puts A's shard on the spare C; the submitter gives it to B instead.
    "not the rule's peer": lambda aw: {"assignments": [{**a, "peer_id": B.peer_id} for a in aw.assignments]},
    "a share changed": lambda aw: {"assignments": [{**a, "share": 0.5} for a in aw.assignments]},
    "an untouched shard moved": lambda aw: {"assignments": [
        {**a, "peer_id": C.peer_id} for a in aw.assignments]},
    "a shard added": lambda aw: {
        "assignments": [*aw.assignments, {"shard": 2, "peer_id": C.peer_id, "share": 0.0, "inputs": {}}]
    },
    "under_capacity flipped": lambda aw: {"under_capacity": not aw.under_capacity},
}


@pytest.mark.parametrize("name", sorted(REAWARD_TAMPERINGS))
def test_a_tampered_re_award_is_rejected_given_the_previous_epoch(name: str) -> None:
    ann, bids, award0 = two_shard_task()
    bids = [*bids, bid(C, 30.0, 0.0)]
    honest = re_award(ann, bids, award0, {A.peer_id})
    recheck(honest, ann, previous=award0)
    tampered = re_award(ann, bids, award0, {A.peer_id}, **REAWARD_TAMPERINGS[name](honest))
    with pytest.raises(RemoteProtocolError) as err:
        recheck(tampered, ann, previous=award0)
    assert err.value.reason == "bad_award"


def test_a_re_award_may_not_forgive_an_excluded_peer() -> None:
    ann, bids, award0 = two_shard_task()
    bids = [*bids, bid(C, 30.0, 0.0)]
    award1 = re_award(ann, bids, award0, {A.peer_id})
    award2 = re_award(ann, bids, award1, {B.peer_id})
    # Same assignments, but A silently dropped from `excluded`.
    forgiving, _ = seal_award(ann, bids, epoch=2, assignments=list(award2.assignments),
                              under_capacity=award2.under_capacity, excluded=[B.peer_id])
    with pytest.raises(RemoteProtocolError):
        recheck(forgiving, ann, previous=award1)


def test_without_the_previous_epoch_excluded_and_non_bidders_are_still_caught() -> None:
    ann, bids, award0 = two_shard_task()
    to_excluded, _ = seal_award(ann, bids, epoch=1, assignments=list(award0.assignments),
                                excluded=[A.peer_id])
    with pytest.raises(RemoteProtocolError):
        recheck(to_excluded, ann)
    stranger = signer(99).peer_id
    to_stranger, _ = seal_award(ann, bids, epoch=1, excluded=[A.peer_id], assignments=[
        {**a, "peer_id": stranger} if a["peer_id"] == A.peer_id else dict(a) for a in award0.assignments])
    with pytest.raises(RemoteProtocolError):
        recheck(to_stranger, ann)


# --- properties --------------------------------------------------------------------------------

BIDDERS = [signer(100 + i) for i in range(6)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(1.0, 5000.0), st.floats(0.0, 3.0)), min_size=1, max_size=6),
    st.floats(0.0, 20_000.0),
    st.integers(1, 4),
)
def test_every_honest_award_checks_and_recomputes(nums: list[tuple[float, float]], r: float, m: int) -> None:
    ann = announce(work=max(r, 1e-9), deadline_ms=1000, max_shards=m)
    bids = [bid(BIDDERS[i], c0, load) for i, (c0, load) in enumerate(nums)]
    award, _ = seal_award(ann, bids)
    recheck(award, ann)
    chosen = choose([Candidate(b.signer, c0, load) for b, (c0, load) in zip(bids, nums, strict=True)],
                    demand=ann.work / 1.0, max_shards=m, params=net_params(NET), task_id=ann.task_id)
    assert tuple(a["peer_id"] for a in sorted(award.assignments, key=lambda a: a["shard"])) == chosen.chosen


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(1.0, 5000.0), st.floats(0.0, 3.0)), min_size=2, max_size=6),
    st.floats(1.0, 20_000.0),
    st.integers(1, 3),
    st.data(),
)
def test_every_honest_re_award_checks_exactly(
    nums: list[tuple[float, float]], r: float, m: int, data: st.DataObject
) -> None:
    ann = announce(work=r, deadline_ms=1000, max_shards=m)
    bids = [bid(BIDDERS[i], c0, load) for i, (c0, load) in enumerate(nums)]
    award0, _ = seal_award(ann, bids)
    holders = sorted({a["peer_id"] for a in award0.assignments})
    lost = set(data.draw(st.lists(st.sampled_from(holders), min_size=1, unique=True)))
    costs, capacity = costs_of(ann, bids), capacity_of(ann, bids)
    new = reassign(list(award0.assignments), lost, costs, task_id=ann.task_id, capacity=capacity)
    if not new:
        assert {b.signer for b in bids} <= lost  # only when every bidder is lost
        return
    assert not {a["peer_id"] for a in new} & lost
    assert [(a["shard"], a["share"]) for a in new] == [(a["shard"], a["share"]) for a in
                                                       sorted(award0.assignments, key=lambda a: a["shard"])]
    award1 = re_award(ann, bids, award0, lost)
    recheck(award1, ann, previous=award0)
