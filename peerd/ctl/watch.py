"""``peerctl watch TASK``: follow a task live (``task.watch`` and its notifications).

Human output is a progress bar on a terminal (rounds for multi-round training, a pulse
otherwise) with one line per state change or certified round above it: the daemon says a round
twice (a state event "round N/R certified by …" and a round event with its metrics), and the
two are printed as one line, the progress moving on the first. ``--json`` prints the task object and then
every notification as one JSON document per line. The exit code is 0 when the task ends
``done`` and 1 when it ends ``failed`` or ``cancelled``.
"""

from __future__ import annotations

import re
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from peerd.ctl import CtlState, ExitCode, json_option, pass_state, rpc_errors, show
from peerd.ctl import render as r
from peerd.rpc.jsonrpc import Notification


def request(task_id: str) -> tuple[str, dict[str, Any]]:
    return "task.watch", {"task_id": task_id}


def exit_code(task: dict[str, Any]) -> ExitCode:
    return ExitCode.OK if task.get("state") == "done" else ExitCode.ERROR


#: The submitter's state event for a certified round (peerd/submitter.py).
CERTIFIED = re.compile(r"^round (\d+)/\d+ certified (by \d+ of \d+)")


def describe_event(
    ev: dict[str, Any], total_rounds: int | None = None, certified_by: str | None = None
) -> str:
    """One line for a ``task.event``: its state and message, or a certified round's metrics."""
    if ev.get("round") is not None:
        metrics = ev.get("metrics") or {}
        of = f"/{total_rounds}" if total_rounds else ""
        parts = [f"round {ev['round']}{of}"]
        if certified_by:
            parts.append(f"certified {certified_by}")
        if metrics.get("participants") is not None:
            p = metrics["participants"]
            parts.append(f"peers {len(p) if isinstance(p, list) else p}")
        for key, label in (
            ("loss", "loss"),
            ("accuracy", "acc"),
            ("val_loss", "val loss"),
            ("val_accuracy", "val acc"),
        ):
            if metrics.get(key) is not None:
                parts.append(f"{label} {r.num(metrics[key], 4)}")
        if ev.get("message") and not re.fullmatch(r"round \d+ certified", str(ev["message"])):
            parts.append(str(ev["message"]))
        return "  ".join(parts)
    return f"{ev.get('state', '-'):<12} {ev.get('message', '')}".rstrip()


class _View:
    def __init__(self, console: Console, task: dict[str, Any]) -> None:
        rounds = (task.get("spec") or {}).get("rounds")
        self.total = rounds if isinstance(rounds, int) and rounds > 1 else None
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn() if self.total else TextColumn(""),
            TimeElapsedColumn(),
            console=console,
            # Not a terminal (a pipe, a log): the event lines only, no bar frames between them.
            disable=not console.is_terminal,
        )
        #: A round's state event waiting for its round event: (round, "by X of Y", the event).
        self.pending: tuple[int, str, dict[str, Any]] | None = None
        self.bar = self.progress.add_task(self._label(task.get("state")), total=self.total)
        done_rounds = sum(1 for rd in task.get("rounds") or [] if rd.get("certified"))
        self.progress.update(self.bar, completed=done_rounds)

    def _label(self, state: Any) -> str:
        # The progress bar's description is rich markup; the state comes from the daemon.
        style = r.STATE_STYLES.get(str(state))
        return f"[{style}]{escape(str(state))}[/]" if style else escape(str(state))

    def _print(self, ev: dict[str, Any], certified_by: str | None = None) -> None:
        at = r.timestamp(ev.get("at")) if ev.get("at") else ""
        line = describe_event(ev, self.total, certified_by)
        self.console.print(Text.assemble((at + " " if at else "", "dim"), line))

    def flush(self) -> None:
        if self.pending is not None:
            self._print(self.pending[2])
            self.pending = None

    def event(self, ev: dict[str, Any]) -> None:
        if ev.get("state"):
            self.progress.update(self.bar, description=self._label(ev["state"]))
        m = CERTIFIED.match(str(ev.get("message") or "")) if ev.get("round") is None else None
        if m:
            # The round is certified now: move the bar, print once its metrics arrive.
            self.flush()
            self.pending = (int(m.group(1)), m.group(2), ev)
            if self.total:
                self.progress.update(self.bar, completed=int(m.group(1)))
            return
        if ev.get("round") is not None:
            by = None
            if self.pending is not None and self.pending[0] == int(ev["round"]):
                by, self.pending = self.pending[1], None
            self.flush()
            self._print(ev, by)
            if self.total:
                self.progress.update(self.bar, completed=int(ev["round"]))
            return
        self.flush()
        self._print(ev)

    def end(self, task: dict[str, Any]) -> None:
        self.flush()
        if self.total and task.get("state") == "done":
            self.progress.update(self.bar, completed=self.total)
        self.progress.update(self.bar, description=self._label(task.get("state")))


def render_end(task: dict[str, Any], console: Console) -> None:
    line = Text.assemble(f"task {task.get('task_id')} ", r.state(task.get("state")))
    if task.get("reason"):
        line.append(f": {task['reason']}")
    console.print(line)
    if task.get("rounds"):
        console.print(show.rounds_table(task["rounds"]))
    result = task.get("result") or {}
    metrics = result.get("metrics") or {}
    if metrics:
        console.print(r.key_values((k, r.num(v, 4)) for k, v in sorted(metrics.items())))
    if result.get("outputs"):
        n = len(result["outputs"])
        console.print(
            f"outputs: {n} file{'s' if n != 1 else ''} — `peerctl result {task.get('task_id')} -o DIR` "
            "writes them to DIR/outputs/shard-<i>/<name>"
        )


def follow(state: CtlState, task_id: str, as_json: bool) -> ExitCode:
    """Watch ``task_id`` until it ends; returns the exit code for its final state."""
    return follow_task(state, task_id, as_json)[0]


def follow_task(state: CtlState, task_id: str, as_json: bool) -> tuple[ExitCode, dict[str, Any]]:
    """:func:`follow`, also returning the task as it ended."""
    final: dict[str, Any] | None = None
    with rpc_errors(), state.client() as rpc:
        sub = rpc.subscribe(*request(task_id))
        task: dict[str, Any] = sub.result
        if as_json:
            r.emit_json_line({"task": task})
            for note in sub:
                r.emit_json_line({"method": note.method, "params": note.params})
                final = _final(note, final)
        else:
            console = r.stdout()
            view = _View(console, task)
            with view.progress:
                for note in sub:
                    if note.method == "task.event":
                        view.event(note.params)
                    final = _final(note, final)
                    if final is not None:
                        view.end(final)
            render_end(final or task, console)
    return exit_code(final or task), final or task


def _final(note: Notification, current: dict[str, Any] | None) -> dict[str, Any] | None:
    if note.method == "task.end" and isinstance(note.params.get("task"), dict):
        return note.params["task"]
    return current


@click.command("watch")
@click.argument("task_id", metavar="TASK")
@json_option
@pass_state
def command(state: CtlState, task_id: str, as_json: bool) -> None:
    """Follow TASK live until it ends (exit 0 if done, 1 if failed or cancelled)."""
    raise SystemExit(int(follow(state, task_id, as_json)))


__all__ = ["command", "describe_event", "exit_code", "follow", "follow_task", "request"]
