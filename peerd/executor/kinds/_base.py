"""What a kind sees inside the worker, and how it reports success or failure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TaskContext:
    job_id: str
    params: Mapping[str, Any]
    inputs: Mapping[str, Path]  # name -> read-only file inside the sandbox
    workdir: Path  # the task's cwd (writable, size-capped)
    limits: Mapping[str, Any]  # Limits.to_wire()
    trusted: bool = False
    #: Address-space cap for child processes when there is no memory cgroup (None: the cgroup caps memory).
    as_backstop: int | None = None
    #: name -> content id of that input (the blob's sha256 when the pool knows it): what the
    #: resident cache keys decoded data by (peerd.executor.kinds._resident). Absent: no caching.
    input_ids: Mapping[str, str] = field(default_factory=dict)
    #: The task this job belongs to, when the pool was told (frees resident entries at its end).
    task: str | None = None


@dataclass
class Outcome:
    outputs: dict[str, bytes] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None
    detail: str = ""


class TaskFailed(Exception):
    """A kind ends its job with ``error`` (one of peerd.executor.limits.ERRORS)."""

    def __init__(
        self,
        error: str,
        detail: str,
        *,
        outputs: dict[str, bytes] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.outputs = outputs or {}
        self.metrics = metrics or {}


def param(params: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
    """Fetch and type-check one parameter; bad params are the submitter's error, not a crash."""
    if name not in params:
        if default is ...:
            raise TaskFailed("task_error", f"missing parameter {name!r}")
        return default
    value = params[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TaskFailed("task_error", f"parameter {name!r} must be {types}, not bool")
    if not isinstance(value, types):
        raise TaskFailed("task_error", f"parameter {name!r} has type {type(value).__name__}")
    return value
