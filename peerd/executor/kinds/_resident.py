"""What a warm worker keeps between the jobs of one submitter: decoded data and compiled models.

A multi-round keras-train task sends the same shard and the same model config every round; only
the weights change (docs/tasks.md, "keras-train": resident models). Decoding a 58 MB shard and
rebuilding, recompiling and retracing the model each round cost a warm worker more than the
``fit`` of a small model did, so a worker keeps them here, keyed by *content*: the inputs'
content ids (the blob digest the pool passes along) and the params that shape the model. A key
never names a file or a job, so a hit can only be the same bytes and the same model; the weights
still come in with every job and the optimizer is fresh every round.

Entries are tagged with their task (when the pool says which) so the task's end frees them
(``forget_task``); otherwise the least recently used go first, down to a byte budget derived from
each job's memory cap, and everything goes with the worker when the pool reclaims it. A worker
only ever serves one submitter (peerd.executor.pool), so entries never cross submitters.

Pure Python (no Keras): the keras kinds put their objects in, the tests drive it directly.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: At most this many entries (a shard's data and its model count as two).
MAX_ENTRIES = 8
#: Resident bytes allowed, as a share of the running job's memory cap: the job itself needs the
#: rest (TensorFlow's ~0.5 GB, batches, the weights in and out).
BUDGET_SHARE = 0.25


def content_key(kind: str, **parts: Any) -> str:
    """A stable key for ``parts`` (JSON-able): sha256 over their canonical JSON."""
    blob = json.dumps({"kind": kind, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Entry:
    key: str
    value: Any
    nbytes: int
    tasks: set[str] = field(default_factory=set)
    hits: int = 0


class ResidentCache:
    """LRU entries with a byte count, each tagged with the tasks that used it."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[str]:
        """Least recently used first."""
        return list(self._entries)

    def get(self, key: str, task: str | None = None) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        entry.hits += 1
        if task is not None:
            entry.tasks.add(task)
        return entry

    def put(self, key: str, value: Any, nbytes: int, task: str | None = None) -> Entry:
        self.discard(key)
        entry = Entry(key, value, max(0, int(nbytes)), {task} if task is not None else set())
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def discard(self, key: str) -> bool:
        return self._entries.pop(key, None) is not None

    def discard_where(self, keys: Iterable[str]) -> int:
        return sum(self.discard(k) for k in list(keys))

    def trim(self, budget: int, keep: Iterable[str] = ()) -> int:
        """Drop least recently used entries (not those in ``keep``) until at most ``budget``
        bytes are resident. Returns how many were dropped."""
        protected = set(keep)
        dropped = 0
        for key in list(self._entries):
            if self.nbytes <= budget:
                break
            if key in protected:
                continue
            del self._entries[key]
            dropped += 1
        return dropped

    def forget_task(self, task: str) -> int:
        """The task ended: drop every entry it used that no other live task uses."""
        dropped = 0
        for key, entry in list(self._entries.items()):
            if task in entry.tasks:
                entry.tasks.discard(task)
                if not entry.tasks:
                    del self._entries[key]
                    dropped += 1
        return dropped

    def clear(self) -> None:
        self._entries.clear()


#: The worker process's one cache (a worker serves one job at a time).
CACHE = ResidentCache()


def budget_for(memory_bytes: int) -> int:
    return int(memory_bytes * BUDGET_SHARE)
