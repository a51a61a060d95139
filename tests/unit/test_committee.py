"""Committee draw and quorum (docs/design.md §6)."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.committee import committee, draw_key, quorum
from protocol.errors import LocalProtocolError

PEERS = [f"12D3KooWPeer{i}" for i in range(7)]


def test_draw_key_byte_layout() -> None:
    expected = hashlib.sha256(
        b"task-1" + b"\x00" + bytes([0, 0, 0, 0, 0, 0, 1, 2]) + b"\x00" + b"peerA"
    ).digest()
    assert draw_key("task-1", 258, "peerA") == expected


def test_golden_draw() -> None:
    # Pinned: a change of byte layout must break this test (other implementations rely on it).
    keys = {
        p: hashlib.sha256(b"t\x00" + (3).to_bytes(8, "big") + b"\x00" + p.encode()).hexdigest() for p in PEERS
    }
    expected = tuple(sorted(PEERS, key=lambda p: keys[p])[:3])
    assert committee("t", 3, PEERS) == expected
    assert committee("t", 3, PEERS) == ("12D3KooWPeer1", "12D3KooWPeer5", "12D3KooWPeer0")


def test_committee_is_ordered_by_key_and_independent_of_input_order() -> None:
    c = committee("task", 1, PEERS, size=4)
    assert len(c) == 4 and len(set(c)) == 4
    keys = [draw_key("task", 1, p) for p in c]
    assert keys == sorted(keys)
    # Every non-member has a larger key than every member.
    assert all(draw_key("task", 1, p) > keys[-1] for p in PEERS if p not in c)
    shuffled = list(PEERS)
    random.Random(1).shuffle(shuffled)
    assert committee("task", 1, shuffled, size=4) == c


def test_committee_changes_with_round_and_task() -> None:
    draws = {committee("task", r, PEERS) for r in range(20)} | {
        committee(f"t{i}", 0, PEERS) for i in range(20)
    }
    assert len(draws) > 5


def test_size_larger_than_participants_returns_all() -> None:
    c = committee("task", 0, PEERS[:2], size=3)
    assert sorted(c) == sorted(PEERS[:2])
    assert quorum(len(c)) == 2


@pytest.mark.parametrize(("size", "q"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_quorum_is_a_strict_majority(size: int, q: int) -> None:
    assert quorum(size) == q
    assert 2 * q > size


@pytest.mark.parametrize(
    ("task", "round_no", "participants", "size"),
    [
        ("t", 0, [], 3),
        ("t", 0, ["a", "a"], 3),
        ("t", 0, ["a"], 0),
        ("t", -1, ["a"], 3),
        ("t", 1 << 64, ["a"], 3),
        ("t\x00x", 0, ["a"], 3),
    ],
)
def test_bad_arguments(task: str, round_no: int, participants: list[str], size: int) -> None:
    with pytest.raises(LocalProtocolError):
        committee(task, round_no, participants, size)


def test_quorum_rejects_zero() -> None:
    with pytest.raises(LocalProtocolError):
        quorum(0)


@given(
    st.text(max_size=20).filter(lambda s: "\x00" not in s),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=12, unique=True),
    st.integers(min_value=1, max_value=15),
)
def test_committee_properties(task: str, rnd: int, peers: list[str], size: int) -> None:
    c = committee(task, rnd, peers, size)
    assert len(c) == min(size, len(peers))
    assert set(c) <= set(peers)
    assert committee(task, rnd, list(reversed(peers)), size) == c
    # A larger committee extends a smaller one (prefix property).
    assert committee(task, rnd, peers, size + 1)[: len(c)] == c
