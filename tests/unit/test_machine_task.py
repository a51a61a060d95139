"""TaskMachine (protocol/machines/task.py): every transition and illegal event, driven
directly with real Ed25519 signatures, the real award rule (protocol/awards.py) and real
certificates (protocol/certificate.py), plus full lives: a plain task done, a lost holder
re-awarded, every bidder lost, cancel, deadline, and a 2-round aggregated task."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest

from protocol.allocation import tie_key
from protocol.awards import check_award, open_quoted_bids
from protocol.certificate import Certificate, tally
from protocol.committee import committee
from protocol.envelope import Signed, Signer
from protocol.errors import LocalProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, SignerSealer
from protocol.machines.task import (
    DEFAULT_BACKUP_AFTER,
    DeclaredOutputs,
    Restored,
    TaskMachine,
    TaskState,
    expected_shard_ms,
)
from protocol.messages import Award, Bid, Cancel, Lease, Result, TaskAnnounce, Vote

NOW = 1_700_000_000_000
TASK = "ab" * 16
TIMES = MarketTimes(lease_ttl_ms=10_000, heartbeat_ms=2_000)
SHA = "11" * 32
A = TypeVar("A", bound=act.Action)


def sealer(n: int) -> SignerSealer:
    return SignerSealer(Signer(bytes([n]) * 32), first_seq=1000 * n)


SUB = sealer(1)
W = [sealer(n) for n in (2, 3, 4, 5)]
BY_ID = {s.peer_id: s for s in [SUB, *W]}


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
        "inputs": {},
        "bid_window_ms": 300,
        "net": {"k": 0.2, "dc_min": 0.0, "dc_max": None},
    }
    fields.update(over)
    return SUB.seal(TaskAnnounce, now_ms=NOW, ttl_ms=fields["deadline_ms"], **fields)


def bid(who: SignerSealer, c0: float = 10.0, load: float = 0.5, at: int = NOW + 10) -> Signed:
    return who.seal(Bid, now_ms=at, ttl_ms=60_000, task_id=TASK, c0=c0, load=load)


def of(actions: list[act.Action], cls: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, cls)]


def one(actions: list[act.Action], cls: type[A]) -> A:
    found = of(actions, cls)
    assert len(found) == 1, (cls.__name__, actions)
    return found[0]


R = TypeVar("R", bound=act.Record)


def record(actions: list[act.Action], cls: type[R]) -> R:
    """The first record of ``cls`` the actions persist."""
    return next(p.record for p in of(actions, act.Persist) if isinstance(p.record, cls))


def states(actions: list[act.Action]) -> list[str]:
    return [p.record.state for p in of(actions, act.Persist) if isinstance(p.record, act.TaskState)]


def body(signed: Signed) -> dict[str, Any]:
    """A message's fields without its sequence and times (to re-seal them)."""
    return {k: v for k, v in signed.message.to_wire().items() if k not in ("seq", "issued_at", "expires_at")}


def deliver(m: TaskMachine, signed: Signed, at: int, via: str = ev.VIA_STREAM) -> list[act.Action]:
    return m.handle(ev.MessageVerified(now_ms=at, signed=signed, via=via, sender=signed.signer))


def result(
    who: SignerSealer, shard: int, at: int, *, ok: bool = True, epoch: int = 0, rnd: int = 1, **kw: Any
) -> Signed:
    fields: dict[str, Any] = {
        "outputs": {"out": {"sha256": SHA, "size": 5}} if ok else {},
        "weight": 1.0 if ok else 0.0,
        "metrics": {},
        "error": None if ok else "memory_limit: worker used 3 GiB",
    }
    fields.update(kw)
    return who.seal(
        Result, now_ms=at, ttl_ms=10**9, task_id=TASK, epoch=epoch, shard=shard, round=rnd, ok=ok, **fields
    )


def lease(who: SignerSealer, shard: int, at: int, *, epoch: int = 0, state: str = "running") -> Signed:
    return who.seal(
        Lease,
        now_ms=at,
        ttl_ms=10_000,
        task_id=TASK,
        epoch=epoch,
        shard=shard,
        round=1,
        state=state,
        detail="",
    )


def started(ann: Signed | None = None, **kw: Any) -> tuple[TaskMachine, list[act.Action]]:
    m = TaskMachine(ann or announce(), sealer=SUB, times=TIMES, **kw)
    return m, m.handle(ev.Start(now_ms=NOW))


def awarded(
    ann: Signed | None = None, bidders: tuple[SignerSealer, ...] = (W[0],), **kw: Any
) -> tuple[TaskMachine, list[act.Action]]:
    m, _ = started(ann, **kw)
    for w in bidders:
        deliver(m, bid(w), NOW + 10)
    return m, m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))


def assert_award_checks(m: TaskMachine, epoch: int) -> Award:
    """The award the machine sealed passes the receivers' real check (SPEC §10.3)."""
    signed = m.awards[epoch]
    award = signed.message
    assert isinstance(award, Award)
    prev = m.awards.get(epoch - 1)
    previous = prev.message if prev is not None and isinstance(prev.message, Award) else None
    check_award(m.announce, award, SUB.peer_id, signed.signer, open_quoted_bids(award), previous)
    return award


# -- start and bidding ------------------------------------------------------------------------------


def test_start_publishes_the_announce_and_arms_window_and_deadline() -> None:
    ann = announce()
    m, out = started(ann)
    assert m.state is TaskState.BIDDING
    assert one(out, act.Publish).signed.raw == ann.raw
    timers = {t.name: t.at_ms for t in of(out, act.SetTimer)}
    assert timers == {"bid_window": NOW + 300, "deadline": NOW + 120_000}


