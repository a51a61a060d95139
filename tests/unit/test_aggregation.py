"""Aggregation rules (docs/design.md §6): values, canonical order, robustness, bad input."""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.aggregation import RULES, Input, aggregate, trim_count
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError


def arr(*values: float, dtype: str = "float32") -> np.ndarray:
    return np.array(values, dtype=dtype)


def test_sum_is_the_seeds_o_equals_sum_of_o_i() -> None:
    inputs = [("a", 1.0, [arr(1, 2), arr(10)]), ("b", 5.0, [arr(3, 4), arr(20)])]
    out = aggregate("sum", inputs)
    assert [o.tolist() for o in out] == [[4.0, 6.0], [30.0]]
    assert all(o.dtype == np.float32 for o in out)


def test_weighted_mean_is_fedavg() -> None:
    inputs = [("a", 1.0, [arr(0, 4)]), ("b", 3.0, [arr(4, 8)])]
    (out,) = aggregate("weighted_mean", inputs)
    assert out.tolist() == [3.0, 7.0]


def test_weighted_mean_leaves_out_a_missing_participant_by_renormalising() -> None:
    full = [("a", 2.0, [arr(1.0)]), ("b", 2.0, [arr(3.0)]), ("c", 4.0, [arr(100.0)])]
    (present,) = aggregate("weighted_mean", full[:2])
    assert present.tolist() == [2.0]


@pytest.mark.parametrize(
    ("n", "ratio", "t"),
    [
        (1, 0.2, 0),
        (2, 0.2, 0),
        (3, 0.2, 1),
        (4, 0.2, 1),
        (5, 0.2, 1),
        (6, 0.2, 2),
        (10, 0.2, 2),
        (10, 0.0, 0),
        (10, 0.49, 4),
        (7, 0.3, 3),
    ],
)
def test_trim_count(n: int, ratio: float, t: int) -> None:
    assert trim_count(n, ratio) == t


def test_trimmed_mean_drops_extremes_per_coordinate() -> None:
    inputs = [
        ("a", 1.0, [arr(1, 100)]),
        ("b", 1.0, [arr(2, -100)]),
        ("c", 1.0, [arr(3, 1)]),
        ("d", 1.0, [arr(1000, 3)]),
        ("e", 1.0, [arr(4, 2)]),
    ]
    # n = 5, t = 1: coordinate 0 keeps {2,3,4}, coordinate 1 keeps {1,2,3}.
    (out,) = aggregate("trimmed_mean", inputs)
    assert out.tolist() == [3.0, 2.0]
    # trim_ratio 0 is the plain mean.
    (plain,) = aggregate("trimmed_mean", inputs, trim_ratio=0.0)
    assert plain.tolist() == pytest.approx([202.0, 1.2])


def test_median_odd_and_even() -> None:
    three = [("a", 1.0, [arr(1, 9)]), ("b", 1.0, [arr(5, 7)]), ("c", 1.0, [arr(3, 8)])]
    assert aggregate("median", three)[0].tolist() == [3.0, 8.0]
    four = [*three, ("d", 1.0, [arr(10, 0)])]
    assert aggregate("median", four)[0].tolist() == [4.0, 7.5]


def test_integer_dtypes_round_half_even_and_clip() -> None:
    inputs = [("a", 1.0, [arr(1, 250, dtype="uint8")]), ("b", 1.0, [arr(2, 250, dtype="uint8")])]
    (mean,) = aggregate("weighted_mean", inputs)
    assert mean.dtype == np.uint8 and mean.tolist() == [2, 250]  # 1.5 -> 2 (half to even)
    (total,) = aggregate("sum", inputs)
    assert total.tolist() == [3, 255]  # 500 clipped to the uint8 range


def test_output_keeps_shape_and_dtype_of_each_array() -> None:
    a: list[np.ndarray] = [
        np.ones((2, 3), dtype=np.float16),
        np.arange(4, dtype=np.float64).reshape(2, 2),
        np.array(5.0, "float32"),
    ]
    b = [np.asarray(x * 3) for x in a]
    for rule in RULES:
        out = aggregate(rule, [("p", 1.0, a), ("q", 1.0, b)])
        assert [(o.shape, o.dtype) for o in out] == [(x.shape, x.dtype) for x in a]


