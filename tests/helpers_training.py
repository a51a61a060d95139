"""Shared by the training tests: scikit-learn's digits as .npz files, the seed's model for
64 inputs, task specs, and small devnet/RPC helpers.

Digits (1797 8×8 images) train in seconds, so a multi-round test stays short on a
2-core machine. The model JSON is derived from ``examples/seed-mlp.json`` (the seed's
Dense(128, relu) → Dropout(0.2) → Dense(10, softmax), written by Keras itself) by
changing the input width — so no test process has to import Keras to get it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from protocol.envelope import Signer, open_envelope
from protocol.messages import Message, Result
from protocol.tensors import decode_arrays, encode_arrays

ROOT = Path(__file__).resolve().parent.parent
SEED_MODEL = ROOT / "examples" / "seed-mlp.json"

#: Digits split: test / validation / train sizes (shuffled with a fixed seed).
N_TEST = 360
N_VALIDATION = 180


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (x, y), "validation": …, "test": …}: x float32 in [0, 1], y int64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    te, va = N_TEST, N_TEST + N_VALIDATION
    return {"test": (x[:te], y[:te]), "validation": (x[te:va], y[te:va]), "train": (x[va:], y[va:])}


def write_digits(directory: Path) -> dict[str, Path]:
    """Write train/validation/test .npz files into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (x, y) in digits_arrays().items():
        path = directory / f"{name}.npz"
        np.savez(path, x=x, y=y)
        out[name] = path
    return out


