"""The demo's spec sized to the peers it sees (``scripts/demo_report.py sized-spec``), and the
training benches' refusal of a run with fewer participants than they compare."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def demo_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_report", ROOT / "scripts" / "demo_report.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_demo_asks_for_more_than_any_two_of_three_peers_offer(tmp_path: Path) -> None:
    # C is calibrated per machine: a fixed work needed three peers under load and two on a
    # quiet machine. Sized to 0.9 × ΣC, any two of three similar peers fall short.
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"peers": [{"capacity": 290.0}, {"capacity": 300.0}, {"capacity": 310.0}]}))
    out = tmp_path / "out"
    out.mkdir()
    mod = demo_report()
    assert mod.sized_spec(ROOT / "examples" / "fashion-mnist.toml", peers, out) == 0
    sized = tomllib.loads((out / "fashion-mnist.sized.toml").read_text())
    original = tomllib.loads((ROOT / "examples" / "fashion-mnist.toml").read_text())
    r = sized["work"] / sized["deadline_s"]
    assert r == pytest.approx(0.9 * 900.0)
    assert 300.0 + 310.0 < r <= 900.0  # the largest two fall short; all three cover it
    # Everything else is the example's, with its relative paths made absolute.
    model = str(ROOT / "examples" / "seed-mlp.json")
    assert sized["params"] == {**original["params"], "model_config_file": model}
    assert sized["inputs"] == {k: str(ROOT / "examples" / v) for k, v in original["inputs"].items()}
    assert {k: v for k, v in sized.items() if k not in ("work", "inputs", "params")} == {
        k: v for k, v in original.items() if k not in ("work", "inputs", "params")
    }


def test_no_capacity_seen_is_an_error(tmp_path: Path) -> None:
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"peers": []}))
    assert demo_report().sized_spec(ROOT / "examples" / "fashion-mnist.toml", peers, tmp_path) == 1
    assert not (tmp_path / "fashion-mnist.sized.toml").exists()


def test_a_training_run_on_fewer_peers_than_compared_is_refused() -> None:
    from scripts.benchmarks.training import check_participants

    check_participants([{"participants": 3}, {"participants": 3}], 3)
    with pytest.raises(RuntimeError, match=r"\[1\] participant"):
        check_participants([{"participants": 1}], 3)  # the submitter alone: bids missed the window
    with pytest.raises(RuntimeError, match=r"\[2, 3\]"):
        check_participants([{"participants": 3}, {"participants": 2}], 3)
    with pytest.raises(RuntimeError, match="no participant"):
        check_participants([], 3)
