"""Task kinds the worker can run, and which warm worker class each needs.

Importing this package imports nothing heavy: each kind's module is loaded on first use inside the
worker, and only the keras kinds import Keras/TensorFlow (and only inside a sandboxed worker).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from peerd.executor.kinds._base import Outcome, TaskContext, TaskFailed
from peerd.kinds import KINDS

#: kind -> worker class (peerd/kinds.py). "light" workers start in ~0.1 s and import no
#: TensorFlow; "tf" workers pre-import Keras so a keras job does not pay TensorFlow's 2–10 s import.
KIND_CLASS: dict[str, str] = {k.name: k.worker_class for k in KINDS.values()}

#: Kinds whose worker may serve further jobs of the same submitter. Not "python": a script can
#: leave processes or state behind in the sandbox, so its worker is always killed afterwards.
REUSABLE: frozenset[str] = frozenset(k.name for k in KINDS.values() if k.reusable_worker)


def load_kind(kind: str) -> Callable[[TaskContext], Outcome]:
    mod = importlib.import_module(f"peerd.executor.kinds.{KINDS[kind].module}")
    run: Callable[[TaskContext], Outcome] = mod.run
    return run


__all__ = ["KIND_CLASS", "REUSABLE", "Outcome", "TaskContext", "TaskFailed", "load_kind"]
