"""Trust (issue 8 "Budgets"): 1 liar among 4 peers, 20 echo tasks, on real daemons.

Every phase is its own 4-daemon devnet on 127.0.0.1: node 0 submits and does not offer
``echo`` (so every shard crosses the network), nodes 1 and 2 are honest contractors, node 3
is the liar, started with a patched launcher (as tests/integration/test_trust_liar_daemons.py
and test_market_moves.py do; nothing in peerd/ or protocol/ is changed). Every liar bids, at
L = 0, the largest C⁰ its advertised hardware admits (cores × 256 GFLOP/s, SPEC §7.2), so on
cost alone it wins every task. Then:

* **silent** — awarded, then silent: no lease, no result (a capacity liar).
* **heartbeat** — awarded, it heartbeats its lease as if working and never delivers.
* **wrong** — it runs the job, then puts other bytes in its blob store and commits their
  digest: a well-formed, signed, wrong result.

Phases:

1. *cold* (silent liar): all four daemons start together, nobody has history; 20 tasks
   submitted one a second. Which tasks the liar won (any epoch), when its first fault was
   detected (the submitter's task events naming it: lease lost, overdue, failed, disagreed),
   its share of the tasks awarded up to then against ``policy.probation_share``, and its wins
   after.
2. *warm* (silent liar): the honest peers first finish 3 tasks (they have history), then the
   liar joins; the same 20 tasks and figures.
3. *heartbeat* (cold start, ``policy.probation = false`` so the liar's claim wins shards to
   attack: the cold phase measures probation): 20 tasks one a second, ``work`` chosen so that the expected
   shard time on the liar's C (share × work / C, SPEC §7.6; C = its bid's C⁰ + ΔC, capped
   where the award capped it) is about 3 s, and ``market.backup_min_s`` = 1 s (the default,
   60 s, would make the floor and not ``backup_after`` × expected time set the hold limit).
   Extra time per affected task = its award → done minus the median award → done of the
   holders that delivered (the backups' included); budget ≤ 3 × the expected shard time, and
   no task fails.
4. *replicate* (wrong-result liar): 20 plain echo tasks, then the same 20 with
   ``{"verify": "replicate", "replicas": 2}``, each batch submitted at once; tasks/s = done /
   (last done − first submit) from the submitter's stamps; the ratio plain / replicated
   (budget ≤ 2.2×) and the share of correct outputs (budget: 100 % with replicate).

Everything is bounded; a benchmark reports and never fails a build. Events and ``updated_at``
stamps are the submitter's wall clock; the client clock (same machine) marks submissions.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from scripts.benchmarks.common import (
    ROOT,
    AreaResult,
    Check,
    Table,
    bench_dir,
    budget_le,
    fmt,
    loadavg,
    log,
)

SUBMITTER, LIAR, HONEST = 0, 3, (1, 2)
N = 4
TASKS = 20
QUICK_TASKS = 8
WARMUP = 3
#: The issue's budgets.
HEARTBEAT_BUDGET = 3.0  # × the expected shard time
REPLICATION_BUDGET = 2.2  # × the single-copy throughput
#: The heartbeat phase's expected shard time on the liar's C, and the hold-limit floor it needs.
EXPECTED_S = 3.0
BACKUP_MIN_S = 1.0
LEASE_TTL_S = 6.0
HEARTBEAT_S = 1.0
#: Long enough for every bidder to answer on a loaded 2-core machine (a liar that is the only
#: bid in the window is "nothing else can serve it" and may take the task by the rule).
BID_WINDOW_MS = 1000
DEADLINE_S = 120.0
SUBMIT_EVERY_S = 1.0
#: Bounds on the waits (safety only; nothing is asserted on a time).
PHASE_TIMEOUT_S = 300.0
TERMINAL = ("done", "failed", "cancelled")

LAUNCHER = """
import sys
import trio
import peerd.contractor as contractor
import peerd.daemon as daemon
import protocol.machines.shard as shard
from peerd.executor import JobResult
from peerd.probes import cpu_info
from protocol.plausibility import CPU_GFLOPS_PER_CORE

MODE = sys.argv.pop(1)
CLAIM = cpu_info().cores * CPU_GFLOPS_PER_CORE  # the most its advert's hardware admits
honest_bid = shard.ShardMachine._bid

def lying_bid(self, now):
    self.c0, self.load = CLAIM, 0.0  # a plausible-looking lie, and idle
    return honest_bid(self, now)

shard.ShardMachine._bid = lying_bid
honest_execute = contractor.Contractor._execute