def test_new_machine_takes_only_start() -> None:
    m = TaskMachine(announce(), sealer=SUB, times=TIMES)
    with pytest.raises(LocalProtocolError, match="illegal event TimerFired in state NEW"):
        m.handle(ev.TimerFired(now_ms=NOW, name="bid_window"))
    with pytest.raises(LocalProtocolError, match="illegal event MessageVerified in state NEW"):
        deliver(m, bid(W[0]), NOW)
    m.handle(ev.Start(now_ms=NOW))
    with pytest.raises(LocalProtocolError, match="illegal event Start in state BIDDING"):
        m.handle(ev.Start(now_ms=NOW))


def test_the_announce_must_be_ours() -> None:
    other = W[0].seal(TaskAnnounce, now_ms=NOW, ttl_ms=1000, **body(announce()))
    with pytest.raises(LocalProtocolError, match="not ours"):
        TaskMachine(other, sealer=SUB, times=TIMES)


def test_bid_is_stored_counted_and_answered_once() -> None:
    m, _ = started()
    b = bid(W[0])
    out = deliver(m, b, NOW + 10)
    assert [type(a) for a in out] == [act.Persist, act.Count, act.Reply]
    assert one(out, act.Reply).ok and one(out, act.Count).name == "bids.received"
    again = deliver(m, b, NOW + 11)
    assert again == [act.Reply(ok=True)]  # the same envelope is not stored twice


def test_unarmed_timer_and_misrouted_message_are_illegal() -> None:
    m, _ = started()
    with pytest.raises(LocalProtocolError, match="timer 'leases' fired but is not armed"):
        m.handle(ev.TimerFired(now_ms=NOW, name="leases"))
    other = W[0].seal(Bid, now_ms=NOW, ttl_ms=60_000, task_id="cd" * 16, c0=1.0, load=0.0)
    with pytest.raises(LocalProtocolError, match="misrouted"):
        deliver(m, other, NOW)
    with pytest.raises(LocalProtocolError, match="illegal event InputsSplit in state BIDDING"):
        m.handle(ev.InputsSplit(now_ms=NOW, inputs=({},)))
    with pytest.raises(LocalProtocolError, match="illegal event SendCompleted"):
        m.handle(ev.SendCompleted(now_ms=NOW, tag="x", ok=True))


def test_no_bids_backs_off_then_reannounces_with_a_fresh_sequence() -> None:
    ann = announce()
    m, _ = started(ann)
    m.handle(ev.PeersKnown(now_ms=NOW, alive=4, connected=2))
    out = m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    assert m.state is TaskState.BACKOFF and states(out) == ["pending"]
    rec = one(out, act.Persist).record
    assert isinstance(rec, act.TaskState)
    assert rec.message == "no eligible bids yet (4 peers known); waiting, then re-announcing"
    assert rec.reason == "no eligible peer has bid (kind, resources, policy or sandbox)"
    assert one(out, act.SetTimer) == act.SetTimer(name="backoff", at_ms=NOW + 2_300)
    out = m.handle(ev.TimerFired(now_ms=NOW + 2_300, name="backoff"))
    fresh = one(out, act.Publish).signed
    assert m.state is TaskState.BIDDING and m.public_state == "pending"
    assert fresh.raw != ann.raw and fresh.message.seq > ann.message.seq
    assert body(fresh) == body(ann)
    assert fresh.message.expires_at == ann.message.expires_at
    out = m.handle(ev.TimerFired(now_ms=NOW + 2_600, name="bid_window"))
    assert one(out, act.SetTimer) == act.SetTimer(name="backoff", at_ms=NOW + 2_600 + 4_000)


def test_backoff_is_capped_at_ten_seconds() -> None:
    m, _ = started()
    t = NOW + 300
    delays = []
    for _ in range(7):
        out = m.handle(ev.TimerFired(now_ms=t, name="bid_window"))
        at = one(out, act.SetTimer).at_ms
        delays.append(at - t)
        m.handle(ev.TimerFired(now_ms=at, name="backoff"))
        t = at + 300
    assert delays == [2_000, 4_000, 6_000, 8_000, 10_000, 10_000, 10_000]


def test_a_bid_during_backoff_is_awarded_at_once() -> None:
    m, _ = started()
    m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    out = deliver(m, bid(W[1], at=NOW + 900), NOW + 900)
    assert m.state is TaskState.RUNNING
    assert act.CancelTimer(name="backoff") in out
    award = assert_award_checks(m, 0)
    assert [a["peer_id"] for a in award.assignments] == [W[1].peer_id]


def offering(*who: SignerSealer, alive: int = 3) -> ev.PeersKnown:
    return ev.PeersKnown(now_ms=NOW, alive=alive, connected=1, offering=frozenset(w.peer_id for w in who))


def test_the_window_closes_early_once_every_peer_offering_the_kind_has_bid() -> None:
    ann = announce(work=3000.0, deadline_ms=1000, max_shards=3)
    m, _ = started(ann)
    m.handle(offering(W[0], W[1]))  # a third peer is alive but offers other kinds
    out = deliver(m, bid(W[0], 1000, 0.5), NOW + 10)
    # One of the two peers that offer the kind has bid: the window stays open.
    assert m.state is TaskState.BIDDING and not of(out, act.Publish) and "bid_window" in m.timers
    out = deliver(m, bid(W[1], 1500, 0.8), NOW + 20)
    assert m.state is TaskState.RUNNING and states(out) == ["running"]
    assert act.CancelTimer(name="bid_window") in out
    award = assert_award_checks(m, 0)  # the same rule, over the bids in so far
    assert {a["peer_id"] for a in award.assignments} <= {W[0].peer_id, W[1].peer_id}


