"""Awards as a pure function of signed bids, and their verification (docs/design.md §4).

Any peer holding a task's announce and its award recomputes the award from the bids it
lists — nobody has to trust the submitter's choice. Epoch 0 must equal
``allocation.choose`` over the listed bids exactly. A later epoch re-awards the shards
of lost peers (listed in ``excluded``): it is valid when every assigned peer is one of
the listed bidders and no excluded peer keeps a shard. A receiver that also holds the
previous epoch's award checks it exactly: the same shards and shares, nobody excluded
before is forgiven, and every shard where :func:`reassign` puts it.

A replicated task (``verify`` in the announce, SPEC §7.10) runs each of the n shards the rule
chooses ``replicas`` times: epoch 0 appends the copies as shards n, n+1, … (``of`` names the
shard each repeats), each placed by :func:`add_replicas`; a later epoch may append more copies
(a disagreement) after :func:`reassign` has moved the lost ones.

A re-award may list more bids than epoch 0 did (bids that arrived after the bid window,
or from a fresh bid round after every bidder was lost), so its shard count is *not* what
the rule would choose over its own bids: the shards are fixed by epoch 0.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.allocation import Award as Allocation
from protocol.allocation import (
    Candidate,
    NetworkParams,
    ScoredBid,
    choose,
    demand,
    effective_capacity,
    tie_key,
    validate_candidate,
)
from protocol.envelope import Signed, open_envelope
from protocol.errors import RemoteProtocolError
from protocol.messages import Award, Bid, Result, TaskAnnounce


def net_params(net: Mapping[str, Any]) -> NetworkParams:
    dc_max = net["dc_max"]
    return NetworkParams(k=net["k"], dc_min=net["dc_min"], dc_max=math.inf if dc_max is None else dc_max)


def usable_bids(announce: TaskAnnounce, bids: Sequence[Signed]) -> list[Signed]:
    """The bids that count: for this task, one per peer (the highest sequence wins)."""
    best: dict[str, Signed] = {}
    for b in bids:
        if not isinstance(b.message, Bid) or b.message.task_id != announce.task_id:
            continue
        cur = best.get(b.signer)
        if cur is None or b.message.seq > cur.message.seq:
            best[b.signer] = b
    return [best[p] for p in sorted(best)]


#: An award quotes at most this many bids (SPEC §7.5: ``bids`` holds at most 64).
MAX_QUOTED_BIDS = 64


def quotable_bids(announce: TaskAnnounce, bids: Sequence[Signed]) -> list[Signed]:
    """The usable bids an award may quote (SPEC §10.2), in peer-ID order.

    All of them while they fit in an award. Past 64 bidders the submitter keeps the 64 that
    serve a unit of work cheapest by the award rule's own measure — lowest load L (a bid's
    cost per unit of capacity, C·L / C), then larger effective C, then peer ID — and drops
    bids that fail the plausibility bounds. Without this a task with more than 64 bidders
    could never be awarded (the simulator found it at 1,000 peers). Which bids a submitter
    quotes is its own choice and not checkable by others: they check the award against the
    bids it quotes (§10.3).
    """
    usable = usable_bids(announce, bids)
    if len(usable) <= MAX_QUOTED_BIDS:
        return usable
    params = net_params(announce.net)
    ranked: list[tuple[tuple[float, float, str], Signed]] = []
    for b in usable:
        m = b.message
        assert isinstance(m, Bid)
        try:
            validate_candidate(Candidate(b.signer, m.c0, m.load))
            cap = effective_capacity(float(m.c0), float(m.load), params)
        except (RemoteProtocolError, ArithmeticError, ValueError):
            continue
        if not math.isfinite(cap):
            continue
        ranked.append(((float(m.load), -cap, b.signer), b))
    keep = {b.signer for _, b in sorted(ranked, key=lambda r: r[0])[:MAX_QUOTED_BIDS]}
    return [b for b in usable if b.signer in keep]


def t_max_of(net: Mapping[str, Any]) -> float:
    """The announce's T_max (SPEC §10.2): ``net.t_max``, +∞ when absent."""
    t_max = net.get("t_max")
    return math.inf if t_max is None else float(t_max)


