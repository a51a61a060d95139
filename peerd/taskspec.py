"""Task specs: the TOML file of `peerctl submit FILE` and the JSON of RPC `task.submit`.

One validated object for both (issue 3 item 1). Every error names the field and the
problem (``max_shards: must be an integer from 1 to 64, got 0``). Input files are read
by the daemon and become content-addressed blobs; the spec keeps only their paths.

A spec::

    kind = "keras-train"        # echo | sleep | python | keras-train | keras-predict
    work = 120.0                # W: estimated work in GFLOP (docs/design.md §4)
    deadline_s = 600            # D: seconds from submission; R = W / D
    max_shards = 3
    aggregation = "weighted_mean"   # none | sum | weighted_mean | trimmed_mean | median
    rounds = 5
    bid_window_ms = 300         # optional, default from the daemon's config
    [resources]
    gpu = false
    memory_mb = 1024
    [inputs]                    # name = path to a local file
    data = "train.npz"
    [params]                    # kind-specific: the schema in peerd/kinds.py, docs/tasks.md
    epochs = 1
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerd import kinds
from protocol import schema
from protocol.awards import spot_commit
from protocol.errors import ProtocolError
from protocol.messages import AGGREGATION_RULES, MAX_REPLICAS, TASK_KINDS

#: Input and parameter names travel in the signed announce as protocol NAMEs (SPEC §7):
#: checking them here with the same pattern turns what would be an internal error when
#: the daemon signs the announce into a spec error naming the field.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
#: The announce carries at most this many parameters and inputs (``TaskAnnounce``).
MAX_PARAMS = 64
MAX_INPUTS = 64
#: One value of ``params``: what the announce's ``params`` field admits (depth, width,
#: finite numbers). Integers beyond 64 bits are refused too: msgpack cannot carry them.
_PARAM_VALUE = schema.anything()
TOP_KEYS = {
    "kind",
    "work",
    "deadline_s",
    "max_shards",
    "aggregation",
    "rounds",
    "bid_window_ms",
    "resources",
    "inputs",
    "params",
    "name",
    "max_output_mb",
    "verify",
    "replicas",
    "spot_fraction",
}
#: ``verify`` values (SPEC §7.10): ``none`` believes each shard's one holder.
VERIFY_CHOICES = ("none", "replicate", "spot-check")


class SpecError(ValueError):
    """A spec problem; the message starts with the field's name."""


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    work: float
    deadline_s: float
    max_shards: int
    aggregation: str
    rounds: int
    bid_window_ms: int | None
    gpu: bool
    memory_mb: int
    inputs: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    #: What a result may carry in all, MiB (docs/tasks.md "Outputs"); None: the kind's default.
    max_output_mb: int | None = None
    #: How results are checked (docs/tasks.md "Replicated results", SPEC §7.10).
    verify: str = "none"
    #: Copies of each shard under ``verify = "replicate"`` (1 otherwise).
    replicas: int = 1
    #: Under ``verify = "spot-check"``: the chance each shard gets a second copy.
    spot_fraction: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "work": self.work,
            "deadline_s": self.deadline_s,
            "max_shards": self.max_shards,
            "aggregation": self.aggregation,
            "rounds": self.rounds,
            "bid_window_ms": self.bid_window_ms,
            "resources": {"gpu": self.gpu, "memory_mb": self.memory_mb},
            "inputs": dict(self.inputs),
            "params": self.params,
        }
        if self.max_output_mb is not None:
            out["max_output_mb"] = self.max_output_mb
        if self.verify == "replicate":
            out["verify"] = self.verify
            out["replicas"] = self.replicas
        elif self.verify == "spot-check":
            out["verify"] = self.verify
            out["spot_fraction"] = self.spot_fraction
        return out

    def announce_verify(self, salt: bytes | None = None) -> dict[str, Any] | None:
        """The announce's ``verify`` field (protocol/messages.py ``TaskAnnounce``); a spot
        check commits to ``salt``, the submitter's secret (SPEC §7.10)."""
        if self.verify == "none":
            return None
        if self.verify == "spot-check":
            if salt is None:
                raise ValueError("a spot-checked task needs its salt")
            return {"mode": self.verify, "fraction": self.spot_fraction, "commit": spot_commit(salt)}
        return {"mode": self.verify, "replicas": self.replicas}


