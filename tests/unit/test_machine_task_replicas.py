"""Replicated plain tasks (issue 8 item 5, SPEC §7.10) in the TaskMachine, driven directly with
real signatures and the receivers' real award check: copies on distinct peers, a quorum of
identical signed outputs, one more copy per disagreement, the losing side observed, and the
task failing with ``replicas_disagree`` when no majority can be reached."""

from __future__ import annotations

from typing import Any

import pytest
from test_machine_task import (
    BY_ID,
    NOW,
    SHA,
    SUB,
    TASK,
    TIMES,
    W,
    announce,
    assert_award_checks,
    bid,
    deliver,
    of,
    one,
    record,
    result,
    started,
)

from protocol import trust as tr
from protocol.allocation import ScoredBid
from protocol.awards import (
    Ranked,
    add_replicas,
    check_award,
    open_quoted_bids,
    reassign,
    replica_ranking,
    spot_checked,
    spot_commit,
)
from protocol.envelope import Signed
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.task import FEW_BIDS_REASON, Restored, TaskMachine, TaskState
from protocol.messages import Award

WRONG = "66" * 32
REPLICATE = {"mode": "replicate", "replicas": 2}


def replicated(bidders: tuple[Any, ...] = (W[0], W[1], W[2]), **over: Any) -> tuple[TaskMachine, Award]:
    m, _ = started(announce(verify=REPLICATE, **over))
    for w in bidders:
        deliver(m, bid(w), NOW + 10)
    m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    return m, assert_award_checks(m, 0)


def copies(award: Award) -> dict[int, Any]:
    return {int(a["shard"]): BY_ID[a["peer_id"]] for a in award.assignments}


def fetch_all(m: TaskMachine, out: list[act.Action], at: int) -> list[act.Action]:
    for _ in range(10):  # bounded: one fetch per output
        fetches = of(out, act.FetchBlob)
        if not fetches:
            return out
        f = fetches[0]
        out = m.handle(ev.BlobFetched(now_ms=at, tag=f.tag, digest=f.digest, source=f.source, ok=True))
    raise AssertionError("more fetches than outputs")


def observed(out: list[act.Action]) -> set[tuple[str, str]]:
    return {(o.outcome, o.peer) for o in of(out, act.Observe)}


def test_the_first_award_puts_each_copy_on_another_peer() -> None:
    _, award = replicated()
    shards = sorted(award.assignments, key=lambda a: a["shard"])
    assert [a["shard"] for a in shards] == [0, 1]
    assert "of" not in shards[0] and shards[1]["of"] == 0
    assert shards[0]["peer_id"] != shards[1]["peer_id"]
    assert shards[1]["share"] == shards[0]["share"]


def test_one_bidder_is_not_enough_for_two_replicas() -> None:
    m, _ = started(announce(verify=REPLICATE))
    deliver(m, bid(W[0]), NOW + 10)
    out = m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    assert m.state is TaskState.BACKOFF and not m.awards
    assert record(out, act.TaskState).reason == FEW_BIDS_REASON
    # The second bidder during the back-off is awarded at once, with both copies.
    deliver(m, bid(W[1]), NOW + 400)
    assert m.state is TaskState.RUNNING
    assert len(assert_award_checks(m, 0).assignments) == 2


def test_agreeing_copies_finish_the_task_with_the_quorum_recorded() -> None:
    m, award = replicated()
    by = copies(award)
    # Each host measures its own times: those metrics are not compared (awards.HOST_METRICS).
    first = result(by[0], 0, NOW + 500, rnd=0, metrics={"bytes": 5.0, "wall_seconds": 0.1})
    assert not of(deliver(m, first, NOW + 500), act.FetchBlob)
    out = deliver(
        m, result(by[1], 1, NOW + 600, rnd=0, metrics={"bytes": 5.0, "wall_seconds": 0.3}), NOW + 600
    )
    assert one(out, act.FetchBlob).source in {by[0].peer_id, by[1].peer_id}
    assert observed(out) == {(tr.DONE, by[0].peer_id), (tr.DONE, by[1].peer_id)}
    out = fetch_all(m, out, NOW + 700)
    assert m.state is TaskState.DONE
    res = record(out, act.TaskResultRecord).result
    assert [o["name"] for o in res["outputs"]] == ["shard-0/out"]
    assert res["replicas"] == [
        {"shard": 0, "copies": [0, 1], "agreed": sorted([by[0].peer_id, by[1].peer_id]), "disagreed": []}
    ]


