"""The submitter role: announce a task, collect signed bids for one bid window, award
it by the seed's allocation formula, supervise leases (re-award lost shards), collect
results, follow the aggregation rounds, and keep the record (seed §3.2 steps 2–5).

There is no central scheduler: the submitter only coordinates its *own* task, and every
decision it makes is a signed message that any peer can re-check (``check_award``,
certificates). A restarted submitter resumes every unfinished task from the store.

The rules live in :class:`protocol.machines.task.TaskMachine` (issue 7 item 2): this role
is its thin driver. Per task this node submitted it runs one
:class:`peerd.drive.MachineDriver` and performs what the machine asks (the store, the
task topic, blob fetches, the data split, the evaluation job, RPC watchers) and feeds it
what arrives: bids and results on their streams, leases and results from the task topic,
certificates from the committee role (``Rounds.on_certificate``), the peer table, the
user's cancel. The machine's state is the task's only state; the role keeps the
:class:`~peerd.taskbook.TaskView` the other roles read up to date with our own awards.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import json
import logging
import os
import secrets
import time
import zipfile
from collections.abc import Awaitable, Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trio

from peerd import kinds
from peerd.drive import MachineDriver, NodeSealer
from peerd.executor import Job, Limits
from peerd.inbox import wall_ms
from peerd.node import ANNOUNCE_SLACK, MAX_GOSSIP_BYTES, Node, gossip_too_large
from peerd.peertable import PeerEntry
from peerd.records import TaskRecord
from peerd.reputation import Reputation
from peerd.scope import OwnedScope
from peerd.streams import FrameStream, serve_requests
from peerd.taskbook import TaskBook, TaskView
from peerd.taskspec import parse_spec
from protocol import codec
from protocol.allocation import shard_sizes
from protocol.awards import net_params
from protocol.certificate import Certificate, check_certificate
from protocol.envelope import Signed, open_envelope
from protocol.errors import ProtocolError
from protocol.machines import MarketTimes
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.task import DeclaredOutputs, Restored, TaskMachine
from protocol.messages import MAX_T_MAX, Award, Lease, Message, Result, TaskAnnounce
from protocol.plausibility import check_bid

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

TERMINAL = ("done", "failed", "cancelled")
#: How often the peer table's counts reach the machines (``PeersKnown``): the pending
#: message names the peers known, and a restarted submitter counts holders' silence only
#: once some peer is connected (as the supervisor's one-second poll did).
PEERS_EVERY_S = 1.0
#: Linux's lower bound on TCP's retransmission timeout (TCP_RTO_MIN): what one lost segment
#: of an announce or a bid costs at least.
RTO_MIN_MS = 200
#: The longest bid window the round trips may ask for (a peer behind a terrible link must not
#: make every award wait long; the window closes early once every offering peer has bid).
MAX_MEASURED_WINDOW_MS = 5_000
#: A peer this close (round trip) is on this host or its LAN: its link carries a gigabit or
#: more, and deflating a data part costs more time than it saves there (see split_compressed).
NEAR_RTT_S = 0.002


def split_compressed(round_trips_s: list[float | None]) -> bool:
    """Whether the parts of a split go out deflated: unless every peer that may fetch one is
    measured and near. Deflate level 1 runs at ~65 MB/s on the 2-core reference machine
    (0.22 s for a third of Fashion-MNIST as uint8, 14.4 MB to 8.3 MB); it saves transfer time
    only on links slower than ~220 Mbit/s, and the split sits between the bids and the award,
    so every task waits for it (0.52-0.63 s for three deflated parts, docs/benchmarks.md)."""
    return not round_trips_s or any(r is None or r >= NEAR_RTT_S for r in round_trips_s)


def bid_window_for(floor_ms: int, round_trips_s: list[float]) -> int:
    """The bid window for an announce whose spec names none (docs/design.md §10.5): the
    configured ``market.bid_window_ms``, or longer when a peer that offers the kind is far
    away. A bid is the announce's one-way trip, the bidder's stream (one round trip to
    negotiate a new one, trap 24) and the bid's own trip: up to about 2.5 round trips, taken
    as 3, plus one loss's recovery, at least TCP's 200 ms. Round trips are the muxer's
    measurements (yamux pings), so a far peer's bid is expected, not lost to the window."""
    if not round_trips_s:
        return floor_ms
    need = int(3_000 * max(round_trips_s)) + RTO_MIN_MS
    return max(floor_ms, min(need, MAX_MEASURED_WINDOW_MS))


class SubmitError(Exception):
    """The task cannot be submitted (bad spec, unreadable input); message for the user."""


