"""peerd/store.py keeps the commit that counts (protocol/SPEC.md §11, *Which commit counts*).

A holder's highest-``seq`` commit for a round and shard supersedes its earlier ones until the
round's certificate forms; after that the certificate is final. The store used to keep the
FIRST commit (INSERT OR IGNORE), so the bundle of an honest task whose holder re-committed
before certification carried the superseded commit and failed ``peerctl verify``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from peerd.store import Store


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "db.sqlite")
    store.add_task(
        task_id="t",
        role="submitter",
        submitter="me",
        kind="keras-train",
        state="running",
        spec={},
        announce=b"\x00",
        deadline_at=time.time() + 60,
        message="",
    )
    return store


def _kept(store: Store, rnd: int = 1) -> dict[str, bytes]:
    return {r.peer_id: r.raw for r in store.results("t", rnd)}


def test_a_recommit_before_the_certificate_supersedes_the_first(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.add_result("t", 1, 0, "p", b"first", seq=5)
    assert store.add_result("t", 1, 0, "p", b"recommit", seq=7)
    assert _kept(store) == {"p": b"recommit"}
    # An older commit arriving late (gossip reorders) changes nothing.
    assert not store.add_result("t", 1, 0, "p", b"older", seq=6)
    assert _kept(store) == {"p": b"recommit"}


def test_after_the_certificate_commits_change_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add_result("t", 1, 0, "p", b"counted", seq=5)
    # The caller knows of the certificate before it is stored (the view forms it first) ...
    assert not store.add_result("t", 1, 0, "p", b"late", seq=8, certified=True)
    store.add_certificate("t", 1, {"sha256": "0" * 64}, [b"vote"])
    # ... and once stored, the store itself refuses to replace the round's commits.
    assert not store.add_result("t", 1, 0, "p", b"later", seq=9)
    assert _kept(store) == {"p": b"counted"}
    # A holder's first commit is kept even after the certificate: the certificate may name it.
    assert store.add_result("t", 1, 1, "q", b"q's", seq=3)
    # Other rounds are not frozen by round 1's certificate.
    store.add_result("t", 2, 0, "p", b"r2", seq=10)
    assert store.add_result("t", 2, 0, "p", b"r2 again", seq=11)
    assert _kept(store, 2) == {"p": b"r2 again"}


def test_a_store_from_before_the_seq_column_opens_and_orders(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE results (task_id TEXT NOT NULL, round INTEGER NOT NULL, shard INTEGER NOT NULL,"
        " peer_id TEXT NOT NULL, raw BLOB NOT NULL, fetched INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (task_id, round, shard, peer_id))"
    )
    db.execute("INSERT INTO results (task_id, round, shard, peer_id, raw) VALUES ('t', 1, 0, 'p', x'00')")
    db.commit()
    db.close()
    store = Store(path)
    assert store.add_result("t", 1, 0, "p", b"newer", seq=2)
    assert _kept(store) == {"p": b"newer"}
