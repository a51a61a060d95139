"""Flower FedAvg and a centralized baseline for the seed MLP — runs in the benchmark venv.

Standalone on purpose (stdlib, numpy, Keras/TensorFlow and flwr only; nothing from peerd): it
runs under ``.venv-bench/bin/python``, where Flower lives, apart from peerd's own venv.

Modes (each writes one JSON file):

* ``server``  — ``flwr.server.start_server`` (gRPC on 127.0.0.1) with FedAvg over all clients,
  the seed model's initial weights, validation accuracy after every round and test accuracy
  after the last (``evaluate_fn`` on the server, as peerd's submitter evaluates each round);
* ``client``  — ``flwr.client.start_client`` with a NumPyClient training one IID shard: each
  round a fresh Adam optimizer, 1 epoch, batch 32 — the same as peerd's ``keras-train`` kind;
* ``central`` — the same model trained on all the training data for E epochs on one machine.

TensorFlow gets one intra-op and one inter-op thread per process, like a peerd worker slot.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# No network beyond loopback here, and no reason to send usage data anywhere.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import numpy as np

SEED = 7
LR = 0.001
BATCH = 32


def _keras() -> Any:
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return keras


def _model(keras: Any, model_json: str) -> Any:
    return keras.models.model_from_json(model_json)


def _compile(keras: Any, model: Any) -> None:
    # A fresh optimizer every round, as in peerd (docs/design.md §6) and standard FedAvg.
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=LR),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        x, y = z["x"], z["y"]
    if x.dtype.kind != "f":
        # uint8 pixels: float32 scaled by the data set's x_scale (dataset.json), as a peerd
        # worker does with the task's x_scale parameter.
        scale = json.loads((path.parent / "dataset.json").read_text()).get("x_scale", 1.0)
        x = x.astype(np.float32) * np.float32(scale)
    return x, y


def _shard(data: Path, index: int, of: int) -> tuple[np.ndarray, np.ndarray]:
    """IID shard: a seeded permutation cut into ``of`` equal parts (peerd cuts ∝ capacity)."""
    x, y = _load(data / "train.npz")
    order = np.random.default_rng(SEED).permutation(len(x))
    idx = np.sort(np.array_split(order, of)[index])
    return x[idx], y[idx]


def server(args: argparse.Namespace) -> None:
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    keras = _keras()
    model_json = Path(args.model).read_text()
    keras.utils.set_random_seed(SEED)
    model = _model(keras, model_json)
    _compile(keras, model)
    xv, yv = _load(Path(args.data) / "validation.npz")
    xt, yt = _load(Path(args.data) / "test.npz")
    record: dict[str, Any] = {"rounds": [], "started": time.time()}

    def evaluate(rnd: int, weights: list[np.ndarray], config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        model.set_weights(weights)
        loss, acc = model.evaluate(xv, yv, batch_size=1024, verbose=0)
        row = {"round": rnd, "at": time.time(), "val_loss": float(loss), "val_accuracy": float(acc)}
        if rnd == args.rounds:
            tl, ta = model.evaluate(xt, yt, batch_size=1024, verbose=0)
            row.update(test_loss=float(tl), test_accuracy=float(ta))
        record["rounds"].append(row)
        return float(loss), {"accuracy": float(acc)}

    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.clients,
        min_evaluate_clients=0,
        min_available_clients=args.clients,
        evaluate_fn=evaluate,
        on_fit_config_fn=lambda rnd: {"round": rnd},
        initial_parameters=ndarrays_to_parameters(model.get_weights()),
    )
    fl.server.start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
    )
    record["ended"] = time.time()
    Path(args.out).write_text(json.dumps(record))


def client(args: argparse.Namespace) -> None:
    import flwr as fl

    keras = _keras()
    model = _model(keras, Path(args.model).read_text())
    x, y = _shard(Path(args.data), args.shard, args.of)
    fits: list[float] = []

    class Shard(fl.client.NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return list(model.get_weights())

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict]:
            # Per round and shard, as peerd's contractor seeds keras-train jobs.
            keras.utils.set_random_seed(SEED * 1000 + int(config.get("round", 0)) * 64 + args.shard)
            model.set_weights(parameters)
            _compile(keras, model)
            t0 = time.perf_counter()
            model.fit(x, y, epochs=1, batch_size=BATCH, shuffle=True, verbose=0)
            fits.append(time.perf_counter() - t0)
            return list(model.get_weights()), len(x), {"train_seconds": fits[-1]}

    Path(args.out).write_text(json.dumps({"ready": time.time(), "samples": len(x)}))
    fl.client.start_client(
        server_address=f"127.0.0.1:{args.port}",
        client=Shard().to_client(),
        insecure=True,
        max_retries=60,
        max_wait_time=120.0,
    )
    Path(args.out).write_text(
        json.dumps(
            {"ready": json.loads(Path(args.out).read_text())["ready"], "samples": len(x), "fits": fits}
        )
    )


def central(args: argparse.Namespace) -> None:
    keras = _keras()
    keras.utils.set_random_seed(SEED)
    model = _model(keras, Path(args.model).read_text())
    _compile(keras, model)
    x, y = _load(Path(args.data) / "train.npz")
    xt, yt = _load(Path(args.data) / "test.npz")
    t0 = time.perf_counter()
    model.fit(x, y, epochs=args.epochs, batch_size=BATCH, shuffle=True, verbose=0)
    train_s = time.perf_counter() - t0
    loss, acc = model.evaluate(xt, yt, batch_size=1024, verbose=0)
    Path(args.out).write_text(
        json.dumps(
            {
                "test_accuracy": float(acc),
                "test_loss": float(loss),
                "train_seconds": train_s,
                "epochs": args.epochs,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("server", "client", "central"))
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True, help="Keras model JSON (examples/seed-mlp.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--of", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    {"server": server, "client": client, "central": central}[args.mode](args)


if __name__ == "__main__":
    main()
