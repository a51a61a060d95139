"""``peerctl watch`` output: one line per certified round, the bar moving with the certificate,
no bar frames when the output is not a terminal (issue 12)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from peerd.ctl import watch


def round_events(rnd: int, total: int) -> list[dict[str, Any]]:
    # What the daemon sends for one certified round (peerd/submitter.py): a state event, then
    # the round event with its metrics.
    return [
        {
            "state": "running",
            "message": f"round {rnd}/{total} certified by 2 of 3; val accuracy 0.9000",
            "at": 1,
        },
        {
            "state": "running",
            "round": rnd,
            "metrics": {"participants": ["a", "b"], "loss": 0.25, "accuracy": 1.0, "val_accuracy": 0.9},
            "message": f"round {rnd} certified",
            "at": 1,
        },
    ]


def test_one_line_per_round_and_the_bar_follows_the_certificate() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, highlight=False, markup=False)
    view = watch._View(console, {"state": "running", "spec": {"rounds": 3}, "rounds": []})
    view.event({"state": "running", "message": "awarded 2 shard(s) to a, b", "at": 1})
    for ev in round_events(1, 3):
        view.event(ev)
    # Certified (the state event) is progress at once, before the metrics arrive.
    view.event(round_events(2, 3)[0])
    assert view.progress.tasks[0].completed == 2
    view.event(round_events(2, 3)[1])
    view.end({"state": "done"})
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    round_lines = [ln for ln in lines if "round" in ln]
    assert len(round_lines) == 2, lines
    assert "round 1/3  certified by 2 of 3  peers 2  loss 0.2500  acc 1  val acc 0.9000" in round_lines[0]
    assert "round 2/3" in round_lines[1]
    assert not any("━" in ln for ln in lines), "no progress bar frames when not a terminal"


def test_a_round_whose_metrics_never_come_still_prints_once() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, highlight=False, markup=False)
    view = watch._View(console, {"state": "running", "spec": {"rounds": 2}, "rounds": []})
    view.event(round_events(1, 2)[0])
    view.event({"state": "aggregating", "message": "fetching the final model", "at": 1})
    view.end({"state": "done"})
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert [("certified by 2 of 3" in ln) for ln in lines] == [True, False], lines
