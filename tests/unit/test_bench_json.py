"""``scripts/bench --json FILE``: every checked figure with its budget and verdict, machine-readable
(issues 9 and 10 ask for it), written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.benchmarks.__main__ import as_json, main, write_json
from scripts.benchmarks.common import AreaResult, Check

MACHINE = {"date": "2026-12-03 15:00 UTC", "cpus": "2"}


def test_every_check_is_written_with_its_budget_and_verdict() -> None:
    ok = AreaResult("trust", checks=[Check("replicas = 2 cost", "1.56 ×", "≤ 2.2 ×", True)], seconds=12.34)
    bad = AreaResult(
        "adverts",
        checks=[Check("idle CPU", "2.8 %", "< 0.5 %", False), Check("p50", "-", "-", None)],
        notes=["a note"],
    )
    broken = AreaResult("tasks", error="RuntimeError: boom")
    data = as_json([ok, bad, broken], MACHINE, "label", quick=True)
    assert data["machine"] == MACHINE and data["quick"] is True and data["label"] == "label"
    assert data["missed"] == 1 and data["failed_areas"] == ["tasks"]
    trust, adverts, tasks = data["areas"]
    assert trust == {
        "area": "trust",
        "seconds": 12.3,
        "error": None,
        "checks": [
            {
                "figure": "replicas = 2 cost",
                "measured": "1.56 ×",
                "budget": "≤ 2.2 ×",
                "met": True,
                "verdict": "met",
            }
        ],
        "notes": [],
    }
    assert [c["verdict"] for c in adverts["checks"]] == ["missed", "no budget or no figure"]
    assert adverts["notes"] == ["a note"] and tasks["error"] == "RuntimeError: boom"


def test_the_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    path.write_text("old")
    write_json({"missed": 0}, path)
    assert json.loads(path.read_text()) == {"missed": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary left


def test_an_unknown_area_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["nope", "--json", str(tmp_path / "x.json"), "--no-doc"])
    assert exc.value.code == 2 and not (tmp_path / "x.json").exists()
