"""TaskMachine restored while ``pending`` keeps why it waits (``Restored.reason``).

A task restored after a restart used to lose the reason of its public state: a ``pending``
task whose deadline then passed failed with "no result before the deadline" instead of the
reason it was pending for (no eligible bid)."""

from __future__ import annotations

from protocol.envelope import Signer
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.machines.common import MarketTimes, SignerSealer
from protocol.machines.task import NO_BIDS_REASON, Restored, TaskMachine, TaskState
from protocol.messages import TaskAnnounce

NOW = 1_700_000_000_000
TIMES = MarketTimes(lease_ttl_ms=10_000, heartbeat_ms=2_000)
SUB = SignerSealer(Signer(bytes([1]) * 32), first_seq=1000)


def test_a_task_restored_while_pending_keeps_its_reason_until_the_deadline() -> None:
    ann = SUB.seal(
        TaskAnnounce, now_ms=NOW, ttl_ms=120_000, task_id="ab" * 16, kind="echo", work=10.0,
        deadline_ms=120_000, max_shards=1, resources={"gpu": False, "memory_mb": 0}, aggregation="none",
        rounds=1, params={}, inputs={}, bid_window_ms=300, net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
    )  # fmt: skip
    m = TaskMachine(
        ann, sealer=SUB, times=TIMES, restored=Restored(public_state="pending", reason=NO_BIDS_REASON)
    )
    assert (m.public_state, m.reason) == ("pending", NO_BIDS_REASON)
    m.handle(ev.Start(now_ms=NOW + 50_000))
    assert m.state is TaskState.BIDDING and m.reason == NO_BIDS_REASON  # re-announced, still waiting
    out = m.handle(ev.TimerFired(now_ms=NOW + 120_000, name="deadline"))
    rec = next(p.record for p in out if isinstance(p, act.Persist) and isinstance(p.record, act.TaskState))
    assert rec.message == f"deadline passed: {NO_BIDS_REASON}"
