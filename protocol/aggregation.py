"""Aggregation rules of the signed aggregation round (docs/design.md §6), as pure numpy functions.

Every committee member recomputes the aggregate O from the committed outputs O_i and votes
for its hash, so all members must get the *same bytes*. protocol/SPEC.md §11.3 states the
algorithm bit for bit and ``protocol/vectors/tensors.json`` pins it; in short:

* inputs are processed in ascending order of their key (callers pass
  ``certificate.input_key(peer_id, shard)``: peer ID, then shard), whatever order they are
  given in;
* every element is first converted to float64 (exact for ``<f2 <f4 <f8 <i4 |u1``; an
  ``<i8`` beyond 2**53 rounds to nearest-even), and every reduction is an explicit
  left-to-right loop of element-wise float64 operations starting from +0.0 (never
  ``np.sum``/``np.mean``, whose pairwise/SIMD order is an implementation detail, and never
  float32 accumulation);
* ``weighted_mean`` is (Σ w_i·x_i) / Σ w_i — one division at the end, never normalising the
  weights first; ``trimmed_mean`` sums the kept values in ascending *sorted* order;
* ``-0.0`` is normalised to ``+0.0`` before sorting, the one case where sort output could
  depend on input order (``-0.0 == 0.0``);
* the float64 result, if any value is not finite, is ``overflow``; else it is cast once to
  the inputs' dtype: floats round to nearest-even directly from float64 (a non-finite value
  after that cast is ``overflow``), integers are rounded half-to-even (``np.rint``) and
  saturate at the dtype's range.

Rules:

``sum``
    The seed's O = Σ O_i (seed §4.1). Weights are ignored.
``weighted_mean``
    FedAvg (McMahan et al., 2017): O = Σ w_i·O_i / Σ w_i, with w_i the sample counts the
    participants committed to (a committed weight of 0 counts as 1.0, :func:`effective_weight`).
    Weights of the participants present are renormalised simply by dividing by their own sum
    (docs/design.md §6: a missing participant is left out).
``trimmed_mean``
    Per coordinate: sort the n values, drop the t lowest and t highest, average the rest
    (unweighted), with t = min(⌈trim_ratio·n − 1e-9⌉, ⌊(n−1)/2⌋). The ceiling (not the floor
    scipy's ``trim_mean`` uses) matters for small rounds: with 4 participants and the default
    0.2, floor would trim nothing and one Byzantine peer would move the mean at will; ceiling
    trims 1 from each side. The 1e-9 absorbs float representation (0.2·5 trims exactly 1).
    The clamp keeps at least one value. The protocol always uses trim_ratio 0.2.
``median``
    Per coordinate: the middle value, or for even n 0.5·(lo + hi) of the two middle values
    (computed exactly so: lo + hi may overflow, which is ``overflow``).

Robust rules (median, trimmed_mean) ignore weights on purpose: a Byzantine peer could
otherwise claim a huge sample count.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from protocol.errors import LocalProtocolError, RemoteProtocolError

RULES = ("sum", "weighted_mean", "trimmed_mean", "median")

#: dtypes an aggregate may be computed over (the same set protocol/tensors.py carries).
_ALLOWED_KINDS = frozenset("fiu")

Input = tuple[str, float, Sequence[np.ndarray]]
_F64 = npt.NDArray[np.float64]


def effective_weight(committed: float) -> float:
    """The weight an input counts with: its committed ``weight`` if > 0, else 1.0 (SPEC §11.3).

    A result's ``weight`` is 0.0 when the kind reports no sample count; such an input must
    not vanish from a weighted mean (nor make the total 0).
    """
    return committed if committed > 0 else 1.0


def trim_count(n: int, trim_ratio: float) -> int:
    """Values dropped from EACH end per coordinate by ``trimmed_mean`` for n inputs."""
    if n < 1:
        raise LocalProtocolError("trim_count needs n >= 1", reason="empty")
    return max(0, min(math.ceil(trim_ratio * n - 1e-9), (n - 1) // 2))


def _validate(rule: str, inputs: Sequence[Input], trim_ratio: float) -> list[Input]:
    if rule not in RULES:
        raise LocalProtocolError(
            f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}", reason="bad_rule"
        )
    if not (isinstance(trim_ratio, int | float) and 0.0 <= trim_ratio < 0.5):
        raise LocalProtocolError(f"trim_ratio must be in [0, 0.5), got {trim_ratio!r}", reason="bad_rule")
    if not inputs:
        raise LocalProtocolError("nothing to aggregate", reason="empty")
    ordered = sorted(inputs, key=lambda item: item[0])
    for prev, cur in itertools.pairwise(ordered):
        if prev[0] == cur[0]:
            # The caller builds this list from commits, one per signer: a duplicate is our bug.
            raise LocalProtocolError(f"two inputs from {cur[0]}", reason="duplicate_input")
    first = ordered[0][2]
    if len(first) == 0:
        raise RemoteProtocolError(f"{ordered[0][0]} committed an empty array list", reason="shape_mismatch")
    for peer, weight, arrays in ordered:
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise RemoteProtocolError(f"{peer} committed weight {weight!r}", reason="bad_weight")
        if len(arrays) != len(first):
            raise RemoteProtocolError(
                f"{peer} sent {len(arrays)} arrays, {ordered[0][0]} sent {len(first)}",
                reason="shape_mismatch",
            )
        for i, (a, ref) in enumerate(zip(arrays, first, strict=True)):
            if not isinstance(a, np.ndarray):
                raise RemoteProtocolError(f"{peer} array {i} is not an ndarray", reason="shape_mismatch")
            if a.dtype.kind not in _ALLOWED_KINDS:
                raise RemoteProtocolError(f"{peer} array {i} has dtype {a.dtype}", reason="shape_mismatch")
            if a.shape != ref.shape or a.dtype != ref.dtype:
                raise RemoteProtocolError(
                    f"{peer} array {i} is {a.dtype}{a.shape}, expected {ref.dtype}{ref.shape}",
                    reason="shape_mismatch",
                )
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise RemoteProtocolError(f"{peer} array {i} has NaN or infinity", reason="non_finite")
    return ordered


def _cast(result: _F64, like: np.ndarray) -> np.ndarray:
    if not np.isfinite(result).all():
        # Every input was finite, so only overflow gets here (e.g. a float16 sum > 65504 is
        # checked after the cast below; a float64 sum beyond 1.8e308 here).
        raise RemoteProtocolError("aggregate overflows float64", reason="overflow")
    dtype = like.dtype
    if dtype.kind == "f":
        out = result.astype(dtype)
        if not np.isfinite(out).all():
            raise RemoteProtocolError(f"aggregate overflows {dtype}", reason="overflow")
    else:
        # Round half to even, then saturate at the dtype's range (SPEC §11.3). The bounds are
        # compared as exact powers of two: float(2**63 - 1) is 2**63, so clipping against
        # info.max in float64 and casting would overflow (numpy gives -2**63 on x86, the
        # maximum on ARM); the float64 values kept here are integers the dtype represents.
        info = np.iinfo(dtype)
        rounded = np.rint(result)
        over = rounded >= float(int(info.max) + 1)  # 2**8, 2**31 or 2**63: exact in float64
        under = rounded < float(info.min)  # 0, -2**31 or -2**63: exact in float64
        out = np.where(over | under, 0.0, rounded).astype(dtype)
        out[over] = info.max
        out[under] = info.min
    # astype made a fresh C-contiguous array (np.ascontiguousarray would turn 0-d into 1-d).
    return out.reshape(like.shape)


def _stack_sorted(arrays: Sequence[np.ndarray]) -> _F64:
    # "+ 0.0" maps -0.0 to +0.0 so the sorted stack cannot depend on input order.
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in arrays]) + 0.0
    return np.sort(stacked, axis=0)


def aggregate(rule: str, inputs: Sequence[Input], *, trim_ratio: float = 0.2) -> list[np.ndarray]:
    """Aggregate ``inputs`` = [(peer_id, weight, [arrays...]), ...] with ``rule``.

    Returns one array per position, of the inputs' shape and dtype. Deterministic and
    independent of the order of ``inputs`` (bit for bit). Raises RemoteProtocolError with
    reason ``shape_mismatch``, ``non_finite``, ``bad_weight`` or ``overflow`` for bad
    peer data; LocalProtocolError for an unknown rule, bad trim_ratio or no inputs.
    """
    ordered = _validate(rule, inputs, trim_ratio)
    out: list[np.ndarray] = []
    n_arrays = len(ordered[0][2])
    total_w = 0.0
    if rule == "weighted_mean":
        for _, w, _ in ordered:
            total_w += float(w)
        if not (total_w > 0 and math.isfinite(total_w)):
            raise RemoteProtocolError(f"weights sum to {total_w!r}", reason="bad_weight")
    # Overflow is detected and reported by _cast; numpy's RuntimeWarning would only be noise.
    with np.errstate(over="ignore", invalid="ignore"):
        for pos in range(n_arrays):
            out.append(_aggregate_one(rule, ordered, pos, trim_ratio, total_w))
    return out


def _aggregate_one(
    rule: str, ordered: list[Input], pos: int, trim_ratio: float, total_w: float
) -> np.ndarray:
    """Aggregate array number ``pos`` of every input (inputs already validated and sorted)."""
    n = len(ordered)
    like = ordered[0][2][pos]
    column = [item[2][pos] for item in ordered]
    if rule == "sum":
        acc = np.zeros(like.shape, dtype=np.float64)
        for a in column:
            acc += np.asarray(a, dtype=np.float64)
        result = acc
    elif rule == "weighted_mean":
        acc = np.zeros(like.shape, dtype=np.float64)
        for (_, w, _), a in zip(ordered, column, strict=True):
            acc += float(w) * np.asarray(a, dtype=np.float64)
        result = acc / total_w
    elif rule == "trimmed_mean":
        t = trim_count(n, trim_ratio)
        srt = _stack_sorted(column)
        acc = np.zeros(like.shape, dtype=np.float64)
        for row in srt[t : n - t]:
            acc += row
        result = acc / float(n - 2 * t)
    else:  # median
        srt = _stack_sorted(column)
        mid = n // 2
        result = srt[mid] if n % 2 else 0.5 * (srt[mid - 1] + srt[mid])
    return _cast(np.asarray(result, dtype=np.float64), like)
