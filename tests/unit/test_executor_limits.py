"""Limits/JobResult values, cgroup file handling on fake trees, and the pool's result parser."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.executor.limits import ERRORS, CgroupSupport, JobResult, Limits, _V1Group, _V2Group
from peerd.executor.pool import _parse_result, as_backstop


def test_limits_defaults_and_validation() -> None:
    lim = Limits()
    assert lim.memory_bytes == 2 << 30 and lim.max_processes == 64 and lim.max_output_bytes == 64 << 20
    assert lim.to_wire()["cpu_seconds"] == 600.0
    for bad in ({"memory_bytes": 0}, {"cpu_seconds": -1}, {"wall_seconds": 0}, {"max_processes": 0}):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_failure_results_are_bounded() -> None:
    res = JobResult.failure("timeout", "x" * 100_000)
    assert not res.ok and res.error == "timeout" and len(res.detail) <= 4000
    with pytest.raises(AssertionError):
        JobResult.failure("oops", "not a reason")


def test_as_backstop_never_below_4_gib() -> None:
    # RLIMIT_AS is a backstop only: TensorFlow reserves ~2.2 GB of address space at import.
    assert as_backstop(256 << 20) == 4 << 30
    assert as_backstop(8 << 30) == 10 << 30
    assert as_backstop(8 << 30, "cpu") == 10 << 30


def test_no_address_space_cap_on_a_gpu_slot() -> None:
    # CUDA reserves virtual address space in proportion to host + device memory: a cap kills it.
    assert as_backstop(8 << 30, "gpu:0") == 0
    assert as_backstop(256 << 20, "gpu:3") == 0


# Files the code writes start empty: the code opens them O_WRONLY without O_TRUNC, as cgroup files
# want, which on a regular file would leave the tail of a longer old value.


def fake_v1(tmp_path: Path) -> _V1Group:
    mem = tmp_path / "memory"
    pids = tmp_path / "pids"
    mem.mkdir()
    pids.mkdir()
    for name in (
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",
        "memory.max_usage_in_bytes",
        "cgroup.procs",
    ):
        (mem / name).write_text("")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (pids / "pids.max").write_text("")
    (pids / "pids.peak").write_text("7\n")
    (pids / "cgroup.procs").write_text("11\n12\n")
    (mem / "cgroup.procs").write_text("12\n13\n")
    return _V1Group(mem, pids)


def test_v1_group_writes_caps(tmp_path: Path) -> None:
    g = fake_v1(tmp_path)
    g.set_limits(256 << 20, 16)
    assert (tmp_path / "memory" / "memory.limit_in_bytes").read_text() == str(256 << 20)
    assert (tmp_path / "memory" / "memory.memsw.limit_in_bytes").read_text() == str(256 << 20)
    assert (tmp_path / "pids" / "pids.max").read_text() == "16"
    assert g.oom_kills() == 3
    assert g.pids_peak() == 7
    assert g.pids() == [11, 12, 13]
    assert [p.name for p in g.procs_files] == ["cgroup.procs", "cgroup.procs"]
    # Same limits again (a reused worker): no writes at all.
    (tmp_path / "pids" / "pids.max").write_text("untouched")
    g.set_limits(256 << 20, 16)
    assert (tmp_path / "pids" / "pids.max").read_text() == "untouched"
    g.reset_peaks()
    assert (tmp_path / "memory" / "memory.max_usage_in_bytes").read_text() == "0"


def test_v2_group_writes_caps(tmp_path: Path) -> None:
    for name in ("memory.max", "memory.swap.max", "pids.max", "cgroup.procs", "memory.peak", "pids.peak"):
        (tmp_path / name).write_text("")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    g = _V2Group(tmp_path, memory=True, pids=True)
    g.set_limits(1 << 30, 32)
    assert (tmp_path / "memory.max").read_text() == str(1 << 30)
    assert (tmp_path / "memory.swap.max").read_text() == "0"
    assert (tmp_path / "pids.max").read_text() == "32"
    assert g.oom_kills() == 1
    assert g.procs_files == [tmp_path / "cgroup.procs"]


def test_no_cgroups_means_no_group() -> None:
    support = CgroupSupport("none")
    assert not support.memory and not support.pids
    assert support.new_group() is None


def frame(**fields: object) -> bytes:
    msg = {"op": "result", "ok": True, "outputs": {}, "metrics": {}, "error": None, "detail": ""}
    msg.update(fields)
    return msgpack.packb(msg, use_bin_type=True)


def test_parse_result_accepts_a_good_frame() -> None:
    res = _parse_result(frame(outputs={"weights": b"\x00"}, metrics={"loss": 0.5, "n": 3}))
    assert res.ok and res.outputs == {"weights": b"\x00"} and res.metrics == {"loss": 0.5, "n": 3.0}
    res = _parse_result(frame(ok=True, error="task_error", detail="boom"))
    assert not res.ok and res.error == "task_error"


@pytest.mark.parametrize(
    "bad",
    [
        frame(op="ready"),
        frame(outputs={"a": "text, not bytes"}),
        frame(outputs=[b"x"]),
        frame(metrics={"loss": "low"}),
        frame(metrics={"flag": True}),
        frame(error="pwned"),
        frame(detail=b"bytes"),
        msgpack.packb([1, 2, 3]),
    ],
)
def test_parse_result_rejects_malformed_frames(bad: bytes) -> None:
    with pytest.raises(ValueError):
        _parse_result(bad)


@given(st.binary(max_size=200))
def test_parse_result_only_raises_valueerror(data: bytes) -> None:
    # The worker shares a sandbox with untrusted code: whatever it sends, the pool only sees ValueError.
    try:
        res = _parse_result(data)
    except ValueError:
        return
    assert res.error is None or res.error in ERRORS
