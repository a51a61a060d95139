"""Training (issues 4 and 9): where the time of a training round goes, for the seed MLP on 3, 5
and 8 peers on the same total data (``PEERD_BENCH_TRAINING_PEERS=3,5`` picks others).

The task is ``examples/fashion-mnist.toml`` (the seed's Dense(128) → Dropout → Dense(10) MLP,
407 KB of weights, FedAvg, 1 local epoch per round) on an N-daemon devnet, with
``max_shards = N`` and a work estimate large enough that every peer gets a shard.

Phases come from the signed messages the submitter (node 0) keeps in its SQLite store, whose
``issued_at`` stamps are wall-clock ms on this one machine:

* a round starts at the previous round's certificate (round 1: at the award);
* each participant's Result (its commit) carries the job's ``wall_seconds`` and the fit's
  ``train_seconds``, so job start = commit − wall_seconds;
* the certificate time is the ``issued_at`` of the vote that completed the majority.

Along the critical path (the participant that committed last): *start* = job start − round
start (fetching the round's start model, or in round 1 the data shard, and waiting for the
worker slot); *train* = the fit; *worker* = job wall − fit (loading the shard, building the
model, encoding the weights); *aggregation round* = certificate − last commit (the committee
fetches the other commits, checks, aggregates, signs; the votes are gossiped and tallied).

The aggregation round is then split by timing its components directly, in this process, on
the real committed weights of the last round: *transfer* = fetching (N−1) 407 KB blobs through
``peerd.blobxfer`` from another process; *verify* = per input, the Result's signature, the
blob's sha256 and decoding the arrays; *aggregate* = ``protocol.aggregation.aggregate``
(weighted_mean) + encoding + hashing the output; *vote* = signing one vote plus verifying and
tallying the committee's votes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.benchmarks.common import (
    ROOT,
    AreaResult,
    Table,
    budget_le,
    devnet,
    loadavg,
    log,
    run_to_end,
    wait_quiet,
)

DATA_DIR = Path(os.environ.get("PEERD_BENCH_DATA", "/tmp/peerd-bench-data"))
EXAMPLE = ROOT / "examples" / "fashion-mnist.toml"
#: The training area's bid window: long enough for all of 8 daemons on 2 loaded cores to bid.
#: Rounds are timed from the award, so it shows only in submit → done.
BID_WINDOW_MS = int(os.environ.get("PEERD_BENCH_BID_WINDOW_MS", "2000"))


def ensure_data() -> Path:
    """Fashion-MNIST as scripts/prepare_data.py writes it (train/validation/test .npz)."""
    if not data_current(DATA_DIR):
        log(f"preparing data in {DATA_DIR} (scripts/prepare_data.py)")
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--out", str(DATA_DIR)],
            check=True,
            cwd=ROOT,
        )
    return DATA_DIR


def data_current(data: Path) -> bool:
    """Whether ``data`` holds what this version's prepare_data.py writes: uint8 pixels
    (its FORMAT). An older float32 set would be scaled twice by the example's x_scale."""
    from scripts.prepare_data import FORMAT

    if not all((data / f).exists() for f in ("train.npz", "validation.npz", "test.npz", "dataset.json")):
        return False
    try:
        return bool(json.loads((data / "dataset.json").read_text()).get("format") == FORMAT)
    except ValueError:
        return False


def example_spec(data: Path, **changes: Any) -> dict[str, Any]:
    """examples/fashion-mnist.toml as task.submit JSON, inputs from ``data``."""
    from peerd.taskspec import parse_spec

    raw = tomllib.loads(EXAMPLE.read_text())
    raw["inputs"] = {name: str(data / Path(p).name) for name, p in raw["inputs"].items()}
    raw.update(changes)
    spec: dict[str, Any] = json.loads(json.dumps(parse_spec(raw, base_dir=EXAMPLE.parent).to_json()))
    return spec


def _open(raw: bytes, kind: str) -> Any:
    from protocol.envelope import open_envelope

    return open_envelope(bytes(raw), kinds=frozenset({kind}))


