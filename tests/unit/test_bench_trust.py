"""The trust benchmark's pure parts (scripts/benchmarks/trust.py): reading task events into
awards and faults, the liar's share of the first tasks, extra times, rates and verdicts.

The event texts are the daemon's own (protocol/machines/task.py ``_seal_award0``,
``_reaward``, ``_award0``), so a change of wording there shows here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from scripts.benchmarks.trust import (
    Award,
    Outcome,
    awarded_in,
    backup_delay,
    counts,
    epoch0_cap,
    extra_times,
    fault_peers,
    heartbeat_check,
    hold_limit_s,
    liar_share,
    outcome_of,
    rate,
    ratio_check,
    share_checks,
    short,
)

LIAR = "LiarLiar"
A, B = "HonestAa", "HonestBb"
SHORTS = [LIAR, A, B]


def test_awards_are_read_from_the_first_award_and_from_moves() -> None:
    assert awarded_in(f"awarded 1 shard(s) to {LIAR}") == [LIAR]
    assert awarded_in(f"awarded 2 shard(s) to {A}, {B} (under capacity: no set of bids covers R)") == [A, B]
    assert awarded_in(f"lease lost by {LIAR}; re-awarded shard 0 → {A}") == [A]
    assert awarded_in(f"shard failed on {LIAR} (overdue); re-awarded shard 0 → {A}, shard 1 → {B}") == [A, B]
    assert awarded_in(f"copies disagree; one more copy of shard 0 → {B}") == [B]
    assert awarded_in("lost 1 peer(s); asking for fresh bids") == []
    assert awarded_in(f"C of {LIAR} capped: no history: probation floor: 12 GFLOP/s") == []


def test_faults_name_the_blamed_holder_only() -> None:
    assert fault_peers(f"lease lost by {LIAR}; re-awarded shard 0 → {A}", SHORTS) == [LIAR]
    assert fault_peers(
        f"shard failed on {LIAR} (overdue (no result after 3× its expected time)); re-awarded shard 0 → {A}",
        SHORTS,
    ) == [LIAR]
    # The new holder of a move is not at fault; a cap note restates history; awards blame nobody.
    assert A not in fault_peers(f"lease lost by {LIAR}; re-awarded shard 0 → {A}", SHORTS)
    assert (
        fault_peers(f"C of {LIAR} capped: × 0.67 (trust 0.33: failed before delivering): 5 GFLOP/s", SHORTS)
        == []
    )
    assert fault_peers(f"awarded 1 shard(s) to {LIAR}", SHORTS) == []
    assert fault_peers(f"shard 0: replicas disagree; {LIAR} in the minority", SHORTS) == [LIAR]
    assert fault_peers("done", SHORTS) == []
    # A disagreement names the new copy's holder, who is not at fault.
    assert fault_peers(f"copies disagree; one more copy of shard 0 → {B}", SHORTS) == []


def _task(events: list[tuple[float, str, str]], holder: str, state: str = "done") -> dict[str, Any]:
    return {
        "task_id": "t",
        "state": state,
        "reason": None,
        "updated_at": events[-1][0],
        "events": [{"at": at, "state": st, "message": msg} for at, st, msg in events],
        "shards": [{"peer_id": "12D3Koo" + holder, "epoch": 1}],
    }


def test_an_outcome_reads_awards_faults_and_done_time_from_task_get() -> None:
    task = _task(
        [
            (100.0, "pending", "submitted"),
            (101.0, "running", f"awarded 1 shard(s) to {LIAR}"),
            (108.0, "running", f"lease lost by {LIAR}; re-awarded shard 0 → {A}"),
            (108.5, "done", "all shards done"),
        ],
        A,
    )
    o = outcome_of(3, 99.9, task, SHORTS)
    assert [(a.at, a.peer) for a in o.awards] == [(101.0, LIAR), (108.0, A)]
    assert o.faults == [(108.0, LIAR)]
    assert o.done_at == 108.5 and o.index == 3 and o.state == "done"
    # A final holder no event names is still counted as awarded (time unknown).
    o2 = outcome_of(0, 99.0, _task([(100.0, "done", "done")], B), SHORTS)
    assert o2.awards == [Award(None, B)]


def test_a_replicated_outcome_blames_the_losing_copies_when_they_disagreed() -> None:
    task = {
        "task_id": "t",
        "state": "done",
        "updated_at": 105.0,
        "events": [
            {"at": 101.0, "state": "running", "message": f"awarded 2 shard(s) to {A}, {LIAR}"},
            {"at": 102.5, "state": "running", "message": f"copies disagree; one more copy of shard 0 → {B}"},
            {"at": 104.0, "state": "done", "message": "1 shard result(s) received, each agreed by ≥ 2 peers"},
        ],
        "result": {
            "outputs": [],
            "replicas": [
                {
                    "shard": 0,
                    "copies": [0, 1, 2],
                    "agreed": ["12D3" + A, "12D3" + B],
                    "disagreed": ["12D3" + LIAR],
                }
            ],
        },
        "shards": [{"peer_id": "12D3" + p, "epoch": 1} for p in (A, LIAR, B)],
    }
    o = outcome_of(0, 100.0, task, SHORTS)
    assert [a.peer for a in o.awards] == [A, LIAR, B]
    assert o.faults == [(102.5, LIAR)]
    assert liar_share([o], LIAR).first_fault_at == 102.5


def _o(
    i: int, awards: list[tuple[float, str]], faults: Sequence[tuple[float, str]] = (), **kw: Any
) -> Outcome:
    return Outcome(
        index=i,
        task_id=f"t{i}",
        state=kw.pop("state", "done"),
        submitted_at=float(i),
        awards=[Award(at, p) for at, p in awards],
        faults=list(faults),
        **kw,
    )


def test_the_liar_share_counts_first_awards_up_to_its_first_fault() -> None:
    outcomes = [
        _o(0, [(1.0, LIAR), (8.0, A)], [(8.0, LIAR)]),
        _o(1, [(2.0, LIAR), (9.0, B)], [(9.0, LIAR)]),
        _o(2, [(3.0, A)]),
        _o(3, [(4.0, B)]),
        _o(4, [(10.0, A)]),  # awarded after the first fault: not a first task
        _o(5, [(11.0, LIAR)]),  # a win after its first fault
    ]
    s = liar_share(outcomes, LIAR)
    assert s.first_fault_at == 8.0 and s.first_fault_task == 0
    assert s.won == (0, 1, 5) and s.won_first == (0, 1, 5)
    assert (s.first_wins, s.first_tasks) == (2, 4) and s.share == 0.5
    assert s.wins_after == (5,) and s.after_but_older == (5,)  # task 5 was submitted at 5.0 s
    first, after = share_checks("cold", s, 0.25)
    assert first.met is False and "2/4" in first.value
    assert after.met is False and after.value == "1 (tasks 5; 1 submitted before the fault)"
    # Capped to its share, and nothing after: both met.
    fine = liar_share([*outcomes[:4], _o(4, [(10.0, A)])], LIAR)
    assert fine.share == 0.5  # still 2 of 4 first tasks
    first, after = share_checks("cold", fine, 0.5)
    assert first.met is True and after.met is True


def test_a_liar_never_caught_is_judged_over_every_task() -> None:
    outcomes = [_o(i, [(float(i), A if i % 4 else LIAR)]) for i in range(8)]
    s = liar_share(outcomes, LIAR)
    assert s.first_fault_at is None and s.first_tasks == 8 and s.first_wins == 2
    first, after = share_checks("warm", s, 0.25)
    assert first.met is True and after.met is None and after.value == "no fault detected"
    assert liar_share(outcomes, "Nobody12").share == 0.0
    assert math.isnan(liar_share([], LIAR).share)


def test_a_move_to_the_liar_after_its_fault_counts_as_a_win_after() -> None:
    outcomes = [
        _o(0, [(1.0, LIAR), (7.0, A)], [(7.0, LIAR)]),
        _o(1, [(2.0, A), (12.0, LIAR)], [(12.0, A)]),  # a backup handed to the liar later
    ]
    s = liar_share(outcomes, LIAR)
    assert s.wins_after == (1,) and s.won == (0, 1) and s.won_first == (0,)
    late = liar_share([outcomes[0], _o(9, [(12.0, LIAR)])], LIAR)  # submitted at 9.0 s, after the fault
    assert late.wins_after == (9,) and late.after_but_older == ()


def test_hold_limit_follows_spec_7_6() -> None:
    # backup_after × expected when it is the largest term…
    assert hold_limit_s(3.0, 3.0, 1.0, 120.0, 6.0) == pytest.approx(9.0)
    # … else the floor min(backup_min, D / (1 + backup_after)) …
    assert hold_limit_s(0.001, 3.0, 60.0, 120.0, 6.0) == pytest.approx(30.0)
    assert hold_limit_s(0.001, 3.0, 20.0, 120.0, 6.0) == pytest.approx(20.0)
    # … and never less than one lease TTL.
    assert hold_limit_s(0.001, 3.0, 1.0, 120.0, 6.0) == pytest.approx(6.001)


def test_extra_time_is_against_the_median_award_to_done_of_the_holders_that_delivered() -> None:
    outcomes = [
        _o(0, [(0.0, LIAR), (9.0, A)], done_at=9.5),  # the backup delivered 0.5 s after its award
        _o(1, [(1.0, A)], done_at=1.4),
        _o(2, [(2.0, B)], done_at=2.6),
        _o(3, [(3.0, A)], done_at=3.5),
        _o(4, [(4.0, LIAR), (14.0, B)], done_at=14.7),
        _o(5, [(5.0, LIAR)], state="failed"),  # never done: no extra time to measure
    ]
    base, extras = extra_times(outcomes, LIAR)
    assert base == pytest.approx(0.5)  # median of 0.5, 0.4, 0.6, 0.5, 0.7
    assert extras == [(0, pytest.approx(9.0)), (4, pytest.approx(10.2))]
    check = heartbeat_check(extras, 3.0)
    assert check.met is False and check.value.startswith("3.40")
    assert heartbeat_check([(0, 8.9)], 3.0).met is True
    assert heartbeat_check([], 3.0).met is None
    assert backup_delay(outcomes[0]) == pytest.approx(9.0) and backup_delay(outcomes[1]) is None
    # Every task held by the liar first: the backups alone give the baseline.
    base, extras = extra_times([outcomes[0], outcomes[4]], LIAR)
    assert base == pytest.approx(0.6) and extras == [(0, pytest.approx(8.9)), (4, pytest.approx(10.1))]


def test_rate_counts_done_tasks_from_first_submit_to_last_done() -> None:
    outcomes = [_o(i, [(float(i), A)], done_at=10.0 + i) for i in range(4)] + [_o(4, [], state="failed")]
    assert rate(outcomes) == pytest.approx(4 / 13.0)
    assert math.isnan(rate([]))
    assert counts(outcomes) == {"done": 4, "failed": 1, "cancelled": 0, "unfinished": 0}
    assert counts([_o(0, [], state="running")])["unfinished"] == 1


def test_replication_ratio_budget() -> None:
    assert ratio_check(10.0, 5.0).met is True  # 2.0×
    assert ratio_check(10.0, 4.0).met is False  # 2.5×
    assert ratio_check(10.0, 0.0).met is None


def test_the_epoch0_cap_is_read_from_its_event() -> None:
    task = {
        "events": [
            {
                "at": 1.0,
                "state": "bidding",
                "message": f"C of {A} capped: its claim × reliability 1.00: 9 GFLOP/s",
            },
            {
                "at": 1.0,
                "state": "bidding",
                "message": f"C of {LIAR} capped: no history: 1 new peer(s) share at most 25% of R"
                ": 3.125 GFLOP/s",
            },
        ]
    }
    assert epoch0_cap(task, LIAR) == pytest.approx(3.125)
    assert epoch0_cap({"events": []}, LIAR) is None
    assert short("12D3KooWabcdefgh") == "abcdefgh"
