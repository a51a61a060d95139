"""RoundMachine (protocol/machines/round.py): commits, the committee duty, votes and the
certificate, with real signatures, the real committee draw, real aggregation and real
certificates (checked with check_certificate, as ``peerctl verify`` does). A tiny in-test
driver gossips every published message to every peer's machine and serves blobs."""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import numpy as np
import pytest

from protocol.certificate import check_certificate
from protocol.committee import committee
from protocol.envelope import Signed, Signer
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, SignerSealer
from protocol.machines.round import RoundMachine, RoundState
from protocol.machines.task import TaskMachine
from protocol.messages import Award, Bid, Cancel, Lease, Result, TaskAnnounce, Vote
from protocol.tensors import encode_arrays

NOW = 1_700_000_000_000
TASK = "ab" * 16
TIMES = MarketTimes(lease_ttl_ms=10_000, heartbeat_ms=2_000)
A = TypeVar("A", bound=act.Action)


def sealer(n: int) -> SignerSealer:
    return SignerSealer(Signer(bytes([n]) * 32), first_seq=1000 * n)


SUB = sealer(1)
W = sorted([sealer(n) for n in (2, 3, 4, 5)], key=lambda s: s.peer_id)


def of(actions: list[act.Action], cls: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, cls)]


def announce(**over: Any) -> Signed:
    fields: dict[str, Any] = {
        "task_id": TASK,
        "kind": "keras-train",
        "work": 40.0,
        "deadline_ms": 1000,
        "max_shards": 4,
        "resources": {"gpu": False, "memory_mb": 0},
        "aggregation": "sum",
        "rounds": 2,
        "params": {"round_timeout_s": 60},
        "inputs": {},
        "bid_window_ms": 300,
        "net": {"k": 0.2, "dc_min": 0.0, "dc_max": None},
    }
    fields.update(over)
    return SUB.seal(TaskAnnounce, now_ms=NOW, ttl_ms=600_000, **fields)


def award_for(ann: Signed, workers: list[SignerSealer]) -> Signed:
    """The award a real TaskMachine seals for these bidders."""
    tm = TaskMachine(ann, sealer=SUB, times=TIMES)
    tm.handle(ev.Start(now_ms=NOW))
    for w in workers:
        b = w.seal(Bid, now_ms=NOW + 10, ttl_ms=60_000, task_id=TASK, c0=10.0, load=0.5)
        tm.handle(ev.MessageVerified(now_ms=NOW + 10, signed=b, via=ev.VIA_STREAM, sender=b.signer))
    out = tm.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    return of(out, act.Publish)[0].signed


def tensors(value: float) -> bytes:
    return encode_arrays([np.full((2, 2), value, dtype="<f8"), np.arange(3, dtype="<i4")])


