"""What every machine shares: the market's timing, the sealer that signs our own messages,
and the bookkeeping of timers and illegal events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from protocol.awards import check_award, open_quoted_bids
from protocol.envelope import Signed, Signer, message_digest
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.messages import Award, Message, TaskAnnounce

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class MarketTimes:
    """The ``[market]`` timing every machine needs, in milliseconds (docs/config.md).

    ``lease_ttl_ms``: a holder silent this long is lost (SPEC §7.6, ``market.lease_ttl_s``).
    ``heartbeat_ms``: how often a holder refreshes its lease (``market.heartbeat_s``).
    """

    lease_ttl_ms: int = 10_000
    heartbeat_ms: int = 2_000

    def __post_init__(self) -> None:
        if self.heartbeat_ms <= 0 or self.lease_ttl_ms <= self.heartbeat_ms:
            raise LocalProtocolError(
                f"heartbeat_ms ({self.heartbeat_ms}) must be > 0 and below "
                f"lease_ttl_ms ({self.lease_ttl_ms})",
                reason="bad_config",
            )


class Sealer(Protocol):
    """Signs our own messages with fresh sequence numbers.

    The daemon wraps ``Node.seal`` (its sequence store persists the high-water mark, which
    is the driver's I/O, not the machine's); the simulator may use :class:`SignerSealer`
    or a stub that skips the signature. ``seal`` must not block and must return the
    message as a receiver would see it (:class:`~protocol.envelope.Signed`, with ``raw``).
    """

    @property
    def peer_id(self) -> str: ...

    def seal(self, cls: type[M], *, now_ms: int, ttl_ms: int, **fields: Any) -> Signed: ...


class SignerSealer:
    """A :class:`Sealer` over a real Ed25519 :class:`~protocol.envelope.Signer` and an
    in-memory sequence (tests and the simulator; the daemon persists its sequence)."""

    def __init__(self, signer: Signer, *, first_seq: int = 1) -> None:
        self.signer = signer
        self._next = first_seq

    @property
    def peer_id(self) -> str:
        return self.signer.peer_id

    def seal(self, cls: type[M], *, now_ms: int, ttl_ms: int, **fields: Any) -> Signed:
        seq = self._next
        self._next += 1
        msg = cls(seq=seq, issued_at=now_ms, expires_at=now_ms + min(ttl_ms, cls.MAX_TTL_MS), **fields)
        raw = self.signer.seal(msg)
        return Signed(msg, self.signer.peer_id, self.signer.public_key, raw, message_digest(raw))


class Timers:
    """The timers a machine has armed, so that a stray ``TimerFired`` is caught as the
    driver's bug and every timer is cancelled when the machine ends."""

    def __init__(self) -> None:
        self.armed: dict[str, int] = {}

    def set(self, name: str, at_ms: int) -> act.SetTimer:
        self.armed[name] = at_ms
        return act.SetTimer(name=name, at_ms=at_ms)

    def cancel(self, name: str) -> list[act.Action]:
        if self.armed.pop(name, None) is None:
            return []
        return [act.CancelTimer(name=name)]

    def fire(self, machine: str, name: str) -> None:
        if self.armed.pop(name, None) is None:
            raise LocalProtocolError(
                f"{machine}: timer {name!r} fired but is not armed", reason="illegal_event"
            )

    def cancel_all(self) -> list[act.Action]:
        out: list[act.Action] = [act.CancelTimer(name=n) for n in sorted(self.armed)]
        self.armed.clear()
        return out

    def __contains__(self, name: object) -> bool:
        return name in self.armed


def award_drop(
    announce: TaskAnnounce, submitter: str, awards: dict[int, Signed], event: ev.MessageVerified, award: Award
) -> act.Drop | None:
    """SPEC §10.3 for an award a follower receives: None when it may be taken, else the
    ``Drop`` that refuses it. Skipped when the driver already checked it (``checked``); its
    quoted bids come opened from the driver (``quoted``) or are opened here."""
    if event.checked:
        return None
    prev = awards.get(award.epoch - 1)
    previous = prev.message if prev is not None and isinstance(prev.message, Award) else None
    try:
        bids = list(event.quoted) if event.quoted is not None else open_quoted_bids(award)
        check_award(announce, award, submitter, event.signed.signer, bids, previous)
    except RemoteProtocolError as exc:
        return act.Drop(reason=exc.reason, detail=str(exc))
    return None


def illegal(machine: str, state: Any, event: Any) -> LocalProtocolError:
    """The error for an event the machine cannot take in ``state`` (the driver's bug)."""
    name = getattr(state, "name", str(state))
    return LocalProtocolError(
        f"{machine}: illegal event {type(event).__name__} in state {name}", reason="illegal_event"
    )


def short(peer: str) -> str:
    """The tail of a peer ID, as the daemon's messages show it."""
    return peer[-8:]


def join_short(peers: Iterable[str]) -> str:
    return ", ".join(short(p) for p in peers)
