"""Property: a drift transforms each sample as a function of (seed, split, id, severity) and the
sample alone, whatever batch it comes in; the invertible ones invert (a swap undoes itself, a
permutation is undone by its inverse, quarter turns by the opposite turn)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcl.scenario.drift import DRIFT_TYPES, Drift, make_drift

CLASSES, SHAPE = 6, (1, 4, 4)


def drift_of(type_: str, seed: int, **params: object) -> Drift:
    return make_drift(type_, params, seed=seed, num_classes=CLASSES, input_shape=SHAPE)


def params_for(type_: str, draw: st.DrawFn) -> dict:
    if type_ == "label_swap":
        a, b = draw(st.lists(st.integers(0, CLASSES - 1), min_size=2, max_size=2, unique=True))
        return {"pairs": [[a, b]]}
    if type_ == "label_permutation":
        return {"permutation": draw(st.permutations(range(CLASSES)))}
    if type_ == "rotation":
        return {"degrees": draw(st.sampled_from([90, 180, 270, 30, 45]))}
    if type_ == "noise":
        return {"std": draw(st.floats(0.0, 2.0))}
    if type_ == "prior_shift":
        return {"weights": draw(st.lists(st.floats(0.0, 5.0), min_size=CLASSES, max_size=CLASSES))}
    return {}


@st.composite
def batches(draw: st.DrawFn) -> dict:
    type_ = draw(st.sampled_from(DRIFT_TYPES))
    params = params_for(type_, draw)
    if type_ == "prior_shift" and not any(params["weights"]):
        params["weights"][0] = 1.0
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    return {
        "drift": drift_of(type_, draw(st.integers(0, 2**31 - 1)), **params),
        "x": rng.random((n, *SHAPE), dtype=np.float32),
        "y": rng.integers(0, CLASSES, n),
        "ids": rng.choice(10_000, n, replace=False),
        "severity": draw(st.sampled_from([1.0, 0.5, draw(st.floats(0.0, 1.0))])),
        "split": draw(st.sampled_from(["train", "test"])),
        "order": rng.permutation(n)[: draw(st.integers(1, n))],
    }


@settings(max_examples=80)
@given(batches())
def test_a_sample_is_transformed_the_same_in_any_batch(case: dict) -> None:
    drift, order = case["drift"], case["order"]
    x, y, ids = case["x"], case["y"], case["ids"]
    kwargs = {"severity": case["severity"], "split": case["split"]}
    whole = drift.apply(x, y, ids, **kwargs)
    again = drift.apply(x, y, ids, **kwargs)
    part = drift.apply(x[order], y[order], ids[order], **kwargs)  # a sub-batch, reordered
    for a, b in zip(whole, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for full, sub in zip(whole, part, strict=True):
        np.testing.assert_array_equal(full[order], sub)
    x_out, y_out, keep = whole
    assert x_out.shape == x.shape and y_out.shape == y.shape and keep.shape == y.shape
    assert np.all((y_out >= 0) & (y_out < CLASSES))
    np.testing.assert_array_equal(x, case["x"])  # inputs are never modified


@st.composite
def invertible(draw: st.DrawFn) -> tuple:
    """(drift, its inverse, severity): drifts that give back the original data."""
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["label_swap", "label_permutation", "rotation"]))
    if kind == "rotation":  # quarter turns of a square image, at full severity
        turns = draw(st.integers(1, 3))
        forward = drift_of("rotation", seed, degrees=90 * turns)
        return forward, drift_of("rotation", seed, degrees=90 * (4 - turns)), 1.0
    severity = draw(st.floats(0.0, 1.0))
    forward = drift_of(kind, seed, **params_for(kind, draw))
    if kind == "label_swap":  # a swap is its own inverse
        return forward, forward, severity
    permutation = np.asarray(forward.params["permutation"])
    inverse = drift_of(kind, seed, permutation=np.argsort(permutation).tolist())
    return forward, inverse, severity  # the same seed relabels the same samples


@given(invertible(), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_invertible_drifts_invert(drifts: tuple, n: int, data_seed: int) -> None:
    forward, inverse, severity = drifts
    rng = np.random.default_rng(data_seed)
    x = rng.random((n, *SHAPE), dtype=np.float32)
    y, ids = rng.integers(0, CLASSES, n), rng.choice(10_000, n, replace=False)
    x1, y1, _ = forward.apply(x, y, ids, severity)
    x2, y2, _ = inverse.apply(x1, y1, ids, severity)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    if forward.type != "rotation" and severity == 1.0:  # every label moved by the mapping
        mapping = (
            np.asarray(forward.params["permutation"])
            if forward.type == "label_permutation"
            else _swap_mapping(forward.params["pairs"])
        )
        np.testing.assert_array_equal(y1, mapping[y])


def _swap_mapping(pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    mapping = np.arange(CLASSES)
    for a, b in pairs:
        mapping[a], mapping[b] = b, a
    return mapping
