"""peerd/blobxfer.py over in-memory frame streams: transfers, resume, liars, caps, flow control."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from peerd.blobs import BlobStore
from peerd.blobxfer import fetch_blob, serve_blob
from peerd.streams import FrameStream, MemoryFrameStream, memory_stream_pair
from protocol import blobproto
from protocol.blobproto import CHUNK, WINDOW, Ack, Chunk, End, GetHeader, GetRequest
from protocol.errors import RemoteProtocolError, TransportError

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server_store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "server", max_blob_bytes=64 * MiB)


@pytest.fixture
def client_store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "client", max_blob_bytes=64 * MiB)


class Recorder:
    """Wraps the client's end: records what it sends and can drop the link after N frames."""

    def __init__(self, inner: FrameStream, drop_after: int | None = None) -> None:
        self.inner = inner
        self.remote_peer = inner.remote_peer
        self.drop_after = drop_after
        self.received_frames = 0
        self.received_chunk_bytes = 0
        self.sent: list[blobproto.Message] = []

    async def send(self, frame: bytes) -> None:
        self.sent.append(blobproto.decode(frame))
        await self.inner.send(frame)

    async def receive(self) -> bytes:
        if self.drop_after is not None and self.received_frames >= self.drop_after:
            await self.inner.aclose()
            raise TransportError("link dropped by the test", reason="reset")
        frame = await self.inner.receive()
        self.received_frames += 1
        msg = blobproto.decode(frame)
        if isinstance(msg, Chunk):
            self.received_chunk_bytes += len(msg.data)
        return frame

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def requests(self) -> list[GetRequest]:
        return [m for m in self.sent if isinstance(m, GetRequest)]


Server = Callable[[FrameStream], Awaitable[None]]


def opener(
    nursery: trio.Nursery,
    serve: Server,
    drops: dict[int, int] | None = None,
) -> tuple[Callable[[], Awaitable[FrameStream]], list[Recorder]]:
    """An ``open_stream`` whose every call starts ``serve`` on the other end of a fresh pair.

    ``drops`` maps an attempt number (0-based) to the frame count after which its link drops.
    """
    streams: list[Recorder] = []

    async def open_stream() -> FrameStream:
        client, server = memory_stream_pair("client", "server")
        nursery.start_soon(serve, server)
        rec = Recorder(client, (drops or {}).get(len(streams)))
        streams.append(rec)
        return rec

    return open_stream, streams


def honest(store: BlobStore, **kwargs: Any) -> Server:
    return functools.partial(serve_blob, store=store, **kwargs)


async def test_small_blob(server_store: BlobStore, client_store: BlobStore) -> None:
    data = b"a small blob"
    d = server_store.put_bytes(data)
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store))
        path = await fetch_blob(open_stream, d, client_store, max_bytes=MiB)
    assert path == client_store.path(d)
    assert path.read_bytes() == data
    assert [r.offset for r in streams[0].requests] == [0]


async def test_empty_blob(server_store: BlobStore, client_store: BlobStore) -> None:
    d = server_store.put_bytes(b"")
    async with trio.open_nursery() as nursery:
        open_stream, _ = opener(nursery, honest(server_store))
        path = await fetch_blob(open_stream, d, client_store, max_bytes=MiB)
    assert path.read_bytes() == b""


async def test_multi_mib_blob_with_progress(server_store: BlobStore, client_store: BlobStore) -> None:
    data = os.urandom(9 * MiB + 12345)  # not a multiple of CHUNK: the last chunk is short
    d = server_store.put_bytes(data)
    seen: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store))
        path = await fetch_blob(
            open_stream, d, client_store, max_bytes=16 * MiB, progress=lambda r, t: seen.append((r, t))
        )
    assert path.read_bytes() == data
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    acks = [m.received for m in streams[0].sent if isinstance(m, Ack)]
    assert acks == sorted(acks) and acks[-1] == len(data)  # cumulative, ending with the final ack
    assert client_store.partial_size(d) == 0