def test_the_window_stays_open_while_a_peer_offering_the_kind_has_not_bid() -> None:
    m, _ = started()
    m.handle(offering(W[0], W[1]))
    deliver(m, bid(W[0]), NOW + 10)
    deliver(m, bid(W[2]), NOW + 20)  # a bidder the table does not list stands in for nobody
    deliver(m, bid(W[0], at=NOW + 30), NOW + 30)  # nor does a second bid of the same peer
    assert m.state is TaskState.BIDDING and "bid_window" in m.timers
    m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    assert m.state is TaskState.RUNNING


def test_without_peers_offering_known_the_window_runs_its_length() -> None:
    m, _ = started()
    m.handle(ev.PeersKnown(now_ms=NOW, alive=1, connected=1))  # no offering: not said
    deliver(m, bid(W[0]), NOW + 10)
    assert m.state is TaskState.BIDDING and "bid_window" in m.timers
    m.handle(offering())  # nobody offers the kind: nobody to wait for is not "everyone bid"
    deliver(m, bid(W[0], at=NOW + 20), NOW + 20)
    assert m.state is TaskState.BIDDING and "bid_window" in m.timers


def test_a_replicated_task_closes_early_only_with_enough_bidders() -> None:
    m, _ = started(announce(verify={"mode": "replicate", "replicas": 3}))
    m.handle(offering(W[0], W[1]))
    deliver(m, bid(W[0]), NOW + 10)
    deliver(m, bid(W[1]), NOW + 20)
    # Every known peer bid, but 3 copies need 3 peers: nothing to award yet.
    assert m.state is TaskState.BIDDING and "bid_window" in m.timers


def test_award_follows_the_rule_and_is_published() -> None:
    ann = announce(work=3000.0, deadline_ms=1000, max_shards=3)
    m, _ = started(ann)
    for w, (c0, load) in zip(W, [(1000, 0.5), (1500, 0.8), (2000, 1.2)], strict=False):
        deliver(m, bid(w, c0, load), NOW + 10)
    out = m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    award = assert_award_checks(m, 0)
    assert m.state is TaskState.RUNNING and states(out) == ["running"]
    assert one(out, act.Publish).signed is m.awards[0]
    rec = of(out, act.Persist)[0].record
    assert isinstance(rec, act.AwardRecord) and rec.epoch == 0 and rec.raw == m.awards[0].raw
    assert len(award.assignments) == 2 and not award.under_capacity
    assert one(out, act.SetTimer) == act.SetTimer(name="leases", at_ms=NOW + 300 + 10_001)


def test_split_inputs_wait_for_the_driver() -> None:
    m, _ = started(
        announce(kind="keras-predict", max_shards=2, work=100.0, deadline_ms=1000), split_input="data"
    )
    deliver(m, bid(W[0], 60.0), NOW + 10)
    deliver(m, bid(W[1], 60.0), NOW + 10)
    out = m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    split = one(out, act.SplitInputs)
    assert m.state is TaskState.AWARDING and split.name == "data" and len(split.shares) == 2
    assert not of(out, act.Publish)
    with pytest.raises(LocalProtocolError, match="1 split inputs for 2 shards"):
        m.handle(ev.InputsSplit(now_ms=NOW + 400, inputs=({},)))
    parts = ({"data": {"sha256": "aa" * 32, "size": 3}}, {"data": {"sha256": "bb" * 32, "size": 4}})
    out = m.handle(ev.InputsSplit(now_ms=NOW + 400, inputs=parts))
    award = assert_award_checks(m, 0)
    assert m.state is TaskState.RUNNING
    assert [a["inputs"]["data"]["sha256"] for a in award.assignments] == ["aa" * 32, "bb" * 32]


# -- results ---------------------------------------------------------------------------------------


def test_plain_task_done_after_fetching_every_output() -> None:
    m, _ = awarded(announce(max_shards=2, work=30.0, deadline_ms=1000), bidders=(W[0], W[1]))
    award = assert_award_checks(m, 0)
    holders = {a["shard"]: BY_ID[a["peer_id"]] for a in award.assignments}
    assert len(holders) == 2
    out = deliver(
        m, result(holders[1], 1, NOW + 500, outputs={"o": {"sha256": "22" * 32, "size": 1}}), NOW + 500
    )
    assert one(out, act.Reply).ok and not of(out, act.FetchBlob)  # shard 0 first, as today
    out = deliver(m, result(holders[0], 0, NOW + 600), NOW + 600)
    f = one(out, act.FetchBlob)
    assert (f.digest, f.source, f.size) == (SHA, holders[0].peer_id, 5)
    out = m.handle(
        ev.BlobFetched(now_ms=NOW + 700, tag=f.tag, digest=SHA, source=f.source, ok=False, reason="x")
    )
    assert one(out, act.SetTimer) == act.SetTimer(name="refetch", at_ms=NOW + 1_700)
    out = m.handle(ev.TimerFired(now_ms=NOW + 1_700, name="refetch"))
    f = one(out, act.FetchBlob)
    out = m.handle(ev.BlobFetched(now_ms=NOW + 1_800, tag=f.tag, digest=SHA, source=f.source, ok=True))
    f2 = one(out, act.FetchBlob)
    assert f2.digest == "22" * 32
    out = m.handle(
        ev.BlobFetched(now_ms=NOW + 1_900, tag=f2.tag, digest=f2.digest, source=f2.source, ok=True)
    )
    assert m.state is TaskState.DONE
    res = record(out, act.TaskResultRecord)
    assert [o["name"] for o in res.result["outputs"]] == ["shard-0/out", "shard-1/o"]
    assert states(out) == ["done"] and one(out, act.Notify).final
    assert act.Count(name="tasks.done") in out
    assert {c.name for c in of(out, act.CancelTimer)} == {"deadline"}
    assert not m.timers.armed


