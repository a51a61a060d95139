"""The per-signer message sequence, strictly increasing across restarts (docs/design.md §3.3).

Sequences are reserved in blocks: before handing out any number above the persisted
high-water mark we durably raise the mark by BLOCK. After a crash we restart *from*
the mark, skipping at most BLOCK unused numbers but never reusing one — so a peer
that restarts can never have its fresh messages dropped as replays, and can never
re-sign an old sequence number. One fsync per BLOCK messages keeps it cheap.
"""

from __future__ import annotations

import time
from pathlib import Path

from peerd.atomic import write_atomic

BLOCK = 1024


class SequenceStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        mark = 0
        if path.exists():
            text = path.read_text().strip()
            mark = int(text) if text.isdigit() else 0
        # Never go below the wall clock in milliseconds either: a peer whose state dir was
        # wiped still issues numbers above anything it signed before (unless its clock
        # went back by more than the skew), so its adverts are not taken for replays.
        self._next = max(mark, int(time.time() * 1000))
        self._mark = self._next
        self._reserve()

    def _reserve(self) -> None:
        self._mark = self._next + BLOCK
        write_atomic(self._path, str(self._mark).encode())

    def next(self) -> int:
        if self._next >= self._mark:
            self._reserve()
        self._next += 1
        return self._next
