"""Work moves instead of sinking the task, and runs once per node (issue 8 items 3, 4, 6), on
real daemons.

Node 0 submits every task and takes no echo. Node 1 is a hostile contractor: a patched launcher
(as ``EVIL_LAUNCHER`` in test_aggregation_faults.py) makes it bid 20 times its C⁰, so
it alone covers each task's demand and wins every first award, and then, chosen per task by
the echo data's prefix, it returns ``ok = false`` (``fail:``), heartbeats its lease but never
delivers (``silent:``), or pads the right output with an undeclared one (``pad:``). Node 2 is
honest. Node 0's launcher can re-publish its own old announce and award on request (a file
in its node directory), to replay them into a contractor that restarted.

Each test asserts the outcome and the counters, never a duration; every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TestNet, wait_for
from test_market import BASE, ROOT, node_of, output, patch_config, submit, wait_done, wait_task

from peerd.ctl.result import export_bundle
from peerd.rpc.client import RpcCallError, RpcClient
from peerd.verify import verify_bundle

#: The hostile contractor's bid: this many times its measured C⁰ (a plausible lie for one box).
EVIL_FACTOR = 20.0
#: What the ``pad:`` attack appends: 2 MiB under a name echo never returns.
PAD_BYTES = 2 << 20

EVIL_CONTRACTOR = f"""
import sys
import trio
import peerd.daemon as daemon
import peerd.contractor as contractor
from peerd.executor import JobResult
from protocol.machines.shard import ShardMachine

honest_bidder = ShardMachine.bidder.__func__

def bidder(cls, announce, *, sealer, times, c0, load):
    return honest_bidder(cls, announce, sealer=sealer, times=times, c0=c0 * {EVIL_FACTOR}, load=0.0)

ShardMachine.bidder = classmethod(bidder)
honest_execute = contractor.Contractor._execute

async def evil_execute(self, ann, action):
    data = str(action.params.get("data", ""))
    if data.startswith("fail:"):
        return JobResult.failure("crashed", "the hostile peer fails every shard")
    if data.startswith("silent:"):
        await trio.sleep_forever()  # the machine keeps heartbeating the lease
    result = await honest_execute(self, ann, action)
    if data.startswith("pad:"):
        outputs = {{**result.outputs, "pad": b"x" * {PAD_BYTES}}}
        result = JobResult(ok=True, outputs=outputs, metrics=result.metrics)
    return result

contractor.Contractor._execute = evil_execute
sys.argv[0] = "peerd"
daemon.main()
"""

REPLAYING_SUBMITTER = """
import sys
from pathlib import Path
import trio
import peerd.daemon as daemon
import peerd.submitter as submitter

node_dir = Path(sys.argv[sys.argv.index("--config") + 1]).parent
honest_resume = submitter.Submitter.resume

async def replayer(self):
    # While node_dir/replay-<what> names a task: re-publish its stored announce or award
    # (our own signed bytes, as first published), once a second.
    while True:
        for what in ("announce", "award"):
            trigger = node_dir / f"replay-{what}"
            if not trigger.exists():
                continue
            task_id = trigger.read_text().strip()
            if what == "announce":
                raws = [self.node.store.task(task_id).announce]
            else:
                raws = [a.raw for a in self.node.store.awards(task_id)]
            for raw in raws:
                await self.node.gossip(bytes(raw))
        await trio.sleep(1.0)

def resume(self):
    honest_resume(self)
    self.nursery.start_soon(replayer, self)

