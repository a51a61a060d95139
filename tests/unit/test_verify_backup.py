"""``peerctl verify`` on a plain task whose shard got a backup holder (SPEC §7.6, §15.5 step 6):
the overdue holder's late result came first and won, so the bundle's outputs are its, while the
last award names the backup. The bundle is built from a real TaskMachine's signed messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from peerd.verify import verify_bundle
from protocol.machines import events as ev
from protocol.machines.task import TaskMachine
from tests.unit.test_machine_task import BY_ID, NOW, SUB, TIMES, W, announce, bid, deliver, result


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def backup_task() -> tuple[TaskMachine, Any, Any, bytes, bytes]:
    """A task whose first holder was replaced (silent past its lease) and whose late result came
    first; returns the machine, the two results and their outputs."""
    m = TaskMachine(announce(work=3000.0, deadline_ms=3_600_000), sealer=SUB, times=TIMES)
    m.handle(ev.Start(now_ms=NOW))
    for w in (W[0], W[1]):
        deliver(m, bid(w), NOW + 10)
    m.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    holder = BY_ID[m.assignments()[0]["peer_id"]]
    due = m._overdue_at(m.assignments()[0])
    assert due is not None
    for _ in range(100):  # lease checks until the hold limit passes (the holder is silent)
        if 1 in m.awards:
            break
        m.handle(ev.TimerFired(now_ms=m.timers.armed["leases"], name="leases"))
    backup = BY_ID[m.assignments()[0]["peer_id"]]
    first, second = b"the overdue holder's", b"the backup's"
    late = result(holder, 0, due + 10, outputs={"stdout": {"sha256": sha(first), "size": len(first)}})
    theirs = result(
        backup, 0, due + 20, epoch=1, outputs={"stdout": {"sha256": sha(second), "size": len(second)}}
    )
    deliver(m, late, due + 10)
    deliver(m, theirs, due + 20)
    assert m.results[1][0] is late  # the first valid result won
    return m, late, theirs, first, second


def write_bundle(d: Path, m: TaskMachine, results: list[Any], outputs: bytes) -> None:
    files: dict[str, bytes] = {"announce.msg": m.announce_signed.raw}
    for epoch, signed in m.awards.items():
        files[f"award-{epoch}.msg"] = signed.raw
    for r in results:
        files[f"round-1/result-0-{r.signer}.msg"] = r.raw
    files["outputs/shard-0/stdout"] = outputs
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    manifest = {
        "task_id": m.task_id,
        "kind": "echo",
        "state": "done",
        "rounds": 0,
        "result": {
            "outputs": [{"name": "shard-0/stdout", "sha256": sha(outputs), "size": len(outputs)}],
            "metrics": {},
            "certificate": None,
        },
        "files": {name: sha(data) for name, data in sorted(files.items())},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))


def failed(rep: Any) -> list[tuple[str, str]]:
    return [(c.name, c.detail) for c in rep.checks if not c.ok]


def test_the_overdue_holders_first_result_verifies(tmp_path: Path) -> None:
    m, late, theirs, first, _ = backup_task()
    write_bundle(tmp_path, m, [late, theirs], first)
    rep = verify_bundle(tmp_path)
    assert rep.ok, failed(rep)
    check = next(c for c in rep.checks if c.name == "result shard 0")
    assert late.signer in check.detail


def test_the_backups_result_verifies_when_it_is_the_one_carried(tmp_path: Path) -> None:
    m, late, theirs, _, second = backup_task()
    write_bundle(tmp_path, m, [late, theirs], second)
    rep = verify_bundle(tmp_path)
    assert rep.ok, failed(rep)


def test_outputs_of_nobodys_result_still_fail(tmp_path: Path) -> None:
    m, late, theirs, _, _ = backup_task()
    write_bundle(tmp_path, m, [late, theirs], b"forged bytes")
    rep = verify_bundle(tmp_path)
    assert not rep.ok
    assert any(name == "output shard-0/stdout" for name, _ in failed(rep)), failed(rep)


def test_a_non_holders_result_cannot_stand_in(tmp_path: Path) -> None:
    # A third peer that never held shard 0 signs a result: it cannot be placed (not_holder).
    m, late, theirs, _, _ = backup_task()
    outsider = next(w for w in W if w.peer_id not in (late.signer, theirs.signer))
    forged_out = b"outsider"
    forged = result(outsider, 0, NOW + 1, outputs={"stdout": {"sha256": sha(forged_out), "size": 8}})
    write_bundle(tmp_path, m, [theirs, forged], forged_out)
    rep = verify_bundle(tmp_path)
    assert not rep.ok