async def test_already_present_returns_at_once(client_store: BlobStore) -> None:
    d = client_store.put_bytes(b"local")

    async def never() -> FrameStream:
        raise AssertionError("no stream should be opened")

    assert await fetch_blob(never, d, client_store, max_bytes=MiB) == client_store.path(d)


async def test_resume_after_drop(server_store: BlobStore, client_store: BlobStore) -> None:
    data = os.urandom(5 * MiB + 7)
    d = server_store.put_bytes(data)
    async with trio.open_nursery() as nursery:
        # attempt 0 dies after the header and 7 chunks, attempt 1 after 3 more chunks
        open_stream, streams = opener(nursery, honest(server_store), drops={0: 8, 1: 4})
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB, backoff=0.001)
    assert path.read_bytes() == data
    offsets = [s.requests[0].offset for s in streams]
    assert offsets == [0, 7 * CHUNK, 10 * CHUNK]  # each attempt resumed where the last stopped


async def test_resume_across_calls(server_store: BlobStore, client_store: BlobStore) -> None:
    data = os.urandom(3 * MiB)
    d = server_store.put_bytes(data)
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store), drops={0: 5})
        with pytest.raises(TransportError):
            await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB, attempts=1)
        assert client_store.partial_size(d) == 4 * CHUNK  # kept for later
        assert not client_store.has(d)
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert path.read_bytes() == data
    assert streams[1].requests[0].offset == 4 * CHUNK


async def test_gives_up_after_bounded_attempts(server_store: BlobStore, client_store: BlobStore) -> None:
    d = server_store.put_bytes(os.urandom(2 * MiB))
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store), drops=dict.fromkeys(range(10), 2))
        with pytest.raises(TransportError):
            await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB, attempts=3, backoff=0.001)
    assert len(streams) == 3
    assert [s.requests[0].offset for s in streams] == [0, CHUNK, 2 * CHUNK]


async def test_unreachable_peer_is_retried(server_store: BlobStore, client_store: BlobStore) -> None:
    data = b"eventually"
    d = server_store.put_bytes(data)
    calls = 0
    async with trio.open_nursery() as nursery:
        inner, _ = opener(nursery, honest(server_store))

        async def flaky() -> FrameStream:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise TransportError("dial failed", reason="unreachable")
            return await inner()

        path = await fetch_blob(flaky, d, client_store, max_bytes=MiB, backoff=0.001)
    assert path.read_bytes() == data and calls == 3


async def test_poisoned_partial_from_earlier_call_gets_a_fresh_start(
    server_store: BlobStore, client_store: BlobStore
) -> None:
    data = os.urandom(MiB)
    d = server_store.put_bytes(data)
    with client_store.open_partial(d) as p:
        p.write(b"\xff" * 1000)  # left by a liar or by a crash that lost unsynced data
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store))
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert path.read_bytes() == data
    assert [s.requests[0].offset for s in streams] == [1000, 0]


async def test_partial_longer_than_blob_starts_over(server_store: BlobStore, client_store: BlobStore) -> None:
    data = b"short blob"
    d = server_store.put_bytes(data)
    with client_store.open_partial(d) as p:
        p.write(b"x" * 100)
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store))
        path = await fetch_blob(open_stream, d, client_store, max_bytes=MiB, backoff=0.001)
    assert path.read_bytes() == data
    assert [s.requests[0].offset for s in streams] == [100, 0]


async def test_not_found_and_not_allowed(server_store: BlobStore, client_store: BlobStore) -> None:
    hidden = server_store.put_bytes(b"secret")
    missing = sha(b"missing")
    asked: list[tuple[str, str]] = []

    def allow(peer: str, digest: str) -> bool:
        asked.append((peer, digest))
        return digest != hidden

    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store, allow=allow))
        for d in (missing, hidden):
            with pytest.raises(RemoteProtocolError) as info:
                await fetch_blob(open_stream, d, client_store, max_bytes=MiB)
            assert info.value.reason == "not_found"
    assert len(streams) == 2  # not_found is an answer, not a transport failure: no retry
    assert asked == [("client", missing), ("client", hidden)]
    assert client_store.digests() == []


