"""TaskMachine: the submitter's view of one task (seed §3.2 steps 2–5, docs/tasks.md).

The rules are those of ``peerd/submitter.py`` today, moved here so that the submitter can
become a thin driver:

* **Bidding.** Start publishes the announce and opens the bid window
  (``announce.bid_window_ms``). At its end the usable bids (``awards.usable_bids``) are
  awarded by the real rule (``awards.allocate`` + ``assignments_of``). The window closes
  early once every peer the driver knows to offer the task's kind (``PeersKnown.offering``,
  ourselves included) has a usable bid in: nobody known is left to wait for (SPEC §8.2).
  With no bid the task is ``pending``: it waits ``min(2 s · attempt, 10 s)`` — a bid arriving meanwhile
  is awarded at once — then re-announces with a fresh sequence (gossip drops bytes it saw
  in the last 120 s) and opens another window.
* **Award.** Epoch 0 quotes the usable bids; kinds that split their data
  (docs/tasks.md: keras ``data``) first ask the driver to split it (``SplitInputs``).
* **Leases.** A holder of an unfinished shard whose last lease (or the start of
  supervision, or its award) is more than ``lease_ttl_ms`` old is lost (SPEC §7.6). A shard
  is finished when its result is in (plain tasks) or its holder's lease says ``done``
  (aggregated tasks).
* **Re-award.** Lost holders are added to ``excluded`` and their shards moved by the real
  replacement rule (``awards.reassign``) over every usable bid received so far (late bids
  included). When no bidder is left, the task asks for fresh bids (re-announce, one bid
  window) and tries again.
* **Results.** Plain tasks (``aggregation = "none"``) are done when every shard of the
  latest award has a result whose outputs were fetched; aggregated tasks when the last
  round is certified and its output fetched (rounds are reported in order, each with the
  optional evaluation on the submitter's held-out ``validation`` input).
* **Failure.** A plain task's shard that fails on its holder — a result with
  ``ok = false``, a result with undeclared outputs (refused before any fetch), a lost lease,
  or no result past its hold limit (``backup_after`` × its expected time, however the holder
  heartbeats) — moves to another bidder by the same re-award, up to ``retries`` moves per
  shard after failures (an overdue holder costs none, SPEC §7.6); the first valid result of
  a shard wins. An aggregated task fails when
  as many results failed as there are shards ("every shard failed"); the deadline
  (``issued_at + deadline_ms``) fails any unfinished task, with the last reason given.
* **Compared results** (``verify`` in the announce, SPEC §7.10). A replicated task's first
  award puts each shard's copies on distinct peers; a spot check adds a second copy of each
  shard its secret salt draws once the shard's first result is in. A shard is decided when
  every copy has a result and a strict majority of the peers signed one value
  (``_check_replicated``); otherwise a re-award adds a copy (``_add_copies``).
* **Cancel.** The local user's cancel publishes a signed ``cancel`` (SPEC §7.9).

Issue 8: ``_shard_failed`` and ``_move`` move a failed shard, ``_lost_holders`` and
``hold_limit_ms`` bound how long a heartbeat alone holds one, ``expected_shard_ms`` and
``capacity_of`` are the one place the expected time is estimated (a measured capacity plugs
in there).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import trust as tr
from protocol.allocation import Award as Allocation
from protocol.allocation import Candidate, effective_capacity, validate_candidate
from protocol.awards import (
    add_replicas,
    allocate,
    assignments_of,
    first_replicas,
    logical_shard,
    net_params,
    quorum_need,
    quotable_bids,
    reassign,
    replica_ranking,
    replica_value,
    spot_checked,
    spot_commit,
)
from protocol.certificate import Certificate
from protocol.envelope import Signed
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, Sealer, Timers, illegal, join_short, short
from protocol.messages import Award, Bid, Cancel, Lease, Message, Result, TaskAnnounce

#: Fields of an announce that a re-announce repeats (everything but seq and times).
ANNOUNCE_FIELDS = (
    "task_id",
    "kind",
    "work",
    "deadline_ms",
    "max_shards",
    "resources",
    "aggregation",
    "rounds",
    "params",
    "inputs",
    "bid_window_ms",
    "net",
    "verify",
)
#: How long the submitter's cancel stays valid (as ``Submitter.cancel``).
CANCEL_TTL_MS = 3_600_000
#: The reason a ``pending`` task gives (docs/tasks.md).
NO_BIDS_REASON = "no eligible peer has bid (kind, resources, policy or sandbox)"
#: The reason a replicated task waits with bids in hand (SPEC §7.10).
FEW_BIDS_REASON = "fewer eligible peers have bid than the task's replicas"

T_BID_WINDOW = "bid_window"
T_BACKOFF = "backoff"
T_DEADLINE = "deadline"
T_LEASES = "leases"
T_REFETCH = "refetch"

#: How many times a shard may move to another peer after failing there (``[market] retries``).
DEFAULT_RETRIES = 2
#: A shard held this many times its expected time gets a backup holder (``[market] backup_after``).
DEFAULT_BACKUP_AFTER = 2.5
#: ... but never before this long (``[market] backup_min_s``): W is the submitter's estimate.
DEFAULT_BACKUP_MIN_MS = 60_000


def expected_shard_ms(share: float, work: float, capacity: float) -> float:
    """How long a shard should take (SPEC §7.6): its share of the task's work W at the
    capacity C the award used for its holder, in ms. The one place the estimate is made, so
    that a measured (effective) capacity can replace the advertised one."""
    if not capacity > 0:
        return float("inf")
    return 1000.0 * share * work / capacity


@dataclass(frozen=True)
class DeclaredOutputs:
    """What a result of the task may carry (docs/tasks.md "Outputs"): the output names
    (None: any name, e.g. a script's files), at most ``max_count`` of them and ``max_bytes``
    in all. A result with anything else is refused before any fetch (SPEC §7.7)."""

    names: frozenset[str] | None
    max_count: int
    max_bytes: int

    def problem(self, outputs: Mapping[str, Mapping[str, Any]]) -> str | None:
        """Why ``outputs`` are not what the kind declares, or None."""
        if self.names is not None:
            extra = sorted(set(outputs) - self.names)
            if extra:
                return f"undeclared output(s) {', '.join(extra[:4])}"
        if len(outputs) > self.max_count:
            return f"{len(outputs)} outputs, at most {self.max_count} declared"
        total = sum(int(r["size"]) for r in outputs.values())
        if total > self.max_bytes:
            return f"outputs of {total} bytes, at most {self.max_bytes} declared"
        return None


class TaskState(enum.Enum):
    """The machine's phase. ``public`` is the state the store and ``peerctl`` show."""

    NEW = "new"  # built, not started
    BIDDING = "bidding"  # a bid window is open (after the first announce or a re-announce)
    BACKOFF = "backoff"  # no usable bid: waiting before re-announcing; a bid awards at once
    AWARDING = "awarding"  # epoch 0 chosen, waiting for the driver to split the data
    RUNNING = "running"  # awarded: leases, results, rounds, re-awards
    REBIDDING = "rebidding"  # every bidder lost: a fresh bid window before the re-award
    AGGREGATING = "aggregating"  # last round certified: fetching and scoring the final model
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})


@dataclass
class Restored:
    """What the store holds of a task the submitter resumes after a restart
    (``Submitter.resume``), every message already verified by the driver."""

    bids: Sequence[Signed] = ()
    awards: Sequence[Signed] = ()
    results: Sequence[Signed] = ()
    certificates: Mapping[int, Certificate] = field(default_factory=dict)
    reported_rounds: Iterable[int] = ()
    public_state: str = "bidding"
    #: Why the task is in ``public_state`` (e.g. why it is ``pending``), as last persisted.
    reason: str | None = None


@dataclass
class _Report:
    """A certified round being reported (input fetches, then the optional evaluation)."""

    round: int
    pending: dict[str, tuple[str, int, list[str]]] = field(default_factory=dict)  # tag → (sha, size, sources)
    eval_sources: list[str] = field(default_factory=list)
    eval_job: str | None = None
    val: dict[str, float] | None = None


