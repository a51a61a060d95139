"""The simulated world: peers, their machines, and the driver that performs their actions.

Each :class:`Peer` is what a daemon would be with its I/O replaced by the simulator:

* its *machines* are the protocol's own (``protocol.machines``): a ``TaskMachine`` per task it
  submitted, ``ShardMachine`` s for the tasks it bid on, a ``RoundMachine`` per aggregation
  round it takes part in; every event goes in through ``handle`` and every action that comes
  out is performed here, in list order (``Peer.perform``);
* its *inbox* is the daemon's (peerd/inbox.py) rebuilt from protocol parts: dedupe by
  envelope hash, ``open_envelope`` (SPEC §5), signer = sender, ``ReplayGuard`` (SPEC §6);
* its *executor* is simulated: a job is work / speed seconds of virtual time, the peer's
  real speed shared among its running jobs (processor sharing), with optional noise;
* its *blob store* is a set of digests over one process-wide dict of bytes.

What only a daemon's configuration decides — eligibility (``[offer]``/``[policy]``) — is
the world's: every peer that is up bids for every task, or, with ``--bidders D``, a random
sample of D peers per task (the "bids solicited from d random peers" variant of
docs/simulation.md).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol import cadence, codec, tensors
from protocol import trust as tr
from protocol.allocation import shard_sizes
from protocol.awards import check_signed_award
from protocol.certificate import check_certificate
from protocol.envelope import Signed, Signer, message_digest
from protocol.errors import ProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes
from protocol.machines.round import RoundMachine
from protocol.machines.shard import ShardMachine, ShardState
from protocol.machines.task import TERMINAL as TASK_TERMINAL
from protocol.machines.task import Restored, TaskMachine
from protocol.messages import Advert, Award, Lease, Message, Result, TaskAnnounce
from protocol.replay import ReplayGuard
from sim.crypto import open_memo
from sim.engine import Engine, Handle, Violation
from sim.faults import FaultSpec, Schedule, draw
from sim.invariants import Invariants
from sim.net import NetConfig, Network
from sim.rng import Streams

#: Unix ms of virtual time 0 (any fixed value: messages carry absolute times, SPEC §6).
BASE_MS = 1_800_000_000_000
TASK_KINDS = frozenset({"announce", "award", "lease", "result", "vote", "cancel"})
#: A restarted peer's sequence counter resumes above its last reserved block, as the
#: daemon's sequence store does (SPEC §6 "Obligations of a signer").
SEQ_BLOCK = 1024
#: Blob request size on the wire (a §9 request frame).
BLOB_REQUEST_BYTES = 96
#: Stream reply size ({"ok": ..., "reason": ...}).
REPLY_BYTES = 16


def to_ms(t: float) -> int:
    return BASE_MS + round(t * 1000)


def to_s(at_ms: int) -> float:
    return (at_ms - BASE_MS) / 1000.0


@dataclass(frozen=True)
class SimConfig:
    peers: int = 20
    tasks: int = 10
    seed: int = 1
    faults: FaultSpec = field(default_factory=FaultSpec)
    net: NetConfig = field(default_factory=NetConfig)
    stub_signatures: bool = False
    #: Seconds between refreshes; None: the daemon's (a third of the advert's lifetime, which
    #: grows with the peers a node knows, protocol/cadence.py). Load changes advertise at once.
    advert_interval: float | None = None
    #: The daemon's [adverts] ttl_s and network_rate defaults (peerd/config.py).
    advert_ttl: float = 60.0
    advert_network_rate: float = 0.5
    adverts: str = "full"  # "full" | "sampled"
    advert_sample: int = 16
    arrival_rate: float = 2.0  # tasks per virtual second
    bidders: int = 0  # 0: every peer bids (today's protocol); D: a random sample of D peers
    aggregated: float = 0.5  # fraction of tasks with an aggregation round
    work_noise: float = 0.1  # log-normal sigma of a job's duration
    lease_ttl_ms: int = 10_000
    heartbeat_ms: int = 2_000
    keep_trace: bool = False
    grace: float = 120.0  # after the last deadline, how long the run may go on
    #: Fraction of tasks their submitter cancels, at a uniform time before the deadline.
    cancel: float = 0.0
    #: Size of a keras-train task's data, split across its shards (MB, uniform in the range;
    #: (0, 0): no data input).
    data_mb: tuple[float, float] = (0.0, 0.0)
    #: Submitters crash too (their TaskMachines resume from their records on restart).
    crash_submitters: bool = True
    #: Submitters apply protocol/trust.py (``TrustKnown`` from their own records, which every
    #: ``Observe`` updates), as the daemon does: docs/allocation.md "Caps". Off by default
    #: so existing runs keep their traces.
    trust: bool = False
    #: Fraction of plain tasks whose results are replicated (``verify = replicate``, 2 or 3
    #: copies; SPEC §7.10): liars are then outvoted instead of believed.
    replicated: float = 0.0
    #: Test-only: passed to every RoundMachine (``RoundMachine.PLANTED_BUGS``); never the default.
    planted_bug: str | None = None


# -- the work model ----------------------------------------------------------------------------


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()


def shard_output(task_id: str, round_no: int, shard: int, run: tuple[int, int], liar: bool) -> bytes:
    """A shard's simulated output O_i: a tensor list (SPEC §11.2) of one float64 vector.

    Honest outputs are the round's "true" model plus a small deviation per shard and per
    ``run`` (peer, job number): another peer, or a re-run, gives other bytes, as training
    does; a liar's are far off."""
    base = np.frombuffer(_digest("model", task_id, round_no), dtype=np.uint8)[:8].astype(np.float64) / 255.0
    dev = np.frombuffer(_digest("dev", task_id, round_no, shard, run), dtype=np.uint8)[:8].astype(np.float64)
    vec = base + (dev - 127.5) / 1e4
    if liar:
        vec = vec * -1e3 + 7.0
    return tensors.encode_arrays([vec])


def plain_output(task_id: str, shard: int, run: tuple[int, int], liar: bool) -> bytes:
    """A plain (``sleep``) shard's output: a function of the task and the shard's work on
    every honest peer — copies of one shard agree (SPEC §7.10) — and, for a liar, of its
    run: two liars do not agree by accident."""
    if liar:
        return _digest("out", task_id, shard, run, "liar") * 8
    return _digest("out", task_id, shard, "honest") * 8


# -- one peer -----------------------------------------------------------------------------------


class PeerSealer:
    """The peer's ``protocol.machines.common.Sealer``: its Ed25519 signer and the sequence
    counter it persists (SPEC §6: strictly increasing; a restart resumes above the last
    reserved block, as the daemon's sequence store does)."""

    def __init__(self, signer: Signer, first_seq: int = 1) -> None:
        self.signer = signer
        self.next_seq = first_seq

    @property
    def peer_id(self) -> str:
        return self.signer.peer_id

    def seal(self, cls: type[Message], *, now_ms: int, ttl_ms: int, **fields: Any) -> Signed:
        seq = self.next_seq
        self.next_seq += 1
        msg = cls(seq=seq, issued_at=now_ms, expires_at=now_ms + min(ttl_ms, cls.MAX_TTL_MS), **fields)
        raw = self.signer.seal(msg)
        return Signed(msg, self.signer.peer_id, self.signer.public_key, raw, message_digest(raw))

    def skip(self) -> int:
        """Use up one sequence number without sealing (an advert only counted, see
        ``Peer.advertise``)."""
        seq = self.next_seq
        self.next_seq += 1
        return seq


