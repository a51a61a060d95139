"""The virtual clock, the event queue and the event trace.

Events are ``(time, seq)``-ordered in a heap: ``seq`` is a global insertion counter, so two
events at the same virtual time run in the order they were scheduled — a deterministic
tie-break that never compares callbacks. Every executed event appends one line to the
trace (its time and label); the trace's running SHA-256 is the run's fingerprint: the same
seed gives the same hash (tests/sim/test_determinism.py), and a violation prints the tail.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import deque
from collections.abc import Callable
from typing import Any


class Violation(Exception):
    """An invariant failed; the simulator stops and reports the seed and the trace."""


class Handle:
    """A scheduled event; ``cancel()`` makes it a no-op (it stays in the heap until due)."""

    __slots__ = ("cancelled", "time")

    def __init__(self, time: float) -> None:
        self.time = time
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, *, trace_tail: int = 400, keep_trace: bool = False) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Handle, str, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._hash = hashlib.sha256()
        self.tail: deque[str] = deque(maxlen=trace_tail)
        self.full: list[str] | None = [] if keep_trace else None
        self.events = 0
        #: Called after every event, in order; each may raise Violation.
        self.after_event: list[Callable[[], None]] = []
        self.stopped = False

    def at(self, time: float, label: str, fn: Callable[..., None], *args: Any) -> Handle:
        """Run ``fn(*args)`` at virtual ``time`` (never earlier than now)."""
        t = max(time, self.now)
        h = Handle(t)
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, h, label, fn, args))
        return h

    def after(self, delay: float, label: str, fn: Callable[..., None], *args: Any) -> Handle:
        return self.at(self.now + max(0.0, delay), label, fn, *args)

    def note(self, line: str) -> None:
        """Add a line to the trace without an event (e.g. what an event produced)."""
        entry = f"{self.now:.6f} {line}"
        self._hash.update(entry.encode())
        self._hash.update(b"\n")
        self.tail.append(entry)
        if self.full is not None:
            self.full.append(entry)

    @property
    def trace_hash(self) -> str:
        return self._hash.hexdigest()

    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float, max_events: int | None = None) -> None:
        """Run events until virtual time ``until``, the queue is empty or stop() is called."""
        heap = self._heap
        while heap and not self.stopped:
            t, _seq, h, label, fn, args = heap[0]
            if t > until:
                break
            heapq.heappop(heap)
            if h.cancelled:
                continue
            self.now = t
            self.events += 1
            self.note(label)
            fn(*args)
            for check in self.after_event:
                check()
            if max_events is not None and self.events >= max_events:
                break
        if not self.stopped and (not heap or heap[0][0] > until):
            self.now = max(self.now, until)

    def stop(self) -> None:
        self.stopped = True