async def silent_execute(self, ann, action):
    await trio.sleep_forever()  # the shard machine keeps heartbeating the lease

async def wrong_execute(self, ann, action):
    result = await honest_execute(self, ann, action)
    if not result.ok:
        return result
    # Other bytes of the same size under the same names (a size over the declared one is
    # refused, SPEC §7.7): the contractor stores them and commits their digest.
    outputs = {name: bytes(b ^ 1 for b in data) for name, data in result.outputs.items()}
    return JobResult(ok=True, outputs=outputs, metrics=result.metrics)

if MODE == "silent":
    shard.ShardMachine._on_award = lambda self, event, award: []  # awarded, then silent
elif MODE == "heartbeat":
    contractor.Contractor._execute = silent_execute
elif MODE == "wrong":
    contractor.Contractor._execute = wrong_execute
else:
    raise SystemExit(f"unknown liar mode {MODE!r}")
sys.argv[0] = "peerd"
daemon.main()
"""
LIAR_MODES = ("silent", "heartbeat", "wrong")


# --- pure parts: what the task events say, and the figures (tests/unit/test_bench_trust.py) ----


def short(peer: str) -> str:
    """The tail of a peer ID, as the daemon's task events name it (protocol.machines.common)."""
    return peer[-8:]


@dataclass(frozen=True)
class Award:
    at: float | None  # submitter wall clock, s; None when only the final holder says so
    peer: str  # short peer ID


@dataclass
class Outcome:
    """One task of a phase, as its submitter saw it."""

    index: int
    task_id: str
    state: str
    submitted_at: float  # client clock, s
    awards: list[Award] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)  # (at, short peer)
    done_at: float | None = None
    output_ok: bool | None = None
    reason: str | None = None

    @property
    def first_award(self) -> Award | None:
        return self.awards[0] if self.awards else None


_AWARDED = re.compile(r"^awarded \d+ shard\(s\) to ([^(]+)")
_MOVED = re.compile(r"→ ([^\s,;()]+)")
#: A task event naming a holder at fault (SPEC §7.6 moves; replication's disagreement).
FAULT_WORDS = ("lease lost", "failed on", "overdue", "disagree", "refused", "wrong", "minority", "mismatch")


#: What follows these in a task event names the peers just given a shard (or a copy).
_GIVEN = re.compile(r"(?:re-awarded|one more copy of) ")


def awarded_in(message: str) -> list[str]:
    """Short IDs a task event says were awarded a shard: the first award ("awarded N
    shard(s) to A, B"), a move ("…; re-awarded shard 0 → C") or a replica added after a
    disagreement ("copies disagree; one more copy of shard 0 → D", SPEC §7.10)."""
    m = _AWARDED.match(message)
    if m:
        return [p.strip() for p in m.group(1).split(",") if p.strip()]
    parts = _GIVEN.split(message, maxsplit=1)
    return _MOVED.findall(parts[1]) if len(parts) == 2 else []


def fault_peers(message: str, shorts: Sequence[str]) -> list[str]:
    """Which of ``shorts`` a task event blames: the clause before the peers it gives a shard
    to (or the whole event) when it speaks of a fault. Cap notes ("C of X capped: … failed
    before delivering") restate an old fault, and awards blame nobody. A disagreement's
    losers are not named in its event: :func:`outcome_of` reads them from the result."""
    if message.startswith(("C of ", "awarded ")):
        return []
    clause = _GIVEN.split(message, maxsplit=1)[0]
    if not any(w in clause.lower() for w in FAULT_WORDS):
        return []
    return sorted(s for s in shorts if s in clause)


def outcome_of(index: int, submitted_at: float, task: Mapping[str, Any], shorts: Sequence[str]) -> Outcome:
    """An :class:`Outcome` from ``task.get``: awards and faults from its events, the final
    holders from its shards (a holder no event names is added without a time)."""
    out = Outcome(
        index=index,
        task_id=str(task["task_id"]),
        state=str(task["state"]),
        submitted_at=submitted_at,
        reason=task.get("reason"),
    )
    for e in task.get("events", []):
        msg, at = str(e["message"]), float(e["at"])
        out.awards += [Award(at, p) for p in awarded_in(msg)]
        out.faults += [(at, p) for p in fault_peers(msg, shorts)]
        if e["state"] == "done" and out.done_at is None:
            out.done_at = at
    # Replicated tasks (SPEC §7.10): the result lists each shard's losing copies; their fault
    # was detected when the copies were found to disagree (else, at the latest, when done).
    disagreed_at = next(
        (float(e["at"]) for e in task.get("events", []) if "disagree" in str(e["message"])), None
    )
    for rep in (task.get("result") or {}).get("replicas") or []:
        seen = disagreed_at if disagreed_at is not None else out.done_at
        for p in rep.get("disagreed") or []:
            if seen is not None and (seen, short(str(p))) not in out.faults:
                out.faults.append((seen, short(str(p))))
    named = {a.peer for a in out.awards}
    for s in task.get("shards", []):
        p = short(str(s["peer_id"]))
        if p not in named:
            out.awards.append(Award(None, p))
            named.add(p)
    if out.state == "done" and out.done_at is None and task.get("updated_at") is not None:
        out.done_at = float(task["updated_at"])
    return out


