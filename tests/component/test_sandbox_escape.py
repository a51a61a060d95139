"""Escape attempts from docs/design.md appendix B.2 and issue 3's fault list, each through real bwrap.

Every attack runs as a *trusted* ``python`` job — trust only lets code run at all; the sandbox and
caps apply the same. Each test checks the attack was stopped, reported with the right error, and
that the pool still runs a job afterwards with its load back at 0.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import trio

from peerd.executor import Job, JobResult, Limits, WorkerPool, probe_sandbox
from peerd.executor.kinds.python import STREAM_CAP

pytestmark = pytest.mark.skipif(not probe_sandbox().available, reason="bubblewrap sandbox unavailable here")

SMALL = Limits(
    memory_bytes=256 << 20, cpu_seconds=3, wall_seconds=60, max_processes=16, max_output_bytes=1 << 20
)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    # Stands in for the daemon's state dir: identity key beside the pool's work root.
    d = tmp_path / "state"
    d.mkdir()
    (d / "identity.key").write_bytes(b"SECRET-KEY-" + uuid.uuid4().hex.encode())
    (d / "identity.key").chmod(0o600)
    return d


@pytest.fixture
async def pool(state_dir: Path, nursery: trio.Nursery) -> AsyncIterator[WorkerPool]:
    p = WorkerPool(state_dir / "work", warm_classes=("light",), reuse_idle_seconds=5)
    await nursery.start(p.run)
    yield p


async def run_script(pool: WorkerPool, source: str, *, limits: Limits = SMALL, **kw: object) -> JobResult:
    params: dict[str, object] = {"script": source}
    if "args" in kw:
        params["args"] = kw.pop("args")
    inputs = kw.pop("inputs", {})
    assert not kw
    job = Job(uuid.uuid4().hex, "mallory", "python", params, inputs, limits, trusted=True)  # type: ignore[arg-type]
    return await pool.execute(job)


async def assert_healthy(pool: WorkerPool) -> None:
    res = await pool.execute(Job("after", "carol", "echo", {"data": "still here"}, {}, Limits()))
    assert res.ok, res
    assert res.outputs["stdout"] == b"still here"
    assert pool.load() == 0


def report(res: JobResult) -> dict[str, str]:
    assert res.ok, res
    parsed: dict[str, str] = json.loads(res.outputs["stdout"])
    return parsed


async def test_no_network(pool: WorkerPool) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX)
    abstract_name = "\0peerd-test-" + uuid.uuid4().hex
    abstract.bind(abstract_name)
    abstract.listen()
    abstract.setblocking(False)
    script = f"""
import json, socket
r = {{}}
try:
    socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), timeout=3)
    r["tcp"] = "connected"
except OSError as e:
    r["tcp"] = "denied: " + str(e)
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"leak", ("127.0.0.1", {udp.getsockname()[1]}))
    r["udp"] = "sent (into the sandbox's own loopback)"
except OSError as e:
    r["udp"] = "denied: " + str(e)
try:
    u = socket.socket(socket.AF_UNIX)
    u.connect({abstract_name!r})
    r["abstract"] = "connected"
except OSError as e:
    r["abstract"] = "denied: " + str(e)
try:
    socket.create_connection(("1.1.1.1", 53), timeout=3)
    r["internet"] = "connected"
except OSError as e:
    r["internet"] = "denied: " + str(e)
with open("/proc/net/dev") as f:
    r["ifaces"] = ",".join(sorted(l.split(":")[0].strip() for l in f.readlines()[2:]))
print(json.dumps(r))
"""
    r = report(await run_script(pool, script))
    assert r["tcp"].startswith("denied"), r
    assert r["abstract"].startswith("denied"), r
    assert r["internet"].startswith("denied"), r
    assert r["ifaces"] == "lo"
    # Nothing reached the host's listeners.
    with pytest.raises(BlockingIOError):
        tcp.accept()
    with pytest.raises(BlockingIOError):
        udp.recvfrom(100)
    with pytest.raises(BlockingIOError):
        abstract.accept()
    for s in (tcp, udp, abstract):
        s.close()
    await assert_healthy(pool)


async def test_cannot_write_outside_its_dir(pool: WorkerPool, state_dir: Path, tmp_path: Path) -> None:
    import peerd

    blob = tmp_path / "blob"
    blob.write_bytes(b"original")
    targets = [
        str(state_dir / "planted"),
        str(state_dir / "work" / "planted"),
        os.path.join(os.path.dirname(peerd.__file__), "planted.py"),
        os.path.join(os.path.realpath(os.sys.prefix), "planted"),  # type: ignore[attr-defined]
        "/usr/planted",
        "/planted",
        "/etc/planted",
        "/job/inputs/planted",
    ]
    script = f"""
