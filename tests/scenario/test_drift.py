"""Concept drift transforms: identity at severity 0, the promised effect at severity 1, monotone
in severity, and deterministic per sample whatever batch it is in."""

from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np
import pytest

from fedcl.errors import ConfigError
from fedcl.scenario.drift import DRIFT_TYPES, Drift, make_drift

IMAGE = (1, 6, 6)
PARAMS: dict[str, dict[str, Any]] = {
    "label_swap": {"pairs": [[1, 2], [3, 4]]},
    "label_permutation": {},
    "rotation": {"degrees": 30},
    "feature_permutation": {},
    "noise": {"std": 0.5},
    "prior_shift": {"weights": [1, 0, 2, 1, 1]},
}


def _drift(type: str, params: dict[str, Any] | None = None, **kwargs: Any) -> Drift:
    kwargs = {"seed": 7, "num_classes": 5, "input_shape": IMAGE, **kwargs}
    return make_drift(type, PARAMS[type] if params is None else params, **kwargs)


def _batch(n: int = 200, shape: tuple[int, ...] = IMAGE, num_classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=n)
    return x, y, np.arange(n) + 1000


@pytest.mark.parametrize("type", DRIFT_TYPES)
def test_severity_zero_is_the_identity(type: str) -> None:
    x, y, ids = _batch()
    x_before, y_before = x.copy(), y.copy()
    x2, y2, keep = _drift(type).apply(x, y, ids, 0.0)
    np.testing.assert_array_equal(x2, x_before)
    np.testing.assert_array_equal(y2, y_before)
    assert keep.dtype == bool and keep.all()


@pytest.mark.parametrize("type", DRIFT_TYPES)
def test_apply_does_not_modify_inputs_and_is_deterministic(type: str) -> None:
    x, y, ids = _batch()
    x_before, y_before = x.copy(), y.copy()
    first = _drift(type).apply(x, y, ids, 0.8)
    again = _drift(type).apply(x, y, ids, 0.8)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("type", DRIFT_TYPES)
def test_per_sample_output_is_independent_of_batch_order_and_composition(type: str) -> None:
    x, y, ids = _batch(100)
    drift = _drift(type)
    whole = drift.apply(x, y, ids, 0.6)
    order = np.random.default_rng(1).permutation(100)
    shuffled = drift.apply(x[order], y[order], ids[order], 0.6)
    part = np.arange(10, 40)
    sub = drift.apply(x[part], y[part], ids[part], 0.6)
    for full, perm, piece in zip(whole, shuffled, sub, strict=True):
        np.testing.assert_array_equal(full[order], perm)
        np.testing.assert_array_equal(full[part], piece)


def test_label_swap_at_full_severity_swaps_exactly_the_pairs() -> None:
    y = np.repeat(np.arange(6), 10)
    x = np.zeros((len(y), 3), dtype=np.float32)
    drift = make_drift(
        "label_swap", {"pairs": [[1, 2], [3, 4]]}, seed=3, num_classes=6, input_shape=[3]
    )
    x2, y2, keep = drift.apply(x, y, np.arange(len(y)))
    expected = np.array([0, 2, 1, 4, 3, 5])[y]
    np.testing.assert_array_equal(y2, expected)
    assert x2 is x and keep.all()


@pytest.mark.parametrize("severity", [0.3, 1.0])
def test_applying_a_swap_twice_restores_the_labels(severity: float) -> None:
    x, y, ids = _batch(300)
    drift = _drift("label_swap")
    _, once, _ = drift.apply(x, y, ids, severity)
    _, twice, _ = drift.apply(x, once, ids, severity)
    assert not np.array_equal(once, y)
    np.testing.assert_array_equal(twice, y)


def test_swapped_set_grows_with_severity_and_has_size_about_s_n() -> None:
    n = 20_000
    y = np.ones(n, dtype=np.int64)
    x, ids = np.zeros((n, 1), dtype=np.float32), np.arange(n)
    drift = make_drift("label_swap", {"pairs": [[1, 2]]}, seed=11, num_classes=3, input_shape=[1])
    low = drift.apply(x, y, ids, 0.3)[1] == 2
    high = drift.apply(x, y, ids, 0.7)[1] == 2
    assert np.all(high[low])
    assert abs(low.mean() - 0.3) < 0.02 and abs(high.mean() - 0.7) < 0.02


