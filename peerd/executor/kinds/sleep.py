"""``sleep``: sleeps ``params["seconds"]`` (tests of deadlines, cancellation and load adverts)."""

from __future__ import annotations

import math
import time

from peerd.executor.kinds._base import Outcome, TaskContext, TaskFailed, param


def run(ctx: TaskContext) -> Outcome:
    seconds = float(param(ctx.params, "seconds", (int, float)))
    if not math.isfinite(seconds) or seconds < 0:
        raise TaskFailed("task_error", "parameter 'seconds' must be a finite number >= 0")
    time.sleep(seconds)
    return Outcome(metrics={"slept": seconds})
