"""The node's Ed25519 identity: one 32-byte seed in ``<state_dir>/identity.key``.

The same seed is the libp2p identity key (peerd.p2p) and the signer of every protocol message,
so a message's sender is always the peer ID derived from its signing key (docs/design.md §3.2).

The file holds the raw seed and nothing else, mode 0600. It is created atomically (temp file,
fsync, then published under its final name) so a crash never leaves a half-written key, and
the daemon refuses to start if the file is readable by anyone but its owner, like ssh does
for private keys.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.peerid import peer_id_from_public_key

KEY_FILE = "identity.key"
SEED_SIZE = 32

__all__ = ["KEY_FILE", "Identity", "IdentityError", "identity_from_seed", "load_or_create_identity"]


class IdentityError(Exception):
    """The identity key cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Identity:
    seed: bytes = field(repr=False)  # never in logs or tracebacks
    public_key: bytes
    peer_id: str
    _private: Ed25519PrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        private = Ed25519PrivateKey.from_private_bytes(self.seed)
        if private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) != self.public_key:
            raise IdentityError("public_key does not belong to seed")
        if peer_id_from_public_key(self.public_key) != self.peer_id:
            raise IdentityError("peer_id does not belong to public_key")
        object.__setattr__(self, "_private", private)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``data``."""
        return self._private.sign(data)


def identity_from_seed(seed: bytes) -> Identity:
    if len(seed) != SEED_SIZE:
        raise IdentityError(f"an Ed25519 seed is {SEED_SIZE} bytes, got {len(seed)}")
    public = (
        Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    return Identity(seed=seed, public_key=public, peer_id=peer_id_from_public_key(public))


def load_or_create_identity(state_dir: Path) -> Identity:
    """Load ``<state_dir>/identity.key``, creating it (and ``state_dir``, mode 0700) on first start."""
    path = Path(state_dir) / KEY_FILE
    try:
        return identity_from_seed(_read_seed(path))
    except FileNotFoundError:
        pass
    Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    _create_seed(path)
    return identity_from_seed(_read_seed(path))


def _read_seed(path: Path) -> bytes:
    """Raises FileNotFoundError if the key does not exist yet, IdentityError if it is unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IdentityError(f"cannot open identity key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"identity key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise IdentityError(
                f"identity key {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. Fix with: chmod 600 {path}"
            )
        seed = os.read(fd, SEED_SIZE + 1)
    finally:
        os.close(fd)
    if len(seed) != SEED_SIZE:
        size = f"{len(seed)} bytes" if len(seed) < SEED_SIZE else f"more than {SEED_SIZE} bytes"
        raise IdentityError(
            f"identity key {path} holds {size}, expected exactly {SEED_SIZE} (a raw Ed25519 seed); "
            "restore it from a backup, or delete it to start with a new peer ID"
        )
    return seed


def _create_seed(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Mode 0600 at creation rather than a process-wide umask(077): umask is shared by every
    # thread of the daemon, so changing it would race with other file creations.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(secrets.token_bytes(SEED_SIZE))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() instead of rename(): it is just as atomic but never replaces an existing key, so
        # two daemons started at once on one state dir end up sharing one identity.
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
