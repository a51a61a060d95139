"""``peerctl peers``: every verified, unexpired advert in the peer table (``peers.list``),
with what this node has seen each peer deliver (history, trust; peerd/reputation.py).

``peers.list`` answers one page at a time (docs/rpc.md); this command follows the ``next``
cursors on one connection and shows all pages together.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, fail, json_option, pass_state, rpc_errors
from peerd.ctl import render as r
from peerd.rpc import PEERS_PAGE_MAX

#: A bound on the pages followed, far beyond any table (``network.max_peers`` is 1024 by
#: default and a page up to 1024): a daemon that kept answering ``next`` cannot loop us forever.
MAX_PAGES = 10_000


def request(after: str | None = None, limit: int | None = None) -> tuple[str, dict[str, Any]]:
    """The request for the page after peer ID ``after`` (None: the first page).

    No ``limit`` means the daemon's default page size; a first request without params is also
    what a daemon from before paging understands (it then answers everything, without ``next``).
    """
    params: dict[str, Any] = {}
    if after is not None:
        params["after"] = after
    if limit is not None:
        params["limit"] = limit
    return "peers.list", params


def fetch_all(state: CtlState, limit: int | None = None) -> dict[str, Any]:
    """Every page of ``peers.list``, as one ``{"peers": [...]}``."""
    peers: list[Any] = []
    after: str | None = None
    with rpc_errors(), state.client() as rpc:
        for _ in range(MAX_PAGES):
            result = rpc.call(*request(after, limit))
            peers += result.get("peers", [])
            nxt = result.get("next")
            if nxt is None:
                return {"peers": peers}
            if not isinstance(nxt, str) or (after is not None and nxt <= after):
                fail(f"peers.list: the daemon's next cursor {nxt!r} does not move forward")
            after = nxt
    fail(f"peers.list: still more after {MAX_PAGES} pages; giving up")


def _gpus(gpus: list[dict[str, Any]]) -> str:
    if not gpus:
        return "-"
    models: dict[str, int] = {}
    for g in gpus:
        models[str(g.get("model", "?"))] = models.get(str(g.get("model", "?")), 0) + 1
    return ", ".join(f"{n}× {m}" for m, n in models.items())


def _trust(t: dict[str, Any] | None) -> tuple[str, str]:
    """The history and trust columns: what this node has seen the peer deliver, as a
    submitter (docs/allocation.md "Caps"). "new": no record (on probation)."""
    if not t:
        return "new", "-"
    bad = float(t.get("failed") or 0) + float(t.get("timed_out") or 0) + float(t.get("disagreed") or 0)
    history = f"{float(t.get('done') or 0):.1f} done / {bad:.1f} bad"
    if t.get("shown_gflops") is not None:
        history += f", shown {r.num(t.get('shown_gflops'), 1)}"
    trust = r.num(t.get("trust"), 2)
    if t.get("banned"):
        trust += " banned"
    return history, trust


def _rtt(ms: Any) -> str:
    """The round trip this node measured to the peer (docs/rpc.md ``rtt_ms``); "-" when none."""
    if not isinstance(ms, int | float) or isinstance(ms, bool):
        return "-"
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def render(result: dict[str, Any], console: Console) -> None:
    peers = sorted(result.get("peers", []), key=lambda p: (not p.get("self"), str(p.get("peer_id"))))
    if not peers:
        console.print("no peers yet (is the bootstrap list right? see `peerctl status`)")
        return
    t = r.table(
        "peer",
        "C0",
        "L",
        "C",
        "cores",
        "GPUs",
        "memory",
        "age",
        "rtt",
        "history",
        "trust",
        right=("C0", "L", "C", "cores", "age", "rtt", "trust"),
    )
    for p in peers:
        offer, memory = p.get("offer") or {}, p.get("memory") or {}
        peer = r.short_peer(p.get("peer_id"), is_self=bool(p.get("self")))
        if offer.get("draining"):
            peer += " [draining]"
        t.add_row(
            peer,
            r.num(p.get("c0"), 1),
            r.num(p.get("load")),
            r.num(p.get("capacity"), 1),
            str(offer.get("cores", (p.get("cpu") or {}).get("cores", "-"))),
            _gpus(p.get("gpus") or []),
            f"{r.megabytes(memory.get('available_mb'))} / {r.megabytes(memory.get('total_mb'))}",
            r.duration(p.get("age_s")),
            _rtt(p.get("rtt_ms")),
            *_trust(p.get("trust")),
        )
    console.print(t)
    console.print(f"{len(peers)} peer{'s' if len(peers) != 1 else ''}", style="dim")


@click.command("peers")
@click.option(
    "--page-size",
    type=click.IntRange(1, PEERS_PAGE_MAX),
    default=None,
    help=f"Peers per request, at most {PEERS_PAGE_MAX} (default: the daemon's page size). "
    "All pages are shown.",
)
@json_option
@pass_state
def command(state: CtlState, page_size: int | None, as_json: bool) -> None:
    """List peers and their signed capacity adverts."""
    r.emit(fetch_all(state, page_size), as_json, render)
