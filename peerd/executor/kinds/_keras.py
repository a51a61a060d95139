"""Shared by the keras kinds: safe model loading, allow-lists, data and weight decoding.

No submitter code runs in a keras job. The model arrives as a Keras JSON config and is rebuilt with
``keras.saving.deserialize_keras_object(..., safe_mode=True)``, which refuses Python lambdas; on top
of that, :func:`check_model_config` walks the config first and refuses anything that is not a Keras
built-in (a ``module`` outside ``keras.*``, registered custom objects, ``Lambda`` layers, layers
that load files). Optimizer, loss and metrics are names from allow-lists, never objects. Data is
read with ``allow_pickle=False`` (a pickled .npy is code execution).

Keras/TensorFlow are imported lazily: this module is imported only inside a "tf" worker.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peerd.executor.kinds._base import TaskContext, TaskFailed, param
from peerd.executor.kinds._resident import ResidentCache, budget_for, content_key
from protocol.errors import ProtocolError
from protocol.tensors import decode_arrays

OPTIMIZERS = {"adam": "Adam", "sgd": "SGD", "rmsprop": "RMSprop", "adagrad": "Adagrad"}
LOSSES = frozenset(
    {"sparse_categorical_crossentropy", "categorical_crossentropy", "mse", "binary_crossentropy"}
)
METRICS = frozenset(
    {"accuracy", "sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy", "mae", "mse"}
)
#: Layers that run arbitrary code or read files even in safe mode.
FORBIDDEN_CLASSES = frozenset({"Lambda", "TFSMLayer", "JaxLayer", "FlaxLayer", "TorchModuleWrapper"})
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 64

_keras: Any = None


def get_keras() -> Any:
    """Import Keras once per worker and apply the per-process settings that must precede any op."""
    global _keras
    if _keras is None:
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # One thread per slot (docs/design.md appendix B.3); set before TensorFlow runs its
            # first op. Op determinism is not set here: it is a per-job option (set_determinism).
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        _keras = keras
    return _keras


def on_gpu() -> bool:
    """Whether this worker's Keras backend computes on a GPU (a gpu:N slot with a working CUDA
    stack; a CPU slot sees none: CUDA_VISIBLE_DEVICES is empty there)."""
    keras = get_keras()
    if keras.backend.backend() == "jax":
        import jax

        return bool(jax.default_backend() == "gpu")
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def set_determinism(on: bool) -> None:
    """TensorFlow's op determinism for this job only (``deterministic = true``, docs/tasks.md).

    Off by default: nothing in a round relies on training being bit-identical (committees
    recompute the aggregate from the committed weights, protocol/SPEC.md §11), and a submitter
    that wants reproducible runs asks for it per task."""
    keras = get_keras()
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    if on:
        tf.config.experimental.enable_op_determinism()
        return
    try:
        # Not exported by TensorFlow 2.21 (only enable is); present since 2.9.
        from tensorflow.python.framework import config as tf_config
    except ImportError:
        return
    disable = getattr(tf_config, "disable_op_determinism", None)
    if disable is not None:
        disable()


def check_model_config(cfg: Any, depth: int = 0) -> None:
    """Refuse anything in a model config that is not a plain Keras built-in."""
    if depth > MAX_CONFIG_DEPTH:
        raise TaskFailed("task_error", "model_config nests too deeply")
    if isinstance(cfg, list):
        for item in cfg:
            check_model_config(item, depth + 1)
        return
    if not isinstance(cfg, dict):
        return
    cls = cfg.get("class_name")
    if isinstance(cls, str):
        if cls in FORBIDDEN_CLASSES or cls.startswith("__lambda"):
            raise TaskFailed("task_error", f"model_config uses {cls!r}, which is not allowed")
        module = cfg.get("module")
        if module is not None:
            if not isinstance(module, str):
                raise TaskFailed("task_error", "model_config has a non-string module")
            if not (
                module == "keras"
                or module.startswith("keras.")
                or (module == "builtins" and cls == "function")
            ):
                raise TaskFailed(
                    "task_error",
                    f"model_config refers to module {module!r}; only Keras built-ins are allowed",
                )
        registered = cfg.get("registered_name")
        if isinstance(registered, str) and ">" in registered:
            raise TaskFailed("task_error", f"model_config uses custom object {registered!r}")
    for value in cfg.values():
        check_model_config(value, depth + 1)


def _model_config(ctx: TaskContext) -> Any:
    raw = param(ctx.params, "model_config", (str, dict))
    if isinstance(raw, str):
        if len(raw) > MAX_CONFIG_BYTES:
            raise TaskFailed("task_error", f"model_config exceeds {MAX_CONFIG_BYTES} bytes")
        try:
            cfg = json.loads(raw)
        except ValueError as e:
            raise TaskFailed("task_error", f"model_config is not JSON: {e}") from None
    else:
        cfg = raw
    check_model_config(cfg)
    return cfg


def build_model(ctx: TaskContext) -> Any:
    keras = get_keras()
    cfg = _model_config(ctx)
    try:
        model = keras.saving.deserialize_keras_object(cfg, safe_mode=True)
    except Exception as e:  # Keras raises ValueError/TypeError/KeyError for bad configs
        raise TaskFailed("task_error", f"model_config rejected: {type(e).__name__}: {e}") from None
    if not isinstance(model, keras.Model):
        raise TaskFailed("task_error", f"model_config built a {type(model).__name__}, not a keras.Model")
    if "weights" in ctx.inputs:
        load_weights(ctx, model)
    return model


def load_weights(ctx: TaskContext, model: Any) -> None:
    try:
        weights = decode_arrays(Path(ctx.inputs["weights"]).read_bytes())
        model.set_weights(weights)
    except (ProtocolError, ValueError, TypeError, KeyError) as e:
        raise TaskFailed(
            "task_error", f"input 'weights' is not encoded arrays fitting the model: {e}"
        ) from None


def compile_args(params: Mapping[str, Any], *, default_metrics: list[str]) -> dict[str, Any]:
    opt_name, lr, loss, metrics = _compile_params(params, default_metrics)
    return {"optimizer": make_optimizer(opt_name, lr), "loss": loss, "metrics": metrics}


def compile_key_parts(params: Mapping[str, Any], *, default_metrics: list[str]) -> list[Any]:
    """What of the compile params shapes a compiled model (for resident-cache keys)."""
    return list(_compile_params(params, default_metrics))


def make_optimizer(opt_name: str, lr: float) -> Any:
    # A fresh optimizer per round: each FedAvg round starts from fresh optimizer state (docs/design.md §6).
    return getattr(get_keras().optimizers, OPTIMIZERS[opt_name])(learning_rate=lr)


def _compile_params(
    params: Mapping[str, Any], default_metrics: list[str]
) -> tuple[str, float, str, list[str]]:
    opt_name = param(params, "optimizer", str, "adam").lower()
    if opt_name not in OPTIMIZERS:
        raise TaskFailed("task_error", f"optimizer {opt_name!r} not in {sorted(OPTIMIZERS)}")
    lr = float(param(params, "learning_rate", (int, float), 0.001))
    if not (math.isfinite(lr) and 0 < lr <= 10):
        raise TaskFailed("task_error", "learning_rate must be in (0, 10]")
    loss = param(params, "loss", str, "sparse_categorical_crossentropy")
    if loss not in LOSSES:
        raise TaskFailed("task_error", f"loss {loss!r} not in {sorted(LOSSES)}")
    metrics = param(params, "metrics", list, default_metrics)
    for m in metrics:
        if m not in METRICS:
            raise TaskFailed("task_error", f"metric {m!r} not in {sorted(METRICS)}")
    return opt_name, lr, loss, list(metrics)


def _model_bytes(model: Any) -> int:
    # Weights plus, for training, up to two optimizer slots per weight (Adam's m and v).
    return 3 * sum(int(np.asarray(w).nbytes) for w in model.get_weights())


def remember(cache: ResidentCache, key: str, value: Any, nbytes: int, ctx: TaskContext) -> bool:
    """Keep ``value`` resident if it fits this job's share of memory (see _resident.BUDGET_SHARE),
    dropping the least recently used entries to make room."""
    budget = budget_for(int(ctx.limits.get("memory_bytes", 0)))
    if nbytes > budget:
        cache.discard(key)
        return False
    cache.put(key, value, nbytes, ctx.task)
    cache.trim(budget, keep=(key,))
    return True


def data_for(
    ctx: TaskContext, *, need_y: bool, cache: ResidentCache | None = None
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """``load_data``, through the worker's resident cache when the pool named the data's content:
    a multi-round task decodes its shard once per worker, not once per round. Returns (x, y, hit)."""
    data_id = ctx.input_ids.get("data")
    if cache is None or data_id is None or "data" not in ctx.inputs:
        x, y = load_data(ctx, need_y=need_y)
        return x, y, False
    key = content_key("data", data=data_id, range=ctx.params.get("range"), x_scale=x_scale(ctx.params))
    entry = cache.get(key, ctx.task)
    if entry is not None:
        x, y = entry.value
        if need_y and y is None:
            raise TaskFailed("task_error", "input 'data' has no array 'y'")
        return x, y, True
    x, y = load_data(ctx, need_y=need_y)
    if "range" in ctx.params:
        # A slice is a view that would keep the whole decoded blob alive (x is a new array
        # already when it was cast or scaled).
        x = x.copy() if x.base is not None else x
        y = y.copy() if y is not None else None
    for arr in (x, y):
        if arr is not None:
            arr.flags.writeable = False  # shared by every round that hits this entry
    remember(cache, key, (x, y), x.nbytes + (y.nbytes if y is not None else 0), ctx)
    return x, y, False


def train_model(
    ctx: TaskContext, *, default_metrics: list[str], cache: ResidentCache | None = None
) -> tuple[Any, str | None, bool]:
    """A compiled model for a keras-train job: the worker's resident one for this model config
    and compile params when there is one (and the job brings the round's weights), with the
    job's weights loaded and the optimizer state reset to a fresh optimizer's; else a new one.
    Returns (model, key to keep it under or None, hit)."""
    opt_name, lr, loss, metrics = _compile_params(ctx.params, default_metrics)
    key = None
    if cache is not None:
        raw = param(ctx.params, "model_config", (str, dict))
        key = content_key("train-model", config=raw, optimizer=opt_name, lr=lr, loss=loss, metrics=metrics)
        entry = cache.get(key, ctx.task) if "weights" in ctx.inputs else None
        if entry is not None:
            model = entry.value
            load_weights(ctx, model)
            if reset_optimizer(model, opt_name, lr):
                return model, key, True
            cache.discard(key)
    model = build_model(ctx)
    model.compile(optimizer=make_optimizer(opt_name, lr), loss=loss, metrics=metrics)
    return model, key, False


def reset_optimizer(model: Any, opt_name: str, lr: float) -> bool:
    """Give ``model``'s optimizer the state of a fresh one (iterations 0, slots as a new optimizer
    initialises them: zeros for Adam, 0.1 for Adagrad), in place: the compiled train step keeps
    its variables, so it is not traced again. False if the states do not line up."""
    keras = get_keras()
    old = getattr(model, "optimizer", None)
    if old is None or not getattr(old, "built", False):
        return False
    fresh = make_optimizer(opt_name, lr)
    fresh.build(model.trainable_variables)
    before, after = list(old.variables), list(fresh.variables)
    if len(before) != len(after) or any(
        tuple(a.shape) != tuple(b.shape) for a, b in zip(before, after, strict=True)
    ):
        return False
    for a, b in zip(before, after, strict=True):
        a.assign(keras.ops.convert_to_numpy(b))
    return True


def load_data(ctx: TaskContext, *, need_y: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if "data" not in ctx.inputs:
        raise TaskFailed("task_error", "input 'data' (an .npz with x and y) is required")
    try:
        with np.load(ctx.inputs["data"], allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise TaskFailed("task_error", "input 'data' has no array 'x'")
            x = npz["x"]
            y = npz["y"] if "y" in npz.files else None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise TaskFailed("task_error", f"input 'data' is not a readable .npz: {e}") from None
    if need_y and y is None:
        raise TaskFailed("task_error", "input 'data' has no array 'y'")
    for name, arr in (("x", x), ("y", y)):
        if arr is not None and arr.dtype.kind not in "biuf":
            raise TaskFailed("task_error", f"data array {name!r} has dtype {arr.dtype}; numbers only")
    if y is not None and len(y) != len(x):
        raise TaskFailed("task_error", f"data has {len(x)} samples in x but {len(y)} in y")
    rng = param(ctx.params, "range", list, None)
    if rng is not None:
        # One shard of a shared data blob: samples [start, stop).
        if len(rng) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng):
            raise TaskFailed("task_error", "parameter 'range' must be [start, stop]")
        start, stop = rng
        if not 0 <= start < stop <= len(x):
            raise TaskFailed("task_error", f"range {rng} outside the {len(x)} samples")
        x = x[start:stop]
        y = y[start:stop] if y is not None else None
    if len(x) == 0:
        raise TaskFailed("task_error", "no samples")
    scale = x_scale(ctx.params)
    if x.dtype.kind != "f":
        x = x.astype("float32")
    if scale != 1.0:
        # In place when the cast above made a new array; a float x from the file is copied.
        x = np.multiply(x, np.asarray(scale, dtype=x.dtype), out=x if x.flags.owndata else None)
    return x, y


def x_scale(params: Mapping[str, Any]) -> float:
    """The ``x_scale`` parameter (docs/tasks.md): what ``x`` is multiplied by once it is float,
    so that data can travel as uint8 (1/255 for pixels). Checked here too: the announce that
    carries it came from another peer."""
    value = float(param(params, "x_scale", (int, float), 1.0))
    if not (math.isfinite(value) and 1e-12 <= value <= 1e12):
        raise TaskFailed("task_error", "parameter 'x_scale' must be a number from 1e-12 to 1e12")
    return value


def positive_int(params: Mapping[str, Any], name: str, default: int, maximum: int) -> int:
    value = param(params, name, int, default)
    if not 1 <= value <= maximum:
        raise TaskFailed("task_error", f"parameter {name!r} must be in [1, {maximum}]")
    return int(value)
