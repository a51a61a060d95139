"""``peerctl explain TASK``: why the award went the way it did (``task.explain``).

Every bid with its C = C0 + ΔC, load L, cost C·L, and whether and why it was chosen, so the
award rule of docs/design.md §4 (minimise Σ C·L subject to Σ C ≥ R) can be checked by eye.
A bid whose C the submitter capped (what the peer has shown, or probation) says so and why.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console, Group

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request(task_id: str) -> tuple[str, dict[str, Any]]:
    return "task.explain", {"task_id": task_id}


def render(x: dict[str, Any], console: Console) -> None:
    params = x.get("params") or {}
    head = r.key_values(
        [
            ("task", x.get("task_id", "-")),
            ("demand R", r.num(x.get("demand"), 3)),
            (
                "parameters",
                f"k {r.num(params.get('k'), 3)}   ΔC_min {r.num(params.get('dc_min'), 3)}   "
                f"ΔC_max {r.num(params.get('dc_max'), 3)}",
            ),
            ("max shards", str(x.get("max_shards", "-"))),
            (
                "chosen ΣC",
                r.num(x.get("total_capacity"), 3)
                + ("  [under capacity: no set of bids covers R]" if x.get("under_capacity") else ""),
            ),
            ("chosen ΣC·L", r.num(x.get("total_cost"), 3)),
        ]
    )
    bids = sorted(x.get("bids") or [], key=lambda b: (not b.get("chosen"), b.get("cost") or 0.0))
    t = r.table(
        "peer",
        "C0",
        "L",
        "ΔC",
        "C",
        "cost C·L",
        "chosen",
        title="\nbids",
        right=("C0", "L", "ΔC", "C", "cost C·L"),
    )
    for b in bids:
        t.add_row(
            r.short_peer(b.get("peer_id")),
            r.num(b.get("c0"), 3),
            r.num(b.get("load"), 3),
            r.num(b.get("delta_c"), 3),
            r.num(b.get("capacity"), 3),
            r.num(b.get("cost"), 3),
            r.styled("yes", "green") if b.get("chosen") else "no",
        )
    if not bids:
        t.add_row("(no bids received)", "", "", "", "", "", "")
    # The reasons are sentences: a column of their own would wrap them into slivers.
    why = r.key_values((r.short_peer(b.get("peer_id")), _why(b)) for b in bids)
    console.print(Group(head, t, "\nwhy", why) if bids else Group(head, t))


def _why(b: dict[str, Any]) -> str:
    """The rule's reason, and when the submitter capped the bid's C, by how much and why
    (docs/allocation.md "Caps")."""
    why = str(b.get("why", ""))
    if b.get("cap") is not None:
        why += (
            f"\n  C capped at {r.num(b.get('cap'), 3)} (its bid says {r.num(b.get('uncapped'), 3)}):"
            f" {b.get('cap_why') or 'capped by the submitter'}"
        )
    return why


@click.command("explain")
@click.argument("task_id", metavar="TASK")
@json_option
@pass_state
def command(state: CtlState, task_id: str, as_json: bool) -> None:
    """Show every bid for TASK with C, L, cost, and why it was or was not chosen."""
    r.emit(call(state, *request(task_id)), as_json, render)
