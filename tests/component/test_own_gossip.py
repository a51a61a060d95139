"""What the node gossips reaches the submitter's own-gossip hook (peerd/submitter.py): only our
leases are verified and fed to the task's machine; our other messages are passed over by kind
without a signature check (issue 10 item 2, a per-task cost the profile showed). That our
leases still reach the machine: test_submitter_driver's own-leases test."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from peerd import submitter as submitter_module
from protocol.messages import Bid, Lease
from tests.component.test_submitter_driver import ME, Parts, run, submit, until


def test_only_our_leases_are_verified_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        task_id = await submit(p, tmp_path)
        await until(lambda: "announce" in p.p2p.kinds(), "the announce is published")
        _, own_bid = p.node.seal(Bid, ttl_ms=60_000, task_id=task_id, c0=50.0, load=0.0)
        assert p.submitter.accept_bid(own_bid.raw, ME.peer_id, verified=own_bid)["ok"] is True
        await until(lambda: "award" in p.p2p.kinds(), "the award is published")

        opened: list[bytes] = []
        real_open = submitter_module.open_envelope

        def counting_open(raw: bytes, **kw: object) -> object:
            opened.append(raw)
            return real_open(raw, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(submitter_module, "open_envelope", counting_open)
        announce_raw = next(s.raw for s in p.p2p.published if s.kind == "announce")
        award_raw = next(s.raw for s in p.p2p.published if s.kind == "award")
        p.submitter._own_gossip(announce_raw)
        p.submitter._own_gossip(award_raw)
        assert opened == []  # fails on the code that verified every own message here
        lease, _ = p.node.seal(
            Lease, ttl_ms=3_000, task_id=task_id, epoch=0, shard=0, round=0, state="running", detail=""
        )
        p.submitter._own_gossip(lease)
        assert opened == [lease]  # a lease is still verified before the machine sees it
        assert p.state(task_id) == "running"
        # ...and the shard's state that task.get shows is the lease's (it stayed "awarded"
        # while our own node ran the shard: our leases never pass the task bus).
        view = p.submitter.book.get(task_id)
        assert view is not None and view.lease_states == {(ME.peer_id, 0): "running"}

    run(tmp_path, body)