async def test_busy_server_is_retried(server_store: BlobStore, client_store: BlobStore) -> None:
    data = b"popular"
    d = server_store.put_bytes(data)
    limiter = trio.CapacityLimiter(1)
    other = object()
    limiter.acquire_on_behalf_of_nowait(other)  # another transfer holds the only slot
    async with trio.open_nursery() as nursery:
        inner, streams = opener(nursery, honest(server_store, limiter=limiter))

        async def open_stream() -> FrameStream:
            if len(streams) == 2:
                limiter.release_on_behalf_of(other)
            return await inner()

        path = await fetch_blob(open_stream, d, client_store, max_bytes=MiB, backoff=0.001)
    assert path.read_bytes() == data
    assert len(streams) == 3
    assert limiter.borrowed_tokens == 0  # the server released its slot


async def test_too_large_by_header(server_store: BlobStore, client_store: BlobStore) -> None:
    d = server_store.put_bytes(os.urandom(2 * MiB))
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store))
        with pytest.raises(RemoteProtocolError) as info:
            await fetch_blob(open_stream, d, client_store, max_bytes=MiB)
    assert info.value.reason == "too_large"
    assert streams[0].received_chunk_bytes == 0  # cut off before any data was read
    assert client_store.digests() == [] and client_store.partial_size(d) == 0


async def test_server_side_size_cap(server_store: BlobStore, client_store: BlobStore) -> None:
    d = server_store.put_bytes(os.urandom(2 * MiB))
    async with trio.open_nursery() as nursery:
        open_stream, _ = opener(nursery, honest(server_store, max_bytes=MiB))
        with pytest.raises(RemoteProtocolError) as info:
            await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert info.value.reason == "too_large"


def liar(
    payload: bytes, *, size: int | None = None, end_digest: str | None = None, then: bytes | None = None
) -> Server:
    """A server that follows the exchange but sends ``payload`` and announces ``size``."""

    async def serve(stream: FrameStream) -> None:
        try:
            req = blobproto.decode(await stream.receive())
            assert isinstance(req, GetRequest)
            await stream.send(blobproto.encode(GetHeader("ok", len(payload) if size is None else size)))
            if then is not None:
                await stream.send(then)
            for i in range(0, len(payload), CHUNK):
                await stream.send(blobproto.encode(Chunk(payload[i : i + CHUNK])))
            await stream.send(blobproto.encode(End(end_digest or req.sha256)))
        except TransportError:
            pass  # the client hung up on us, as it should
        finally:
            await stream.aclose()

    return serve


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong_bytes", "hash_mismatch"),
        ("sends_past_size", "too_large"),
        ("announces_over_cap", "too_large"),
        ("short", "short"),
        ("end_names_other_blob", "hash_mismatch"),
        ("garbage_frame", "malformed"),
        ("unexpected_message", "unexpected"),
    ],
)
async def test_misbehaving_server(client_store: BlobStore, case: str, reason: str) -> None:
    real = os.urandom(MiB + 3)
    d = sha(real)
    serve = {
        "wrong_bytes": liar(os.urandom(len(real))),
        "sends_past_size": liar(real + os.urandom(3 * MiB), size=len(real)),
        "announces_over_cap": liar(real, size=8 * MiB),
        "short": liar(real[:1000], size=len(real)),
        "end_names_other_blob": liar(real, end_digest=sha(b"other")),
        "garbage_frame": liar(real, then=b"\xc1\x00garbage"),
        "unexpected_message": liar(real, then=blobproto.encode(GetHeader("ok", 5))),
    }[case]
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, serve)
        with pytest.raises(RemoteProtocolError) as info:
            await fetch_blob(open_stream, d, client_store, max_bytes=4 * MiB)
    assert info.value.reason == reason
    assert not isinstance(info.value, TransportError)
    assert len(streams) == 1  # a peer that breaks the protocol is not retried
    assert client_store.digests() == []  # nothing stored ...
    assert client_store.partial_size(d) == 0  # ... and the partial it fed us is gone
    assert streams[0].received_chunk_bytes <= len(real) + CHUNK  # a liar is cut off at once


