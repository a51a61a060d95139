"""Jobs, their limits and results, and the per-worker control groups that enforce the caps.

The value types (:class:`Limits`, :class:`Job`, :class:`JobResult`) are what the daemon hands the
pool and gets back. The cgroup classes are how the pool turns ``Limits.memory_bytes`` and
``Limits.max_processes`` into kernel-enforced caps on one worker's whole process tree
(docs/execution.md has the table of what is enforced how).

This machine (docs/design.md appendix B.2) is *hybrid*: memory and pids live in cgroup v1 and are
writable by root; the v2 mount carries no controllers. A systemd host with ``Delegate=yes`` gives
the daemon a v2 subtree instead. Both are handled here; when neither works the pool falls back to
RLIMIT_AS as a backstop plus RSS polling (TensorFlow reserves ~2.2 GB of address space for
~0.6 GB resident, so an address-space cap cannot be the real memory cap).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("peerd.executor")

#: Short machine-readable reasons a job can fail with (``JobResult.error``).
ERRORS = frozenset(
    {
        "timeout",  # wall-clock deadline, enforced by the pool
        "cpu_limit",  # RLIMIT_CPU (SIGXCPU) or the pool's CPU-time backstop
        "memory_limit",  # cgroup OOM kill, RSS polling, or MemoryError under RLIMIT_AS
        "output_limit",  # outputs over max_output_bytes, a file over it (SIGXFSZ), or an oversized frame
        "crashed",  # the worker died or spoke garbage, for no reason we could attribute
        "refused",  # policy: no sandbox, untrusted python, unknown kind, bad input names
        "task_error",  # the task itself failed (bad params, script exit status != 0, Keras error)
        "cancelled",  # the pool shut down before the job finished
    }
)

#: Longest ``JobResult.detail`` kept (a tail of stderr is plenty to explain a failure).
MAX_DETAIL = 4000


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 2 << 30
    cpu_seconds: float = 600
    wall_seconds: float = 900
    max_processes: int = 64
    max_output_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.cpu_seconds <= 0 or self.wall_seconds <= 0:
            raise ValueError("limits must be positive")
        if self.max_processes < 1 or self.max_output_bytes < 0:
            raise ValueError("max_processes must be >= 1 and max_output_bytes >= 0")

    def to_wire(self) -> dict[str, Any]:
        return {
            "memory_bytes": int(self.memory_bytes),
            "cpu_seconds": float(self.cpu_seconds),
            "wall_seconds": float(self.wall_seconds),
            "max_processes": int(self.max_processes),
            "max_output_bytes": int(self.max_output_bytes),
        }


@dataclass(frozen=True)
class Job:
    job_id: str
    submitter: str  # peer id; a worker that served one submitter is never reused for another
    kind: str  # "echo" | "sleep" | "python" | "keras-train" | "keras-predict"
    params: Mapping[str, Any]  # kind-specific, msgpack-able
    inputs: Mapping[str, Path]  # name -> host file (content-addressed blob); exposed read-only
    limits: Limits = field(default_factory=Limits)
    trusted: bool = False  # kinds marked trusted_only (peerd/kinds.py) run only when True
    #: The task the job belongs to: a warm worker's resident entries (decoded data, compiled
    #: models) are tagged with it and freed by WorkerPool.forget_task when the task ends.
    task: str | None = None


@dataclass(frozen=True)
class JobResult:
    ok: bool
    outputs: Mapping[str, bytes]
    metrics: Mapping[str, float]
    error: str | None = None
    detail: str = ""

    @classmethod
    def failure(cls, error: str, detail: str, *, metrics: Mapping[str, float] | None = None) -> JobResult:
        assert error in ERRORS, error
        return cls(
            ok=False, outputs={}, metrics=dict(metrics or {}), error=error, detail=detail[-MAX_DETAIL:]
        )


# --------------------------------------------------------------------------------------------------
# cgroups
# --------------------------------------------------------------------------------------------------


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    # One write() per value: cgroup files act on each write, and a buffered writer may split it.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _mountpoints() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every cgroup mount, from /proc/self/mountinfo."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        if rfields[0] in ("cgroup", "cgroup2"):
            out.append((fields[4].replace("\\040", " "), rfields[0], rfields[2]))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for the v2 hierarchy) -> our cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctrl in parts[1].split(",") if parts[1] else [""]:
            out[ctrl] = parts[2]
    return out


class WorkerCgroup:
    """The control group(s) holding one worker's whole process tree.

    ``procs_files`` are the files the spawn wrapper writes its own PID into *before* exec'ing
    bwrap, so every process of the sandbox is born inside the group (attaching after spawn
    would race with the sandbox's first fork).
    """

    version: str = ""

    @property
    def procs_files(self) -> list[Path]:
        raise NotImplementedError

    def set_limits(self, memory_bytes: int, max_processes: int) -> None:
        raise NotImplementedError

    def oom_kills(self) -> int:
        raise NotImplementedError

    def reset_peaks(self) -> None:
        """Start the memory high-water mark afresh for the next job (where the kernel allows)."""

    def memory_peak(self) -> int | None:
        raise NotImplementedError

    def pids_peak(self) -> int | None:
        raise NotImplementedError

    def has_memory(self) -> bool:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def kill_all(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """rmdir the group(s); False while processes remain (the caller retries)."""
        raise NotImplementedError


class _V1Group(WorkerCgroup):
    version = "v1"

    def __init__(self, memory: Path | None, pids: Path | None) -> None:
        self.memory = memory
        self.pids_dir = pids
        self._limits: tuple[int, int] | None = None

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in (self.memory, self.pids_dir) if d is not None]

    def has_memory(self) -> bool:
        return self.memory is not None

    def set_limits(self, memory_bytes: int, max_processes: int) -> None:
        if self._limits == (memory_bytes, max_processes):
            return  # a reused worker with the same limits: skip the writes (per-task overhead)
        if self.memory is not None:
            memsw = self.memory / "memory.memsw.limit_in_bytes"
            # memsw must stay >= the memory limit at every step: lift it first, then set both.
            if memsw.exists():
                _write(memsw, "-1")
            _write(self.memory / "memory.limit_in_bytes", str(memory_bytes))
            if memsw.exists():
                _write(memsw, str(memory_bytes))  # no swapping around the cap
        if self.pids_dir is not None:
            _write(self.pids_dir / "pids.max", str(max_processes))
        self._limits = (memory_bytes, max_processes)

    def reset_peaks(self) -> None:
        if self.memory is not None:
            with contextlib.suppress(OSError):
                _write(self.memory / "memory.max_usage_in_bytes", "0")

    def oom_kills(self) -> int:
        if self.memory is None:
            return 0
        try:
            for line in _read(self.memory / "memory.oom_control").splitlines():
                key, _, val = line.partition(" ")
                if key == "oom_kill":
                    return int(val)
            # Kernels before 4.13 have no oom_kill counter: failcnt counts hits of the limit.
            return int(_read(self.memory / "memory.failcnt"))
        except (OSError, ValueError):
            return 0

    def memory_peak(self) -> int | None:
        if self.memory is None:
            return None
        try:
            return int(_read(self.memory / "memory.max_usage_in_bytes"))
        except (OSError, ValueError):
            return None

    def pids_peak(self) -> int | None:
        if self.pids_dir is None:
            return None
        try:
            return int(_read(self.pids_dir / "pids.peak"))
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        out: set[int] = set()
        for f in self.procs_files:
            with contextlib.suppress(OSError, ValueError):
                out.update(int(x) for x in _read(f).split())
        return sorted(out)

    def remove(self) -> bool:
        ok = True
        for d in (self.memory, self.pids_dir):
            if d is None:
                continue
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", d, e)
                ok = False
        return ok


class _V2Group(WorkerCgroup):
    version = "v2"

    def __init__(self, path: Path, memory: bool, pids: bool) -> None:
        self.path = path
        self._memory = memory
        self._pids = pids
        self._limits: tuple[int, int] | None = None

    @property
    def procs_files(self) -> list[Path]:
        return [self.path / "cgroup.procs"]

    def has_memory(self) -> bool:
        return self._memory

    def set_limits(self, memory_bytes: int, max_processes: int) -> None:
        if self._limits == (memory_bytes, max_processes):
            return
        if self._memory:
            _write(self.path / "memory.max", str(memory_bytes))
            with contextlib.suppress(OSError):
                _write(self.path / "memory.swap.max", "0")
        if self._pids:
            _write(self.path / "pids.max", str(max_processes))
        self._limits = (memory_bytes, max_processes)

    def reset_peaks(self) -> None:
        if self._memory:
            with contextlib.suppress(OSError):
                _write(self.path / "memory.peak", "0")  # resettable since Linux 6.12

    def oom_kills(self) -> int:
        try:
            for line in _read(self.path / "memory.events").splitlines():
                key, _, val = line.partition(" ")
                if key == "oom_kill":
                    return int(val)
        except (OSError, ValueError):
            pass
        return 0

    def memory_peak(self) -> int | None:
        try:
            return int(_read(self.path / "memory.peak"))
        except (OSError, ValueError):
            return None

    def pids_peak(self) -> int | None:
        try:
            return int(_read(self.path / "pids.peak"))
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in _read(self.path / "cgroup.procs").split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> None:
        try:
            _write(self.path / "cgroup.kill", "1")  # atomic, even against a fork bomb (Linux 5.14+)
        except OSError:
            super().kill_all()

    def remove(self) -> bool:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                log.warning("cannot remove cgroup %s: %s", self.path, e)
            return False
        return True


@dataclass(frozen=True)
class CgroupSupport:
    """Which per-worker cgroup caps this host gives us, and where the pool's groups go."""

    version: str  # "v1" | "v2" | "none"
    memory_root: Path | None = None  # v1: <memory mount>/<our group>/<pool dir>; v2: the pool dir
    pids_root: Path | None = None
    v2_memory: bool = False
    v2_pids: bool = False
    reason: str = ""

    @property
    def memory(self) -> bool:
        return self.memory_root is not None if self.version == "v1" else self.v2_memory

    @property
    def pids(self) -> bool:
        return self.pids_root is not None if self.version == "v1" else self.v2_pids

    def new_group(self) -> WorkerCgroup | None:
        name = "w-" + uuid.uuid4().hex[:12]
        if self.version == "v1":
            mem = pid = None
            if self.memory_root is not None:
                mem = self.memory_root / name
                mem.mkdir()
            if self.pids_root is not None:
                pid = self.pids_root / name
                pid.mkdir()
            return _V1Group(mem, pid)
        if self.version == "v2" and self.memory_root is not None:
            path = self.memory_root / name
            path.mkdir()
            return _V2Group(path, self.v2_memory, self.v2_pids)
        return None

    def cleanup(self) -> None:
        """Remove the pool's directory (after every worker group in it is gone)."""
        for d in {self.memory_root, self.pids_root}:
            if d is None:
                continue
            with contextlib.suppress(OSError):
                for child in d.iterdir():
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                d.rmdir()


def _v1_pool_dir(mount: str, own: str, pool_name: str, probe_file: str) -> Path | None:
    """Create <mount>/<own>/<pool_name> and check we can write ``probe_file`` in a child of it."""
    base = Path(mount) / own.lstrip("/")
    pool_dir = base / pool_name
    try:
        pool_dir.mkdir(exist_ok=True)
        probe = pool_dir / ("probe-" + uuid.uuid4().hex[:8])
        probe.mkdir()
        try:
            current = _read(probe / probe_file)
            _write(probe / probe_file, current)  # write back what is there: only the right to write is probed
        finally:
            probe.rmdir()
    except OSError as e:
        log.info("cgroup v1 %s not usable under %s: %s", probe_file, base, e)
        with contextlib.suppress(OSError):
            pool_dir.rmdir()
        return None
    return pool_dir


def _sweep_stale(parent: Path) -> None:
    """Remove pool dirs left by a daemon that died (their name carries its PID)."""
    with contextlib.suppress(OSError):
        for d in parent.glob("peerd-*"):
            pid_s = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
            if not pid_s.isdigit() or int(pid_s) == os.getpid():
                continue
            try:
                os.kill(int(pid_s), 0)
                continue  # that daemon is alive (a devnet peer): leave its groups alone
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            for child in d.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()


def detect_cgroups(*, pool_name: str | None = None) -> CgroupSupport:
    """Find writable memory/pids controllers and create this pool's directory under our own group.

    Each call with no ``pool_name`` creates a fresh ``peerd-<pid>-<rand>`` directory: several pools
    (tests, a devnet of daemons on one host) must not share or delete each other's groups.
    """
    pool_name = pool_name or f"peerd-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    mounts = _mountpoints()
    own = _own_cgroups()
    v1_mem = v1_pids = None
    for mnt, fstype, opts in mounts:
        if fstype != "cgroup":
            continue
        ctrls = set(opts.split(","))
        if "memory" in ctrls and v1_mem is None and "memory" in own:
            _sweep_stale(Path(mnt) / own["memory"].lstrip("/"))
            v1_mem = _v1_pool_dir(mnt, own["memory"], pool_name, "memory.limit_in_bytes")
        if "pids" in ctrls and v1_pids is None and "pids" in own:
            _sweep_stale(Path(mnt) / own["pids"].lstrip("/"))
            v1_pids = _v1_pool_dir(mnt, own["pids"], pool_name, "pids.max")
    if v1_mem is not None or v1_pids is not None:
        return CgroupSupport("v1", memory_root=v1_mem, pids_root=v1_pids)
    for mnt, fstype, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            support = _detect_v2(Path(mnt) / own[""].lstrip("/"), pool_name)
            if support is not None:
                return support
    return CgroupSupport("none", reason="no writable memory or pids cgroup controller")


def _detect_v2(own_dir: Path, pool_name: str) -> CgroupSupport | None:
    """cgroup v2: the daemon's delegated group (systemd ``Delegate=yes``) gets a subtree.

    v2 forbids processes in a group that distributes controllers to children ("no internal
    processes"), so, as systemd's delegation docs prescribe, the daemon first moves itself into a
    leaf ``<own>/daemon`` and then enables memory/pids for ``<own>``'s children.
    """
    try:
        available = set(_read(own_dir / "cgroup.controllers").split())
    except OSError:
        return None
    wanted = [c for c in ("memory", "pids") if c in available]
    if not wanted:
        return None
    try:
        enabled = set(_read(own_dir / "cgroup.subtree_control").split())
        missing = [c for c in wanted if c not in enabled]
        if missing:
            leaf = own_dir / "daemon"
            leaf.mkdir(exist_ok=True)
            for pid in _read(own_dir / "cgroup.procs").split():
                with contextlib.suppress(OSError):
                    _write(leaf / "cgroup.procs", pid)
            _write(own_dir / "cgroup.subtree_control", " ".join("+" + c for c in missing))
        pool_dir = own_dir / pool_name
        pool_dir.mkdir(exist_ok=True)
        _write(pool_dir / "cgroup.subtree_control", " ".join("+" + c for c in wanted))
    except OSError as e:
        log.info("cgroup v2 under %s not usable: %s", own_dir, e)
        return None
    return CgroupSupport("v2", memory_root=pool_dir, v2_memory="memory" in wanted, v2_pids="pids" in wanted)