def allocate(
    announce: TaskAnnounce, bids: Sequence[Signed], caps: Mapping[str, float] | None = None
) -> Allocation:
    """The award rule applied to the task's signed bids, under the announce's T_max, with the
    submitter's ``caps`` on C (an award's own ``caps``; docs/allocation.md "Caps")."""
    cands = []
    for b in usable_bids(announce, bids):
        c = Candidate(b.signer, b.message.c0, b.message.load)  # type: ignore[attr-defined]
        try:
            validate_candidate(c)
        except RemoteProtocolError:
            continue  # one absurd bid must not make the whole award fail
        cands.append(c)
    return choose(
        cands,
        demand=demand(announce.work, announce.deadline_ms / 1000),
        max_shards=announce.max_shards,
        t_max=t_max_of(announce.net),
        params=net_params(announce.net),
        caps=caps,
        task_id=announce.task_id,
    )


def assignments_of(alloc: Allocation) -> list[dict[str, Any]]:
    """Epoch-0 shards: shard i goes to the i-th chosen peer (sorted by peer ID)."""
    return [
        {"shard": i, "peer_id": pid, "share": share, "inputs": {}}
        for i, (pid, share) in enumerate(zip(alloc.chosen, alloc.shares, strict=True))
    ]


def logical_shard(a: Mapping[str, Any]) -> int:
    """The shard whose work assignment ``a`` does: its ``of`` for a replica, else its own."""
    return int(a.get("of", a["shard"]))


