"""The contractor role driving its ShardMachines (issue 7 item 2), against real parts — config,
signer, sequence store, inbox, store, blob store, task book, a real TaskMachine for the remote
submitter's award — with fakes for the node's I/O: the p2p node (gossip and streams) and the
worker pool. Every wait is bounded (``wait_until``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from peerd import blobxfer
from peerd.blobs import BlobStore
from peerd.config import load_config
from peerd.contractor import Contractor
from peerd.counters import Counters
from peerd.executor import Job, JobResult
from peerd.inbox import Inbox, wall_ms
from peerd.node import BID_PROTOCOL, RESULT_PROTOCOL, Node
from peerd.seqstore import SequenceStore
from peerd.store import Store
from peerd.taskbook import TaskBook, TaskView
from protocol import codec
from protocol.certificate import tally
from protocol.envelope import Signed, Signer, open_envelope
from protocol.errors import TransportError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, SignerSealer
from protocol.machines.shard import ShardState
from protocol.machines.task import TaskMachine
from protocol.messages import Award, Bid, Cancel, Lease, Result, TaskAnnounce, Vote

SUB = SignerSealer(Signer(b"\x01" * 32), first_seq=1000)
OTHER = SignerSealer(Signer(b"\x09" * 32), first_seq=1000)
TASK = "cd" * 16


class FakeStream:
    def __init__(self, p2p: FakeP2P, peer: str, protocol: str) -> None:
        self.p2p, self.peer, self.protocol = p2p, peer, protocol

    async def send(self, raw: bytes) -> None:
        self.p2p.sent.append((self.peer, self.protocol, raw))

    async def receive(self) -> bytes:
        reply = self.p2p.replies[self.protocol].pop(0) if self.p2p.replies[self.protocol] else {"ok": True}
        return codec.pack(reply)

    async def aclose(self) -> None:
        pass


class FakeP2P:
    """Gossip is recorded; a stream answers with the next scripted reply of its protocol
    ({"ok": True} when none is left); ``refuse`` makes the next opens fail (transport)."""

    def __init__(self) -> None:
        self.published: list[Signed] = []
        self.sent: list[tuple[str, str, bytes]] = []
        self.replies: dict[str, list[dict[str, Any]]] = {BID_PROTOCOL: [], RESULT_PROTOCOL: []}
        self.refuse: dict[str, int] = {}

    async def publish(self, topic: str, raw: bytes) -> None:
        self.published.append(open_envelope(raw))

    async def open_stream(self, peer: str, protocol: str) -> FakeStream:
        if self.refuse.get(protocol, 0) > 0:
            self.refuse[protocol] -= 1
            raise TransportError(f"cannot reach {peer}", reason="transport")
        return FakeStream(self, peer, protocol)

    def sent_of(self, protocol: str) -> list[Signed]:
        return [open_envelope(raw) for _, p, raw in self.sent if p == protocol]

    def leases(self) -> list[Lease]:
        return [s.message for s in self.published if isinstance(s.message, Lease)]


class FakePool:
    """Runs each job by calling ``behaviour`` (default: ok with one output)."""

    def __init__(self) -> None:
        self.sandbox_report = SimpleNamespace(available=True)
        self.jobs: list[Job] = []
        self.release = trio.Event()
        self.block = False
        self.cancelled = 0
        self.forgotten: list[str] = []

    def slots(self) -> int:
        return 1

    def forget_task(self, task: str) -> None:
        self.forgotten.append(task)

    def load(self) -> float:
        return 0.0

    async def execute(self, job: Job) -> JobResult:
        self.jobs.append(job)
        if self.block:
            try:
                await self.release.wait()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        return JobResult(ok=True, outputs={"stdout": f"ran {job.job_id}".encode()}, metrics={"n": 1.0})


class LocalSubmitter:
    def __init__(self) -> None:
        self.bids: list[bytes] = []
        self.results: list[bytes] = []

    def accept_bid(self, raw: bytes, sender: str, *, verified: Signed | None = None) -> dict[str, Any]:
        self.bids.append(raw)
        return {"ok": True, "reason": ""}

    def accept_result(self, raw: bytes, sender: str) -> dict[str, Any]:
        self.results.append(raw)
        return {"ok": True, "reason": ""}


class Rig:
    def __init__(self, tmp: Path, offer: str = "") -> None:
        cfg_path = tmp / "peerd.toml"
        cfg_path.write_text(
            f'[node]\nstate_dir = "{tmp / "state"}"\nruntime_dir = "{tmp / "run"}"\n'
            f"[offer]\ncores = 1\nmemory_mb = 1024\n{offer}\n"
            "[market]\nlease_ttl_s = 2.0\nheartbeat_s = 0.2\n"
        )
        counters = Counters()
        self.signer = Signer(b"\x05" * 32)
        self.p2p = FakeP2P()
        self.pool = FakePool()
        self.node = Node(
            config=load_config(cfg_path, env={}),
            signer=self.signer,
            seq=SequenceStore(tmp / "sequence"),
            counters=counters,
            inbox=Inbox(counters),
            store=Store(tmp / "db.sqlite"),
            blobs=BlobStore(tmp / "blobs", max_blob_bytes=1 << 20),
            p2p=cast(Any, self.p2p),
            pool=cast(Any, self.pool),
            table=cast(Any, None),
            c0=25.0,
            poke_advert=self._poked,
        )
        self.adverts = 0
        self.book = TaskBook(self.signer.peer_id, counters)
        self.rounds = SimpleNamespace(
            results=[], on_result=lambda view, signed: self.rounds.results.append(signed)
        )
        self.local = LocalSubmitter()
        self.contractor = Contractor(self.node, self.book, self.rounds, self.local)

    @classmethod
    async def started(cls, tmp: Path, nursery: trio.Nursery, offer: str = "") -> Rig:
        """Built, with the contractor running in its own nursery inside ``nursery`` (as the
        daemon starts it): its machines and followers end with the test."""
        rig = cls(tmp, offer)
        await nursery.start(rig.contractor.run)
        return rig

    def _poked(self) -> None:
        self.adverts += 1

    @property
    def me(self) -> str:
        return self.signer.peer_id

    def count(self, name: str) -> int:
        return self.node.counters.snapshot().get(name, 0)


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.01)
    assert cond(), f"timed out waiting for {what}"


def announce(rig: Rig, **over: Any) -> tuple[Signed, TaskView]:
    data = rig.node.blobs.put_bytes(b"input text")
    fields: dict[str, Any] = {
        "task_id": TASK,
        "kind": "echo",
        "work": 1.0,
        "deadline_ms": 60_000,
        "max_shards": 1,
        "resources": {"gpu": False, "memory_mb": 0},
        "aggregation": "none",
        "rounds": 1,
        "params": {},
        "inputs": {"text": {"sha256": data, "size": 10}},
        "bid_window_ms": 300,
        "net": {"k": 0.2, "dc_min": 0.0, "dc_max": None},
    }
    fields.update(over)
    signed = SUB.seal(TaskAnnounce, now_ms=wall_ms(), ttl_ms=fields["deadline_ms"], **fields)
    view = rig.book.add(signed)
    assert view is not None
    return signed, view


def award_for(ann: Signed, bid: Signed) -> Signed:
    """The remote submitter's award, from a real TaskMachine given our bid."""
    task = TaskMachine(ann, sealer=SUB, times=MarketTimes(lease_ttl_ms=2_000, heartbeat_ms=200))
    now = wall_ms()
    task.handle(ev.Start(now_ms=now))
    task.handle(ev.MessageVerified(now_ms=now + 1, signed=bid, via=ev.VIA_STREAM, sender=bid.signer))
    out = task.handle(ev.TimerFired(now_ms=now + 400, name="bid_window"))
    awards = [a.signed for a in out if isinstance(a, act.Publish) and isinstance(a.signed.message, Award)]
    assert len(awards) == 1, out
    return awards[0]


