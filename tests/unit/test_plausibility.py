"""Plausibility bounds on C⁰ (protocol/plausibility.py, SPEC §7.2, §7.4): a claim above what the
advertised hardware can deliver is refused as ``implausible_c0``."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.errors import RemoteProtocolError
from protocol.messages import Advert, Bid
from protocol.plausibility import (
    CPU_GFLOPS_PER_CORE,
    GPU_UNKNOWN_GFLOPS,
    advert_ceiling,
    check_advert,
    check_bid,
    gpu_ceiling,
)
from tests.samples import sample_advert

T = 1_700_000_000_000


def gpu(model: str, gflops: float) -> dict[str, Any]:
    return {
        "index": 0,
        "model": model,
        "vram_total_mb": 1,
        "vram_free_mb": 1,
        "util_pct": 0.0,
        "gflops": gflops,
    }


def advert(c0: float, *, cores: int = 2, cpu_gflops: float = 40.0, gpus: tuple[Any, ...] = ()) -> Advert:
    return sample_advert(
        issued_at=T, ttl_ms=10_000, c0=c0, cores=cores, cpu_gflops=cpu_gflops, model="x", gpus=gpus
    )


def bid(c0: float) -> Bid:
    return Bid(seq=1, issued_at=T, expires_at=T + 60_000, task_id="ab" * 16, c0=c0, load=0.0)


def refused(fn: Any, *args: Any) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        fn(*args)
    assert info.value.reason == "implausible_c0"
    return str(info.value)


def test_an_honest_cpu_advert_passes_and_the_issues_lie_does_not() -> None:
    check_advert(advert(40.0))
    check_advert(advert(2 * CPU_GFLOPS_PER_CORE, cpu_gflops=2 * CPU_GFLOPS_PER_CORE))  # the bound itself
    # Issue 8: C⁰ = 10⁶ GFLOP/s was inside the wire's bound.
    assert "above what its hardware can deliver" in refused(check_advert, advert(1e6))
    assert "cpu.gflops" in refused(check_advert, advert(40.0, cpu_gflops=2 * CPU_GFLOPS_PER_CORE + 1))


def test_gpus_are_bounded_by_their_rated_peak_or_a_constant() -> None:
    h100 = gpu("NVIDIA H100 80GB HBM3", 66_900.0)
    check_advert(advert(66_900.0 + 40.0, gpus=(h100,)))
    assert gpu_ceiling("NVIDIA H100 80GB HBM3") == gpu_ceiling("NVIDIA H100 PCIe") < GPU_UNKNOWN_GFLOPS
    assert gpu_ceiling("NVIDIA A100-SXM4-40GB") < gpu_ceiling("NVIDIA H200")
    assert "H100" in refused(check_advert, advert(40.0, gpus=(gpu("NVIDIA H100 80GB HBM3", 200_000.0),)))
    check_advert(advert(40.0, gpus=(gpu("Some Future GPU", GPU_UNKNOWN_GFLOPS),)))
    refused(check_advert, advert(40.0, gpus=(gpu("Some Future GPU", GPU_UNKNOWN_GFLOPS + 1),)))
    # c0 above CPU + GPUs together, each part honest on its own.
    ceiling = advert_ceiling(advert(40.0, gpus=(h100,)))
    refused(check_advert, advert(ceiling + 1, gpus=(h100,)))


def test_a_bid_is_bounded_by_its_signers_advert_when_known() -> None:
    check_bid(bid(1e6), None)  # no advert: only the wire's bound
    check_bid(bid(2 * CPU_GFLOPS_PER_CORE), advert(40.0))
    assert "bidder's advertised hardware" in refused(check_bid, bid(1e5), advert(40.0))
