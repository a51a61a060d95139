"""peerd/blobs.py: layout, atomic writes, digest validation, partial downloads, gc."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from peerd.blobs import BlobNotFoundError, BlobStore
from protocol.errors import LocalProtocolError, RemoteProtocolError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", max_blob_bytes=1 << 20)


def test_put_bytes_layout_and_reads(store: BlobStore) -> None:
    data = b"hello blob"
    d = store.put_bytes(data)
    assert d == sha(data)
    assert store.path(d) == store.root / d[:2] / d[2:4] / d
    assert store.has(d)
    assert store.size(d) == len(data)
    assert store.read(d) == data
    assert store.digests() == [d]
    assert os.stat(store.path(d)).st_mode & 0o777 == 0o444  # content-addressed files never change


def test_put_is_idempotent(store: BlobStore) -> None:
    d = store.put_bytes(b"same")
    ino = store.path(d).stat().st_ino
    assert store.put_bytes(b"same") == d
    assert store.put_file(store.path(d)) == d
    assert store.path(d).stat().st_ino == ino
    assert list((store.root / "tmp").iterdir()) == []


def test_empty_blob(store: BlobStore) -> None:
    d = store.put_bytes(b"")
    assert d == sha(b"")
    assert store.read(d) == b""


def test_put_file_streams_and_caps(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "input.bin"
    data = os.urandom(700_000)
    src.write_bytes(data)
    assert store.put_file(src) == sha(data)
    assert store.read(sha(data)) == data

    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * ((1 << 20) + 1))
    with pytest.raises(LocalProtocolError) as info:
        store.put_file(big)
    assert info.value.reason == "too_large"
    with pytest.raises(LocalProtocolError):
        store.put_bytes(b"\0" * ((1 << 20) + 1))
    assert store.digests() == [sha(data)]
    assert list((store.root / "tmp").iterdir()) == []  # the aborted copy left nothing


@pytest.mark.parametrize(
    "bad", ["", "../../etc/passwd", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "/" + "a" * 63, "aa/" + "b" * 61]
)
def test_digest_validation_blocks_traversal(store: BlobStore, bad: str) -> None:
    assert not store.has(bad)
    for call in (store.path, store.size, store.read, store.open_partial, store.delete):
        with pytest.raises(LocalProtocolError) as info:
            call(bad)
        assert info.value.reason == "bad_digest"


def test_absent_blob(store: BlobStore) -> None:
    d = sha(b"nope")
    assert not store.has(d)
    with pytest.raises(BlobNotFoundError):
        store.path(d)
    with pytest.raises(KeyError):  # BlobNotFoundError is a KeyError
        store.read(d)
    store.delete(d)  # absent is fine


def test_delete_and_gc(store: BlobStore) -> None:
    keep = store.put_bytes(b"keep")
    drop = store.put_bytes(b"drop")
    gone = store.put_bytes(b"gone")
    store.delete(gone)
    assert not store.has(gone)
    idle = sha(b"idle partial")
    with store.open_partial(idle) as p:
        p.write(b"idle")
    busy = sha(b"busy partial")
    held = store.open_partial(busy)
    held.write(b"busy")
    try:
        assert store.gc({keep}) == 2  # `drop` and the idle partial; the held partial survives
        assert store.digests() == [keep]
        assert store.partial_size(idle) == 0
        assert store.partial_size(busy) == 4
    finally:
        held.close()
    store.prune_empty_dirs()
    assert store.has(keep)
    assert not store.has(drop)


def test_partial_resume_and_finalize(store: BlobStore) -> None:
    data = os.urandom(300_000)
    d = sha(data)
    with store.open_partial(d) as p:
        assert p.offset == 0
        p.write(data[:100_000])
    assert store.partial_size(d) == 100_000
    assert not store.has(d)  # a partial is never visible as a blob
    with store.open_partial(d) as p:
        assert p.offset == 100_000  # resume point survives reopening
        p.write(data[100_000:])
        final = p.finalize()
    assert final == store.path(d)
    assert store.read(d) == data
    assert store.partial_size(d) == 0


def test_partial_hash_mismatch_removes_partial(store: BlobStore) -> None:
    d = sha(b"the real thing")
    p = store.open_partial(d)
    p.write(b"a forgery")
    with pytest.raises(RemoteProtocolError) as info:
        p.finalize()
    assert info.value.reason == "hash_mismatch"
    assert not store.has(d)
    assert store.partial_size(d) == 0
    assert not (store.root / "partial" / f"{d}.part").exists()


def test_partial_is_exclusive(store: BlobStore) -> None:
    d = sha(b"x")
    with store.open_partial(d):
        with pytest.raises(LocalProtocolError) as info:
            store.open_partial(d)
        assert info.value.reason == "partial_in_use"
    with store.open_partial(d):  # released on close
        pass


def test_partial_enforces_store_cap(store: BlobStore) -> None:
    d = sha(b"x")
    with store.open_partial(d) as p:
        p.write(b"\0" * (1 << 20))
        with pytest.raises(RemoteProtocolError) as info:
            p.write(b"\0")
        assert info.value.reason == "too_large"


def test_partial_reset(store: BlobStore) -> None:
    data = b"0123456789"
    with store.open_partial(sha(data)) as p:
        p.write(b"garbage garbage")
        p.reset()
        assert p.offset == 0
        p.write(data)
        p.finalize()
    assert store.read(sha(data)) == data


def test_leftover_tmp_files_are_removed_on_open(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    BlobStore(root, max_blob_bytes=10)
    (root / "tmp" / "put-abc").write_bytes(b"half")
    BlobStore(root, max_blob_bytes=10)
    assert list((root / "tmp").iterdir()) == []


def test_kill_9_never_leaves_a_final_file_half_written(tmp_path: Path) -> None:
    """A child process is SIGKILLed while writing a large blob: no final name may appear."""
    root = tmp_path / "blobs"
    marker = tmp_path / "writing"
    code = textwrap.dedent(
        f"""
        import os, pathlib
        import peerd.blobs as blobs
        store = blobs.BlobStore(pathlib.Path({str(root)!r}), max_blob_bytes=1 << 30)
        real_fsync = os.fsync
        def fsync_then_wait(fd):
            real_fsync(fd)
            pathlib.Path({str(marker)!r}).write_text("x")
            import time
            while True:  # hold here, after the data is written but before the rename
                time.sleep(1)
        os.fsync = fsync_then_wait
        store.put_bytes(os.urandom(8 << 20))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        for _ in range(600):  # bounded poll (≤ 60 s) for the child to reach the window
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "child never reached the write"
    finally:
        child.kill()
        child.wait()
    store = BlobStore(root, max_blob_bytes=1 << 30)
    assert store.digests() == []  # nothing under a final name
    assert list((root / "tmp").iterdir()) == []  # and the temp file is cleaned at open
