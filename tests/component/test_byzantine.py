"""Byzantine participants against the aggregation rules, with real Keras training (issue 4,
quality bar): the seed's MLP is trained on digits in 4 IID shards for 8 rounds, each
round's aggregate computed by ``protocol.aggregation`` exactly as a committee does. One of
the 4 participants sends sign-flipped (×−5) weights, or random weights, every round.

* ``median`` and ``trimmed_mean`` keep the accuracy within 2 points of the honest run;
* ``weighted_mean`` (FedAvg) collapses — the attack is real, and the robust rules are what
  stops it.

TensorFlow runs in this test process (no daemons): one thread, op determinism, the
shuffles and dropout masks seeded per participant and round, so a run is reproducible.
Optimizer: Adam with its state reset each round (as every FedAvg client starts a round,
docs/design.md §6). Accuracy is measured on digits' test and validation splits together (540
images), the most held-out data this small set has.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from protocol.aggregation import aggregate
from tests.helpers_training import digits_arrays, model_json

pytestmark = pytest.mark.slow

PARTICIPANTS = 4
BYZANTINE = 1  # index of the attacker among the 4 (the rules do not care which)
ROUNDS = 8
LEARNING_RATE = 0.002  # smooth enough on 8×8 digits that one round's noise is under a point
BATCH = 32
#: Issue 4: "within 2 points of the honest run".
ROBUST_TOLERANCE = 0.02
#: What "visibly collapses" means here: FedAvg under attack loses at least this much.
COLLAPSE = 0.30


class Federation:
    """Four participants training one Keras model in turn (the optimizer reset between
    participants and rounds), aggregated by a rule each round."""

    def __init__(self) -> None:
        keras = pytest.importorskip("keras")
        tf = pytest.importorskip("tensorflow")
        try:
            # Must precede TensorFlow's first op in this process (docs/design.md appendix B.3).
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TensorFlow already ran in this process: keep its settings
        tf.config.experimental.enable_op_determinism()
        self.keras = keras
        data = digits_arrays()
        self.x, self.y = data["train"]
        self.x_eval = np.concatenate([data["test"][0], data["validation"][0]])
        self.y_eval = np.concatenate([data["test"][1], data["validation"][1]])
        order = np.random.default_rng(1).permutation(len(self.x))
        self.shards = [np.sort(order[i::PARTICIPANTS]) for i in range(PARTICIPANTS)]  # IID
        keras.utils.set_random_seed(7)
        self.model = keras.models.model_from_json(model_json(64))
        self.model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        self.initial = self.model.get_weights()

    def _reset(self, seed: int) -> None:
        for v in self.model.optimizer.variables:
            if "learning_rate" not in v.path:
                v.assign(np.zeros(v.shape, dtype=v.dtype))
        for layer in self.model.layers:
            gen = getattr(layer, "seed_generator", None)  # Dropout's masks
            if gen is not None:
                gen.state.assign(np.array([seed, 0], dtype=gen.state.dtype))

    def train(self, weights: Sequence[np.ndarray], shard: int, seed: int) -> list[np.ndarray]:
        """One local epoch on ``shard`` from ``weights`` (a FedAvg client update)."""
        self.model.set_weights(list(weights))
        self._reset(seed)
        idx = np.random.default_rng(seed).permutation(self.shards[shard])
        for start in range(0, len(idx), BATCH):
            batch = idx[start : start + BATCH]
            self.model.train_on_batch(self.x[batch], self.y[batch])
        return [np.asarray(w) for w in self.model.get_weights()]

    def accuracy(self, weights: Sequence[np.ndarray]) -> float:
        self.model.set_weights(list(weights))
        scores = self.model.evaluate(self.x_eval, self.y_eval, batch_size=1024, verbose=0, return_dict=True)
        return float(scores["accuracy"])

    @functools.cache  # noqa: B019 - one Federation per module; runs are reused across tests
    def run(self, rule: str, attack: str | None) -> float:
        """Final accuracy after ROUNDS rounds of ``rule`` with the attacker doing ``attack``."""
        model = self.initial
        for rnd in range(1, ROUNDS + 1):
            inputs: list[tuple[str, float, list[np.ndarray]]] = []
            for i in range(PARTICIPANTS):
                weights = self.train(model, i, seed=1000 * rnd + i)
                if i == BYZANTINE and attack == "signflip":
                    weights = [(-5.0 * w).astype(w.dtype) for w in weights]
                elif i == BYZANTINE and attack == "random":
                    rng = np.random.default_rng(rnd)
                    weights = [rng.normal(0.0, 1.0, w.shape).astype(w.dtype) for w in weights]
                # The committed weight is the sample count; the attacker does not even inflate it.
                inputs.append((f"peer-{i}", float(len(self.shards[i])), weights))
            model = aggregate(rule, inputs)
        return self.accuracy(model)


@pytest.fixture(scope="module")
def fed() -> Federation:
    return Federation()


def test_honest_federated_training_learns(fed: Federation) -> None:
    honest = fed.run("weighted_mean", None)
    print(json.dumps({"honest_weighted_mean": round(honest, 4)}))
    assert honest > 0.85  # 10 classes: chance is 0.1; measured about 0.93


@pytest.mark.parametrize("attack", ["signflip", "random"])
def test_robust_rules_withstand_one_byzantine_participant_of_four(fed: Federation, attack: str) -> None:
    honest = fed.run("weighted_mean", None)
    rules = ("weighted_mean", "median", "trimmed_mean")
    scores: dict[str, Any] = {rule: fed.run(rule, attack) for rule in rules}
    print(json.dumps({"attack": attack, "honest_weighted_mean": round(honest, 4),
                      **{f"{k}_attacked": round(v, 4) for k, v in scores.items()}}))
    # The attack is real: plain FedAvg is dragged far from the honest model …
    assert scores["weighted_mean"] < honest - COLLAPSE, scores
    # … and the robust rules are not.
    for rule in ("median", "trimmed_mean"):
        assert scores[rule] >= honest - ROBUST_TOLERANCE, (rule, scores[rule], honest)
