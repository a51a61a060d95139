"""The content-addressed blob store (docs/design.md §3.5, §7).

Layout under ``root`` (the ``blobs`` folder of the state dir)::

    aa/bb/<digest>            a complete blob, named by its SHA-256 (first two hex pairs fan out
                              the directories so none holds millions of entries); mode 0444
    partial/<digest>.part     a download in progress (append-only; see PartialBlob)
    tmp/                      files being written by put_bytes/put_file

Crash safety (a ``kill -9`` or power loss must never leave a half-written file under a final
name, docs/design.md §7 "a restart loses nothing that was acknowledged"): every final file is written
elsewhere on the same filesystem, fsynced, then ``rename``d into place — rename is atomic on
POSIX — and the parent directory is fsynced so the rename itself survives a power loss.
Leftovers in ``tmp/`` are garbage by construction and are removed when the store opens.

The store is synchronous (plain file I/O). Async callers run the expensive calls — anything
that hashes or fsyncs a whole file — through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from protocol.blobproto import is_digest
from protocol.errors import LocalProtocolError, RemoteProtocolError

#: How much put_file reads at a time (bounded memory for files of any size).
_COPY_BUFSIZE = 1 << 20


class BlobNotFoundError(KeyError):
    """The store holds no complete blob with this digest."""


def _check_digest(digest: str) -> None:
    # The digest becomes part of a path: anything but 64 lowercase hex could traverse
    # ("../..") or alias (upper case) — reject it before touching the filesystem.
    if not is_digest(digest):
        raise LocalProtocolError(f"not a sha256 hex digest: {digest!r}", reason="bad_digest")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialBlob:
    """An append-only ``.part`` file for one digest, for resumable downloads.

    ``offset`` is how many bytes are already there (the resume point). The file is
    exclusively ``flock``ed while open, so two downloads of one digest — in this process or
    another — cannot interleave their appends. The SHA-256 of what is on disk is kept
    incrementally, so :meth:`finalize` need not reread the file.

    Use as a context manager, or call :meth:`close`. After :meth:`finalize` or :meth:`discard`
    the object is closed.
    """

    def __init__(self, store: BlobStore, digest: str) -> None:
        self.digest = digest
        self.path = store._partial_dir / f"{digest}.part"
        self._store = store
        self._hash = hashlib.sha256()
        fd = self._open_locked()
        self._file: BinaryIO | None = os.fdopen(fd, "r+b", buffering=0)
        # Rehash what an earlier (perhaps killed) download left. A partial longer than the
        # store's cap can only come from a bug or a tampered dir: start over.
        self.offset = 0
        if os.fstat(fd).st_size > store.max_blob_bytes:
            self._file.truncate(0)
        while block := self._file.read(_COPY_BUFSIZE):
            self._hash.update(block)
            self.offset += len(block)

    def _open_locked(self) -> int:
        # Lock-file pattern: gc() may unlink the path between our open() and flock(); a lock
        # on an unlinked inode protects nothing, so check that the path still names our inode.
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except BlockingIOError:
                os.close(fd)
                raise LocalProtocolError(
                    f"blob {self.digest} is already being downloaded", reason="partial_in_use"
                ) from None
            except FileNotFoundError:
                pass
            os.close(fd)
        raise LocalProtocolError(f"partial of {self.digest} keeps vanishing", reason="partial_in_use")

    def _f(self) -> BinaryIO:
        if self._file is None:
            raise LocalProtocolError("partial blob is closed", reason="closed")
        return self._file

    def write(self, data: bytes) -> None:
        """Append ``data``. Raises RemoteProtocolError(reason="too_large") past the store's cap."""
        f = self._f()
        if self.offset + len(data) > self._store.max_blob_bytes:
            raise RemoteProtocolError(
                f"blob {self.digest} exceeds max_blob_bytes={self._store.max_blob_bytes}",
                reason="too_large",
            )
        view = memoryview(data)
        while view:  # raw (unbuffered) writes may be short
            n = f.write(view)
            view = view[n or 0 :]
        self._hash.update(data)
        self.offset += len(data)

    def flush(self) -> None:
        """Push the bytes written so far to disk (fdatasync); finalize still fsyncs them all."""
        os.fdatasync(self._f().fileno())

    def reset(self) -> None:
        """Throw away the bytes held so far (they are not a prefix of the blob)."""
        f = self._f()
        f.truncate(0)
        f.seek(0)
        self._hash = hashlib.sha256()
        self.offset = 0

    def finalize(self) -> Path:
        """Verify the hash, then move the partial into place atomically; return the final path.

        On a hash mismatch the partial is deleted and RemoteProtocolError(reason="hash_mismatch")
        is raised: the bytes came from a peer, and keeping them would poison the next resume.
        """
        f = self._f()
        if self._hash.hexdigest() != self.digest:
            self.discard()
            raise RemoteProtocolError(f"received bytes do not hash to {self.digest}", reason="hash_mismatch")
        os.fsync(f.fileno())
        os.chmod(self.path, 0o444)
        final = self._store._final_path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        # rename while still holding the lock: nobody can append between the check and the move.
        os.replace(self.path, final)
        _fsync_dir(final.parent)
        self.close()
        self._store._touch(self.digest)
        return final

    def discard(self) -> None:
        """Delete the partial file and close."""
        if self._file is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.close()

    def close(self) -> None:
        """Close (releasing the lock) and keep the bytes for a later resume."""
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> PartialBlob:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BlobStore:
    """Content-addressed files named by their SHA-256 (see the module docstring for the layout)."""

    def __init__(self, root: Path, *, max_blob_bytes: int) -> None:
        if max_blob_bytes <= 0:
            raise ValueError("max_blob_bytes must be positive")
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        self._partial_dir = self.root / "partial"
        self._tmp_dir = self.root / "tmp"
        for d in (self.root, self._partial_dir, self._tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Anything in tmp/ was being written when a previous run died: never complete, never named.
        for leftover in self._tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        # digest -> monotonic time it was last stored (put or fetched) by this process: what
        # gc's grace period protects, e.g. a task's inputs between put_file and the task row
        # that refers to them. In memory on purpose: an existing file keeps its mtime.
        self._touched: dict[str, float] = {}
        self._touched_lock = threading.Lock()

    # -- paths --------------------------------------------------------------------------

    def _final_path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.root / digest[0:2] / digest[2:4] / digest

    def path(self, digest: str) -> Path:
        """Path of a complete blob. LocalProtocolError for a malformed digest, BlobNotFoundError if absent."""
        p = self._final_path(digest)
        if not p.is_file():
            raise BlobNotFoundError(digest)
        return p

    def has(self, digest: str) -> bool:
        """True if the complete blob is stored (False for a malformed digest too)."""
        return is_digest(digest) and self._final_path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def read(self, digest: str) -> bytes:
        """The whole blob in memory — for small blobs; stream large ones from :meth:`path`."""
        return self.path(digest).read_bytes()

    # -- writing complete blobs -----------------------------------------------------------

    def _touch(self, digest: str) -> None:
        with self._touched_lock:
            self._touched[digest] = time.monotonic()

    def _install(self, tmp_path: Path, digest: str) -> str:
        """fsync and rename a fully written temp file to its final name (idempotent)."""
        self._touch(digest)
        final = self._final_path(digest)
        if final.is_file():
            # Same digest, same content: keep the existing file (its mtime, its inode).
            tmp_path.unlink()
            return digest
        os.chmod(tmp_path, 0o444)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
        return digest

    def _tempfile(self) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=self._tmp_dir, prefix="put-")
        return os.fdopen(fd, "wb"), Path(name)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256 hex. Atomic and idempotent."""
        if len(data) > self.max_blob_bytes:
            raise LocalProtocolError(
                f"{len(data)} bytes exceed max_blob_bytes={self.max_blob_bytes}", reason="too_large"
            )
        digest = hashlib.sha256(data).hexdigest()
        if self.has(digest):
            return digest
        f, tmp = self._tempfile()
        try:
            with f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self._install(tmp, digest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def put_file(self, path: Path) -> str:
        """Copy a local file into the store, hashing as it streams; return its sha256 hex."""
        h = hashlib.sha256()
        total = 0
        f, tmp = self._tempfile()
        try:
            with f, open(path, "rb") as src:
                while block := src.read(_COPY_BUFSIZE):
                    total += len(block)
                    if total > self.max_blob_bytes:
                        raise LocalProtocolError(
                            f"{path} exceeds max_blob_bytes={self.max_blob_bytes}", reason="too_large"
                        )
                    h.update(block)
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            return self._install(tmp, h.hexdigest())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    # -- partial downloads ----------------------------------------------------------------

    def open_partial(self, digest: str) -> PartialBlob:
        """Open (creating if needed) the partial download of ``digest``; see PartialBlob.

        Raises LocalProtocolError(reason="partial_in_use") if another download holds it.
        """
        _check_digest(digest)
        return PartialBlob(self, digest)

    def partial_size(self, digest: str) -> int:
        """Bytes held by the partial download of ``digest`` (0 if none)."""
        _check_digest(digest)
        try:
            return (self._partial_dir / f"{digest}.part").stat().st_size
        except FileNotFoundError:
            return 0

    # -- removal ----------------------------------------------------------------------------

    def delete(self, digest: str) -> None:
        """Remove the blob and any partial download of it; absent is not an error."""
        for p in (self._final_path(digest), self._partial_dir / f"{digest}.part"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def digests(self) -> list[str]:
        """Every complete blob's digest, sorted."""
        found = [
            p.name
            for p in self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*")
            if is_digest(p.name) and p.parent.name == p.name[2:4] and p.parent.parent.name == p.name[0:2]
        ]
        return sorted(found)

    def usage_bytes(self) -> int:
        """Bytes held: complete blobs and partial downloads (what limits.blob_store_mb bounds)."""
        total = 0
        for p in [*self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"), *self._partial_dir.glob("*.part")]:
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    def gc(self, keep: set[str], *, grace_s: float = 0.0) -> int:
        """Delete every complete blob and idle partial not in ``keep``; return how many files went.

        A partial that a download holds open (flocked) is left alone, and so is a blob this
        store wrote or finished less than ``grace_s`` seconds ago.
        """
        now = time.monotonic()
        with self._touched_lock:
            for d, at in list(self._touched.items()):
                if now - at > grace_s:
                    del self._touched[d]
            keep = keep | set(self._touched)
        removed = 0
        for digest in self.digests():
            if digest not in keep:
                with contextlib.suppress(FileNotFoundError):
                    self._final_path(digest).unlink()
                    removed += 1
        for part in self._partial_dir.glob("*.part"):
            digest = part.name.removesuffix(".part")
            if digest in keep:
                continue
            try:
                fd = os.open(part, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a download is writing it
            else:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
                    removed += 1
            finally:
                os.close(fd)
        return removed

    def prune_empty_dirs(self) -> None:
        """Remove fan-out directories left empty by deletes (cosmetic; never needed for correctness)."""
        for d in sorted(self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]"), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
                d.parent.rmdir()


__all__ = ["BlobNotFoundError", "BlobStore", "PartialBlob"]