def test_byzantine_sign_flip_moves_weighted_mean_but_not_robust_rules() -> None:
    # Issue 4 quality bar, numerically: 4 participants, one sends ×−5 its honest update.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(128, 10)).astype(np.float32)
    honest = [base + 0.01 * rng.normal(size=base.shape).astype(np.float32) for _ in range(4)]
    honest_mean = np.mean(np.stack(honest[:3]).astype(np.float64), axis=0)
    inputs = [(f"peer{i}", 100.0, [honest[i]]) for i in range(3)] + [("peer3", 100.0, [-5 * honest[3]])]
    scale = float(np.linalg.norm(honest_mean))

    def err(rule: str) -> float:
        (out,) = aggregate(rule, inputs)
        return float(np.linalg.norm(out.astype(np.float64) - honest_mean)) / scale

    assert err("weighted_mean") > 1.0  # (3h − 5h)/4 = −h/2: 150% off — the attack is real
    assert err("median") < 0.02
    assert err("trimmed_mean") < 0.02


def test_inflated_weight_hijacks_fedavg_but_not_median() -> None:
    inputs = [
        ("a", 10.0, [arr(1.0)]),
        ("b", 10.0, [arr(1.1)]),
        ("c", 10.0, [arr(0.9)]),
        ("z", 1e9, [arr(-50.0)]),
    ]
    assert aggregate("weighted_mean", inputs)[0][0] < -49
    assert 0.9 <= aggregate("median", inputs)[0][0] <= 1.1


# --- canonical order ----------------------------------------------------------------------------

_values = st.one_of(
    st.floats(-1e6, 1e6, width=32), st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, 0.1, 1 / 3])
)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=1, max_value=7),
    st.sampled_from(["float16", "float32", "float64"]),
    st.data(),
    st.randoms(use_true_random=False),
)
def test_permuting_inputs_gives_bit_identical_output(
    n: int, dtype: str, data: st.DataObject, rnd: random.Random
) -> None:
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
    elements = _values if dtype != "float16" else st.floats(-1000, 1000, width=16)
    inputs = []
    for i in range(n):
        a = data.draw(hnp.arrays(dtype, shape, elements=elements))
        w = data.draw(st.floats(0.5, 1000.0))
        inputs.append((f"p{i}", w, [a]))
    shuffled = list(inputs)
    rnd.shuffle(shuffled)
    for rule in RULES:
        try:
            a_out = aggregate(rule, inputs)
        except RemoteProtocolError as e:  # float16 sums may overflow; then both must
            assert e.reason == "overflow"
            with pytest.raises(RemoteProtocolError):
                aggregate(rule, shuffled)
            continue
        b_out = aggregate(rule, shuffled)
        assert [x.tobytes() for x in a_out] == [x.tobytes() for x in b_out]


def test_sum_accumulates_in_float64_in_peer_id_order() -> None:
    # In float32, 1e8 + 1 − 1e8 loses the 1; float64 accumulation keeps it.
    inputs = [("a", 1.0, [arr(1e8)]), ("b", 1.0, [arr(1.0)]), ("c", 1.0, [arr(-1e8)])]
    assert aggregate("sum", inputs)[0].tolist() == [1.0]


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        ([("a", 1.0, [arr(1, 2)]), ("b", 1.0, [arr(1, 2, 3)])], "shape_mismatch"),
        ([("a", 1.0, [arr(1, 2)]), ("b", 1.0, [arr(1, 2, dtype="float64")])], "shape_mismatch"),
        ([("a", 1.0, [arr(1, 2)]), ("b", 1.0, [arr(1, 2), arr(3)])], "shape_mismatch"),
        ([("a", 1.0, [arr(1, 2)]), ("b", 1.0, [np.array(["x", "y"])])], "shape_mismatch"),
        ([("a", 1.0, [arr(1, 2)]), ("b", 1.0, [[1.0, 2.0]])], "shape_mismatch"),
        ([("a", 1.0, [])], "shape_mismatch"),
        ([("a", 1.0, [arr(1, np.nan)]), ("b", 1.0, [arr(1, 2)])], "non_finite"),
        ([("a", 1.0, [arr(1, 2)]), ("b", 1.0, [arr(np.inf, 2)])], "non_finite"),
        ([("a", -1.0, [arr(1, 2)])], "bad_weight"),
        ([("a", float("nan"), [arr(1, 2)])], "bad_weight"),
    ],
)
def test_bad_peer_data_is_a_remote_error(inputs: list[Input], reason: str) -> None:
    for rule in RULES:
        with pytest.raises(RemoteProtocolError) as ei:
            aggregate(rule, inputs)
        assert ei.value.reason == reason