def timeline(db_path: Path, task_id: str, submitter: str = "") -> list[dict[str, Any]]:
    """Per round: start, commits, certificate and the critical-path phases (seconds)."""
    from protocol.committee import quorum
    from protocol.messages import Result, Vote

    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    events = db.execute(
        "SELECT at, state, message FROM events WHERE task_id = ? ORDER BY id", (task_id,)
    ).fetchall()
    award_at = next(float(e["at"]) for e in events if e["state"] == "running")
    results: dict[int, list[Any]] = {}
    for r in db.execute("SELECT round, raw FROM results WHERE task_id = ?", (task_id,)):
        results.setdefault(int(r["round"]), []).append(_open(r["raw"], "result"))
    votes: dict[int, list[Any]] = {}
    for r in db.execute("SELECT round, raw FROM votes WHERE task_id = ?", (task_id,)):
        votes.setdefault(int(r["round"]), []).append(_open(r["raw"], "vote"))
    db.close()
    out = []
    start = award_at
    for rnd in sorted(results):
        commits = [s for s in results[rnd] if isinstance(s.message, Result) and s.message.ok]
        if not commits or rnd not in votes:
            break
        last = max(commits, key=lambda s: s.message.issued_at)
        by_ballot: dict[Any, list[Any]] = {}
        for v in votes[rnd]:
            assert isinstance(v.message, Vote)
            by_ballot.setdefault(v.message.ballot(), []).append(v)
        best = max(by_ballot.values(), key=len)
        need = quorum(len(best[0].message.committee))
        if len(best) < need:
            break
        cert = sorted(v.message.issued_at for v in best)[need - 1] / 1000
        m = last.message.metrics
        commit = last.message.issued_at / 1000
        job_start = commit - float(m.get("wall_seconds", 0.0))

        def fit_cpu(sv: Any) -> float:
            return float(sv.message.metrics.get("train_cpu_seconds", 0.0))

        def started(sv: Any) -> float:
            return float(sv.message.issued_at / 1000 - float(sv.message.metrics.get("wall_seconds", 0.0)))

        sub = [started(sv) - start for sv in commits if sv.signer == submitter]
        others = [started(sv) - start for sv in commits if sv.signer != submitter]
        out.append(
            {
                "round": rnd,
                "participants": len(commits),
                "round_s": cert - start,
                "start_s": job_start - start,
                # The submitter also runs each round's validation on its own worker slot.
                "start_sub_s": sub[0] if sub else float("nan"),
                "start_others_s": max(others) if others else float("nan"),
                "train_s": float(m.get("train_seconds", 0.0)),
                "worker_s": float(m.get("wall_seconds", 0.0)) - float(m.get("train_seconds", 0.0)),
                "agg_round_s": cert - commit,
                "train_mean_s": sum(float(s.message.metrics.get("train_seconds", 0.0)) for s in commits)
                / len(commits),
                # CPU seconds of each participant's fit: a fit's work, apart from how many
                # fits shared the cores with it.
                "train_cpu_mean_s": sum(fit_cpu(s) for s in commits) / len(commits),
                "train_cpu_sum_s": sum(fit_cpu(s) for s in commits),
                "commit_spread_s": commit - min(s.message.issued_at for s in commits) / 1000,
                "committee": len(best[0].message.committee),
                "inputs": [dict(i) for i in best[0].message.inputs],
                "vote_raws": [v.raw for v in best],
                "result_raws": [s.raw for s in commits],
            }
        )
        start = cert
    return out


