"""The warm worker's resident cache (decoded data, compiled models) — no TensorFlow, no sandbox.

What the keras kinds keep between rounds of a task (docs/tasks.md "keras-train across rounds"):
reuse within a task, keyed by content; freed when the task ends; bounded by a byte budget.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peerd.executor.kinds import TaskContext, TaskFailed, _keras
from peerd.executor.kinds._resident import BUDGET_SHARE, ResidentCache, content_key
from peerd.executor.limits import Limits
from peerd.executor.pool import content_id
from peerd.executor.worker import Worker


def ctx(
    tmp_path: Path,
    data: Path,
    *,
    data_id: str | None = "sha256:" + "ab" * 32,
    task: str | None = "t1",
    params: dict[str, Any] | None = None,
    memory_bytes: int = 1 << 30,
) -> TaskContext:
    return TaskContext(
        job_id="j",
        params=params or {},
        inputs={"data": data},
        workdir=tmp_path,
        limits=Limits(memory_bytes=memory_bytes).to_wire(),
        input_ids={"data": data_id} if data_id is not None else {},
        task=task,
    )


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "shard.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((50, 4), dtype=np.float32), y=rng.integers(0, 3, 50))
    return path


def test_lru_order_entry_cap_and_byte_budget() -> None:
    cache = ResidentCache(max_entries=3)
    for k in "abc":
        cache.put(k, k.upper(), 100)
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", "D", 100)  # over 3 entries: the least recently used (b) goes
    assert cache.keys() == ["c", "a", "d"]
    assert cache.nbytes == 300
    # Down to 150 bytes, sparing d: c then a go, least recently used first.
    assert cache.trim(150, keep=("d",)) == 2
    assert cache.keys() == ["d"]
    assert cache.trim(50, keep=("d",)) == 0 and "d" in cache


def test_forget_task_frees_only_entries_no_other_task_uses() -> None:
    cache = ResidentCache()
    cache.put("shared-data", 1, 10, task="t1")
    assert cache.get("shared-data", task="t2") is not None  # a second task uses the same bytes
    cache.put("model-1", 2, 10, task="t1")
    cache.put("untagged", 3, 10)
    assert cache.forget_task("t1") == 1
    assert cache.keys() == ["shared-data", "untagged"]
    assert cache.forget_task("t2") == 1
    assert cache.keys() == ["untagged"]  # no task named: only the LRU or the worker's end frees it
    assert cache.forget_task("never-seen") == 0


def test_content_key_depends_on_every_part() -> None:
    base = content_key("data", data="sha256:x", range=None)
    assert base == content_key("data", range=None, data="sha256:x")  # order of parts is irrelevant
    assert base != content_key("data", data="sha256:y", range=None)
    assert base != content_key("data", data="sha256:x", range=[0, 10])
    assert base != content_key("train-model", data="sha256:x", range=None)


def test_data_decoded_once_per_content_and_range(tmp_path: Path, shard: Path) -> None:
    cache = ResidentCache()
    x1, y1, hit1 = _keras.data_for(ctx(tmp_path, shard), need_y=True, cache=cache)
    x2, y2, hit2 = _keras.data_for(ctx(tmp_path, shard), need_y=True, cache=cache)
    assert (hit1, hit2) == (False, True)
    assert x2 is x1 and y2 is y1  # the same decoded arrays, not a second decode
    assert not x1.flags.writeable  # shared by later rounds: nobody may change them
    # Another range of the same blob, or other bytes, are other entries.
    x3, _, hit3 = _keras.data_for(ctx(tmp_path, shard, params={"range": [10, 20]}), need_y=True, cache=cache)
    assert not hit3 and len(x3) == 10
    assert x3.base is None  # a copy: the cached slice does not pin the whole blob
    _, _, hit4 = _keras.data_for(
        ctx(tmp_path, shard, data_id="sha256:" + "cd" * 32), need_y=True, cache=cache
    )
    assert not hit4
    assert len(cache) == 3


def test_data_not_cached_without_a_content_id_or_over_budget(tmp_path: Path, shard: Path) -> None:
    cache = ResidentCache()
    for _ in range(2):
        _, _, hit = _keras.data_for(ctx(tmp_path, shard, data_id=None), need_y=True, cache=cache)
        assert not hit
    assert len(cache) == 0
    # 50 × 4 float32 + 50 int64 = 1200 bytes; a memory cap whose share is smaller keeps nothing.
    small = int(1000 / BUDGET_SHARE)
    for _ in range(2):
        _, _, hit = _keras.data_for(ctx(tmp_path, shard, memory_bytes=small), need_y=True, cache=cache)
        assert not hit
    assert len(cache) == 0


def test_cached_data_still_checked_for_y(tmp_path: Path) -> None:
    xonly = tmp_path / "x.npz"
    np.savez(xonly, x=np.zeros((5, 2), np.float32))
    cache = ResidentCache()
    _, y, _ = _keras.data_for(ctx(tmp_path, xonly), need_y=False, cache=cache)
    assert y is None and len(cache) == 1
    with pytest.raises(TaskFailed, match="no array 'y'"):
        _keras.data_for(ctx(tmp_path, xonly), need_y=True, cache=cache)


def test_content_id_of_blobs_and_plain_files(tmp_path: Path) -> None:
    digest = "0f" * 32
    blob = tmp_path / digest
    blob.write_bytes(b"abc")
    assert content_id(blob) == f"sha256:{digest}"
    plain = tmp_path / "data.npz"
    plain.write_bytes(b"one")
    first = content_id(plain)
    assert content_id(plain) == first
    plain.write_bytes(b"other bytes")  # rewritten in place: size and mtime change
    assert content_id(plain) != first
    replaced = tmp_path / "new.npz"
    replaced.write_bytes(b"other bytes")
    os.replace(replaced, plain)  # replaced by another file: another inode
    assert content_id(plain) not in (first,)


def test_worker_forgets_ended_tasks_named_in_a_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peerd.executor.kinds import _resident

    cache = ResidentCache()
    cache.put("k1", 1, 10, task="done-task")
    cache.put("k2", 2, 10, task="live-task")
    monkeypatch.setattr(_resident, "CACHE", cache)
    (tmp_path / "job").mkdir()
    (tmp_path / "inputs").mkdir()
    w = Worker("light", tmp_path / "job", tmp_path / "inputs", out_fd=-1)
    msg = {
        "op": "job",
        "job_id": "j",
        "kind": "echo",
        "params": {"data": "x"},
        "inputs": [],
        "limits": Limits().to_wire(),
        "forget": ["done-task"],
    }
    res = w.run_job(msg)
    assert res["ok"]
    assert cache.keys() == ["k2"]
