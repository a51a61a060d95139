"""peerd/blobgc.py: the blob store is collected, periodically and over its budget (issue 7).

Real store, blob store and task book; the clock of the service loop is trio's MockClock.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from peerd.blobgc import BlobCollector
from peerd.blobs import BlobStore
from peerd.counters import Counters
from peerd.store import Store
from peerd.taskbook import TaskBook
from protocol.envelope import Signer, open_envelope
from protocol.messages import TaskAnnounce

# The service hashes and deletes through worker threads; under a MockClock with autojump a
# thread running on a loaded machine would let virtual time leap (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("inline_threads")

ME = Signer(b"\x01" * 32)
OTHER = Signer(b"\x02" * 32)
_seq = itertools.count(1)


class Parts:
    def __init__(self, tmp: Path, *, budget: int = 1 << 30) -> None:
        self.store = Store(tmp / "db.sqlite")
        self.blobs = BlobStore(tmp / "blobs", max_blob_bytes=1 << 20)
        self.counters = Counters()
        self.book = TaskBook(ME.peer_id, self.counters)
        self.gc = BlobCollector(
            self.store, self.book, self.blobs, self.counters, budget_bytes=budget, grace_s=0.0, check_s=1.0
        )

    def blob(self, data: bytes) -> str:
        return self.blobs.put_bytes(data)

    def task(
        self,
        task_id: str,
        digest: str,
        *,
        role: str = "submitter",
        state: str = "running",
        deadline_in: float = 60,
    ) -> None:
        self.store.add_task(
            task_id=task_id,
            role=role,
            submitter=ME.peer_id,
            kind="echo",
            state=state,
            spec={"input_refs": {"data": {"sha256": digest, "size": 1}}},
            announce=None,
            deadline_at=time.time() + deadline_in,
            message="",
        )

    def follow(self, digest: str, *, deadline_ms: int = 600_000, ago_ms: int = 0) -> None:
        now = int(time.time() * 1000)
        msg = TaskAnnounce(
            seq=next(_seq),
            issued_at=now - ago_ms,
            expires_at=now + 600_000,
            task_id=f"{next(_seq):032x}",
            kind="echo",
            work=1.0,
            deadline_ms=deadline_ms,
            max_shards=1,
            resources={"gpu": False, "memory_mb": 0},
            aggregation="none",
            rounds=1,
            params={},
            inputs={"data": {"sha256": digest, "size": 1}},
            bid_window_ms=300,
            net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
        )
        assert self.book.add(open_envelope(OTHER.seal(msg), kinds=frozenset({"announce"}))) is not None


def test_unreferenced_blobs_go_and_live_ones_stay(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    orphan = p.blob(b"nobody names me")
    ours = p.blob(b"input of our running task")
    worker_done = p.blob(b"input of a shard whose task is past its deadline")
    followed = p.blob(b"input of a task we follow (committee)")
    followed_over = p.blob(b"input of a followed task past its deadline")
    finished = p.blob(b"output of our finished task")
    p.task("a" * 32, ours)
    p.task("b" * 32, worker_done, role="worker", deadline_in=-1)  # worker rows stay 'running'
    p.task("c" * 32, finished, state="done")
    p.follow(followed)
    # Issued 10 s ago: past its deadline however soon the collector runs (issued now with a
    # 1 ms deadline, a collector within that millisecond kept it: a flake).
    p.follow(followed_over, deadline_ms=1, ago_ms=10_000)
    assert trio.run(p.gc.collect) == 3
    assert {d for d in (orphan, ours, worker_done, followed, followed_over, finished) if p.blobs.has(d)} == {
        ours,
        followed,
        finished,
    }
    assert p.counters.get("blobs.collected") == 3


def test_a_fresh_blob_is_kept_for_the_grace_period(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    p.gc.grace_s = 3600.0
    fresh = p.blob(b"stored just now, the task row not written yet")
    assert trio.run(p.gc.collect) == 0 and p.blobs.has(fresh)


def test_over_budget_the_oldest_finished_tasks_outputs_go_first(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    old, new, live = p.blob(b"o" * 4000), p.blob(b"n" * 4000), p.blob(b"l" * 4000)
    p.task("1" * 32, old, state="done")
    time.sleep(0.01)
    p.task("2" * 32, new, state="failed")
    p.task("3" * 32, live)
    p.store.set_state("2" * 32, "failed", "later")  # updated later than task 1
    p.gc.budget_bytes = 9000  # room for two of the three
    trio.run(p.gc.collect)
    assert not p.blobs.has(old) and p.blobs.has(new) and p.blobs.has(live)
    assert p.counters.get("blobs.results_evicted") == 1
    assert "over its budget" in p.store.events("1" * 32)[-1].message
    # Evicted once: the next collection does not count it again.
    trio.run(p.gc.collect)
    assert p.counters.get("blobs.results_evicted") == 1 and p.blobs.has(new)
    # Live tasks alone over the budget: nothing more may go, and that is counted.
    p.gc.budget_bytes = 1000
    trio.run(p.gc.collect)
    assert p.blobs.has(live) and p.counters.get("blobs.over_budget") >= 1


async def gone(p: Parts, digest: str, *, within: float) -> bool:
    """Whether ``digest`` is collected within ``within`` virtual seconds (bounded polling: the
    collection runs in threads, which the mock clock does not wait for)."""
    with trio.move_on_after(within):
        while p.blobs.has(digest):
            await trio.sleep(0.5)
        return True
    return False


def test_the_service_collects_periodically_in_a_nursery(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    orphan = p.blob(b"garbage")
    p.gc.interval_s = 600.0

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(p.gc.run)
            await trio.sleep(300)
            assert p.blobs.has(orphan)  # within budget: waits for the interval
            assert await gone(p, orphan, within=400)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_service_collects_at_once_when_over_budget(tmp_path: Path) -> None:
    p = Parts(tmp_path, budget=10)
    p.gc.interval_s = 1e9  # never by the timer: only the budget check can trigger it
    p.gc.check_s = 0.05
    orphan = p.blob(b"more than ten bytes of garbage")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(p.gc.run)
            assert await gone(p, orphan, within=30)  # a safety bound, not a timing claim
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_over_budget_with_only_live_blobs_it_waits_for_growth(tmp_path: Path) -> None:
    p = Parts(tmp_path, budget=10)
    p.gc.interval_s = 1e9
    live = p.blob(b"the input of a running task, over the tiny budget")
    p.task("a" * 32, live)
    runs: list[int] = []
    collect = p.gc.collect

    async def counted() -> int:
        runs.append(1)
        return await collect()

    p.gc.collect = counted  # type: ignore[method-assign]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(p.gc.run)
            with trio.move_on_after(100):
                while not runs:
                    await trio.sleep(1)
            await trio.sleep(100)  # many checks: nothing new arrived, so no new collection
            assert len(runs) == 1 and p.blobs.has(live)
            orphan = p.blob(b"new garbage")
            assert await gone(p, orphan, within=100)
            assert len(runs) == 2
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
