"""A bid above what its signer's advertised hardware can deliver is refused by the submitter
and counted (SPEC §7.4, protocol/plausibility.py), on the submitter driver's real parts
(tests/component/test_submitter_driver.py's ``Parts``) with a peer table that knows the
bidder's advert: 2 CPU cores, no GPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio

from protocol.messages import Bid
from protocol.plausibility import CPU_GFLOPS_PER_CORE
from tests.component.test_submitter_driver import PEER, Parts, run, seal, submit, until
from tests.samples import sample_advert

T = 1_700_000_000_000
ADVERT = sample_advert(issued_at=T, ttl_ms=10_000, c0=40.0, cores=2, model="x")


class KnownTable:
    def alive(self, now_ms: int) -> list[Any]:
        return [SimpleNamespace(peer_id=PEER.peer_id, advert=ADVERT)]

    def get(self, peer_id: str, now_ms: int) -> Any:
        return SimpleNamespace(advert=ADVERT) if peer_id == PEER.peer_id else None


def test_a_bid_beyond_its_advertised_hardware_is_refused_and_a_plausible_one_is_awarded(
    tmp_path: Path,
) -> None:
    async def body(nursery: trio.Nursery) -> None:
        p = await Parts.started(tmp_path, nursery)
        p.node.table = KnownTable()  # type: ignore[assignment]
        task_id = await submit(p, tmp_path)
        await until(lambda: "announce" in p.p2p.kinds(), "the announce is published")
        lie = seal(PEER, Bid, 1, task_id=task_id, c0=1e5, load=0.0)
        assert p.submitter.accept_bid(lie, PEER.peer_id) == {"ok": False, "reason": "implausible capacity"}
        assert p.counters.snapshot().get("dropped.implausible_c0") == 1
        assert p.store.bids(task_id) == []
        honest = seal(PEER, Bid, 2, task_id=task_id, c0=2 * CPU_GFLOPS_PER_CORE, load=0.0)
        assert p.submitter.accept_bid(honest, PEER.peer_id) == {"ok": True, "reason": ""}
        await until(lambda: "award" in p.p2p.kinds(), "the award is published")

    run(tmp_path, body)
