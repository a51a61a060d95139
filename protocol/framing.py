"""Length-prefixed frames for peer-to-peer streams, sans-IO.

A frame is a 4-byte big-endian unsigned length followed by that many payload bytes.
Large objects (blobs, weights) are never sent as one frame: they are chunked by the
blob protocol, and each frame is capped at :data:`MAX_FRAME` so a hostile peer cannot
make us buffer more than that before we can judge it (py-libp2p trap 9/10 in
docs/design.md appendix B.1: its own exact-read helper fails above ~6.5 MB and yamux
resets streams whose reader stalls, so we frame and acknowledge ourselves).
"""

from __future__ import annotations

import struct

from protocol.errors import LocalProtocolError, RemoteProtocolError

#: Largest payload of one frame. 1 MiB keeps per-stream buffering bounded while
#: amortising framing overhead (~0.0004%).
MAX_FRAME = 1 << 20

_HEADER = struct.Struct(">I")


def encode_frame(payload: bytes, *, max_frame: int = MAX_FRAME) -> bytes:
    if len(payload) > max_frame:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds {max_frame}", reason="oversized")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Buffer bytes in, pull whole frames out (h11's receive_data / next_event shape)."""

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises RemoteProtocolError as soon as a header announces an oversized frame,
        before any of its payload is buffered.
        """
        if len(self._buf) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buf, 0)
        if length > self._max:
            raise RemoteProtocolError(
                f"peer announced a {length}-byte frame (max {self._max})", reason="oversized"
            )
        end = _HEADER.size + length
        if len(self._buf) < end:
            return None
        frame = bytes(self._buf[_HEADER.size : end])
        del self._buf[:end]
        return frame

    @property
    def buffered(self) -> int:
        return len(self._buf)
