"""Bad input and faults of the task market, on real daemons (issue 3, "Bad input and faults").

* forged, replayed and absurd bids from a hostile libp2p peer on ``/peerd/bid/2.0.0``;
* tasks that try to escape the sandbox, submitted through the daemon as trusted ``python``;
* the awarded peer killed mid-task (re-award), the submitter restarted mid-task;
* a ``python`` task from a submitter nobody trusts.

Each test waits with bounded polling loops and never asserts on durations.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TestNet, wait_for
from hostile import (
    ADVERTS,
    HostilePeer,
    advert,
    bid,
    flip_signature_bit,
    pack_payload,
    seal,
    sign_envelope,
    wire,
)
from test_market import (
    BASE,
    ROOT,
    TERMINAL,
    marker_procs,
    node_of,
    output,
    start_net,
    submit,
    wait_done,
    wait_state,
    wait_task,
)

from protocol import codec

# --- one contractor with tight sandbox limits -------------------------------------------------------

#: Small caps so each attack hits its limit in seconds (the daemon's [limits] section). The wall
#: cap leaves a CPU burner room to reach its 3 CPU seconds first on a loaded machine: at 8 s it
#: got too few of them at load ~15 and ended on "timeout" instead of "cpu_limit".
LIMITS = {"memory_mb": 256, "cpu_seconds": 3, "wall_seconds": 20, "max_processes": 16, "max_output_mb": 4}
#: What a task asks for: within the 256 MiB cap, or nobody would bid.
SMALL = {"memory_mb": 64}
CONTRACTOR = 1


@pytest.fixture(scope="module")
def net(devnet_module: Callable[..., TestNet]) -> Iterator[TestNet]:
    # Only node 1 runs echo and python: every attack lands on it, and the echo after it proves
    # that the very daemon that ran the attack still serves.
    only_sleep = {"offer": {"accept_kinds": ["sleep"]}}
    yield start_net(devnet_module, {**BASE, "limits": LIMITS}, {0: only_sleep, 2: only_sleep})


def run_script(net: TestNet, tmp_path: Path, source: str, *args: str) -> dict[str, Any]:
    """Submit ``source`` as a python task from node 0; returns the finished task."""
    script = tmp_path / f"attack-{os.urandom(4).hex()}.py"
    script.write_text(source)
    task_id = submit(net, 0, {"kind": "python", "deadline_s": 120, "resources": SMALL,
                              "inputs": {"script": str(script)}, "params": {"args": list(args)}})
    task = wait_task(net, 0, task_id, lambda t: t["state"] in TERMINAL, "the attack to end", timeout=120)
    assert [node_of(net, s["peer_id"]) for s in task["shards"]] == [CONTRACTOR]
    return task


def assert_still_serving(net: TestNet, pid: int | None) -> None:
    """The contractor daemon is the same process and runs the next task."""
    assert pid is not None and net.pid(CONTRACTOR) == pid, "the contractor daemon died"
    data = f"still here {os.urandom(4).hex()}"
    task = wait_done(net, 0, submit(net, 0, {"kind": "echo", "resources": SMALL, "params": {"data": data}}))
    assert [node_of(net, s["peer_id"]) for s in task["shards"]] == [CONTRACTOR]
    assert output(net, 0, task, "shard-0/stdout") == data.encode()
    wait_for(lambda: net.info(CONTRACTOR)["advert"]["load"] == 0, "the contractor idle again", timeout=30)


def test_escape_attempts_are_denied_and_reported(net: TestNet, tmp_path: Path) -> None:
    pid = net.pid(CONTRACTOR)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    keys = [str(net.node_dir(i) / "state" / "identity.key") for i in range(3)]
    pids = [net.pid(i) for i in range(3)]
    keys += [f"/proc/{p}/root{k}" for p, k in zip(pids, keys, strict=True)]
    targets = [str(net.node_dir(i) / "state" / "planted") for i in range(3)]
    targets += [str(net.node_dir(i) / "planted") for i in range(3)]
    targets += [str(ROOT / "peerd" / "planted.py"), "/usr/planted", "/etc/planted", "/planted"]
    script = f"""
import json, socket
r = {{}}
try:
    socket.create_connection(("127.0.0.1", {listener.getsockname()[1]}), timeout=3)
    r["tcp"] = "connected"