@pytest.mark.parametrize(
    "frames",
    [
        lambda d: [b""],
        lambda d: [b"\xc1"],
        lambda d: [b"\x00" * 100],
        lambda d: [blobproto.encode(Ack(0))],  # ack instead of get
        lambda d: [blobproto.encode(GetRequest(d, 0)), b"garbage instead of an ack"],
        lambda d: [blobproto.encode(GetRequest(d, 0)), blobproto.encode(GetRequest(d, 0))],
        lambda d: [blobproto.encode(GetRequest(d, 0))],  # valid, then hangs up mid-transfer
    ],
    ids=["empty", "reserved-byte", "zeros", "ack-first", "garbage-ack", "second-get", "hang-up"],
)
async def test_server_survives_garbage(server_store: BlobStore, frames: Callable[[str], list[bytes]]) -> None:
    d = server_store.put_bytes(os.urandom(3 * MiB))
    client, server = memory_stream_pair("client", "server")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_blob, server, server_store)  # an exception here fails the test
        try:
            for frame in frames(d):
                await client.send(frame)
            for _ in range(3):  # read a little (the server may close first), then hang up
                await client.receive()
        except TransportError:
            pass
        await client.aclose()


@pytest.mark.parametrize(
    "bad_ack",
    [Ack(1 << 40), Ack(0), End("0" * 64)],
    ids=["acks-unsent-bytes", "ack-goes-backwards", "not-an-ack"],
)
async def test_server_rejects_bad_acks(
    server_store: BlobStore, bad_ack: blobproto.Message, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="peerd.blobxfer")
    d = server_store.put_bytes(os.urandom(6 * MiB))
    client, server = memory_stream_pair("client", "server")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_blob, server, server_store)
        await client.send(blobproto.encode(GetRequest(d, CHUNK)))
        await client.receive()  # header
        await client.receive()  # first chunk
        await client.send(blobproto.encode(bad_ack))
        try:
            for _ in range(100):  # at most the window's worth of chunks, then the server hangs up
                await client.receive()
        except TransportError:
            pass
    reasons = {r.args[-1] for r in caplog.records if isinstance(r.args, tuple) and r.args}
    assert reasons & {"bad_ack", "unexpected"}, caplog.text


