"""Every signed message of the peerd protocol, as frozen dataclasses.

A message is built locally with its constructor (which validates: bad values raise
LocalProtocolError, h11-style) or parsed from a peer with :meth:`Message.from_wire`
(bad values raise RemoteProtocolError). ``protocol/SPEC.md`` is the field-by-field
reference; the converters below are the executable form of it.

Every payload carries ``seq`` (per-signer, strictly increasing, persisted across
restarts), ``issued_at`` and ``expires_at`` (Unix milliseconds). Receivers drop a
message whose sequence is not above the highest seen for (signer, kind, scope), or
that has expired, or that claims a lifetime above the kind's ``MAX_TTL_MS``
(docs/design.md §3.3; gossip's own seen-cache only lasts 120 s, py-libp2p trap 13).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from protocol import schema as s
from protocol.errors import LocalProtocolError, RemoteProtocolError

M = TypeVar("M", bound="Message")

#: Aggregation rules a task may name. ``none`` keeps each shard's outputs apart (echo,
#: sleep, python); the others merge arrays in a signed aggregation round (docs/design.md §6).
AGGREGATION_RULES = ("none", "sum", "weighted_mean", "trimmed_mean", "median")
TASK_KINDS = ("echo", "sleep", "python", "keras-train", "keras-predict")
#: ``verify`` modes of a plain task's announce (SPEC §7.10).
VERIFY_MODES = ("replicate", "spot-check")
#: Most copies a replicated shard starts with (more are added only on disagreement).
MAX_REPLICAS = 5

# Bounds that make a value "absurd" (dropped and counted). Generous on purpose: an
# H100 is ~6e4 GFLOP/s in fp32, so 1e6 GFLOP/s from one machine is already a lie.
MAX_GFLOPS = 1e6
MAX_LOAD = 1000.0
MAX_MEMORY_MB = 1 << 26  # 64 TiB
_SEC = 1000
_DAY = 86_400 * _SEC


def _f(conv: s.Conv) -> Any:
    return dataclasses.field(metadata={"conv": conv})


NET_PARAMS = s.struct(
    {
        "k": s.real(0, 1e6),
        "dc_min": s.real(-MAX_GFLOPS, MAX_GFLOPS),
        "dc_max": s.optional(s.real(-MAX_GFLOPS, MAX_GFLOPS)),
    }
)
#: T_max bound on the wire. Any larger bound is no bound: a set's cost Σ C·L is below 64 · 10¹⁵ ·
#: 10³ (max_shards · C · L, SPEC §10.2), so such a t_max is simply omitted (+∞).
MAX_T_MAX = 1e30
#: An announce's ``net``: the advert's network parameters plus, optionally, ``t_max`` (SPEC §10.2;
#: absent means +∞, so an announce without a bound is the same bytes as before it existed).
ANNOUNCE_NET = s.struct(
    {
        "k": s.real(0, 1e6),
        "dc_min": s.real(-MAX_GFLOPS, MAX_GFLOPS),
        "dc_max": s.optional(s.real(-MAX_GFLOPS, MAX_GFLOPS)),
        "t_max": s.real(0, MAX_T_MAX),
    },
    optional_keys=frozenset({"t_max"}),
)
OUTPUT_REF = s.struct({"sha256": s.SHA256, "size": s.integer(0, 1 << 40)})


@dataclasses.dataclass(frozen=True)
class Message:
    KIND: ClassVar[str] = ""
    TYPE: ClassVar[int] = 0
    MAX_TTL_MS: ClassVar[int] = 60 * _SEC
    #: Fields that may be absent on the wire (SPEC §7.1 ``name?:``): None is encoded by
    #: leaving the key out, so a message without them is the same bytes as before they existed.
    OMITTABLE: ClassVar[frozenset[str]] = frozenset()

    seq: int = _f(s.integer(1, 2**63 - 1))
    issued_at: int = _f(s.TIMESTAMP_MS)
    expires_at: int = _f(s.TIMESTAMP_MS)

    def __post_init__(self) -> None:
        try:
            self._convert_into(self, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        except s.FieldError as exc:
            raise LocalProtocolError(f"{self.KIND}: {exc}", reason=exc.reason) from None
        if self.expires_at < self.issued_at:
            raise LocalProtocolError(f"{self.KIND}: expires before it is issued", reason="absurd")

    @classmethod
    def _convert_into(cls, target: Any, values: Mapping[str, Any]) -> None:
        for f in dataclasses.fields(cls):
            try:
                value = f.metadata["conv"](values[f.name])
            except s.FieldError as exc:
                raise s.FieldError(f"{f.name}: {exc}", reason=exc.reason) from None
            object.__setattr__(target, f.name, value)

    def scope(self) -> str:
        """Replay scope: sequences are compared per (signer, kind, scope)."""
        return ""

    def to_wire(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not (f.name in self.OMITTABLE and getattr(self, f.name) is None)
        }

    @classmethod
    def from_wire(cls: type[M], obj: Any) -> M:
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"{cls.KIND}: payload is not a map", reason="malformed")
        names = {f.name for f in dataclasses.fields(cls)}
        if cls.OMITTABLE and set(obj) != names:
            obj = {**{n: None for n in cls.OMITTABLE if n not in obj}, **obj}
        if set(obj) != names:
            extra = sorted(set(obj) - names)
            missing = sorted(names - set(obj))
            raise RemoteProtocolError(
                f"{cls.KIND}: unknown fields {extra}" if extra else f"{cls.KIND}: missing fields {missing}",
                reason="malformed",
            )
        try:
            return cls(**obj)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc), reason=exc.reason) from None


@dataclasses.dataclass(frozen=True)
class Advert(Message):
    """Seed §3.2 step 1: a node's capacity C⁰ and load L, plus what it offers."""

    KIND: ClassVar[str] = "advert"
    TYPE: ClassVar[int] = 1
    MAX_TTL_MS: ClassVar[int] = 120 * _SEC

    c0: float = _f(s.real(0, MAX_GFLOPS))
    load: float = _f(s.real(0, MAX_LOAD))
    cpu: dict[str, Any] = _f(
        s.struct({"cores": s.integer(0, 4096), "model": s.text(128), "gflops": s.real(0, MAX_GFLOPS)})
    )
    memory: dict[str, Any] = _f(
        s.struct({"total_mb": s.integer(0, MAX_MEMORY_MB), "available_mb": s.integer(0, MAX_MEMORY_MB)})
    )
    gpus: tuple[dict[str, Any], ...] = _f(
        s.seq_of(
            s.struct(
                {
                    "index": s.integer(0, 255),
                    "model": s.text(128),
                    "vram_total_mb": s.integer(0, MAX_MEMORY_MB),
                    "vram_free_mb": s.integer(0, MAX_MEMORY_MB),
                    "util_pct": s.real(0, 100),
                    "gflops": s.real(0, MAX_GFLOPS),
                }
            ),
            16,
        )
    )
    offer: dict[str, Any] = _f(
        s.struct(
            {
                "cores": s.integer(0, 4096),
                "gpus": s.seq_of(s.integer(0, 255), 16),
                "memory_mb": s.integer(0, MAX_MEMORY_MB),
                "kinds": s.seq_of(s.NAME, 16),
                "draining": s.boolean(),
                "slots": s.integer(0, 4096),
                "busy": s.integer(0, 1 << 20),
            }
        )
    )
    params: dict[str, Any] = _f(NET_PARAMS)
    addrs: tuple[str, ...] = _f(s.seq_of(s.text(256), 16))
    version: str = _f(s.text(32))


