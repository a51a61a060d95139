"""Replay and freshness checks, sans-IO (docs/design.md §3.3).

A receiver keeps the highest sequence seen per (signer, kind, scope). The scope is the
task (or task/shard, task/round) for task messages and empty for adverts: messages of
one signer about *different* tasks can legitimately arrive out of order through gossip,
and a per-kind counter alone would then drop honest messages. An old message replayed
into a scope never seen before is still caught by its expiry, and scopes are forgotten
only once everything recorded in them has expired, so memory stays bounded without
opening a replay window.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.envelope import Signed
from protocol.errors import RemoteProtocolError

#: Allowed clock skew between peers (docs/design.md §3.3: ±30 s).
CLOCK_SKEW_MS = 30_000


@dataclass
class _Entry:
    seq: int
    expires_at: int


class ReplayGuard:
    def __init__(self, *, skew_ms: int = CLOCK_SKEW_MS, max_entries: int = 100_000) -> None:
        self._skew = skew_ms
        self._max = max_entries
        self._prune_at = max_entries
        self._seen: dict[tuple[str, str, str], _Entry] = {}

    def check(self, signed: Signed, now_ms: int) -> None:
        """Raise RemoteProtocolError if ``signed`` is stale, premature or replayed."""
        m = signed.message
        if m.expires_at + self._skew < now_ms:
            raise RemoteProtocolError(f"{m.KIND} expired", reason="expired")
        if m.issued_at - self._skew > now_ms:
            raise RemoteProtocolError(f"{m.KIND} issued in the future", reason="from_future")
        if m.expires_at - m.issued_at > m.MAX_TTL_MS:
            raise RemoteProtocolError(f"{m.KIND} lifetime exceeds {m.MAX_TTL_MS} ms", reason="absurd")
        entry = self._seen.get((signed.signer, m.KIND, m.scope()))
        if entry is not None and m.seq <= entry.seq:
            raise RemoteProtocolError(f"{m.KIND} sequence {m.seq} not above {entry.seq}", reason="replayed")

    def accept(self, signed: Signed, now_ms: int) -> None:
        """Check, then record ``signed`` as the newest of its scope."""
        self.check(signed, now_ms)
        m = signed.message
        key = (signed.signer, m.KIND, m.scope())
        prev = self._seen.get(key)
        self._seen[key] = _Entry(m.seq, max(m.expires_at, prev.expires_at if prev else 0))
        if len(self._seen) > self._prune_at:
            self.forget_expired(now_ms)
            # Amortise: when most scopes are still live, a full scan on every accept would
            # cost O(n) per message (quadratic under a flood of fresh scopes). Scan again
            # only once the table has grown by half of what survived.
            self._prune_at = max(self._max, len(self._seen) + len(self._seen) // 2)

    def forget_expired(self, now_ms: int) -> int:
        """Drop scopes whose every recorded message has expired (they can't be replayed)."""
        dead = [k for k, e in self._seen.items() if e.expires_at + self._skew < now_ms]
        for k in dead:
            del self._seen[k]
        return len(dead)

    def __len__(self) -> int:
        return len(self._seen)