def reassign(
    assignments: Sequence[Mapping[str, Any]],
    lost: set[str],
    bidders: Sequence[tuple[str, float]],
    *,
    task_id: str,
    capacity: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Move the shards of ``lost`` peers. ``bidders`` are (peer, cost C·L) of every
    usable bid, ``capacity`` their C as the award counted it. Each lost shard, in shard
    order, goes to the cheapest bidder that is not lost and holds no shard yet (equal costs —
    idle peers all cost 0 — by the larger C, then the smaller H(task_id ‖ peer_id), which a
    key generator cannot grind as it could the smallest peer ID; SPEC §10.2, as the award
    rule breaks its ties); if there is none, to the cheapest
    holder that is not lost — a peer given a shard earlier in this same re-award counts
    as a holder. Never to a peer that holds another copy of the same work (a replica,
    SPEC §7.10): two copies on one peer would agree by construction. Returns [] when no
    bidder can take a lost shard."""
    holders = {a["peer_id"] for a in assignments if a["peer_id"] not in lost}
    cap = capacity or {}
    keyed = [(c, -cap.get(p, 0.0), tie_key(task_id, p), p) for p, c in bidders if p not in lost]
    spare = sorted(k for k in keyed if k[3] not in holders)
    live = sorted(k for k in keyed if k[3] in holders)
    ordered = sorted(assignments, key=lambda a: a["shard"])
    now = {a["shard"]: a["peer_id"] for a in ordered}
    out: list[dict[str, Any]] = []
    for a in ordered:
        if a["peer_id"] not in lost:
            out.append(dict(a))
            continue
        work = logical_shard(a)
        taken = {now[b["shard"]] for b in ordered if logical_shard(b) == work and b["shard"] != a["shard"]}
        pick = next((x for x in spare if x[3] not in taken), None)
        if pick is not None:
            spare.remove(pick)
            # Two lost shards and one spare: the second must not be stranded (it used to
            # make the whole re-award fail and the task wait for a fresh bid round forever).
            bisect.insort(live, pick)
        else:
            pick = next((x for x in live if x[3] not in taken), None)
            if pick is None:
                return []
        now[a["shard"]] = pick[3]
        out.append({**a, "peer_id": pick[3]})
    return out


@dataclass(frozen=True, slots=True)
class Ranked:
    """A bidder as the replica rule sees it: its capacity C as the award counted it (capped)
    and its cost C·L."""

    peer_id: str
    capacity: float
    cost: float


def replica_ranking(task_id: str, scored: Sequence[ScoredBid], excluded: Sequence[str] = ()) -> list[Ranked]:
    """The bidders that may take copies (SPEC §7.10), cheapest first — the cost C·L, as the
    award rule itself ranks them, so copies spread over idle peers rather than pile onto one
    — then, as ``reassign`` breaks its ties, the larger C (capped by trust: idle peers all
    cost 0, and a peer outvoted before then comes after those that delivered), then
    H(task_id ‖ peer_id); excluded ones and those with no capacity left out."""
    gone = set(excluded)
    ranked = sorted(
        (b for b in scored if b.peer_id not in gone and b.capacity > 0),
        key=lambda b: (b.cost, -b.capacity, tie_key(task_id, b.peer_id)),
    )
    return [Ranked(b.peer_id, b.capacity, b.cost) for b in ranked]


def add_replicas(
    assignments: Sequence[Mapping[str, Any]], works: Sequence[int], ranking: Sequence[Ranked], demand: float
) -> list[dict[str, Any]] | None:
    """``assignments`` plus one new shard for each shard number in ``works`` (in order),
    numbered on from the last, ``of`` that shard, with its share and inputs. Each goes to
    the first peer of ``ranking`` that holds no copy of that work, preferring (in this order)
    one whose C covers the copy's part of the demand (share × R: a copy on a weaker peer
    cannot meet the deadline), then one that holds no shard yet. None when some copy has
    nobody to go to."""
    out = [{**a, "inputs": dict(a["inputs"])} for a in sorted(assignments, key=lambda a: a["shard"])]
    for w in works:
        base = next((a for a in out if a["shard"] == w and "of" not in a), None)
        if base is None:
            return None
        holders = {a["peer_id"] for a in out}
        same = {a["peer_id"] for a in out if logical_shard(a) == w}
        need = float(base["share"]) * demand
        order = sorted(
            (i for i, r in enumerate(ranking) if r.peer_id not in same),
            key=lambda i: (ranking[i].capacity < need, ranking[i].peer_id in holders, i),
        )
        if not order:
            return None
        copy = {"shard": len(out), "peer_id": ranking[order[0]].peer_id, "share": base["share"]}
        out.append({**copy, "inputs": dict(base["inputs"]), "of": w})
    return out


#: Metrics a worker measures on its own host (peerd/executor/pool.py, worker.py): they differ
#: between honest copies, so replicas are not compared on them (SPEC §7.10).
HOST_METRICS = frozenset(
    {"wall_seconds", "worker_seconds", "cpu_seconds", "worker_jobs", "memory_peak_bytes", "pids_peak"}
)


def replica_value(m: Result) -> tuple[Any, ...]:
    """What copies of one shard must agree on (SPEC §7.10): each output's name, hash and size,
    and the kind's metrics (not the host's measurements, ``HOST_METRICS``)."""
    outs = tuple(sorted((n, r["sha256"], r["size"]) for n, r in m.outputs.items()))
    return (outs, tuple(sorted((k, v) for k, v in m.metrics.items() if k not in HOST_METRICS)))


def spot_commit(salt: bytes) -> str:
    """What a spot-checked announce carries of its secret salt: sha256(salt), hex (SPEC §7.10)."""
    return hashlib.sha256(salt).hexdigest()


def spot_checked(task_id: str, salt: bytes, n: int, fraction: float) -> list[int]:
    """The shards of 0..n-1 the salt draws for a second copy (SPEC §7.10): shard s when the
    first 8 bytes of sha256(salt ‖ task_id ‖ s as 4 bytes big-endian), read as a big-endian
    integer u, give u / 2⁶⁴ < fraction (in IEEE double). Nobody can tell which shards are
    drawn before the salt is shown, and the announce's commit binds the submitter to it."""
    out = []
    for shard in range(n):
        h = hashlib.sha256(salt + task_id.encode("ascii") + shard.to_bytes(4, "big")).digest()
        if int.from_bytes(h[:8], "big") / 2**64 < fraction:
            out.append(shard)
    return out


