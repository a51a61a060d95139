"""Where a keras-train round's time goes: a peerd worker against a bare ``model.fit`` (issue 9).

Not an area of ``scripts/bench``: a bounded profile run by hand, one training at a time,

    .venv/bin/python -m scripts.benchmarks.fitprofile [--reps 3] [--rounds 3] [--shard 18333]

The seed MLP (examples/seed-mlp.json) trains 1 epoch, batch 32, on one shard of Fashion-MNIST
(the first ``--shard`` samples of examples/data/train.npz, written as its own .npz as the
submitter's split is). Each variant runs ``--rounds`` rounds in a row, each round starting from
the previous round's weights, as a multi-round task does; the variants are interleaved and
repeated ``--reps`` times; medians are reported per phase, over rounds ≥ 2 (warm) and for
round 1 apart.

Variants:

* ``peerd``: jobs through the real :class:`peerd.executor.WorkerPool` (bubblewrap sandbox,
  per-worker cgroup, the worker's environment), one CPU slot, the worker reused across rounds
  (resident data and model); ``peerd-det`` the same with ``deterministic = true`` (op
  determinism, a model built anew each round). --peerd-params adds keras-train params.
* ``bare:<knobs>``: a plain Python process (no sandbox, no cgroup) importing Keras itself and
  running the same rounds with the given knobs: ``t1`` one TensorFlow thread (else TF's default),
  ``det`` op determinism, ``nodnn`` TF_ENABLE_ONEDNN_OPTS=0, ``resident`` the compiled model and
  decoded data kept across rounds (else rebuilt every round, as the worker did).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from scripts.benchmarks.common import ROOT, loadavg, log

DATA = Path(os.environ.get("PEERD_FIT_DATA", ROOT / "examples" / "data" / "train.npz"))
MODEL = ROOT / "examples" / "seed-mlp.json"

_BARE = r"""
import json, os, sys, time
knobs = set(sys.argv[1].split(",")) if sys.argv[1] else set()
shard, weights_path, rounds = sys.argv[2], sys.argv[3], int(sys.argv[4])
t_import = time.perf_counter()
import numpy as np
import keras
import tensorflow as tf
if "t1" in knobs:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
if "det" in knobs:
    tf.config.experimental.enable_op_determinism()
