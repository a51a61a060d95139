"""ShardMachine (protocol/machines/shard.py): every transition and illegal event, with real
signatures and awards sealed by a real TaskMachine (so check_award runs on the real rule)."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest

from protocol.certificate import tally
from protocol.envelope import Signed, Signer
from protocol.errors import LocalProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, SignerSealer
from protocol.machines.shard import ShardMachine, ShardState
from protocol.machines.task import TaskMachine
from protocol.messages import Award, Bid, Cancel, Lease, Result, TaskAnnounce, Vote

NOW = 1_700_000_000_000
TASK = "ab" * 16
TIMES = MarketTimes(lease_ttl_ms=10_000, heartbeat_ms=2_000)
IN = {"sha256": "aa" * 32, "size": 7}
A = TypeVar("A", bound=act.Action)


def sealer(n: int) -> SignerSealer:
    return SignerSealer(Signer(bytes([n]) * 32), first_seq=1000 * n)


SUB = sealer(1)
W = sorted([sealer(n) for n in (2, 3, 4)], key=lambda s: s.peer_id)


def of(actions: list[act.Action], cls: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, cls)]


def one(actions: list[act.Action], cls: type[A]) -> A:
    found = of(actions, cls)
    assert len(found) == 1, (cls.__name__, actions)
    return found[0]


def announce(**over: Any) -> Signed:
    fields: dict[str, Any] = {
        "task_id": TASK,
        "kind": "echo",
        "work": 10.0,
        "deadline_ms": 120_000,
        "max_shards": 1,
        "resources": {"gpu": False, "memory_mb": 0},
        "aggregation": "none",
        "rounds": 1,
        "params": {},
        "inputs": {"text": IN},
        "bid_window_ms": 300,
        "net": {"k": 0.2, "dc_min": 0.0, "dc_max": None},
    }
    fields.update(over)
    return SUB.seal(TaskAnnounce, now_ms=NOW, ttl_ms=fields["deadline_ms"], **fields)


def gossip(m: ShardMachine, signed: Signed, at: int) -> list[act.Action]:
    return m.handle(ev.MessageVerified(now_ms=at, signed=signed))


class Market:
    """A real TaskMachine for the submitter and a bidding ShardMachine per worker."""

    def __init__(self, ann: Signed, workers: list[SignerSealer]) -> None:
        self.ann = ann
        self.task = TaskMachine(ann, sealer=SUB, times=TIMES)
        self.task.handle(ev.Start(now_ms=NOW))
        self.shards = {
            w.peer_id: ShardMachine.bidder(ann, sealer=w, times=TIMES, c0=10.0, load=0.5) for w in workers
        }
        for m in self.shards.values():
            out = m.handle(ev.Start(now_ms=NOW + 5))
            b = one(out, act.Send).signed
            self.task.handle(
                ev.MessageVerified(now_ms=NOW + 10, signed=b, via=ev.VIA_STREAM, sender=b.signer)
            )
        out = self.task.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
        self.award = one(out, act.Publish).signed

    def holder(self, shard: int = 0) -> ShardMachine:
        award = self.award.message
        assert isinstance(award, Award)
        return self.shards[next(a["peer_id"] for a in award.assignments if a["shard"] == shard)]


def bound(ann: Signed | None = None) -> tuple[Market, ShardMachine, list[act.Action]]:
    mk = Market(ann or announce(), W[:2])
    m = mk.holder()
    return mk, m, gossip(m, mk.award, NOW + 310)


def ran(ann: Signed | None = None) -> tuple[Market, ShardMachine, act.StartJob]:
    mk, m, out = bound(ann)
    f = one(out, act.FetchBlob)
    out = m.handle(ev.BlobFetched(now_ms=NOW + 320, tag=f.tag, digest=f.digest, source=f.source, ok=True))
    return mk, m, one(out, act.StartJob)


# -- bid ----------------------------------------------------------------------------------------------


def test_start_sends_a_clamped_bid_to_the_submitter() -> None:
    m = ShardMachine.bidder(announce(), sealer=W[0], times=TIMES, c0=0.0, load=5000.0)
    out = m.handle(ev.Start(now_ms=NOW))
    send = one(out, act.Send)
    assert (send.peer, send.protocol, send.tag) == (SUB.peer_id, "bid", "bid")
    b = send.signed.message
    assert isinstance(b, Bid) and b.c0 == 1e-6 and b.load == 1000.0 and b.expires_at - b.issued_at == 60_000
    assert m.state is ShardState.BID_SENT
    assert m.handle(ev.SendCompleted(now_ms=NOW, tag="bid", ok=True)) == [act.Count(name="bids.sent")]
    assert m.handle(ev.SendCompleted(now_ms=NOW, tag="bid", ok=False, reason="transport")) == [
        act.Count(name="bids.failed")
    ]
    assert m.handle(ev.SendCompleted(now_ms=NOW, tag="bid", ok=False, reason="unknown task")) == [
        act.Count(name="bids.refused")
    ]


def test_a_reannounce_gets_a_fresh_bid() -> None:
    ann = announce()
    m = ShardMachine.bidder(ann, sealer=W[0], times=TIMES, c0=1.0, load=0.0)
    m.handle(ev.Start(now_ms=NOW))
    assert gossip(m, ann, NOW + 1) == []  # our own copy of the first announce
    fields = {k: v for k, v in ann.message.to_wire().items() if k not in ("seq", "issued_at", "expires_at")}
    fresh = SUB.seal(TaskAnnounce, now_ms=NOW + 5, ttl_ms=100_000, **fields)
    assert one(gossip(m, fresh, NOW + 5), act.Send).protocol == "bid"
    forged = W[1].seal(TaskAnnounce, now_ms=NOW + 5, ttl_ms=100_000, **fields)
    assert gossip(m, forged, NOW + 5) == [act.Drop(reason="task_id_collision")]


def test_new_machine_takes_only_start_and_illegal_events_raise() -> None:
    m = ShardMachine.bidder(announce(), sealer=W[0], times=TIMES, c0=1.0, load=0.0)
    with pytest.raises(LocalProtocolError, match="illegal event JobFinished in state NEW"):
        m.handle(ev.JobFinished(now_ms=NOW, job_id="x", ok=True))
    m.handle(ev.Start(now_ms=NOW))
    for bad in (
        ev.Start(now_ms=NOW),
        ev.CancelRequested(now_ms=NOW),
        ev.JobFinished(now_ms=NOW, job_id="x", ok=True),
        ev.BlobFetched(now_ms=NOW, tag="input:x", digest="d", source="s", ok=True),
    ):
        with pytest.raises(LocalProtocolError, match=f"illegal event {type(bad).__name__} in state BID_SENT"):
            m.handle(bad)
    with pytest.raises(LocalProtocolError, match="not armed"):
        m.handle(ev.TimerFired(now_ms=NOW, name="heartbeat"))
    with pytest.raises(LocalProtocolError, match="no send 'nope:1' is pending"):
        m.handle(ev.SendCompleted(now_ms=NOW, tag="nope:1", ok=True))


# -- award ----------------------------------------------------------------------------------------------


def test_checked_award_binds_the_shard_and_starts_work() -> None:
    mk, m, out = bound()
    assert m.state is ShardState.FETCHING and m.shard == 0 and m.epoch == 0
    rec = of(out, act.Persist)[0].record
    assert isinstance(rec, act.WorkerTaskRecord) and rec.message == "awarded shard 0 (epoch 0)"
    assert act.AdjustLoad(delta=1) in out
    # The first heartbeat goes out 250 ms after the award (SPEC §7.6), not at once.
    assert not of(out, act.Publish)
    assert act.SetTimer(name="heartbeat", at_ms=NOW + 310 + 250) in out
    beat = m.handle(ev.TimerFired(now_ms=NOW + 560, name="heartbeat"))
    lease = one(beat, act.Publish).signed.message
    assert isinstance(lease, Lease) and (lease.state, lease.shard, lease.detail) == (
        "running",
        0,
        "fetching text",
    )
    assert act.SetTimer(name="heartbeat", at_ms=NOW + 2_560) in beat
    f = one(out, act.FetchBlob)
    assert (f.digest, f.source, f.size, f.tag) == (IN["sha256"], SUB.peer_id, 7, "input:text")
    # The peer the award does not name stays a bidder.
    other = next(s for p, s in mk.shards.items() if s is not m)
    assert gossip(other, mk.award, NOW + 310) == [] and other.state is ShardState.BID_SENT


def test_an_award_that_fails_the_rule_is_dropped() -> None:
    mk = Market(announce(), W[:2])
    m = mk.holder()
    award = mk.award.message
    assert isinstance(award, Award)
    fields = {k: v for k, v in award.to_wire().items() if k not in ("seq", "issued_at", "expires_at")}
    forged = W[1].seal(Award, now_ms=NOW + 300, ttl_ms=1000, **fields)
    out = gossip(m, forged, NOW + 310)
    assert [(d.reason) for d in of(out, act.Drop)] == ["forged_award"] and m.state is ShardState.BID_SENT
    wrong = SUB.seal(Award, now_ms=NOW + 300, ttl_ms=1000, **(fields | {"under_capacity": True}))
    assert one(gossip(m, wrong, NOW + 310), act.Drop).reason == "bad_award"


def test_heartbeat_repeats_while_worked_on() -> None:
    _, m, _ = bound()
    out = m.handle(ev.TimerFired(now_ms=NOW + 2_310, name="heartbeat"))
    assert one(out, act.Publish).signed.message.state == "running"  # type: ignore[attr-defined]
    assert one(out, act.SetTimer) == act.SetTimer(name="heartbeat", at_ms=NOW + 4_310)


def test_input_fetch_failure_fails_the_shard_without_a_result() -> None:
    _, m, out = bound()
    f = one(out, act.FetchBlob)
    out = m.handle(
        ev.BlobFetched(
            now_ms=NOW + 400, tag=f.tag, digest=f.digest, source=f.source, ok=False, reason="transport"
        )
    )
    assert m.state is ShardState.FAILED
    lease = one(out, act.Publish).signed.message
    assert isinstance(lease, Lease) and lease.state == "failed" and "transport" in lease.detail
    assert act.AdjustLoad(delta=-1) in out and act.CancelTimer(name="heartbeat") in out
    assert not of(out, act.Send)


def test_a_plain_result_goes_to_the_submitter_only_with_backoff_then_done() -> None:
    # SPEC §7.7: a plain task's result is delivered, not gossiped, and stands in for the
    # final lease (§7.6): finishing the shard publishes nothing at all.
    _, m, job = ran()
    assert job.inputs == {"text": IN} and job.job_id == f"{TASK}-0-1" and m.state is ShardState.RUNNING
    with pytest.raises(LocalProtocolError, match="illegal event JobFinished in state RUNNING"):
        m.handle(ev.JobFinished(now_ms=NOW, job_id="other", ok=True))
    out = m.handle(
        ev.JobFinished(
            now_ms=NOW + 1_000,
            job_id=job.job_id,
            ok=True,
            outputs={"stdout": {"sha256": "bb" * 32, "size": 3}},
            metrics={"num_samples": 12.0, "bad": float("nan")},
        )
    )
    assert not of(out, act.Publish)
    res = one(out, act.KeepOwnResult).signed.message
    assert isinstance(res, Result)
    assert res.ok and res.weight == 12.0 and res.metrics == {"num_samples": 12.0} and res.epoch == 0
    work = one(out, act.Persist).record
    assert isinstance(work, act.WorkRecord) and work.state == "done"
    kinds = [type(a).__name__ for a in out]
    assert kinds.index("Persist") < kinds.index("KeepOwnResult") < kinds.index("Send")  # durable first
    send = one(out, act.Send)
    assert (send.peer, send.protocol, send.tag) == (SUB.peer_id, "result", "result:1")
    assert send.signed.raw == one(out, act.KeepOwnResult).signed.raw
    assert act.AdjustLoad(delta=-1) in out and act.CancelTimer(name="heartbeat") in out
    assert m.state is ShardState.DELIVERING
    t = NOW + 1_100
    delays = []
    for _ in range(4):
        out = m.handle(ev.SendCompleted(now_ms=t, tag="result:1", ok=False, reason="transport"))
        at = one(out, act.SetTimer).at_ms
        delays.append(at - t)
        out = m.handle(ev.TimerFired(now_ms=at, name="deliver:1"))
        # Between tries the final lease is published (the submitter may not have our result,
        # and a restarted one forgot our heartbeats).
        lease = one(out, act.Publish).signed.message
        assert (
            isinstance(lease, Lease)
            and lease.state == "done"
            and lease.detail == "result not acknowledged yet"
        )
        assert one(out, act.Send).signed.raw == send.signed.raw
        t = at + 10
    assert delays == [200, 400, 800, 1_600]
    out = m.handle(ev.SendCompleted(now_ms=t, tag="result:1", ok=True))
    assert out == [act.Count(name="results.delivered")] and m.state is ShardState.DONE


def test_an_aggregated_result_is_published_and_delivered_then_the_final_lease() -> None:
    # SPEC §11: the committee counts commits it heard on gossip; the last round ends with a
    # final lease, which the submitter's round supervision reads.
    _, m, job = ran(announce(kind="keras-train", aggregation="weighted_mean"))
    out = m.handle(ev.JobFinished(now_ms=NOW + 1_000, job_id=job.job_id, ok=True))
    assert not of(out, act.KeepOwnResult)
    published = [p.signed.message for p in of(out, act.Publish)]
    assert [type(x).__name__ for x in published] == ["Result", "Lease"]
    assert isinstance(published[1], Lease) and published[1].state == "done"
    assert one(out, act.Send).signed.raw == of(out, act.Publish)[0].signed.raw
    kinds = [type(a).__name__ for a in out]
    assert kinds.index("Persist") < kinds.index("Publish") < kinds.index("Send")  # durable first


def test_backoff_ceiling_is_half_the_lease_ttl() -> None:
    _, m, job = ran()
    m.handle(ev.JobFinished(now_ms=NOW + 1_000, job_id=job.job_id, ok=True))
    t, last = NOW + 1_000, 0
    for _ in range(10):
        at = one(m.handle(ev.SendCompleted(now_ms=t, tag="result:1", ok=False)), act.SetTimer).at_ms
        last = at - t
        m.handle(ev.TimerFired(now_ms=at, name="deliver:1"))
        t = at
    assert last == 5_000


def test_delivery_stops_on_unknown_task_and_past_the_deadline() -> None:
    _, m, job = ran()
    m.handle(ev.JobFinished(now_ms=NOW + 1_000, job_id=job.job_id, ok=True))
    assert (
        m.handle(ev.SendCompleted(now_ms=NOW + 1_100, tag="result:1", ok=False, reason="unknown task")) == []
    )
    assert m.state is ShardState.DONE
    _, m, job = ran()
    m.handle(ev.JobFinished(now_ms=NOW + 1_000, job_id=job.job_id, ok=True))
    out = m.handle(ev.SendCompleted(now_ms=NOW + 120_001, tag="result:1", ok=False))
    assert out == [act.Count(name="results.undelivered")] and m.state is ShardState.DONE


def test_a_job_that_ends_before_the_first_heartbeat_sends_no_heartbeat() -> None:
    # Awarded at NOW + 310, first heartbeat due at NOW + 560 (SPEC §7.6): a plain shard that
    # ends sooner publishes no lease at all, an aggregated one only its final lease.
    aggregated = announce(kind="keras-train", aggregation="weighted_mean")
    for ann, want in ((announce(), []), (aggregated, ["done"])):
        _, m, job = ran(ann)
        out = m.handle(ev.JobFinished(now_ms=NOW + 330, job_id=job.job_id, ok=True))
        leases = [p.signed.message for p in of(out, act.Publish) if isinstance(p.signed.message, Lease)]
        assert [lease.state for lease in leases] == want
        assert act.CancelTimer(name="heartbeat") in out and "heartbeat" not in m.timers


def test_a_plain_jobs_failure_is_delivered_not_published_then_failed() -> None:
    _, m, job = ran()
    out = m.handle(
        ev.JobFinished(now_ms=NOW + 1_000, job_id=job.job_id, ok=False, error="memory_limit", detail="3 GiB")
    )
    assert not of(out, act.Publish)
    res = one(out, act.KeepOwnResult).signed.message
    assert isinstance(res, Result)
    assert not res.ok and res.error == "memory_limit: 3 GiB" and res.weight == 0.0
    assert one(out, act.Send).signed.message == res
    assert act.Count(name="jobs.failed.memory_limit") in out and act.AdjustLoad(delta=-1) in out
    assert m.state is ShardState.DELIVERING
    m.handle(ev.SendCompleted(now_ms=NOW + 1_100, tag="result:1", ok=True))
    assert m.state is ShardState.FAILED


# -- cancel, lost award, adopt -------------------------------------------------------------------------------


def test_cancel_kills_the_job_and_releases_the_lease() -> None:
    _, m, job = ran()
    forged = W[0].seal(Cancel, now_ms=NOW + 500, ttl_ms=1000, task_id=TASK, reason="x")
    assert gossip(m, forged, NOW + 500) == [act.Drop(reason="forged_cancel")]
    cancel = SUB.seal(Cancel, now_ms=NOW + 500, ttl_ms=1000, task_id=TASK, reason="by the submitter")
    out = gossip(m, cancel, NOW + 500)
    assert act.CancelJob(job_id=job.job_id) in out and act.Count(name="shards.cancelled") in out
    lease = one(out, act.Publish).signed.message
    assert isinstance(lease, Lease) and lease.state == "released"
    assert m.state is ShardState.RELEASED and not m.timers.armed
    # A job completion racing the cancel changes nothing.
    assert m.handle(ev.JobFinished(now_ms=NOW + 600, job_id=job.job_id, ok=True)) == []


def test_a_reaward_that_moves_our_running_plain_shard_lets_it_finish_first() -> None:
    # SPEC §7.6: the new holder is a backup; our job runs on and the first valid result wins.
    mk, m, job = ran()
    out = mk.task.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))  # we never heartbeated to it
    reaward = one(out, act.Publish).signed
    assert reaward.message.epoch == 1  # type: ignore[attr-defined]
    out = gossip(m, reaward, NOW + 10_400)
    assert m.state is ShardState.RUNNING and not of(out, act.CancelJob)
    assert act.Count(name="shards.superseded") in out
    spare = next(s for s in mk.shards.values() if s is not m)
    out = gossip(spare, mk.award, NOW + 10_400) + gossip(spare, reaward, NOW + 10_410)
    assert spare.state is ShardState.FETCHING and spare.epoch == 1
    # Our result comes first: delivered under our epoch, and the submitter takes it.
    ref = {"sha256": "33" * 32, "size": 3}
    out = m.handle(ev.JobFinished(now_ms=NOW + 10_500, job_id=job.job_id, ok=True, outputs={"stdout": ref}))
    send = one(out, act.Send)
    assert send.signed.message.epoch == 0  # type: ignore[attr-defined]
    got = mk.task.handle(
        ev.MessageVerified(now_ms=NOW + 10_510, signed=send.signed, via=ev.VIA_STREAM, sender=m.me)
    )
    assert act.Reply(ok=True) in got and one(got, act.FetchBlob).source == m.me


def test_a_reaward_that_moves_our_shard_of_an_aggregated_task_releases_it() -> None:
    mk, m, job = ran(announce(kind="keras-train", aggregation="weighted_mean"))
    out = mk.task.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))
    reaward = one(out, act.Publish).signed
    out = gossip(m, reaward, NOW + 10_400)
    assert m.state is ShardState.LOST and act.CancelJob(job_id=job.job_id) in out
    assert one(out, act.Publish).signed.message.state == "released"  # type: ignore[attr-defined]


def test_a_second_shard_for_us_is_adopted() -> None:
    # R = 30 GFLOP/s as W = 30 over 1 s, with a deadline long enough that the heartbeating
    # holder is within its hold limit (SPEC §7.6) when the silent one is lost.
    ann = announce(max_shards=2, work=3000.0, deadline_ms=100_000)
    mk = Market(ann, W[:2])
    award = mk.award.message
    assert isinstance(award, Award) and len(award.assignments) == 2
    keep = mk.holder(0)
    lost = mk.holder(1)
    gossip(keep, mk.award, NOW + 310)
    # Shard 1's holder goes silent; only shard 0's holder keeps its lease, so it gets shard 1 too.
    mk.task.handle(ev.MessageVerified(now_ms=NOW + 9_000, signed=lease_of(keep, 0), via=ev.VIA_GOSSIP))
    out = mk.task.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))
    reaward = one(out, act.Publish).signed
    out = gossip(keep, reaward, NOW + 10_400)
    adopt = one(out, act.AdoptShard)
    assert adopt.shard == 1 and keep.shard == 0 and keep.state is ShardState.FETCHING
    twin = ShardMachine.adopt(
        ann,
        adopt.award,
        adopt.shard,
        sealer=W[[w.peer_id for w in W].index(keep.me)],
        times=TIMES,
        awards=[mk.award],
    )
    out = twin.handle(ev.Start(now_ms=NOW + 10_500))
    assert twin.shard == 1 and twin.epoch == 1 and twin.state is ShardState.FETCHING
    assert not of(out, act.Send)  # an adopted shard never bids
    del lost


def lease_of(m: ShardMachine, shard: int) -> Signed:
    w = next(s for s in W if s.peer_id == m.me)
    return w.seal(
        Lease,
        now_ms=NOW + 9_000,
        ttl_ms=10_000,
        task_id=TASK,
        epoch=0,
        shard=shard,
        round=1,
        state="running",
        detail="",
    )


def test_keras_round_two_waits_for_the_certificate_then_fetches_the_model() -> None:
    ann = announce(kind="keras-train", aggregation="weighted_mean", rounds=2, inputs={})
    mk, m, out = bound(ann)
    job = one(out, act.StartJob)
    assert job.round == 1
    out = m.handle(ev.JobFinished(now_ms=NOW + 1_000, job_id=job.job_id, ok=True, outputs={"weights": IN}))
    assert m.state is ShardState.WAITING_MODEL and not of(out, act.StartJob)
    w = next(s for s in W if s.peer_id == m.me)
    vote = w.seal(
        Vote, now_ms=NOW, ttl_ms=Vote.MAX_TTL_MS, task_id=TASK, round=1, rule="weighted_mean",
        committee=[m.me], inputs=[{"peer_id": m.me, "shard": 0, "sha256": IN["sha256"], "weight": 1.0}],
        excluded=[], output={"sha256": "cc" * 32, "size": 4}, attempt=0,
    )  # fmt: skip
    cert = tally([vote])
    assert cert is not None
    out = m.handle(ev.RoundCertified(now_ms=NOW + 2_000, certificate=cert))
    # We are the only voter: the model is fetched from our own store (as the daemon's
    # fetch_from_any returns the local copy), three passes a second apart; without it the shard fails;
    # round 1's result is still being delivered.
    at = NOW + 2_000
    for attempt in range(3):
        f = one(out, act.FetchBlob)
        assert (f.source, f.digest, f.tag) == (m.me, "cc" * 32, "model:1")
        at += 100
        out = m.handle(ev.BlobFetched(now_ms=at, tag=f.tag, digest=f.digest, source=f.source, ok=False,
                                      reason="not_found"))  # fmt: skip
        if attempt < 2:
            t = one(out, act.SetTimer)
            assert t.name == "model_retry" and t.at_ms == at + 1_000
            at = t.at_ms
            out = m.handle(ev.TimerFired(now_ms=at, name=t.name))
    assert (
        m.state is ShardState.DELIVERING and m.outcome is ShardState.FAILED and "from any voter" in m.detail
    )
    assert one(out, act.Publish).signed.message.state == "failed"
    m.handle(ev.SendCompleted(now_ms=NOW + 9_100, tag="result:1", ok=True))
    assert m.state is ShardState.FAILED
    del mk


def test_the_only_voter_starts_the_next_round_from_its_own_copy() -> None:
    ann = announce(kind="keras-train", aggregation="weighted_mean", rounds=2, inputs={})
    mk, m, out = bound(ann)
    job = one(out, act.StartJob)
    m.handle(ev.JobFinished(now_ms=NOW + 1_000, job_id=job.job_id, ok=True, outputs={"weights": IN}))
    w = next(s for s in W if s.peer_id == m.me)
    vote = w.seal(
        Vote, now_ms=NOW, ttl_ms=Vote.MAX_TTL_MS, task_id=TASK, round=1, rule="weighted_mean",
        committee=[m.me], inputs=[{"peer_id": m.me, "shard": 0, "sha256": IN["sha256"], "weight": 1.0}],
        excluded=[], output={"sha256": "cc" * 32, "size": 4}, attempt=0,
    )  # fmt: skip
    cert = tally([vote])
    assert cert is not None
    f = one(m.handle(ev.RoundCertified(now_ms=NOW + 2_000, certificate=cert)), act.FetchBlob)
    assert f.source == m.me
    out = m.handle(ev.BlobFetched(now_ms=NOW + 2_100, tag=f.tag, digest=f.digest, source=f.source, ok=True))
    job2 = one(out, act.StartJob)
    assert m.state is ShardState.RUNNING and job2.round == 2
    assert job2.inputs["weights"] == {"sha256": "cc" * 32, "size": 4}
    del mk


# -- a re-award quotes the rounds certified so far (SPEC §11.1 "The award in force") ----------------


def _lone_certificate(holder: ShardMachine) -> Any:
    """Round 1's certificate by its only voter, the holder of a one-shard task."""
    w = next(s for s in W if s.peer_id == holder.me)
    inputs = [{"peer_id": holder.me, "shard": 0, "sha256": IN["sha256"], "weight": 1.0}]
    vote = w.seal(
        Vote, now_ms=NOW, ttl_ms=Vote.MAX_TTL_MS, task_id=TASK, round=1, rule="weighted_mean",
        committee=[holder.me], inputs=inputs, excluded=[], output={"sha256": "cc" * 32, "size": 4}, attempt=0,
    )  # fmt: skip
    cert = tally([vote])
    assert cert is not None
    return cert