def _num(
    spec: dict[str, Any], key: str, lo: float, hi: float, default: float | None = None, *, where: str = ""
) -> float:
    """``where``: the table ``spec`` is (``"params."``), so the error names the full field."""
    v = spec.get(key, default)
    if v is None:
        raise SpecError(f"{where}{key}: required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise SpecError(f"{where}{key}: must be a number from {lo:g} to {hi:g}, got {v!r}")
    return float(v)


def _int(
    spec: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None, *, where: str = ""
) -> int:
    v = spec.get(key, default)
    if v is None:
        raise SpecError(f"{where}{key}: required")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpecError(f"{where}{key}: must be an integer from {lo} to {hi}, got {v!r}")
    return v


def _check_param_value(name: str, value: Any) -> None:
    try:
        _PARAM_VALUE(value)
        _fits_msgpack(value)
    except (ProtocolError, SpecError) as exc:
        raise SpecError(f"params.{name}: {exc}") from None


def _fits_msgpack(v: Any) -> None:
    if isinstance(v, bool) or v is None:
        return
    if isinstance(v, int) and not -(2**63) <= v < 2**64:
        raise SpecError("integer out of the 64-bit range")
    if isinstance(v, dict):
        for x in v.values():
            _fits_msgpack(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _fits_msgpack(x)


def parse_spec(obj: Any, *, base_dir: Path | None = None) -> TaskSpec:
    """Validate a spec object (decoded TOML or JSON). Relative input paths are resolved
    against ``base_dir`` (the spec file's directory)."""
    if not isinstance(obj, dict):
        raise SpecError("spec: must be a table/object")
    unknown = sorted(set(obj) - TOP_KEYS)
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(TOP_KEYS))})")
    kind = obj.get("kind")
    if kind not in TASK_KINDS:
        raise SpecError(f"kind: must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    work = _num(obj, "work", 1e-9, 1e15, 1.0)
    deadline_s = _num(obj, "deadline_s", 1, 30 * 86400, 600)
    max_shards = _int(obj, "max_shards", 1, 64, 1)
    aggregation = obj.get("aggregation", kinds.get(kind).default_aggregation)
    if aggregation not in AGGREGATION_RULES:
        raise SpecError(f"aggregation: must be one of {', '.join(AGGREGATION_RULES)}, got {aggregation!r}")
    rounds = _int(obj, "rounds", 1, 1000, 1)
    bid_window = obj.get("bid_window_ms")
    if bid_window is not None:
        bid_window = _int(obj, "bid_window_ms", 1, 60_000)
    res = obj.get("resources", {})
    if not isinstance(res, dict):
        raise SpecError("resources: must be a table")
    if set(res) - {"gpu", "memory_mb"}:
        raise SpecError(f"resources.{sorted(set(res) - {'gpu', 'memory_mb'})[0]}: unknown field")
    gpu = res.get("gpu", False)
    if not isinstance(gpu, bool):
        raise SpecError(f"resources.gpu: must be true or false, got {gpu!r}")
    memory_mb = res.get("memory_mb", 512)
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not 0 <= memory_mb <= 1 << 26:
        raise SpecError(f"resources.memory_mb: must be a non-negative integer, got {memory_mb!r}")
    inputs_obj = obj.get("inputs", {})
    if not isinstance(inputs_obj, dict):
        raise SpecError("inputs: must be a table of name = file path")
    if len(inputs_obj) > MAX_INPUTS:
        raise SpecError(f"inputs: at most {MAX_INPUTS} input files, got {len(inputs_obj)}")
    inputs: dict[str, str] = {}
    for name, path in inputs_obj.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise SpecError(
                f"inputs.{name}: names start with a letter or digit, then letters, digits, '_', '.', '-'"
                " (at most 64)"
            )
        if not isinstance(path, str) or not path:
            raise SpecError(f"inputs.{name}: must be a file path")
        p = Path(path)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        inputs[name] = str(p)
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise SpecError("params: must be a table")
    if len(params) > MAX_PARAMS:
        raise SpecError(f"params: at most {MAX_PARAMS} parameters, got {len(params)}")
    for pname, pvalue in params.items():
        if not isinstance(pname, str) or not NAME_RE.fullmatch(pname):
            raise SpecError(
                f"params.{pname}: invalid parameter name (a letter or digit, then letters, digits,"
                " '_', '.', '-'; at most 64)"
            )
        _check_param_value(pname, pvalue)
    name = obj.get("name", "")
    if not isinstance(name, str) or len(name) > 128:
        raise SpecError("name: must be a string of at most 128 characters")
    max_output_mb = obj.get("max_output_mb")
    if max_output_mb is not None:
        # A result carries at most 64 outputs of 512 MiB each (SPEC §7.7, the blob cap).
        max_output_mb = _int(obj, "max_output_mb", 0, 64 * 512)
    verify = obj.get("verify", "none")
    if verify not in VERIFY_CHOICES:
        raise SpecError(f"verify: must be one of {', '.join(VERIFY_CHOICES)}, got {verify!r}")
    if verify != "replicate" and "replicas" in obj:
        raise SpecError('replicas: only with verify = "replicate"')
    if verify != "spot-check" and "spot_fraction" in obj:
        raise SpecError('spot_fraction: only with verify = "spot-check"')
    replicas, spot_fraction = 1, None
    if verify == "spot-check":
        spot_fraction = _num(obj, "spot_fraction", 1e-6, 1.0, 0.1)
        if max_shards * 2 > 64:
            raise SpecError(f"max_shards: at most 32 with verify = \"spot-check\", got {max_shards}")
    elif verify == "replicate":
        replicas = _int(obj, "replicas", 2, MAX_REPLICAS, 2)
        if max_shards * replicas > 64:
            # An award holds at most 64 shards, replicas included (SPEC §7.10).
            raise SpecError(
                f"replicas: max_shards × replicas must be at most 64, got {max_shards} × {replicas}"
            )
    spec = TaskSpec(
        kind=kind,
        work=work,
        deadline_s=deadline_s,
        max_shards=max_shards,
        aggregation=aggregation,
        rounds=rounds,
        bid_window_ms=bid_window,
        gpu=gpu,
        memory_mb=memory_mb,
        inputs=inputs,
        params=dict(params),
        name=name,
        max_output_mb=max_output_mb,
        verify=verify,
        replicas=replicas,
        spot_fraction=spot_fraction,
    )
    _check_kind(spec, base_dir)
    return spec


def _check_kind(spec: TaskSpec, base_dir: Path | None) -> None:
    """What the kind asks of a spec (peerd/kinds.py): rounds, its ``[params]`` schema (unknown,
    missing and mistyped keys are refused, the key named), its inputs, its aggregation rules."""
    kind = kinds.get(spec.kind)
    p = spec.params
    if spec.rounds != 1 and not kind.multi_round:
        raise SpecError(f"rounds: {spec.kind} tasks run once (rounds = 1)")
    for key, param in kind.params.items():
        if param.inline_as is None or key not in p:
            continue
        # A file named in the spec, read now and inlined (model_config_file → model_config).
        why = param.problem(p[key])
        if why is not None:
            raise SpecError(f"params.{key}: {why}")
        path = Path(p.pop(key))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            p[param.inline_as] = path.read_text()
        except OSError as exc:
            raise SpecError(f"params.{key}: cannot read {path}: {exc.strerror}") from None
    problem = kinds.params_problem(kind, p)
    if problem is not None:
        raise SpecError(problem)
    for name, what in kind.required_inputs.items():
        if name not in spec.inputs:
            raise SpecError(f"inputs.{name}: a {spec.kind} task needs {what}")
    if spec.aggregation not in kind.aggregations:
        raise SpecError(
            f"aggregation: {spec.kind} tasks take {', '.join(kind.aggregations)}, got {spec.aggregation!r}"
        )
    if spec.verify != "none" and not replicable(kind, spec.aggregation):
        # Replicas are compared byte for byte (SPEC §7.10): only a kind whose output is a
        # function of its inputs on every machine can be checked so. Aggregated tasks are
        # checked by their committee already; keras kinds' floats differ across CPUs.
        ok = ", ".join(k.name for k in kinds.KINDS.values() if replicable(k, "none"))
        raise SpecError(f"verify: {spec.kind} tasks cannot be replicated (only plain tasks of: {ok})")


def replicable(kind: kinds.Kind, aggregation: str) -> bool:
    """Whether replicas of a ``kind`` task can be compared byte for byte (SPEC §7.10)."""
    return aggregation == "none" and kind.deterministic and not kind.multi_round and not kind.trusted_only
