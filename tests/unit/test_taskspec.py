"""Task specs (peerd/taskspec.py, issue 3 item 1): one validated object for the TOML of
``peerctl submit FILE`` and the JSON of RPC ``task.submit``; every error names its field.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.taskspec import SpecError, TaskSpec, parse_spec
from protocol.messages import TaskAnnounce

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODEL = json.dumps({"class_name": "Sequential", "config": {"name": "m", "layers": []}})


def keras(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": "keras-train", "inputs": {"data": "/srv/train.npz"}, "params": {"model_config": MODEL},
    }
    spec.update(extra)
    return spec


def test_defaults() -> None:
    spec = parse_spec({"kind": "echo"})
    assert spec == TaskSpec(
        kind="echo", work=1.0, deadline_s=600.0, max_shards=1, aggregation="none", rounds=1,
        bid_window_ms=None, gpu=False, memory_mb=512, inputs={}, params={}, name="",
    )
    assert parse_spec(keras()).aggregation == "weighted_mean"


@pytest.mark.parametrize("path", sorted(p.name for p in EXAMPLES.glob("*.toml") if p.name != "peerd.toml"))
def test_every_example_spec_parses(path: str) -> None:
    f = EXAMPLES / path
    spec = parse_spec(tomllib.loads(f.read_text()), base_dir=f.parent)
    for name, p in spec.inputs.items():
        assert Path(p).is_absolute(), name
        assert Path(p).parent == EXAMPLES or EXAMPLES in Path(p).parents
    if spec.kind == "keras-train":
        assert "model_config_file" not in spec.params
        assert json.loads(spec.params["model_config"])["class_name"]


def test_json_round_trip_is_stable() -> None:
    for f in EXAMPLES.glob("*.toml"):
        if f.name == "peerd.toml":
            continue
        spec = parse_spec(tomllib.loads(f.read_text()), base_dir=f.parent)
        # What peerctl sends over RPC is to_json(); the daemon parses it again without base_dir.
        assert parse_spec(json.loads(json.dumps(spec.to_json()))) == spec


def test_relative_inputs_resolve_against_the_spec_directory(tmp_path: Path) -> None:
    spec = parse_spec({"kind": "python", "inputs": {"script": "s.py", "abs": "/x/y"}}, base_dir=tmp_path)
    assert spec.inputs == {"script": str(tmp_path / "s.py"), "abs": "/x/y"}


def test_model_config_file_is_read_relative_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(MODEL)
    spec = parse_spec(keras(params={"model_config_file": "m.json"}), base_dir=tmp_path)
    assert spec.params["model_config"] == MODEL


def test_the_callers_params_are_not_mutated(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(MODEL)
    params = {"model_config_file": "m.json"}
    parse_spec(keras(params=params), base_dir=tmp_path)
    assert params == {"model_config_file": "m.json"}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("not an object", [], "spec:"),  # type: ignore[list-item]
    ("unknown field", {"kind": "echo", "colour": "red"}, "colour:"),
    ("no kind", {}, "kind:"),
    ("unknown kind", {"kind": "bitcoin-mining"}, "kind:"),
    ("work zero", {"kind": "echo", "work": 0}, "work:"),
    ("work infinite", {"kind": "echo", "work": float("inf")}, "work:"),
    ("work a string", {"kind": "echo", "work": "lots"}, "work:"),
    ("work a bool", {"kind": "echo", "work": True}, "work:"),
    ("deadline below 1 s", {"kind": "echo", "deadline_s": 0.5}, "deadline_s:"),
    ("deadline above 30 days", {"kind": "echo", "deadline_s": 31 * 86400}, "deadline_s:"),
    ("max_shards 0", {"kind": "echo", "max_shards": 0}, "max_shards: must be an integer from 1 to 64, got 0"),
    ("max_shards 65", {"kind": "echo", "max_shards": 65}, "max_shards:"),
    ("max_shards float", {"kind": "echo", "max_shards": 2.0}, "max_shards:"),
    ("bad aggregation", {"kind": "echo", "aggregation": "mean"}, "aggregation:"),
    ("rounds 0", {"kind": "echo", "rounds": 0}, "rounds:"),
    ("echo with rounds", {"kind": "echo", "rounds": 2}, "rounds:"),
    ("bid window 0", {"kind": "echo", "bid_window_ms": 0}, "bid_window_ms:"),
    ("resources not a table", {"kind": "echo", "resources": 3}, "resources:"),
    ("unknown resource", {"kind": "echo", "resources": {"tpu": True}}, "resources.tpu:"),
    ("gpu not a bool", {"kind": "echo", "resources": {"gpu": "yes"}}, "resources.gpu:"),
    ("negative memory", {"kind": "echo", "resources": {"memory_mb": -1}}, "resources.memory_mb:"),
    ("inputs not a table", {"kind": "echo", "inputs": ["a"]}, "inputs:"),
    ("input name with a slash", {"kind": "echo", "inputs": {"../x": "/a"}}, "inputs.../x:"),
    # The protocol's NAME starts with a letter or digit; these used to pass the spec check and
    # then fail when the daemon signed the announce (an internal error instead of a spec error).
    ("input name starting with a dot", {"kind": "echo", "inputs": {".hidden": "/a"}}, "inputs..hidden:"),
    ("param name starting with _", {"kind": "echo", "params": {"_x": 1}}, "params._x:"),
    ("input path empty", {"kind": "echo", "inputs": {"a": ""}}, "inputs.a:"),
    ("input path a number", {"kind": "echo", "inputs": {"a": 3}}, "inputs.a:"),
    ("too many inputs", {"kind": "echo", "inputs": {f"i{i}": "/a" for i in range(65)}}, "inputs:"),
    ("params not a table", {"kind": "echo", "params": "x"}, "params:"),
    ("too many params", {"kind": "echo", "params": {f"p{i}": i for i in range(65)}}, "params:"),
    ("param nests too deeply", {"kind": "echo", "params": {"deep": [[[[[[[[1]]]]]]]]}}, "params.deep:"),
    ("param list too long", {"kind": "echo", "params": {"long": list(range(300))}}, "params.long:"),
    ("param not finite", {"kind": "echo", "params": {"x": float("nan")}}, "params.x:"),
    ("param beyond 64 bits", {"kind": "echo", "params": {"big": 2**70}}, "params.big:"),
    ("name too long", {"kind": "echo", "name": "x" * 129}, "name:"),
    ("echo data not a string", {"kind": "echo", "params": {"data": 5}}, "params.data:"),
    ("sleep without seconds", {"kind": "sleep"}, "params.seconds:"),
    ("sleep negative", {"kind": "sleep", "params": {"seconds": -1}}, "params.seconds:"),
    ("python without script", {"kind": "python"}, "inputs.script:"),
    ("python args not strings", {"kind": "python", "inputs": {"script": "/s.py"}, "params": {"args": [1]}},
     "params.args:"),
    ("keras without model", keras(params={}), "params.model_config:"),
    ("keras model not JSON", keras(params={"model_config": "{not json"}),
     "params.model_config: not valid JSON"),
    ("keras model not a config", keras(params={"model_config": "[1, 2]"}), "params.model_config:"),
    ("keras model without class", keras(params={"model_config": '{"config": {}}'}), "params.model_config:"),
    ("keras model too big", keras(params={"model_config": json.dumps(
        {"class_name": "Sequential", "config": {"pad": "x" * 50_000}})}), "params.model_config:"),
    ("keras model file missing", keras(params={"model_config_file": "/nonexistent/m.json"}),
     "params.model_config_file:"),
    ("keras without data", keras(inputs={}), "inputs.data:"),
    ("keras-train with aggregation none", keras(aggregation="none"), "aggregation:"),
    ("keras bad optimizer", keras(params={"model_config": MODEL, "optimizer": "lion"}), "params.optimizer:"),
    ("keras bad loss", keras(params={"model_config": MODEL, "loss": "hinge"}), "params.loss:"),
    ("keras epochs 0", keras(params={"model_config": MODEL, "epochs": 0}), "params.epochs:"),
    ("keras batch 0", keras(params={"model_config": MODEL, "batch_size": 0}), "params.batch_size:"),
    ("keras-predict without weights", {"kind": "keras-predict", "inputs": {"data": "/d.npz"},
                                       "params": {"model_config": MODEL}}, "inputs.weights:"),
]


@pytest.mark.parametrize(("case", "obj", "prefix"), BAD, ids=[b[0] for b in BAD])
def test_bad_specs_name_the_field(case: str, obj: Any, prefix: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(obj)
    assert str(err.value).startswith(prefix), (case, str(err.value))


# --- what the spec admits, the announce carries ---------------------------------------------------

_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_names, _values, max_size=8), st.dictionaries(_names, st.just("/srv/x"), max_size=4))
def test_every_accepted_spec_fits_an_announce(params: dict[str, Any], inputs: dict[str, str]) -> None:
    """A spec parse_spec accepts must not make the daemon's announce constructor fail (that
    would reach the RPC caller as an internal error rather than a spec error)."""
    try:
        spec = parse_spec({"kind": "echo", "params": {**params, "data": "x"}, "inputs": inputs})
    except SpecError:
        return
    ref = {"sha256": "0" * 64, "size": 1}
    TaskAnnounce(
        seq=1, issued_at=0, expires_at=1000, task_id="ab" * 16, kind=spec.kind, work=spec.work,
        deadline_ms=int(spec.deadline_s * 1000), max_shards=spec.max_shards,
        resources={"gpu": spec.gpu, "memory_mb": spec.memory_mb}, aggregation=spec.aggregation,
        rounds=spec.rounds, params=json.loads(json.dumps(spec.params)), inputs={n: ref for n in spec.inputs},
        bid_window_ms=300, net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
    )


def test_max_output_mb_is_optional_bounded_and_round_trips() -> None:
    base = {"kind": "echo", "params": {"data": "x"}}
    assert parse_spec(base).max_output_mb is None and "max_output_mb" not in parse_spec(base).to_json()
    spec = parse_spec({**base, "max_output_mb": 8})
    assert spec.max_output_mb == 8 and parse_spec(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(SpecError, match=r"^max_output_mb: must be an integer from 0 to 32768"):
        parse_spec({**base, "max_output_mb": 1 << 20})


def test_verify_replicate_is_for_replicable_plain_kinds_only() -> None:
    spec = parse_spec({"kind": "echo", "params": {"data": "x"}, "verify": "replicate", "max_shards": 2})
    assert (spec.verify, spec.replicas) == ("replicate", 2)
    assert spec.announce_verify() == {"mode": "replicate", "replicas": 2}
    assert spec.to_json()["verify"] == "replicate" and spec.to_json()["replicas"] == 2
    assert parse_spec({"kind": "echo"}).announce_verify() is None
    bad = [
        ({"kind": "echo", "verify": "vote"}, "verify: must be one of none, replicate"),
        ({"kind": "echo", "replicas": 3}, 'replicas: only with verify = "replicate"'),
        ({"kind": "echo", "verify": "replicate", "replicas": 6}, "replicas: must be an integer from 2 to 5"),
        ({"kind": "echo", "verify": "replicate", "replicas": 2, "max_shards": 33}, "max_shards × replicas"),
        ({"kind": "python", "verify": "replicate", "inputs": {"script": "/x.py"}}, "python tasks cannot be"),
    ]
    for obj, msg in bad:
        with pytest.raises(SpecError, match=msg.replace("(", r"\(")):
            parse_spec(obj)


def test_spot_check_commits_to_a_salt_and_takes_its_fraction() -> None:
    spec = parse_spec(
        {"kind": "sleep", "params": {"seconds": 0}, "verify": "spot-check", "spot_fraction": 0.25}
    )
    assert (spec.verify, spec.spot_fraction, spec.replicas) == ("spot-check", 0.25, 1)
    v = spec.announce_verify(b"\x01" * 32)
    assert v is not None and v["mode"] == "spot-check" and v["fraction"] == 0.25
    assert v["commit"] == hashlib.sha256(b"\x01" * 32).hexdigest()
    assert parse_spec({"kind": "echo", "verify": "spot-check"}).spot_fraction == 0.1
    with pytest.raises(SpecError, match='spot_fraction: only with verify = "spot-check"'):
        parse_spec({"kind": "echo", "spot_fraction": 0.5})
    with pytest.raises(SpecError, match="spot_fraction: must be a number"):
        parse_spec({"kind": "echo", "verify": "spot-check", "spot_fraction": 0})