def test_result_checks_signer_and_holder() -> None:
    m, _ = awarded()
    holder = W[0]
    forged = result(W[1], 0, NOW + 400)
    out = m.handle(
        ev.MessageVerified(now_ms=NOW + 400, signed=forged, via=ev.VIA_STREAM, sender=holder.peer_id)
    )
    assert out == [act.Drop(reason="signer_mismatch"), act.Reply(ok=False, reason="signer mismatch")]
    out = deliver(m, forged, NOW + 400)
    assert out == [act.Drop(reason="not_holder"), act.Reply(ok=False, reason="not the shard's holder")]
    out = deliver(m, forged, NOW + 400, via=ev.VIA_GOSSIP)
    assert out == [act.Drop(reason="not_holder")]
    assert m.state is TaskState.RUNNING and not m.results


def test_a_failed_shard_with_no_retries_left_fails_the_task_naming_it() -> None:
    m, _ = awarded(bidders=(W[0], W[1]), retries=0)
    holder, _ = holder_and_spares(m)
    out = deliver(m, result(holder, 0, NOW + 400, ok=False), NOW + 400)
    assert m.state is TaskState.FAILED and 1 not in m.awards
    rec = [p.record for p in of(out, act.Persist) if isinstance(p.record, act.TaskState)][-1]
    assert rec.reason == "memory_limit"  # the shard's error class, as before moves existed
    assert rec.message.startswith("shard 0 failed on 1 peer(s), retry budget (0) spent")
    assert "ok = false: memory_limit: worker used 3 GiB" in rec.message


def test_a_failed_shard_with_no_other_bidder_fails_the_task_at_once() -> None:
    # The only bidder failed for sure: waiting for fresh bids until the deadline would turn a
    # clear error into a late "deadline".
    m, _ = awarded()
    out = deliver(m, result(W[0], 0, NOW + 400, ok=False), NOW + 400)
    assert m.state is TaskState.FAILED and not of(out, act.Publish)
    rec = [p.record for p in of(out, act.Persist) if isinstance(p.record, act.TaskState)][-1]
    assert rec.reason == "memory_limit"
    assert rec.message.startswith("shard 0 failed on 1 peer(s), no other bidder: ")


def test_highest_sequence_result_counts() -> None:
    m, _ = awarded(announce(max_shards=1))
    newer = result(W[0], 0, NOW + 400)
    older = SignerSealer(W[0].signer, first_seq=1).seal(Result, now_ms=NOW + 300, ttl_ms=10**9, **body(newer))
    deliver(m, newer, NOW + 400, via=ev.VIA_GOSSIP)
    out = deliver(m, older, NOW + 401, via=ev.VIA_GOSSIP)
    assert not [c for c in of(out, act.Count) if c.name == "results.received"]
    assert m.results[1][0] is newer


# -- leases and re-award --------------------------------------------------------------------------------


def test_lease_from_a_non_holder_is_dropped_and_heartbeats_move_the_check() -> None:
    m, _ = awarded()
    assert deliver(m, lease(W[1], 0, NOW + 500), NOW + 500, via=ev.VIA_GOSSIP) == [
        act.Drop(reason="not_holder", detail=f"lease for shard 0 from {W[1].peer_id[-8:]}")
    ]
    deliver(m, lease(W[0], 0, NOW + 5_000), NOW + 5_000, via=ev.VIA_GOSSIP)
    out = m.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))
    assert out == [act.SetTimer(name="leases", at_ms=NOW + 15_001)]  # not lost: re-armed
    assert m.state is TaskState.RUNNING


def test_lost_holder_is_reawarded_to_a_spare_bidder() -> None:
    m, _ = awarded(bidders=(W[0], W[1]))
    # Equal idle bids: H(task ‖ peer) breaks the tie (SPEC §10.2), not the smaller peer ID.
    first = min((W[0].peer_id, W[1].peer_id), key=lambda p: tie_key(m.task_id, p))
    assert [a["peer_id"] for a in m.assignments()] == [first]
    holder = BY_ID[m.assignments()[0]["peer_id"]]
    spare = W[1] if holder is W[0] else W[0]
    out = m.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))
    award = assert_award_checks(m, 1)
    assert award.excluded == (holder.peer_id,)
    assert [a["peer_id"] for a in award.assignments] == [spare.peer_id]
    assert act.Count(name="tasks.reawarded") in out and one(out, act.Publish).signed is m.awards[1]
    rec = record(out, act.TaskState)
    assert rec.message == f"lease lost by {holder.peer_id[-8:]}; re-awarded shard 0 → {spare.peer_id[-8:]}"
    # The new holder gets a full TTL from the re-award.
    assert one(out, act.SetTimer) == act.SetTimer(name="leases", at_ms=NOW + 10_301 + 10_001)
    # The old holder's late result is not the holder's any more (epoch 1).
    assert deliver(m, result(holder, 0, NOW + 11_000, epoch=1), NOW + 11_000)[0] == act.Drop(
        reason="not_holder"
    )
    out = deliver(m, result(spare, 0, NOW + 12_000, epoch=1), NOW + 12_000)
    f = one(out, act.FetchBlob)
    assert f.source == spare.peer_id
    m.handle(ev.BlobFetched(now_ms=NOW + 12_100, tag=f.tag, digest=SHA, source=f.source, ok=True))
    assert m.state is TaskState.DONE


def test_peer_lost_reawards_without_waiting_for_the_ttl() -> None:
    m, _ = awarded(bidders=(W[0], W[1]))
    holder = m.assignments()[0]["peer_id"]
    m.handle(ev.PeerLost(now_ms=NOW + 400, peer=holder))
    assert 1 in m.awards and m.latest_award() is not None
    assert holder in m.latest_award().excluded  # type: ignore[union-attr]


