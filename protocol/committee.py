"""Deterministic committee draw for the signed aggregation round (docs/design.md §6).

Everyone who knows the task ID, the round number and the participant set computes the same
committee, with no coordination and nothing a participant can grind after the award: the
participant set is fixed by the signed award, the task ID by the signed announcement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from protocol.errors import LocalProtocolError

#: Committee size by default (docs/design.md §6: the 3 participants with the smallest H(task ‖ round ‖ peer)).
DEFAULT_SIZE = 3


def draw_key(task_id: str, round_no: int, peer_id: str) -> bytes:
    """The 32-byte sort key of ``peer_id`` for this task and round.

    ``sha256(task_id ‖ 0x00 ‖ round_no ‖ 0x00 ‖ peer_id)`` where ``task_id`` and ``peer_id``
    are UTF-8, ``round_no`` is an 8-byte big-endian unsigned integer, and each ``0x00`` is a
    single separator byte. The layout is unambiguous because ``task_id`` may not contain a
    NUL, the round is fixed-width, and ``peer_id`` runs to the end.
    """
    if "\x00" in task_id:
        raise LocalProtocolError("task id must not contain NUL", reason="bad_committee")
    if isinstance(round_no, bool) or not isinstance(round_no, int) or not 0 <= round_no < 1 << 64:
        raise LocalProtocolError(
            f"round must be an int in [0, 2**64), got {round_no!r}", reason="bad_committee"
        )
    return hashlib.sha256(
        task_id.encode("utf-8") + b"\x00" + round_no.to_bytes(8, "big") + b"\x00" + peer_id.encode("utf-8")
    ).digest()


def committee(
    task_id: str, round_no: int, participants: Sequence[str], size: int = DEFAULT_SIZE
) -> tuple[str, ...]:
    """The ``size`` participants with the smallest :func:`draw_key`, ordered by that key.

    If ``size`` exceeds the number of participants, all of them (still ordered by key).
    Does not depend on the order of ``participants``; duplicates or an empty list are our
    own mistake (the set comes from a validated award) and raise LocalProtocolError.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LocalProtocolError(f"committee size must be an int >= 1, got {size!r}", reason="bad_committee")
    if not participants:
        raise LocalProtocolError("no participants to draw a committee from", reason="bad_committee")
    if len(set(participants)) != len(participants):
        raise LocalProtocolError("duplicate participants", reason="bad_committee")
    # Ties on a 256-bit hash do not happen; the peer id as second key keeps the order total anyway.
    ranked = sorted(participants, key=lambda p: (draw_key(task_id, round_no, p), p))
    return tuple(ranked[:size])


def quorum(size: int) -> int:
    """Matching votes needed for a certificate from a committee of ``size``: a strict majority.

    Pass the size of the committee actually drawn (``len(committee(...))``), which is smaller
    than the requested size when there are fewer participants.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LocalProtocolError(f"committee size must be an int >= 1, got {size!r}", reason="bad_committee")
    return size // 2 + 1