def run_peerd(
    n: int,
    data: Path,
    spec: dict[str, Any],
    *,
    keep: bool = False,
    bid_window_ms: int | None = None,
    keras_backend: str = "tensorflow",
    warm_up: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one training task on an n-daemon devnet; wall time, accuracy, timeline, final weights.
    ``bid_window_ms``: the market's bid window (default: the config's 300 ms). On a loaded
    2-core host 300 ms is too short for 5 or 8 daemons to bid: the task then runs on fewer
    participants, each with a larger shard (one 5-peer run under load 17 trained on 1).
    ``keras_backend``: every daemon's ``[offer] keras_backend`` (a fresh devnet: on JAX, every
    worker compiles the model once, its compilation cache empty). ``warm_up``: a task run to its
    end first, untimed: the network has trained this model before (a returning contributor's
    JAX compilation cache holds its programs)."""
    from peerd.blobs import BlobStore

    overrides: dict[str, dict[str, Any]] = {}
    if bid_window_ms:
        overrides["market"] = {"bid_window_ms": bid_window_ms}
    if keras_backend != "tensorflow":
        overrides["offer"] = {"keras_backend": keras_backend}
    with devnet(f"tr{n}", n, overrides or None, keep=keep) as net:
        # Every daemon keeps a TensorFlow worker warm; wait until they are up (~4-5 s of CPU
        # importing each: a fixed 5 + n s left 8 daemons' imports running into round 1).
        waited = wait_quiet()
        log(f"training: waited {waited:.0f} s for the warm workers")

        if warm_up is not None:
            run_to_end(net.socket(0), warm_up, 1800)
            wait_quiet()
        l0 = loadavg()
        t0 = time.time()
        tid, end = run_to_end(net.socket(0), spec, 1800)
        wall = time.time() - t0
        rounds = timeline(net.node_dir(0) / "state" / "peerd.sqlite", tid, net.peer_id(0))
        check_participants(rounds, min(n, int(spec.get("max_shards", n))))
        store = BlobStore(net.node_dir(0) / "state" / "blobs", max_blob_bytes=1 << 30)
        weights = [store.path(i["sha256"]).read_bytes() for i in rounds[-1]["inputs"]] if rounds else []
        return {
            "wall_s": wall,
            "task": end,
            "rounds": rounds,
            "weights": weights,
            "load": f"{l0:.1f}-{loadavg():.1f}",
            "test_accuracy": (end.get("result") or {}).get("metrics", {}).get("test_accuracy"),
        }


def check_participants(rounds: list[dict[str, Any]], want: int) -> None:
    """Refuse a run whose rounds had fewer participants than the comparison assumes. A bid that
    misses the window leaves its peer out of the award: on the emulated WAN, with the default
    300 ms window, two runs trained on the submitter alone and were reported as 18 s (at the
    accuracy of one peer on all the data), against 23-26 s for the same task on three peers."""
    seen = sorted({int(r["participants"]) for r in rounds})
    if not rounds or seen != [want]:
        raise RuntimeError(f"the task's rounds had {seen or 'no'} participant(s), not {want}")


def _time(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def components(run: dict[str, Any], repeat: int = 20) -> dict[str, float]:
    """Seconds per aggregation-round component for this run's last round (see the module doc)."""
    from protocol.aggregation import aggregate
    from protocol.certificate import tally
    from protocol.envelope import Signer, open_envelope
    from protocol.messages import Vote
    from protocol.tensors import decode_arrays, encode_arrays
    from scripts.benchmarks.blobs import in_two_processes

    last = run["rounds"][-1]
    blobs: list[bytes] = run["weights"]
    n = len(blobs)
    size = len(blobs[0])
    arrays = [decode_arrays(b) for b in blobs]
    weights = [float(i["weight"]) for i in last["inputs"]]
    agg_in = [(f"p{i}", w, a) for i, (w, a) in enumerate(zip(weights, arrays, strict=True))]

    def verify() -> None:
        for raw, b in zip(last["result_raws"], blobs, strict=True):
            open_envelope(raw, kinds=frozenset({"result"}))
            hashlib.sha256(b).hexdigest()
            decode_arrays(b)

    def agg() -> None:
        out = encode_arrays(aggregate("weighted_mean", agg_in))
        hashlib.sha256(out).hexdigest()

    signer = Signer(os.urandom(32))
    vote_msg = open_envelope(last["vote_raws"][0], kinds=frozenset({"vote"})).message
    assert isinstance(vote_msg, Vote)

    def vote() -> None:
        signer.seal(vote_msg)
        tally([open_envelope(r, kinds=frozenset({"vote"})) for r in last["vote_raws"]])

    fetch = in_two_processes(size, 10, raw=False)["blob"]
    fetch_s = size / 1e6 / sorted(fetch)[len(fetch) // 2]
    return {
        "bytes": float(size),
        "transfer": (n - 1) * fetch_s,
        "verify": _time(verify, repeat),
        "aggregate": _time(agg, repeat),
        "vote": _time(vote, repeat),
    }


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows) if rows else float("nan")


def peer_counts(quick: bool) -> list[int]:
    """Devnet sizes to run: ``PEERD_BENCH_TRAINING_PEERS`` (e.g. "3,5"), else 3, 5 and 8 (3 and 5
    quick). The first is the reference of the scaling budget (issue 9 item 5)."""
    raw = os.environ.get("PEERD_BENCH_TRAINING_PEERS", "")
    if raw.strip():
        return [int(x) for x in raw.split(",") if x.strip()]
    return [3, 5] if quick else [3, 5, 8]


