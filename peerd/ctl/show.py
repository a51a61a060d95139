"""``peerctl show TASK``: one task in full (``task.get``): shards, rounds, result, events."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console, Group

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request(task_id: str) -> tuple[str, dict[str, Any]]:
    return "task.get", {"task_id": task_id}


def _metric(metrics: dict[str, Any], *names: str) -> str:
    for name in names:
        if metrics.get(name) is not None:
            return r.num(metrics[name], 4)
    return "-"


def rounds_table(rounds: list[dict[str, Any]]) -> Any:
    t = r.table(
        "round",
        "peers",
        "loss",
        "accuracy",
        "val loss",
        "val acc",
        "certified",
        title="\nrounds",
        right=("round", "peers", "loss", "accuracy", "val loss", "val acc"),
    )
    for rd in rounds:
        participants = rd.get("participants")
        t.add_row(
            str(rd.get("round", "-")),
            str(
                len(participants) if isinstance(participants, list) else participants if participants else "-"
            ),
            _metric(rd, "loss"),
            _metric(rd, "accuracy"),
            _metric(rd, "val_loss"),
            _metric(rd, "val_accuracy"),
            r.yes_no(rd.get("certified")),
        )
    return t


def render(task: dict[str, Any], console: Console) -> None:
    head: list[tuple[str, Any]] = [
        ("task", task.get("task_id", "-")),
        ("kind", task.get("kind", "-")),
        ("state", r.state(task.get("state"))),
    ]
    if task.get("reason"):
        head.append(("reason", task["reason"]))
    head += [
        ("created", r.timestamp(task.get("created_at"))),
        ("updated", r.timestamp(task.get("updated_at"))),
        ("deadline", r.timestamp(task.get("deadline_at"))),
        (
            "demand",
            f"{r.num(task.get('demand'))} (R = W/D)"
            + ("  [under capacity]" if task.get("under_capacity") else ""),
        ),
    ]
    parts: list[Any] = [r.key_values(head)]

    shards = task.get("shards") or []
    if shards:
        t = r.table(
            "shard",
            "peer",
            "state",
            "share",
            "attempts",
            title="\nshards",
            right=("shard", "share", "attempts"),
        )
        for s in shards:
            t.add_row(
                str(s.get("index", "-")),
                r.short_peer(s.get("peer_id")),
                r.state(s.get("state")),
                r.num(s.get("share"), 3),
                str(s.get("attempts", "-")),
            )
        parts.append(t)

    if task.get("rounds"):
        parts.append(rounds_table(task["rounds"]))

    result = task.get("result")
    if result:
        outputs = result.get("outputs") or []
        t = r.table("output", "sha256", "size", title="\nresult", right=("size",))
        for o in outputs:
            t.add_row(str(o.get("name")), str(o.get("sha256", ""))[:16] + "…", r.size(o.get("size")))
        parts.append(t)
        metrics = result.get("metrics") or {}
        rows = [(k, r.num(v, 4)) for k, v in sorted(metrics.items())]
        rows.append(("certificate", "present (peerctl verify)" if result.get("certificate") else "none"))
        parts.append(r.key_values(rows))

    events = task.get("events") or []
    if events:
        t = r.table("at", "state", "message", title="\nevents")
        for e in events:
            t.add_row(r.timestamp(e.get("at")), r.state(e.get("state")), str(e.get("message", "")))
        parts.append(t)
    console.print(Group(*parts))


@click.command("show")
@click.argument("task_id", metavar="TASK")
@json_option
@pass_state
def command(state: CtlState, task_id: str, as_json: bool) -> None:
    """Show TASK: state, shards and their peers, rounds, result and events."""
    r.emit(call(state, *request(task_id)), as_json, render)