class UnboundedServerEnd:
    """A server end whose send() never blocks — like a muxer that buffers whatever it is given.

    Only the blob protocol's window can then keep the server from running ahead.
    """

    def __init__(self) -> None:
        self.remote_peer = "client"
        self.to_client_send, self.to_client = trio.open_memory_channel[bytes](math.inf)
        self.to_server, self.to_server_recv = trio.open_memory_channel[bytes](math.inf)
        self.chunk_bytes_sent = 0

    async def send(self, frame: bytes) -> None:
        msg = blobproto.decode(frame)
        if isinstance(msg, Chunk):
            self.chunk_bytes_sent += len(msg.data)
        try:
            self.to_client_send.send_nowait(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportError("closed", reason="closed") from exc

    async def receive(self) -> bytes:
        try:
            return await self.to_server_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise TransportError("closed", reason="closed") from exc

    async def aclose(self) -> None:
        await self.to_client_send.aclose()
        await self.to_server_recv.aclose()

    def client_end(self) -> MemoryFrameStream:
        return MemoryFrameStream("server", self.to_server, self.to_client)


async def test_stalled_receiver_bounds_server_buffering(server_store: BlobStore) -> None:
    d = server_store.put_bytes(os.urandom(20 * MiB))
    end = UnboundedServerEnd()
    client = end.client_end()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(serve_blob, end, server_store, idle_timeout=10_000))
        await client.send(blobproto.encode(GetRequest(d, 0)))
        await trio.testing.wait_all_tasks_blocked()
        # The client has read nothing and acked nothing: the server waits at one window.
        assert end.chunk_bytes_sent == WINDOW
        await trio.testing.wait_all_tasks_blocked()
        assert end.chunk_bytes_sent == WINDOW
        # One ack for half the window lets exactly that much more go out.
        await client.send(blobproto.encode(Ack(WINDOW // 2)))
        await trio.testing.wait_all_tasks_blocked()
        assert end.chunk_bytes_sent == WINDOW + WINDOW // 2
        await client.aclose()


async def test_server_gives_up_on_a_silent_receiver(server_store: BlobStore, autojump_clock: Any) -> None:
    d = server_store.put_bytes(os.urandom(8 * MiB))
    end = UnboundedServerEnd()
    client = end.client_end()
    with trio.fail_after(3600):  # virtual time; trips only if the server never gives up
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(serve_blob, end, server_store, idle_timeout=30))
            await client.send(blobproto.encode(GetRequest(d, 0)))
        # serve_blob returned by itself (nursery exited) without raising
    assert end.chunk_bytes_sent == WINDOW
    with pytest.raises(trio.EndOfChannel):
        for _ in range(100):
            client._recv.receive_nowait()  # drain: the server closed its end


async def test_slow_receiver_in_flight_never_exceeds_window(
    server_store: BlobStore, client_store: BlobStore
) -> None:
    data = os.urandom(12 * MiB + 1)
    d = server_store.put_bytes(data)
    max_in_flight = 0

    class SlowClient(Recorder):
        async def receive(self) -> bytes:
            nonlocal max_in_flight
            for _ in range(20):  # let the server run as far ahead as it is allowed
                await trio.sleep(0)
            max_in_flight = max(max_in_flight, end.chunk_bytes_sent - self.received_chunk_bytes)
            return await super().receive()

    end = UnboundedServerEnd()

    async def open_stream() -> FrameStream:
        nursery.start_soon(serve_blob, end, server_store)
        return SlowClient(end.client_end())

    async with trio.open_nursery() as nursery:
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert path.read_bytes() == data
    assert 0 < max_in_flight <= WINDOW


async def test_stalled_server_times_out_and_resumes(
    server_store: BlobStore, client_store: BlobStore, autojump_clock: Any
) -> None:
    data = os.urandom(3 * MiB)
    d = server_store.put_bytes(data)

    async def stalls(stream: FrameStream) -> None:
        await stream.receive()
        await stream.send(blobproto.encode(GetHeader("ok", len(data))))
        await stream.send(blobproto.encode(Chunk(data[:CHUNK])))
        await trio.sleep_forever()  # neither sends nor closes

    async with trio.open_nursery() as nursery:
        servers = iter([stalls, honest(server_store)])
        open_stream, streams = opener(nursery, lambda s: next(servers)(s))
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB, idle_timeout=5)
        nursery.cancel_scope.cancel()  # the stalled server task
    assert path.read_bytes() == data
    assert [s.requests[0].offset for s in streams] == [0, CHUNK]


async def test_concurrent_fetches_of_one_blob_share_the_download(
    server_store: BlobStore, client_store: BlobStore
) -> None:
    data = os.urandom(2 * MiB)
    d = server_store.put_bytes(data)
    results: list[Path] = []
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store))

        async def one() -> None:
            results.append(await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB))

        async with trio.open_nursery() as fetchers:
            for _ in range(3):
                fetchers.start_soon(one)
    assert len(streams) == 1
    assert results == [client_store.path(d)] * 3


async def test_cancelled_fetch_keeps_partial_and_releases_lock(
    server_store: BlobStore, client_store: BlobStore
) -> None:
    data = os.urandom(4 * MiB)
    d = server_store.put_bytes(data)
    async with trio.open_nursery() as nursery:
        open_stream, _ = opener(nursery, honest(server_store))

        def progress(received: int, total: int) -> None:
            if received >= MiB:
                cancel_scope.cancel()

        with trio.CancelScope() as cancel_scope:
            await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB, progress=progress)
        assert MiB <= client_store.partial_size(d) < len(data)
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert path.read_bytes() == data
