"""The warm worker pool: one slot per device, warm sandboxed workers, limits, reclaim.

Life of a job (seed §3.2 steps 3 and 5):

1. ``execute(job)`` refuses what policy forbids (no sandbox, untrusted ``python``, unknown kind),
   then waits for a free slot (FIFO; ``load()`` counts it as queued meanwhile).
2. It takes a worker for (device, class): the idle worker kept for *this* submitter if there is one,
   else the warm spare (started earlier, inside bwrap, with its imports done), else a cold start.
   An idle worker of another submitter is killed first — workers never cross submitters, and on a
   GPU its memory must be freed before another task gets the card.
3. The job's inputs are hard-linked into the directory the sandbox sees read-only as
   ``/job/inputs``, the worker's cgroup gets the job's memory and pids caps, the job frame goes out
   and the pool waits for the result under the wall-clock deadline, while a monitor polls CPU time
   (backstop to RLIMIT_CPU) and, without a memory cgroup, RSS.
4. Reclaim: unless the worker may serve this submitter again (an ok or task_error result of an
   in-process kind), its whole process tree is killed, its cgroup and work dir removed; the slot is
   freed and ``on_change`` callbacks fire so the advert loop re-advertises at once. Cancellation
   (trio) does the same, shielded, and then lets ``Cancelled`` propagate.

Processes are spawned from the trio thread with ``subprocess.Popen`` rather than
``trio.lowlevel.open_process``: trio runs Popen in a worker thread, and bwrap's
``--die-with-parent`` (PR_SET_PDEATHSIG) fires when the *thread* that forked it exits — trio's
idle threads exit after ~10 s, which killed warm spares (measured: a trio-spawned bwrap died at
10 s, a main-thread one lived). Exits are awaited through a pidfd.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import psutil
import trio

from peerd.executor.kinds import KIND_CLASS, REUSABLE
from peerd.executor.limits import (
    ERRORS,
    MAX_DETAIL,
    CgroupSupport,
    Job,
    JobResult,
    Limits,
    WorkerCgroup,
    detect_cgroups,
)
from peerd.executor.sandbox import (
    INPUTS_DIR,
    JOB_DIR,
    SandboxReport,
    build_bwrap_argv,
    parse_device,
    probe_sandbox,
    runtime_layout,
    sandbox_env,
)
from peerd.kinds import KINDS
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.framing import FrameDecoder, encode_frame

if TYPE_CHECKING:
    # libp2p installs trio-typing, whose stale trio stubs lack trio.TaskStatus (as in peerd/p2p.py).
    from trio_typing import TaskStatus

log = logging.getLogger("peerd.executor")

#: Matches the worker's cap on one job frame.
MAX_JOB_FRAME = 16 << 20
#: A result frame may carry max_output_bytes of outputs plus this much envelope.
RESULT_OVERHEAD = 1 << 20
#: How often the monitor samples a running job's process tree. The first sample is the CPU
#: baseline, so jobs shorter than this never pay for a /proc walk (per-task overhead budget).
POLL_SECONDS = 0.5
#: The CPU backstop fires this long after RLIMIT_CPU should have (which is exact for one process;
#: the backstop exists for trees, e.g. a fork bomb spinning on EAGAIN in 64 processes).
CPU_GRACE = 2.0
STDERR_TAIL = 16 << 10
SPARE_DELAY = 0.05
#: Worker classes whose start is heavy (TensorFlow's import: 4-5 s of CPU). After a job takes
#: such a spare, its replacement starts only once the slot keeps no worker of that class (the
#: one that took the spare was reclaimed, or reaped after ``reuse_idle_seconds``), or when a
#: job waits for it (another submitter's): started at once, it ran beside the job that took the
#: spare — on a 2-core host, round 1 of a 3-peer training task paid three TensorFlow imports
#: (docs/benchmarks.md "Where a round's time goes"); started after 5 s of idle slot, it landed
#: in round 2 whenever commits were 5 s apart. Rounds of one task reuse their worker.
HEAVY_CLASSES = frozenset({"tf"})
#: Where a keras worker on JAX finds the node's compilation cache inside its sandbox.
JAX_CACHE_DIR = "/var/cache/peerd-jax"
#: The niceness of a local-lane worker (the submitter's own evaluations, off the critical path:
#: the next round never waits for a validation). Prewarmed when a task is submitted, its
#: TensorFlow import (4-5 s of CPU) ran beside round 1's fits at equal priority and slowed them
#: by 40-80 % on a 2-core host (docs/benchmarks.md, "2026-12-04 evening").
LOCAL_LANE_NICE = 19
#: Without a memory cgroup, RLIMIT_AS is only a backstop: TensorFlow reserves ~2.2 GB of address
#: space for ~0.6 GB resident, so a tight cap would kill it long before memory runs out.
MIN_AS_BACKSTOP = 4 << 30
_INPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_JOIN_CGROUPS_SH = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def as_backstop(memory_bytes: int, device: str = "cpu") -> int:
    """RLIMIT_AS for a worker without a memory cgroup; 0 (none) on a GPU slot, where the CUDA
    driver reserves virtual address space for unified addressing in proportion to host and
    device memory (hundreds of GB on a big card), so any cap that RSS would fit under kills CUDA's
    start instead. RSS polling still bounds a GPU slot's host memory (module docstring, step 4)."""
    if parse_device(device) is not None:
        return 0
    return max(MIN_AS_BACKSTOP, memory_bytes + (2 << 30))


