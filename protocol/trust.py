"""Observed capacity: trust the work, not the claim (docs/allocation.md "Caps", issue 8).

A bid's C⁰ is the bidder's claim. What a submitter has *seen* a peer deliver is its own
evidence: for every shard it finishes, fails, or loses, the submitter records an outcome,
and for a finished shard the capacity it delivered, ``work share × task work / wall time``.
The award then counts each bid for at most what its bidder has shown:

    effective C = min(advertised C, shown capacity)

A peer with no history is on **probation**: its C is capped at the median shown capacity of
the peers with history (or the task's middle claim, at most ``probation_floor``, when nobody
has any), and peers without
history *together* get at most ``probation_share`` of a task's demand R — identities are free
to make, so the bound must hold for all of them at once — unless the peers with history
cannot cover the rest (then the new ones get what is missing: a task nobody else can serve
still runs).

Everything here is pure: frozen dataclasses in, frozen dataclasses out, no I/O and no clock
reads (the caller passes ``now_ms``), so the daemon, the simulator and the tests apply the
same rules. The result of :func:`caps_for` is what the submitter writes into the signed
award's ``caps`` (SPEC §10.2): receivers recompute the award from the quoted bids plus those
caps, and cannot check the caps themselves (they are the submitter's observations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from statistics import median, median_low

from protocol.errors import LocalProtocolError

#: Outcomes a submitter records for a shard (``act.Observe.outcome``).
DONE = "done"  #: a valid result arrived (its wall time gives the delivered capacity)
FAILED = "failed"  #: the result said ``ok = false``
TIMED_OUT = "timed_out"  #: the holder's lease lapsed before a result (lost, re-awarded)
DISAGREED = "disagreed"  #: its output lost a comparison with other replicas
OUTCOMES = (DONE, FAILED, TIMED_OUT, DISAGREED)

#: An awarded cap never exceeds the wire bound of a bid's C⁰ (SPEC §7.4, ``MAX_GFLOPS``).
MAX_CAP = 1e6


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """The ``[policy]`` knobs (docs/config.md) the rules below need."""

    #: Whether peers without history are on probation at all (False: a private network of
    #: the operator's own machines, where a new peer's claim is believed; history still caps).
    probation: bool = True
    #: Most of a task's demand R that peers without history may cover together.
    probation_share: float = 0.25
    #: The most a new bid's C counts for when no peer has history yet (GFLOP/s), on top of
    #: the task's middle claim (``caps_for``); 10⁶: no bound beyond that.
    probation_floor: float = MAX_CAP
    #: A peer whose trust falls below this is banned (its bids refused); 0 never bans.
    ban_threshold: float = 0.2
    #: Counts halve every ``half_life_ms`` without news (old sins fade, so do old merits).
    half_life_ms: int = 7 * 86_400_000
    #: Weight of the newest delivered capacity in the EWMA.
    ewma_alpha: float = 0.3
    #: A finished shard shorter than this counts as done but is not measured: its wall time is
    #: mostly start-up and transfer, and ``work`` is the submitter's estimate (an ``echo`` of
    #: "1 GFLOP" measures latency, not capacity).
    min_measure_ms: int = 10_000

    def __post_init__(self) -> None:
        if not (0.0 <= self.probation_share <= 1.0):
            raise LocalProtocolError("probation_share must be in [0, 1]", reason="bad_policy")
        if not (math.isfinite(self.probation_floor) and 0.0 < self.probation_floor <= MAX_CAP):
            raise LocalProtocolError("probation_floor must be in (0, 1e6]", reason="bad_policy")
        if not (0.0 <= self.ban_threshold < 1.0):
            raise LocalProtocolError("ban_threshold must be in [0, 1)", reason="bad_policy")
        if (
            isinstance(self.half_life_ms, bool)
            or not isinstance(self.half_life_ms, int)
            or self.half_life_ms < 1
        ):
            raise LocalProtocolError("half_life_ms must be an int >= 1", reason="bad_policy")
        if not (0.0 < self.ewma_alpha <= 1.0):
            raise LocalProtocolError("ewma_alpha must be in (0, 1]", reason="bad_policy")
        if (
            isinstance(self.min_measure_ms, bool)
            or not isinstance(self.min_measure_ms, int)
            or self.min_measure_ms < 0
        ):
            raise LocalProtocolError("min_measure_ms must be an int >= 0", reason="bad_policy")


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """What one node has seen one peer do (decayed counts), as of ``updated_ms``.

    ``shown``: EWMA of delivered capacity in GFLOP/s over finished shards; None until the
    first one (the peer has no history)."""

    peer_id: str
    done: float = 0.0
    failed: float = 0.0
    timed_out: float = 0.0
    disagreed: float = 0.0
    shown: float | None = None
    updated_ms: int = 0

    @property
    def bad(self) -> float:
        return self.failed + self.timed_out + self.disagreed


def delivered_capacity(work_gflop: float, wall_ms: int, min_wall_ms: int = 0) -> float | None:
    """GFLOP/s a finished shard delivered: its work over its wall time (None if unmeasurable,
    or shorter than ``min_wall_ms``: ``TrustPolicy.min_measure_ms``)."""
    if not (math.isfinite(work_gflop) and work_gflop > 0) or wall_ms <= 0 or wall_ms < min_wall_ms:
        return None
    return min(work_gflop / (wall_ms / 1000), MAX_CAP)


def decay(rec: PeerRecord, now_ms: int, policy: TrustPolicy) -> PeerRecord:
    """The record as of ``now_ms``: every count × 2^(−Δt / half-life). The clock never runs
    backwards here: an older ``now_ms`` leaves the record as it is. ``shown`` is a rate, not a
    count, and does not decay (only new measurements move it)."""
    dt = now_ms - rec.updated_ms
    if dt <= 0:
        return rec
    f = 0.5 ** (dt / policy.half_life_ms)
    return replace(
        rec,
        done=rec.done * f,
        failed=rec.failed * f,
        timed_out=rec.timed_out * f,
        disagreed=rec.disagreed * f,
        updated_ms=now_ms,
    )


def observe(
    rec: PeerRecord, outcome: str, now_ms: int, policy: TrustPolicy, delivered: float | None = None
) -> PeerRecord:
    """Decay to ``now_ms``, then count one ``outcome``; a ``done`` with a measured ``delivered``
    capacity moves the EWMA (the first measurement starts it)."""
    if outcome not in OUTCOMES:
        raise LocalProtocolError(f"unknown outcome {outcome!r}", reason="bad_outcome")
    r = decay(rec, now_ms, policy)
    r = replace(r, **{outcome: getattr(r, outcome) + 1.0})
    if outcome == DONE and delivered is not None and math.isfinite(delivered) and delivered > 0:
        a = policy.ewma_alpha
        shown = delivered if r.shown is None else a * delivered + (1 - a) * r.shown
        r = replace(r, shown=min(shown, MAX_CAP))
    return r


def trust(rec: PeerRecord) -> float:
    """A score in (0, 1): (done + 1) / (done + bad + 2). A stranger scores 0.5; every good
    outcome raises it, every bad one lowers it (Laplace's rule of succession)."""
    return (rec.done + 1.0) / (rec.done + rec.bad + 2.0)


#: Decayed ``done`` count from which a peer has history: half a shard (one done shard keeps it
#: for one half-life).
MIN_DONE = 0.5


def has_history(rec: PeerRecord | None) -> bool:
    """A peer has history once it has delivered (a valid result), measured or not."""
    return rec is not None and (rec.done >= MIN_DONE or rec.shown is not None)


def reliability(rec: PeerRecord) -> float:
    """The share of its outcomes that were good (1 with none)."""
    total = rec.done + rec.bad
    return rec.done / total if total > 0 else 1.0


def shown_capacity(rec: PeerRecord) -> float | None:
    """What a peer with history has shown, discounted by its reliability: the EWMA × the
    share of its outcomes that were good (a peer that fails half its shards delivers half).
    None when none of its shards was long enough to measure."""
    if rec.shown is None:
        return None
    return rec.shown * reliability(rec)


def banned(rec: PeerRecord | None, policy: TrustPolicy) -> bool:
    """Over the ban threshold: trust below ``ban_threshold`` (0 never bans)."""
    return rec is not None and policy.ban_threshold > 0 and trust(rec) < policy.ban_threshold


def probation_cap(records: Iterable[PeerRecord], policy: TrustPolicy) -> float:
    """The per-peer cap for a peer without history: the median shown capacity of the peers
    with history, or ``probation_floor`` when nobody has any."""
    shown = [c for c in (shown_capacity(r) for r in records) if c is not None and c > 0]
    return min(float(median(shown)), MAX_CAP) if shown else policy.probation_floor


def effective(advertised: float, cap: float | None) -> float:
    """effective C = min(advertised C, cap); no cap leaves the claim as it is."""
    return advertised if cap is None else min(advertised, cap)


@dataclass(frozen=True, slots=True)
class CapDecision:
    """The caps for one award, and why (``peerctl explain``)."""

    caps: Mapping[str, float]  #: peer → cap, only where it binds (cap < advertised C)
    why: Mapping[str, str]  #: peer → the reason of its cap (every capped peer)
    probation: frozenset[str]  #: the bidders without history


def caps_for(
    bids: Mapping[str, float],
    records: Mapping[str, PeerRecord],
    demand: float,
    policy: TrustPolicy,
) -> CapDecision:
    """The caps a submitter applies to a task's bids (``bids``: peer → advertised C, i.e.
    C⁰ + ΔC from the formula; ``records``: every peer it has a record of; ``demand``: R).

    * a peer with history: its :func:`shown_capacity`, or, when no shard of it was long
      enough to measure, its claim × its reliability;
    * a peer without: the :func:`probation_cap`, and, when some bidder has history, at most
      an equal part of the probation budget ``max(probation_share · R, R − Σ C of the peers
      with history)`` — so the new peers of any chosen set that covers R supply at most
      ``probation_share`` of it, unless the others cannot cover the rest; × ``2·trust`` (≤ 1)
      when it has failed without ever delivering (its cap falls with each failure).

    A cap is listed only where it binds (it is below the advertised C): the award stays as
    small as it can, and an unlisted peer's C is its claim.
    """
    new = sorted(p for p in bids if not has_history(records.get(p)))
    known = sorted(p for p in bids if p not in set(new))
    limit: dict[str, float] = {}
    why: dict[str, str] = {}
    for p in known:
        rec = records[p]
        shown = shown_capacity(rec)
        if shown is not None:
            limit[p] = min(shown, MAX_CAP)
            why[p] = f"shown capacity {limit[p]:.6g} GFLOP/s (trust {trust(rec):.2f})"
        else:
            # It delivered, but no shard was long enough to measure: its claim, × reliability.
            limit[p] = min(bids[p] * reliability(rec), MAX_CAP)
            why[p] = (
                f"its claim × reliability {reliability(rec):.2f} (trust {trust(rec):.2f}; not measured yet)"
            )
    if new and policy.probation:
        base = probation_cap(records.values(), policy)
        reason = "no history: probation cap (median shown capacity of peers with history)"
        if not any(has_history(r) for r in records.values()):
            # A fresh network: nobody has shown anything, so no claim is worth more than the
            # middle one of this task's bidders — the largest lie buys nothing over an honest
            # median peer (bench trust: without this a liar won every task until its first
            # fault). ``probation_floor`` bounds it further.
            base = min(policy.probation_floor, float(median_low(bids[p] for p in new)))
            reason = "no history: the middle claim of the task's bidders (no peer has history yet)"
        per_peer = base
        if known:
            covered = sum(effective(bids[p], limit[p]) for p in known)
            # (1 + 1e-12): the float sum covered + budget must still reach R.
            budget = max(policy.probation_share * demand, (demand - covered) * (1 + 1e-12))
            share = budget / len(new)
            if share < per_peer:
                per_peer = share
                reason = (
                    f"no history: {len(new)} new peer(s) share at most"
                    f" {policy.probation_share:.0%} of R (or what peers with history cannot cover)"
                )
        for p in new:
            # A peer with only bad outcomes so far (it never delivered) is still new, but its
            # cap falls with its trust: × 2·trust, 1 for a stranger (trust 0.5), 2/3 after one
            # failure, 1/2 after two… and back towards 1 as its failures decay.
            score = trust(records[p]) if p in records else 0.5
            scale = min(1.0, 2.0 * score)
            limit[p] = max(0.0, min(per_peer * scale, MAX_CAP))
            note = f" × {scale:.2f} (trust {score:.2f}: failed before delivering)" if scale < 1 else ""
            why[p] = f"{reason}{note}: {limit[p]:.6g} GFLOP/s"
    caps = {p: c for p, c in sorted(limit.items()) if c < bids[p]}
    return CapDecision(caps=caps, why={p: why[p] for p in caps}, probation=frozenset(new))


__all__ = [
    "DISAGREED",
    "DONE",
    "FAILED",
    "OUTCOMES",
    "TIMED_OUT",
    "CapDecision",
    "PeerRecord",
    "TrustPolicy",
    "banned",
    "caps_for",
    "decay",
    "delivered_capacity",
    "effective",
    "has_history",
    "observe",
    "probation_cap",
    "shown_capacity",
    "trust",
]