_VERIFY_FIELDS = s.struct(
    {
        "mode": s.one_of(*VERIFY_MODES),
        "replicas": s.integer(2, MAX_REPLICAS),
        "fraction": s.real(1e-6, 1.0),
        "commit": s.SHA256,
    },
    optional_keys=frozenset({"replicas", "fraction", "commit"}),
)
#: The keys each ``verify`` mode takes, exactly.
_VERIFY_KEYS = {"replicate": {"mode", "replicas"}, "spot-check": {"mode", "fraction", "commit"}}


def _verify(v: Any) -> dict[str, Any]:
    """An announce's ``verify`` (SPEC §7.10): one mode with exactly its keys."""
    out: dict[str, Any] = _VERIFY_FIELDS(v)
    if set(out) != _VERIFY_KEYS[out["mode"]]:
        want = ", ".join(sorted(_VERIFY_KEYS[out["mode"]]))
        raise s.FieldError(f"{out['mode']} takes exactly {want}", reason="malformed")
    return out


@dataclasses.dataclass(frozen=True)
class TaskAnnounce(Message):
    """Seed §3.2 step 2: a submitter announces task j with its work W_j and deadline D_j."""

    KIND: ClassVar[str] = "announce"
    TYPE: ClassVar[int] = 2
    MAX_TTL_MS: ClassVar[int] = 31 * _DAY

    task_id: str = _f(s.TASK_ID)
    kind: str = _f(s.one_of(*TASK_KINDS))
    work: float = _f(s.real(1e-9, 1e15))
    deadline_ms: int = _f(s.integer(1, 30 * _DAY))
    max_shards: int = _f(s.integer(1, 64))
    resources: dict[str, Any] = _f(s.struct({"gpu": s.boolean(), "memory_mb": s.integer(0, MAX_MEMORY_MB)}))
    aggregation: str = _f(s.one_of(*AGGREGATION_RULES))
    rounds: int = _f(s.integer(1, 1000))
    params: dict[str, Any] = _f(s.map_of(s.NAME, s.anything(), 64))
    inputs: dict[str, Any] = _f(s.map_of(s.NAME, OUTPUT_REF, 64))
    bid_window_ms: int = _f(s.integer(1, 60_000))
    net: dict[str, Any] = _f(ANNOUNCE_NET)
    #: How a plain task's results are checked (SPEC §7.10, issue 8 item 5): absent (None) =
    #: ``none``, each shard believed from its one holder, the bytes of an announce from before
    #: replication existed; ``{"mode": "replicate", "replicas": k}``: every shard runs on k
    #: distinct peers and counts only where a strict majority of them signed the same output;
    #: ``{"mode": "spot-check", "fraction": f, "commit": sha256(salt)}``: the shards a secret
    #: salt draws (each with probability f) get a second copy, the salt shown afterwards.
    verify: dict[str, Any] | None = dataclasses.field(default=None, metadata={"conv": s.optional(_verify)})

    OMITTABLE: ClassVar[frozenset[str]] = frozenset({"verify"})

    def scope(self) -> str:
        return self.task_id

    @property
    def replicas(self) -> int:
        """Copies of each shard the first award runs (1 unless ``verify`` replicates)."""
        return int(self.verify.get("replicas", 1)) if self.verify is not None else 1

    @property
    def verify_mode(self) -> str:
        return str(self.verify["mode"]) if self.verify is not None else "none"