@dataclass(frozen=True)
class LiarShare:
    """The liar's awards over a phase (issue 8: ≤ its probation share of the first tasks,
    none after its first detected fault)."""

    won: tuple[int, ...]  # task indexes where it held a shard at some epoch
    won_first: tuple[int, ...]  # … of those, where it won the first award (epoch 0)
    first_fault_at: float | None
    first_fault_task: int | None
    first_tasks: int  # tasks first awarded at or before its first fault (all, if none)
    first_wins: int  # … of which the liar won the first award
    wins_after: tuple[int, ...]  # tasks whose award to the liar came after its first fault
    #: … of those, the tasks submitted before that fault (their machines' trust records predate it)
    after_but_older: tuple[int, ...] = ()

    @property
    def share(self) -> float:
        return self.first_wins / self.first_tasks if self.first_tasks else float("nan")


def liar_share(outcomes: Sequence[Outcome], liar: str) -> LiarShare:
    faults = sorted((at, o.index) for o in outcomes for at, p in o.faults if p == liar)
    first_at, first_task = faults[0] if faults else (None, None)
    won = tuple(o.index for o in outcomes if any(a.peer == liar for a in o.awards))
    won_first = tuple(o.index for o in outcomes if o.first_award is not None and o.first_award.peer == liar)

    def before(at: float | None) -> bool:
        return first_at is None or (at is not None and at <= first_at)

    first = [o for o in outcomes if o.first_award is not None and before(o.first_award.at)]
    after = tuple(
        o.index
        for o in outcomes
        if first_at is not None
        and any(a.peer == liar and a.at is not None and a.at > first_at for a in o.awards)
    )
    return LiarShare(
        won=won,
        won_first=won_first,
        first_fault_at=first_at,
        first_fault_task=first_task,
        first_tasks=len(first),
        first_wins=sum(1 for o in first if o.first_award is not None and o.first_award.peer == liar),
        wins_after=after,
        after_but_older=tuple(
            o.index
            for o in outcomes
            if o.index in after and first_at is not None and o.submitted_at <= first_at
        ),
    )


def hold_limit_s(
    expected_s: float, backup_after: float, backup_min_s: float, deadline_s: float, lease_ttl_s: float
) -> float:
    """The submitter's hold limit for a plain task's shard (SPEC §7.6, TaskMachine.hold_limit_ms):
    ``backup_after`` × expected, at least min(backup_min, D / (1 + backup_after)) and one TTL."""
    floor = min(backup_min_s, deadline_s / (1 + backup_after))
    return max(backup_after * expected_s, floor, lease_ttl_s + 0.001)


def award_to_done(o: Outcome, *, last: bool = False) -> float | None:
    """Award → done of a done task: from its first award, or (``last``) from the award of the
    holder that delivered (the backup's, when the shard moved)."""
    timed = [a for a in o.awards if a.at is not None]
    if o.state != "done" or o.done_at is None or not timed:
        return None
    a = timed[-1] if last else timed[0]
    assert a.at is not None
    return o.done_at - a.at


def backup_delay(o: Outcome) -> float | None:
    """How long the first holder kept the shard before the next award (None: never moved)."""
    timed = [a.at for a in o.awards if a.at is not None]
    return timed[1] - timed[0] if len(timed) >= 2 else None


def extra_times(outcomes: Sequence[Outcome], liar: str) -> tuple[float, list[tuple[int, float]]]:
    """(baseline, [(task index, extra s)]) for the tasks the liar held first: each one's award →
    done minus the baseline, the median award → done of the holders that delivered (an
    unaffected task's only holder, an affected task's backup). NaN baseline: nothing done."""
    delivered = [d for o in outcomes if (d := award_to_done(o, last=True)) is not None]
    base = median(delivered) if delivered else float("nan")
    hit = [
        (o.index, d - base)
        for o in outcomes
        if o.first_award is not None and o.first_award.peer == liar and (d := award_to_done(o)) is not None
    ]
    return base, hit


