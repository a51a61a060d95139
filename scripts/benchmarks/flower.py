"""Flower side by side (issue 4): the same federated job in peerd and in Flower, one run, one machine.

1. peerd: ``examples/fashion-mnist.toml`` as the demo submits it (3 shards, 5 rounds × 1 epoch,
   FedAvg) on a 3-daemon devnet; wall = submit → done at the client, including moving the data
   shards to the peers, the signed aggregation rounds, per-round validation and the final test.
2. Flower (``flwr``, only in the benchmark venv): ``flower_fl.py`` — a server and 3 client
   processes on 127.0.0.1 (gRPC), FedAvg, the same model, data, 3 IID shards, rounds, epochs,
   batch size, optimizer and per-round validation / final test on the server.
   Wall = server start → server end; "federated part" = last client ready (TensorFlow
   imported, shard loaded) → server end, the counterpart of peerd's warm workers.
3. Centralized: the same model on all the training data for 5 epochs on one machine: the
   quality bar (peerd within 1.5 points of it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from scripts.benchmarks.common import ROOT, AreaResult, Check, Table, loadavg, log
from scripts.benchmarks.training import ensure_data, example_spec, run_peerd

BENCH_VENV = Path(os.environ.get("PEERD_BENCH_VENV", str(ROOT / ".venv-bench")))
SCRIPT = Path(__file__).with_name("flower_fl.py")
MODEL = ROOT / "examples" / "seed-mlp.json"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FLWR_TELEMETRY_ENABLED="0", TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
    return env


def run_flower(py: Path, data: Path, rounds: int, clients: int, work: Path) -> dict[str, Any]:
    port = _port()
    common = ["--data", str(data), "--model", str(MODEL), "--port", str(port), "--rounds", str(rounds)]
    t0 = time.time()
    logf = open(work / "flower.log", "w")
    procs = [
        subprocess.Popen(
            [
                str(py),
                str(SCRIPT),
                "server",
                *common,
                "--clients",
                str(clients),
                "--out",
                str(work / "server.json"),
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    ]
    for i in range(clients):
        procs.append(
            subprocess.Popen(
                [
                    str(py),
                    str(SCRIPT),
                    "client",
                    *common,
                    "--shard",
                    str(i),
                    "--of",
                    str(clients),
                    "--out",
                    str(work / f"client-{i}.json"),
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=_env(),
            )
        )
    try:
        codes = [p.wait(timeout=1800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        logf.close()
    t1 = time.time()
    if any(codes) or not (work / "server.json").exists():
        tail = (work / "flower.log").read_text()[-2000:]
        raise RuntimeError(f"Flower run failed (exit codes {codes}): {tail}")
    srv = json.loads((work / "server.json").read_text())
    ready = max(json.loads((work / f"client-{i}.json").read_text())["ready"] for i in range(clients))
    fits = [json.loads((work / f"client-{i}.json").read_text()).get("fits", []) for i in range(clients)]
    final = srv["rounds"][-1]
    return {
        "wall_s": t1 - t0,
        "fl_s": srv["ended"] - ready,
        "test_accuracy": final.get("test_accuracy"),
        "rounds": srv["rounds"],
        "fit_mean_s": sum(sum(f) for f in fits) / max(1, sum(len(f) for f in fits)),
    }


def run_central(py: Path, data: Path, epochs: int, work: Path) -> dict[str, Any]:
    out = work / "central.json"
    t0 = time.time()
    subprocess.run(
        [
            str(py),
            str(SCRIPT),
            "central",
            "--data",
            str(data),
            "--model",
            str(MODEL),
            "--epochs",
            str(epochs),
            "--out",
            str(out),
        ],
        check=True,
        env=_env(),
        capture_output=True,
    )
    r: dict[str, Any] = json.loads(out.read_text())
    r["wall_s"] = time.time() - t0
    return r


def run(quick: bool = False) -> AreaResult:
    res = AreaResult("flower")
    py = BENCH_VENV / "bin" / "python"
    if not py.exists():
        raise RuntimeError(f"no benchmark venv at {BENCH_VENV}: run through scripts/bench, which creates it")
    data = ensure_data()
    rounds = 2 if quick else 5
    epochs = 2 if quick else 5
    t = Table(
        "Same job, same machine, one run: seed MLP, Fashion-MNIST, 3 IID shards, "
        f"{rounds} rounds × 1 epoch, FedAvg",
        [
            "system",
            "wall s",
            "federated part s",
            "fit s (per round, participant)",
            "final test accuracy",
            "val accuracy per round",
            "load avg",
        ],
    )
    log(f"flower: peerd, 3-daemon devnet, examples/fashion-mnist.toml ({rounds} rounds)")
    spec = example_spec(data, rounds=rounds)
    peerd = run_peerd(3, data, spec)
    pv = [r.get("val_accuracy") for r in peerd["task"].get("rounds", [])]
    fit = [r["train_mean_s"] for r in peerd["rounds"]]
    t.add(
        "peerd (3 daemons)",
        peerd["wall_s"],
        peerd["wall_s"],
        sum(fit) / max(1, len(fit)),
        peerd["test_accuracy"],
        " ".join(f"{v:.3f}" for v in pv if v is not None),
        peerd["load"],
    )
    with tempfile.TemporaryDirectory(prefix="pb-flwr-") as d:
        log(f"flower: Flower server + 3 clients ({rounds} rounds)")
        l0 = loadavg()
        fl = run_flower(py, data, rounds, 3, Path(d))
        fv = [r["val_accuracy"] for r in fl["rounds"] if r["round"] > 0]
        t.add(
            "Flower FedAvg (server + 3 clients)",
            fl["wall_s"],
            fl["fl_s"],
            fl["fit_mean_s"],
            fl["test_accuracy"],
            " ".join(f"{v:.3f}" for v in fv),
            f"{l0:.1f}-{loadavg():.1f}",
        )
        log(f"flower: centralized baseline, {epochs} epochs")
        l1 = loadavg()
        c = run_central(py, data, epochs, Path(d))
        t.add(
            f"centralized, {epochs} epochs, one process",
            c["wall_s"],
            c["train_seconds"],
            f"{c['train_seconds'] / epochs:.1f} (an epoch of all data)",
            c["test_accuracy"],
            "",
            f"{l1:.1f}-{loadavg():.1f}",
        )
    res.tables.append(t)
    ratio = peerd["wall_s"] / fl["fl_s"]
    res.notes.append(
        f"wall time peerd / Flower: {ratio:.2f} against Flower's federated part, "
        f"{peerd['wall_s'] / fl['wall_s']:.2f} against its whole run "
        "(with process start-up and TensorFlow import)"
    )
    if peerd["test_accuracy"] is not None and c["test_accuracy"] is not None:
        gap = (c["test_accuracy"] - peerd["test_accuracy"]) * 100
        res.checks.append(
            Check(
                f"peerd test accuracy vs centralized {epochs} epochs",
                f"{peerd['test_accuracy']:.4f} vs {c['test_accuracy']:.4f} ({-gap:+.2f} points)",
                "at most 1.5 points below",
                gap <= 1.5,
            )
        )
        res.notes.append(
            f"accuracy peerd − Flower: {(peerd['test_accuracy'] - fl['test_accuracy']) * 100:+.2f} points"
        )
    res.notes.append(
        "peerd's wall includes moving the data shards (~58 MB each) to the peers and a signed, "
        "committee-certified aggregation per round; Flower's clients read their shard from local disk "
        "(FL's premise). Both evaluate "
        "validation each round and test at the end; each trains with one TensorFlow thread per participant."
    )
    return res
