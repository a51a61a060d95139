"""protocol/trust.py: observed capacity, decay, probation (docs/allocation.md "Caps")."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.allocation import Candidate, NetworkParams, choose
from protocol.errors import LocalProtocolError
from protocol.trust import (
    DONE,
    FAILED,
    OUTCOMES,
    TIMED_OUT,
    PeerRecord,
    TrustPolicy,
    banned,
    caps_for,
    decay,
    delivered_capacity,
    effective,
    has_history,
    observe,
    probation_cap,
    shown_capacity,
    trust,
)

POLICY = TrustPolicy(probation_share=0.25, probation_floor=10.0, ban_threshold=0.2, half_life_ms=1000)
DAY = 86_400_000


def _shown(peer: str, capacity: float, done: float = 1.0, bad: float = 0.0) -> PeerRecord:
    return PeerRecord(peer, done=done, failed=bad, shown=capacity)


# --- single rules -------------------------------------------------------------------------------


def test_delivered_capacity_is_work_over_wall_time() -> None:
    assert delivered_capacity(50.0, 2_000) == 25.0
    assert delivered_capacity(0.0, 1_000) is None
    assert delivered_capacity(5.0, 0) is None
    assert delivered_capacity(math.nan, 10) is None
    assert delivered_capacity(1e12, 1) == 1e6  # bounded like a bid's C⁰


def test_decay_halves_counts_per_half_life_and_keeps_shown() -> None:
    r = PeerRecord("p", done=4.0, failed=2.0, timed_out=8.0, disagreed=1.0, shown=7.0, updated_ms=1000)
    d = decay(r, 2000, POLICY)
    assert (d.done, d.failed, d.timed_out, d.disagreed) == (2.0, 1.0, 4.0, 0.5)
    assert d.shown == 7.0 and d.updated_ms == 2000
    assert decay(r, 500, POLICY) == r  # never backwards
    assert decay(r, 1000, POLICY) == r


def test_observe_counts_and_starts_then_moves_the_ewma() -> None:
    r = PeerRecord("p")
    r = observe(r, DONE, 0, POLICY, delivered=100.0)
    assert r.done == 1.0 and r.shown == 100.0
    r = observe(r, DONE, 0, POLICY, delivered=10.0)
    assert r.done == 2.0 and r.shown == pytest.approx(0.3 * 10 + 0.7 * 100)
    r = observe(r, FAILED, 0, POLICY)
    r = observe(r, TIMED_OUT, 0, POLICY)
    assert (r.failed, r.timed_out, r.shown) == (1.0, 1.0, pytest.approx(73.0))
    with pytest.raises(LocalProtocolError):
        observe(r, "lied", 0, POLICY)


def test_observe_decays_before_counting() -> None:
    r = observe(PeerRecord("p", failed=4.0, updated_ms=0), FAILED, 1000, POLICY)
    assert r.failed == 3.0 and r.updated_ms == 1000


def test_a_failure_without_measure_gives_no_history() -> None:
    r = observe(PeerRecord("p"), FAILED, 0, POLICY)
    assert not has_history(r) and shown_capacity(r) is None


def test_trust_and_ban() -> None:
    assert trust(PeerRecord("p")) == 0.5
    assert trust(PeerRecord("p", done=8.0)) == 0.9
    liar = PeerRecord("p", timed_out=4.0)
    assert trust(liar) == pytest.approx(1 / 6) and banned(liar, POLICY)
    assert not banned(PeerRecord("p", timed_out=2.0), POLICY)  # 1/4 >= 0.2
    assert not banned(liar, TrustPolicy(ban_threshold=0.0))
    assert not banned(None, POLICY)


def test_shown_capacity_is_discounted_by_reliability() -> None:
    assert shown_capacity(_shown("p", 100.0, done=3.0, bad=1.0)) == 75.0


def test_effective_is_the_lesser() -> None:
    assert effective(1e6, 20.0) == 20.0 and effective(5.0, 20.0) == 5.0 and effective(5.0, None) == 5.0


def test_probation_cap_is_the_median_or_the_floor() -> None:
    assert probation_cap([], POLICY) == 10.0
    recs = [_shown("a", 10.0), _shown("b", 30.0), _shown("c", 50.0), PeerRecord("d", failed=1.0)]
    assert probation_cap(recs, POLICY) == 30.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"probation_share": 1.5},
        {"probation_floor": 0.0},
        {"probation_floor": math.inf},
        {"ban_threshold": 1.0},
        {"half_life_ms": 0},
        {"ewma_alpha": 0.0},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        TrustPolicy(**kwargs)  # type: ignore[arg-type]


# --- caps for an award --------------------------------------------------------------------------


def test_a_liar_with_no_history_is_capped_at_its_probation_share() -> None:
    # Three honest peers have shown 20 GFLOP/s each; a stranger claims 10⁶.
    records = {p: _shown(p, 20.0) for p in ("h1", "h2", "h3")}
    bids = {"h1": 25.0, "h2": 25.0, "h3": 25.0, "liar": 1e6}
    d = caps_for(bids, records, demand=40.0, policy=POLICY)
    # Per-peer probation cap 20 (the median), probation budget 0.25 · 40 = 10: the liar gets 10.
    assert d.caps == {"h1": 20.0, "h2": 20.0, "h3": 20.0, "liar": 10.0}
    assert d.probation == {"liar"}
    assert "25%" in d.why["liar"]


def test_new_peers_get_what_peers_with_history_cannot_cover() -> None:
    records = {"h1": _shown("h1", 20.0)}
    bids = {"h1": 25.0, "n1": 100.0, "n2": 100.0}
    d = caps_for(bids, records, demand=100.0, policy=POLICY)
    # History covers 20 of 100: the 80 missing are split between the two new peers, but the
    # per-peer probation cap (the median, 20) still holds.
    assert d.caps["n1"] == d.caps["n2"] == 20.0
    d = caps_for(bids, {"h1": _shown("h1", 20.0), "x": _shown("x", 90.0)}, demand=100.0, policy=POLICY)
    assert d.caps["n1"] == d.caps["n2"] == pytest.approx(40.0)  # median 55 of {20, 90}; budget 80 / 2


def test_nobody_has_history_uses_the_floor_and_no_group_bound() -> None:
    d = caps_for({"a": 100.0, "b": 50.0, "c": 60.0}, {}, demand=1000.0, policy=POLICY)
    assert d.caps == {"a": 10.0, "b": 10.0, "c": 10.0}  # the floor (10) is below the middle claim
    assert "no peer has history" in d.why["a"]
    d = caps_for({"a": 100.0, "b": 5.0}, {}, demand=1000.0, policy=POLICY)
    assert d.caps == {"a": 5.0}  # b's claim is the lower middle: not capped, not listed


def test_a_new_peer_that_failed_before_delivering_is_capped_lower_with_each_failure() -> None:
    caps = []
    rec = PeerRecord("liar")
    for _ in range(4):
        d = caps_for({"h": 25.0, "liar": 1e6}, {"h": _shown("h", 20.0), "liar": rec}, 20.0, POLICY)
        caps.append(d.caps["liar"])
        rec = observe(rec, TIMED_OUT, 0, POLICY)
    assert caps[0] == 5.0  # 0.25 · 20, a stranger
    assert all(a > b for a, b in itertools.pairwise(caps))
    assert caps[1] == pytest.approx(5.0 * 2 / 3)
    assert (
        "failed before delivering"
        in caps_for({"h": 25.0, "liar": 1e6}, {"h": _shown("h", 20.0), "liar": rec}, 20.0, POLICY).why["liar"]
    )


def test_short_shards_are_not_measured() -> None:
    assert delivered_capacity(1.0, 500, min_wall_ms=10_000) is None
    assert delivered_capacity(100.0, 20_000, min_wall_ms=10_000) == 5.0


def test_a_peer_that_delivered_unmeasured_has_history_and_keeps_its_claim_times_reliability() -> None:
    rec = PeerRecord("h", done=3.0, failed=1.0)  # no measurement: every shard was short
    assert has_history(rec) and shown_capacity(rec) is None
    d = caps_for({"h": 40.0, "liar": 1e6}, {"h": rec}, demand=20.0, policy=POLICY)
    assert d.caps["h"] == 30.0  # 40 × 3/4
    assert d.caps["liar"] == 5.0  # 0.25 · 20: the others cover R
    assert "not measured" in d.why["h"]


def test_probation_off_believes_new_peers_but_still_caps_history() -> None:
    off = TrustPolicy(probation=False)
    assert caps_for({"liar": 5e5, "a": 3.0}, {}, demand=1e5, policy=off).caps == {}
    d = caps_for({"h": 25.0, "new": 1e6}, {"h": _shown("h", 20.0)}, demand=20.0, policy=off)
    assert d.caps == {"h": 20.0}


def test_a_fresh_network_caps_every_claim_at_the_bidders_middle_one() -> None:
    # Nobody has history: the largest lie buys nothing over the (lower) middle claim, so it
    # ties with an honest peer instead of taking every task (bench trust, cold start).
    d = caps_for({"liar": 5e5, "a": 3.0, "b": 4.0}, {}, demand=1e5, policy=TrustPolicy())
    assert d.caps == {"liar": 4.0}
    assert caps_for({"liar": 5e5, "a": 3.0}, {}, demand=1e5, policy=TrustPolicy()).caps == {"liar": 3.0}
    assert caps_for({"a": 3.0}, {}, demand=1e5, policy=TrustPolicy()).caps == {}


def test_a_peer_that_showed_more_than_it_claims_is_not_capped() -> None:
    d = caps_for({"a": 10.0}, {"a": _shown("a", 50.0)}, demand=5.0, policy=POLICY)
    assert d.caps == {}


# --- properties ---------------------------------------------------------------------------------

_cap = st.floats(0.5, 1e6, allow_nan=False)
_peers = st.lists(st.sampled_from([f"p{i}" for i in range(10)]), min_size=1, max_size=10, unique=True)


@st.composite
def _market(draw: st.DrawFn) -> tuple[dict[str, float], dict[str, PeerRecord], float, TrustPolicy]:
    peers = draw(_peers)
    bids = {p: draw(_cap) for p in peers}
    records: dict[str, PeerRecord] = {}
    for p in [*peers, "x0", "x1"]:
        kind = draw(st.sampled_from(["none", "shown", "bad"]))
        if kind == "shown":
            records[p] = PeerRecord(
                p, done=draw(st.floats(0.1, 50)), failed=draw(st.floats(0, 50)), shown=draw(_cap)
            )
        elif kind == "bad":
            records[p] = PeerRecord(p, failed=draw(st.floats(0.1, 50)))
    demand = draw(st.floats(0.0, 2e6))
    policy = TrustPolicy(probation_share=draw(st.floats(0.0, 1.0)), probation_floor=draw(st.floats(0.1, 1e3)))
    return bids, records, demand, policy


@settings(max_examples=300, deadline=None)
@given(_market())
def test_effective_never_exceeds_advertised(
    m: tuple[dict[str, float], dict[str, PeerRecord], float, TrustPolicy],
) -> None:
    bids, records, demand, policy = m
    d = caps_for(bids, records, demand, policy)
    assert set(d.caps) <= set(bids)
    for p, c in bids.items():
        assert effective(c, d.caps.get(p)) <= c
        assert 0.0 <= d.caps.get(p, c) <= c


@settings(max_examples=300, deadline=None)
@given(_market(), st.integers(1, 6))
def test_probation_share_bound_holds_for_new_peers_together(
    m: tuple[dict[str, float], dict[str, PeerRecord], float, TrustPolicy], max_shards: int
) -> None:
    bids, records, demand, policy = m
    d = caps_for(bids, records, demand, policy)
    award = choose(
        [Candidate(p, c, 0.0) for p, c in bids.items()],
        demand=demand,
        max_shards=max_shards,
        params=NetworkParams(k=0.0),
        caps=d.caps,
    )
    known_cover = sum(effective(bids[p], d.caps.get(p)) for p in bids if p not in d.probation)
    new_c = sum(b.capacity for b in award.scored if b.peer_id in d.probation and b.peer_id in award.chosen)
    if known_cover > 0 and not award.under_capacity:
        # The new peers of the chosen set supply at most the share, or what the others lack.
        budget = max(policy.probation_share * demand, demand - known_cover)
        assert new_c <= budget * (1 + 1e-9) + 1e-9
        if demand - known_cover <= policy.probation_share * demand and award.total_capacity > 0:
            assert new_c / award.total_capacity <= policy.probation_share * (1 + 1e-9) + 1e-12


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0, 100),
    st.floats(0, 100),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(1, 10**8),
)
def test_decay_is_monotone(done: float, failed: float, t1: int, t2: int, half: int) -> None:
    policy = TrustPolicy(half_life_ms=half)
    r = PeerRecord("p", done=done, failed=failed, updated_ms=0)
    a, b = decay(r, min(t1, t2), policy), decay(r, max(t1, t2), policy)
    assert b.done <= a.done <= done and b.failed <= a.failed <= failed
    assert a.done >= 0 and b.failed >= 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(OUTCOMES), max_size=30), st.floats(0.1, 1e5))
def test_good_outcomes_never_lower_trust_and_bad_never_raise(outs: list[str], delivered: float) -> None:
    r = PeerRecord("p")
    for o in outs:
        nxt = observe(r, o, 0, POLICY, delivered=delivered)
        if o == DONE:
            assert trust(nxt) >= trust(r)
        else:
            assert trust(nxt) <= trust(r)
        r = nxt
    assert 0 < trust(r) < 1


def test_a_day_of_silence_fades_a_ban() -> None:
    policy = TrustPolicy(half_life_ms=DAY // 4)
    liar = PeerRecord("p", timed_out=10.0, updated_ms=0)
    assert banned(liar, policy)
    assert not banned(decay(liar, 2 * DAY, policy), policy)