def test_every_bidder_lost_asks_for_fresh_bids_then_reawards() -> None:
    m, _ = awarded()
    out = m.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))
    assert m.state is TaskState.REBIDDING and 1 not in m.awards
    assert states(out) == ["running"] and one(out, act.Publish).signed.message.KIND == "announce"
    assert act.SetTimer(name="bid_window", at_ms=NOW + 10_601) in out
    deliver(m, bid(W[2], at=NOW + 10_400), NOW + 10_400)
    out = m.handle(ev.TimerFired(now_ms=NOW + 10_601, name="bid_window"))
    award = assert_award_checks(m, 1)
    assert m.state is TaskState.RUNNING
    assert [a["peer_id"] for a in award.assignments] == [W[2].peer_id] and award.excluded == (W[0].peer_id,)


def test_wait_for_network_holds_the_lease_clock() -> None:
    m, _ = awarded(wait_for_network=True)
    out = m.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))
    assert out == [act.SetTimer(name="leases", at_ms=NOW + 11_301)] and 1 not in m.awards
    m.handle(ev.PeersKnown(now_ms=NOW + 11_000, alive=3, connected=1))
    out = m.handle(ev.TimerFired(now_ms=NOW + 11_301, name="leases"))
    # A full TTL from the last moment nobody could reach us.
    assert out == [act.SetTimer(name="leases", at_ms=NOW + 10_301 + 10_001)]
    m.handle(ev.TimerFired(now_ms=NOW + 20_302, name="leases"))
    assert m.state is TaskState.REBIDDING


# -- deadline, cancel, terminal -----------------------------------------------------------------------


def test_deadline_fails_with_the_last_reason() -> None:
    m, _ = started()
    m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    out = m.handle(ev.TimerFired(now_ms=NOW + 120_000, name="deadline"))
    assert m.state is TaskState.FAILED
    rec = record(out, act.TaskState)
    assert rec.reason == "deadline"
    assert rec.message == "deadline passed: no eligible peer has bid (kind, resources, policy or sandbox)"
    assert act.CancelTimer(name="backoff") in out and not m.timers.armed
    out = deliver(m, bid(W[0], at=NOW + 120_001), NOW + 120_001)
    assert out == [act.Count(name="bids.unknown_task"), act.Reply(ok=False, reason="unknown task")]
    with pytest.raises(LocalProtocolError, match="illegal event TimerFired in state FAILED"):
        m.handle(ev.TimerFired(now_ms=NOW, name="deadline"))


def test_deadline_while_running_says_no_result() -> None:
    m, _ = awarded()
    out = m.handle(ev.TimerFired(now_ms=NOW + 120_000, name="deadline"))
    rec = record(out, act.TaskState)
    assert rec.message == "deadline passed: no result before the deadline"


def test_cancel_publishes_a_signed_cancel_and_ends() -> None:
    m, _ = awarded()
    out = m.handle(ev.CancelRequested(now_ms=NOW + 1_000))
    c = one(out, act.Publish).signed
    assert isinstance(c.message, Cancel) and c.signer == SUB.peer_id and c.message.task_id == TASK
    assert m.state is TaskState.CANCELLED and states(out) == ["cancelled"]
    assert one(out, act.Notify) == act.Notify(
        task_id=TASK, state="cancelled", message="cancelled by the submitter", final=True
    )
    assert m.handle(ev.CancelRequested(now_ms=NOW + 2_000)) == []


# -- aggregated tasks --------------------------------------------------------------------------------------


def certify(m: TaskMachine, rnd: int, out_sha: str = "cc" * 32) -> Certificate:
    """A real certificate: the committee drawn from the award's holders votes one ballot."""
    holders = {a["shard"]: a["peer_id"] for a in m.assignments()}
    members = sorted(committee(TASK, rnd, sorted(set(holders.values()))))
    inputs = [
        {"peer_id": p, "shard": s, "sha256": f"{s + 1:02x}" * 32, "weight": 1.0}
        for s, p in sorted(holders.items(), key=lambda kv: (kv[1], kv[0]))
    ]
    votes = [
        BY_ID[p].seal(
            Vote,
            now_ms=NOW,
            ttl_ms=Vote.MAX_TTL_MS,
            task_id=TASK,
            round=rnd,
            rule="weighted_mean",
            committee=members,
            inputs=inputs,
            excluded=[],
            output={"sha256": out_sha, "size": 9},
            attempt=0,
        )
        for p in members
    ]
    cert = tally(votes)
    assert cert is not None
    return cert


def test_two_round_aggregated_task_is_done_when_the_last_round_is_certified() -> None:
    ann = announce(
        kind="keras-train", aggregation="weighted_mean", rounds=2, max_shards=2, work=30.0, deadline_ms=1000
    )
    m, _ = awarded(ann, bidders=(W[0], W[1]))
    assert len(m.assignments()) == 2
    c1 = certify(m, 1)
    out = m.handle(ev.RoundCertified(now_ms=NOW + 1_000, certificate=c1))
    fetches = of(out, act.FetchBlob)
    assert {f.digest for f in fetches} == {"01" * 32, "02" * 32}  # the round's inputs, for the bundle
    for f in fetches:
        out = m.handle(
            ev.BlobFetched(now_ms=NOW + 1_100, tag=f.tag, digest=f.digest, source=f.source, ok=True)
        )
    rr = record(out, act.RoundRecord)
    assert rr.round == 1 and rr.info["signers"] == list(c1.signers)
    assert states(out) == ["running"] and m.state is TaskState.RUNNING
    c2 = certify(m, 2, "dd" * 32)
    out = m.handle(ev.RoundCertified(now_ms=NOW + 2_000, certificate=c2))
    for f in of(out, act.FetchBlob):
        out = m.handle(
            ev.BlobFetched(now_ms=NOW + 2_100, tag=f.tag, digest=f.digest, source=f.source, ok=True)
        )
    assert m.state is TaskState.AGGREGATING and "aggregating" in states(out)
    final = one(out, act.FetchBlob)
    assert final.digest == "dd" * 32 and final.source in c2.signers
    out = m.handle(
        ev.BlobFetched(now_ms=NOW + 2_200, tag=final.tag, digest=final.digest, source=final.source, ok=False)
    )
    final = one(out, act.FetchBlob)  # the next voter
    out = m.handle(
        ev.BlobFetched(now_ms=NOW + 2_300, tag=final.tag, digest=final.digest, source=final.source, ok=True)
    )
    assert m.state is TaskState.DONE
    res = record(out, act.TaskResultRecord)
    assert res.result["certificate"]["output"] == "dd" * 32 and res.result["certificate"]["round"] == 2


