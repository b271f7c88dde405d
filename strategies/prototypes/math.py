"""Class-prototype math for Federated Reconnaissance (Hendryx et al., 2021).

A frozen encoder embeds examples; each class c is represented by its prototype p_c, the mean of
its n_c embeddings, and an input is classified by the nearest prototype in squared Euclidean
distance (Snell et al., 2017). Clients compute prototypes of their new classes; the server merges
them into the global model. Plain numpy, no Flower, no Ray.

The server merge here is exact: the merged prototype of a class is the mean of every embedding
any client contributed. The official ``FederatedProtoNet.merge_models`` is exact for classes new
to the server, but for a class the server already had (n_old > 0) it applies the online update
with the client's prototype, which already blends in the server's old one, weighted by the
client's new count k; that gives p_old + (k / (n_old + k))² (μ − p_old) instead of
p_old + k / (n_old + k) · (μ − p_old), shrinking toward the old prototype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class PrototypeBank:
    """Per-class embedding sums and counts; the prototypes are their quotient.

    The paper (and the official ``update_prototype_for_class``) keeps the mean itself and updates
    it online with West's (1979) formula, p_c ← p_c + k / (n_c + k) · (μ − p_c), n_c ← n_c + k,
    for a batch of k embeddings with mean μ. That is algebraically the same mean as
    p_c = s_c / n_c with s_c the sum of the class's embeddings (see ``running_mean_update``).
    Keeping sums instead makes merging exact and order-independent (sums and counts add), and
    makes removing a client's contribution (unlearning) an exact subtraction, neither of which
    the running mean gives. Sums are float64, so a bank and any sequence of running-mean updates
    agree to float64 tolerance.

    Instances are treated as immutable: every operation returns a new bank.

    Attributes
    ----------
    sums
        (num_classes, dim) float64, the sum of the embeddings of each class.
    counts
        (num_classes,) int64, the number of embeddings of each class.
    """

    sums: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        sums = np.asarray(self.sums, dtype=np.float64)
        counts = np.asarray(self.counts)
        if sums.ndim != 2:
            raise ValueError(f"sums must be (num_classes, dim), got shape {sums.shape}")
        if counts.shape != (sums.shape[0],):
            raise ValueError(
                f"counts must have shape ({sums.shape[0]},) to match sums, got {counts.shape}"
            )
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"counts must be integers, got dtype {counts.dtype}")
        if np.any(counts < 0):
            raise ValueError("counts must be non-negative")
        object.__setattr__(self, "sums", sums)
        object.__setattr__(self, "counts", counts.astype(np.int64))

    @property
    def num_classes(self) -> int:
        return self.sums.shape[0]

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    @classmethod
    def empty(cls, num_classes: int, dim: int) -> PrototypeBank:
        """A bank that knows no class: all sums 0, all counts 0."""
        return cls(np.zeros((num_classes, dim)), np.zeros(num_classes, dtype=np.int64))

    @classmethod
    def from_embeddings(
        cls, embeddings: np.ndarray, labels: np.ndarray, num_classes: int
    ) -> PrototypeBank:
        """The bank of one set of examples: s_c = Σ_{i: y_i = c} e_i, n_c = |{i: y_i = c}|.

        ``embeddings`` is (n, dim), ``labels`` (n,) integers in [0, num_classes).
        """
        embeddings = np.asarray(embeddings, dtype=np.float64)
        labels = np.asarray(labels)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (n, dim), got shape {embeddings.shape}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got {labels.min()} to {labels.max()}"
            )
        sums = np.zeros((num_classes, embeddings.shape[1]))
        np.add.at(sums, labels, embeddings)
        counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
        return cls(sums, counts)

    def _check_compatible(self, other: PrototypeBank) -> None:
        if self.sums.shape != other.sums.shape:
            raise ValueError(
                f"banks differ in shape: (num_classes, dim) {self.sums.shape} vs {other.sums.shape}"
            )

    def merged(self, other: PrototypeBank) -> PrototypeBank:
        """The bank of the union of both sets of examples: sums add, counts add."""
        self._check_compatible(other)
        return PrototypeBank(self.sums + other.sums, self.counts + other.counts)

    def without(self, other: PrototypeBank) -> PrototypeBank:
        """Exact removal of a contribution previously merged in: sums and counts subtract.

        Classes left with count 0 get sums of exactly 0 (no float residue), so they are unknown
        again.

        Raises
        ------
        ValueError
            If some class would go below zero count: ``other`` was not part of this bank.
        """
        self._check_compatible(other)
        counts = self.counts - other.counts
        if np.any(counts < 0):
            classes = np.flatnonzero(counts < 0).tolist()
            raise ValueError(f"cannot remove more examples than the bank holds (classes {classes})")
        sums = self.sums - other.sums
        sums[counts == 0] = 0.0
        return PrototypeBank(sums, counts)

    def prototypes(self) -> np.ndarray:
        """(num_classes, dim) float64 means p_c = s_c / n_c; NaN rows for classes with n_c = 0."""
        protos = np.full_like(self.sums, np.nan)
        known = self.counts > 0
        protos[known] = self.sums[known] / self.counts[known, None]
        return protos

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Nearest prototype: argmin_c ‖e − p_c‖² over the classes with n_c > 0.

        Returns the class indices (int64, shape (n,)); ties go to the lowest class index.

        Raises
        ------
        ValueError
            If no class is known or ``embeddings`` is not (n, dim).
        """
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (n, {self.dim}), got shape {embeddings.shape}")
        known = np.flatnonzero(self.counts > 0)
        if known.size == 0:
            raise ValueError("predict needs at least one class with a prototype")
        protos = self.sums[known] / self.counts[known, None]
        # ‖e − p‖² = ‖e‖² − 2 e·p + ‖p‖², without the (n, classes, dim) difference tensor.
        distances = (
            np.sum(embeddings**2, axis=1, keepdims=True)
            - 2.0 * embeddings @ protos.T
            + np.sum(protos**2, axis=1)
        )
        return known[np.argmin(distances, axis=1)].astype(np.int64)


def running_mean_update(
    proto: np.ndarray, count: int, batch_mean: np.ndarray, batch_count: int
) -> tuple[np.ndarray, int]:
    """The paper's online prototype update (West, 1979), as the official code does it.

        p ← p + k / (n + k) · (μ − p),    n ← n + k

    for a batch of k embeddings with mean μ added to a class with prototype p over n
    embeddings. A class without examples (n = 0) starts at p = μ. Returns (new p as float64,
    new n). Equals the mean of all n + k embeddings, i.e. ``PrototypeBank``'s prototype.
    """
    if count < 0 or batch_count < 0:
        raise ValueError(
            f"counts must be non-negative, got count={count}, batch_count={batch_count}"
        )
    batch_mean = np.asarray(batch_mean, dtype=np.float64)
    if batch_count == 0:
        return np.asarray(proto, dtype=np.float64), count
    if count == 0:
        return batch_mean.copy(), batch_count
    proto = np.asarray(proto, dtype=np.float64)
    new_count = count + batch_count
    return proto + (batch_count / new_count) * (batch_mean - proto), new_count
