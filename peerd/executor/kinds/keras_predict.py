"""``keras-predict``: runs a model (config + weights) over ``data`` — no submitter code.

params: ``model_config``, ``batch_size`` (default 256), and when ``data`` has ``y``: ``loss``
(allow-list, default sparse_categorical_crossentropy) and ``metrics`` (default ["accuracy"]).
inputs: ``weights`` (required), ``data`` (.npz with x and optionally y).
outputs: ``predictions`` (encoded arrays: one array of model outputs). metrics: ``num_samples``,
and ``loss``/``accuracy`` when y is given.
"""

from __future__ import annotations

from peerd.executor.kinds import _keras
from peerd.executor.kinds._base import Outcome, TaskContext, TaskFailed
from protocol.tensors import encode_arrays


def run(ctx: TaskContext) -> Outcome:
    keras = _keras.get_keras()
    if "weights" not in ctx.inputs:
        raise TaskFailed("task_error", "input 'weights' is required")
    batch_size = _keras.positive_int(ctx.params, "batch_size", 256, 1 << 16)
    keras.backend.clear_session()
    x, y = _keras.load_data(ctx, need_y=False)
    model = _keras.build_model(ctx)
    metrics: dict[str, float] = {"num_samples": float(len(x))}
    try:
        predictions = model.predict(x, batch_size=batch_size, verbose=0)
        if y is not None:
            model.compile(**_keras.compile_args(ctx.params, default_metrics=["accuracy"]))
            scores = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
            for key, value in scores.items():
                metrics[key] = float(value)
            for alias in ("sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy"):
                if "accuracy" not in metrics and alias in metrics:
                    metrics["accuracy"] = metrics[alias]
    except (ValueError, TypeError) as e:
        raise TaskFailed("task_error", f"prediction failed: {type(e).__name__}: {e}") from None
    return Outcome(outputs={"predictions": encode_arrays([predictions])}, metrics=metrics)
