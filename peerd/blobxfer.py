"""Blob transfer over a FrameStream: serve one request, or fetch a blob with resume.

The wire protocol (messages, exchange, flow-control rule) is specified in
``protocol/blobproto.py``; this module only drives it with trio. Both sides are written
against :class:`peerd.streams.FrameStream`, never libp2p.

Memory is bounded on both sides: the server holds one chunk (CHUNK = 256 KiB) at a time and
never has more than WINDOW (4 MiB) unacknowledged in the stream; the client queues at most
_PIPELINE_CHUNKS received chunks for its writer, which appends them to the partial file and
hashes them incrementally.

Disk I/O: a chunk's read (server) is done synchronously on the event loop (~0.1 ms against the
page cache). The client's write + hash runs in a worker thread, a batch of queued chunks per
hop, beside the receive loop: SHA-256 alone costs ~9 ms per MiB on this machine's CPUs, a
quarter of a transfer's time when it ran on the loop (docs/benchmarks.md, issue 10). Whole-file
work (rehashing a partial at resume, fsync + rename at the end) runs in a thread too.
A blob becomes visible only through PartialBlob.finalize (hash checked, fsync, rename).
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from peerd.blobs import BlobStore, PartialBlob
from peerd.streams import FrameStream
from protocol import blobproto
from protocol.blobproto import (
    CHUNK,
    Ack,
    Chunk,
    End,
    GetHeader,
    GetRequest,
    Message,
    ReceiveWindow,
    SendWindow,
    is_digest,
)
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError, TransportError

PROTOCOL_ID = blobproto.PROTOCOL_ID

log = logging.getLogger(__name__)

#: Default time either side waits for the other to make progress (one frame, or window to
#: open) before giving up on the stream. Well above yamux's own 5 s stall reset.
IDLE_TIMEOUT = 30.0

#: Closing must not hang the caller (a peer that never answers a FIN), nor be skipped on cancel.
_CLOSE_TIMEOUT = 5.0

#: Longest pause between fetch attempts (the backoff doubles up to this).
_MAX_BACKOFF = 5.0

#: Chunks received but not yet written and hashed (the receive pipeline's bound: 2 MiB).
_PIPELINE_CHUNKS = 8

#: The receiver's writer flushes the partial file to disk every this many bytes.
_SYNC_EVERY = 16 << 20


async def _close(stream: FrameStream) -> None:
    # Shielded so that a cancelled caller still releases the stream, bounded so it cannot hang.
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLOSE_TIMEOUT):
        await stream.aclose()


async def _send(stream: FrameStream, msg: Message, idle_timeout: float) -> None:
    with trio.move_on_after(idle_timeout) as scope:
        await stream.send(blobproto.encode(msg))
    if scope.cancelled_caught:
        raise TransportError("peer stopped reading", reason="timeout")


async def _receive(stream: FrameStream, idle_timeout: float) -> Message:
    with trio.move_on_after(idle_timeout) as scope:
        raw = await stream.receive()
    if scope.cancelled_caught:
        raise TransportError("peer went silent", reason="timeout")
    return blobproto.decode(raw)


# -- serving -----------------------------------------------------------------------------------


async def serve_blob(
    stream: FrameStream,
    store: BlobStore,
    *,
    allow: Callable[[str, str], bool] = lambda peer, digest: True,
    max_bytes: int | None = None,
    limiter: trio.CapacityLimiter | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> None:
    """Handle one ``get`` on an accepted stream, then close it.

    ``allow(peer, digest)`` decides whether ``stream.remote_peer`` may have the blob; a refusal
    is answered ``not_found`` so that it does not reveal what we hold. Blobs larger than
    ``max_bytes`` are answered ``too_large``. With a ``limiter``, a request arriving while all
    its tokens are taken is answered ``busy`` (the client retries later) instead of queueing.

    Never raises for anything the peer does (garbage, stalls, resets): it logs, closes the
    stream and returns — an exception escaping a libp2p handler would take the host down
    (py-libp2p trap 7).
    """
    peer = stream.remote_peer
    try:
        await _serve(stream, store, allow, max_bytes, limiter, idle_timeout)
    except LocalProtocolError:
        log.exception("blob serve to %s: our own protocol misuse", peer)
    except ProtocolError as exc:  # RemoteProtocolError and TransportError: the peer's doing
        log.debug("blob serve to %s ended: %s (%s)", peer, exc, exc.reason)
    except OSError as exc:  # e.g. the blob was deleted or the disk failed while serving
        log.warning("blob serve to %s failed locally: %s", peer, exc)
    finally:
        await _close(stream)


async def _serve(
    stream: FrameStream,
    store: BlobStore,
    allow: Callable[[str, str], bool],
    max_bytes: int | None,
    limiter: trio.CapacityLimiter | None,
    idle_timeout: float,
) -> None:
    req = await _receive(stream, idle_timeout)
    if not isinstance(req, GetRequest):
        raise RemoteProtocolError(f"expected get, got {type(req).__name__}", reason="unexpected")
    token = object()
    if limiter is not None:
        try:
            limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            await _send(stream, GetHeader("busy", 0), idle_timeout)
            return
    try:
        if not (allow(stream.remote_peer, req.sha256) and store.has(req.sha256)):
            await _send(stream, GetHeader("not_found", 0), idle_timeout)
            return
        # Open once and serve from the descriptor: a concurrent delete (gc) cannot pull the
        # file out from under us, and fstat gives the size of exactly what we serve.
        with open(store.path(req.sha256), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                await _send(stream, GetHeader("too_large", size), idle_timeout)
                return
            await _send(stream, GetHeader("ok", size), idle_timeout)
            if req.offset > size:
                # The client's partial is not a prefix of this blob: tell it so (spec step 2).
                await _send(stream, End(req.sha256), idle_timeout)
                return
            f.seek(req.offset)
            await _send_body(stream, f.read, req.sha256, req.offset, size, idle_timeout)
    finally:
        if limiter is not None:
            limiter.release_on_behalf_of(token)


async def _send_body(
    stream: FrameStream,
    read: Callable[[int], bytes],
    digest: str,
    offset: int,
    size: int,
    idle_timeout: float,
) -> None:
    """Send chunks within the window while a second task drains acks (trap 10: always drain)."""
    window = SendWindow(offset, size)
    acked = trio.Event()  # replaced after every ack; waiters wait on the current one
    failure: list[BaseException] = []

    async def read_acks(cancel: trio.CancelScope) -> None:
        nonlocal acked
        try:
            while not window.complete:
                # No timeout here: the sending side times out when it actually waits for window.
                msg = blobproto.decode(await stream.receive())
                if not isinstance(msg, Ack):
                    raise RemoteProtocolError(f"expected ack, got {type(msg).__name__}", reason="unexpected")
                window.on_ack(msg)
                acked.set()
                acked = trio.Event()
        except ProtocolError as exc:
            failure.append(exc)
            cancel.cancel()

    async def wait_for(ready: Callable[[], bool], what: str) -> None:
        with trio.move_on_after(idle_timeout) as scope:
            while not ready():
                await acked.wait()
        if scope.cancelled_caught:
            raise TransportError(f"no ack while waiting for {what}", reason="timeout")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_acks, nursery.cancel_scope)
        try:
            pos = offset
            while pos < size:
                n = min(CHUNK, size - pos)
                await wait_for(functools.partial(window.can_send, n), "window")
                data = read(n)
                if len(data) != n:
                    raise OSError(f"blob {digest} shrank while being served")
                # Account before sending: the ack for these bytes may be processed before
                # send() returns, and it must not look like an ack for unsent bytes.
                window.on_sent(n)
                await _send(stream, Chunk(data), idle_timeout)
                pos += n
            await _send(stream, End(digest), idle_timeout)
            # Wait for the final ack so that closing cannot cut off the tail (spec step 4).
            await wait_for(lambda: window.complete, "the final ack")
        except (ProtocolError, OSError) as exc:
            failure.append(exc)
        nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]


# -- fetching ----------------------------------------------------------------------------------


async def fetch_from_any(
    fetch_one: Callable[[str], Awaitable[Path]],
    peers: Sequence[str],
    *,
    passes: int = 1,
    pause_s: float = 1.0,
    give_up: Callable[[str, ProtocolError], bool] | None = None,
) -> Path:
    """Fetch one blob from the first of ``peers`` that serves it: the one rule for "from any
    peer" (committee inputs, certified outputs, results, task inputs).

    ``fetch_one(peer)`` is one provider's fetch (:func:`fetch_blob`, which already retries
    transport failures and resumes the partial). Peers are tried in the given order; every
    peer's bytes are hash-checked, so who serves them does not matter. Up to ``passes`` passes
    over the list, ``pause_s`` apart (trio time). ``give_up(peer, error)`` True ends the
    search at once (a committer that revealed other bytes than it committed to is not
    retried through others). Raises the last :class:`ProtocolError`, or a TransportError
    when ``peers`` is empty.
    """
    if passes < 1:
        raise LocalProtocolError("passes must be >= 1", reason="bad_argument")
    last: ProtocolError | None = None
    for n in range(passes):
        if n:
            await trio.sleep(pause_s)
        for peer in peers:
            try:
                return await fetch_one(peer)
            except ProtocolError as exc:
                log.info("blob not fetched from %s: %s", peer, exc)
                last = exc
                if give_up is not None and give_up(peer, exc):
                    raise
    if last is None:
        raise TransportError("no peer to fetch it from", reason="no_provider")
    raise last


class _RetryableError(RemoteProtocolError):
    """A failure that a fresh attempt may fix without blaming the peer (busy, stale partial)."""


#: Failure reasons after which fetch_blob keeps the partial file (see _fetch_locked).
_KEEP_PARTIAL = frozenset({"not_found", "busy", "stale_partial"})

# One trio.Lock per (store, digest), so that concurrent fetches of one blob in this process
# wait for each other instead of failing on the partial's flock.
_fetch_locks: weakref.WeakKeyDictionary[BlobStore, dict[str, trio.Lock]] = weakref.WeakKeyDictionary()


async def fetch_blob(
    open_stream: Callable[[], Awaitable[FrameStream]],
    digest: str,
    store: BlobStore,
    *,
    max_bytes: int,
    attempts: int = 5,
    progress: Callable[[int, int], None] | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    backoff: float = 0.2,
) -> Path:
    """Fetch ``digest`` into ``store`` and return its final path.

    ``open_stream`` is called once per attempt (it may pick another provider each time).
    Each attempt asks for the bytes after those already in the partial file, so a dropped
    connection resumes instead of restarting. Transport failures (reset, EOF, a stall longer
    than ``idle_timeout``) and ``busy`` answers are retried up to ``attempts`` times in all,
    with exponential backoff from ``backoff`` seconds; the partial is kept on final failure
    so a later call resumes. ``progress(received, size)`` is called as bytes arrive.

    Raises:
      RemoteProtocolError(reason="not_found") — the peer does not have it (partial kept);
      RemoteProtocolError(reason="too_large") — announced or sent more than
        ``min(max_bytes, store.max_blob_bytes)`` (partial discarded, nothing stored);
      RemoteProtocolError(reason="hash_mismatch") — the bytes do not hash to ``digest``
        (partial discarded);
      RemoteProtocolError (other reasons) — the peer broke the protocol (partial discarded);
      TransportError — every attempt failed in transport (partial kept).
    """
    if not is_digest(digest):
        raise LocalProtocolError(f"not a sha256 hex digest: {digest!r}", reason="bad_digest")
    if attempts < 1:
        raise LocalProtocolError("attempts must be >= 1", reason="bad_argument")
    if store.has(digest):
        return store.path(digest)
    locks = _fetch_locks.setdefault(store, {})
    lock = locks.setdefault(digest, trio.Lock())
    try:
        async with lock:
            if store.has(digest):  # a concurrent fetch finished it while we waited
                return store.path(digest)
            limit = min(max_bytes, store.max_blob_bytes)
            return await _fetch_locked(
                open_stream, digest, store, limit, attempts, progress, idle_timeout, backoff
            )
    finally:
        if locks.get(digest) is lock and not lock.locked() and lock.statistics().tasks_waiting == 0:
            del locks[digest]


async def _fetch_locked(
    open_stream: Callable[[], Awaitable[FrameStream]],
    digest: str,
    store: BlobStore,
    limit: int,
    attempts: int,
    progress: Callable[[int, int], None] | None,
    idle_timeout: float,
    backoff: float,
) -> Path:
    # Opening rehashes what an earlier call left: whole-file work, so in a thread.
    partial = await trio.to_thread.run_sync(store.open_partial, digest)
    # Bytes left by an earlier call may come from a peer that lied or from a crash that lost
    # unsynced data; if the result does not verify, they (not this peer) may be at fault, so
    # such a mismatch earns one fresh start from offset 0.
    inherited = partial.offset > 0
    last: ProtocolError | None = None
    try:
        for attempt in range(attempts):
            if attempt:
                await trio.sleep(min(backoff * 2 ** (attempt - 1), _MAX_BACKOFF))
            try:
                await _attempt(open_stream, digest, partial, limit, progress, idle_timeout)
            except (TransportError, _RetryableError) as exc:
                log.debug("blob %s attempt %d: %s; resume at %d", digest, attempt + 1, exc, partial.offset)
                last = exc
                continue
            try:
                return await trio.to_thread.run_sync(partial.finalize)
            except RemoteProtocolError as exc:
                if exc.reason != "hash_mismatch" or not inherited:
                    raise
                inherited = False
                last = exc
                partial = await trio.to_thread.run_sync(store.open_partial, digest)  # finalize removed it
        assert last is not None
        if isinstance(last, TransportError):
            raise TransportError(
                f"fetching {digest} failed after {attempts} attempts: {last}", reason=last.reason
            ) from last
        raise RemoteProtocolError(
            f"fetching {digest} failed after {attempts} attempts: {last}", reason=last.reason
        ) from last
    except RemoteProtocolError as exc:
        # Keep the bytes for a later resume when nobody lied: the network failed (TransportError),
        # the peer was busy, or it lacks the blob (another provider may complete it). Otherwise
        # the peer broke the protocol and what it sent is not to be trusted.
        if not isinstance(exc, TransportError) and exc.reason not in _KEEP_PARTIAL:
            partial.discard()
        raise
    finally:
        partial.close()


async def _attempt(
    open_stream: Callable[[], Awaitable[FrameStream]],
    digest: str,
    partial: PartialBlob,
    limit: int,
    progress: Callable[[int, int], None] | None,
    idle_timeout: float,
) -> None:
    with trio.move_on_after(idle_timeout) as scope:
        stream = await open_stream()
    if scope.cancelled_caught:
        raise TransportError("opening a blob stream timed out", reason="timeout")
    try:
        await _receive_body(stream, digest, partial, limit, progress, idle_timeout)
    finally:
        await _close(stream)


async def _receive_body(
    stream: FrameStream,
    digest: str,
    partial: PartialBlob,
    limit: int,
    progress: Callable[[int, int], None] | None,
    idle_timeout: float,
) -> None:
    await _send(stream, GetRequest(digest, partial.offset), idle_timeout)
    header = await _receive(stream, idle_timeout)
    if not isinstance(header, GetHeader):
        raise RemoteProtocolError(f"expected header, got {type(header).__name__}", reason="unexpected")
    if header.status == "busy":
        raise _RetryableError("peer is busy", reason="busy")
    if header.status != "ok":
        raise RemoteProtocolError(f"peer answered {header.status}", reason=header.status)
    if header.size > limit:
        raise RemoteProtocolError(f"blob of {header.size} bytes exceeds the cap {limit}", reason="too_large")
    if header.size < partial.offset:
        partial.reset()
        raise _RetryableError("partial data is longer than the blob; starting over", reason="stale_partial")
    window = ReceiveWindow(partial.offset, header.size)
    if progress is not None:
        progress(window.received, header.size)
    # Receiving and storing run side by side (issue 10 item 3): this task reads frames and
    # acknowledges them; a writer task appends and hashes them in a worker thread, where
    # hashlib and the write release the GIL. The channel bounds what is received but not yet
    # written to _PIPELINE_CHUNKS chunks.
    send_ch, recv_ch = trio.open_memory_channel[bytes](_PIPELINE_CHUNKS)
    failure: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_chunks, recv_ch, partial, failure, nursery.cancel_scope)
        try:
            with send_ch:  # closing it lets the writer store what is queued, then stop
                await _receive_chunks(stream, digest, window, send_ch, progress, idle_timeout)
        except ProtocolError as exc:
            failure.append(exc)
    if failure:
        raise failure[0]
    # Every chunk is written and hashed now: the caller's finalize checks the whole blob.


async def _receive_chunks(
    stream: FrameStream,
    digest: str,
    window: ReceiveWindow,
    chunks: trio.MemorySendChannel[bytes],
    progress: Callable[[int, int], None] | None,
    idle_timeout: float,
) -> None:
    while True:
        msg = await _receive(stream, idle_timeout)
        if isinstance(msg, Chunk):
            ack = window.on_chunk(msg)  # raises before queueing if the peer sends past its size
            await chunks.send(msg.data)
            if progress is not None:
                progress(window.received, window.size)
            if ack is not None:
                try:
                    await _send(stream, ack, idle_timeout)
                except TransportError:
                    # Acks only pace the sender. One that closed its side after sending
                    # everything has left frames to read; a dead stream fails the next receive.
                    pass
        elif isinstance(msg, End):
            final = window.on_end(msg, digest)
            try:
                await _send(stream, final, idle_timeout)
            except TransportError:
                pass  # we hold every byte; the server may already have closed
            return
        else:
            raise RemoteProtocolError(f"expected chunk or end, got {type(msg).__name__}", reason="unexpected")


async def _write_chunks(
    chunks: trio.MemoryReceiveChannel[bytes],
    partial: PartialBlob,
    failure: list[BaseException],
    cancel: trio.CancelScope,
) -> None:
    """Append and hash queued chunks in a worker thread, a batch (what is queued) per hop.

    Only this task touches ``partial`` until the transfer's nursery ends. A thread call is not
    abandoned on cancel, so nothing writes to the partial after this task returns."""
    try:
        # Shielded: whatever was received is stored even when the fetch is cancelled (it is
        # resumed from there), bounded by _PIPELINE_CHUNKS; closing the channel ends the loop.
        with chunks, trio.CancelScope(shield=True):
            async for data in chunks:
                batch = [data]
                while True:
                    try:
                        batch.append(chunks.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await trio.to_thread.run_sync(_write_batch, partial, batch)
    except (ProtocolError, OSError) as exc:
        failure.append(exc)
        cancel.cancel()


def _write_batch(partial: PartialBlob, batch: list[bytes]) -> None:
    before = partial.offset
    for data in batch:
        partial.write(data)
    if before // _SYNC_EVERY != partial.offset // _SYNC_EVERY:
        # Push what is written to disk while the transfer goes on, so that finalize's fsync
        # has little left to flush (it still fsyncs everything before the rename).
        partial.flush()