def rate(outcomes: Sequence[Outcome]) -> float:
    """Tasks done per second from the first submission to the last done (NaN: none done)."""
    done = [o.done_at for o in outcomes if o.state == "done" and o.done_at is not None]
    if not done or not outcomes:
        return float("nan")
    span = max(done) - min(o.submitted_at for o in outcomes)
    return len(done) / span if span > 0 else float("nan")


def counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    out = {"done": 0, "failed": 0, "cancelled": 0, "unfinished": 0}
    for o in outcomes:
        out[o.state if o.state in out else "unfinished"] += 1
    return out


def share_checks(phase: str, s: LiarShare, probation_share: float) -> list[Check]:
    """The two award budgets of a phase: ≤ probation share of the first tasks, none after."""
    met_share = None if s.first_tasks == 0 else s.share <= probation_share
    first = Check(
        f"{phase}: liar's share of the first tasks (awarded up to its first fault)",
        f"{s.first_wins}/{s.first_tasks} = {fmt(100 * s.share)} %" if s.first_tasks else "no task awarded",
        f"≤ {probation_share:.0%} (policy.probation_share)",
        met_share,
    )
    if s.first_fault_at is None:
        after = Check(f"{phase}: liar's wins after its first detected fault", "no fault detected", "0", None)
    else:
        value = f"{len(s.wins_after)}"
        if s.wins_after:
            tasks = ", ".join(map(str, s.wins_after))
            value += f" (tasks {tasks}; {len(s.after_but_older)} submitted before the fault)"
        after = Check(f"{phase}: liar's wins after its first detected fault", value, "0", not s.wins_after)
    return [first, after]


def complete_check(phase: str, outcomes: Sequence[Outcome]) -> Check:
    c = counts(outcomes)
    n = len(outcomes)
    return Check(
        f"{phase}: honest tasks completed",
        f"{c['done']}/{n} done, {c['failed']} failed, {c['unfinished']} unfinished",
        "100 %",
        None if n == 0 else c["done"] == n,
    )


def correct_check(what: str, outcomes: Sequence[Outcome]) -> Check:
    n = len(outcomes)
    good = sum(1 for o in outcomes if o.output_ok)
    return Check(what, f"{good}/{n} correct", "100 %", None if n == 0 else good == n)


def ratio_check(plain_rate: float, replicated_rate: float) -> Check:
    ratio = plain_rate / replicated_rate if replicated_rate > 0 else float("nan")
    return budget_le("replicas = 2: single-copy tasks/s ÷ replicated tasks/s", ratio, REPLICATION_BUDGET, "×")


def heartbeat_check(extras: Sequence[tuple[int, float]], expected_s: float) -> Check:
    """The worst affected task's extra time in units of the expected shard time."""
    worst = max((x for _, x in extras), default=float("nan"))
    value = worst / expected_s if expected_s > 0 else float("nan")
    return budget_le(
        "heartbeat-but-silent: extra time of the worst affected task", value, HEARTBEAT_BUDGET, "× expected"
    )


# --- real daemons --------------------------------------------------------------------------------


def _rpc(net: Any, i: int, method: str, params: dict[str, Any]) -> Any:
    from peerd.rpc.client import RpcClient

    with RpcClient(net.socket(i), timeout=30.0) as c:
        return c.call(method, params)


