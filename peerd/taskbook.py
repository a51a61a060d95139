"""What this daemon knows about each task it has heard of, from verified messages.

Every daemon follows every task on the task topic (announce, awards, leases, results,
votes): that is what lets any peer serve on a committee, take over a lost shard, or
check a certificate. The book is in memory; the durable record of the tasks this node
submitted or worked on lives in :mod:`peerd.store`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from peerd.counters import Counters
from peerd.inbox import wall_ms
from protocol.certificate import Certificate, tally
from protocol.envelope import Signed
from protocol.messages import Award, Result, TaskAnnounce, Vote


@dataclass
class TaskView:
    task_id: str
    announce: TaskAnnounce
    announce_raw: bytes
    submitter: str
    awards: dict[int, Signed] = field(default_factory=dict)
    #: peer → trio time of its last lease heartbeat (any shard of this task)
    heartbeats: dict[str, float] = field(default_factory=dict)
    lease_states: dict[tuple[str, int], str] = field(default_factory=dict)
    results: dict[int, dict[int, Signed]] = field(default_factory=dict)
    votes: dict[int, dict[tuple[str, int], Signed]] = field(default_factory=dict)
    certificates: dict[int, Certificate] = field(default_factory=dict)
    first_result_at: dict[int, float] = field(default_factory=dict)
    cancelled: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)

    # -- change notification: waiters loop on "check condition, else wait_changed()" --
    def pulse(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._changed.wait()

    # -- derived views ----------------------------------------------------------------
    def latest_award(self) -> Award | None:
        if not self.awards:
            return None
        msg = self.awards[max(self.awards)].message
        assert isinstance(msg, Award)
        return msg

    def assignments(self) -> list[dict[str, Any]]:
        award = self.latest_award()
        return sorted((dict(a) for a in award.assignments), key=lambda a: a["shard"]) if award else []

    def participants(self) -> list[str]:
        return sorted({a["peer_id"] for a in self.assignments()})

    def holder(self, shard: int, epoch: int | None = None) -> str | None:
        """Who held ``shard`` at ``epoch`` (default: now)."""
        epochs = [e for e in self.awards if epoch is None or e <= epoch]
        if not epochs:
            return None
        msg = self.awards[max(epochs)].message
        assert isinstance(msg, Award)
        for a in msg.assignments:
            if a["shard"] == shard:
                return str(a["peer_id"])
        return None

    def certified_rounds(self) -> int:
        r = 0
        while r + 1 in self.certificates:
            r += 1
        return r

    # -- recording --------------------------------------------------------------------
    def add_result(self, signed: Signed) -> bool:
        msg = signed.message
        assert isinstance(msg, Result)
        by_shard = self.results.setdefault(msg.round, {})
        old = by_shard.get(msg.shard)
        if old is not None and old.message.seq >= msg.seq:
            return False
        by_shard[msg.shard] = signed
        self.first_result_at.setdefault(msg.round, trio.current_time())
        self.pulse()
        return True

    def add_vote(self, signed: Signed) -> Certificate | None:
        """Record a vote; return a certificate if this vote completed one."""
        msg = signed.message
        assert isinstance(msg, Vote)
        self.votes.setdefault(msg.round, {})[(signed.signer, msg.attempt)] = signed
        if msg.round in self.certificates:
            return None
        cert = tally(list(self.votes[msg.round].values()))
        if cert is not None:
            self.certificates[msg.round] = cert
        self.pulse()
        return cert


class TaskBook:
    """The views this daemon follows, bounded so a flood of signed announces cannot exhaust
    memory — nor push out a task this node has a part in.

    When full, a new view takes the place of, in this order: a finished one (cancelled, past
    its deadline, or its last round certified), then a foreign idle one (not ours, no award
    yet), then another foreign one this node holds no shard of; the oldest first in each
    group. A view of a task this node submitted or holds a shard of is never evicted (its
    submitter, contractor and committee roles read it); when only such views are left, a
    foreign announce is refused and counted ``tasks.book_refused``. Our own tasks are always
    admitted: they are bounded by what our callers submit, not by the network.
    """

    MAX_TASKS = 10_000

    def __init__(self, peer_id: str = "", counters: Counters | None = None, *, max_tasks: int = 0) -> None:
        self.peer_id = peer_id
        self.counters = counters if counters is not None else Counters()
        self.max_tasks = max_tasks or self.MAX_TASKS
        self._views: dict[str, TaskView] = {}

    def get(self, task_id: str) -> TaskView | None:
        return self._views.get(task_id)

    def __len__(self) -> int:
        return len(self._views)

    def is_protected(self, view: TaskView) -> bool:
        """Ours, or one we hold a shard of under its latest award."""
        return bool(self.peer_id) and (view.submitter == self.peer_id or self.peer_id in view.participants())

    @staticmethod
    def is_finished(view: TaskView, now_ms: int) -> bool:
        ann = view.announce
        return (
            view.cancelled
            or ann.issued_at + ann.deadline_ms < now_ms
            or (ann.aggregation != "none" and ann.rounds in view.certificates)
        )

    def _victim(self, now_ms: int) -> str | None:
        idle = other = None
        for task_id, view in self._views.items():  # insertion order: oldest first
            if self.is_protected(view):
                continue
            if self.is_finished(view, now_ms):
                return task_id
            if not view.awards:
                idle = idle or task_id
            else:
                other = other or task_id
        return idle or other

    def add(self, signed: Signed, *, now_ms: int | None = None) -> TaskView | None:
        """The view of the announced task, new or known; None when the book is full of views
        that may not be evicted (the announce is dropped, counted ``tasks.book_refused``)."""
        msg = signed.message
        assert isinstance(msg, TaskAnnounce)
        view = self._views.get(msg.task_id)
        if view is not None:
            return view
        ours = bool(self.peer_id) and signed.signer == self.peer_id
        if len(self._views) >= self.max_tasks and not ours:
            victim = self._victim(wall_ms() if now_ms is None else now_ms)
            if victim is None:
                self.counters.inc("tasks.book_refused")
                return None
            del self._views[victim]
            self.counters.inc("tasks.book_evicted")
        view = TaskView(msg.task_id, msg, signed.raw, signed.signer)
        self._views[msg.task_id] = view
        return view

    def __iter__(self) -> Any:
        return iter(list(self._views.values()))