def _set_input_dim(obj: Any, old: int, new: int) -> Any:
    if isinstance(obj, dict):
        return {k: _set_input_dim(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) == 2 and obj[0] is None and obj[1] == old:
            return [None, new]  # a batch_shape / input_shape entry
        return [_set_input_dim(v, old, new) for v in obj]
    return obj


def model_json(input_dim: int = 64) -> str:
    """The seed's model (§5.2) as a Keras JSON config for ``input_dim`` inputs."""
    cfg = json.loads(SEED_MODEL.read_text())
    return json.dumps(_set_input_dim(cfg, 784, input_dim))


def train_spec(
    data: dict[str, Path],
    *,
    work: float,
    deadline_s: float,
    rounds: int = 3,
    max_shards: int = 3,
    aggregation: str = "weighted_mean",
    epochs: int = 1,
    round_timeout_s: float = 120.0,
    name: str = "digits",
) -> dict[str, Any]:
    """A keras-train spec for RPC ``task.submit`` (the JSON form of a task TOML)."""
    return {
        "name": name,
        "kind": "keras-train",
        "work": float(work),
        "deadline_s": deadline_s,
        "max_shards": max_shards,
        "aggregation": aggregation,
        "rounds": rounds,
        "bid_window_ms": 1500,
        "resources": {"gpu": False, "memory_mb": 1024},
        # The training data is split across shards; validation/test stay with the submitter.
        "inputs": {("data" if k == "train" else k): str(v) for k, v in data.items()},
        "params": {
            "model_config": model_json(64),
            "optimizer": "adam",
            "learning_rate": 0.005,
            "loss": "sparse_categorical_crossentropy",
            "epochs": epochs,
            "batch_size": 32,
            "seed": 7,
            "round_timeout_s": round_timeout_s,
        },
    }


def work_needing(capacities: list[float], n: int, deadline_s: float) -> float:
    """A work W such that R = W / D exceeds the sum of the n − 1 largest C, yet is covered
    by the n largest (docs/design.md §4): the award then needs exactly n nodes."""
    top = sorted(capacities, reverse=True)
    assert len(top) >= n, f"need {n} capacities, have {len(top)}"
    below = sum(top[: n - 1])
    full = sum(top[:n])
    # Halfway between "n − 1 nodes are enough" and "n nodes are not": margin both ways
    # against the small drift of C with load (ΔC = k·L) between reading and bidding.
    return (below + full) / 2 * deadline_s


T = TypeVar("T")


def poll(fn: Callable[[], T | None], what: str, *, timeout: float = 120.0, every: float = 0.5) -> T:
    """Call ``fn`` until it returns something other than None/False; bounded, then fail."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value is not None and value is not False:
                return value
        except Exception as exc:  # a daemon busy or restarting: try again
            last_exc = exc
        time.sleep(every)
    detail = f" (last error: {last_exc})" if last_exc else ""
    raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}{detail}")


# -- signed synthetic tasks: real messages from real keys, no daemon ---------------------------


class Forge:
    """Signs protocol messages with real Ed25519 keys, each signer with its own sequence."""

    def __init__(self) -> None:
        self._seq: dict[str, int] = {}

    def seal(self, signer: Signer, cls: type[Message], *, ttl_ms: int = 3_600_000, **fields: Any) -> bytes:
        seq = self._seq.get(signer.peer_id, 0) + 1
        self._seq[signer.peer_id] = seq
        now = int(time.time() * 1000)
        return signer.seal(cls(seq=seq, issued_at=now, expires_at=now + ttl_ms, **fields))


def keys(n: int, *, salt: int = 0) -> list[Signer]:
    """``n`` deterministic signers, sorted by peer ID (the canonical order of the protocol)."""
    out = [Signer(hashlib.sha256(f"peerd-test-key-{salt}-{i}".encode()).digest()) for i in range(n)]
    return sorted(out, key=lambda s: s.peer_id)


@dataclass
class SyntheticTask:
    """A keras-train-shaped task with 3 participants, its signed announce, bids and award,
    and per round: signed commits, tensor outputs and correctly computed, signed votes.

    ``bundle(dir)`` writes the result bundle exactly as ``peerd.bundle`` lays it out, so
    ``peerd.verify.verify_bundle`` can check it and tests can tamper with it.
    """

    rule: str = "weighted_mean"
    rounds: int = 2
    forge: Forge = field(default_factory=Forge)
    task_id: str = "0123456789abcdef0123456789abcdef"

    def __post_init__(self) -> None:
        from protocol.awards import allocate, assignments_of
        from protocol.messages import Award, Bid, TaskAnnounce

        self.submitter = keys(1, salt=1)[0]
        self.peers = keys(3, salt=2)
        self.outsider = keys(1, salt=3)[0]
        self.announce_raw = self.forge.seal(
            self.submitter, TaskAnnounce, ttl_ms=600_000,
            task_id=self.task_id, kind="keras-train",
            # C = 10, 11, 12 (idle): R = W / D = 28 needs all three (docs/design.md §4).
            work=28.0 * 600, deadline_ms=600_000, max_shards=3,
            resources={"gpu": False, "memory_mb": 0}, aggregation=self.rule, rounds=self.rounds,
            params={}, inputs={}, bid_window_ms=1000, net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
        )
        self.announce = open_envelope(self.announce_raw).message
        self.bids = [
            self.forge.seal(p, Bid, ttl_ms=60_000, task_id=self.task_id, c0=10.0 + i, load=0.0)
            for i, p in enumerate(self.peers)
        ]
        alloc = allocate(self.announce, [open_envelope(b) for b in self.bids])  # type: ignore[arg-type]
        self.assignments = assignments_of(alloc)
        assert len(self.assignments) == 3, "the synthetic award must need all three peers"
        self.award_raw = self.forge.seal(
            self.submitter, Award, ttl_ms=600_000, task_id=self.task_id, epoch=0,
            bids=self.bids, assignments=self.assignments, under_capacity=False, excluded=[],
        )
        self.award = open_envelope(self.award_raw).message
        self.by_peer = {p.peer_id: p for p in [*self.peers, self.outsider, self.submitter]}
        self.shard_of = {a["peer_id"]: a["shard"] for a in self.assignments}
        rng = np.random.default_rng(5)
        #: round → peer → (tensor list bytes, result envelope)
        self.inputs: dict[int, dict[str, tuple[bytes, bytes]]] = {}
        self.outputs: dict[int, bytes] = {}
        self.votes: dict[int, dict[str, bytes]] = {}
        for rnd in range(1, self.rounds + 1):
            self.inputs[rnd] = {}
            for i, p in enumerate(self.peers):
                blob = encode_arrays([rng.normal(size=s).astype(np.float32) for s in ((4, 3), (3,))])
                self.inputs[rnd][p.peer_id] = (blob, self.result(p, rnd, blob, weight=100.0 + 10 * i))
            self.outputs[rnd] = self.aggregate(rnd)
            self.votes[rnd] = {m.peer_id: self.vote(m, rnd) for m in self.members(rnd)}

    # -- building blocks (tests use them to forge variants) ------------------------------------
    @staticmethod
    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def result(self, peer: Signer, rnd: int, blob: bytes, *, weight: float) -> bytes:
        ref = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        return self.forge.seal(
            peer, Result, task_id=self.task_id, epoch=0, shard=self.shard_of[peer.peer_id], round=rnd,
            ok=True, error=None, outputs={"weights": ref}, weight=weight, metrics={"loss": 0.5},
        )

    def members(self, rnd: int) -> list[Signer]:
        from protocol.committee import committee

        return [self.by_peer[p] for p in sorted(committee(self.task_id, rnd, sorted(self.shard_of), 3))]

    def input_entries(self, rnd: int) -> list[dict[str, Any]]:
        out = []
        for peer, (blob, raw) in sorted(self.inputs[rnd].items()):
            msg = open_envelope(raw).message
            assert isinstance(msg, Result)
            digest = hashlib.sha256(blob).hexdigest()
            shard = self.shard_of[peer]
            out.append({"peer_id": peer, "shard": shard, "sha256": digest, "weight": msg.weight})
        return out

    def arrays(self, rnd: int, peer: str) -> list[np.ndarray]:
        return decode_arrays(self.inputs[rnd][peer][0])

    def aggregate(self, rnd: int) -> bytes:
        from protocol.aggregation import aggregate
        from protocol.certificate import input_key

        agg_in = [
            (input_key(e["peer_id"], e["shard"]), e["weight"], self.arrays(rnd, e["peer_id"]))
            for e in self.input_entries(rnd)
        ]
        return encode_arrays(aggregate(self.rule, agg_in))

    def vote(
        self,
        signer: Signer,
        rnd: int,
        *,
        output: bytes | None = None,
        inputs: list[dict[str, Any]] | None = None,
        excluded: list[dict[str, Any]] | None = None,
        committee: list[str] | None = None,
        rule: str | None = None,
        attempt: int = 0,
    ) -> bytes:
        from protocol.messages import Vote

        out = self.outputs[rnd] if output is None else output
        return self.forge.seal(
            signer, Vote, task_id=self.task_id, round=rnd, rule=rule or self.rule,
            committee=committee if committee is not None else [m.peer_id for m in self.members(rnd)],
            inputs=self.input_entries(rnd) if inputs is None else inputs,
            excluded=excluded or [],
            output={"sha256": hashlib.sha256(out).hexdigest(), "size": len(out)},
            attempt=attempt,
        )

    # -- the bundle ----------------------------------------------------------------------------
    def bundle(self, directory: Path) -> Path:
        files: dict[str, bytes] = {"announce.msg": self.announce_raw, "award-0.msg": self.award_raw}
        for rnd in range(1, self.rounds + 1):
            for peer, (blob, raw) in self.inputs[rnd].items():
                shard = self.shard_of[peer]
                files[f"round-{rnd}/result-{shard}-{peer}.msg"] = raw
                files[f"round-{rnd}/input-{peer}-{shard}.bin"] = blob
            for peer, raw in self.votes[rnd].items():
                files[f"round-{rnd}/vote-{peer}.msg"] = raw
            files[f"round-{rnd}/output.bin"] = self.outputs[rnd]
        for name, data in files.items():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        final = self.outputs[self.rounds]
        manifest = {
            "task_id": self.task_id,
            "kind": "keras-train",
            "state": "done",
            "rounds": self.rounds,
            "result": {"outputs": [{"name": "weights", "sha256": hashlib.sha256(final).hexdigest(),
                                    "size": len(final)}]},
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
        }
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return directory


# --- a tiny problem for worker-level keras tests ----------------------------------------------


def dense_model_json(inputs: int, hidden: int, classes: int) -> str:
    """Input → Dense(relu) → Dense(softmax) as Keras 3 JSON, written by hand (no Dropout, so a
    round depends only on its starting weights, data and optimizer)."""
    layer = lambda cls, cfg: {"module": "keras.layers", "class_name": cls, "config": cfg}  # noqa: E731
    return json.dumps(
        {
            "module": "keras",
            "class_name": "Sequential",
            "config": {
                "name": "tiny",
                "layers": [
                    layer("InputLayer", {"batch_shape": [None, inputs], "dtype": "float32"}),
                    layer("Dense", {"units": hidden, "activation": "relu"}),
                    layer("Dense", {"units": classes, "activation": "softmax"}),
                ],
            },
        }
    )


def tiny_problem(directory: Path, seed: int) -> tuple[Path, Path]:
    """400 samples of 8 features in 3 linearly separable classes (``shard.npz``), and starting
    weights for ``dense_model_json(8, 16, 3)`` (``w0.bin``)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, 8)).astype("float32")
    y = np.argmax(x @ rng.standard_normal((8, 3)), axis=1).astype("int64")
    shard = directory / "shard.npz"
    np.savez(shard, x=x, y=y)
    w0 = directory / "w0.bin"
    w0.write_bytes(
        encode_arrays(
            [
                (rng.standard_normal((8, 16)) * 0.3).astype("float32"),
                np.zeros(16, "float32"),
                (rng.standard_normal((16, 3)) * 0.3).astype("float32"),
                np.zeros(3, "float32"),
            ]
        )
    )
    return shard, w0
