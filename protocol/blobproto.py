"""Messages and flow-control rules of the blob transfer protocol ``/peerd/blob/2.0.0``, sans-IO.

Bulk data (task inputs, shard outputs, model weights) never rides gossip (docs/design.md §3.5): it is
stored content-addressed by SHA-256 and fetched peer to peer over this protocol.

Transport
---------
One libp2p stream per request, opened by the *receiver* (the peer that wants the blob) with
protocol ID ``/peerd/blob/2.0.0``. The stream carries frames (``protocol/framing.py``: 4-byte
big-endian length + payload, payload at most ``MAX_FRAME`` = 1 MiB). Every frame payload is
exactly one message below.

Messages
--------
Each message is a msgpack map in **canonical form**: string keys sorted by their UTF-8 bytes,
integers and lengths in their shortest msgpack encoding, byte strings as msgpack ``bin``,
text as msgpack ``str``, no other keys. A decoder re-encodes what it decoded and rejects the
frame if the bytes differ (this rejects unsorted or duplicate keys and over-wide integers),
and rejects unknown or missing keys and wrong types. Every map has a ``type`` key:

=========  ==============================  ==========================================================
``type``   other keys                      meaning
=========  ==============================  ==========================================================
``get``    ``sha256`` str, ``offset`` int  receiver → sender: send blob ``sha256`` from byte ``offset``
``header`` ``status`` str, ``size`` int    sender → receiver: answer to ``get``
``chunk``  ``data`` bin                    sender → receiver: the next 1…CHUNK bytes of the blob
``ack``    ``received`` int                receiver → sender: bytes of the blob held so far
``end``    ``sha256`` str                  sender → receiver: all bytes sent
=========  ==============================  ==========================================================

``sha256`` is 64 lowercase hex characters. Integers are 0 ≤ n ≤ 2**63 − 1 (msgpack uint/int,
never bool). ``status`` is one of ``ok``, ``not_found`` (absent, or the requester is not
allowed to see it — the two are deliberately indistinguishable), ``too_large`` (the sender
refuses to serve blobs of this size), ``busy`` (the sender is at its concurrency limit; retry
later). ``size`` is the blob's total size in bytes for ``ok`` and ``too_large``, 0 otherwise.

Exchange
--------
1. The receiver sends ``get(sha256, offset)``. ``offset`` is the number of bytes it already
   holds from an earlier, interrupted transfer (0 for a fresh one).
2. The sender answers ``header(status, size)``. Unless ``status`` is ``ok`` it closes the
   stream after the header. If ``offset > size`` it sends ``header(ok, size)`` then ``end`` at
   once and closes; the receiver then knows its partial data is not a prefix of this blob,
   discards it, closes without an ack and may ask again from 0 on a new stream. A receiver
   whose cap is below ``size`` closes the stream right after the header.
3. With ``ok``, the sender sends ``chunk`` messages carrying bytes ``offset … size − 1`` in
   order, each of 1 to CHUNK bytes, then ``end(sha256)``. An empty chunk is a protocol error
   (it would make no progress yet keep a stalled transfer looking alive).
4. Flow control, counted in blob bytes from the request's ``offset``:

   * The receiver sends ``ack(received)`` — ``received`` is absolute: ``offset`` plus chunk bytes
     received on this stream — whenever the bytes received since its previous ack (or since
     ``offset``) reach ACK_EVERY (1 MiB). It may ack more often; acks never decrease and never
     exceed the bytes received. The sender treats any other ack, or any message other than
     ``ack`` after the ``get``, as a protocol error.
   * The sender never has more than WINDOW (4 MiB) sent but not yet acknowledged: it sends a
     chunk of ``n`` bytes only if ``sent + n − acked ≤ WINDOW``, and otherwise waits for an ack.
   * After ``end`` the receiver sends a final ``ack(size)`` and closes; the sender waits for that
     ack (bounded by a timeout) before closing, so closing never cuts off the tail of the data.

   No deadlock is possible because CHUNK ≤ WINDOW − ACK_EVERY: when the sender is blocked,
   more than WINDOW − CHUNK ≥ ACK_EVERY bytes are unacknowledged, so once the receiver has read
   them it has sent an ack.
5. The receiver hashes what it holds when ``end`` arrives and keeps the blob only if the SHA-256
   equals the requested one; it stops reading as soon as the bytes exceed ``size`` or ``size``
   exceeds its own cap (a lying sender is cut off, it cannot fill the disk).
6. A dropped stream is resumed by a new stream whose ``get`` carries the bytes already held.
7. Neither side waits forever: peerd gives up on a stream when the other side makes no progress
   (no frame, or no window) for 30 s, and the receiver retries with backoff (resuming).

Why acknowledge at all (py-libp2p trap 10, docs/design.md appendix B.1): a yamux write waits at most 5 s for
the peer to grant window and then resets the stream ("Timed out waiting for window update").
Two rules follow. Both sides always drain: the receiver reads chunks as they arrive, and the
sender reads acks concurrently with sending, so neither side's writes ever wait on a reader
that has stopped. And the sender never pushes into the stream without limit: with WINDOW bytes
unacknowledged it waits in its own code, under its own timeout, where a stall is visible and
cancellable, and whatever buffers lie between the two applications (muxer windows, a send
queue in the stream implementation) hold at most WINDOW bytes of one transfer.

Any message other than the ones expected at a given step is a protocol error; the side that
sees it closes the stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

import msgpack

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.framing import MAX_FRAME

PROTOCOL_ID = "/peerd/blob/2.0.0"

#: Largest ``chunk`` payload. 256 KiB equals py-libp2p yamux's initial per-stream window
#: (``DEFAULT_WINDOW_SIZE = 256 * 1024`` in libp2p/stream_muxer/yamux/yamux.py), so one chunk
#: is about one muxer window update; it is large enough that per-message costs (a msgpack header,
#: one await, one hash update, a 12-byte yamux header) are amortised — ~400 messages/s at
#: 100 MB/s — and small enough that hashing and writing one chunk (~0.2 ms) never stalls the
#: event loop noticeably and a dropped stream loses little. Its frame stays far below MAX_FRAME.
CHUNK = 256 * 1024

#: Most bytes the sender may have sent but not had acknowledged: 16 chunks = 4 MiB. That is
#: what a slow receiver can make the sender (and the muxer) buffer per stream. It caps
#: throughput at about (WINDOW − ACK_EVERY) / (RTT + a loss's recovery): on a 100 Mbit/s WAN
#: link with 80 ms RTT and 1 % loss the emulated devnet measured an 8 MiB blob at 1.04–1.16 s
#: with 4 MiB against 1.37–2.02 s with 2 MiB (docs/benchmarks.md, 2026-12-04 night). Until
#: then it was 2 MiB; only the sender reads it, so the change needs no new protocol version.
WINDOW = 16 * CHUNK

#: The receiver acknowledges every ACK_EVERY bytes (1 MiB), so the sender gets an ack before
#: it runs out of window and never idles for a round trip. Fixed, not a share of WINDOW: a
#: receiver that acked less often would stall a sender that still keeps the old 2 MiB window.
ACK_EVERY = 4 * CHUNK

#: Upper bound of every integer field (a size no real blob reaches; keeps values in int64).
MAX_INT = 2**63 - 1

# The largest valid message is a full chunk: fixmap(2) + "data" + bin32 header + CHUNK bytes
# + "type" + "chunk". Anything longer is rejected before msgpack sees it.
_MAX_MESSAGE = CHUNK + 64
assert CHUNK <= WINDOW - ACK_EVERY, "flow control could deadlock"
assert _MAX_MESSAGE <= MAX_FRAME

Status = Literal["ok", "not_found", "too_large", "busy"]
STATUSES: frozenset[str] = frozenset(get_args(Status))

_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_digest(value: object) -> bool:
    """True if ``value`` is a SHA-256 hex digest in our canonical form (64 lowercase hex)."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _check_digest(value: object) -> None:
    if not is_digest(value):
        raise LocalProtocolError("sha256 must be 64 lowercase hex characters", reason="bad_digest")


