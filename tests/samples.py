"""Sample messages for tests: one advert builder instead of a copy per test module."""

from __future__ import annotations

from typing import Any

from protocol.messages import Advert

T0 = 1_700_000_000_000


def sample_advert(
    *,
    seq: int = 1,
    issued_at: int = T0,
    ttl_ms: int = 60_000,
    c0: float = 10.0,
    cores: int = 1,
    cpu_gflops: float | None = None,
    model: str = "test",
    gpus: tuple[Any, ...] = (),
) -> Advert:
    """A well-formed advert of an idle CPU peer offering ``echo`` on one slot."""
    return Advert(
        seq=seq,
        issued_at=issued_at,
        expires_at=issued_at + ttl_ms,
        c0=c0,
        load=0.0,
        cpu={"cores": cores, "model": model, "gflops": c0 if cpu_gflops is None else cpu_gflops},
        memory={"total_mb": 1024, "available_mb": 512},
        gpus=gpus,
        offer={
            "cores": cores,
            "gpus": [],
            "memory_mb": 512,
            "kinds": ["echo"],
            "draining": False,
            "slots": 1,
            "busy": 0,
        },
        params={"k": 0.2, "dc_min": 0.0, "dc_max": None},
        addrs=(),
        version="0.1.0",
    )
