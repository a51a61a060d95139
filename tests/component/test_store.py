"""peerd/store.py: SQLite state — transactions, persistence, and kill -9 in the middle of writes.

Issue 3 item 8: "nothing half-written after a kill -9". A child process writes tasks, awards
(each with several shard rows) and state changes in a tight loop; the test SIGKILLs it at
varying moments, reopens the database and checks that every multi-row change is either all
there or not there at all.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from peerd.store import Store

ROOT = Path(__file__).resolve().parents[2]
SHARDS_PER_AWARD = 7


def add_task(store: Store, task_id: str, state: str = "bidding") -> bool:
    return store.add_task(
        task_id=task_id, role="submitter", submitter="me", kind="echo", state=state, spec={"kind": "echo"},
        announce=b"\x00" * 100, deadline_at=time.time() + 60, message="announced",
    )


def shards(n: int, peer: str = "p", share: float | None = None) -> list[dict[str, object]]:
    each = share if share is not None else 1 / n
    return [{"shard": i, "peer_id": f"{peer}{i}", "share": each, "inputs": {}} for i in range(n)]


def test_a_task_and_its_first_event_are_written_together(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    assert add_task(store, "t1")
    assert not add_task(store, "t1")  # INSERT OR IGNORE: a second add changes nothing
    assert [e.message for e in store.events("t1")] == ["announced"]
    store.set_state("t1", "running", "awarded", reason=None)
    store.set_state("t1", "failed", "deadline passed", reason="deadline")
    row = store.task("t1")
    assert row is not None and (row.state, row.reason) == ("failed", "deadline")
    assert [e.state for e in store.events("t1")] == ["bidding", "running", "failed"]


def test_a_failing_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    add_task(store, "t1")
    with pytest.raises(RuntimeError), store.tx() as db:
        db.execute("UPDATE tasks SET state='done' WHERE task_id='t1'")
        db.execute("INSERT INTO events (task_id, at, state, message) VALUES ('t1', 0, 'done', 'x')")
        raise RuntimeError("crash inside the transaction")
    row = store.task("t1")
    assert row is not None and row.state == "bidding"
    assert len(store.events("t1")) == 1
    # The connection is usable afterwards (no transaction left open).
    store.set_state("t1", "running", "ok")
    again = store.task("t1")
    assert again is not None and again.state == "running"


def test_an_award_that_fails_half_way_is_rolled_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    add_task(store, "t1")
    bad = shards(3)
    del bad[2]["share"]  # the third shard row cannot be written
    with pytest.raises(KeyError):
        store.add_award("t1", 0, b"award-0", bad)
    assert store.awards("t1") == []
    assert store.shards("t1") == []


def test_re_awards_count_attempts_and_keep_unmoved_shards(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    add_task(store, "t1")
    store.add_award("t1", 0, b"award-0", shards(3))
    store.set_shard_state("t1", 2, "done")
    moved = shards(3)
    moved[0]["peer_id"] = "spare"
    store.add_award("t1", 1, b"award-1", moved)
    rows = {r.shard: r for r in store.shards("t1")}
    first = rows[0]
    assert (first.peer_id, first.attempts, first.state, first.epoch) == ("spare", 2, "awarded", 1)
    assert (rows[1].peer_id, rows[1].attempts) == ("p1", 1)
    # Shard 2 finished on its peer before the re-award; moving shard 0 must not reset it.
    assert (rows[2].attempts, rows[2].state) == (1, "done")
    assert [a.raw for a in store.awards("t1")] == [b"award-0", b"award-1"]


def test_everything_committed_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = Store(path)
    add_task(store, "t1")
    assert store.add_bid("t1", "peer", b"bid")
    assert not store.add_bid("t1", "peer", b"bid again")  # one bid per peer per task
    store.add_award("t1", 0, b"award", shards(2))
    assert store.add_result("t1", 1, 0, "p0", b"result", seq=1)
    store.set_result("t1", {"outputs": [], "metrics": {}})
    store.set_work("t1", 0, 1, 0, "done", b"signed result")
    store.add_certificate("t1", 1, {"sha256": "0" * 64}, [b"vote"])
    store.set_round("t1", 1, {"round": 1})
    store.close()
    again = Store(path)
    assert [b.raw for b in again.bids("t1")] == [b"bid"]
    assert len(again.shards("t1")) == 2
    assert [r.raw for r in again.results("t1")] == [b"result"]
    task = again.task("t1")
    assert task is not None and task.result == {"outputs": [], "metrics": {}}
    work = again.work("t1", 0, 1)
    assert work is not None and work.result == b"signed result"
    cert = again.certificate("t1", 1)
    assert cert is not None and (cert.output, cert.votes) == ({"sha256": "0" * 64}, (b"vote",))
    assert again.rounds("t1") == [{"round": 1}]


# --- kill -9 mid-write ---------------------------------------------------------------------------

WRITER = textwrap.dedent(
    f"""
    import sys, time
    from pathlib import Path
    from peerd.store import Store

    store = Store(Path(sys.argv[1]))
    prefix = sys.argv[2]
    n = {SHARDS_PER_AWARD}
    print("ready", flush=True)
    i = 0
    while True:
        tid = f"{{prefix}}-{{i}}"
        store.add_task(task_id=tid, role="submitter", submitter="me", kind="echo", state="bidding",
                       spec={{"kind": "echo", "pad": "x" * 2000}}, announce=b"a" * 4000,
                       deadline_at=time.time() + 60, message="announced")
        for epoch in range(3):
            shards = [{{"shard": s, "peer_id": f"peer{{epoch}}-{{s}}", "share": 1 / n, "inputs": {{}}}}
                      for s in range(n)]
            store.add_award(tid, epoch, b"w" * 3000, shards)
            store.set_state(tid, "running", f"awarded epoch {{epoch}}")
        store.set_state(tid, "done", "finished")
        i += 1
    """
)


def check_consistent(path: Path) -> int:
    """Every invariant a half-written change would break; returns the number of tasks."""
    db = sqlite3.connect(str(path))
    db.row_factory = sqlite3.Row
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tasks = list(db.execute("SELECT task_id, state FROM tasks"))
        for t in tasks:
            tid = t["task_id"]
            q = "SELECT state FROM events WHERE task_id=? ORDER BY id"
            events = [e["state"] for e in db.execute(q, (tid,))]
            # add_task writes the row and its first event together.
            assert events[:1] == ["bidding"], (tid, events)
            # set_state writes the state and its event together: the last event is the state.
            assert events[-1] == t["state"], (tid, events, t["state"])
            q = "SELECT epoch FROM awards WHERE task_id=? ORDER BY epoch"
            awards = [a["epoch"] for a in db.execute(q, (tid,))]
            rows = list(db.execute("SELECT shard, peer_id, epoch FROM shards WHERE task_id=?", (tid,)))
            if not awards:
                assert rows == [], tid
                continue
            # add_award writes the award and all its shard rows together: all of the latest epoch.
            latest = awards[-1]
            assert awards == list(range(latest + 1)), (tid, awards)
            assert len(rows) == SHARDS_PER_AWARD, (tid, len(rows))
            assert {r["epoch"] for r in rows} == {latest}, (tid, [r["epoch"] for r in rows])
            assert {r["peer_id"] for r in rows} == {f"peer{latest}-{s}" for s in range(SHARDS_PER_AWARD)}
        return len(tasks)
    finally:
        db.close()


@pytest.mark.slow
def test_kill_9_mid_write_leaves_nothing_half_written(tmp_path: Path) -> None:
    path = tmp_path / "state" / "peerd.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen = 0
    for round_no in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"r{round_no}"],
            stdout=subprocess.PIPE, env=env, cwd=ROOT,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == b"ready"
            # Different moments each round: somewhere in add_task, add_award or set_state.
            time.sleep(0.15 + 0.07 * round_no)
        finally:
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        count = check_consistent(path)
        assert count > seen, "the writer made no progress; the kill proved nothing"
        seen = count
    # The daemon's own Store opens the database after all those kills and keeps writing.
    store = Store(path)
    assert add_task(store, "after")
    store.add_award("after", 0, b"x", shards(SHARDS_PER_AWARD, peer="peer0-"))
    store.close()
    check_consistent(path)