class Net:
    """One RoundMachine per peer (the workers and the submitter), wired by gossip."""

    def __init__(self, ann: Signed, award: Signed, rnd: int = 1, *, bug: str | None = None) -> None:
        self.ann, self.award, self.round = ann, award, rnd
        assert isinstance(award.message, Award)
        self.holders = {int(a["shard"]): a["peer_id"] for a in award.message.assignments}
        self.by_id = {s.peer_id: s for s in W}
        peers = [*sorted(set(self.holders.values())), SUB.peer_id]
        self.m = {
            p: RoundMachine(
                ann,
                rnd,
                sealer=self.by_id.get(p, SUB),
                times=TIMES,
                awards=[award],
                record_votes=p == SUB.peer_id,
                planted_bug=bug,
            )
            for p in peers
        }
        self.blobs: dict[str, bytes] = {}
        self.down: set[str] = set()  # peers whose blobs cannot be fetched
        self.certified: list[tuple[str, Any]] = []
        self.now = NOW + 1_000
        self.log: list[tuple[str, act.Action]] = []
        self.only: set[str] | None = None  # deliver gossip only to these peers

    def members(self) -> tuple[str, ...]:
        return tuple(sorted(committee(TASK, self.round, sorted(set(self.holders.values())))))

    def gossip(self, signed: Signed, *, skip: str | None = None) -> None:
        for p, m in self.m.items():
            if p != skip and (self.only is None or p in self.only):
                self.run(p, m.handle(ev.MessageVerified(now_ms=self.now, signed=signed)))

    def run(self, peer: str, actions: list[act.Action]) -> None:
        queue = list(actions)
        while queue:
            a = queue.pop(0)
            self.log.append((peer, a))
            if isinstance(a, act.Publish):
                self.gossip(a.signed, skip=peer)
            elif isinstance(a, act.StoreBlob):
                assert hashlib.sha256(a.data).hexdigest() == a.digest
                self.blobs[a.digest] = a.data
            elif isinstance(a, act.Certified):
                self.certified.append((peer, a.certificate))
            elif isinstance(a, act.FetchBlob):
                data = self.blobs.get(a.digest) if a.source not in self.down else None
                queue += self.m[peer].handle(
                    ev.BlobFetched(
                        now_ms=self.now,
                        tag=a.tag,
                        digest=a.digest,
                        source=a.source,
                        ok=data is not None,
                        data=data if a.want_bytes else None,
                        reason="" if data is not None else "transport",
                        error="" if data is not None else "unreachable",
                    )
                )

    def commit(self, shard: int, value: float, *, seq_sealer: SignerSealer | None = None) -> Signed:
        holder = self.by_id[self.holders[shard]]
        data = tensors(value)
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        signed = (seq_sealer or holder).seal(
            Result,
            now_ms=self.now,
            ttl_ms=10**9,
            task_id=TASK,
            epoch=0,
            shard=shard,
            round=self.round,
            ok=True,
            error=None,
            outputs={"weights": {"sha256": sha, "size": len(data)}},
            weight=1.0,
            metrics={},
        )
        self.gossip(signed)
        return signed

    def heartbeat(self, shard: int) -> None:
        holder = self.by_id[self.holders[shard]]
        lease = holder.seal(
            Lease,
            now_ms=self.now,
            ttl_ms=10_000,
            task_id=TASK,
            epoch=0,
            shard=shard,
            round=1,
            state="running",
            detail="",
        )
        self.gossip(lease)

    def fire(self, peer: str) -> None:
        m = self.m[peer]
        at = m.timers.armed["tick"]
        self.now = max(self.now, at)
        self.run(peer, m.handle(ev.TimerFired(now_ms=self.now, name="tick")))


@pytest.fixture
def net() -> Net:
    ann = announce()
    return Net(ann, award_for(ann, W[:3]))


def outputs_of(net: Net) -> set[str]:
    return {c.output["sha256"] for _, c in net.certified}


# -- the round's life ---------------------------------------------------------------------------------------


def test_every_commit_in_gives_one_certificate_on_every_peer(net: Net) -> None:
    assert len(net.holders) == 3 and len(net.members()) == 3
    for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0)):
        net.commit(shard, v)
    assert {p for p, _ in net.certified} == set(net.m)  # every follower learns the certificate
    assert len(outputs_of(net)) == 1
    cert = net.certified[0][1]
    expect = hashlib.sha256(encode_arrays([np.full((2, 2), 7.0), np.arange(3, dtype="<i4") * 3])).hexdigest()
    assert cert.output["sha256"] == expect  # sum of 1 + 2 + 4, bit for bit (SPEC §11.3)
    award = net.award.message
    assert isinstance(award, Award)
    checked = check_certificate(cert.votes, task_id=TASK, round_no=1, awards=[award], rule="sum")
    assert checked.output == cert.output
    assert all(m.state is RoundState.CERTIFIED for m in net.m.values())
    votes = [a for p, a in net.log if isinstance(a, act.Persist) and isinstance(a.record, act.VoteRecord)]
    assert {v.record.peer for v in votes} >= set(cert.signers)  # type: ignore[attr-defined]
    assert not any(m.timers.armed for m in net.m.values())


def test_members_wait_for_a_missing_holder_then_leave_it_out(net: Net) -> None:
    members = net.members()
    net.commit(0, 1.0)
    net.commit(1, 2.0)
    assert not net.certified
    first = members[0]
    m = net.m[first]
    assert m.state is RoundState.COLLECTING and m.duty_started == NOW + 1_000
    # The missing holder never heartbeated: it is lost once a lease TTL into the duty.
    assert m.timers.armed["tick"] == NOW + 1_000 + 10_001
    for p in members:
        if not net.certified:  # a quorum (2 of 3) certifies before the last member votes
            net.fire(p)
    assert net.certified
    cert = net.certified[0][1]
    assert [e["peer_id"] for e in cert.excluded] == [net.holders[2]]
    assert [e["reason"] for e in cert.excluded] == ["missing at the round deadline"]
    both = encode_arrays([np.full((2, 2), 3.0), np.arange(3, dtype="<i4") * 2])
    assert cert.output["sha256"] == hashlib.sha256(both).hexdigest()