def _round_one_certified_then_lost() -> tuple[Market, ShardMachine, ShardMachine, Any, Signed]:
    """A one-shard, two-round keras task: round 1 is certified (its holder the only voter),
    the submitter learns it, then the holder's lease is lost and the shard is re-awarded to a
    spare bidder that never saw round 1's votes (docs/simulation.md finding 3)."""
    ann = announce(kind="keras-train", aggregation="weighted_mean", rounds=2, inputs={})
    mk = Market(ann, W[:3])
    first = mk.holder()
    out = gossip(first, mk.award, NOW + 310)
    job = one(out, act.StartJob)
    first.handle(ev.JobFinished(now_ms=NOW + 1_000, job_id=job.job_id, ok=True, outputs={"weights": IN}))
    cert = _lone_certificate(first)
    mk.task.handle(ev.RoundCertified(now_ms=NOW + 2_000, certificate=cert))
    out = mk.task.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))  # the holder went silent
    reaward = one(out, act.Publish).signed
    spare = next(s for s in mk.shards.values() if s is not first and s.state is ShardState.BID_SENT)
    return mk, first, spare, cert, reaward


def test_a_re_award_quotes_the_last_certified_round() -> None:
    _mk, _first, _spare, cert, reaward = _round_one_certified_then_lost()
    award = reaward.message
    assert isinstance(award, Award) and award.epoch == 1
    assert award.certified == {"round": 1, "output": dict(cert.output), "signers": tuple(cert.signers)}