@dataclasses.dataclass(frozen=True)
class Bid(Message):
    """An eligible peer's offer for a task: its current C⁰ and L (docs/design.md §4)."""

    KIND: ClassVar[str] = "bid"
    TYPE: ClassVar[int] = 3
    MAX_TTL_MS: ClassVar[int] = 10 * 60 * _SEC

    task_id: str = _f(s.TASK_ID)
    c0: float = _f(s.real(1e-9, MAX_GFLOPS))
    load: float = _f(s.real(0, MAX_LOAD))

    def scope(self) -> str:
        return self.task_id


def _award_caps(v: Any) -> dict[str, float]:
    """Award ``caps``: ``{peer_id: float[0, 10⁶]}(64)``, at least one pair (absent says none)."""
    out: dict[str, float] = s.map_of(s.PEER_ID, s.real(0, MAX_GFLOPS), 64)(v)
    if not out:
        raise s.FieldError("empty caps: leave the field out", reason="malformed")
    return out


@dataclasses.dataclass(frozen=True)
class Award(Message):
    """The submitter's award. ``bids`` are the signed bid envelopes it was computed from,
    so any peer can recompute it (docs/design.md §4: the award is a pure function of its bids).
    ``epoch`` 0 is the first award; each re-award of a lost shard increments it, and
    ``excluded`` lists the peers whose leases were lost (they get no shard)."""

    KIND: ClassVar[str] = "award"
    TYPE: ClassVar[int] = 4
    MAX_TTL_MS: ClassVar[int] = 31 * _DAY

    task_id: str = _f(s.TASK_ID)
    epoch: int = _f(s.integer(0, 10_000))
    bids: tuple[bytes, ...] = _f(s.seq_of(s.binary(4096), 64))
    assignments: tuple[dict[str, Any], ...] = _f(
        s.seq_of(
            s.struct(
                {
                    "shard": s.integer(0, 63),
                    "peer_id": s.PEER_ID,
                    "share": s.real(0, 1),
                    # Per-shard inputs (e.g. this shard's slice of the training data),
                    # on top of the task's own inputs from the announce.
                    "inputs": s.map_of(s.NAME, OUTPUT_REF, 16),
                    # A replica (SPEC §7.10): the shard whose work this one repeats; absent
                    # on a shard that is its own.
                    "of": s.integer(0, 63),
                },
                optional_keys=frozenset({"of"}),
            ),
            64,
        )
    )
    under_capacity: bool = _f(s.boolean())
    excluded: tuple[str, ...] = _f(s.seq_of(s.PEER_ID, 64))
    # The last round the submitter holds certified when it seals this award (SPEC §7.5,
    # §11.1 "The award in force"): nil at epoch 0 and until round 1 is certified. A holder
    # bound by this award starts at round + 1 from ``output``, fetched from ``signers``; a
    # certificate checker takes round + 1 onwards as this award's (or a later one's) rounds.
    certified: dict[str, Any] | None = dataclasses.field(
        default=None,
        metadata={
            "conv": s.optional(
                s.struct(
                    {"round": s.integer(1, 1000), "output": OUTPUT_REF, "signers": s.seq_of(s.PEER_ID, 16)}
                )
            )
        },
    )
    #: The caps on C the submitter applied (peer → GFLOP/s; docs/allocation.md "Caps", SPEC
    #: §10.2): its claim of what each bidder has shown, or the probation cap. Absent (None)
    #: = no caps, the bytes of an award from before caps existed. Present, never empty.
    caps: Mapping[str, float] | None = dataclasses.field(
        default=None, metadata={"conv": s.optional(_award_caps)}
    )

    OMITTABLE: ClassVar[frozenset[str]] = frozenset({"caps"})

    def scope(self) -> str:
        return self.task_id


