"""``peerctl top`` without a daemon: argv → requests, and rendering from a fake RPC."""

from __future__ import annotations

import io
from typing import Any

import click
import pytest
from rich.console import Console

from peerd.ctl import top

ME = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAme"
OTHER = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBother"


def test_options_from_the_command_line() -> None:
    assert top.options(2.0, False, None, 20, 10) == top.Options(2.0, None, 20, 10)
    assert top.options(0.5, True, None, 5, 3).iterations == 1
    assert top.options(1.0, False, 4, 5, 3).iterations == 4
    for bad in (
        lambda: top.options(0, False, None, 20, 10),
        lambda: top.options(1, False, 0, 20, 10),
        lambda: top.options(1, True, 3, 20, 10),
        lambda: top.options(1, False, None, 0, 10),
        lambda: top.options(1, False, None, 5000, 10),
        lambda: top.options(1, False, None, 20, -1),
    ):
        with pytest.raises(click.BadParameter):
            bad()


def test_requests_are_read_methods_and_details_only_for_live_tasks() -> None:
    assert top.requests(top.Options(peers=7)) == [
        ("node.info", {}),
        ("peers.list", {"limit": 7}),
        ("task.list", {}),
    ]
    tasks = [
        {"task_id": "old", "state": "running", "created_at": 1},
        {"task_id": "new", "state": "bidding", "created_at": 3},
        {"task_id": "fin", "state": "done", "created_at": 2},
    ]
    assert top.detail_requests(tasks) == [("task.get", {"task_id": "new"}), ("task.get", {"task_id": "old"})]
    assert top.detail_requests(tasks, limit=1) == [("task.get", {"task_id": "new"})]


class FakeRpc:
    """Answers the read methods from canned state; counters grow between snapshots."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.accepted = 0

    def __call__(self, method: str, params: dict[str, Any]) -> Any:
        self.calls.append(method)
        if method == "node.info":
            self.accepted += 20
            return {
                "peer_id": ME,
                "version": "0.1",
                "uptime_s": 75,
                "connected_peers": 1,
                "advert": {"c0": 10000.0, "load": 0.5, "capacity": 9000.0, "offer": {"slots": 2, "busy": 1}},
                "counters": {
                    "accepted.advert": self.accepted,
                    "dropped.bad_sig": 2,
                    "p2p.gossip_published": 5,
                },
            }
        if method == "peers.list":
            return {
                "peers": [
                    {
                        "peer_id": ME,
                        "self": True,
                        "c0": 10000.0,
                        "load": 0.5,
                        "capacity": 9000.0,
                        "offer": {"slots": 2, "busy": 1},
                        "age_s": 1.5,
                    },
                    {
                        "peer_id": OTHER,
                        "self": False,
                        "c0": 300.0,
                        "load": 0.0,
                        "capacity": 300.0,
                        "offer": {"slots": 1, "busy": 0},
                        "age_s": 3.0,
                        "trust": 0.75,
                    },
                ],
                "next": None,
            }
        if method == "task.list":
            return {
                "tasks": [
                    {
                        "task_id": "t-train",
                        "name": "mnist",
                        "kind": "keras_fedavg",
                        "role": "submitter",
                        "state": "running",
                        "created_at": 0,
                    },
                    {
                        "task_id": "t-echo",
                        "name": "hello",
                        "kind": "echo",
                        "role": "submitter",
                        "state": "done",
                        "created_at": 0,
                    },
                ]
            }
        if method == "task.get":
            assert params == {"task_id": "t-train"}
            return {
                "spec": {"rounds": 5},
                "rounds": [{"certified": True}, {"certified": True}, {}],
                "shards": [{"state": "running"}],
            }
        raise AssertionError(method)


def rendered(renderable: Any) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200, highlight=False, markup=False).print(renderable)
    return buf.getvalue()


def test_rendering_shows_peers_tasks_progress_slots_and_rates() -> None:
    rpc = FakeRpc()
    clock = iter([100.0, 102.0])
    opts = top.Options()
    first = top.snapshot(rpc, opts, now=lambda: next(clock))
    assert rpc.calls == ["node.info", "peers.list", "task.list", "task.get"]  # no task.get for done tasks
    text = rendered(top.render(first, None, opts))
    assert "worker slots 1/2 busy" in text
    assert "L 0.50" in text and "C 9000" in text
    assert "10,000" not in text, "whole numbers print as numbers"
    assert "(next refresh)" in text  # no rate before a second snapshot
    assert "round 2/5" in text
    assert "t-echo" in text and "done" in text
    assert "(self)" in text and "trust" in text and "0.75" in text
    # The peer with the larger C comes first.
    assert text.index("12D3KooW…AAAAme (self)") < text.index("12D3KooW…Bother")
    second = top.snapshot(rpc, opts, now=lambda: next(clock))
    text = rendered(top.render(second, first, opts))
    assert "in advert 10.0" in text  # 20 more accepted adverts in 2 s
    assert "dropped 0.0" in text
    assert "1m15s" in text  # uptime


def test_trust_column_only_where_adverts_carry_one() -> None:
    rpc = FakeRpc()
    snap = top.snapshot(rpc, top.Options())
    snap.peers["peers"] = [p for p in snap.peers["peers"] if "trust" not in p]
    assert "trust" not in rendered(top.render(snap, None, top.Options()))