def test_label_permutation_from_seed_is_a_recorded_permutation() -> None:
    drift = make_drift("label_permutation", {}, seed=5, num_classes=10, input_shape=[2])
    permutation = np.asarray(drift.params["permutation"])
    np.testing.assert_array_equal(np.sort(permutation), np.arange(10))
    y = np.arange(10).repeat(3)
    _, y2, _ = drift.apply(np.zeros((30, 2)), y, np.arange(30))
    np.testing.assert_array_equal(y2, permutation[y])
    given = make_drift(
        "label_permutation", {"permutation": [2, 0, 1]}, seed=5, num_classes=3, input_shape=[2]
    )
    _, y3, _ = given.apply(np.zeros((3, 2)), np.array([0, 1, 2]), np.arange(3))
    assert y3.tolist() == [2, 0, 1]


@pytest.mark.parametrize("degrees", [90, 180, 270, -90])
def test_rotation_by_quarter_turns_on_square_images_equals_rot90(degrees: int) -> None:
    x, y, ids = _batch(4, shape=(3, 5, 5))
    drift = _drift("rotation", {"degrees": degrees}, input_shape=(3, 5, 5))
    x2, y2, _ = drift.apply(x, y, ids)
    np.testing.assert_array_equal(x2, np.rot90(x, degrees // 90, axes=(-2, -1)))
    assert y2 is y


def test_partial_rotation_matches_scipy_and_keeps_shape_and_dtype() -> None:
    from scipy import ndimage

    x, y, ids = _batch(4, shape=(2, 8, 6))
    x2, _, _ = _drift("rotation", {"degrees": 90}, input_shape=(2, 8, 6)).apply(x, y, ids, 0.5)
    expected = ndimage.rotate(x, 45, axes=(-2, -1), reshape=False, order=1, mode="constant")
    np.testing.assert_array_equal(x2, expected)
    assert x2.shape == x.shape and x2.dtype == x.dtype


def test_rotation_of_non_image_inputs_suggests_feature_permutation() -> None:
    with pytest.raises(ConfigError, match="feature_permutation"):
        make_drift("rotation", {}, seed=0, num_classes=3, input_shape=[20])


def test_feature_permutation_at_full_severity_permutes_each_row() -> None:
    x, y, ids = _batch(20)
    x2, _, _ = _drift("feature_permutation").apply(x, y, ids)
    flat, flat2 = x.reshape(20, -1), x2.reshape(20, -1)
    np.testing.assert_array_equal(np.sort(flat, axis=1), np.sort(flat2, axis=1))
    # One permutation of positions shared by all rows, moving every feature.
    index = np.argsort(flat[0])[np.argsort(np.argsort(flat2[0]))]
    np.testing.assert_array_equal(flat[:, index], flat2)
    assert np.all(index != np.arange(flat.shape[1]))


def test_feature_permutation_moves_about_s_times_the_features() -> None:
    x = np.arange(100, dtype=np.float32)[None, :].repeat(2, axis=0)
    drift = make_drift("feature_permutation", {}, seed=2, num_classes=2, input_shape=[100])
    moved_low = drift.apply(x, np.zeros(2, dtype=int), np.arange(2), 0.25)[0] != x
    moved_high = drift.apply(x, np.zeros(2, dtype=int), np.arange(2), 0.75)[0] != x
    assert moved_low[0].sum() == 25 and moved_high[0].sum() == 75


def test_noise_has_the_requested_scale_and_differs_between_splits() -> None:
    n = 2000
    x, y, ids = np.zeros((n, 16), dtype=np.float32), np.zeros(n, dtype=int), np.arange(n)
    drift = make_drift("noise", {"std": 0.5}, seed=4, num_classes=2, input_shape=[16])
    train = drift.apply(x, y, ids, 0.5, split="train")[0]
    test = drift.apply(x, y, ids, 0.5, split="test")[0]
    assert train.dtype == np.float32
    assert abs(train.std() - 0.25) < 0.01 and abs(train.mean()) < 0.01
    assert abs(np.corrcoef(train.ravel(), test.ravel())[0, 1]) < 0.05
    other_seed = make_drift("noise", {"std": 0.5}, seed=5, num_classes=2, input_shape=[16])
    assert not np.array_equal(train, other_seed.apply(x, y, ids, 0.5)[0])


def test_prior_shift_with_one_hot_weights_keeps_only_that_class() -> None:
    x, y, ids = _batch(500)
    drift = _drift("prior_shift", {"weights": [1, 0, 0, 0, 0]})
    x2, y2, keep = drift.apply(x, y, ids)
    assert x2 is x and y2 is y
    np.testing.assert_array_equal(keep, y == 0)


def test_prior_shift_kept_proportions_approach_the_weights() -> None:
    n = 60_000
    y = np.arange(n) % 4
    x, ids = np.zeros((n, 1), dtype=np.float32), np.arange(n)
    weights = np.array([4.0, 2.0, 1.0, 1.0])
    drift = make_drift(
        "prior_shift", {"weights": {0: 4, "1": 2}}, seed=9, num_classes=4, input_shape=[1]
    )
    assert drift.params["weights"] == (4.0, 2.0, 1.0, 1.0)
    _, _, keep = drift.apply(x, y, ids)
    proportions = np.bincount(y[keep], minlength=4) / keep.sum()
    np.testing.assert_allclose(proportions, weights / weights.sum(), atol=0.01)
    half = drift.apply(x, y, ids, 0.5)[2]
    assert np.all(half[keep]) and half.sum() > keep.sum()


def test_describe_is_json_and_drifts_pickle() -> None:
    drift = _drift("label_swap")
    record = json.loads(json.dumps(drift.describe()))
    assert record == {"type": "label_swap", "params": {"pairs": [[1, 2], [3, 4]]}, "seed": 7}
    assert pickle.loads(pickle.dumps(drift)) == drift


@pytest.mark.parametrize(
    ("type", "params", "match"),
    [
        ("label_flip", {}, "label_swap, label_permutation"),
        ("label_swap", {}, "pairs"),
        ("label_swap", {"pairs": [[1, 5]]}, "pairs"),
        ("label_swap", {"pairs": [[1, 2], [2, 3]]}, "pairs"),
        ("label_swap", {"pairs": [[1, 1]]}, "pairs"),
        ("label_swap", {"pairs": [1, 2]}, "pairs"),
        ("label_swap", {"pairs": [[1, 2]], "prob": 0.5}, "'prob'.*valid parameters: pairs"),
        ("label_permutation", {"permutation": [0, 1, 1, 2, 3]}, "permutation"),
        ("rotation", {"degrees": "ninety"}, "degrees"),
        ("noise", {"std": -1}, "std"),
        ("feature_permutation", {"fraction": 0.5}, "'fraction'.*valid parameters: none"),
        ("prior_shift", {}, "weights"),
        ("prior_shift", {"weights": [1, 2]}, "weights"),
        ("prior_shift", {"weights": {7: 1}}, "weights"),
        ("prior_shift", {"weights": [1, -1, 1, 1, 1]}, "weights"),
        ("prior_shift", {"weights": [0, 0, 0, 0, 0]}, "weights"),
    ],
)
def test_malformed_params_raise_a_one_line_config_error(
    type: str, params: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        _drift(type, params)
    assert "\n" not in str(info.value)


def test_bad_input_shape_severity_and_split_raise() -> None:
    with pytest.raises(ConfigError, match="input_shape"):
        make_drift("noise", {}, seed=0, num_classes=2, input_shape=[0, 3])
    x, y, ids = _batch(5)
    with pytest.raises(ConfigError, match="severity"):
        _drift("noise").apply(x, y, ids, 1.5)
    with pytest.raises(ConfigError, match="split.*train, test"):
        _drift("noise").apply(x, y, ids, split="val")
    with pytest.raises(ValueError, match="shape"):
        _drift("noise").apply(x.reshape(5, -1), y, ids)