def _check_int(name: str, value: object) -> None:
    # bool is an int subclass in Python but a distinct msgpack type: never accept it.
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise LocalProtocolError(f"{name} must be an int in [0, 2**63-1]", reason="bad_field")


@dataclass(frozen=True, slots=True)
class GetRequest:
    """Receiver → sender: send blob ``sha256`` starting at byte ``offset`` (resume)."""

    sha256: str
    offset: int

    def __post_init__(self) -> None:
        _check_digest(self.sha256)
        _check_int("offset", self.offset)


@dataclass(frozen=True, slots=True)
class GetHeader:
    """Sender → receiver: the answer to a GetRequest; chunks follow only if status is ``ok``."""

    status: Status
    size: int

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise LocalProtocolError(f"unknown status {self.status!r}", reason="bad_field")
        _check_int("size", self.size)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Sender → receiver: the next 1…CHUNK bytes of the blob."""

    data: bytes

    def __post_init__(self) -> None:
        if type(self.data) is not bytes or not 1 <= len(self.data) <= CHUNK:
            raise LocalProtocolError(f"chunk data must be 1..{CHUNK} bytes", reason="bad_chunk")


@dataclass(frozen=True, slots=True)
class Ack:
    """Receiver → sender: the blob's bytes held so far (absolute, counting the request offset)."""

    received: int

    def __post_init__(self) -> None:
        _check_int("received", self.received)


