"""One keras-train shard on a GPU through the real sandbox, with Keras on JAX, against the CPU.

Run as ``scripts/gpu-check`` (docs/config.md ``[offer] keras_backend``, docs/benchmarks.md). It
builds the same worker pool the daemon builds: bubblewrap sandbox, the slot's ``/dev/nvidia*``
nodes bound, ``CUDA_VISIBLE_DEVICES`` set to the slot's card, ``KERAS_BACKEND`` from the backend
asked for. It trains the seed's MLP on a Fashion-MNIST-sized synthetic shard (20,000 × 784, the
shape of one of three shards) for a warm-up job and then a timed one, on the GPU slot and on a
CPU slot, and prints both fits and their ratio.

Exit status: 0 when the GPU shard trained on the GPU (the worker's ``on_gpu`` metric), 1 when it
did not (for example JAX's CPU wheels only: install ``jax[cuda12]``), 3 when this machine has no
NVIDIA GPU that NVML can see (only the CPU half ran), 2 on usage.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import trio

from peerd.executor import Job, JobResult, Limits, WorkerPool
from peerd.probes import gpu_info

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "seed-mlp.json"
LIMITS = Limits(memory_bytes=8 << 30, cpu_seconds=1800, wall_seconds=1800)


def shard(path: Path, samples: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.random((samples, 784), dtype=np.float32)
    y = rng.integers(0, 10, samples).astype("int64")
    np.savez(path, x=x, y=y)
    return path


def params(epochs: int, batch_size: int) -> dict[str, Any]:
    return {
        "model_config": MODEL.read_text(),  # the seed's MLP as Keras JSON (examples/seed-mlp.json)
        "optimizer": "adam",
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": 0,
    }


async def fit(pool: WorkerPool, job_params: dict[str, Any], data: Path, label: str) -> JobResult:
    """A warm-up job (import, trace, device set-up), then the measured one in the same worker."""
    results = []
    for attempt in ("warm-up", "timed"):
        res = await pool.execute(
            Job(uuid.uuid4().hex, "gpu-check", "keras-train", job_params, {"data": data}, LIMITS, task=label)
        )
        if not res.ok:
            raise SystemExit(f"{label} {attempt} job failed: {res.error}: {res.detail}")
        results.append(res)
    return results[-1]


async def main_async(args: argparse.Namespace) -> int:
    gpus = gpu_info()
    print(f"GPUs seen by NVML: {len(gpus) or 'none'}")
    for g in gpus:  # what the adverts carry (docs/design.md, capacity adverts)
        print(
            f"  gpu:{g.index} {g.model}: {g.vram_total_mb} MiB, {g.vram_free_mb} MiB free, "
            f"{g.util_pct:.0f}% busy, ~{g.gflops:.0f} GFLOP/s peak"
        )
    job_params = params(args.epochs, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="peerd-gpu-check-") as d:
        work = Path(d)
        data = shard(work / "shard.npz", args.samples)
        env = {"KERAS_BACKEND": args.backend}
        devices = [("cpu", "cpu")] + ([("gpu", f"gpu:{gpus[0].index}")] if gpus else [])
        fits: dict[str, JobResult] = {}
        async with trio.open_nursery() as nursery:
            for name, device in devices:
                pool = WorkerPool(work / name, devices=(device,), warm_classes=(), warm_spares=0, env=env)
                await nursery.start(pool.run)
                fits[name] = await fit(pool, job_params, data, f"{name}-{args.backend}")
                m = fits[name].metrics
                print(
                    f"{name} ({device}, Keras on {args.backend}): fit {m['train_seconds']:.2f} s "
                    f"for {args.epochs} epoch(s) of {args.samples} samples; on_gpu={m['on_gpu']:.0f} "
                    f"jax_backend={m['jax_backend']:.0f} loss={m['loss']:.4f}"
                )
            nursery.cancel_scope.cancel()
    if "gpu" not in fits:
        print("no NVIDIA GPU here: only the CPU half ran")
        return 3
    gpu, cpu = fits["gpu"].metrics, fits["cpu"].metrics
    print(f"GPU fit / CPU fit: {gpu['train_seconds'] / cpu['train_seconds']:.3f}")
    if gpu["on_gpu"] != 1.0:
        print("the GPU slot's shard did NOT train on the GPU (is a CUDA build of JAX installed?)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.samples < 1 or args.epochs < 1 or args.batch_size < 1:
        ap.error("--samples, --epochs and --batch-size must be positive")
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
