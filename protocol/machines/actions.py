"""Actions: what a machine asks its driver to do (issue 7), and the typed records it
persists. A driver performs the actions of one ``handle`` call in list order.

Protocol names in ``Send.protocol``: ``"bid"`` is ``/peerd/bid/2.0.0`` (SPEC §8.2),
``"result"`` is ``/peerd/result/2.0.0`` (SPEC §8.3). ``Publish`` is the task topic
``peerd/tasks/2`` (SPEC §8.1). A driver also hands what it publishes or sends to its
*own* machines that follow the task (the daemon does so today: a node's own announce,
award and result reach its own contractor and committee without the network).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.certificate import Certificate
from protocol.envelope import Signed

PROTO_BID = "bid"
PROTO_RESULT = "result"
#: ``FetchBlob.size`` when the machine knows no size (a vote input names only a hash): the
#: driver applies its own cap (the daemon: ``policy.max_blob_mb``).
ANY_SIZE = -1


@dataclass(frozen=True, kw_only=True)
class Action:
    pass


@dataclass(frozen=True, kw_only=True)
class Publish(Action):
    """Gossip ``signed.raw`` on ``peerd/tasks/2`` (best effort, as ``Node.gossip``)."""

    signed: Signed


@dataclass(frozen=True, kw_only=True)
class KeepOwnResult(Action):
    """A plain task's result, which goes to its submitter only (``Send``) and not on gossip
    (SPEC §7.7): the driver records it in its own view of the task, as it would a result it
    published, and sends nothing."""

    signed: Signed


@dataclass(frozen=True, kw_only=True)
class Send(Action):
    """Open a stream of ``protocol`` to ``peer``, send ``signed.raw`` as one frame and
    read the reply; answer with ``SendCompleted(tag=tag)``. To our own peer ID the driver
    delivers locally (the daemon calls its own submitter) and still answers."""

    peer: str
    protocol: str
    signed: Signed
    tag: str


@dataclass(frozen=True, kw_only=True)
class Reply(Action):
    """Answer the stream the current message came in on (``via="stream"``) with
    ``{"ok": ok, "reason": reason}`` (SPEC §8.2, §8.3)."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class StartJob(Action):
    """Run a job in the executor and answer with ``JobFinished(job_id=job_id)``.

    ``inputs``: name → ``{"sha256", "size"}`` of blobs the machine has fetched (the
    driver maps them to paths). ``purpose`` is ``"shard"`` (a contractor's round) or
    ``"evaluate"`` (the submitter scores a certified model on its own held-out input:
    kind ``keras-predict``, trusted, local). The driver adds what is its own to know:
    the limits from ``[limits]``, the wall limit from the deadline, the trust policy, and
    the per-kind parameter rules (e.g. keras-train's per-round seed)."""

    job_id: str
    task_id: str
    kind: str
    shard: int
    round: int
    epoch: int
    submitter: str
    params: Mapping[str, Any]
    inputs: Mapping[str, Mapping[str, Any]]
    purpose: str = "shard"


@dataclass(frozen=True, kw_only=True)
class CancelJob(Action):
    """Kill a running job (cancel, lost award); no ``JobFinished`` follows for it."""

    job_id: str


@dataclass(frozen=True, kw_only=True)
class FetchBlob(Action):
    """Fetch blob ``digest`` (at most ``size`` bytes, or the driver's cap for
    :data:`ANY_SIZE`) from ``source`` — one peer; the
    machines decide the next source and any retry themselves — or return the local copy.
    Answer with ``BlobFetched(tag=tag, …)``, with the bytes if ``want_bytes``."""

    digest: str
    size: int
    source: str
    tag: str
    want_bytes: bool = False


@dataclass(frozen=True, kw_only=True)
class StoreBlob(Action):
    """Put ``data`` (sha256 ``digest``) into the blob store, to be served to peers (a
    committee member's aggregate, SPEC §11 step 3)."""

    digest: str
    data: bytes


@dataclass(frozen=True, kw_only=True)
class SplitInputs(Action):
    """TaskMachine: split the input ``name`` (the daemon: an .npz of the task spec's
    ``input_refs``) across the shards in proportion to ``shares`` with ``seed``
    (docs/tasks.md "data"), store the parts and answer with ``InputsSplit``."""

    task_id: str
    name: str
    shares: tuple[float, ...]
    seed: int


@dataclass(frozen=True, kw_only=True)
class SetTimer(Action):
    """Fire ``TimerFired(name=name)`` at ``at_ms`` (the driver's clock); replaces a pending
    timer of the same name."""

    name: str
    at_ms: int


