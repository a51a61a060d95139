"""peerd/store.py hands back typed, frozen records (peerd/records.py), JSON columns decoded
(issue 7 item 2): every read method's mapping, field by field, on a real SQLite file."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path

import pytest

from peerd.records import (
    AwardRecord,
    BidRecord,
    CertificateRecord,
    EventRecord,
    ResultRecord,
    ShardRecord,
    TaskRecord,
    VoteRecord,
    WorkRecord,
)
from peerd.store import Store

SPEC = {"kind": "echo", "name": "n", "params": {"a": [1, 2.5, None]}, "input_refs": {"x": {"sha256": "d"}}}


def _task(store: Store, task_id: str = "t1", role: str = "submitter", state: str = "bidding") -> None:
    store.add_task(
        task_id=task_id, role=role, submitter="sub", kind="echo", state=state, spec=SPEC,
        announce=b"\x01signed", deadline_at=1234.5, message="announced",
    )  # fmt: skip


def test_a_task_comes_back_typed_with_its_json_decoded(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    before = time.time()
    _task(store)
    store.set_state("t1", "failed", "deadline passed", reason="deadline")
    store.set_result("t1", {"outputs": [{"name": "o", "sha256": "e"}], "metrics": {"m": 0.5}})
    row = store.task("t1")
    assert isinstance(row, TaskRecord)
    assert (row.task_id, row.role, row.submitter, row.kind, row.state, row.reason) == (
        "t1", "submitter", "sub", "echo", "failed", "deadline",
    )  # fmt: skip
    assert row.spec == SPEC
    assert row.announce == b"\x01signed" and type(row.announce) is bytes
    assert row.deadline_at == 1234.5
    assert before <= row.created_at <= row.updated_at
    assert row.result == {"outputs": [{"name": "o", "sha256": "e"}], "metrics": {"m": 0.5}}
    assert row.result_collected is False
    store.mark_result_collected("t1")
    again = store.task("t1")
    assert again is not None and again.result_collected is True
    assert store.task("nope") is None


def test_a_task_without_a_result_has_none(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    _task(store)
    row = store.task("t1")
    assert row is not None and row.result is None and row.reason is None


def test_records_are_frozen_and_a_callers_edit_never_reaches_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    _task(store)
    row = store.task("t1")
    assert row is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.state = "done"  # type: ignore[misc]
    row.spec.pop("input_refs")  # a caller's own copy
    fresh = store.task("t1")
    assert fresh is not None and fresh.spec == SPEC


def test_tasks_filter_by_role_and_state_in_creation_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    _task(store, "a")
    _task(store, "b", role="worker", state="running")
    _task(store, "c", state="done")
    assert [t.task_id for t in store.tasks()] == ["a", "b", "c"]
    assert all(isinstance(t, TaskRecord) for t in store.tasks())
    assert [t.task_id for t in store.tasks(role="submitter")] == ["a", "c"]
    assert [t.task_id for t in store.tasks(role="submitter", states=("done",))] == ["c"]


def test_events_bids_awards_and_shards(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    _task(store)
    store.add_event("t1", "bidding", "a bid came")
    events = store.events("t1")
    assert [type(e) for e in events] == [EventRecord, EventRecord]
    assert [(e.task_id, e.state, e.message) for e in events] == [
        ("t1", "bidding", "announced"), ("t1", "bidding", "a bid came"),
    ]  # fmt: skip
    assert events[0].at <= events[1].at
    store.add_bid("t1", "q", b"bid-q")
    store.add_bid("t1", "p", b"bid-p")
    bids = store.bids("t1")
    assert [(b.peer_id, b.raw) for b in bids] == [("p", b"bid-p"), ("q", b"bid-q")]
    assert all(isinstance(b, BidRecord) and b.task_id == "t1" and b.received_at > 0 for b in bids)
    store.add_award(
        "t1", 0, b"award-0",
        [{"shard": 0, "peer_id": "p", "share": 0.25, "inputs": {"x": {"sha256": "s0", "size": 3}}},
         {"shard": 1, "peer_id": "q", "share": 0.75}],
    )  # fmt: skip
    assert store.awards("t1") == [AwardRecord(task_id="t1", epoch=0, raw=b"award-0")]
    sh = store.shards("t1")
    assert [type(s) for s in sh] == [ShardRecord, ShardRecord]
    assert (sh[0].shard, sh[0].peer_id, sh[0].epoch, sh[0].state, sh[0].attempts, sh[0].share) == (
        0, "p", 0, "awarded", 1, 0.25,
    )  # fmt: skip
    assert sh[0].inputs == {"x": {"sha256": "s0", "size": 3}}
    assert sh[1].inputs == {} and sh[1].share == 0.75


def test_results_votes_certificates_and_work(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    _task(store)
    store.add_result("t1", 2, 0, "p", b"r2", seq=4)
    store.add_result("t1", 1, 1, "q", b"r1", seq=9)
    assert store.results("t1") == [
        ResultRecord(task_id="t1", round=1, shard=1, peer_id="q", raw=b"r1", fetched=False, seq=9),
        ResultRecord(task_id="t1", round=2, shard=0, peer_id="p", raw=b"r2", fetched=False, seq=4),
    ]
    assert [r.raw for r in store.results("t1", 2)] == [b"r2"]
    store.add_vote("t1", 1, "p", 0, b"vote-p")
    assert store.votes("t1", 1) == [VoteRecord(task_id="t1", round=1, peer_id="p", attempt=0, raw=b"vote-p")]
    assert store.certificate("t1", 1) is None
    store.add_certificate("t1", 1, {"sha256": "o" * 64, "size": 7}, [b"v1", b"v2"])
    assert store.certificate("t1", 1) == CertificateRecord(
        task_id="t1", round=1, output={"sha256": "o" * 64, "size": 7}, votes=(b"v1", b"v2")
    )
    store.set_work("t1", 0, 1, 0, "running", None)
    store.set_work("t1", 1, 1, 0, "done", b"signed")
    w = store.work("t1", 1, 1)
    assert isinstance(w, WorkRecord)
    assert (w.task_id, w.shard, w.round, w.epoch, w.state, w.result) == ("t1", 1, 1, 0, "done", b"signed")
    assert store.work("t1", 9, 1) is None
    # Only work with a stored result is re-delivered after a restart.
    assert [(x.shard, x.result) for x in store.delivered_work()] == [(1, b"signed")]


def test_task_material_is_decoded_json_and_signed_bytes(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    _task(store)
    store.set_result("t1", {"outputs": [{"sha256": "r" * 64}]})
    store.set_round("t1", 1, {"round": 1, "output": "x"})
    store.add_certificate("t1", 1, {"sha256": "o" * 64}, [b"v"])
    values, raws = store.task_material("t1")
    assert SPEC in values and {"outputs": [{"sha256": "r" * 64}]} in values
    assert {"round": 1, "output": "x"} in values and {"sha256": "o" * 64} in values
    assert all(not isinstance(v, str) for v in values)
    assert b"\x01signed" in raws and b"v" in raws


def test_a_store_from_before_result_collected_maps_it_to_false(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, role TEXT NOT NULL, submitter TEXT NOT NULL,"
        " kind TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, spec TEXT NOT NULL, announce BLOB,"
        " created_at REAL NOT NULL, updated_at REAL NOT NULL, deadline_at REAL NOT NULL, result TEXT)"
    )
    db.execute(
        "INSERT INTO tasks VALUES ('old', 'worker', 's', 'echo', 'running', NULL, ?, NULL, 1, 2, 3, NULL)",
        ('{"k": 1}',),
    )
    db.commit()
    db.close()
    row = Store(path).task("old")
    assert row == TaskRecord(
        task_id="old", role="worker", submitter="s", kind="echo", state="running", reason=None,
        spec={"k": 1}, announce=None, created_at=1.0, updated_at=2.0, deadline_at=3.0, result=None,
        result_collected=False,
    )  # fmt: skip


def test_the_metrics_reads_counts_and_the_events_of_tasks_submitted_here(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    _task(store, "a")
    _task(store, "b", state="done")
    _task(store, "w", role="worker", state="running")
    assert store.task_counts() == {
        ("submitter", "bidding"): 1, ("submitter", "done"): 1, ("worker", "running"): 1,
    }  # fmt: skip
    for task_id in ("a", "w"):
        store.add_event(task_id, "running", "awarded 1 shard(s) to p")
        store.add_event(task_id, "running", "round 1/1 certified by 1 of 1")
        store.add_event(task_id, "running", "lost 1 peer(s); asking for fresh bids")
    got = store.submitted_events("awarded ", "round ")
    assert [(e.task_id, e.message) for e, _ in got] == [
        ("a", "awarded 1 shard(s) to p"), ("a", "round 1/1 certified by 1 of 1"),
    ]  # fmt: skip
    task = store.task("a")
    assert task is not None and all(created == task.created_at for _, created in got)
    assert store.submitted_events() == []