class Submitter(OwnedScope):
    def __init__(self, node: Node, book: TaskBook) -> None:
        self.node = node
        self.book = book
        #: Told of every announce, award and cancel our machines publish, once it is out (the
        #: task bus never sees our own gossip): our own contractor bids and follows.
        self.on_published: list[Callable[[TaskView, Signed], Awaitable[None]]] = []
        #: Told of every holder's commit that reaches us on a result stream and that the view
        #: kept: the committee role follows the round from it, as from a gossiped commit.
        self.on_result: list[Callable[[TaskView, Signed], None]] = []
        self.sealer = NodeSealer(node)
        #: task_id → the driver of its TaskMachine (kept after the end: late bids and
        #: results are answered by the machine, as the view answered them before).
        self.drivers: dict[str, MachineDriver] = {}
        self._jobs: dict[str, trio.CancelScope] = {}
        self._peers_loop = False
        self._refresh_due = False  # a trust refresh after an observation is scheduled
        node.on_gossip.append(self._own_gossip)

    # -- trust (docs/allocation.md "Caps"; peerd/reputation.py) --------------------------
    @cached_property
    def reputation(self) -> Reputation:
        return Reputation(self.node.store.db, self.node.config.policy.trust_policy())

    def trust_event(self, now: int) -> ev.TrustKnown:
        records, banned = self.reputation.trust_known(now)
        return ev.TrustKnown(now_ms=now, records=records, policy=self.reputation.policy, banned=banned)

    def refresh_trust(self) -> None:
        """A ban or unban, or a new observation: tell every live machine (bids are refused,
        and caps computed, from the next award on)."""
        live = [d for d in self.drivers.values() if not d.closed and _machine(d).public_state not in TERMINAL]
        if not live:
            return
        event = self.trust_event(live[0].now_ms())
        for d in live:
            d.feed(event)

    async def _refresh_after_observing(self) -> None:
        # Out of the observing driver's perform (no machine is fed inside another's
        # actions), and once for a burst of observations.
        await trio.sleep(0)
        self._refresh_due = False
        self.refresh_trust()

    # -- submission ---------------------------------------------------------------------
    async def submit(self, spec_obj: Any) -> str:
        self.check_running()  # before anything is stored: the task's machine runs in our nursery
        try:
            spec = parse_spec(spec_obj)
        except ValueError as exc:
            raise SubmitError(str(exc)) from None
        refs: dict[str, dict[str, Any]] = {}
        for name, path in sorted(spec.inputs.items()):
            if not Path(path).is_absolute():
                # The daemon's working directory is not the caller's (docs/rpc.md: task.submit);
                # peerctl resolves paths against the spec file before sending.
                raise SubmitError(f"inputs.{name}: {path!r} is not an absolute path (the daemon reads it)")
            try:
                digest = await trio.to_thread.run_sync(self.node.blobs.put_file, Path(path))
            except OSError as exc:
                raise SubmitError(f"inputs.{name}: cannot read {path}: {exc.strerror or exc}") from None
            except ProtocolError as exc:
                raise SubmitError(f"inputs.{name}: {exc}") from None
            refs[name] = {"sha256": digest, "size": self.node.blobs.size(digest)}
        kind = kinds.get(spec.kind)
        # Split inputs are .npz files cut across the shards in proportion to C (docs/design.md
        # §4); local-only ones never leave this node (peerd/kinds.py says which are which).
        for name in kind.split_inputs:
            if name in refs:
                await trio.to_thread.run_sync(
                    self._check_npz, name, self.node.blobs.path(refs[name]["sha256"])
                )
        task_id = secrets.token_hex(16)
        cfg = self.node.config.market
        shared = {
            n: r for n, r in refs.items() if n not in kind.local_only_inputs and n not in kind.split_inputs
        }
        params = json.loads(json.dumps(spec.params))  # plain JSON types only
        dc_max = None if cfg.dc_max == float("inf") else cfg.dc_max
        net: dict[str, Any] = {"k": cfg.k, "dc_min": cfg.dc_min, "dc_max": dc_max}
        if cfg.t_max <= MAX_T_MAX:
            # market.t_max rides in the announce (SPEC §10.2): every peer recomputes the award
            # under the same bound. Unbounded (or beyond any set's cost) it is left out.
            net["t_max"] = cfg.t_max
        # A spot check's salt stays ours until the task ends (SPEC §7.10): kept in the task's
        # local record (never published) so a restarted submitter draws the same shards.
        salt = secrets.token_bytes(32) if spec.verify == "spot-check" else None
        try:
            raw, signed = self.node.seal(
                TaskAnnounce,
                ttl_ms=int(spec.deadline_s * 1000),
                task_id=task_id,
                kind=spec.kind,
                work=spec.work,
                deadline_ms=int(spec.deadline_s * 1000),
                max_shards=spec.max_shards,
                resources={"gpu": spec.gpu, "memory_mb": spec.memory_mb},
                aggregation=spec.aggregation,
                rounds=spec.rounds,
                params=params,
                inputs=shared,
                bid_window_ms=spec.bid_window_ms or self._bid_window(spec.kind),
                net=net,
                verify=spec.announce_verify(salt),
            )
        except ProtocolError as exc:
            # parse_spec admits only what an announce can carry, but one limit is on the whole:
            # the signed announce is at most 64 KiB (SPEC §5), and params ride inside it.
            # Without this the caller got an internal error instead of a spec error.
            if exc.reason == "oversized":
                raise SubmitError(
                    f"params: too large for the signed announce (one gossip message, at most"
                    f" {MAX_GOSSIP_BYTES} bytes); pass big data as an input file"
                ) from None
            raise SubmitError(f"spec: cannot be announced: {exc}") from None
        # The envelope limit (64 KiB) is not the only one: the announce must fit one gossip
        # message, re-announces included. Stored and bid on locally but never published, it
        # used to wait for bids that could not come.
        too_large = gossip_too_large(raw, slack=ANNOUNCE_SLACK)
        if too_large is not None:
            raise SubmitError(
                f"params: the announce is too large to publish ({too_large}); pass big data as an input file"
            )
        msg = signed.message
        assert isinstance(msg, TaskAnnounce)
        record = spec.to_json()
        record["input_refs"] = refs
        if salt is not None:
            record["spot_salt"] = salt.hex()
        self.node.store.add_task(
            task_id=task_id,
            role="submitter",
            submitter=self.node.peer_id,
            kind=spec.kind,
            state="bidding",
            spec=record,
            announce=raw,
            deadline_at=(msg.issued_at + msg.deadline_ms) / 1000,
            message=f"announced; bid window {msg.bid_window_ms} ms",
        )
        self.book.add(signed)  # our own: always admitted
        self.node.counters.inc("tasks.submitted")
        self._start_machine(signed, record, restored=None)
        return task_id

    @staticmethod
    def _check_npz(name: str, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise SubmitError(
                        f"inputs.{name}: the .npz must hold an array named x (and y for training)"
                    )
                n = len(z["x"])
                if "y" in z.files and len(z["y"]) != n:
                    raise SubmitError(f"inputs.{name}: x and y have different lengths")
        except (ValueError, OSError) as exc:
            raise SubmitError(f"inputs.{name}: not a readable .npz ({exc})") from None

    # -- machines -------------------------------------------------------------------------
    def _start_machine(self, announce: Signed, spec: dict[str, Any], *, restored: Restored | None) -> None:
        ann = announce.message
        assert isinstance(ann, TaskAnnounce)
        refs: dict[str, Any] = spec.get("input_refs", {})
        kind = kinds.get(ann.kind)
        split = next((n for n in kind.split_inputs if n in refs), None)
        # The submitter's held-out inputs (docs/tasks.md: validation, test) never leave it.
        held_out: dict[str, Any] = {
            n: refs[n] for n in ("validation", "test") if n in refs and kind.evaluate_with
        }
        if held_out and kind.evaluate_with:
            # Its evaluations run on the pool's local lane, off the training slot (issue 9
            # item 3): start that lane's worker now, not beside round 2's training.
            self.node.pool.prewarm_local(kind.evaluate_with)
        market = self.node.config.market
        machine = TaskMachine(
            announce,
            sealer=self.sealer,
            times=MarketTimes(
                lease_ttl_ms=int(market.lease_ttl_s * 1000), heartbeat_ms=int(market.heartbeat_s * 1000)
            ),
            split_input=split,
            held_out=held_out,
            restored=restored,
            wait_for_network=True,
            retries=market.retries,
            backup_after=market.backup_after,
            backup_min_ms=int(market.backup_min_s * 1000),
            outputs=DeclaredOutputs(*kinds.declared_outputs(kind, ann.params, spec.get("max_output_mb"))),
            spot_salt=bytes.fromhex(spec["spot_salt"]) if "spot_salt" in spec else None,
        )
        task_id = ann.task_id
        driver = MachineDriver(
            task_id, machine, self, self.nursery, on_error=lambda name: self._driver_error(task_id, name)
        )
        self.drivers[ann.task_id] = driver
        if not self._peers_loop:
            self._peers_loop = True
            self.nursery.start_soon(self._report_peers)
        driver.feed(ev.Start(now_ms=driver.now_ms()))
        driver.feed(self.trust_event(driver.now_ms()))  # before the bid window closes
        # Whom to expect bids from, before the first bid can arrive (the window closes early
        # once every peer known to offer the kind has bid); _report_peers keeps it current.
        driver.feed(self._peers_known(ann.kind, wall_ms()))

    def _driver_error(self, task_id: str, name: str) -> None:
        self.node.counters.inc(name)
        if name == "drive.machine_errors":
            # The machine refused an event (our bug) and is no longer driven: the task cannot
            # go on, so it fails as the supervisor's internal errors did.
            self._fail_outside(
                task_id, "failed", "internal error: the task's state machine stopped", "internal"
            )

    def _live(self, task_id: str) -> MachineDriver | None:
        driver = self.drivers.get(task_id)
        return driver if driver is not None and not driver.closed else None

    async def _report_peers(self) -> None:
        while True:
            now = wall_ms()
            live = [
                d for d in self.drivers.values() if not d.closed and _machine(d).public_state not in TERMINAL
            ]
            events: dict[str, ev.PeersKnown] = {}
            for d in live:
                kind = _machine(d).announce.kind
                if kind not in events:
                    events[kind] = self._peers_known(kind, now)
                d.feed(events[kind])
            await trio.sleep(PEERS_EVERY_S)

    def _bid_window(self, kind: str) -> int:
        """market.bid_window_ms, or longer when the round trips to the peers that offer
        ``kind`` need it (:func:`bid_window_for`)."""
        rtts = [r for r in self._offering_round_trips(kind) if r is not None]
        return bid_window_for(self.node.config.market.bid_window_ms, rtts)

    def _offering_round_trips(self, kind: str) -> list[float | None]:
        """The measured round trip (None: not yet) to each other peer that offers ``kind``:
        who may bid on a task of that kind and fetch its parts."""
        offering = _offering(self.node.table.alive(wall_ms()), kind) - {self.node.peer_id}
        return [self.node.p2p.round_trip_s(p) for p in sorted(offering)]

    def _peers_known(self, kind: str, now: int) -> ev.PeersKnown:
        """The peer table as a task of ``kind`` sees it: every peer alive, and those whose
        advert offers the kind and is not draining (whom to expect bids from)."""
        alive = self.node.table.alive(now)
        return ev.PeersKnown(
            now_ms=now,
            alive=len(alive),
            connected=len(self.node.p2p.connected_peers()),
            offering=_offering(alive, kind),
        )

    def on_message(
        self, signed: Signed, *, via: str = ev.VIA_GOSSIP, sender: str | None = None
    ) -> list[act.Action]:
        """Hand a verified lease or result of one of our tasks to its machine (the task bus)."""
        driver = self._live(signed.message.task_id)  # type: ignore[attr-defined]
        if driver is None:
            return []
        return driver.feed(ev.MessageVerified(now_ms=driver.now_ms(), signed=signed, via=via, sender=sender))

    def _own_gossip(self, raw: bytes) -> None:
        """Our own contractor's leases for our own tasks (they never pass the task bus): the
        machine counts a holder's silence, ours included."""
        # Every message we gossip comes here: read the kind first, so that only our leases pay
        # for a signature check and a payload decode (issue 10: our announces, awards and
        # results were verified again here, ~11% of a loaded daemon's samples).
        try:
            outer = codec.unpack(raw)
        except ProtocolError:
            return
        if not isinstance(outer, dict) or outer.get("type") != "lease":
            return
        try:
            signed = open_envelope(raw, kinds=frozenset({"lease"}))
        except ProtocolError:
            return  # not a lease (our announce, award, cancel, result, vote)
        lease = signed.message
        assert isinstance(lease, Lease)
        view = self.book.get(lease.task_id)
        if view is not None and view.holder(lease.shard, lease.epoch) == signed.signer:
            # What task.get shows as the shard's state (peerd/api.py); the task bus records it
            # for everyone else's leases, and ours never pass through it.
            view.lease_states[(signed.signer, lease.shard)] = lease.state
            view.pulse()
        driver = self._live(lease.task_id)
        if driver is not None:
            driver.feed(ev.MessageVerified(now_ms=driver.now_ms(), signed=signed, via=ev.VIA_LOCAL))

    def on_certificate(self, view: TaskView, cert: Certificate) -> None:
        """A round of one of our tasks is certified (the committee role's hook)."""
        driver = self._live(cert.task_id)
        if driver is None or view.announce.aggregation == "none":
            return
        if not 1 <= cert.round <= view.announce.rounds:
            return
        driver.feed(ev.RoundCertified(now_ms=driver.now_ms(), certificate=cert))

    @staticmethod
    def _reply(actions: list[act.Action], default: str) -> dict[str, Any]:
        for a in actions:
            if isinstance(a, act.Reply):
                return {"ok": a.ok, "reason": a.reason}
        return {"ok": False, "reason": default}

    # -- bids ---------------------------------------------------------------------------
    def accept_bid(self, raw: bytes, sender: str, *, verified: Signed | None = None) -> dict[str, Any]:
        """Store a bid for one of our tasks. ``verified``: our own bid, already admitted."""
        signed = verified or self.node.inbox.admit(raw, sender=sender, kinds=frozenset({"bid"}))
        if signed is None:
            return {"ok": False, "reason": "invalid bid"}
        known = self.node.table.get(signed.signer, wall_ms()) if verified is None else None
        try:
            # C⁰ within what the bidder's advertised hardware can deliver (SPEC §7.4).
            check_bid(signed.message, known.advert if known is not None else None)  # type: ignore[arg-type]
        except ProtocolError as exc:
            self.node.counters.inc(f"dropped.{exc.reason}")
            return {"ok": False, "reason": "implausible capacity"}
        task_id = signed.message.task_id  # type: ignore[attr-defined]
        driver = self._live(task_id)
        if driver is None:
            row = self.node.store.task(task_id)
            if row is not None and row.role == "submitter" and row.state not in TERMINAL:
                # Restarted, and the bid came in before resume() rebuilt the machine.
                driver = self._resume_task(row)
        if driver is None:
            self.node.counters.inc("bids.unknown_task")
            return {"ok": False, "reason": "unknown task"}
        # Local or not, the reply is the machine's (a bid for a finished task: unknown task).
        actions = driver.feed(ev.MessageVerified(now_ms=driver.now_ms(), signed=signed, via=ev.VIA_STREAM))
        view = self.book.get(task_id)
        if view is not None:
            view.pulse()
        return self._reply(actions, "unknown task")

    async def handle_bid_stream(self, stream: FrameStream) -> None:
        # Any number of bids, one reply each, until the bidder closes or idles (SPEC §8.4).
        await serve_requests(
            stream, lambda raw: codec.pack(self.accept_bid(raw, stream.remote_peer)), reply_s=10
        )
        await stream.aclose()

    # -- results ------------------------------------------------------------------------
    def accept_result(self, raw: bytes, sender: str) -> dict[str, Any]:
        """A contractor hands us its signed result; we store it before acknowledging."""
        try:
            signed = open_envelope(raw, kinds=frozenset({"result"}))
        except ProtocolError as exc:
            self.node.counters.inc(f"dropped.{exc.reason}")
            return {"ok": False, "reason": "invalid result"}
        msg = signed.message
        assert isinstance(msg, Result)
        if signed.signer != sender:
            self.node.counters.inc("dropped.signer_mismatch")
            return {"ok": False, "reason": "signer mismatch"}
        driver = self._live(msg.task_id)
        if driver is None:
            row = self.node.store.task(msg.task_id)
            if row is not None and row.role == "submitter" and row.state in TERMINAL:
                # A holder whose acknowledgement was lost (a stream cut after we stored the
                # result and finished the task) sends it again: it is stored, so say so, and
                # the holder counts it delivered instead of undeliverable.
                if any(r.raw == raw for r in self.node.store.results(msg.task_id, msg.round)):
                    return {"ok": True, "reason": "already stored"}
            if row is None or row.role != "submitter" or row.state in TERMINAL:
                return {"ok": False, "reason": "unknown task"}
            # Restarted, and the result came in before resume() rebuilt the machine: answering
            # "unknown task" would make the contractor stop delivering it for good.
            driver = self._resume_task(row)
            if driver is None:
                return {"ok": False, "reason": "unknown task"}
        actions = driver.feed(
            ev.MessageVerified(now_ms=driver.now_ms(), signed=signed, via=ev.VIA_STREAM, sender=sender)
        )
        reply = self._reply(actions, "unknown task")
        view = self.book.get(msg.task_id)
        if reply["ok"] and view is not None and view.holder(msg.shard, msg.epoch) == signed.signer:
            # The committee role reads the commits from the view. The gossiped copy of this
            # commit will find it kept, so the role hears of it now: its round starts, and a
            # member fetches the output while the other holders still train.
            if view.add_result(signed):
                for listener in self.on_result:
                    listener(view, signed)
        return reply

    async def handle_result_stream(self, stream: FrameStream) -> None:
        await serve_requests(
            stream, lambda raw: codec.pack(self.accept_result(raw, stream.remote_peer)), reply_s=15
        )
        await stream.aclose()

    # -- cancel -------------------------------------------------------------------------
    async def cancel(self, task_id: str) -> str:
        row = self.node.store.task(task_id)
        if row is None or row.role != "submitter":
            raise KeyError(task_id)
        if row.state in TERMINAL:
            return row.state
        driver = self._live(task_id)
        if driver is None:
            driver = self._resume_task(row)
        if driver is None:
            # Not drivable (its announce no longer verifies): record the user's cancel anyway.
            self._fail_outside(task_id, "cancelled", "cancelled by the submitter", None)
            return "cancelled"
        driver.feed(ev.CancelRequested(now_ms=driver.now_ms()))
        return "cancelled"

    # -- restart ----------------------------------------------------------------------------
    def resume(self) -> None:
        """After a restart: rebuild the machines of our unfinished tasks from the store."""
        for row in self.node.store.tasks(role="submitter"):
            if row.state in TERMINAL or self._live(row.task_id) is not None:
                continue
            self._resume_task(row)

    def _resume_task(self, row: TaskRecord) -> MachineDriver | None:
        """One of our tasks, from its records: the view the other roles read, and its machine
        (``Restored``: every stored message verified again)."""
        task_id = row.task_id
        if row.announce is None:
            return None
        signed = self.node.inbox.verify_embedded(row.announce, kinds=frozenset({"announce"}))
        if signed is None:
            return None
        view = self.book.add(signed)
        if view is None:
            return None

        def verified(raws: list[bytes], kind: str) -> list[Signed]:
            out = []
            for raw in raws:
                s = self.node.inbox.verify_embedded(raw, kinds=frozenset({kind}))
                if s is not None:
                    out.append(s)
            return out

        bids = verified([r.raw for r in self.node.store.bids(task_id)], "bid")
        awards = verified([r.raw for r in self.node.store.awards(task_id)], "award")
        results = verified([r.raw for r in self.node.store.results(task_id)], "result")
        for a in awards:
            view.awards[a.message.epoch] = a  # type: ignore[attr-defined]
        for r in results:
            view.add_result(r)
        certificates: dict[int, Certificate] = {}
        for rnd in range(1, signed.message.rounds + 1):  # type: ignore[attr-defined]
            cert = view.certificates.get(rnd)
            if cert is None:
                stored = self.node.store.certificate(task_id, rnd)
                if stored is None:
                    break
                try:
                    cert = check_certificate(stored.votes, task_id=task_id, round_no=rnd)
                except ProtocolError:
                    break
                view.certificates[rnd] = cert
            certificates[rnd] = cert
        restored = Restored(
            bids=bids,
            awards=awards,
            results=results,
            certificates=certificates,
            reported_rounds=[int(r["round"]) for r in self.node.store.rounds(task_id)],
            public_state=row.state,
            reason=row.reason,
        )
        self._start_machine(signed, row.spec, restored=restored)
        return self.drivers[task_id]

    # -- the Performer: what the machine asks -----------------------------------------------
    def perform_now(self, driver: MachineDriver, action: act.Action) -> bool:
        if isinstance(action, act.Persist):
            self._persist(driver, action.record)
            return True
        if isinstance(action, act.Notify):
            self._notify(action)
            return True
        if isinstance(action, act.Count):
            self.node.counters.inc(action.name)
            return True
        if isinstance(action, act.Drop):
            self.node.counters.inc(f"dropped.{action.reason}")
            return True
        if isinstance(action, act.Observe):
            self.reputation.observe(action.peer, action.outcome, wall_ms(), action.work_gflop, action.wall_ms)
            self.node.counters.inc(f"trust.observed.{action.outcome}")
            # Tasks still bidding learn it now, not only tasks submitted later: a liar caught
            # on one task loses the next award of every other (bench trust, docs/benchmarks.md).
            if not self._refresh_due:
                self._refresh_due = True
                self.nursery.start_soon(self._refresh_after_observing)
            return True
        if isinstance(action, act.Reply):
            return True  # read from the actions by accept_bid / accept_result
        if isinstance(action, act.CancelJob):
            scope = self._jobs.pop(action.job_id, None)
            if scope is not None:
                scope.cancel()
            return True
        if isinstance(action, act.Publish):
            # Our own award is in the view at once (the task bus does not see our gossip, and
            # the contractor and committee read the view); the gossip itself is slow I/O.
            self._own_message(driver, action.signed)
        return False

    def perform_later(
        self, driver: MachineDriver, action: act.Action
    ) -> Callable[[], Awaitable[ev.Event | None]] | None:
        if isinstance(action, act.Publish):
            return lambda: self._publish(driver, action.signed)
        if isinstance(action, act.FetchBlob):
            return lambda: self._guarded(driver, self._fetch(action))
        if isinstance(action, act.SplitInputs):
            return lambda: self._guarded(driver, self._split(driver, action))
        if isinstance(action, act.StartJob):
            return lambda: self._guarded(driver, self._evaluate(action))
        return None

    def _persist(self, driver: MachineDriver, rec: act.Record) -> None:
        store = self.node.store
        if isinstance(rec, act.TaskState):
            store.set_state(rec.task_id, rec.state, rec.message, reason=rec.reason)
        elif isinstance(rec, act.TaskEvent):
            store.add_event(rec.task_id, rec.state, rec.message)
        elif isinstance(rec, act.BidRecord):
            store.add_bid(rec.task_id, rec.peer, rec.raw)
        elif isinstance(rec, act.AwardRecord):
            store.add_award(rec.task_id, rec.epoch, rec.raw, [dict(a) for a in rec.assignments])
        elif isinstance(rec, act.ResultRecord):
            msg = open_envelope(rec.raw, kinds=frozenset({"result"})).message
            machine = _machine(driver)
            store.add_result(
                rec.task_id,
                rec.round,
                rec.shard,
                rec.peer,
                rec.raw,
                seq=msg.seq,
                # A compared task's first result per peer and copy is final (SPEC §7.10), so
                # the bundle holds what the quorum counted; a certified round's are too.
                certified=rec.round in machine.certificates or machine.announce.verify is not None,
            )
        elif isinstance(rec, act.RoundRecord):
            store.set_round(rec.task_id, rec.round, dict(rec.info))
        elif isinstance(rec, act.ShardStateRecord):
            store.set_shard_state(rec.task_id, rec.shard, rec.state)
        elif isinstance(rec, act.TaskResultRecord):
            store.set_result(rec.task_id, dict(rec.result))
        elif isinstance(rec, act.CertificateRecord):
            store.add_certificate(rec.task_id, rec.round, dict(rec.output), list(rec.votes))
        else:
            log.error("task %s: no store method for %s", rec.task_id, type(rec).__name__)
            self.node.counters.inc("drive.unknown_actions")

    def _notify(self, n: act.Notify) -> None:
        event: dict[str, Any] = {"task_id": n.task_id, "state": n.state, "message": n.message}
        if n.extra:
            event.update(n.extra)  # a certified round: its number and metrics
        else:
            event["at"] = time.time()
        if n.final:
            event["final"] = True
        self.node.emit(n.task_id, event)
        view = self.book.get(n.task_id)
        if view is not None and n.final:
            view.pulse()
        if n.final and self.node.pool is not None:  # None: component tests without a pool
            # Its evaluation models, kept resident between rounds, go (issue 9 item 2).
            self.node.pool.forget_task(n.task_id)

    def _own_message(self, driver: MachineDriver, signed: Signed) -> None:
        m = signed.message
        view = self.book.get(driver.key)
        if view is None or not isinstance(m, Award):
            return
        previous = view.latest_award()
        view.awards[m.epoch] = signed
        if previous is not None:
            # A peer that just got a shard, or was just declared lost, is not "lost" to the
            # committee before the new award lands: a full lease TTL from now.
            now = trio.current_time()
            before = {a["shard"]: a["peer_id"] for a in previous.assignments}
            for a in m.assignments:
                if a["peer_id"] != before.get(a["shard"]):
                    view.heartbeats[a["peer_id"]] = now
            for p in set(m.excluded) - set(previous.excluded):
                view.heartbeats[p] = now
        view.pulse()

    async def _publish(self, driver: MachineDriver, signed: Signed) -> None:
        await self.node.gossip(signed.raw)
        # Hand our own message to our own roles (the task bus never sees our gossip).
        view = self.book.get(driver.key)
        if view is None:
            return None
        for listener in self.on_published:
            await listener(view, signed)
        return None

    async def _guarded(self, driver: MachineDriver, work: Awaitable[ev.Event | None]) -> ev.Event | None:
        """Run one slow action; a failure that is no protocol outcome is an internal error
        of the task (the supervisor's ``except Exception`` before): the task fails."""
        try:
            return await work
        except Exception as exc:
            log.exception("task %s failed in the submitter", driver.key)
            self._fail_outside(str(driver.key), "failed", f"internal error: {exc}", "internal")
            driver.close()
            return None

    def _fail_outside(self, task_id: str, state: str, message: str, reason: str | None) -> None:
        """End a task the machine cannot end itself (the driver's own failure)."""
        row = self.node.store.task(task_id)
        if row is None or row.state in TERMINAL:
            return
        self.node.store.set_state(task_id, state, message, reason=reason)
        self.node.counters.inc(f"tasks.{state}")
        self._notify(act.Notify(task_id=task_id, state=state, message=message, final=True))

    async def _fetch(self, a: act.FetchBlob) -> ev.Event:
        try:
            path = await self.node.fetch_blob(
                a.source, a.digest, max_bytes=None if a.size == act.ANY_SIZE else a.size
            )
        except ProtocolError as exc:
            log.info("fetching %s… from %s failed: %s", a.digest[:12], a.source[-8:], exc)
            return ev.BlobFetched(
                now_ms=wall_ms(),
                tag=a.tag,
                digest=a.digest,
                source=a.source,
                ok=False,
                reason=exc.reason,
                error=str(exc),
            )
        data = await trio.to_thread.run_sync(path.read_bytes) if a.want_bytes else None
        return ev.BlobFetched(
            now_ms=wall_ms(), tag=a.tag, digest=a.digest, source=a.source, ok=True, data=data
        )

    async def _split(self, driver: MachineDriver, a: act.SplitInputs) -> ev.Event:
        """Split the data across shards in proportion to each node's C (docs/design.md §4)."""
        row = self.node.store.task(a.task_id)
        assert row is not None
        ref = row.spec["input_refs"][a.name]
        path = self.node.blobs.path(ref["sha256"])
        # Who may fetch a part: the peers that offer the kind (our own part never leaves us).
        compress = split_compressed(self._offering_round_trips(row.kind))
        parts = await trio.to_thread.run_sync(
            functools.partial(_split_npz, path, list(a.shares), a.seed, compress=compress)
        )
        out = []
        for data in parts:
            digest = await trio.to_thread.run_sync(self.node.blobs.put_bytes, data)
            out.append({a.name: {"sha256": digest, "size": len(data)}})
        return ev.InputsSplit(now_ms=wall_ms(), inputs=tuple(out))

    async def _evaluate(self, a: act.StartJob) -> ev.Event | None:
        """Score a certified model on the submitter's own held-out data (local worker).
        Best effort: any failure is a job that did not succeed."""
        job = Job(
            job_id=a.job_id,
            submitter=self.node.peer_id,
            kind=a.kind,
            params=dict(a.params),
            inputs={name: self.node.blobs.path(ref["sha256"]) for name, ref in a.inputs.items()},
            limits=Limits(memory_bytes=self.node.config.limits.memory_mb << 20),
            trusted=True,
            task=a.task_id,
        )
        with trio.CancelScope() as scope:
            self._jobs[a.job_id] = scope
            try:
                # The local lane: never on the slot this node advertises, so the next round's
                # training job here does not wait behind it (issue 9 item 3).
                res = await self.node.pool.execute(job, local=True)
            except Exception as exc:
                log.warning("evaluation of %s failed: %s", a.task_id, exc)
                return ev.JobFinished(
                    now_ms=wall_ms(), job_id=a.job_id, ok=False, error="internal", detail=str(exc)
                )
            finally:
                self._jobs.pop(a.job_id, None)
        if scope.cancelled_caught:
            return None  # CancelJob: no JobFinished follows
        if not res.ok:
            log.warning("evaluation of %s failed: %s %s", a.task_id, res.error, res.detail[-300:])
        return ev.JobFinished(
            now_ms=wall_ms(),
            job_id=a.job_id,
            ok=res.ok,
            metrics=dict(res.metrics),
            error=res.error,
            detail=res.detail,
        )


def _offering(alive: list[PeerEntry], kind: str) -> frozenset[str]:
    """The peers among ``alive`` (peer-table entries) whose advert offers ``kind`` and is not
    draining."""
    return frozenset(
        e.peer_id for e in alive if kind in e.advert.offer["kinds"] and not e.advert.offer["draining"]
    )


def _machine(driver: MachineDriver) -> TaskMachine:
    machine = driver.machine
    assert isinstance(machine, TaskMachine)
    return machine


def _split_npz(path: Path, shares: list[float], seed: int, *, compress: bool = True) -> list[bytes]:
    """IID split of an .npz (x, y, …) into len(shares) parts sized ∝ shares.

    With ``compress`` each part is a deflate-compressed .npz (level 1), which ``np.load``
    reads as it reads any other: every remote holder fetches its part before round 1 can
    start, and a third of Fashion-MNIST as float32 pixels shrinks 4.4× (57.6 MB to 13.1 MB) for
    ~0.4 s of zlib per part, compressed in parallel threads (zlib releases the GIL); as uint8
    pixels with the task's ``x_scale`` (the demo's data, docs/tasks.md) it is 8.3 MB. Without,
    the parts are stored (:func:`split_compressed` says when). The bytes depend only on the
    data, the shares, the seed and ``compress`` (zip entries carry a fixed 1980 timestamp), so a
    repeated split is the same blob (data once, issue 9 item 4).
    """
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(arrays["x"])
    order = np.random.default_rng(seed).permutation(n)
    sizes = shard_sizes(n, shares)
    parts = []
    start = 0
    for size in sizes:
        idx = np.sort(order[start : start + size])
        start += size
        parts.append({k: v[idx] if len(v) == n else v for k, v in arrays.items()})
    workers = max(1, min(len(parts), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(functools.partial(_npz_bytes, compress=compress), parts))


def _npz_bytes(arrays: dict[str, np.ndarray], *, compress: bool = True) -> bytes:
    """``np.savez_compressed`` at deflate level 1 (numpy's own uses zlib's slower default), or
    ``np.savez`` (stored) without ``compress``."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method, compresslevel=1 if compress else None) as zf:
        for name, value in arrays.items():
            # ZipFile.open(name) stamps 1980-01-01, as np.savez does: deterministic bytes.
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


__all__ = ["SubmitError", "Submitter", "net_params"]