submitter.Submitter.resume = resume
sys.argv[0] = "peerd"
daemon.main()
"""

SUBMITTER, EVIL, HONEST = 0, 1, 2
#: How long gossipsub keeps re-offering a message to peers (history windows × heartbeat, with room).
GOSSIP_HISTORY_S = 8.0


def start_with(net: TestNet, i: int, script: Path) -> int:
    """Like ``TestNet.start``, with ``script`` as the daemon's entry point (this checkout's code)."""
    d = net.node_dir(i)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    with open(d / "peerd.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--config", str(d / "peerd.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    net.procs[i] = proc
    (d / "peerd.pid").write_text(str(proc.pid))
    return proc.pid


class Net:
    def __init__(self, net: TestNet, scripts: dict[int, Path]) -> None:
        self.net = net
        self.scripts = scripts

    def start(self, i: int) -> None:
        if i in self.scripts:
            start_with(self.net, i, self.scripts[i])
        else:
            self.net.start(i)


@pytest.fixture
def moves(devnet: Callable[..., TestNet], tmp_path: Path) -> Iterator[Net]:
    # A fresh devnet per test: the submitter's trust records (docs/allocation.md "Caps") would
    # cap the liar after its first fault, and each test needs it to win one first award.
    scripts_dir = tmp_path / "launchers"
    scripts_dir.mkdir()
    (scripts_dir / "evil.py").write_text(EVIL_CONTRACTOR)
    (scripts_dir / "replayer.py").write_text(REPLAYING_SUBMITTER)
    # Uncalibrated C⁰ (10 GFLOP/s per core): the liar's 20× stays below its 2-core hardware bound
    # (2 × 256, SPEC §7.2), so its bid is plausible and wins. With calibration on (~90 per core
    # here) the same lie is refused as implausible_c0 and the liar never holds a shard.
    net = devnet(3, {**BASE, "adverts": {"calibrate": False}}, start=False)
    # A short floor for the hold limit: the silent liar's shard moves after backup_after × its
    # expected time, not after the default minute. Probation off: on a fresh network it would
    # cap the liar's claim at the honest one (docs/allocation.md "Caps"), and these tests are
    # about what happens once a liar holds a shard (test_trust_liar_daemons.py: the caps).
    patch_config(net, SUBMITTER, {"offer": {"accept_kinds": ["sleep"]}, "market": {"backup_min_s": 5.0},
                                  "policy": {"probation": False}})
    for i in (EVIL, HONEST):
        patch_config(net, i, {"offer": {"accept_kinds": ["echo"]}})
    n = Net(net, {SUBMITTER: scripts_dir / "replayer.py", EVIL: scripts_dir / "evil.py"})
    for i in range(3):
        n.start(i)
    for i in range(3):
        net.wait_ready(i)
    assert net.wait_peers(3, timeout=60), "the devnet never saw every advert"
    yield n


def echo_spec(net: TestNet, data: str, deadline_s: float = 120.0) -> dict[str, Any]:
    """An echo task whose demand R only the hostile peer's inflated bid covers (max_shards 1):
    1.5× the honest contractor's capacity C."""
    caps = {p["peer_id"]: float(p["capacity"]) for p in net.rpc(SUBMITTER, "peers.list")["peers"]}
    honest = caps[net.peer_id(HONEST)]
    evil_bid = caps[net.peer_id(EVIL)] * EVIL_FACTOR  # what it will bid (load 0)
    r = 1.5 * honest
    assert r < evil_bid / 2, (honest, evil_bid)  # the liar alone covers R, with room for noise
    return {"kind": "echo", "params": {"data": data}, "work": r * deadline_s, "deadline_s": deadline_s}


def counters(net: TestNet, i: int) -> dict[str, int]:
    return net.counters(i)


def first_holder_was_the_liar(net: TestNet, task_id: str) -> None:
    explained = net.rpc(SUBMITTER, "task.explain", {"task_id": task_id})
    assert [b["peer_id"] for b in explained["bids"] if b["chosen"]] == [net.peer_id(EVIL)], explained


def assert_moved_to_the_honest_peer(net: TestNet, task: dict[str, Any], data: str, tmp: Path) -> None:
    (shard,) = task["shards"]
    assert shard["peer_id"] == net.peer_id(HONEST) and shard["epoch"] == 1
    assert output(net, SUBMITTER, task, "shard-0/stdout") == data.encode()
    # The re-award and the result check out for anyone: peerctl verify on the bundle.
    out = tmp / f"bundle-{task['task_id'][:8]}"
    export_bundle(RpcClient(net.socket(SUBMITTER)), task["task_id"], out)
    rep = verify_bundle(out)
    assert rep.ok, [c for c in rep.checks if not c.ok]
    assert any(c.name == "award epoch 1" and c.ok for c in rep.checks), [c.name for c in rep.checks]


def test_a_peer_returning_ok_false_loses_the_shard_and_the_task_completes_elsewhere(
    moves: Net, tmp_path: Path
) -> None:
    net = moves.net
    before = counters(net, SUBMITTER)
    data = f"fail: {os.urandom(4).hex()}"
    task_id = submit(net, SUBMITTER, echo_spec(net, data))
    task = wait_done(net, SUBMITTER, task_id, timeout=120)
    first_holder_was_the_liar(net, task_id)
    assert_moved_to_the_honest_peer(net, task, data, tmp_path)
    messages = [e["message"] for e in task["events"]]
    assert any("ok = false: crashed" in m and "re-awarded" in m for m in messages), messages
    # peerctl explain says why the liar was excluded (it used to say "lease lost" for any cause).
    explained = net.rpc(SUBMITTER, "task.explain", {"task_id": task_id})
    liar_bid = next(b for b in explained["bids"] if b["peer_id"] == net.peer_id(EVIL))
    assert "later excluded: ok = false: crashed" in liar_bid["why"], liar_bid["why"]
    after = counters(net, SUBMITTER)
    assert after.get("tasks.reawarded", 0) == before.get("tasks.reawarded", 0) + 1
    assert counters(net, EVIL).get("jobs.failed.crashed", 0) >= 1


