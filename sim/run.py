"""Run one simulation and summarise it (the figures ``./scripts/sim`` prints)."""

from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sim.crypto import stub_signatures, verification_memo
from sim.engine import Violation
from sim.world import SimConfig, World, build, horizon_of

ADVERT_KINDS = ("advert",)
TASK_GOSSIP = ("announce", "award", "lease", "result", "vote", "cancel")
STREAMS = ("bid", "reply")  # "result" is counted with gossip: one kind, two paths
BLOBS = ("blobreq", "blob")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class Outcome:
    config: SimConfig
    ok: bool
    violation: str | None
    trace_hash: str
    trace_tail: list[str]
    trace: list[str] | None
    stats: dict[str, Any] = field(default_factory=dict)
    world: World | None = None


def run(cfg: SimConfig, *, keep_world: bool = False, setup: Any = None) -> Outcome:
    """Simulate ``cfg``; never raises for an invariant violation (``Outcome.ok`` is False).

    ``setup(world)``: called after the world is built, before it runs (tests plant bugs
    through it)."""
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    violation: str | None = None
    with stub_signatures(cfg.stub_signatures), verification_memo() as memo:
        world, tasks, sched = build(cfg)
        if setup is not None:
            setup(world)
        eng = world.engine
        last_submit = max((t for t, _, _ in tasks), default=0.0)
        end = horizon_of(tasks) + cfg.grace
        try:
            while True:
                eng.run(until=min(end, eng.now + 5.0))
                if eng.now >= end or eng.stopped:
                    break
                if eng.now > last_submit and world.ended_tasks >= len(tasks) and world.all_ended():
                    break
            world.invariants.at_end(cfg.grace, lambda peer_id: world.by_id[peer_id].up)
        except Violation as exc:
            violation = str(exc)
            eng.note(f"VIOLATION {violation}")
        except Exception as exc:  # the simulator's own bug: still report seed and trace
            traceback.print_exc()
            violation = f"simulator error: {type(exc).__name__}: {exc}"
            eng.note(f"VIOLATION {violation}")
        verified = memo.misses
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stats = summarise(world, tasks, sched, wall=wall, cpu=cpu, verified=verified)
    return Outcome(
        config=cfg,
        ok=violation is None,
        violation=violation,
        trace_hash=eng.trace_hash,
        trace_tail=list(eng.tail),
        trace=eng.full,
        stats=stats,
        world=world if keep_world else None,
    )


def summarise(
    world: World, tasks: list[Any], sched: Any, *, wall: float, cpu: float, verified: int
) -> dict[str, Any]:
    cfg = world.cfg
    eng = world.engine
    inv = world.invariants
    T = max(eng.now, 1e-9)
    n = cfg.peers
    ended: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    award_lat = []
    done_lat = []
    for rec in inv.tasks.values():
        if rec.first_award_at is not None:
            award_lat.append(rec.first_award_at - rec.submitted_at)
        if rec.ended is None:
            ended["unfinished"] += 1
            continue
        t, state, reason = rec.ended
        ended[state] += 1
        if state == "done":
            done_lat.append(t - rec.submitted_at)
        else:
            reasons[reason.split(":")[0][:60]] += 1
    tr = world.net.traffic

    def per_peer(kinds: tuple[str, ...]) -> tuple[float, float]:
        msgs = sum(tr.delivered[k] for k in kinds)
        byts = sum(tr.delivered_bytes[k] for k in kinds)
        return msgs / n / T, byts / n / T

    all_kinds = tuple(tr.delivered)
    seats: Counter[str] = Counter()
    for rec in inv.tasks.values():
        for ballots in rec.votes.values():
            members = set()
            for ballot in ballots:
                members.update(ballot[3])
            for m in sorted(members):
                seats[m] += 1
    seat_counts = list(seats.values())
    return {
        "peers": n,
        "tasks": len(tasks),
        "seed": cfg.seed,
        "faults": cfg.faults.describe(),
        "fault_schedule": {
            "crashes": len(sched.crashes),
            "partition": None
            if sched.partition is None
            else {
                "start_s": round(sched.partition[0], 3),
                "end_s": round(sched.partition[1], 3),
                "peers": len(sched.partition[2]),
            },
            "liars": len(sched.liars),
            "slow": len(sched.slow),
            "silent": len(sched.silent),
        },
        "signatures": "stub (SHA-512, --stub-signatures)" if cfg.stub_signatures else "real (Ed25519)",
        "envelopes_verified": verified,
        "adverts": cfg.adverts if cfg.adverts == "full" else f"sampled:{cfg.advert_sample}",
        "bidders": "all" if cfg.bidders <= 0 else cfg.bidders,
        "virtual_s": round(T, 3),
        "events": eng.events,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "trace_sha256": eng.trace_hash,
        "tasks_done": ended.get("done", 0),
        "tasks_failed": ended.get("failed", 0),
        "tasks_cancelled": ended.get("cancelled", 0),
        "tasks_unfinished": ended.get("unfinished", 0),
        "failure_reasons": dict(sorted(reasons.items())),
        "award_latency_s": {
            "p50": percentile(award_lat, 50),
            "p99": percentile(award_lat, 99),
            "n": len(award_lat),
        },
        "task_latency_s": {"p50": percentile(done_lat, 50), "p99": percentile(done_lat, 99)},
        "per_peer_per_s": {
            "messages": per_peer(all_kinds)[0],
            "bytes": per_peer(all_kinds)[1],
            "advert_messages": per_peer(ADVERT_KINDS)[0],
            "advert_bytes": per_peer(ADVERT_KINDS)[1],
            "task_messages": per_peer(TASK_GOSSIP + STREAMS)[0],
            "task_bytes": per_peer(TASK_GOSSIP + STREAMS)[1],
            "blob_bytes": per_peer(BLOBS)[1],
        },
        "delivered_by_kind": dict(sorted(tr.delivered.items())),
        # Task messages published, and what each peer would receive per second if every one
        # went to every peer (today's gossip; the solicited variant does not send them so).
        "task_publishes": dict(sorted(world.published.items())),
        "task_msgs_per_peer_s_if_gossiped_to_all": sum(world.published.values()) * (n - 1) / n / T,
        "max_shards_on_one_peer": world.max_active_shards,
        "lost_by_kind": dict(sorted(tr.lost.items())),
        "committee": {
            "seats": sum(seat_counts),
            "peers_serving": len(seat_counts),
            "max_per_peer": max(seat_counts, default=0),
            "mean_per_serving_peer": (sum(seat_counts) / len(seat_counts)) if seat_counts else 0.0,
        },
        "checked": dict(inv.checked),
        "counters": dict(sorted(world.counters.items())),
    }


