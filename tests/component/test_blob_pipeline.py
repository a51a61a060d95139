"""The blob receiver's pipeline (issue 10 item 3): chunks are written and hashed by a writer in
a worker thread beside the receive loop, and content addressing stays as strict as before — a
blob is visible only once its hash matched, and a failed transfer leaves nothing visible."""

from __future__ import annotations

import errno
import itertools
import os
import threading
from pathlib import Path

import pytest
import trio

from peerd import blobxfer
from peerd.blobs import BlobStore, PartialBlob
from peerd.blobxfer import fetch_blob
from protocol.blobproto import CHUNK
from protocol.errors import RemoteProtocolError
from tests.component.test_blobxfer import MiB, honest, liar, opener, sha


@pytest.fixture
def server_store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "server", max_blob_bytes=64 * MiB)


@pytest.fixture
def client_store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "client", max_blob_bytes=64 * MiB)


async def test_chunks_are_written_and_hashed_off_the_event_loop(
    server_store: BlobStore, client_store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on the code that wrote each chunk on the event loop (the trio thread)."""
    data = os.urandom(3 * MiB + 5)
    d = server_store.put_bytes(data)
    loop_thread = threading.current_thread()
    writers: list[threading.Thread] = []
    real_write = PartialBlob.write

    def recording_write(self: PartialBlob, chunk: bytes) -> None:
        writers.append(threading.current_thread())
        real_write(self, chunk)

    monkeypatch.setattr(PartialBlob, "write", recording_write)
    async with trio.open_nursery() as nursery:
        open_stream, _ = opener(nursery, honest(server_store))
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert path.read_bytes() == data
    assert len(writers) == -(-len(data) // CHUNK)
    assert loop_thread not in writers


async def test_flushes_to_disk_during_a_large_transfer(
    server_store: BlobStore, client_store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobxfer, "_SYNC_EVERY", MiB)
    flushed: list[int] = []
    real_flush = PartialBlob.flush

    def recording_flush(self: PartialBlob) -> None:
        flushed.append(self.offset)
        real_flush(self)

    monkeypatch.setattr(PartialBlob, "flush", recording_flush)
    data = os.urandom(4 * MiB)
    d = server_store.put_bytes(data)
    async with trio.open_nursery() as nursery:
        open_stream, _ = opener(nursery, honest(server_store))
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert path.read_bytes() == data
    assert flushed and all(a < b for a, b in itertools.pairwise(flushed))
    assert flushed[-1] <= len(data)


async def test_a_corrupt_chunk_is_rejected_and_nothing_is_visible(client_store: BlobStore) -> None:
    real = os.urandom(2 * MiB + 7)
    d = sha(real)
    corrupt = bytearray(real)
    corrupt[CHUNK + 3] ^= 0xFF  # one bit pattern in the second chunk
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, liar(bytes(corrupt)))
        with pytest.raises(RemoteProtocolError) as info:
            await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert info.value.reason == "hash_mismatch"
    assert len(streams) == 1
    assert not client_store.has(d) and client_store.digests() == []
    assert client_store.partial_size(d) == 0


async def test_a_disk_failure_in_the_writer_fails_the_fetch_and_shows_no_blob(
    server_store: BlobStore, client_store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * MiB)
    d = server_store.put_bytes(data)
    real_write = PartialBlob.write

    def failing_write(self: PartialBlob, chunk: bytes) -> None:
        if self.offset >= MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, chunk)

    monkeypatch.setattr(PartialBlob, "write", failing_write)
    async with trio.open_nursery() as nursery:
        open_stream, _ = opener(nursery, honest(server_store))
        with pytest.raises(OSError) as info:
            await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert info.value.errno == errno.ENOSPC
    assert not client_store.has(d) and client_store.digests() == []
    # What was written stays a partial (a resume continues it), never a visible blob.
    assert client_store.partial_size(d) == MiB
    monkeypatch.setattr(PartialBlob, "write", real_write)
    async with trio.open_nursery() as nursery:
        open_stream, streams = opener(nursery, honest(server_store))
        path = await fetch_blob(open_stream, d, client_store, max_bytes=16 * MiB)
    assert path.read_bytes() == data
    assert streams[0].requests[0].offset == MiB
