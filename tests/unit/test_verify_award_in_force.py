"""``peerctl verify`` (peerd/verify.py) checks each round's certificate under the award in
force for it (SPEC §11.1), the same ``check_certificate`` the machines and the simulator use:
a bundle whose re-award does not quote a round certified under epoch 0 no longer verifies
that round (docs/simulation.md finding 3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from peerd.verify import verify_bundle
from protocol.awards import allocate, open_quoted_bids, reassign
from protocol.envelope import open_envelope
from protocol.messages import Award, TaskAnnounce
from tests.helpers_training import SyntheticTask


@pytest.fixture(scope="module")
def task() -> SyntheticTask:
    return SyntheticTask(rounds=2)


def with_reaward(task: SyntheticTask, d: Path, quote_round: int | None) -> dict[str, str]:
    """Add an epoch-1 re-award (the third peer lost) quoting ``quote_round``, reseal the
    manifest, verify; return the failed checks."""
    task.bundle(d)
    ann, aw = task.announce, task.award
    assert isinstance(ann, TaskAnnounce) and isinstance(aw, Award)
    lost = task.peers[2].peer_id
    scored = allocate(ann, open_quoted_bids(aw)).scored
    costs = [(s.peer_id, s.cost) for s in scored]
    capacity = {s.peer_id: s.capacity for s in scored}
    certified: dict[str, Any] | None = None
    if quote_round is not None:
        out = task.outputs[quote_round]
        signers = sorted(open_envelope(v).signer for v in task.votes[quote_round].values())
        certified = {"round": quote_round, "output": {"sha256": SyntheticTask.sha(out), "size": len(out)},
                     "signers": signers}  # fmt: skip
    raw = task.forge.seal(
        task.submitter, Award, ttl_ms=600_000, task_id=task.task_id, epoch=1, bids=task.bids,
        assignments=reassign(list(aw.assignments), {lost}, costs, task_id=task.task_id, capacity=capacity),
        under_capacity=False, excluded=[lost], certified=certified,
    )  # fmt: skip
    (d / "award-1.msg").write_bytes(raw)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["award-1.msg"] = hashlib.sha256(raw).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
    rep = verify_bundle(d)
    assert "award award-1.msg" not in {c.name for c in rep.checks if not c.ok}
    return {c.name: c.detail for c in rep.checks if not c.ok}


def test_a_re_award_quoting_the_last_round_keeps_every_round_with_epoch_0(
    task: SyntheticTask, tmp_path: Path
) -> None:
    assert with_reaward(task, tmp_path / "b", quote_round=2) == {}


def test_a_re_award_that_does_not_quote_the_rounds_moves_them_and_their_certificates_fail(
    task: SyntheticTask, tmp_path: Path
) -> None:
    bad = with_reaward(task, tmp_path / "b", quote_round=None)
    for rnd in (1, 2):
        assert bad[f"round {rnd} certificate"].startswith("bad_committee"), bad
        assert "award in force" in bad[f"round {rnd} certificate"]


def test_a_re_award_quoting_round_1_moves_only_round_2(task: SyntheticTask, tmp_path: Path) -> None:
    bad = with_reaward(task, tmp_path / "b", quote_round=1)
    assert "round 1 certificate" not in bad, bad
    assert bad["round 2 certificate"].startswith("bad_committee"), bad