@pytest.mark.parametrize("scale", [None, 1 / 255])
def test_validation_evaluation_runs_a_local_job_per_round(scale: float | None) -> None:
    params = {"model_config": "{}"} if scale is None else {"model_config": "{}", "x_scale": scale}
    ann = announce(kind="keras-train", aggregation="weighted_mean", rounds=1, max_shards=1, params=params)
    held = {"validation": {"sha256": "ee" * 32, "size": 10}}
    m, _ = awarded(ann, held_out=held)
    out = m.handle(ev.RoundCertified(now_ms=NOW + 1_000, certificate=certify(m, 1)))
    for f in of(out, act.FetchBlob):
        out = m.handle(
            ev.BlobFetched(now_ms=NOW + 1_100, tag=f.tag, digest=f.digest, source=f.source, ok=True)
        )
    f = one(out, act.FetchBlob)
    assert f.tag == "model:1:validation"
    out = m.handle(ev.BlobFetched(now_ms=NOW + 1_200, tag=f.tag, digest=f.digest, source=f.source, ok=True))
    job = one(out, act.StartJob)
    assert job.purpose == "evaluate" and job.inputs["data"]["sha256"] == "ee" * 32
    assert job.kind == "keras-predict" and job.params["model_config"] == "{}"
    # The held-out data is scaled as the training data is: the same x_scale, or none.
    assert job.params.get("x_scale") == scale
    with pytest.raises(LocalProtocolError, match="no job 'other' is running"):
        m.handle(ev.JobFinished(now_ms=NOW + 1_250, job_id="other", ok=True))
    out = m.handle(ev.JobFinished(now_ms=NOW + 1_300, job_id=job.job_id, ok=True, metrics={"accuracy": 0.75}))
    rr = record(out, act.RoundRecord)
    assert rr.info["val_accuracy"] == 0.75


def test_every_shard_failed_fails_an_aggregated_task() -> None:
    ann = announce(
        kind="keras-train", aggregation="weighted_mean", rounds=2, max_shards=2, work=30.0, deadline_ms=1000
    )
    m, _ = awarded(ann, bidders=(W[0], W[1]))
    holders = {a["shard"]: BY_ID[a["peer_id"]] for a in m.assignments()}
    deliver(m, result(holders[0], 0, NOW + 500, ok=False), NOW + 500)
    assert m.state is TaskState.RUNNING
    out = deliver(m, result(holders[1], 1, NOW + 600, ok=False), NOW + 600)
    assert m.state is TaskState.FAILED
    rec = [p.record for p in of(out, act.Persist) if isinstance(p.record, act.TaskState)][-1]
    assert rec.reason == "shards_failed" and rec.message.startswith("every shard failed: shard 0 on ")


def test_a_certificate_for_a_plain_task_is_illegal() -> None:
    m, _ = awarded()
    agg = announce(aggregation="sum")
    other = TaskMachine(agg, sealer=SUB, times=TIMES)
    del other
    with pytest.raises(LocalProtocolError, match="illegal event RoundCertified"):
        m.handle(ev.RoundCertified(now_ms=NOW, certificate=certify(m, 1)))


def test_resume_supervises_stored_awards_and_logs_the_restart() -> None:
    m0, _ = awarded()
    restored = Restored(bids=list(m0.bids.values()), awards=[m0.awards[0]], public_state="running")
    m = TaskMachine(announce(), sealer=SUB, times=TIMES, restored=restored, wait_for_network=True)
    out = m.handle(ev.Start(now_ms=NOW + 50_000))
    assert m.state is TaskState.RUNNING and not of(out, act.Publish)
    ev_rec = [p.record for p in of(out, act.Persist) if isinstance(p.record, act.TaskEvent)]
    assert ev_rec and ev_rec[0].message == "submitter restarted; resuming"
    assert act.SetTimer(name="leases", at_ms=NOW + 51_000) in out


def test_more_bidders_than_an_award_can_quote_still_get_an_award() -> None:
    # The simulator's finding 1: past 64 bidders the award could not be sealed at all
    # (an award quotes at most 64 bids, SPEC §7.5), so every task failed at its first award.
    crowd = tuple(sealer(n) for n in range(10, 80))  # 70 bidders
    loads = {w.peer_id: (i % 7) / 10 for i, w in enumerate(crowd)}
    m, _ = started(announce(max_shards=4))
    for w in crowd:
        deliver(
            m,
            w.seal(Bid, now_ms=NOW + 10, ttl_ms=60_000, task_id=TASK, c0=10.0, load=loads[w.peer_id]),
            NOW + 10,
        )
    out = m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    assert m.state is TaskState.RUNNING, out
    award = assert_award_checks(m, 0)
    quoted = open_quoted_bids(award)
    assert len(quoted) == 64
    # The six left out are among the most loaded: nobody less loaded than a quoted bid is dropped.
    kept = {b.signer for b in quoted}
    dropped = [p for p in loads if p not in kept]
    assert len(dropped) == 6
    assert min(loads[p] for p in dropped) >= max(loads[p] for p in kept)
    assert [b.signer for b in quoted] == sorted(kept)


