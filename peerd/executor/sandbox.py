"""The bubblewrap sandbox every worker runs in: the command builder and the probe.

Why bubblewrap: of the mechanisms tried on this kind of machine (docs/design.md appendix B.2) it is the
one that works as root and unprivileged, gives its own network namespace, runs TensorFlow at full
speed, and needs nothing but a small unprivileged binary. What the sandbox looks like inside:

* ``/`` is an empty tmpfs remounted read-only; only the Python runtime, the venv, the ``peerd`` and
  ``protocol`` packages, ``/usr`` and a few loader files from ``/etc`` are bound in, read-only. The
  daemon's state dir (identity key, SQLite, blob store) is never bound, so it does not exist inside;
  ``hide`` covers any path that would otherwise be visible through a bound directory.
* ``/job`` is a size-capped tmpfs (the task's cwd, HOME and KERAS_HOME) and ``/job/inputs`` a
  read-only bind of the host directory the pool links the job's input blobs into. A read-only
  *mount* matters: a hard-linked blob is owned by the daemon's uid, which the sandbox shares, so
  file permissions alone would let a task rewrite the content-addressed store.
* ``--unshare-all`` (net, pid, ipc, uts, cgroup, user), ``--disable-userns``, ``--cap-drop ALL``,
  ``--new-session`` (no TIOCSTI into the daemon's terminal), ``--die-with-parent``, ``--clearenv``.
* GPU slots bind ``/dev/nvidia*`` with ``--dev-bind`` and nothing else of the host's /dev.

The probe runs the real command once with a small script that checks the isolation it depends on
(only ``lo`` in /proc/net/dev, no effective capabilities, a read-only root) and caches the answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from peerd.executor.limits import CgroupSupport, detect_cgroups

#: Where the task's work dir is mounted inside the sandbox.
JOB_DIR = "/job"
INPUTS_DIR = "/job/inputs"

#: Loader and identity files from /etc that Python and TensorFlow's shared libraries read.
#: Nothing secret (no shadow, no ssh, no ssl private keys).
ETC_FILES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "passwd",
    "group",
    "nsswitch.conf",
    "alternatives",
)

#: Top-level directories that are real dirs on some systems and symlinks into /usr on merged-/usr
#: ones (Debian 12): mirrored as they are on the host.
TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class SandboxUnavailable(Exception):
    """bubblewrap cannot run the sandbox here (reason in the message)."""


@dataclass(frozen=True)
class SandboxReport:
    available: bool
    reason: str = ""  # why not available, or "" when it is
    bwrap: str | None = None  # resolved path of the binary
    version: str = ""
    userns: bool = False  # a user namespace was created
    disable_userns: bool = False  # bwrap's --disable-userns works here (no nested user namespaces)
    netns: bool = False  # only "lo" inside
    caps_dropped: bool = False
    cgroup: str = "none"  # "v1" | "v2" | "none"
    memory_cap: str = "rlimit-as+rss-poll"  # how Limits.memory_bytes is enforced
    pids_cap: str = "none"  # how Limits.max_processes is enforced
    cpu_cap: str = "rlimit-cpu+poll"
    notes: tuple[str, ...] = ()

    def require(self) -> None:
        """Raise SandboxUnavailable unless the sandbox works (for callers that must not go on)."""
        if not self.available:
            raise SandboxUnavailable(self.reason)

    def with_cgroups(self, cg: CgroupSupport) -> SandboxReport:
        is_root = os.geteuid() == 0
        if cg.pids:
            pids_cap = f"cgroup-{cg.version}"
        elif not is_root:
            pids_cap = "rlimit-nproc"  # per uid, so only meaningful for a dedicated service user
        else:
            pids_cap = "none"  # RLIMIT_NPROC does not apply to uid 0 (kernel/fork.c exempts INIT_USER)
        return dataclasses.replace(
            self,
            cgroup=cg.version,
            memory_cap=f"cgroup-{cg.version}" if cg.memory else "rlimit-as+rss-poll",
            pids_cap=pids_cap,
        )


@dataclass(frozen=True)
class RuntimeLayout:
    """What of the host a worker's interpreter needs, read-only."""

    python: str  # the interpreter path as given (a venv's bin/python symlink is fine)
    ro_paths: tuple[str, ...]  # host paths bound at the same place
    pythonpath: str  # "" when peerd is importable from the venv itself


