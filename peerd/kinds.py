"""Task kinds: one registry, read by the task spec, the submitter, the contractor and the executor.

Each kind says what it needs (trusted submitters only? several rounds?), its ``[params]`` schema
(keys, types, required or optional, bounds), which inputs it needs, which are split across the
shards and which stay with the submitter, and how the executor runs it (the module under
``peerd.executor.kinds`` and the class of warm worker). docs/tasks.md shows the same tables.

Plain data and plain Python only: the sandboxed worker imports this (through
``peerd.executor.kinds``), and it must import nothing heavy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from protocol.messages import AGGREGATION_RULES, TASK_KINDS

ParamType = Literal["str", "int", "number", "bool", "str_list", "int_pair", "path", "keras_model"]

KERAS_OPTIMIZERS = ("adam", "sgd", "rmsprop", "adagrad")
KERAS_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "mse", "binary_crossentropy")
KERAS_METRICS = (
    "accuracy",
    "sparse_categorical_accuracy",
    "categorical_accuracy",
    "binary_accuracy",
    "mae",
    "mse",
)
#: The announce (params included) must fit one gossip message (60 KiB, peerd/node.py): a model
#: config larger than this would only fail at submit, later and less clearly.
MAX_MODEL_CONFIG = 40_000
#: A result's outputs in all, unless the spec sets ``max_output_mb`` (docs/tasks.md "Outputs"):
#: the executor's default ``[limits] max_output_mb``, so an honest default contractor fits.
DEFAULT_OUTPUT_MB = 64
#: Outputs per result on the wire (``Result.outputs``, SPEC §7.7).
MAX_RESULT_OUTPUTS = 64
#: A script's captured stdout and stderr, each (``peerd.executor.kinds.python.STREAM_CAP``).
STREAM_BYTES = 1 << 20


@dataclass(frozen=True)
class Param:
    """One key of a kind's ``[params]``. Bounds are inclusive; ``choices`` limit a string or the
    items of a string list. ``path``: a file the spec names, read at submit and inlined as the
    parameter ``inline_as`` (``model_config_file`` → ``model_config``)."""

    type: ParamType
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    max_len: int | None = None
    inline_as: str | None = None
    doc: str = ""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit, or None."""
        t = self.type
        if t == "keras_model":
            return _keras_model_problem(value)
        if t in ("str", "path"):
            if not isinstance(value, str):
                return f"must be a string, got {_show(value)}"
            if self.max_len is not None and len(value) > self.max_len:
                return f"longer than {self.max_len} characters"
            if self.choices and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}, got {_show(value)}"
            return None
        if t == "bool":
            return None if isinstance(value, bool) else f"must be true or false, got {_show(value)}"
        if t == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not self._in_bounds(value):
                return f"must be an integer from {self.lo:.0f} to {self.hi:.0f}, got {_show(value)}"
            return None
        if t == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not self._in_bounds(value):
                return f"must be a number from {self.lo:g} to {self.hi:g}, got {_show(value)}"
            return None
        if t == "str_list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return f"must be a list of strings, got {_show(value)}"
            bad = [v for v in value if self.choices and v not in self.choices]
            if bad:
                return f"{bad[0]!r} is not one of {', '.join(self.choices)}"
            return None
        if t == "int_pair":
            if (
                not isinstance(value, list)
                or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
                or value[0] >= value[1]
            ):
                return f"must be [start, stop] with 0 <= start < stop, got {_show(value)}"
            return None
        raise AssertionError(f"unknown parameter type {t}")

    def _in_bounds(self, v: float) -> bool:
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)

    def describe(self) -> str:
        """The type and bounds, as docs/tasks.md shows them."""
        t = self.type
        if t == "int":
            return f"integer {self.lo:.0f} … {self.hi:.0f}"
        if t == "number":
            return f"number {self.lo:g} … {self.hi:g}"
        if self.choices:
            return ("list of " if t == "str_list" else "") + " \\| ".join(f"`{c}`" for c in self.choices)
        return {
            "str": "string",
            "bool": "bool",
            "str_list": "list of strings",
            "int_pair": "[start, stop]",
            "path": "file path",
            "keras_model": "string (JSON)",
        }[t]