def test_a_heartbeating_holder_is_waited_for(net: Net) -> None:
    net.heartbeat(2)
    net.commit(0, 1.0)
    net.commit(1, 2.0)
    p = net.members()[0]
    assert net.m[p].timers.armed["tick"] == NOW + 1_000 + 10_001  # its lease lapses then, not before
    net.now = NOW + 5_000
    net.heartbeat(2)
    net.fire(p)
    assert net.m[p].state is RoundState.COLLECTING and net.m[p].timers.armed["tick"] == NOW + 15_001


def test_a_superseding_commit_makes_a_member_vote_again_until_its_attempts_run_out(net: Net) -> None:
    member = net.members()[0]
    net.only = {member}  # the other members hear nothing: no quorum forms
    for shard in range(3):
        net.commit(shard, 1.0)
    m = net.m[member]
    assert m.state is RoundState.VOTED and m.attempt == 1
    for attempt, value in ((1, 5.0), (2, 9.0)):
        superseding = net.commit(2, value)
        mine = [v.message for (signer, _), v in m.votes.items() if signer == member]
        latest = max(mine, key=lambda v: v.attempt)  # type: ignore[attr-defined]
        assert latest.attempt == attempt  # type: ignore[attr-defined]
        named = {i["shard"]: i["sha256"] for i in latest.inputs}  # type: ignore[attr-defined]
        assert named[2] == superseding.message.outputs["weights"]["sha256"]  # type: ignore[attr-defined]
    # Three votes are the most a member casts (SPEC §11.1): a fourth change is not voted on.
    assert m.duty_over and (member, act.Count(name="rounds.uncertified")) in net.log
    net.commit(2, 11.0)
    assert m.attempt == 3 and not net.certified


def test_a_commit_after_the_certificate_changes_nothing(net: Net) -> None:
    for shard in range(3):
        net.commit(shard, 1.0)
    before = list(net.certified)
    first = {p: m.commits[0] for p, m in net.m.items()}
    net.commit(0, 100.0)  # the holder re-ran the round after a restart (SPEC §11)
    assert net.certified == before
    assert {p: m.commits[0] for p, m in net.m.items()} == first


def test_planted_bug_second_commit_certifies_the_round_twice() -> None:
    ann = announce()
    net = Net(ann, award_for(ann, W[:3]), bug="second_commit")
    for shard in range(3):
        net.commit(shard, 1.0)
    assert len(outputs_of(net)) == 1
    net.commit(0, 100.0)
    # The bug reopens a final round: a second, different aggregate is certified.
    assert len(outputs_of(net)) == 2
    with pytest.raises(LocalProtocolError, match="unknown planted bug"):
        RoundMachine(ann, 1, sealer=SUB, times=TIMES, planted_bug="other")


def reaward(net: Net, lost: str, certified: dict[str, Any] | None) -> Signed:
    """Epoch 1 as the TaskMachine seals it: ``lost``'s shard moves by the replacement rule
    (SPEC §10.3; no spare bidder here, so to the cheapest holder), quoting ``certified``."""
    from protocol.awards import allocate, open_quoted_bids, reassign

    aw, ann = net.award.message, net.ann.message
    assert isinstance(aw, Award) and isinstance(ann, TaskAnnounce)
    scored = allocate(ann, open_quoted_bids(aw)).scored
    costs = [(s.peer_id, s.cost) for s in scored]
    capacity = {s.peer_id: s.capacity for s in scored}
    return SUB.seal(
        Award, now_ms=net.now, ttl_ms=Award.MAX_TTL_MS, task_id=TASK, epoch=1, bids=list(aw.bids),
        assignments=reassign(list(aw.assignments), {lost}, costs, task_id=TASK, capacity=capacity),
        under_capacity=aw.under_capacity, excluded=[lost], certified=certified,
    )  # fmt: skip


def quote_of(cert: Any) -> dict[str, Any]:
    return {"round": cert.round, "output": dict(cert.output), "signers": list(cert.signers)}