def _realdirs(paths: Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if not p:
            continue
        for cand in (os.path.abspath(p), os.path.realpath(p)):
            if os.path.isdir(cand) and cand not in out:
                out.append(cand)
    return out


@functools.cache
def runtime_layout(python: str = sys.executable) -> RuntimeLayout:
    """Find the interpreter's prefixes (by asking it) and where the peerd sources live."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        prefixes = [sys.prefix, sys.base_prefix]
    else:
        out = subprocess.run(
            [python, "-S", "-c", "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix]))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        prefixes = json.loads(out.stdout)
    ro = _realdirs(prefixes)
    # The peerd/protocol packages: bound as two directories, not their parent, because the parent
    # of a source checkout also holds .git, a venv and maybe a devnet's state dirs.
    import peerd
    import protocol

    pythonpath = ""
    for mod in (peerd, protocol):
        pkg_dir = os.path.dirname(os.path.abspath(mod.__file__ or ""))
        if not any(pkg_dir == r or pkg_dir.startswith(r + os.sep) for r in ro):
            ro.append(pkg_dir)
            pythonpath = os.path.dirname(pkg_dir)
    return RuntimeLayout(python=python, ro_paths=tuple(ro), pythonpath=pythonpath)


def parse_device(device: str) -> int | None:
    """ "cpu" -> None; "gpu:N" -> N. Anything else is a configuration error."""
    if device == "cpu":
        return None
    kind, _, idx = device.partition(":")
    if kind == "gpu" and idx.isdigit():
        return int(idx)
    raise ValueError(f"device must be 'cpu' or 'gpu:N', not {device!r}")


def nvidia_device_nodes(dev_dir: str = "/dev") -> list[str]:
    try:
        names = sorted(n for n in os.listdir(dev_dir) if n.startswith("nvidia"))
    except OSError:
        return []
    out: list[str] = []
    for n in names:
        p = os.path.join(dev_dir, n)
        if os.path.isdir(p):  # /dev/nvidia-caps holds the MIG capability nodes
            out.extend(os.path.join(p, c) for c in sorted(os.listdir(p)))
        else:
            out.append(p)
    return out


def sandbox_env(
    layout: RuntimeLayout, device: str, extra: Mapping[str, str] | None = None, *, job_dir: str = JOB_DIR
) -> dict[str, str]:
    """The whole environment of a worker (the daemon's own is never passed through)."""
    gpu = parse_device(device)
    venv_bin = os.path.dirname(os.path.abspath(layout.python))
    env = {
        "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": f"{job_dir}/.home",
        "KERAS_HOME": f"{job_dir}/.home/.keras",  # Keras writes keras.json on first import
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        # One thread per slot: the seed's MLP trains slower with 2 threads than 1 here
        # (docs/design.md appendix B.3); the worker also sets TF's own thread pools.
        "OMP_NUM_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",  # a slot holds only the GPU memory it uses
        # The same two for Keras on JAX ([offer] keras_backend = "jax"): no 75% preallocation
        # of the card, and one XLA CPU thread per slot.
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        # A CPU slot must not grab a GPU; a GPU slot sees exactly its own card.
        "CUDA_VISIBLE_DEVICES": "" if gpu is None else str(gpu),
    }
    if layout.pythonpath:
        env["PYTHONPATH"] = layout.pythonpath
    env.update(extra or {})
    return env


def build_bwrap_argv(
    command: Sequence[str],
    *,
    layout: RuntimeLayout,
    inputs_dir: Path,
    device: str = "cpu",
    env: Mapping[str, str],
    bwrap: str = "bwrap",
    scratch_bytes: int = 1 << 30,
    hide: Sequence[Path] = (),
    nvidia_nodes: Sequence[str] | None = None,
    disable_userns: bool = True,
    rw_binds: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The full bwrap command line for one worker. Pure apart from looking at what exists on the host.

    ``rw_binds``: (host directory, path inside) pairs bound writable: the only host paths a
    worker can write. The pool gives one to keras workers on JAX only (their compilation
    cache, :meth:`peerd.executor.pool.WorkerPool`), never to the workers that run
    submitters' code."""
    gpu = parse_device(device)
    argv = [
        bwrap,
        "--unshare-all",  # own net (only lo), pid, ipc, uts, cgroup and user namespaces
        "--unshare-user",
        *(["--disable-userns"] if disable_userns else []),  # no nested user namespaces for the task
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--hostname",
        "peerd-sandbox",
        "--clearenv",
    ]
    for k, v in sorted(env.items()):
        argv += ["--setenv", k, v]
    # The task's /tmp comes first: bwrap mounts in order, and a venv or checkout that lives
    # under the host's /tmp (CI clones, pytest's tmp_path) must be bound *on top of* it,
    # not hidden under it.
    argv += ["--size", str(scratch_bytes), "--tmpfs", "/tmp"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in TOP_LEVEL:
        host = "/" + name
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    for name in ETC_FILES:
        host = "/etc/" + name
        if os.path.lexists(host):
            argv += ["--ro-bind", host, host]
    for p in layout.ro_paths:
        if p == "/usr" or p.startswith("/usr/"):
            continue  # already there
        argv += ["--ro-bind", p, p]
    bound = ["/usr", *layout.ro_paths]
    for h in hide:
        hs = os.path.abspath(h)
        if not any(hs == b or hs.startswith(b.rstrip("/") + "/") for b in bound):
            continue  # not visible anyway
        if os.path.isdir(hs):
            argv += ["--tmpfs", hs]
        elif os.path.lexists(hs):
            argv += ["--ro-bind", "/dev/null", hs]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if gpu is not None:
        nodes = nvidia_device_nodes() if nvidia_nodes is None else list(nvidia_nodes)
        for node in nodes:
            argv += ["--dev-bind", node, node]
        for sysdir in ("/sys/bus/pci", "/sys/devices", "/sys/module/nvidia"):
            argv += ["--ro-bind-try", sysdir, sysdir]  # the CUDA driver reads PCI topology
    argv += ["--size", str(scratch_bytes), "--perms", "0700", "--tmpfs", JOB_DIR]
    argv += ["--ro-bind", str(inputs_dir), INPUTS_DIR]
    for host_dir, inside in rw_binds:
        argv += ["--bind", host_dir, inside]
    argv += ["--chdir", JOB_DIR, "--remount-ro", "/", "--", *command]
    return argv


_PROBE_SCRIPT = r"""
import json, os
r = {}
with open('/proc/net/dev') as f:
    r['ifaces'] = sorted(l.split(':')[0].strip() for l in f.readlines()[2:])
with open('/proc/self/status') as f:
    r['capeff'] = [l.split()[1] for l in f if l.startswith('CapEff')][0]
try:
    with open('/probe-write', 'w'):
        pass
    r['root_ro'] = False
except OSError:
    r['root_ro'] = True
with open('/proc/self/uid_map') as f:
    r['userns'] = f.read().split() != ['0', '0', '4294967295']
r['inputs'] = os.listdir('/job/inputs')
print(json.dumps(r))
"""

_probe_cache: dict[tuple[str, str], SandboxReport] = {}


def probe_sandbox(
    bwrap: str = "bwrap", *, python: str = sys.executable, refresh: bool = False
) -> SandboxReport:
    """Can bwrap run our sandbox here? Runs it once (~0.1 s) and caches the answer per binary.

    Also reports which cgroup caps exist (creating and removing a probe group).
    """
    key = (bwrap, python)
    if key in _probe_cache and not refresh:
        return _probe_cache[key]
    report = _probe_bwrap(bwrap, python)
    cg = detect_cgroups()
    cg.cleanup()
    report = report.with_cgroups(cg)
    _probe_cache[key] = report
    return report


def _probe_bwrap(bwrap: str, python: str) -> SandboxReport:
    path = shutil.which(bwrap)
    if path is None:
        return SandboxReport(
            False, reason=f"bubblewrap not found ({bwrap!r}); install the 'bubblewrap' package"
        )
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return SandboxReport(False, reason=f"cannot run {path}: {e}", bwrap=path)
    try:
        layout = runtime_layout(python)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return SandboxReport(
            False, reason=f"cannot inspect interpreter {python}: {e}", bwrap=path, version=version
        )
    notes: list[str] = []
    result = None
    disable_userns_ok = False
    with tempfile.TemporaryDirectory(prefix="peerd-probe-") as tmp:
        Path(tmp, "marker").write_bytes(b"x")
        for disable_userns in (True, False):
            argv = build_bwrap_argv(
                [python, "-S", "-c", _PROBE_SCRIPT],
                layout=layout,
                inputs_dir=Path(tmp),
                env=sandbox_env(layout, "cpu"),
                bwrap=path,
                scratch_bytes=16 << 20,
                disable_userns=disable_userns,
            )
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as e:
                return SandboxReport(
                    False, reason=f"bubblewrap failed to start: {e}", bwrap=path, version=version
                )
            if proc.returncode == 0:
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                disable_userns_ok = disable_userns
                if not disable_userns:
                    notes.append("--disable-userns unsupported: nested user namespaces not blocked")
                break
            err = proc.stderr.strip()[-500:]
        if result is None:
            return SandboxReport(
                False, reason=f"bubblewrap cannot create the sandbox: {err}", bwrap=path, version=version
            )
    netns = result["ifaces"] == ["lo"]
    caps = int(result["capeff"], 16) == 0
    reasons = []
    if not netns:
        reasons.append(f"network not isolated (interfaces {result['ifaces']})")
    if not caps:
        reasons.append(f"capabilities not dropped (CapEff {result['capeff']})")
    if not result["root_ro"]:
        reasons.append("sandbox root is writable")
    if result["inputs"] != ["marker"]:
        reasons.append("inputs bind not visible")
    return SandboxReport(
        available=not reasons,
        reason="; ".join(reasons),
        bwrap=path,
        version=version,
        userns=bool(result["userns"]),
        disable_userns=disable_userns_ok,
        netns=netns,
        caps_dropped=caps,
        notes=tuple(notes),
    )