def test_a_disagreement_adds_a_copy_and_the_majority_wins() -> None:
    m, award = replicated()
    by = copies(award)
    deliver(m, result(by[0], 0, NOW + 500, rnd=0), NOW + 500)
    wrong = {"out": {"sha256": WRONG, "size": 5}}
    out = deliver(m, result(by[1], 1, NOW + 600, rnd=0, outputs=wrong), NOW + 600)
    # No majority of two: a re-award adds copy 2 on the third bidder, checkable by receivers.
    assert not of(out, act.FetchBlob) and act.Count(name="tasks.replicas_added") in out
    grown = assert_award_checks(m, 1)
    third = next(a for a in grown.assignments if a["shard"] == 2)
    assert third["of"] == 0 and third["peer_id"] == W[2].peer_id
    assert one(out, act.Publish).signed is m.awards[1]
    out = deliver(m, result(W[2], 2, NOW + 900, rnd=0, epoch=1), NOW + 900)
    assert observed(out) == {(tr.DONE, by[0].peer_id), (tr.DONE, W[2].peer_id), (tr.DISAGREED, by[1].peer_id)}
    f = one(out, act.FetchBlob)
    assert f.digest == SHA and f.source != by[1].peer_id  # never fetched from the losing side
    out = fetch_all(m, out, NOW + 1_000)
    assert m.state is TaskState.DONE
    res = record(out, act.TaskResultRecord).result
    assert res["outputs"] == [{"name": "shard-0/out", "sha256": SHA, "size": 5}]
    assert res["replicas"][0]["disagreed"] == [by[1].peer_id]


def test_no_peer_left_for_another_copy_fails_the_task_saying_why() -> None:
    m, award = replicated(bidders=(W[0], W[1]))
    by = copies(award)
    deliver(m, result(by[0], 0, NOW + 500, rnd=0), NOW + 500)
    out = deliver(
        m, result(by[1], 1, NOW + 600, rnd=0, outputs={"out": {"sha256": WRONG, "size": 5}}), NOW + 600
    )
    assert m.state is TaskState.FAILED
    final = record(out, act.TaskState)
    assert final.reason == "replicas_disagree" and "no other peer" in final.message


def test_copies_stop_at_two_replicas_plus_one() -> None:
    m, award = replicated(bidders=tuple(W))
    assert m.max_copies() == 5
    by = copies(award)
    at = NOW + 500
    deliver(m, result(by[0], 0, at, rnd=0), at)
    deliver(m, result(by[1], 1, at, rnd=0, outputs={"out": {"sha256": WRONG, "size": 5}}), at)
    third = next(a for a in m.latest_award().assignments if a["shard"] == 2)  # type: ignore[union-attr]
    out = deliver(
        m,
        result(
            BY_ID[third["peer_id"]], 2, at, rnd=0, epoch=1, outputs={"out": {"sha256": "77" * 32, "size": 5}}
        ),
        at,
    )
    # Three peers, three outputs: a fourth copy, on the last bidder.
    fourth = next(a for a in m.latest_award().assignments if a["shard"] == 3)  # type: ignore[union-attr]
    assert act.Count(name="tasks.replicas_added") in out and len(assert_award_checks(m, 2).assignments) == 4
    out = deliver(
        m,
        result(
            BY_ID[fourth["peer_id"]], 3, at, rnd=0, epoch=2, outputs={"out": {"sha256": "88" * 32, "size": 5}}
        ),
        at,
    )
    # Four bidders, all taken: no fifth copy can go anywhere.
    assert m.state is TaskState.FAILED and record(out, act.TaskState).reason == "replicas_disagree"


def test_a_failed_copy_moves_like_any_failed_shard() -> None:
    m, award = replicated()
    by = copies(award)
    out = deliver(m, result(by[1], 1, NOW + 500, rnd=0, ok=False), NOW + 500)
    moved = assert_award_checks(m, 1)
    copy = next(a for a in moved.assignments if a["shard"] == 1)
    assert copy["peer_id"] == W[2].peer_id and copy["of"] == 0
    assert by[1].peer_id in moved.excluded and m.state is TaskState.RUNNING
    assert (tr.FAILED, by[1].peer_id) in observed(out)


