"""``echo``: returns ``params["data"]`` as the output ``stdout`` (tests, benchmarks, no-op tasks)."""

from __future__ import annotations

from peerd.executor.kinds._base import Outcome, TaskContext, TaskFailed


def run(ctx: TaskContext) -> Outcome:
    data = ctx.params.get("data", b"")
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, bytes):
        raise TaskFailed("task_error", "parameter 'data' must be bytes or str")
    return Outcome(outputs={"stdout": data}, metrics={"bytes": float(len(data))})
