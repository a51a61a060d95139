"""Exactly once per node (issue 8 item 6): the awards this contractor executed, and the
replay marks of the announces and awards it acted on, kept in the store across restarts.

The inbox's replay guard (``protocol.replay.ReplayGuard``) lives in memory, and announces and
awards stay valid for up to 31 days (SPEC §7): after a restart, an old announce and award
re-injected into the task topic used to pass every check and run a finished shard again.
Two durable records close that:

* ``executed_awards``: one row per (task, epoch, shard, round) whose job this node started,
  written before the job starts. A (task, epoch, shard) award with a row is never bound or
  adopted again, and a job is never started twice for the same row.
* ``replay_marks``: the highest sequence of each (submitter, kind, scope) announce or award
  this contractor acted on. After a restart one not above its mark is a replay: dropped and
  counted (``dropped.replayed_announce``, ``dropped.replayed_award``). Marks are forgotten
  once everything recorded in them has expired, as the in-memory guard does (an expired
  message is refused as ``expired`` anyway).

The tables are created by :func:`create_tables`, called from the store's initialisation.
"""

from __future__ import annotations

import sqlite3
import time

from protocol.envelope import Signed
from protocol.replay import CLOCK_SKEW_MS

TABLES = """
CREATE TABLE IF NOT EXISTS executed_awards (
    task_id TEXT NOT NULL, epoch INTEGER NOT NULL, shard INTEGER NOT NULL, round INTEGER NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (task_id, epoch, shard, round)
);
CREATE TABLE IF NOT EXISTS replay_marks (
    signer TEXT NOT NULL, kind TEXT NOT NULL, scope TEXT NOT NULL, seq INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (signer, kind, scope)
);
"""

#: The kinds whose replay would make this node work again (SPEC §7.2, §7.5).
MARKED_KINDS = frozenset({"announce", "award"})


def create_tables(db: sqlite3.Connection) -> None:
    """Create this module's tables (idempotent; ``peerd.store.Store`` calls it)."""
    db.executescript(TABLES)


class ExecutedAwards:
    """The durable record over the store's connection (one daemon thread uses it)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        create_tables(db)  # a store built before this module existed
        #: Envelope digests acted on by this process: the same message handed over again
        #: (a view updated twice) is not a replay from before a restart.
        self._this_run: set[str] = set()

    # -- awards executed ---------------------------------------------------------------------
    def claim(self, task_id: str, epoch: int, shard: int, round_no: int) -> bool:
        """Record that the job of (task, epoch, shard, round) starts now. False when it was
        started before (by this process or an earlier one): it must not run again."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO executed_awards (task_id, epoch, shard, round, started_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (task_id, epoch, shard, round_no, time.time()),
        )
        return cur.rowcount == 1

    def executed(self, task_id: str, epoch: int, shard: int) -> bool:
        """Whether any round of the (task, epoch, shard) award was started here."""
        row = self.db.execute(
            "SELECT 1 FROM executed_awards WHERE task_id = ? AND epoch = ? AND shard = ? LIMIT 1",
            (task_id, epoch, shard),
        ).fetchone()
        return row is not None

    # -- replay marks ------------------------------------------------------------------------
    def seen_this_run(self, signed: Signed) -> bool:
        """Whether this process already acted on ``signed`` (:meth:`remember`)."""
        return signed.digest in self._this_run

    def replayed(self, signed: Signed) -> bool:
        """Whether ``signed`` (an announce or award) is one this node acted on before a
        restart, or older than one: its sequence is not above the stored mark."""
        if signed.digest in self._this_run or signed.kind not in MARKED_KINDS:
            return False
        m = signed.message
        row = self.db.execute(
            "SELECT seq FROM replay_marks WHERE signer = ? AND kind = ? AND scope = ?",
            (signed.signer, m.KIND, m.scope()),
        ).fetchone()
        return row is not None and m.seq <= int(row[0])

    def remember(self, signed: Signed) -> None:
        """Raise the mark of ``signed``'s (signer, kind, scope) to its sequence."""
        if signed.kind not in MARKED_KINDS:
            return
        self._this_run.add(signed.digest)
        m = signed.message
        self.db.execute(
            "INSERT INTO replay_marks (signer, kind, scope, seq, expires_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (signer, kind, scope) DO UPDATE SET"
            " seq = max(seq, excluded.seq), expires_at = max(expires_at, excluded.expires_at)",
            (signed.signer, m.KIND, m.scope(), m.seq, m.expires_at),
        )

    def forget_expired(self, now_ms: int) -> int:
        """Drop marks whose every recorded message has expired (they cannot be replayed), and
        the executed awards of tasks left with no mark: every announce and award of such a task
        that this node acted on has expired, and an expired one is refused at the door
        (``expired``), so the row can no longer stop anything. Without this both tables grow
        by every task the node ever ran. Returns the rows dropped."""
        # Marks first: a kill between the two statements leaves rows the next pass removes,
        # never a row without the mark that made it prunable.
        marks = self.db.execute(
            "DELETE FROM replay_marks WHERE expires_at + ? < ?", (CLOCK_SKEW_MS, now_ms)
        ).rowcount
        jobs = self.db.execute(
            "DELETE FROM executed_awards WHERE task_id NOT IN (SELECT scope FROM replay_marks)"
        ).rowcount
        return marks + jobs


__all__ = ["ExecutedAwards", "create_tables"]
