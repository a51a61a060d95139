"""peerd/kinds.py: one registry of task kinds, and the ``[params]`` schema the spec enforces.

Before the registry, ``[params]`` was free-form: an unknown key (a typo such as ``epoch``), a
missing key or a value of the wrong type passed the spec check and failed later, on every
contractor, after the bidding (or was silently ignored).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd import kinds
from peerd.executor.kinds import KIND_CLASS, REUSABLE, load_kind
from peerd.taskspec import SpecError, parse_spec
from protocol.messages import TASK_KINDS, TaskAnnounce

MODEL = json.dumps({"class_name": "Sequential", "config": {"name": "m", "layers": []}})
TRAIN: dict[str, Any] = {"kind": "keras-train", "inputs": {"data": "/srv/d.npz"}}


def test_the_registry_is_the_protocols_kinds_and_the_executors() -> None:
    assert set(kinds.KINDS) == set(TASK_KINDS)
    assert KIND_CLASS == {k.name: k.worker_class for k in kinds.KINDS.values()}
    assert {k.name for k in kinds.KINDS.values() if k.reusable_worker} == REUSABLE
    for name in ("echo", "sleep", "python"):  # the light ones: no TensorFlow to import here
        assert callable(load_kind(name))


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown key", {"kind": "echo", "params": {"data": "x", "dta": "y"}}, "params.dta: unknown parameter"),
    (
        "typo in a keras key",
        {**TRAIN, "params": {"model_config": MODEL, "epoch": 3}},
        "params.epoch: unknown",
    ),
    ("key of another kind", {"kind": "sleep", "params": {"seconds": 1, "data": "x"}}, "params.data: unknown"),
    ("missing key", {"kind": "sleep", "params": {}}, "params.seconds: required"),
    (
        "string for a number",
        {"kind": "sleep", "params": {"seconds": "5"}},
        "params.seconds: must be a number",
    ),
    (
        "bool for an int",
        {**TRAIN, "params": {"model_config": MODEL, "epochs": True}},
        "params.epochs: must be an",
    ),
    (
        "float for an int",
        {**TRAIN, "params": {"model_config": MODEL, "seed": 1.5}},
        "params.seed: must be an",
    ),
    (
        "seed out of bounds",
        {**TRAIN, "params": {"model_config": MODEL, "seed": -1}},
        "params.seed: must be an",
    ),
    ("string for a bool", {**TRAIN, "params": {"model_config": MODEL, "shuffle": "no"}}, "params.shuffle:"),
    ("unknown metric", {**TRAIN, "params": {"model_config": MODEL, "metrics": ["f1"]}}, "params.metrics:"),
    ("bad range", {**TRAIN, "params": {"model_config": MODEL, "range": [5, 2]}}, "params.range:"),
    (
        "learning rate 0",
        {**TRAIN, "params": {"model_config": MODEL, "learning_rate": 0}},
        "params.learning_rate:",
    ),
    (
        "python args a string",
        {"kind": "python", "inputs": {"script": "/s.py"}, "params": {"args": "a b"}},
        "params.args: must be a list of strings",
    ),
    ("model config not a string", {**TRAIN, "params": {"model_config": 3}}, "params.model_config:"),
]


@pytest.mark.parametrize(("case", "obj", "prefix"), BAD, ids=[b[0] for b in BAD])
def test_params_against_the_schema_name_the_key(case: str, obj: dict[str, Any], prefix: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(obj)
    assert str(err.value).startswith(prefix), (case, str(err.value))


def test_what_the_examples_and_the_training_helper_use_passes() -> None:
    spec = parse_spec(
        {
            **TRAIN,
            "params": {
                "model_config": MODEL,
                "optimizer": "adam",
                "learning_rate": 0.005,
                "epochs": 2,
                "batch_size": 32,
                "seed": 7,
                "shuffle": False,
                "round_timeout_s": 300,
                "metrics": ["accuracy"],
                "range": [0, 10],
                "loss": "mse",
            },
        }
    )
    assert spec.aggregation == "weighted_mean" and spec.params["seed"] == 7
    assert parse_spec({"kind": "sleep", "params": {"seconds": 0}}).aggregation == "none"
    assert parse_spec({"kind": "echo"}).params == {}


def _value(p: kinds.Param) -> st.SearchStrategy[Any]:
    if p.type == "keras_model":
        return st.just(MODEL)
    if p.choices:
        return (
            st.lists(st.sampled_from(p.choices), max_size=3)
            if p.type == "str_list"
            else st.sampled_from(p.choices)
        )
    if p.type == "int":
        return st.integers(int(p.lo or 0), int(p.hi or 0))
    if p.type == "number":
        return st.floats(p.lo, p.hi, allow_nan=False)
    if p.type == "bool":
        return st.booleans()
    if p.type == "str_list":
        return st.lists(st.text(max_size=30), max_size=10)
    if p.type == "int_pair":
        return st.tuples(st.integers(0, 100), st.integers(1, 100)).map(lambda t: [t[0], t[0] + t[1]])
    return st.text(max_size=200)


@st.composite
def _spec(draw: st.DrawFn) -> dict[str, Any]:
    kind = kinds.KINDS[draw(st.sampled_from(sorted(kinds.KINDS)))]
    params = {
        k: draw(_value(p))
        for k, p in kind.params.items()
        if p.inline_as is None and (p.required or draw(st.booleans()))
    }
    return {"kind": kind.name, "params": params, "inputs": {n: f"/srv/{n}" for n in kind.required_inputs}}


@settings(max_examples=200, deadline=None)
@given(_spec())
def test_every_spec_the_schema_admits_fits_an_announce(obj: dict[str, Any]) -> None:
    spec = parse_spec(obj)
    ref = {"sha256": "0" * 64, "size": 1}
    TaskAnnounce(
        seq=1,
        issued_at=0,
        expires_at=1000,
        task_id="ab" * 16,
        kind=spec.kind,
        work=spec.work,
        deadline_ms=int(spec.deadline_s * 1000),
        max_shards=spec.max_shards,
        resources={"gpu": spec.gpu, "memory_mb": spec.memory_mb},
        aggregation=spec.aggregation,
        rounds=spec.rounds,
        params=json.loads(json.dumps(spec.params)),
        inputs={n: ref for n in spec.inputs},
        bid_window_ms=300,
        net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
    )


def test_docs_tasks_md_lists_every_kinds_params() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "tasks.md").read_text()
    for kind in kinds.KINDS.values():
        for name, p in kind.params.items():
            row = f"| `{kind.name}` | `{name}` | {p.describe()} | {'yes' if p.required else ''} |"
            assert row in text, row


def test_each_kind_declares_the_outputs_its_executor_returns() -> None:
    # echo returns exactly its data; sleep nothing; the keras kinds one named array file;
    # a script any files (plus its stdout and stderr).
    assert kinds.declared_outputs(kinds.get("echo"), {"data": "héllo"}) == (frozenset({"stdout"}), 1, 6)
    assert kinds.declared_outputs(kinds.get("echo"), {}) == (frozenset({"stdout"}), 1, 0)
    assert kinds.declared_outputs(kinds.get("sleep"), {"seconds": 1}) == (frozenset(), 0, 64 << 20)
    assert kinds.declared_outputs(kinds.get("keras-train"), {}, 8) == (frozenset({"weights"}), 1, 8 << 20)
    assert kinds.declared_outputs(kinds.get("keras-predict"), {}) == (frozenset({"predictions"}), 1, 64 << 20)
    assert kinds.declared_outputs(kinds.get("python"), {}, 4) == (None, 64, (4 << 20) + (2 << 20))


def test_the_echo_output_is_what_the_executor_makes_of_its_data(tmp_path: Any) -> None:
    from peerd.executor.kinds import echo
    from peerd.executor.kinds._base import TaskContext

    data = "ünïcode ✓"
    names, count, size = kinds.declared_outputs(kinds.get("echo"), {"data": data})
    out = echo.run(TaskContext(job_id="j", params={"data": data}, inputs={}, workdir=tmp_path, limits={}))
    assert set(out.outputs) == names and len(out.outputs) == count
    assert sum(len(v) for v in out.outputs.values()) == size
