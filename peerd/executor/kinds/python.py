"""``python``: runs a submitter's script — only for submitters the contributor trusts.

params: ``script`` (the name of an input holding the script, or the source itself), ``args``
(optional list of str). The script runs as a child of the worker, inside the same sandbox, with
cwd = the work dir, its inputs under ``./inputs`` (read-only) and whatever it writes to
``./outputs`` (top-level regular files) returned as outputs, next to its captured ``stdout`` and
``stderr``. A child process (rather than ``exec`` in the worker) gives the script its own rlimits
and CPU accounting and keeps it off the worker's protocol pipe.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import selectors
import signal
import subprocess
import sys
from pathlib import Path

from peerd.executor.kinds._base import Outcome, TaskContext, TaskFailed, param

#: Each captured stream keeps at most this much (the rest is read and dropped, so a flood cannot
#: block the script on a full pipe nor grow our memory).
STREAM_CAP = 1 << 20
RESERVED = ("stdout", "stderr")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _cpu_used_by_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(ctx: TaskContext) -> Outcome:
    if not ctx.trusted:
        # The pool refuses these already; this is the second lock on the same door.
        raise TaskFailed("refused", "the python kind runs only for trusted submitters")
    script = param(ctx.params, "script", str)
    args = param(ctx.params, "args", list, [])
    if not all(isinstance(a, str) for a in args):
        raise TaskFailed("task_error", "parameter 'args' must be a list of str")
    if script in ctx.inputs:
        script_path = ctx.inputs[script]
    else:
        script_path = ctx.workdir / ".script.py"
        script_path.write_text(script)
    outputs_dir = ctx.workdir / "outputs"
    outputs_dir.mkdir(exist_ok=True)

    limits = ctx.limits
    max_out = int(limits["max_output_bytes"])
    cpu = max(1, math.ceil(float(limits["cpu_seconds"])))
    nproc = int(limits["max_processes"])
    as_cap = ctx.as_backstop
    fsize = max(max_out, 1 << 20)

    def set_limits() -> None:  # runs in the child between fork and exec (the worker is single-threaded)
        # Soft limit -> SIGXCPU (catchable, so a hard limit 1 s later -> SIGKILL).
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # Per uid, and uid 0 is exempt (kernel/fork.c): the pids cgroup is the real cap; this one
        # binds when the daemon runs as its own service user.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if as_cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (as_cap, as_cap))
        # Python ignores SIGXFSZ/SIGPIPE; restore defaults so non-Python children die on them.
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)

    cpu_before = _cpu_used_by_children()
    proc = subprocess.Popen(
        [sys.executable, "-u", str(script_path), *args],
        cwd=ctx.workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=set_limits,
        close_fds=True,
    )
    captured, dropped = _capture(proc)
    status = proc.wait()
    cpu_used = _cpu_used_by_children() - cpu_before

    out_stream, err_stream = captured["stdout"], captured["stderr"]
    metrics = {
        "cpu_seconds": cpu_used,
        "exit_status": float(status),
        "stdout_dropped_bytes": float(dropped["stdout"]),
        "stderr_dropped_bytes": float(dropped["stderr"]),
    }
    streams = {"stdout": bytes(out_stream), "stderr": bytes(err_stream)}
    tail = bytes(err_stream[-2000:]).decode(errors="replace")

    if status < 0:
        sig = -status
        name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu):
            raise TaskFailed("cpu_limit", f"script used more than {cpu} s of CPU", metrics=metrics)
        if sig == signal.SIGXFSZ:
            raise TaskFailed("output_limit", f"script wrote a file over {fsize} bytes", metrics=metrics)
        # A SIGKILL from the cgroup OOM killer looks like this too; the pool, which can read the
        # cgroup's OOM counter, turns it into memory_limit.
        raise TaskFailed("crashed", f"script killed by {name}\n{tail}", metrics=metrics, outputs=streams)

    files = _collect_outputs(outputs_dir, max_out)
    if status != 0:
        if "MemoryError" in tail:
            raise TaskFailed("memory_limit", tail, metrics=metrics, outputs=streams)
        if "[Errno 27]" in tail:  # EFBIG: a write crossed RLIMIT_FSIZE (Python ignores SIGXFSZ)
            raise TaskFailed("output_limit", f"a file reached the {fsize}-byte cap\n{tail}", metrics=metrics)
        raise TaskFailed(
            "task_error", f"script exited with status {status}\n{tail}", metrics=metrics, outputs=streams
        )
    budget = max_out - sum(len(v) for v in files.values())
    for name in RESERVED:
        streams[name] = streams[name][: max(0, budget)]
        budget -= len(streams[name])
    files.update(streams)
    return Outcome(outputs=files, metrics=metrics)


def _capture(proc: subprocess.Popen[bytes]) -> tuple[dict[str, bytearray], dict[str, int]]:
    """Drain both pipes, keeping the first STREAM_CAP bytes of each, until the script has exited
    and its pipes are empty. A process the script left behind holding the pipes open does not keep
    the job running: once the script is gone, only what is already buffered is read (its worker is
    killed after every python job anyway)."""
    assert proc.stdout is not None and proc.stderr is not None
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    dropped = {"stdout": 0, "stderr": 0}
    sel = selectors.DefaultSelector()
    for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe, selectors.EVENT_READ, name)
    exited = False
    reads_after_exit = 0
    while sel.get_map():
        events = sel.select(timeout=0 if exited else 0.2)
        if exited:
            reads_after_exit += 1
            # Pipe buffers hold 64 KiB: a few rounds empty them; more means a leftover writer.
            if not events or reads_after_exit > 64:
                break
        for key, _ in events:
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            name = key.data
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            room = STREAM_CAP - len(kept[name])
            kept[name] += chunk[:room]
            dropped[name] += max(0, len(chunk) - room)
        if not exited and proc.poll() is not None:
            exited = True
    sel.close()
    proc.stdout.close()
    proc.stderr.close()
    return kept, dropped


def _collect_outputs(outputs_dir: Path, max_out: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    for entry in sorted(os.scandir(outputs_dir), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False):
            continue  # directories, symlinks (could point anywhere in the sandbox), fifos
        if entry.name in RESERVED:
            raise TaskFailed(
                "task_error", f"output file name {entry.name!r} is reserved for the captured stream"
            )
        if not _NAME.match(entry.name):
            raise TaskFailed("task_error", f"output file name {entry.name!r} is not allowed")
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_out - total + 1)
        total += len(data)
        if total > max_out:
            raise TaskFailed("output_limit", f"outputs exceed {max_out} bytes")
        files[entry.name] = data
    return files
