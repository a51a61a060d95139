"""``scripts/bench [AREA ...]``: run benchmark areas, print tables, record them in docs/benchmarks.md.

Each run is written as a dated section under "Latest run" in docs/benchmarks.md; the section it
replaces moves to the top of "History", so earlier runs are kept. ``--json FILE`` also writes
every checked figure with its budget and verdict, machine-readable (issues 9 and 10).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from scripts.benchmarks.common import ROOT, AreaResult, Check, log, machine_info

AREAS = ("adverts", "tasks", "blobs", "worker", "training", "flower", "sim", "trust", "wan", "relay")
DOC = ROOT / "docs" / "benchmarks.md"
LATEST = "<!-- bench:latest -->"
HISTORY = "<!-- bench:history -->"


def render(results: list[AreaResult], machine: dict[str, str], label: str, quick: bool) -> str:
    title = f"### {machine['date']}" + (f" — {label}" if label else "")
    out = [title, ""]
    out.append(
        f"Machine: {machine['cpus']} × {machine['cpu']}, {machine['ram']} RAM, kernel {machine['kernel']}, "
        f"Python {machine['python']}; load average {machine['load']}; peerd {machine['commit']}."
    )
    out.append(
        f"Areas: {', '.join(r.area for r in results)}{' (quick mode: fewer samples)' if quick else ''}."
    )
    out.append("")
    checks = [(r.area, c) for r in results for c in r.checks]
    if checks:
        out += ["| area | figure | measured | budget | verdict |", "| --- | --- | --- | --- | --- |"]
        out += [f"| {a} | {c.what} | {c.value} | {c.budget} | {c.verdict} |" for a, c in checks]
        out.append("")
    for r in results:
        out.append(f"#### {r.area} ({r.seconds:.0f} s)")
        out.append("")
        if r.error:
            out += [f"Failed: `{r.error}`", ""]
        for t in r.tables:
            out += [t.markdown(), ""]
        for note in r.notes:
            out += [f"- {note}"]
        if r.notes:
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _check_json(c: Check) -> dict[str, Any]:
    verdict = {True: "met", False: "missed", None: "no budget or no figure"}[c.met]
    return {"figure": c.what, "measured": c.value, "budget": c.budget, "met": c.met, "verdict": verdict}


def as_json(results: list[AreaResult], machine: dict[str, str], label: str, quick: bool) -> dict[str, Any]:
    """The run, machine-readable: every area's checked figures with budget and verdict, and
    its error if it failed. ``missed`` counts the budgets missed in all."""
    areas = [
        {
            "area": r.area,
            "seconds": round(r.seconds, 1),
            "error": r.error,
            "checks": [_check_json(c) for c in r.checks],
            "notes": list(r.notes),
        }
        for r in results
    ]
    return {
        "machine": machine,
        "label": label,
        "quick": quick,
        "areas": areas,
        "missed": sum(1 for r in results for c in r.checks if c.met is False),
        "failed_areas": [r.area for r in results if r.error],
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    """Whole or not at all: written beside, then renamed over ``path`` (a kill never leaves
    half a file for a reader)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def record(section: str, doc: Path) -> None:
    text = (
        doc.read_text()
        if doc.exists()
        else f"# Benchmarks\n\n## Latest run\n\n{LATEST}\n\n## History\n\n{HISTORY}\n"
    )
    if LATEST not in text or HISTORY not in text:
        text = text.rstrip() + f"\n\n## Latest run\n\n{LATEST}\n\n## History\n\n{HISTORY}\n"
    head, rest = text.split(LATEST, 1)
    previous, tail = rest.split("## History", 1)
    hist_head, hist_rest = tail.split(HISTORY, 1)
    previous = previous.strip()
    moved = f"\n\n{previous}\n" if previous else ""
    doc.write_text(
        f"{head}{LATEST}\n\n{section}\n## History{hist_head}{HISTORY}{moved}{hist_rest.rstrip()}\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    ap.add_argument("areas", nargs="*", metavar="AREA", help=f"any of {', '.join(AREAS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer samples and shorter windows (a smoke run)")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks.md")
    ap.add_argument("--doc", type=Path, default=DOC, help="where to record the run")
    ap.add_argument("--label", default="", help="a note for the run's heading")
    ap.add_argument(
        "--json", type=Path, metavar="FILE", help="also write every figure, budget and verdict as JSON"
    )
    args = ap.parse_args(argv)
    unknown = [a for a in args.areas if a not in AREAS]
    if unknown:
        ap.error(f"unknown area(s) {', '.join(unknown)}; choose from {', '.join(AREAS)}")
    areas = args.areas or list(AREAS)
    machine = machine_info()
    log("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    results: list[AreaResult] = []
    for area in areas:
        t0 = time.monotonic()
        log(f"=== {area}")
        try:
            mod = importlib.import_module(f"scripts.benchmarks.{area}")
            res: AreaResult = mod.run(quick=args.quick)
        except Exception as exc:  # one area failing must not lose the others' figures
            traceback.print_exc()
            res = AreaResult(area, error=f"{type(exc).__name__}: {exc}")
        res.seconds = time.monotonic() - t0
        results.append(res)
        for t in res.tables:
            print("\n" + t.text())
        for c in res.checks:
            print(f"  {c.what}: {c.value} (budget {c.budget}) {c.verdict}")
        if res.error:
            print(f"  FAILED: {res.error}")
        sys.stdout.flush()
    section = render(results, machine, args.label, args.quick)
    if args.json is not None:
        write_json(as_json(results, machine, args.label, args.quick), args.json)
        log(f"figures written to {args.json}")
    if not args.no_doc:
        record(section, args.doc)
        log(f"recorded in {args.doc}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
