"""``peerctl peers``: every verified, unexpired advert in the peer table (``peers.list``)."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request() -> tuple[str, dict[str, Any]]:
    return "peers.list", {}


def _gpus(gpus: list[dict[str, Any]]) -> str:
    if not gpus:
        return "-"
    models: dict[str, int] = {}
    for g in gpus:
        models[str(g.get("model", "?"))] = models.get(str(g.get("model", "?")), 0) + 1
    return ", ".join(f"{n}× {m}" for m, n in models.items())


def render(result: dict[str, Any], console: Console) -> None:
    peers = sorted(result.get("peers", []), key=lambda p: (not p.get("self"), str(p.get("peer_id"))))
    if not peers:
        console.print("no peers yet (is the bootstrap list right? see `peerctl status`)")
        return
    t = r.table(
        "peer", "C0", "L", "C", "cores", "GPUs", "memory", "age", right=("C0", "L", "C", "cores", "age")
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
        )
    console.print(t)
    console.print(f"{len(peers)} peer{'s' if len(peers) != 1 else ''}", style="dim")


@click.command("peers")
@json_option
@pass_state
def command(state: CtlState, as_json: bool) -> None:
    """List peers and their signed capacity adverts."""
    r.emit(call(state, *request()), as_json, render)
