"""RoundMachine: one signed aggregation round of one task (SPEC §11, ``peerd/rounds.py``).

Every daemon that follows the task runs one per (task, round): it keeps the round's commits
and tallies the votes (``certificate.tally``, the real code), so every peer learns the
certificate. A member of the round's committee (``committee.committee`` over the holders of
the latest award, SPEC §11.1) also serves the duty, as ``Rounds._serve_round`` does today:

1. the duty starts with the first commit of the round it sees;
2. it waits until every holder has committed, or every holder still missing is lost (no
   lease for ``lease_ttl_ms``, and not before a lease TTL into the duty), or the round times
   out (``params.round_timeout_s``, default 600 s after the round's first commit);
3. it fetches each committed output (from its committer, else from a voter whose vote names
   the same hash; a committer that reveals other bytes than it committed is not asked
   twice), leaves out what failed or does not fit (SPEC §11.3 "Checks"), aggregates with the
   real rule (``aggregation.aggregate`` in ``input_key`` order), stores the output, signs
   and publishes a vote;
4. it votes again (``attempt`` + 1, at most 3) whenever what it voted on changed — a late or
   superseding commit, a re-award, an input it could not fetch now named by another voter;
5. it gives up after ``round_timeout + 4 · lease_ttl + 60 s`` (counted ``rounds.uncertified``).

**Which commit counts** (SPEC §11): per shard, the current holder's commit with the highest
``seq``; a commit of an earlier holder never displaces the current holder's. A certificate,
once formed, is final: a commit that arrives after it changes nothing.

Test-only: ``planted_bug="second_commit"`` breaks exactly that last rule — a holder's
second commit after the certificate reopens the round, members vote again and a second
``Certified`` is emitted for the same (task, round). It exists so the simulator's seed
sweep can show that it catches such a bug (issue 7 "Done when"); nothing in the daemon
may pass it.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol.aggregation import aggregate
from protocol.certificate import (
    COMMITTEE_SIZE,
    Certificate,
    award_in_force,
    certificate_in_force,
    input_key,
    tally,
    vote_is_well_formed,
)
from protocol.committee import committee
from protocol.envelope import Signed
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, Sealer, Timers, award_drop, illegal
from protocol.messages import Award, Cancel, Lease, Message, Result, TaskAnnounce, Vote
from protocol.tensors import decode_arrays, encode_arrays

#: Default per-round wait once the first commit of the round is seen (SPEC §11 step 2).
DEFAULT_ROUND_TIMEOUT_MS = 600_000
MAX_ATTEMPTS = 3
#: Test-only bugs a RoundMachine can be built with (see the module docstring).
PLANTED_BUGS = frozenset({"second_commit"})

T_TICK = "tick"

_Input = tuple[str, int, str, float, list[np.ndarray]]  # peer, shard, sha256, weight, arrays


class RoundState(enum.Enum):
    COLLECTING = "collecting"  # commits arriving; a member waits for them (or has not voted yet)
    FETCHING = "fetching"  # a member fetches the committed outputs for its vote
    VOTED = "voted"  # a member has voted; waiting for the certificate or a change of view
    CERTIFIED = "certified"  # final
    CANCELLED = "cancelled"  # the submitter cancelled the task


TERMINAL = frozenset({RoundState.CERTIFIED, RoundState.CANCELLED})


class RoundMachine:
    """Round ``round_no`` of the task of ``announce`` on this daemon.

    ``awards``: the task's awards known so far (each checked); later ones arrive as
    messages. ``record_votes``: persist every vote (the submitter keeps them for its result
    bundle); our own votes are always persisted. No Start event: the machine is live once
    built (the driver builds it with the round's first message).
    """

    def __init__(
        self,
        announce: Signed,
        round_no: int,
        *,
        sealer: Sealer,
        times: MarketTimes,
        awards: Sequence[Signed] = (),
        record_votes: bool = False,
        planted_bug: str | None = None,
    ) -> None:
        if not isinstance(announce.message, TaskAnnounce):
            raise LocalProtocolError("RoundMachine needs a signed announce", reason="illegal_event")
        if announce.message.aggregation == "none":
            raise LocalProtocolError(
                "RoundMachine: the task has no aggregation round", reason="illegal_event"
            )
        if planted_bug is not None and planted_bug not in PLANTED_BUGS:
            raise LocalProtocolError(
                f"RoundMachine: unknown planted bug {planted_bug!r}", reason="illegal_event"
            )
        self.announce: TaskAnnounce = announce.message
        self.task_id = self.announce.task_id
        self.submitter = announce.signer
        self.round = round_no
        self.me = sealer.peer_id
        self.sealer = sealer
        self.times = times
        self.record_votes = record_votes
        self.planted_bug = planted_bug
        self.state = RoundState.COLLECTING
        self.timers = Timers()
        self.awards: dict[int, Signed] = {}
        for a in awards:
            assert isinstance(a.message, Award)
            self.awards[a.message.epoch] = a
        self.heartbeats: dict[str, int] = {}
        self.lost_now: set[str] = set()
        self.commits: dict[int, Signed] = {}
        self.first_result_at: int | None = None
        self.votes: dict[tuple[str, int], Signed] = {}
        self.certificate: Certificate | None = None
        self.certified_count = 0
        # the member's duty
        self.duty_started: int | None = None
        self.duty_over = False
        self.attempt = 0
        self.last_key: tuple[Any, ...] | None = None
        self.fetch_failed: set[tuple[str, int, str]] = set()
        self._queue: list[tuple[int, str, Result, list[str]]] = []
        self._inputs: list[_Input] = []
        self._excluded: dict[str, str] = {}
        params = self.announce.params
        self.round_timeout_ms = int(
            float(params.get("round_timeout_s", DEFAULT_ROUND_TIMEOUT_MS / 1000)) * 1000
        )

    # -- views -----------------------------------------------------------------------------------------
    def award_list(self) -> list[Award]:
        return [a.message for _, a in sorted(self.awards.items()) if isinstance(a.message, Award)]

    def holders(self) -> dict[int, str]:
        """shard → holder, per the award in force for this round (SPEC §11.1): the latest
        award, unless a later one quotes this round as certified already."""
        msg = award_in_force(self.award_list(), self.round)
        if msg is None:
            return {}
        return {int(a["shard"]): str(a["peer_id"]) for a in msg.assignments}

    def holder_at(self, shard: int, epoch: int | None = None) -> str | None:
        epochs = [e for e in self.awards if epoch is None or e <= epoch]
        if not epochs:
            return None
        msg = self.awards[max(epochs)].message
        assert isinstance(msg, Award)
        return next((str(a["peer_id"]) for a in msg.assignments if a["shard"] == shard), None)

    def members(self) -> tuple[str, ...]:
        participants = sorted(set(self.holders().values()))
        if not participants:
            return ()
        return tuple(sorted(committee(self.task_id, self.round, participants, COMMITTEE_SIZE)))

    def commit_of(self, shard: int, holder: str) -> Signed | None:
        sv = self.commits.get(shard)
        return sv if sv is not None and sv.signer == holder else None

    def missing(self) -> list[str]:
        return sorted({p for s, p in self.holders().items() if self.commit_of(s, p) is None})

    def is_lost(self, peer: str, now: int) -> bool:
        last = self.heartbeats.get(peer)
        return peer in self.lost_now or last is None or now - last > self.times.lease_ttl_ms

    # -- the one dispatch method -----------------------------------------------------------------------
    def handle(self, event: ev.Event) -> list[act.Action]:
        s = self.state
        if isinstance(event, ev.MessageVerified):
            return self._on_message(event)
        if isinstance(
            event, ev.Start | ev.CancelRequested | ev.InputsSplit | ev.JobFinished | ev.SendCompleted
        ):
            raise illegal("RoundMachine", s, event)
        if isinstance(event, ev.RoundCertified | ev.PeersKnown):
            return []
        if isinstance(event, ev.PeerLost):
            self.lost_now.add(event.peer)
            return self._advance(event.now_ms)
        if isinstance(event, ev.TimerFired):
            self.timers.fire("RoundMachine", event.name)
            if event.name != T_TICK or s in TERMINAL:
                raise illegal("RoundMachine", s, event)
            return self._advance(event.now_ms)
        if isinstance(event, ev.BlobFetched):
            if s is RoundState.FETCHING:
                return self._on_blob(event)
            if s in TERMINAL:
                return []  # a fetch the certificate (or a cancel) made moot
            raise illegal("RoundMachine", s, event)
        raise illegal("RoundMachine", s, event)

    # -- messages --------------------------------------------------------------------------------------
    def _on_message(self, event: ev.MessageVerified) -> list[act.Action]:
        m: Message = event.signed.message
        task_id = getattr(m, "task_id", None)
        rnd = getattr(m, "round", self.round)
        if task_id != self.task_id or (isinstance(m, Result | Vote) and rnd != self.round):
            raise LocalProtocolError(
                f"RoundMachine {self.task_id}/{self.round}: {m.KIND} for {task_id}/{rnd} misrouted",
                reason="illegal_event",
            )
        now = event.now_ms
        if isinstance(m, Award):
            return self._on_award(event, m)
        if isinstance(m, Lease):
            if self.holder_at(m.shard, m.epoch) != event.signed.signer:
                return [act.Drop(reason="not_holder")]
            self.heartbeats[event.signed.signer] = now
            self.lost_now.discard(event.signed.signer)
            return []
        if isinstance(m, Result):
            return self._on_result(event.signed, m, now)
        if isinstance(m, Vote):
            return self._on_vote(event.signed, m, now)
        if isinstance(m, Cancel):
            if event.signed.signer != self.submitter:
                return [act.Drop(reason="forged_cancel")]
            if self.state in TERMINAL:
                return []
            self.state = RoundState.CANCELLED
            return self.timers.cancel_all()
        return []

    def _on_award(self, event: ev.MessageVerified, award: Award) -> list[act.Action]:
        if award.epoch in self.awards:
            return []
        drop = award_drop(self.announce, self.submitter, self.awards, event, award)
        if drop is not None:
            return [drop]
        self.awards[award.epoch] = event.signed
        if self.state is RoundState.CERTIFIED and self.certificate is not None:
            if not certificate_in_force(self.certificate, self.award_list()):
                return self._reopen(event.now_ms)
        return self._advance(event.now_ms)  # a re-award can change the committee and the inputs

    def _reopen(self, now: int) -> list[act.Action]:
        """A re-award that does not quote this round as certified moves the round to its
        holders (SPEC §11.1 "The award in force"): the certificate we formed under an earlier
        award no longer holds — its votes never reached the submitter before it re-awarded.
        Forget it and serve the round again under the new committee, so the round can still
        be certified (a continuing holder's commit still counts)."""
        self.certificate = None
        self.state = RoundState.VOTED if self.attempt else RoundState.COLLECTING
        awards = self.award_list()
        keep: dict[tuple[str, int], Signed] = {}
        for k, v in self.votes.items():
            try:
                vote_is_well_formed(v, awards=awards, rule=self.announce.aggregation)
            except RemoteProtocolError:
                continue
            keep[k] = v
        self.votes = keep
        self.attempt, self.last_key, self.duty_over = 0, None, False
        # The round starts again under the new award: its holders get a full round to commit
        # (the deadline counted from the first commit would have passed long ago).
        self.first_result_at = now if self.commits else None
        self.duty_started = now if self.commits and self.me in self.members() else None
        out: list[act.Action] = [act.Count(name="rounds.superseded")]
        again = tally(list(self.votes.values()), awards=awards, rule=self.announce.aggregation)
        if again is not None:
            return out + self._certify(again)
        return out + self._advance(now)

    def _on_result(self, signed: Signed, m: Result, now: int) -> list[act.Action]:
        if self.holder_at(m.shard, m.epoch) != signed.signer:
            return [act.Drop(reason="not_holder")]
        if self.state is RoundState.CANCELLED:
            return []
        if self.state is RoundState.CERTIFIED:
            if self.planted_bug != "second_commit" or not self._supersedes(signed, m):
                return []  # a certificate is final (SPEC §11 "which commit counts")
            # PLANTED BUG (test-only): reopen the certified round for the second commit.
            self.commits[m.shard] = signed
            self.state = RoundState.VOTED if self.attempt else RoundState.COLLECTING
            old = self.certificate
            self.certificate = None
            # Forget the votes of the certified ballot, keep any newer ones.
            stale = _ballot_of(old) if old is not None else None
            self.votes = {
                k: v
                for k, v in self.votes.items()
                if not (isinstance(v.message, Vote) and v.message.ballot() == stale)
            }
            again = tally(list(self.votes.values()))
            if again is not None:
                return self._certify(again)
            return self._advance(now)
        if not self._supersedes(signed, m):
            return []
        self.commits[m.shard] = signed
        if self.first_result_at is None:
            self.first_result_at = now
        out: list[act.Action] = []
        if self.duty_started is None and self.me in self.members():
            self.duty_started = now
        return out + self._advance(now)

    def _supersedes(self, signed: Signed, m: Result) -> bool:
        """Whether ``signed`` becomes the shard's commit (SPEC §11 "which commit counts")."""
        cur = self.commits.get(m.shard)
        if cur is None:
            return True
        if cur.signer != signed.signer:
            # Two holders committed one shard (re-awarded mid-round): the current holder wins.
            return self.holder_at(m.shard) == signed.signer
        return m.seq > cur.message.seq

    def _on_vote(self, signed: Signed, m: Vote, now: int) -> list[act.Action]:
        awards = [a.message for a in self.awards.values() if isinstance(a.message, Award)]
        try:
            vote_is_well_formed(signed, awards=awards, rule=self.announce.aggregation)
        except RemoteProtocolError as exc:
            return [act.Drop(reason=exc.reason, detail=str(exc))]
        if self.state is RoundState.CANCELLED:
            return []
        out: list[act.Action] = []
        if self.record_votes and signed.signer != self.me:
            out.append(
                act.Persist(
                    record=act.VoteRecord(
                        task_id=self.task_id,
                        round=self.round,
                        peer=signed.signer,
                        attempt=m.attempt,
                        raw=signed.raw,
                    )
                )
            )
        out += self._record_vote(signed, m, now)
        if self.state not in TERMINAL:
            out += self._advance(now)  # another voter may name an input we could not fetch
        return out

    def _record_vote(self, signed: Signed, m: Vote, now: int) -> list[act.Action]:
        self.votes[(signed.signer, m.attempt)] = signed
        if self.state is RoundState.CERTIFIED:
            return []
        # With the awards: a vote admitted before a re-award moved the round may no longer count.
        cert = tally(list(self.votes.values()), awards=self.award_list(), rule=self.announce.aggregation)
        if cert is None:
            return []
        return self._certify(cert)

    def _certify(self, cert: Certificate) -> list[act.Action]:
        self.state = RoundState.CERTIFIED
        self.certificate = cert
        self.certified_count += 1
        self._queue.clear()
        return [
            *self.timers.cancel_all(),
            act.Persist(
                record=act.CertificateRecord(
                    task_id=self.task_id,
                    round=self.round,
                    output={**cert.output, "signers": list(cert.signers)},
                    votes=cert.votes,
                )
            ),
            act.Count(name="rounds.certified"),
            act.Certified(certificate=cert),
        ]

    # -- the member's duty -----------------------------------------------------------------------------
    def _give_up_at(self) -> int:
        assert self.duty_started is not None
        return self.duty_started + self.round_timeout_ms + 4 * self.times.lease_ttl_ms + 60_000

    def _ready(self, now: int) -> tuple[bool, int]:
        """Whether the member may vote now (``_wait_for_commits``), else when to look again."""
        assert self.duty_started is not None
        deadline = (self.first_result_at or self.duty_started) + self.round_timeout_ms
        grace_until = self.duty_started + self.times.lease_ttl_ms
        if now >= deadline:
            return True, 0
        missing = self.missing()
        if not missing:
            return True, 0
        if now > grace_until and all(self.is_lost(p, now) for p in missing):
            return True, 0
        wake = [deadline, grace_until + 1]
        for p in missing:
            last = self.heartbeats.get(p)
            if last is not None and p not in self.lost_now:
                wake.append(last + self.times.lease_ttl_ms + 1)
        return False, min(w for w in wake if w > now)

    def view_key(self) -> tuple[Any, ...]:
        """What our vote depends on: we vote again only when it changed."""
        commits = []
        holders = sorted(self.holders().items())
        for shard, holder in holders:
            sv = self.commit_of(shard, holder)
            if sv is not None:
                commits.append((shard, holder, sv.message.seq))
        named: set[tuple[str, int, str]] = set()
        for (signer, _), sv in self.votes.items():
            if signer != self.me and isinstance(sv.message, Vote):
                named |= {(i["peer_id"], int(i["shard"]), i["sha256"]) for i in sv.message.inputs}
        return (tuple(holders), tuple(commits), frozenset(self.fetch_failed & named))

    def _advance(self, now: int) -> list[act.Action]:
        """One pass of the duty loop; the only place that decides to vote."""
        if self.state in TERMINAL or self.state is RoundState.FETCHING:
            return []
        if self.duty_started is None or self.duty_over:
            return []
        give_up = self._give_up_at()
        if self.attempt >= MAX_ATTEMPTS or now >= give_up:
            self.duty_over = True
            return [*self.timers.cancel(T_TICK), act.Count(name="rounds.uncertified")]
        ready, wake = self._ready(now)
        if not ready:
            return [self.timers.set(T_TICK, min(wake, give_up))]
        key = self.view_key()
        if key != self.last_key and self.me in self.members():
            self.last_key = key
            return self.timers.cancel(T_TICK) + self._begin_vote(now)
        return [self.timers.set(T_TICK, give_up)] if self.timers.armed.get(T_TICK) != give_up else []

    def _begin_vote(self, now: int) -> list[act.Action]:
        self.state = RoundState.FETCHING
        self._inputs, self._excluded, self._queue = [], {}, []
        for shard, holder in sorted(self.holders().items()):
            sv = self.commit_of(shard, holder)
            if sv is None:
                continue  # listed below if the holder has no input at all
            msg = sv.message
            assert isinstance(msg, Result)
            if not msg.ok or "weights" not in msg.outputs:
                self._excluded[holder] = f"failed: {msg.error or 'no weights'}"[:128]
                continue
            sha = msg.outputs["weights"]["sha256"]
            voters = sorted(
                {
                    signer
                    for (signer, _), v in self.votes.items()
                    if signer not in (holder, self.me)
                    and isinstance(v.message, Vote)
                    and any(i["sha256"] == sha for i in v.message.inputs)
                }
            )
            self._queue.append((shard, holder, msg, [holder, *voters]))
        return self._fetch_next(now)

    def _fetch_next(self, now: int) -> list[act.Action]:
        if not self._queue:
            return self._vote(now)
        shard, holder, msg, sources = self._queue[0]
        ref = msg.outputs["weights"]
        return [
            act.FetchBlob(
                digest=ref["sha256"],
                size=ref["size"],
                source=sources[0],
                tag=f"input:{holder}:{shard}",
                want_bytes=True,
            )
        ]

    def _on_blob(self, event: ev.BlobFetched) -> list[act.Action]:
        shard, holder, msg, sources = self._queue[0]
        if event.tag != f"input:{holder}:{shard}":
            raise LocalProtocolError(f"RoundMachine: unexpected fetch {event.tag!r}", reason="illegal_event")
        ref = msg.outputs["weights"]
        now = event.now_ms
        out: list[act.Action] = []
        err: ProtocolError | None = None
        if event.ok:
            try:
                if event.data is None or hashlib.sha256(event.data).hexdigest() != ref["sha256"]:
                    raise RemoteProtocolError("fetched bytes do not match the commit", reason="hash_mismatch")
                arrays = decode_arrays(event.data)
            except ProtocolError as exc:
                err = exc
            else:
                self._queue.pop(0)
                self.fetch_failed.discard((holder, shard, ref["sha256"]))
                self._inputs.append((holder, shard, ref["sha256"], msg.weight, arrays))
                return self._fetch_next(now)
        else:
            err = RemoteProtocolError(event.error or "fetch failed", reason=event.reason or "transport")
            committer_lied = err.reason == "hash_mismatch" and sources[0] == holder
            if len(sources) > 1 and not committer_lied:
                self._queue[0] = (shard, holder, msg, sources[1:])
                return self._fetch_next(now)
        # The revealed output does not match its commit, or cannot be fetched or decoded.
        self._queue.pop(0)
        self._excluded[holder] = f"{err.reason}: {err}"[:128]
        self.fetch_failed.add((holder, shard, ref["sha256"]))
        out.append(act.Count(name=f"rounds.excluded.{err.reason}"))
        return out + self._fetch_next(now)

    def _vote(self, now: int) -> list[act.Action]:
        """Aggregate what we have and publish a signed vote (``Rounds._vote``)."""
        self.state = RoundState.VOTED if self.attempt else RoundState.COLLECTING
        holders = self.holders()
        inputs, excluded = self._inputs, self._excluded
        with_input = {i[0] for i in inputs}
        for p in sorted(set(holders.values())):
            if p not in with_input and p not in excluded:
                excluded[p] = "missing at the round deadline"
        inputs = drop_shape_outliers(inputs, excluded)
        if not inputs:
            return self._advance(now)  # nothing usable to vote on: no attempt spent
        try:
            agg_in = [(input_key(p, s), w if w > 0 else 1.0, arrays) for p, s, _, w, arrays in inputs]
            data = encode_arrays(aggregate(self.announce.aggregation, agg_in))
        except ProtocolError:
            self.duty_over = True
            return [act.Count(name="rounds.duty_failed")]
        digest = hashlib.sha256(data).hexdigest()
        signed = self.sealer.seal(
            Vote,
            now_ms=now,
            ttl_ms=Vote.MAX_TTL_MS,
            task_id=self.task_id,
            round=self.round,
            rule=self.announce.aggregation,
            committee=list(self.members()),
            inputs=[
                {"peer_id": p, "shard": s, "sha256": sha, "weight": float(w)}
                for p, s, sha, w, _ in sorted(inputs, key=lambda i: input_key(i[0], i[1]))
            ],
            excluded=[{"peer_id": p, "reason": r} for p, r in sorted(excluded.items())],
            output={"sha256": digest, "size": len(data)},
            attempt=self.attempt,
        )
        vote = signed.message
        assert isinstance(vote, Vote)
        self.attempt += 1
        self.state = RoundState.VOTED
        out: list[act.Action] = [
            act.StoreBlob(digest=digest, data=data),
            act.Persist(
                record=act.VoteRecord(
                    task_id=self.task_id, round=self.round, peer=self.me, attempt=vote.attempt, raw=signed.raw
                )
            ),
        ]
        out += self._record_vote(signed, vote, now)
        out += [act.Publish(signed=signed), act.Count(name="rounds.voted")]
        if self.state is RoundState.VOTED:
            out += self._advance(now)  # the view may have changed while we fetched
        return out


def _ballot_of(cert: Certificate) -> tuple[Any, ...]:
    return (
        cert.task_id,
        cert.round,
        cert.rule,
        tuple(cert.committee),
        tuple((i["peer_id"], i["shard"], i["sha256"], i["weight"]) for i in cert.inputs),
        cert.output["sha256"],
    )


def drop_shape_outliers(inputs: list[_Input], excluded: dict[str, str]) -> list[_Input]:
    """Keep the inputs whose array shapes/dtypes match the most common signature and hold
    only finite values (SPEC §11.3 "Checks"; ties by the smaller ``repr``)."""

    def sig(arrays: list[np.ndarray]) -> tuple[Any, ...]:
        return tuple((a.shape, a.dtype.str) for a in arrays)

    counts: dict[tuple[Any, ...], int] = {}
    for i in inputs:
        counts[sig(i[4])] = counts.get(sig(i[4]), 0) + 1
    if not counts:
        return inputs
    best = max(sorted(counts, key=repr), key=lambda k: counts[k])
    kept = []
    for i in inputs:
        if sig(i[4]) == best and all(np.isfinite(a).all() for a in i[4] if a.dtype.kind == "f"):
            kept.append(i)
        else:
            excluded[i[0]] = "output shapes or values unusable"
    return kept


__all__ = ["PLANTED_BUGS", "TERMINAL", "RoundMachine", "RoundState", "drop_shape_outliers"]
