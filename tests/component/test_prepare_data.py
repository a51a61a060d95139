"""``scripts/prepare_data.py`` run by hand is quiet: its one JSON line on stdout, nothing on
stderr (no TensorFlow start-up notices), even without scripts/_env.sh's settings (issue 12)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.tf,
    pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow not installed"),
    pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed"),
]


def test_prepare_data_by_hand_prints_only_its_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/prepare_data.py"),
            "--dataset",
            "digits",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr
    info = json.loads(out.stdout)
    assert info["dataset"] == "digits"
    assert (tmp_path / "train.npz").is_file() and (tmp_path / "model.json").is_file()
    # The pixels stay uint8 (a quarter of the bytes on the wire); dataset.json says so, and
    # says how a task scales them back to [0, 1].
    assert info["format"] == 2 and info["x_dtype"] == "uint8" and info["x_scale"] == 1 / 255
    assert json.loads((tmp_path / "dataset.json").read_text()) == info
    for name in ("train", "validation", "test"):
        with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as z:
            assert z["x"].dtype == np.uint8 and int(z["x"].max()) == 255, name
