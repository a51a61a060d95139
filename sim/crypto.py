"""Signatures in the simulator: real Ed25519 by default, verified once per unique envelope.

**Real (default).** Every message is sealed with ``protocol.envelope.Signer`` (Ed25519) and
opened with ``protocol.envelope.open_envelope``. A daemon verifies each unique envelope
once (peerd/inbox.py dedupes by envelope hash, docs/design.md §8); the simulator goes one step
further and verifies each unique envelope once *per process*: ``open_envelope`` is a pure
function of (bytes, kinds, max_bytes), so 1,000 peers opening the same announce get the
same answer from one real verification. :func:`verification_memo` installs that memo in
every ``protocol`` module that imported ``open_envelope`` (awards, certificate, the
machines), so the protocol's own checks — ``check_signed_award``, ``check_certificate`` —
run unchanged on top of it.

**Stubbed (``--stub-signatures``).** For the largest runs, key generation, signing and
verification are replaced by SHA-512 of (public key ‖ signing bytes): forgeries by an
honest simulated peer are impossible anyway, and the envelope format, sizes and every
other check stay the same. The summary says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Iterator
from typing import Any

import protocol.envelope as envelope_mod
from protocol.errors import ProtocolError

_ORIGINAL_OPEN = envelope_mod.open_envelope
_ORIGINAL_PRIV = envelope_mod.Ed25519PrivateKey
_ORIGINAL_PUB = envelope_mod.Ed25519PublicKey


class _StubPublicKey:
    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_public_bytes(cls, key: bytes) -> _StubPublicKey:
        if len(key) != 32:
            raise ValueError("bad key length")
        return cls(key)

    def public_bytes_raw(self) -> bytes:
        return self._key

    def verify(self, sig: bytes, data: bytes) -> None:
        if hashlib.sha512(self._key + data).digest() != sig:
            from cryptography.exceptions import InvalidSignature

            raise InvalidSignature()


class _StubPrivateKey:
    def __init__(self, seed: bytes) -> None:
        self._pub = hashlib.sha256(b"stub-ed25519\x00" + seed).digest()

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> _StubPrivateKey:
        return cls(seed)

    def public_key(self) -> _StubPublicKey:
        return _StubPublicKey(self._pub)

    def sign(self, data: bytes) -> bytes:
        return hashlib.sha512(self._pub + data).digest()


class _Memo:
    def __init__(self) -> None:
        self.cache: dict[tuple[bytes, frozenset[str] | None, int], Any] = {}
        self.hits = 0
        self.misses = 0

    def open(
        self,
        raw: bytes,
        *,
        kinds: frozenset[str] | None = None,
        max_bytes: int = envelope_mod.MAX_ENVELOPE_BYTES,
    ) -> envelope_mod.Signed:
        key = (bytes(raw), kinds, max_bytes)
        got = self.cache.get(key)
        if got is None:
            self.misses += 1
            try:
                got = _ORIGINAL_OPEN(raw, kinds=kinds, max_bytes=max_bytes)
            except ProtocolError as exc:
                got = (type(exc), str(exc), exc.reason)
            self.cache[key] = got
        else:
            self.hits += 1
        if isinstance(got, tuple):
            cls, msg, reason = got
            raise cls(msg, reason=reason)
        return got


MEMO = _Memo()


def _protocol_modules() -> list[Any]:
    return [m for name, m in list(sys.modules.items()) if name.startswith("protocol") and m is not None]


@contextlib.contextmanager
def verification_memo() -> Iterator[_Memo]:
    """Route every protocol module's ``open_envelope`` through one process-wide memo."""
    MEMO.cache.clear()
    MEMO.hits = MEMO.misses = 0
    patched = []
    for mod in _protocol_modules():
        if getattr(mod, "open_envelope", None) is _ORIGINAL_OPEN:
            mod.open_envelope = MEMO.open
            patched.append(mod)
    try:
        yield MEMO
    finally:
        for mod in patched:
            mod.open_envelope = _ORIGINAL_OPEN
        MEMO.cache.clear()


@contextlib.contextmanager
def stub_signatures(enabled: bool) -> Iterator[None]:
    """Swap Ed25519 for the SHA-512 stub in protocol.envelope while the block runs."""
    if not enabled:
        yield
        return
    envelope_mod.Ed25519PrivateKey = _StubPrivateKey  # type: ignore[misc,assignment]
    envelope_mod.Ed25519PublicKey = _StubPublicKey  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        envelope_mod.Ed25519PrivateKey = _ORIGINAL_PRIV  # type: ignore[misc]
        envelope_mod.Ed25519PublicKey = _ORIGINAL_PUB  # type: ignore[misc]


def open_memo(raw: bytes, kinds: frozenset[str] | None = None) -> envelope_mod.Signed:
    """Open an envelope through the memo (the simulator's own reads)."""
    return MEMO.open(raw, kinds=kinds)
