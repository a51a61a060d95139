"""TaskMachine and trust: ``TrustKnown`` caps the award's C, ``Observe`` reports outcomes,
banned bidders are refused (docs/allocation.md "Caps", protocol/trust.py)."""

from __future__ import annotations

from typing import Any, TypeVar

from protocol import trust as tr
from protocol.awards import check_award, open_quoted_bids
from protocol.envelope import Signed, Signer
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, SignerSealer
from protocol.machines.task import TaskMachine, TaskState
from protocol.messages import Award, Bid, Result, TaskAnnounce

NOW = 1_700_000_000_000
TASK = "cd" * 16
TIMES = MarketTimes(lease_ttl_ms=10_000, heartbeat_ms=2_000)
SHA = "22" * 32
A = TypeVar("A", bound=act.Action)


def sealer(n: int) -> SignerSealer:
    return SignerSealer(Signer(bytes([n]) * 32), first_seq=1000 * n)


SUB = sealer(1)
H1, H2, LIAR = sealer(2), sealer(3), sealer(4)
POLICY = tr.TrustPolicy(probation_share=0.25, probation_floor=10.0)
# Work 1200 GFLOP in 60 s: R = 20 GFLOP/s.
WORK, DEADLINE = 1200.0, 60_000


def announce(max_shards: int = 3) -> Signed:
    return SUB.seal(
        TaskAnnounce,
        now_ms=NOW,
        ttl_ms=DEADLINE,
        task_id=TASK,
        kind="echo",
        work=WORK,
        deadline_ms=DEADLINE,
        max_shards=max_shards,
        resources={"gpu": False, "memory_mb": 0},
        aggregation="none",
        rounds=1,
        params={},
        inputs={},
        bid_window_ms=300,
        net={"k": 0.0, "dc_min": 0.0, "dc_max": None},
    )


def bid(who: SignerSealer, c0: float, load: float) -> Signed:
    return who.seal(Bid, now_ms=NOW + 10, ttl_ms=60_000, task_id=TASK, c0=c0, load=load)


def of(actions: list[act.Action], cls: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, cls)]


def deliver(m: TaskMachine, signed: Signed, at: int) -> list[act.Action]:
    return m.handle(ev.MessageVerified(now_ms=at, signed=signed, via=ev.VIA_STREAM, sender=signed.signer))


def result(who: SignerSealer, shard: int, at: int, *, ok: bool = True) -> Signed:
    fields: dict[str, Any] = {
        "outputs": {"out": {"sha256": SHA, "size": 5}} if ok else {},
        "weight": 1.0 if ok else 0.0,
        "metrics": {},
        "error": None if ok else "crashed: exit 1",
    }
    return who.seal(
        Result, now_ms=at, ttl_ms=10**9, task_id=TASK, epoch=0, shard=shard, round=1, ok=ok, **fields
    )


def history(*peers: SignerSealer, shown: float = 20.0) -> dict[str, tr.PeerRecord]:
    return {p.peer_id: tr.PeerRecord(p.peer_id, done=3.0, shown=shown, updated_ms=NOW) for p in peers}


def run_award(
    bids: list[tuple[SignerSealer, float, float]],
    trust: ev.TrustKnown | None,
    max_shards: int = 3,
) -> tuple[TaskMachine, list[act.Action]]:
    m = TaskMachine(announce(max_shards), sealer=SUB, times=TIMES)
    m.handle(ev.Start(now_ms=NOW))
    if trust is not None:
        m.handle(trust)
    for who, c0, load in bids:
        deliver(m, bid(who, c0, load), NOW + 10)
    return m, m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))


def checked(m: TaskMachine) -> Award:
    signed = m.awards[max(m.awards)]
    award = signed.message
    assert isinstance(award, Award)
    prev = m.awards.get(award.epoch - 1)
    previous = prev.message if prev is not None and isinstance(prev.message, Award) else None
    check_award(m.announce, award, SUB.peer_id, signed.signer, open_quoted_bids(award), previous)
    return award


def test_without_trust_known_the_award_has_no_caps_and_the_liar_wins() -> None:
    # Today's behaviour, kept when the driver sends no TrustKnown: the claim alone wins.
    m, _ = run_award([(H1, 15.0, 0.5), (H2, 15.0, 0.5), (LIAR, 1e6, 0.0)], None)
    award = checked(m)
    assert award.caps is None and "caps" not in award.to_wire()
    assert [a["peer_id"] for a in award.assignments] == [LIAR.peer_id]


def test_a_liar_without_history_gets_at_most_its_probation_share() -> None:
    trust = ev.TrustKnown(now_ms=NOW, records=history(H1, H2), policy=POLICY)
    m, out = run_award([(H1, 15.0, 0.5), (H2, 15.0, 0.5), (LIAR, 1e6, 0.0)], trust)
    award = checked(m)  # a receiver recomputes it from the bids plus the caps
    assert award.caps == {LIAR.peer_id: 0.25 * 20.0}  # honest claims are below what they showed
    liar_share = sum(a["share"] for a in award.assignments if a["peer_id"] == LIAR.peer_id)
    assert 0 < liar_share <= 0.25 + 1e-12
    assert m.state is TaskState.RUNNING
    why = [p.record.message for p in of(out, act.Persist) if isinstance(p.record, act.TaskEvent)]
    assert any("capped" in w and "25%" in w for w in why)