def quorum_need(announce: TaskAnnounce, work: int, checked: Sequence[int] = ()) -> int:
    """How many peers must sign a shard's value (SPEC §7.10): ⌊k/2⌋ + 1 of a replicated
    task's k copies; 2 for a spot-checked shard the salt drew, else its one holder."""
    if announce.verify_mode == "replicate":
        return announce.replicas // 2 + 1
    return 2 if work in checked else 1


def first_replicas(n: int, replicas: int) -> list[int]:
    """The works epoch 0 copies for ``replicas`` copies of ``n`` shards: 0..n-1, repeated."""
    return [w for _ in range(1, replicas) for w in range(n)]


def _shard_key(a: Mapping[str, Any]) -> tuple[Any, ...]:
    inputs = sorted((k, v["sha256"], v["size"]) for k, v in a["inputs"].items())
    return (a["shard"], a["peer_id"], a["share"], inputs, a.get("of", -1))


def check_award(
    announce: TaskAnnounce,
    award: Award,
    submitter: str,
    signer: str,
    bids: Sequence[Signed],
    previous: Award | None = None,
) -> None:
    """Raise RemoteProtocolError unless ``award`` is what the rule gives for its bids.

    ``previous``: the award of epoch ``award.epoch - 1`` when the caller holds it; a
    re-award is then checked exactly against :func:`reassign` (otherwise only that no
    shard goes to a non-bidder or an excluded peer — all a receiver that missed an epoch
    can check).
    """
    if signer != submitter:
        raise RemoteProtocolError("award not signed by the task's submitter", reason="forged_award")
    if award.task_id != announce.task_id:
        raise RemoteProtocolError("award for another task", reason="bad_award")
    usable = usable_bids(announce, bids)
    if len(usable) != len(bids):
        raise RemoteProtocolError("award lists unusable bids", reason="bad_award")
    # The caps are the submitter's claim (SPEC §10.3): checkable for consistency — each names
    # a quoted bidder, and the award follows from the bids with them — not for truth.
    bidders = {b.signer for b in usable}
    if award.caps is not None and not set(award.caps) <= bidders:
        raise RemoteProtocolError("award caps a peer that did not bid", reason="bad_award")
    alloc = allocate(announce, usable, award.caps)
    shards = sorted(award.assignments, key=lambda a: a["shard"])
    if award.epoch == 0:
        n = len(alloc.chosen)
        if [a["shard"] for a in shards] != list(range(n * announce.replicas)):
            raise RemoteProtocolError("award shards are not 0..n-1", reason="bad_award")
        own, copies = shards[:n], shards[n:]
        peers = tuple(a["peer_id"] for a in own)
        if peers != alloc.chosen or award.under_capacity != alloc.under_capacity:
            raise RemoteProtocolError("award does not follow the allocation rule", reason="bad_award")
        if any("of" in a for a in own):
            raise RemoteProtocolError("award marks a chosen shard as a replica", reason="bad_award")
        if any(abs(a["share"] - s) > 1e-9 for a, s in zip(own, alloc.shares, strict=True)):
            raise RemoteProtocolError("award shares are not proportional to C", reason="bad_award")
        if award.excluded:
            raise RemoteProtocolError("first award excludes peers", reason="bad_award")
        if copies:
            ranking = replica_ranking(announce.task_id, alloc.scored)
            expected = add_replicas(own, first_replicas(n, announce.replicas), ranking, alloc.demand)
            if expected is None or sorted(map(_shard_key, expected)) != sorted(map(_shard_key, shards)):
                raise RemoteProtocolError("award replicas do not follow the replica rule", reason="bad_award")
        return
    numbers = [a["shard"] for a in shards]
    limit = 64 if announce.verify is not None else announce.max_shards
    if not shards or numbers != list(range(len(shards))) or len(shards) > limit:
        raise RemoteProtocolError("award shards are not 0..n-1", reason="bad_award")
    for a in shards:
        if a["peer_id"] not in bidders or a["peer_id"] in award.excluded:
            raise RemoteProtocolError(
                "re-award gives a shard to a non-bidder or excluded peer", reason="bad_award"
            )
    if previous is None or previous.epoch != award.epoch - 1 or previous.task_id != award.task_id:
        return
    if not set(previous.excluded) <= set(award.excluded):
        raise RemoteProtocolError("re-award gives back a shard to a peer excluded before", reason="bad_award")
    if award.under_capacity != previous.under_capacity:
        raise RemoteProtocolError("re-award changes under_capacity", reason="bad_award")
    costs = [(s.peer_id, s.cost) for s in alloc.scored]
    expected = reassign(
        list(previous.assignments),
        set(award.excluded),
        costs,
        task_id=announce.task_id,
        capacity={s.peer_id: s.capacity for s in alloc.scored},
    )
    added = shards[len(previous.assignments) :]
    if added:
        # More copies of some work (replicas that disagreed, SPEC §7.10): each placed by the
        # replica rule after the moves. Whether the disagreement was real is checked from
        # the signed results (peerd/verify.py), not here.
        if announce.verify is None or any("of" not in a for a in added):
            raise RemoteProtocolError("re-award adds shards to a task without replicas", reason="bad_award")
        if expected:
            ranking = replica_ranking(announce.task_id, alloc.scored, award.excluded)
            grown = add_replicas(expected, [int(a["of"]) for a in added], ranking, alloc.demand)
            expected = grown if grown is not None else []
        if sorted(map(_shard_key, expected)) != sorted(map(_shard_key, shards)):
            raise RemoteProtocolError("re-award replicas do not follow the replica rule", reason="bad_award")
        return
    if sorted(map(_shard_key, expected)) != sorted(map(_shard_key, shards)):
        raise RemoteProtocolError("re-award does not follow the replacement rule", reason="bad_award")