# -- issue 8: failures move, backup holders, declared outputs -------------------------------------------


def holder_and_spares(m: TaskMachine) -> tuple[SignerSealer, list[SignerSealer]]:
    holder = BY_ID[m.assignments()[0]["peer_id"]]
    return holder, [w for w in W if w is not holder]


def test_a_failed_shard_moves_to_another_bidder_and_the_task_completes_there() -> None:
    m, _ = awarded(bidders=(W[0], W[1]))
    holder, _ = holder_and_spares(m)
    out = deliver(m, result(holder, 0, NOW + 400, ok=False), NOW + 400)
    assert m.state is TaskState.RUNNING
    award = assert_award_checks(m, 1)
    assert award.excluded == (holder.peer_id,)
    spare = BY_ID[award.assignments[0]["peer_id"]]
    assert spare is not holder
    assert act.Count(name="tasks.reawarded") in out and one(out, act.Publish).signed is m.awards[1]
    assert "ok = false: memory_limit" in record(out, act.TaskState).message
    # The old holder's failure, seen again (a newer copy on gossip), neither fails nor
    # finishes the shard, nor moves it again.
    out = deliver(m, result(holder, 0, NOW + 450, ok=False), NOW + 450, via=ev.VIA_GOSSIP)
    assert not of(out, act.Publish) and 2 not in m.awards
    assert m.state is TaskState.RUNNING and not m._shard_finished(0)
    out = deliver(m, result(spare, 0, NOW + 900, epoch=1), NOW + 900)
    fetch = one(out, act.FetchBlob)
    assert fetch.source == spare.peer_id
    out = m.handle(ev.BlobFetched(now_ms=NOW + 950, tag=fetch.tag, digest=SHA, source=spare.peer_id, ok=True))
    assert m.state is TaskState.DONE


def test_the_retry_budget_fails_the_task_with_every_error_seen() -> None:
    m, _ = awarded(bidders=(W[0], W[1], W[2]), retries=1)
    first, _ = holder_and_spares(m)
    deliver(m, result(first, 0, NOW + 400, ok=False), NOW + 400)
    second = BY_ID[m.assignments()[0]["peer_id"]]
    assert second is not first and m.state is TaskState.RUNNING
    out = deliver(m, result(second, 0, NOW + 600, ok=False, epoch=1, error="crashed: segfault"), NOW + 600)
    assert m.state is TaskState.FAILED and 2 not in m.awards
    rec = [p.record for p in of(out, act.Persist) if isinstance(p.record, act.TaskState)][-1]
    assert rec.reason == "crashed"  # the last error's class
    assert rec.message.startswith("shard 0 failed on 2 peer(s), retry budget (1) spent")
    assert f"{first.peer_id[-8:]}: ok = false: memory_limit" in rec.message
    assert f"{second.peer_id[-8:]}: ok = false: crashed: segfault" in rec.message


def test_a_lost_lease_counts_against_the_retry_budget() -> None:
    m, _ = awarded(bidders=(W[0], W[1]), retries=0)
    m.handle(ev.TimerFired(now_ms=NOW + 10_301, name="leases"))
    assert m.state is TaskState.FAILED and 1 not in m.awards
    assert m.reason == "lease_lost"


def test_the_retry_budget_survives_a_restart() -> None:
    m, _ = awarded(bidders=(W[0], W[1], W[2]), retries=1)
    first, _ = holder_and_spares(m)
    deliver(m, result(first, 0, NOW + 400, ok=False), NOW + 400)
    again = TaskMachine(
        m.announce_signed,
        sealer=SUB,
        times=TIMES,
        retries=1,
        restored=Restored(bids=list(m.bids.values()), awards=list(m.awards.values()), public_state="running"),
    )
    again.handle(ev.Start(now_ms=NOW + 1_000))
    assert again.failures == {0: {first.peer_id: "failed or lost before a restart"}}
    second = BY_ID[again.assignments()[0]["peer_id"]]
    out = deliver(again, result(second, 0, NOW + 1_200, ok=False, epoch=1), NOW + 1_200)
    assert again.state is TaskState.FAILED and again.reason == "memory_limit"
    rec = [p.record for p in of(out, act.Persist) if isinstance(p.record, act.TaskState)][-1]
    assert rec.message.startswith("shard 0 failed on 2 peer(s), retry budget (1) spent")


def test_expected_time_is_share_times_work_over_capacity() -> None:
    assert expected_shard_ms(0.5, 100.0, 10.0) == 5_000.0
    assert expected_shard_ms(1.0, 1.0, 0.0) == float("inf")