def test_a_re_award_quoting_the_round_keeps_it_with_the_earlier_holders(net: Net) -> None:
    """SPEC §11.1 "The award in force": round 1 was certified under epoch 0 and the re-award
    says so; a committee of the new holders can no longer certify it (the finding's
    mechanism: a re-awarded holder that missed the votes re-ran round 1)."""
    for shard in range(3):
        net.commit(shard, 1.0)
    cert = net.certified[0][1]
    e1 = reaward(net, net.holders[2], quote_of(cert))
    net.gossip(e1)
    assert all(m.state is RoundState.CERTIFIED and m.certificate == cert for m in net.m.values())
    assert not any(a == act.Count(name="rounds.superseded") for _, a in net.log)
    # A machine built with both awards draws round 1's committee from epoch 0's holders.
    fresh = RoundMachine(net.ann, 1, sealer=SUB, times=TIMES, awards=[net.award, e1])
    assert fresh.members() == net.members()
    # Epoch 1's holders' committee votes another aggregate for round 1: refused.
    holders1 = sorted({a["peer_id"] for a in e1.message.assignments})  # type: ignore[attr-defined]
    members1 = sorted(committee(TASK, 1, holders1))
    voter = net.by_id[members1[0]]
    vote = voter.seal(
        Vote, now_ms=net.now, ttl_ms=Vote.MAX_TTL_MS, task_id=TASK, round=1, rule="sum", committee=members1,
        inputs=sorted(({"peer_id": a["peer_id"], "shard": a["shard"], "sha256": "aa" * 32, "weight": 1.0}
                       for a in e1.message.assignments),  # type: ignore[attr-defined]
                      key=lambda i: (i["peer_id"], i["shard"])),
        excluded=[], output={"sha256": "cc" * 32, "size": 4}, attempt=0,
    )  # fmt: skip
    drop = fresh.handle(ev.MessageVerified(now_ms=net.now, signed=vote))
    assert [d.reason for d in of(drop, act.Drop)] == ["bad_committee"]
    assert fresh.certificate is None


def test_a_re_award_that_does_not_quote_the_round_reopens_it_for_the_new_holders(net: Net) -> None:
    """Its submitter never saw round 1's votes when it re-awarded: round 1 is epoch 1's
    (SPEC §11.1). The certificate formed under epoch 0 is superseded, and the new committee
    certifies the round with the new holder's commit and the continuing holders' ones."""
    for shard in range(3):
        net.commit(shard, 1.0)
    first = net.certified[0][1]
    lost_shard = 2
    lost = net.holders[lost_shard]
    net.now += 120_000  # past the round timeout (60 s) counted from the first commit
    e1 = reaward(net, lost, None)
    net.gossip(e1)
    # The reopened round gives the new holder a full round: nobody votes without its commit.
    assert not any(m.attempt for m in net.m.values())
    assert all(m.state is not RoundState.CERTIFIED and m.certificate is None for m in net.m.values())
    assert any(a == act.Count(name="rounds.superseded") for _, a in net.log)
    awards = [net.award.message, e1.message]
    with pytest.raises(RemoteProtocolError):
        check_certificate(first.votes, task_id=TASK, round_no=1, awards=awards, rule="sum")  # type: ignore[arg-type]
    keeper = next(a["peer_id"] for a in e1.message.assignments if a["shard"] == lost_shard)  # type: ignore[attr-defined]
    data = tensors(10.0)
    sha = hashlib.sha256(data).hexdigest()
    net.blobs[sha] = data
    net.certified.clear()
    net.gossip(net.by_id[keeper].seal(
        Result, now_ms=net.now, ttl_ms=10**9, task_id=TASK, epoch=1, shard=lost_shard, round=1, ok=True,
        error=None, outputs={"weights": {"sha256": sha, "size": len(data)}}, weight=1.0, metrics={},
    ))  # fmt: skip
    assert len(outputs_of(net)) == 1 and outputs_of(net) != {first.output["sha256"]}
    second = net.certified[0][1]
    checked = check_certificate(second.votes, task_id=TASK, round_no=1, awards=awards, rule="sum")  # type: ignore[arg-type]
    assert len(checked.inputs) == 3 and lost not in checked.signers


def test_a_committer_that_cannot_serve_its_blob_is_excluded_with_the_reason(net: Net) -> None:
    bad = net.holders[0]
    net.down.add(bad)
    for shard in range(3):
        net.commit(shard, 1.0)
    assert net.certified
    cert = net.certified[0][1]
    assert {e["peer_id"]: e["reason"] for e in cert.excluded} == {bad: "transport: unreachable"}
    assert any(a == act.Count(name="rounds.excluded.transport") for _, a in net.log)


def test_messages_that_do_not_count_are_dropped(net: Net) -> None:
    m = net.m[SUB.peer_id]
    stranger = W[3]
    res = stranger.seal(
        Result, now_ms=NOW, ttl_ms=10**9, task_id=TASK, epoch=0, shard=0, round=1, ok=True, error=None,
        outputs={}, weight=1.0, metrics={},
    )  # fmt: skip
    assert m.handle(ev.MessageVerified(now_ms=NOW, signed=res)) == [act.Drop(reason="not_holder")]
    vote = stranger.seal(
        Vote, now_ms=NOW, ttl_ms=Vote.MAX_TTL_MS, task_id=TASK, round=1, rule="sum",
        committee=[stranger.peer_id],
        inputs=[{"peer_id": stranger.peer_id, "shard": 0, "sha256": "aa" * 32, "weight": 1.0}],
        excluded=[], output={"sha256": "cc" * 32, "size": 4}, attempt=0,
    )  # fmt: skip
    drop = m.handle(ev.MessageVerified(now_ms=NOW, signed=vote))
    assert [d.reason for d in of(drop, act.Drop)] == ["bad_committee"]  # a committee of its own making
    forged = stranger.seal(Cancel, now_ms=NOW, ttl_ms=1000, task_id=TASK, reason="x")
    assert m.handle(ev.MessageVerified(now_ms=NOW, signed=forged)) == [act.Drop(reason="forged_cancel")]


def test_cancel_ends_the_round(net: Net) -> None:
    net.commit(0, 1.0)
    cancel = SUB.seal(Cancel, now_ms=NOW, ttl_ms=1000, task_id=TASK, reason="by the submitter")
    net.gossip(cancel)
    assert all(m.state is RoundState.CANCELLED for m in net.m.values())
    assert not any(m.timers.armed for m in net.m.values())
    net.commit(1, 1.0)
    assert not net.certified


def test_illegal_events(net: Net) -> None:
    m = net.m[SUB.peer_id]
    for bad in (
        ev.Start(now_ms=NOW),
        ev.CancelRequested(now_ms=NOW),
        ev.JobFinished(now_ms=NOW, job_id="j", ok=True),
        ev.BlobFetched(now_ms=NOW, tag="input:x:0", digest="d", source="s", ok=True),
    ):
        with pytest.raises(
            LocalProtocolError, match=f"illegal event {type(bad).__name__} in state COLLECTING"
        ):
            m.handle(bad)
    with pytest.raises(LocalProtocolError, match="not armed"):
        m.handle(ev.TimerFired(now_ms=NOW, name="tick"))
    holder = net.by_id[net.holders[0]]
    other_round = holder.seal(
        Result, now_ms=NOW, ttl_ms=10**9, task_id=TASK, epoch=0, shard=0, round=2, ok=True, error=None,
        outputs={}, weight=1.0, metrics={},
    )  # fmt: skip
    with pytest.raises(LocalProtocolError, match="misrouted"):
        m.handle(ev.MessageVerified(now_ms=NOW, signed=other_round))
    with pytest.raises(LocalProtocolError, match="no aggregation round"):
        RoundMachine(announce(aggregation="none"), 1, sealer=SUB, times=TIMES)


def test_a_two_round_aggregated_task_is_certified_end_to_end() -> None:
    """TaskMachine + RoundMachines: both rounds certified, the task done with round 2's output."""
    ann = announce(kind="keras-train", aggregation="weighted_mean", rounds=2)
    tm = TaskMachine(ann, sealer=SUB, times=TIMES)
    tm.handle(ev.Start(now_ms=NOW))
    for w in W[:3]:
        b = w.seal(Bid, now_ms=NOW + 10, ttl_ms=60_000, task_id=TASK, c0=10.0, load=0.5)
        tm.handle(ev.MessageVerified(now_ms=NOW + 10, signed=b, via=ev.VIA_STREAM, sender=b.signer))
    award = of(tm.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window")), act.Publish)[0].signed
    outputs = []
    for rnd in (1, 2):
        net = Net(ann, award, rnd)
        for shard in range(3):
            net.commit(shard, float(rnd * 10 + shard))
        cert = next(c for p, c in net.certified if p == SUB.peer_id)
        outputs.append(cert.output["sha256"])
        out = tm.handle(ev.RoundCertified(now_ms=net.now, certificate=cert))
        while fetches := of(out, act.FetchBlob):
            out = []
            for f in fetches:
                out += tm.handle(
                    ev.BlobFetched(now_ms=net.now, tag=f.tag, digest=f.digest, source=f.source, ok=True)
                )
    assert tm.state.value == "done"
    assert len(set(outputs)) == 2
    assert tm.certificates[2].output["sha256"] == outputs[1]