class EmbeddedBidError(RemoteProtocolError):
    """A bid quoted in an award failed §5: the award is ``bad_award``, and ``embedded`` is
    the bid's own reason (counted as ``dropped.embedded_<reason>``, SPEC §10.3)."""

    def __init__(self, message: str, *, embedded: str) -> None:
        super().__init__(message, reason="bad_award")
        self.embedded = embedded


def open_quoted_bids(award: Award) -> list[Signed]:
    """Open every bid envelope ``award`` quotes: §5 with kinds {bid}, no replay check
    (quoting is not replaying). The first that fails rejects the whole award (SPEC §10.3)."""
    out = []
    for i, raw in enumerate(award.bids):
        try:
            out.append(open_envelope(raw, kinds=frozenset({"bid"})))
        except RemoteProtocolError as exc:
            raise EmbeddedBidError(
                f"quoted bid {i} fails: embedded_{exc.reason}: {exc}", embedded=exc.reason
            ) from None
    return out


def check_signed_award(announce: Signed, award: Signed, previous: Award | None = None) -> None:
    """SPEC §10.3 in the order a receiver applies it: the quoted bids, then
    :func:`check_award` with the announce's signer as the submitter. ``previous``: the
    award of epoch ``award.epoch - 1`` when the caller holds it."""
    if not isinstance(announce.message, TaskAnnounce) or not isinstance(award.message, Award):
        raise RemoteProtocolError("expected an announce and an award", reason="unexpected_kind")
    bids = open_quoted_bids(award.message)
    check_award(announce.message, award.message, announce.signer, award.signer, bids, previous)