from protocol.tensors import decode_arrays, encode_arrays
import_s = time.perf_counter() - t_import
cfg = json.loads(open(sys.argv[5]).read())
weights = open(weights_path, "rb").read()
model = data = None
out = []
for r in range(rounds):
    ph = {}
    t = time.perf_counter()
    if data is None or "resident" not in knobs:
        with np.load(shard, allow_pickle=False) as npz:
            data = (npz["x"], npz["y"])
        if data[0].dtype.kind != "f":  # uint8 pixels: as the worker's x_scale does
            data = (data[0].astype(np.float32) * np.float32(float(sys.argv[6])), data[1])
    ph["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if model is None or "resident" not in knobs:
        keras.backend.clear_session()
        keras.utils.set_random_seed(7000 + r + 1)
        model = keras.saving.deserialize_keras_object(cfg, safe_mode=True)
        fresh = True
    else:
        keras.utils.set_random_seed(7000 + r + 1)
        fresh = False
    model.set_weights(decode_arrays(weights))
    opt = keras.optimizers.Adam(learning_rate=0.001)
    if fresh:
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    else:
        # A fresh optimizer's state copied in place; the compiled train step is kept (as the
        # worker's resident path does, peerd/executor/kinds/_keras.py reset_optimizer).
        opt.build(model.trainable_variables)
        for a, b in zip(model.optimizer.variables, opt.variables):
            a.assign(keras.ops.convert_to_numpy(b))
    ph["build_s"] = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    h = model.fit(data[0], data[1], epochs=1, batch_size=32, shuffle=True, verbose=0)
    ph["train_s"] = time.perf_counter() - t
    ph["train_cpu_s"] = time.process_time() - c
    t = time.perf_counter()
    weights = encode_arrays(model.get_weights())
    ph["encode_s"] = time.perf_counter() - t
    ph["accuracy"] = float(h.history["accuracy"][-1])
    out.append(ph)
print(json.dumps({"import_s": import_s, "rounds": out}))
"""


def bare_env(knobs: set[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "OMP_"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(ROOT)
    if "nodnn" in knobs:
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    if "t1" in knobs:
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_bare(knobs: str, shard: Path, w0: Path, rounds: int, model: Path, scale: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", _BARE, knobs, str(shard), str(w0), str(rounds), str(model), repr(scale)],
        env=bare_env(set(knobs.split(","))),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if p.returncode != 0:
        raise RuntimeError(f"bare {knobs} failed: {p.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


class PeerdRunner:
    """A WorkerPool kept for the whole profile (its warm tf worker serves every peerd round)."""

    def __init__(self, root: Path, params: dict[str, Any]) -> None:
        self.root = root
        self.params = params

    async def rounds(
        self, pool: Any, shard: Path, w0: Path, rounds: int, submitter: str, extra: dict[str, Any]
    ) -> dict[str, Any]:
        import trio

        from peerd.executor import Job, Limits

        weights = w0
        out = []
        task = uuid.uuid4().hex[:16]
        for r in range(rounds):
            params = {**self.params, **extra, "seed": 7000 + r + 1}
            job = Job(
                f"{task}-0-{r + 1}",
                submitter,
                "keras-train",
                params,
                {"data": shard, "weights": weights},
                Limits(memory_bytes=3 << 30, cpu_seconds=600, wall_seconds=600),
            )
            t0 = time.perf_counter()
            res = await pool.execute(job)
            total = time.perf_counter() - t0
            if not res.ok:
                raise RuntimeError(f"peerd job failed: {res.error}: {res.detail}")
            m = res.metrics
            weights = self.root / f"w-{task}-{r}.bin"
            await trio.to_thread.run_sync(weights.write_bytes, res.outputs["weights"])
            out.append(
                {
                    "execute_s": total,
                    "wall_s": m["wall_seconds"],
                    "worker_s": m["worker_seconds"],
                    "train_s": m["train_seconds"],
                    "train_cpu_s": m.get("train_cpu_seconds", float("nan")),
                    "job_cpu_s": m.get("cpu_seconds", float("nan")),
                    "load_s": m.get("load_seconds", float("nan")),
                    "build_s": m.get("build_seconds", float("nan")),
                    "encode_s": m.get("encode_seconds", float("nan")),
                    "resident_data": m.get("resident_data", 0.0),
                    "resident_model": m.get("resident_model", 0.0),
                    "worker_jobs": m.get("worker_jobs", 0.0),
                    "accuracy": m.get("accuracy", float("nan")),
                }
            )
        return {"rounds": out}


def summarize(samples: dict[str, list[dict[str, Any]]]) -> str:
    keys = (
        "execute_s",
        "worker_s",
        "load_s",
        "build_s",
        "train_s",
        "train_cpu_s",
        "job_cpu_s",
        "encode_s",
        "accuracy",
    )
    lines = [
        "| variant | round | " + " | ".join(keys) + " |",
        "| --- | --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for name, runs in samples.items():
        for label, pick in (("1", lambda rs: rs[:1]), ("≥2", lambda rs: rs[1:])):
            rows = [ph for run in runs for ph in pick(run["rounds"])]
            if not rows:
                continue
            cells = []
            for k in keys:
                vals = [float(ph[k]) for ph in rows if k in ph and ph[k] == ph[k]]
                cells.append(f"{statistics.median(vals):.3f}" if vals else "–")
            lines.append(f"| {name} | {label} (n={len(rows)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    import trio

    from peerd.executor import WorkerPool

    tmp = Path(tempfile.mkdtemp(prefix="pb-fit-"))
    with np.load(DATA, allow_pickle=False) as npz:
        x, y = npz["x"][: args.shard], npz["y"][: args.shard]
    shard = tmp / "shard.npz"
    np.savez(shard, x=x, y=y)
    info = DATA.parent / "dataset.json"
    scale = float(json.loads(info.read_text()).get("x_scale", 1.0)) if info.exists() else 1.0
    raw = json.loads(MODEL.read_text())
    model_cfg = tmp / "model.json"
    model_cfg.write_text(json.dumps(raw))
    # Round 1's starting weights: the model's own initialisation under seed 7 (a bare process).
    w0 = tmp / "w0.bin"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import json,sys,keras; keras.utils.set_random_seed(7);"
            "from protocol.tensors import encode_arrays;"
            "m=keras.saving.deserialize_keras_object(json.load(open(sys.argv[1])), safe_mode=True);"
            "open(sys.argv[2],'wb').write(encode_arrays(m.get_weights()))",
            str(model_cfg),
            str(w0),
        ],
        env=bare_env(set()),
        check=True,
        timeout=300,
    )
    params: dict[str, Any] = {
        "model_config": json.dumps(raw),
        "optimizer": "adam",
        "learning_rate": 0.001,
        "loss": "sparse_categorical_crossentropy",
        "epochs": 1,
        "batch_size": 32,
        # The data set's pixels are uint8 (scripts/prepare_data.py): scaled as the demo's task does.
        "x_scale": scale,
        **json.loads(args.peerd_params),
    }
    samples: dict[str, list[dict[str, Any]]] = {}
    runner = PeerdRunner(tmp, params)
    # No warm spares: a spare's replacement would import TensorFlow beside the rounds being
    # measured. A new submitter's first job starts its worker cold (in execute_s, not train_s).
    pool = WorkerPool(tmp / "work", warm_classes=("tf",), warm_spares=0, reuse_idle_seconds=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_warm()
        for rep in range(args.reps):
            for variant in args.variants:
                log(f"rep {rep + 1}/{args.reps}: {variant} (load {loadavg()})")
                if variant.startswith("peerd"):
                    # One submitter per peerd variant: switching variants starts a fresh worker
                    # (so round 1 is a task's first round on that peer).
                    extra = {"deterministic": True} if variant == "peerd-det" else {}
                    res = await runner.rounds(pool, shard, w0, args.rounds, variant, extra)
                else:
                    knobs = variant.removeprefix("bare:")
                    res = await trio.to_thread.run_sync(
                        lambda k=knobs: run_bare(k, shard, w0, args.rounds, model_cfg, scale)
                    )
                samples.setdefault(variant, []).append(res)
        nursery.cancel_scope.cancel()
    return samples


def main() -> None:
    import trio

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard", type=int, default=18333)
    ap.add_argument("--peerd-params", default="{}", help="extra keras-train params, JSON")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[
            "peerd",
            "peerd-det",
            "bare:t1,det,nodnn",
            "bare:t1,nodnn",
            "bare:t1",
            "bare:",
            "bare:t1,nodnn,resident",
        ],
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    log(f"fit profile: load {loadavg()}, {os.cpu_count()} cores")
    samples = trio.run(main_async, args)
    print(summarize(samples))
    log(f"done: load {loadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