@dataclasses.dataclass(frozen=True)
class Lease(Message):
    """An awarded peer takes (and heartbeats) its lease on one shard."""

    KIND: ClassVar[str] = "lease"
    TYPE: ClassVar[int] = 5
    MAX_TTL_MS: ClassVar[int] = 10 * 60 * _SEC

    task_id: str = _f(s.TASK_ID)
    epoch: int = _f(s.integer(0, 10_000))
    shard: int = _f(s.integer(0, 63))
    round: int = _f(s.integer(0, 1000))
    state: str = _f(s.one_of("accepted", "running", "done", "failed", "released"))
    detail: str = _f(s.text(512))

    def scope(self) -> str:
        return f"{self.task_id}/{self.shard}"


@dataclasses.dataclass(frozen=True)
class Result(Message):
    """A shard's signed result for one round: a commitment to the hash and weight of its
    output O_i (docs/design.md §6). The bytes themselves move as blobs."""

    KIND: ClassVar[str] = "result"
    TYPE: ClassVar[int] = 6
    MAX_TTL_MS: ClassVar[int] = 31 * _DAY

    task_id: str = _f(s.TASK_ID)
    epoch: int = _f(s.integer(0, 10_000))
    shard: int = _f(s.integer(0, 63))
    round: int = _f(s.integer(0, 1000))
    ok: bool = _f(s.boolean())
    error: str | None = _f(s.optional(s.text(512)))
    outputs: dict[str, Any] = _f(s.map_of(s.NAME, OUTPUT_REF, 64))
    weight: float = _f(s.real(0, 1e15))
    metrics: dict[str, float] = _f(s.map_of(s.NAME, s.real(-1e300, 1e300), 32))

    def scope(self) -> str:
        return f"{self.task_id}/{self.shard}"


VOTE_INPUT = s.struct(
    {"peer_id": s.PEER_ID, "shard": s.integer(0, 63), "sha256": s.SHA256, "weight": s.real(0, 1e15)}
)


@dataclasses.dataclass(frozen=True)
class Vote(Message):
    """A committee member's signed vote for the aggregate of one round (docs/design.md §6)."""

    KIND: ClassVar[str] = "vote"
    TYPE: ClassVar[int] = 7
    MAX_TTL_MS: ClassVar[int] = 31 * _DAY

    task_id: str = _f(s.TASK_ID)
    round: int = _f(s.integer(0, 1000))
    rule: str = _f(s.one_of(*AGGREGATION_RULES))
    committee: tuple[str, ...] = _f(s.seq_of(s.PEER_ID, 16))
    inputs: tuple[dict[str, Any], ...] = _f(s.seq_of(VOTE_INPUT, 64))
    excluded: tuple[dict[str, Any], ...] = _f(
        s.seq_of(s.struct({"peer_id": s.PEER_ID, "reason": s.text(128)}), 64)
    )
    output: dict[str, Any] = _f(OUTPUT_REF)
    attempt: int = _f(s.integer(0, 16))

    def scope(self) -> str:
        return f"{self.task_id}/{self.round}"

    def ballot(self) -> tuple[Any, ...]:
        """What must match between votes for them to count towards one certificate."""
        return (
            self.task_id,
            self.round,
            self.rule,
            self.committee,
            tuple((i["peer_id"], i["shard"], i["sha256"], i["weight"]) for i in self.inputs),
            self.output["sha256"],
        )


@dataclasses.dataclass(frozen=True)
class Cancel(Message):
    """The submitter withdraws its task; only the task's own submitter may send it."""

    KIND: ClassVar[str] = "cancel"
    TYPE: ClassVar[int] = 8
    MAX_TTL_MS: ClassVar[int] = 31 * _DAY

    task_id: str = _f(s.TASK_ID)
    reason: str = _f(s.text(256))

    def scope(self) -> str:
        return self.task_id


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls for cls in (Advert, TaskAnnounce, Bid, Award, Lease, Result, Vote, Cancel)
}
