"""The Dirichlet split's sizes and skew follow Dir(alpha): near-equal clients at large alpha, and
at small alpha the per-class shares have the statistics of the Dirichlet draw (Hsu et al., 2019)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedcl.scenario.partition import partition_indices

CLIENTS = 10


def class_shares(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(classes, clients): the share of each class's samples each client holds."""
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts], axis=1)
    return counts / np.bincount(labels, minlength=num_classes)[:, None]


@pytest.mark.parametrize("seed", [0, 1])
def test_at_large_alpha_every_client_holds_about_n_over_k(seed: int) -> None:
    # 50 classes: a client's size sums 50 independent shares, so its spread (about 1.3 % of n/K
    # at alpha = 100) is far inside the 10 % bound whatever the seed
    labels = np.repeat(np.arange(50), 200)
    parts = partition_indices(
        labels, CLIENTS, "dirichlet", np.random.default_rng(seed), alpha=100.0
    )
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == len(labels)
    fair = len(labels) / CLIENTS
    assert np.all(np.abs(sizes - fair) <= 0.1 * fair), sizes
    # and each class is split evenly too: a share of about 1/K of every class per client
    shares = class_shares(labels, parts, 50)
    assert np.all(np.abs(shares - 1 / CLIENTS) <= 0.05), shares


def test_at_small_alpha_the_skew_matches_the_dirichlet_draw() -> None:
    alpha, num_classes = 0.1, 200
    labels = np.repeat(np.arange(num_classes), 200)
    parts = partition_indices(labels, CLIENTS, "dirichlet", np.random.default_rng(0), alpha=alpha)
    shares = class_shares(labels, parts, num_classes)
    # For p ~ Dir(alpha 1_K): E[sum_k p_k^2] = (alpha + 1) / (K alpha + 1) = 0.55 here, against
    # 0.1 for an even split: each class sits mostly with a few clients.
    herfindahl = (shares**2).sum(axis=1).mean()
    assert herfindahl == pytest.approx((alpha + 1) / (CLIENTS * alpha + 1), abs=0.05)
    # each share is Beta(alpha, (K - 1) alpha): its tail, and its mean 1/K for every client
    tail = (shares > 0.5).mean()
    assert tail == pytest.approx(stats.beta.sf(0.5, alpha, (CLIENTS - 1) * alpha), abs=0.03)
    assert np.all(np.abs(shares.mean(axis=0) - 1 / CLIENTS) <= 0.05), shares.mean(axis=0)
