"""``python scripts/failures.py JUNIT.xml``: print each failed test of a pytest JUnit report
again, whole enough to diagnose, at the end of the output.

CI keeps only the tail of a run's output, and pytest prints a failure's traceback and its
captured log far above that tail (issue 10: a flaky test's message was lost that way). This
prints, per failed or erroring test, its id, the last lines of its traceback and the last
lines of its captured output and log, so the tail CI keeps holds all of that.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: Lines kept per part (traceback, stdout, stderr, log) of one failure.
TAIL_LINES = 60
#: Failures printed in full; the rest only by name.
MAX_FULL = 5


def _tail(text: str | None, n: int = TAIL_LINES) -> str:
    lines = (text or "").rstrip().splitlines()
    cut = len(lines) - n
    return "\n".join(([f"[… {cut} lines above]"] if cut > 0 else []) + lines[-n:])


def report(path: Path) -> str:
    """The failures in the JUnit file ``path`` as text; empty when none failed."""
    root = ET.parse(path).getroot()
    failed = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            failed.append((case, bad))
    out: list[str] = []
    for i, (case, bad) in enumerate(failed):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        out.append(f"===== FAILED {name} ({bad.tag}: {(bad.get('message') or '')[:300]})")
        if i >= MAX_FULL:
            continue
        out.append(_tail(bad.text))
        for part in ("system-out", "system-err"):
            node = case.find(part)
            if node is not None and (node.text or "").strip():
                out.append(f"----- {part}")
                out.append(_tail(node.text))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: scripts/failures.py JUNIT.xml", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        return 0  # pytest stopped before writing it: its own output says why
    text = report(path)
    if text:
        print("\n" + text, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