async def bid_and_award(rig: Rig, **over: Any) -> tuple[Signed, TaskView, Signed]:
    ann, view = announce(rig, **over)
    await rig.contractor.on_announce(view, ann)
    await wait_until(lambda: rig.p2p.sent_of(BID_PROTOCOL), "our bid on the bid stream")
    bid = rig.p2p.sent_of(BID_PROTOCOL)[0]
    award = award_for(ann, bid)
    # What the task bus does with a gossiped award (peerd/taskbus.py).
    assert rig.contractor.verify_award(view, award)
    view.awards[0] = award
    rig.contractor.on_award(view)
    return ann, view, award


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


# -- bidding ------------------------------------------------------------------------------------------


async def test_an_eligible_contractor_bids_on_the_stream_and_rebids_on_a_reannounce(tmp: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        ann, view = announce(rig)
        await rig.contractor.on_announce(view, ann)
        await wait_until(lambda: rig.count("bids.sent") == 1, "the bid acknowledged")
        [bid] = rig.p2p.sent_of(BID_PROTOCOL)
        assert isinstance(bid.message, Bid) and bid.signer == rig.me and bid.message.c0 == 25.0
        assert rig.p2p.sent[0][0] == SUB.peer_id
        # The submitter re-announces (a fresh sequence): a fresh bid.
        again = SUB.seal(
            TaskAnnounce,
            now_ms=wall_ms(),
            ttl_ms=60_000,
            **{
                k: getattr(ann.message, k)
                for k in ann.message.to_wire()
                if k not in ("seq", "issued_at", "expires_at")
            },
        )
        await rig.contractor.on_announce(view, again)
        await wait_until(lambda: rig.count("bids.sent") == 2, "the second bid")
        assert len(rig.contractor.machines(TASK)) == 1  # still one bidder
        nursery.cancel_scope.cancel()


async def test_an_ineligible_task_gets_no_machine_and_a_refused_bid_is_counted(tmp: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery, offer="draining = true")
        ann, view = announce(rig)
        await rig.contractor.on_announce(view, ann)
        assert rig.count("bids.not_eligible") == 1 and rig.contractor.machines(TASK) == []
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        (tmp / "b").mkdir()
        rig = await Rig.started(tmp / "b", nursery)
        rig.p2p.replies[BID_PROTOCOL].append({"ok": False, "reason": "bidding closed"})
        ann, view = announce(rig)
        await rig.contractor.on_announce(view, ann)
        await wait_until(lambda: rig.count("bids.refused") == 1, "the refusal counted")
        # Bid streams are reused (SPEC §8.4): drop the idle one, so the next bid opens a stream.
        await rig.contractor.streams.aclose()
        rig.p2p.refuse[BID_PROTOCOL] = 1
        again = SUB.seal(
            TaskAnnounce,
            now_ms=wall_ms(),
            ttl_ms=60_000,
            **{
                k: getattr(ann.message, k)
                for k in ann.message.to_wire()
                if k not in ("seq", "issued_at", "expires_at")
            },
        )
        await rig.contractor.on_announce(view, again)
        await wait_until(lambda: rig.count("bids.failed") == 1, "the transport failure counted")
        nursery.cancel_scope.cancel()


def own_announce(rig: Rig) -> Signed:
    """An echo announce signed by this node itself (a task our own submitter published)."""
    return SignerSealer(rig.signer, first_seq=50_000).seal(
        TaskAnnounce,
        now_ms=wall_ms(),
        ttl_ms=60_000,
        task_id=TASK,
        kind="echo",
        work=1.0,
        deadline_ms=60_000,
        max_shards=1,
        resources={"gpu": False, "memory_mb": 0},
        aggregation="none",
        rounds=1,
        params={},
        inputs={},
        bid_window_ms=300,
        net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
    )


async def test_a_bid_for_our_own_task_goes_to_our_own_submitter(tmp: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        signed = own_announce(rig)
        view = rig.book.add(signed)
        assert view is not None
        await rig.contractor.on_announce(view)
        await wait_until(lambda: len(rig.local.bids) == 1, "the local bid")
        assert rig.p2p.sent == []  # no stream to ourselves
        nursery.cancel_scope.cancel()


async def test_our_own_submitters_messages_reach_the_contractor_through_on_published(tmp: Path) -> None:
    """The daemon wires ``submitter.on_published`` to ``contractor.on_published`` (no
    ``submitter.contractor`` set afterwards): our own announce gets our bid, our own cancel
    stops our machine."""
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        signed = own_announce(rig)
        view = rig.book.add(signed)
        assert view is not None
        await rig.contractor.on_published(view, signed)
        await wait_until(lambda: len(rig.local.bids) == 1, "the local bid")
        [machine] = rig.contractor.machines(TASK)
        own = SignerSealer(rig.signer, first_seq=60_000)
        cancel = own.seal(Cancel, now_ms=wall_ms(), ttl_ms=60_000, task_id=TASK, reason="cancelled")
        await rig.contractor.on_published(view, cancel)
        assert view.cancelled and machine.state is ShardState.RELEASED
        nursery.cancel_scope.cancel()


async def test_the_contractor_spawns_only_once_it_runs_and_into_its_own_nursery(tmp: Path) -> None:
    rig = Rig(tmp)
    ann, view = announce(rig)
    with pytest.raises(RuntimeError, match=r"Contractor.run\(\) is not running"):
        await rig.contractor.on_announce(view, ann)
    async with trio.open_nursery() as outer:
        await outer.start(rig.contractor.run)
        await rig.contractor.on_announce(view, ann)
        await wait_until(lambda: rig.count("bids.sent") == 1, "the bid acknowledged")
        # The bidder's machine and the task's follower live in the contractor's nursery; the
        # outer one holds the role alone.
        assert len(outer.child_tasks) == 1 and rig.contractor.nursery.child_tasks
        outer.cancel_scope.cancel()
    with pytest.raises(RuntimeError):
        rig.contractor.nursery  # noqa: B018 - ended with its role


# -- work -----------------------------------------------------------------------------------------------


async def test_an_awarded_shard_runs_persists_and_delivers_its_result_to_the_submitter_only(
    tmp: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        _, view, _ = await bid_and_award(rig)
        await wait_until(lambda: rig.count("results.delivered") == 1, "the result delivered")
        [m] = rig.contractor.machines(TASK)
        await wait_until(lambda: m.state is ShardState.DONE, "the shard done")
        [job] = rig.pool.jobs
        assert job.kind == "echo" and set(job.inputs) == {"text"} and job.submitter == SUB.peer_id
        assert not job.trusted and 1.0 <= job.limits.wall_seconds <= 60.0
        [res] = rig.p2p.sent_of(RESULT_PROTOCOL)
        assert isinstance(res.message, Result) and res.message.ok and res.message.shard == 0
        out = res.message.outputs["stdout"]
        assert rig.node.blobs.path(out["sha256"]).read_bytes() == f"ran {job.job_id}".encode()
        # Durable before anyone is told, and recorded in our own view.
        work = rig.node.store.work(TASK, 0, 1)
        assert work is not None and work.result == res.raw and work.state == "done"
        assert view.results[1][0].raw == res.raw
        # A plain task's result goes to the submitter only (SPEC §7.7): not on gossip, not
        # to a committee, and no final lease beside it (§7.6). Heartbeats, if any (the first
        # is due 250 ms after the award, and this fake job may end sooner), say "running".
        assert res.raw not in [p.raw for p in rig.p2p.published] and rig.rounds.results == []
        assert all(lease.state == "running" for lease in rig.p2p.leases())
        row = rig.node.store.task(TASK)
        assert row is not None and row.role == "worker" and row.submitter == SUB.peer_id
        assert rig.node.active_shards == 0 and rig.adverts == 2
        assert rig.count("jobs.started") == 1 and rig.count("jobs.ok") == 1
        nursery.cancel_scope.cancel()


async def test_a_task_past_its_deadline_is_let_go_and_its_resident_state_freed(tmp: Path) -> None:
    # Issue 9 item 2: what a warm worker keeps resident for a task's rounds (decoded data, a
    # compiled model) is freed once no machine of ours follows the task.
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        await bid_and_award(rig, deadline_ms=3_000)
        await wait_until(lambda: rig.count("results.delivered") == 1, "the result delivered")
        [job] = rig.pool.jobs
        assert job.task == TASK  # the worker tags what it keeps with the task
        assert rig.pool.forgotten == []
        await wait_until(lambda: rig.contractor.machines(TASK) == [], "the task let go after its deadline")
        await wait_until(lambda: rig.pool.forgotten == [TASK], "the pool told to forget the task")
        nursery.cancel_scope.cancel()


async def test_an_unreachable_submitter_gets_the_result_after_back_off_with_the_final_lease(
    tmp: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        rig.p2p.refuse[RESULT_PROTOCOL] = 2
        await bid_and_award(rig)
        await wait_until(lambda: rig.count("results.delivered") == 1, "the result delivered at last")
        assert len(rig.p2p.sent_of(RESULT_PROTOCOL)) == 1  # two opens failed, the third delivered
        notes = [le.detail for le in rig.p2p.leases() if le.state == "done"]
        assert notes.count("result not acknowledged yet") == 2
        assert rig.count("results.undelivered") == 0
        nursery.cancel_scope.cancel()


async def test_a_missing_input_fails_the_shard_without_a_result(tmp: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        rig.p2p.refuse[blobxfer.PROTOCOL_ID] = 100
        ann, view = announce(rig, inputs={"text": {"sha256": "ee" * 32, "size": 10}})
        await rig.contractor.on_announce(view, ann)
        await wait_until(lambda: rig.p2p.sent_of(BID_PROTOCOL), "our bid")
        award = award_for(ann, rig.p2p.sent_of(BID_PROTOCOL)[0])
        view.awards[0] = award
        rig.contractor.on_award(view)
        [m] = rig.contractor.machines(TASK)
        await wait_until(lambda: m.state is ShardState.FAILED, "the shard failed")
        assert "fetching text failed" in m.detail
        # The final lease is published by a task the driver spawns: it may trail the state.
        await wait_until(lambda: rig.p2p.leases()[-1].state == "failed", "the final lease published")
        assert rig.pool.jobs == [] and rig.p2p.sent_of(RESULT_PROTOCOL) == []
        assert rig.node.active_shards == 0
        nursery.cancel_scope.cancel()


async def test_the_submitters_cancel_kills_the_job_and_a_forged_one_is_dropped(tmp: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        rig.pool.block = True
        _, view, _ = await bid_and_award(rig)
        await wait_until(lambda: len(rig.pool.jobs) == 1, "the job running")
        forged = OTHER.seal(Cancel, now_ms=wall_ms(), ttl_ms=60_000, task_id=TASK, reason="no")
        rig.contractor.on_cancel(view, forged)
        assert rig.count("dropped.forged_cancel") == 1 and not view.cancelled
        [m] = rig.contractor.machines(TASK)
        assert m.state is ShardState.RUNNING
        cancel = SUB.seal(Cancel, now_ms=wall_ms(), ttl_ms=60_000, task_id=TASK, reason="cancelled")
        rig.contractor.on_cancel(view, cancel)
        assert view.cancelled and m.state is ShardState.RELEASED
        await wait_until(lambda: rig.pool.cancelled == 1, "the job killed")
        await wait_until(lambda: rig.p2p.leases()[-1].state == "released", "the final lease published")
        assert rig.count("shards.cancelled") == 1
        assert rig.node.active_shards == 0
        await trio.sleep(0.3)
        assert rig.p2p.sent_of(RESULT_PROTOCOL) == [] and rig.node.store.work(TASK, 0, 1) is None
        nursery.cancel_scope.cancel()


async def test_a_later_award_naming_us_again_does_not_rerun_a_finished_shard(tmp: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        _, view, award = await bid_and_award(rig)
        [m] = rig.contractor.machines(TASK)
        await wait_until(lambda: m.state is ShardState.DONE, "the shard done")
        # Our own view of the task loses its award machines' memory only with the task: the
        # same award handed again (e.g. our own submitter's, then the gossiped copy) runs nothing.
        rig.contractor.on_award(view)
        await trio.sleep(0.2)
        assert len(rig.pool.jobs) == 1 and len(rig.contractor.machines(TASK)) == 1
        del award
        nursery.cancel_scope.cancel()


async def test_round_two_starts_from_the_certified_model_once_certified(tmp: Path) -> None:
    """keras-train, rounds > 1: round 2 waits until the task's view holds round 1's
    certificate (as the task bus records it from the votes), then runs with its model."""
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        ann, view = announce(
            rig, kind="keras-train", aggregation="weighted_mean", rounds=2, inputs={}, max_shards=2, params={}
        )
        await rig.contractor.on_announce(view, ann)
        await wait_until(lambda: rig.p2p.sent_of(BID_PROTOCOL), "our bid")
        bid = rig.p2p.sent_of(BID_PROTOCOL)[0]
        a = SUB.seal(
            Award,
            now_ms=wall_ms(),
            ttl_ms=60_000,
            task_id=TASK,
            epoch=0,
            bids=[bid.raw],
            assignments=[
                {"shard": 0, "peer_id": rig.me, "share": 0.5, "inputs": {}},
                {"shard": 1, "peer_id": OTHER.peer_id, "share": 0.5, "inputs": {}},
            ],
            under_capacity=False,
            excluded=[],
        )
        view.awards[0] = a
        rig.contractor.on_award(view)
        [m] = rig.contractor.machines(TASK)
        await wait_until(lambda: m.state is ShardState.WAITING_MODEL, "round 2 waiting for the model")
        assert len(rig.pool.jobs) == 1 and rig.pool.jobs[0].params["seed"] == 1
        model = rig.node.blobs.put_bytes(b"certified model")
        # Round 1's committee: the two participants (the model is fetched from the other).
        voters = [OTHER, SignerSealer(rig.signer, first_seq=90_000)]
        committee = sorted(v.peer_id for v in voters)
        votes = [
            v.seal(
                Vote,
                now_ms=wall_ms(),
                ttl_ms=Vote.MAX_TTL_MS,
                task_id=TASK,
                round=1,
                rule="weighted_mean",
                committee=committee,
                inputs=[
                    {"peer_id": rig.me, "shard": 0, "sha256": model, "weight": 1.0},
                    {"peer_id": OTHER.peer_id, "shard": 1, "sha256": model, "weight": 1.0},
                ],
                excluded=[],
                output={"sha256": model, "size": 15},
                attempt=0,
            )
            for v in voters
        ]
        cert = tally(votes)
        assert cert is not None
        view.certificates[1] = cert
        view.pulse()
        await wait_until(lambda: len(rig.pool.jobs) == 2, "round 2 running")
        job = rig.pool.jobs[1]
        assert job.inputs["weights"] == rig.node.blobs.path(model) and job.params["seed"] == 2
        await wait_until(lambda: m.state is ShardState.DONE, "both rounds delivered")
        assert [r.message.round for r in rig.p2p.sent_of(RESULT_PROTOCOL)] == [1, 2]  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()


async def test_a_restart_redelivers_a_stored_unacknowledged_result(tmp: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        ann, _ = announce(rig)
        own = SignerSealer(rig.signer, first_seq=70_000)
        res = own.seal(
            Result,
            now_ms=wall_ms(),
            ttl_ms=Result.MAX_TTL_MS,
            task_id=TASK,
            epoch=0,
            shard=0,
            round=1,
            ok=True,
            error=None,
            outputs={},
            weight=1.0,
            metrics={},
        )
        rig.node.store.add_task(
            task_id=TASK,
            role="worker",
            submitter=SUB.peer_id,
            kind="echo",
            state="running",
            spec={},
            announce=ann.raw,
            deadline_at=wall_ms() / 1000 + 60,
            message="awarded",
        )
        rig.node.store.set_work(TASK, 0, 1, 0, "done", res.raw)
        rig.contractor.redeliver_pending()
        await wait_until(lambda: rig.count("results.delivered") == 1, "the stored result re-delivered")
        assert [s.raw for s in rig.p2p.sent_of(RESULT_PROTOCOL)] == [res.raw]
        assert rig.pool.jobs == []
        nursery.cancel_scope.cancel()


async def test_a_machine_error_stops_that_machine_only_and_frees_its_slot(tmp: Path) -> None:
    """An event the machine cannot take stops that machine (peerd/drive.py): its job is
    killed, its heartbeats stop, and the slot its award took is given back."""
    async with trio.open_nursery() as nursery:
        rig = await Rig.started(tmp, nursery)
        rig.pool.block = True
        await bid_and_award(rig)
        await wait_until(lambda: len(rig.pool.jobs) == 1, "the job running")
        assert rig.node.active_shards == 1
        [d] = rig.contractor._tasks[TASK]
        d.feed(ev.InputsSplit(now_ms=wall_ms(), inputs=()))
        assert d.closed and rig.count("drive.machine_errors") == 1
        await wait_until(lambda: rig.pool.cancelled == 1, "the job killed")
        await wait_until(lambda: rig.node.active_shards == 0, "the slot given back")
        assert TASK not in rig.contractor._tasks
        leases = len(rig.p2p.leases())
        await trio.sleep(0.5)
        assert len(rig.p2p.leases()) == leases  # no more heartbeats
        nursery.cancel_scope.cancel()
