"""The seed's allocation formula and the award rule (seed §4, docs/design.md §4), as pure functions.

Per node *i* (from its signed bid): base capacity ``C0`` (work units per second) and load
``L >= 0``. With network parameters ``k, dc_min, dc_max``::

    ΔC_i = clamp(k · L_i, dc_min, dc_max)        C_i = C0_i + ΔC_i
    R_j  = W_j / D_j                              (a task's demand, work units per second)
    cost_i = C_i · L_i                            T(S) = Σ_{i∈S} cost_i

**Award rule.** Among the candidates, choose the non-empty set S minimising T(S) subject to
Σ_{i∈S} C_i ≥ R, |S| ≤ max_shards and T(S) ≤ t_max; ties go to fewer nodes, then to the
larger Σ C, then to the smallest sorted tuple of H(task_id ‖ peer_id) (not the smallest peer
IDs, which a key generator can grind; docs/simulation.md §4 finding 4). If no set qualifies,
take the max_shards candidates of largest C (ties by H(task_id ‖ peer_id)) and mark the award
``under_capacity``. A submitter may cap a bid's C (``caps``: its shown capacity, or the
probation cap of protocol/trust.py); the capped C is what the rule uses. Shares of the
work are proportional to C within the chosen set.

Every peer must be able to recompute an award bit for bit from the signed bids it lists
(docs/design.md §4), so:

* every per-candidate value is one IEEE-754 double operation (``k*L``, clamp, ``C0+ΔC``,
  ``C*L``), and every sum over a set is a left-to-right sum in ascending peer-ID order
  (Python ``str`` order, which for peer IDs equals byte order);
* the search is *exact* (branch and bound over the combination tree, pruning only where
  that provably cannot lose the optimum), not greedy;
* to keep the exact search bounded whatever bids arrive, the candidate list is first cut to
  :func:`candidate_cap` entries by a fixed, documented ranking (see there).

See docs/allocation.md for the worked example from the seed (§4.3) and its corrected total.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType

from protocol.errors import LocalProtocolError, RemoteProtocolError

#: Hard limit on candidates an award may consider (docs/design.md §4 bid window). A task announced to
#: a large network could draw hundreds of bids; the exact search below must stay bounded, and
#: 64 is far above any max_shards we expect to be useful for one task.
MAX_CANDIDATES = 64

#: Upper bound on the number of candidate sets the exact search may have to visit
#: (Σ_{k=1..min(m,n)} C(n, k)). 2**20 keeps the adversarial worst case (e.g. every bidder at
#: the same load, which turns the rule into subset-sum) around a second of pure Python, while
#: small max_shards still admit all 64 candidates. See :func:`candidate_cap`.
SEARCH_BUDGET = 1 << 20

#: Sanity bounds on a bid. A capacity beyond 1e15 work units/s or a load beyond 1e6 is not a
#: machine, it is an attack on the arithmetic (and would let one bid dominate every sum).
MAX_C0 = 1e15
MAX_LOAD = 1e6
MAX_PEER_ID_LEN = 128

#: Relative slack used ONLY for pruning with bounds that are summed in a non-canonical order.
#: 64 float64 additions err by < 64·2⁻⁵³ ≈ 7e-15 relative; 1e-9 is far above that, so a
#: pruned subtree can never contain the optimum. Final decisions use exact canonical sums.
_SLACK = 1e-9
#: Absolute slack for the cost bound: a C·L product may underflow to a subnormal or zero, an
#: absolute error below 2⁻¹⁰⁷⁴ per term; 1e-300 covers 64 of them with room to spare.
_TINY = 1e-300


@dataclass(frozen=True, slots=True)
class NetworkParams:
    """Network-wide constants of the seed's formula (docs/design.md §4 defaults: 0.2, 0, +∞)."""

    k: float = 0.2
    dc_min: float = 0.0
    dc_max: float = math.inf

    def __post_init__(self) -> None:
        # k and dc_min may be negative (a network may want capacity to shrink with load);
        # they must only keep every ΔC finite and the clamp well defined.
        if not math.isfinite(self.k) or abs(self.k) > 1e9:
            raise LocalProtocolError(f"k must be finite and |k| <= 1e9, got {self.k!r}", reason="bad_params")
        if not math.isfinite(self.dc_min):
            raise LocalProtocolError(f"dc_min must be finite, got {self.dc_min!r}", reason="bad_params")
        if math.isnan(self.dc_max) or self.dc_max == -math.inf:
            raise LocalProtocolError(
                f"dc_max must be a number or +inf, got {self.dc_max!r}", reason="bad_params"
            )
        if self.dc_min > self.dc_max:
            raise LocalProtocolError(
                f"dc_min ({self.dc_min!r}) must be <= dc_max ({self.dc_max!r})", reason="bad_params"
            )


