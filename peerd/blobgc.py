"""The blob collector: keeps the blob store within ``limits.blob_store_mb`` (docs/config.md).

Blobs are content-addressed and shared, so nothing deletes one when a task ends; without this
service the store grew without bound. It runs in the daemon's nursery and, every
``interval_s`` and whenever the store is over its budget (checked every ``check_s``):

1. keeps every blob named by a *live* task: an unfinished task in the store (state not
   terminal, deadline not passed — a contractor's worker rows never reach a terminal state),
   or a task this daemon follows in its task book whose deadline has not passed (a committee
   member serves the inputs it fetched to the other members and to the submitter);
2. keeps the blobs of the finished tasks this node submitted (``peerctl result`` reads them)
   as long as the budget allows; over the budget they go too, oldest finished task first,
   and the task's events say so;
3. deletes everything else, except what this process stored less than ``grace_s`` ago (a
   task's inputs are stored before the task row that names them).

A blob is "named" by a task when its digest appears anywhere in the task's stored JSON or in
the bodies of its signed messages: conservative, and independent of each message's layout.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from peerd.blobs import BlobStore
from peerd.counters import Counters
from peerd.store import Store
from peerd.taskbook import TaskBook
from protocol.blobproto import is_digest
from protocol.envelope import open_envelope
from protocol.errors import ProtocolError

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

TERMINAL = frozenset({"done", "failed", "cancelled"})
#: Seconds between collections when the store is within its budget.
INTERVAL_S = 600.0
#: Seconds between checks of the store's size.
CHECK_S = 30.0
#: A blob stored by this process less than this long ago is never collected.
GRACE_S = 900.0


def _walk(obj: Any, out: set[str]) -> None:
    if isinstance(obj, str):
        if is_digest(obj):
            out.add(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, out)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), out)


def digests_in(values: Iterable[Any], raws: Iterable[bytes]) -> set[str]:
    """Every blob digest named in decoded JSON ``values`` and in the signed messages ``raws``."""
    out: set[str] = set()
    for v in values:
        _walk(v, out)
    for raw in raws:
        try:
            _walk(open_envelope(raw).message, out)
        except ProtocolError:
            continue  # stored by us, so verified once; unreadable now names nothing
    return out


class BlobCollector:
    def __init__(
        self,
        store: Store,
        book: TaskBook,
        blobs: BlobStore,
        counters: Counters,
        *,
        budget_bytes: int,
        interval_s: float = INTERVAL_S,
        check_s: float = CHECK_S,
        grace_s: float = GRACE_S,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.book = book
        self.blobs = blobs
        self.counters = counters
        self.budget_bytes = budget_bytes
        self.interval_s = interval_s
        self.check_s = check_s
        self.grace_s = grace_s
        self._now = now
        #: Bytes held after the last collection: over budget, the next one runs only once the
        #: store has grown past this (live tasks alone over it would otherwise mean a full
        #: collection every check_s, for nothing).
        self._usage_after = 0

    def _references(self) -> tuple[set[str], list[tuple[str, set[str]]]]:
        """(digests live tasks name, [(task, digests)] of our finished tasks, oldest first)."""
        now = self._now()
        live: set[str] = set()
        finished: list[tuple[float, str, set[str]]] = []
        for row in self.store.tasks():
            refs = digests_in(*self.store.task_material(row.task_id))
            if row.state not in TERMINAL and row.deadline_at > now:
                live |= refs
            elif row.role == "submitter" and not row.result_collected:
                finished.append((row.updated_at, row.task_id, refs))
        for view in self.book:
            ann = view.announce
            if view.cancelled or (ann.issued_at + ann.deadline_ms) / 1000 < now:
                continue
            raws = [view.announce_raw]
            raws += [s.raw for s in view.awards.values()]
            raws += [s.raw for by in view.results.values() for s in by.values()]
            raws += [s.raw for by in view.votes.values() for s in by.values()]
            live |= digests_in((), raws)
        finished.sort(key=lambda t: t[:2])
        return live, [(task_id, refs) for _, task_id, refs in finished]

    async def collect(self) -> int:
        """One collection; returns how many files were deleted."""
        live, finished = self._references()
        kept_results = set().union(*(refs for _, refs in finished))
        removed = await trio.to_thread.run_sync(
            lambda: self.blobs.gc(live | kept_results, grace_s=self.grace_s)
        )
        usage = await trio.to_thread.run_sync(self.blobs.usage_bytes)
        evicted: list[str] = []
        while usage > self.budget_bytes and finished:
            task_id, refs = finished.pop(0)
            rest = set().union(*(r for _, r in finished))
            gone = refs - live - rest
            freed = 0
            for d in gone:
                if self.blobs.has(d):
                    freed += self.blobs.size(d)
            usage -= freed
            evicted.append(task_id)
        if evicted:
            keep = live | set().union(*(refs for _, refs in finished))
            removed += await trio.to_thread.run_sync(lambda: self.blobs.gc(keep, grace_s=self.grace_s))
            for task_id in evicted:
                self.store.mark_result_collected(task_id)
            self.counters.inc("blobs.results_evicted", len(evicted))
            log.warning(
                "blob store over limits.blob_store_mb: deleted the outputs of %d finished task(s)",
                len(evicted),
            )
        if removed:
            self.counters.inc("blobs.collected", removed)
            await trio.to_thread.run_sync(self.blobs.prune_empty_dirs)
        self._usage_after = await trio.to_thread.run_sync(self.blobs.usage_bytes)
        if self._usage_after > self.budget_bytes:
            # Live tasks and fresh blobs alone exceed it: nothing more may go.
            self.counters.inc("blobs.over_budget")
        return removed

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        last = trio.current_time()
        while True:
            await trio.sleep(self.check_s)
            usage = await trio.to_thread.run_sync(self.blobs.usage_bytes)
            over = usage > self.budget_bytes and usage > self._usage_after
            if over or trio.current_time() - last >= self.interval_s:
                try:
                    await self.collect()
                except Exception:  # a bug here must not take the daemon down; retried next time
                    log.exception("blob collection failed")
                    self.counters.inc("blobs.gc_failed")
                last = trio.current_time()