except OSError as e:
    r["tcp"] = "denied: " + str(e)
for i, k in enumerate({keys!r}):
    try:
        r["read " + k] = "read " + open(k, "rb").read().hex()
    except OSError as e:
        r["read " + k] = "denied: " + (e.strerror or "")
for t in {targets!r}:
    try:
        with open(t, "w") as f:
            f.write("x")
        r["write " + t] = "written"
    except OSError as e:
        r["write " + t] = "denied: " + (e.strerror or "")
print(json.dumps(r))
"""
    try:
        task = run_script(net, tmp_path, script)
        assert task["state"] == "done", (task["reason"], task["events"])
        report = json.loads(output(net, 0, task, "shard-0/stdout"))
        assert len(report) == 1 + len(keys) + len(targets)
        for what, outcome in report.items():
            assert outcome.startswith("denied"), (what, outcome)
        # Nothing reached the host: no connection queued, no file planted, no key leaked.
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    planted = [t for t in targets if os.path.exists(t)]
    for t in planted:  # do not leave an escaped write behind in the checkout or the system
        os.unlink(t)
    assert planted == []
    secrets = {(net.node_dir(i) / "state" / "identity.key").read_bytes().hex() for i in range(3)}
    assert not any(s in json.dumps(report) for s in secrets)
    assert_still_serving(net, pid)


ATTACKS = {
    "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                  ("cpu_limit", "timeout")),
    "memory burner": ("chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n", ("memory_limit",)),
    "cpu burner": ("while True:\n    pass\n", ("cpu_limit",)),
    "endless sleeper": ("import time\nwhile True:\n    time.sleep(1)\n", ("timeout",)),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_runaway_task_is_stopped_with_its_limit_as_the_reason(
    net: TestNet, tmp_path: Path, name: str
) -> None:
    pid = net.pid(CONTRACTOR)
    source, reasons = ATTACKS[name]
    marker = f"attack-{os.urandom(6).hex()}"
    task = run_script(net, tmp_path, source, marker)
    assert task["state"] == "failed", (task["state"], task["events"])
    assert task["reason"] in reasons, (task["reason"], task["events"][-1])
    assert task["events"][-1]["message"].startswith("shard 0 failed on"), task["events"][-1]
    assert task["result"] is None
    # Every process of the sandbox is gone (the worker's whole tree was killed).
    wait_for(lambda: not marker_procs(marker), f"no process of the {name} left", timeout=30)
    assert_still_serving(net, pid)


def test_a_stdout_flood_is_cut_at_the_stream_cap(net: TestNet, tmp_path: Path) -> None:
    pid = net.pid(CONTRACTOR)
    flood = "import sys\nblock = b'A' * (1 << 20)\nfor _ in range(48):\n    sys.stdout.buffer.write(block)\n"
    task = run_script(net, tmp_path, flood)
    assert task["state"] == "done", (task["reason"], task["events"])
    kept = output(net, 0, task, "shard-0/stdout")
    assert kept == b"A" * len(kept) and len(kept) == 1 << 20
    assert task["result"]["metrics"]["shard-0.stdout_dropped_bytes"] == 48 * (1 << 20) - len(kept)
    assert_still_serving(net, pid)


# --- forged, replayed and absurd bids ---------------------------------------------------------------


async def rpc(net: TestNet, i: int, method: str, params: dict[str, Any] | None = None) -> Any:
    return await trio.to_thread.run_sync(lambda: net.rpc(i, method, params or {}))


async def send_bid(peer: HostilePeer, submitter: str, raw: bytes) -> dict[str, Any]:
    """One ``/peerd/bid/2.0.0`` exchange (SPEC §8.2): one bid frame out, one reply frame back."""
    stream = await peer.open_bid_stream(submitter)
    try:
        await stream.send(raw)
        with trio.fail_after(15):
            reply = codec.unpack(await stream.receive())
    finally:
        await stream.aclose()
    assert isinstance(reply, dict) and set(reply) == {"ok", "reason"}, reply
    return reply


def absurd_bid(seed: bytes, task_id: str, **fields: Any) -> bytes:
    """A bid with out-of-range fields, canonically encoded and correctly signed by ``seed``:
    the constructors refuse to build it, a malicious peer would not."""
    payload = pack_payload(wire(bid(task_id), **fields))
    return sign_envelope(seed, payload, kind="bid")


async def test_forged_replayed_and_absurd_bids_are_refused_and_never_awarded(net: TestNet) -> None:
    submitter = net.peer_id(0)
    honest = net.peer_id(CONTRACTOR)
    before = await trio.to_thread.run_sync(net.counters, 0)
    async with HostilePeer.joined(net, 0) as evil, HostilePeer.joined(net, 0) as silent:
        other = HostilePeer()  # a second key, never connected: its bids arrive on evil's stream
        # A long bid window: every bid below arrives inside it (checked), so none is "too late".
        # The window closes early once every peer whose advert offers echo has bid (SPEC §8.2):
        # a peer that advertises echo and never bids keeps it open its whole length.
        await silent.publish(ADVERTS, seal(silent.seed, advert()))
        with trio.fail_after(30):
            while silent.peer_id not in await HostilePeer.peers(net, 0):
                await trio.sleep(0.1)
        spec = {"kind": "echo", "bid_window_ms": 8000, "resources": SMALL, "params": {"data": "honest work"}}
        task_id = (await rpc(net, 0, "task.submit", {"spec": spec}))["task_id"]

        # A well-formed bid from the hostile peer itself: accepted like anyone's, but expensive
        # (load 900), so it loses to the idle honest bidder.
        real = seal(evil.seed, bid(task_id, c0=5.0, load=900.0))
        assert await send_bid(evil, submitter, real) == {"ok": True, "reason": ""}

        refused: dict[str, tuple[bytes, str, str]] = {
            # name: (envelope, expected reply reason, expected drop counter on the submitter)
            "replayed (same bytes)": (real, "invalid bid", "dropped.duplicate"),
            "replayed (older sequence)": (seal(evil.seed, bid(task_id, seq=1, c0=5.0, load=900.0)),
                                          "invalid bid", "dropped.replayed"),
            "bad signature": (flip_signature_bit(seal(evil.seed, bid(task_id, c0=500.0))),
                              "invalid bid", "dropped.bad_signature"),
            "signed by another key": (seal(other.seed, bid(task_id, c0=500.0)), "invalid bid",
                                      "dropped.signer_mismatch"),
            "negative c0": (absurd_bid(evil.seed, task_id, c0=-100.0), "invalid bid", "dropped.absurd"),
            "huge c0": (absurd_bid(evil.seed, task_id, c0=1e300), "invalid bid", "dropped.absurd"),
            "negative load": (absurd_bid(evil.seed, task_id, load=-1.0), "invalid bid", "dropped.absurd"),
            "unknown task": (seal(evil.seed, bid(os.urandom(16).hex(), c0=500.0)), "unknown task",
                             "bids.unknown_task"),
        }
        expected_drops: dict[str, int] = {}
        for name, (raw, reason, counter) in refused.items():
            reply = await send_bid(evil, submitter, raw)
            assert reply == {"ok": False, "reason": reason}, (name, reply)
            expected_drops[counter] = expected_drops.get(counter, 0) + 1
        task = await rpc(net, 0, "task.get", {"task_id": task_id})
        assert task["state"] == "bidding", "the bids above must all arrive inside the bid window"

        after = await trio.to_thread.run_sync(net.counters, 0)
        for counter, n in expected_drops.items():
            assert after.get(counter, 0) - before.get(counter, 0) == n, (counter, before, after)

        with trio.fail_after(90):
            while (await rpc(net, 0, "task.get", {"task_id": task_id}))["state"] not in TERMINAL:
                await trio.sleep(0.2)
    task = await rpc(net, 0, "task.get", {"task_id": task_id})
    assert task["state"] == "done", task["events"]
    assert [s["peer_id"] for s in task["shards"]] == [honest]
    explained = await rpc(net, 0, "task.explain", {"task_id": task_id})
    by_peer = {b["peer_id"]: b for b in explained["bids"]}
    # The award lists the honest bid and the hostile peer's one valid bid, nothing forged.
    assert set(by_peer) == {honest, evil.peer_id}, sorted(by_peer)
    assert other.peer_id not in by_peer
    assert (by_peer[evil.peer_id]["c0"], by_peer[evil.peer_id]["load"]) == (5.0, 900.0)
    assert not by_peer[evil.peer_id]["chosen"] and by_peer[honest]["chosen"]


# --- the awarded peer dies, the submitter restarts ---------------------------------------------------

#: Node 0 submits and runs no sleep tasks, so the shard is always on node 1 or 2.
SUBMITTER_NO_SLEEP = {0: {"offer": {"accept_kinds": ["echo"]}}}


@pytest.mark.slow
def test_the_awarded_peer_killed_mid_task_is_replaced_and_the_task_completes(
    devnet: Callable[..., TestNet],
) -> None:
    net = start_net(devnet, BASE, SUBMITTER_NO_SLEEP)
    task_id = submit(net, 0, {"kind": "sleep", "params": {"seconds": 6}, "deadline_s": 180})
    running = wait_task(net, 0, task_id, lambda t: bool(t["shards"]) and t["shards"][0]["state"] == "running",
                        "its shard running")
    victim_id = running["shards"][0]["peer_id"]
    victim = node_of(net, victim_id)
    survivor = 3 - victim  # the other of nodes 1 and 2
    assert net.kill(victim) == -signal.SIGKILL

    task = wait_done(net, 0, task_id, timeout=120)
    (shard,) = task["shards"]
    assert shard["peer_id"] == net.peer_id(survivor)
    assert shard["attempts"] == 2 and shard["epoch"] == 1
    messages = [e["message"] for e in task["events"]]
    assert any("lease lost by" in m and victim_id[-8:] in m and "re-awarded" in m for m in messages), messages
    assert task["result"]["metrics"]["shard-0.slept"] == 6.0
    # Exactly one loss: the new holder was not itself presumed dead before its first heartbeat.
    assert net.counters(0).get("tasks.reawarded", 0) == 1
    # The survivor checked the re-award exactly (it holds epoch 0) and accepted it.
    assert net.counters(survivor).get("dropped.bad_award", 0) == 0
    explained = net.rpc(0, "task.explain", {"task_id": task_id})
    lost = next(b for b in explained["bids"] if b["peer_id"] == victim_id)
    assert "lease lost" in lost["why"]


#: The restart tests are about what survives a restart, not about how fast a lease expires: a
#: restarted daemon must reconnect and re-deliver within one lease TTL, which BASE's 3 s leaves
#: too little room for on a loaded 2-core machine (a spurious re-award then fails the test).
RESTART_MARKET = {**BASE, "market": {**BASE["market"], "lease_ttl_s": 10.0}}

RESTARTS = {
    "SIGKILL, back at once": (signal.SIGKILL, False),
    "SIGTERM, back at once": (signal.SIGTERM, False),
    # The worker finishes while the submitter is down: its result waits for the restart.
    "SIGKILL, back after the shard finished": (signal.SIGKILL, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESTARTS))
def test_the_submitter_restarted_mid_task_still_completes_it(
    devnet: Callable[..., TestNet], case: str
) -> None:
    sig, after_finish = RESTARTS[case]
    net = start_net(devnet, RESTART_MARKET, SUBMITTER_NO_SLEEP)
    task_id = submit(net, 0, {"kind": "sleep", "params": {"seconds": 5}, "deadline_s": 180})
    running = wait_task(net, 0, task_id, lambda t: bool(t["shards"]) and t["shards"][0]["state"] == "running",
                        "its shard running")
    holder = running["shards"][0]["peer_id"]
    worker = node_of(net, holder)
    jobs_ok = net.counters(worker).get("jobs.ok", 0)
    if sig == signal.SIGKILL:
        assert net.kill(0) == -signal.SIGKILL
    else:
        assert net.terminate(0)[0] == 0
    if after_finish:
        wait_for(lambda: net.counters(worker).get("jobs.ok", 0) > jobs_ok, "the shard finished meanwhile",
                 timeout=60)
    net.start(0)
    net.wait_ready(0)

    task = wait_done(net, 0, task_id, timeout=150)
    assert any(e["message"] == "submitter restarted; resuming" for e in task["events"]), task["events"]
    assert task["result"]["metrics"]["shard-0.slept"] == 5.0
    assert task["shards"][0]["state"] == "done"
    # The signed result is in the restarted submitter's store: the bundle carries it.
    files = {f["name"] for f in net.rpc(0, "task.bundle", {"task_id": task_id})["files"]}
    assert any(f.startswith("round-1/result-0") for f in files), sorted(files)
    assert net.counters(worker).get("results.undelivered", 0) == 0
    if after_finish:
        # The holder that finished while nobody listened was not presumed lost: it re-published
        # its final lease and retried delivery within the TTL, so no work was done twice.
        assert task["shards"][0]["peer_id"] == holder
        assert net.counters(0).get("tasks.reawarded", 0) == 0
        assert "award-1.msg" not in files, sorted(files)


@pytest.mark.slow
def test_a_worker_restarted_after_finishing_still_delivers_its_stored_result(
    devnet: Callable[..., TestNet],
) -> None:
    # Issue 3 item 8: "a restarted worker peer does not lose an acknowledged result". The
    # submitter is down while the shard finishes, so the result can only live in the worker's
    # store; then the worker itself is killed -9 and both come back.
    net = start_net(devnet, RESTART_MARKET, SUBMITTER_NO_SLEEP)
    task_id = submit(net, 0, {"kind": "sleep", "params": {"seconds": 3}, "deadline_s": 180})
    running = wait_task(net, 0, task_id, lambda t: bool(t["shards"]) and t["shards"][0]["state"] == "running",
                        "its shard running")
    holder = running["shards"][0]["peer_id"]
    worker = node_of(net, holder)
    jobs_ok = net.counters(worker).get("jobs.ok", 0)
    assert net.kill(0) == -signal.SIGKILL
    wait_for(lambda: net.counters(worker).get("jobs.ok", 0) > jobs_ok, "the shard finished", timeout=60)
    assert net.kill(worker) == -signal.SIGKILL
    net.start(worker)
    net.wait_ready(worker)
    net.start(0)
    net.wait_ready(0)

    task = wait_done(net, 0, task_id, timeout=150)
    assert task["shards"][0]["peer_id"] == holder
    assert task["result"]["metrics"]["shard-0.slept"] == 3.0
    # Delivered from the worker's store after its restart; the sleep did not run again anywhere.
    # The submitter is done once it stored the result, before its acknowledgement reaches the
    # worker, so the worker's count is waited for (bounded), not read at once.
    wait_for(lambda: net.counters(worker).get("results.delivered", 0) >= 1,
             "the worker counts its result acknowledged", timeout=60)
    assert net.counters(worker).get("jobs.started", 0) == 0
    assert net.counters(survivor_of(worker)).get("jobs.started", 0) == 0


def survivor_of(worker: int) -> int:
    return 3 - worker  # nodes 1 and 2 are the contractors


# --- untrusted code ------------------------------------------------------------------------------------


def test_python_from_an_untrusted_submitter_is_not_run(
    devnet: Callable[..., TestNet], tmp_path: Path
) -> None:
    # Nobody trusts anybody; node 0 (which would trust itself) does not offer python at all.
    net = start_net(devnet, {**BASE, "policy": {"trusted_submitters": []}},
                    {0: {"offer": {"accept_kinds": ["echo"]}}})
    declined = {i: net.counters(i).get("bids.not_eligible", 0) for i in (1, 2)}
    marker = tmp_path / "ran"
    script = tmp_path / "evil.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    task_id = submit(net, 0, {"kind": "python", "deadline_s": 5, "inputs": {"script": str(script)}})
    pending = wait_state(net, 0, task_id, "pending", timeout=30)
    assert "no eligible peer" in (pending["reason"] or "")
    task = wait_task(net, 0, task_id, lambda t: t["state"] in TERMINAL, "the deadline", timeout=60)
    assert (task["state"], task["reason"]) == ("failed", "deadline")
    assert task["shards"] == []
    for i in (1, 2):
        assert net.counters(i).get("bids.not_eligible", 0) > declined[i], f"node {i} never judged the task"
    assert net.rpc(0, "task.explain", {"task_id": task_id})["bids"] == []
    assert not marker.exists()
    # The same peers do run the other kinds for the same submitter.
    nap = wait_done(net, 0, submit(net, 0, {"kind": "sleep", "params": {"seconds": 0}}))
    assert node_of(net, nap["shards"][0]["peer_id"]) in (1, 2)

