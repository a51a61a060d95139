"""The submitter role driven against its TaskMachine (issue 7 item 2), with fakes for the
node's I/O only: the task topic (a recording p2p node), the peer table and the worker pool.
Everything else is real: config, signer, sequence store, inbox, store, blob store, task
book, the machine and the shared driver core (peerd/drive.py), on trio's real clock.

Each wait is bounded (a safety bound, never a timing claim).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from peerd.blobs import BlobStore
from peerd.config import load_config
from peerd.counters import Counters
from peerd.inbox import Inbox, wall_ms
from peerd.node import TASKS_TOPIC, Node
from peerd.rounds import Rounds
from peerd.seqstore import SequenceStore
from peerd.store import Store
from peerd.submitter import Submitter
from peerd.taskbook import TaskBook
from peerd.taskbus import TaskBus
from protocol.envelope import Signed, Signer, open_envelope
from protocol.messages import Award, Bid, Cancel, Lease, Message, Result, TaskAnnounce

ME = Signer(b"\x07" * 32)
PEER = Signer(b"\x21" * 32)
OTHER = Signer(b"\x22" * 32)


class FakeP2P:
    """Records what is published; nobody is reachable (every blob we need is local)."""

    def __init__(self, connected: list[str]) -> None:
        self.published: list[Signed] = []
        self.connected = connected
        self.validators: dict[str, Any] = {}

    async def publish(self, topic: str, raw: bytes) -> None:
        self.published.append(open_envelope(raw))

    def connected_peers(self) -> list[str]:
        return list(self.connected)

    def round_trip_s(self, peer_id: str) -> float | None:
        return None  # not measured: the configured bid window stands

    def relayed(self, peer_id: str) -> bool:
        return False  # every peer reached directly

    def add_validator(self, topic: str, fn: Any) -> None:
        self.validators[topic] = fn

    async def open_stream(self, peer: str, proto: str) -> Any:
        raise OSError(f"no route to {peer} in this test")

    def kinds(self) -> list[str]:
        return [s.kind for s in self.published]


class FakeTable:
    """PEER alive; its advert offers ``offers`` (none by default: the bid window then runs
    its whole length, as these tests expect)."""

    def __init__(self, offers: tuple[str, ...] = ()) -> None:
        self.offers = offers

    def alive(self, now_ms: int) -> list[Any]:
        offer = {"kinds": self.offers, "draining": False}
        return [SimpleNamespace(peer_id=PEER.peer_id, advert=SimpleNamespace(offer=offer))]

    def get(self, peer_id: str, now_ms: int) -> None:
        return None  # no advert known: a bid's C⁰ is bounded by the wire only (SPEC §7.4)


class Parts:
    """One daemon's parts on ``tmp``; a second ``Parts`` on the same directory is the same
    daemon after a restart (same store, sequence and blobs; fresh memory)."""

    def __init__(
        self,
        tmp: Path,
        *,
        connected: list[str] | None = None,
        offers: tuple[str, ...] = (),
        bid_window_ms: int = 300,
    ) -> None:
        path = tmp / "peerd.toml"
        path.write_text(
            f'[node]\nstate_dir = "{tmp / "state"}"\nruntime_dir = "{tmp / "run"}"\n'
            "[offer]\ncores = 1\nmemory_mb = 1024\n"
            f"[market]\nbid_window_ms = {bid_window_ms}\nlease_ttl_s = 3.0\nheartbeat_s = 1.0\n"
        )
        cfg = load_config(path, env={})
        self.counters = Counters()
        self.p2p = FakeP2P([PEER.peer_id] if connected is None else connected)
        self.store = Store(tmp / "db.sqlite")
        self.node = Node(
            config=cfg,
            signer=ME,
            seq=SequenceStore(tmp / "sequence"),
            counters=self.counters,
            inbox=Inbox(self.counters),
            store=self.store,
            blobs=BlobStore(tmp / "blobs", max_blob_bytes=1 << 20),
            p2p=cast(Any, self.p2p),
            pool=cast(Any, None),
            table=cast(Any, FakeTable(offers)),
        )
        self.book = TaskBook(ME.peer_id, self.counters)
        self.submitter = Submitter(self.node, self.book)
        self.rounds = Rounds(self.node)
        self.rounds.on_certified.append(self.submitter.on_certificate)
        self.bus = TaskBus(self.node, self.book, cast(Any, None), self.submitter, self.rounds)
        self.events: list[dict[str, Any]] = []
        self._watch: trio.MemoryReceiveChannel[dict[str, Any]] | None = None

    @classmethod
    async def started(
        cls, tmp: Path, nursery: trio.Nursery, *, connected: list[str] | None = None, **kw: Any
    ) -> Parts:
        """Built, with each role running in its own nursery inside ``nursery`` (as the daemon
        starts them): what a role spawns ends with the test."""
        parts = cls(tmp, connected=connected, **kw)
        for role in (parts.rounds, parts.submitter, parts.bus):
            await nursery.start(role.run)
        return parts

    def watch(self, task_id: str) -> None:
        send, recv = trio.open_memory_channel[dict[str, Any]](100)
        self.node.watchers.setdefault(task_id, set()).add(send)
        self._watch = recv

    def drain(self) -> list[dict[str, Any]]:
        assert self._watch is not None
        while True:
            try:
                self.events.append(self._watch.receive_nowait())
            except trio.WouldBlock:
                return self.events

    def state(self, task_id: str) -> str:
        row = self.store.task(task_id)
        assert row is not None
        return row.state

    def messages(self, task_id: str) -> list[str]:
        return [e.message for e in self.store.events(task_id)]


def seal(signer: Signer, cls: type[Message], seq: int, **fields: Any) -> bytes:
    now = wall_ms()
    return signer.seal(cls(seq=seq, issued_at=now, expires_at=now + 60_000, **fields))


async def until(check: Callable[[], bool], what: str, bound_s: float = 60.0) -> None:
    with trio.move_on_after(bound_s):
        while not check():
            await trio.sleep(0.02)
    assert check(), f"not reached within the safety bound: {what}"


async def submit(p: Parts, tmp: Path) -> str:
    data = tmp / "input.txt"
    data.write_text("hello")
    # The result below echoes this data: its one output is what echo declares (docs/tasks.md).
    spec = {"kind": "echo", "work": 1.0, "deadline_s": 120, "params": {"data": "the echo output"}}
    task_id = await p.submitter.submit(spec)
    p.watch(task_id)
    return task_id


async def award_to_peer(p: Parts, task_id: str) -> Award:
    await until(lambda: "announce" in p.p2p.kinds(), "the announce is published")
    reply = p.submitter.accept_bid(seal(PEER, Bid, 1, task_id=task_id, c0=50.0, load=0.0), PEER.peer_id)
    assert reply == {"ok": True, "reason": ""}
    await until(lambda: "award" in p.p2p.kinds(), "the award is published")
    award = next(s.message for s in p.p2p.published if isinstance(s.message, Award))
    assert [a["peer_id"] for a in award.assignments] == [PEER.peer_id]
    return award


def result_raw(p: Parts, task_id: str, signer: Signer, seq: int, *, ok: bool = True) -> bytes:
    digest = p.node.blobs.put_bytes(b"the echo output")  # local: the fetch needs no network
    return seal(
        signer,
        Result,
        seq,
        task_id=task_id,
        epoch=0,
        shard=0,
        round=0,
        ok=ok,
        error=None if ok else "memory_limit: killed",
        outputs={"stdout": {"sha256": digest, "size": 15}} if ok else {},
        weight=1.0,
        metrics={"n": 1.0},
    )


def run(tmp: Path, body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await body(nursery)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_task_from_announce_to_done_through_its_machine(tmp_path: Path) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        assert p.state(task_id) == "bidding"
        await award_to_peer(p, task_id)
        assert p.state(task_id) == "running"
        assert [r.epoch for r in p.store.awards(task_id)] == [0]
        assert p.book.get(task_id) is not None and p.book.get(task_id).awards  # type: ignore[union-attr]
        # A result signed by someone else than the stream's peer, and one from a non-holder.
        assert p.submitter.accept_result(result_raw(p, task_id, PEER, 2), OTHER.peer_id) == {
            "ok": False,
            "reason": "signer mismatch",
        }
        assert p.submitter.accept_result(result_raw(p, task_id, OTHER, 1), OTHER.peer_id) == {
            "ok": False,
            "reason": "not the shard's holder",
        }
        assert p.counters.snapshot().get("dropped.not_holder") == 1
        # The committee role hears of each commit the view keeps from a result stream (its
        # gossiped copy will be a duplicate), once, and of nothing that was refused.
        heard: list[bytes] = []
        p.submitter.on_result.append(lambda view, signed: heard.append(signed.raw))
        raw = result_raw(p, task_id, PEER, 3)
        assert p.submitter.accept_result(raw, PEER.peer_id) == {"ok": True, "reason": ""}
        assert heard == [raw]
        p.submitter.accept_result(raw, PEER.peer_id)  # sent again: nothing new to hear
        assert heard == [raw]
        await until(lambda: p.state(task_id) == "done", "the task is done")
        row = p.store.task(task_id)
        assert row is not None and '"shard-0/stdout"' in json.dumps(row.result)
        assert [r.peer_id for r in p.store.results(task_id)] == [PEER.peer_id]
        final = [e for e in p.drain() if e.get("final")]
        assert [(e["state"], e["message"]) for e in final] == [("done", "1 shard result(s) received")]
        # A bid after the end is for an unknown task (as before).
        late = seal(OTHER, Bid, 2, task_id=task_id, c0=50.0, load=0.0)
        assert p.submitter.accept_bid(late, OTHER.peer_id) == {"ok": False, "reason": "unknown task"}

    run(tmp_path, body)


def test_the_bid_window_closes_once_every_peer_offering_the_kind_has_bid(tmp_path: Path) -> None:
    # A one-minute window (the most there is): an award within the test's bounded wait can only come from the
    # early close (SPEC §8.2), since the one peer whose advert offers echo has bid.
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery, offers=("echo",), bid_window_ms=60_000)
        task_id = await submit(p, tmp_path)
        await until(lambda: "announce" in p.p2p.kinds(), "the announce is published")
        bid = seal(PEER, Bid, 1, task_id=task_id, c0=50.0, load=0.0)
        assert p.submitter.accept_bid(bid, PEER.peer_id) == {"ok": True, "reason": ""}
        # A third of the window: only the early close can award within it.
        await until(lambda: "award" in p.p2p.kinds(), "the award is published", bound_s=20.0)
        assert p.state(task_id) == "running"

    run(tmp_path, body)


def test_no_bid_makes_the_task_pending_with_the_peer_count(tmp_path: Path) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        await until(lambda: p.state(task_id) == "pending", "pending after an empty bid window")
        assert "no eligible bids yet (1 peers known); waiting, then re-announcing" in p.messages(task_id)
        row = p.store.task(task_id)
        assert row is not None and (row.reason or "").startswith("no eligible peer has bid")
        # A bid during the back-off is awarded at once.
        p.submitter.accept_bid(seal(PEER, Bid, 1, task_id=task_id, c0=50.0, load=0.0), PEER.peer_id)
        await until(lambda: p.state(task_id) == "running", "awarded from the back-off")

    run(tmp_path, body)


def test_a_failed_result_fails_the_task_and_cancel_after_the_end_changes_nothing(tmp_path: Path) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        await award_to_peer(p, task_id)
        raw = result_raw(p, task_id, PEER, 2, ok=False)
        # By gossip this time: the task bus hands it to our machine.
        assert await p.bus.route(open_envelope(raw)) is True
        await until(lambda: p.state(task_id) == "failed", "the task failed")
        row = p.store.task(task_id)
        assert row is not None and row.reason == "memory_limit"
        # The only bidder failed for sure: no other peer to move the shard to (SPEC §7.6).
        assert p.messages(task_id)[-1] == (
            f"shard 0 failed on 1 peer(s), no other bidder: {PEER.peer_id[-8:]}: "
            "ok = false: memory_limit: killed"
        )
        assert await p.submitter.cancel(task_id) == "failed"

    run(tmp_path, body)


def test_cancel_publishes_a_signed_cancel_and_ends_the_task(tmp_path: Path) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        await award_to_peer(p, task_id)
        assert await p.submitter.cancel(task_id) == "cancelled"
        assert p.state(task_id) == "cancelled"
        await until(lambda: "cancel" in p.p2p.kinds(), "the cancel is published")
        cancel = next(s for s in p.p2p.published if isinstance(s.message, Cancel))
        assert cancel.signer == ME.peer_id and cancel.message.task_id == task_id  # type: ignore[attr-defined]
        # The machine's timers are gone: nothing fires after the end.
        assert p.submitter.drivers[task_id].armed() == set()

    run(tmp_path, body)


def test_a_silent_holder_is_replaced_by_a_re_award(tmp_path: Path) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        await until(lambda: "announce" in p.p2p.kinds(), "the announce is published")
        p.submitter.accept_bid(seal(PEER, Bid, 1, task_id=task_id, c0=50.0, load=0.0), PEER.peer_id)
        p.submitter.accept_bid(seal(OTHER, Bid, 1, task_id=task_id, c0=10.0, load=0.0), OTHER.peer_id)
        await until(lambda: "award" in p.p2p.kinds(), "the award is published")
        award = next(s.message for s in p.p2p.published if isinstance(s.message, Award))
        holder = award.assignments[0]["peer_id"]
        spare = OTHER if holder == PEER.peer_id else PEER
        # The holder's lease (by gossip) keeps it; then it goes silent past lease_ttl_s.
        lease = seal(
            PEER if holder == PEER.peer_id else OTHER,
            Lease,
            5,
            task_id=task_id,
            epoch=0,
            shard=0,
            round=0,
            state="running",
            detail="",
        )
        assert await p.bus.route(open_envelope(lease)) is True
        await until(lambda: len(p.store.awards(task_id)) == 2, "re-awarded", bound_s=60)
        second = open_envelope(p.store.awards(task_id)[1].raw).message
        assert isinstance(second, Award) and second.epoch == 1
        assert second.assignments[0]["peer_id"] == spare.peer_id and list(second.excluded) == [holder]
        view = p.book.get(task_id)
        assert view is not None and view.holder(0) == spare.peer_id  # the other roles see it
        assert any(m.startswith(f"lease lost by {holder[-8:]}; re-awarded") for m in p.messages(task_id))

    run(tmp_path, body)


def awarded_before_a_restart(tmp_path: Path) -> str:
    """Submit a task and award it to PEER in one daemon life; return its ID for the next."""

    async def before(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        await award_to_peer(p, task_id)
        (tmp_path / "task_id").write_text(task_id)

    run(tmp_path, before)
    return (tmp_path / "task_id").read_text()


def test_resume_after_a_restart_rebuilds_the_machine_from_the_store(tmp_path: Path) -> None:
    task_id = awarded_before_a_restart(tmp_path)

    async def after(nursery: trio.Nursery) -> None:
        # Nobody connected yet: the holder's silence does not count (no lease could reach us).
        p = await Parts.started(tmp_path, nursery, connected=[])
        assert p.book.get(task_id) is None
        p.submitter.resume()
        assert p.messages(task_id)[-1] == "submitter restarted; resuming"
        assert p.state(task_id) == "running"
        view = p.book.get(task_id)
        assert view is not None and view.holder(0) == PEER.peer_id
        await trio.sleep(4.0)  # past lease_ttl_s (3 s) with no peer connected
        assert len(p.store.awards(task_id)) == 1, "re-awarded while nobody could reach us"
        # Resumed with its award: no re-announce, no new award.
        assert p.p2p.kinds() == []
        p.watch(task_id)
        assert p.submitter.accept_result(result_raw(p, task_id, PEER, 7), PEER.peer_id)["ok"] is True
        await until(lambda: p.state(task_id) == "done", "done after the restart")
        # A second resume (e.g. the daemon's start after a racing result) changes nothing.
        p.submitter.resume()
        assert p.state(task_id) == "done"

    run(tmp_path, after)


def test_a_result_before_resume_rebuilds_the_machine_instead_of_unknown_task(tmp_path: Path) -> None:
    task_id = awarded_before_a_restart(tmp_path)

    async def after(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        reply = p.submitter.accept_result(result_raw(p, task_id, PEER, 7), PEER.peer_id)
        assert reply == {"ok": True, "reason": ""}
        await until(lambda: p.state(task_id) == "done", "done")
        p.submitter.resume()  # the daemon's resume comes later: no second machine
        assert p.messages(task_id).count("submitter restarted; resuming") == 1

    run(tmp_path, after)


def test_the_announce_published_is_the_one_stored(tmp_path: Path) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        await until(lambda: "announce" in p.p2p.kinds(), "the announce is published")
        row = p.store.task(task_id)
        assert row is not None
        first = p.p2p.published[0]
        assert isinstance(first.message, TaskAnnounce) and first.raw == row.announce

    run(tmp_path, body)


def test_a_bid_before_resume_is_taken_and_the_task_awarded(tmp_path: Path) -> None:
    async def before(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        (tmp_path / "task_id").write_text(task_id)

    run(tmp_path, before)
    task_id = (tmp_path / "task_id").read_text()

    async def after(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        bid = seal(PEER, Bid, 1, task_id=task_id, c0=50.0, load=0.0)
        assert p.submitter.accept_bid(bid, PEER.peer_id) == {"ok": True, "reason": ""}
        assert [r.peer_id for r in p.store.bids(task_id)] == [PEER.peer_id]
        # Resumed while bidding: the stored announce goes out again, then the window closes.
        await until(lambda: p.state(task_id) == "running", "awarded after the restart")
        # The award's publish is a job the driver spawns after the state changes: wait for it.
        await until(lambda: "award" in p.p2p.kinds(), "the award is published")
        assert p.p2p.kinds()[:2] == ["announce", "award"]

    run(tmp_path, after)


def test_our_own_contractors_leases_keep_our_own_shard(tmp_path: Path) -> None:
    """Our own leases never pass the task bus (our messages skip our validators): the node
    hands what it gossips back to the submitter, or our own shard was "lost" after one TTL."""

    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        await until(lambda: "announce" in p.p2p.kinds(), "the announce is published")
        _, own_bid = p.node.seal(Bid, ttl_ms=60_000, task_id=task_id, c0=50.0, load=0.0)
        assert p.submitter.accept_bid(own_bid.raw, ME.peer_id, verified=own_bid)["ok"] is True
        await until(lambda: "award" in p.p2p.kinds(), "the award is published")
        assert p.book.get(task_id).holder(0) == ME.peer_id  # type: ignore[union-attr]
        for _ in range(5):  # 5 heartbeats 1 s apart: past lease_ttl_s (3 s)
            raw, _ = p.node.seal(
                Lease, ttl_ms=3_000, task_id=task_id, epoch=0, shard=0, round=0, state="running", detail=""
            )
            await p.node.gossip(raw)
            await trio.sleep(1.0)
        assert len(p.store.awards(task_id)) == 1
        assert not any(m.startswith("lost 1 peer(s)") for m in p.messages(task_id)), p.messages(task_id)
        assert p.state(task_id) == "running"

    run(tmp_path, body)


def test_the_submitter_and_task_bus_spawn_only_into_their_own_nurseries(tmp_path: Path) -> None:
    """Issue 7: every role spawned into the daemon's root nursery, so no task had an owning
    scope. Now a role spawns only while its ``run`` runs, into its own nursery, and what it
    spawned ends with it while the scope around it goes on."""

    async def main() -> None:
        p = Parts(tmp_path)
        with pytest.raises(RuntimeError, match=r"Submitter.run\(\) is not running"):
            await submit(p, tmp_path)
        assert p.store.tasks() == []  # refused before anything was stored
        assert TASKS_TOPIC not in p.p2p.validators  # the task bus subscribes when it runs
        async with trio.open_nursery() as outer:
            roles = trio.CancelScope()

            async def run_roles(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with roles:
                    async with trio.open_nursery() as inner:
                        for role in (p.rounds, p.submitter, p.bus):
                            await inner.start(role.run)
                        task_status.started()
                        await trio.sleep_forever()

            await outer.start(run_roles)
            assert p.p2p.validators[TASKS_TOPIC] == p.bus.on_gossip
            task_id = await submit(p, tmp_path)
            await until(lambda: "announce" in p.p2p.kinds(), "the announce is published")
            # The machine's timers and the peer reporter run in the submitter's nursery.
            assert p.submitter.nursery.child_tasks
            roles.cancel()
            with trio.fail_after(60):  # a safety bound
                while outer.child_tasks:
                    await trio.sleep(0.01)
            with pytest.raises(RuntimeError):
                p.submitter.nursery  # noqa: B018 - ended with its role
            assert p.state(task_id) == "bidding"  # nothing ran on after its role ended
            kinds = list(p.p2p.kinds())
            await trio.sleep(1.0)  # past the 300 ms bid window: no award comes
            assert p.p2p.kinds() == kinds

    trio.run(main)


def test_a_result_sent_again_after_the_task_ended_and_the_daemon_restarted_is_acknowledged(
    tmp_path: Path,
) -> None:
    # The holder's acknowledgement was lost (a stream cut after we stored the result) and it
    # sends the result again once we are back: it is stored, so the answer is ok (SPEC §8.3).
    task_id = awarded_before_a_restart(tmp_path)
    sent = tmp_path / "result"

    async def done(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        raw = result_raw(p, task_id, PEER, 7)
        sent.write_bytes(raw)
        assert p.submitter.accept_result(raw, PEER.peer_id) == {"ok": True, "reason": ""}
        await until(lambda: p.state(task_id) == "done", "done")

    run(tmp_path, done)

    async def after(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        p.submitter.resume()
        assert p.submitter.accept_result(sent.read_bytes(), PEER.peer_id) == {
            "ok": True,
            "reason": "already stored",
        }
        # Any other result for the ended task is for an unknown task, as before.
        assert p.submitter.accept_result(result_raw(p, task_id, PEER, 8), PEER.peer_id) == {
            "ok": False,
            "reason": "unknown task",
        }
        assert p.state(task_id) == "done"

    run(tmp_path, after)


def test_what_one_task_observes_of_a_peer_reaches_the_tasks_still_bidding(tmp_path: Path) -> None:
    # bench trust: with a snapshot of the records at each task's start, a liar caught on one
    # task still won every task announced before (docs/benchmarks.md "Trust").
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        first = await submit(p, tmp_path)
        await award_to_peer(p, first)
        second = await submit(p, tmp_path)  # bidding, then pending: nobody bids on it
        machine = p.submitter.drivers[second].machine
        assert PEER.peer_id not in machine.trust_records  # type: ignore[attr-defined]
        failed = result_raw(p, first, PEER, 5, ok=False)
        assert p.submitter.accept_result(failed, PEER.peer_id)["ok"] is True
        await until(
            lambda: PEER.peer_id in machine.trust_records,  # type: ignore[attr-defined]
            "the second task learns what the first observed",
        )
        assert machine.trust_records[PEER.peer_id].failed > 0  # type: ignore[attr-defined]

    run(tmp_path, body)
