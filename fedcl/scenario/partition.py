"""Split a dataset's samples among clients: IID, Dirichlet label skew, or label-sorted shards.

Every scheme is vectorized over clients: a million clients cost array operations, not a Python
loop per client. The result is packed CSR-style (`partition_packed`): one array of positions,
client after client, and one array of offsets, a few bytes per client.
"""

from __future__ import annotations

import heapq
import math
from numbers import Integral, Real

import numpy as np

from fedcl.errors import ConfigError

__all__ = ["PARTITIONS", "partition_indices", "partition_packed"]

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
    ``0 .. len(labels) - 1``. (Views into the arrays of `partition_packed`.)

    Raises
    ------
    ConfigError
        Unknown scheme, an option out of range, or fewer samples than
        ``num_clients * min_per_client``.
    """
    positions, offsets = partition_packed(
        labels,
        num_clients,
        scheme,
        rng,
        alpha=alpha,
        shards_per_client=shards_per_client,
        min_per_client=min_per_client,
    )
    return np.split(positions, offsets[1:-1])


def partition_packed(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_per_client: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """`partition_indices`, packed: ``(positions, offsets)``, client ``c`` holding the sorted
    ``positions[offsets[c]:offsets[c + 1]]``; both int64, ``offsets`` of length
    ``num_clients + 1``. The same arguments give the same split as `partition_indices`."""
    labels = np.asarray(labels)
    _check_arguments(labels, num_clients, scheme, min_per_client)
    if scheme == "iid":
        members, sizes = _iid(len(labels), num_clients, rng)
    elif scheme == "dirichlet":
        if not isinstance(alpha, Real) or not (0 < alpha < math.inf):
            raise ConfigError(f"partition alpha must be a positive finite number, got {alpha!r}")
        members, sizes = _dirichlet(labels, num_clients, float(alpha), min_per_client, rng)
    else:
        _check_int("shards_per_client", shards_per_client, 1)
        members, sizes = _shards(labels, num_clients, shards_per_client, rng)
    owners = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    _ensure_min(owners, sizes, min_per_client)
    return _pack(members, owners, num_clients)


def _check_arguments(labels: np.ndarray, num_clients: int, scheme: str, min_per_client: int):
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


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"partition {name} must be an integer >= {minimum}, got {value!r}")


# Each scheme returns (members, sizes): every client's positions in the order it drew them,
# client after client, and how many each client holds.


def _iid(
    num_samples: int, num_clients: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    # As np.array_split: the first `num_samples % num_clients` parts hold one sample more.
    base, extra = divmod(num_samples, num_clients)
    sizes = np.full(num_clients, base, dtype=np.int64)
    sizes[:extra] += 1
    return rng.permutation(num_samples), sizes


def _dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    min_per_client: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    concentration = np.full(num_clients, alpha)
    # Only the per-class cut points are redrawn; index arrays are built once for the kept draw.
    for _ in range(_DIRICHLET_TRIES):
        counts = []
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in by_class:
            proportions = rng.dirichlet(concentration)
            cut = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            counts.append(np.diff(cut, prepend=0, append=len(members)))
            sizes += counts[-1]
        if sizes.min() >= min_per_client:
            break
    # Client k takes the k-th chunk of each class's permutation, class after class.
    chunks = [rng.permutation(members) for members in by_class]
    owners = np.concatenate(
        [np.repeat(np.arange(num_clients), count) for count in counts] or [np.zeros(0, np.int64)]
    )
    members = np.concatenate(chunks or [np.zeros(0, np.int64)])
    return members[np.argsort(owners, kind="stable")], sizes


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    by_label = np.argsort(labels, kind="stable")
    # As np.array_split of `by_label` into equal shards, the first ones one sample longer.
    num_shards = num_clients * shards_per_client
    base, extra = divmod(len(labels), num_shards)
    shard_sizes = np.full(num_shards, base, dtype=np.int64)
    shard_sizes[:extra] += 1
    shard_starts = np.cumsum(shard_sizes) - shard_sizes
    owned = rng.permutation(num_shards)  # client c owns owned[c * spc : (c + 1) * spc], in order
    taken = shard_sizes[owned]
    return (
        by_label[_ranges(shard_starts[owned], taken)],
        taken.reshape(num_clients, shards_per_client).sum(axis=1),
    )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, without the loop."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def _ensure_min(owners: np.ndarray, sizes: np.ndarray, min_per_client: int) -> None:
    """Top up clients below the minimum with samples taken from the end of the largest client,
    in place: `owners` (each member's client, grouped by client) and `sizes`.

    Deterministic, and always possible when the total is at least clients × minimum: while any
    client is short, the largest one holds more than the minimum, so a client once topped up is
    never a donor. The largest client (lowest id on ties) is kept in a heap: no scan per client.
    """
    short = np.flatnonzero(sizes < min_per_client)
    if not len(short):
        return
    starts = np.cumsum(sizes) - sizes  # donors only shrink from their end: original ranks hold
    candidates = np.flatnonzero(sizes > min_per_client)
    donors = list(zip((-sizes[candidates]).tolist(), candidates.tolist(), strict=True))
    heapq.heapify(donors)
    for client in short:
        while sizes[client] < min_per_client:
            negative, donor = heapq.heappop(donors)
            give = int(min(min_per_client - sizes[client], -negative - min_per_client))
            stop = starts[donor] + sizes[donor]
            owners[stop - give : stop] = client
            sizes[client] += give
            sizes[donor] -= give
            if sizes[donor] > min_per_client:
                heapq.heappush(donors, (-int(sizes[donor]), donor))


def _pack(
    members: np.ndarray, owners: np.ndarray, num_clients: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions grouped by owner and sorted within each group, and the group offsets."""
    counts = np.bincount(owners, minlength=num_clients)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    span = max(len(members), 1)
    if num_clients * span < 2**62:  # one sort of (owner, position) keys: twice lexsort's speed
        return np.sort(owners * span + members) % span, offsets
    return members[np.lexsort((members, owners))].astype(np.int64, copy=False), offsets
