"""peerd/taskbook.py: a flood of signed announces cannot push out a task this node has a part in.

The book used to evict the oldest view whatever it was, so once it was full every new foreign
announce evicted a view of a running task — ours included, and the submitter, contractor and
committee roles then lost the task (issue 7).
"""

from __future__ import annotations

import itertools

import trio

from peerd.counters import Counters
from peerd.taskbook import TaskBook, TaskView
from protocol.envelope import Signed, Signer, open_envelope
from protocol.messages import Award, Bid, TaskAnnounce

NOW = 1_700_000_000_000
_seq = itertools.count(1)
ME = Signer(bytes([1]) * 32)
PEER = Signer(bytes([2]) * 32)
FLOODER = Signer(bytes([3]) * 32)


def announce(by: Signer, n: int, *, deadline_ms: int = 600_000) -> Signed:
    msg = TaskAnnounce(
        seq=next(_seq),
        issued_at=NOW,
        expires_at=NOW + 600_000,
        task_id=f"{n:032x}",
        kind="echo",
        work=1.0,
        deadline_ms=deadline_ms,
        max_shards=1,
        resources={"gpu": False, "memory_mb": 0},
        aggregation="none",
        rounds=1,
        params={},
        inputs={},
        bid_window_ms=300,
        net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
    )
    return open_envelope(by.seal(msg), kinds=frozenset({"announce"}))


def award_to(view: TaskView, holder: Signer, by: Signer) -> None:
    bid = Bid(seq=next(_seq), issued_at=NOW, expires_at=NOW + 60_000, task_id=view.task_id, c0=1.0, load=0.0)
    msg = Award(
        seq=next(_seq),
        issued_at=NOW,
        expires_at=NOW + 600_000,
        task_id=view.task_id,
        epoch=0,
        bids=(holder.seal(bid),),
        under_capacity=False,
        excluded=(),
        assignments=({"shard": 0, "peer_id": holder.peer_id, "share": 1.0, "inputs": {}},),
    )
    view.awards[0] = open_envelope(by.seal(msg), kinds=frozenset({"award"}))


def test_a_flood_never_evicts_our_tasks_or_our_shards() -> None:
    async def main() -> None:
        counters = Counters()
        book = TaskBook(ME.peer_id, counters, max_tasks=4)
        ours = book.add(announce(ME, 1))
        held = book.add(announce(PEER, 2))
        assert ours is not None and held is not None
        award_to(held, ME, PEER)  # we hold its only shard
        for n in range(100, 300):
            book.add(announce(FLOODER, n), now_ms=NOW)
        assert book.get(ours.task_id) is ours and book.get(held.task_id) is held
        assert len(book) == 4
        assert counters.get("tasks.book_evicted") == 200 - 2
        assert counters.get("tasks.book_refused") == 0

    trio.run(main)


def test_finished_then_idle_then_other_foreign_views_go_first() -> None:
    async def main() -> None:
        book = TaskBook(ME.peer_id, Counters(), max_tasks=3)
        running = book.add(announce(PEER, 1))  # foreign, awarded to someone else: oldest
        idle = book.add(announce(PEER, 2))  # foreign, no award yet
        done = book.add(announce(PEER, 3, deadline_ms=1))  # past its deadline
        assert running is not None and idle is not None and done is not None
        award_to(running, PEER, PEER)
        book.add(announce(FLOODER, 10), now_ms=NOW + 10)
        assert book.get(done.task_id) is None and book.get(running.task_id) is running
        book.add(announce(FLOODER, 11), now_ms=NOW + 10)
        assert book.get(idle.task_id) is None and book.get(running.task_id) is running
        # Now only idle flood views and the running one: the flood's oldest goes.
        book.add(announce(FLOODER, 12), now_ms=NOW + 10)
        assert book.get(f"{10:032x}") is None and book.get(running.task_id) is running

    trio.run(main)


def test_a_full_book_of_our_own_work_refuses_foreign_announces_and_counts() -> None:
    async def main() -> None:
        counters = Counters()
        book = TaskBook(ME.peer_id, counters, max_tasks=2)
        a, b = book.add(announce(ME, 1)), book.add(announce(ME, 2))
        assert a is not None and b is not None
        assert book.add(announce(FLOODER, 3), now_ms=NOW) is None
        assert counters.get("tasks.book_refused") == 1
        # Our own tasks are always admitted (bounded by our callers, not by the network).
        assert book.add(announce(ME, 4), now_ms=NOW) is not None
        assert {v.task_id for v in book} == {f"{n:032x}" for n in (1, 2, 4)}

    trio.run(main)
