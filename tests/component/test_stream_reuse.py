"""Bid and result streams reused per peer (issue 10 item 2, protocol/SPEC.md §8.4).

The opener side is :class:`peerd.streams.StreamPool` (the contractor's bids and results); the
answering side is :func:`peerd.streams.serve_requests` behind the submitter's real
``handle_bid_stream`` / ``handle_result_stream``. Streams are in-memory
(:func:`peerd.streams.memory_stream_pair`); how many were opened is counted by the opener.
Every wait is bounded (a safety bound, never a timing claim).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from peerd.counters import Counters
from peerd.streams import FrameStream, StreamPool, memory_stream_pair, serve_requests
from protocol import codec
from protocol.errors import TransportError
from protocol.messages import Bid
from tests.component.test_submitter_driver import PEER, Parts, result_raw, seal, submit

BID = "/peerd/bid/2.0.0"


class Opener:
    """Opens in-memory streams to one server; each accepted end is served by ``handler`` in
    ``nursery`` (as libp2p runs a stream handler per inbound stream)."""

    def __init__(
        self, nursery: trio.Nursery, handler: Callable[[FrameStream], Awaitable[None]], me: str = "me"
    ) -> None:
        self.nursery = nursery
        self.handler = handler
        self.me = me
        self.opened = 0
        self.refuse = 0

    async def open(self, peer: str, protocol: str) -> FrameStream:
        if self.refuse:
            self.refuse -= 1
            raise TransportError("cannot reach the peer", reason="transport")
        self.opened += 1
        mine, theirs = memory_stream_pair(self.me, peer)
        self.nursery.start_soon(self.handler, theirs)
        return mine


def echo_upper(frame: bytes) -> bytes:
    return frame.upper()


async def serve_echo(stream: FrameStream) -> None:
    await serve_requests(stream, echo_upper, reply_s=10)
    await stream.aclose()


async def one_shot(stream: FrameStream) -> None:
    """An older peer: one request, one reply, then it closes the stream (SPEC §8.2 before §8.4)."""
    frame = await stream.receive()
    await stream.send(echo_upper(frame))
    await stream.aclose()


def run(body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(60):  # safety bound
            async with trio.open_nursery() as nursery:
                await body(nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)


# -- the opener ---------------------------------------------------------------------------------


def test_sequential_requests_to_one_peer_use_one_stream() -> None:
    async def body(nursery: trio.Nursery) -> None:
        opener = Opener(nursery, serve_echo)
        counters = Counters()
        pool = StreamPool(opener.open, counters=counters)
        replies = [await pool.request("sub", BID, f"bid {i}".encode(), 5) for i in range(10)]
        assert replies == [f"BID {i}".encode() for i in range(10)]
        assert opener.opened == 1
        assert counters.get("streams.pool_opened") == 1
        assert counters.get("streams.pool_reused") == 9
        # Another protocol or another peer is another stream.
        await pool.request("sub", "/peerd/result/2.0.0", b"r", 5)
        await pool.request("other", BID, b"b", 5)
        assert opener.opened == 3

    run(body)


def test_concurrent_requests_open_more_streams_and_keep_at_most_max_idle() -> None:
    async def body(nursery: trio.Nursery) -> None:
        opener = Opener(nursery, serve_echo)
        pool = StreamPool(opener.open, max_idle=2)
        got: list[bytes] = []

        async def one(i: int) -> None:
            got.append(await pool.request("sub", BID, bytes([97 + i]), 5))

        async with trio.open_nursery() as inner:
            for i in range(5):
                inner.start_soon(one, i)
        assert sorted(got) == [bytes([65 + i]) for i in range(5)]
        assert opener.opened == 5  # each found no idle stream
        assert pool.idle_streams("sub", BID) == 2
        await pool.request("sub", BID, b"z", 5)
        assert opener.opened == 5

    run(body)


def test_a_reused_stream_the_server_closed_is_reopened_and_the_request_arrives() -> None:
    async def body(nursery: trio.Nursery) -> None:
        opener = Opener(nursery, one_shot)  # closes every stream after one reply
        counters = Counters()
        pool = StreamPool(opener.open, counters=counters)
        assert await pool.request("sub", BID, b"first", 5) == b"FIRST"
        assert await pool.request("sub", BID, b"second", 5) == b"SECOND"
        assert opener.opened == 2
        assert counters.get("streams.pool_reopened") == 1

    run(body)


def test_a_fresh_stream_that_fails_is_not_retried() -> None:
    async def body(nursery: trio.Nursery) -> None:
        async def hang_up(stream: FrameStream) -> None:
            await stream.receive()
            await stream.aclose()

        opener = Opener(nursery, hang_up)
        pool = StreamPool(opener.open)
        with pytest.raises(TransportError):
            await pool.request("sub", BID, b"x", 5)
        assert opener.opened == 1
        assert pool.idle_streams("sub", BID) == 0

    run(body)


def test_a_reply_that_came_too_late_is_never_read_as_the_next_reply() -> None:
    async def body(nursery: trio.Nursery) -> None:
        release = trio.Event()

        async def slow_first(stream: FrameStream) -> None:
            first = await stream.receive()
            await release.wait()
            try:
                await stream.send(b"late " + first)
            except TransportError:
                pass  # the opener gave up on this stream
            await serve_requests(stream, echo_upper, reply_s=10)

        opener = Opener(nursery, slow_first)
        pool = StreamPool(opener.open)
        with pytest.raises(trio.TooSlowError):
            await pool.request("sub", BID, b"one", 0.05)
        release.set()
        assert await pool.request("sub", BID, b"two", 5) == b"late two"  # a new stream's own reply
        assert opener.opened == 2

    run(body)


def test_a_stream_idle_past_the_pool_limit_is_closed_not_reused() -> None:
    async def body(nursery: trio.Nursery) -> None:
        opener = Opener(nursery, serve_echo)
        pool = StreamPool(opener.open, idle_s=0.05)
        await pool.request("sub", BID, b"a", 5)
        await trio.sleep(0.2)
        await pool.request("sub", BID, b"b", 5)
        assert opener.opened == 2

    run(body)


# -- the answering side: the submitter's real handlers --------------------------------------------


def test_many_bids_on_one_stream_hostile_frames_dropped_and_counted(tmp_path: Path) -> None:
    """One bid stream carries several frames; a garbage frame and a replayed bid are refused and
    counted, and the honest bid after them is taken (fails on the one-bid-per-stream handler)."""

    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        first = await submit(p, tmp_path)
        second = await submit(p, tmp_path)
        mine, theirs = memory_stream_pair(PEER.peer_id, p.node.peer_id)
        nursery.start_soon(p.submitter.handle_bid_stream, theirs)
        bid1 = seal(PEER, Bid, 1, task_id=first, c0=50.0, load=0.0)

        async def ask(frame: bytes) -> dict[str, object]:
            await mine.send(frame)
            with trio.fail_after(10):
                reply = codec.unpack(await mine.receive())
            assert isinstance(reply, dict)
            return reply

        assert await ask(bid1) == {"ok": True, "reason": ""}
        dropped_before = sum(v for k, v in p.counters.snapshot().items() if k.startswith("dropped."))
        assert await ask(b"\x93not an envelope") == {"ok": False, "reason": "invalid bid"}
        assert await ask(bid1) == {"ok": False, "reason": "invalid bid"}  # a replay
        dropped_after = sum(v for k, v in p.counters.snapshot().items() if k.startswith("dropped."))
        assert dropped_after - dropped_before == 2
        bid2 = seal(PEER, Bid, 2, task_id=second, c0=50.0, load=0.0)
        assert await ask(bid2) == {"ok": True, "reason": ""}
        assert [r.peer_id for r in p.store.bids(first)] == [PEER.peer_id]
        assert [r.peer_id for r in p.store.bids(second)] == [PEER.peer_id]
        await mine.aclose()

    run_parts(body)


class Capped:
    """The answering end of a stream whose framing refuses frames above ``limit`` bytes, as
    ``peerd.p2p`` does above MAX_FRAME (SPEC §2.3): receive raises TransportError(oversized)."""

    def __init__(self, inner: FrameStream, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.remote_peer = inner.remote_peer

    async def send(self, frame: bytes) -> None:
        await self.inner.send(frame)

    async def receive(self) -> bytes:
        frame = await self.inner.receive()
        if len(frame) > self.limit:
            raise TransportError("frame too large", reason="oversized")
        return frame

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_an_oversized_frame_ends_the_stream_and_the_next_bid_takes_a_new_one(tmp_path: Path) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        first = await submit(p, tmp_path)
        second = await submit(p, tmp_path)

        async def handler(stream: FrameStream) -> None:
            await p.submitter.handle_bid_stream(Capped(stream, 4096))

        opener = Opener(nursery, handler, me=PEER.peer_id)
        pool = StreamPool(opener.open)
        sub = p.node.peer_id
        bid1 = seal(PEER, Bid, 1, task_id=first, c0=50.0, load=0.0)
        assert codec.unpack(await pool.request(sub, BID, bid1, 5)) == {"ok": True, "reason": ""}
        # Frames cannot be resynchronised after an oversized header: the answering side ends
        # that stream (the pooled one, then the one reopened for the retry).
        with pytest.raises(TransportError):
            await pool.request(sub, BID, b"x" * 8192, 5)
        assert pool.idle_streams(sub, BID) == 0
        bid2 = seal(PEER, Bid, 2, task_id=second, c0=50.0, load=0.0)
        assert codec.unpack(await pool.request(sub, BID, bid2, 5)) == {"ok": True, "reason": ""}
        assert opener.opened == 3
        assert [r.peer_id for r in p.store.bids(second)] == [PEER.peer_id]

    run_parts(body)


def test_results_share_one_stream_and_an_old_style_single_exchange_still_works(tmp_path: Path) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        # An older bidder: one frame, read the reply, close (SPEC §8.2).
        mine, theirs = memory_stream_pair(PEER.peer_id, p.node.peer_id)
        nursery.start_soon(p.submitter.handle_bid_stream, theirs)
        await mine.send(seal(PEER, Bid, 1, task_id=task_id, c0=50.0, load=0.0))
        with trio.fail_after(10):
            assert codec.unpack(await mine.receive()) == {"ok": True, "reason": ""}
        await mine.aclose()
        with trio.fail_after(10):
            while p.state(task_id) != "running":
                await trio.sleep(0.02)
        # Two result frames on one stream: a forged one (wrong signer) and the holder's.
        mine, theirs = memory_stream_pair(PEER.peer_id, p.node.peer_id)
        nursery.start_soon(p.submitter.handle_result_stream, theirs)
        await mine.send(result_raw(p, task_id, PEER, 2)[:-1] + b"\x00")
        with trio.fail_after(10):
            assert codec.unpack(await mine.receive()) == {"ok": False, "reason": "invalid result"}
        await mine.send(result_raw(p, task_id, PEER, 3))
        with trio.fail_after(10):
            assert codec.unpack(await mine.receive()) == {"ok": True, "reason": ""}
        with trio.fail_after(30):
            while p.state(task_id) != "done":
                await trio.sleep(0.02)
        await mine.aclose()

    run_parts(body)


def run_parts(body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    run(body)


def test_the_contractors_bids_to_one_submitter_share_one_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three tasks from one submitter: three bids, one stream (fails on one stream per bid)."""
    from tests.component.test_contractor_driver import TASK, FakeP2P, Rig, announce

    opened: list[str] = []
    real_open = FakeP2P.open_stream

    async def counting_open(self: FakeP2P, peer: str, protocol: str) -> Any:
        opened.append(protocol)
        return await real_open(self, peer, protocol)

    monkeypatch.setattr(FakeP2P, "open_stream", counting_open)

    async def body(nursery: trio.Nursery) -> None:
        rig = await Rig.started(tmp_path, nursery)
        for n in range(3):
            ann, view = announce(rig, task_id=TASK[:-2] + f"{n:02x}")
            await rig.contractor.on_announce(view, ann)
            with trio.fail_after(30):
                while len(rig.p2p.sent_of(BID)) < n + 1:
                    await trio.sleep(0.01)
        assert opened == [BID]
        assert rig.count("streams.pool_opened") == 1
        assert rig.count("streams.pool_reused") == 2

    run(body)


def test_streams_to_a_peer_gone_quiet_are_closed_when_another_peer_is_served() -> None:
    async def body(nursery: trio.Nursery) -> None:
        opener = Opener(nursery, serve_echo)
        pool = StreamPool(opener.open, idle_s=0.05)
        await pool.request("left", BID, b"a", 5)
        assert pool.idle_streams("left", BID) == 1
        await trio.sleep(0.2)
        await pool.request("other", BID, b"b", 5)
        assert pool.idle_streams("left", BID) == 0
        assert pool.idle_streams("other", BID) == 1

    run(body)
