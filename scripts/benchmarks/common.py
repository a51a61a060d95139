"""Shared by every benchmark area: results, tables, machine facts, devnets, percentiles."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


# --- results --------------------------------------------------------------------------------


@dataclass
class Check:
    """One figure against its budget. ``met`` is None when there is no budget or no figure."""

    what: str
    value: str
    budget: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "-"}[self.met]


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |"]
        out.append("| " + " | ".join("---" for _ in self.columns) + " |")
        for row in self.rows:
            out.append("| " + " | ".join(fmt(v) for v in row) + " |")
        return "\n".join(out)

    def text(self) -> str:
        cells = [self.columns] + [[fmt(v) for v in r] for r in self.rows]
        widths = [max(len(str(r[i])) for r in cells) for i in range(len(self.columns))]
        lines = [self.title]
        for n, r in enumerate(cells):
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
            if n == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)


@dataclass
class AreaResult:
    area: str
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def budget_le(what: str, value: float, limit: float, unit: str) -> Check:
    ok = None if value != value else value <= limit
    return Check(what, f"{fmt(value)} {unit}", f"≤ {limit:g} {unit}", ok)


def budget_ge(what: str, value: float, limit: float, unit: str) -> Check:
    ok = None if value != value else value >= limit
    return Check(what, f"{fmt(value)} {unit}", f"≥ {limit:g} {unit}", ok)


def budget_lt(what: str, value: float, limit: float, unit: str) -> Check:
    ok = None if value != value else value < limit
    return Check(what, f"{fmt(value)} {unit}", f"< {limit:g} {unit}", ok)


# --- the machine ----------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _git(*args: str) -> str:
    # Read-only git queries: which commit was measured, and whether the tree had changes.
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, str]:
    import psutil

    load1, load5, _ = os.getloadavg()
    commit = _git("rev-parse", "--short", "HEAD") or "?"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": f"{load1:.2f} / {load5:.2f} (1 / 5 min at start)",
        "commit": commit,
    }


def loadavg() -> float:
    return os.getloadavg()[0]


def wait_quiet(*, busy_cores: float = 0.6, least_s: float = 3.0, most_s: float = 120.0) -> float:
    """Wait until the machine's CPU use over one second falls below ``busy_cores`` (a fresh
    devnet's daemons are still importing TensorFlow for their warm workers: ~4-5 s of CPU
    each, so 8 daemons keep 2 cores busy for ~20 s), at least ``least_s`` and at most
    ``most_s`` seconds (a machine busy with other work is measured as it is). Returns the
    seconds waited."""
    import psutil

    t0 = time.monotonic()
    time.sleep(least_s)
    cores = os.cpu_count() or 1
    while time.monotonic() - t0 < most_s:
        if psutil.cpu_percent(interval=1.0) / 100 * cores < busy_cores:
            break
    return time.monotonic() - t0


# --- devnets --------------------------------------------------------------------------------


def bench_dir(name: str) -> Path:
    """A short private directory: Unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=f"pb-{name}-", dir="/tmp"))


@contextlib.contextmanager
def devnet(
    name: str,
    n: int,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    per_node: dict[int, dict[str, dict[str, Any]]] | None = None,
    keep: bool = False,
    peers_timeout: float = 90.0,
    wan: Any = None,
    natted: Sequence[int] = (),
) -> Iterator[Any]:
    """N daemons on loopback (peerd.devnet), every peer table full before yielding; always torn
    down. Its directory (configs, logs, stores) is removed afterwards unless ``keep`` or
    ``PEERD_BENCH_KEEP=1``, or the run failed: a failed run's logs are what explains it.

    ``natted``: nodes that stand for machines behind NATs (docs/design.md §10.7): they listen on
    no address and are reached through node 0, which then serves as a circuit relay."""
    from peerd.devnet import Devnet

    d = bench_dir(name)
    net = Devnet(d)
    keep = keep or os.environ.get("PEERD_BENCH_KEEP") == "1"
    try:
        if per_node or natted:
            # Devnet.up() gives every node the same overrides; start them by hand instead.
            net.configure(n, overrides, wan)
            if wan is not None:  # an emulated WAN (peerd/wanlink.py) runs before the daemons
                net.start_wan()
            for i, extra in (per_node or {}).items():
                _override_node(net.node_dir(i) / "peerd.toml", extra)
            if natted:
                import tomllib

                _override_node(net.node_dir(0) / "peerd.toml", {"network": {"relay_service": True}})
            for i in natted:
                path = net.node_dir(i) / "peerd.toml"
                relay = tomllib.loads(path.read_text())["network"]["bootstrap"]  # node 0
                _override_node(path, {"network": {"listen": [], "announce": [], "relays": relay}})
            net.start(0)
            net.wait_ready(0)
            for i in range(1, n):
                net.start(i)
            for i in range(1, n):
                net.wait_ready(i)
        else:
            net.up(n, overrides, wan=wan)
        if not net.wait_peers(n, peers_timeout):
            raise RuntimeError(
                f"{n}-daemon devnet: peer tables not full after {peers_timeout:.0f} s (logs in {d})"
            )
        yield net
    except BaseException:
        keep = True
        raise
    finally:
        net.down()
        if not keep:
            shutil.rmtree(d, ignore_errors=True)
        else:
            log(f"kept {d}")


def watch_to_end(socket: Path, task_id: str, timeout: float) -> dict[str, Any] | None:
    """Follow a task with ``task.watch`` on a daemon's socket; the task as it ended, or None
    if the watch closed first."""
    from peerd.rpc.client import RpcClient

    with RpcClient(socket, timeout=timeout) as w:
        for note in w.subscribe("task.watch", {"task_id": task_id}):
            if note.method == "task.end":
                return dict(note.params["task"])
    return None


def run_to_end(socket: Path, spec: dict[str, Any], timeout: float) -> tuple[str, dict[str, Any]]:
    """Submit ``spec`` at a daemon and follow it to its end; (task id, the ended task).
    RuntimeError unless it is done."""
    from peerd.rpc.client import RpcClient

    with RpcClient(socket) as rpc:
        tid = str(rpc.call("task.submit", {"spec": spec})["task_id"])
    end = watch_to_end(socket, tid, timeout)
    if end is None or end["state"] != "done":
        raise RuntimeError(f"task {tid} ended {end and end['state']}: {end and end.get('reason')}")
    return tid, end


def award_to_done(end: dict[str, Any]) -> float:
    """Seconds from the award (running) to done, by the submitter's event stamps."""
    at = {e["state"]: float(e["at"]) for e in end["events"]}
    return at["done"] - at["running"]


def _override_node(path: Path, extra: dict[str, dict[str, Any]]) -> None:
    import tomllib

    from peerd.devnet import _toml_value

    sections = tomllib.loads(path.read_text())
    for sec, kv in extra.items():
        sections.setdefault(sec, {}).update(kv)
    path.write_text(
        "\n".join(
            f"[{sec}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in kv.items())
            for sec, kv in sections.items()
        )
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
