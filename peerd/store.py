"""Durable daemon state in SQLite (docs/design.md §7): tasks, bids, awards, shards, results,
votes, certificates, rounds and events.

Why SQLite: one file, transactions, crash safety. WAL mode with synchronous=NORMAL is
durable against a kill -9 of the daemon (the WAL is fsynced at checkpoints; a process
crash cannot lose a committed transaction — only a power cut could lose the last few),
and every multi-row change happens in one transaction, so a kill -9 never leaves a
half-written task. Signed messages are stored as their exact envelope bytes: the
store never re-serialises what a peer signed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peerd import executed, reputation
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    role        TEXT NOT NULL,              -- 'submitter' or 'worker'
    submitter   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT,
    spec        TEXT NOT NULL,              -- JSON
    announce    BLOB,                       -- signed envelope
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    deadline_at REAL NOT NULL,
    result      TEXT,                       -- JSON
    result_collected INTEGER NOT NULL DEFAULT 0  -- 1: its blobs were deleted over budget
);
CREATE TABLE IF NOT EXISTS bids (
    task_id TEXT NOT NULL, peer_id TEXT NOT NULL, raw BLOB NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (task_id, peer_id)
);
CREATE TABLE IF NOT EXISTS awards (
    task_id TEXT NOT NULL, epoch INTEGER NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY (task_id, epoch)
);
CREATE TABLE IF NOT EXISTS shards (
    task_id TEXT NOT NULL, shard INTEGER NOT NULL, peer_id TEXT NOT NULL, epoch INTEGER NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 1, share REAL NOT NULL,
    inputs TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL,
    PRIMARY KEY (task_id, shard)
);
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT NOT NULL, round INTEGER NOT NULL, shard INTEGER NOT NULL, peer_id TEXT NOT NULL,
    raw BLOB NOT NULL, fetched INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, round, shard, peer_id)
);
CREATE TABLE IF NOT EXISTS votes (
    task_id TEXT NOT NULL, round INTEGER NOT NULL, peer_id TEXT NOT NULL, attempt INTEGER NOT NULL,
    raw BLOB NOT NULL,
    PRIMARY KEY (task_id, round, peer_id, attempt)
);
CREATE TABLE IF NOT EXISTS certificates (
    task_id TEXT NOT NULL, round INTEGER NOT NULL, output TEXT NOT NULL, votes TEXT NOT NULL,
    PRIMARY KEY (task_id, round)
);
CREATE TABLE IF NOT EXISTS rounds (
    task_id TEXT NOT NULL, round INTEGER NOT NULL, info TEXT NOT NULL,
    PRIMARY KEY (task_id, round)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, at REAL NOT NULL,
    state TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task ON events (task_id, id);
-- Worker side: outputs we produced and acknowledged, so a restart does not lose them.
CREATE TABLE IF NOT EXISTS work (
    task_id TEXT NOT NULL, shard INTEGER NOT NULL, round INTEGER NOT NULL, epoch INTEGER NOT NULL,
    state TEXT NOT NULL, result BLOB, updated_at REAL NOT NULL,
    PRIMARY KEY (task_id, shard, round)
);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        reputation.init_schema(self.db)  # the reputation table is peerd/reputation.py's
        executed.create_tables(self.db)  # the executed-awards record (issue 8 item 6)
        # Columns added since the first release, for stores written before them.
        for table, column in (("results", "seq"), ("tasks", "result_collected")):
            cols = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in cols:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: all or nothing, even across a kill -9."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- tasks ------------------------------------------------------------------------
    def add_task(
        self,
        *,
        task_id: str,
        role: str,
        submitter: str,
        kind: str,
        state: str,
        spec: dict[str, Any],
        announce: bytes | None,
        deadline_at: float,
        message: str,
    ) -> bool:
        now = time.time()
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO tasks (task_id, role, submitter, kind, state, spec, announce,"
                " created_at, updated_at, deadline_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (task_id, role, submitter, kind, state, json.dumps(spec), announce, now, now, deadline_at),
            )
            if cur.rowcount:
                db.execute(
                    "INSERT INTO events (task_id, at, state, message) VALUES (?,?,?,?)",
                    (task_id, now, state, message),
                )
            return bool(cur.rowcount)

    def set_state(self, task_id: str, state: str, message: str, *, reason: str | None = None) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute(
                "UPDATE tasks SET state=?, reason=?, updated_at=? WHERE task_id=?",
                (state, reason, now, task_id),
            )
            db.execute(
                "INSERT INTO events (task_id, at, state, message) VALUES (?,?,?,?)",
                (task_id, now, state, message),
            )

    def add_event(self, task_id: str, state: str, message: str) -> None:
        self.db.execute(
            "INSERT INTO events (task_id, at, state, message) VALUES (?,?,?,?)",
            (task_id, time.time(), state, message),
        )

    def set_result(self, task_id: str, result: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE tasks SET result=?, updated_at=? WHERE task_id=?",
            (json.dumps(result), time.time(), task_id),
        )

    def task(self, task_id: str) -> TaskRecord | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM tasks WHERE task_id=?", (task_id,)
        ).fetchone()
        return None if row is None else TaskRecord.from_row(row)

    def tasks(self, *, role: str | None = None, states: tuple[str, ...] | None = None) -> list[TaskRecord]:
        q = "SELECT * FROM tasks"
        args: list[Any] = []
        conds = []
        if role:
            conds.append("role=?")
            args.append(role)
        if states:
            conds.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        return [TaskRecord.from_row(r) for r in self.db.execute(q + " ORDER BY created_at", args)]

    def mark_result_collected(self, task_id: str) -> None:
        """The blob collector deleted this finished task's blobs (over limits.blob_store_mb)."""
        with self.tx() as db:
            db.execute("UPDATE tasks SET result_collected=1 WHERE task_id=?", (task_id,))
            row = db.execute("SELECT state FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if row is not None:
                db.execute(
                    "INSERT INTO events (task_id, at, state, message) VALUES (?,?,?,?)",
                    (
                        task_id,
                        time.time(),
                        row["state"],
                        "outputs deleted: the blob store was over its budget (limits.blob_store_mb)",
                    ),
                )

    def task_material(self, task_id: str) -> tuple[list[Any], list[bytes]]:
        """Everything stored about one task that may name a blob: its JSON columns, decoded,
        and its signed messages (announce, awards, results, votes, our shard results). For
        the blob collector (peerd/blobgc.py), which keeps every blob a live task names."""
        texts: list[str] = []
        raws: list[bytes] = []
        row = self.db.execute(
            "SELECT spec, result, announce FROM tasks WHERE task_id=?", (task_id,)
        ).fetchone()
        if row is not None:
            texts += [t for t in (row["spec"], row["result"]) if t]
            if row["announce"]:
                raws.append(bytes(row["announce"]))
        for sql in (
            "SELECT inputs FROM shards WHERE task_id=?",
            "SELECT output FROM certificates WHERE task_id=?",
            "SELECT info FROM rounds WHERE task_id=?",
        ):
            texts += [r[0] for r in self.db.execute(sql, (task_id,)) if r[0]]
        for sql in (
            "SELECT raw FROM awards WHERE task_id=?",
            "SELECT raw FROM results WHERE task_id=?",
            "SELECT raw FROM votes WHERE task_id=?",
            "SELECT result FROM work WHERE task_id=? AND result IS NOT NULL",
        ):
            raws += [bytes(r[0]) for r in self.db.execute(sql, (task_id,))]
        for r in self.db.execute("SELECT votes FROM certificates WHERE task_id=?", (task_id,)):
            raws += [bytes.fromhex(v) for v in json.loads(r[0])]
        return [v for v in map(_decoded, texts) if v is not _NOT_JSON], raws

    def events(self, task_id: str) -> list[EventRecord]:
        return [
            EventRecord.from_row(r)
            for r in self.db.execute(
                "SELECT task_id, at, state, message FROM events WHERE task_id=? ORDER BY id", (task_id,)
            )
        ]

    # -- bids / awards / shards ---------------------------------------------------------
    def add_bid(self, task_id: str, peer_id: str, raw: bytes) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO bids (task_id, peer_id, raw, received_at) VALUES (?,?,?,?)",
            (task_id, peer_id, raw, time.time()),
        )
        return bool(cur.rowcount)

    def bids(self, task_id: str) -> list[BidRecord]:
        return [
            BidRecord.from_row(r)
            for r in self.db.execute("SELECT * FROM bids WHERE task_id=? ORDER BY peer_id", (task_id,))
        ]

    def add_award(self, task_id: str, epoch: int, raw: bytes, shards: list[dict[str, Any]]) -> None:
        """Record an award and (re)assign its shards in one transaction."""
        now = time.time()
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO awards (task_id, epoch, raw) VALUES (?,?,?)", (task_id, epoch, raw)
            )
            for sh in shards:
                old = db.execute(
                    "SELECT peer_id, attempts, state FROM shards WHERE task_id=? AND shard=?",
                    (task_id, sh["shard"]),
                ).fetchone()
                moved = old is None or old["peer_id"] != sh["peer_id"]
                attempts = 1 if old is None else old["attempts"] + moved
                # A re-award rewrites every shard row; one that stays with its peer keeps its state
                # (a finished shard must not go back to "awarded" because another one moved).
                state = sh.get("state", "awarded") if moved else old["state"]
                db.execute(
                    "INSERT OR REPLACE INTO shards (task_id, shard, peer_id, epoch, state, attempts, share,"
                    " inputs, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        task_id,
                        sh["shard"],
                        sh["peer_id"],
                        epoch,
                        state,
                        attempts,
                        sh["share"],
                        json.dumps(sh.get("inputs", {})),
                        now,
                    ),
                )

    def awards(self, task_id: str) -> list[AwardRecord]:
        return [
            AwardRecord.from_row(r)
            for r in self.db.execute("SELECT * FROM awards WHERE task_id=? ORDER BY epoch", (task_id,))
        ]

    def shards(self, task_id: str) -> list[ShardRecord]:
        return [
            ShardRecord.from_row(r)
            for r in self.db.execute("SELECT * FROM shards WHERE task_id=? ORDER BY shard", (task_id,))
        ]

    def set_shard_state(self, task_id: str, shard: int, state: str) -> None:
        self.db.execute(
            "UPDATE shards SET state=?, updated_at=? WHERE task_id=? AND shard=?",
            (state, time.time(), task_id, shard),
        )

    # -- results / votes / certificates / rounds --------------------------------------
    def add_result(
        self,
        task_id: str,
        round_no: int,
        shard: int,
        peer_id: str,
        raw: bytes,
        *,
        seq: int,
        certified: bool = False,
    ) -> bool:
        """Keep ``peer_id``'s commit for (round, shard) that counts (protocol/SPEC.md §11, *Which
        commit counts*): a higher ``seq`` supersedes the stored one until the round has a
        certificate, which is final. ``certified``: the caller knows of the round's certificate
        before it is stored here. The first commit of a peer is kept whenever it comes: a
        certificate may name it. True when the row was written."""
        cur = self.db.execute(
            "INSERT INTO results (task_id, round, shard, peer_id, raw, seq) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT (task_id, round, shard, peer_id) DO UPDATE SET raw=excluded.raw, seq=excluded.seq"
            " WHERE excluded.seq > results.seq AND NOT ? AND NOT EXISTS"
            " (SELECT 1 FROM certificates c WHERE c.task_id=excluded.task_id AND c.round=excluded.round)",
            (task_id, round_no, shard, peer_id, raw, seq, certified),
        )
        return bool(cur.rowcount)

    def results(self, task_id: str, round_no: int | None = None) -> list[ResultRecord]:
        if round_no is None:
            rows = self.db.execute("SELECT * FROM results WHERE task_id=? ORDER BY round, shard", (task_id,))
        else:
            rows = self.db.execute(
                "SELECT * FROM results WHERE task_id=? AND round=? ORDER BY shard", (task_id, round_no)
            )
        return [ResultRecord.from_row(r) for r in rows]

    def add_vote(self, task_id: str, round_no: int, peer_id: str, attempt: int, raw: bytes) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO votes (task_id, round, peer_id, attempt, raw) VALUES (?,?,?,?,?)",
            (task_id, round_no, peer_id, attempt, raw),
        )
        return bool(cur.rowcount)

    def votes(self, task_id: str, round_no: int) -> list[VoteRecord]:
        return [
            VoteRecord.from_row(r)
            for r in self.db.execute("SELECT * FROM votes WHERE task_id=? AND round=?", (task_id, round_no))
        ]

    def add_certificate(
        self, task_id: str, round_no: int, output: dict[str, Any], votes: list[bytes]
    ) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO certificates (task_id, round, output, votes) VALUES (?,?,?,?)",
            (task_id, round_no, json.dumps(output), json.dumps([v.hex() for v in votes])),
        )
        return bool(cur.rowcount)

    def certificate(self, task_id: str, round_no: int) -> CertificateRecord | None:
        row = self.db.execute(
            "SELECT * FROM certificates WHERE task_id=? AND round=?", (task_id, round_no)
        ).fetchone()
        return None if row is None else CertificateRecord.from_row(row)

    def set_round(self, task_id: str, round_no: int, info: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO rounds (task_id, round, info) VALUES (?,?,?)",
            (task_id, round_no, json.dumps(info)),
        )

    def rounds(self, task_id: str) -> list[dict[str, Any]]:
        return [
            json.loads(r["info"])
            for r in self.db.execute("SELECT info FROM rounds WHERE task_id=? ORDER BY round", (task_id,))
        ]

    # -- worker side ------------------------------------------------------------------
    def set_work(
        self, task_id: str, shard: int, round_no: int, epoch: int, state: str, result: bytes | None
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO work (task_id, shard, round, epoch, state, result, updated_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (task_id, shard, round_no, epoch, state, result, time.time()),
        )

    def work(self, task_id: str, shard: int, round_no: int) -> WorkRecord | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM work WHERE task_id=? AND shard=? AND round=?", (task_id, shard, round_no)
        ).fetchone()
        return None if row is None else WorkRecord.from_row(row)

    # -- for the metrics endpoint (peerd/metrics.py) -------------------------------------
    def task_counts(self) -> dict[tuple[str, str], int]:
        """(role, state) → how many tasks the store holds in that state."""
        rows = self.db.execute("SELECT role, state, COUNT(*) FROM tasks GROUP BY role, state")
        return {(role, state): n for role, state, n in rows}

    def submitted_events(self, *prefixes: str) -> list[tuple[EventRecord, float]]:
        """The events of tasks submitted here whose message starts with one of ``prefixes``,
        in the order they happened, each with its task's ``created_at``."""
        if not prefixes:
            return []
        starts = " OR ".join("instr(e.message, ?) = 1" for _ in prefixes)
        rows = self.db.execute(
            "SELECT e.task_id, e.at, e.state, e.message, t.created_at FROM events e"
            f" JOIN tasks t ON t.task_id = e.task_id WHERE t.role = 'submitter' AND ({starts}) ORDER BY e.id",
            prefixes,
        )
        return [(EventRecord.from_row(r), r["created_at"]) for r in rows]

    def delivered_work(self) -> list[WorkRecord]:
        """Every stored result we produced (a restart re-delivers them: the submitter dedupes)."""
        return [
            WorkRecord.from_row(r)
            for r in self.db.execute("SELECT * FROM work WHERE result IS NOT NULL ORDER BY rowid")
        ]


_NOT_JSON = object()


def _decoded(text: str) -> Any:
    """A JSON column's value, or ``_NOT_JSON`` for text that is not JSON (it names no blob)."""
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON
