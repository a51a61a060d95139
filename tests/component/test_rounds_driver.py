"""The committee role (peerd/rounds.py) driving its RoundMachine, with fakes for the node's
I/O only: gossip is recorded, blobs are served from per-peer dicts, the store and blob store
are real, signatures, the committee draw, aggregation and the tally are real. trio's virtual
clock stands in for the wall clock (the driver's ``now_ms`` follows it)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import trio
import trio.testing

from peerd.blobs import BlobStore
from peerd.counters import Counters
from peerd.node import Node
from peerd.rounds import Rounds
from peerd.store import Store
from peerd.taskbook import TaskView
from protocol.certificate import check_certificate, input_key
from protocol.committee import committee
from protocol.envelope import Signed, Signer, open_envelope
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, SignerSealer
from protocol.machines.round import RoundState
from protocol.machines.task import TaskMachine
from protocol.messages import Award, Bid, Message, Result, TaskAnnounce, Vote
from protocol.tensors import encode_arrays

NOW = 1_700_000_000_000
TASK = "cd" * 16
TTL_S = 10.0
SUB = SignerSealer(Signer(bytes([1]) * 32), first_seq=1000)
W = sorted(
    [SignerSealer(Signer(bytes([n]) * 32), first_seq=1000 * n) for n in (2, 3, 4, 5)], key=lambda s: s.peer_id
)
BY_ID = {s.peer_id: s for s in W}


def clock() -> int:
    return NOW + int(trio.current_time() * 1000)


def tensors(value: float) -> bytes:
    return encode_arrays([np.full((2, 2), value, dtype="<f8"), np.arange(3, dtype="<i4")])


def announce(rounds: int = 2) -> Signed:
    return SUB.seal(
        TaskAnnounce,
        now_ms=NOW,
        ttl_ms=600_000,
        task_id=TASK,
        kind="keras-train",
        work=144_000.0,
        deadline_ms=3_600_000,
        max_shards=4,
        resources={"gpu": False, "memory_mb": 0},
        aggregation="sum",
        rounds=rounds,
        params={"round_timeout_s": 60},
        inputs={},
        bid_window_ms=300,
        net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
    )


def award_for(ann: Signed, workers: list[SignerSealer]) -> Signed:
    """The award a real TaskMachine seals for these bidders."""
    tm = TaskMachine(ann, sealer=SUB, times=MarketTimes(lease_ttl_ms=10_000, heartbeat_ms=2_000))
    tm.handle(ev.Start(now_ms=NOW))
    for w in workers:
        b = w.seal(Bid, now_ms=NOW + 10, ttl_ms=60_000, task_id=TASK, c0=10.0, load=0.5)
        tm.handle(ev.MessageVerified(now_ms=NOW + 10, signed=b, via=ev.VIA_STREAM, sender=b.signer))
    out = tm.handle(ev.TimerFired(now_ms=NOW + 300, name="bid_window"))
    return next(a.signed for a in out if isinstance(a, act.Publish))


class FakeNode:
    """What Rounds uses of peerd.node.Node; the network is a dict of what each peer serves."""

    def __init__(self, me: SignerSealer, tmp: Path) -> None:
        self.me = me
        self.config = SimpleNamespace(
            market=SimpleNamespace(lease_ttl_s=TTL_S, heartbeat_s=2.0), policy=SimpleNamespace(max_blob_mb=1)
        )
        self.counters = Counters()
        self.store = Store(tmp / "state.db")
        self.blobs = BlobStore(tmp / "blobs", max_blob_bytes=1 << 20)
        self.published: list[Signed] = []
        self.served: dict[str, dict[str, bytes]] = {}
        self.fetches: list[tuple[str, str]] = []

    @property
    def peer_id(self) -> str:
        return self.me.peer_id

    def seal(self, cls: type[Message], *, ttl_ms: int, **fields: Any) -> tuple[bytes, Signed]:
        signed = self.me.seal(cls, now_ms=clock(), ttl_ms=ttl_ms, **fields)
        return signed.raw, signed

    async def gossip(self, raw: bytes) -> None:
        self.published.append(open_envelope(raw))

    async def fetch_blob(self, peer_id: str, digest: str, *, max_bytes: int | None = None) -> Path:
        self.fetches.append((peer_id, digest))
        if self.blobs.has(digest):
            return self.blobs.path(digest)
        data = self.served.get(peer_id, {}).get(digest)
        if data is None:
            raise RemoteProtocolError(f"{peer_id[-6:]} unreachable", reason="transport")
        if hashlib.sha256(data).hexdigest() != digest:
            raise RemoteProtocolError("served other bytes", reason="hash_mismatch")
        self.blobs.put_bytes(data)
        return self.blobs.path(digest)

    async def fetch_from_any(self, digest: str, peers: list[str], **_: Any) -> Path:
        for p in peers:
            try:
                return await self.fetch_blob(p, digest)
            except ProtocolError:
                continue
        raise RemoteProtocolError("no peer served it", reason="transport")

    def votes(self) -> list[Vote]:
        return [s.message for s in self.published if isinstance(s.message, Vote)]


class World:
    def __init__(self, node: FakeNode, ann: Signed, award: Signed) -> None:
        self.node = node
        self.rounds = Rounds(cast(Node, node), clock=clock)
        assert isinstance(ann.message, TaskAnnounce)
        self.view = TaskView(TASK, ann.message, ann.raw, SUB.peer_id)
        self.view.awards[0] = award
        assert isinstance(award.message, Award)
        self.holders = {int(a["shard"]): str(a["peer_id"]) for a in award.message.assignments}

    def members(self, rnd: int = 1) -> list[str]:
        return sorted(committee(TASK, rnd, sorted(set(self.holders.values()))))

    def heartbeat(self, *peers: str) -> None:
        for p in peers:
            self.view.heartbeats[p] = trio.current_time()

    def commit(self, shard: int, value: float, rnd: int = 1, *, serve: bool = True) -> Signed:
        holder = BY_ID[self.holders[shard]]
        data = tensors(value)
        sha = hashlib.sha256(data).hexdigest()
        if holder.peer_id == self.node.peer_id:
            self.node.blobs.put_bytes(data)  # our own output, stored before we committed to it
        elif serve:
            self.node.served.setdefault(holder.peer_id, {})[sha] = data
        signed = holder.seal(
            Result,
            now_ms=clock(),
            ttl_ms=600_000,
            task_id=TASK,
            epoch=max(self.view.awards),
            shard=shard,
            round=rnd,
            ok=True,
            error=None,
            outputs={"weights": {"sha256": sha, "size": len(data)}},
            weight=1.0,
            metrics={},
        )
        # As the task bus does: the view keeps the commit, then the committee hears of it.
        assert self.view.add_result(signed)
        self.rounds.on_result(self.view, signed)
        return signed

    def vote_as(self, member: str, like: Vote) -> bool:
        """``member``'s vote on the same ballot as ``like`` (what an honest member computes)."""
        signed = BY_ID[member].seal(
            Vote,
            now_ms=clock(),
            ttl_ms=Vote.MAX_TTL_MS,
            task_id=TASK,
            round=like.round,
            rule=like.rule,
            committee=list(like.committee),
            inputs=[dict(i) for i in like.inputs],
            excluded=[dict(e) for e in like.excluded],
            output=dict(like.output),
            attempt=0,
        )
        return self.rounds.on_vote(self.view, signed)


def committed(signed: Signed) -> str:
    """The output hash a commit names."""
    assert isinstance(signed.message, Result)
    return str(signed.message.outputs["weights"]["sha256"])


def ballot(w: World, r: Any, output: bytes, signer: str) -> Signed:
    """``signer``'s vote for the round's commits (``r``: its machine) with ``output`` as the
    aggregate."""
    return BY_ID[signer].seal(
        Vote,
        now_ms=clock(),
        ttl_ms=Vote.MAX_TTL_MS,
        task_id=TASK,
        round=1,
        rule="sum",
        committee=w.members(),
        inputs=[
            {"peer_id": p, "shard": s, "sha256": committed(r.commits[s]), "weight": 1.0}
            for s, p in sorted(w.holders.items(), key=lambda sp: input_key(sp[1], sp[0]))
        ],
        excluded=[],
        output={"sha256": hashlib.sha256(output).hexdigest(), "size": len(output)},
        attempt=0,
    )


async def until(cond: Callable[[], bool]) -> None:
    """Let the driver run until ``cond`` holds. Bounded in wall time, not virtual time: while
    a blob is read in a worker thread, trio's autojump clock runs ahead (a safety bound only)."""
    give_up = time.monotonic() + 60.0
    while not cond():
        if time.monotonic() > give_up:
            raise AssertionError("condition never reached")
        await trio.sleep(0.05)


Body = Callable[[World], Awaitable[None]]


def run_world(tmp_path: Path, me: str, body: Body, *, workers: int = 4) -> None:
    async def main() -> None:
        ann = announce()
        award = award_for(ann, W[:workers])
        async with trio.open_nursery() as nursery:
            node = FakeNode(BY_ID[me] if me in BY_ID else SUB, tmp_path)
            world = World(node, ann, award)
            await nursery.start(world.rounds.run)  # the committee's rounds run in its own nursery
            await body(world)
            nursery.cancel_scope.cancel()  # the committee's watchers and timers end with the test

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _member_and_not() -> Iterator[tuple[str, str]]:
    ann = announce()
    award = award_for(ann, W)
    assert isinstance(award.message, Award)
    holders = sorted({a["peer_id"] for a in award.message.assignments})
    members = sorted(committee(TASK, 1, holders))
    outsider = next(p for p in holders if p not in members)
    yield members[0], outsider


MEMBER, OUTSIDER = next(_member_and_not())


# -- a member's duty ----------------------------------------------------------------------------------


def test_member_votes_once_every_holder_committed_and_two_members_certify(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        node = w.node
        assert node.peer_id in w.members()
        w.heartbeat(*w.holders.values())
        for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0)):
            w.commit(shard, v)
        assert not node.votes()  # one holder still missing, and heartbeating
        w.commit(3, 8.0)
        await until(lambda: bool(node.votes()))
        (vote,) = node.votes()
        assert [dict(i)["shard"] for i in vote.inputs] == [0, 1, 2, 3] and not vote.excluded
        expect = encode_arrays([np.full((2, 2), 15.0), np.arange(3, dtype="<i4") * 4])
        assert vote.output["sha256"] == hashlib.sha256(expect).hexdigest()  # the real sum rule
        assert node.blobs.has(vote.output["sha256"])  # stored before anyone fetches it
        assert node.store.votes(TASK, 1)[0].peer_id == node.peer_id  # our vote is persisted
        assert 1 not in w.view.certificates
        # A second member votes the same ballot: a quorum (2 of 3) certifies, on the machine.
        other = next(m for m in w.members() if m != node.peer_id)
        assert w.vote_as(other, vote)
        cert = w.view.certificates[1]
        assert set(cert.signers) == {node.peer_id, other}
        award = w.view.awards[0].message
        assert isinstance(award, Award)
        assert check_certificate(cert.votes, task_id=TASK, round_no=1, awards=[award], rule="sum").output
        assert node.store.certificate(TASK, 1) is not None
        assert node.counters.get("rounds.certified") == 1 and node.counters.get("rounds.voted") == 1
        m = w.rounds.machine(TASK, 1)
        assert m is not None and m.state is RoundState.CERTIFIED
        # The contractor's next round starts from the certified output (fetched locally here).
        path = await w.rounds.start_model(w.view, 1)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == cert.output["sha256"]

    run_world(tmp_path, MEMBER, body)


def test_the_vote_that_completes_the_quorum_is_still_published(tmp_path: Path) -> None:
    """Another member's vote is here first; ours completes the certificate the moment we sign
    it. It must still go out: the other daemons need it to learn the certificate."""

    async def body(w: World) -> None:
        node = w.node
        values = {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0}
        w.heartbeat(*w.holders.values())
        for shard in (0, 1, 2):
            w.commit(shard, values[shard])
        other = next(m for m in w.members() if m != node.peer_id)
        total = encode_arrays([np.full((2, 2), 15.0), np.arange(3, dtype="<i4") * 4])
        ballot = Vote(
            seq=1,
            issued_at=clock(),
            expires_at=clock() + 60_000,
            task_id=TASK,
            round=1,
            rule="sum",
            committee=tuple(w.members()),
            inputs=tuple(
                {
                    "peer_id": p,
                    "shard": s,
                    "sha256": hashlib.sha256(tensors(values[s])).hexdigest(),
                    "weight": 1.0,
                }
                for s, p in sorted(w.holders.items(), key=lambda sp: input_key(sp[1], sp[0]))
            ),
            excluded=(),
            output={"sha256": hashlib.sha256(total).hexdigest(), "size": len(total)},
            attempt=0,
        )
        assert w.vote_as(other, ballot)
        assert not node.votes() and 1 not in w.view.certificates
        w.commit(3, values[3])
        await until(lambda: 1 in w.view.certificates)
        assert set(w.view.certificates[1].signers) == {node.peer_id, other}
        await until(lambda: bool(node.votes()))  # published after the certificate formed here
        assert node.votes()[0].output == ballot.output

    run_world(tmp_path, MEMBER, body)


def test_a_silent_holder_is_left_out_after_a_lease_ttl(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        node = w.node
        silent = w.holders[3]
        w.heartbeat(*(p for s, p in w.holders.items() if s != 3))
        for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0)):
            w.commit(shard, v)
        await trio.sleep(TTL_S / 2)
        assert not node.votes()  # within the first lease TTL of the duty, it waits
        await until(lambda: bool(node.votes()))
        (vote,) = node.votes()
        assert {dict(e)["peer_id"]: dict(e)["reason"] for e in vote.excluded} == {
            silent: "missing at the round deadline"
        }

    run_world(tmp_path, MEMBER, body)


def test_a_holder_that_heartbeats_is_waited_for(tmp_path: Path) -> None:
    """The view's heartbeats (kept by the task bus) reach the machine: a live holder is not lost."""

    async def body(w: World) -> None:
        node = w.node
        for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0)):
            w.commit(shard, v)
        for _ in range(int(3 * TTL_S)):
            w.heartbeat(*w.holders.values())
            await trio.sleep(1.0)
        assert not node.votes()
        w.commit(3, 8.0)
        await until(lambda: bool(node.votes()))
        assert not node.votes()[0].excluded

    run_world(tmp_path, MEMBER, body)


def test_an_unfetchable_input_is_excluded_and_counted(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        node = w.node
        w.heartbeat(*w.holders.values())
        for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0)):
            w.commit(shard, v)
        w.commit(3, 8.0, serve=False)
        await until(lambda: bool(node.votes()))
        (vote,) = node.votes()
        reasons = {dict(e)["peer_id"]: dict(e)["reason"] for e in vote.excluded}
        assert reasons[w.holders[3]].startswith("transport:")
        assert node.counters.get("rounds.excluded.transport") == 1
        assert (w.holders[3], dict(node.votes()[0].inputs[0])["sha256"]) not in node.fetches

    run_world(tmp_path, MEMBER, body)


def test_a_re_award_in_the_view_reaches_the_machine(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        for shard, v in ((0, 1.0), (1, 2.0)):
            w.commit(shard, v)
        await until(lambda: w.rounds.machine(TASK, 1) is not None)
        m = w.rounds.machine(TASK, 1)
        assert m is not None and set(m.awards) == {0}
        # The submitter re-awards (a later epoch); the task bus stores it and pulses the view.
        award = w.view.awards[0].message
        assert isinstance(award, Award)
        later = SUB.seal(
            Award,
            now_ms=clock(),
            ttl_ms=600_000,
            task_id=TASK,
            epoch=1,
            assignments=[dict(a) for a in award.assignments],
            bids=list(award.bids),
            under_capacity=award.under_capacity,
            excluded=list(award.excluded),
        )
        w.view.awards[1] = later
        w.view.pulse()
        await until(lambda: 1 in m.awards)

    run_world(tmp_path, MEMBER, body)


def test_a_cancel_stops_the_duty(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        node = w.node
        for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0)):
            w.commit(shard, v)
        # The contractor marks the view cancelled on the submitter's signed cancel.
        w.view.cancelled = True
        w.view.pulse()
        await until(lambda: w.rounds.machine(TASK, 1) is None)
        await trio.sleep(3 * TTL_S)
        assert not node.votes()
        w.commit(3, 8.0)  # a commit after the cancel opens nothing
        assert w.rounds.machine(TASK, 1) is None and not node.votes()

    run_world(tmp_path, MEMBER, body)


# -- every follower tallies ------------------------------------------------------------------------


def test_a_follower_off_the_committee_tallies_and_never_votes(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        node = w.node
        assert node.peer_id not in w.members()
        w.heartbeat(*w.holders.values())
        for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0)):
            w.commit(shard, v)
        await trio.sleep(3 * TTL_S)
        assert not node.votes()
        # The ballot the members compute (built here by a member's own vote).
        a, b, _ = w.members()
        data = encode_arrays([np.full((2, 2), 15.0), np.arange(3, dtype="<i4") * 4])
        r = w.rounds.machine(TASK, 1)
        assert r is not None
        like = ballot(w, r, data, a)
        assert w.rounds.on_vote(w.view, like)
        assert 1 not in w.view.certificates
        assert isinstance(like.message, Vote)
        assert w.vote_as(b, like.message)
        assert set(w.view.certificates[1].signers) == {a, b}
        assert {s for s, _ in w.view.votes[1]} == {a, b}  # recorded for the submitter and blob GC

    run_world(tmp_path, OUTSIDER, body)


def test_bad_votes_are_dropped_and_the_open_round_still_certifies(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        node = w.node
        w.heartbeat(*w.holders.values())
        for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0)):
            w.commit(shard, v)
        await until(lambda: bool(node.votes()))
        (mine,) = node.votes()
        data = tensors(1.0)

        def forged(**over: Any) -> Signed:
            fields: dict[str, Any] = {
                "task_id": TASK,
                "round": 1,
                "rule": "sum",
                "committee": w.members(),
                "inputs": [dict(i) for i in mine.inputs],
                "excluded": [],
                "output": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
                "attempt": 0,
            }
            fields.update(over)
            return BY_ID[OUTSIDER].seal(Vote, now_ms=clock(), ttl_ms=Vote.MAX_TTL_MS, **fields)

        # From a peer off the committee.
        assert not w.rounds.on_vote(w.view, forged())
        assert node.counters.get("dropped.not_in_committee") == 1
        # Naming no participant at all: no committee can be drawn. Dropped as the sender's
        # fault (it used to escape the check as our own error).
        assert not w.rounds.on_vote(w.view, forged(inputs=[], committee=[OUTSIDER]))
        assert node.counters.get("dropped.bad_committee") == 1
        assert 1 not in w.view.certificates and node.counters.get("drive.machine_errors") == 0
        m = w.rounds.machine(TASK, 1)
        assert m is not None and m.state is RoundState.VOTED
        assert {s for s, _ in w.view.votes[1]} == {node.peer_id}  # only what can count is kept
        other = next(p for p in w.members() if p != node.peer_id)
        assert w.vote_as(other, mine)
        assert set(w.view.certificates[1].signers) == {node.peer_id, other}

    run_world(tmp_path, MEMBER, body)


def test_a_participant_off_the_committee_prefetches_the_voted_aggregate(tmp_path: Path) -> None:
    # Issue 9 item 3: the next round's start model is transferred while the certificate is
    # gathered. One member's vote (no quorum yet) is enough for an outsider to fetch it.
    async def body(w: World) -> None:
        node = w.node
        w.heartbeat(*w.holders.values())
        for shard, v in ((0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0)):
            w.commit(shard, v)
        await until(lambda: (m := w.rounds.machine(TASK, 1)) is not None and len(m.commits) == 4)
        r = w.rounds.machine(TASK, 1)
        assert r is not None
        a, b, _ = w.members()
        data = encode_arrays([np.full((2, 2), 15.0), np.arange(3, dtype="<i4") * 4])
        sha = hashlib.sha256(data).hexdigest()
        node.served.setdefault(a, {})[sha] = data
        like = ballot(w, r, data, a)
        assert not node.blobs.has(sha)
        assert w.rounds.on_vote(w.view, like)
        await until(lambda: node.blobs.has(sha))
        assert 1 not in w.view.certificates  # fetched before the round was certified
        assert (a, sha) in node.fetches
        assert node.counters.get("rounds.prefetched") == 1
        assert isinstance(like.message, Vote)
        assert w.vote_as(b, like.message)  # a second vote for it fetches nothing more
        assert w.view.certificates[1].output["sha256"] == sha
        assert [f for f in node.fetches if f[1] == sha] == [(a, sha)]

    run_world(tmp_path, OUTSIDER, body)


def test_a_member_fetches_each_committed_output_as_its_commit_arrives(tmp_path: Path) -> None:
    # The machine fetches inputs only once every holder has committed; a member fetches each
    # earlier output while the last holder still trains, so that on a slow link only the last
    # commit's output is fetched after it (docs/benchmarks.md, "2026-12-04 evening").
    async def body(w: World) -> None:
        node = w.node
        w.heartbeat(*w.holders.values())
        early = [w.commit(shard, float(shard + 1)) for shard in (0, 1, 2)]
        theirs = [committed(s) for s in early if s.signer != node.peer_id]
        await until(lambda: all(node.blobs.has(d) for d in theirs))
        assert not node.votes()  # still waiting for shard 3's holder: only fetched
        assert node.counters.get("rounds.input_prefetched") == len(theirs) >= 2
        assert {d for _, d in node.fetches} == set(theirs)  # never our own output
        last = w.commit(3, 4.0)
        await until(lambda: bool(node.votes()))
        (vote,) = node.votes()
        assert [dict(i)["shard"] for i in vote.inputs] == [0, 1, 2, 3] and not vote.excluded
        expect = encode_arrays([np.full((2, 2), 10.0), np.arange(3, dtype="<i4") * 4])
        assert vote.output["sha256"] == hashlib.sha256(expect).hexdigest()
        if last.signer != node.peer_id:
            assert node.counters.get("rounds.input_prefetched") == len(theirs) + 1

    run_world(tmp_path, MEMBER, body)


def test_a_participant_off_the_committee_fetches_no_inputs(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        node = w.node
        w.heartbeat(*w.holders.values())
        for shard in range(4):
            w.commit(shard, float(shard + 1))
        await until(lambda: (m := w.rounds.machine(TASK, 1)) is not None and len(m.commits) == 4)
        await trio.sleep(1.0)  # virtual time: a prefetch would have run by now
        assert node.fetches == [] and node.counters.get("rounds.input_prefetched") == 0
        assert not node.votes()

    run_world(tmp_path, OUTSIDER, body)


@pytest.mark.parametrize("certified_sum", [True, False])
def test_the_next_round_starts_from_inputs_held_here_when_they_give_the_certified_output(
    tmp_path: Path, certified_sum: bool
) -> None:
    # A participant holding every input of the round (a member's commit-time prefetch; put in
    # the store here) recomputes the certified output instead of waiting for a voter's copy.
    # Inputs that sum to something else than what was certified are not taken: only a voter's
    # copy will do, and with none served the next round cannot start.
    async def body(w: World) -> None:
        node = w.node
        w.heartbeat(*w.holders.values())
        for shard in range(4):
            w.commit(shard, float(2**shard))
            node.blobs.put_bytes(tensors(float(2**shard)))  # what a prefetch would have stored
        await until(lambda: (m := w.rounds.machine(TASK, 1)) is not None and len(m.commits) == 4)
        r = w.rounds.machine(TASK, 1)
        total = encode_arrays([np.full((2, 2), 15.0), np.arange(3, dtype="<i4") * 4])
        output = total if certified_sum else encode_arrays([np.full((2, 2), 99.0), np.arange(3, dtype="<i4")])
        a, b, _ = w.members()
        assert w.rounds.on_vote(w.view, ballot(w, r, output, a))
        assert w.rounds.on_vote(w.view, ballot(w, r, output, b))
        digest = w.view.certificates[1].output["sha256"]
        assert not node.blobs.has(digest) and all(digest not in v for v in node.served.values())
        if certified_sum:
            path = await w.rounds.start_model(w.view, 1)
            assert path.read_bytes() == total
            assert node.counters.get("rounds.output_recomputed") == 1
            return
        with pytest.raises(RuntimeError, match="could not fetch"):
            await w.rounds.start_model(w.view, 1)
        assert node.counters.get("rounds.output_recomputed") == 0 and not node.blobs.has(digest)
        node.served[a] = {digest: output}
        path = await w.rounds.start_model(w.view, 1)  # a voter serves it now
        assert path.read_bytes() == output

    run_world(tmp_path, OUTSIDER, body)


def test_a_member_still_fetching_the_last_input_recomputes_the_certified_output(tmp_path: Path) -> None:
    # The other two members certified while our prefetch of the last commit's output was still
    # on its way (a slow link): the next round waits for that fetch and recomputes, instead of
    # fetching the output anew after it.
    async def body(w: World) -> None:
        node = w.node
        fetch = node.fetch_blob
        slow: set[str] = set()

        async def slow_fetch(peer_id: str, digest: str, *, max_bytes: int | None = None) -> Path:
            if digest in slow:
                await trio.sleep(5.0)  # virtual time
            return await fetch(peer_id, digest, max_bytes=max_bytes)

        node.fetch_blob = slow_fetch  # type: ignore[method-assign]
        w.heartbeat(*w.holders.values())
        last = next(s for s, p in sorted(w.holders.items()) if p != node.peer_id)
        slow.add(hashlib.sha256(tensors(float(2**last))).hexdigest())
        for shard in range(4):
            w.commit(shard, float(2**shard))
        await until(lambda: (m := w.rounds.machine(TASK, 1)) is not None and len(m.commits) == 4)
        r = w.rounds.machine(TASK, 1)
        total = encode_arrays([np.full((2, 2), 15.0), np.arange(3, dtype="<i4") * 4])
        a, b = [m for m in w.members() if m != node.peer_id]
        assert w.rounds.on_vote(w.view, ballot(w, r, total, a))
        assert w.rounds.on_vote(w.view, ballot(w, r, total, b))
        assert not node.votes() and not node.blobs.has(hashlib.sha256(total).hexdigest())
        path = await w.rounds.start_model(w.view, 1)  # no voter serves it in this world
        assert path.read_bytes() == total
        assert node.counters.get("rounds.output_recomputed") == 1
        assert node.counters.get("rounds.input_prefetched") == 3

    run_world(tmp_path, MEMBER, body)
