"""Prepare the demo's data and model: Fashion-MNIST through Keras' own loader.

Debian's ``dataset-fashion-mnist`` installs the four IDX files; linking them into
``$KERAS_HOME/datasets/fashion-mnist/`` lets ``keras.datasets.fashion_mnist.load_data()``
read them without a download (docs/design.md appendix B.3). When the package
cannot be had, scikit-learn's bundled 8×8 digits stand in (and the run says so).

Writes into OUT (default examples/data/):
  train.npz (x, y)  validation.npz  test.npz  and  model.json (the seed's Keras model, §5.2)
x holds uint8 pixels (0..255): tasks on it set ``x_scale = 1/255`` (docs/tasks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

# Run by hand, TensorFlow would print its C++ start-up notices (CPU features, oneDNN) on stderr;
# scripts/_env.sh quiets them for the demo, this does the same for everyone else. Set before
# keras (and so TensorFlow) is first imported; an operator's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

#: 2: x as uint8 pixels, scaled by the task's x_scale (1: float32 in [0, 1]).
FORMAT = 2
FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def seed_model_json(input_dim: int) -> str:
    """Seed §5.2: Dense(128, relu) → Dropout(0.2) → Dense(10, softmax)."""
    import keras

    model = keras.Sequential(
        [
            keras.layers.Input(shape=(input_dim,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    return model.to_json()


def load_fashion(keras_home: Path) -> tuple[str, tuple[np.ndarray, ...]]:
    import keras

    target = keras_home / "datasets" / "fashion-mnist"
    target.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        link = target / f
        if not link.exists():
            link.symlink_to(FASHION / f)
    (xtr, ytr), (xte, yte) = keras.datasets.fashion_mnist.load_data()
    return "fashion-mnist", (xtr.reshape(len(xtr), -1), ytr, xte.reshape(len(xte), -1), yte)


def load_digits() -> tuple[str, tuple[np.ndarray, ...]]:
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    x = (x / 16.0 * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    x, y = x[idx], y[idx]
    cut = int(len(x) * 0.8)
    return "digits", (x[:cut], y[:cut], x[cut:], y[cut:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("examples/data"))
    ap.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto")
    ap.add_argument("--validation", type=int, default=5000, help="training samples held out for validation")
    args = ap.parse_args()
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    keras_home = Path(os.environ.setdefault("KERAS_HOME", str(out / ".keras")))
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    use_fashion = args.dataset == "fashion-mnist" or (
        args.dataset == "auto" and all((FASHION / f).exists() for f in FILES)
    )
    if args.dataset == "fashion-mnist" and not use_fashion:
        print("Fashion-MNIST files are missing: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 1
    name, (xtr, ytr, xte, yte) = load_fashion(keras_home) if use_fashion else load_digits()
    # The pixels stay uint8: the task's x_scale = 1/255 makes them floats in the worker
    # (docs/tasks.md), and every shard travels as a quarter of the float32 bytes.
    xtr = xtr.astype(np.uint8)
    xte = xte.astype(np.uint8)
    ytr = ytr.astype(np.int64)
    yte = yte.astype(np.int64)
    nval = min(args.validation, len(xtr) // 10)
    np.savez(out / "train.npz", x=xtr[:-nval], y=ytr[:-nval])
    np.savez(out / "validation.npz", x=xtr[-nval:], y=ytr[-nval:])
    np.savez(out / "test.npz", x=xte, y=yte)
    (out / "model.json").write_text(seed_model_json(xtr.shape[1]))
    info = {
        "dataset": name,
        "train": len(xtr) - nval,
        "validation": nval,
        "test": len(xte),
        "input_dim": xtr.shape[1],
        # Readers check it: data written as float32 [0, 1] by an older version would be scaled
        # twice by the task's x_scale.
        "format": FORMAT,
        "x_dtype": "uint8",
        "x_scale": 1 / 255,
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
