"""The life of a task as sans-IO state machines, in h11's manner (issue 7).

Events in, actions out. A driver (the daemon's roles, or the simulator in ``sim/``) owns
every piece of I/O — the network, the store, the executor, the clock — and talks to a
machine through one method, ``handle(event) -> list[Action]``. A machine never reads a
clock (time arrives in every event as ``now_ms``), draws no random numbers, opens no file
or socket, and imports no trio, libp2p or TensorFlow (``tests/unit/test_boundaries.py``).

Three machines, each with its states as an :class:`enum.Enum` and its transitions in one
dispatch method:

* :class:`~protocol.machines.task.TaskMachine` — the submitter's view of one task
  (announce, bid window, award, leases, results or rounds, re-award, done/failed/cancelled);
* :class:`~protocol.machines.shard.ShardMachine` — a contractor's view of one shard
  (bid, checked award, job, heartbeats, result delivery with back-off, cancel, lost award);
* :class:`~protocol.machines.round.RoundMachine` — one signed aggregation round of one task
  (commits, committee duty, votes, certificate; SPEC §11).

An event a machine cannot take in its state is our own bug — the driver misrouted it — and
raises :class:`~protocol.errors.LocalProtocolError`. A *message* that makes no sense (a
lease from a non-holder, a forged cancel) is the peer's fault: it is dropped with a
:class:`~protocol.machines.actions.Drop` action, never raised, as the daemon does today.
"""

from __future__ import annotations

from protocol.machines import actions, events
from protocol.machines.common import MarketTimes, Sealer, SignerSealer

__all__ = ["MarketTimes", "Sealer", "SignerSealer", "actions", "events"]
