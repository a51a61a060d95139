"""``peerctl tasks``: tasks this node submitted (``task.list``)."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request() -> tuple[str, dict[str, Any]]:
    return "task.list", {}


def render(result: dict[str, Any], console: Console) -> None:
    tasks = sorted(result.get("tasks", []), key=lambda t: t.get("created_at") or 0)
    if not tasks:
        console.print("no tasks")
        return
    t = r.table("task", "kind", "state", "shards", "created", "updated", "reason", right=("shards",))
    for task in tasks:
        t.add_row(
            str(task.get("task_id")),
            str(task.get("kind", "-")),
            r.state(task.get("state")),
            str(task.get("shards", "-")),
            r.timestamp(task.get("created_at")),
            r.ago(task.get("updated_at")),
            str(task.get("reason") or ""),
        )
    console.print(t)


@click.command("tasks")
@json_option
@pass_state
def command(state: CtlState, as_json: bool) -> None:
    """List tasks."""
    r.emit(call(state, *request()), as_json, render)