def test_a_holder_bound_by_a_re_award_starts_after_the_quoted_round_without_its_votes() -> None:
    """The finding: the new holder never saw round 1's votes. It used to run round 1 again
    (and its committee certified a second aggregate for it); now it starts round 2 from the
    output the re-award quotes, fetched from the quoted signers."""
    mk, first, spare, cert, reaward = _round_one_certified_then_lost()
    assert not spare.certificates
    out = gossip(spare, mk.award, NOW + 10_400) + gossip(spare, reaward, NOW + 10_410)
    assert spare.epoch == 1 and spare.round == 2 and spare.state is ShardState.WAITING_MODEL
    assert not of(out, act.StartJob)
    f = one(out, act.FetchBlob)
    assert (f.digest, f.source, f.tag) == (cert.output["sha256"], first.me, "model:1")
    # Round 1's certificate arriving now starts no second fetch (one in flight at a time).
    assert not of(spare.handle(ev.RoundCertified(now_ms=NOW + 10_450, certificate=cert)), act.FetchBlob)
    fetched = ev.BlobFetched(now_ms=NOW + 10_500, tag=f.tag, digest=f.digest, source=f.source, ok=True)
    out = spare.handle(fetched)
    job = one(out, act.StartJob)
    assert job.round == 2 and job.epoch == 1 and job.inputs["weights"] == dict(cert.output)


def test_a_certificate_a_re_award_moved_is_forgotten_and_its_round_run_again() -> None:
    """The submitter re-awarded before it saw round 1's votes (its award quotes nothing): a
    spare that did see them must not start at round 2, since round 1 is now the new award's
    (SPEC §11.1): its certificate no longer holds and round 1 runs again."""
    ann = announce(kind="keras-train", aggregation="weighted_mean", rounds=2, inputs={})
    mk = Market(ann, W[:3])
    first = mk.holder()
    gossip(first, mk.award, NOW + 310)
    cert = _lone_certificate(first)
    out = mk.task.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))
    reaward = one(out, act.Publish).signed
    assert reaward.message.certified is None  # type: ignore[attr-defined]
    spare = next(s for s in mk.shards.values() if s is not first and s.state is ShardState.BID_SENT)
    gossip(spare, mk.award, NOW + 10_400)
    spare.handle(ev.RoundCertified(now_ms=NOW + 10_405, certificate=cert))
    assert 1 in spare.certificates
    out = gossip(spare, reaward, NOW + 10_410)
    job = one(out, act.StartJob)
    assert job.round == 1 and job.epoch == 1 and 1 not in spare.certificates
