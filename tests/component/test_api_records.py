"""peerd/api.py renders records (issue 7 item 2) exactly as it rendered ``sqlite3.Row`` before:
``task.list`` and ``task.get`` are compared, as serialised JSON bytes, with the same documents
built straight from the SQLite rows the old way (docs/rpc.md is the contract)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import trio

from peerd.api import SHARD_END, SHARD_FINAL, Api
from peerd.counters import Counters
from peerd.store import Store
from peerd.submitter import TERMINAL
from peerd.taskbook import TaskBook


def _fill(store: Store) -> None:
    spec = {"kind": "echo", "name": "ünï", "params": {"x": [1, 2.5e-7, None, True]}, "input_refs": {"d": {}}}
    for task_id, role, state in (
        ("t1", "submitter", "running"),
        ("t2", "worker", "running"),
        ("t3", "submitter", "done"),
    ):
        store.add_task(
            task_id=task_id, role=role, submitter="sub", kind="echo", state="bidding", spec=spec,
            announce=b"a", deadline_at=1e9 + 0.125, message="announced",
        )  # fmt: skip
        store.set_state(task_id, state, f"now {state}", reason="why" if state == "done" else None)
    store.add_award(
        "t1", 0, b"aw",
        [{"shard": 0, "peer_id": "p", "share": 1 / 3}, {"shard": 1, "peer_id": "q", "share": 2 / 3}],
    )  # fmt: skip
    store.set_shard_state("t1", 1, "done")
    store.add_award("t3", 0, b"aw", [{"shard": 0, "peer_id": "p", "share": 1.0}])
    store.set_result("t3", {"outputs": [{"name": "o", "sha256": "e" * 64, "size": 3}], "metrics": {"m": 0.1}})
    store.set_round("t3", 1, {"round": 1, "metrics": {"acc": 0.5}})


def _old_list(db: sqlite3.Connection) -> dict[str, Any]:
    out = []
    for row in db.execute("SELECT * FROM tasks ORDER BY created_at"):
        n = db.execute("SELECT COUNT(*) FROM shards WHERE task_id=?", (row["task_id"],)).fetchone()[0]
        out.append(
            {
                "task_id": row["task_id"], "name": json.loads(row["spec"]).get("name", ""),
                "role": row["role"], "kind": row["kind"], "state": row["state"],
                "created_at": row["created_at"], "updated_at": row["updated_at"], "shards": n,
                "reason": row["reason"],
            }
        )  # fmt: skip
    return {"tasks": out}


def _old_get(db: sqlite3.Connection, task_id: str) -> dict[str, Any]:
    row = db.execute("SELECT * FROM tasks WHERE task_id=?", (task_id,)).fetchone()
    spec = json.loads(row["spec"])
    spec.pop("input_refs", None)
    shards = []
    for s in db.execute("SELECT * FROM shards WHERE task_id=? ORDER BY shard", (task_id,)):
        state = s["state"]
        if row["state"] in TERMINAL and state not in SHARD_FINAL:
            state = SHARD_END[row["state"]]
        shards.append(
            {"index": s["shard"], "peer_id": s["peer_id"], "state": state, "share": s["share"],
             "attempts": s["attempts"], "epoch": s["epoch"]}
        )  # fmt: skip
    return {
        "task_id": task_id, "name": spec.get("name", ""), "role": row["role"], "submitter": row["submitter"],
        "kind": row["kind"], "state": row["state"], "reason": row["reason"], "created_at": row["created_at"],
        "updated_at": row["updated_at"], "deadline_at": row["deadline_at"],
        "spec": spec if row["role"] == "submitter" else None, "demand": None, "under_capacity": None,
        "shards": shards,
        "rounds": [json.loads(r[0])
                   for r in db.execute("SELECT info FROM rounds WHERE task_id=? ORDER BY round", (task_id,))],
        "result": json.loads(row["result"]) if row["result"] else None,
        "events": [{"at": e["at"], "state": e["state"], "message": e["message"]}
                   for e in db.execute("SELECT at, state, message FROM events WHERE task_id=? ORDER BY id",
                                       (task_id,))],
    }  # fmt: skip


def test_task_list_and_task_get_are_the_same_bytes_as_from_the_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    _fill(store)
    node = SimpleNamespace(store=store)
    api = Api(cast(Any, node), TaskBook("me", Counters()), cast(Any, None), None, 0.0)
    raw = sqlite3.connect(tmp_path / "db.sqlite")
    raw.row_factory = sqlite3.Row
    got = trio.run(api.task_list, {}, cast(Any, None))
    assert json.dumps(got).encode() == json.dumps(_old_list(raw)).encode()
    for task_id in ("t1", "t2", "t3"):
        assert json.dumps(api.task_json(task_id)).encode() == json.dumps(_old_get(raw, task_id)).encode()
    # task.get twice: the first rendering took nothing out of the stored spec.
    assert api.task_json("t1") == _old_get(raw, "t1")
    raw.close()
