"""The contractor role: bid for tasks this node can take, run the shards it is awarded,
heartbeat their leases and deliver signed results (seed §3.2 steps 2, 3 and 5).

The role is a thin driver of :class:`protocol.machines.shard.ShardMachine` (issue 7 item 2):
one :class:`~peerd.drive.MachineDriver` per task this node bids for (the bidder, bound to
the lowest shard an award gives us), per further shard an award gives us (``AdoptShard``)
and per stored result a restart re-delivers. The machine holds the shard's state (bid,
award, fetch, rounds, heartbeats, delivery back-off, cancel, lost award); this file does
the I/O and keeps what is the contributor's own to decide:

* **Eligibility** is the contributor's policy (config ``[offer]``/``[policy]``): the kind is
  offered, the node is not draining, the GPU/memory demand fits, and — fail closed — a
  task runs only inside a working sandbox unless its submitter is trusted; ``python``
  tasks only ever from trusted submitters (docs/tasks.md "Eligibility").
* **Per-kind job details**: the limits from ``[limits]``, the wall limit from the deadline,
  trust, the per-round seed and defaults of the kind registry (:mod:`peerd.kinds`).
* **Verification** of awards (SPEC §10.3, once per daemon: the machines get ``checked=True``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from peerd import kinds
from peerd.drive import MachineDriver, NodeSealer
from peerd.executed import ExecutedAwards
from peerd.executor import Job, JobResult, Limits
from peerd.inbox import wall_ms
from peerd.node import BID_PROTOCOL, RESULT_PROTOCOL, Node
from peerd.scope import OwnedScope
from peerd.streams import StreamPool
from peerd.taskbook import TaskBook, TaskView
from protocol import codec
from protocol.awards import check_award
from protocol.certificate import Certificate
from protocol.envelope import Signed, open_envelope
from protocol.errors import ProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes
from protocol.machines.shard import ACTIVE, MAX_DELIVERY_TRIES, TERMINAL, ShardMachine, ShardState
from protocol.messages import Award, Cancel, Lease, Result, TaskAnnounce

if TYPE_CHECKING:
    from peerd.rounds import Rounds
    from peerd.submitter import Submitter

log = logging.getLogger(__name__)

__all__ = ["MAX_DELIVERY_TRIES", "Contractor"]

#: How often a followed task's machines are looked at when nothing changes in its view
#: (a machine that ended is forgotten, a bidder that never won is dropped after the deadline).
FOLLOW_POLL_S = 1.0
#: Stream reply timeouts: a bid (SPEC §8.2), a result (SPEC §8.3) — as the submitter's handlers.
BID_REPLY_S = 10.0
RESULT_REPLY_S = 15.0
_TERMINAL_TASK = frozenset({"done", "failed", "cancelled"})


def _deadline_ms(announce: TaskAnnounce) -> int:
    return announce.issued_at + announce.deadline_ms


#: How often the exactly-once record drops what has expired (marks live up to 31 days).
PRUNE_EVERY_S = 600.0


class Contractor(OwnedScope):
    def __init__(self, node: Node, book: TaskBook, rounds: Rounds, local_submitter: Submitter) -> None:
        self.node = node
        self.book = book
        self.rounds = rounds
        self.local_submitter = local_submitter
        self.sealer = NodeSealer(node)
        #: task → the drivers of its shard machines (bidder, adopted shards, re-deliveries)
        self._tasks: dict[str, list[MachineDriver]] = {}
        #: driver → the certified rounds already handed to its machine
        self._fed: dict[MachineDriver, set[int]] = {}
        #: job id → the cancel scope of its executor call (``CancelJob``)
        self._jobs: dict[str, trio.CancelScope] = {}
        #: task → its announce as first seen (what the machines are built from)
        self._announces: dict[str, Signed] = {}
        #: Exactly once per node (issue 8 item 6): awards executed and replay marks, durable.
        self.executed = ExecutedAwards(node.store.db)
        #: Bid and result streams to submitters, reused per peer (SPEC §8.4).
        self.streams = StreamPool(node.p2p.open_stream, counters=node.counters)

    def _started(self) -> None:
        self.nursery.start_soon(self._forget_expired)

    async def _forget_expired(self) -> None:
        """Keep the exactly-once record bounded: drop what expiry already guards (SPEC §6)."""
        while True:
            dropped = self.executed.forget_expired(wall_ms())
            if dropped:
                log.info("forgot %d expired replay mark(s) and executed award(s)", dropped)
            await trio.sleep(PRUNE_EVERY_S)

    @property
    def times(self) -> MarketTimes:
        m = self.node.config.market
        return MarketTimes(lease_ttl_ms=int(m.lease_ttl_s * 1000), heartbeat_ms=int(m.heartbeat_s * 1000))

    # -- eligibility and bidding --------------------------------------------------------
    def ineligible_reason(self, ann: TaskAnnounce, submitter: str) -> str | None:
        cfg = self.node.config
        trusted = submitter in cfg.policy.trusted_submitters or submitter == self.node.peer_id
        if cfg.offer.draining:
            return "draining"
        if ann.kind not in cfg.offer.accept_kinds:
            return f"kind {ann.kind} not offered"
        if kinds.get(ann.kind).trusted_only and not trusted:
            return f"{ann.kind} tasks only from trusted submitters"
        if ann.resources["gpu"] and not cfg.offer.gpus:
            return "no GPU offered"
        if ann.resources["memory_mb"] > min(cfg.offer.memory_mb, cfg.limits.memory_mb):
            return "not enough memory offered"
        if cfg.policy.require_sandbox and not self.node.pool.sandbox_report.available and not trusted:
            return "no working sandbox (fail closed)"
        if ann.issued_at + ann.deadline_ms < wall_ms():
            return "deadline passed"
        return None

    async def on_announce(self, view: TaskView, signed: Signed | None = None) -> None:
        """An announce of ``view``'s task: bid if eligible. ``signed`` is the announce as it
        arrived (a re-announce has a fresh sequence); None for the view's own announce (our
        own submitter calls us after publishing)."""
        if signed is not None:
            if self.executed.replayed(signed):
                # One we bid on before a restart (or older): the in-memory guard forgot it.
                self.node.counters.inc("dropped.replayed_announce")
                return
            self.executed.remember(signed)
        reason = self.ineligible_reason(view.announce, view.submitter)
        if reason is not None:
            self.node.counters.inc("bids.not_eligible")
            log.debug("not bidding for %s: %s", view.task_id, reason)
            return
        if view.cancelled:
            return
        bidder = next((d for d in self._tasks.get(view.task_id, ()) if self._is_bidder(d)), None)
        if bidder is not None and signed is None and self._state(bidder) is ShardState.BID_SENT:
            # Our own submitter re-announced (it hands us no new message): a fresh bidder
            # bids afresh, as any re-announce asks (SPEC §8.2; the old bid may have expired).
            bidder.close()
            self._forget(view.task_id, bidder)
            bidder = None
        if bidder is None:
            announce = self._announce_of(view)
            if announce is None:
                return
            machine = ShardMachine.bidder(
                announce, sealer=self.sealer, times=self.times, c0=self.node.c0, load=self.node.load()
            )
            self._start(machine)
            return
        if signed is None or bidder.closed:
            return
        # Also after an award: a re-announce asks for spare bidders for lost shards. The bid
        # carries our load now, not when we first bid.
        current = bidder.machine
        assert isinstance(current, ShardMachine)
        current.load = self.node.load()
        bidder.feed(ev.MessageVerified(now_ms=bidder.now_ms(), signed=signed, sender=signed.signer))

    # -- awards ---------------------------------------------------------------------------
    def verify_award(self, view: TaskView, signed: Signed) -> bool:
        award = signed.message
        assert isinstance(award, Award)
        bids = [
            b for raw in award.bids if (b := self.node.inbox.verify_embedded(raw, kinds=frozenset({"bid"})))
        ]
        # With the previous epoch at hand a re-award is checked exactly (protocol.awards).
        prev = view.awards.get(award.epoch - 1)
        previous = prev.message if prev is not None and isinstance(prev.message, Award) else None
        try:
            if len(bids) != len(award.bids):
                raise ProtocolError("award lists an invalid bid", reason="bad_award")
            check_award(view.announce, award, view.submitter, signed.signer, bids, previous)
        except ProtocolError as exc:
            self.node.counters.inc(f"dropped.{exc.reason}")
            log.warning("rejected award for %s from %s: %s", view.task_id, signed.signer, exc)
            return False
        return True

    def on_award(self, view: TaskView) -> None:
        """The view's latest award (verified, or our own) goes to the task's machines."""
        if not view.awards or view.cancelled:
            return
        signed = view.awards[max(view.awards)]
        award = signed.message
        assert isinstance(award, Award)
        if self._replayed_award(signed, award):
            self.node.counters.inc("dropped.replayed_award")
            log.info("dropped a replayed award for %s (epoch %d)", view.task_id, award.epoch)
            return
        drivers = [d for d in self._tasks.get(view.task_id, ()) if not d.closed]
        if not drivers:
            # No machine follows the task (we bid before a restart, or in a lost bidder):
            # each shard the award gives us gets a machine of its own.
            for shard in sorted({int(a["shard"]) for a in award.assignments if a["peer_id"] == self.me}):
                self._adopt(view.task_id, shard, signed)
            return
        for d in drivers:
            d.feed(ev.MessageVerified(now_ms=d.now_ms(), signed=signed, sender=signed.signer, checked=True))

    def _replayed_award(self, signed: Signed, award: Award) -> bool:
        """An award we acted on before a restart (its mark), or one whose every shard for us
        this node already executed at that epoch (issue 8 item 6)."""
        if self.executed.replayed(signed):
            return True
        fresh = not self.executed.seen_this_run(signed)
        self.executed.remember(signed)
        mine = {int(a["shard"]) for a in award.assignments if a["peer_id"] == self.me}
        return (
            fresh
            and bool(mine)
            and all(self.executed.executed(award.task_id, award.epoch, shard) for shard in mine)
        )

    def on_cancel(self, view: TaskView, signed: Signed) -> None:
        msg = signed.message
        assert isinstance(msg, Cancel)
        if signed.signer != view.submitter:
            self.node.counters.inc("dropped.forged_cancel")
            return
        view.cancelled = True
        view.pulse()
        for d in list(self._tasks.get(view.task_id, ())):
            d.feed(ev.MessageVerified(now_ms=d.now_ms(), signed=signed, sender=signed.signer))

    async def on_published(self, view: TaskView, signed: Signed) -> None:
        """Our own submitter published ``signed`` for ``view``'s task (its task bus never sees
        our own gossip): bid on our announce, follow our award, stop on our cancel."""
        m = signed.message
        if isinstance(m, TaskAnnounce):
            await self.on_announce(view)
        elif isinstance(m, Award):
            self.on_award(view)
        elif isinstance(m, Cancel):
            self.on_cancel(view, signed)

    def redeliver_pending(self) -> None:
        """After a restart: re-send every stored result (the submitter dedupes)."""
        for work in self.node.store.delivered_work():
            task = self.node.store.task(work.task_id)
            if task is None or task.state in _TERMINAL_TASK or task.announce is None or work.result is None:
                continue
            try:
                announce = open_envelope(task.announce, kinds=frozenset({"announce"}))
                result = open_envelope(work.result, kinds=frozenset({"result"}))
            except ProtocolError as exc:
                log.warning("cannot re-deliver the stored result of %s: %s", work.task_id, exc)
                continue
            self._announces.setdefault(work.task_id, announce)
            self._start(ShardMachine.redeliver(announce, result, sealer=self.sealer, times=self.times))

    # -- the machines ---------------------------------------------------------------------
    @property
    def me(self) -> str:
        return self.node.peer_id

    @staticmethod
    def _is_bidder(driver: MachineDriver) -> bool:
        m = driver.machine
        return isinstance(m, ShardMachine) and m.is_bidder

    @staticmethod
    def _state(driver: MachineDriver) -> ShardState:
        m = driver.machine
        assert isinstance(m, ShardMachine)
        return m.state

    def machines(self, task_id: str) -> list[ShardMachine]:
        """The shard machines following ``task_id`` (tests and ``peerctl``-side debugging)."""
        out = []
        for d in self._tasks.get(task_id, ()):
            assert isinstance(d.machine, ShardMachine)
            out.append(d.machine)
        return out

    def _announce_of(self, view: TaskView) -> Signed | None:
        known = self._announces.get(view.task_id)
        if known is not None:
            return known
        try:
            signed = open_envelope(view.announce_raw, kinds=frozenset({"announce"}))
        except ProtocolError as exc:  # the view was built from this verified message
            log.error("the stored announce of %s does not open: %s", view.task_id, exc)
            return None
        self._announces[view.task_id] = signed
        return signed

    def _start(self, machine: ShardMachine) -> MachineDriver:
        task_id = machine.task_id
        key = (task_id, "bid" if machine.shard is None else machine.shard)
        driver = MachineDriver(key, machine, self, self.nursery, on_error=self.node.counters.inc)
        first = task_id not in self._tasks
        self._tasks.setdefault(task_id, []).append(driver)
        # A machine built with certificates has them: handing one over again would restart
        # a model fetch already under way.
        self._fed[driver] = set(machine.certificates)
        if first:
            self.nursery.start_soon(self._follow, task_id)
        driver.feed(ev.Start(now_ms=driver.now_ms()))
        self._feed_certificates(task_id)
        return driver

    def _adopt(self, task_id: str, shard: int, award: Signed) -> None:
        """Start a machine for ``shard`` unless one runs (or ran) for (task, shard)."""
        for d in self._tasks.get(task_id, ()):
            if isinstance(d.machine, ShardMachine) and d.machine.shard == shard and not d.closed:
                return
        view = self.book.get(task_id)
        announce = self._announces.get(task_id) or (self._announce_of(view) if view is not None else None)
        if announce is None:
            return
        awards = [view.awards[e] for e in sorted(view.awards)] if view is not None else []
        machine = ShardMachine.adopt(
            announce,
            award,
            shard,
            sealer=self.sealer,
            times=self.times,
            awards=awards,
            certificates=dict(view.certificates) if view is not None else None,
        )
        self._start(machine)

    def _forget(self, task_id: str, driver: MachineDriver) -> None:
        drivers = self._tasks.get(task_id)
        if drivers is not None and driver in drivers:
            drivers.remove(driver)
        self._fed.pop(driver, None)

    def on_certificate(self, cert: Certificate) -> None:
        """Round ``cert.round`` of its task is certified: each machine of the task learns it
        once (SPEC §11: a keras-train round > 1 starts from the previous round's certified
        model). The task's follower calls this for what the view records; a committee driver
        that forwards its ``Certified`` action may call it directly."""
        for d in list(self._tasks.get(cert.task_id, ())):
            fed = self._fed.setdefault(d, set())
            if cert.round not in fed and not d.closed:
                fed.add(cert.round)
                d.feed(ev.RoundCertified(now_ms=d.now_ms(), certificate=cert))

    def _feed_certificates(self, task_id: str) -> None:
        view = self.book.get(task_id)
        if view is None:
            return
        for r in sorted(view.certificates):
            self.on_certificate(view.certificates[r])

    async def _follow(self, task_id: str) -> None:
        """While machines follow the task: forward certificates; once the deadline has
        passed, drop a bidder that never won; forget the task when every machine ended."""
        while True:
            drivers = self._tasks.get(task_id)
            if not drivers:
                self._tasks.pop(task_id, None)
                return
            self._feed_certificates(task_id)
            machine = drivers[0].machine
            assert isinstance(machine, ShardMachine)
            past = wall_ms() > _deadline_ms(machine.announce)
            for d in list(drivers):
                state = self._state(d)
                if d.closed and state in ACTIVE:
                    # Stopped by its own bug (peerd/drive.py) while it held a shard: its
                    # heartbeats have stopped, so the submitter re-awards the shard after one
                    # lease TTL; give back the slot its award took.
                    self.node.active_shards -= 1
                    self.node.poke_advert()
                if d.closed or (past and (state in TERMINAL or state is ShardState.BID_SENT)):
                    d.close()
                    self._forget(task_id, d)
            if not self._tasks.get(task_id):
                self._tasks.pop(task_id, None)
                self._announces.pop(task_id, None)
                # No machine of ours follows the task any more: the workers free the model and
                # data they kept resident for its rounds (issue 9 item 2).
                self.node.pool.forget_task(task_id)
                return
            view = self.book.get(task_id)
            if view is not None:
                await view.wait_changed(FOLLOW_POLL_S)
            else:
                await trio.sleep(FOLLOW_POLL_S)

    # -- the Performer: what the machines ask for -------------------------------------------
    def perform_now(self, driver: MachineDriver, action: act.Action) -> bool:
        if isinstance(action, act.Persist):
            self._persist(action.record)
        elif isinstance(action, act.Count):
            self.node.counters.inc(action.name)
        elif isinstance(action, act.Drop):
            self.node.counters.inc(f"dropped.{action.reason}")
            log.info("dropped a message for %s: %s %s", driver.key, action.reason, action.detail)
        elif isinstance(action, act.AdjustLoad):
            self.node.active_shards += action.delta
            self.node.poke_advert()
        elif isinstance(action, act.KeepOwnResult):
            # A plain task's result goes to its submitter only (SPEC §7.7); our own view
            # still shows it, as it would a result we published.
            view = self.book.get(getattr(action.signed.message, "task_id", ""))
            if view is not None:
                view.add_result(action.signed)
        elif isinstance(action, act.AdoptShard):
            self._adopt(action.task_id, action.shard, action.award)
        elif isinstance(action, act.CancelJob):
            scope = self._jobs.pop(action.job_id, None)
            if scope is not None:
                scope.cancel()
        else:
            return False
        return True

    def perform_later(
        self, driver: MachineDriver, action: act.Action
    ) -> Callable[[], Awaitable[ev.Event | None]] | None:
        if isinstance(action, act.Publish):
            return self._publish(action.signed)
        if isinstance(action, act.Send):
            return lambda: self._send(driver, action)
        if isinstance(action, act.FetchBlob):
            return lambda: self._fetch(driver, action)
        if isinstance(action, act.StartJob):
            machine = driver.machine
            assert isinstance(machine, ShardMachine)
            return self._start_job(driver, machine, action)
        return None

    def _persist(self, record: act.Record) -> None:
        if isinstance(record, act.WorkerTaskRecord):
            self.node.store.add_task(
                task_id=record.task_id,
                role="worker",
                submitter=record.submitter,
                kind=record.kind,
                state="running",
                spec={"announce": "see signed announce"},
                announce=record.announce_raw,
                deadline_at=record.deadline_ms / 1000,
                message=record.message,
            )
        elif isinstance(record, act.WorkRecord):
            # Durable before anyone is told: a restart re-delivers it (issue 3 item 8).
            self.node.store.set_work(
                record.task_id, record.shard, record.round, record.epoch, record.state, record.raw
            )
        else:
            raise TypeError(f"the contractor does not persist {type(record).__name__}")

    def _publish(self, signed: Signed) -> Callable[[], Awaitable[None]]:
        # Our own messages skip our validators (peerd/p2p.py): what the task bus records
        # for a peer's lease or result we record for ours here, before anyone is told.
        m = signed.message
        view = self.book.get(getattr(m, "task_id", ""))
        if view is not None and isinstance(m, Lease):
            view.heartbeats[self.me] = trio.current_time()
        if view is not None and isinstance(m, Result):
            view.add_result(signed)
            self.rounds.on_result(view, signed)

        async def publish() -> None:
            await self.node.gossip(signed.raw)

        return publish

    async def _send(self, driver: MachineDriver, action: act.Send) -> ev.Event:
        bid = action.protocol == act.PROTO_BID
        reply: Any
        if action.peer == self.me:
            # Our own task: hand it to our own submitter, which answers as on a stream.
            if bid:
                reply = self.local_submitter.accept_bid(action.signed.raw, self.me, verified=action.signed)
            else:
                reply = self.local_submitter.accept_result(action.signed.raw, self.me)
        else:
            try:
                # One reused stream per submitter and protocol (SPEC §8.4), not one per message.
                reply = codec.unpack(
                    await self.streams.request(
                        action.peer,
                        BID_PROTOCOL if bid else RESULT_PROTOCOL,
                        action.signed.raw,
                        BID_REPLY_S if bid else RESULT_REPLY_S,
                    )
                )
            except (ProtocolError, trio.TooSlowError) as exc:
                log.info("%s for %s to %s failed: %s", action.tag, driver.key, action.peer, exc)
                return ev.SendCompleted(now_ms=driver.now_ms(), tag=action.tag, ok=False, reason="transport")
        if not isinstance(reply, dict):
            return ev.SendCompleted(now_ms=driver.now_ms(), tag=action.tag, ok=False, reason="bad reply")
        return ev.SendCompleted(
            now_ms=driver.now_ms(),
            tag=action.tag,
            ok=bool(reply.get("ok")),
            reason=str(reply.get("reason", ""))[:200],
        )

    async def _fetch(self, driver: MachineDriver, action: act.FetchBlob) -> ev.Event:
        size = None if action.size == act.ANY_SIZE else action.size
        try:
            if action.source == self.me and not self.node.blobs.has(action.digest):
                # Our own copy or nothing: no stream to ourselves.
                raise ProtocolError("not in our blob store", reason="not_found")
            path = await self.node.fetch_blob(action.source, action.digest, max_bytes=size)
            data = await trio.to_thread.run_sync(path.read_bytes) if action.want_bytes else None
        except ProtocolError as exc:
            return ev.BlobFetched(
                now_ms=driver.now_ms(),
                tag=action.tag,
                digest=action.digest,
                source=action.source,
                ok=False,
                reason=exc.reason,
                error=str(exc),
            )
        return ev.BlobFetched(
            now_ms=driver.now_ms(),
            tag=action.tag,
            digest=action.digest,
            source=action.source,
            ok=True,
            data=data,
        )

    def _start_job(
        self, driver: MachineDriver, machine: ShardMachine, action: act.StartJob
    ) -> Callable[[], Awaitable[ev.Event | None]]:
        scope = trio.CancelScope()
        self._jobs[action.job_id] = scope  # before the job starts: a CancelJob may follow at once
        # Durable before the job starts: this (task, epoch, shard, round) never runs here again,
        # whatever is replayed after a restart (issue 8 item 6).
        first = self.executed.claim(action.task_id, action.epoch, action.shard, action.round)

        async def run() -> ev.Event | None:
            if not first:
                self._jobs.pop(action.job_id, None)
                self.node.counters.inc("jobs.refused_replay")
                return ev.JobFinished(
                    now_ms=driver.now_ms(),
                    job_id=action.job_id,
                    ok=False,
                    outputs={},
                    metrics={},
                    error="replayed",
                    detail="this award's job already ran on this node",
                )
            try:
                with scope:
                    try:
                        result = await self._execute(machine.announce, action)
                        outputs: dict[str, dict[str, Any]] = {}
                        for name, data in sorted(result.outputs.items()):
                            digest = await trio.to_thread.run_sync(self.node.blobs.put_bytes, data)
                            outputs[name] = {"sha256": digest, "size": len(data)}
                    except Exception as exc:
                        # A bug or an I/O failure in one shard must not kill the daemon, nor
                        # leave its machine waiting: the shard fails, and says why.
                        log.exception("shard %s failed", driver.key)
                        result = JobResult.failure("crashed", f"internal error: {type(exc).__name__}: {exc}")
                        outputs = {}
            finally:
                if self._jobs.get(action.job_id) is scope:
                    del self._jobs[action.job_id]
            if scope.cancelled_caught:
                return None  # CancelJob: the machine expects no JobFinished
            return ev.JobFinished(
                now_ms=driver.now_ms(),
                job_id=action.job_id,
                ok=result.ok,
                outputs=outputs,
                metrics=dict(result.metrics),
                error=result.error,
                detail=result.detail,
            )

        return run

    async def _execute(self, ann: TaskAnnounce, action: act.StartJob) -> JobResult:
        inputs = {name: self.node.blobs.path(ref["sha256"]) for name, ref in action.inputs.items()}
        job = self._job(ann, action, inputs)
        result = await self.node.pool.execute(job)
        return result

    def _job(self, ann: TaskAnnounce, action: act.StartJob, inputs: dict[str, Path]) -> Job:
        kind = kinds.get(ann.kind)
        lim = self.node.config.limits
        params: dict[str, Any] = dict(action.params)
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
        if kind.seed_per_round:
            # One seed per task and round, the same on every shard: round 1 builds its model
            # under this seed, so every participant starts from the same initial weights
            # (as FedAvg assumes; per-shard seeds cost 0.57-0.66 vs 0.78-0.82 accuracy after
            # round 1 on digits). The shards' data differ, so their batches still differ.
            params["seed"] = int(params.get("seed", 0)) * 1000 + action.round
        for key, value in kind.job_defaults.items():
            params.setdefault(key, value)
        if kind.chained_input is not None and "weights" in inputs and kind.chained_input != "weights":
            inputs[kind.chained_input] = inputs.pop("weights")
        job_inputs = {k: v for k, v in inputs.items() if k not in kind.local_only_inputs}
        return Job(
            job_id=action.job_id,
            submitter=action.submitter,
            kind=ann.kind,
            params=params,
            inputs=job_inputs,
            limits=Limits(
                memory_bytes=lim.memory_mb << 20,
                cpu_seconds=lim.cpu_seconds,
                wall_seconds=min(lim.wall_seconds, max(1.0, (_deadline_ms(ann) - wall_ms()) / 1000)),
                max_processes=lim.max_processes,
                max_output_bytes=lim.max_output_mb << 20,
            ),
            trusted=action.submitter in self.node.config.policy.trusted_submitters
            or action.submitter == self.me,
            # Tags what a warm worker keeps resident for this task (peerd/executor/kinds/_resident.py).
            task=ann.task_id,
        )