def test_a_liar_with_history_counts_for_what_it_showed() -> None:
    records = {**history(H1, H2), **history(LIAR, shown=2.0)}
    m, _ = run_award(
        [(H1, 15.0, 0.5), (H2, 15.0, 0.5), (LIAR, 1e6, 0.0)], ev.TrustKnown(now_ms=NOW, records=records)
    )
    award = checked(m)
    assert award.caps is not None and award.caps[LIAR.peer_id] == 2.0
    liar_share = sum(a["share"] for a in award.assignments if a["peer_id"] == LIAR.peer_id)
    assert liar_share <= 2.0 / 20.0 + 1e-12


def test_banned_bids_are_refused_and_counted() -> None:
    m = TaskMachine(announce(), sealer=SUB, times=TIMES)
    m.handle(ev.Start(now_ms=NOW))
    m.handle(ev.TrustKnown(now_ms=NOW, records={}, banned=frozenset({LIAR.peer_id})))
    out = deliver(m, bid(LIAR, 1e6, 0.0), NOW + 10)
    assert [(d.reason) for d in of(out, act.Drop)] == ["banned"]
    assert of(out, act.Reply) == [act.Reply(ok=False, reason="banned")]
    deliver(m, bid(H1, 15.0, 0.5), NOW + 10)
    m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    award = checked(m)
    assert [a["peer_id"] for a in award.assignments] == [H1.peer_id]


def test_observe_done_measures_work_over_wall_time() -> None:
    m, _ = run_award([(H1, 30.0, 0.5)], ev.TrustKnown(now_ms=NOW, records={}), max_shards=1)
    out = deliver(m, result(H1, 0, NOW + 300 + 4_000), NOW + 300 + 4_000)
    out += m.handle(
        ev.BlobFetched(now_ms=NOW + 5_000, digest=SHA, source=H1.peer_id, tag=f"output:{SHA}", ok=True)
    )
    obs = of(out, act.Observe)
    assert obs == [
        act.Observe(peer=H1.peer_id, task_id=TASK, shard=0, work_gflop=WORK, wall_ms=4_000, outcome=tr.DONE)
    ]
    assert m.state is TaskState.DONE


def test_observe_failed_on_a_failed_result() -> None:
    m, _ = run_award([(H1, 30.0, 0.5)], None, max_shards=1)
    out = deliver(m, result(H1, 0, NOW + 1_000, ok=False), NOW + 1_000)
    assert [(o.peer, o.outcome) for o in of(out, act.Observe)] == [(H1.peer_id, tr.FAILED)]


def test_observe_timed_out_when_the_holder_is_lost() -> None:
    m, _ = run_award([(H1, 30.0, 0.5), (H2, 30.0, 0.6)], None, max_shards=1)
    holder = m.assignments()[0]["peer_id"]
    out = m.handle(ev.TimerFired(now_ms=NOW + 300 + 10_001, name="leases"))
    assert [(o.peer, o.outcome) for o in of(out, act.Observe)] == [(holder, tr.TIMED_OUT)]
    assert m.latest_award() is not None and m.latest_award().epoch == 1  # type: ignore[union-attr]
    checked(m)


def test_a_holder_banned_meanwhile_loses_its_shard_at_once_and_keeps_a_finite_hold_limit() -> None:
    # bench trust: a heartbeating liar banned for its faults on other tasks kept every shard it
    # held to the deadline — without its (now unusable) bid its hold limit was infinite.
    m, _ = run_award([(H1, 15.0, 0.5), (LIAR, 1e6, 0.0)], None, max_shards=1)
    assert [a["peer_id"] for a in checked(m).assignments] == [LIAR.peer_id]
    a = m.assignments()[0]
    limit = m.hold_limit_ms(a)
    m.handle(ev.TrustKnown(now_ms=NOW + 400, records={}, banned=frozenset()))
    assert m.hold_limit_ms(a) == limit
    out = m.handle(ev.TrustKnown(now_ms=NOW + 500, records={}, banned=frozenset({LIAR.peer_id})))
    assert m.hold_limit_ms(a) == limit  # the banned holder's quoted bid still counts here
    award = checked(m)
    assert award.epoch == 1 and award.excluded == (LIAR.peer_id,)
    assert [x["peer_id"] for x in award.assignments] == [H1.peer_id]
    assert m.failures[0][LIAR.peer_id] == "banned" and m.state is TaskState.RUNNING
    states = [p.record.message for p in of(out, act.Persist) if isinstance(p.record, act.TaskState)]
    assert any("banned" in msg for msg in states), states