@dataclass(frozen=True, slots=True)
class End:
    """Sender → receiver: every byte has been sent."""

    sha256: str

    def __post_init__(self) -> None:
        _check_digest(self.sha256)


Message = GetRequest | GetHeader | Chunk | Ack | End

# Wire tag and field types of each message; the single table both codec directions use.
_TAGS: dict[type, str] = {GetRequest: "get", GetHeader: "header", Chunk: "chunk", Ack: "ack", End: "end"}
_FIELDS: dict[str, tuple[type, dict[str, type]]] = {
    "get": (GetRequest, {"sha256": str, "offset": int}),
    "header": (GetHeader, {"status": str, "size": int}),
    "chunk": (Chunk, {"data": bytes}),
    "ack": (Ack, {"received": int}),
    "end": (End, {"sha256": str}),
}


def _pack(msg: Message) -> bytes:
    tag = _TAGS[type(msg)]
    _, fields = _FIELDS[tag]
    obj: dict[str, Any] = {name: getattr(msg, name) for name in fields}
    obj["type"] = tag
    # Canonical: keys sorted (all keys are ASCII, so str order == UTF-8 byte order); msgpack
    # already writes the shortest int/length forms and, with use_bin_type, bytes as bin.
    return msgpack.packb(dict(sorted(obj.items())), use_bin_type=True)


def encode(msg: Message) -> bytes:
    """The canonical bytes of ``msg`` (one frame payload). Raises LocalProtocolError on misuse."""
    if type(msg) not in _TAGS:
        raise LocalProtocolError(f"not a blob message: {type(msg).__name__}", reason="bad_message")
    return _pack(msg)


#: A chunk's canonical encoding around its bytes: fixmap(2), "data", a bin header (bin8, bin16
#: or bin32, the shortest for the length), the bytes, then "type": "chunk".
_CHUNK_HEAD = b"\x82\xa4data"
_CHUNK_TAIL = b"\xa4type\xa5chunk"
#: bin marker → (width of its length field, the least length it is the shortest form for).
_BIN_HEADERS = {0xC4: (1, 0), 0xC5: (2, 0x100), 0xC6: (4, 0x10000)}


def _canonical_chunk(data: bytes) -> Chunk | None:
    """``data`` as a Chunk if it is exactly a chunk's canonical encoding, else None.

    Every 256 KiB of a blob is a chunk, and the general path below copies the bytes twice
    more (msgpack's unpack, then the re-encoding it compares against); this reads the fixed
    shape instead. It accepts exactly what the general path accepts as a chunk: the bytes
    between a matching head and tail are the only payload whose canonical encoding they are.
    """
    if len(data) <= 7 or not data.startswith(_CHUNK_HEAD) or not data.endswith(_CHUNK_TAIL):
        return None
    header = _BIN_HEADERS.get(data[6])
    if header is None:
        return None
    width, shortest_from = header
    n = int.from_bytes(data[7 : 7 + width], "big")
    body = 7 + width
    if n < shortest_from or not 1 <= n <= CHUNK or len(data) != body + n + len(_CHUNK_TAIL):
        return None
    return Chunk(data[body : body + n])


