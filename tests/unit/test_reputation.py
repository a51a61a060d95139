"""peerd/reputation.py: the records in the node's store, bans, and the CLI/RPC around them
(docs/allocation.md "Caps", docs/rpc.md peer.ban / peer.unban)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console

from peerd.ctl import explain, peer_ban, peer_unban, peers
from peerd.reputation import Reputation
from peerd.rpc import CONTRACT
from peerd.store import Store
from protocol import trust as tr

PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
OTHER = "12D3KooWQESzG5JVc63XV9t8JiMDhjDEVNo4gWxWnMS7PD6T6MiP"
HOUR = 3_600_000
POLICY = tr.TrustPolicy(ban_threshold=0.2, half_life_ms=HOUR, min_measure_ms=1000)


def rep(tmp_path: Path) -> Reputation:
    return Reputation(Store(tmp_path / "peerd.sqlite").db, POLICY)


def test_the_store_creates_the_table_and_records_survive_a_reopen(tmp_path: Path) -> None:
    r = rep(tmp_path)
    r.observe(PEER, tr.DONE, 1000, work_gflop=40.0, wall_ms=2000)
    r.observe(PEER, tr.FAILED, 1000, work_gflop=0.0, wall_ms=0)
    again = rep(tmp_path)
    view = again.get(PEER, 1000)
    assert view is not None
    assert (view.record.done, view.record.failed, view.record.shown) == (1.0, 1.0, 20.0)
    assert view.trust == 0.5 and not view.banned


def test_records_decay_when_read(tmp_path: Path) -> None:
    r = rep(tmp_path)
    r.observe(PEER, tr.TIMED_OUT, 0, 0.0, 0)
    r.observe(PEER, tr.TIMED_OUT, 0, 0.0, 0)
    view = r.get(PEER, 2 * HOUR)
    assert view is not None and view.record.timed_out == 0.5


def test_the_threshold_bans_and_unban_forgives(tmp_path: Path) -> None:
    r = rep(tmp_path)
    for _ in range(4):
        r.observe(PEER, tr.TIMED_OUT, 0, 0.0, 0)
    records, banned = r.trust_known(0)
    assert banned == {PEER} and records[PEER].timed_out == 4.0
    assert "below policy.ban_threshold" in (r.get(PEER, 0).why_banned or "")  # type: ignore[union-attr]
    assert r.unban(PEER, 0) is True
    assert r.trust_known(0)[1] == frozenset()
    assert r.unban(PEER, 0) is False


def test_ban_by_hand_outlasts_good_work_until_unbanned(tmp_path: Path) -> None:
    r = rep(tmp_path)
    assert r.ban(OTHER, "sent garbage", 5) is True
    assert r.ban(OTHER, "again", 5) is False
    r.observe(OTHER, tr.DONE, 10, 10.0, 1000)
    view = r.get(OTHER, 10)
    assert view is not None and view.banned and view.why_banned == "banned by hand: sent garbage"
    assert view.record.done == 1.0  # the ban did not erase the record
    assert OTHER in r.trust_known(10)[1]
    assert r.unban(OTHER, 10) is True
    assert OTHER not in r.trust_known(10)[1]


def test_trust_known_is_bounded(tmp_path: Path) -> None:
    r = rep(tmp_path)
    for i in range(5):
        r.observe(f"p{i}", tr.DONE, i, 1.0, 100)
    assert set(r.all(10, limit=3)) == {"p4", "p3", "p2"}  # the most recently seen


# --- peerctl: argv → request, pure --------------------------------------------------------------


def check(request: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    method, params = request
    assert method in CONTRACT and CONTRACT[method].permission == "write"
    CONTRACT[method].params(dict(params))
    return request


def test_peer_ban_and_unban_requests() -> None:
    assert check(peer_ban.request(PEER)) == ("peer.ban", {"peer_id": PEER})
    assert check(peer_ban.request(PEER, "spam")) == ("peer.ban", {"peer_id": PEER, "reason": "spam"})
    assert check(peer_unban.request(PEER)) == ("peer.unban", {"peer_id": PEER})


def test_the_contract_refuses_a_bad_peer_id() -> None:
    import pytest

    from peerd.rpc.jsonrpc import ParamsError

    with pytest.raises(ParamsError):
        CONTRACT["peer.ban"].params({"peer_id": "alice"})
    with pytest.raises(ParamsError):
        CONTRACT["peer.ban"].params({"peer_id": PEER, "reason": "x" * 300})


def rendered(render: Any, data: dict[str, Any]) -> str:
    buf = io.StringIO()
    render(data, Console(file=buf, width=240, color_system=None, markup=False))
    return buf.getvalue()


def test_peers_shows_history_and_trust() -> None:
    base = {"c0": 10.0, "load": 0.0, "capacity": 10.0, "age_s": 1.0}
    out = rendered(
        peers.render,
        {
            "peers": [
                {**base, "peer_id": PEER, "trust": None, "rtt_ms": None},
                {
                    **base,
                    "peer_id": OTHER,
                    "rtt_ms": 83.4,
                    "trust": {
                        "done": 3.0,
                        "failed": 1.0,
                        "timed_out": 4.0,
                        "disagreed": 0.0,
                        "shown_gflops": 12.5,
                        "trust": 0.4,
                        "banned": True,
                        "ban_reason": "x",
                    },
                },
            ]
        },
    )
    assert "history" in out and "trust" in out and "rtt" in out
    assert "83 ms" in out  # the measured round trip; the unmeasured one is "-"
    assert "new" in out
    assert "3.0 done / 5.0 bad, shown 12.5" in out and "0.40 banned" in out


def test_explain_says_when_and_why_a_bid_was_capped() -> None:
    bid = {
        "peer_id": PEER,
        "c0": 1e6,
        "load": 0.0,
        "delta_c": 0.0,
        "capacity": 5.0,
        "cost": 0.0,
        "chosen": True,
        "why": "chosen",
        "cap": 5.0,
        "uncapped": 1e6,
        "cap_why": "no history: 1 new peer(s) share at most 25% of R",
    }
    out = rendered(explain.render, {"task_id": "t", "demand": 20.0, "params": {}, "bids": [bid]})
    assert "C capped at 5" in out and "25% of R" in out
    uncapped = {**bid, "cap": None, "cap_why": None}
    assert "capped" not in rendered(
        explain.render, {"task_id": "t", "demand": 20.0, "params": {}, "bids": [uncapped]}
    )
