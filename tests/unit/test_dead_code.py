"""Code the issue 7 review found unused stays gone (each was written or defined, never read)."""

from __future__ import annotations

import inspect

import peerd.executor.limits as limits
import peerd.executor.sandbox as sandbox
import peerd.rpc as rpc
from peerd.contractor import Contractor
from peerd.executor.pool import _Worker
from peerd.store import Store


def test_unused_names_are_removed() -> None:
    assert not hasattr(Store, "mark_fetched")
    assert not hasattr(sandbox, "clear_probe_cache")
    assert not hasattr(rpc, "TASK_STATES") and "TASK_STATES" not in rpc.__all__
    assert "ready_error" not in _Worker.__dataclass_fields__
    assert "_bid_tasks" not in inspect.getsource(Contractor.__init__)


def test_cgroup_probe_writes_back_what_it_read() -> None:
    # The probe wrote `current if current != "max" else "max"`: the value it read, either way.
    assert '!= "max" else "max"' not in inspect.getsource(limits._v1_pool_dir)
