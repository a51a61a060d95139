"""Events: what a driver tells a machine (issue 7). Every event carries ``now_ms``.

``now_ms`` is the driver's clock in Unix milliseconds — the same clock as the
``issued_at``/``expires_at`` of messages (SPEC §6), because a task's deadline is
``announce.issued_at + announce.deadline_ms``. The daemon passes its wall clock; the
simulator passes its virtual clock. A machine never reads a clock of its own.

Messages arrive *verified*: the driver has run SPEC §5 (envelope, signature, canonical
form) and §6 (replay, expiry) and hands over the :class:`~protocol.envelope.Signed`
form. Everything after that — who may send what, the award rule, the vote checks — is
the machine's (and a message that fails it is dropped with a ``Drop`` action).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.certificate import Certificate
from protocol.envelope import Signed
from protocol.trust import PeerRecord, TrustPolicy

#: ``MessageVerified.via``: how the message reached us.
VIA_GOSSIP = "gossip"  #: on the task topic (SPEC §8.1)
VIA_STREAM = "stream"  #: on a bid or result stream (SPEC §8.2, §8.3): the machine answers with ``Reply``
VIA_LOCAL = "local"  #: from a machine of our own daemon (our own bid, our own result)


@dataclass(frozen=True, kw_only=True)
class Event:
    now_ms: int


@dataclass(frozen=True, kw_only=True)
class Start(Event):
    """The driver starts driving the machine (TaskMachine, ShardMachine): the machine
    answers with its first actions (publish the announce, send the bid, …). Exactly once."""


@dataclass(frozen=True, kw_only=True)
class MessageVerified(Event):
    """A verified message of kind announce, bid, award, lease, result, vote or cancel.

    ``sender``: the stream's remote peer (``via="stream"``) or the pubsub origin; a result
    whose signer is not its stream's sender is dropped (``signer_mismatch``).
    ``quoted``: for an award, its quoted bids already opened by the driver (SPEC §10.3
    step 1); ``None`` lets the machine open them itself (``awards.open_quoted_bids``).
    ``checked``: the driver has already run the award rule on this award
    (``awards.check_award``) — one check per daemon instead of one per machine.
    """

    signed: Signed
    via: str = VIA_GOSSIP
    sender: str | None = None
    quoted: tuple[Signed, ...] | None = None
    checked: bool = False


@dataclass(frozen=True, kw_only=True)
class TimerFired(Event):
    """A timer the machine set (``SetTimer``) is due. Never delivered after the machine
    cancelled or re-set it: the driver keeps one pending firing per (machine, name)."""

    name: str


@dataclass(frozen=True, kw_only=True)
class JobFinished(Event):
    """A job the machine started (``StartJob``) ended.

    ``outputs``: name → ``{"sha256", "size"}`` of the output blobs the driver stored
    (the daemon: ``BlobStore.put_bytes`` of each output). ``error``: the executor's error
    tag when not ``ok`` (``memory_limit``, ``timeout``, ``refused`` …), ``detail`` its text.
    """

    job_id: str
    ok: bool
    outputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class BlobFetched(Event):
    """The outcome of one ``FetchBlob``: echoes its ``tag``, ``digest`` and ``source``.

    On success ``data`` holds the bytes when the request asked for them (``want_bytes``),
    the driver has checked the sha256 and stored the blob. On failure ``reason`` is the
    ``ProtocolError`` reason (``hash_mismatch``, ``transport`` …) and ``error`` its text.
    """

    tag: str
    digest: str
    source: str
    ok: bool
    data: bytes | None = None
    reason: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class SendCompleted(Event):
    """The outcome of one ``Send``: the peer's reply (``ok``, ``reason``), or ``ok=False``
    with ``reason="transport"`` when the stream failed or timed out."""

    tag: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class PeerLost(Event):
    """The driver knows ``peer`` is gone (the simulator's crash, a transport verdict).

    The daemon does not send it today: loss is a lease silent for ``lease_ttl_ms``
    (SPEC §7.6), which the machines detect themselves. A machine treats it as that
    peer's lease having lapsed now."""

    peer: str


@dataclass(frozen=True, kw_only=True)
class PeersKnown(Event):
    """What the driver's peer table says (TaskMachine): ``alive`` peers known, ``connected``
    right now. Until some peer is connected after a restart, no lease could have reached
    us, so the TaskMachine does not count holders' silence (see TaskMachine.resume).
    ``offering``: the peers known alive whose advert offers the task's kind and is not
    draining, ourselves included (None: not said); once each has bid, the bid window
    closes early (SPEC §8.2)."""

    alive: int
    connected: int
    offering: frozenset[str] | None = None


@dataclass(frozen=True, kw_only=True)
class CancelRequested(Event):
    """The local user cancels the task (RPC ``task.cancel``): TaskMachine only. A
    contractor learns of a cancel from the submitter's signed ``cancel`` message."""

    reason: str = "cancelled by the submitter"


@dataclass(frozen=True, kw_only=True)
class RoundCertified(Event):
    """Round ``certificate.round`` of the task has a certificate (the driver forwards a
    RoundMachine's ``Certified`` action to the task's TaskMachine and ShardMachines)."""

    certificate: Certificate


@dataclass(frozen=True, kw_only=True)
class InputsSplit(Event):
    """TaskMachine: the per-shard inputs of a ``SplitInputs`` request, one mapping per
    shard in shard order (name → ``{"sha256", "size"}``)."""

    inputs: tuple[Mapping[str, Mapping[str, Any]], ...]


@dataclass(frozen=True, kw_only=True)
class TrustKnown(Event):
    """TaskMachine: what this node has seen each peer deliver (protocol/trust.py records,
    peer → record, decayed or not: the machine decays them to ``now_ms``), the ``[policy]``
    it applies, and the peers it refuses bids from (banned by hand or over the threshold).
    The driver sends it before the bid window closes, like ``PeersKnown``; the latest wins.
    The award caps each bid's C by it (docs/allocation.md "Caps")."""

    records: Mapping[str, PeerRecord]
    policy: TrustPolicy = field(default_factory=TrustPolicy)
    banned: frozenset[str] = frozenset()