import json, os
r = {{}}
for t in {targets!r}:
    try:
        with open(t, "w") as f:
            f.write("x")
        r[t] = "written"
    except OSError as e:
        r[t] = "denied: " + e.strerror
for mode in ("r+b", "ab"):
    try:
        with open("inputs/blob", mode) as f:
            f.write(b"tampered")
        r["blob " + mode] = "written"
    except OSError as e:
        r["blob " + mode] = "denied: " + e.strerror
try:
    os.chmod("inputs/blob", 0o666)
    r["chmod"] = "changed"
except OSError as e:
    r["chmod"] = "denied: " + e.strerror
try:
    os.unlink("inputs/blob")
    r["unlink"] = "removed"
except OSError as e:
    r["unlink"] = "denied: " + e.strerror
with open("scratch.txt", "w") as f:  # its own work dir is writable
    f.write("ok")
with open("/tmp/scratch.txt", "w") as f:
    f.write("ok")
r["own"] = "ok"
print(json.dumps(r))
"""
    r = report(await run_script(pool, script, inputs={"blob": blob}))
    assert r.pop("own") == "ok"
    for target, outcome in r.items():
        assert outcome.startswith("denied"), (target, outcome)
    for t in targets:
        assert not os.path.exists(t), t
    assert blob.read_bytes() == b"original"
    assert blob.stat().st_mode & 0o777 != 0o666
    await assert_healthy(pool)


async def test_cannot_read_the_daemon_key(pool: WorkerPool, state_dir: Path) -> None:
    key = state_dir / "identity.key"
    daemon_pid = os.getpid()
    script = f"""
import json, os
r = {{}}
for p in [{str(key)!r}, "/proc/1/root" + {str(key)!r}, "/proc/{daemon_pid}/root" + {str(key)!r},
          "/proc/{daemon_pid}/environ", "/root/.ssh/id_ed25519"]:
    try:
        with open(p, "rb") as f:
            r[p] = "read " + f.read(20).decode(errors="replace")
    except OSError as e:
        r[p] = "denied: " + (e.strerror or "")
r["state_listing"] = "visible" if os.path.exists({str(state_dir)!r}) else "absent"
r["pids"] = ",".join(sorted(p for p in os.listdir("/proc") if p.isdigit()))
print(json.dumps(r))
"""
    r = report(await run_script(pool, script))
    assert r.pop("state_listing") == "absent"
    pids = r.pop("pids").split(",")
    assert len(pids) <= 4, pids  # its own PID namespace: bwrap's init, the worker, the script
    for path, outcome in r.items():
        assert outcome.startswith("denied"), (path, outcome)
        assert "SECRET" not in outcome
    await assert_healthy(pool)


def _marker_procs(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            out.append(p)
    return out


async def test_fork_bomb_is_capped(pool: WorkerPool) -> None:
    marker = "forkbomb-" + uuid.uuid4().hex
    script = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    res = await run_script(pool, script, args=[marker])
    assert res.error in ("cpu_limit", "timeout"), res
    if "pids_peak" in res.metrics:  # the pids cgroup: never more processes than the cap
        assert res.metrics["pids_peak"] <= SMALL.max_processes
    assert _marker_procs(marker) == []
    await assert_healthy(pool)


async def test_memory_burner_is_killed(pool: WorkerPool) -> None:
    script = """
chunks = []
while True:
    chunks.append(b"x" * (16 << 20))