def test_zero_total_weight_fails_only_weighted_mean() -> None:
    inputs = [("a", 0.0, [arr(1.0)]), ("b", 0.0, [arr(3.0)])]
    with pytest.raises(RemoteProtocolError) as ei:
        aggregate("weighted_mean", inputs)
    assert ei.value.reason == "bad_weight"
    assert aggregate("sum", inputs)[0].tolist() == [4.0]


def test_float16_overflow_is_reported() -> None:
    big = np.array([60000.0], dtype=np.float16)
    with pytest.raises(RemoteProtocolError) as ei:
        aggregate("sum", [("a", 1.0, [big]), ("b", 1.0, [big])])
    assert ei.value.reason == "overflow"


@pytest.mark.parametrize(
    ("rule", "inputs", "kwargs"),
    [
        ("sum", [], {}),
        ("mean", [("a", 1.0, [arr(1.0)])], {}),
        ("trimmed_mean", [("a", 1.0, [arr(1.0)])], {"trim_ratio": 0.5}),
        ("trimmed_mean", [("a", 1.0, [arr(1.0)])], {"trim_ratio": -0.1}),
        ("sum", [("a", 1.0, [arr(1.0)]), ("a", 1.0, [arr(1.0)])], {}),
    ],
)
def test_caller_mistakes_are_local_errors(rule: str, inputs: list[Input], kwargs: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        aggregate(rule, inputs, **kwargs)


def test_only_protocol_errors_escape_on_garbage() -> None:
    # Wrong types on purpose: the annotation is loose so the type checker lets them through.
    weird: list[list[Any]] = [
        [("a", "1", [arr(1.0)])],
        [("a", 1.0, [np.array([1 + 2j])])],
        [("a", 1.0, [np.array([True])])],
        [("a", True, [arr(1.0)])],
    ]
    for inputs in weird:
        with pytest.raises(ProtocolError):
            aggregate("sum", inputs)


def test_signed_zeros_do_not_make_the_result_depend_on_order() -> None:
    # -0.0 == 0.0, so a sort may put either first; both must give the same bytes.
    values = [-0.0, 0.0, -0.0, 0.0, 0.0]
    outputs = set()
    for perm in itertools.permutations(range(5)):
        inputs = [(f"p{i}", 1.0, [np.array([values[j]] * 8, dtype=np.float64)]) for i, j in enumerate(perm)]
        for rule in ("median", "trimmed_mean"):
            outputs.add((rule, aggregate(rule, inputs, trim_ratio=0.4)[0].tobytes()))
    assert len(outputs) == 2


@pytest.mark.parametrize(
    ("dtype", "values", "expected"),
    [
        # 2^62 + 2^62 = 2^63 is one past int64's maximum: it saturates, never wraps to -2^63.
        ("int64", (2**62, 2**62), 2**63 - 1),
        ("int64", (-(2**62), -(2**62) - 2048), -(2**63)),
        ("int64", (2**62, 2**62 - 1024), 2**63 - 1024),  # exact in float64, below the maximum
        ("int32", (2**30, 2**30), 2**31 - 1),
        ("int32", (-(2**30), -(2**30) - 1), -(2**31)),
        ("uint8", (200, 100), 255),
    ],
)
def test_integer_sum_saturates_at_the_dtype_range(dtype: str, values: tuple[int, int], expected: int) -> None:
    """SPEC §11.3: the rounded float64 result is clipped to the dtype's range. float(2^63 - 1)
    is 2^63, so clipping against the int64 maximum as a float and casting overflowed."""
    inputs = [
        ("a", 1.0, [np.array([values[0]], dtype=dtype)]),
        ("b", 1.0, [np.array([values[1]], dtype=dtype)]),
    ]
    (out,) = aggregate("sum", inputs)
    assert out.dtype == np.dtype(dtype)
    assert out.tolist() == [expected]
