"""Concept drift as a pure, deterministic transform of a client's view of its data.

A `Drift` never copies or edits the dataset: given a batch (x, y) and the samples' stable ids it
returns the batch as the drifted concept presents it. All randomness comes from the drift's seed,
the split ("train" or "test") and the sample ids, so a sample looks the same whatever batch it is
in and in whatever order batches come. `severity` in [0, 1] interpolates from the original concept
(0) to the full drift (1); incremental drift ramps it over rounds, recurrent drift applies a swap
again (a swap is its own inverse).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from fedcl.errors import ConfigError
from fedcl.seeding import derive_rng, derive_seed

__all__ = ["DRIFT_TYPES", "Drift", "make_drift"]

DRIFT_TYPES: tuple[str, ...] = (
    "label_swap",
    "label_permutation",
    "rotation",
    "feature_permutation",
    "noise",
    "prior_shift",
)

SPLITS: tuple[str, ...] = ("train", "test")

_Batch = tuple[np.ndarray, np.ndarray, np.ndarray]

# Parameters each type accepts (all optional except label_swap's pairs).
_PARAMS: dict[str, tuple[str, ...]] = {
    "label_swap": ("pairs",),
    "label_permutation": ("permutation",),
    "rotation": ("degrees",),
    "feature_permutation": (),
    "noise": ("std",),
    "prior_shift": ("weights",),
}


@dataclass(frozen=True)
class Drift:
    """One concept change, applied to a client's samples on the fly.

    Attributes
    ----------
    type
        One of `DRIFT_TYPES`.
    params
        The validated parameters in normal form (pairs and permutations as tuples, weights as one
        float per class, defaults filled in), as built by `make_drift`.
    seed
        This drift's own seed; the caller derives it from the run seed and the event index.
    num_classes, input_shape
        The dataset's label count and the shape of one input (without the batch axis).

    Build instances with `make_drift`, which validates the parameters.
    """

    type: str
    params: Mapping[str, Any]
    seed: int
    num_classes: int
    input_shape: tuple[int, ...]

    def apply(
        self,
        x: np.ndarray,
        y: np.ndarray,
        ids: np.ndarray,
        severity: float = 1.0,
        *,
        split: str = "train",
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(x', y', keep)``: the samples as this concept presents them.

        `x` has shape ``(n, *input_shape)``, `y` and `ids` shape ``(n,)``. `ids` are the samples'
        stable ids (positions in the train or test arrays; `split` says which, so the two splits
        draw independent randomness). `keep` is a bool mask of the rows kept: all true except for
        prior_shift, which changes class proportions by dropping rows. Severity 0 returns the
        inputs unchanged; severity 1 is the full drift. The output for a sample depends only on
        (seed, split, id, severity) and its own x and y. Inputs are never modified; an array the
        drift does not change is returned as given, not copied.

        Raises `ConfigError` for a severity outside [0, 1] or an unknown split, `ValueError` for
        arrays whose shapes do not match each other or `input_shape`, or labels out of range.
        """
        if isinstance(severity, bool) or not isinstance(severity, Real):
            raise ConfigError(f"drift severity must be a number in [0, 1], got {severity!r}")
        severity = float(severity)
        if not 0.0 <= severity <= 1.0:
            raise ConfigError(f"drift severity must be in [0, 1], got {severity!r}")
        if split not in SPLITS:
            raise ConfigError(f"drift split must be one of {', '.join(SPLITS)}; got {split!r}")
        x, y, ids = np.asarray(x), np.asarray(y), np.asarray(ids)
        n = len(y)
        if y.ndim != 1 or ids.shape != (n,) or len(x) != n:
            raise ValueError(
                f"x, y and ids must have the same length n and y, ids shape (n,); got x "
                f"{x.shape}, y {y.shape}, ids {ids.shape}"
            )
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"x must have shape (n, *{self.input_shape}), got {x.shape}")
        keep = np.ones(n, dtype=bool)
        if severity == 0.0 or n == 0:
            return x, y, keep
        return _APPLY[self.type](self, x, y, ids, severity, split)

    def describe(self) -> dict[str, Any]:
        """A JSON-able dict ``{"type", "params", "seed"}`` for the run's events log."""
        return {"type": self.type, "params": _jsonable(dict(self.params)), "seed": int(self.seed)}

    # -- one method per type; each gets validated, non-empty inputs and 0 < severity <= 1 --------

    def _label_swap(
        self, x: np.ndarray, y: np.ndarray, ids: np.ndarray, severity: float, split: str
    ) -> _Batch:
        mapping = np.arange(self.num_classes)
        for a, b in self.params["pairs"]:
            mapping[a], mapping[b] = b, a
        return x, self._relabel(y, ids, severity, split, mapping), np.ones(len(y), dtype=bool)

    def _label_permutation(
        self, x: np.ndarray, y: np.ndarray, ids: np.ndarray, severity: float, split: str
    ) -> _Batch:
        mapping = np.asarray(self.params["permutation"])
        return x, self._relabel(y, ids, severity, split, mapping), np.ones(len(y), dtype=bool)

    def _relabel(
        self, y: np.ndarray, ids: np.ndarray, severity: float, split: str, mapping: np.ndarray
    ) -> np.ndarray:
        _check_labels(y, self.num_classes)
        # One fixed uniform per sample: the relabelled set grows monotonically with severity and
        # a second application of a swap hits exactly the same samples, restoring them.
        chosen = self._uniform(ids, split) < severity
        return np.where(chosen, mapping[y], y).astype(y.dtype, copy=False)

    def _rotation(
        self, x: np.ndarray, y: np.ndarray, ids: np.ndarray, severity: float, split: str
    ) -> _Batch:
        from scipy import ndimage

        angle = self.params["degrees"] * severity
        height, width = self.input_shape[-2:]
        quarter_turns = angle / 90.0
        if quarter_turns.is_integer() and (height == width or quarter_turns % 2 == 0):
            rotated = np.rot90(x, int(quarter_turns) % 4, axes=(-2, -1)).copy()
        else:
            rotated = ndimage.rotate(
                x, angle, axes=(-2, -1), reshape=False, order=1, mode="constant"
            )
        return rotated, y, np.ones(len(y), dtype=bool)

    def _feature_permutation(
        self, x: np.ndarray, y: np.ndarray, ids: np.ndarray, severity: float, split: str
    ) -> _Batch:
        size = math.prod(self.input_shape)
        order = derive_rng(self.seed, "feature_permutation").permutation(size)
        moved = order[: int(math.floor(severity * size + 0.5))]
        flat = x.reshape(len(x), size)
        out = flat.copy()
        # A cycle through the chosen positions: every chosen feature moves, and at severity 1 the
        # whole vector is permuted.
        out[:, moved] = flat[:, np.roll(moved, -1)]
        return out.reshape(x.shape), y, np.ones(len(y), dtype=bool)

    def _noise(
        self, x: np.ndarray, y: np.ndarray, ids: np.ndarray, severity: float, split: str
    ) -> _Batch:
        size = math.prod(self.input_shape)
        normal = self._normal(ids, split, size)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        normal *= np.float32(self.params["std"] * severity)
        noisy = x.reshape(len(x), size) + normal
        return noisy.astype(dtype).reshape(x.shape), y, np.ones(len(y), dtype=bool)

    def _prior_shift(
        self, x: np.ndarray, y: np.ndarray, ids: np.ndarray, severity: float, split: str
    ) -> _Batch:
        _check_labels(y, self.num_classes)
        weights = (1.0 - severity) + severity * np.asarray(self.params["weights"], dtype=float)
        keep_probability = weights / weights.max()
        keep = self._uniform(ids, split) < keep_probability[y]
        return x, y, keep

    # -- counter-based randomness --------------------------------------------------------------

    def _stream(self, split: str) -> np.uint64:
        return np.uint64(derive_seed(self.seed, self.type, split))

    def _normal(self, ids: np.ndarray, split: str, size: int) -> np.ndarray:
        """Standard normals, (n, size) float32, a function of (seed, type, split, id, feature)."""
        pairs = (size + 1) // 2
        rows = _hash(self._stream(split) ^ _hash(ids.astype(np.uint64)))
        columns = _hash(np.arange(pairs, dtype=np.uint64) + np.uint64(0x632BE59BD9B4E019))
        bits = _hash(rows[:, None] ^ columns[None, :])
        # Box-Muller on two 24-bit halves of one hash (exact in float32; u1 in (0, 1] keeps the
        # log finite), giving a cos/sin pair of normals for features 2j and 2j + 1.
        radius = ((bits >> np.uint64(40)).astype(np.float32) + 1) * np.float32(2.0**-24)
        angle = (bits & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2 * np.pi * 2.0**-24)
        del bits
        np.log(radius, out=radius)
        radius *= -2
        np.sqrt(radius, out=radius)
        normal = np.empty((len(ids), 2 * pairs), dtype=np.float32)
        np.multiply(radius, np.cos(angle), out=normal[:, 0::2])
        np.multiply(radius, np.sin(angle), out=normal[:, 1::2])
        return normal[:, :size]

    def _uniform(self, ids: np.ndarray, split: str) -> np.ndarray:
        """One uniform in [0, 1) per sample, a function of (seed, type, split, id) only."""
        bits = _hash(self._stream(split) ^ _hash(np.asarray(ids).astype(np.uint64)))
        return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


