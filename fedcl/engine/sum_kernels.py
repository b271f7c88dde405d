"""Compiled loops for the actors' exact sums and screen of large models (numba).

numpy runs Knuth's TwoSum as eight whole-array passes per client: for a 79k-parameter MLP that
cost about a sixth of a vectorized client's time on its actor. These loops do the same
arithmetic, in the same order, element by element in registers: the same bits, about ten times
faster. The screen's squared distances get a loop of their own.

The sum is compiled without fast-math: LLVM may then neither reassociate nor fuse the multiply
and the add, either of which would break TwoSum. Compiled code is cached beside this module
(`cache=True`), and the module is imported only for calls large enough to gain
(`replies.COMPILED_FROM`): numba's import and cache load cost most of a second per process.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def accumulate_rows(
    high: np.ndarray,
    low: np.ndarray,
    stack: np.ndarray,
    rows: np.ndarray,
    weights: np.ndarray,
) -> None:  # pragma: no cover - compiled; its tests compare it with numpy's passes
    """high + low += Σⱼ weights[j] · stack[rows[j]], row by row in the order given, with
    TwoSum on every element: the bits `ArraySum._accumulate` gives. `stack` is (rows, n) in any
    float dtype; `high` and `low` are float64 (n,)."""
    size = high.shape[0]
    for j in range(rows.shape[0]):
        row = rows[j]
        weight = weights[j]
        for i in range(size):
            term = np.float64(stack[row, i]) * weight
            before = high[i]
            total = before + term
            back = total - before
            low[i] += (before - (total - back)) + (term - back)
            high[i] = total


# Reassociation lets LLVM vectorize this reduction; NaN and infinity still propagate (no
# "nnan"/"ninf" flags). A distance needs no fixed rounding: the bound is a threshold.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def squared_distances(
    stack: np.ndarray, reference: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled; its tests compare it with numpy
    """out[k] += Σᵢ (stack[k, i] − reference[i])², in float64, summed in any order: non-finite
    when row k holds a NaN or infinity."""
    for k in range(stack.shape[0]):
        total = 0.0
        for i in range(stack.shape[1]):
            delta = np.float64(stack[k, i]) - np.float64(reference[i])
            total += delta * delta
        out[k] += total