def _start_liar(net: Any, mode: str, script: Path) -> None:
    d = net.node_dir(LIAR)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    with open(d / "peerd.log", "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(script), mode, "--config", str(d / "peerd.toml")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    (d / "peerd.pid").write_text(str(proc.pid))  # Devnet.down() stops it with the rest


def _config(backup_min_s: float, probation: bool = True) -> dict[str, dict[str, Any]]:
    return {
        "offer": {"accept_kinds": ["echo", "sleep"]},
        "market": {
            "lease_ttl_s": LEASE_TTL_S,
            "heartbeat_s": HEARTBEAT_S,
            "bid_window_ms": BID_WINDOW_MS,
            "backup_min_s": backup_min_s,
        },
        "policy": {"probation": probation},
    }


@contextlib.contextmanager
def liar_net(
    name: str, mode: str, *, warmup: int = 0, backup_min_s: float = BACKUP_MIN_S, probation: bool = True
) -> Iterator[Any]:
    """Submitter, 2 honest contractors and the liar in ``mode``; with ``warmup``, the honest
    peers first finish that many tasks (they have history) and the liar joins after. With
    ``probation`` off the submitter believes new peers' claims (``policy.probation``)."""
    from peerd.devnet import Devnet
    from scripts.benchmarks.common import _override_node

    d = bench_dir(name)
    net = Devnet(d)
    script = d / "liar.py"
    script.write_text(LAUNCHER)
    try:
        net.configure(N, _config(backup_min_s, probation))
        _override_node(net.node_dir(SUBMITTER) / "peerd.toml", {"offer": {"accept_kinds": ["sleep"]}})
        net.start(SUBMITTER)
        net.wait_ready(SUBMITTER)
        for i in HONEST:
            net.start(i)
        if warmup:
            for i in HONEST:
                net.wait_ready(i)
            _wait_peers(net, (SUBMITTER, *HONEST), 3)
            for k in range(warmup):
                tid = _rpc(net, SUBMITTER, "task.submit", {"spec": echo_spec(f"warm-up {k}")})["task_id"]
                task = _wait_terminal(net, [tid], 90.0)[tid]
                if task["state"] != "done":
                    raise RuntimeError(f"warm-up task ended {task['state']}: {task.get('reason')}")
        _start_liar(net, mode, script)
        for i in (*HONEST, LIAR):
            net.wait_ready(i)
        _wait_peers(net, tuple(range(N)), N)
        yield net
    finally:
        net.down()
        shutil.rmtree(d, ignore_errors=True)


def _wait_peers(net: Any, nodes: Sequence[int], n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if all(len(_rpc(net, i, "peers.list", {})["peers"]) >= n for i in nodes):
                return
        time.sleep(0.3)
    raise RuntimeError(
        f"peer tables of nodes {list(nodes)} not at {n} after {timeout:.0f} s (logs in {net.dir})"
    )


def echo_spec(data: str, work: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {
        "name": "trust-bench",
        "kind": "echo",
        "work": work,
        "deadline_s": DEADLINE_S,
        "max_shards": 1,
        "params": {"data": data},
        **extra,
    }


def _wait_terminal(net: Any, ids: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll ``task.get`` until every task is terminal or ``timeout`` passes; the last view of each."""
    deadline = time.monotonic() + timeout
    last: dict[str, dict[str, Any]] = {}
    while True:
        for tid in ids:
            if tid not in last or last[tid]["state"] not in TERMINAL:
                last[tid] = _rpc(net, SUBMITTER, "task.get", {"task_id": tid})
        if all(t["state"] in TERMINAL for t in last.values()) or time.monotonic() > deadline:
            return last
        time.sleep(0.5)


def _stdout(net: Any, task: Mapping[str, Any]) -> bytes | None:
    outputs = (task.get("result") or {}).get("outputs") or []
    ref = next((o for o in outputs if str(o["name"]).endswith("stdout")), None)
    if ref is None:
        return None
    chunk = _rpc(net, SUBMITTER, "blob.read", {"sha256": ref["sha256"], "offset": 0, "length": 1 << 16})
    return base64.b64decode(chunk["data_b64"])


def _shorts(net: Any) -> list[str]:
    return [short(net.peer_id(i)) for i in range(N)]


def _run_tasks(net: Any, specs: Sequence[dict[str, Any]], every_s: float) -> tuple[list[Outcome], str | None]:
    """Submit ``specs`` to node 0 (one every ``every_s`` s; 0: at once), wait for all, and
    read each outcome and output. Returns (outcomes, the first submit error)."""
    from peerd.rpc.client import RpcCallError

    submitted: list[tuple[int, str, float]] = []
    t0 = time.time()
    for k, spec in enumerate(specs):
        if every_s > 0:
            time.sleep(max(0.0, t0 + k * every_s - time.time()))
        at = time.time()
        try:
            tid = _rpc(net, SUBMITTER, "task.submit", {"spec": spec})["task_id"]
        except RpcCallError as exc:
            return [], exc.message
        submitted.append((k, tid, at))
    tasks = _wait_terminal(net, [tid for _, tid, _ in submitted], PHASE_TIMEOUT_S)
    shorts = _shorts(net)
    outcomes = []
    for k, tid, at in submitted:
        task = tasks[tid]
        o = outcome_of(k, at, task, shorts)
        if o.state == "done":
            o.output_ok = _stdout(net, task) == str(specs[k]["params"]["data"]).encode()
        outcomes.append(o)
    return outcomes, None


def _liar_claim(net: Any, tid: str) -> tuple[float | None, float | None]:
    """(the liar's C⁰ + ΔC, its cap in the latest award) from ``task.explain``."""
    liar = net.peer_id(LIAR)
    for b in _rpc(net, SUBMITTER, "task.explain", {"task_id": tid})["bids"]:
        if b["peer_id"] == liar:
            return float(b["uncapped"] if b.get("uncapped") is not None else b["capacity"]), b.get("cap")
    return None, None


_CAPPED = re.compile(r"^C of (\S+) capped: .*: ([0-9.eE+-]+) GFLOP/s$")


def epoch0_cap(task: Mapping[str, Any], liar: str) -> float | None:
    """The cap the first award put on ``liar``'s C, from its "C of X capped: …" event."""
    for e in task.get("events", []):
        m = _CAPPED.match(str(e["message"]))
        if m and m.group(1) == liar:
            return float(m.group(2))
    return None


def _counters(net: Any, i: int) -> dict[str, int]:
    return dict(_rpc(net, i, "node.info", {})["counters"])


def _trust_counters(c: Mapping[str, int]) -> str:
    keys = sorted(k for k in c if k.startswith(("trust.", "tasks.reawarded", "dropped.banned", "results.")))
    return ", ".join(f"{k} {c[k]}" for k in keys) or "none"


def _award_table(title: str) -> Table:
    return Table(
        title,
        [
            "phase",
            "tasks",
            "done",
            "failed",
            "liar won (task #, first award)",
            "liar held at a later epoch",
            "first fault detected",
            "liar share of first tasks",
            "wins after fault",
            "load avg",
        ],
    )


def _add_award_row(table: Table, phase: str, outcomes: Sequence[Outcome], s: LiarShare, load: str) -> None:
    c = counts(outcomes)
    t0 = min((o.submitted_at for o in outcomes), default=0.0)
    later = sorted(set(s.won) - set(s.won_first))
    fault = (
        "none"
        if s.first_fault_at is None
        else f"task {s.first_fault_task}, {s.first_fault_at - t0:.1f} s after the first submit"
    )
    table.add(
        phase,
        len(outcomes),
        c["done"],
        c["failed"],
        ", ".join(map(str, s.won_first)) or "none",
        ", ".join(map(str, later)) or "none",
        fault,
        f"{s.first_wins}/{s.first_tasks}",
        len(s.wins_after),
        load,
    )


def _wins_note(s: LiarShare, outcomes: Sequence[Outcome]) -> str:
    t0 = min((o.submitted_at for o in outcomes), default=0.0)
    fault = (
        "no fault detected"
        if s.first_fault_at is None
        else f"first fault detected on task {s.first_fault_task}, "
        f"{s.first_fault_at - t0:.1f} s after the first submit"
    )
    won = ", ".join(map(str, s.won)) or "none"
    return f"the liar held tasks {won} ({len(s.won_first)} at their first award); {fault}"


def _probation_share() -> float:
    from peerd.config import PolicyConfig

    return float(PolicyConfig.probation_share)


def _award_phase(
    res: AreaResult, table: Table, phase: str, mode: str, count: int, warmup: int
) -> list[Outcome]:
    log(
        f"trust: {phase}: {mode} liar, {count} echo tasks one a second"
        + (f" after {warmup} warm-up" if warmup else "")
    )
    with liar_net(phase, mode, warmup=warmup) as net:
        l0 = loadavg()
        specs = [echo_spec(f"{phase} task {k}") for k in range(count)]
        outcomes, err = _run_tasks(net, specs, SUBMIT_EVERY_S)
        if err:
            raise RuntimeError(f"{phase}: task.submit refused: {err}")
        liar = short(net.peer_id(LIAR))
        s = liar_share(outcomes, liar)
        _add_award_row(table, phase, outcomes, s, f"{l0:.1f}-{loadavg():.1f}")
        res.checks.append(complete_check(phase, outcomes))
        res.checks += share_checks(phase, s, _probation_share())
        res.notes.append(f"{phase}: submitter counters: {_trust_counters(_counters(net, SUBMITTER))}")
        bad = [o for o in outcomes if o.state == "done" and not o.output_ok]
        if bad:
            res.notes.append(
                f"{phase}: tasks done with a wrong output: {', '.join(str(o.index) for o in bad)}"
            )
        for o in outcomes:
            if o.state != "done":
                res.notes.append(f"{phase}: task {o.index} {o.state}: {o.reason}")
        return outcomes


def _heartbeat_phase(res: AreaResult, count: int) -> None:
    from peerd.config import MarketConfig

    phase = "heartbeat"
    log(
        f"trust: {phase}: heartbeat-but-silent liar, {count} echo tasks one a second, "
        f"backup_min_s {BACKUP_MIN_S}"
    )
    # Probation off: on a fresh network it caps the liar's claim at the honest peers' (the
    # cold phase measures that), and this phase measures what the attack costs once the
    # liar holds shards.
    with liar_net(phase, "heartbeat", probation=False) as net:
        from peerd.probes import cpu_info
        from protocol.plausibility import CPU_GFLOPS_PER_CORE

        claim = cpu_info().cores * CPU_GFLOPS_PER_CORE  # what the launcher bids (L = 0)
        work = EXPECTED_S * claim
        l0 = loadavg()
        specs = [echo_spec(f"{phase} task {k}", work=work) for k in range(count)]
        outcomes, err = _run_tasks(net, specs, SUBMIT_EVERY_S)
        if err:
            raise RuntimeError(f"{phase}: task.submit refused: {err}")
        l1 = loadavg()
        liar = short(net.peer_id(LIAR))
        hit = [o for o in outcomes if o.first_award is not None and o.first_award.peer == liar]
        c_liar, _ = _liar_claim(net, hit[0].task_id if hit else outcomes[0].task_id)
        caps = [
            cap
            for o in hit
            if (cap := epoch0_cap(_rpc(net, SUBMITTER, "task.get", {"task_id": o.task_id}), liar))
        ]
        c_eff = min([c_liar or claim, *caps])
        expected = work / c_eff  # share 1 (one shard)
        backup_after = MarketConfig.backup_after
        hold = hold_limit_s(expected, backup_after, BACKUP_MIN_S, DEADLINE_S, LEASE_TTL_S)
        base, extras = extra_times(outcomes, liar)
        s = liar_share(outcomes, liar)
        table = Table(
            f"Heartbeat-but-silent liar: {count} echo tasks (work {work:.0f} GFLOP), 1 submitted a second, "
            f"market.backup_min_s = {BACKUP_MIN_S:g} s (default 60), lease TTL {LEASE_TTL_S:g} s",
            [
                "liar C (GFLOP/s)",
                "expected shard time s",
                "hold limit s",
                "tasks held by liar",
                "liar award → backup award s p50",
                "baseline award→done s",
                "extra s p50",
                "extra s max",
                "worst / expected",
                "done",
                "failed",
                "load avg",
            ],
        )
        xs = [x for _, x in extras]
        held = [d for o in hit if (d := backup_delay(o)) is not None]
        c = counts(outcomes)
        table.add(
            c_eff,
            expected,
            hold,
            ", ".join(str(o.index) for o in hit) or "none",
            median(held) if held else float("nan"),
            base,
            median(xs) if xs else float("nan"),
            max(xs) if xs else float("nan"),
            (max(xs) / expected) if xs else float("nan"),
            c["done"],
            c["failed"],
            f"{l0:.1f}-{l1:.1f}",
        )
        res.tables.append(table)
        res.checks.append(heartbeat_check(extras, expected))
        res.checks.append(
            Check(
                "heartbeat-but-silent: tasks failed",
                f"{c['failed'] + c['unfinished']} of {len(outcomes)}",
                "0",
                c["failed"] + c["unfinished"] == 0,
            )
        )
        # No share budget here: probation is off in this phase (the liar must hold shards for
        # the attack to be measured); the cold and warm phases measure the share.
        res.notes.append(f"heartbeat (policy.probation = false): {_wins_note(s, outcomes)}")
        if extras:
            res.notes.append(
                "heartbeat: extra time per affected task (task #: s): "
                + ", ".join(f"{i}: {x:.1f}" for i, x in extras)
            )
        moved = sum(
            1
            for o in hit
            if any(
                "overdue" in str(e["message"])
                for e in _rpc(net, SUBMITTER, "task.get", {"task_id": o.task_id})["events"]
            )
        )
        res.notes.append(
            f"heartbeat: {moved} of the {len(hit)} tasks the liar held were moved as overdue (hold limit), "
            f"not as a lost lease; submitter counters: {_trust_counters(_counters(net, SUBMITTER))}"
        )
        for o in outcomes:
            if o.state != "done":
                res.notes.append(f"heartbeat: task {o.index} {o.state}: {o.reason}")


def _replicate_phase(res: AreaResult, count: int) -> None:
    phase = "replicate"
    log(
        f"trust: {phase}: wrong-result liar, {count} plain then {count} replicated echo tasks, "
        "each batch at once"
    )
    table = Table(
        f"Replication (wrong-result liar): {count} echo tasks per batch, submitted at once",
        ["batch", "done", "failed", "correct outputs", "liar held (tasks)", "tasks/s", "load avg"],
    )
    with liar_net(phase, "wrong") as net:
        liar = short(net.peer_id(LIAR))

        def batch(label: str, specs: list[dict[str, Any]]) -> tuple[list[Any], LiarShare, float]:
            """Run one batch at once; a row of the table: done, failed, correct, the liar's tasks."""
            l0 = loadavg()
            outcomes, err = _run_tasks(net, specs, 0.0)
            if err:
                raise RuntimeError(f"{phase}: task.submit refused a {label} task: {err}")
            share = liar_share(outcomes, liar)
            c = counts(outcomes)
            good = sum(1 for o in outcomes if o.output_ok)
            won = ", ".join(map(str, share.won)) or "none"
            per_s = rate(outcomes)
            table.add(label, c["done"], c["failed"], good, won, per_s, f"{l0:.1f}-{loadavg():.1f}")
            return outcomes, share, per_s

        plain, s, r_plain = batch("plain", [echo_spec(f"plain {k}") for k in range(count)])
        # Not a budget: nothing checks a plain task's output, this shows what the liar gets away with.
        good = sum(1 for o in plain if o.output_ok)
        res.checks.append(
            Check(
                "plain (verify none) outputs correct, wrong-result liar",
                f"{good}/{len(plain)} correct",
                "none (verify = none checks nothing)",
                None,
            )
        )
        res.notes.append(f"replicate, plain batch: {_wins_note(s, plain)}")
        rep_specs = [echo_spec(f"replicated {k}", verify="replicate", replicas=2) for k in range(count)]
        reps, sr, r_rep = batch("replicas = 2", rep_specs)
        res.notes.append(f"replicate, replicated batch: {_wins_note(sr, reps)}")
        res.checks.append(ratio_check(r_plain, r_rep))
        res.checks.append(correct_check("replicate: outputs correct, wrong-result liar", reps))
        res.checks.append(complete_check("replicate", reps))
        for o in reps:
            if o.state != "done":
                res.notes.append(f"replicate: task {o.index} {o.state}: {o.reason}")
        res.notes.append(f"{phase}: submitter counters: {_trust_counters(_counters(net, SUBMITTER))}")
        res.notes.append(
            "replicate: the plain batch runs first, then the replicated one, on the same devnet; "
            "tasks/s = done / (first submit → last done)."
        )
    res.tables.append(table)


def run(quick: bool = False) -> AreaResult:
    res = AreaResult("trust")
    count = QUICK_TASKS if quick else TASKS
    awards = _award_table(
        f"Capacity liar (silent after its award) among 4 peers: {count} echo tasks, 1 submitted a second"
    )
    phases: list[tuple[str, Callable[[], object]]] = [
        ("cold", lambda: _award_phase(res, awards, "cold", "silent", count, warmup=0)),
        ("warm", lambda: _award_phase(res, awards, "warm", "silent", count, warmup=WARMUP)),
        ("heartbeat", lambda: _heartbeat_phase(res, count)),
        ("replicate", lambda: _replicate_phase(res, count)),
    ]
    for name, phase in phases:
        try:
            phase()
        except Exception as exc:  # one phase failing must not lose the others' figures
            log(f"trust: {name} failed: {type(exc).__name__}: {exc}")
            res.notes.append(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            res.error = res.error or f"{name}: {type(exc).__name__}: {exc}"
        if name == "warm":
            res.tables.append(awards)
    res.notes.append(
        f"Devnets: 4 daemons on 127.0.0.1 (node 0 submits and runs no echo, 2 honest, 1 liar); "
        f"bid window {BID_WINDOW_MS} ms, lease TTL {LEASE_TTL_S:g} s, heartbeat {HEARTBEAT_S:g} s, "
        f"market.backup_min_s {BACKUP_MIN_S:g} s (smaller than the default 60 s so the heartbeat phase "
        "runs in seconds; backup_after is the default). The liar bids cores × 256 GFLOP/s at L = 0. "
        "'cold': every daemon starts together (nobody has history); 'warm': the honest peers finish "
        f"{WARMUP} tasks before the liar joins. 'First tasks' = tasks whose first award came at or "
        "before the liar's first detected fault (all tasks when none was detected)."
    )
    return res
