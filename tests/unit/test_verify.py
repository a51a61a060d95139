"""``peerctl verify`` on a result bundle: a clean bundle passes, and every kind of tampering
fails the check it should, with a reason a person can act on.

The bundle is synthetic but real: every message is signed with Ed25519 keys, the award
follows the allocation rule, the votes come from the drawn committee and the outputs are
the rule's aggregate (tests/helpers_training.SyntheticTask). After each tampering the
manifest's file hashes are rewritten to match — the manifest is not signed, so a forger
can always do that; the checks that matter are the ones over the signed messages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from peerd.verify import VerifyReport, verify_bundle
from protocol.messages import Award
from tests.helpers_training import SyntheticTask


@pytest.fixture(scope="module")
def task() -> SyntheticTask:
    return SyntheticTask(rounds=2)


@pytest.fixture
def bundle(task: SyntheticTask, tmp_path: Path) -> Path:
    return task.bundle(tmp_path / "bundle")


def reseal_manifest(d: Path) -> None:
    """What a forger does after editing files: make the manifest's hashes match again."""
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    (d / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def failed(rep: VerifyReport) -> dict[str, str]:
    return {c.name: c.detail for c in rep.checks if not c.ok}


def verify_tampered(d: Path) -> dict[str, str]:
    reseal_manifest(d)
    rep = verify_bundle(d)
    assert not rep.ok
    return failed(rep)


def test_a_clean_bundle_verifies(bundle: Path) -> None:
    rep = verify_bundle(bundle)
    assert rep.ok, failed(rep)
    names = {c.name for c in rep.checks}
    for rnd in (1, 2):
        assert {f"round {rnd} certificate", f"round {rnd} inputs", f"round {rnd} recomputed",
                f"round {rnd} output file"} <= names
    assert "final weights" in names


def test_a_flipped_byte_in_an_input_is_caught(task: SyntheticTask, bundle: Path) -> None:
    peer = task.peers[1].peer_id
    shard = task.shard_of[peer]
    flip(bundle / "round-1" / f"input-{peer}-{shard}.bin")
    bad = verify_tampered(bundle)
    name = f"round 1 input {peer[-8:]} shard {shard}"
    assert name in bad, bad
    assert "hash differs from the commit" in bad[name]
    # Without the untampered input there is nothing to recompute from: no "recomputed" pass.
    assert "round 1 inputs" not in {c.name for c in verify_bundle(bundle).checks if c.ok}


def test_a_flipped_byte_in_the_output_is_caught(bundle: Path) -> None:
    flip(bundle / "round-2" / "output.bin")
    bad = verify_tampered(bundle)
    assert set(bad) == {"round 2 output file"}, bad


def test_the_manifest_catches_an_edit_it_was_not_told_about(bundle: Path) -> None:
    flip(bundle / "round-2" / "output.bin")
    bad = failed(verify_bundle(bundle))  # manifest left as it was
    assert "file round-2/output.bin" in bad and "round 2 output file" in bad


def test_dropping_votes_below_quorum_is_caught(task: SyntheticTask, bundle: Path) -> None:
    for m in task.members(1)[:2]:
        (bundle / "round-1" / f"vote-{m.peer_id}.msg").unlink()
    bad = verify_tampered(bundle)
    assert bad["round 1 certificate"].startswith("no_quorum"), bad


def test_a_vote_replaced_by_a_non_members_is_caught(task: SyntheticTask, bundle: Path) -> None:
    victim = task.members(1)[0]
    (bundle / "round-1" / f"vote-{victim.peer_id}.msg").unlink()
    (bundle / "round-1" / f"vote-{task.outsider.peer_id}.msg").write_bytes(task.vote(task.outsider, 1))
    bad = verify_tampered(bundle)
    assert bad["round 1 certificate"].startswith("not_in_committee"), bad


def test_a_self_drawn_committee_is_caught(task: SyntheticTask, bundle: Path) -> None:
    """Votes naming a participant set of their own (the outsider alone: a committee of one
    with quorum one) are consistent with themselves but with no signed award."""
    me = task.outsider
    fake = b"the outsider's model"
    inputs = [{"peer_id": me.peer_id, "shard": 0, "sha256": SyntheticTask.sha(fake), "weight": 1.0}]
    rd = bundle / "round-2"
    for p in rd.glob("vote-*.msg"):
        p.unlink()
    forged = task.vote(me, 2, inputs=inputs, committee=[me.peer_id], output=fake)
    (rd / f"vote-{me.peer_id}.msg").write_bytes(forged)
    (rd / "output.bin").write_bytes(fake)
    bad = verify_tampered(bundle)
    assert bad["round 2 certificate"].startswith("bad_committee"), bad


def test_a_colluding_majority_certifying_a_wrong_aggregate_is_caught(
    task: SyntheticTask, bundle: Path
) -> None:
    """Two of three members sign a ballot whose output is not the rule over the inputs: the
    certificate itself is valid, the recomputation is not."""
    from protocol.aggregation import aggregate
    from protocol.certificate import input_key
    from protocol.tensors import encode_arrays

    entries = task.input_entries(1)
    wrong = encode_arrays(aggregate("sum", [
        (input_key(e["peer_id"], e["shard"]), e["weight"], task.arrays(1, e["peer_id"])) for e in entries
    ]))
    rd = bundle / "round-1"
    for p in rd.glob("vote-*.msg"):
        p.unlink()
    for m in task.members(1)[:2]:
        (rd / f"vote-{m.peer_id}.msg").write_bytes(task.vote(m, 1, output=wrong))
    (rd / "output.bin").write_bytes(wrong)
    bad = verify_tampered(bundle)
    assert set(bad) == {"round 1 recomputed"}, bad
    assert "weighted_mean over 3 inputs" in bad["round 1 recomputed"]


def test_a_vote_claiming_another_weight_than_committed_is_caught(task: SyntheticTask, bundle: Path) -> None:
    entries = [dict(e) for e in task.input_entries(1)]
    entries[0]["weight"] = 1e6  # FedAvg weight inflated over the signed commit's sample count
    rd = bundle / "round-1"
    for p in rd.glob("vote-*.msg"):
        p.unlink()
    for m in task.members(1)[:2]:
        (rd / f"vote-{m.peer_id}.msg").write_bytes(task.vote(m, 1, inputs=entries))
    bad = verify_tampered(bundle)
    name = f"round 1 input {entries[0]['peer_id'][-8:]} shard {entries[0]['shard']}"
    assert "not a signed commit" in bad[name], bad


def test_a_commit_signed_by_someone_else_does_not_count(task: SyntheticTask, bundle: Path) -> None:
    """The outsider re-signs a holder's commit (same hash and weight): only the shard's
    holder may commit for it."""
    from protocol.messages import Result

    peer = task.peers[0].peer_id
    shard = task.shard_of[peer]
    blob = task.inputs[1][peer][0]
    raw = task.forge.seal(
        task.outsider, Result, task_id=task.task_id, epoch=0, shard=shard, round=1, ok=True, error=None,
        outputs={"weights": {"sha256": SyntheticTask.sha(blob), "size": len(blob)}},
        weight=task.input_entries(1)[0]["weight"], metrics={},
    )
    (bundle / "round-1" / f"result-{shard}-{peer}.msg").write_bytes(raw)
    bad = verify_tampered(bundle)
    assert "not a signed commit" in bad[f"round 1 input {peer[-8:]} shard {shard}"], bad


def test_a_flipped_byte_in_the_award_is_caught(bundle: Path) -> None:
    flip(bundle / "award-0.msg")
    bad = verify_tampered(bundle)
    assert "award award-0.msg" in bad and "awards" in bad, bad
    assert bad["awards"] == "no first award in the bundle"


def test_an_award_against_the_allocation_rule_is_caught(task: SyntheticTask, bundle: Path) -> None:
    """Signed by the real submitter, but shards moved between peers: not what the rule gives."""
    a = [dict(x) for x in task.assignments]
    a[0]["peer_id"], a[1]["peer_id"] = a[1]["peer_id"], a[0]["peer_id"]
    raw = task.forge.seal(task.submitter, Award, task_id=task.task_id, epoch=0, bids=task.bids, assignments=a,
                          under_capacity=False, excluded=[])
    (bundle / "award-0.msg").write_bytes(raw)
    bad = verify_tampered(bundle)
    assert bad["award award-0.msg"].startswith("bad_award"), bad


def test_an_award_signed_by_another_peer_is_caught(task: SyntheticTask, bundle: Path) -> None:
    raw = task.forge.seal(task.outsider, Award, task_id=task.task_id, epoch=0, bids=task.bids,
                          assignments=task.assignments, under_capacity=False, excluded=[])
    (bundle / "award-0.msg").write_bytes(raw)
    bad = verify_tampered(bundle)
    assert bad["award award-0.msg"].startswith("forged_award"), bad


def test_a_bundle_short_of_rounds_is_caught(task: SyntheticTask, bundle: Path) -> None:
    """The rounds to check come from the signed announce, not the manifest: a bundle with
    round 2 taken out (and its manifest saying 1) certifies 1 of 2."""
    import shutil

    shutil.rmtree(bundle / "round-2")
    m = json.loads((bundle / "manifest.json").read_text())
    m["rounds"] = 1
    m["result"]["outputs"][0]["sha256"] = SyntheticTask.sha(task.outputs[1])
    (bundle / "manifest.json").write_text(json.dumps(m))
    bad = verify_tampered(bundle)
    assert bad["rounds"] == "bundle certifies 1 of 2 rounds", bad
    assert bad["round 2 certificate"] == "missing: no votes in the bundle", bad


def test_a_manifest_understating_the_rounds_is_caught(bundle: Path) -> None:
    """The manifest's round count is a claim like any other: checked against the bundle."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["rounds"] = 1
    (bundle / "manifest.json").write_text(json.dumps(m))
    bad = verify_tampered(bundle)
    assert bad == {"manifest rounds": "the manifest claims 1 certified round(s); the bundle certifies 2"}, bad


def test_final_weights_that_are_not_the_last_certified_output_are_caught(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m["result"]["outputs"][0]["sha256"] = "00" * 32
    (bundle / "manifest.json").write_text(json.dumps(m))
    bad = verify_tampered(bundle)
    assert set(bad) == {"final weights"}, bad


def test_a_missing_announce_or_manifest_is_reported(bundle: Path) -> None:
    (bundle / "announce.msg").unlink()
    assert "announce" in failed(verify_bundle(bundle))
    (bundle / "manifest.json").unlink()
    rep = verify_bundle(bundle)
    assert not rep.ok and "manifest" in failed(rep)


def test_an_award_with_caps_is_recomputed_with_them(task: SyntheticTask, bundle: Path) -> None:
    """SPEC §10.3: caps are part of the recomputation. Caps that do not bind keep the award;
    the report says the caps are the submitter's claim. A cap that would change the chosen set,
    with the shards left where they were, is caught."""
    holders = sorted({a["peer_id"] for a in task.assignments})
    raw = task.forge.seal(task.submitter, Award, task_id=task.task_id, epoch=0, bids=task.bids,
                          assignments=task.assignments, under_capacity=False, excluded=[],
                          caps={holders[0]: 1e6})
    (bundle / "award-0.msg").write_bytes(raw)
    reseal_manifest(bundle)
    rep = verify_bundle(bundle)
    detail = {c.name: (c.ok, c.detail) for c in rep.checks}["award epoch 0"]
    assert detail[0] and "caps on 1 bid(s)" in detail[1] and "not provable" in detail[1]
    raw = task.forge.seal(task.submitter, Award, task_id=task.task_id, epoch=0, bids=task.bids,
                          assignments=task.assignments, under_capacity=False, excluded=[],
                          caps={holders[0]: 1e-9})
    (bundle / "award-0.msg").write_bytes(raw)
    bad = verify_tampered(bundle)
    assert bad["award award-0.msg"].startswith("bad_award"), bad