def test_reassign_never_puts_two_copies_of_one_work_on_a_peer() -> None:
    a, b, c = (w.peer_id for w in W[:3])
    shards = [
        {"shard": 0, "peer_id": a, "share": 1.0, "inputs": {}},
        {"shard": 1, "peer_id": b, "share": 1.0, "inputs": {}, "of": 0},
    ]
    # b is lost; the cheapest bidder is a, but a holds the other copy: c takes it.
    moved = reassign(shards, {b}, [(a, 0.0), (c, 5.0)], task_id=TASK)
    assert moved[1]["peer_id"] == c and moved[1]["of"] == 0
    assert reassign(shards, {b}, [(a, 0.0)], task_id=TASK) == []
    assert add_replicas(shards, [0], [Ranked(a, 10.0, 0.0), Ranked(b, 10.0, 0.0)], demand=1.0) is None
    # A copy goes to a peer whose C covers its part of R before a spare but weaker one.
    ranking = [Ranked(c, 1.0, 0.0), Ranked(b, 50.0, 9.0)]
    grown = add_replicas(shards[:1], [0], ranking, demand=20.0)
    assert grown is not None and grown[1]["peer_id"] == b
    grown = add_replicas(shards[:1], [0], ranking, demand=0.5)  # both cover it: the cheaper
    assert grown is not None and grown[1]["peer_id"] == c


def test_a_forged_replica_placement_is_refused() -> None:
    m, award = replicated()
    signed = m.awards[0]
    shards = [dict(a) for a in award.assignments]
    shards[1]["peer_id"] = shards[0]["peer_id"]  # both copies on one peer: they would agree
    forged = SUB.seal(
        Award,
        now_ms=NOW,
        ttl_ms=10**6,
        **{
            **{k: v for k, v in award.to_wire().items() if k not in ("seq", "issued_at", "expires_at")},
            "assignments": shards,
        },
    )
    assert isinstance(forged.message, Award)
    with pytest.raises(RemoteProtocolError, match="replica"):
        check_award(m.announce, forged.message, SUB.peer_id, SUB.peer_id, open_quoted_bids(award))
    assert isinstance(signed, Signed)


def test_a_restored_machine_keeps_the_copies() -> None:
    m, award = replicated()
    by = copies(award)
    r0 = result(by[0], 0, NOW + 500, rnd=0)
    deliver(m, r0, NOW + 500)

    back = TaskMachine(
        m.announce_signed,
        sealer=SUB,
        times=TIMES,
        restored=Restored(
            public_state="running", bids=tuple(m.bids.values()), awards=(m.awards[0],), results=(r0,)
        ),
    )
    back.handle(ev.Start(now_ms=NOW + 600))
    out = deliver(back, result(by[1], 1, NOW + 700, rnd=0), NOW + 700)
    assert of(out, act.FetchBlob)  # both copies count: the quorum is reached


# -- spot-check ------------------------------------------------------------------------------------


def salt_drawing(n: int, fraction: float, want: list[int]) -> bytes:
    """A salt whose draw over n shards is exactly ``want`` (searched, bounded)."""
    for i in range(10_000):
        salt = i.to_bytes(32, "big")
        if spot_checked(TASK, salt, n, fraction) == want:
            return salt
    raise AssertionError(f"no salt draws {want} in 10,000 tries")


def spot(salt: bytes, fraction: float = 0.5, **over: Any) -> tuple[TaskMachine, Award]:
    ann = announce(verify={"mode": "spot-check", "fraction": fraction, "commit": spot_commit(salt)}, **over)
    m = TaskMachine(ann, sealer=SUB, times=TIMES, spot_salt=salt)
    m.handle(ev.Start(now_ms=NOW))
    for w in (W[0], W[1], W[2]):
        deliver(m, bid(w), NOW + 10)
    m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    return m, assert_award_checks(m, 0)


def test_the_draw_is_a_function_of_the_salt_and_near_its_fraction() -> None:
    drawn = [len(spot_checked(TASK, i.to_bytes(4, "big"), 10, 0.2)) for i in range(500)]
    assert 0.15 < sum(drawn) / (500 * 10) < 0.25
    assert spot_checked(TASK, b"x", 10, 0.2) == spot_checked(TASK, b"x", 10, 0.2)
    assert spot_checked(TASK, b"x", 10, 1.0) == list(range(10))


def test_a_spot_checked_task_needs_its_salt() -> None:
    ann = announce(verify={"mode": "spot-check", "fraction": 0.5, "commit": spot_commit(b"s" * 32)})
    with pytest.raises(LocalProtocolError, match="salt"):
        TaskMachine(ann, sealer=SUB, times=TIMES)
    with pytest.raises(LocalProtocolError, match="salt"):
        TaskMachine(ann, sealer=SUB, times=TIMES, spot_salt=b"t" * 32)


