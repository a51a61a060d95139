"""JAX's persistent compilation cache in keras workers (``[offer] jax_cache_mb``, docs/config.md):
a worker that meets a model XLA compiled before, in another task or after a restart, loads the
programs instead of compiling them; and only keras workers ever see the cache, because later jobs
load native code from it.

Real sandboxed workers on the JAX backend (CPU), as in test_keras_jax.py. Whether a program came
from the cache is read from the cache itself: JAX writes a program's entry when it compiled it,
and leaves it alone when it loaded it.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from peerd.executor import Job, JobResult, Limits, WorkerPool, probe_sandbox
from peerd.executor.pool import JAX_CACHE_DIR
from tests.helpers_training import dense_model_json, tiny_problem

pytestmark = [
    pytest.mark.tf,
    pytest.mark.slow,
    pytest.mark.skipif(not probe_sandbox().available, reason="bubblewrap sandbox unavailable here"),
]

LIMITS = Limits(memory_bytes=2 << 30, cpu_seconds=300, wall_seconds=600)


def _pool(root: Path, cache: Path | None) -> WorkerPool:
    return WorkerPool(
        root,
        warm_classes=("tf",),
        warm_spares=0,
        env={"KERAS_BACKEND": "jax"},
        jax_cache=(cache, 64 << 20) if cache is not None else None,
    )


def _programs(cache: Path) -> dict[str, int]:
    """Each compiled program JAX stored, with when it was written."""
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.name.endswith("-cache")}


def _last_used(cache: Path) -> dict[str, bytes]:
    """The access time JAX keeps beside each program (for its least-recently-used bound),
    rewritten whenever a worker loads the program."""
    return {p.name: p.read_bytes() for p in cache.iterdir() if p.name.endswith("-atime")}


def test_only_keras_workers_see_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "jax-cache"
    cache.mkdir()
    pool = _pool(tmp_path / "work", cache)
    host, inputs = tmp_path / "w", tmp_path / "w" / "inputs"
    inputs.mkdir(parents=True)
    keras_argv, _ = pool._spawn_argv("cpu", "tf", host, inputs)
    light_argv, _ = pool._spawn_argv("cpu", "light", host, inputs)
    binds = [(keras_argv[i + 1], keras_argv[i + 2]) for i, a in enumerate(keras_argv) if a == "--bind"]
    assert binds == [(str(cache), JAX_CACHE_DIR)]
    env = {keras_argv[i + 1]: keras_argv[i + 2] for i, a in enumerate(keras_argv) if a == "--setenv"}
    assert env["JAX_COMPILATION_CACHE_DIR"] == JAX_CACHE_DIR
    assert env["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(64 << 20)
    # The light class runs submitters' python code: no writable host path, no cache.
    assert "--bind" not in light_argv and str(cache) not in light_argv
    assert not any("JAX_COMPILATION_CACHE" in a for a in light_argv)
    # Without the option nobody gets it.
    plain, _ = _pool(tmp_path / "work2", None)._spawn_argv("cpu", "tf", host, inputs)
    assert "--bind" not in plain and not any("JAX_COMPILATION_CACHE" in a for a in plain)
    # Nor does anyone without the sandbox, where a python task runs as the daemon's user.
    bare = _pool(tmp_path / "work3", cache)
    bare.sandboxed = False
    command, env = bare._spawn_argv("cpu", "tf", host, inputs)
    assert not any(k.startswith("JAX_COMPILATION_CACHE") for k in env)
    assert str(cache) not in command


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="the [jax] extra is not installed")
async def test_a_restarted_worker_loads_what_an_earlier_one_compiled(tmp_path: Path) -> None:
    shard, w0 = tiny_problem(tmp_path, seed=3)
    params: dict[str, Any] = {
        "model_config": dense_model_json(8, 16, 3),
        "optimizer": "adam",
        "epochs": 1,
        "batch_size": 50,
        "seed": 1,
    }
    cache = tmp_path / "jax-cache"
    cache.mkdir(mode=0o700)

    async def train_in_a_fresh_pool(name: str) -> JobResult:
        async with trio.open_nursery() as nursery:
            pool = _pool(tmp_path / name, cache)
            await nursery.start(pool.run)
            res = await pool.execute(
                Job(uuid.uuid4().hex, "alice", "keras-train", params, {"data": shard, "weights": w0}, LIMITS)
            )
            nursery.cancel_scope.cancel()
        assert res.ok, res
        assert res.metrics["jax_backend"] == 1.0
        return res

    await train_in_a_fresh_pool("first")
    compiled, used = _programs(cache), _last_used(cache)
    assert compiled, "the first worker wrote nothing to the cache"
    assert len(used) == len(compiled)
    # Another worker (another pool: nothing of the first survives but the cache directory)
    # runs the same model: it loads every program (each one's access time moves) and compiles
    # and writes none again.
    await train_in_a_fresh_pool("second")
    assert _programs(cache) == compiled
    again = _last_used(cache)
    assert again.keys() == used.keys()
    assert all(again[name] != used[name] for name in used), "a program was not loaded from the cache"