def _keras_model_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a Keras model JSON config (a string), or give model_config_file"
    try:
        model = json.loads(value)
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    # A Keras model config is an object {"class_name": ..., "config": {...}}; anything else
    # would only fail later, on every contractor, after the bidding.
    if (
        not isinstance(model, dict)
        or not isinstance(model.get("class_name"), str)
        or not isinstance(model.get("config"), dict)
    ):
        return 'not a Keras model config (a JSON object with "class_name" and "config")'
    if len(value) > MAX_MODEL_CONFIG:
        return "larger than 40 kB (the announce must fit one 60 KiB gossip message)"
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Kind:
    name: str
    #: The executor entry: ``peerd.executor.kinds.<module>.run``.
    module: str
    #: The warm worker class that runs it: "light" (no TensorFlow) or "tf" (Keras pre-imported).
    worker_class: str
    #: Whether its worker may serve further jobs of the same submitter (not when a job can leave
    #: processes or state behind in the sandbox).
    reusable_worker: bool
    #: Runs the submitter's own code: only for submitters in policy.trusted_submitters.
    trusted_only: bool = False
    #: Same inputs, params and seed give the same outputs bit for bit (what aggregation
    #: rounds compare: every committee member recomputes the aggregate).
    deterministic: bool = True
    params: Mapping[str, Param] = field(default_factory=dict)
    #: Inputs a spec must name, with what each is.
    required_inputs: Mapping[str, str] = field(default_factory=dict)
    #: Inputs (.npz) split across the shards in proportion to C instead of sent whole.
    split_inputs: tuple[str, ...] = ()
    #: Inputs that never leave the submitter (it evaluates certified models on them).
    local_only_inputs: tuple[str, ...] = ()
    #: May run several aggregation rounds (the certified output of round r starts round r+1,
    #: as the input ``chained_input``).
    multi_round: bool = False
    chained_input: str | None = None
    default_aggregation: str = "none"
    #: Aggregation rules it admits.
    aggregations: tuple[str, ...] = AGGREGATION_RULES
    #: The job's ``seed`` param is derived per round (task seed · 1000 + round), the same on
    #: every shard, so every participant starts round 1 from the same initial weights.
    seed_per_round: bool = False
    #: The kind the submitter runs locally to score a certified output on its local-only inputs.
    evaluate_with: str | None = None
    #: Params every job of this kind gets unless the announce sets them.
    job_defaults: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    #: The outputs a result may carry (issue 8 item 3; docs/tasks.md "Outputs"). None: any
    #: name (a script's own files, next to its ``stdout`` and ``stderr``).
    outputs: tuple[str, ...] | None = ()


