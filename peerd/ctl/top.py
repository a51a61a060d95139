"""``peerctl top``: a live view of this node, refreshed every ``--interval`` seconds.

Over the ordinary socket and read methods only (docs/rpc.md): ``node.info`` (this node, its
worker slots, its counters), ``peers.list`` (one page: the peers with their C, L and, where
an advert carries one, trust), ``task.list`` and, for the tasks that have not ended, ``task.get``
(their shards and certified rounds, for the progress column). Message rates are the growth of
the daemon's counters between two refreshes, so the first frame shows none.

On a terminal the view redraws in place until Ctrl-C; otherwise (a pipe, a file, ``--once``,
``--iterations N``) each refresh is printed once, full width, one after the other.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.text import Text

from peerd.ctl import CtlState, ExitCode, pass_state, rpc_errors
from peerd.ctl import render as r
from peerd.rpc import PEERS_PAGE_MAX

#: Tasks whose details (``task.get``) are fetched per refresh: the newest unfinished ones.
DETAIL_TASKS = 10
TERMINAL = ("done", "failed", "cancelled")

Call = Callable[[str, dict[str, Any]], Any]


@dataclass(frozen=True)
class Options:
    interval: float = 2.0
    iterations: int | None = None  # None: until interrupted
    peers: int = 20
    tasks: int = 10


def options(interval: float, once: bool, iterations: int | None, peers: int, tasks: int) -> Options:
    """The command line as :class:`Options` (``--once`` is ``--iterations 1``)."""
    if interval <= 0:
        raise click.BadParameter("must be greater than 0", param_hint="--interval")
    if iterations is not None and iterations < 1:
        raise click.BadParameter("must be at least 1", param_hint="--iterations")
    if once and iterations not in (None, 1):
        raise click.BadParameter("--once is --iterations 1", param_hint="--once")
    if not 1 <= peers <= PEERS_PAGE_MAX:
        raise click.BadParameter(f"must be between 1 and {PEERS_PAGE_MAX}", param_hint="--peers")
    if tasks < 0:
        raise click.BadParameter("must be at least 0", param_hint="--tasks")
    return Options(interval=interval, iterations=1 if once else iterations, peers=peers, tasks=tasks)


def requests(opts: Options) -> list[tuple[str, dict[str, Any]]]:
    """The calls of one refresh, before the per-task details."""
    return [("node.info", {}), ("peers.list", {"limit": opts.peers}), ("task.list", {})]


def detail_requests(
    tasks: list[dict[str, Any]], limit: int = DETAIL_TASKS
) -> list[tuple[str, dict[str, Any]]]:
    """``task.get`` for the newest ``limit`` tasks that have not ended."""
    live = [t for t in tasks if t.get("state") not in TERMINAL]
    live.sort(key=lambda t: t.get("created_at") or 0, reverse=True)
    return [("task.get", {"task_id": t["task_id"]}) for t in live[:limit] if t.get("task_id")]


@dataclass
class Snapshot:
    at: float
    info: dict[str, Any]
    peers: dict[str, Any]
    tasks: list[dict[str, Any]]
    details: dict[str, dict[str, Any]] = field(default_factory=dict)


def snapshot(call: Call, opts: Options, *, now: Callable[[], float] = time.monotonic) -> Snapshot:
    info, peers, tasks = (call(m, p) for m, p in requests(opts))
    task_rows = list(tasks.get("tasks") or [])
    details = {}
    for method, params in detail_requests(task_rows):
        details[params["task_id"]] = call(method, params)
    return Snapshot(at=now(), info=info, peers=peers, tasks=task_rows, details=details)


# --- rendering ----------------------------------------------------------------------------------


def rates(prev: Snapshot | None, cur: Snapshot) -> dict[str, float] | None:
    """Messages per second since ``prev``: in (accepted gossip, by kind), dropped, out (published)."""
    if prev is None or cur.at <= prev.at:
        return None
    dt = cur.at - prev.at
    a, b = prev.info.get("counters") or {}, cur.info.get("counters") or {}

    def delta(pred: Callable[[str], bool]) -> float:
        return sum(max(0, int(b.get(k, 0)) - int(a.get(k, 0))) for k in b if pred(k)) / dt

    out = {
        f"in {k.removeprefix('accepted.')}": delta(lambda n, k=k: n == k)  # type: ignore[misc]
        for k in sorted(b)
        if k.startswith("accepted.")
    }
    out["in (all)"] = delta(lambda n: n.startswith("accepted."))
    out["dropped"] = delta(lambda n: n.startswith("dropped."))
    out["out"] = delta(lambda n: n == "p2p.gossip_published")
    return out


def progress(task: dict[str, Any], detail: dict[str, Any] | None) -> str:
    """``round 2/5`` for multi-round tasks, else ``shards 1/3 done``; ``-`` before an award."""
    if detail is None:
        return "-" if task.get("state") not in TERMINAL else ""
    total_rounds = (detail.get("spec") or {}).get("rounds")
    if isinstance(total_rounds, int) and total_rounds > 1:
        done = sum(1 for rd in detail.get("rounds") or [] if rd.get("certified"))
        return f"round {done}/{total_rounds}"
    shards = detail.get("shards") or []
    if not shards:
        return "-"
    done = sum(1 for s in shards if s.get("state") == "done")
    return f"shards {done}/{len(shards)} done"


def render(snap: Snapshot, prev: Snapshot | None, opts: Options) -> RenderableType:
    info = snap.info
    advert = info.get("advert") or {}
    offer = advert.get("offer") or {}
    me = info.get("peer_id", "-")
    head = Text.assemble(
        ("peerd ", "bold"),
        f"{me}  v{info.get('version', '?')}  up {r.duration(info.get('uptime_s'))}  "
        f"peers connected {info.get('connected_peers', '-')}",
    )
    slots = Text(
        f"worker slots {offer.get('busy', '-')}/{offer.get('slots', '-')} busy   "
        f"L {r.num(advert.get('load'))}   C0 {r.num(advert.get('c0'))}   C {r.num(advert.get('capacity'))}"
        + ("   DRAINING" if offer.get("draining") else "")
    )
    rate = rates(prev, snap)
    msgs = Text(
        "messages/s  "
        + ("(next refresh)" if rate is None else "   ".join(f"{k} {v:.1f}" for k, v in rate.items()))
    )

    peer_rows = list(snap.peers.get("peers") or [])
    peer_rows.sort(key=lambda p: -(p.get("capacity") or 0))
    has_trust = any("trust" in p for p in peer_rows)
    cols = ["peer", "C", "L", "C0", "slots", "age"] + (["trust"] if has_trust else [])
    more = " (more not shown)" if snap.peers.get("next") else ""
    pt = r.table(
        *cols, title=f"\npeers: {len(peer_rows)}{more}", right=("C", "L", "C0", "slots", "age", "trust")
    )
    for p in peer_rows[: opts.peers]:
        o = p.get("offer") or {}
        row = [
            r.short_peer(p.get("peer_id"), is_self=bool(p.get("self"))),
            r.num(p.get("capacity")),
            r.num(p.get("load")),
            r.num(p.get("c0")),
            f"{o.get('busy', '-')}/{o.get('slots', '-')}",
            r.duration(p.get("age_s")),
        ]
        if has_trust:
            row.append(r.num(p.get("trust")) if "trust" in p else "-")
        pt.add_row(*row)

    tasks = sorted(snap.tasks, key=lambda t: t.get("created_at") or 0, reverse=True)
    tt = r.table("task", "name", "kind", "role", "state", "progress", "age", title=f"\ntasks: {len(tasks)}")
    now = time.time()
    for t in tasks[: opts.tasks]:
        tt.add_row(
            str(t.get("task_id", "-")),
            str(t.get("name") or ""),
            str(t.get("kind", "-")),
            str(t.get("role", "-")),
            r.state(t.get("state")),
            progress(t, snap.details.get(str(t.get("task_id")))),
            r.duration(now - t["created_at"]) if isinstance(t.get("created_at"), int | float) else "-",
        )
    return Group(head, slots, msgs, pt, tt)


@click.command("top")
@click.option(
    "--interval", "-n", type=float, default=2.0, show_default=True, help="Seconds between refreshes."
)
@click.option("--once", is_flag=True, help="Print one view and exit (same as --iterations 1).")
@click.option("--iterations", type=int, default=None, help="Refresh N times, then exit.")
@click.option("--peers", "peers_limit", type=int, default=20, show_default=True, help="Peers shown.")
@click.option("--tasks", "tasks_limit", type=int, default=10, show_default=True, help="Tasks shown.")
@pass_state
def command(
    state: CtlState, interval: float, once: bool, iterations: int | None, peers_limit: int, tasks_limit: int
) -> None:
    """A live view of this node: peers (C, L), tasks and their progress, worker slots, message rates."""
    opts = options(interval, once, iterations, peers_limit, tasks_limit)
    console = r.stdout()
    live = console.is_terminal and opts.iterations is None
    prev: Snapshot | None = None
    count = 0
    with rpc_errors(), state.client() as rpc:
        try:
            if live:
                from rich.live import Live

                with Live(console=console, screen=True, auto_refresh=False) as view:
                    while True:
                        snap = snapshot(rpc.call, opts)
                        view.update(render(snap, prev, opts), refresh=True)
                        prev = snap
                        time.sleep(opts.interval)
            while opts.iterations is None or count < opts.iterations:
                if count:
                    time.sleep(opts.interval)
                snap = snapshot(rpc.call, opts)
                console.print(render(snap, prev, opts))
                sys.stdout.flush()
                prev, count = snap, count + 1
        except KeyboardInterrupt:
            pass
    raise SystemExit(int(ExitCode.OK))


__all__ = [
    "Options",
    "Snapshot",
    "command",
    "detail_requests",
    "options",
    "progress",
    "rates",
    "render",
    "requests",
    "snapshot",
]