def delta_c(load: float, params: NetworkParams) -> float:
    """ΔC = clamp(k·L, ΔC_min, ΔC_max) (seed §4.2)."""
    return min(max(params.k * load, params.dc_min), params.dc_max)


def effective_capacity(c0: float, load: float, params: NetworkParams) -> float:
    """C = C⁰ + ΔC (seed §4.1)."""
    return c0 + delta_c(load, params)


def demand(work: float, deadline_s: float) -> float:
    """R = W / D, in work units per second (docs/design.md §4)."""
    if not (math.isfinite(work) and work >= 0):
        raise LocalProtocolError(f"work must be finite and >= 0, got {work!r}", reason="bad_demand")
    if not (math.isfinite(deadline_s) and deadline_s > 0):
        raise LocalProtocolError(f"deadline must be finite and > 0, got {deadline_s!r}", reason="bad_demand")
    r = work / deadline_s
    if not math.isfinite(r):
        raise LocalProtocolError(f"demand {work!r}/{deadline_s!r} overflows", reason="bad_demand")
    return r


@dataclass(frozen=True, slots=True)
class Candidate:
    """One bid's inputs to the formula: who, base capacity C⁰ and load L."""

    peer_id: str
    c0: float
    load: float


@dataclass(frozen=True, slots=True)
class ScoredBid:
    """A candidate with every derived value, as ``peerctl explain`` shows it."""

    peer_id: str
    c0: float
    load: float
    delta_c: float
    capacity: float
    cost: float  # C·L, the seed's per-node term of T
    #: The cap the award applied to this bid's C (docs/allocation.md "Caps"), or None.
    #: ``capacity`` is already min(C⁰ + ΔC, cap); ``uncapped`` is C⁰ + ΔC.
    cap: float | None = None
    uncapped: float = 0.0


@dataclass(frozen=True)
class Award:
    demand: float
    max_shards: int
    chosen: tuple[str, ...]  # sorted peer ids
    shares: tuple[float, ...]  # fraction of the work per chosen peer, ∝ C, same order, sums to ~1
    total_capacity: float  # Σ C over chosen, canonical order
    total_cost: float  # T(S) = Σ C·L over chosen, canonical order
    under_capacity: bool  # the rule fell back to "largest C" (no set met every constraint)
    scored: tuple[ScoredBid, ...]  # every candidate given, sorted by peer id
    # peer_id -> why it was / was not chosen. Excluded from hashing (a mapping is unhashable).
    reasons: Mapping[str, str] = field(hash=False)


