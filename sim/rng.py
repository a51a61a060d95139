"""Seeded randomness, one independent stream per concern.

Each concern (network latency, loss, faults, workload, work noise, ...) draws from its own
``random.Random`` derived from the run's seed and the concern's name, so adding draws to one
concern never shifts another's: a fault schedule stays the same when the latency model
changes, which keeps replays and seed sweeps comparable.
"""

from __future__ import annotations

import hashlib
import random


def stream(seed: int, concern: str) -> random.Random:
    """The random stream of ``concern`` for the run seeded with ``seed``."""
    digest = hashlib.sha256(f"peerd-sim\x00{seed}\x00{concern}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Streams:
    """Lazily created per-concern streams of one run."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def __call__(self, concern: str) -> random.Random:
        r = self._streams.get(concern)
        if r is None:
            r = self._streams[concern] = stream(self.seed, concern)
        return r
