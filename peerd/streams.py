"""The framed-stream interface the daemon uses between peers, and an in-memory fake.

``peerd.p2p`` implements :class:`FrameStream` over libp2p streams; component tests use
:func:`memory_stream_pair`. Everything above the transport (bids, blob transfer, result
delivery) is written against this interface only, so it never sees libp2p.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import trio

from protocol.errors import TransportError
from protocol.framing import MAX_FRAME

if TYPE_CHECKING:
    from peerd.counters import Counters


class FrameStream(Protocol):
    """A bidirectional stream of whole frames (each at most MAX_FRAME bytes)."""

    remote_peer: str

    async def send(self, frame: bytes) -> None:
        """Send one frame. Raises TransportError if the stream is broken."""

    async def receive(self) -> bytes:
        """Receive one frame. Raises TransportError on EOF, reset or an oversized frame."""

    async def aclose(self) -> None:
        """Close both directions. Never raises."""


class MemoryFrameStream:
    """One end of an in-memory frame stream (for component tests)."""

    def __init__(
        self,
        remote_peer: str,
        send_ch: trio.MemorySendChannel[bytes],
        recv_ch: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        self.remote_peer = remote_peer
        self._send = send_ch
        self._recv = recv_ch

    async def send(self, frame: bytes) -> None:
        if len(frame) > MAX_FRAME:
            raise TransportError("frame too large", reason="oversized")
        try:
            await self._send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportError("stream closed", reason="closed") from exc

    async def receive(self) -> bytes:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise TransportError("stream closed", reason="closed") from exc

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._recv.aclose()


def memory_stream_pair(
    peer_a: str = "peer-a", peer_b: str = "peer-b"
) -> tuple[MemoryFrameStream, MemoryFrameStream]:
    """Two connected ends; the first is held by ``peer_a`` (its remote is ``peer_b``)."""
    a_to_b_send, a_to_b_recv = trio.open_memory_channel[bytes](16)
    b_to_a_send, b_to_a_recv = trio.open_memory_channel[bytes](16)
    return (
        MemoryFrameStream(peer_b, a_to_b_send, b_to_a_recv),
        MemoryFrameStream(peer_a, b_to_a_send, a_to_b_recv),
    )


# -- reused request/response streams (protocol/SPEC.md §8.4) ---------------------------------

#: How long a pooled stream may sit unused before the opener closes it instead of reusing it.
#: Well below :data:`SERVE_IDLE_S`, so the opener (almost) never sends on a stream the server is
#: about to close; a stream that broke anyway is reopened once (:meth:`StreamPool.request`).
POOL_IDLE_S = 15.0

#: How long a server waits for the next request on a stream before closing it (SPEC §8.4).
SERVE_IDLE_S = 45.0

#: Idle streams kept per (peer, protocol): concurrent requests open more, the extra ones are
#: closed when they come back. Bounds what one peer's pool can hold on both sides.
POOL_MAX_IDLE = 4


class StreamPool:
    """Request/response exchanges (one frame out, one frame back) over streams reused per
    (peer, protocol), instead of a new stream per exchange (protocol/SPEC.md §8.4).

    A stream goes back to the pool only after a whole exchange succeeded; one that failed, timed
    out or was cancelled mid-exchange is closed (its next frame could be a late reply). A request
    that fails on a *reused* stream is retried once on a fresh one: the server may have closed
    the idle stream, or be an older peer that answers one request per stream.

    ``counters`` (if given) counts ``streams.pool_opened`` / ``streams.pool_reused`` /
    ``streams.pool_reopened`` (a reused stream broke and a new one carried the request).
    """

    def __init__(
        self,
        open_stream: Callable[[str, str], Awaitable[FrameStream]],
        *,
        counters: Counters | None = None,
        idle_s: float = POOL_IDLE_S,
        max_idle: int = POOL_MAX_IDLE,
    ) -> None:
        self._open = open_stream
        self._counters = counters
        self._idle_s = idle_s
        self._max_idle = max_idle
        #: (peer, protocol) → idle streams with the time each came back, most recent last
        self._idle: dict[tuple[str, str], list[tuple[FrameStream, float]]] = {}
        self._pruned_at = trio.current_time()

    def _count(self, name: str) -> None:
        if self._counters is not None:
            self._counters.inc(name)

    def idle_streams(self, peer: str, protocol: str) -> int:
        return len(self._idle.get((peer, protocol), ()))

    async def _take(self, key: tuple[str, str]) -> FrameStream | None:
        idle = self._idle.get(key)
        now = trio.current_time()
        while idle:
            stream, since = idle.pop()
            if now - since <= self._idle_s:
                return stream
            await stream.aclose()  # too old: the server may be closing it (SERVE_IDLE_S)
        if not self._idle.get(key):  # (another request may have given one back meanwhile)
            self._idle.pop(key, None)
        return None

    async def _prune(self) -> None:
        """Close streams idle too long for every peer (peers that left keep nothing open)."""
        now = trio.current_time()
        if now - self._pruned_at < self._idle_s:
            return
        self._pruned_at = now
        # Take the stale streams out first, then close them: closing awaits, and another
        # request may take or give back a stream meanwhile.
        stale: list[FrameStream] = []
        for key in list(self._idle):
            keep = []
            for stream, since in self._idle[key]:
                if now - since <= self._idle_s:
                    keep.append((stream, since))
                else:
                    stale.append(stream)
            if keep:
                self._idle[key][:] = keep  # in place: a request in _take holds this list
            else:
                del self._idle[key]
        for stream in stale:
            await stream.aclose()

    async def _give_back(self, key: tuple[str, str], stream: FrameStream) -> None:
        await self._prune()
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self._max_idle:
            await stream.aclose()
            return
        idle.append((stream, trio.current_time()))

    async def request(self, peer: str, protocol: str, frame: bytes, timeout: float) -> bytes:
        """Send ``frame`` and return the one reply frame. Raises TransportError (or another
        ProtocolError from opening) when the exchange failed, trio.TooSlowError past
        ``timeout`` seconds for the reply."""
        key = (peer, protocol)
        stream = await self._take(key)
        reused = stream is not None
        if stream is None:
            stream = await self._open(peer, protocol)
            self._count("streams.pool_opened")
        else:
            self._count("streams.pool_reused")
        try:
            reply = await self._exchange(stream, frame, timeout)
        except TransportError:
            if not reused:
                raise
            # The reused stream broke before its reply: the server closed it (idle, restarted,
            # or an older peer answering one request per stream). One fresh stream carries it.
            stream = await self._open(peer, protocol)
            self._count("streams.pool_opened")
            self._count("streams.pool_reopened")
            reply = await self._exchange(stream, frame, timeout)
        await self._give_back(key, stream)
        return reply

    @staticmethod
    async def _exchange(stream: FrameStream, frame: bytes, timeout: float) -> bytes:
        done = False
        try:
            await stream.send(frame)
            with trio.fail_after(timeout):
                reply = await stream.receive()
            done = True
            return reply
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def aclose(self) -> None:
        """Close every idle stream."""
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for stream, _ in streams:
                await stream.aclose()


async def serve_requests(
    stream: FrameStream,
    answer: Callable[[bytes], bytes],
    *,
    reply_s: float,
    idle_s: float = SERVE_IDLE_S,
) -> int:
    """Answer request frames on one stream until the peer closes it or is idle ``idle_s``
    seconds (protocol/SPEC.md §8.4); return how many were answered.

    ``answer(frame)`` judges one request and returns the reply frame; each request is judged on
    its own, so a rejected (hostile) frame leaves the next one unaffected. The first request
    must come within ``reply_s`` (as for a one-shot stream); ``reply_s`` also bounds sending
    each reply. Frames that break the framing end the stream (FrameStream.receive raises).
    The caller closes the stream.
    """
    answered = 0
    while True:
        frame: bytes | None = None
        with trio.move_on_after(reply_s if answered == 0 else idle_s):
            try:
                frame = await stream.receive()
            except TransportError:
                pass  # closed by the peer (an older one closes after one reply), or reset
        if frame is None:
            return answered
        reply = answer(frame)
        with trio.move_on_after(reply_s) as scope:
            try:
                await stream.send(reply)
            except TransportError:
                return answered
        if scope.cancelled_caught:
            return answered
        answered += 1