class Slot:
    """One machine running on one peer."""

    __slots__ = ("kind", "machine", "mid", "peer", "task_id")

    def __init__(self, mid: int, peer: Peer, kind: str, task_id: str, machine: Any) -> None:
        self.mid = mid
        self.peer = peer
        self.kind = kind  # "task" | "shard" | "round"
        self.task_id = task_id
        self.machine = machine

    def __repr__(self) -> str:
        return f"{self.kind}#{self.mid}@{self.peer.index}"


@dataclass
class Job:
    slot: Slot
    job_id: str
    remaining: float  # work units left
    finish: Handle | None = None
    result: Callable[[], ev.JobFinished] | None = None


class Peer:
    def __init__(self, world: World, index: int, seed_bytes: bytes, rng: random.Random) -> None:
        self.world = world
        self.index = index
        self.signer = Signer(seed_bytes)
        self.peer_id = self.signer.peer_id
        self.high_seq = 0  # the persisted sequence high-water mark
        self.sealer = PeerSealer(self.signer)
        self._advert: tuple[tuple[float, int], int, int] | None = None  # (content, size, seq)
        # Capacity classes: laptops, servers, GPU boxes (GFLOP/s).
        u = rng.random()
        if u < 0.6:
            self.c0 = rng.uniform(5.0, 20.0)
        elif u < 0.9:
            self.c0 = rng.uniform(20.0, 80.0)
        else:
            self.c0 = rng.uniform(100.0, 400.0)
        self.slots = rng.choice((1, 2, 4, 8))
        self.liar = False
        self.slow = False
        self.silent = False  # heartbeats its leases, never delivers (faults ``silent``)
        self.up = True
        self.incarnation = 0
        self.runs = 0  # job counter: outputs of a re-run differ
        self.disk: list[act.Record] = []
        self.own_tasks: dict[str, Signed] = {}  # announces of the tasks it submitted (on disk)
        self._reset_volatile()

    def _reset_volatile(self) -> None:
        self.seen: set[str] = set()
        self.replay = ReplayGuard()
        self.task_slots: dict[str, Slot] = {}  # task_id -> our TaskMachine
        self.rounds: dict[tuple[str, int], Slot] = {}  # (task_id, round) -> our RoundMachine
        self.machines: dict[str, list[Slot]] = {}  # task_id -> every machine of ours for it
        self.announces: dict[str, Signed] = {}
        self.timers: dict[tuple[int, str], Handle] = {}
        self.jobs: dict[str, Job] = {}
        self.blobs: set[str] = set()
        self.active_shards = 0
        self.advert_due: Handle | None = None

    # -- identity ---------------------------------------------------------------------------
    @property
    def claimed_c0(self) -> float:
        return self.c0 * 10.0 if self.liar else self.c0

    @property
    def speed(self) -> float:
        return self.c0 / 5.0 if self.slow else self.c0

    @property
    def load(self) -> float:
        return self.active_shards / self.slots

    def now_ms(self) -> int:
        return to_ms(self.world.engine.now)

    # -- machines ---------------------------------------------------------------------------
    def add_machine(self, kind: str, task_id: str, machine: Any) -> Slot:
        slot = Slot(self.world.next_mid(), self, kind, task_id, machine)
        self.machines.setdefault(task_id, []).append(slot)
        if kind == "task":
            self.task_slots[task_id] = slot
        elif kind == "round":
            self.rounds[(task_id, machine.round)] = slot
        # A bidder of an aggregated task follows its rounds (it may be re-awarded a shard and
        # then needs the certificates so far); a bidder of a plain task waits for awards only.
        self.world.follow(
            task_id, self.index, active=kind != "shard" or self.world.aggregated.get(task_id, False)
        )
        return slot

    def feed(self, slot: Slot, event: ev.Event) -> list[act.Reply]:
        """Hand one event to one machine and perform what it asks."""
        if not self.up or slot.peer is not self or slot not in self.machines.get(slot.task_id, ()):
            return []
        try:
            actions = slot.machine.handle(event)
        except Exception as exc:
            # Not one of the three invariants, but no run with a crashed machine is "ok".
            why = f"{exc.reason}: {exc}" if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
            raise Violation(
                f"machine error: {type(slot.machine).__name__} on peer {self.index} raised on "
                f"{type(event).__name__}: {why}"
            ) from exc
        if slot.kind == "shard" and slot.machine.state is not ShardState.BID_SENT:
            self.world.follow(slot.task_id, self.index, active=True)
        replies = [a for a in actions if isinstance(a, act.Reply)]
        for a in actions:
            if not isinstance(a, act.Reply):
                self.perform(slot, a)
        return replies

    def perform(self, slot: Slot, a: act.Action) -> None:
        w = self.world
        eng = w.engine
        if isinstance(a, act.Publish):
            msg = a.signed.message
            if isinstance(msg, Lease) and msg.state in ("failed", "released"):
                # Why shards end early (the summary's counters): hashes stripped, so alike count alike.
                w.counters[f"leases.{msg.state}: {re.sub('[0-9a-f]{8,}', '…', msg.detail)[:60]}"] += 1
            w.publish(self, a.signed)
            if self.liar and a.signed.kind == "result":
                w.equivocate_later(self, a.signed)
        elif isinstance(a, act.KeepOwnResult):
            pass  # a plain task's result: it goes to the submitter by its Send (SPEC §7.7)
        elif isinstance(a, act.Send):
            w.send(self, slot, a)
        elif isinstance(a, act.SetTimer):
            key = (slot.mid, a.name)
            old = self.timers.pop(key, None)
            if old is not None:
                old.cancel()
            self.timers[key] = eng.at(
                to_s(a.at_ms), f"timer {slot} {a.name}", self._fire, slot, a.name, self.incarnation
            )
        elif isinstance(a, act.CancelTimer):
            old = self.timers.pop((slot.mid, a.name), None)
            if old is not None:
                old.cancel()
        elif isinstance(a, act.StartJob):
            self.start_job(slot, a)
        elif isinstance(a, act.CancelJob):
            job = self.jobs.pop(a.job_id, None)
            if job is not None and job.finish is not None:
                job.finish.cancel()
            self._reshare()
        elif isinstance(a, act.FetchBlob):
            w.fetch(self, slot, a)
        elif isinstance(a, act.StoreBlob):
            w.blob_data.setdefault(a.digest, a.data)
            self.keep_blob(a.digest)
        elif isinstance(a, act.SplitInputs):
            parts = w.split(self, a)
            eng.after(0.0, f"split {slot}", self._split_done, slot, parts, self.incarnation)
        elif isinstance(a, act.Notify):
            if a.final:
                w.task_ended(self, a.task_id, a.state, a.message)
        elif isinstance(a, act.Persist):
            self.disk.append(a.record)
            if isinstance(a.record, act.TaskEvent) and "restarted" in a.record.message:
                w.counters["tasks.resumed"] += 1
            if isinstance(a.record, act.TaskState):
                w.last_state[a.record.task_id] = a.record
            if isinstance(a.record, act.TaskResultRecord) and "replicas" in a.record.result:
                w.check_replicated(a.record.task_id, a.record.result)
            if isinstance(a.record, act.AwardRecord) and a.record.epoch == 0:
                # How much of the work the liars were given at first (``liars=``, --trust).
                liars = {p.sealer.peer_id for p in w.peers if p.liar}
                for x in a.record.assignments:
                    w.counters["awards.shards"] += 1
                    w.counters["awards.liar_shards"] += x["peer_id"] in liars
        elif isinstance(a, act.Count):
            w.counters[a.name] += 1
        elif isinstance(a, act.Drop):
            w.counters[f"dropped.{a.reason}"] += 1
        elif isinstance(a, act.AdjustLoad):
            self.active_shards += a.delta
            w.max_active_shards = max(w.max_active_shards, self.active_shards)
            self.poke_advert()
        elif isinstance(a, act.Observe):
            w.counters[f"observed.{a.outcome}"] += 1
            if w.cfg.trust:
                w.observe(self, a)
        elif isinstance(a, act.AdoptShard):
            w.adopt(self, a)
        elif isinstance(a, act.Certified):
            w.certified(self, slot, a.certificate)
        else:
            raise Violation(f"unknown action {type(a).__name__} from {slot}")

    def keep_blob(self, digest: str) -> None:
        """A blob in this peer's store (on disk: it survives a restart)."""
        self.blobs.add(digest)
        self.world.blob_owner.setdefault(self.index, set()).add(digest)

    def _fire(self, slot: Slot, name: str, incarnation: int) -> None:
        if incarnation != self.incarnation:
            return
        self.timers.pop((slot.mid, name), None)
        self.feed(slot, ev.TimerFired(now_ms=self.now_ms(), name=name))

    def _split_done(self, slot: Slot, parts: tuple[dict[str, Any], ...], incarnation: int) -> None:
        if incarnation == self.incarnation:
            self.feed(slot, ev.InputsSplit(now_ms=self.now_ms(), inputs=parts))

    # -- the executor -------------------------------------------------------------------------
    def start_job(self, slot: Slot, a: act.StartJob) -> None:
        w = self.world
        if a.purpose == "shard":
            w.invariants.job_started(self.peer_id, a.task_id, a.shard, a.epoch)
        ann = w.announces[a.task_id].message
        assert isinstance(ann, TaskAnnounce)
        share = 1.0
        work_of = a.shard  # the shard whose work this is: a copy's ``of`` (SPEC §7.10)
        if a.purpose != "shard":
            # The submitter scores a certified model on its held-out input: a short local job.
            share = 0.01
            w.counters[f"jobs.{a.purpose}"] += 1
        if a.purpose == "shard":
            aw = w.invariants.tasks[a.task_id].awards.get(a.epoch)
            if aw is not None:
                share = next((x["share"] for x in aw.assignments if x["shard"] == a.shard), 1.0)
                work_of = next(
                    (int(x.get("of", a.shard)) for x in aw.assignments if x["shard"] == a.shard), a.shard
                )
        noise = w.rng("work").lognormvariate(0.0, w.cfg.work_noise) if w.cfg.work_noise > 0 else 1.0
        work = ann.work * share / max(1, ann.rounds) * noise
        self.runs += 1
        run = (self.index, self.runs)
        liar = self.liar
        if self.silent and a.purpose == "shard":
            # The job never ends: the machine keeps heartbeating its lease (faults ``silent``).
            w.counters["silent.jobs_withheld"] += 1
            return

        def result() -> ev.JobFinished:
            if a.purpose != "shard":
                return ev.JobFinished(
                    now_ms=self.now_ms(), job_id=a.job_id, ok=True, metrics={"accuracy": 0.5}
                )
            if ann.aggregation == "none":
                data = plain_output(a.task_id, work_of, run, liar)
                name = "out"
            else:
                data = shard_output(a.task_id, a.round, a.shard, run, liar)
                name = "weights"
            digest = hashlib.sha256(data).hexdigest()
            w.blob_data.setdefault(digest, data)
            self.keep_blob(digest)
            return ev.JobFinished(
                now_ms=self.now_ms(),
                job_id=a.job_id,
                ok=True,
                outputs={name: {"sha256": digest, "size": len(data)}},
                metrics={"num_samples": 100.0, "loss": 1.0 / a.round if a.round > 0 else 1.0},
            )

        self._advance_jobs()
        self.jobs[a.job_id] = Job(slot, a.job_id, work, result=result)
        self._reshare()

    def _advance_jobs(self) -> None:
        """Charge the running jobs for the virtual time since their last reschedule."""
        now = self.world.engine.now
        n = len(self.jobs)
        if not n:
            self._jobs_at = now
            return
        dt = now - getattr(self, "_jobs_at", now)
        rate = self.speed / n
        for job in self.jobs.values():
            job.remaining = max(0.0, job.remaining - dt * rate)
        self._jobs_at = now

    def _reshare(self) -> None:
        """Processor sharing: each of n running jobs runs at speed / n; reschedule all."""
        self._advance_jobs()
        n = len(self.jobs)
        for job in self.jobs.values():
            if job.finish is not None:
                job.finish.cancel()
            t = job.remaining / (self.speed / n)
            job.finish = self.world.engine.after(
                t, f"job {job.job_id} on {self.index}", self._job_done, job.job_id, self.incarnation
            )

    def _job_done(self, job_id: str, incarnation: int) -> None:
        if incarnation != self.incarnation:
            return
        self._advance_jobs()
        job = self.jobs.pop(job_id, None)
        if job is None or job.result is None:
            return
        self._reshare()
        self.feed(job.slot, job.result())

    # -- adverts --------------------------------------------------------------------------------
    def advertise(self, incarnation: int) -> None:
        if incarnation != self.incarnation or not self.up:
            return
        self.advert_due = None
        w = self.world
        now = self.now_ms()
        content = (self.load, min(self.active_shards, self.slots))
        if self._advert is not None and self._advert[0] == content:
            # Nobody simulated reads adverts (they are counted, docs/simulation.md): an advert
            # whose content did not change is not sealed again. It uses a sequence number and
            # has the size of the last sealed one, corrected for the longer encoding of seq.
            _, size, seq0 = self._advert
            seq = self.sealer.skip()
            w.advert(self, size + len(codec.pack(seq)) - len(codec.pack(seq0)))
        else:
            signed = self._seal_advert(now)
            assert isinstance(signed.message, Advert)
            self._advert = (content, len(signed.raw), signed.message.seq)
            w.advert(self, len(signed.raw))
        self.advert_due = w.engine.after(
            w.advert_refresh, f"advert {self.index}", self.advertise, self.incarnation
        )

    def _seal_advert(self, now: int) -> Signed:
        return self.sealer.seal(
            Advert,
            now_ms=now,
            ttl_ms=int(self.world.advert_lifetime * 1000),
            c0=min(self.claimed_c0, 1e6),
            load=min(self.load, 1000.0),
            cpu={"cores": self.slots, "model": "simulated", "gflops": min(self.claimed_c0, 1e6)},
            memory={"total_mb": 16384, "available_mb": 8192},
            gpus=[],
            offer={
                "cores": self.slots,
                "gpus": [],
                "memory_mb": 8192,
                "kinds": ["sleep", "keras-train"],
                "draining": False,
                "slots": self.slots,
                "busy": min(self.active_shards, self.slots),
            },
            params={"k": 0.2, "dc_min": 0.0, "dc_max": None},
            addrs=[f"/ip4/10.{self.index >> 16 & 255}.{self.index >> 8 & 255}.{self.index & 255}/tcp/4001"],
            version="0.1.0",
        )

    def poke_advert(self) -> None:
        """A load change re-advertises within MIN_GAP (peerd/adverts.py coalesces them)."""
        due = self.advert_due
        if due is None or due.cancelled or due.time - self.world.engine.now <= cadence.MIN_GAP_S:
            return
        due.cancel()
        self.advert_due = self.world.engine.after(
            cadence.MIN_GAP_S, f"advert {self.index}", self.advertise, self.incarnation
        )

    # -- inbox ----------------------------------------------------------------------------------
    def admit(
        self, raw: bytes, sender: str | None, kinds: frozenset[str], *, dedupe: bool = True
    ) -> Signed | None:
        """peerd/inbox.py's order: dedupe, open (SPEC §5), signer = sender, replay (SPEC §6)."""
        w = self.world
        digest = hashlib.sha256(raw).hexdigest()
        if dedupe and digest in self.seen:
            w.counters["dropped.duplicate"] += 1
            return None
        try:
            signed = open_memo(raw, kinds)
        except ProtocolError as exc:
            self.seen.add(digest)
            w.counters[f"dropped.{exc.reason}"] += 1
            return None
        if sender is not None and signed.signer != sender:
            w.counters["dropped.signer_mismatch"] += 1
            return None
        if dedupe:
            self.seen.add(digest)
            try:
                self.replay.accept(signed, self.now_ms())
            except ProtocolError as exc:
                w.counters[f"dropped.{exc.reason}"] += 1
                return None
        return signed

    # -- crash and restart --------------------------------------------------------------------
    def crash(self) -> None:
        if not self.up:
            return
        self.world.engine.note(f"crash peer {self.index}")
        self.up = False
        self.incarnation += 1
        self.world.net.up[self.index] = False
        for h in self.timers.values():
            h.cancel()
        for job in self.jobs.values():
            if job.finish is not None:
                job.finish.cancel()
        if self.advert_due is not None:
            self.advert_due.cancel()
        for task_id in self.machines:
            self.world.unfollow(task_id, self.index)
        self.high_seq = self.sealer.next_seq  # what its sequence store had reserved at most
        self._reset_volatile()

    def restart(self) -> None:
        if self.up:
            return
        w = self.world
        w.engine.note(f"restart peer {self.index}")
        self.up = True
        w.net.up[self.index] = True
        # The sequence store reserves blocks: a restart skips to the next block, never reuses.
        nxt = (self.high_seq // SEQ_BLOCK + 1) * SEQ_BLOCK + 1
        self.sealer = PeerSealer(self.signer, first_seq=nxt)
        self._advert = None
        self.blobs = {d for d in w.blob_owner.get(self.index, set())}
        w.restart_peer(self)
        self.advert_due = w.engine.after(
            w.rng("adverts").uniform(0, w.advert_refresh),
            f"advert {self.index}",
            self.advertise,
            self.incarnation,
        )


# -- the world ------------------------------------------------------------------------------------


class World:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = Streams(cfg.seed)
        self.engine = Engine(keep_trace=cfg.keep_trace)
        self.invariants = Invariants(lambda: self.engine.now)
        net_cfg = cfg.net
        if cfg.faults.loss is not None:
            net_cfg = NetConfig(**{**net_cfg.__dict__, "loss": cfg.faults.loss})
        self.net = Network(
            self.engine,
            net_cfg,
            cfg.peers,
            latency_rng=self.rng("latency"),
            loss_rng=self.rng("loss"),
            gossip_rng=self.rng("gossip"),
        )
        self.times = MarketTimes(lease_ttl_ms=cfg.lease_ttl_ms, heartbeat_ms=cfg.heartbeat_ms)
        # The peers a node's table holds: everyone when adverts reach everyone; with sampled
        # adverts about what three refreshes of the D who sample it bring.
        known = cfg.peers if cfg.adverts == "full" else min(cfg.peers, 3 * cfg.advert_sample + 1)
        #: Every node's advert lifetime and refresh (s), as the daemon sizes them.
        self.advert_lifetime = cadence.advert_lifetime_s(
            known, ttl_s=cfg.advert_ttl, network_rate=cfg.advert_network_rate
        )
        if cfg.advert_interval is None:
            self.advert_refresh = cadence.refresh_s(self.advert_lifetime)
        else:  # a fixed cadence: adverts live three refreshes
            self.advert_refresh = cfg.advert_interval
            self.advert_lifetime = min(3 * cfg.advert_interval, Advert.MAX_TTL_MS / 1000)
        self.counters: Counter[str] = Counter()
        #: Each submitter's records of the peers (its store's reputation table): survive a crash.
        self.trust_records: dict[int, dict[str, tr.PeerRecord]] = {}
        self.trust_policy = tr.TrustPolicy()
        self.published: Counter[str] = Counter()  # task messages published, by kind
        self.max_active_shards = 0
        self.blob_data: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}  # blobs known by size only (split data)
        self.data_bytes: dict[str, int] = {}
        self.split_input: dict[str, str] = {}
        self.held_out: dict[str, dict[str, dict[str, Any]]] = {}
        self.blob_owner: dict[int, set[str]] = {}  # blobs a peer persisted (its blob store on disk)
        self.announces: dict[str, Signed] = {}
        self.submitter_of: dict[str, int] = {}
        self.aggregated: dict[str, bool] = {}
        self._equivocated: set[tuple[str, int, int]] = set()
        self.last_state: dict[str, act.TaskState] = {}
        self._mid = 0
        self._followers: dict[str, set[int]] = {}  # peers with a machine for the task
        self._active: dict[str, set[int]] = {}  # ... with more than a bid out
        self._award_checks: dict[tuple[str, str | None], bool] = {}
        self.committee_seats: Counter[int] = Counter()
        self.hooks: list[Callable[[World], None]] = []
        prng = self.rng("peers")
        self.peers = [Peer(self, i, _digest("peer", cfg.seed, i), prng) for i in range(cfg.peers)]
        self.by_id = {p.peer_id: p for p in self.peers}
        self.ended_tasks = 0
        self._samples: dict[str, frozenset[int]] = {}

    def next_mid(self) -> int:
        self._mid += 1
        return self._mid

    # -- who follows a task ----------------------------------------------------------------------
    def follow(self, task_id: str, peer: int, *, active: bool) -> None:
        self._followers.setdefault(task_id, set()).add(peer)
        if active:
            self._active.setdefault(task_id, set()).add(peer)

    def unfollow(self, task_id: str, peer: int) -> None:
        self._followers.get(task_id, set()).discard(peer)
        self._active.get(task_id, set()).discard(peer)

    def receivers(self, src: Peer, signed: Signed) -> tuple[list[int], int]:
        """Who gets a task message as an event, and how many more receptions are counted
        without one (docs/simulation.md "What is simulated, what is counted").

        Today's protocol (``bidders=0``) gossips every task message to every peer: an
        announce is delivered to all; an award or cancel to every peer with a machine for the
        task (a bid out); leases, results and votes to the peers whose machines act on them
        (the submitter, holders, round participants, and for aggregated tasks every bidder).
        Every other peer would only store the message: its reception is counted.

        With ``bidders=D`` (the solicitation variant) the submitter sends its announce to D
        sampled peers and the task's messages reach only the peers that follow it: nothing
        more is counted."""
        kind = signed.kind
        n = self.cfg.peers
        task_id = signed.message.task_id  # type: ignore[attr-defined]
        solicit = 0 < self.cfg.bidders < n
        if kind == "announce":
            if solicit:
                return sorted(self.sample(task_id) - {src.index}), 0
            return [i for i in range(n) if i != src.index], 0
        if kind in ("award", "cancel"):
            group = self._followers.get(task_id, set())
        else:
            group = self._active.get(task_id, set())
        sub = self.submitter_of.get(task_id)
        targets = set(group)
        if sub is not None:
            targets.add(sub)
        targets.discard(src.index)
        out = sorted(targets)
        return out, 0 if solicit else max(0, n - 1 - len(out))

    # -- the network ----------------------------------------------------------------------------
    def publish(self, src: Peer, signed: Signed) -> None:
        if signed.kind == "announce":
            self.invariants.announced(signed)
            self.announces.setdefault(signed.message.task_id, signed)  # type: ignore[attr-defined]
        self.invariants.published(signed)
        self.published[signed.kind] += 1
        to, accounted = self.receivers(src, signed)
        self.net.publish(
            src.index,
            signed.kind,
            len(signed.raw),
            self._gossip_in,
            (signed.raw, src.peer_id),
            to=to,
            accounted=accounted,
        )
        # Our own machines that follow the task get it without the network.
        self.engine.after(
            0.0, f"local {signed.kind} {src.index}", self._local_in, src, signed, src.incarnation
        )

    def advert(self, src: Peer, size: int) -> None:
        if self.cfg.adverts == "sampled":
            n_recv = min(self.cfg.advert_sample, self.cfg.peers - 1)
        else:
            n_recv = self.cfg.peers - 1
        self.net.publish(src.index, "advert", size, _noop, (), to=(), accounted=n_recv)

    def _gossip_in(self, dst: int, raw: bytes, origin: str) -> None:
        peer = self.peers[dst]
        signed = peer.admit(raw, origin, TASK_KINDS)
        if signed is not None:
            self.route(peer, signed, ev.VIA_GOSSIP, origin)

    def _local_in(self, peer: Peer, signed: Signed, incarnation: int) -> None:
        if incarnation != peer.incarnation or not peer.up:
            return
        peer.seen.add(signed.digest)
        try:
            peer.replay.accept(signed, peer.now_ms())
        except ProtocolError:
            pass  # already recorded (our own message came back)
        self.route(peer, signed, ev.VIA_LOCAL, peer.peer_id)

    def route(self, peer: Peer, signed: Signed, via: str, sender: str | None) -> list[act.Reply]:
        """Dispatch a verified task message to this peer's machines (peerd's task bus)."""
        m = signed.message
        task_id = m.task_id  # type: ignore[attr-defined]
        kind = signed.kind
        if kind == "announce":
            if task_id not in peer.announces:
                peer.announces[task_id] = signed
                self.maybe_bid(peer, signed)
        slots = list(peer.machines.get(task_id, ()))
        if not slots:
            return []
        if kind in ("result", "vote") and self.aggregated.get(task_id, False):
            # A round's messages go to its RoundMachine, built with the round's first message.
            rnd = m.round  # type: ignore[attr-defined]
            rslot = peer.rounds.get((task_id, rnd))
            if rslot is None:
                rslot = self.new_round(peer, task_id, rnd)
            slots = [s for s in slots if s.kind != "round"] + [rslot]
        elif kind in ("result", "vote"):
            slots = [s for s in slots if s.kind != "round"]
        now = peer.now_ms()
        checked = False
        if kind == "award":
            checked = self.award_ok(peer, signed)
        replies: list[act.Reply] = []
        for slot in slots:
            if kind == "announce" and slot.kind == "task":
                continue
            event = ev.MessageVerified(now_ms=now, signed=signed, via=via, sender=sender, checked=checked)
            replies += peer.feed(slot, event)
        return replies

    @staticmethod
    def peer_awards(peer: Peer, task_id: str) -> dict[int, Signed]:
        """The task's awards this peer's machines hold, by epoch."""
        awards: dict[int, Signed] = {}
        for s in peer.machines.get(task_id, ()):
            got = getattr(s.machine, "awards", None)
            if isinstance(got, dict):
                awards.update(got)
        return awards

    def new_round(self, peer: Peer, task_id: str, rnd: int) -> Slot:
        awards = self.peer_awards(peer, task_id)
        ann = peer.announces.get(task_id) or self.announces[task_id]
        m = RoundMachine(
            ann,
            rnd,
            sealer=peer.sealer,
            times=self.times,
            awards=[awards[e] for e in sorted(awards)],
            record_votes=task_id in peer.task_slots,
            planted_bug=self.cfg.planted_bug,
        )
        return peer.add_machine("round", task_id, m)

    def equivocate_later(self, peer: Peer, signed: Signed) -> None:
        """A liar commits again, later, to other output for the same round and shard (a
        second, superseding-by-seq commit: SPEC §11 "which commit counts")."""
        res = signed.message
        assert isinstance(res, Result)
        key = (res.task_id, res.round, res.shard)
        if not res.ok or not self.aggregated.get(res.task_id) or key in self._equivocated:
            return
        self._equivocated.add(key)
        delay = self.rng("liars").uniform(2.0, 40.0)
        self.engine.after(
            delay,
            f"equivocate {peer.index} {res.task_id[:8]}/{res.round}/{res.shard}",
            self._equivocate,
            peer,
            res,
            peer.incarnation,
        )

    def _equivocate(self, peer: Peer, res: Result, inc: int) -> None:
        if inc != peer.incarnation or not peer.up:
            return
        peer.runs += 1
        data = shard_output(res.task_id, res.round, res.shard, (peer.index, peer.runs), True)
        digest = hashlib.sha256(data).hexdigest()
        self.blob_data.setdefault(digest, data)
        peer.keep_blob(digest)
        fields = {
            k: getattr(res, k)
            for k in ("task_id", "epoch", "shard", "round", "ok", "error", "weight", "metrics")
        }
        fields["outputs"] = {"weights": {"sha256": digest, "size": len(data)}}
        second = peer.sealer.seal(Result, now_ms=peer.now_ms(), ttl_ms=Result.MAX_TTL_MS, **fields)
        self.counters["liars.second_commits"] += 1
        self.publish(peer, second)

    def award_ok(self, peer: Peer, signed: Signed) -> bool:
        """Check an award once per process (the daemon checks once per node and passes
        ``checked``): ``check_signed_award`` against the announce and the previous epoch
        this peer holds. A failure leaves ``checked`` False: the machine re-checks and drops."""
        aw = signed.message
        assert isinstance(aw, Award)
        ann = self.announces.get(aw.task_id)
        if ann is None:
            return False
        prev_msg = None
        prev_key = None
        for slot in peer.machines.get(aw.task_id, ()):
            awards = getattr(slot.machine, "awards", None)
            if isinstance(awards, dict) and aw.epoch - 1 in awards:
                prev = awards[aw.epoch - 1]
                prev_msg, prev_key = prev.message, prev.digest
                break
        key = (signed.digest, prev_key)
        got = self._award_checks.get(key)
        if got is None:
            try:
                check_signed_award(ann, signed, prev_msg)
                got = True
            except ProtocolError:
                got = False
            self._award_checks[key] = got
        return got

    def send(self, src: Peer, slot: Slot, a: act.Send) -> None:
        self.invariants.published(a.signed)
        dst = self.by_id.get(a.peer)
        if dst is None:
            self.engine.after(
                0.0, f"sendfail {slot}", self._send_done, slot, a.tag, False, "transport", src.incarnation
            )
            return
        if dst is src:
            self.engine.after(
                0.0,
                f"local send {a.protocol} {src.index}",
                self._stream_in,
                dst,
                src,
                slot,
                a,
                src.incarnation,
            )
            return
        self.net.send(
            src.index,
            dst.index,
            a.protocol,
            len(a.signed.raw),
            self._stream_in,
            (dst, src, slot, a, src.incarnation),
            on_fail=self._send_done,
            fail_args=(slot, a.tag, False, "transport", src.incarnation),
        )

    def _stream_in(self, dst: Peer, src: Peer, slot: Slot, a: act.Send, incarnation: int) -> None:
        """The receiving end of a bid or result stream (SPEC §8.2, §8.3)."""
        if not dst.up:
            return
        kinds = frozenset({a.protocol})
        # Bids go through the inbox (dedupe + replay); results are opened directly, so a
        # retried delivery of the same bytes is acknowledged again (peerd/submitter.py).
        signed = dst.admit(
            a.signed.raw,
            src.peer_id if a.protocol == act.PROTO_BID else None,
            kinds,
            dedupe=a.protocol == act.PROTO_BID,
        )
        if signed is None:
            replies = [act.Reply(ok=False, reason=f"invalid {a.protocol}")]
        else:
            task_slot = dst.task_slots.get(signed.message.task_id)  # type: ignore[attr-defined]
            if task_slot is None:
                replies = [act.Reply(ok=False, reason="unknown task")]
            else:
                ev_ = ev.MessageVerified(
                    now_ms=dst.now_ms(), signed=signed, via=ev.VIA_STREAM, sender=src.peer_id
                )
                replies = dst.feed(task_slot, ev_) or [act.Reply(ok=False, reason="no reply")]
        r = replies[-1]
        if dst is src:
            self.engine.after(0.0, f"reply {slot}", self._send_done, slot, a.tag, r.ok, r.reason, incarnation)
            return
        # A reply that cannot arrive shows at the sender as the exchange timing out.
        self.net.send(
            dst.index,
            src.index,
            "reply",
            REPLY_BYTES,
            self._send_done,
            (slot, a.tag, r.ok, r.reason, incarnation),
            on_fail=self._send_done,
            fail_args=(slot, a.tag, False, "transport", incarnation),
        )

    def _send_done(self, slot: Slot, tag: str, ok: bool, reason: str, incarnation: int) -> None:
        peer = slot.peer
        if incarnation != peer.incarnation:
            return
        peer.feed(slot, ev.SendCompleted(now_ms=peer.now_ms(), tag=tag, ok=ok, reason=reason))

    def fetch(self, peer: Peer, slot: Slot, a: act.FetchBlob) -> None:
        src = self.by_id.get(a.source)
        inc = peer.incarnation
        if a.digest in peer.blobs or src is peer:
            ok = a.digest in peer.blobs
            self.engine.after(
                0.0, f"blob local {slot}", self._fetched, slot, a, ok, "" if ok else "not_found", inc
            )
            return
        if src is None:
            self.engine.after(0.0, f"blob nosrc {slot}", self._fetched, slot, a, False, "transport", inc)
            return
        self.net.send(
            peer.index,
            src.index,
            "blobreq",
            BLOB_REQUEST_BYTES,
            self._blob_request,
            (peer, src, slot, a, inc),
            on_fail=self._fetched,
            fail_args=(slot, a, False, "transport", inc),
        )

    def _blob_request(self, peer: Peer, src: Peer, slot: Slot, a: act.FetchBlob, inc: int) -> None:
        if a.digest not in src.blobs:
            self.net.send(
                src.index,
                peer.index,
                "blob",
                REPLY_BYTES,
                self._fetched,
                (slot, a, False, "not_found", inc),
                on_fail=self._fetched,
                fail_args=(slot, a, False, "transport", inc),
            )
            return
        size = self.blob_size(a.digest)
        self.net.send(
            src.index,
            peer.index,
            "blob",
            size,
            self._fetched,
            (slot, a, True, "", inc),
            on_fail=self._fetched,
            fail_args=(slot, a, False, "transport", inc),
        )

    def blob_size(self, digest: str) -> int:
        data = self.blob_data.get(digest)
        return len(data) if data is not None else self.sizes[digest]

    def split(self, peer: Peer, a: act.SplitInputs) -> tuple[dict[str, Any], ...]:
        """The submitter splits its data input across the shards ∝ share (the real
        ``allocation.shard_sizes``). Only sizes are kept: nobody reads the bytes, but their
        transfer from the submitter to each holder goes through the bandwidth model."""
        total = self.data_bytes.get(a.task_id, 0)
        parts = []
        for i, size in enumerate(shard_sizes(total, list(a.shares))):
            digest = hashlib.sha256(f"split\x00{a.task_id}\x00{a.name}\x00{i}".encode()).hexdigest()
            self.sizes[digest] = size
            peer.keep_blob(digest)
            parts.append({a.name: {"sha256": digest, "size": size}})
        return tuple(parts)

    def cancel_task(self, peer: Peer, task_id: str) -> None:
        slot = peer.task_slots.get(task_id)
        if peer.up and slot is not None and slot.machine.state not in TASK_TERMINAL:
            self.counters["tasks.cancel_requested"] += 1
            peer.feed(
                slot,
                ev.CancelRequested(
                    now_ms=peer.now_ms(), reason="cancelled by the submitter (simulated user)"
                ),
            )

    def _fetched(self, slot: Slot, a: act.FetchBlob, ok: bool, reason: str, inc: int) -> None:
        peer = slot.peer
        if inc != peer.incarnation:
            return
        data = None
        if ok:
            peer.keep_blob(a.digest)
            data = self.blob_data[a.digest] if a.want_bytes else None
        peer.feed(
            slot,
            ev.BlobFetched(
                now_ms=peer.now_ms(),
                tag=a.tag,
                digest=a.digest,
                source=a.source,
                ok=ok,
                data=data,
                reason=reason,
                error="" if ok else reason,
            ),
        )

    # -- contractors -------------------------------------------------------------------------------
    def sample(self, task_id: str) -> frozenset[int]:
        """The D peers solicited for a task: the D smallest H(task ‖ peer) (deterministic)."""
        got = self._samples.get(task_id)
        if got is None:
            order = sorted(range(self.cfg.peers), key=lambda i: _digest("bidders", task_id, i))
            got = self._samples[task_id] = frozenset(order[: self.cfg.bidders])
        return got

    def solicited(self, task_id: str, peer: Peer) -> bool:
        d = self.cfg.bidders
        return d <= 0 or d >= self.cfg.peers or peer.index in self.sample(task_id)

    def maybe_bid(self, peer: Peer, announce: Signed) -> None:
        ann = announce.message
        assert isinstance(ann, TaskAnnounce)
        if not self.solicited(ann.task_id, peer):
            return
        m = ShardMachine.bidder(
            announce, sealer=peer.sealer, times=self.times, c0=peer.claimed_c0, load=peer.load
        )
        slot = peer.add_machine("shard", ann.task_id, m)
        peer.feed(slot, ev.Start(now_ms=peer.now_ms()))

    def adopt(self, peer: Peer, a: act.AdoptShard) -> None:
        for s in peer.machines.get(a.task_id, ()):
            if s.kind == "shard" and s.machine.shard == a.shard:
                return
        ann = peer.announces.get(a.task_id) or self.announces[a.task_id]
        m = ShardMachine.adopt(ann, a.award, a.shard, sealer=peer.sealer, times=self.times)
        slot = peer.add_machine("shard", a.task_id, m)
        peer.feed(slot, ev.Start(now_ms=peer.now_ms()))

    def certified(self, peer: Peer, slot: Slot, cert: Any) -> None:
        # Against the awards this peer holds: a certificate formed before a re-award reached
        # it may be superseded later (SPEC §11.1 "The award in force"; Invariants._recount).
        held = self.peer_awards(peer, cert.task_id)
        awards = [m for m in (held[e].message for e in sorted(held)) if isinstance(m, Award)]
        who = f"peer {peer.index}"
        self.invariants.peer_certificate(cert.task_id, cert.round, list(cert.votes), awards, who=who)
        for other in list(peer.machines.get(cert.task_id, ())):
            if other.kind != "round":
                peer.feed(other, ev.RoundCertified(now_ms=peer.now_ms(), certificate=cert))

    def restart_peer(self, peer: Peer) -> None:
        """Rebuild what a restarted daemon resumes from its store: the submitter's unfinished
        tasks (``Submitter.resume``: a TaskMachine from its persisted records) and the
        contractor's stored results (``Contractor.redeliver_pending``)."""
        for task_id, own in peer.own_tasks.items():
            self.resume_task(peer, task_id, own)
        for rec in peer.disk:
            if isinstance(rec, act.WorkRecord):
                ann = self.announces.get(rec.task_id)
                if ann is None:
                    continue
                res = open_memo(rec.raw, frozenset({"result"}))
                m = ShardMachine.redeliver(ann, res, sealer=peer.sealer, times=self.times)
                peer.announces[rec.task_id] = ann
                slot = peer.add_machine("shard", rec.task_id, m)
                peer.feed(slot, ev.Start(now_ms=peer.now_ms()))

    def resume_task(self, peer: Peer, task_id: str, ann: Signed) -> None:
        recs = [r for r in peer.disk if r.task_id == task_id]
        states = [r for r in recs if isinstance(r, act.TaskState)]
        if states and states[-1].state in ("done", "failed", "cancelled"):
            return
        certificates = {}
        for r in recs:
            if isinstance(r, act.CertificateRecord):
                # As peerd/submitter.py reloads them: checked again with the protocol's code.
                certificates[r.round] = check_certificate(list(r.votes), task_id=task_id, round_no=r.round)
        restored = Restored(
            bids=[open_memo(r.raw, frozenset({"bid"})) for r in recs if isinstance(r, act.BidRecord)],
            awards=[open_memo(r.raw, frozenset({"award"})) for r in recs if isinstance(r, act.AwardRecord)],
            results=[
                open_memo(r.raw, frozenset({"result"})) for r in recs if isinstance(r, act.ResultRecord)
            ],
            certificates=certificates,
            reported_rounds=[r.round for r in recs if isinstance(r, act.RoundRecord)],
            public_state=states[-1].state if states else "bidding",
            reason=states[-1].reason if states else None,
        )
        peer.announces[task_id] = ann
        m = TaskMachine(
            ann,
            sealer=peer.sealer,
            times=self.times,
            split_input=self.split_input.get(task_id),
            held_out=self.held_out.get(task_id),
            restored=restored,
            wait_for_network=True,
        )
        slot = peer.add_machine("task", task_id, m)
        now = peer.now_ms()
        peer.feed(slot, ev.Start(now_ms=now))
        self.feed_trust(peer, slot, now)
        # The simulated network is reachable again at once (partitions aside).
        peer.feed(slot, ev.PeersKnown(now_ms=now, alive=sum(self.net.up), connected=1))

    # -- trust (--trust: protocol/trust.py, as peerd/submitter.py drives it) ------------------------
    def feed_trust(self, peer: Peer, slot: Slot, now: int) -> None:
        if not self.cfg.trust:
            return
        records = self.trust_records.setdefault(peer.index, {})
        banned = frozenset(
            p for p, r in records.items() if tr.banned(tr.decay(r, now, self.trust_policy), self.trust_policy)
        )
        peer.feed(
            slot, ev.TrustKnown(now_ms=now, records=dict(records), policy=self.trust_policy, banned=banned)
        )

    def observe(self, peer: Peer, a: act.Observe) -> None:
        records = self.trust_records.setdefault(peer.index, {})
        pol = self.trust_policy
        rec = records.get(a.peer) or tr.PeerRecord(a.peer, updated_ms=peer.now_ms())
        delivered = tr.delivered_capacity(a.work_gflop, a.wall_ms, pol.min_measure_ms)
        records[a.peer] = tr.observe(rec, a.outcome, peer.now_ms(), pol, delivered)

    # -- tasks ---------------------------------------------------------------------------------------
    def submit(self, peer: Peer, spec: dict[str, Any]) -> None:
        if not peer.up:
            return
        spec = dict(spec)
        data_bytes = spec.pop("_data_bytes", 0)
        cancel_after = spec.pop("_cancel_after", None)
        now = peer.now_ms()
        signed = peer.sealer.seal(TaskAnnounce, now_ms=now, ttl_ms=spec["deadline_ms"] + 60_000, **spec)
        task_id = spec["task_id"]
        self.submitter_of[task_id] = peer.index
        self.aggregated[task_id] = spec["aggregation"] != "none"
        self.announces[task_id] = signed
        self.invariants.announced(signed)
        peer.announces[task_id] = signed
        peer.own_tasks[task_id] = signed
        if data_bytes:
            # keras kinds split their data across the shards (docs/tasks.md "data"), and the
            # submitter keeps a validation and a test input of its own to score the model on.
            self.data_bytes[task_id] = data_bytes
            self.split_input[task_id] = "data"
            held = {}
            for name in ("validation", "test"):
                digest = hashlib.sha256(f"held\x00{task_id}\x00{name}".encode()).hexdigest()
                self.sizes[digest] = max(1, data_bytes // 10)
                peer.keep_blob(digest)
                held[name] = {"sha256": digest, "size": self.sizes[digest]}
            self.held_out[task_id] = held
        m = TaskMachine(
            signed,
            sealer=peer.sealer,
            times=self.times,
            split_input=self.split_input.get(task_id),
            held_out=self.held_out.get(task_id),
        )
        slot = peer.add_machine("task", task_id, m)
        peer.feed(slot, ev.Start(now_ms=now))
        self.feed_trust(peer, slot, now)
        # As the daemon's submitter does at submit: whom to expect bids from (the bid window
        # closes early once each has bid). Every peer that is up offers every kind here.
        up = frozenset(p.peer_id for p, is_up in zip(self.peers, self.net.up, strict=True) if is_up)
        peer.feed(slot, ev.PeersKnown(now_ms=now, alive=len(up), connected=1, offering=up))
        if cancel_after is not None:
            self.engine.after(cancel_after, f"cancel {task_id[:8]}", self.cancel_task, peer, task_id)
        # The deadline sweep forgets the task's idle bidders (a daemon's task book does).
        self.engine.at(
            to_s(signed.message.issued_at + spec["deadline_ms"]) + 5.0,
            f"sweep {task_id[:8]}",
            self._sweep,
            task_id,
        )

    def _sweep(self, task_id: str) -> None:
        for i in sorted(self._followers.get(task_id, set())):
            peer = self.peers[i]
            keep = []
            for s in peer.machines.get(task_id, []):
                if s.kind == "shard" and s.machine.state in (
                    ShardState.BID_SENT,
                    ShardState.DONE,
                    ShardState.LOST,
                    ShardState.RELEASED,
                ):
                    continue
                keep.append(s)
            if keep:
                peer.machines[task_id] = keep
            else:
                peer.machines.pop(task_id, None)
                self.unfollow(task_id, i)

    def check_replicated(self, task_id: str, result: Mapping[str, Any]) -> None:
        """A replicated task's accepted outputs are the honest ones, unless the liars were the
        majority of a shard's copies (what replication cannot catch; counted, not a fault)."""
        liars = {p.sealer.peer_id for p in self.peers if p.liar}
        for q in result["replicas"]:
            work = q["shard"]
            honest = hashlib.sha256(plain_output(task_id, work, (0, 0), False)).hexdigest()
            got = next(o["sha256"] for o in result["outputs"] if o["name"] == f"shard-{work}/out")
            self.counters["replicas.shards"] += 1
            self.counters["replicas.outvoted"] += len(q["disagreed"])
            if 2 * len(q["agreed"]) <= len(q["agreed"]) + len(q["disagreed"]):
                self.invariants.fail(
                    f"task {task_id[:8]} shard {work}: accepted without a strict majority"
                    f" (agreed {len(q['agreed'])}, outvoted {len(q['disagreed'])})"
                )
            elif got != honest and set(q["agreed"]) <= liars:
                self.counters["replicas.liar_majority"] += 1
            elif got != honest:
                self.invariants.fail(
                    f"task {task_id[:8]} shard {work}: a replicated shard accepted a wrong output"
                    f" (agreed {len(q['agreed'])}, outvoted {len(q['disagreed'])})"
                )
            else:
                self.counters["replicas.correct"] += 1

    def task_ended(self, peer: Peer, task_id: str, state: str, message: str) -> None:
        rec = self.last_state.get(task_id)
        reason = (rec.reason if rec is not None else None) or message
        self.ended_tasks += 1
        self.invariants.task_ended(task_id, state, reason)

    def all_ended(self) -> bool:
        return all(s.machine.state in TASK_TERMINAL for p in self.peers for s in p.task_slots.values())


def _noop(*_args: Any) -> None:
    return None


def make_tasks(
    cfg: SimConfig, rng: random.Random, extra: random.Random | None = None
) -> list[tuple[float, int, dict[str, Any]]]:
    """The workload: (submit time, submitter, announce fields) of every task. ``extra``
    draws the data sizes and cancels (its own stream: turning them on leaves the rest of the
    workload as it was)."""
    extra = extra or random.Random(0)
    out = []
    t = 1.0
    for j in range(cfg.tasks):
        t += rng.expovariate(cfg.arrival_rate)
        submitter = rng.randrange(cfg.peers)
        aggregated = rng.random() < cfg.aggregated
        demand = rng.uniform(10.0, 150.0)  # R, GFLOP/s
        deadline_s = rng.uniform(60.0, 180.0)
        rule = rng.choice(("weighted_mean", "median", "trimmed_mean", "sum")) if aggregated else "none"
        spec: dict[str, Any] = {
            "task_id": hashlib.sha256(f"{cfg.seed}/{j}".encode()).hexdigest()[:32],
            "kind": "keras-train" if aggregated else "sleep",
            "work": round(demand * deadline_s * rng.uniform(0.1, 0.4), 3),
            "deadline_ms": int(deadline_s * 1000),
            "max_shards": rng.choice((2, 3, 4, 6, 8)),
            "resources": {"gpu": False, "memory_mb": 512},
            "aggregation": rule,
            "rounds": rng.choice((1, 2, 3)) if aggregated else 1,
            "params": {},
            "inputs": {},
            "bid_window_ms": 2000,
            "net": {"k": 0.2, "dc_min": 0.0, "dc_max": None},
        }
        if aggregated and cfg.data_mb[1] > 0:
            spec["_data_bytes"] = int(extra.uniform(*cfg.data_mb) * 1e6)
        if cfg.cancel > 0 and extra.random() < cfg.cancel:
            spec["_cancel_after"] = extra.uniform(0.0, deadline_s)
        if cfg.replicated > 0 and not aggregated and extra.random() < cfg.replicated:
            spec["verify"] = {"mode": "replicate", "replicas": extra.choice((2, 3))}
        out.append((t, submitter, spec))
    return out


def schedule_faults(world: World, sched: Schedule) -> None:
    eng = world.engine
    for c in sched.crashes:
        peer = world.peers[c.peer]
        eng.at(c.at, f"fault crash {c.peer}", peer.crash)
        if c.down_for is not None:
            eng.at(c.at + c.down_for, f"fault restart {c.peer}", peer.restart)
    if sched.partition is not None:
        from sim.net import Partition

        start, end, side = sched.partition
        world.net.partitions.append(Partition(start, end, side))
        eng.at(start, f"fault partition {len(side)} peers for {end - start:g}s", _noop)
        eng.at(end, "fault partition healed", _noop)
    for i in sched.liars:
        world.peers[i].liar = True
    for i in sched.slow:
        world.peers[i].slow = True
    for i in sched.silent:
        world.peers[i].silent = True


def horizon_of(tasks: Sequence[tuple[float, int, dict[str, Any]]]) -> float:
    if not tasks:
        return 10.0
    return max(t + spec["deadline_ms"] / 1000 for t, _, spec in tasks)


def build(cfg: SimConfig) -> tuple[World, list[tuple[float, int, dict[str, Any]]], Schedule]:
    world = World(cfg)
    tasks = make_tasks(cfg, world.rng("workload"), world.rng("workload-extra"))
    horizon = horizon_of(tasks)
    submitters = frozenset(s for _, s, _ in tasks)
    sched = draw(
        cfg.faults,
        cfg.peers,
        horizon,
        world.rng("faults"),
        protect=frozenset() if cfg.crash_submitters else submitters,
    )
    schedule_faults(world, sched)
    arng = world.rng("adverts")
    for p in world.peers:
        p.advert_due = world.engine.at(
            arng.uniform(0, world.advert_refresh), f"advert {p.index}", p.advertise, 0
        )
    for t, s, spec in tasks:
        world.engine.at(t, f"submit {spec['task_id'][:8]} on {s}", world.submit, world.peers[s], spec)
    return world, tasks, sched


__all__ = ["BASE_MS", "SimConfig", "World", "build"]
