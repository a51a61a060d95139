"""What the store hands back (peerd/store.py): one frozen record per row, typed, with its
JSON columns already decoded (issue 7 item 2: callers no longer index ``sqlite3.Row`` and
parse JSON themselves).

Signed messages stay their exact envelope bytes (``raw``): the store never re-serialises
what a peer signed, and callers verify them again where it matters. The records are
frozen; their decoded JSON fields are plain dicts made fresh for each read, so a caller
that edits one edits its own copy, never the store's.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any


def _json_dict(text: str | None) -> dict[str, Any] | None:
    """A JSON object column: None when NULL or empty (as callers treated it before)."""
    if not text:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"stored JSON is a {type(value).__name__}, not an object")
    return value


def _bytes(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRecord:
    """A row of ``tasks``: a task this node submitted (``role`` "submitter") or works on
    ("worker")."""

    task_id: str
    role: str
    submitter: str
    kind: str
    state: str
    reason: str | None
    #: The task spec as submitted (with ``input_refs``), or a placeholder for a worker's row.
    spec: dict[str, Any]
    #: The signed announce envelope.
    announce: bytes | None
    created_at: float
    updated_at: float
    deadline_at: float
    #: The task's result (``task.get``'s ``result``), once it has one.
    result: dict[str, Any] | None
    #: Its blobs were deleted over the blob store's budget (peerd/blobgc.py).
    result_collected: bool

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TaskRecord:
        return cls(
            task_id=row["task_id"],
            role=row["role"],
            submitter=row["submitter"],
            kind=row["kind"],
            state=row["state"],
            reason=row["reason"],
            spec=_json_dict(row["spec"]) or {},
            announce=_bytes(row["announce"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            deadline_at=row["deadline_at"],
            result=_json_dict(row["result"]),
            result_collected=bool(row["result_collected"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRecord:
    """One entry of a task's history (``task.get``'s ``events``)."""

    task_id: str
    at: float
    state: str
    message: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EventRecord:
        return cls(task_id=row["task_id"], at=row["at"], state=row["state"], message=row["message"])


@dataclass(frozen=True, slots=True, kw_only=True)
class BidRecord:
    """A signed bid for one of our tasks, as received."""

    task_id: str
    peer_id: str
    raw: bytes
    received_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> BidRecord:
        return cls(
            task_id=row["task_id"],
            peer_id=row["peer_id"],
            raw=bytes(row["raw"]),
            received_at=row["received_at"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AwardRecord:
    """A signed award of one of our tasks, one per epoch."""

    task_id: str
    epoch: int
    raw: bytes

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AwardRecord:
        return cls(task_id=row["task_id"], epoch=row["epoch"], raw=bytes(row["raw"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardRecord:
    """A shard of one of our tasks: who holds it under which epoch, and how it stands."""

    task_id: str
    shard: int
    peer_id: str
    epoch: int
    state: str
    #: How many peers have held it (1 + the times it moved).
    attempts: int
    share: float
    #: The shard's own inputs (a split input's part), name → {"sha256", "size"}.
    inputs: dict[str, Any]
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ShardRecord:
        return cls(
            task_id=row["task_id"],
            shard=row["shard"],
            peer_id=row["peer_id"],
            epoch=row["epoch"],
            state=row["state"],
            attempts=row["attempts"],
            share=row["share"],
            inputs=_json_dict(row["inputs"]) or {},
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultRecord:
    """A holder's signed commit for (round, shard) that counts (protocol/SPEC.md §11)."""

    task_id: str
    round: int
    shard: int
    peer_id: str
    raw: bytes
    fetched: bool
    #: The commit's own sequence number: a higher one supersedes until the certificate.
    seq: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ResultRecord:
        return cls(
            task_id=row["task_id"],
            round=row["round"],
            shard=row["shard"],
            peer_id=row["peer_id"],
            raw=bytes(row["raw"]),
            fetched=bool(row["fetched"]),
            seq=row["seq"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteRecord:
    """A committee member's signed vote for a round, one per attempt."""

    task_id: str
    round: int
    peer_id: str
    attempt: int
    raw: bytes

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VoteRecord:
        return cls(
            task_id=row["task_id"],
            round=row["round"],
            peer_id=row["peer_id"],
            attempt=row["attempt"],
            raw=bytes(row["raw"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateRecord:
    """A round's certificate: its output and the signed votes that certify it."""

    task_id: str
    round: int
    output: dict[str, Any]
    votes: tuple[bytes, ...]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> CertificateRecord:
        return cls(
            task_id=row["task_id"],
            round=row["round"],
            output=_json_dict(row["output"]) or {},
            votes=tuple(bytes.fromhex(v) for v in json.loads(row["votes"])),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkRecord:
    """Worker side: a shard's round we ran, and the signed result we produced for it."""

    task_id: str
    shard: int
    round: int
    epoch: int
    state: str
    result: bytes | None
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> WorkRecord:
        return cls(
            task_id=row["task_id"],
            shard=row["shard"],
            round=row["round"],
            epoch=row["epoch"],
            state=row["state"],
            result=_bytes(row["result"]),
            updated_at=row["updated_at"],
        )


__all__ = [
    "AwardRecord",
    "BidRecord",
    "CertificateRecord",
    "EventRecord",
    "ResultRecord",
    "ShardRecord",
    "TaskRecord",
    "VoteRecord",
    "WorkRecord",
]
