"""The task topic (``peerd/tasks/2``): admit each message once, then route it.

This is the validator libp2p calls for every unique gossip message on the topic. A
message is propagated only if it verified and makes sense for a task we follow: an
award, lease, result, vote or cancel for an unknown task is dropped (counted
``dropped.unknown_task``) — we cannot check it, so we do not spread it.
"""

from __future__ import annotations

import logging

import trio

from peerd.contractor import Contractor
from peerd.node import TASKS_TOPIC, Node
from peerd.p2p import GossipMessage
from peerd.rounds import Rounds
from peerd.scope import OwnedScope
from peerd.submitter import Submitter
from peerd.taskbook import TaskBook
from protocol.envelope import Signed
from protocol.messages import Award, Cancel, Lease, Result, TaskAnnounce, Vote

log = logging.getLogger(__name__)

KINDS = frozenset({"announce", "award", "lease", "result", "vote", "cancel"})


class TaskBus(OwnedScope):
    """Started with ``nursery.start(bus.run)`` before the p2p node runs: it subscribes to the
    task topic then, and runs the bids announces ask for in its own nursery."""

    def __init__(
        self, node: Node, book: TaskBook, contractor: Contractor, submitter: Submitter, rounds: Rounds
    ) -> None:
        self.node = node
        self.book = book
        self.contractor = contractor
        self.submitter = submitter
        self.rounds = rounds

    def _started(self) -> None:
        self.node.p2p.add_validator(TASKS_TOPIC, self.on_gossip)

    async def on_gossip(self, msg: GossipMessage) -> bool:
        signed = self.node.inbox.admit(msg.data, sender=msg.origin, kinds=KINDS)
        if signed is None:
            return False
        try:
            return await self.route(signed)
        except Exception:
            # A bug in handling one message must not take the topic down.
            log.exception("handling %s from %s failed", signed.kind, signed.signer)
            self.node.counters.inc("tasks.handler_errors")
            return False

    async def route(self, signed: Signed) -> bool:
        m = signed.message
        if isinstance(m, TaskAnnounce):
            known = self.book.get(m.task_id)
            if known is not None and known.submitter != signed.signer:
                self.node.counters.inc("dropped.task_id_collision")
                return False
            view = self.book.add(signed)
            if view is None:
                return False  # the book is full of tasks we have a part in (counted there)
            self.nursery.start_soon(self.contractor.on_announce, view, signed)
            return True
        found = self.book.get(m.task_id)  # type: ignore[attr-defined]
        if found is None:
            self.node.counters.inc("dropped.unknown_task")
            return False
        view = found
        if isinstance(m, Award):
            if m.epoch in view.awards or not self.contractor.verify_award(view, signed):
                return False
            view.awards[m.epoch] = signed
            view.pulse()
            self.contractor.on_award(view)
            return True
        if isinstance(m, Lease):
            if view.holder(m.shard, m.epoch) != signed.signer:
                self.node.counters.inc("dropped.not_holder")
                return False
            view.heartbeats[signed.signer] = trio.current_time()
            view.lease_states[(signed.signer, m.shard)] = m.state
            view.pulse()
            if view.submitter == self.node.peer_id:
                self.submitter.on_message(signed)  # our TaskMachine supervises the leases
            return True
        if isinstance(m, Result):
            if view.holder(m.shard, m.epoch) != signed.signer:
                self.node.counters.inc("dropped.not_holder")
                return False
            if view.submitter == self.node.peer_id:
                # Our TaskMachine keeps (and stores, for the result bundle) every holder's
                # commit that counts.
                self.submitter.on_message(signed)
            cur = view.results.get(m.round, {}).get(m.shard)
            if cur is not None and cur.signer != signed.signer:
                # Two holders committed one shard in one round (it was re-awarded mid-round).
                # Results are kept per shard and ordered by the signer's own sequence, which
                # says nothing across two signers: the shard's current holder wins.
                if view.holder(m.shard) != signed.signer:
                    return True
                del view.results[m.round][m.shard]
            if view.add_result(signed):
                self.rounds.on_result(view, signed)
            return True
        if isinstance(m, Vote):
            # Only votes that can count are recorded and forwarded (SPEC §8.1): the round's
            # machine checks each (a member of a committee drawn from one of the task's signed
            # awards, the task's rule) and tallies it (peerd/rounds.py).
            return self.rounds.on_vote(view, signed)
        if isinstance(m, Cancel):
            self.contractor.on_cancel(view, signed)
            return True
        return False
