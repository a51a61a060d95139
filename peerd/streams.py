"""The framed-stream interface the daemon uses between peers, and an in-memory fake.

``peerd.p2p`` implements :class:`FrameStream` over libp2p streams; component tests use
:func:`memory_stream_pair`. Everything above the transport (bids, blob transfer, result
delivery) is written against this interface only, so it never sees libp2p.
"""

from __future__ import annotations

from typing import Protocol

import trio

from protocol.errors import TransportError
from protocol.framing import MAX_FRAME


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
