"""Fault injection: what ``--faults`` accepts and the schedule it draws.

``--faults crash=0.05,partition=30s,liars=0.1,slow=0.1,loss=0.01`` means:

``crash=P``
    each peer crashes with probability P at a uniform time in the first 60 % of the run,
    stays down ``restart`` seconds (uniform in [5, 30] by default; ``restart=never`` keeps
    it down) and restarts from what it persisted (the machines' persist actions).
``partition=DUR`` (or ``partition=DUR@AT``)
    one timed partition of DUR seconds (``30s``, ``1m``): a random third of the peers is cut
    off from the rest, starting at AT seconds or at a uniform time in the first half of the run.
``liars=Q``
    a fraction Q of the peers claims 10× its real capacity in adverts and bids, and returns
    wrong results (outputs that differ from an honest run's, committed as if genuine).
``slow=Q``
    a fraction Q of the peers is honest about its capacity but runs 5× slower than it
    (a machine that is busier than it knows).
``silent=Q``
    a fraction Q of the peers bids and heartbeats the leases of the shards it is awarded, but
    never delivers: their jobs never finish (issue 8's heartbeat-but-silent attack; the
    submitter's hold limit gives each such shard a backup holder, protocol/SPEC.md §7.6).
``loss=P``
    every message is lost with probability P (overrides ``--loss``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


class FaultSpecError(ValueError):
    pass


def parse_duration(text: str) -> float:
    t = text.strip().lower()
    try:
        if t.endswith("ms"):
            return float(t[:-2]) / 1000
        if t.endswith("s"):
            return float(t[:-1])
        if t.endswith("m"):
            return float(t[:-1]) * 60
        return float(t)
    except ValueError:
        raise FaultSpecError(f"bad duration {text!r} (e.g. 30s, 2m, 500ms)") from None


def _fraction(key: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise FaultSpecError(f"{key}: {text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise FaultSpecError(f"{key}: {v} is not a fraction in [0, 1]")
    return v


@dataclass(frozen=True)
class FaultSpec:
    crash: float = 0.0
    restart: tuple[float, float] | None = (5.0, 30.0)  # None: crashed peers stay down
    partition: float = 0.0  # seconds; 0 = none
    partition_at: float | None = None
    liars: float = 0.0
    slow: float = 0.0
    loss: float | None = None
    silent: float = 0.0

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        kw: dict[str, object] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise FaultSpecError(f"{item!r}: expected key=value")
            if key in ("crash", "liars", "slow", "loss", "silent"):
                kw[key] = _fraction(key, value)
            elif key == "partition":
                dur, _, at = value.partition("@")
                kw["partition"] = parse_duration(dur)
                if at:
                    kw["partition_at"] = parse_duration(at)
            elif key == "restart":
                if value == "never":
                    kw["restart"] = None
                else:
                    lo, _, hi = value.partition("-")
                    kw["restart"] = (parse_duration(lo), parse_duration(hi or lo))
            else:
                raise FaultSpecError(
                    f"unknown fault {key!r} (crash, partition, liars, slow, silent, loss, restart)"
                )
        return cls(**kw)  # type: ignore[arg-type]

    def describe(self) -> str:
        parts = []
        if self.crash:
            parts.append(f"crash={self.crash:g}")
        if self.partition:
            parts.append(f"partition={self.partition:g}s")
        if self.liars:
            parts.append(f"liars={self.liars:g}")
        if self.slow:
            parts.append(f"slow={self.slow:g}")
        if self.silent:
            parts.append(f"silent={self.silent:g}")
        if self.loss:
            parts.append(f"loss={self.loss:g}")
        return ",".join(parts) or "none"


@dataclass(frozen=True)
class Crash:
    peer: int
    at: float
    down_for: float | None  # None: never restarts


@dataclass(frozen=True)
class Schedule:
    crashes: tuple[Crash, ...]
    partition: tuple[float, float, frozenset[int]] | None  # (start, end, side)
    liars: frozenset[int]
    slow: frozenset[int]
    silent: frozenset[int] = frozenset()


def draw(
    spec: FaultSpec, n_peers: int, horizon: float, rng: random.Random, *, protect: frozenset[int]
) -> Schedule:
    """The run's fault schedule. Peers in ``protect`` never crash or lie (the simulator
    protects the submitters only when ``SimConfig.crash_submitters`` is off)."""
    candidates = [i for i in range(n_peers) if i not in protect]
    crashes = []
    for i in candidates:
        if spec.crash and rng.random() < spec.crash:
            at = rng.uniform(0.0, 0.6 * horizon)
            down = None if spec.restart is None else rng.uniform(*spec.restart)
            crashes.append(Crash(i, at, down))
    partition = None
    if spec.partition:
        start = spec.partition_at if spec.partition_at is not None else rng.uniform(0.0, 0.5 * horizon)
        side = frozenset(rng.sample(range(n_peers), max(1, n_peers // 3)))
        partition = (start, start + spec.partition, side)
    n_liars = round(spec.liars * len(candidates))
    liars = frozenset(rng.sample(candidates, n_liars)) if n_liars else frozenset()
    rest = [i for i in candidates if i not in liars]
    n_slow = min(len(rest), round(spec.slow * len(candidates)))
    slow = frozenset(rng.sample(rest, n_slow)) if n_slow else frozenset()
    rest = [i for i in rest if i not in slow]
    n_silent = min(len(rest), round(spec.silent * len(candidates)))
    # Drawn last, from the generator's remaining stream: runs without ``silent`` draw as before.
    silent = frozenset(rng.sample(rest, n_silent)) if n_silent else frozenset()
    return Schedule(tuple(crashes), partition, liars, slow, silent)
