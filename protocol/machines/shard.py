"""ShardMachine: a contractor's view of one shard of one task (seed §3.2 steps 2, 3, 5).

The rules are those of ``peerd/contractor.py`` today:

* **Bid.** The driver decides eligibility (``[offer]``/``[policy]``, the sandbox: its own
  config, docs/tasks.md "Eligibility") and builds the machine only for a task it may take.
  Start sends a signed bid (C⁰ at least 10⁻⁶, L at most 1000, valid 60 s) to the
  submitter (SPEC §8.2); every re-announce of the task is answered with a fresh bid, also
  after an award (a re-announce asks for spare bidders).
* **Award.** Every award is checked with the real rule (``awards.check_award``, exactly
  against the previous epoch when we hold it); a bad one is dropped with its reason. An
  award naming us binds the machine to our lowest shard; any other shard it gives us is
  handed to the driver (``AdoptShard``) for a machine of its own.
* **Work.** Fetch the inputs (the announce's, then the shard's own) from the submitter one
  at a time, then for each round: (keras-train, round > 1) wait for the previous round's
  certificate and fetch its output from a voter (three passes, a second apart), run the
  job, deliver the signed result (durable first) and, for an aggregated task, publish it
  (a plain task's result goes to its submitter only, SPEC §7.7). The first round is the one
  after the last round the binding award quotes as certified (``Award.certified``, SPEC
  §11.1 "The award in force"), whose output the award names: a holder bound by a re-award
  never runs a round the submitter holds certified, even when it missed that round's votes
  (docs/simulation.md finding 3); rounds it saw certified beyond the quote count only while
  their certificates hold under its awards. A lease heartbeat goes out
  ``FIRST_HEARTBEAT_MS`` after the award, then every ``heartbeat_ms`` while the shard is
  worked on; a final lease (``done``,
  ``failed``, ``released``) when it ends, except where a plain task's result ends it: that
  result tells the submitter, the only peer that supervises the holder (SPEC §7.6).
* **Delivery.** Until the submitter acknowledges: back-off from 0.2 s doubling to
  ``max(0.5 s, min(10 s, lease_ttl / 2))``, re-publishing the final lease between tries
  once the shard is no longer worked on, at most 200 tries; stop on "unknown task", on
  cancel, or past the deadline.
* **Cancel / lost award.** The submitter's signed cancel, or a later award that gives our
  shard to another peer, kills the job and releases the lease — except a plain task's job
  that already runs: the new holder is a backup (SPEC §7.6), ours runs on, and the first
  valid result wins (``shards.superseded``).

An ``ok = false`` result is published and delivered like any other (issue 8 item 3: the
submitter, not the contractor, decides what a failure costs; see TaskMachine: the shard moves
to another bidder). A backup holder (SPEC §7.6) is an ordinary holder of a later epoch.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.certificate import Certificate, certificate_in_force, certified_round
from protocol.envelope import Signed
from protocol.errors import LocalProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, Sealer, Timers, award_drop, illegal
from protocol.messages import Award, Bid, Cancel, Lease, Message, Result, TaskAnnounce

#: Tries to hand a result to its submitter (``contractor.MAX_DELIVERY_TRIES``).
MAX_DELIVERY_TRIES = 200
FIRST_DELAY_MS = 200
BID_TTL_MS = 60_000
#: Passes over the voters to fetch a certified start model, a second apart (``Rounds._fetch_from_any``).
MODEL_FETCH_PASSES = 3
MODEL_FETCH_PAUSE_MS = 1_000
#: The first heartbeat after an award (SPEC §7.6), unless the shard's work ended first.
FIRST_HEARTBEAT_MS = 250

T_HEARTBEAT = "heartbeat"
T_MODEL = "model_retry"


def _t_deliver(round_no: int) -> str:
    return f"deliver:{round_no}"


class ShardState(enum.Enum):
    NEW = "new"  # built, not started
    BID_SENT = "bid_sent"  # our bid is out; no award names us (yet)
    FETCHING = "fetching"  # awarded: fetching the inputs from the submitter
    WAITING_MODEL = "waiting_model"  # keras-train round > 1: the previous round's certified model
    RUNNING = "running"  # the current round's job runs
    DELIVERING = "delivering"  # work over; results not yet acknowledged
    DONE = "done"
    FAILED = "failed"
    RELEASED = "released"  # the task was cancelled
    LOST = "lost"  # a later award gave our shard to another peer


#: The shard is being worked on: heartbeats go out, a cancel or lost award releases it.
ACTIVE = frozenset({ShardState.FETCHING, ShardState.WAITING_MODEL, ShardState.RUNNING})
TERMINAL = frozenset({ShardState.DONE, ShardState.FAILED, ShardState.RELEASED, ShardState.LOST})


@dataclass
class _Delivery:
    signed: Signed
    tries: int = 0
    delay_ms: int = FIRST_DELAY_MS


class ShardMachine:
    """One shard of one task on this contractor.

    Build it with :meth:`bidder` when the task is announced (it bids, then binds to the
    shard an award gives us), :meth:`adopt` for a further shard an award gives us
    (``AdoptShard``), or :meth:`redeliver` after a restart for a stored, unacknowledged
    result (``Contractor.redeliver_pending``). Then ``handle(Start(...))`` once.
    """

    def __init__(
        self,
        announce: Signed,
        *,
        sealer: Sealer,
        times: MarketTimes,
        c0: float = 0.0,
        load: float = 0.0,
        shard: int | None = None,
        awards: Sequence[Signed] = (),
        certificates: Mapping[int, Certificate] | None = None,
        is_bidder: bool = True,
    ) -> None:
        if not isinstance(announce.message, TaskAnnounce):
            raise LocalProtocolError("ShardMachine needs a signed announce", reason="illegal_event")
        self.announce: TaskAnnounce = announce.message
        self.announce_signed = announce
        self.task_id = self.announce.task_id
        self.submitter = announce.signer
        self.me = sealer.peer_id
        self.sealer = sealer
        self.times = times
        self.c0, self.load = c0, load
        self.is_bidder = is_bidder
        self.shard = shard
        self.state = ShardState.NEW
        self.timers = Timers()
        self.awards: dict[int, Signed] = {}
        for a in awards:
            assert isinstance(a.message, Award)
            self.awards[a.message.epoch] = a
        self.certificates: dict[int, Certificate] = dict(certificates or {})
        self.cancelled = False
        self.epoch = -1
        self.assignment: dict[str, Any] = {}
        self.round = 0
        self.detail = ""
        self.outcome = ShardState.DONE  # what DELIVERING ends in
        self.inputs: dict[str, dict[str, Any]] = {}
        self._to_fetch: list[tuple[str, dict[str, Any]]] = []
        self._model_sources: list[str] = []
        self._model_pass = 0
        self.job_id: str | None = None
        self.deliveries: dict[int, _Delivery] = {}
        self._redeliver: Signed | None = None

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def bidder(
        cls, announce: Signed, *, sealer: Sealer, times: MarketTimes, c0: float, load: float
    ) -> ShardMachine:
        """The machine that bids for the task (one per task on an eligible contractor)."""
        return cls(announce, sealer=sealer, times=times, c0=c0, load=load)

    @classmethod
    def adopt(
        cls,
        announce: Signed,
        award: Signed,
        shard: int,
        *,
        sealer: Sealer,
        times: MarketTimes,
        awards: Sequence[Signed] = (),
        certificates: Mapping[int, Certificate] | None = None,
    ) -> ShardMachine:
        """A further shard ``award`` (already checked) gives us; Start begins its work."""
        m = cls(
            announce,
            sealer=sealer,
            times=times,
            shard=shard,
            awards=[*awards, award],
            certificates=certificates,
            is_bidder=False,
        )
        return m

    @classmethod
    def redeliver(
        cls, announce: Signed, result: Signed, *, sealer: Sealer, times: MarketTimes
    ) -> ShardMachine:
        """After a restart: deliver a stored result the submitter has not acknowledged."""
        if not isinstance(result.message, Result):
            raise LocalProtocolError("redeliver needs a signed result", reason="illegal_event")
        m = cls(announce, sealer=sealer, times=times, shard=result.message.shard, is_bidder=False)
        m._redeliver = result
        return m

    # -- the one dispatch method ---------------------------------------------------------------------
    def handle(self, event: ev.Event) -> list[act.Action]:
        s = self.state
        if s is ShardState.NEW:
            if isinstance(event, ev.Start):
                return self._start(event.now_ms)
            raise illegal("ShardMachine", s, event)
        if isinstance(event, ev.Start | ev.CancelRequested | ev.InputsSplit):
            raise illegal("ShardMachine", s, event)
        if isinstance(event, ev.MessageVerified):
            return self._on_message(event)
        if isinstance(event, ev.RoundCertified):
            return self._on_certificate(event)
        if isinstance(event, ev.PeerLost | ev.PeersKnown):
            return []  # loss of the submitter shows as failed deliveries
        if isinstance(event, ev.SendCompleted):
            return self._on_sent(event)
        if s in TERMINAL and isinstance(event, ev.BlobFetched | ev.JobFinished):
            return []  # the completion of work a cancel or a lost award made moot
        if isinstance(event, ev.TimerFired):
            self.timers.fire("ShardMachine", event.name)
            return self._on_timer(event.name, event.now_ms)
        if isinstance(event, ev.BlobFetched):
            if s is ShardState.FETCHING and event.tag.startswith("input:"):
                return self._on_input(event)
            if s is ShardState.WAITING_MODEL and event.tag.startswith("model:"):
                return self._on_model(event)
            if s is ShardState.DELIVERING:
                return []
            raise illegal("ShardMachine", s, event)
        if isinstance(event, ev.JobFinished):
            if s is ShardState.RUNNING and event.job_id == self.job_id:
                return self._on_job(event)
            raise illegal("ShardMachine", s, event)
        raise illegal("ShardMachine", s, event)

    def _on_timer(self, name: str, now: int) -> list[act.Action]:
        if name == T_HEARTBEAT and self.state in ACTIVE:
            return self._heartbeat(now)
        if name == T_MODEL and self.state is ShardState.WAITING_MODEL:
            return self._fetch_model(now)
        if name.startswith("deliver:"):
            return self._retry_delivery(int(name.split(":", 1)[1]), now)
        raise LocalProtocolError(
            f"ShardMachine: timer {name!r} in state {self.state.name}", reason="illegal_event"
        )

    # -- start and bid -------------------------------------------------------------------------------
    def _start(self, now: int) -> list[act.Action]:
        if self._redeliver is not None:
            res = self._redeliver.message
            assert isinstance(res, Result)
            self.state = ShardState.DELIVERING
            self.outcome = ShardState.DONE if res.ok else ShardState.FAILED
            self.epoch, self.round = res.epoch, res.round
            return self._deliver(self._redeliver, res.round)
        if self.shard is not None:
            award = self.awards[max(self.awards)]
            return self._bind(now, award, self.shard)
        self.state = ShardState.BID_SENT
        return self._bid(now)

    def _bid(self, now: int) -> list[act.Action]:
        signed = self.sealer.seal(
            Bid,
            now_ms=now,
            ttl_ms=BID_TTL_MS,
            task_id=self.task_id,
            c0=max(self.c0, 1e-6),
            load=min(self.load, 1000.0),
        )
        return [act.Send(peer=self.submitter, protocol=act.PROTO_BID, signed=signed, tag="bid")]

    def _on_sent(self, event: ev.SendCompleted) -> list[act.Action]:
        if event.tag == "bid":
            if event.ok:
                return [act.Count(name="bids.sent")]
            return [act.Count(name="bids.failed" if event.reason == "transport" else "bids.refused")]
        if event.tag.startswith("result:"):
            return self._on_delivered(event, int(event.tag.split(":", 1)[1]))
        raise LocalProtocolError(f"ShardMachine: no send {event.tag!r} is pending", reason="illegal_event")

    # -- messages --------------------------------------------------------------------------------------
    def _on_message(self, event: ev.MessageVerified) -> list[act.Action]:
        m: Message = event.signed.message
        task_id = getattr(m, "task_id", None)
        if task_id != self.task_id:
            raise LocalProtocolError(
                f"ShardMachine {self.task_id}: {m.KIND} for task {task_id} misrouted", reason="illegal_event"
            )
        if isinstance(m, TaskAnnounce):
            if event.signed.signer != self.submitter:
                return [act.Drop(reason="task_id_collision")]
            if self.is_bidder and not self.cancelled and event.signed.digest != self.announce_signed.digest:
                return self._bid(event.now_ms)  # a re-announce asks for (spare) bids
            return []
        if isinstance(m, Award):
            return self._on_award(event, m)
        if isinstance(m, Cancel):
            if event.signed.signer != self.submitter:
                return [act.Drop(reason="forged_cancel")]
            return self._on_cancel(event.now_ms)
        return []  # leases, results and votes of others concern the submitter and the round

    def _on_award(self, event: ev.MessageVerified, award: Award) -> list[act.Action]:
        if award.epoch in self.awards:
            return []
        drop = award_drop(self.announce, self.submitter, self.awards, event, award)
        if drop is not None:
            return [drop]
        self.awards[award.epoch] = event.signed
        if self.cancelled:
            return []
        mine = sorted(int(a["shard"]) for a in award.assignments if a["peer_id"] == self.me)
        now = event.now_ms
        out: list[act.Action] = []
        if self.shard is None and mine and self.state is ShardState.BID_SENT:
            out += self._bind(now, event.signed, mine[0])
        elif self.shard is not None and self.shard not in mine and self.state in ACTIVE:
            if self.announce.aggregation == "none" and self.state is ShardState.RUNNING:
                # A backup holder took the shard (SPEC §7.6): our job runs on, and the first
                # valid result wins — ours still counts if it comes first.
                out.append(act.Count(name="shards.superseded"))
            else:
                out += self._lose(now)
        for shard in mine:
            if shard != self.shard:
                out.append(act.AdoptShard(task_id=self.task_id, shard=shard, award=event.signed))
        return out

    def _on_certificate(self, event: ev.RoundCertified) -> list[act.Action]:
        cert = event.certificate
        if cert.task_id != self.task_id:
            raise LocalProtocolError(
                f"ShardMachine {self.task_id}: certificate misrouted", reason="illegal_event"
            )
        held = self.certificates.get(cert.round)
        if held is None or not certificate_in_force(held, self._award_list()):
            # The first, or one that replaces a certificate a re-award moved (SPEC §11.1).
            self.certificates[cert.round] = cert
        if (
            self.state is ShardState.WAITING_MODEL
            and cert.round == self.round - 1
            and self._model_pass == 0  # not fetching yet (from an award's quote, or this round again)
        ):
            self._model_sources = self._voters(cert.signers)
            self._model_pass = 1
            return self._fetch_model(event.now_ms)
        return []

    # -- work ------------------------------------------------------------------------------------------
    def _bind(self, now: int, award_signed: Signed, shard: int) -> list[act.Action]:
        award = award_signed.message
        assert isinstance(award, Award)
        self.shard = shard
        self.epoch = award.epoch
        self.assignment = next(dict(a) for a in award.assignments if a["shard"] == shard)
        ann = self.announce
        out: list[act.Action] = [
            act.Persist(
                record=act.WorkerTaskRecord(
                    task_id=self.task_id,
                    submitter=self.submitter,
                    kind=ann.kind,
                    announce_raw=self.announce_signed.raw,
                    deadline_ms=ann.issued_at + ann.deadline_ms,
                    message=f"awarded shard {shard} (epoch {award.epoch})",
                )
            ),
            act.AdjustLoad(delta=1),
        ]
        refs = {**ann.inputs, **self.assignment["inputs"]}
        self._to_fetch = [(name, dict(ref)) for name, ref in sorted(refs.items())]
        self.state = ShardState.FETCHING
        out += self._next_input(now)
        if self.state in ACTIVE:
            # The first heartbeat goes out FIRST_HEARTBEAT_MS after the award (SPEC §7.6), then
            # every heartbeat_ms. A shard whose work ends sooner (a no-op task's job takes a few
            # ms) sends no heartbeat, and a plain one no lease at all: a gossip message costs
            # ~5 ms of CPU across 3 nodes here (docs/benchmarks.md).
            first = now + min(FIRST_HEARTBEAT_MS, self.times.heartbeat_ms)
            out = [*out[:2], self.timers.set(T_HEARTBEAT, first), *out[2:]]
        return out

    def _next_input(self, now: int) -> list[act.Action]:
        if not self._to_fetch:
            first = self._first_round() if self.announce.aggregation != "none" else 1
            return self._begin_round(now, first)
        name, ref = self._to_fetch[0]
        self.detail = f"fetching {name}"
        return [
            act.FetchBlob(digest=ref["sha256"], size=ref["size"], source=self.submitter, tag=f"input:{name}")
        ]

    def _on_input(self, event: ev.BlobFetched) -> list[act.Action]:
        name, ref = self._to_fetch[0]
        if event.tag != f"input:{name}":
            raise LocalProtocolError(f"ShardMachine: unexpected fetch {event.tag!r}", reason="illegal_event")
        if not event.ok:
            return self._end(
                event.now_ms, ShardState.FAILED, f"fetching {name} failed: {event.reason}: {event.error}"
            )
        self._to_fetch.pop(0)
        self.inputs[name] = ref
        return self._next_input(event.now_ms)

    def certified_rounds(self) -> int:
        r = 0
        while r + 1 in self.certificates:
            r += 1
        return r

    def _award_list(self) -> list[Award]:
        return [a.message for _, a in sorted(self.awards.items()) if isinstance(a.message, Award)]

    def _binding_award(self) -> Award | None:
        signed = self.awards.get(self.epoch)
        return signed.message if signed is not None and isinstance(signed.message, Award) else None

    def _first_round(self) -> int:
        """The round to start at (SPEC §11.1 "The award in force"): after the last round the
        binding award quotes as certified, and after every further round whose certificate
        we hold and which still holds under our awards."""
        awards = self._award_list()
        for r in sorted(self.certificates):
            if not certificate_in_force(self.certificates[r], awards):
                del self.certificates[r]  # formed under an award a re-award has replaced for it
        binding = self._binding_award()
        r = certified_round(binding) if binding is not None else 0
        while r + 1 in self.certificates:
            r += 1
        return r + 1

    def _start_model(self, round_no: int) -> tuple[dict[str, Any], list[str]] | None:
        """The certified output of ``round_no`` and who serves it: from its certificate, else
        from the binding award's quote (its signers; ourselves when we are the only one)."""
        cert = self.certificates.get(round_no)
        if cert is not None:
            return dict(cert.output), self._voters(cert.signers)
        binding = self._binding_award()
        quote = binding.certified if binding is not None else None
        if quote is not None and int(quote["round"]) == round_no:
            return dict(quote["output"]), self._voters(tuple(quote["signers"]))
        return None

    def _begin_round(self, now: int, round_no: int) -> list[act.Action]:
        if round_no > self.announce.rounds:
            return self._end(now, ShardState.DONE, "")
        self.round = round_no
        if self.announce.kind == "keras-train" and round_no > 1:
            self.state = ShardState.WAITING_MODEL
            self.detail = f"waiting for the certificate of round {round_no - 1}"
            self._model_sources, self._model_pass = [], 0
            start = self._start_model(round_no - 1)
            if start is None:
                return []
            self._model_sources = start[1]
            self._model_pass = 1
            return self._fetch_model(now)
        return self._run(now, None)

    def _voters(self, signers: Sequence[str]) -> list[str]:
        """Where to fetch a certified model: the other voters; our own store when we are the
        only one (a one-shard task's committee is its holder, SPEC §11.1: the daemon's
        ``Node.fetch_from_any`` returns the local copy), so its next round still starts."""
        others = [p for p in signers if p != self.me]
        return others or [p for p in signers if p == self.me]

    def _fetch_model(self, now: int) -> list[act.Action]:
        start = self._start_model(self.round - 1)
        assert start is not None
        out, voters = start
        if not self._model_sources:
            if self._model_pass >= MODEL_FETCH_PASSES or not voters:
                return self._end(
                    now, ShardState.FAILED, f"could not fetch {out['sha256'][:12]} from any voter"
                )
            self._model_pass += 1
            self._model_sources = voters
            return [self.timers.set(T_MODEL, now + MODEL_FETCH_PAUSE_MS)]
        src = self._model_sources.pop(0)
        return [
            act.FetchBlob(digest=out["sha256"], size=out["size"], source=src, tag=f"model:{self.round - 1}")
        ]

    def _on_model(self, event: ev.BlobFetched) -> list[act.Action]:
        if event.tag != f"model:{self.round - 1}":
            raise LocalProtocolError(f"ShardMachine: unexpected fetch {event.tag!r}", reason="illegal_event")
        if not event.ok:
            return self._fetch_model(event.now_ms)
        start = self._start_model(self.round - 1)
        assert start is not None
        return self._run(event.now_ms, start[0])

    def _run(self, now: int, weights: dict[str, Any] | None) -> list[act.Action]:
        self.state = ShardState.RUNNING
        self.detail = f"running round {self.round}"
        self.job_id = f"{self.task_id}-{self.shard}-{self.round}"
        inputs: dict[str, Mapping[str, Any]] = dict(self.inputs)
        if weights is not None:
            inputs["weights"] = {"sha256": weights["sha256"], "size": weights["size"]}
        assert self.shard is not None
        return [
            act.Count(name="jobs.started"),
            act.StartJob(
                job_id=self.job_id,
                task_id=self.task_id,
                kind=self.announce.kind,
                shard=self.shard,
                round=self.round,
                epoch=self.epoch,
                submitter=self.submitter,
                params=dict(self.announce.params),
                inputs=inputs,
            ),
        ]

    def _on_job(self, event: ev.JobFinished) -> list[act.Action]:
        now = event.now_ms
        self.job_id = None
        out: list[act.Action] = [act.Count(name="jobs.ok" if event.ok else f"jobs.failed.{event.error}")]
        outputs = {name[:64]: dict(ref) for name, ref in sorted(event.outputs.items())}
        metrics = {k[:64]: float(v) for k, v in event.metrics.items() if math.isfinite(float(v))}
        weight = float(event.metrics.get("num_samples", 1.0)) if event.ok else 0.0
        assert self.shard is not None
        signed = self.sealer.seal(
            Result,
            now_ms=now,
            ttl_ms=Result.MAX_TTL_MS,
            task_id=self.task_id,
            epoch=self.epoch,
            shard=self.shard,
            round=self.round,
            ok=event.ok,
            error=None if event.ok else f"{event.error}: {event.detail}"[:512],
            outputs=outputs,
            weight=weight,
            metrics=metrics,
        )
        # Durable before anyone is told: a restart re-delivers it.
        out.append(
            act.Persist(
                record=act.WorkRecord(
                    task_id=self.task_id,
                    shard=self.shard,
                    round=self.round,
                    epoch=self.epoch,
                    state="done" if event.ok else "failed",
                    raw=signed.raw,
                )
            )
        )
        plain = self.announce.aggregation == "none"
        # An aggregated task's commit goes on gossip for its committee (SPEC §11); a plain
        # task's result goes to its submitter only (SPEC §7.7): nobody else acts on it, and
        # replicas of a compared task cannot see each other's hashes before they commit.
        out.append(act.KeepOwnResult(signed=signed) if plain else act.Publish(signed=signed))
        out += self._deliver(signed, self.round)
        if not event.ok:
            return out + self._end(
                now, ShardState.FAILED, f"{event.error}: {event.detail}"[:512], final_lease=not plain
            )
        if plain and self.round >= self.announce.rounds:
            # The result just sent says "done" to the only peer that supervises this holder
            # (SPEC §7.6): no final lease beside it, one gossip message less per task.
            return out + self._end(now, ShardState.DONE, "", final_lease=False)
        return out + self._begin_round(now, self.round + 1)

    def _heartbeat(self, now: int) -> list[act.Action]:
        return [
            self._lease(now, "running", self.detail),
            self.timers.set(T_HEARTBEAT, now + self.times.heartbeat_ms),
        ]

    def _lease(
        self, now: int, state: str, detail: str, round_no: int | None = None, epoch: int | None = None
    ) -> act.Publish:
        assert self.shard is not None
        signed = self.sealer.seal(
            Lease,
            now_ms=now,
            ttl_ms=self.times.lease_ttl_ms,
            task_id=self.task_id,
            epoch=self.epoch if epoch is None else epoch,
            shard=self.shard,
            round=self.round if round_no is None else round_no,
            state=state,
            detail=detail[:512],
        )
        return act.Publish(signed=signed)

    def _end(
        self, now: int, outcome: ShardState, detail: str, *, final_lease: bool = True
    ) -> list[act.Action]:
        """The shard's work is over: the final lease (unless the plain task's result that
        ends it stands in for one, SPEC §7.6), the freed slot, then delivery."""
        self.detail = detail
        self.outcome = outcome
        out = self.timers.cancel(T_HEARTBEAT) + self.timers.cancel(T_MODEL)
        lease_state = {ShardState.DONE: "done", ShardState.FAILED: "failed"}.get(outcome, "released")
        if final_lease:
            out.append(self._lease(now, lease_state, detail))
        out.append(act.AdjustLoad(delta=-1))
        if outcome in (ShardState.RELEASED, ShardState.LOST):
            out.append(act.Count(name="shards.cancelled"))
        settles = outcome in (ShardState.DONE, ShardState.FAILED)
        self.state = ShardState.DELIVERING if self.deliveries and settles else outcome
        return out

    def _lose(self, now: int) -> list[act.Action]:
        out: list[act.Action] = [act.CancelJob(job_id=self.job_id)] if self.job_id else []
        self.job_id = None
        return out + self._end(now, ShardState.LOST, "")

    def _on_cancel(self, now: int) -> list[act.Action]:
        self.cancelled = True
        out: list[act.Action] = []
        for r in sorted(self.deliveries):
            out += self.timers.cancel(_t_deliver(r))
        self.deliveries.clear()
        if self.state in ACTIVE:
            if self.job_id:
                out.append(act.CancelJob(job_id=self.job_id))
                self.job_id = None
            return out + self._end(now, ShardState.RELEASED, "")
        if self.state is ShardState.BID_SENT:
            self.state = ShardState.RELEASED
        elif self.state is ShardState.DELIVERING:
            self.state = self.outcome
        return out

    # -- delivery ------------------------------------------------------------------------------------
    def _deliver(self, signed: Signed, round_no: int) -> list[act.Action]:
        d = self.deliveries.get(round_no)
        if d is None or d.signed.message.seq < signed.message.seq:
            d = self.deliveries[round_no] = _Delivery(signed)
        d.tries += 1
        return [
            act.Send(
                peer=self.submitter, protocol=act.PROTO_RESULT, signed=d.signed, tag=f"result:{round_no}"
            )
        ]

    def _on_delivered(self, event: ev.SendCompleted, round_no: int) -> list[act.Action]:
        d = self.deliveries.get(round_no)
        if d is None:
            return []  # given up meanwhile (a cancel)
        now = event.now_ms
        if event.ok or event.reason == "unknown task":
            del self.deliveries[round_no]
            return ([act.Count(name="results.delivered")] if event.ok else []) + self._maybe_settle()
        deadline = self.announce.issued_at + self.announce.deadline_ms
        if self.cancelled or deadline < now or d.tries >= MAX_DELIVERY_TRIES:
            # The submitter has given the task up by now.
            del self.deliveries[round_no]
            return [act.Count(name="results.undelivered"), *self._maybe_settle()]
        at = now + d.delay_ms
        ceiling = max(500, min(10_000, self.times.lease_ttl_ms // 2))
        d.delay_ms = min(d.delay_ms * 2, ceiling)
        return [self.timers.set(_t_deliver(round_no), at)]

    def _retry_delivery(self, round_no: int, now: int) -> list[act.Action]:
        d = self.deliveries[round_no]
        out: list[act.Action] = []
        res = d.signed.message
        assert isinstance(res, Result)
        if self.state not in ACTIVE:
            # A submitter that restarted knows nothing of our last heartbeats: re-publish the
            # final lease, or it presumes the finished holder lost and re-awards the shard.
            out.append(
                self._lease(
                    now,
                    "done" if res.ok else "failed",
                    "result not acknowledged yet",
                    round_no=res.round,
                    epoch=res.epoch,
                )
            )
        return out + self._deliver(d.signed, round_no)

    def _maybe_settle(self) -> list[act.Action]:
        if self.state is ShardState.DELIVERING and not self.deliveries:
            self.state = self.outcome
        return []


__all__ = ["ACTIVE", "TERMINAL", "ShardMachine", "ShardState"]
