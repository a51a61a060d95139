"""T_max on the wire (SPEC §10.2): the announce's ``net.t_max``, +∞ when absent.

Every peer recomputes an award from the announce and the quoted bids, so a bound that only the
submitter knew would make its awards fail everyone's check; carried in the announce, all agree.
"""

from __future__ import annotations

import itertools

import pytest

from protocol.awards import allocate, assignments_of, check_award, t_max_of
from protocol.envelope import Signed, Signer, open_envelope
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.messages import Award, Bid, TaskAnnounce

NOW = 1_700_000_000_000
TASK = "ef" * 16
SUBMITTER = Signer(b"\xc8" * 32)
_seq = itertools.count(1)


def announce(net: dict[str, object]) -> TaskAnnounce:
    msg = TaskAnnounce(
        seq=next(_seq),
        issued_at=NOW,
        expires_at=NOW + 600_000,
        task_id=TASK,
        kind="echo",
        work=100.0,
        deadline_ms=1000,
        max_shards=2,
        resources={"gpu": False, "memory_mb": 0},
        aggregation="none",
        rounds=1,
        params={},
        inputs={},
        bid_window_ms=300,
        net=net,
    )
    got = open_envelope(SUBMITTER.seal(msg), kinds=frozenset({"announce"})).message
    assert isinstance(got, TaskAnnounce)
    return got


def bid(n: int, c0: float, load: float) -> Signed:
    msg = Bid(seq=next(_seq), issued_at=NOW, expires_at=NOW + 60_000, task_id=TASK, c0=c0, load=load)
    return open_envelope(Signer(bytes([n]) * 32).seal(msg), kinds=frozenset({"bid"}))


def award_for(ann: TaskAnnounce, bids: list[Signed]) -> Award:
    alloc = allocate(ann, bids)
    return Award(
        seq=next(_seq),
        issued_at=NOW,
        expires_at=NOW + 600_000,
        task_id=TASK,
        epoch=0,
        bids=tuple(b.raw for b in bids),
        assignments=tuple(assignments_of(alloc)),
        under_capacity=alloc.under_capacity,
        excluded=(),
    )


BASE = {"k": 0.2, "dc_min": 0.0, "dc_max": None}


def test_an_award_under_the_announced_t_max_is_what_every_peer_recomputes() -> None:
    bounded = announce({**BASE, "t_max": 50.0})
    unbounded = announce(dict(BASE))
    assert t_max_of(bounded.net) == 50.0 and t_max_of(unbounded.net) == float("inf")
    bids = sorted([bid(1, 100.0, 0.5), bid(2, 60.0, 0.0)], key=lambda b: b.signer)
    award = award_for(bounded, bids)
    assert award.under_capacity  # every covering set costs more than t_max
    check_award(bounded, award, SUBMITTER.peer_id, SUBMITTER.peer_id, bids)
    # The same bids without the bound give another award: the two never pass for each other.
    with pytest.raises(RemoteProtocolError):
        check_award(unbounded, award, SUBMITTER.peer_id, SUBMITTER.peer_id, bids)
    with pytest.raises(RemoteProtocolError):
        check_award(bounded, award_for(unbounded, bids), SUBMITTER.peer_id, SUBMITTER.peer_id, bids)


@pytest.mark.parametrize("t_max", [-1.0, 1e31, float("inf"), "50"])
def test_a_t_max_out_of_range_is_refused(t_max: object) -> None:
    with pytest.raises(ProtocolError):
        announce({**BASE, "t_max": t_max})
