"""``peerctl cancel TASK``: cancel a task and kill its remote workers (``task.cancel``)."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request(task_id: str) -> tuple[str, dict[str, Any]]:
    return "task.cancel", {"task_id": task_id}


def render(result: dict[str, Any], console: Console) -> None:
    console.print("task", result.get("task_id"), r.state(result.get("state")))


@click.command("cancel")
@click.argument("task_id", metavar="TASK")
@json_option
@pass_state
def command(state: CtlState, task_id: str, as_json: bool) -> None:
    """Cancel TASK; its workers are killed and their capacity freed."""
    r.emit(call(state, *request(task_id)), as_json, render)
