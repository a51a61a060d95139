"""The bwrap command builder and the worker environment, without running bwrap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import peerd
from peerd.executor.sandbox import (
    INPUTS_DIR,
    JOB_DIR,
    RuntimeLayout,
    SandboxReport,
    SandboxUnavailable,
    build_bwrap_argv,
    parse_device,
    runtime_layout,
    sandbox_env,
)


def pairs(argv: list[str], flag: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def singles(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.fixture
def layout(tmp_path: Path) -> RuntimeLayout:
    venv = tmp_path / "venv"
    src = tmp_path / "src" / "peerd"
    venv.mkdir()
    src.mkdir(parents=True)
    return RuntimeLayout(
        python=str(venv / "bin" / "python"), ro_paths=(str(venv), str(src)), pythonpath=str(src.parent)
    )


def argv_for(layout: RuntimeLayout, tmp_path: Path, device: str = "cpu", **kw: object) -> list[str]:
    env = sandbox_env(layout, device)
    return build_bwrap_argv(
        ["python", "-m", "peerd.executor.worker"],
        layout=layout,
        inputs_dir=tmp_path / "inputs",
        device=device,
        env=env,
        **kw,  # type: ignore[arg-type]
    )


def test_isolation_flags(layout: RuntimeLayout, tmp_path: Path) -> None:
    argv = argv_for(layout, tmp_path)
    for flag in (
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert flag in argv
    assert singles(argv, "--cap-drop") == ["ALL"]
    assert singles(argv, "--proc") == ["/proc"]
    assert singles(argv, "--dev") == ["/dev"]
    assert "/tmp" in singles(argv, "--tmpfs")
    assert JOB_DIR in singles(argv, "--tmpfs")
    assert singles(argv, "--remount-ro") == ["/"]
    assert argv[argv.index("--") + 1 :] == ["python", "-m", "peerd.executor.worker"]
    assert "--dev-bind" not in argv  # a CPU slot sees no host device


def test_only_what_is_needed_is_bound(layout: RuntimeLayout, tmp_path: Path) -> None:
    argv = argv_for(layout, tmp_path)
    ro = pairs(argv, "--ro-bind")
    assert ("/", "/") not in ro  # never the whole host
    assert (str(tmp_path / "inputs"), INPUTS_DIR) in ro  # inputs read-only
    assert (str(tmp_path / "venv"), str(tmp_path / "venv")) in ro
    assert "--bind" not in argv  # nothing of the host is writable
    sources = {src for src, _ in ro}
    assert not any(s == "/root" or s == "/home" or s.startswith("/var/lib") for s in sources)
    assert "/etc" not in sources  # single files from /etc, not the directory


def test_a_writable_bind_only_where_asked_and_mounted_before_the_root_goes_read_only(
    layout: RuntimeLayout, tmp_path: Path
) -> None:
    cache = tmp_path / "jax-cache"
    argv = argv_for(layout, tmp_path, rw_binds=[(str(cache), "/var/cache/peerd-jax")])
    assert pairs(argv, "--bind") == [(str(cache), "/var/cache/peerd-jax")]
    # After the job's tmpfs, before the root is remounted read-only (which covers only "/").
    assert argv.index(JOB_DIR) < argv.index("--bind") < argv.index("--remount-ro")
    assert "--bind" not in argv_for(layout, tmp_path)


def test_hide_covers_paths_inside_bound_dirs(layout: RuntimeLayout, tmp_path: Path) -> None:
    state = tmp_path / "venv" / "state"
    state.mkdir()
    key = tmp_path / "venv" / "identity.key"
    key.write_bytes(b"k")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    argv = argv_for(layout, tmp_path, hide=[state, key, outside])
    assert str(state) in singles(argv, "--tmpfs")
    assert ("/dev/null", str(key)) in pairs(argv, "--ro-bind")
    assert str(outside) not in argv  # not visible anyway, nothing to cover


def test_gpu_slot_binds_nvidia_devices_and_pins_the_card(layout: RuntimeLayout, tmp_path: Path) -> None:
    nodes = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidia1"]
    argv = argv_for(layout, tmp_path, device="gpu:1", nvidia_nodes=nodes)
    assert pairs(argv, "--dev-bind") == [(n, n) for n in nodes]
    env = dict(pairs(argv, "--setenv"))
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"


def test_environment_is_built_not_inherited(
    layout: RuntimeLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEERD_SECRET_TOKEN", "hunter2")
    argv = argv_for(layout, tmp_path)
    assert "hunter2" not in " ".join(argv)
    env = dict(pairs(argv, "--setenv"))
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU slot must not grab a GPU
    assert env["HOME"].startswith(JOB_DIR) and env["KERAS_HOME"].startswith(JOB_DIR)
    assert env["PYTHONPATH"] == layout.pythonpath
    assert sandbox_env(layout, "cpu", {"KERAS_BACKEND": "jax"})["KERAS_BACKEND"] == "jax"


def test_parse_device() -> None:
    assert parse_device("cpu") is None
    assert parse_device("gpu:0") == 0
    assert parse_device("gpu:12") == 12
    for bad in ("gpu", "gpu:", "gpu:-1", "tpu:0", "GPU:0", "cpu:0"):
        with pytest.raises(ValueError):
            parse_device(bad)


def test_runtime_layout_binds_packages_not_the_checkout() -> None:
    layout = runtime_layout()
    pkg = os.path.dirname(os.path.abspath(peerd.__file__))
    if layout.pythonpath:  # running from a source checkout
        assert pkg in layout.ro_paths
        assert os.path.dirname(pkg) not in layout.ro_paths  # .git, state dirs of a devnet stay out
    assert os.path.realpath(os.sys.base_prefix) in layout.ro_paths  # type: ignore[attr-defined]


def test_report_require() -> None:
    SandboxReport(True).require()
    with pytest.raises(SandboxUnavailable, match="no bwrap"):
        SandboxReport(False, reason="no bwrap").require()
