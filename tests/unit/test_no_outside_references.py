"""Nothing in the repository cites files a person who clones it does not have.

The first design note and the measured notes lived outside the repository; docs/design.md now
holds both (its §N keep the first note's numbering, appendix B the measured facts). So no
tracked file may cite the outside copies again: ``../shared/``, ``shared/notes``, ``DESIGN.md``
or ``DESIGN §N``. Cite docs/design.md §N, its appendix, docs/*.md or protocol/SPEC.md §N instead.

The files checked are the tracked ones (``git ls-files``), so a file counts from the moment it is
added; without git (an unpacked source tree) every file under the root is read instead, less
the usual build and cache directories.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

#: What an outside reference looks like. ``\bDESIGN\s*§`` also catches "DESIGN§4" and a
#: reference broken across a line ("DESIGN\n§4" is rare, but costs nothing to catch).
OUTSIDE = re.compile(rb"\.\./shared/|shared/notes|DESIGN\.md|\bDESIGN\s*\xc2\xa7")

#: Directories never part of the source tree when there is no git to ask.
_NOT_SOURCE = {
    ".git",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "build",
    "dist",
    ".devnet",
}


def _tracked_files() -> list[str]:
    git = shutil.which("git")
    if git is not None and (ROOT / ".git").exists():
        out = subprocess.run(
            [git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
        return [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
    return [
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file() and not _NOT_SOURCE.intersection(p.relative_to(ROOT).parts)
    ]


def outside_references(name: str, data: bytes) -> list[str]:
    """``name:line: text`` for every outside reference in ``data``."""
    hits = []
    for m in OUTSIDE.finditer(data):
        line_no = data.count(b"\n", 0, m.start()) + 1
        start = data.rfind(b"\n", 0, m.start()) + 1
        end = data.find(b"\n", m.end())
        text = data[start : end if end != -1 else len(data)].decode("utf-8", "replace").strip()
        hits.append(f"{name}:{line_no}: {text[:160]}")
    return hits


def test_no_tracked_file_cites_outside_the_repository() -> None:
    files = [f for f in _tracked_files() if f != THIS]
    assert len(files) > 50, f"found only {len(files)} files under {ROOT}: the listing is broken"
    hits: list[str] = []
    for name in files:
        path = ROOT / name
        if path.is_file() and not path.is_symlink():  # a tracked file deleted in the work tree is not there
            hits += outside_references(name, path.read_bytes())
    assert not hits, (
        "cite docs/design.md (§N, appendix), docs/*.md or protocol/SPEC.md instead:\n" + "\n".join(hits)
    )


def test_the_pattern_catches_each_form_and_passes_the_replacements() -> None:
    # The check above can only fail if the pattern matches what used to be there.
    for cited in (
        "# see DESIGN §4",
        '(DESIGN §3 "Replay")',
        "DESIGN§8",
        "``shared/notes/py-libp2p.md``",
        "# and ../shared/notes/py-libp2p.md)",
        "../shared/seed/000.txt",
        "the first design (DESIGN.md)",
    ):
        assert outside_references("x.py", f"a\n{cited}\n".encode()) == [f"x.py:2: {cited}"], cited
    for fine in (
        "(docs/design.md §4)",
        'docs/design.md appendix B.1 ("trap N" below)',
        "protocol/SPEC.md §11.3",
        "py-libp2p trap 13",
        "seed §3.2 step 1",
        "DESIGNER §4",
        "src/shared/utils.py",
    ):
        assert outside_references("x.py", fine.encode()) == [], fine