def test_an_undrawn_shard_is_believed_and_the_salt_shown() -> None:
    salt = salt_drawing(2, 0.5, [1])
    m, award = spot(salt, max_shards=2, work=30.0, deadline_ms=1000)
    assert len(award.assignments) == 2 and all("of" not in a for a in award.assignments)
    by = copies(award)
    out = deliver(m, result(by[0], 0, NOW + 500, rnd=0), NOW + 500)
    assert not m.awards.get(1)  # shard 0 was not drawn: one copy is enough
    out = deliver(m, result(by[1], 1, NOW + 600, rnd=0), NOW + 600)
    # Shard 1 was drawn: a second copy, on a peer that holds no shard, as receivers check.
    grown = assert_award_checks(m, 1)
    extra = next(a for a in grown.assignments if a["shard"] == 2)
    assert extra["of"] == 1 and extra["peer_id"] == W[2].peer_id
    assert "spot-check: a second copy" in record(out, act.TaskState).message
    out = deliver(m, result(W[2], 2, NOW + 700, rnd=0, epoch=1), NOW + 700)
    out = fetch_all(m, out, NOW + 800)
    assert m.state is TaskState.DONE
    res = record(out, act.TaskResultRecord).result
    assert res["spot"] == {"salt": salt.hex(), "checked": [1]}
    assert [q["agreed"] for q in res["replicas"]] == [[by[0].peer_id], sorted([by[1].peer_id, W[2].peer_id])]


def test_a_drawn_shard_that_lied_is_outvoted() -> None:
    salt = salt_drawing(1, 0.5, [0])
    m, award = spot(salt)
    by = copies(award)
    wrong = {"out": {"sha256": WRONG, "size": 5}}
    deliver(m, result(by[0], 0, NOW + 500, rnd=0, outputs=wrong), NOW + 500)
    second = next(a for a in m.latest_award().assignments if a["shard"] == 1)  # type: ignore[union-attr]
    out = deliver(m, result(BY_ID[second["peer_id"]], 1, NOW + 600, rnd=0, epoch=1), NOW + 600)
    assert act.Count(name="tasks.replicas_added") in out  # 1 against 1: a third copy
    third = next(a for a in m.latest_award().assignments if a["shard"] == 2)  # type: ignore[union-attr]
    out = deliver(m, result(BY_ID[third["peer_id"]], 2, NOW + 700, rnd=0, epoch=2), NOW + 700)
    assert (tr.DISAGREED, by[0].peer_id) in observed(out)
    out = fetch_all(m, out, NOW + 800)
    res = record(out, act.TaskResultRecord).result
    assert res["outputs"][0]["sha256"] == SHA and res["replicas"][0]["disagreed"] == [by[0].peer_id]


def test_a_peers_first_result_for_a_copy_is_final() -> None:
    m, award = replicated()
    by = copies(award)
    deliver(m, result(by[0], 0, NOW + 500, rnd=0), NOW + 500)
    deliver(m, result(by[1], 1, NOW + 600, rnd=0, outputs={"out": {"sha256": WRONG, "size": 5}}), NOW + 600)
    # Having seen the others' hashes (results are gossiped), the liar re-commits the honest one:
    # too late, its first result counts and it is outvoted by the added copy.
    deliver(m, result(by[1], 1, NOW + 650, rnd=0), NOW + 650)
    out = deliver(m, result(W[2], 2, NOW + 900, rnd=0, epoch=1), NOW + 900)
    assert (tr.DISAGREED, by[1].peer_id) in observed(out)


def test_idle_bidders_take_copies_by_their_capped_capacity_first() -> None:
    # Every idle peer costs 0: the larger C (capped by trust) goes first, so a peer outvoted
    # before (its cap fallen) comes after those that delivered, whatever its claim.
    def scored(peer: str, capacity: float) -> ScoredBid:
        return ScoredBid(peer, c0=capacity, load=0.0, delta_c=0.0, capacity=capacity, cost=0.0)

    bids = [scored("liar", 4.0), scored("h1", 20.0), scored("h2", 30.0)]
    assert [r.peer_id for r in replica_ranking(TASK, bids)] == ["h2", "h1", "liar"]
    assert [r.peer_id for r in replica_ranking(TASK, bids, excluded=["h2"])] == ["h1", "liar"]