def test_a_heartbeating_holder_past_its_hold_limit_gets_a_backup_and_the_first_result_wins() -> None:
    # W = 3000 at C ≈ 10 · share 1: about 300 s expected, so the hold limit (2.5×, the default) is far past
    # one lease TTL and only the overdue rule can move the shard.
    m, _ = awarded(announce(work=3000.0, deadline_ms=3_600_000), bidders=(W[0], W[1]))
    holder, _ = holder_and_spares(m)
    a = m.assignments()[0]
    expected = m.expected_ms(a)
    assert expected == pytest.approx(1000 * 3000 / (10 + 0.2 * 0.5))
    due = m._overdue_at(a)
    assert due == NOW + 300 + int(DEFAULT_BACKUP_AFTER * expected)
    at = NOW + 300
    while at + 2_000 < due:  # the holder heartbeats faithfully, but never delivers
        at += 2_000
        armed = m.timers.armed["leases"]
        if armed <= at:
            m.handle(ev.TimerFired(now_ms=armed, name="leases"))  # the lease check: alive
            assert 1 not in m.awards and m.timers.armed["leases"] > armed
        deliver(m, lease(holder, 0, at), at, via=ev.VIA_GOSSIP)
    assert 1 not in m.awards  # heartbeats held it until the limit …
    for _ in range(5):  # the lease checks still due before the limit (bounded)
        armed = m.timers.armed["leases"]
        if armed >= due:
            break
        m.handle(ev.TimerFired(now_ms=armed, name="leases"))
        assert 1 not in m.awards
    assert m.timers.armed["leases"] == due  # the next check is the limit
    deliver(m, lease(holder, 0, due - 1), due - 1, via=ev.VIA_GOSSIP)
    out = m.handle(ev.TimerFired(now_ms=due, name="leases"))
    award = assert_award_checks(m, 1)  # … and not past it: the shard has a backup holder
    assert award.excluded == (holder.peer_id,)
    backup = BY_ID[award.assignments[0]["peer_id"]]
    assert "overdue" in record(out, act.TaskState).message
    assert m.failures[0][holder.peer_id].startswith("overdue")
    # The overdue holder's result still counts if it comes first (epoch 0) …
    late = result(holder, 0, due + 10, outputs={"out": {"sha256": "22" * 32, "size": 5}})
    out = deliver(m, late, due + 10)
    assert one(out, act.FetchBlob).source == holder.peer_id
    # … and the backup's, arriving after it, does not replace it.
    deliver(m, result(backup, 0, due + 20, epoch=1), due + 20)
    assert m.results[1][0] is late
    out = m.handle(
        ev.BlobFetched(
            now_ms=due + 30, tag=f"output:{'22' * 32}", digest="22" * 32, source=holder.peer_id, ok=True
        )
    )
    assert m.state is TaskState.DONE
    res = record(out, act.TaskResultRecord).result
    assert res["outputs"][0]["sha256"] == "22" * 32


def test_no_hold_limit_when_backup_after_is_zero() -> None:
    m, _ = awarded(announce(work=3000.0, deadline_ms=3_600_000), backup_after=0)
    assert m._overdue_at(m.assignments()[0]) is None


def test_the_hold_limit_is_never_below_its_floor() -> None:
    # W = 10 at C ≈ 10: about 1 s expected, 2.5 s by the multiple alone.
    m, _ = awarded()  # D = 120 s: the floor is min(60 s, D / 3.5) ≈ 34.3 s
    assert m._overdue_at(m.assignments()[0]) == NOW + 300 + int(120_000 / (1 + DEFAULT_BACKUP_AFTER))
    m, _ = awarded(announce(deadline_ms=3_600_000))  # a long deadline: backup_min (60 s)
    assert m._overdue_at(m.assignments()[0]) == NOW + 300 + 60_000
    m, _ = awarded(backup_min_ms=1_000)  # never below one lease TTL
    assert m._overdue_at(m.assignments()[0]) == NOW + 300 + TIMES.lease_ttl_ms + 1


DECLARED = DeclaredOutputs(names=frozenset({"stdout"}), max_count=1, max_bytes=5)


@pytest.mark.parametrize(
    "outputs",
    [
        {"stdout": {"sha256": SHA, "size": 5}, "pad": {"sha256": "22" * 32, "size": 64 << 20}},
        {"stdout": {"sha256": SHA, "size": 6}},
        {"other": {"sha256": SHA, "size": 1}},
    ],
    ids=["padded", "oversized", "renamed"],
)
def test_a_result_with_undeclared_or_oversized_outputs_is_refused_and_the_shard_moves(
    outputs: dict[str, Any],
) -> None:
    m, _ = awarded(bidders=(W[0], W[1]), outputs=DECLARED)
    holder, _ = holder_and_spares(m)
    out = deliver(m, result(holder, 0, NOW + 400, outputs=outputs), NOW + 400)
    assert one(out, act.Drop).reason == "undeclared_output"
    assert one(out, act.Reply) == act.Reply(ok=False, reason="undeclared output")
    assert not of(out, act.FetchBlob) and not [
        p for p in of(out, act.Persist) if isinstance(p.record, act.ResultRecord)
    ]
    assert m.results == {}
    award = assert_award_checks(m, 1)
    assert award.excluded == (holder.peer_id,)
    assert "result refused" in m.failures[0][holder.peer_id]


def test_a_result_within_its_declared_outputs_is_kept() -> None:
    m, _ = awarded(outputs=DECLARED)
    out = deliver(m, result(W[0], 0, NOW + 400, outputs={"stdout": {"sha256": SHA, "size": 5}}), NOW + 400)
    assert not of(out, act.Drop) and one(out, act.FetchBlob).digest == SHA


def test_an_overdue_holder_costs_no_retry_and_may_still_deliver_first() -> None:
    # retries = 0: a failure would end the task, a backup does not (the holder has not failed).
    m, _ = awarded(announce(work=3000.0, deadline_ms=3_600_000), bidders=(W[0], W[1]), retries=0)
    holder, _ = holder_and_spares(m)
    due = m._overdue_at(m.assignments()[0])
    assert due is not None
    at = NOW + 300
    while at + 2_000 < due:  # heartbeats every 2 s; lease checks when due
        at += 2_000
        armed = m.timers.armed["leases"]
        if armed <= at:
            m.handle(ev.TimerFired(now_ms=armed, name="leases"))
        deliver(m, lease(holder, 0, at), at, via=ev.VIA_GOSSIP)
    for _ in range(3):  # the last lease check(s), up to the hold limit
        if 1 not in m.awards:
            m.handle(ev.TimerFired(now_ms=m.timers.armed["leases"], name="leases"))
    assert 1 in m.awards and m.state is TaskState.RUNNING
    assert m.awards[1].message.excluded == (holder.peer_id,)  # type: ignore[attr-defined]