_APPLY: dict[str, Callable[..., _Batch]] = {
    "label_swap": Drift._label_swap,
    "label_permutation": Drift._label_permutation,
    "rotation": Drift._rotation,
    "feature_permutation": Drift._feature_permutation,
    "noise": Drift._noise,
    "prior_shift": Drift._prior_shift,
}


def _hash(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise, into a fresh uint64 array (it relies on wrapping)."""
    z = np.array(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def _check_labels(y: np.ndarray, num_classes: int) -> None:
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be integers in 0..{num_classes - 1}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def make_drift(
    type: str,
    params: Mapping[str, Any] | None,
    *,
    seed: int,
    num_classes: int,
    input_shape: Sequence[int],
) -> Drift:
    """Validate `params` for drift `type` and build the `Drift`.

    Parameters per type (all optional except ``pairs``):

    - ``label_swap``: ``pairs`` — ``[[a, b], ...]``, distinct classes, none in two pairs.
    - ``label_permutation``: ``permutation`` — a permutation of ``range(num_classes)``; omitted,
      one is drawn from `seed` (and recorded in ``params``).
    - ``rotation``: ``degrees`` (default 90) — image inputs only, shape ``(C, H, W)`` or ``(H, W)``.
    - ``feature_permutation``: no parameters; the permutation is drawn from `seed`.
    - ``noise``: ``std`` (default 0.5) — additive Gaussian noise, std ≥ 0.
    - ``prior_shift``: ``weights`` — ``{class: w}`` (missing classes weigh 1) or a list of
      `num_classes` weights; non-negative, finite, not all zero.

    Raises a one-line `ConfigError` naming the type or parameter and the valid choices for an
    unknown type, an unknown or missing parameter, a class out of range or a wrong input shape.
    """
    if type not in DRIFT_TYPES:
        raise ConfigError(f"unknown drift type {type!r}; valid types: {', '.join(DRIFT_TYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise ConfigError(f"drift seed must be an integer, got {seed!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise ConfigError(f"drift num_classes must be an integer >= 1, got {num_classes!r}")
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else None
    if not shape or not all(
        isinstance(d, Integral) and not isinstance(d, bool) and d >= 1 for d in shape
    ):
        raise ConfigError(
            f"drift input_shape must be a non-empty list of positive integers, got {input_shape!r}"
        )
    shape = tuple(int(d) for d in shape)
    params = dict(params or {})
    valid = _PARAMS[type]
    for key in params:
        if key not in valid:
            choices = ", ".join(valid) if valid else "none"
            raise ConfigError(
                f"drift {type!r}: unknown parameter {key!r}; valid parameters: {choices}"
            )
    normal = _NORMALISE[type](params, num_classes=int(num_classes), input_shape=shape, seed=seed)
    return Drift(
        type=type, params=normal, seed=int(seed), num_classes=int(num_classes), input_shape=shape
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _real(type: str, name: str, value: Any, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"drift {type!r}: {name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"drift {type!r}: {name} must be >= {minimum}, got {value!r}")
    return float(value)


def _normalise_label_swap(
    params: dict[str, Any], *, num_classes: int, input_shape: tuple[int, ...], seed: int
) -> dict[str, Any]:
    if "pairs" not in params:
        raise ConfigError("drift 'label_swap': missing parameter 'pairs' (e.g. [[1, 2], [3, 4]])")
    pairs = params["pairs"]
    expect = f"pairs must be a non-empty list of [a, b] with classes in 0..{num_classes - 1}"
    if not isinstance(pairs, Sequence) or isinstance(pairs, str) or not pairs:
        raise ConfigError(f"drift 'label_swap': {expect}, got {pairs!r}")
    seen: set[int] = set()
    normal = []
    for pair in pairs:
        if (
            not isinstance(pair, Sequence)
            or isinstance(pair, str)
            or len(pair) != 2
            or not all(_is_int(c) and 0 <= c < num_classes for c in pair)
        ):
            raise ConfigError(f"drift 'label_swap': {expect}, got pair {pair!r}")
        a, b = int(pair[0]), int(pair[1])
        if a == b or a in seen or b in seen:
            raise ConfigError(
                f"drift 'label_swap': pairs must swap two different classes and no class may be "
                f"in two pairs, got {pairs!r}"
            )
        seen.update((a, b))
        normal.append((a, b))
    return {"pairs": tuple(normal)}


def _normalise_label_permutation(
    params: dict[str, Any], *, num_classes: int, input_shape: tuple[int, ...], seed: int
) -> dict[str, Any]:
    if "permutation" not in params or params["permutation"] is None:
        order = derive_rng(seed, "label_permutation").permutation(num_classes)
        return {"permutation": tuple(int(c) for c in order)}
    permutation = params["permutation"]
    if (
        not isinstance(permutation, Sequence)
        or isinstance(permutation, str)
        or not all(_is_int(c) for c in permutation)
        or sorted(permutation) != list(range(num_classes))
    ):
        raise ConfigError(
            f"drift 'label_permutation': permutation must list each class 0..{num_classes - 1} "
            f"exactly once, got {permutation!r}"
        )
    return {"permutation": tuple(int(c) for c in permutation)}


def _normalise_rotation(
    params: dict[str, Any], *, num_classes: int, input_shape: tuple[int, ...], seed: int
) -> dict[str, Any]:
    if len(input_shape) not in (2, 3):
        raise ConfigError(
            f"drift 'rotation' needs image inputs of shape (C, H, W) or (H, W), got input_shape "
            f"{input_shape}; use 'feature_permutation' or 'noise' for non-image inputs"
        )
    return {"degrees": _real("rotation", "degrees", params.get("degrees", 90.0))}


def _normalise_feature_permutation(
    params: dict[str, Any], *, num_classes: int, input_shape: tuple[int, ...], seed: int
) -> dict[str, Any]:
    return {}


def _normalise_noise(
    params: dict[str, Any], *, num_classes: int, input_shape: tuple[int, ...], seed: int
) -> dict[str, Any]:
    return {"std": _real("noise", "std", params.get("std", 0.5), minimum=0.0)}


def _normalise_prior_shift(
    params: dict[str, Any], *, num_classes: int, input_shape: tuple[int, ...], seed: int
) -> dict[str, Any]:
    if "weights" not in params:
        raise ConfigError(
            "drift 'prior_shift': missing parameter 'weights' ({class: weight} or a list of "
            f"{num_classes} weights)"
        )
    weights = params["weights"]
    if isinstance(weights, Mapping):
        normal = [1.0] * num_classes
        for key, value in weights.items():
            label = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if not _is_int(label) or not 0 <= label < num_classes:
                raise ConfigError(
                    f"drift 'prior_shift': weights key {key!r} is not a class in "
                    f"0..{num_classes - 1}"
                )
            normal[int(label)] = _real("prior_shift", f"weights[{key!r}]", value, minimum=0.0)
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        if len(weights) != num_classes:
            raise ConfigError(
                f"drift 'prior_shift': weights must have one entry per class ({num_classes}), "
                f"got {len(weights)}"
            )
        normal = [
            _real("prior_shift", f"weights[{i}]", w, minimum=0.0) for i, w in enumerate(weights)
        ]
    else:
        raise ConfigError(
            f"drift 'prior_shift': weights must be a {{class: weight}} mapping or a list of "
            f"{num_classes} weights, got {weights!r}"
        )
    if max(normal) <= 0.0:
        raise ConfigError("drift 'prior_shift': weights must not all be zero")
    return {"weights": tuple(normal)}


_NORMALISE: dict[str, Callable[..., dict[str, Any]]] = {
    "label_swap": _normalise_label_swap,
    "label_permutation": _normalise_label_permutation,
    "rotation": _normalise_rotation,
    "feature_permutation": _normalise_feature_permutation,
    "noise": _normalise_noise,
    "prior_shift": _normalise_prior_shift,
}
