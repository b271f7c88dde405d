"""Compiled loops for the actors' exact sums and screen of large models (numba).

numpy runs Knuth's TwoSum as eight whole-array passes per client: for a 79k-parameter MLP that
cost about a sixth of a vectorized client's time on its actor. These loops do the same
arithmetic, in the same order, element by element in registers: the same bits, about ten times
faster. The screen's squared distances get a loop of their own.

The sum is compiled without fast-math: LLVM may then neither reassociate nor fuse the multiply
and the add, either of which would break TwoSum. The loops are imported only for calls large
enough to gain (`replies.COMPILED_FROM`): numba's import and cache load cost most of a second per
process.

Each loop is compiled for a fixed list of signatures, in a fixed order, when this module is
imported, and cached beside it. numba's cache names a signature's file by the order it was added
to the cache's index, so processes compiling different signatures at the same moment (two actors
and the driver, on a fresh checkout) could otherwise map one signature to another's machine code;
in a fixed order every process writes the same names for the same signatures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, types

_FLOATS = (types.float32, types.float64)  # the stacks' dtypes (`replies.COMPILED_DTYPES`)
_TOTALS = types.Array(types.float64, 1, "C")


def _input(dtype: types.Type, dims: int) -> types.Array:
    """A C-contiguous read-only array: the one layout the loops take their inputs in."""
    return types.Array(dtype, dims, "C", readonly=True)


def accumulate_rows(
    high: np.ndarray,
    low: np.ndarray,
    stack: np.ndarray,
    rows: Sequence[int],
    weights: Sequence[float],
) -> None:
    """high + low += Σⱼ weights[j] · stack[rows[j]], row by row in the order given, with
    TwoSum on every element: the bits `ArraySum._accumulate` gives. `stack` is (rows, n),
    float32 or float64; `high` and `low` are C-contiguous float64 (n,)."""
    _accumulate_rows(
        high,
        low,
        _read_only(stack),
        _read_only(np.asarray(rows, dtype=np.int64)),
        _read_only(np.asarray(weights, dtype=np.float64)),
    )


def squared_distances(stack: np.ndarray, reference: np.ndarray, out: np.ndarray) -> None:
    """out[k] += Σᵢ (stack[k, i] − reference[i])², in float64, summed in any order: non-finite
    when row k holds a NaN or infinity. `stack` (rows, n) and `reference` (n,) share a dtype,
    float32 or float64; `out` is C-contiguous float64."""
    _squared_distances(_read_only(stack), _read_only(reference), out)


def _read_only(array: np.ndarray) -> np.ndarray:
    """A read-only, C-contiguous view of `array` (a copy only if it is not contiguous)."""
    view = np.ascontiguousarray(array).view()
    view.flags.writeable = False
    return view


@njit(
    [
        types.void(
            _TOTALS, _TOTALS, _input(dtype, 2), _input(types.int64, 1), _input(types.float64, 1)
        )
        for dtype in _FLOATS
    ],
    cache=True,
    nogil=True,
)
def _accumulate_rows(
    high: np.ndarray,
    low: np.ndarray,
    stack: np.ndarray,
    rows: np.ndarray,
    weights: np.ndarray,
) -> None:
    """`accumulate_rows`, compiled."""
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
@njit(
    [types.void(_input(dtype, 2), _input(dtype, 1), _TOTALS) for dtype in _FLOATS],
    cache=True,
    nogil=True,
    fastmath={"reassoc", "contract"},
)
def _squared_distances(stack: np.ndarray, reference: np.ndarray, out: np.ndarray) -> None:
    """`squared_distances`, compiled."""
    for k in range(stack.shape[0]):
        total = 0.0
        for i in range(stack.shape[1]):
            delta = np.float64(stack[k, i]) - np.float64(reference[i])
            total += delta * delta
        out[k] += total
