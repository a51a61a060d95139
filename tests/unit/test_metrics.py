"""peerd/metrics.py without a daemon: counter names, histograms from the task store's events."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from peerd.metrics import histogram, metric_name, shard_run_times, task_timings
from peerd.store import Store


def test_counter_names_become_prometheus_names() -> None:
    assert metric_name("inbox.dropped.bad_sig") == "peerd_inbox_dropped_bad_sig"
    assert metric_name("accepted.advert") == "peerd_accepted_advert"
    assert metric_name("rounds.excluded.bad-hash!") == "peerd_rounds_excluded_bad_hash"
    assert metric_name("peers_connected", "peerd_p2p_") == "peerd_p2p_peers_connected"


def _event(store: Store, task_id: str, at: float, state: str, message: str) -> None:
    store.db.execute(
        "INSERT INTO events (task_id, at, state, message) VALUES (?,?,?,?)", (task_id, at, state, message)
    )


def test_award_latency_and_round_times_come_from_the_events_of_tasks_submitted_here(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    for task_id, role in (("t1", "submitter"), ("t2", "worker")):
        store.add_task(
            task_id=task_id,
            role=role,
            submitter="p",
            kind="keras_fedavg",
            state="bidding",
            spec={},
            announce=None,
            deadline_at=0.0,
            message="submitted",
        )
    store.db.execute("UPDATE tasks SET created_at = 100.0")
    _event(store, "t1", 103.0, "running", "awarded 2 shard(s) to a, b")
    _event(store, "t1", 110.0, "running", "round 1/3 certified by 2 of 2")
    _event(store, "t1", 111.0, "running", "lost 1 peer(s); asking for fresh bids")
    _event(store, "t1", 112.0, "running", "awarded 1 shard(s) to c")  # a re-award: not a second latency
    _event(store, "t1", 130.0, "running", "round 2/3 certified by 2 of 2")
    _event(store, "t1", 131.0, "running", "round 2/3 certified by 2 of 2")  # repeated: counted once
    _event(store, "t2", 105.0, "running", "awarded 1 shard(s) to x")  # not ours to time
    awards, rounds = task_timings(store)
    assert awards == [3.0]
    assert rounds == [7.0, 20.0]
    store.close()


def test_histogram_buckets_are_cumulative_and_parse() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            yield histogram("x_seconds", "x", [0.2, 3.0, 700.0], (1.0, 5.0))

    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())  # type: ignore[arg-type]
    fam = next(text_string_to_metric_families(generate_latest(reg).decode()))
    got = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert got[("x_seconds_bucket", "1.0")] == 1
    assert got[("x_seconds_bucket", "5.0")] == 2
    assert got[("x_seconds_bucket", "+Inf")] == 3
    assert got[("x_seconds_count", None)] == 3
    assert got[("x_seconds_sum", None)] == 703.2


def test_shard_run_times_come_from_the_results_of_done_tasks_submitted_here(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    for task_id, role, state in (
        ("a", "submitter", "done"),
        ("b", "worker", "done"),
        ("c", "submitter", "failed"),
    ):
        store.add_task(
            task_id=task_id,
            role=role,
            submitter="p",
            kind="echo",
            state=state,
            spec={},
            announce=None,
            deadline_at=0.0,
            message="x",
        )
        store.set_result(
            task_id,
            {
                "metrics": {
                    "shard-0.wall_seconds": 2.5,
                    "shard-1.wall_seconds": 0.5,
                    "shard-0.cpu_seconds": 9.0,
                    "shard-2.wall_seconds": -1,
                }
            },
        )
    assert sorted(shard_run_times(store)) == [0.5, 2.5]
    store.close()
