"""``./scripts/sim``: simulate N peers running the real protocol machines (docs/simulation.md).

Exit status: 0 when every invariant held, 1 on a violation (the seed and the event trace
are printed), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from sim.faults import FaultSpec, FaultSpecError
from sim.net import NetConfig
from sim.run import render, run
from sim.world import SimConfig


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return v


@dataclass(frozen=True)
class Options:
    trace: Path | None
    json: bool
    tail: int


def parse(argv: list[str] | None) -> tuple[SimConfig, Options]:
    ap = argparse.ArgumentParser(prog="scripts/sim", description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--peers", type=_positive_int, default=20, help="virtual peers (default 20)")
    ap.add_argument("--tasks", type=int, default=10, help="tasks submitted (default 10)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", default="", help="e.g. crash=0.05,partition=30s,liars=0.1,slow=0.1,loss=0.01")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument(
        "--stub-signatures", action="store_true", help="SHA-512 stand-in for Ed25519 (largest runs)"
    )
    ap.add_argument(
        "--trust",
        action="store_true",
        help="submitters cap bids by what peers delivered (docs/allocation.md)",
    )
    ap.add_argument("--latency-ms", type=float, default=40.0, help="median one-way latency")
    ap.add_argument("--jitter", type=float, default=0.5, help="log-normal sigma of latency (0: none)")
    ap.add_argument("--loss", type=float, default=0.0, help="per-message loss probability")
    ap.add_argument("--bandwidth-mbit", type=float, default=100.0, help="uplink per peer")
    ap.add_argument("--adverts", default="full", help="'full' (every peer) or 'sampled:D' (D random peers)")
    ap.add_argument("--bidders", type=int, default=0, help="0: every peer bids; D: D random peers per task")
    ap.add_argument("--arrival-rate", type=float, default=2.0, help="tasks per virtual second")
    ap.add_argument("--aggregated", type=float, default=0.5, help="fraction of tasks with aggregation rounds")
    ap.add_argument(
        "--replicated", type=float, default=0.0, help="fraction of plain tasks with verify = replicate"
    )
    ap.add_argument(
        "--data-mb", default="0", help="keras-train data size, MB: 'X' or 'LO-HI' (split over shards)"
    )
    ap.add_argument("--cancel", type=float, default=0.0, help="fraction of tasks their submitter cancels")
    # Test-only (tests/sim/test_cli.py): build every RoundMachine with this planted bug.
    ap.add_argument("--plant-bug", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trace", type=Path, help="write the whole event trace to this file")
    ap.add_argument("--trace-tail", type=int, default=60, help="trace lines printed on a violation")
    args = ap.parse_args(argv)
    try:
        faults = FaultSpec.parse(args.faults)
    except FaultSpecError as exc:
        ap.error(f"--faults: {exc}")
    adverts, sample = "full", 16
    if args.adverts != "full":
        kind, _, d = args.adverts.partition(":")
        if kind != "sampled" or not d.isdigit() or int(d) < 1:
            ap.error("--adverts: 'full' or 'sampled:D' with D >= 1")
        adverts, sample = "sampled", int(d)
    if not (0 <= args.loss < 1) or args.latency_ms <= 0 or args.bandwidth_mbit <= 0 or args.arrival_rate <= 0:
        ap.error("--loss in [0, 1), --latency-ms, --bandwidth-mbit and --arrival-rate > 0")
    if not math.isfinite(args.jitter) or args.jitter < 0:
        ap.error("--jitter must be >= 0")
    try:
        lo, _, hi = args.data_mb.partition("-")
        data_mb = (float(lo), float(hi or lo))
    except ValueError:
        ap.error("--data-mb: a size in MB or LO-HI")
    if not (0 <= data_mb[0] <= data_mb[1] < 1e5) or not (0 <= args.cancel <= 1):
        ap.error("--data-mb needs 0 <= LO <= HI; --cancel is a fraction in [0, 1]")
    cfg = SimConfig(
        peers=args.peers,
        tasks=args.tasks,
        seed=args.seed,
        faults=faults,
        net=NetConfig(
            latency_ms=args.latency_ms,
            jitter=args.jitter,
            loss=args.loss,
            bandwidth=args.bandwidth_mbit * 125_000,
        ),
        stub_signatures=args.stub_signatures,
        trust=args.trust,
        adverts=adverts,
        advert_sample=sample,
        bidders=args.bidders,
        arrival_rate=args.arrival_rate,
        aggregated=args.aggregated,
        replicated=args.replicated,
        keep_trace=args.trace is not None,
        planted_bug=args.plant_bug,
        data_mb=data_mb,
        cancel=args.cancel,
    )
    return cfg, Options(trace=args.trace, json=args.json, tail=args.trace_tail)


def main(argv: list[str] | None = None) -> int:
    cfg, opts = parse(argv)
    out = run(cfg)
    if opts.trace is not None and out.trace is not None:
        opts.trace.write_text("\n".join(out.trace) + "\n")
    if opts.json:
        doc = {**out.stats, "invariants": "ok" if out.ok else "violated", "violation": out.violation}
        if not out.ok:
            doc["trace_tail"] = out.trace_tail[-opts.tail :]
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        print(render(out))
    if not out.ok:
        print(f"\nseed {cfg.seed}: invariant violated: {out.violation}", file=sys.stderr)
        print(
            f"replay: ./scripts/sim --peers {cfg.peers} --tasks {cfg.tasks} --seed {cfg.seed}"
            + (f" --faults {cfg.faults.describe()}" if cfg.faults.describe() != "none" else ""),
            file=sys.stderr,
        )
        print(f"last {min(opts.tail, len(out.trace_tail))} events of the trace:", file=sys.stderr)
        for line in out.trace_tail[-opts.tail :]:
            print("  " + line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