def decode(data: bytes) -> Message:
    """Parse one frame payload. Only RemoteProtocolError escapes, whatever ``data`` holds."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError("frame is not bytes", reason="malformed")
    data = bytes(data)
    if len(data) > _MAX_MESSAGE:
        raise RemoteProtocolError(f"blob message of {len(data)} bytes", reason="oversized")
    chunk = _canonical_chunk(data)
    if chunk is not None:
        return chunk
    return _decode_any(data)


def _decode_any(data: bytes) -> Message:
    """Every message kind, through msgpack; the canonical form is checked by re-encoding."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=64,
            max_bin_len=CHUNK,
            max_array_len=0,
            max_map_len=3,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, ExtraData, StackError, ...)
        raise RemoteProtocolError(f"undecodable blob message: {exc}", reason="malformed") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("blob message is not a map", reason="malformed")
    tag = obj.get("type")
    if not isinstance(tag, str) or tag not in _FIELDS:
        raise RemoteProtocolError(f"unknown blob message type {tag!r}", reason="unknown_type")
    cls, fields = _FIELDS[tag]
    if set(obj) != {*fields, "type"}:
        raise RemoteProtocolError(f"{tag}: keys {sorted(map(str, obj))} are wrong", reason="bad_field")
    for name, want in fields.items():
        if type(obj[name]) is not want:
            raise RemoteProtocolError(f"{tag}.{name} must be {want.__name__}", reason="bad_field")
    try:
        msg: Message = cls(**{name: obj[name] for name in fields})
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"{tag}: {exc}", reason=exc.reason) from None
    if _pack(msg) != data:
        raise RemoteProtocolError(f"{tag}: non-canonical encoding", reason="non_canonical")
    return msg


class SendWindow:
    """The sender's side of the flow-control rule (exchange step 4), as pure bookkeeping.

    ``offset`` is the request's offset; ``sent`` and ``acked`` are absolute byte positions.
    """

    def __init__(self, offset: int, size: int) -> None:
        self.size = size
        self.sent = offset
        self.acked = offset

    def can_send(self, n: int) -> bool:
        return self.sent + n - self.acked <= WINDOW

    def on_sent(self, n: int) -> None:
        if not self.can_send(n) or self.sent + n > self.size:
            raise LocalProtocolError("chunk sent outside the window or past the end", reason="window")
        self.sent += n

    def on_ack(self, ack: Ack) -> None:
        """Record an ack; a decreasing ack or one beyond what was sent is the receiver's fault."""
        if not self.acked <= ack.received <= self.sent:
            raise RemoteProtocolError(
                f"ack {ack.received} outside [{self.acked}, {self.sent}]", reason="bad_ack"
            )
        self.acked = ack.received

    @property
    def complete(self) -> bool:
        """True once the receiver has acknowledged the whole blob (the final ack)."""
        return self.acked == self.size and self.sent == self.size


class ReceiveWindow:
    """The receiver's side: validates chunks against the header and says when to ack."""

    def __init__(self, offset: int, size: int) -> None:
        if offset > size:
            raise LocalProtocolError("offset beyond size", reason="window")
        self.size = size
        self.received = offset
        self._last_ack = offset

    def on_chunk(self, chunk: Chunk) -> Ack | None:
        """Account for a chunk; return the Ack to send now, if one is due.

        Raises RemoteProtocolError(reason="too_large") if the sender goes past the size it
        announced — the caller must stop reading (a lying sender is cut off here).
        """
        if self.received + len(chunk.data) > self.size:
            raise RemoteProtocolError(f"sender sent past the announced size {self.size}", reason="too_large")
        self.received += len(chunk.data)
        if self.received - self._last_ack >= ACK_EVERY:
            self._last_ack = self.received
            return Ack(self.received)
        return None

    def on_end(self, end: End, digest: str) -> Ack:
        """Check ``end`` against the request; return the final Ack to send."""
        if self.received != self.size:
            raise RemoteProtocolError(f"end after {self.received} of {self.size} bytes", reason="short")
        if end.sha256 != digest:
            raise RemoteProtocolError("end names another blob", reason="hash_mismatch")
        self._last_ack = self.received
        return Ack(self.received)
