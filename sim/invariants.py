"""The invariants of issue 7, checked after every event.

Each check runs on what an event produced (an award published, a job started, a vote
cast, a task ended), at the moment it is produced, so "after every event" costs no scan of
the whole world. Every check calls the protocol's own code:

1. **A task ends only with every shard's result or a stated reason.** A task that ends
   ``done`` has, for every shard of its latest award, a result from that shard's holder
   (plain tasks) or a certificate for every round (aggregated tasks); any other ending
   names its reason. At the end of the run every task has ended.
2. **At most one certified aggregate per (task, round), and every certificate verifies**
   with ``protocol.certificate.check_certificate`` — the function ``peerctl verify`` uses
   (peerd/verify.py) — given the task's awards and rule. The simulator watches every vote
   cast: whenever the votes of one ballot reach a quorum, the ballot must verify against
   the task's awards — all of them, or the awards up to some epoch (its voters may not
   have had the later ones yet: a partition) — else it is a violation. A ballot that
   verifies against all the awards is certified; two certified ballots for one round are
   a violation, checked whenever a ballot reaches a quorum and whenever an award is
   published (SPEC §11.1 "The award in force": a re-award that does not quote a round as
   certified moves it to its holders, so a ballot formed under the earlier award, unseen by
   the submitter, is then *superseded*, counted, and no longer certified).
3. **No node executes a shard it was not awarded, and no award differs from its
   recomputation from the signed bids**: every award published passes
   ``protocol.awards.check_signed_award`` against the announce and the previous epoch,
   and every job started is for a (shard, epoch) some award of the task gives to that node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.awards import check_signed_award
from protocol.certificate import check_certificate
from protocol.committee import quorum
from protocol.envelope import Signed
from protocol.errors import ProtocolError
from protocol.messages import Award, Result, Vote
from sim.engine import Violation


@dataclass
class TaskRecord:
    task_id: str
    submitter: str
    announce: Signed
    submitted_at: float
    awards: dict[int, Award] = field(default_factory=dict)
    award_raw: dict[int, bytes] = field(default_factory=dict)
    first_award_at: float | None = None
    results: dict[tuple[int, int], dict[str, Result]] = field(
        default_factory=dict
    )  # (round, shard) -> signer
    votes: dict[int, dict[tuple[Any, ...], dict[str, bytes]]] = field(default_factory=dict)
    # round -> the ballots that reached a quorum (each verified against some awards)
    quorate: dict[int, list[tuple[Any, ...]]] = field(default_factory=dict)
    certified: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # round -> ballot
    ended: tuple[float, str, str] | None = None  # (time, state, reason)
    executed: list[tuple[str, int, int]] = field(default_factory=list)


class Invariants:
    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self.tasks: dict[str, TaskRecord] = {}
        self.checked = {
            "awards": 0,
            "jobs": 0,
            "votes": 0,
            "certificates": 0,
            "endings": 0,
            "superseded": 0,
            "out_of_force": 0,
        }
        self.extra: list[Callable[[str, Signed], None]] = []

    def fail(self, what: str) -> None:
        raise Violation(what)

    # -- tasks ---------------------------------------------------------------------------
    def announced(self, announce: Signed) -> None:
        tid = announce.message.task_id  # type: ignore[attr-defined]
        if tid not in self.tasks:
            self.tasks[tid] = TaskRecord(tid, announce.signer, announce, self._now())

    def published(self, signed: Signed) -> None:
        """Every task message any simulated peer publishes or sends passes through here."""
        kind = signed.kind
        if kind == "award":
            self._award(signed)
        elif kind == "result":
            self._result(signed)
        elif kind == "vote":
            self._vote(signed)
        for hook in self.extra:
            hook(kind, signed)

    def _award(self, signed: Signed) -> None:
        aw = signed.message
        assert isinstance(aw, Award)
        rec = self.tasks.get(aw.task_id)
        if rec is None:
            self.fail(f"award for unannounced task {aw.task_id}")
            return
        if aw.epoch in rec.awards:
            if rec.award_raw[aw.epoch] != signed.raw:
                self.fail(f"task {aw.task_id}: two different awards for epoch {aw.epoch}")
            return
        previous = rec.awards.get(aw.epoch - 1)
        try:
            check_signed_award(rec.announce, signed, previous)
        except ProtocolError as exc:
            self.fail(
                f"task {aw.task_id}: award epoch {aw.epoch} differs from its recomputation from the "
                f"signed bids ({exc.reason}: {exc})"
            )
        self.checked["awards"] += 1
        rec.awards[aw.epoch] = aw
        rec.award_raw[aw.epoch] = signed.raw
        if rec.first_award_at is None:
            rec.first_award_at = self._now()
        for rnd in sorted(rec.quorate):
            self._recount(rec, rnd)  # a re-award may move a round to its holders

    def _result(self, signed: Signed) -> None:
        res = signed.message
        assert isinstance(res, Result)
        rec = self.tasks.get(res.task_id)
        if rec is None:
            return
        cur = rec.results.setdefault((res.round, res.shard), {}).get(signed.signer)
        if cur is None or res.seq > cur.seq:
            rec.results[(res.round, res.shard)][signed.signer] = res

    def _vote(self, signed: Signed) -> None:
        vote = signed.message
        assert isinstance(vote, Vote)
        rec = self.tasks.get(vote.task_id)
        if rec is None:
            return
        self.checked["votes"] += 1
        ballot = vote.ballot()
        by_ballot = rec.votes.setdefault(vote.round, {})
        signers = by_ballot.setdefault(ballot, {})
        signers[signed.signer] = signed.raw
        if len(signers) < quorum(len(vote.committee)):
            return
        quorate = rec.quorate.setdefault(vote.round, [])
        if ballot in quorate:
            return
        # The ballot just reached a quorum: it must verify as peerctl verify checks it, against
        # every award or against the awards its voters may have had (those up to some epoch).
        if not self._verify_formed(rec, vote.round, list(signers.values())):
            # Formed under an award a later one replaced for this round (its voters had not
            # seen that one yet): not a certificate (SPEC §11.1 "The award in force").
            self.checked["out_of_force"] += 1
        quorate.append(ballot)
        self._recount(rec, vote.round)

    def _verify_formed(self, rec: TaskRecord, round_no: int, raw_votes: list[bytes]) -> bool:
        """Whether the ballot verifies against every award; if not, it must verify against the
        awards up to some epoch, else it is a violation."""
        epochs = sorted(rec.awards)
        for upto in reversed(epochs):
            if self._verifies(rec, round_no, raw_votes, [rec.awards[e] for e in epochs if e <= upto]):
                return upto == epochs[-1]
        self.certificate(rec.task_id, round_no, raw_votes, who="the votes cast")  # fails, with why
        return False

    def _verifies(self, rec: TaskRecord, round_no: int, raw_votes: list[bytes], awards: list[Award]) -> bool:
        self.checked["certificates"] += 1
        try:
            check_certificate(
                raw_votes,
                task_id=rec.task_id,
                round_no=round_no,
                awards=awards,
                rule=rec.announce.message.aggregation,  # type: ignore[attr-defined]
            )
        except ProtocolError:
            return False
        return True

    def _recount(self, rec: TaskRecord, round_no: int) -> None:
        """At most one ballot of ``round_no`` that reached a quorum verifies against all the
        task's awards: that one is the round's certified aggregate."""
        awards = [rec.awards[e] for e in sorted(rec.awards)]
        live = [
            b
            for b in rec.quorate.get(round_no, [])
            if self._verifies(rec, round_no, list(rec.votes[round_no][b].values()), awards)
        ]
        if len(live) > 1:
            self.fail(
                f"task {rec.task_id} round {round_no}: a second certified aggregate "
                f"(output {live[1][-1][:12]}, first {live[0][-1][:12]})"
            )
        prior = rec.certified.get(round_no)
        if prior is not None and prior not in live:
            self.checked["superseded"] += 1
            del rec.certified[round_no]
        if live:
            rec.certified[round_no] = live[0]

    def peer_certificate(
        self, task_id: str, round_no: int, raw_votes: list[bytes], awards: list[Award], *, who: str
    ) -> None:
        """A peer acts on a certificate: it verifies against the awards that peer holds."""
        rec = self.tasks[task_id]
        if not self._verifies(rec, round_no, raw_votes, awards):
            self.certificate(task_id, round_no, raw_votes, who=who, awards=awards)

    def certificate(
        self,
        task_id: str,
        round_no: int,
        raw_votes: list[bytes],
        *,
        who: str,
        awards: list[Award] | None = None,
    ) -> Any:
        """Check a certificate with protocol.certificate.check_certificate (against every
        award of the task unless ``awards`` is given); violation if it fails."""
        rec = self.tasks[task_id]
        self.checked["certificates"] += 1
        try:
            return check_certificate(
                raw_votes,
                task_id=task_id,
                round_no=round_no,
                awards=[rec.awards[e] for e in sorted(rec.awards)] if awards is None else awards,
                rule=rec.announce.message.aggregation,  # type: ignore[attr-defined]
            )
        except ProtocolError as exc:
            self.fail(
                f"task {task_id} round {round_no}: certificate from {who} does not verify "
                f"({exc.reason}: {exc})"
            )
            raise  # unreachable: fail() raises

    # -- execution -----------------------------------------------------------------------
    def job_started(self, peer_id: str, task_id: str, shard: int, epoch: int | None) -> None:
        rec = self.tasks.get(task_id)
        self.checked["jobs"] += 1
        if rec is None:
            self.fail(f"{peer_id[-8:]} runs a shard of unknown task {task_id}")
            return
        epochs = [epoch] if epoch is not None else sorted(rec.awards)
        for e in epochs:
            aw = rec.awards.get(e)
            if aw is not None and any(
                a["shard"] == shard and a["peer_id"] == peer_id for a in aw.assignments
            ):
                rec.executed.append((peer_id, shard, e))
                return
        self.fail(
            f"{peer_id[-8:]} executes shard {shard} of task {task_id} (epoch {epoch}) which no award gives it"
        )

    # -- endings -------------------------------------------------------------------------
    def task_ended(self, task_id: str, state: str, reason: str | None) -> None:
        rec = self.tasks.get(task_id)
        if rec is None:
            self.fail(f"unknown task {task_id} ended")
            return
        if rec.ended is not None:
            if rec.ended[1] != state:
                self.fail(f"task {task_id} ended twice: {rec.ended[1]}, then {state}")
            return
        self.checked["endings"] += 1
        rec.ended = (self._now(), state, reason or "")
        if state != "done":
            if not reason:
                self.fail(f"task {task_id} ended {state} without a stated reason")
            return
        if not rec.awards:
            self.fail(f"task {task_id} done without an award")
            return
        latest = rec.awards[max(rec.awards)]
        ann = rec.announce.message
        if ann.aggregation == "none":  # type: ignore[attr-defined]
            for a in latest.assignments:
                # A result counts when its signer held the shard at the result's epoch.
                got = [
                    r
                    for (_rnd, shard), by in rec.results.items()
                    if shard == a["shard"]
                    for signer, r in by.items()
                    if r.ok and self._holder(rec, shard, r.epoch) == signer
                ]
                if not got:
                    self.fail(f"task {task_id} done without a result for shard {a['shard']}")
        else:
            for rnd in range(1, ann.rounds + 1):  # type: ignore[attr-defined]
                if rnd not in rec.certified:
                    self.fail(f"task {task_id} done without a certificate for round {rnd}")

    @staticmethod
    def _holder(rec: TaskRecord, shard: int, epoch: int) -> str | None:
        epochs = [e for e in rec.awards if e <= epoch]
        if not epochs:
            return None
        aw = rec.awards[max(epochs)]
        return next((str(a["peer_id"]) for a in aw.assignments if a["shard"] == shard), None)

    def at_end(self, grace: float, submitter_up: Callable[[str], bool] = lambda _: True) -> None:
        """Every task has ended (its deadline passed ``grace`` seconds ago at the latest),
        unless its submitter is down for good: nobody is left to end it."""
        for rec in self.tasks.values():
            if rec.ended is None and submitter_up(rec.submitter):
                ann = rec.announce.message
                deadline = rec.submitted_at + ann.deadline_ms / 1000  # type: ignore[attr-defined]
                self.fail(
                    f"task {rec.task_id} never ended (deadline at {deadline:.1f} s, run ended at "
                    f"{self._now():.1f} s, grace {grace:g} s)"
                )