"""
    res = await run_script(pool, script)
    assert res.error == "memory_limit", res
    await assert_healthy(pool)


async def test_cpu_burner_is_stopped(pool: WorkerPool) -> None:
    res = await run_script(pool, "while True:\n    pass\n")
    assert res.error == "cpu_limit", res
    await assert_healthy(pool)


async def test_endless_sleeper_hits_the_deadline(pool: WorkerPool) -> None:
    marker = "sleeper-" + uuid.uuid4().hex
    limits = Limits(wall_seconds=1.5, cpu_seconds=30)
    res = await run_script(
        pool, "import time\nwhile True:\n    time.sleep(1)\n", limits=limits, args=[marker]
    )
    assert res.error == "timeout", res
    assert _marker_procs(marker) == []
    await assert_healthy(pool)


async def test_stdout_flood_is_bounded(pool: WorkerPool) -> None:
    script = """
import sys
block = b"A" * (1 << 20)
for _ in range(48):
    sys.stdout.buffer.write(block)
    sys.stderr.buffer.write(block[:1 << 16])
"""
    limits = Limits(max_output_bytes=8 << 20, wall_seconds=60)
    res = await run_script(pool, script, limits=limits)
    assert res.ok, res
    assert len(res.outputs["stdout"]) == STREAM_CAP
    assert res.metrics["stdout_dropped_bytes"] == 48 * (1 << 20) - STREAM_CAP
    assert len(res.outputs["stderr"]) <= STREAM_CAP
    await assert_healthy(pool)


async def test_huge_output_file_is_refused(pool: WorkerPool) -> None:
    one_big = (
        "import os\nos.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/big', 'wb').write(b'x' * (8 << 20))\n"
    )
    res = await run_script(pool, one_big)
    assert res.error == "output_limit", res
    many = (
        "import os\nos.makedirs('outputs', exist_ok=True)\n"
        "for i in range(4):\n    open(f'outputs/part{i}', 'wb').write(b'x' * (512 << 10))\n"
    )
    res = await run_script(pool, many)
    assert res.error == "output_limit", res
    await assert_healthy(pool)


async def test_python_outputs_and_inputs(pool: WorkerPool, tmp_path: Path) -> None:
    data = tmp_path / "numbers.txt"
    data.write_text("1 2 3 4\n")
    script = tmp_path / "sum.py"
    script.write_text(
        "import os, sys\n"
        "total = sum(int(x) for x in open('inputs/numbers.txt').read().split())\n"
        "os.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/total.txt', 'w').write(str(total * int(sys.argv[1])))\n"
        "print('done')\n"
    )
    res = await run_script(pool, "main.py", inputs={"main.py": script, "numbers.txt": data}, args=["10"])
    assert res.ok, res
    assert res.outputs["total.txt"] == b"100"
    assert res.outputs["stdout"] == b"done\n"
    failing = await run_script(pool, "raise SystemExit('bad input')")
    assert failing.error == "task_error"
    assert "bad input" in failing.detail


async def test_leftover_process_does_not_hold_the_job(pool: WorkerPool) -> None:
    # The script daemonizes a child that keeps writing to the inherited stdout, then exits: the job
    # ends with the script, and reclaim kills the leftover with the rest of the sandbox.
    marker = "orphan-" + uuid.uuid4().hex
    script = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    while True:
        sys.stdout.write("still alive\\n")
        sys.stdout.flush()
        time.sleep(0.01)
print("parent done")
"""
    res = await run_script(pool, script, args=[marker])
    assert res.ok, res
    assert res.outputs["stdout"].startswith(b"parent done") or b"parent done" in res.outputs["stdout"]
    assert _marker_procs(marker) == []
    await assert_healthy(pool)


async def test_memory_cap_without_cgroups(
    state_dir: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hosts without a writable memory cgroup: RSS polling by the pool (and RLIMIT_AS >= 4 GiB as a
    # backstop) must still stop a burner. The burner is paced so the host never sees more than
    # a few hundred MiB of it between two polls.
    import peerd.executor.pool as pool_mod
    from peerd.executor.limits import CgroupSupport

    monkeypatch.setattr(pool_mod, "detect_cgroups", lambda: CgroupSupport("none"))
    pool = WorkerPool(state_dir / "work", warm_classes=("light",))
    await nursery.start(pool.run)
    assert pool.sandbox_report.memory_cap == "rlimit-as+rss-poll"
    script = """
import time
chunks = []
while True:
    chunks.append(b"x" * (8 << 20))
    time.sleep(0.02)
"""
    res = await run_script(pool, script)
    assert res.error == "memory_limit", res
    await assert_healthy(pool)