def _f(x: float, unit: str = "") -> str:
    if x != x:
        return "-"
    return f"{x:.2f}{unit}" if abs(x) < 1000 else f"{x:,.0f}{unit}"


def render(out: Outcome) -> str:
    s = out.stats
    pp = s["per_peer_per_s"]
    lines = [
        f"peerd sim: {s['peers']} peers, {s['tasks']} tasks, seed {s['seed']}, faults {s['faults']}",
        f"signatures: {s['signatures']}; {s['envelopes_verified']} distinct envelopes verified",
        f"adverts to {'every peer' if s['adverts'] == 'full' else s['adverts']}, bidders: {s['bidders']}",
        f"virtual time {s['virtual_s']:.1f} s, {s['events']} events, wall {s['wall_s']:.1f} s "
        f"(cpu {s['cpu_s']:.1f} s)",
        f"tasks: {s['tasks_done']} done, {s['tasks_failed']} failed, {s['tasks_cancelled']} cancelled, "
        f"{s['tasks_unfinished']} unfinished",
    ]
    if s["failure_reasons"]:
        lines.append("  not done: " + ", ".join(f"{k} ×{v}" for k, v in s["failure_reasons"].items()))
    al = s["award_latency_s"]
    lines.append(
        f"award latency (virtual): p50 {_f(al['p50'], ' s')}, p99 {_f(al['p99'], ' s')} over {al['n']} awards"
    )
    tl = s["task_latency_s"]
    lines.append(f"task latency (done):     p50 {_f(tl['p50'], ' s')}, p99 {_f(tl['p99'], ' s')}")
    lines.append(
        f"per peer per second: {_f(pp['messages'])} messages, {_f(pp['bytes'] / 1000)} kB "
        f"(adverts {_f(pp['advert_messages'])} msg {_f(pp['advert_bytes'] / 1000)} kB; "
        f"task messages {_f(pp['task_messages'])} msg {_f(pp['task_bytes'] / 1000)} kB; "
        f"blobs {_f(pp['blob_bytes'] / 1000)} kB)"
    )
    c = s["committee"]
    lines.append(
        f"committee load: {c['seats']} seats on {c['peers_serving']} peers, "
        f"max {c['max_per_peer']} per peer, mean {c['mean_per_serving_peer']:.2f}"
    )
    fs = s["fault_schedule"]
    lines.append(
        f"faults drawn: {fs['crashes']} crashes, partition {fs['partition'] or 'none'}, "
        f"{fs['liars']} liars, {fs['slow']} slow, {fs.get('silent', 0)} silent"
    )
    ch = s["checked"]
    lines.append("checked: " + ", ".join(f"{v} {k}" for k, v in ch.items()))
    lines.append(f"trace sha256 {s['trace_sha256']}")
    if out.ok:
        lines.append("invariants: ok")
    else:
        lines.append(f"invariants: VIOLATED — {out.violation}")
    return "\n".join(lines)