class _StartError(Exception):
    pass


@dataclass(frozen=True)
class _StartFailed:
    reason: str


class _Proc:
    """A child process owned by the trio thread, with non-blocking pipes and a pidfd."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        try:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=r_in,
                stdout=w_out,
                stderr=w_err,
                env=dict(env),
                close_fds=True,
                start_new_session=True,  # a Ctrl-C to the daemon's terminal is not the worker's business
            )
        except BaseException:
            for fd in (r_in, w_in, r_out, w_out, r_err, w_err):
                os.close(fd)
            raise
        for fd in (r_in, w_out, w_err):
            os.close(fd)
        self.pid = self.popen.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.stdin = trio.lowlevel.FdStream(w_in)
        self.stdout = trio.lowlevel.FdStream(r_out)
        self.stderr = trio.lowlevel.FdStream(r_err)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        if self.pidfd >= 0 and self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    async def wait(self) -> int:
        if self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self.pidfd)
        return self.popen.wait()

    async def aclose(self) -> None:
        for s in (self.stdin, self.stdout, self.stderr):
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await s.aclose()
        if self.pidfd >= 0 and self.popen.returncode is not None:
            os.close(self.pidfd)
            self.pidfd = -1


@dataclass(eq=False)
class _Worker:
    wid: str
    slot: int  # index into WorkerPool.devices ("cpu" may appear several times: one slot each)
    device: str
    wclass: str
    host_dir: Path
    inputs_dir: Path
    proc: _Proc
    cgroup: WorkerCgroup | None
    stderr_tail: bytearray = field(default_factory=bytearray)
    submitter: str | None = None
    jobs: int = 0
    idle_since: float = 0.0
    dead: bool = False
    #: Tasks whose jobs this worker ran: it may hold resident entries for them (forget_task).
    tasks: set[str] = field(default_factory=set)
    #: Tasks that ended and whose resident entries this worker has not been told to free yet.
    forget: set[str] = field(default_factory=set)
    #: Serialises writes to the worker's stdin (a job frame and a forget frame may overlap).
    write_lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def alive(self) -> bool:
        return not self.dead and self.proc.returncode is None

    def tail(self, n: int = 2000) -> str:
        return bytes(self.stderr_tail[-n:]).decode(errors="replace")


@dataclass
class _RunState:
    killed_for: str | None = None
    detail: str = ""


class WorkerPool:
    def __init__(
        self,
        work_root: Path,
        *,
        devices: Sequence[str] = ("cpu",),
        warm_spares: int = 1,
        require_sandbox: bool = True,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        bwrap: str = "bwrap",
        warm_classes: Sequence[str] = ("light", "tf"),
        reuse_idle_seconds: float = 30.0,
        scratch_bytes: int = 1 << 30,
        hide: Sequence[Path] = (),
        start_timeout: float = 180.0,
        local_slots: int = 1,
        jax_cache: tuple[Path, int] | None = None,
    ) -> None:
        """``warm_classes``: which classes of worker to keep warm per device ("light" for
        echo/sleep/python, "tf" for the keras kinds; a class not listed is started cold).
        ``reuse_idle_seconds``: how long a worker waits for another job of the same submitter
        (0: never reuse). ``scratch_bytes``: size of the task's /job and /tmp tmpfs. ``hide``:
        paths covered inside the sandbox if a bound directory would expose them (the daemon's
        state dir when it lives inside the venv or source tree). ``local_slots``: lanes for this
        node's own jobs (``execute(local=True)``: the submitter's validation and test
        evaluations), on the first device, apart from the advertised slots: they never make a
        training job wait and never count in ``slots()`` or ``load()`` (issue 9 item 3). A local
        lane keeps no warm spare until ``prewarm_local`` asks for one. ``jax_cache``: (host
        directory, bound in bytes) for JAX's persistent compilation cache, shared by this node's
        keras ("tf") workers and only theirs: with Keras on JAX, a worker that meets a model
        XLA compiled before (another task, a restarted worker) loads the executables instead
        of compiling them (docs/benchmarks.md, "Keras on JAX"). Later jobs load native code
        from it, so no worker that runs submitters' code (the light class) ever sees it, and
        without the sandbox there is no cache."""
        if not devices:
            raise ValueError("at least one device")
        for d in devices:
            parse_device(d)
        for c in warm_classes:
            if c not in set(KIND_CLASS.values()):
                raise ValueError(f"unknown worker class {c!r}")
        self.work_root = Path(work_root)
        self.devices = tuple(devices)
        self.warm_spares = max(0, int(warm_spares))
        self.require_sandbox = require_sandbox
        self.python = python
        self.extra_env = dict(env or {})
        self.bwrap = bwrap
        self.warm_classes = tuple(warm_classes)
        self.reuse_idle_seconds = reuse_idle_seconds
        self.scratch_bytes = scratch_bytes
        self.hide = tuple(Path(h) for h in hide)
        self.start_timeout = start_timeout
        self.jax_cache = (Path(jax_cache[0]), int(jax_cache[1])) if jax_cache is not None else None
        self.sandbox_report: SandboxReport = probe_sandbox(bwrap, python=python)
        self.sandboxed = self.sandbox_report.available
        if not self.sandboxed:
            log.warning("sandbox unavailable: %s", self.sandbox_report.reason)
        self._cg = CgroupSupport("none")
        self._callbacks: list[Callable[[], None]] = []
        self._nursery: trio.Nursery | None = None
        self._free_slots = list(reversed(range(len(self.devices))))
        self._sem = trio.Semaphore(len(self.devices))
        n_local = max(0, int(local_slots))
        #: Every slot's device: the advertised slots, then the local lanes (on devices[0]).
        self._slot_devices = self.devices + (self.devices[0],) * n_local
        self._local_slots = tuple(range(len(self.devices), len(self._slot_devices)))
        self._free_local = list(reversed(self._local_slots))
        self._local_sem = trio.Semaphore(max(1, n_local))
        #: Slots running a job now (heavy spares wait for an idle slot).
        self._running: set[int] = set()
        #: (slot, class) → jobs waiting for its next spare; the local lanes prewarm_local asked for.
        self._spare_wanted: dict[tuple[int, str], int] = {}
        self._prewarm: set[tuple[int, str]] = set()
        #: Set (and replaced) when a spare may be due: a job waits for one, a slot fell idle.
        self._spare_wake = trio.Event()
        #: Local jobs started and finished (tests and metrics: the lane's use is visible).
        self.local_jobs_started = 0
        self.local_jobs_done = 0
        #: Workers spawned (spares, cold starts): tests see when a spare is (not) replaced.
        self.workers_started = 0
        self._busy = 0
        self._queued = 0
        self._workers: set[_Worker] = set()
        # Keyed by (slot, worker class).
        self._idle: dict[tuple[int, str], _Worker] = {}
        self._spares: dict[tuple[int, str], trio.MemoryReceiveChannel[_Worker | _StartFailed]] = {}
        self._spare_ready: dict[tuple[int, str], trio.Event] = {}
        self._stopping = False

    # ---------------------------------------------------------------- public API

    def slots(self) -> int:
        return len(self.devices)

    def load(self) -> float:
        """Busy slots / total slots: 0 idle, 1 full, > 1 when jobs are queued (the advert's L)."""
        return (self._busy + self._queued) / len(self.devices)

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.work_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._cg = detect_cgroups()
        self.sandbox_report = self.sandbox_report.with_cgroups(self._cg)
        log.info(
            "worker pool: %d slot(s) %s, sandbox=%s, memory cap=%s, pids cap=%s",
            len(self.devices),
            ",".join(self.devices),
            "bwrap" if self.sandboxed else "NONE",
            self.sandbox_report.memory_cap,
            self.sandbox_report.pids_cap,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.warm_spares > 0 and (self.sandboxed or not self.require_sandbox):
                    for slot in range(len(self._slot_devices)):
                        for wclass in self.warm_classes:
                            key = (slot, wclass)
                            send, recv = trio.open_memory_channel[_Worker | _StartFailed](
                                self.warm_spares - 1
                            )
                            self._spares[key] = recv
                            self._spare_ready[key] = trio.Event()
                            nursery.start_soon(self._replenish, key, send)
                if self.reuse_idle_seconds > 0:
                    nursery.start_soon(self._reap_idle)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stopping = True
            self._nursery = None
            with trio.CancelScope(shield=True):
                for w in list(self._workers):
                    await self._reclaim(w)
                self._cg.cleanup()

    async def wait_warm(self) -> None:
        """Wait until every (device, class) has a ready spare (tests and benchmarks); local
        lanes start theirs only when asked (prewarm_local), so they are not waited for."""
        for (slot, _), event in list(self._spare_ready.items()):
            if slot not in self._local_slots:
                await event.wait()

    async def execute(self, job: Job, *, local: bool = False) -> JobResult:
        """Run ``job`` in a sandboxed worker. Cancellation kills the worker tree, removes its work
        dir, frees the slot and re-raises ``Cancelled``. ``local``: this node's own job (the
        submitter's evaluations) on a local lane, never on an advertised slot."""
        refusal = self._policy(job)
        if refusal is not None:
            return refusal
        if self._nursery is None:
            raise RuntimeError("WorkerPool.run() is not running")
        if local and self._local_slots:
            return await self._execute_local(job)
        self._queued += 1
        self._changed()
        try:
            await self._sem.acquire()
        except BaseException:
            self._queued -= 1
            self._changed()
            raise
        self._queued -= 1
        slot = self._free_slots.pop()
        self._busy += 1
        self._changed()
        try:
            return await self._run_on(slot, KIND_CLASS[job.kind], job)
        finally:
            self._busy -= 1
            self._free_slots.append(slot)
            self._sem.release()
            self._changed()

    async def _execute_local(self, job: Job) -> JobResult:
        async with self._local_sem:
            slot = self._free_local.pop()
            self.local_jobs_started += 1
            try:
                return await self._run_on(slot, KIND_CLASS[job.kind], job)
            finally:
                self.local_jobs_done += 1
                self._free_local.append(slot)

    def prewarm_local(self, kind: str) -> None:
        """Start a warm worker for ``kind`` on the local lane now, if none is there or starting
        (the submitter calls it when a task that will evaluate is submitted, so the first
        evaluation does not pay a cold start beside the next round's training)."""
        if not self._local_slots or kind not in KIND_CLASS:
            return
        key = (self._local_slots[0], KIND_CLASS[kind])
        if key in self._spares and key not in self._idle:
            self._prewarm.add(key)  # a no-op when one is ready or starting: the loop waits on it
            self._wake_spares()

    def _wake_spares(self) -> None:
        self._spare_wake.set()
        self._spare_wake = trio.Event()

    def forget_task(self, task: str) -> None:
        """``task`` ended: every worker that ran a job of it frees what it keeps resident for it
        (decoded data, compiled models; peerd.executor.kinds._resident). Safe to call for any
        task, at any time: an idle worker is told at once, a busy one with its next job (it
        then forgets before running that job), and a reclaimed one has nothing left."""
        for w in list(self._workers):
            if task in w.tasks and w.alive:
                w.tasks.discard(task)
                w.forget.add(task)
                if self._nursery is not None and w in self._idle.values():
                    self._nursery.start_soon(self._send_forget, w)

    async def _send_forget(self, w: _Worker) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with w.write_lock:
                while w.forget and w.alive:
                    task = w.forget.pop()
                    msg = msgpack.packb({"op": "forget", "task": task}, use_bin_type=True)
                    await w.proc.stdin.send_all(encode_frame(msg, max_frame=MAX_JOB_FRAME))

    # ---------------------------------------------------------------- policy

    def _policy(self, job: Job) -> JobResult | None:
        if job.kind not in KIND_CLASS:
            return JobResult.failure(
                "refused", f"unknown kind {job.kind!r}; this peer runs {sorted(KIND_CLASS)}"
            )
        if not self.sandboxed and self.require_sandbox:
            return JobResult.failure(
                "refused",
                f"no working sandbox on this peer, refusing to run tasks: {self.sandbox_report.reason}",
            )
        if KINDS[job.kind].trusted_only and not job.trusted:
            return JobResult.failure(
                "refused",
                f"submitter {job.submitter} is not trusted here; the {job.kind} kind runs only trusted code",
            )
        for name, path in job.inputs.items():
            if not _INPUT_NAME.match(name):
                return JobResult.failure("refused", f"input name {name!r} is not allowed")
            if not Path(path).is_file():
                return JobResult.failure("refused", f"input {name!r}: {path} is not a file")
        return None

    def _changed(self) -> None:
        for cb in list(self._callbacks):
            try:
                cb()
            except Exception:
                log.exception("pool on_change callback failed")

    # ---------------------------------------------------------------- workers

    def _as_backstop(self, memory_bytes: int, device: str) -> int:
        """RLIMIT_AS for a worker on ``device``; 0 (none) where a memory cgroup caps it."""
        return 0 if self._cg.memory else as_backstop(memory_bytes, device)

    def _worker_command(
        self, wclass: str, host_dir: Path, inputs_dir: Path, device: str, *, nice: int = 0
    ) -> list[str]:
        as_bytes = self._as_backstop(Limits().memory_bytes, device)
        if self.sandboxed:
            job_dir, in_dir = JOB_DIR, INPUTS_DIR
        else:
            job_dir, in_dir = str(host_dir / "job"), str(inputs_dir)
        command = [
            self.python,
            "-s",
            "-B",
            "-m",
            "peerd.executor.worker",
            "--class",
            wclass,
            "--workdir",
            job_dir,
            "--inputs",
            in_dir,
            "--as-bytes",
            str(as_bytes),
        ]
        if nice:
            command += ["--nice", str(nice)]
        return command

    def _spawn_argv(
        self, device: str, wclass: str, host_dir: Path, inputs_dir: Path, *, nice: int = 0
    ) -> tuple[list[str], dict[str, str]]:
        command = self._worker_command(wclass, host_dir, inputs_dir, device, nice=nice)
        layout = runtime_layout(self.python)
        extra = dict(self.extra_env)
        rw_binds: list[tuple[str, str]] = []
        if self.jax_cache is not None and wclass in HEAVY_CLASSES and self.sandboxed:
            # Sandboxed only: without the sandbox a light worker's python task runs as the
            # daemon's user and could write the cache that keras workers load code from.
            cache_dir, max_bytes = self.jax_cache
            rw_binds.append((str(cache_dir), JAX_CACHE_DIR))
            extra.update(
                {
                    "JAX_COMPILATION_CACHE_DIR": JAX_CACHE_DIR,
                    "JAX_COMPILATION_CACHE_MAX_SIZE": str(max_bytes),  # least recently used go
                    # Every compile, however quick: the seed MLP's take 0.01-0.5 s each here.
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                }
            )
        if not self.sandboxed:
            job_dir = str(host_dir / "job")
            return command, sandbox_env(layout, device, extra, job_dir=job_dir)
        argv = build_bwrap_argv(
            command,
            layout=layout,
            inputs_dir=inputs_dir,
            device=device,
            env=sandbox_env(layout, device, extra),
            bwrap=self.sandbox_report.bwrap or self.bwrap,
            scratch_bytes=self.scratch_bytes,
            hide=(*self.hide, self.work_root),
            disable_userns=self.sandbox_report.disable_userns,
            rw_binds=rw_binds,
        )
        return argv, {"PATH": "/usr/bin:/bin"}

    async def _start_worker(self, slot: int, wclass: str) -> _Worker:
        assert self._nursery is not None
        device = self._slot_devices[slot]
        wid = f"{slot}-{device.replace(':', '')}-{wclass}-{uuid.uuid4().hex[:10]}"
        host_dir = self.work_root / wid
        inputs_dir = host_dir / "inputs"
        try:
            inputs_dir.mkdir(parents=True, mode=0o700)
        except OSError as e:
            raise _StartError(f"cannot create the work dir {host_dir}: {e}") from e
        cgroup: WorkerCgroup | None = None
        try:
            cgroup = self._cg.new_group()
            if cgroup is not None:
                default = Limits()
                cgroup.set_limits(default.memory_bytes, default.max_processes)
        except OSError as e:
            log.warning("cannot create a cgroup for worker %s: %s", wid, e)
            if cgroup is not None:
                cgroup.remove()
            cgroup = None
        nice = LOCAL_LANE_NICE if slot in self._local_slots else 0
        argv, env = self._spawn_argv(device, wclass, host_dir, inputs_dir, nice=nice)
        if cgroup is not None:
            # The wrapper joins the cgroup and then execs bwrap, so the sandbox is born inside it.
            argv = ["/bin/sh", "-c", _JOIN_CGROUPS_SH, "sh", *map(str, cgroup.procs_files), "--", *argv]
        self.workers_started += 1
        try:
            proc = _Proc(argv, env)
        except OSError as e:
            if cgroup is not None:
                cgroup.remove()
            shutil.rmtree(host_dir, ignore_errors=True)
            raise _StartError(f"cannot spawn the worker: {e}") from e
        w = _Worker(wid, slot, device, wclass, host_dir, inputs_dir, proc, cgroup)
        self._workers.add(w)
        self._nursery.start_soon(self._drain_stderr, w)
        try:
            frame: bytes | None = None
            with trio.move_on_after(self.start_timeout):
                frame = await self._read_frame(w, FrameDecoder(max_frame=RESULT_OVERHEAD))
            if frame is None:
                raise _StartError(
                    f"worker exited before it was ready (status {w.proc.returncode}): {w.tail()}"
                )
            msg = msgpack.unpackb(frame, raw=False)
            if not isinstance(msg, dict) or msg.get("op") != "ready":
                raise _StartError("worker did not say ready")
        except BaseException as e:
            with trio.CancelScope(shield=True):
                await self._reclaim(w)
            if isinstance(e, (RemoteProtocolError, ValueError, msgpack.UnpackException)):
                raise _StartError(f"worker spoke garbage: {e}") from e
            raise
        log.debug("worker %s ready (pid %d)", wid, w.proc.pid)
        return w

    async def _replenish(
        self, key: tuple[int, str], send: trio.MemorySendChannel[_Worker | _StartFailed]
    ) -> None:
        backoff = 0.5
        async with send:
            if key[0] in self._local_slots:
                await self._spare_needed(key, heavy_wait=False)
            while True:
                try:
                    w = await self._start_worker(*key)
                except _StartError as e:
                    log.warning("warm %s worker for slot %d failed to start: %s", key[1], key[0], e)
                    self._spare_ready[key].set()
                    await send.send(_StartFailed(str(e)))
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 0.5
                self._prewarm.discard(key)
                self._spare_ready[key].set()
                try:
                    await send.send(w)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await self._reclaim(w)
                    raise
                self._spare_ready[key] = trio.Event()
                # Let the job that just took the spare make its round trip before the next sandbox
                # is built: creating namespaces and starting Python costs ~0.1 s of CPU and, on a
                # 2-core host, took a no-op job from ~1 ms to ~15 ms when it ran concurrently.
                await trio.sleep(SPARE_DELAY)
                if key[0] in self._local_slots:
                    await self._spare_needed(key, heavy_wait=False)
                elif key[1] in HEAVY_CLASSES:
                    await self._spare_needed(key, heavy_wait=True)

    async def _spare_needed(self, key: tuple[int, str], *, heavy_wait: bool) -> None:
        """Return when the next spare for ``key`` should start: a job (or prewarm_local) waits
        for it, or — ``heavy_wait`` — its slot is idle and keeps no worker of its class
        (HEAVY_CLASSES)."""
        slot = key[0]
        while True:
            if self._spare_wanted.get(key, 0) > 0 or key in self._prewarm:
                return
            if heavy_wait and slot not in self._running and key not in self._idle:
                return
            await self._spare_wake.wait()

    async def _drain_stderr(self, w: _Worker) -> None:
        # Always drained, so a task flooding stderr never blocks on a full pipe; only a tail is kept.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            while True:
                chunk = await w.proc.stderr.receive_some(1 << 16)
                if not chunk:
                    return
                w.stderr_tail += chunk
                if len(w.stderr_tail) > STDERR_TAIL:
                    del w.stderr_tail[:-STDERR_TAIL]

    async def _take_worker(self, slot: int, wclass: str, submitter: str) -> _Worker | JobResult:
        if self._stopping or self._nursery is None:
            return JobResult.failure("cancelled", "the worker pool is shutting down")
        key = (slot, wclass)
        idle = self._idle.pop(key, None)
        if idle is not None:
            if idle.submitter == submitter and idle.alive:
                return idle
            if parse_device(self._slot_devices[slot]) is None and self._nursery is not None:
                # CPU: SIGKILL now, reap in the background (keeps ~5 ms off this job's latency).
                self._kill(idle)
                self._nursery.start_soon(self._reclaim, idle)
            else:
                await self._reclaim(idle)  # a GPU's memory must be free before the next task starts
        recv = self._spares.get(key)
        if recv is None:
            try:
                return await self._start_worker(slot, wclass)
            except _StartError as e:
                return JobResult.failure("crashed", f"worker failed to start: {e}")
        while True:
            self._spare_wanted[key] = self._spare_wanted.get(key, 0) + 1
            self._wake_spares()
            try:
                got = await recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return JobResult.failure("cancelled", "the worker pool is shutting down")
            finally:
                self._spare_wanted[key] -= 1
            if isinstance(got, _StartFailed):
                return JobResult.failure("crashed", f"worker failed to start: {got.reason}")
            if got.alive:
                return got
            await self._reclaim(got)

    async def _run_on(self, slot: int, wclass: str, job: Job) -> JobResult:
        self._running.add(slot)
        try:
            return await self._run_on_slot(slot, wclass, job)
        finally:
            self._running.discard(slot)
            self._wake_spares()

    async def _run_on_slot(self, slot: int, wclass: str, job: Job) -> JobResult:
        got = await self._take_worker(slot, wclass, job.submitter)
        if isinstance(got, JobResult):
            return got
        w = got
        keep = False
        try:
            result, keep = await self._drive(w, job)
            return result
        finally:
            with trio.CancelScope(shield=True):
                if keep and not self._stopping and self.reuse_idle_seconds > 0:
                    self._park(w, job.submitter)
                else:
                    await self._reclaim(w)

    def _park(self, w: _Worker, submitter: str) -> None:
        """Keep a healthy worker for more jobs of the same submitter, for a while (_reap_idle)."""
        assert self._nursery is not None
        for entry in os.scandir(w.inputs_dir):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        w.submitter = submitter
        w.idle_since = trio.current_time()
        key = (w.slot, w.wclass)
        old = self._idle.get(key)
        self._idle[key] = w
        if old is not None and old is not w:
            self._nursery.start_soon(self._reclaim, old)

    async def _reap_idle(self) -> None:
        """Kill workers kept for a submitter who sent nothing for ``reuse_idle_seconds``: an idle
        TensorFlow worker holds ~0.5 GB (and, on a GPU, device memory)."""
        period = max(0.05, min(1.0, self.reuse_idle_seconds / 4))
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for key, w in list(self._idle.items()):
                if now - w.idle_since >= self.reuse_idle_seconds:
                    del self._idle[key]
                    self._wake_spares()
                    await self._reclaim(w)

    async def _link_inputs(self, w: _Worker, inputs: Mapping[str, Path]) -> None:
        for name, src in inputs.items():
            dst = w.inputs_dir / name
            try:
                # A hard link is O(1) and safe: the sandbox sees this dir through a read-only mount.
                os.link(src, dst)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                await trio.to_thread.run_sync(shutil.copyfile, src, dst)

    async def _drive(self, w: _Worker, job: Job) -> tuple[JobResult, bool]:
        """Send one job to ``w`` and turn whatever happens into a JobResult (and whether to keep ``w``)."""
        limits = job.limits
        w.jobs += 1
        w.stderr_tail.clear()
        try:
            await self._link_inputs(w, job.inputs)
        except OSError as e:
            return JobResult.failure("refused", f"cannot expose the inputs: {e}"), False
        oom0 = 0
        if w.cgroup is not None:
            try:
                w.cgroup.set_limits(limits.memory_bytes, limits.max_processes)
            except OSError as e:
                # EBUSY: the worker already uses more than the job may (e.g. TensorFlow's ~0.5 GB).
                return JobResult.failure(
                    "memory_limit", f"cannot cap the worker at {limits.memory_bytes} bytes: {e}"
                ), False
            w.cgroup.reset_peaks()
            oom0 = w.cgroup.oom_kills()
        msg = {
            "op": "job",
            "job_id": job.job_id,
            "kind": job.kind,
            "params": dict(job.params),
            "inputs": sorted(job.inputs),
            "limits": limits.to_wire(),
            "trusted": job.trusted,
            # None on the wire is "no cap" (a kind would apply 0 as a limit).
            "as_backstop": self._as_backstop(limits.memory_bytes, w.device) or None,
            "input_ids": {name: content_id(Path(path)) for name, path in job.inputs.items()},
            "task": job.task,
            # Ended tasks not yet forgotten: the worker frees their entries before this job.
            "forget": sorted(w.forget),
        }
        w.forget.clear()
        if job.task is not None:
            w.tasks.add(job.task)
        try:
            payload = encode_frame(msgpack.packb(msg, use_bin_type=True), max_frame=MAX_JOB_FRAME)
        except (TypeError, ValueError, OverflowError, ProtocolError) as e:
            return JobResult.failure("refused", f"job parameters cannot be sent: {e}"), True
        t0 = trio.current_time()
        state = _RunState()
        frame: bytes | None = None
        try:
            async with w.write_lock:
                await w.proc.stdin.send_all(payload)
            decoder = FrameDecoder(max_frame=limits.max_output_bytes + RESULT_OVERHEAD)
            # The monitor runs in the pool's nursery, not a nursery of our own: a nursery here
            # would wrap a caller's Cancelled in an ExceptionGroup, and execute() promises a plain
            # Cancelled.
            monitor = trio.CancelScope()
            if self._nursery is not None:
                self._nursery.start_soon(self._monitor, w, limits, state, monitor)
            try:
                with trio.move_on_after(limits.wall_seconds) as deadline:
                    frame = await self._read_frame(w, decoder)
            finally:
                monitor.cancel()
            if deadline.cancelled_caught:
                state.killed_for = "timeout"
                state.detail = f"wall-clock limit of {limits.wall_seconds} s reached"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            frame = None  # it died before reading the job; classified below
        except RemoteProtocolError:
            state.killed_for = "output_limit"
            state.detail = f"result larger than {limits.max_output_bytes} bytes of outputs"
            frame = None
        wall = trio.current_time() - t0
        # worker_jobs: how many jobs this worker has served (1 on a fresh worker) — shows reuse.
        extra = {"wall_seconds": wall, "worker_jobs": float(w.jobs)}
        if w.cgroup is not None:
            for k, v in (("memory_peak_bytes", w.cgroup.memory_peak()), ("pids_peak", w.cgroup.pids_peak())):
                if v is not None:
                    extra[k] = float(v)

        if frame is None:
            if self._stopping:
                return JobResult.failure(
                    "cancelled", "the worker pool shut down during the job", metrics=extra
                ), False
            return await self._classify_death(w, state, oom0, extra), False
        try:
            result = _parse_result(frame)
        except ValueError as e:
            return JobResult.failure("crashed", f"worker sent a malformed result: {e}", metrics=extra), False
        metrics = {**result.metrics, **extra}
        error = result.error
        detail = result.detail
        if error == "crashed" and w.cgroup is not None and w.cgroup.oom_kills() > oom0:
            error, detail = (
                "memory_limit",
                f"the kernel's OOM killer ended the task at the {limits.memory_bytes}-byte cap\n{detail}",
            )
        keep = error in (None, "task_error") and job.kind in REUSABLE and w.alive
        return JobResult(
            ok=result.ok and error is None,
            outputs=result.outputs,
            metrics=metrics,
            error=error,
            detail=detail[-MAX_DETAIL:],
        ), keep

    async def _classify_death(
        self, w: _Worker, state: _RunState, oom0: int, metrics: dict[str, float]
    ) -> JobResult:
        self._kill(w)
        with trio.move_on_after(10):
            await w.proc.wait()
        rc = w.proc.returncode
        if state.killed_for is not None:
            return JobResult.failure(state.killed_for, state.detail, metrics=metrics)
        if w.cgroup is not None and w.cgroup.oom_kills() > oom0:
            return JobResult.failure(
                "memory_limit", "the kernel's OOM killer ended the task at its memory cap", metrics=metrics
            )
        # bwrap exits 128+N when its command dies of signal N; a bare worker shows -N.
        if rc in (128 + signal.SIGXCPU, -signal.SIGXCPU):
            return JobResult.failure("cpu_limit", "CPU-time limit reached (SIGXCPU)", metrics=metrics)
        if rc in (128 + signal.SIGXFSZ, -signal.SIGXFSZ):
            return JobResult.failure("output_limit", "file-size limit reached (SIGXFSZ)", metrics=metrics)
        return JobResult.failure("crashed", f"worker died (status {rc}): {w.tail()}", metrics=metrics)

    async def _monitor(self, w: _Worker, limits: Limits, state: _RunState, scope: trio.CancelScope) -> None:
        """Backstops the kernel's caps: CPU time over a process *tree*, and RSS without a memory cgroup."""
        with scope:
            await self._watch(w, limits, state)

    async def _watch(self, w: _Worker, limits: Limits, state: _RunState) -> None:
        check_rss = w.cgroup is None or not w.cgroup.has_memory()
        baseline: float | None = None
        while True:
            await trio.sleep(POLL_SECONDS)
            cpu, rss = _tree_usage(w)
            if baseline is None:
                baseline = cpu  # excludes what the worker used before this job (TensorFlow's import)
                continue
            if cpu - baseline > limits.cpu_seconds + CPU_GRACE:
                state.killed_for = "cpu_limit"
                state.detail = f"process tree used over {limits.cpu_seconds} s of CPU"
                self._kill(w)
                return
            if check_rss and rss > limits.memory_bytes:
                state.killed_for = "memory_limit"
                state.detail = f"resident memory {rss} bytes over the {limits.memory_bytes}-byte cap"
                self._kill(w)
                return

    async def _read_frame(self, w: _Worker, decoder: FrameDecoder) -> bytes | None:
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await w.proc.stdout.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            decoder.feed(data)

    # ---------------------------------------------------------------- reclaim

    def _kill(self, w: _Worker) -> None:
        """SIGKILL the worker's whole tree: bwrap (whose death takes the sandbox's PID namespace with
        it, via --die-with-parent) and every process in its cgroup — or, without a cgroup, every
        descendant psutil finds (a /proc walk of the whole host, ~5 ms, so only as the fallback)."""
        if w.cgroup is not None:
            pids = set(w.cgroup.pids())
        else:
            pids = set()
            with contextlib.suppress(psutil.Error):
                pids.update(p.pid for p in psutil.Process(w.proc.pid).children(recursive=True))
        w.proc.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if w.cgroup is not None:
            w.cgroup.kill_all()

    async def _reclaim(self, w: _Worker) -> None:
        """Kill and reap ``w``'s tree, remove its work dir and cgroup. Idempotent.

        Returns once every process is dead and the work dir is gone; a cgroup the kernel still
        reports busy (it empties a moment after its last task is reaped) is removed in the background.
        """
        if w.dead:
            return
        w.dead = True
        self._workers.discard(w)
        # With a cgroup its member list is the tree (forks inherit it); without one, a /proc walk.
        tree = self._tree(w) if w.cgroup is None else []
        self._kill(w)
        with trio.move_on_after(10):
            await w.proc.wait()
        await w.proc.aclose()
        await self._await_tree_gone(w, tree)
        # Small: the job's files live in the sandbox's tmpfs; here are only input hard links.
        shutil.rmtree(w.host_dir, ignore_errors=True)
        if w.cgroup is not None and not w.cgroup.remove():
            if self._nursery is not None:
                self._nursery.start_soon(self._remove_cgroup, w)
            else:
                await self._remove_cgroup(w)

    @staticmethod
    def _tree(w: _Worker) -> list[psutil.Process]:
        """The worker's processes now: bwrap and every descendant (the sandbox's PID namespace)."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(w.proc.pid)
            return [root, *root.children(recursive=True)]
        return []

    async def _await_tree_gone(self, w: _Worker, tree: list[psutil.Process]) -> None:
        """Wait until no process of the worker is left running, killing again as we go.

        bwrap's death does not end the sandbox at once: the namespace's init gets its SIGKILL
        through --die-with-parent, and only its exit kills the rest, asynchronously; a fork bomb
        also forks between a cgroup's pid list being read and the kills. A reclaimed worker must
        leave nothing behind (the fork-bomb test caught a straggler under load), so we keep
        killing the cgroup's members and the survivors' descendants until none is running.
        Bounded: a process that outlives ~10 s of SIGKILLs is logged, not waited on forever.
        """
        for _ in range(1000):
            left: list[psutil.Process] = []
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(p)
                        left.extend(p.children(recursive=True))
            cgroup_pids = w.cgroup.pids() if w.cgroup is not None else []
            if not left and not cgroup_pids:
                return
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            if w.cgroup is not None:
                w.cgroup.kill_all()
            tree = left
            await trio.sleep(0.01)
        log.warning("worker %s: processes still running after reclaim", w.wid)

    async def _remove_cgroup(self, w: _Worker) -> None:
        assert w.cgroup is not None
        for _ in range(200):
            w.cgroup.kill_all()
            if w.cgroup.remove():
                return
            await trio.sleep(0.005)
        log.warning("cgroup of worker %s still busy after kill", w.wid)


_DIGEST_NAME = re.compile(r"^[0-9a-f]{64}$")


def content_id(path: Path) -> str:
    """What the worker's resident cache keys an input's decoded form by.

    A blob from the store is named by its SHA-256 (peerd.blobs), so that is its id. Any other
    file (tests, benchmarks) is identified by device, inode, size and mtime: the same file
    unchanged gives the same id, a rewritten or replaced one a new id."""
    if _DIGEST_NAME.match(path.name):
        return f"sha256:{path.name}"
    try:
        st = path.stat()
    except OSError:
        return f"missing:{uuid.uuid4().hex}"
    return f"file:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _tree_usage(w: _Worker) -> tuple[float, int]:
    """CPU seconds (including reaped children) and RSS of the worker's processes."""
    pids: list[int] = w.cgroup.pids() if w.cgroup is not None else []
    procs: list[psutil.Process] = []
    try:
        if pids:
            procs = [psutil.Process(p) for p in pids]
        else:
            root = psutil.Process(w.proc.pid)
            procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        pass
    cpu = 0.0
    rss = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            cpu += t.user + t.system + t.children_user + t.children_system
            rss += p.memory_info().rss
    return cpu, rss


def _parse_result(frame: bytes) -> JobResult:
    """Decode a worker's result defensively: the worker shares a sandbox with untrusted code."""
    try:
        msg = msgpack.unpackb(frame, raw=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"not msgpack: {e}") from None
    if not isinstance(msg, dict) or msg.get("op") != "result":
        raise ValueError("not a result")
    outputs = msg.get("outputs")
    metrics = msg.get("metrics")
    if not isinstance(outputs, dict) or not all(
        isinstance(k, str) and isinstance(v, bytes) for k, v in outputs.items()
    ):
        raise ValueError("outputs must map str to bytes")
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in metrics.items()
    ):
        raise ValueError("metrics must map str to numbers")
    error = msg.get("error")
    if error is not None and error not in ERRORS:
        raise ValueError(f"unknown error {error!r}")
    detail = msg.get("detail", "")
    if not isinstance(detail, str):
        raise ValueError("detail must be str")
    ok = bool(msg.get("ok")) and error is None
    clean_metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v)) or k in ("loss",)}
    return JobResult(ok=ok, outputs=outputs, metrics=clean_metrics, error=error, detail=detail[-MAX_DETAIL:])


__all__ = ["WorkerPool", "as_backstop", "content_id"]
