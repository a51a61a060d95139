"""Replay and freshness rules (protocol/replay.py; SPEC.md "Replay and freshness")."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from protocol.envelope import Signed, Signer, open_envelope
from protocol.errors import RemoteProtocolError
from protocol.fuzz import sample_messages
from protocol.messages import Message
from protocol.replay import CLOCK_SKEW_MS, ReplayGuard

T0 = 1_700_000_000_000
A = Signer(bytes(range(32)))
B = Signer(bytes(range(1, 33)))
SAMPLES: dict[str, Any] = {m.KIND: m for m in sample_messages()}
TASK2 = "f" * 32


def signed(
    kind: str, seq: int, *, issued: int = T0, ttl: int = 30_000, by: Signer = A, **fields: object
) -> Signed:
    msg: Message = dataclasses.replace(
        SAMPLES[kind], seq=seq, issued_at=issued, expires_at=issued + ttl, **fields
    )
    return open_envelope(by.seal(msg))


def reason(guard: ReplayGuard, s: Signed, now: int) -> str:
    with pytest.raises(RemoteProtocolError) as ei:
        guard.accept(s, now)
    return str(ei.value.reason)


def test_skew_is_thirty_seconds() -> None:
    assert CLOCK_SKEW_MS == 30_000


def test_same_and_lower_sequence_are_replays() -> None:
    g = ReplayGuard()
    g.accept(signed("advert", 5), T0)
    assert reason(g, signed("advert", 5), T0) == "replayed"
    assert reason(g, signed("advert", 4), T0) == "replayed"
    assert reason(g, signed("advert", 1), T0) == "replayed"
    g.accept(signed("advert", 6), T0)
    g.accept(signed("advert", 100), T0)  # gaps are fine: sequences only have to increase
    assert reason(g, signed("advert", 99), T0) == "replayed"


def test_check_does_not_record() -> None:
    g = ReplayGuard()
    s = signed("advert", 5)
    g.check(s, T0)
    g.check(s, T0)
    assert len(g) == 0
    g.accept(s, T0)
    assert len(g) == 1
    with pytest.raises(RemoteProtocolError):
        g.check(s, T0)


def test_a_rejected_message_is_not_recorded() -> None:
    g = ReplayGuard()
    assert reason(g, signed("advert", 50, issued=T0 + 60_000), T0) == "from_future"
    g.accept(signed("advert", 10), T0)  # the rejected seq 50 must not have raised the bar


def test_expiry_boundary() -> None:
    s = signed("advert", 1, issued=T0, ttl=10_000)  # expires at T0 + 10 s
    ReplayGuard().accept(s, T0 + 10_000 + CLOCK_SKEW_MS)  # exactly at expiry + skew: still valid
    assert reason(ReplayGuard(), s, T0 + 10_000 + CLOCK_SKEW_MS + 1) == "expired"


def test_future_boundary() -> None:
    s = signed("advert", 1, issued=T0 + CLOCK_SKEW_MS)
    ReplayGuard().accept(s, T0)  # issued exactly skew ahead of us: accepted
    s2 = signed("advert", 1, issued=T0 + CLOCK_SKEW_MS + 1)
    assert reason(ReplayGuard(), s2, T0) == "from_future"


@pytest.mark.parametrize(
    ("kind", "max_ttl"),
    [("advert", 120_000), ("bid", 600_000), ("lease", 600_000), ("vote", 31 * 86_400_000)],
)
def test_lifetime_cap_per_kind(kind: str, max_ttl: int) -> None:
    ReplayGuard().accept(signed(kind, 1, ttl=max_ttl), T0)
    assert reason(ReplayGuard(), signed(kind, 1, ttl=max_ttl + 1), T0) == "absurd"


def test_zero_lifetime_is_allowed() -> None:
    ReplayGuard().accept(signed("advert", 1, ttl=0), T0)


def test_signers_are_independent() -> None:
    g = ReplayGuard()
    g.accept(signed("advert", 5, by=A), T0)
    g.accept(signed("advert", 5, by=B), T0)  # B's counter is its own
    assert reason(g, signed("advert", 5, by=B), T0) == "replayed"
    g.accept(signed("advert", 6, by=A), T0)


def test_kinds_are_independent() -> None:
    g = ReplayGuard()
    g.accept(signed("bid", 5), T0)
    g.accept(signed("cancel", 5), T0)  # same task scope, different kind
    g.accept(signed("announce", 1), T0)


def test_task_scopes_are_independent() -> None:
    g = ReplayGuard()
    g.accept(signed("bid", 10), T0)
    g.accept(signed("bid", 3, task_id=TASK2), T0)  # lower seq, other task: fine
    assert reason(g, signed("bid", 9), T0) == "replayed"
    assert reason(g, signed("bid", 3, task_id=TASK2), T0) == "replayed"


def test_shard_and_round_scopes() -> None:
    g = ReplayGuard()
    g.accept(signed("lease", 10, shard=0), T0)
    g.accept(signed("lease", 5, shard=1), T0)
    assert reason(g, signed("lease", 9, shard=0), T0) == "replayed"
    g.accept(signed("vote", 10, round=0), T0)
    g.accept(signed("vote", 5, round=1), T0)
    assert reason(g, signed("vote", 5, round=1), T0) == "replayed"
    g.accept(signed("result", 7, shard=0), T0)
    g.accept(signed("result", 6, shard=2), T0)


def test_forget_expired_keeps_live_scopes() -> None:
    g = ReplayGuard()
    g.accept(signed("bid", 10, ttl=1_000), T0)
    g.accept(signed("bid", 10, ttl=100_000, task_id=TASK2), T0)
    assert len(g) == 2
    assert g.forget_expired(T0 + 1_000 + CLOCK_SKEW_MS) == 0  # not yet past expiry + skew
    assert g.forget_expired(T0 + 1_000 + CLOCK_SKEW_MS + 1) == 1
    assert len(g) == 1
    # The live scope still remembers its sequence...
    assert reason(g, signed("bid", 9, task_id=TASK2), T0 + 40_000) == "replayed"
    # ...and the forgotten one cannot be replayed either: its messages have expired.
    assert reason(g, signed("bid", 10, ttl=1_000), T0 + 40_000) == "expired"


def test_scope_lives_as_long_as_its_longest_lived_message() -> None:
    g = ReplayGuard()
    g.accept(signed("lease", 1, ttl=100_000), T0)
    g.accept(signed("lease", 2, ttl=1_000), T0)  # a later message that expires sooner
    assert g.forget_expired(T0 + 1_000 + CLOCK_SKEW_MS + 1) == 0
    assert reason(g, signed("lease", 1, ttl=100_000), T0 + 50_000) == "replayed"


def test_max_entries_triggers_forgetting() -> None:
    g = ReplayGuard(max_entries=2)
    g.accept(signed("bid", 1, ttl=1_000), T0)
    g.accept(signed("bid", 1, ttl=1_000, task_id=TASK2), T0)
    later = T0 + 1_000 + CLOCK_SKEW_MS + 1
    g.accept(signed("advert", 1, issued=later), later)  # third entry: the two expired go
    assert len(g) == 1


def test_pruning_is_amortised_when_scopes_stay_live() -> None:
    """Regression: with a full table of live scopes, every accept used to rescan the whole
    table (O(n) per message). Scans must now be rare: geometric in the table's growth."""
    g = ReplayGuard(max_entries=10)
    scans = 0
    original = g.forget_expired

    def counting(now_ms: int) -> int:
        nonlocal scans
        scans += 1
        return original(now_ms)

    g.forget_expired = counting  # type: ignore[method-assign]
    for i in range(200):
        g.accept(signed("bid", 1, task_id=f"{i:032x}", ttl=60_000), T0)
    assert len(g) == 200  # nothing expired, nothing forgotten
    assert 1 <= scans <= 12  # 10 → 16 → 25 → … → 200 is about 8 scans, not 190
    later = T0 + 60_000 + CLOCK_SKEW_MS + 1
    before = scans
    g.accept(signed("advert", 1, issued=later), later)
    if scans == before:  # the threshold was not reached: forgetting is still available on demand
        assert original(later) == 200
    assert len(g) == 1  # only the fresh advert's scope is left
