"""Plausibility bounds on C⁰: what hardware can deliver (SPEC §7.2, §7.4; issue 8 item 3).

The wire admits any C⁰ up to 10⁶ GFLOP/s (``messages.MAX_GFLOPS``), far above one machine: a
claim alone used to win tasks that needed 24× an honest peer's capacity. A receiver therefore
bounds C⁰ by the hardware an advert describes:

* CPUs: ``cpu.cores`` × :data:`CPU_GFLOPS_PER_CORE` (fp32 peak of one logical core: two
  512-bit FMA units, 16 lanes, 2 FLOP per FMA, 4 GHz);
* GPUs: per listed GPU, the rated fp32 peak of its model from :data:`GPU_RATED_GFLOPS` (the
  first name fragment the model contains), with :data:`RATED_MARGIN` for clocks and variants;
  a model the table does not know is bounded by :data:`GPU_UNKNOWN_GFLOPS`.

An advert whose ``c0``, ``cpu.gflops`` or a GPU's ``gflops`` is above its bound is dropped
(``implausible_c0``). A bid carries no hardware: it is bounded by its signer's advert when the
receiver holds one (otherwise only by the wire's bound; the award's own caps take over there).
Sans-IO: pure functions over messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.errors import RemoteProtocolError
from protocol.messages import Advert, Bid

#: fp32 GFLOP/s one logical core can deliver at most (2 × 512-bit FMA × 16 lanes × 2 × 4 GHz).
CPU_GFLOPS_PER_CORE = 256.0
#: Rated fp32 peaks (GFLOP/s) by a fragment of the NVML model name, most specific first.
GPU_RATED_GFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 80_000.0),
    ("B200", 80_000.0),
    ("H200", 67_000.0),
    ("H100", 67_000.0),
    ("GH200", 67_000.0),
    ("L40S", 91_600.0),
    ("L40", 90_500.0),
    ("L4", 30_300.0),
    ("A100", 19_500.0),
    ("A10", 31_200.0),
    ("V100", 15_700.0),
    ("T4", 8_100.0),
    ("RTX 5090", 104_800.0),
    ("RTX 4090", 82_600.0),
    ("RTX 3090", 35_600.0),
)
#: Slack over a table entry (boost clocks, board variants).
RATED_MARGIN = 1.25
#: A GPU whose model the table does not know: above the fp32 peak of any GPU sold to date.
GPU_UNKNOWN_GFLOPS = 150_000.0


def gpu_ceiling(model: str) -> float:
    """The most GFLOP/s a GPU called ``model`` can deliver (its rated peak with margin)."""
    upper = model.upper()
    for fragment, rated in GPU_RATED_GFLOPS:
        if fragment in upper:
            return rated * RATED_MARGIN
    return GPU_UNKNOWN_GFLOPS


def advert_ceiling(advert: Advert) -> float:
    """The most C⁰ the hardware ``advert`` describes can deliver."""
    cpu: Mapping[str, Any] = advert.cpu
    return float(cpu["cores"]) * CPU_GFLOPS_PER_CORE + sum(gpu_ceiling(str(g["model"])) for g in advert.gpus)


def check_advert(advert: Advert) -> None:
    """Raise ``RemoteProtocolError(reason="implausible_c0")`` unless every capacity ``advert``
    claims is within what its hardware can deliver."""
    cores = int(advert.cpu["cores"])
    if float(advert.cpu["gflops"]) > cores * CPU_GFLOPS_PER_CORE:
        raise RemoteProtocolError(
            f"cpu.gflops {advert.cpu['gflops']:g} above {cores} cores × {CPU_GFLOPS_PER_CORE:g}",
            reason="implausible_c0",
        )
    for g in advert.gpus:
        bound = gpu_ceiling(str(g["model"]))
        if float(g["gflops"]) > bound:
            raise RemoteProtocolError(
                f"gpu {g['index']} ({g['model']!r}) claims {g['gflops']:g} GFLOP/s, above {bound:g}",
                reason="implausible_c0",
            )
    ceiling = advert_ceiling(advert)
    if advert.c0 > ceiling:
        raise RemoteProtocolError(
            f"c0 {advert.c0:g} above what its hardware can deliver ({ceiling:g})", reason="implausible_c0"
        )


def check_bid(bid: Bid, advert: Advert | None) -> None:
    """Raise ``RemoteProtocolError(reason="implausible_c0")`` when the bidder's advert is known
    and ``bid.c0`` is above what that hardware can deliver."""
    if advert is None:
        return
    ceiling = advert_ceiling(advert)
    if bid.c0 > ceiling:
        raise RemoteProtocolError(
            f"bid c0 {bid.c0:g} above what the bidder's advertised hardware can deliver ({ceiling:g})",
            reason="implausible_c0",
        )


__all__ = ["advert_ceiling", "check_advert", "check_bid", "gpu_ceiling"]
