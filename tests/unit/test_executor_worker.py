"""The worker's protocol and job handling, kinds' input checks — no sandbox, no TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from peerd.executor.kinds import KIND_CLASS, REUSABLE, TaskContext, TaskFailed, _keras
from peerd.executor.kinds.python import _collect_outputs
from peerd.executor.limits import Limits
from peerd.executor.worker import TF_BLOCKED, Worker, _ImportBlocker, clear_workdir, read_frame, write_frame
from protocol.framing import encode_frame


def job(kind: str, params: dict[str, Any], **kw: Any) -> dict[str, Any]:
    limits = kw.pop("limits", Limits())
    return {
        "op": "job",
        "job_id": "j",
        "kind": kind,
        "params": params,
        "inputs": [],
        "limits": limits.to_wire(),
        **kw,
    }


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    (tmp_path / "job").mkdir()
    (tmp_path / "inputs").mkdir()
    return Worker("light", tmp_path / "job", tmp_path / "inputs", out_fd=-1)


def test_frames_round_trip_through_a_pipe() -> None:
    r, w = os.pipe()
    write_frame(w, b"hello", 100)
    write_frame(w, b"", 100)
    os.close(w)
    assert read_frame(r) == b"hello"
    assert read_frame(r) == b""
    assert read_frame(r) is None  # EOF: the pool is gone
    os.close(r)
    r, w = os.pipe()
    os.write(w, encode_frame(b"x" * 64, max_frame=1 << 30)[:4])
    with pytest.raises(ValueError):
        read_frame(r, max_frame=10)
    os.close(r)
    os.close(w)


def test_echo_sleep_and_refusals_in_process(worker: Worker) -> None:
    res = worker.run_job(job("echo", {"data": "hi"}))
    assert res["ok"] and res["outputs"] == {"stdout": b"hi"} and res["error"] is None
    res = worker.run_job(job("sleep", {"seconds": 0}))
    assert res["ok"]
    res = worker.run_job(job("keras-train", {}))
    assert res["error"] == "refused"  # a light worker does not serve tf kinds
    res = worker.run_job(job("python", {"script": "print(1)"}, trusted=False))
    assert res["error"] == "refused"  # second lock: the pool refuses these first
    res = worker.run_job(job("echo", {"data": 5}))
    assert res["error"] == "task_error"
    res = worker.run_job(job("echo", {"data": "x" * 100}, limits=Limits(max_output_bytes=10)))
    assert res["error"] == "output_limit"
    res = worker.run_job({**job("echo", {}), "inputs": ["missing"]})
    assert res["error"] == "task_error" and "missing" in res["detail"]


def test_workdir_is_cleared_between_jobs(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    (tmp_path / ".home").mkdir()
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "old").write_text("previous job")
    (tmp_path / "scratch").write_text("x")
    clear_workdir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".home", "inputs"]


def test_tf_workers_block_heavy_optional_imports() -> None:
    blocker = _ImportBlocker(TF_BLOCKED)
    with pytest.raises(ModuleNotFoundError):
        blocker.find_spec("sklearn.base", None)
    assert blocker.find_spec("numpy", None) is None


def test_kind_table() -> None:
    assert KIND_CLASS["keras-train"] == "tf" and KIND_CLASS["echo"] == "light"
    assert "python" not in REUSABLE  # a script may leave processes behind


def test_worker_process_speaks_the_protocol(tmp_path: Path) -> None:
    """The real entry point, unsandboxed: ready, a job, exit."""
    (tmp_path / "inputs").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "HOME": str(tmp_path / "home"),
    }
    cmd = [
        sys.executable,
        "-m",
        "peerd.executor.worker",
        "--class",
        "light",
        "--workdir",
        str(tmp_path / "job"),
        "--inputs",
        str(tmp_path / "inputs"),
    ]
    stdin = encode_frame(msgpack.packb(job("echo", {"data": b"ping"}))) + encode_frame(
        msgpack.packb({"op": "exit"})
    )
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=60, check=True)
    r, w = os.pipe()
    os.write(w, proc.stdout)
    os.close(w)
    ready = msgpack.unpackb(read_frame(r))
    result = msgpack.unpackb(read_frame(r))
    assert read_frame(r) is None
    os.close(r)
    assert ready["op"] == "ready" and ready["error"] is None and "echo" in ready["kinds"]
    assert result["ok"] and result["outputs"]["stdout"] == b"ping"


# -- python kind outputs ---------------------------------------------------------------------------


def test_outputs_skip_symlinks_and_refuse_reserved_names(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "result.txt").write_text("42")
    (out / "link").symlink_to("/etc/passwd")
    (out / "subdir").mkdir()
    assert _collect_outputs(out, 1000) == {"result.txt": b"42"}
    (out / "stdout").write_text("spoof")
    with pytest.raises(TaskFailed, match="reserved"):
        _collect_outputs(out, 1000)
    (out / "stdout").unlink()
    (out / "big").write_bytes(b"x" * 2000)
    with pytest.raises(TaskFailed) as e:
        _collect_outputs(out, 1000)
    assert e.value.error == "output_limit"


# -- keras kinds: the checks that run before Keras is imported ---------------------------------------


def dense_config() -> dict[str, Any]:
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {
            "name": "m",
            "layers": [
                {"module": "keras.layers", "class_name": "InputLayer", "config": {"batch_shape": [None, 4]}},
                {
                    "module": "keras.layers",
                    "class_name": "Dense",
                    "config": {"units": 2, "activation": "relu"},
                },
            ],
        },
    }


def test_model_config_allows_keras_builtins() -> None:
    _keras.check_model_config(dense_config())


@pytest.mark.parametrize(
    "layer",
    [
        {"module": "keras.layers", "class_name": "Lambda", "config": {"function": "x"}},
        {"module": "keras.layers", "class_name": "TFSMLayer", "config": {"filepath": "/job/inputs/m"}},
        {"module": "os", "class_name": "system", "config": {}},
        {"module": "evil_pkg.layers", "class_name": "Dense", "config": {}},
        {"module": None, "class_name": "Custom", "registered_name": "pkg>Custom", "config": {}},
        {"class_name": "__lambda__", "config": {"value": "base64-bytecode"}},
    ],
)
def test_model_config_refuses_code(layer: dict[str, Any]) -> None:
    cfg = dense_config()
    cfg["config"]["layers"].append(layer)
    with pytest.raises(TaskFailed) as e:
        _keras.check_model_config(cfg)
    assert e.value.error == "task_error"


def test_model_config_depth_is_bounded() -> None:
    cfg: dict[str, Any] = {"class_name": "X", "config": {}}
    for _ in range(200):
        cfg = {"class_name": "X", "config": {"inner": cfg}}
    with pytest.raises(TaskFailed, match="deeply"):
        _keras.check_model_config(cfg)


def ctx_with_data(tmp_path: Path, params: dict[str, Any] | None = None, **arrays: Any) -> TaskContext:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return TaskContext("j", params or {}, {"data": path}, tmp_path, Limits().to_wire())


def test_data_loading(tmp_path: Path) -> None:
    x = np.arange(20, dtype="float64").reshape(10, 2)
    y = np.arange(10)
    xs, ys = _keras.load_data(ctx_with_data(tmp_path, x=x, y=y), need_y=True)
    assert xs.shape == (10, 2) and ys is not None and len(ys) == 10
    xs, ys = _keras.load_data(ctx_with_data(tmp_path, {"range": [2, 5]}, x=x, y=y), need_y=True)
    assert xs.tolist() == x[2:5].tolist() and ys is not None and ys.tolist() == [2, 3, 4]
    with pytest.raises(TaskFailed, match="range"):
        _keras.load_data(ctx_with_data(tmp_path, {"range": [5, 50]}, x=x, y=y), need_y=True)
    with pytest.raises(TaskFailed, match="'y'"):
        _keras.load_data(ctx_with_data(tmp_path, x=x), need_y=True)
    with pytest.raises(TaskFailed, match="samples"):
        _keras.load_data(ctx_with_data(tmp_path, x=x, y=y[:3]), need_y=True)


def test_uint8_data_is_scaled_to_float32(tmp_path: Path) -> None:
    # Pixels travel as uint8 (4× fewer bytes) and the worker makes them the floats the model
    # was trained on: x_scale = 1/255 maps 0..255 onto [0, 1] (docs/tasks.md).
    x = np.array([[0, 51], [102, 255], [3, 4]], dtype=np.uint8)
    y = np.arange(3)
    xs, _ = _keras.load_data(ctx_with_data(tmp_path, {"x_scale": 1 / 255}, x=x, y=y), need_y=True)
    assert xs.dtype == np.float32
    np.testing.assert_allclose(xs, x.astype(np.float64) / 255, rtol=1e-6)
    xs, _ = _keras.load_data(ctx_with_data(tmp_path, {"x_scale": 2, "range": [1, 3]}, x=x, y=y), need_y=True)
    assert xs.tolist() == [[204.0, 510.0], [6.0, 8.0]]
    # Without it a uint8 x is only cast, as before.
    xs, _ = _keras.load_data(ctx_with_data(tmp_path, x=x, y=y), need_y=True)
    assert xs.dtype == np.float32 and xs.tolist() == x.tolist()
    # A float x is scaled too.
    xf = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    ctx = ctx_with_data(tmp_path, {"x_scale": 0.5, "range": [0, 2]}, x=xf, y=y)
    xs, _ = _keras.load_data(ctx, need_y=True)
    assert xs.tolist() == [[0.5], [1.0]]


@pytest.mark.parametrize("bad", [0, -1.0, 1e13, float("nan"), float("inf"), "1/255", True])
def test_a_bad_x_scale_is_a_task_error(tmp_path: Path, bad: Any) -> None:
    # The announce comes from another peer: the worker checks the value itself.
    x = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(TaskFailed, match="x_scale") as e:
        _keras.load_data(ctx_with_data(tmp_path, {"x_scale": bad}, x=x, y=np.zeros(2)), need_y=True)
    assert e.value.error == "task_error"


def test_pickled_data_is_refused(tmp_path: Path) -> None:
    # An object array in an .npz is a pickle: loading it would run the submitter's code.
    objs = np.empty(2, dtype=object)
    objs[0], objs[1] = {"a": 1}, [2]
    with pytest.raises(TaskFailed) as e:
        _keras.load_data(ctx_with_data(tmp_path, x=objs, y=np.zeros(2)), need_y=True)
    assert e.value.error == "task_error"


def test_bad_weights_are_a_task_error_before_keras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Weights that do not decode never reach Keras (stubbed out here: no TensorFlow in unit tests).
    class FakeKeras:
        class Model:
            def set_weights(self, w: object) -> None:
                raise AssertionError("must not be reached")

        class saving:
            @staticmethod
            def deserialize_keras_object(cfg: object, safe_mode: bool) -> object:
                assert safe_mode
                return FakeKeras.Model()

    monkeypatch.setattr(_keras, "_keras", FakeKeras)
    weights = tmp_path / "w"
    weights.write_bytes(msgpack.packb([{"data": b"\x00" * 8, "dtype": "|O", "shape": [1]}]))
    ctx = TaskContext("j", {"model_config": json.dumps(dense_config())}, {"weights": weights}, tmp_path, {})
    with pytest.raises(TaskFailed) as e:
        _keras.build_model(ctx)
    assert e.value.error == "task_error" and "weights" in e.value.detail


def test_example_config_is_json_serialisable() -> None:
    assert json.loads(json.dumps(dense_config())) == dense_config()


def loaded_by(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_what_each_side_imports() -> None:
    # The daemon side of the executor never loads TensorFlow/Keras (docs/design.md §2, §5) ...
    daemon = loaded_by("from peerd.executor import WorkerPool, Job, Limits, JobResult")
    assert not daemon & {"tensorflow", "keras", "numpy"}
    # ... and a light worker stays light: ready in ~0.1 s, so a task does not wait on imports.
    light = loaded_by(
        "import peerd.executor.worker\n"
        "from peerd.executor.kinds import load_kind\n"
        "for k in ('echo', 'sleep', 'python'): load_kind(k)"
    )
    assert not light & {"tensorflow", "keras", "numpy", "trio", "psutil"}