def validate_candidate(c: Candidate) -> None:
    """Raise RemoteProtocolError(reason="absurd_bid") unless the bid is plausible.

    Callers receiving bids should call this first and drop (and count) failures, so that one
    absurd bid cannot make a whole award fail; :func:`choose` re-checks and raises.
    """
    if not isinstance(c.peer_id, str) or not c.peer_id or len(c.peer_id) > MAX_PEER_ID_LEN:
        raise RemoteProtocolError(f"bad peer id in bid: {c.peer_id!r}", reason="absurd_bid")
    for name, value, hi in (("c0", c.c0, MAX_C0), ("load", c.load, MAX_LOAD)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RemoteProtocolError(f"{name} of {c.peer_id} is not a number", reason="absurd_bid")
        if not math.isfinite(value) or value < 0 or value > hi:
            raise RemoteProtocolError(
                f"{name} of {c.peer_id} = {value!r} is outside [0, {hi:g}]", reason="absurd_bid"
            )
    if c.c0 == 0:
        raise RemoteProtocolError(f"bid of {c.peer_id} offers zero capacity", reason="absurd_bid")


def _score(c: Candidate, params: NetworkParams, limit: float | None = None) -> ScoredBid:
    c0 = float(c.c0)
    load = float(c.load)
    dc = delta_c(load, params)
    raw = c0 + dc
    if not math.isfinite(raw):
        raise LocalProtocolError(f"network params make C of {c.peer_id} non-finite", reason="bad_params")
    # A cap (docs/allocation.md "Caps", SPEC §10.1) bounds C itself, so it bounds the bid's
    # share of the work and its cost C·L alike: one min, then the seed's product.
    cap = raw if limit is None else min(raw, limit)
    return ScoredBid(
        peer_id=c.peer_id,
        c0=c0,
        load=load,
        delta_c=dc,
        capacity=cap,
        cost=cap * load,
        cap=limit,
        uncapped=raw,
    )


def tie_key(task_id: str, peer_id: str) -> bytes:
    """H(task_id ‖ peer_id): SHA-256 of the two ASCII strings concatenated (SPEC §10.2).

    The last tie-break between equal-cost sets. A key generator cannot grind a peer ID that
    wins it for every task, as it could the smallest peer ID (docs/simulation.md §4 finding 4)."""
    return hashlib.sha256((task_id + peer_id).encode("utf-8")).digest()


def check_caps(caps: Mapping[str, float] | None) -> dict[str, float]:
    """The caps as plain floats; LocalProtocolError unless each is finite and >= 0."""
    out: dict[str, float] = {}
    for peer, value in (caps or {}).items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise LocalProtocolError(
                f"cap of {peer!r} must be finite and >= 0, got {value!r}", reason="bad_caps"
            )
        out[peer] = float(value)
    return out


def candidate_cap(max_shards: int) -> int:
    """How many candidates the exact search admits for a given max_shards.

    The largest n <= MAX_CANDIDATES with Σ_{k=1..min(m,n)} C(n,k) <= SEARCH_BUDGET: the number
    of sets the search could visit in the worst case. Gives 64 for m <= 4, 42 for m = 5,
    31 for 6, 23 for 8, 20 for m >= 11.
    """
    m = max_shards
    n = MAX_CANDIDATES
    while n > 1 and sum(math.comb(n, k) for k in range(1, min(m, n) + 1)) > SEARCH_BUDGET:
        n -= 1
    return n


def _keep(eligible: list[ScoredBid], max_shards: int) -> list[ScoredBid]:
    """The deterministic subset that enters the exact search.

    If more than :func:`candidate_cap` bids are eligible, keep (1) the min(max_shards, cap)
    bids of largest C (ties: peer id) — so the cut never turns a coverable task into an
    under-capacity one — then (2) fill up with the lowest loads (ties: larger C, then peer id),
    because a bid's cost per unit of capacity is C·L / C = L: the cheapest bids per work unit
    are exactly the lowest-load ones, the ones an optimal set is made of.
    """
    cap = candidate_cap(max_shards)
    if len(eligible) <= cap:
        return eligible
    by_c = sorted(eligible, key=lambda b: (-b.capacity, b.peer_id))
    kept = {b.peer_id: b for b in by_c[: min(max_shards, cap)]}
    for b in sorted(eligible, key=lambda b: (b.load, -b.capacity, b.peer_id)):
        if len(kept) >= cap:
            break
        kept.setdefault(b.peer_id, b)
    return sorted(kept.values(), key=lambda b: b.peer_id)


def _search(
    bids: Sequence[ScoredBid], r: float, m: int, t_max: float, ties: Sequence[bytes]
) -> tuple[tuple[int, ...], float] | None:
    """Exact branch and bound; returns (indices into bids, T) of the optimum, or None.

    ``bids`` are sorted by peer id. The search walks the combination tree (children of S are
    S ∪ {j} for j > max S, in increasing j), so partial sums along a path are exactly the
    canonical left-to-right sums in peer-id order. A later set replaces the incumbent if it is
    strictly cheaper; or equally cheap with fewer nodes; or equally cheap and as large with a
    larger ΣC; or equal in all three with a smaller sorted tuple of ``ties`` (H(task ‖ peer),
    SPEC §10.2) — so equal-cost sets of the incumbent's size are visited, not pruned.
    """
    n = len(bids)
    caps = [b.capacity for b in bids]
    costs = [b.cost for b in bids]
    loads = [b.load for b in bids]
    # topsum[j][q]: sum of the q largest capacities among indices >= j (an upper bound on what
    # q more nodes can add); min_load[j]: the cheapest price per unit capacity from j on.
    topsum: list[list[float]] = []
    for j in range(n + 1):
        desc = sorted(caps[j:], reverse=True)
        acc = [0.0]
        for q in range(m):
            acc.append(acc[-1] + (desc[q] if q < len(desc) else 0.0))
        topsum.append(acc)
    min_load = [math.inf] * (n + 1)
    for j in range(n - 1, -1, -1):
        min_load[j] = min(loads[j], min_load[j + 1])
    r_lo = r - r * _SLACK

    best: tuple[int, ...] | None = None
    best_cost = math.inf
    best_size = m + 1
    best_cap = -math.inf
    best_ties: tuple[bytes, ...] = ()
    path: list[int] = []

    def visit(start: int, depth: int, cap: float, cost: float) -> None:
        nonlocal best, best_cost, best_size, best_cap, best_ties
        left = m - depth  # nodes that may still be added, >= 1
        for j in range(start, n):
            # topsum[j][left] only shrinks as j grows: once R is out of reach, it stays so.
            if cap + topsum[j][left] < r_lo:
                break
            c2 = cost + costs[j]
            # Exact prunes: adding nodes never lowers a float sum of non-negative terms.
            if c2 > t_max or c2 > best_cost or (c2 == best_cost and depth + 1 > best_size):
                continue
            k2 = cap + caps[j]
            path.append(j)
            if k2 >= r:
                # Feasible. Supersets can only cost as much or more, with more nodes: never
                # descend from here. Equal cost and size: the tie-breaks decide.
                if c2 < best_cost or depth + 1 < best_size:
                    better = True
                elif k2 != best_cap:
                    better = k2 > best_cap
                else:
                    better = tuple(sorted(ties[i] for i in path)) < best_ties
                if better:
                    best, best_cost, best_size = tuple(path), c2, depth + 1
                    best_cap, best_ties = k2, tuple(sorted(ties[i] for i in path))
            elif left > 1 and not (c2 == best_cost and depth + 2 > best_size):
                # Relaxed bounds (slack-protected): every further unit of capacity costs at
                # least min_load, and at most left-1 more nodes can be added.
                lower = c2 + (r - k2) * min_load[j + 1]
                limit = min(best_cost, t_max)
                if lower <= limit + limit * _SLACK + _TINY and k2 + topsum[j + 1][left - 1] >= r_lo:
                    visit(j + 1, depth + 1, k2, c2)
            path.pop()

    if m >= 1 and n >= 1:
        visit(0, 0, 0.0, 0.0)
    return None if best is None else (best, best_cost)


def _fmt(x: float) -> str:
    return f"{x:.10g}"


def choose(
    candidates: Sequence[Candidate],
    *,
    demand: float,
    max_shards: int,
    t_max: float = math.inf,
    params: NetworkParams = NetworkParams(),  # frozen, so a shared default is safe
    caps: Mapping[str, float] | None = None,
    task_id: str = "",
) -> Award:
    """Apply the award rule (docs/design.md §4) to the candidates; a pure, deterministic function.

    ``caps``: peer → the most C the submitter lets that bid count for (its shown capacity, or
    the probation cap; docs/allocation.md "Caps"); a cap for a peer that did not bid changes
    nothing. ``task_id`` seeds the last tie-break, H(task_id ‖ peer_id) (SPEC §10.2).
    Raises RemoteProtocolError(reason="absurd_bid") for an implausible bid or a duplicate peer
    id (filter with :func:`validate_candidate` first), LocalProtocolError for bad arguments.
    The result does not depend on the order of ``candidates``.
    """
    r = demand
    if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or r < 0:
        raise LocalProtocolError(f"demand must be finite and >= 0, got {r!r}", reason="bad_demand")
    if isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1:
        raise LocalProtocolError(f"max_shards must be an int >= 1, got {max_shards!r}", reason="bad_demand")
    if isinstance(t_max, bool) or not isinstance(t_max, int | float) or math.isnan(t_max) or t_max < 0:
        raise LocalProtocolError(f"t_max must be >= 0 (or inf), got {t_max!r}", reason="bad_demand")
    r = float(r)
    t_max = float(t_max)

    limits = check_caps(caps)
    seen: set[str] = set()
    for c in candidates:
        validate_candidate(c)
        if c.peer_id in seen:
            raise RemoteProtocolError(f"two bids from {c.peer_id}", reason="absurd_bid")
        seen.add(c.peer_id)
    scored = tuple(
        sorted((_score(c, params, limits.get(c.peer_id)) for c in candidates), key=lambda b: b.peer_id)
    )

    reasons: dict[str, str] = {}
    eligible: list[ScoredBid] = []
    for b in scored:
        if b.capacity > 0:
            eligible.append(b)
        else:
            reasons[b.peer_id] = f"not eligible: effective capacity C={_fmt(b.capacity)} <= 0"
    kept = _keep(eligible, max_shards)
    kept_ids = {b.peer_id for b in kept}
    cap_n = candidate_cap(max_shards)
    for b in eligible:
        if b.peer_id not in kept_ids:
            reasons[b.peer_id] = (
                f"not considered: only {cap_n} bids enter the exact search when max_shards={max_shards}"
                f" (kept: the largest C, then the lowest loads; its load is {_fmt(b.load)})"
            )

    m = min(max_shards, len(kept))
    ties = [tie_key(task_id, b.peer_id) for b in kept]
    found = _search(kept, r, m, t_max, ties)
    if found is not None:
        idx, _ = found
        chosen_bids = [kept[i] for i in idx]
        under = False
    else:
        tie = dict(zip((b.peer_id for b in kept), ties, strict=True))
        by_c = sorted(kept, key=lambda b: (-b.capacity, tie[b.peer_id]))
        chosen_bids = sorted(by_c[:m], key=lambda b: b.peer_id)
        under = True

    total_capacity = 0.0
    total_cost = 0.0
    for b in chosen_bids:  # canonical order: sorted by peer id
        total_capacity += b.capacity
        total_cost += b.cost
    shares = tuple(b.capacity / total_capacity for b in chosen_bids) if chosen_bids else ()
    chosen_ids = {b.peer_id for b in chosen_bids}

    for b in kept:
        if under:
            if b.peer_id in chosen_ids:
                why = (
                    f"chosen (under capacity): among the {m} largest C (C={_fmt(b.capacity)});"
                    f" no set of <= {m} bids has ΣC >= R={_fmt(r)} with T <= t_max={_fmt(t_max)}"
                )
            else:
                why = f"not chosen (under capacity): only the {m} largest C are taken (C={_fmt(b.capacity)})"
        elif b.peer_id in chosen_ids:
            why = (
                f"chosen: in the cheapest set covering R={_fmt(r)}"
                f" (C={_fmt(b.capacity)}, cost C·L={_fmt(b.cost)}; set ΣC={_fmt(total_capacity)},"
                f" T={_fmt(total_cost)}, {len(chosen_bids)} node(s))"
            )
        elif t_max < math.inf and b.cost > t_max:
            why = f"not chosen: its cost C·L={_fmt(b.cost)} alone exceeds t_max={_fmt(t_max)}"
        else:
            why = (
                f"not chosen: the minimum-cost covering set leaves it out (C={_fmt(b.capacity)},"
                f" L={_fmt(b.load)}, cost C·L={_fmt(b.cost)}; chosen set T={_fmt(total_cost)})"
            )
        if b.cap is not None and b.cap < b.uncapped:
            why += f"; C capped at {_fmt(b.cap)} (bid C⁰+ΔC={_fmt(b.uncapped)})"
        reasons[b.peer_id] = why

    return Award(
        demand=r,
        max_shards=max_shards,
        chosen=tuple(b.peer_id for b in chosen_bids),
        shares=shares,
        total_capacity=total_capacity,
        total_cost=total_cost,
        under_capacity=under,
        scored=scored,
        reasons=MappingProxyType(dict(sorted(reasons.items()))),
    )


def shard_sizes(n_items: int, shares: Sequence[float]) -> list[int]:
    """Split n_items into len(shares) integer sizes ∝ shares (largest-remainder method).

    Quotas q_i = n·s_i / Σs are computed *exactly* (rational arithmetic on the given floats),
    so every implementation agrees. Each size is ⌊q_i⌋; the items left over go one each to the
    largest remainders, ties to the lower index. The sizes sum exactly to n_items.
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 0:
        raise LocalProtocolError(f"n_items must be an int >= 0, got {n_items!r}", reason="bad_shares")
    if not shares:
        raise LocalProtocolError("shares must not be empty", reason="bad_shares")
    fracs: list[Fraction] = []
    for s in shares:
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s < 0:
            raise LocalProtocolError(f"share {s!r} must be finite and >= 0", reason="bad_shares")
        fracs.append(Fraction(s))
    total = sum(fracs, Fraction(0))
    if total == 0:
        raise LocalProtocolError("shares sum to zero", reason="bad_shares")
    quotas = [n_items * f / total for f in fracs]
    sizes = [math.floor(q) for q in quotas]
    left = n_items - sum(sizes)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[:left]:
        sizes[i] += 1
    return sizes
