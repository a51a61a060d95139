"""The worker process: ``python -m peerd.executor.worker`` — the only code that imports TensorFlow.

It runs inside the sandbox (peerd.executor.sandbox), started by the pool *before* a job arrives:
it pre-imports what its class of kinds needs (Keras/TensorFlow for "tf" workers, nothing heavy for
"light" ones), says ``ready``, then serves jobs one at a time until told to exit or its stdin
closes. Every job of one worker comes from the same submitter (the pool's rule).

Protocol on the pipes (length-prefixed msgpack frames, protocol.framing):

    worker -> pool  {"op": "ready", "pid", "class", "kinds", "error"}
    pool -> worker  {"op": "job", "job_id", "kind", "params", "inputs": [names], "limits", "trusted",
                     "as_backstop", "input_ids": {name: content id}, "task": str | None,
                     "forget": [ended tasks]}
    worker -> pool  {"op": "result", "ok", "outputs", "metrics", "error", "detail"}
    pool -> worker  {"op": "forget", "task"}   (between jobs, no reply: free the task's
                                                 resident entries, peerd.executor.kinds._resident)
    pool -> worker  {"op": "exit"}

The real stdout fd is kept for the protocol and fd 1 / ``sys.stdout`` point at stderr, so a stray
``print`` (ours, Keras', a library's) can never corrupt a frame.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.abc
import importlib.machinery
import math
import os
import resource
import shutil
import struct
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack

from peerd.executor.kinds import KIND_CLASS, Outcome, TaskContext, TaskFailed, load_kind
from peerd.executor.kinds import _resident as resident
from protocol.framing import encode_frame

#: Largest job frame the worker accepts (params carry echo data or a script's source).
MAX_JOB_FRAME = 16 << 20
#: Room for the msgpack envelope, metrics and detail on top of the outputs in a result frame.
RESULT_OVERHEAD = 1 << 20
_HEADER = struct.Struct(">I")

#: Packages a "tf" worker must not import: Keras pulls in scikit-learn, SciPy, matplotlib and
#: pandas when they are installed (+770 modules, +70 MiB, a font cache written to HOME) for wrappers
#: and plots no keras job uses (docs/design.md appendix B.3).
TF_BLOCKED = frozenset({"sklearn", "scipy", "matplotlib", "pandas", "narwhals"})
#: JAX itself imports SciPy, so a worker whose Keras runs on JAX may.
JAX_BLOCKED = TF_BLOCKED - {"scipy"}


class _ImportBlocker(importlib.abc.MetaPathFinder):
    def __init__(self, blocked: frozenset[str]) -> None:
        self.blocked = blocked

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"{fullname} is not available in a peerd worker", name=fullname)
        return None


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(fd: int, max_frame: int = MAX_JOB_FRAME) -> bytes | None:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > max_frame:
        raise ValueError(f"job frame of {length} bytes")
    return _read_exact(fd, length)


def write_frame(fd: int, payload: bytes, max_frame: int) -> None:
    view = memoryview(encode_frame(payload, max_frame=max_frame))
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _make_undumpable() -> None:
    # PR_SET_DUMPABLE=0: a python-kind child running as the same uid can no longer open
    # /proc/<worker>/fd/1 (our protocol pipe) or ptrace us; it would need CAP_SYS_PTRACE, dropped.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)


def _set_base_rlimits(nofile: int, as_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft))
    if as_bytes > 0:
        # Soft only: a later job with a larger memory cap raises it (see Worker.run_job).
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))


def clear_workdir(workdir: Path, keep: tuple[str, ...] = ("inputs", ".home")) -> None:
    """Empty the work dir before a job (a reused worker must not hand one job's files to the next)."""
    with os.scandir(workdir) as it:
        entries = list(it)
    for entry in entries:
        if entry.name in keep:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


class Worker:
    def __init__(self, wclass: str, workdir: Path, inputs_dir: Path, out_fd: int) -> None:
        self.wclass = wclass
        self.workdir = workdir
        self.inputs_dir = inputs_dir
        self.out_fd = out_fd
        self.kinds = sorted(k for k, c in KIND_CLASS.items() if c == wclass)
        self.preload_error: str | None = None

    def preload(self) -> None:
        """Import everything this class of kinds needs now, so a job never pays for it."""
        try:
            for kind in self.kinds:
                load_kind(kind)
            if self.wclass == "tf":
                from peerd.executor.kinds import _keras

                _keras.get_keras()
        except Exception as e:  # e.g. TensorFlow not installed: keras jobs then fail with this reason
            self.preload_error = f"{type(e).__name__}: {e}"
            print(f"worker preload failed: {self.preload_error}", file=sys.stderr)

    def send(self, msg: dict[str, Any], max_frame: int = RESULT_OVERHEAD) -> None:
        write_frame(self.out_fd, msgpack.packb(msg, use_bin_type=True), max_frame)

    def run_job(self, msg: dict[str, Any]) -> dict[str, Any]:
        limits = msg["limits"]
        max_out = int(limits["max_output_bytes"])
        t0 = time.perf_counter()
        cpu0 = _cpu_self()
        kind = msg.get("kind")
        for task in msg.get("forget") or ():
            if isinstance(task, str):
                resident.CACHE.forget_task(task)
        try:
            if kind not in self.kinds:
                raise TaskFailed("refused", f"kind {kind!r} is not served by a {self.wclass} worker")
            if self.preload_error is not None:
                raise TaskFailed("task_error", f"this worker cannot run {kind}: {self.preload_error}")
            clear_workdir(self.workdir)
            backstop = msg.get("as_backstop")
            if isinstance(backstop, int) and backstop > 0:
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(
                        resource.RLIMIT_AS, (backstop, resource.getrlimit(resource.RLIMIT_AS)[1])
                    )
            inputs = {}
            for name in msg.get("inputs", []):
                path = self.inputs_dir / name
                if not path.is_file():
                    raise TaskFailed("task_error", f"input {name!r} is missing")
                inputs[name] = path
            ctx = TaskContext(
                job_id=str(msg["job_id"]),
                params=msg.get("params") or {},
                inputs=inputs,
                workdir=self.workdir,
                limits=limits,
                trusted=bool(msg.get("trusted")),
                as_backstop=msg.get("as_backstop"),
                input_ids=_str_map(msg.get("input_ids")),
                task=msg["task"] if isinstance(msg.get("task"), str) else None,
            )
            with _cpu_limit(float(limits["cpu_seconds"])):
                outcome = load_kind(kind)(ctx)
        except TaskFailed as e:
            outcome = Outcome(outputs=e.outputs, metrics=e.metrics, ok=False, error=e.error, detail=e.detail)
        except MemoryError:
            outcome = Outcome(ok=False, error="memory_limit", detail="MemoryError in the worker")
        except Exception as e:
            tb = traceback.format_exc(limit=-4)
            outcome = Outcome(ok=False, error="task_error", detail=f"{type(e).__name__}: {e}\n{tb}")
        outcome.metrics.setdefault("cpu_seconds", _cpu_self() - cpu0)
        outcome.metrics["worker_seconds"] = time.perf_counter() - t0
        size = sum(len(v) for v in outcome.outputs.values())
        if size > max_out:
            outcome = Outcome(
                ok=False,
                error="output_limit",
                detail=f"outputs are {size} bytes (max {max_out})",
                metrics=outcome.metrics,
            )
        return {
            "op": "result",
            "ok": outcome.ok,
            "outputs": outcome.outputs,
            "metrics": {k: float(v) for k, v in outcome.metrics.items()},
            "error": outcome.error,
            "detail": outcome.detail[-4000:],
        }

    def serve(self, in_fd: int) -> int:
        self.send(
            {
                "op": "ready",
                "pid": os.getpid(),
                "class": self.wclass,
                "kinds": self.kinds,
                "error": self.preload_error,
            }
        )
        while True:
            frame = read_frame(in_fd)
            if frame is None:
                return 0  # the pool closed our stdin: it is gone or done with us
            msg = msgpack.unpackb(frame, raw=False)
            if msg.get("op") == "exit":
                return 0
            if msg.get("op") == "forget":
                # A task ended: free what this worker kept resident for it (no reply).
                if isinstance(msg.get("task"), str):
                    resident.CACHE.forget_task(msg["task"])
                continue
            if msg.get("op") != "job":
                print(f"unknown op {msg.get('op')!r}", file=sys.stderr)
                return 2
            result = self.run_job(msg)
            max_frame = int(msg["limits"]["max_output_bytes"]) + RESULT_OVERHEAD
            payload = msgpack.packb(result, use_bin_type=True)
            if len(payload) > max_frame:
                payload = msgpack.packb(
                    {
                        "op": "result",
                        "ok": False,
                        "outputs": {},
                        "metrics": result["metrics"],
                        "error": "output_limit",
                        "detail": f"result frame of {len(payload)} bytes",
                    },
                    use_bin_type=True,
                )
            write_frame(self.out_fd, payload, max_frame)


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@contextlib.contextmanager
def _cpu_limit(cpu_seconds: float) -> Any:
    """RLIMIT_CPU counts the process's whole life (TensorFlow's import, earlier jobs of a reused
    worker), so each job's cap is set relative to what is used so far, and lifted afterwards.
    Exceeding it sends SIGXCPU, whose default action ends the worker (bwrap exits 128+24)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cap = math.ceil(_cpu_self() + cpu_seconds)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _lower_priority(nice: int) -> None:
    """Run this worker at niceness ``nice``, against the other workers too.

    bwrap's ``--new-session`` puts every sandbox in a session of its own, and with the
    kernel's autogroup scheduling (``kernel.sched_autogroup_enabled``) a session is its own
    scheduling group: a process's nice value then only ranks it among its session's processes.
    So the session's autogroup is lowered as well (raising a nice value needs no privilege).
    Measured on 2 cores: at nice 19 alone a local-lane worker still slowed round 1's fits as
    much as at 0 (docs/benchmarks.md, "2026-12-04 evening")."""
    nice = min(max(nice, 0), 19)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
        f.write(str(nice))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peerd.executor.worker")
    ap.add_argument("--class", dest="wclass", choices=sorted(set(KIND_CLASS.values())), required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--nofile", type=int, default=1024)
    ap.add_argument("--as-bytes", type=int, default=0)
    ap.add_argument("--nice", type=int, default=0, help="lower this worker's CPU priority (0..19)")
    args = ap.parse_args(argv)

    # Keep the real stdin/stdout for the protocol; everything else that writes to fd 1 goes to stderr.
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _make_undumpable()
    _set_base_rlimits(args.nofile, args.as_bytes)
    if args.nice > 0:
        _lower_priority(args.nice)  # before the preload: TensorFlow's import is the heavy part
    if args.wclass == "tf":
        jax = os.environ.get("KERAS_BACKEND") == "jax"
        sys.meta_path.insert(0, _ImportBlocker(JAX_BLOCKED if jax else TF_BLOCKED))
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    home = os.environ.get("HOME")
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)
    worker = Worker(args.wclass, args.workdir, args.inputs, out_fd)
    worker.preload()
    try:
        return worker.serve(in_fd)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
