"""Each invariant check can fail: tampered awards, unawarded jobs, bad or double
certificates and unexplained endings are violations (sim/invariants.py).

The material is real: one short simulation's signed announce, bids, award and votes, and
the peers' own keys to sign the tampered copies with.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

import pytest

from protocol.envelope import Signed
from protocol.machines.common import SignerSealer
from protocol.messages import Award, Vote
from sim.engine import Violation
from sim.invariants import Invariants, TaskRecord
from sim.run import Outcome, run
from sim.world import SimConfig, World

BASE = 1_800_000_000_000


@cache
def _material() -> Outcome:
    out = run(SimConfig(peers=20, tasks=8, seed=1), keep_world=True)
    assert out.ok, out.violation
    return out


def _world() -> World:
    w = _material().world
    assert w is not None
    return w


def _record(pred: Any) -> TaskRecord:
    for rec in _world().invariants.tasks.values():
        if pred(rec):
            return rec
    raise AssertionError("the material run has no such task")


def _fresh(rec: TaskRecord) -> Invariants:
    inv = Invariants(lambda: 0.0)
    inv.announced(rec.announce)
    return inv


def _award0(rec: TaskRecord) -> Signed:
    from sim.crypto import open_memo

    return open_memo(rec.award_raw[0], frozenset({"award"}))


def _sealer(peer_id: str) -> SignerSealer:
    return SignerSealer(_world().by_id[peer_id].signer, first_seq=10**9)


def test_the_genuine_award_passes_and_a_tampered_one_is_a_violation() -> None:
    rec = _record(lambda r: 0 in r.awards and len(r.awards[0].bids) >= 2)
    genuine = _award0(rec)
    inv = _fresh(rec)
    inv.published(genuine)
    assert inv.checked["awards"] == 1
    aw = genuine.message
    assert isinstance(aw, Award)
    chosen = {a["peer_id"] for a in aw.assignments}
    bidders = sorted(s.signer for s in (_open_bid(b) for b in aw.bids))
    other = next(p for p in bidders if p not in chosen)
    swapped = [{**a, "peer_id": other} if a["shard"] == 0 else dict(a) for a in aw.assignments]
    fields = {f.name: getattr(aw, f.name) for f in dataclasses.fields(aw)} | {"assignments": swapped}
    for k in ("seq", "issued_at", "expires_at"):
        fields.pop(k)
    forged = _sealer(rec.submitter).seal(Award, now_ms=BASE, ttl_ms=Award.MAX_TTL_MS, **fields)
    with pytest.raises(Violation, match="differs from its recomputation"):
        _fresh(rec).published(forged)


def _open_bid(raw: bytes) -> Signed:
    from sim.crypto import open_memo

    return open_memo(raw, frozenset({"bid"}))


def test_a_job_on_a_shard_nobody_awarded_is_a_violation() -> None:
    rec = _record(lambda r: 0 in r.awards)
    inv = _fresh(rec)
    inv.published(_award0(rec))
    holder = rec.awards[0].assignments[0]["peer_id"]
    inv.job_started(holder, rec.task_id, 0, 0)  # awarded: fine
    stranger = next(
        p.peer_id
        for p in _world().peers
        if p.peer_id not in {a["peer_id"] for a in rec.awards[0].assignments}
    )
    with pytest.raises(Violation, match="which no award gives it"):
        inv.job_started(stranger, rec.task_id, 0, 0)
    with pytest.raises(Violation, match="which no award gives it"):
        inv.job_started(holder, rec.task_id, 0, 7)  # an epoch that does not exist


def _certified(rec: TaskRecord) -> tuple[int, list[bytes]]:
    rnd = min(rec.certified)
    return rnd, list(rec.votes[rnd][rec.certified[rnd]].values())


def test_a_certificate_that_does_not_verify_is_a_violation() -> None:
    rec = _record(lambda r: r.certified)
    rnd, votes = _certified(rec)
    inv = _fresh(rec)
    for e in sorted(rec.award_raw):
        inv.published(_award_at(rec, e))
    inv.certificate(rec.task_id, rnd, votes, who="test")  # the genuine one verifies
    with pytest.raises(Violation, match="does not verify"):
        inv.certificate(rec.task_id, rnd + 1, votes, who="test")  # votes of another round
    with pytest.raises(Violation, match="does not verify"):
        _fresh(rec).certificate(rec.task_id, rnd, votes, who="test")  # no award: bad committee


def _award_at(rec: TaskRecord, epoch: int) -> Signed:
    from sim.crypto import open_memo

    return open_memo(rec.award_raw[epoch], frozenset({"award"}))


def test_a_second_certified_aggregate_for_one_round_is_a_violation() -> None:
    rec = _record(lambda r: r.certified)
    rnd, votes = _certified(rec)
    inv = _fresh(rec)
    for e in sorted(rec.award_raw):
        inv.published(_award_at(rec, e))
    from sim.crypto import open_memo

    opened = [open_memo(v, frozenset({"vote"})) for v in votes]
    for sv in opened:
        inv.published(sv)
    assert inv.tasks[rec.task_id].certified[rnd] == rec.certified[rnd]
    # Every signer of the certificate votes again, for another output: a second quorum.
    with pytest.raises(Violation, match="second certified aggregate"):
        for sv in opened:
            v = sv.message
            assert isinstance(v, Vote)
            fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
            for k in ("seq", "issued_at", "expires_at"):
                fields.pop(k)
            fields["output"] = {"sha256": "ab" * 32, "size": 99}
            fields["attempt"] = v.attempt + 1
            inv.published(_sealer(sv.signer).seal(Vote, now_ms=BASE, ttl_ms=Vote.MAX_TTL_MS, **fields))


def test_endings_need_results_certificates_or_a_reason() -> None:
    plain = _record(lambda r: r.announce.message.aggregation == "none" and 0 in r.awards)
    inv = _fresh(plain)
    inv.published(_award0(plain))
    with pytest.raises(Violation, match="without a result for shard"):
        inv.task_ended(plain.task_id, "done", "all done")
    with pytest.raises(Violation, match="without a stated reason"):
        _fresh(plain).task_ended(plain.task_id, "failed", "")
    agg = _record(lambda r: r.announce.message.aggregation != "none" and 0 in r.awards)
    inv = _fresh(agg)
    inv.published(_award0(agg))
    with pytest.raises(Violation, match="without a certificate for round 1"):
        inv.task_ended(agg.task_id, "done", "1 round(s) certified")
    inv = _fresh(agg)
    inv.task_ended(agg.task_id, "failed", "deadline")  # a stated reason: fine
    with pytest.raises(Violation, match="ended twice"):
        inv.task_ended(agg.task_id, "done", "")


def test_a_task_that_never_ends_is_a_violation_at_the_end_of_the_run() -> None:
    rec = _record(lambda r: True)
    inv = _fresh(rec)
    with pytest.raises(Violation, match="never ended"):
        inv.at_end(60.0)


def test_the_material_run_checked_every_kind_of_fact() -> None:
    checked = _world().invariants.checked
    assert checked["awards"] >= 8 and checked["jobs"] >= 8 and checked["endings"] == 8
    assert checked["votes"] >= 1 and checked["certificates"] >= 1
