"""peerd's execution layer: the bubblewrap sandbox, the warm worker pool and the worker process.

The daemon uses :class:`WorkerPool` (``execute(job) -> JobResult``); the worker entry point is
``python -m peerd.executor.worker`` and is the only code in peerd that imports TensorFlow/Keras,
lazily and only inside a sandbox. See docs/execution.md.

Exports are resolved lazily (PEP 562) so that the worker, which imports this package on its way
to ``peerd.executor.worker``, does not import trio and psutil for nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peerd.executor.limits import ERRORS, Job, JobResult, Limits
    from peerd.executor.pool import WorkerPool
    from peerd.executor.sandbox import SandboxReport, SandboxUnavailable, probe_sandbox

_EXPORTS = {
    "ERRORS": "peerd.executor.limits",
    "Job": "peerd.executor.limits",
    "JobResult": "peerd.executor.limits",
    "Limits": "peerd.executor.limits",
    "WorkerPool": "peerd.executor.pool",
    "SandboxReport": "peerd.executor.sandbox",
    "SandboxUnavailable": "peerd.executor.sandbox",
    "probe_sandbox": "peerd.executor.sandbox",
}

__all__ = [
    "ERRORS",
    "Job",
    "JobResult",
    "Limits",
    "SandboxReport",
    "SandboxUnavailable",
    "WorkerPool",
    "probe_sandbox",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'peerd.executor' has no attribute {name!r}")
