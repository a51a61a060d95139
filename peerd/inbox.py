"""The one door through which signed messages from peers come in.

Order of checks (cheapest first, crypto once per unique message — docs/design.md §8):
1. dedupe by the envelope's sha256 (gossip and retries deliver the same bytes often);
2. size cap, decode, signature, canonical form, field bounds (``open_envelope``);
3. the signer must be the peer that sent it: for gossip, libp2p's verified origin; for
   streams, the authenticated remote peer (docs/design.md §3.2: "a message's sender is its
   signer, never a field inside it");
4. freshness and replay (``ReplayGuard``).
Every drop is counted as ``dropped.<reason>`` and logged at debug level; nothing a
peer sends can raise past this class.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from peerd.counters import Counters
from protocol.envelope import Signed, message_digest, open_envelope
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.replay import ReplayGuard

log = logging.getLogger(__name__)


def wall_ms() -> int:
    return int(time.time() * 1000)


class Inbox:
    def __init__(
        self, counters: Counters, *, now_ms: Callable[[], int] = wall_ms, dedupe_size: int = 8192
    ) -> None:
        self.counters = counters
        self.replay = ReplayGuard()
        self._now = now_ms
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedupe_size = dedupe_size

    def admit(self, raw: bytes, *, sender: str | None, kinds: frozenset[str]) -> Signed | None:
        """Return the verified message, or None if it was dropped (and counted)."""
        try:
            return self._admit(raw, sender=sender, kinds=kinds)
        except ProtocolError as exc:
            self.counters.inc(f"dropped.{exc.reason}")
            log.debug("dropped message from %s: %s", sender, exc)
            return None

    def _admit(self, raw: bytes, *, sender: str | None, kinds: frozenset[str]) -> Signed:
        digest = message_digest(raw)
        if digest in self._seen:
            raise RemoteProtocolError("already seen", reason="duplicate")
        try:
            signed = open_envelope(raw, kinds=kinds)
        except ProtocolError:
            self._remember(digest)  # the same bytes are just as invalid from anyone
            raise
        if sender is not None and signed.signer != sender:
            # Not remembered: a peer re-publishing someone else's message first must not
            # get the genuine copy, from its signer, dropped as a duplicate.
            raise RemoteProtocolError(
                f"{signed.kind} signed by {signed.signer} but sent by {sender}", reason="signer_mismatch"
            )
        self._remember(digest)
        self.replay.accept(signed, self._now())
        self.counters.inc(f"accepted.{signed.kind}")
        return signed

    def verify_embedded(self, raw: bytes, *, kinds: frozenset[str]) -> Signed | None:
        """Verify a signed message quoted inside another (the bids an award lists).

        No replay check: an award legitimately quotes bids we may already have seen.
        """
        try:
            return open_envelope(raw, kinds=kinds)
        except ProtocolError as exc:
            self.counters.inc(f"dropped.embedded_{exc.reason}")
            return None

    def _remember(self, digest: str) -> None:
        self._seen[digest] = None
        if len(self._seen) > self._dedupe_size:
            self._seen.popitem(last=False)
