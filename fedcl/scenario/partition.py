"""Split a dataset's samples among clients: IID, Dirichlet label skew, or label-sorted shards."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from fedcl.errors import ConfigError

__all__ = ["PARTITIONS", "partition_indices"]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")

# Dirichlet draws are redrawn whole while some client is under `min_per_client`; past this many
# tries a deterministic fix-up moves samples instead, so tiny alphas cannot loop for long.
_DIRICHLET_TRIES = 100


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_per_client: int = 1,
) -> list[np.ndarray]:
    """Assign every sample to exactly one client.

    Parameters
    ----------
    labels
        1-d integer labels; the returned indices are positions into this array.
    num_clients
        How many clients to split among (at least 1).
    scheme
        ``"iid"``: a random permutation cut into near-equal parts. ``"dirichlet"``: for each class,
        client proportions drawn from Dir(alpha·1) (Hsu et al., 2019); smaller alpha gives more
        label skew. ``"shards"``: samples sorted by label, cut into
        ``num_clients * shards_per_client`` contiguous shards, each client getting
        ``shards_per_client`` random shards (McMahan et al., 2017).
    rng
        The only source of randomness: the same generator state gives the same partition.
    alpha
        Dirichlet concentration (> 0); used by ``"dirichlet"`` only.
    shards_per_client
        Shards per client (>= 1); used by ``"shards"`` only.
    min_per_client
        Every client gets at least this many samples (>= 0). Dirichlet redraws up to a bounded
        number of times, then, like the other schemes, moves samples from the largest clients.

    Returns
    -------
    One sorted int64 array per client; the arrays are disjoint and together hold every position
    ``0 .. len(labels) - 1``.

    Raises
    ------
    ConfigError
        Unknown scheme, an option out of range, or fewer samples than
        ``num_clients * min_per_client``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise ConfigError(
            f"partition labels must be a 1-d integer array, got {labels.dtype} "
            f"of shape {labels.shape}"
        )
    if scheme not in PARTITIONS:
        raise ConfigError(
            f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(PARTITIONS)}"
        )
    _check_int("num_clients", num_clients, 1)
    _check_int("min_per_client", min_per_client, 0)
    if len(labels) < num_clients * min_per_client:
        raise ConfigError(
            f"cannot give {num_clients} clients at least {min_per_client} samples each from "
            f"{len(labels)} samples; lower num_clients or min_per_client"
        )
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    elif scheme == "dirichlet":
        if not isinstance(alpha, Real) or not (0 < alpha < math.inf):
            raise ConfigError(f"partition alpha must be a positive finite number, got {alpha!r}")
        parts = _dirichlet(labels, num_clients, float(alpha), min_per_client, rng)
    else:
        _check_int("shards_per_client", shards_per_client, 1)
        parts = _shards(labels, num_clients, shards_per_client, rng)
    parts = _ensure_min(parts, min_per_client)
    return [np.sort(part).astype(np.int64, copy=False) for part in parts]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"partition {name} must be an integer >= {minimum}, got {value!r}")


def _dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    min_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    concentration = np.full(num_clients, alpha)
    # Only the per-class cut points are redrawn; index arrays are built once for the kept draw.
    for _ in range(_DIRICHLET_TRIES):
        cuts = []
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in by_class:
            proportions = rng.dirichlet(concentration)
            cut = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            cuts.append(cut)
            sizes += np.diff(cut, prepend=0, append=len(members))
        if sizes.min() >= min_per_client:
            break
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members, cut in zip(by_class, cuts, strict=True):
        for client, chunk in enumerate(np.split(rng.permutation(members), cut)):
            parts[client].append(chunk)
    return [np.concatenate(chunks) if chunks else np.empty(0, np.int64) for chunks in parts]


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    shards = np.array_split(np.argsort(labels, kind="stable"), num_clients * shards_per_client)
    owner_of = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in owned]) for owned in owner_of]


def _ensure_min(parts: list[np.ndarray], min_per_client: int) -> list[np.ndarray]:
    """Top up clients below the minimum with samples taken from the end of the largest client.

    Deterministic, and always possible when the total is at least clients × minimum: while any
    client is short, the largest one holds more than the minimum.
    """
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    for client in np.flatnonzero(sizes < min_per_client):
        while sizes[client] < min_per_client:
            donor = int(np.argmax(sizes))
            give = int(min(min_per_client - sizes[client], sizes[donor] - min_per_client))
            parts[client] = np.concatenate([parts[client], parts[donor][-give:]])
            parts[donor] = parts[donor][:-give]
            sizes[client] += give
            sizes[donor] -= give
    return parts
