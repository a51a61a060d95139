"""Each peer's record, as this node has seen it deliver (docs/allocation.md "Caps").

The rules are protocol/trust.py's (pure); this module keeps the records durable in the
node's SQLite store, in its own table (``reputation``, created by :func:`init_schema`, which
``Store`` calls), and answers the three questions the daemon asks:

* the submitter driver: what are the records and who is banned (``TrustKnown``), and record
  this outcome (``act.Observe``);
* ``peerctl peer ban`` / ``unban``: ban or forgive a peer by hand;
* ``peerctl peers``: each peer's history and trust.

A peer is banned by hand (until unbanned) or by the ``[policy]`` threshold (until decay lifts
its trust above it again, or ``unban`` forgives its failures). Counts are stored as of
``updated_ms`` and decayed when read.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass

from protocol import trust as tr

SCHEMA = """
CREATE TABLE IF NOT EXISTS reputation (
    peer_id    TEXT PRIMARY KEY,
    done       REAL NOT NULL DEFAULT 0,
    failed     REAL NOT NULL DEFAULT 0,
    timed_out  REAL NOT NULL DEFAULT 0,
    disagreed  REAL NOT NULL DEFAULT 0,
    shown      REAL,                       -- EWMA of delivered GFLOP/s; NULL: no history
    updated_ms INTEGER NOT NULL DEFAULT 0,
    banned     INTEGER NOT NULL DEFAULT 0, -- 1: banned by hand (peerctl peer ban)
    ban_reason TEXT
);
"""

#: At most this many peers are read into one ``TrustKnown`` (the most recently seen first):
#: a flood of throwaway identities must not make every award read an unbounded table.
MAX_RECORDS = 4096


def init_schema(db: sqlite3.Connection) -> None:
    """Create the table (the store calls this once when it opens)."""
    db.executescript(SCHEMA)


@dataclass(frozen=True, slots=True)
class PeerTrust:
    """One row for ``peerctl peers``: the decayed record, its score and whether it is banned."""

    record: tr.PeerRecord
    trust: float
    banned: bool
    why_banned: str | None

    def to_json(self) -> dict[str, object]:
        r = self.record
        return {
            "done": round(r.done, 3),
            "failed": round(r.failed, 3),
            "timed_out": round(r.timed_out, 3),
            "disagreed": round(r.disagreed, 3),
            "shown_gflops": None if r.shown is None else round(r.shown, 3),
            "trust": round(self.trust, 3),
            "banned": self.banned,
            "ban_reason": self.why_banned,
        }


class Reputation:
    """The records in ``db`` under ``policy``. Every method is one short statement or
    transaction, safe from the trio thread (SQLite calls are quick and local)."""

    def __init__(self, db: sqlite3.Connection, policy: tr.TrustPolicy) -> None:
        self.db = db
        self.policy = policy
        self._lock = threading.Lock()

    @staticmethod
    def _record(row: sqlite3.Row | tuple[object, ...]) -> tr.PeerRecord:
        peer, done, failed, timed_out, disagreed, shown, updated = tuple(row)[:7]
        return tr.PeerRecord(
            peer_id=str(peer),
            done=float(done),
            failed=float(failed),
            timed_out=float(timed_out),
            disagreed=float(disagreed),
            shown=None if shown is None else float(shown),
            updated_ms=int(updated),
        )

    _COLS = "peer_id, done, failed, timed_out, disagreed, shown, updated_ms, banned, ban_reason"

    def get(self, peer: str, now_ms: int) -> PeerTrust | None:
        row = self.db.execute(f"SELECT {self._COLS} FROM reputation WHERE peer_id = ?", (peer,)).fetchone()
        return None if row is None else self._view(row, now_ms)

    def _view(self, row: sqlite3.Row | tuple[object, ...], now_ms: int) -> PeerTrust:
        rec = tr.decay(self._record(row), now_ms, self.policy)
        values = tuple(row)
        by_hand = bool(values[7])
        over = tr.banned(rec, self.policy)
        why = (
            f"banned by hand: {values[8]}"
            if by_hand
            else f"trust {tr.trust(rec):.2f} below policy.ban_threshold {self.policy.ban_threshold:g}"
            if over
            else None
        )
        return PeerTrust(record=rec, trust=tr.trust(rec), banned=by_hand or over, why_banned=why)

    def all(self, now_ms: int, limit: int = MAX_RECORDS) -> dict[str, PeerTrust]:
        rows = self.db.execute(
            f"SELECT {self._COLS} FROM reputation ORDER BY updated_ms DESC, peer_id LIMIT ?", (limit,)
        ).fetchall()
        return {str(r[0]): self._view(r, now_ms) for r in rows}

    def trust_known(self, now_ms: int) -> tuple[dict[str, tr.PeerRecord], frozenset[str]]:
        """What ``ev.TrustKnown`` carries: the decayed records, and every banned peer."""
        views = self.all(now_ms)
        banned = {p for p, v in views.items() if v.banned}
        # A hand ban outlives the MAX_RECORDS window.
        banned |= {str(r[0]) for r in self.db.execute("SELECT peer_id FROM reputation WHERE banned = 1")}
        return {p: v.record for p, v in views.items()}, frozenset(banned)

    def observe(self, peer: str, outcome: str, now_ms: int, work_gflop: float, wall_ms: int) -> tr.PeerRecord:
        """Count one outcome of ``peer`` (``act.Observe``) and store the new record."""
        with self._lock:
            row = self.db.execute(
                f"SELECT {self._COLS} FROM reputation WHERE peer_id = ?", (peer,)
            ).fetchone()
            rec = self._record(row) if row is not None else tr.PeerRecord(peer, updated_ms=now_ms)
            delivered = tr.delivered_capacity(work_gflop, wall_ms, self.policy.min_measure_ms)
            new = tr.observe(rec, outcome, now_ms, self.policy, delivered)
            self.db.execute(
                "INSERT INTO reputation (peer_id, done, failed, timed_out, disagreed, shown, updated_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(peer_id) DO UPDATE SET done = excluded.done,"
                " failed = excluded.failed, timed_out = excluded.timed_out,"
                " disagreed = excluded.disagreed, shown = excluded.shown, updated_ms = excluded.updated_ms",
                (peer, new.done, new.failed, new.timed_out, new.disagreed, new.shown, new.updated_ms),
            )
            return new

    def ban(self, peer: str, reason: str, now_ms: int) -> bool:
        """Ban ``peer`` by hand; False if it already was."""
        with self._lock:
            row = self.db.execute("SELECT banned FROM reputation WHERE peer_id = ?", (peer,)).fetchone()
            if row is not None and row[0]:
                return False
            self.db.execute(
                "INSERT INTO reputation (peer_id, updated_ms, banned, ban_reason) VALUES (?, ?, 1, ?)"
                " ON CONFLICT(peer_id) DO UPDATE SET banned = 1, ban_reason = excluded.ban_reason",
                (peer, now_ms, reason),
            )
            return True

    def unban(self, peer: str, now_ms: int) -> bool:
        """Forgive ``peer``: lift a hand ban, and a threshold ban too (its failed, timed-out
        and disagreeing counts go to 0; what it delivered stays). False if it was not banned."""
        with self._lock:
            view = self.get(peer, now_ms)
            if view is None or not view.banned:
                return False
            self.db.execute(
                "UPDATE reputation SET banned = 0, ban_reason = NULL, failed = 0, timed_out = 0,"
                " disagreed = 0 WHERE peer_id = ?",
                (peer,),
            )
            return True


__all__ = ["MAX_RECORDS", "PeerTrust", "Reputation", "init_schema"]
