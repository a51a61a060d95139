"""The committee role: a thin driver of the aggregation round machine (docs/design.md §6,
protocol/SPEC.md §11; issue 7 item 2).

Everything the round decides — which commit counts, when a member's view is ready, which
inputs are fetched from whom and checked, the aggregate, the vote and its ``attempt``, the
tally and the certificate — lives in :class:`protocol.machines.round.RoundMachine`. This
module runs one machine per (task, round) this daemon follows (every daemon tallies
votes, so it learns each certificate; a committee member also serves the duty) through
:class:`peerd.drive.MachineDriver`, and does the I/O the machine asks for: fetching a
committed output from one peer, storing the aggregate, publishing the vote, persisting
votes and certificates, counting.

Until the submitter and contractor are machines too, the facts they own reach the round
machine from the :class:`~peerd.taskbook.TaskView` they and the task bus keep: before every
event the machine is handed what is new in the view — awards (already checked by the task
bus, so ``checked=True``), holders' last heartbeats, this round's commits and the votes that
passed the SPEC §8.1 check — and a cancelled task or a passed deadline ends its rounds. Each
round is followed by one trio task that owns the machine's scope (``_serve_round``: its
timers, fetches and publishes end with it) and wakes on every change of the view. Each
certificate goes back out through the view (``view.certificates``: what ``start_model``,
the submitter and the task book read) and the store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from peerd.drive import MachineDriver, NodeSealer
from peerd.inbox import wall_ms
from peerd.node import Node
from peerd.scope import OwnedScope
from peerd.taskbook import TaskView
from protocol.aggregation import aggregate
from protocol.certificate import COMMITTEE_SIZE, Certificate, input_key, vote_is_well_formed
from protocol.committee import committee
from protocol.envelope import Signed, open_envelope
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes
from protocol.machines.round import TERMINAL, RoundMachine, RoundState
from protocol.messages import Award, Result, Vote
from protocol.tensors import decode_arrays, encode_arrays

log = logging.getLogger(__name__)

#: How often a task's open rounds look at its view when nothing pulses it (a safety net:
#: awards and cancels pulse the view, SPEC §11 step 2 re-checks on every change).
VIEW_POLL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class ViewChanged(ev.Event):
    """Driver-local: the task's view changed (an award, a heartbeat); bring the machine up
    to date. Never reaches the machine itself."""


class _Followed:
    """A RoundMachine as the driver sees it: before each event, what is new in the task's
    view — awards, heartbeats, this round's commits and votes, as the task bus and the
    contractor recorded them — is handed over (those roles are not machines yet)."""

    def __init__(self, machine: RoundMachine, view: TaskView, me: str) -> None:
        self.machine = machine
        self.view = view
        self.me = me
        self._fed: set[str] = set()  # digests of the commits and votes handed over

    def handle(self, event: ev.Event) -> list[act.Action]:
        out = self._sync(event.now_ms)
        if isinstance(event, ViewChanged):
            return out
        return out + self.machine.handle(event)

    def _sync(self, now_ms: int) -> list[act.Action]:
        m = self.machine
        out: list[act.Action] = []
        for epoch in sorted(self.view.awards):
            if epoch not in m.awards:
                # Checked once by the task bus (Contractor.verify_award), or sealed by us.
                msg = ev.MessageVerified(now_ms=now_ms, signed=self.view.awards[epoch], checked=True)
                out += m.handle(msg)
        # Heartbeats are kept by the task bus and contractor in trio time (our own holder's
        # too); a holder silent for a lease TTL is lost (SPEC §7.6).
        t = trio.current_time()
        for peer, at in self.view.heartbeats.items():
            m.heartbeats[peer] = now_ms - int((t - at) * 1000)
        news = [sv for _, sv in sorted(self.view.results.get(m.round, {}).items())]
        news += [sv for _, sv in sorted(self.view.votes.get(m.round, {}).items())]
        for sv in news:
            if sv.digest in self._fed:
                continue
            self._fed.add(sv.digest)
            if isinstance(sv.message, Vote) and m.votes.get((sv.signer, sv.message.attempt)) is sv:
                continue  # our own vote: the machine recorded it when it signed it
            via = ev.VIA_LOCAL if sv.signer == self.me else ev.VIA_GOSSIP
            out += m.handle(ev.MessageVerified(now_ms=now_ms, signed=sv, via=via))
            if m.state is RoundState.CANCELLED:
                break
        return out


class Rounds(OwnedScope):
    def __init__(self, node: Node, *, clock: Callable[[], int] = wall_ms) -> None:
        self.node = node
        self._clock = clock
        #: the rounds this daemon follows now, (task, round) → driver
        self._drivers: dict[tuple[str, int], MachineDriver] = {}
        #: rounds whose machine stopped on a bug: never restarted (a fresh machine would vote
        #: again from attempt 0)
        self._broken: set[tuple[str, int]] = set()
        #: rounds whose ``_serve_round`` is scheduled but has not run yet (one machine per round)
        self._starting: set[tuple[str, int]] = set()
        #: Told of every certificate (the submitter's TaskMachine takes it as RoundCertified).
        self.on_certified: list[Callable[[TaskView, Certificate], None]] = []
        #: (task, round, output digest) already being prefetched (``_prefetch``).
        self._prefetching: set[tuple[str, int, str]] = set()
        #: digest → set when its prefetch ends (fetched or not): ``start_model`` waits on them.
        self._inflight: dict[str, trio.Event] = {}

    # -- inputs from the task bus and the contractor ----------------------------------------
    def on_result(self, view: TaskView, signed: Signed) -> None:
        """A holder's commit the view has just kept (from gossip, or our own)."""
        msg = signed.message
        assert isinstance(msg, Result)
        self._follow(view, msg.round)
        self._prefetch_input(view, signed)

    def _prefetch_input(self, view: TaskView, signed: Signed) -> None:
        """A committee member fetches each committed output as soon as its commit arrives.

        The round machine fetches the inputs only once every holder has committed (SPEC §11
        step 2), one after another; on the emulated WAN (40 ms one way, 1 % loss) each fetch
        is a chain of round trips, and the member that committed last voted 1.0–1.3 s after
        its own commit (docs/benchmarks.md, "2026-12-04 evening"). Fetched here while the slower
        holders still train, the early outputs are in the blob store when the machine asks for
        them (``Node.fetch_blob`` returns the local copy; a fetch still running makes the
        machine's own fetch of that digest wait for it). Local only, like ``_prefetch``: the
        machine still checks every byte against the commit, and a holder that supersedes its
        commit costs one wasted fetch per commit it sent (each kept commit is signed by the
        shard's current holder)."""
        m = signed.message
        assert isinstance(m, Result)
        me = self.node.peer_id
        ref = m.outputs.get("weights") if m.ok else None
        if (
            ref is None
            or signed.signer == me  # our own output is in the store already
            or view.announce.aggregation == "none"
            or not 1 <= m.round <= view.announce.rounds
            or self._over(view, m.round)
            or me not in self.committee_for(view, m.round)
        ):
            return
        # If it fails, the machine's own fetch tries the committer and then the voters again.
        self._start_prefetch(view, m.round, signed.signer, str(ref["sha256"]), int(ref["size"]), "input")

    def on_vote(self, view: TaskView, signed: Signed) -> bool:
        """A vote from the task topic; False when dropped (counted ``dropped.<reason>``).
        Only votes that can count are recorded and forwarded (SPEC §8.1): from a member of
        the committee drawn from the participants of one of the task's signed awards, for
        the task's rule (the round's machine checks it again and tallies it)."""
        m = signed.message
        assert isinstance(m, Vote)
        awards = [a.message for a in view.awards.values() if isinstance(a.message, Award)]
        try:
            vote_is_well_formed(signed, awards=awards, rule=view.announce.aggregation)
        except RemoteProtocolError as exc:
            self.node.counters.inc(f"dropped.{exc.reason}")
            log.info("dropped vote from %s for %s round %d: %s", signed.signer, m.task_id, m.round, exc)
            return False
        if view.submitter == self.node.peer_id:
            self.node.store.add_vote(m.task_id, m.round, signed.signer, m.attempt, signed.raw)
        view.votes.setdefault(m.round, {})[(signed.signer, m.attempt)] = signed
        view.pulse()
        self._follow(view, m.round)
        self._prefetch(view, signed)
        return True

    def _prefetch(self, view: TaskView, signed: Signed) -> None:
        """A participant off the round's committee fetches the aggregate a member voted for
        while the certificate is still being gathered (issue 9 item 3): the next round starts
        from the certified output (SPEC §11), fetched by digest, so when the certificate names
        this one the fetch finds it in the blob store. Local only: nothing on the wire changes,
        and a vote for an output that is not certified costs one wasted fetch, at most one per
        member and output."""
        m = signed.message
        assert isinstance(m, Vote)
        me = self.node.peer_id
        if (
            m.round >= view.announce.rounds  # the last round's output starts no round
            or me in m.committee  # a member computes the aggregate itself
            or me not in view.participants()
            or m.round in view.certificates
        ):
            return
        # If it fails, the certificate's fetch (ShardMachine) tries every voter again.
        self._start_prefetch(view, m.round, signed.signer, str(m.output["sha256"]), int(m.output["size"]), "")

    def _start_prefetch(
        self, view: TaskView, round_no: int, source: str, digest: str, size: int, what: str
    ) -> None:
        """Fetch ``digest`` from ``source`` into the blob store in the background, once per
        (task, round, digest), unless it is there. ``what``: "" for a voted aggregate (counted
        ``rounds.prefetched`` or ``rounds.prefetch_failed``), "input" for a committed output
        (``rounds.input_prefetched`` or ``rounds.input_prefetch_failed``)."""
        key = (view.task_id, round_no, digest)
        if key in self._prefetching or self.node.blobs.has(digest):
            return
        self._prefetching.add(key)
        limit = min(size, self.node.config.policy.max_blob_mb << 20)
        name = f"rounds.{what}_" if what else "rounds."

        done = self._inflight.setdefault(digest, trio.Event())

        async def fetch() -> None:
            try:
                await self.node.fetch_blob(source, digest, max_bytes=limit)
                self.node.counters.inc(f"{name}prefetched")
            except (ProtocolError, OSError) as exc:
                self.node.counters.inc(f"{name}prefetch_failed")
                log.info(
                    "prefetch of %s round %d %s failed: %s", view.task_id, round_no, what or "output", exc
                )
            finally:
                done.set()
                if self._inflight.get(digest) is done:
                    del self._inflight[digest]

        self.nursery.start_soon(fetch)

    def on_certificate(self, view: TaskView, cert: Certificate) -> None:
        """Forward a round's certificate to the roles that read the view (the contractor's
        next round, the submitter, the task book); the machine persisted and counted it."""
        if cert.round in view.certificates:
            return
        view.certificates[cert.round] = cert
        self._prefetching = {k for k in self._prefetching if k[:2] != (view.task_id, cert.round)}
        view.pulse()
        log.info("task %s round %d certified by %s", view.task_id, cert.round, ", ".join(cert.signers))
        for listener in self.on_certified:
            listener(view, cert)

    def committee_for(self, view: TaskView, round_no: int) -> tuple[str, ...]:
        return tuple(sorted(committee(view.task_id, round_no, view.participants(), COMMITTEE_SIZE)))

    # -- the starting model of the next round -------------------------------------------
    async def start_model(self, view: TaskView, round_no: int) -> Path:
        """Wait for round ``round_no``'s certificate; its output, fetched from a voter or
        recomputed from the round's inputs held here (:meth:`_recompute`)."""
        while round_no not in view.certificates:
            if view.cancelled:
                raise RuntimeError("task cancelled")
            await view.wait_changed(5.0)
        cert = view.certificates[round_no]
        digest = str(cert.output["sha256"])
        if self.node.blobs.has(digest):
            return self.node.blobs.path(digest)
        # A committee member that has not voted yet holds (or is fetching) the round's inputs:
        # it recomputes the certified output from them, or takes a voter's copy, whichever is
        # first. On the emulated WAN such a member had started 0.6 s after the certificate,
        # fetching the output anew after its own fetch of the last input (docs/benchmarks.md,
        # "2026-12-04 evening").
        got: Path | None = None
        failure: ProtocolError | None = None
        async with trio.open_nursery() as nursery:

            async def from_voters() -> None:
                nonlocal got, failure
                try:
                    # Three passes over the voters: one that just certified may still be writing it.
                    got = await self.node.fetch_from_any(
                        digest, cert.signers, max_bytes=cert.output["size"], passes=3
                    )
                except ProtocolError as exc:
                    failure = exc  # the inputs here may still give it
                    return
                nursery.cancel_scope.cancel()

            async def from_inputs() -> None:
                nonlocal got
                path = await self._recompute(cert)
                if path is not None:
                    got = path
                    self.node.counters.inc("rounds.output_recomputed")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(from_voters)
            nursery.start_soon(from_inputs)
        if got is not None:
            return got
        raise RuntimeError(f"could not fetch {digest[:12]} from any voter: {failure}")

    async def _recompute(self, cert: Certificate) -> Path | None:
        """The certified output computed from its inputs, if every input is in the blob store
        or being prefetched into it (a member's commit-time prefetch); None otherwise, or when
        the result is not the certified output (then only a voter's copy will do)."""
        digests = [str(i["sha256"]) for i in cert.inputs]
        if not digests:
            return None
        for d in digests:
            if not self.node.blobs.has(d):
                done = self._inflight.get(d)
                if done is None:
                    return None
                await done.wait()
                if not self.node.blobs.has(d):
                    return None
        digest = str(cert.output["sha256"])
        blobs = self.node.blobs

        def compute() -> Path | None:
            # SPEC §11.3's aggregate, as the committee computes it (the certificate lists the
            # inputs it used, in any order: input_key orders them).
            try:
                agg_in = [
                    (
                        input_key(str(i["peer_id"]), int(i["shard"])),
                        float(i["weight"]) if i["weight"] > 0 else 1.0,
                        decode_arrays(blobs.path(str(i["sha256"])).read_bytes()),
                    )
                    for i in cert.inputs
                ]
                data = encode_arrays(aggregate(cert.rule, agg_in))
                if hashlib.sha256(data).hexdigest() != digest:
                    return None
                blobs.put_bytes(data)
            except (ProtocolError, OSError):
                return None
            return blobs.path(digest)

        # Whole-model work (read, decode, aggregate, hash): off the event loop for large models.
        return await trio.to_thread.run_sync(compute)

    # -- the machines -------------------------------------------------------------------
    def machine(self, task_id: str, round_no: int) -> RoundMachine | None:
        """The round's machine while this daemon follows it (tests and diagnostics)."""
        d = self._drivers.get((task_id, round_no))
        if d is None:
            return None
        assert isinstance(d.machine, _Followed)
        return d.machine.machine

    def _over(self, view: TaskView, round_no: int) -> bool:
        """Nothing left to follow: cancelled, past the deadline, or certified."""
        ann = view.announce
        return (
            view.cancelled or self._clock() > ann.issued_at + ann.deadline_ms or round_no in view.certificates
        )

    def _follow(self, view: TaskView, round_no: int) -> None:
        """Hand the view's news to the round's machine, or start following the round."""
        key = (view.task_id, round_no)
        driver = self._drivers.get(key)
        if driver is not None:
            driver.feed(ViewChanged(now_ms=self._clock()))
            return
        ann = view.announce
        if ann.aggregation == "none" or not 1 <= round_no <= ann.rounds or key in self._broken:
            return
        if self._over(view, round_no) or key in self._starting:
            return  # a round starting takes everything in the view on its first feed
        self._starting.add(key)
        self.nursery.start_soon(self._serve_round, view, round_no)

    async def _serve_round(self, view: TaskView, round_no: int) -> None:
        """Follow round ``round_no`` of the task: its machine tallies every vote and, on a
        member, serves the committee duty. Owns the machine's scope (timers, fetches,
        publishes): they end with the round — certified, cancelled or past the deadline."""
        key = (view.task_id, round_no)
        if key in self._drivers or self._over(view, round_no):
            self._starting.discard(key)
            return
        cfg = self.node.config.market
        ttl_ms = int(cfg.lease_ttl_s * 1000)
        # The RoundMachine reads only the lease TTL (SPEC §7.6); MarketTimes wants a heartbeat
        # period below it.
        times = MarketTimes(lease_ttl_ms=ttl_ms, heartbeat_ms=max(1, ttl_ms // 2))
        # The view's envelope was verified when admitted; opening it again is pure (no replay
        # state) and gives the machine the signed form it needs.
        announce = open_envelope(view.announce_raw, kinds=frozenset({"announce"}))
        machine = RoundMachine(announce, round_no, sealer=NodeSealer(self.node), times=times)
        followed = _Followed(machine, view, self.node.peer_id)
        try:
            async with trio.open_nursery() as nursery:
                driver = MachineDriver(
                    key,
                    followed,
                    _Performer(self, view),
                    nursery,
                    clock=self._clock,
                    on_error=self.node.counters.inc,
                )
                self._drivers[key] = driver
                self._starting.discard(key)
                driver.feed(ViewChanged(now_ms=self._clock()))
                while not driver.closed and machine.state not in TERMINAL and not self._over(view, round_no):
                    await view.wait_changed(VIEW_POLL_S)
                    driver.feed(ViewChanged(now_ms=self._clock()))
                if driver.closed:
                    self._broken.add(key)
                elif machine.state is not RoundState.CERTIFIED:
                    driver.close()  # cancelled, past the deadline: timers and I/O end now
                # Certified: the machine cancelled its timers; what is still in flight ends on
                # its own — above all the publish of the vote that completed the quorum here,
                # which the other daemons still need to learn the certificate.
        finally:
            self._starting.discard(key)
            self._drivers.pop(key, None)


class _Performer:
    """The committee's answer to a RoundMachine's actions (peerd/drive.py ``Performer``)."""

    def __init__(self, rounds: Rounds, view: TaskView) -> None:
        self.rounds = rounds
        self.node = rounds.node
        self.view = view

    def perform_now(self, driver: MachineDriver, action: act.Action) -> bool:
        node = self.node
        if isinstance(action, act.Count):
            node.counters.inc(action.name)
        elif isinstance(action, act.Drop):
            node.counters.inc(f"dropped.{action.reason}")
        elif isinstance(action, act.StoreBlob):
            # At once, before the vote naming it is published: the other members fetch it.
            node.blobs.put_bytes(action.data)
        elif isinstance(action, act.Persist):
            rec = action.record
            if isinstance(rec, act.VoteRecord):
                node.store.add_vote(rec.task_id, rec.round, rec.peer, rec.attempt, rec.raw)
            elif isinstance(rec, act.CertificateRecord):
                node.store.add_certificate(rec.task_id, rec.round, dict(rec.output), list(rec.votes))
            else:
                return False
        elif isinstance(action, act.Certified):
            self.rounds.on_certificate(self.view, action.certificate)
        else:
            return False
        return True

    def perform_later(
        self, driver: MachineDriver, action: act.Action
    ) -> Callable[[], Awaitable[ev.Event | None]] | None:
        if isinstance(action, act.Publish):
            signed = action.signed
            m = signed.message
            if isinstance(m, Vote):
                self.view.votes.setdefault(m.round, {})[(signed.signer, m.attempt)] = signed
                self.view.pulse()

            async def publish() -> None:
                await self.node.gossip(signed.raw)

            return publish
        if isinstance(action, act.FetchBlob):
            fetch = action

            async def fetch_blob() -> ev.Event:
                return await self._fetch(driver, fetch)

            return fetch_blob
        return None

    async def _fetch(self, driver: MachineDriver, a: act.FetchBlob) -> ev.Event:
        node = self.node

        def failed(reason: str, error: str) -> ev.Event:
            return ev.BlobFetched(
                now_ms=driver.now_ms(), tag=a.tag, digest=a.digest, source=a.source, ok=False,
                reason=reason, error=error,
            )  # fmt: skip

        limit = None if a.size == act.ANY_SIZE else a.size
        try:
            path = await node.fetch_blob(a.source, a.digest, max_bytes=limit)
            # Read here, not in a worker thread: the machine decodes and aggregates these
            # bytes inside handle() anyway, and a thread hop lets a virtual clock (tests) race
            # past the round's timers while it runs.
            data = path.read_bytes()
        except ProtocolError as exc:
            return failed(exc.reason, str(exc))
        except OSError as exc:
            return failed("transport", str(exc))
        return ev.BlobFetched(
            now_ms=driver.now_ms(), tag=a.tag, digest=a.digest, source=a.source, ok=True,
            data=data if a.want_bytes else None,
        )  # fmt: skip