class TaskMachine:
    """The submitter's view of one task. Build it with the signed announce (ours), call
    ``handle(Start(...))`` once, then feed it every event of the task.

    ``split_input``: the name of an input the driver splits across the shards before
    epoch 0 (keras kinds' ``data``), or None. ``held_out``: the submitter-only inputs
    (``validation``, ``test``: name → blob ref) it scores a keras-train model on.
    ``wait_for_network``: holders' silence counts only once ``PeersKnown`` reports a
    connected peer (the daemon passes True: its supervisor waits so after every start, since
    a node nobody has reached yet cannot have received any lease); ``restored``: resume a
    task from the store after a restart.
    """

    def __init__(
        self,
        announce: Signed,
        *,
        sealer: Sealer,
        times: MarketTimes,
        split_input: str | None = None,
        held_out: Mapping[str, Mapping[str, Any]] | None = None,
        restored: Restored | None = None,
        wait_for_network: bool = False,
        retries: int = DEFAULT_RETRIES,
        backup_after: float = DEFAULT_BACKUP_AFTER,
        outputs: DeclaredOutputs | None = None,
        backup_min_ms: int = DEFAULT_BACKUP_MIN_MS,
        spot_salt: bytes | None = None,
    ) -> None:
        if not isinstance(announce.message, TaskAnnounce):
            raise LocalProtocolError("TaskMachine needs a signed announce", reason="illegal_event")
        if announce.signer != sealer.peer_id:
            raise LocalProtocolError("TaskMachine: the announce is not ours", reason="illegal_event")
        self.announce: TaskAnnounce = announce.message
        self.announce_signed = announce
        if self.announce.verify_mode == "spot-check" and (
            spot_salt is None or spot_commit(spot_salt) != self.announce.verify["commit"]  # type: ignore[index]
        ):
            raise LocalProtocolError(
                "TaskMachine: a spot-checked task needs its salt", reason="illegal_event"
            )
        #: The secret the announce commits to (SPEC §7.10): it draws the spot-checked shards.
        self.spot_salt = spot_salt
        self.task_id = self.announce.task_id
        self.me = sealer.peer_id
        self.sealer = sealer
        self.times = times
        self.split_input = split_input
        self.held_out = dict(held_out or {})
        self.state = TaskState.NEW
        #: The public state and its reason, as last persisted (the deadline message uses it).
        self.public_state = "bidding"
        self.reason: str | None = None
        self.timers = Timers()
        self.bids: dict[str, Signed] = {}  # envelope digest → bid
        self.awards: dict[int, Signed] = {}
        self.heartbeats: dict[str, int] = {}
        self.lease_states: dict[tuple[str, int], str] = {}
        self.results: dict[int, dict[int, Signed]] = {}
        self.certificates: dict[int, Certificate] = {}
        self.reported: set[int] = set()
        self.fetched: set[str] = set()
        self.shards_done: set[int] = set()
        self.attempt = 0
        self.alive_peers = 0
        #: Peers known alive that offer the task's kind (PeersKnown.offering).
        self.offering: frozenset[str] = frozenset()
        self.lease_start = 0
        #: Holders' silence counts only once some peer is connected (``wait_for_network``).
        self.network_up = not wait_for_network
        self._last_round_info: dict[str, Any] = {}
        self._lost_now: set[str] = set()
        self._fetching: str | None = None  # tag of the one plain-output fetch in flight
        self._pending_alloc: tuple[list[Signed], Allocation, list[dict[str, Any]]] | None = None
        self._report: _Report | None = None
        self._final: _Report | None = None
        self._resumed = restored is not None
        #: What this node has seen each peer deliver (``TrustKnown``; docs/allocation.md
        #: "Caps"). Until the driver sends it, awards carry no caps (as before caps existed).
        self.trust_records: dict[str, tr.PeerRecord] = {}
        self.trust_policy = tr.TrustPolicy()
        self.banned: frozenset[str] = frozenset()
        self._trust_known = False
        #: peer → why the first award capped its C (``peerctl explain``).
        self.cap_why: dict[str, str] = {}
        self._awarded_at: dict[int, tuple[str, int]] = {}  # shard → (holder, when it got it)
        self._result_at: dict[tuple[int, int, str], int] = {}  # (round, shard, signer) → arrival
        self._observed: set[tuple[str, int, str, str]] = set()  # (kind, shard, peer, key): once each
        #: Issue 8: moves of failed shards, backup holders, declared outputs.
        self.retries = retries
        self.backup_after = backup_after
        self.backup_min_ms = backup_min_ms
        self.declared = outputs
        #: shard → the reason code of its last failure (the task's reason if it gives up).
        self.fail_codes: dict[int, str] = {}
        #: Peers whose shard failed for sure (a result said so): with no other bidder left, the
        #: task fails now rather than waiting for fresh bids until its deadline.
        self._definitive: set[str] = set()
        #: shard → {peer: why it failed there}: the errors a failing task reports.
        self.failures: dict[int, dict[str, str]] = {}
        #: shard → when its current holder got it (its overdue clock, SPEC §7.6).
        self.held_since: dict[int, int] = {}
        self._why_lost: dict[str, str] = {}
        #: Replicated tasks (SPEC §7.10): shard → signer → its OK result for that copy, every
        #: holder's (a backup's too); and per work (logical shard) the quorum decided.
        self.copies: dict[int, dict[str, Signed]] = {}
        self._copy_seen: set[tuple[int, str]] = set()
        self.quorum: dict[int, dict[str, Any]] = {}
        if restored is not None:
            self._restore(restored)

    # -- the one dispatch method ---------------------------------------------------------------
    def handle(self, event: ev.Event) -> list[act.Action]:
        """Take one event; return the actions the driver must perform, in order."""
        s = self.state
        if s is TaskState.NEW:
            if isinstance(event, ev.Start):
                return self._start(event.now_ms)
            raise illegal("TaskMachine", s, event)
        if isinstance(event, ev.Start):
            raise illegal("TaskMachine", s, event)
        if isinstance(event, ev.MessageVerified):
            return self._on_message(event)
        if s in TERMINAL:
            # Late completions of work started before the end, and user requests that race it,
            # change nothing; a timer cannot fire (all were cancelled) and a split cannot be due.
            if isinstance(event, ev.BlobFetched | ev.JobFinished | ev.CancelRequested | ev.PeersKnown):
                return []
            if isinstance(event, ev.TrustKnown):
                return []
            if isinstance(event, ev.PeerLost | ev.RoundCertified | ev.InputsSplit):
                return []
            raise illegal("TaskMachine", s, event)
        if isinstance(event, ev.TimerFired):
            self.timers.fire("TaskMachine", event.name)
            return self._on_timer(event.name, event.now_ms)
        if isinstance(event, ev.CancelRequested):
            return self._cancel(event.now_ms, event.reason)
        if isinstance(event, ev.PeersKnown):
            self.alive_peers = event.alive
            if event.offering is not None:
                self.offering = event.offering
            if event.connected > 0:
                self.network_up = True
            return []
        if isinstance(event, ev.TrustKnown):
            newly = frozenset(event.banned) - self.banned
            self.trust_records = dict(event.records)
            self.trust_policy = event.policy
            self.banned = frozenset(event.banned)
            self._trust_known = True
            # A holder banned meanwhile (by hand, or over the threshold for what it did on
            # another task) holds its unfinished shard no longer: it moves now, as a lost one's.
            held = {a["peer_id"] for a in self.assignments() if not self._shard_finished(a["shard"])}
            if s is TaskState.RUNNING and newly & held:
                for peer in newly & held:
                    self._lost_now.add(peer)
                    self._why_lost.setdefault(peer, "banned")
                return self._check_leases(event.now_ms)
            return []
        if isinstance(event, ev.PeerLost):
            self._lost_now.add(event.peer)
            return self._check_leases(event.now_ms) if s is TaskState.RUNNING else []
        if isinstance(event, ev.InputsSplit):
            if s is not TaskState.AWARDING:
                raise illegal("TaskMachine", s, event)
            return self._award_split(event)
        if isinstance(event, ev.RoundCertified):
            return self._on_certificate(event)
        if isinstance(event, ev.BlobFetched):
            return self._on_blob(event)
        if isinstance(event, ev.JobFinished):
            return self._on_job(event)
        raise illegal("TaskMachine", s, event)

    # -- timers ------------------------------------------------------------------------------------
    def _on_timer(self, name: str, now: int) -> list[act.Action]:
        s = self.state
        if name == T_DEADLINE:
            why = self.reason or "no result before the deadline"
            return self._finish(now, TaskState.FAILED, f"deadline passed: {why}", reason="deadline")
        if name == T_BID_WINDOW and s is TaskState.BIDDING:
            return self._window_closed(now)
        if name == T_BACKOFF and s is TaskState.BACKOFF:
            out = self._publish_announce(now, fresh=True)
            self.state = TaskState.BIDDING  # the public state stays "pending" (as today)
            out.append(self.timers.set(T_BID_WINDOW, now + self.announce.bid_window_ms))
            return out
        if name == T_BID_WINDOW and s is TaskState.REBIDDING:
            self.state = TaskState.RUNNING
            return self._supervise(now)
        if name == T_LEASES and s is TaskState.RUNNING:
            return self._check_leases(now)
        if name == T_REFETCH:
            # Armed while running; a re-bid window may have come in between.
            return self._check_plain(now) if s is TaskState.RUNNING else []
        raise LocalProtocolError(f"TaskMachine: timer {name!r} in state {s.name}", reason="illegal_event")

    # -- start and bidding -------------------------------------------------------------------------
    def _start(self, now: int) -> list[act.Action]:
        ann = self.announce
        out: list[act.Action] = [self.timers.set(T_DEADLINE, ann.issued_at + ann.deadline_ms)]
        if self._resumed:
            out.append(
                act.Persist(
                    record=act.TaskEvent(
                        task_id=self.task_id, state=self.public_state, message="submitter restarted; resuming"
                    )
                )
            )
        if self.awards:
            # Heartbeats seen before a restart are unknown: every holder gets a full TTL,
            # counted from when some peer can reach us again.
            self.state = TaskState.RUNNING
            self.lease_start = now
            out += self._supervise(now)
            return out
        self.state = TaskState.BIDDING
        out += self._publish_announce(now, fresh=False)
        out.append(self.timers.set(T_BID_WINDOW, now + ann.bid_window_ms))
        return out

    def _publish_announce(self, now: int, *, fresh: bool) -> list[act.Action]:
        if not fresh:
            return [act.Publish(signed=self.announce_signed)]
        a = self.announce
        # Gossip drops bytes it has seen in the last 120 s: a re-announce must be a new
        # message (new sequence) with the same task fields.
        signed = self.sealer.seal(
            TaskAnnounce,
            now_ms=now,
            ttl_ms=max(1, a.expires_at - now),
            **{k: getattr(a, k) for k in ANNOUNCE_FIELDS},
        )
        return [act.Publish(signed=signed)]

    def usable(self) -> list[Signed]:
        """The bids that count now: one per peer, the highest sequence, at most the 64 an
        award can quote (``quotable_bids``); never a banned peer's (``TrustKnown``)."""
        return quotable_bids(self.announce, [b for b in self.bids.values() if b.signer not in self.banned])

    def _caps(self, bids: Sequence[Signed], now: int) -> tuple[dict[str, float] | None, dict[str, str]]:
        """The caps on C this award applies (protocol/trust.py ``caps_for``) and why; None
        until the driver has sent ``TrustKnown`` (docs/allocation.md "Caps")."""
        if not self._trust_known:
            return None, {}
        params = net_params(self.announce.net)
        advertised: dict[str, float] = {}
        for b in bids:
            m = b.message
            assert isinstance(m, Bid)
            try:
                validate_candidate(Candidate(b.signer, m.c0, m.load))
            except RemoteProtocolError:
                continue  # allocate skips it too
            advertised[b.signer] = effective_capacity(float(m.c0), float(m.load), params)
        records = {p: tr.decay(r, now, self.trust_policy) for p, r in self.trust_records.items()}
        r = self.announce.work / (self.announce.deadline_ms / 1000)
        d = tr.caps_for(advertised, records, r, self.trust_policy)
        return (dict(d.caps) or None), dict(d.why)

    @staticmethod
    def _applied_caps(alloc: Allocation) -> dict[str, float] | None:
        return {b.peer_id: b.cap for b in alloc.scored if b.cap is not None} or None

    def _can_award(self) -> bool:
        """Some usable bid, and for a replicated task as many bidders as it has replicas: no
        two copies of one shard may share a peer (SPEC §7.10)."""
        usable = self.usable()
        return bool(usable) and len({b.signer for b in usable}) >= self.peers_needed()

    def peers_needed(self) -> int:
        """Distinct bidders before the first award: the replicas; 2 for a spot-checked task
        (whichever shards the salt draws, their second copy has a peer; nothing is told)."""
        return 2 if self.announce.verify_mode == "spot-check" else self.announce.replicas

    def _window_closed(self, now: int) -> list[act.Action]:
        if self._can_award():
            return self._award0(now)
        self.attempt += 1
        self.state = TaskState.BACKOFF
        bidders = len({b.signer for b in self.usable()})
        if bidders:
            msg = (
                f"{bidders} eligible peer(s) bid, {self.peers_needed()} needed for the copies;"
                " waiting, then re-announcing"
            )
            out = self._set_state("pending", msg, reason=FEW_BIDS_REASON)
        else:
            out = self._set_state(
                "pending",
                f"no eligible bids yet ({self.alive_peers} peers known); waiting, then re-announcing",
                reason=NO_BIDS_REASON,
            )
        out.append(self.timers.set(T_BACKOFF, now + min(2_000 * self.attempt, 10_000)))
        return out

    def _award0(self, now: int) -> list[act.Action]:
        bids = self.usable()
        caps, why = self._caps(bids, now)
        self.cap_why = why  # peerctl explain (task.explain)
        alloc = allocate(self.announce, bids, caps)
        assignments = assignments_of(alloc)
        if self.announce.replicas > 1:
            # Each chosen shard, then its copies on other peers (SPEC §7.10); _can_award
            # made sure there are enough bidders.
            ranking = replica_ranking(self.task_id, alloc.scored)
            grown = add_replicas(
                assignments, first_replicas(len(assignments), self.announce.replicas), ranking, alloc.demand
            )
            if grown is None:
                raise LocalProtocolError(
                    "TaskMachine: replicas without enough bidders", reason="illegal_event"
                )
            assignments = grown
        out = self.timers.cancel(T_BACKOFF) + self.timers.cancel(T_BID_WINDOW)
        for peer, reason in sorted(why.items()):
            # peerctl explain: when and why a bid's C was capped (docs/allocation.md "Caps").
            out.append(
                act.Persist(
                    record=act.TaskEvent(
                        task_id=self.task_id, state="bidding", message=f"C of {short(peer)} capped: {reason}"
                    )
                )
            )
        if self.split_input is not None:
            self.state = TaskState.AWARDING
            self._pending_alloc = (bids, alloc, assignments)
            out.append(
                act.SplitInputs(
                    task_id=self.task_id,
                    name=self.split_input,
                    shares=tuple(a["share"] for a in assignments),
                    seed=int(self.announce.params.get("seed", 0)),
                )
            )
            return out
        return out + self._seal_award0(now, bids, alloc, assignments)

    def _award_split(self, event: ev.InputsSplit) -> list[act.Action]:
        assert self._pending_alloc is not None
        bids, alloc, assignments = self._pending_alloc
        if len(event.inputs) != len(assignments):
            raise LocalProtocolError(
                f"TaskMachine: {len(event.inputs)} split inputs for {len(assignments)} shards",
                reason="illegal_event",
            )
        for a, extra in zip(assignments, event.inputs, strict=True):
            a["inputs"].update({k: dict(v) for k, v in extra.items()})
        self._pending_alloc = None
        return self._seal_award0(event.now_ms, bids, alloc, assignments)

    def _seal_award0(
        self, now: int, bids: list[Signed], alloc: Allocation, assignments: list[dict[str, Any]]
    ) -> list[act.Action]:
        signed = self.sealer.seal(
            Award,
            now_ms=now,
            ttl_ms=Award.MAX_TTL_MS,
            task_id=self.task_id,
            epoch=0,
            bids=[b.raw for b in bids],
            assignments=assignments,
            under_capacity=alloc.under_capacity,
            excluded=[],
            caps=self._applied_caps(alloc),
        )
        self.awards[0] = signed
        self._awarded_at.update({a["shard"]: (a["peer_id"], now) for a in assignments})
        self.state = TaskState.RUNNING
        self.lease_start = now
        self.held_since = {int(a["shard"]): now for a in assignments}
        note = " (under capacity: no set of bids covers R)" if alloc.under_capacity else ""
        out: list[act.Action] = [
            act.Persist(
                record=act.AwardRecord(
                    task_id=self.task_id, epoch=0, raw=signed.raw, assignments=tuple(assignments)
                )
            )
        ]
        out += self._set_state(
            "running", f"awarded {len(assignments)} shard(s) to {join_short(alloc.chosen)}{note}"
        )
        out.append(act.Publish(signed=signed))
        out += self._supervise(now)
        return out

    # -- derived views -----------------------------------------------------------------------------
    def latest_award(self) -> Award | None:
        if not self.awards:
            return None
        msg = self.awards[max(self.awards)].message
        assert isinstance(msg, Award)
        return msg

    def assignments(self) -> list[dict[str, Any]]:
        award = self.latest_award()
        return sorted((dict(a) for a in award.assignments), key=lambda a: a["shard"]) if award else []

    def holder(self, shard: int, epoch: int | None = None) -> str | None:
        """Who held ``shard`` at ``epoch`` (default: now), as ``TaskView.holder``."""
        epochs = [e for e in self.awards if epoch is None or e <= epoch]
        if not epochs:
            return None
        msg = self.awards[max(epochs)].message
        assert isinstance(msg, Award)
        for a in msg.assignments:
            if a["shard"] == shard:
                return str(a["peer_id"])
        return None

    # -- messages ----------------------------------------------------------------------------------
    def _on_message(self, event: ev.MessageVerified) -> list[act.Action]:
        m: Message = event.signed.message
        task_id = getattr(m, "task_id", None)
        if task_id != self.task_id:
            raise LocalProtocolError(
                f"TaskMachine {self.task_id}: {m.KIND} for task {task_id} misrouted", reason="illegal_event"
            )
        if isinstance(m, Bid):
            return self._on_bid(event)
        if isinstance(m, Result):
            return self._on_result(event, m)
        if isinstance(m, Lease):
            return self._on_lease(event, m)
        # Our own announce, award and cancel come back to us; votes go to the round's
        # RoundMachine, whose certificate reaches us as RoundCertified.
        return []

    def _on_bid(self, event: ev.MessageVerified) -> list[act.Action]:
        stream = event.via == ev.VIA_STREAM
        if self.state in TERMINAL:
            out: list[act.Action] = [act.Count(name="bids.unknown_task")]
            return out + ([act.Reply(ok=False, reason="unknown task")] if stream else [])
        signed = event.signed
        if signed.signer in self.banned:
            # Banned by hand or over the policy's threshold (``TrustKnown``): refused, counted.
            out = [act.Drop(reason="banned", detail=f"bid from {short(signed.signer)}")]
            return out + ([act.Reply(ok=False, reason="banned")] if stream else [])
        out = []
        if signed.digest not in self.bids:
            self.bids[signed.digest] = signed
            out += [
                act.Persist(record=act.BidRecord(task_id=self.task_id, peer=signed.signer, raw=signed.raw)),
                act.Count(name="bids.received"),
            ]
        if stream:
            out.append(act.Reply(ok=True))
        if self.state is TaskState.BACKOFF and self._can_award():
            # A bid that arrives just after a short window is taken at once.
            out += self._award0(event.now_ms)
        elif self.state is TaskState.BIDDING and self._everyone_bid() and self._can_award():
            out += self.timers.cancel(T_BID_WINDOW)
            out += self._award0(event.now_ms)
        return out

    def _everyone_bid(self) -> bool:
        """Every peer known to offer the task's kind has a usable bid in (SPEC §8.2: the
        window may close early). Not known (no ``PeersKnown.offering`` yet, or nobody) is
        "not everyone". A set, not a count: bids from identities the table does not list
        never stand in for a listed peer that has not bid yet."""
        return bool(self.offering) and self.offering <= {b.signer for b in self.usable()}

    def _on_lease(self, event: ev.MessageVerified, m: Lease) -> list[act.Action]:
        signer = event.signed.signer
        if self.holder(m.shard, m.epoch) != signer:
            return [act.Drop(reason="not_holder", detail=f"lease for shard {m.shard} from {short(signer)}")]
        if self.state not in TERMINAL:
            self.heartbeats[signer] = event.now_ms
            self._lost_now.discard(signer)
        self.lease_states[(signer, m.shard)] = m.state
        if m.state == "done" and self.announce.aggregation != "none":
            return self._observe(tr.DONE, m.shard, signer, "", event.now_ms)
        return []

    # -- outcomes for the node's record of each peer (protocol/trust.py) ---------------------
    def _observe(self, outcome: str, shard: int, peer: str, key: str, at: int | None) -> list[act.Action]:
        """One ``Observe`` per (outcome, shard, peer, key). A ``done`` is measured from when
        the peer got the shard to ``at`` (its result or final lease); 0 when unknown."""
        mark = (outcome, shard, peer, key)
        if mark in self._observed:
            return []
        self._observed.add(mark)
        share = next((float(a["share"]) for a in self.assignments() if a["shard"] == shard), 0.0)
        got = self._awarded_at.get(shard)
        wall = (
            at - got[1] if outcome == tr.DONE and at is not None and got is not None and got[0] == peer else 0
        )
        return [
            act.Observe(
                peer=peer,
                task_id=self.task_id,
                shard=shard,
                work_gflop=share * self.announce.work,
                wall_ms=max(0, wall),
                outcome=outcome,
            )
        ]

    def _observe_lost(self, lost: set[str]) -> list[act.Action]:
        out: list[act.Action] = []
        for a in self.assignments():
            if a["peer_id"] in lost and not self._shard_finished(a["shard"]):
                epoch = self.latest_award()
                out += self._observe(
                    tr.TIMED_OUT, a["shard"], a["peer_id"], f"epoch {epoch.epoch if epoch else 0}", None
                )
        return out

    def _on_result(self, event: ev.MessageVerified, m: Result) -> list[act.Action]:
        signed = event.signed
        stream = event.via == ev.VIA_STREAM
        if stream and event.sender is not None and signed.signer != event.sender:
            return [act.Drop(reason="signer_mismatch"), act.Reply(ok=False, reason="signer mismatch")]
        if self.holder(m.shard, m.epoch) != signed.signer:
            out: list[act.Action] = [act.Drop(reason="not_holder")]
            return out + ([act.Reply(ok=False, reason="not the shard's holder")] if stream else [])
        why = self.declared.problem(m.outputs) if self.declared is not None else None
        if why is not None:
            # Refused before anything is stored or fetched (SPEC §7.7): the peer is at fault,
            # so its shard moves as a failure does. Reputation hook: an ``Observe`` outcome
            # for this peer belongs here once the machines have one (issue 8 item 2).
            out = [
                act.Drop(
                    reason="undeclared_output", detail=f"shard {m.shard} from {short(signed.signer)}: {why}"
                )
            ]
            if stream:
                out.append(act.Reply(ok=False, reason="undeclared output"))
            if self.state is TaskState.RUNNING and self.holder(m.shard) == signed.signer:
                out += self._move(
                    event.now_ms, m.shard, signed.signer, f"result refused: {why}", "undeclared_output"
                )
            return out
        out = [
            act.Persist(
                record=act.ResultRecord(
                    task_id=self.task_id, round=m.round, shard=m.shard, peer=signed.signer, raw=signed.raw
                )
            )
        ]
        self._keep_copy(signed, m)
        if self._keep_result(signed, m):
            out.append(act.Count(name="results.received"))
            self._result_at.setdefault((m.round, m.shard, signed.signer), event.now_ms)
            if not m.ok:
                out += self._observe(tr.FAILED, m.shard, signed.signer, f"round {m.round}", None)
        if stream:
            out.append(act.Reply(ok=True))
        if self.state is TaskState.RUNNING:
            out += self._supervise(event.now_ms)
        return out

    def _keep_copy(self, signed: Signed, m: Result) -> None:
        """A compared task keeps every holder's result of each copy, not just the first
        holder's: the quorum counts peers (SPEC §7.10). A peer's first result for a copy is
        final: results are gossiped, and a liar that could re-commit after seeing the others'
        hashes would never be outvoted (the store keeps the first too, ``Submitter``)."""
        if self.announce.verify is None:
            return
        by = self.copies.setdefault(m.shard, {})
        key = (m.shard, signed.signer)
        if key in self._copy_seen:
            return
        self._copy_seen.add(key)
        if m.ok:
            by[signed.signer] = signed

    def _keep_result(self, signed: Signed, m: Result) -> bool:
        """Per (round, shard) one result: the current holder's over an earlier holder's (a
        shard re-awarded mid-round), else the highest sequence (SPEC §7.7, §11)."""
        by_shard = self.results.setdefault(m.round, {})
        cur = by_shard.get(m.shard)
        if cur is not None and cur.signer != signed.signer:
            if self.announce.aggregation == "none" and cur.message.ok:  # type: ignore[attr-defined]
                return False  # a backup's result: the first valid one wins (SPEC §7.6)
            if self.holder(m.shard) != signed.signer:
                return False
        elif cur is not None and cur.message.seq >= m.seq:
            return False
        by_shard[m.shard] = signed
        return True

    # -- supervision: leases, results, rounds --------------------------------------------------
    def _supervise(self, now: int) -> list[act.Action]:
        """One pass of the submitter's supervision (``Submitter._supervise``): results or
        rounds first, then the leases."""
        out: list[act.Action] = []
        if self.announce.aggregation == "none":
            out += self._check_plain(now)
        else:
            out += self._report_rounds(now)
            if self.state is TaskState.RUNNING:
                out += self._check_all_failed(now)
        if self.state is TaskState.RUNNING:
            out += self._check_leases(now)
        return out

    def _shard_finished(self, shard: int) -> bool:
        if self.announce.aggregation == "none":
            # An OK result from any holder, or the current holder's failure (which moves the
            # shard); an earlier holder's failure does not finish it.
            holder = self.holder(shard)
            for by in self.results.values():
                sv = by.get(shard)
                if sv is not None and (sv.message.ok or sv.signer == holder):  # type: ignore[attr-defined]
                    return True
            return False
        return self.lease_states.get((self.holder(shard) or "", shard)) == "done"

    def _lost_holders(self, now: int) -> set[str]:
        """Holders of unfinished shards whose lease lapsed (SPEC §7.6), and holders of a
        plain task's shard past its hold limit (``backup_after`` × its expected time): a
        lease heartbeat alone never holds a shard past that point (issue 8 item 4)."""
        lost = set()
        for a in self.assignments():
            peer = a["peer_id"]
            if self._shard_finished(a["shard"]):
                continue
            last = max(self.heartbeats.get(peer, self.lease_start), self.lease_start)
            if peer in self._lost_now or now - last > self.times.lease_ttl_ms:
                lost.add(peer)
                why = self._why_lost.setdefault(peer, "lease lost")  # or "banned" (TrustKnown)
                self.failures.setdefault(int(a["shard"]), {})[peer] = why
                self.fail_codes[int(a["shard"])] = why.replace(" ", "_")
                continue
            due = self._overdue_at(a)
            if due is not None and now >= due:
                lost.add(peer)
                why = f"overdue (no result after {self.backup_after:g}× its expected time)"
                self.failures.setdefault(int(a["shard"]), {})[peer] = why
                self.fail_codes[int(a["shard"])] = "overdue"
                self._why_lost.setdefault(peer, "overdue")
        return lost

    def capacity_of(self, peer: str) -> float:
        """The capacity C the award used for ``peer``: C⁰ + ΔC of its quoted bid. Issue 8
        item 1 (an effective, measured capacity) replaces this, and only this. A banned
        peer's bid counts here too: without it a banned holder's hold limit was infinite,
        and its heartbeats held the shard to the deadline (bench trust, heartbeat phase)."""
        for b in quotable_bids(self.announce, list(self.bids.values())):
            if b.signer == peer:
                m = b.message
                assert isinstance(m, Bid)
                try:
                    return effective_capacity(float(m.c0), float(m.load), net_params(self.announce.net))
                except (ArithmeticError, ValueError, LocalProtocolError):
                    return 0.0
        return 0.0

    def expected_ms(self, assignment: Mapping[str, Any]) -> float:
        """The shard's expected time on its holder (:func:`expected_shard_ms`)."""
        return expected_shard_ms(
            float(assignment["share"]),
            float(self.announce.work),
            self.capacity_of(str(assignment["peer_id"])),
        )

    def hold_limit_ms(self, a: Mapping[str, Any]) -> float:
        """How long the holder of a plain task's shard may hold it without a result (SPEC
        §7.6): ``backup_after`` × its expected time, but never less than the floor
        ``min(backup_min, D / (1 + backup_after))`` nor one lease TTL. W is the submitter's
        estimate (a ``sleep`` task's says nothing of its length): the floor keeps a task that
        understates it from having every holder declared overdue, and the deadline term
        leaves a backup ``backup_after`` / (1 + ``backup_after``) of the deadline to finish."""
        floor = min(self.backup_min_ms, self.announce.deadline_ms / (1 + self.backup_after))
        return max(self.backup_after * self.expected_ms(a), floor, self.times.lease_ttl_ms + 1)

    def _overdue_at(self, a: Mapping[str, Any]) -> int | None:
        """When the holder of a plain task's shard is overdue: its :meth:`hold_limit_ms` after
        it got the shard. None: no limit (aggregated tasks wait for their rounds;
        ``backup_after = 0``)."""
        if self.announce.aggregation != "none" or self.backup_after <= 0:
            return None
        limit = self.hold_limit_ms(a)
        if limit == float("inf"):
            return None
        since = max(self.held_since.get(int(a["shard"]), self.lease_start), self.lease_start)
        return since + int(limit)

    def _check_leases(self, now: int) -> list[act.Action]:
        if not self.network_up:
            # Just restarted and nobody has reconnected yet: no lease could have reached us,
            # so the TTL starts once one can (otherwise every holder was "lost").
            self.lease_start = now
            return [self.timers.set(T_LEASES, now + min(1_000, self.times.heartbeat_ms))]
        lost = self._lost_holders(now)
        out: list[act.Action] = []
        if lost:
            out += self._observe_lost(lost)
            out += self._reaward(now, lost)
        if self.state is TaskState.RUNNING:
            out += self._arm_leases(now)
        return out

    def _arm_leases(self, now: int) -> list[act.Action]:
        """The lease check is due when the first unfinished holder's lease would lapse."""
        due = []
        for a in self.assignments():
            if self._shard_finished(a["shard"]):
                continue
            last = max(self.heartbeats.get(a["peer_id"], self.lease_start), self.lease_start)
            due.append(last + self.times.lease_ttl_ms + 1)
            overdue = self._overdue_at(a)
            if overdue is not None:
                due.append(overdue)
        if not due:
            return self.timers.cancel(T_LEASES)
        at = max(now + 1, min(due))
        if self.timers.armed.get(T_LEASES) == at:
            return []
        return [self.timers.set(T_LEASES, at)]

    def _move(self, now: int, shard: int, peer: str, why: str, code: str) -> list[act.Action]:
        """Shard ``shard`` failed on its holder ``peer`` (``ok = false``, a refused result):
        it moves to another bidder like a lost holder's (issue 8 item 3). ``code``: the
        reason the task gives if the shard cannot move (the shard's error class)."""
        self.failures.setdefault(shard, {})[peer] = why
        self.fail_codes[shard] = code
        self._why_lost[peer] = why
        self._definitive.add(peer)
        return self._reaward(now, {peer})

    def _give_up(self, now: int, lost: set[str], *, no_bidder: bool) -> list[act.Action] | None:
        """The task fails once a shard of ``lost`` has failed on ``retries`` + 1 peers (a
        shard may move ``retries`` times), or, with ``no_bidder``, when a shard that failed
        for sure has nobody left to move to (docs/tasks.md "Failures and backups"). The
        message names the shard and every error seen; the reason is the last one's class."""
        for a in self.assignments():
            shard = int(a["shard"])
            seen = self.failures.get(shard, {})
            if a["peer_id"] not in lost or not seen:
                continue
            # An overdue holder has not failed (it may still deliver first): a backup costs
            # no retry. Backups are bounded by the bidders (each overdue holder is excluded).
            failed = [p for p, w in seen.items() if not w.startswith(("overdue", "banned"))]
            if len(failed) > self.retries:
                why = f"retry budget ({self.retries}) spent"
            elif no_bidder and a["peer_id"] in self._definitive:
                why = "no other bidder"
            else:
                continue
            errors = "; ".join(f"{short(p)}: {w}" for p, w in seen.items())
            return self._finish(
                now,
                TaskState.FAILED,
                f"shard {shard} failed on {len(seen)} peer(s), {why}: {errors}",
                reason=self.fail_codes.get(shard, "failed"),
            )
        return None

    def _reaward(self, now: int, lost: set[str]) -> list[act.Action]:
        award = self.latest_award()
        assert award is not None
        spent = self._give_up(now, lost, no_bidder=False)
        if spent is not None:
            return spent
        excluded = sorted(set(award.excluded) | lost)
        usable, alloc, new = self._reallocate(now, award, excluded)
        self._lost_now -= lost
        if not new:
            ended = self._give_up(now, lost, no_bidder=True)
            if ended is not None:
                return ended
            self.state = TaskState.REBIDDING
            out = self._set_state("running", f"lost {len(lost)} peer(s); asking for fresh bids")
            out += self.timers.cancel(T_LEASES)
            out += self._publish_announce(now, fresh=True)
            out.append(self.timers.set(T_BID_WINDOW, now + self.announce.bid_window_ms))
            return out
        signed, persist = self._seal_next(now, award, usable, alloc, new, excluded)
        before = {x["shard"]: x["peer_id"] for x in award.assignments}
        for p in lost:
            self.heartbeats[p] = now  # not re-detected before the new award lands
        for a in new:
            if a["peer_id"] != before.get(a["shard"]):
                # A peer that just got a shard has not heartbeated it yet: a full TTL from now.
                self.heartbeats[a["peer_id"]] = now
                self._awarded_at[a["shard"]] = (a["peer_id"], now)
                self.held_since[int(a["shard"])] = now
        moved = ", ".join(
            f"shard {a['shard']} → {short(a['peer_id'])}" for a in new if a["peer_id"] != before[a["shard"]]
        )
        out = [persist, act.Count(name="tasks.reawarded")]
        whys = sorted({self._why_lost.pop(p, "lease lost") for p in lost})
        if whys == ["lease lost"]:
            what = f"lease lost by {join_short(sorted(lost))}"
        else:
            what = f"shard failed on {join_short(sorted(lost))} ({'; '.join(sorted(whys))})"
        out += self._set_state("running", f"{what}; re-awarded {moved}")
        out.append(act.Publish(signed=signed))
        return out

    def _reallocate(
        self, now: int, award: Award, excluded: Sequence[str]
    ) -> tuple[list[Signed], Allocation, list[dict[str, Any]]]:
        """The usable bids, their allocation under today's caps, and ``award``'s shards with
        those of ``excluded`` moved by the replacement rule, as receivers recompute it (§10.3)."""
        usable = self.usable()
        alloc = allocate(self.announce, usable, self._caps(usable, now)[0])
        costs = [(b.peer_id, b.cost) for b in alloc.scored]
        moved = reassign(
            list(award.assignments), set(excluded), costs, task_id=self.task_id, capacity=_capacities(alloc)
        )
        return usable, alloc, moved

    def _seal_next(
        self,
        now: int,
        award: Award,
        usable: list[Signed],
        alloc: Allocation,
        assignments: list[dict[str, Any]],
        excluded: Sequence[str],
    ) -> tuple[Signed, act.Persist]:
        """Seal and keep the award after ``award`` with ``assignments``; and its record."""
        epoch = award.epoch + 1
        signed = self.sealer.seal(
            Award,
            now_ms=now,
            ttl_ms=Award.MAX_TTL_MS,
            task_id=self.task_id,
            epoch=epoch,
            bids=[b.raw for b in usable],
            assignments=[{**a, "inputs": dict(a["inputs"])} for a in assignments],
            under_capacity=award.under_capacity,
            excluded=list(excluded),
            certified=self._certified_quote(),
            caps=self._applied_caps(alloc),
        )
        self.awards[epoch] = signed
        record = act.AwardRecord(
            task_id=self.task_id, epoch=epoch, raw=signed.raw, assignments=tuple(assignments)
        )
        return signed, act.Persist(record=record)

    def _certified_quote(self) -> dict[str, Any] | None:
        """The last round certified so far, as a re-award quotes it (SPEC §7.5, §11.1 "The
        award in force"): its holders start after it, from its output, and no certificate
        for it or an earlier round can be formed under the new award."""
        if not self.certificates:
            return None
        # The highest, not the last of an unbroken run: every certificate we hold stays in
        # force (a round below it we have not seen certified keeps its earlier award).
        r = max(self.certificates)
        cert = self.certificates[r]
        out = {"sha256": cert.output["sha256"], "size": cert.output["size"]}
        return {"round": r, "output": out, "signers": list(cert.signers)}

    def _check_plain(self, now: int) -> list[act.Action]:
        """aggregation = none: done when every shard has an OK result whose outputs we hold.
        Shards are checked in order, and outputs fetched one at a time, as today."""
        if self.announce.verify is not None:
            return self._check_replicated(now)
        merged: dict[int, Signed] = {}
        for rnd in sorted(self.results):
            merged.update(self.results[rnd])
        shards = self.assignments()
        out: list[act.Action] = []
        for a in shards:
            sv = merged.get(a["shard"])
            if sv is None:
                return out
            msg = sv.message
            assert isinstance(msg, Result)
            if not msg.ok:
                if sv.signer != a["peer_id"]:
                    return out  # an earlier holder's failure: the shard moved, wait for its new holder
                return out + self._shard_failed(now, sv, msg)
            missing = self._fetch_missing(sv)
            if missing is not None:
                return out + missing
            if a["shard"] not in self.shards_done:
                self.shards_done.add(a["shard"])
                out += self._observe(
                    tr.DONE, a["shard"], sv.signer, "", self._result_at.get((msg.round, msg.shard, sv.signer))
                )
                out.append(
                    act.Persist(
                        record=act.ShardStateRecord(task_id=self.task_id, shard=a["shard"], state="done")
                    )
                )
        outputs = []
        metrics: dict[str, float] = {}
        for a in shards:
            msg = merged[a["shard"]].message
            assert isinstance(msg, Result)
            for name, ref in sorted(msg.outputs.items()):
                outputs.append(
                    {"name": f"shard-{a['shard']}/{name}", "sha256": ref["sha256"], "size": ref["size"]}
                )
            for k, v in msg.metrics.items():
                metrics[f"shard-{a['shard']}.{k}"] = v
        out.append(
            act.Persist(
                record=act.TaskResultRecord(
                    task_id=self.task_id, result={"outputs": outputs, "metrics": metrics, "certificate": None}
                )
            )
        )
        return out + self._finish(now, TaskState.DONE, f"{len(shards)} shard result(s) received")

    # -- replicated tasks (SPEC §7.10) -------------------------------------------------------------
    def max_copies(self) -> int:
        """Most copies of one shard: the replicas, then one more per disagreement, up to
        2 × replicas + 1 (a strict majority stays reachable against one liar per copy); a
        spot-checked task's shards as if they had 2 replicas (an undrawn shard gets a second
        copy only when a backup's result disagrees with its holder's)."""
        replicas = 2 if self.announce.verify_mode == "spot-check" else self.announce.replicas
        return 2 * replicas + 1

    def checked(self) -> list[int]:
        """The shards the salt draws for a second copy (spot-check; [] before the award)."""
        if self.spot_salt is None or 0 not in self.awards:
            return []
        first = self.awards[0].message
        assert isinstance(first, Award) and self.announce.verify is not None
        n = len(first.assignments)
        return spot_checked(self.task_id, self.spot_salt, n, float(self.announce.verify["fraction"]))

    def _decide(self, work: int, group: list[dict[str, Any]]) -> bool:
        """Every copy of ``work`` has an OK result: a strict majority of the peers that sent
        one, and at least ⌊replicas / 2⌋ + 1 of them, signed the same value — decided (kept in
        ``quorum``) — or not. A peer is counted once, under its first result for its copy
        (``_keep_copy``)."""
        votes: dict[tuple[Any, ...], set[str]] = {}
        first: dict[tuple[Any, ...], tuple[int, Signed]] = {}
        for a in sorted(group, key=lambda a: a["shard"]):
            for signer, sv in sorted(self.copies[a["shard"]].items()):
                m = sv.message
                assert isinstance(m, Result)
                v = replica_value(m)
                votes.setdefault(v, set()).add(signer)
                first.setdefault(v, (int(a["shard"]), sv))
        peers: set[str] = set().union(*votes.values())
        best = max(votes, key=lambda v: (len(votes[v]), -first[v][0]))
        agreed = votes[best]
        if 2 * len(agreed) <= len(peers) or len(agreed) < quorum_need(self.announce, work, self.checked()):
            return False
        self.quorum[work] = {
            "shard": work,
            "agreed": sorted(agreed),
            "disagreed": sorted(peers - agreed),
            "copies": sorted(int(a["shard"]) for a in group),
            "result": first[best][1],
        }
        return True

    def _check_replicated(self, now: int) -> list[act.Action]:
        """A replicated plain task: done when every shard's copies have reached a quorum
        (``_decide``) and the agreed outputs are fetched. Copies that disagree get one more
        copy each on another peer (``_add_copies``), up to ``max_copies``; past it the task
        fails (``replicas_disagree``). Peers on the losing side are observed ``disagreed``."""
        merged: dict[int, Signed] = {}
        for rnd in sorted(self.results):
            merged.update(self.results[rnd])
        groups: dict[int, list[dict[str, Any]]] = {}
        for a in self.assignments():
            groups.setdefault(logical_shard(a), []).append(a)
        out: list[act.Action] = []
        waiting = False
        split: list[int] = []
        for work, group in sorted(groups.items()):
            if work in self.quorum:
                continue
            complete = True
            for a in group:
                if self.copies.get(a["shard"]):
                    continue
                complete = False
                sv = merged.get(a["shard"])
                if sv is not None and sv.signer == a["peer_id"] and not sv.message.ok:  # type: ignore[attr-defined]
                    msg = sv.message
                    assert isinstance(msg, Result)
                    return out + self._shard_failed(now, sv, msg)
            if not complete:
                waiting = True
                continue
            if not self._decide(work, group):
                split.append(work)
                continue
            q = self.quorum[work]
            for a in group:
                for signer, sv in sorted(self.copies[a["shard"]].items()):
                    m = sv.message
                    assert isinstance(m, Result)
                    if signer in q["disagreed"]:
                        out += self._observe(tr.DISAGREED, int(a["shard"]), signer, f"shard {work}", None)
                    else:
                        out += self._observe(
                            tr.DONE,
                            int(a["shard"]),
                            signer,
                            "",
                            self._result_at.get((m.round, m.shard, signer)),
                        )
        if split:
            return out + self._add_copies(now, split, groups)
        if waiting:
            return out
        for work in sorted(groups):
            missing = self._fetch_missing(self.quorum[work]["result"])
            if missing is not None:
                return out + missing
        outputs = []
        metrics: dict[str, float] = {}
        replicas = []
        for work in sorted(groups):
            q = self.quorum[work]
            msg = q["result"].message
            assert isinstance(msg, Result)
            for name, ref in sorted(msg.outputs.items()):
                outputs.append({"name": f"shard-{work}/{name}", "sha256": ref["sha256"], "size": ref["size"]})
            for k, v in msg.metrics.items():
                metrics[f"shard-{work}.{k}"] = v
            replicas.append({k: q[k] for k in ("shard", "copies", "agreed", "disagreed")})
            for shard in q["copies"]:
                if shard not in self.shards_done:
                    self.shards_done.add(shard)
                    out.append(
                        act.Persist(
                            record=act.ShardStateRecord(task_id=self.task_id, shard=shard, state="done")
                        )
                    )
        result: dict[str, Any] = {
            "outputs": outputs,
            "metrics": metrics,
            "certificate": None,
            "replicas": replicas,
        }
        if self.spot_salt is not None:
            # Shown now (SPEC §7.10): anyone checks it against the announce's commit and
            # recomputes which shards it drew.
            result["spot"] = {"salt": self.spot_salt.hex(), "checked": self.checked()}
        out.append(act.Persist(record=act.TaskResultRecord(task_id=self.task_id, result=result)))
        agreed = min(len(r["agreed"]) for r in replicas)
        return out + self._finish(
            now, TaskState.DONE, f"{len(groups)} shard result(s) received, each agreed by ≥ {agreed} peers"
        )

    def _add_copies(
        self, now: int, works: list[int], groups: Mapping[int, list[dict[str, Any]]]
    ) -> list[act.Action]:
        """The copies of ``works`` disagree: a re-award adds one more copy of each on a peer
        that holds none (``awards.add_replicas`` after ``reassign``, as receivers check it)."""
        award = self.latest_award()
        assert award is not None
        full = [w for w in works if len(groups[w]) >= self.max_copies()]
        if full or len(award.assignments) + len(works) > 64:
            w = (full or works)[0]
            return self._finish(
                now,
                TaskState.FAILED,
                f"shard {w}: its {len(groups[w])} copies reach no majority ({self._split_story(groups[w])})",
                reason="replicas_disagree",
            )
        usable, alloc, base = self._reallocate(now, award, award.excluded)
        ranking = replica_ranking(self.task_id, alloc.scored, award.excluded)
        grown = add_replicas(base, works, ranking, alloc.demand) if base else None
        if grown is None:
            w = works[0]
            return self._finish(
                now,
                TaskState.FAILED,
                f"shard {w}: its copies disagree ({self._split_story(groups[w])}) and no other peer"
                " has bid for another copy",
                reason="replicas_disagree",
            )
        signed, persist = self._seal_next(now, award, usable, alloc, grown, award.excluded)
        added = grown[len(base) :]
        for a in added:
            self.heartbeats[a["peer_id"]] = now
            self._awarded_at[a["shard"]] = (a["peer_id"], now)
            self.held_since[int(a["shard"])] = now
        moved = ", ".join(f"shard {a['of']} → {short(a['peer_id'])}" for a in added)
        first_check = all(len(groups[w]) == 1 for w in works)
        out: list[act.Action] = [persist, act.Count(name="tasks.replicas_added")]
        what = "spot-check: a second copy" if first_check else "copies disagree; one more copy"
        out += self._set_state("running", f"{what} of {moved}")
        out.append(act.Publish(signed=signed))
        return out

    def _split_story(self, group: list[dict[str, Any]]) -> str:
        """``2 × a1b2…, 1 × c3d4…``: how many peers signed which output (its first hash)."""
        counts: dict[str, set[str]] = {}
        for a in group:
            for signer, sv in self.copies.get(a["shard"], {}).items():
                m = sv.message
                assert isinstance(m, Result)
                outs = sorted(r["sha256"] for r in m.outputs.values())
                counts.setdefault(outs[0][:8] if outs else "no output", set()).add(signer)
        return ", ".join(f"{len(p)} × {h}" for h, p in sorted(counts.items(), key=lambda kv: -len(kv[1])))

    def _fetch_missing(self, sv: Signed) -> list[act.Action] | None:
        """None when every output of ``sv`` is fetched; else the fetch of the first one
        missing (one at a time, and none while a refetch waits), or [] while one is in flight."""
        msg = sv.message
        assert isinstance(msg, Result)
        for ref in msg.outputs.values():
            if ref["sha256"] in self.fetched:
                continue
            if self._fetching is not None or T_REFETCH in self.timers:
                return []
            self._fetching = f"output:{ref['sha256']}"
            return [
                act.FetchBlob(digest=ref["sha256"], size=ref["size"], source=sv.signer, tag=self._fetching)
            ]
        return None

    def _shard_failed(self, now: int, sv: Signed, msg: Result) -> list[act.Action]:
        """A plain task's shard returned ``ok = false`` from its current holder: it moves to
        another bidder (issue 8 item 3) until it has failed on ``retries`` + 1 peers; then
        the task fails, naming the shard and every error seen."""
        return self._move(
            now, msg.shard, sv.signer, f"ok = false: {msg.error}", (msg.error or "failed").split(":")[0]
        )

    def _check_all_failed(self, now: int) -> list[act.Action]:
        failed = []
        for rnd in sorted(self.results):
            for shard in sorted(self.results[rnd]):
                sv = self.results[rnd][shard]
                msg = sv.message
                assert isinstance(msg, Result)
                if not msg.ok:
                    failed.append(f"shard {msg.shard} on {short(sv.signer)}: {msg.error}")
        if failed and len(failed) == len(self.assignments()):
            return self._finish(
                now, TaskState.FAILED, f"every shard failed: {failed[0]}", reason="shards_failed"
            )
        return []

    # -- rounds --------------------------------------------------------------------------------------
    def _on_certificate(self, event: ev.RoundCertified) -> list[act.Action]:
        cert = event.certificate
        if cert.task_id != self.task_id:
            raise LocalProtocolError(
                f"TaskMachine {self.task_id}: certificate misrouted", reason="illegal_event"
            )
        if self.announce.aggregation == "none":
            raise illegal("TaskMachine", self.state, event)
        self.certificates.setdefault(cert.round, cert)
        if self.state is TaskState.RUNNING:
            return self._supervise(event.now_ms)
        return []

    def _report_rounds(self, now: int) -> list[act.Action]:
        """Report certified rounds in order, one at a time (``_on_round_certified``); after
        the last one, complete the task (``_complete_rounds``)."""
        out: list[act.Action] = []
        while self._report is None and self.state is TaskState.RUNNING:
            todo = [r for r in sorted(self.certificates) if r not in self.reported]
            if not todo:
                if self.announce.rounds in self.certificates:
                    out += self._complete(now)
                return out
            out += self._begin_report(now, todo[0])
        return out

    def _begin_report(self, now: int, rnd: int) -> list[act.Action]:
        cert = self.certificates[rnd]
        rep = _Report(round=rnd)
        self._report = rep
        out: list[act.Action] = []
        # Keep this round's committed inputs now, while their committers are surely up: the
        # result bundle needs them (peerctl verify). Best effort, each from its committer,
        # else from the voters (who fetched them to vote).
        for i, inp in enumerate(cert.inputs):
            sources = [p for p in [inp["peer_id"], *cert.signers] if p != self.me]
            if sources:
                tag = f"round-input:{rnd}:{i}"
                rep.pending[tag] = (inp["sha256"], act.ANY_SIZE, sources[1:])
                out.append(act.FetchBlob(digest=inp["sha256"], size=act.ANY_SIZE, source=sources[0], tag=tag))
        if not rep.pending:
            out += self._after_inputs(now, rep)
        return out

    def _after_inputs(self, now: int, rep: _Report) -> list[act.Action]:
        if self.announce.kind == "keras-train" and "validation" in self.held_out:
            return self._evaluate(now, rep, "validation")
        return self._end_report(now, rep)

    def _evaluate(self, now: int, rep: _Report, input_name: str) -> list[act.Action]:
        """Score the certified model on our own held-out input: fetch it, then a local job."""
        rep.eval_sources = self._model_sources(rep.round)
        return self._fetch_model(now, rep, input_name)

    def _model_sources(self, rnd: int) -> list[str]:
        """The voters, who serve the certified output (ourselves last: the driver returns a
        local copy when there is one)."""
        signers = self.certificates[rnd].signers
        return [p for p in signers if p != self.me] or [p for p in signers if p == self.me]

    def _fetch_model(self, now: int, rep: _Report, input_name: str) -> list[act.Action]:
        cert = self.certificates[rep.round]
        out = cert.output
        if not rep.eval_sources:
            return self._eval_done(now, rep, input_name, None)  # evaluation is best effort
        src = rep.eval_sources.pop(0)
        return [
            act.FetchBlob(
                digest=out["sha256"], size=out["size"], source=src, tag=f"model:{rep.round}:{input_name}"
            )
        ]

    def _start_eval(self, rep: _Report, input_name: str) -> list[act.Action]:
        cert = self.certificates[rep.round]
        rep.eval_job = f"{self.task_id}-eval-{input_name}"
        params = {
            "model_config": self.announce.params.get("model_config"),
            "loss": self.announce.params.get("loss", "sparse_categorical_crossentropy"),
        }
        if "x_scale" in self.announce.params:
            # The held-out data is stored as the training data is (uint8 pixels, docs/tasks.md).
            params["x_scale"] = self.announce.params["x_scale"]
        return [
            act.StartJob(
                job_id=rep.eval_job,
                task_id=self.task_id,
                kind="keras-predict",
                shard=-1,
                round=rep.round,
                epoch=-1,
                submitter=self.me,
                params=params,
                inputs={"weights": dict(cert.output), "data": dict(self.held_out[input_name])},
                purpose="evaluate",
            )
        ]

    def _eval_done(
        self, now: int, rep: _Report, input_name: str, metrics: dict[str, float] | None
    ) -> list[act.Action]:
        rep.eval_job = None
        if input_name == "validation":
            rep.val = metrics
            return self._end_report(now, rep)
        return self._finish_rounds(now, metrics)

    def _end_report(self, now: int, rep: _Report) -> list[act.Action]:
        rnd = rep.round
        cert = self.certificates[rnd]
        info: dict[str, Any] = {
            "round": rnd,
            # A peer holding two shards (a re-award without a spare) is listed once.
            "participants": list(dict.fromkeys(i["peer_id"] for i in cert.inputs)),
            "excluded": [dict(e) for e in cert.excluded],
            "certified": True,
            "certified_at": now / 1000,
            "output": cert.output["sha256"],
            "signers": list(cert.signers),
        }
        # Training metrics: sample-weighted mean of the reports of the inputs the certificate
        # aggregated — not of every result seen (an excluded peer's numbers are not the model's).
        reports: list[tuple[dict[str, float], float]] = []
        for i in cert.inputs:
            sv = self.results.get(rnd, {}).get(int(i["shard"]))
            msg = sv.message if sv is not None and sv.signer == i["peer_id"] else None
            if isinstance(msg, Result) and msg.outputs.get("weights", {}).get("sha256") == i["sha256"]:
                reports.append((dict(msg.metrics), float(msg.weight)))
        for key in ("loss", "accuracy"):
            vals = [(m[key], w) for m, w in reports if key in m]
            total = sum(w for _, w in vals)
            if vals and total > 0:
                info[key] = sum(v * w for v, w in vals) / total
        if rep.val:
            info["val_loss"], info["val_accuracy"] = rep.val.get("loss"), rep.val.get("accuracy")
        self.reported.add(rnd)
        self._report = None
        self._last_round_info = info
        note = f"; val accuracy {info['val_accuracy']:.4f}" if info.get("val_accuracy") is not None else ""
        out: list[act.Action] = [
            act.Persist(record=act.RoundRecord(task_id=self.task_id, round=rnd, info=info))
        ]
        out += self._set_state(
            "running" if rnd < self.announce.rounds else "aggregating",
            f"round {rnd}/{self.announce.rounds} certified by {len(cert.signers)} of "
            f"{len(cert.committee)}{note}",
        )
        out.append(
            act.Notify(
                task_id=self.task_id,
                state="running",
                message=f"round {rnd} certified",
                extra={"round": rnd, "metrics": info},
            )
        )
        if self.state is TaskState.RUNNING:
            out += self._report_rounds(now)
        return out

    def _complete(self, now: int) -> list[act.Action]:
        """The last round is certified: fetch the final model (from its signers), score it on
        ``test`` if we hold one, and record the result."""
        self.state = TaskState.AGGREGATING
        out = self.timers.cancel(T_LEASES)
        cert = self.certificates[self.announce.rounds]
        rep = _Report(round=cert.round, eval_sources=self._model_sources(cert.round))
        self._final = rep
        return out + self._fetch_final(now, rep)

    def _fetch_final(self, now: int, rep: _Report) -> list[act.Action]:
        cert = self.certificates[rep.round]
        if not rep.eval_sources:
            return self._finish(
                now,
                TaskState.FAILED,
                "internal error: cannot fetch the certified output",
                reason="internal",
            )
        src = rep.eval_sources.pop(0)
        return [
            act.FetchBlob(
                digest=cert.output["sha256"], size=cert.output["size"], source=src, tag=f"final:{rep.round}"
            )
        ]

    def _after_final_model(self, now: int, rep: _Report) -> list[act.Action]:
        if self.announce.kind == "keras-train" and "test" in self.held_out:
            return self._start_eval(rep, "test")
        return self._finish_rounds(now, None)

    def _finish_rounds(self, now: int, test: dict[str, float] | None) -> list[act.Action]:
        cert = self.certificates[self.announce.rounds]
        metrics: dict[str, float] = {f"test_{k}": v for k, v in (test or {}).items()}
        last = self._last_round_info
        if last.get("val_accuracy") is not None:
            metrics["val_accuracy"] = last["val_accuracy"]
        result = {
            "outputs": [{"name": "weights", "sha256": cert.output["sha256"], "size": cert.output["size"]}],
            "metrics": metrics,
            "certificate": {
                "round": cert.round,
                "rule": cert.rule,
                "committee": list(cert.committee),
                "signers": list(cert.signers),
                "output": cert.output["sha256"],
            },
        }
        msg = f"{self.announce.rounds} round(s) certified"
        if "test_accuracy" in metrics:
            msg += f"; test accuracy {metrics['test_accuracy']:.4f}"
        out: list[act.Action] = [
            act.Persist(record=act.TaskResultRecord(task_id=self.task_id, result=result))
        ]
        return out + self._finish(now, TaskState.DONE, msg)

    # -- completions ---------------------------------------------------------------------------------
    def _on_blob(self, event: ev.BlobFetched) -> list[act.Action]:
        now, tag = event.now_ms, event.tag
        if tag == self._fetching:
            self._fetching = None
            if event.ok:
                self.fetched.add(event.digest)
                return self._check_plain(now) if self.state is TaskState.RUNNING else []
            # Retry at the next supervision tick (at most a second, as today).
            if self.state is TaskState.RUNNING:
                return [self.timers.set(T_REFETCH, now + min(1_000, self.times.heartbeat_ms))]
            return []
        rep = self._report
        if rep is not None and tag in rep.pending:
            sha, size, rest = rep.pending.pop(tag)
            out: list[act.Action] = []
            if not event.ok and rest:
                rep.pending[tag] = (sha, size, rest[1:])
                return [act.FetchBlob(digest=sha, size=size, source=rest[0], tag=tag)]
            if not rep.pending:
                out += self._after_inputs(now, rep)
            return out
        if rep is not None and tag == f"model:{rep.round}:validation":
            if event.ok:
                return self._start_eval(rep, "validation")
            return self._fetch_model(now, rep, "validation")
        fin = self._final
        if fin is not None and tag == f"final:{fin.round}" and self.state is TaskState.AGGREGATING:
            if event.ok:
                return self._after_final_model(now, fin)
            return self._fetch_final(now, fin)
        raise LocalProtocolError(f"TaskMachine: no fetch {tag!r} is pending", reason="illegal_event")

    def _on_job(self, event: ev.JobFinished) -> list[act.Action]:
        metrics = {k: float(v) for k, v in event.metrics.items()} if event.ok else None
        rep = self._report
        if rep is not None and rep.eval_job == event.job_id:
            return self._eval_done(event.now_ms, rep, "validation", metrics)
        fin = self._final
        if fin is not None and fin.eval_job == event.job_id and self.state is TaskState.AGGREGATING:
            return self._eval_done(event.now_ms, fin, "test", metrics)
        raise LocalProtocolError(f"TaskMachine: no job {event.job_id!r} is running", reason="illegal_event")

    # -- the end -------------------------------------------------------------------------------------
    def _cancel(self, now: int, reason: str) -> list[act.Action]:
        signed = self.sealer.seal(
            Cancel, now_ms=now, ttl_ms=CANCEL_TTL_MS, task_id=self.task_id, reason=reason
        )
        out: list[act.Action] = [act.Publish(signed=signed)]
        return out + self._finish(now, TaskState.CANCELLED, reason)

    def _set_state(self, state: str, message: str, reason: str | None = None) -> list[act.Action]:
        self.public_state, self.reason = state, reason
        return [
            act.Persist(
                record=act.TaskState(task_id=self.task_id, state=state, message=message, reason=reason)
            ),
            act.Notify(task_id=self.task_id, state=state, message=message),
        ]

    def _finish(
        self, now: int, state: TaskState, message: str, reason: str | None = None
    ) -> list[act.Action]:
        assert state in TERMINAL
        self.state = state
        self.public_state, self.reason = state.value, reason
        out = self.timers.cancel_all()
        for rep in (self._report, self._final):
            if rep is not None and rep.eval_job is not None:
                out.append(act.CancelJob(job_id=rep.eval_job))
        return [
            *out,
            act.Persist(
                record=act.TaskState(task_id=self.task_id, state=state.value, message=message, reason=reason)
            ),
            act.Count(name=f"tasks.{state.value}"),
            act.Notify(task_id=self.task_id, state=state.value, message=message, final=True),
        ]

    # -- restart -------------------------------------------------------------------------------------
    def _restore(self, r: Restored) -> None:
        for b in r.bids:
            self.bids[b.digest] = b
        for a in r.awards:
            assert isinstance(a.message, Award)
            self.awards[a.message.epoch] = a
        for res in r.results:
            assert isinstance(res.message, Result)
            self._keep_result(res, res.message)
            if self.holder(res.message.shard, res.message.epoch) == res.signer:
                self._keep_copy(res, res.message)
        self.certificates.update(r.certificates)
        self.reported.update(r.reported_rounds)
        self.public_state, self.reason = r.public_state, r.reason
        # The retry budget survives a restart: every earlier holder a later award excluded
        # counts as one failure of its shard (its reason is gone with the old process).
        latest = self.latest_award()
        excluded = set(latest.excluded) if latest is not None else set()
        for epoch in sorted(self.awards):
            msg = self.awards[epoch].message
            assert isinstance(msg, Award)
            for held in msg.assignments:
                if held["peer_id"] in excluded:
                    self.failures.setdefault(int(held["shard"]), {}).setdefault(
                        str(held["peer_id"]), "failed or lost before a restart"
                    )


def _capacities(alloc: Allocation) -> dict[str, float]:
    """Each bidder's C as the award counted it (``reassign`` breaks cost ties by it)."""
    return {s.peer_id: s.capacity for s in alloc.scored}


def deadline_ms(announce: TaskAnnounce) -> int:
    """When the task fails if unfinished (docs/tasks.md ``deadline_s``)."""
    return announce.issued_at + announce.deadline_ms


__all__ = ["TERMINAL", "Restored", "TaskMachine", "TaskState", "deadline_ms"]
