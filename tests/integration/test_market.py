"""The task market end to end on a real 3-daemon devnet (issue 3 items 1, 3, 5, 7, 9, 10).

Submit → bid → award → run in the sandbox → result, through peerctl and through RPC, for the
echo, sleep and python kinds; ``task.get``/``peerctl show`` shapes; ``task.explain`` against the
award rule recomputed here from the explained numbers; invalid specs; a task nobody can take;
cancelling mid-run (workers killed, capacity freed).

Node 0 submits and bids only for ``echo``, so ``sleep`` and ``python`` tasks always run on a
*remote* contractor (nodes 1 and 2): results, blobs and cancels cross the network. Every wait is
a bounded polling loop; nothing asserts on how long anything took. The helpers at the top are
shared with ``test_market_faults.py``.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import TestNet, wait_for  # the integration tier's shared fixtures

from peerd.rpc.client import RpcCallError, RpcClient
from protocol.allocation import Candidate, NetworkParams, choose

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ACCEPT = ["echo", "sleep", "python"]  # no keras kinds: no TensorFlow worker on this 2-core machine
#: Short market timings so losses and deadlines play out in seconds.
MARKET = {"lease_ttl_s": 3.0, "heartbeat_s": 0.5, "bid_window_ms": 200}
BASE: dict[str, dict[str, Any]] = {"offer": {"accept_kinds": ACCEPT}, "market": dict(MARKET)}
TERMINAL = ("done", "failed", "cancelled")
INVALID_PARAMS = -32602
CONFLICT = -32004


# --- helpers (also used by test_market_faults.py) -------------------------------------------------


def patch_config(net: TestNet, i: int, extra: dict[str, dict[str, Any]]) -> None:
    """Merge ``extra`` (per section) into node ``i``'s peerd.toml: one node differs from the rest."""
    path = net.node_dir(i) / "peerd.toml"
    cfg = tomllib.loads(path.read_text())
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)

    def value(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    path.write_text("".join(
        f"[{sec}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in kv.items()) + "\n" for sec, kv in cfg.items()
    ))


def start_net(
    factory: Callable[..., TestNet],
    overrides: dict[str, dict[str, Any]],
    per_node: dict[int, dict[str, dict[str, Any]]] | None = None,
    n: int = 3,
) -> TestNet:
    """A devnet of ``n`` daemons with ``overrides`` for all and ``per_node`` changes, all peered."""
    net = factory(n, overrides, start=False)
    for i, extra in (per_node or {}).items():
        patch_config(net, i, extra)
    net.start(0)
    net.wait_ready(0)
    for i in range(1, n):
        net.start(i)
    for i in range(1, n):
        net.wait_ready(i)
    assert net.wait_peers(n, timeout=60), "the devnet never saw every advert"
    return net


def submit(net: TestNet, i: int, spec: dict[str, Any]) -> str:
    return str(net.rpc(i, "task.submit", {"spec": spec})["task_id"])


def get(net: TestNet, i: int, task_id: str) -> dict[str, Any]:
    return dict(net.rpc(i, "task.get", {"task_id": task_id}))


def wait_task(
    net: TestNet,
    i: int,
    task_id: str,
    check: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 90.0,
) -> dict[str, Any]:
    """Poll ``task.get`` until ``check`` holds (bounded); returns that task object."""
    def probe() -> dict[str, Any] | None:
        task = get(net, i, task_id)
        return task if check(task) else None

    try:
        return wait_for(probe, f"task {task_id}: {what}", timeout=timeout, interval=0.1)
    except AssertionError:
        task = get(net, i, task_id)
        detail = f"task is {task['state']} ({task['reason']}); events {task['events']}"
        raise AssertionError(f"{what}: {detail}") from None


def wait_state(net: TestNet, i: int, task_id: str, state: str, timeout: float = 90.0) -> dict[str, Any]:
    return wait_task(net, i, task_id, lambda t: t["state"] == state, f"state {state}", timeout)


def wait_done(net: TestNet, i: int, task_id: str, timeout: float = 90.0) -> dict[str, Any]:
    task = wait_task(net, i, task_id, lambda t: t["state"] in TERMINAL, "a final state", timeout)
    assert task["state"] == "done", (task["state"], task["reason"], task["events"])
    return task


def read_blob(net: TestNet, i: int, sha256: str) -> bytes:
    out = b""
    for _ in range(10_000):  # bounded: 512 KiB per call
        chunk = net.rpc(i, "blob.read", {"sha256": sha256, "offset": len(out), "length": 512 * 1024})
        out += base64.b64decode(chunk["data_b64"])
        if chunk["eof"]:
            return out
    raise AssertionError("blob.read never reached the end")


def output(net: TestNet, i: int, task: dict[str, Any], name: str) -> bytes:
    refs = {o["name"]: o for o in task["result"]["outputs"]}
    assert name in refs, sorted(refs)
    data = read_blob(net, i, refs[name]["sha256"])
    assert len(data) == refs[name]["size"]
    return data


def node_of(net: TestNet, peer_id: str) -> int:
    ids = {v: k for k, v in net.ids().items()}
    assert peer_id in ids, f"{peer_id} is not a devnet node"
    return ids[peer_id]


def counters(net: TestNet, i: int) -> dict[str, int]:
    return net.counters(i)


def own_advert(net: TestNet, i: int) -> dict[str, Any]:
    advert = net.info(i)["advert"]
    assert advert is not None
    return dict(advert)


def peerctl(net: TestNet, i: int, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "peerd.ctl.main", "--socket", str(net.socket(i)), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False,
    )


def marker_procs(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


# --- the shared devnet of this module -------------------------------------------------------------


@pytest.fixture(scope="module")
def net(devnet_module: Callable[..., TestNet]) -> Iterator[TestNet]:
    # Node 0 (the submitter of every test here) runs only echo: sleep and python go remote.
    yield start_net(devnet_module, BASE, {0: {"offer": {"accept_kinds": ["echo"]}}})


# --- the happy paths ---------------------------------------------------------------------------------


def test_echo_through_peerctl_submit_wait_show_and_result(net: TestNet, tmp_path: Path) -> None:
    spec = tomllib.loads((EXAMPLES / "echo.toml").read_text())
    sub = peerctl(net, 0, "submit", str(EXAMPLES / "echo.toml"), "--wait", "--json")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    lines = [json.loads(line) for line in sub.stdout.splitlines() if line.strip()]
    task_id = lines[0]["task"]["task_id"]
    assert lines[-1]["method"] == "task.end"
    assert lines[-1]["params"]["task"]["state"] == "done"

    show = peerctl(net, 0, "show", task_id, "--json")
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    assert shown["state"] == "done"
    assert [s["index"] for s in shown["shards"]] == [0]
    assert shown["shards"][0]["peer_id"] in net.ids().values()

    out = tmp_path / "bundle"
    res = peerctl(net, 0, "result", task_id, "-o", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "outputs" / "shard-0" / "stdout").read_bytes() == spec["params"]["data"].encode()
    assert (out / "announce.msg").is_file() and (out / "award-0.msg").is_file()


def test_sleep_goes_running_then_done_with_the_shard_on_a_remote_peer(net: TestNet) -> None:
    task_id = submit(net, 0, {"kind": "sleep", "params": {"seconds": 2.5}, "deadline_s": 120})
    seen: list[str] = []
    with RpcClient(net.socket(0), timeout=30) as rpc:
        first = rpc.call("task.watch", {"task_id": task_id})
        seen.append(first["state"])
        for note in rpc.notifications(timeout=60):  # raises ConnectionLost after 60 s of silence
            if note.method == "task.event":
                seen.append(note.params["state"])
                assert isinstance(note.params["at"], float)
            if note.method == "task.end":
                seen.append(note.params["task"]["state"])
                break
    assert seen[-1] == "done", seen
    assert "running" in seen[:-1], seen
    task = get(net, 0, task_id)
    assert task["state"] == "done"
    assert [e["state"] for e in task["events"]][-2:] == ["running", "done"]
    (shard,) = task["shards"]
    assert shard["state"] == "done"
    # Node 0 does not bid for sleep: the shard ran on node 1 or 2.
    assert node_of(net, shard["peer_id"]) in (1, 2)
    assert task["result"]["metrics"]["shard-0.slept"] == 2.5


def test_python_wordcount_example_returns_counts_json(net: TestNet) -> None:
    sub = peerctl(net, 0, "submit", str(EXAMPLES / "python.toml"), "--json")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    task_id = json.loads(sub.stdout)["task_id"]
    task = wait_done(net, 0, task_id)
    (shard,) = task["shards"]
    assert node_of(net, shard["peer_id"]) in (1, 2)  # the script and its input crossed the network
    # The script counts the words of its own source (inputs.text = wordcount.py).
    text = (EXAMPLES / "wordcount.py").read_text()
    expected = collections.Counter(text.split()).most_common(10)
    got = json.loads(output(net, 0, task, "shard-0/counts.json"))
    assert [tuple(x) for x in got] == expected
    stdout = output(net, 0, task, "shard-0/stdout").decode()
    assert stdout.startswith(f"{len(text.split())} words")


def test_explain_lists_every_bid_and_its_choice_follows_the_rule(net: TestNet) -> None:
    ids = net.ids()
    c0 = {p["peer_id"]: p["c0"] for p in net.rpc(0, "peers.list")["peers"]}
    assert set(c0) == set(ids.values())
    # R between the largest C and the sum of all: no single node covers it, the three together do.
    r = (max(c0.values()) + sum(c0.values())) / 2
    deadline = 60.0
    spec = {"kind": "echo", "work": r * deadline, "deadline_s": deadline, "max_shards": 3,
            "bid_window_ms": 1500, "params": {"data": "many hands"}}
    task_id = submit(net, 0, spec)
    task = wait_done(net, 0, task_id)
    ex = net.rpc(0, "task.explain", {"task_id": task_id})

    assert ex["demand"] == pytest.approx(r)
    assert {b["peer_id"] for b in ex["bids"]} == set(ids.values()), "every node bids for echo"
    for b in ex["bids"]:
        assert set(b) >= {"peer_id", "c0", "load", "capacity", "cost", "chosen", "why"}
        # C = C⁰ + ΔC, or the submitter's cap on it (docs/allocation.md "Caps").
        uncapped = b["c0"] + b["delta_c"]
        assert b["capacity"] == pytest.approx(uncapped if b["cap"] is None else min(uncapped, b["cap"]))
        assert b["cost"] == pytest.approx(b["capacity"] * b["load"])
        assert b["why"].startswith("chosen" if b["chosen"] else "not chosen"), b["why"]
    p = ex["params"]
    dc_max = float("inf") if p["dc_max"] is None else p["dc_max"]
    again = choose(
        [Candidate(b["peer_id"], b["c0"], b["load"]) for b in ex["bids"]],
        demand=ex["demand"], max_shards=ex["max_shards"],
        params=NetworkParams(k=p["k"], dc_min=p["dc_min"], dc_max=dc_max),
        caps={b["peer_id"]: b["cap"] for b in ex["bids"] if b["cap"] is not None},
        task_id=task_id,
    )
    chosen = {b["peer_id"] for b in ex["bids"] if b["chosen"]}
    assert chosen == set(again.chosen)
    assert len(chosen) >= 2 and not again.under_capacity and ex["under_capacity"] is False
    assert ex["total_cost"] == pytest.approx(again.total_cost)
    # The award the daemons ran is that choice: one shard per chosen peer, shares ∝ C.
    assert {s["peer_id"] for s in task["shards"]} == chosen
    shares = dict(zip(again.chosen, again.shares, strict=True))
    for s in task["shards"]:
        assert s["share"] == pytest.approx(shares[s["peer_id"]])
        assert output(net, 0, task, f"shard-{s['index']}/stdout") == b"many hands"


# --- bad input ---------------------------------------------------------------------------------------


def _npz(path: Path, **arrays: Any) -> str:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


MODEL = json.dumps({"class_name": "Sequential", "config": {"name": "m", "layers": []}})

INVALID: list[tuple[str, Callable[[Path], dict[str, Any]], str]] = [
    ("unknown kind", lambda d: {"kind": "mine-bitcoin"}, "kind"),
    ("max_shards 0", lambda d: {"kind": "echo", "max_shards": 0}, "max_shards"),
    ("deadline 0", lambda d: {"kind": "echo", "deadline_s": 0}, "deadline_s"),
    ("unknown field", lambda d: {"kind": "echo", "priority": 9}, "priority"),
    ("sleep without seconds", lambda d: {"kind": "sleep"}, "params.seconds"),
    ("missing input file", lambda d: {"kind": "python", "inputs": {"script": str(d / "missing.py")}},
     "inputs.script"),
    ("relative input path", lambda d: {"kind": "python", "inputs": {"script": "wordcount.py"}},
     "inputs.script"),
    ("model config not JSON", lambda d: {"kind": "keras-train", "inputs": {"data": "/x.npz"},
                                         "params": {"model_config": "{oops"}}, "params.model_config"),
    ("model config not a model", lambda d: {"kind": "keras-train", "inputs": {"data": "/x.npz"},
                                            "params": {"model_config": "[1, 2, 3]"}}, "params.model_config"),
    ("bad optimizer", lambda d: {"kind": "keras-train", "inputs": {"data": "/x.npz"},
                                 "params": {"model_config": MODEL, "optimizer": "lion"}}, "params.optimizer"),
    ("training data without x", lambda d: {"kind": "keras-train", "params": {"model_config": MODEL},
                                           "inputs": {"data": _npz(d / "bad.npz", y=np.zeros(3))}},
     "inputs.data"),
    # These two passed the spec check and then failed when the daemon signed the announce:
    # the caller got -32603 (internal error) instead of a spec error naming the field.
    ("param name not a protocol name", lambda d: {"kind": "echo", "params": {"_data": "x"}},
     "params._data"),
    ("params beyond the announce size", lambda d: {"kind": "echo", "params": {"data": "x" * 70_000}},
     "params"),
    # Below the 64 KiB envelope limit but above the 60 KiB gossip cap: this one used to be
    # stored and bid on locally, and never published (Node.gossip swallowed the error).
    ("announce beyond the gossip cap", lambda d: {"kind": "echo", "params": {"data": "x" * 62_000}},
     "params"),
]


@pytest.mark.parametrize(("case", "make", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_an_invalid_spec_is_refused_naming_the_field(
    net: TestNet, tmp_path: Path, case: str, make: Callable[[Path], dict[str, Any]], field: str
) -> None:
    before = {t["task_id"] for t in net.rpc(0, "task.list")["tasks"]}
    with pytest.raises(RpcCallError) as err:
        submit(net, 0, make(tmp_path))
    assert err.value.code == INVALID_PARAMS, (case, err.value.code, err.value.message)
    assert f"{field}:" in err.value.message, (case, err.value.message)
    # Refused before anything was announced or stored.
    assert {t["task_id"] for t in net.rpc(0, "task.list")["tasks"]} == before


def test_a_spec_that_is_not_an_object_is_invalid_params(net: TestNet) -> None:
    with pytest.raises(RpcCallError) as err:
        net.rpc(0, "task.submit", {"spec": "echo please"})
    assert err.value.code == INVALID_PARAMS
    assert "spec" in err.value.message


@pytest.mark.parametrize(
    "resources",
    [{"gpu": True}, {"memory_mb": 1_000_000}],
    ids=["gpu on GPU-less peers", "more memory than any offer"],
)
def test_a_task_no_peer_can_take_stays_pending_then_fails_at_its_deadline(
    net: TestNet, resources: dict[str, Any]
) -> None:
    declined = {i: counters(net, i).get("bids.not_eligible", 0) for i in (0, 1, 2)}
    spec = {"kind": "echo", "deadline_s": 5, "resources": resources, "params": {"data": "x"}}
    task_id = submit(net, 0, spec)
    pending = wait_state(net, 0, task_id, "pending", timeout=30)
    assert pending["reason"] and "no eligible peer" in pending["reason"], pending["reason"]
    assert pending["shards"] == []
    failed = wait_task(net, 0, task_id, lambda t: t["state"] in TERMINAL, "the deadline", timeout=60)
    assert failed["state"] == "failed", failed["events"]
    assert failed["reason"] == "deadline"
    assert "no eligible peer" in failed["events"][-1]["message"], failed["events"][-1]
    assert failed["shards"] == [] and failed["result"] is None
    # Every daemon heard the announce and declined it for a reason of its own.
    for i in (0, 1, 2):
        assert counters(net, i).get("bids.not_eligible", 0) > declined[i], i
    assert net.rpc(0, "task.explain", {"task_id": task_id})["bids"] == []


# --- cancel -------------------------------------------------------------------------------------------


def test_cancel_mid_run_stops_the_shard_and_frees_capacity(net: TestNet) -> None:
    task_id = submit(net, 0, {"kind": "sleep", "params": {"seconds": 300}, "deadline_s": 600})
    task = wait_task(net, 0, task_id, lambda t: bool(t["shards"]) and t["shards"][0]["state"] == "running",
                     "its shard running")
    worker = node_of(net, task["shards"][0]["peer_id"])
    before = counters(net, worker)
    # While the sleep runs the contractor is busy, in its own advert and in the submitter's table.
    wait_for(lambda: own_advert(net, worker)["load"] > 0, "the contractor advertising its load")
    wait_for(lambda: net.peers(0)[net.peer_id(worker)]["offer"]["busy"] >= 1, "node 0 seeing it busy")

    assert net.rpc(0, "task.cancel", {"task_id": task_id})["state"] == "cancelled"

    wait_for(lambda: counters(net, worker).get("shards.cancelled", 0) > before.get("shards.cancelled", 0),
             "the contractor cancelling its shard", timeout=30)
    # Reclaim (seed step 5): the slot is free again and the next advert says so.
    wait_for(lambda: own_advert(net, worker)["load"] == 0 and own_advert(net, worker)["offer"]["busy"] == 0,
             "the contractor's load back to 0", timeout=30)
    wait_for(lambda: net.peers(0)[net.peer_id(worker)]["load"] == 0, "node 0 seeing the freed capacity",
             timeout=30)
    final = get(net, 0, task_id)
    assert final["state"] == "cancelled" and final["result"] is None
    # No job result was produced for it: the worker was killed, not allowed to finish.
    after = counters(net, worker)
    assert after.get("jobs.ok", 0) == before.get("jobs.ok", 0)
    # Cancelling again is a conflict that says how the task ended (docs/rpc.md).
    with pytest.raises(RpcCallError) as err:
        net.rpc(0, "task.cancel", {"task_id": task_id})
    assert err.value.code == CONFLICT and err.value.data == {"state": "cancelled"}
    # The contractor serves on.
    echo = submit(net, 0, {"kind": "echo", "params": {"data": "after cancel"}})
    assert output(net, 0, wait_done(net, 0, echo), "shard-0/stdout") == b"after cancel"


def _worker_ancestor(proc: psutil.Process) -> psutil.Process:
    for p in proc.parents():
        if "peerd.executor.worker" in " ".join(p.cmdline()):
            return p
    raise AssertionError(f"no peerd.executor.worker above {proc.pid}")


def test_cancel_kills_the_remote_worker_process(net: TestNet, tmp_path: Path) -> None:
    marker = f"cancel-me-{os.urandom(6).hex()}"
    script = tmp_path / "nap.py"
    script.write_text("import time\nwhile True:\n    time.sleep(1)\n")
    task_id = submit(net, 0, {"kind": "python", "deadline_s": 600, "inputs": {"script": str(script)},
                              "params": {"args": [marker]}})
    (script_proc,) = wait_for(lambda: marker_procs(marker), "the script running in its sandbox", timeout=60)
    worker = _worker_ancestor(script_proc)
    task = get(net, 0, task_id)
    contractor = node_of(net, task["shards"][0]["peer_id"])
    assert contractor in (1, 2)
    # The worker is a descendant of the contractor's daemon (its pool), not of node 0.
    assert net.pid(contractor) in {p.pid for p in worker.parents()}

    assert net.rpc(0, "task.cancel", {"task_id": task_id})["state"] == "cancelled"

    def gone(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: gone(worker) and gone(script_proc) and not marker_procs(marker),
             "the worker and the script killed", timeout=30)
    wait_for(lambda: own_advert(net, contractor)["load"] == 0, "the contractor idle again", timeout=30)
