"""Decentralized training end to end: 3 real daemons on 127.0.0.1 train the seed's model on
scikit-learn's digits in 3 shards × 3 rounds, merged by FedAvg in a signed aggregation
round each round (docs/design.md §6, issue 4). One of the three runs Keras on JAX, the others on
TensorFlow. Then the result bundle is checked like an outsider
would (``peerctl verify``), and a tampered copy of it is not.

Waits are bounded polling loops; nothing asserts on how long anything took. The test
prints its measurements (round wall times, accuracies) for ``pytest -s``.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peerd.ctl.result import export_bundle
from peerd.devnet import Devnet
from peerd.rpc.client import RpcClient
from peerd.verify import verify_bundle
from protocol.certificate import check_certificate, holders_of
from protocol.committee import committee, quorum
from protocol.envelope import open_envelope
from protocol.messages import Award
from tests.helpers_training import poll, train_spec, work_needing, write_digits

pytestmark = pytest.mark.slow

ROUNDS = 3
#: Digits has 10 balanced classes: chance is 0.1. A correct run of 3 FedAvg rounds ends near
#: 0.9 (0.88–0.91 measured); a round that does not start from the certified model of the
#: one before, or an aggregate that is not a mean (e.g. a sum), stays far below this.
MIN_TEST_ACCURACY = 0.8
TERMINAL = ("done", "failed", "cancelled")


#: The devnet node whose workers run Keras on JAX (``[offer] keras_backend``, docs/config.md):
#: peers of both backends train the same rounds, and the committees certify their mean.
JAX_NODE = 2


@pytest.fixture
def devnet(tmp_path: Path) -> Iterator[Devnet]:
    net = Devnet(tmp_path / "net")
    try:
        net.configure(3)
        with open(net.node_dir(JAX_NODE) / "peerd.toml", "a") as toml:
            toml.write('\n[offer]\nkeras_backend = "jax"\n')
        for i in range(3):
            net.start(i)
            net.wait_ready(i, 90.0)
        assert net.wait_peers(3, timeout=60), "the 3 daemons did not all see each other's adverts"
        yield net
    finally:
        net.down()


def wait_terminal(rpc: RpcClient, task_id: str, timeout: float) -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        t = rpc.call("task.get", {"task_id": task_id})
        return t if t["state"] in TERMINAL else None

    return poll(terminal, f"task {task_id} to finish", timeout=timeout, every=1.0)


def test_three_peers_train_digits_with_certified_fedavg_rounds(devnet: Devnet, tmp_path: Path) -> None:
    rpc = RpcClient(devnet.socket(0))
    peers = rpc.call("peers.list", {})["peers"]
    caps = [float(p["capacity"]) for p in peers]
    deadline_s = 600.0
    # R = W / D above the two largest C and within the three: the award needs all three.
    work = work_needing(caps, 3, deadline_s)
    assert work / deadline_s > sum(sorted(caps)[-2:])
    data = write_digits(tmp_path / "data")
    spec = train_spec(data, work=work, deadline_s=deadline_s, rounds=ROUNDS, max_shards=3)
    task_id = rpc.call("task.submit", {"spec": spec})["task_id"]
    task = wait_terminal(rpc, task_id, timeout=480)

    assert task["state"] == "done", (task["state"], task["reason"], task["events"][-5:])
    assert task["under_capacity"] is False
    holders = {s["peer_id"] for s in task["shards"]}
    assert holders == {p["peer_id"] for p in peers}, "every one of the 3 peers holds a shard"

    rounds = task["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert r["certified"] is True
        assert sorted(r["participants"]) == sorted(holders), r
        assert r["excluded"] == []
        assert len(r["signers"]) >= quorum(3)
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] > 0
        assert "loss" in r and "accuracy" in r  # the participants' own training metrics
    # Each round starts from the certified aggregate of the one before: it keeps learning.
    assert rounds[-1]["val_accuracy"] > rounds[0]["val_accuracy"], [r["val_accuracy"] for r in rounds]
    result = task["result"]
    test_accuracy = result["metrics"]["test_accuracy"]
    assert test_accuracy > MIN_TEST_ACCURACY, result["metrics"]
    assert result["certificate"]["output"] == rounds[-1]["output"] == result["outputs"][0]["sha256"]

    # -- the bundle, checked like an outsider would ---------------------------------------
    bundle = tmp_path / "bundle"
    export_bundle(rpc, task_id, bundle)
    report = verify_bundle(bundle)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert {f"round {r} recomputed" for r in range(1, ROUNDS + 1)} <= {c.name for c in report.checks if c.ok}
    award = open_envelope((bundle / "award-0.msg").read_bytes()).message
    assert isinstance(award, Award)
    # Every signed result says which backend trained it: JAX on node 2, TensorFlow elsewhere.
    for path in sorted(bundle.glob("round-*/result-*.msg")):
        commit = open_envelope(path.read_bytes())
        on_jax = commit.signer == devnet.peer_id(JAX_NODE)
        assert commit.message.metrics["jax_backend"] == float(on_jax), (path.name, commit.message.metrics)
    participants = sorted(set(holders_of(award).values()))
    for rnd in range(1, ROUNDS + 1):
        votes = [p.read_bytes() for p in sorted((bundle / f"round-{rnd}").glob("vote-*.msg"))]
        cert = check_certificate(votes, task_id=task_id, round_no=rnd, awards=[award], rule="weighted_mean")
        drawn = tuple(sorted(committee(task_id, rnd, participants)))
        assert cert.committee == drawn
        assert set(cert.signers) <= set(drawn) and len(cert.signers) >= quorum(len(drawn))
        assert cert.output["sha256"] == rounds[rnd - 1]["output"]

    # A copy with one committed input changed by one byte does not verify.
    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    victim = sorted((forged / "round-2").glob("input-*.bin"))[0]
    data_bytes = bytearray(victim.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0x01
    victim.write_bytes(bytes(data_bytes))
    bad = {c.name: c.detail for c in verify_bundle(forged).checks if not c.ok}
    assert any(n.startswith("round 2 input") for n in bad), bad

    # -- measurements (pytest -s) ---------------------------------------------------------
    events = task["events"]
    awarded = next(e["at"] for e in events if e["message"].startswith("awarded"))
    times = [awarded] + [r["certified_at"] for r in rounds]
    print(json.dumps({
        "round_wall_s": [round(b - a, 1) for a, b in itertools.pairwise(times)],
        "val_accuracy": [round(r["val_accuracy"], 4) for r in rounds],
        "test_accuracy": round(test_accuracy, 4),
        "total_s": round(events[-1]["at"] - events[0]["at"], 1),
    }))