def run(quick: bool = False) -> AreaResult:
    res = AreaResult("training")
    data = ensure_data()
    dataset = json.loads((data / "dataset.json").read_text())
    rounds = 3 if quick else 5
    phases = Table(
        f"Training round phases, seed MLP on {dataset['dataset']} ({dataset['train']} samples), "
        f"{rounds} rounds × 1 "
        "epoch, FedAvg; critical path, mean of rounds 2.. (round 1 apart); seconds",
        [
            "peers",
            "round",
            "round time",
            "start (fetch + slot)",
            "worker (load, build, encode)",
            "train (fit)",
            "aggregation round",
            "agg. round share",
            "fit mean over peers",
            "commit spread",
            "start: submitter / others (max)",
            "fit CPU s, mean / sum over peers",
            "load avg",
        ],
    )
    scaling = Table(
        f"Scaling with peers on the same total data ({dataset['train']} samples split evenly), "
        "seconds; rounds 2.. are the mean of the later rounds",
        ["peers", "shard samples", "round 1", "rounds 2..", "round 1 / later", "later round / 3-peer",
         "fit CPU per peer", "fit CPU, all peers", "submit → done", "load avg"],
    )  # fmt: skip
    later: dict[int, float] = {}
    parts = Table(
        "Aggregation round components, timed directly on the last round's committed weights (ms)",
        [
            "peers",
            "weights KB",
            "transfer (N−1 fetches)",
            "verify (sig + sha256 + decode) × N",
            "aggregate",
            "vote (sign + tally)",
            "sum",
            "measured aggregation round",
            "aggregate share of round",
            "agg. round share of round",
        ],
    )
    counts = peer_counts(quick)
    for n in counts:
        log(f"training: {n}-daemon devnet, {rounds} rounds")
        spec = example_spec(data, max_shards=n, work=1e9, rounds=rounds)  # work: every bidder needed
        # Every peer must bid in time for the scaling figures to mean anything (run_peerd).
        r = run_peerd(n, data, spec, bid_window_ms=BID_WINDOW_MS)
        tl = r["rounds"]
        steady = tl[1:] or tl
        if not tl:
            res.notes.append(f"{n} peers: no round timeline could be read")
            continue
        first = tl[0]
        phases.add(
            n,
            "1",
            first["round_s"],
            first["start_s"],
            first["worker_s"],
            first["train_s"],
            first["agg_round_s"],
            f"{first['agg_round_s'] / first['round_s']:.0%}",
            first["train_mean_s"],
            first["commit_spread_s"],
            f"{first['start_sub_s']:.2f} / {first['start_others_s']:.2f}",
            f"{first['train_cpu_mean_s']:.2f} / {first['train_cpu_sum_s']:.2f}",
            r["load"],
        )
        rt = _mean(steady, "round_s")
        art = _mean(steady, "agg_round_s")
        phases.add(
            n,
            f"2-{len(tl)}" if len(tl) > 1 else "1",
            rt,
            _mean(steady, "start_s"),
            _mean(steady, "worker_s"),
            _mean(steady, "train_s"),
            art,
            f"{art / rt:.0%}",
            _mean(steady, "train_mean_s"),
            _mean(steady, "commit_spread_s"),
            f"{_mean(steady, 'start_sub_s'):.2f} / {_mean(steady, 'start_others_s'):.2f}",
            f"{_mean(steady, 'train_cpu_mean_s'):.2f} / {_mean(steady, 'train_cpu_sum_s'):.2f}",
            r["load"],
        )
        later[n] = rt
        ref = later.get(counts[0])
        scaling.add(
            n,
            dataset["train"] // n,
            first["round_s"],
            rt,
            f"{first['round_s'] / rt:.2f}×",
            f"{rt / ref:.2f}×" if ref else "–",
            _mean(steady, "train_cpu_mean_s"),
            _mean(steady, "train_cpu_sum_s"),
            r["wall_s"],
            r["load"],
        )
        if len(tl) > 1:
            ratio = first["round_s"] / rt
            res.checks.append(budget_le(f"round 1 / a later round, {n} peers", ratio, 1.3, "×"))
        # Issue 9's budget: a round's time besides the critical path's fit (start, load,
        # encode, commit, aggregation round) ≤ 10% of the round, in the later rounds.
        non_fit = (rt - _mean(steady, "train_s")) / rt * 100
        res.checks.append(budget_le(f"round time other than fit, later rounds, {n} peers", non_fit, 10, "%"))
        if n == 5 and 3 in later:
            res.checks.append(budget_le("round time at 5 peers / at 3 peers", rt / later[3], 1.1, "×"))
        if any(row["participants"] < n for row in tl):
            res.notes.append(
                f"{n} peers: some rounds had fewer participants: "
                + ", ".join(str(row["participants"]) for row in tl)
            )
        c = components(r)
        total = c["transfer"] + c["verify"] + c["aggregate"] + c["vote"]
        parts.add(
            n,
            c["bytes"] / 1000,
            c["transfer"] * 1000,
            c["verify"] * 1000,
            c["aggregate"] * 1000,
            c["vote"] * 1000,
            total * 1000,
            art * 1000,
            f"{c['aggregate'] / rt:.2%}",
            f"{art / rt:.1%}",
        )
        res.checks.append(
            budget_le(
                f"aggregation share of a round, {n} peers (aggregate step)",
                c["aggregate"] / rt * 100,
                10,
                "%",
            )
        )
        res.checks.append(
            budget_le(
                f"aggregation share of a round, {n} peers (whole aggregation round)", art / rt * 100, 10, "%"
            )
        )
        acc = r["test_accuracy"]
        res.notes.append(
            f"{n} peers: submit → done {r['wall_s']:.1f} s, final test accuracy "
            f"{acc if acc is None else round(acc, 4)}, {len(tl)} rounds certified"
        )
    res.tables += [phases, scaling, parts]
    res.notes.append(
        "'aggregation round' = last commit → certificate (committee fetches, checks, aggregates, "
        "signs; votes "
        "gossiped and tallied). 'start' in round 1 includes fetching the data shard; later, the start model "
        "and waiting for the worker slot (the submitter's own slot also runs its validation evaluation)."
    )
    return res
