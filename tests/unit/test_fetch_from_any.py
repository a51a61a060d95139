"""peerd/blobxfer.py fetch_from_any: the one "fetch a blob from any peer" rule (issue 7).

Four copies had four retry rules (committee inputs, a round's start model, certified outputs,
a certificate's inputs for the bundle). These tests pin the one rule they now share.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from peerd.blobxfer import fetch_from_any
from protocol.errors import ProtocolError, RemoteProtocolError, TransportError

GOOD = Path("/blobs/ab")


class Peers:
    """fetch_one that fails for each peer as scripted (a list per peer, one entry per call)."""

    def __init__(self, script: dict[str, list[str | None]]) -> None:
        self.script = script
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, peer: str) -> Path:
        self.calls.append((peer, trio.current_time()))
        outcome = self.script[peer].pop(0) if self.script[peer] else "not_found"
        if outcome is None:
            return GOOD
        if outcome == "transport":
            raise TransportError("reset", reason="transport")
        raise RemoteProtocolError(outcome, reason=outcome)


def run(coro_fn: object, *args: object, **kw: object) -> object:
    async def main() -> object:
        return await coro_fn(*args, **kw)  # type: ignore[operator]

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_peers_are_tried_in_order_until_one_serves() -> None:
    peers = Peers({"a": ["not_found"], "b": ["transport"], "c": [None], "d": [None]})
    assert run(fetch_from_any, peers, ["a", "b", "c", "d"]) == GOOD
    assert [p for p, _ in peers.calls] == ["a", "b", "c"]


def test_every_pass_fails_then_the_last_error_is_raised() -> None:
    peers = Peers({"a": [], "b": ["busy", "busy", "hash_mismatch"]})
    with pytest.raises(RemoteProtocolError) as err:
        run(fetch_from_any, peers, ["a", "b"], passes=3, pause_s=1.0)
    assert err.value.reason == "hash_mismatch"
    assert [p for p, _ in peers.calls] == ["a", "b"] * 3
    # Passes are pause_s apart; no pause after the last one.
    starts = [t for p, t in peers.calls if p == "a"]
    assert starts == [0.0, 1.0, 2.0]


def test_a_later_pass_succeeds() -> None:
    peers = Peers({"a": ["transport", None]})
    assert run(fetch_from_any, peers, ["a"], passes=2) == GOOD


def test_give_up_ends_the_search_at_once() -> None:
    peers = Peers({"committer": ["hash_mismatch"], "voter": [None]})
    with pytest.raises(RemoteProtocolError) as err:
        run(
            fetch_from_any,
            peers,
            ["committer", "voter"],
            passes=2,
            give_up=lambda peer, exc: peer == "committer" and exc.reason == "hash_mismatch",
        )
    assert err.value.reason == "hash_mismatch"
    assert [p for p, _ in peers.calls] == ["committer"]
    # A mismatch from anyone else is that peer's problem: the next one is asked.
    peers = Peers({"voter": ["hash_mismatch"], "committer": [None]})
    assert (
        run(
            fetch_from_any,
            peers,
            ["voter", "committer"],
            give_up=lambda peer, exc: peer == "x" and exc.reason == "hash_mismatch",
        )
        == GOOD
    )


def test_no_peer_at_all_is_a_transport_error() -> None:
    with pytest.raises(TransportError):
        run(fetch_from_any, Peers({}), [])
    with pytest.raises(ProtocolError):
        run(fetch_from_any, Peers({}), ["a"], passes=0)