def test_a_peer_that_heartbeats_but_never_delivers_gets_a_backup_and_the_task_is_done(
    moves: Net, tmp_path: Path
) -> None:
    net = moves.net
    before = counters(net, SUBMITTER)
    data = f"silent: {os.urandom(4).hex()}"
    task_id = submit(net, SUBMITTER, echo_spec(net, data, deadline_s=60.0))
    task = wait_done(net, SUBMITTER, task_id, timeout=90)
    first_holder_was_the_liar(net, task_id)
    assert_moved_to_the_honest_peer(net, task, data, tmp_path)
    messages = [e["message"] for e in task["events"]]
    # Not a lost lease: the liar heartbeated to the end; the hold limit moved the shard.
    assert any("overdue" in m and "re-awarded" in m for m in messages), messages
    assert not any("lease lost" in m for m in messages), messages
    after = counters(net, SUBMITTER)
    assert after.get("tasks.reawarded", 0) == before.get("tasks.reawarded", 0) + 1
    # The liar saw the re-award: its (never-ending) job was superseded by the backup.
    wait_for(lambda: counters(net, EVIL).get("shards.superseded", 0) >= 1, "the liar superseded", timeout=60)


def test_a_result_padded_with_undeclared_outputs_is_refused_before_any_fetch(
    moves: Net, tmp_path: Path
) -> None:
    net = moves.net
    before = counters(net, SUBMITTER)
    data = f"pad: {os.urandom(4).hex()}"
    task_id = submit(net, SUBMITTER, echo_spec(net, data))
    task = wait_done(net, SUBMITTER, task_id, timeout=120)
    first_holder_was_the_liar(net, task_id)
    assert_moved_to_the_honest_peer(net, task, data, tmp_path)
    after = counters(net, SUBMITTER)
    assert after.get("dropped.undeclared_output", 0) >= before.get("dropped.undeclared_output", 0) + 1
    assert [o["name"] for o in task["result"]["outputs"]] == ["shard-0/stdout"]
    # The 2 MiB pad never reached the submitter's blob store.
    pad = hashlib.sha256(b"x" * PAD_BYTES).hexdigest()
    with pytest.raises(RpcCallError, match="no blob"):
        net.rpc(SUBMITTER, "blob.read", {"sha256": pad, "offset": 0, "length": 16})
    messages = [e["message"] for e in task["events"]]
    assert any("result refused: undeclared output(s) pad" in m for m in messages), messages


def test_a_restarted_contractor_does_not_run_a_replayed_award_again(moves: Net) -> None:
    net = moves.net
    data = f"once {os.urandom(4).hex()}"
    # Any eligible peer may win this one (R is tiny); echo runs honestly on both.
    task_id = submit(net, SUBMITTER, {"kind": "echo", "params": {"data": data}, "deadline_s": 300})
    task = wait_done(net, SUBMITTER, task_id)
    worker = node_of(net, task["shards"][0]["peer_id"])
    assert worker in (EVIL, HONEST)
    # Setup, not an assertion: let the original award age out of gossipsub's message caches
    # (IHAVE gossip covers the last few 1 s heartbeats). Otherwise the restarted node may get
    # it from a neighbour before the announce, drop it as unknown_task and then take our
    # replay for a duplicate; the check below would then fail loudly, never pass by accident.
    time.sleep(GOSSIP_HISTORY_S)
    assert net.kill(worker) == -signal.SIGKILL
    moves.start(worker)
    net.wait_ready(worker)
    assert counters(net, worker).get("jobs.started", 0) == 0
    node_dir = net.node_dir(SUBMITTER)
    try:
        (node_dir / "replay-announce").write_text(task_id)
        wait_for(
            lambda: counters(net, worker).get("accepted.announce", 0) >= 1,
            "the replayed announce at the restarted contractor",
            timeout=90,
        )
        c = counters(net, worker)
        assert c.get("dropped.replayed_announce", 0) >= 1, c
        (node_dir / "replay-announce").unlink()
        (node_dir / "replay-award").write_text(task_id)
        wait_for(
            lambda: counters(net, worker).get("accepted.award", 0) >= 1,
            "the replayed award at the restarted contractor",
            timeout=90,
        )
    finally:
        for name in ("replay-announce", "replay-award"):
            (node_dir / name).unlink(missing_ok=True)
    c = counters(net, worker)
    assert c.get("dropped.replayed_award", 0) >= 1, c
    assert c.get("jobs.started", 0) == 0 and c.get("bids.sent", 0) == 0, c
    # Nothing changed at the submitter: the task is still done, with the one result.
    again = wait_task(net, SUBMITTER, task_id, lambda t: t["state"] == "done", "the task still done")
    assert again["shards"] == task["shards"]
