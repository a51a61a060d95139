"""Exactly once per node (issue 8 item 6, peerd/executed.py): the record of executed awards and
the replay marks of announces and awards survive a restart of the contractor. The contractor
runs against the real config, signer, inbox, store and task book of
``test_contractor_driver.py``'s rig (fakes only for the p2p node and the worker pool); a
"restart" is a fresh rig over the same state files. Every wait is bounded."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import trio

from peerd.executed import ExecutedAwards
from peerd.node import BID_PROTOCOL
from peerd.store import Store
from protocol.envelope import Signed
from tests.component.test_contractor_driver import SUB, TASK, Rig, announce, bid_and_award, wait_until


def test_a_claim_holds_once_and_marks_keep_the_highest_sequence(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")  # the store's own init creates the tables
    rec = ExecutedAwards(store.db)
    assert rec.claim(TASK, 0, 1, 1) and not rec.claim(TASK, 0, 1, 1)
    assert rec.claim(TASK, 0, 1, 2) and rec.claim(TASK, 1, 1, 1)  # another round, another epoch
    assert rec.executed(TASK, 0, 1) and not rec.executed(TASK, 0, 2)
    store.close()
    again = ExecutedAwards(sqlite3.connect(str(tmp_path / "db.sqlite"), isolation_level=None))
    assert not again.claim(TASK, 0, 1, 1) and again.executed(TASK, 1, 1)


async def test_a_restarted_contractor_drops_a_replayed_announce_and_award_and_runs_nothing(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp_path, nursery)
        ann, _, award = await bid_and_award(rig)
        await wait_until(lambda: rig.count("results.delivered") == 1, "the shard done and delivered")
        assert len(rig.pool.jobs) == 1
        nursery.cancel_scope.cancel()
    # The same node after a restart: its in-memory replay guard, task book and machines are
    # gone; the store, the sequence file and the blobs are not.
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp_path, nursery)
        view = rig.book.add(ann)
        assert view is not None
        await rig.contractor.on_announce(view, ann)
        assert rig.count("dropped.replayed_announce") == 1
        assert rig.contractor.machines(TASK) == [] and rig.p2p.sent_of(BID_PROTOCOL) == []
        assert rig.contractor.verify_award(view, award)
        view.awards[0] = award
        rig.contractor.on_award(view)
        assert rig.count("dropped.replayed_award") == 1
        assert rig.contractor.machines(TASK) == []
        assert rig.pool.jobs == [] and rig.count("jobs.started") == 0
        nursery.cancel_scope.cancel()


async def test_an_award_whose_shard_ran_here_is_refused_even_without_a_mark(tmp_path: Path) -> None:
    # The marks can be forgotten (they expire); the executed record is the last word.
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp_path, nursery)
        ann, _, award = await bid_and_award(rig)
        await wait_until(lambda: rig.count("results.delivered") == 1, "the shard done and delivered")
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp_path, nursery)
        rig.node.store.db.execute("DELETE FROM replay_marks")
        view = rig.book.add(ann)
        assert view is not None
        view.awards[0] = award
        rig.contractor.on_award(view)
        assert rig.count("dropped.replayed_award") == 1 and rig.contractor.machines(TASK) == []
        assert rig.pool.jobs == []
        nursery.cancel_scope.cancel()


async def test_a_fresh_reannounce_after_a_restart_is_bid_on(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp_path, nursery)
        ann, view = announce(rig)
        await rig.contractor.on_announce(view, ann)
        await wait_until(lambda: rig.count("bids.sent") == 1, "the bid")
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp_path, nursery)
        body = {k: v for k, v in ann.message.to_wire().items() if k not in ("seq", "issued_at", "expires_at")}
        fresh: Signed = SUB.seal(type(ann.message), now_ms=ann.message.issued_at + 1, ttl_ms=60_000, **body)
        view2 = rig.book.add(fresh)
        assert view2 is not None
        await rig.contractor.on_announce(view2, fresh)
        await wait_until(lambda: rig.count("bids.sent") == 1, "a bid on the fresh re-announce")
        assert rig.count("dropped.replayed_announce") == 0
        nursery.cancel_scope.cancel()


def test_expired_marks_and_the_executed_awards_they_guarded_are_forgotten(tmp_path: Path) -> None:
    """The record stays bounded: once every announce and award of a task that this node acted
    on has expired (refused at the door as ``expired`` from then on), its marks and executed
    rows go; a task with a live mark keeps both."""
    from protocol.envelope import Signer, open_envelope
    from protocol.fuzz import sample_messages
    from protocol.messages import Award, TaskAnnounce
    from protocol.replay import CLOCK_SKEW_MS

    signer = Signer(b"\x05" * 32)
    store = Store(tmp_path / "db.sqlite")
    rec = ExecutedAwards(store.db)
    t_old, t_new = 1_700_000_000_000, 1_700_000_600_000
    for t in (t_old, t_new):
        for m in sample_messages(now_ms=t):
            if isinstance(m, TaskAnnounce | Award):
                task = m.task_id if t == t_old else "ef" * 16
                m = dataclasses.replace(m, task_id=task)
                rec.remember(open_envelope(signer.seal(m)))
        assert rec.claim("0123456789abcdef0123456789abcdef" if t == t_old else "ef" * 16, 0, 0, 0)
    # Before the old task's messages expire (30 s TTL, plus the clock skew) nothing goes.
    assert rec.forget_expired(t_old + 30_000) == 0
    dropped = rec.forget_expired(t_old + 30_000 + CLOCK_SKEW_MS + 1)
    assert dropped == 3  # the old task's announce and award marks, and its executed row
    assert not rec.executed("0123456789abcdef0123456789abcdef", 0, 0)
    assert rec.executed("ef" * 16, 0, 0)  # the newer task's marks are live
    # Forgotten means forgotten: the old award could be claimed again — and is refused as
    # expired before it ever reaches this record.
    assert rec.claim("0123456789abcdef0123456789abcdef", 0, 0, 0)