@dataclass(frozen=True, kw_only=True)
class CancelTimer(Action):
    name: str


@dataclass(frozen=True, kw_only=True)
class Notify(Action):
    """Tell the task's watchers (RPC ``task.watch``): a state change with its message.
    ``final`` on the terminal one; ``extra`` carries e.g. a certified round's metrics."""

    task_id: str
    state: str
    message: str
    final: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Count(Action):
    """Increment the daemon counter ``name`` (``peerctl status`` shows them)."""

    name: str


@dataclass(frozen=True, kw_only=True)
class Drop(Action):
    """The current message is not accepted: count ``dropped.<reason>`` and, on gossip,
    do not forward it (the validator returns False, SPEC §8.1)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class AdjustLoad(Action):
    """ShardMachine: this node holds ``delta`` more (or fewer) active shards; re-advertise
    at once (the daemon's ``active_shards`` and ``poke_advert``)."""

    delta: int


@dataclass(frozen=True, kw_only=True)
class AdoptShard(Action):
    """ShardMachine: an award gives this node shard ``shard`` too (a re-award without a
    spare bidder, SPEC §10.3): the driver starts ``ShardMachine.adopt(...)`` for it unless
    it already runs a machine for (task, shard)."""

    task_id: str
    shard: int
    award: Signed


@dataclass(frozen=True, kw_only=True)
class Certified(Action):
    """RoundMachine: the round has a certificate; the driver forwards it as
    ``RoundCertified`` to the task's other machines."""

    certificate: Certificate


# -- persisted records (the store's typed rows) ------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Record:
    task_id: str


@dataclass(frozen=True, kw_only=True)
class TaskState(Record):
    """The task's public state (``bidding``, ``pending``, ``running``, ``aggregating``,
    ``done``, ``failed``, ``cancelled``, docs/tasks.md), with its message and reason —
    the daemon's ``Store.set_state`` (which also logs an event)."""

    state: str
    message: str
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class TaskEvent(Record):
    """An event line without a state change (``Store.add_event``)."""

    state: str
    message: str


@dataclass(frozen=True, kw_only=True)
class BidRecord(Record):
    peer: str
    raw: bytes


@dataclass(frozen=True, kw_only=True)
class AwardRecord(Record):
    epoch: int
    raw: bytes
    assignments: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, kw_only=True)
class ResultRecord(Record):
    round: int
    shard: int
    peer: str
    raw: bytes


@dataclass(frozen=True, kw_only=True)
class VoteRecord(Record):
    round: int
    peer: str
    attempt: int
    raw: bytes


@dataclass(frozen=True, kw_only=True)
class CertificateRecord(Record):
    """``output`` is the certificate's output ref plus ``signers`` (as the store keeps it)."""

    round: int
    output: Mapping[str, Any]
    votes: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class RoundRecord(Record):
    """A certified round as ``task.get`` reports it (participants, metrics …)."""

    round: int
    info: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class ShardStateRecord(Record):
    shard: int
    state: str


@dataclass(frozen=True, kw_only=True)
class TaskResultRecord(Record):
    """The task's final result (``Store.set_result``): outputs, metrics, certificate."""

    result: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class WorkerTaskRecord(Record):
    """A contractor took a shard (``Store.add_task`` with role ``worker``)."""

    submitter: str
    kind: str
    announce_raw: bytes
    deadline_ms: int
    message: str


@dataclass(frozen=True, kw_only=True)
class WorkRecord(Record):
    """A contractor's signed result, durable before anyone is told (``Store.set_work``):
    a restart re-delivers it."""

    shard: int
    round: int
    epoch: int
    state: str
    raw: bytes


@dataclass(frozen=True, kw_only=True)
class Persist(Action):
    record: Record


@dataclass(frozen=True, kw_only=True)
class Observe(Action):
    """TaskMachine: an outcome of one shard, for the node's record of ``peer``
    (protocol/trust.py ``observe``; the daemon persists it, peerd/reputation.py).
    ``outcome``: ``done`` (a valid result; ``work_gflop`` / ``wall_ms`` is the capacity it
    delivered, ``wall_ms`` 0 when unmeasured, e.g. after a restart), ``failed``
    (``ok = false``), ``timed_out`` (its lease lapsed) or ``disagreed``."""

    peer: str
    task_id: str
    shard: int
    work_gflop: float
    wall_ms: int
    outcome: str