_KERAS_MODEL = {
    "model_config": Param("keras_model", required=True, doc="Keras model JSON config (`model.to_json()`)"),
    "model_config_file": Param("path", inline_as="model_config", doc="read at submit as `model_config`"),
    "loss": Param("str", choices=KERAS_LOSSES, doc="default `sparse_categorical_crossentropy`"),
    "metrics": Param("str_list", choices=KERAS_METRICS, doc='default `["accuracy"]`'),
    "batch_size": Param("int", lo=1, hi=1 << 16),
    "range": Param("int_pair", doc="train or predict on samples [start, stop) only"),
    # Pixels travel as uint8 and become float32 in the worker: a 4× smaller shard before
    # compression (8.3 against 13.1 MB deflated for a third of Fashion-MNIST, docs/benchmarks.md).
    "x_scale": Param(
        "number",
        lo=1e-12,
        hi=1e12,
        doc="default 1; `x` is cast to float32 and multiplied by it (1/255 for uint8 pixels)",
    ),
}

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "echo",
            module="echo",
            worker_class="light",
            reusable_worker=True,
            params={"data": Param("str", doc="returned as the output `stdout`")},
            doc="returns `params.data` (tests, benchmarks)",
            outputs=("stdout",),
        ),
        Kind(
            "sleep",
            module="sleep",
            worker_class="light",
            reusable_worker=True,
            params={"seconds": Param("number", required=True, lo=0, hi=86400)},
            doc="sleeps (tests of deadlines and cancellation)",
        ),
        Kind(
            "keras-train",
            module="keras_train",
            worker_class="tf",
            reusable_worker=True,
            params={
                **_KERAS_MODEL,
                "optimizer": Param("str", choices=KERAS_OPTIMIZERS, doc="default `adam`"),
                "learning_rate": Param("number", lo=1e-9, hi=10, doc="default 0.001"),
                "epochs": Param("int", lo=1, hi=1000, doc="default 1"),
                "batch_size": Param("int", lo=1, hi=1 << 16, doc="default 32"),
                # seed · 1000 + round must stay a valid seed (below 2³²).
                "seed": Param("int", lo=0, hi=4_000_000, doc="default 0; also seeds the data split"),
                "shuffle": Param("bool", doc="default true"),
                "deterministic": Param(
                    "bool",
                    doc="default false; true: bit-identical weights (op determinism, a model built anew)",
                ),
                "round_timeout_s": Param(
                    "number", lo=1, hi=86400, doc="how long a committee waits for commits"
                ),
            },
            required_inputs={"data": "an .npz with x (and y)"},
            split_inputs=("data",),
            local_only_inputs=("validation", "test"),
            multi_round=True,
            chained_input="weights",
            default_aggregation="weighted_mean",
            aggregations=tuple(r for r in AGGREGATION_RULES if r != "none"),
            seed_per_round=True,
            evaluate_with="keras-predict",
            doc="trains one shard of one round; rounds are aggregated and certified",
            outputs=("weights",),
        ),
        Kind(
            "keras-predict",
            module="keras_predict",
            worker_class="tf",
            reusable_worker=True,
            params={
                **_KERAS_MODEL,
                "batch_size": Param("int", lo=1, hi=1 << 16, doc="default 256"),
                "seed": Param("int", lo=0, hi=4_000_000, doc="default 0; seeds the data split"),
            },
            required_inputs={"data": "an .npz with x (and y)", "weights": "the model's weights"},
            split_inputs=("data",),
            multi_round=True,
            doc="runs a model over `data`",
            outputs=("predictions",),
        ),
        Kind(
            "python",
            module="python",
            worker_class="light",
            # A script can leave processes or state behind in the sandbox.
            reusable_worker=False,
            trusted_only=True,
            deterministic=False,
            params={"args": Param("str_list", doc="the script's command-line arguments")},
            required_inputs={"script": "its script as an input file"},
            job_defaults={"script": "script"},  # the worker's script param names the input
            doc="runs the submitter's script (trusted submitters only)",
            outputs=None,
        ),
    )
}

assert set(KINDS) == set(TASK_KINDS), "the registry and the protocol's kinds differ"


def get(name: str) -> Kind:
    """The kind ``name``; KeyError for a kind this peer does not know."""
    return KINDS[name]


def worker_classes() -> frozenset[str]:
    return frozenset(k.worker_class for k in KINDS.values())


def declared_outputs(
    kind: Kind, params: Mapping[str, Any], max_output_mb: int | None = None
) -> tuple[frozenset[str] | None, int, int]:
    """What a result of a ``kind`` task with ``params`` may carry: (output names or None for
    any, how many at most, how many bytes in all). ``max_output_mb``: the spec's bound
    (default :data:`DEFAULT_OUTPUT_MB`). ``echo`` returns its ``data``: exactly that many bytes."""
    cap = (DEFAULT_OUTPUT_MB if max_output_mb is None else max_output_mb) << 20
    if kind.outputs is None:
        return None, MAX_RESULT_OUTPUTS, cap + 2 * STREAM_BYTES
    if kind.name == "echo":
        data = params.get("data", "")
        cap = len(data.encode()) if isinstance(data, str) else cap
    return frozenset(kind.outputs), len(kind.outputs), cap


def params_problem(kind: Kind, params: Mapping[str, Any]) -> str | None:
    """The first problem of ``params`` against the kind's schema, as ``params.<key>: why``:
    an unknown key, a missing required one, a value of the wrong type or out of bounds."""
    for key in params:
        if key not in kind.params:
            known = ", ".join(sorted(kind.params)) or "none"
            return f"params.{key}: unknown parameter for {kind.name} tasks (known: {known})"
    for key, p in kind.params.items():
        if key not in params:
            inlined = any(q.inline_as == key and k in params for k, q in kind.params.items())
            if p.required and not inlined:
                return f"params.{key}: required for {kind.name} tasks"
            continue
        why = p.problem(params[key])
        if why is not None:
            return f"params.{key}: {why}"
    return None


__all__ = ["KINDS", "Kind", "Param", "declared_outputs", "get", "params_problem", "worker_classes"]
