"""Property: FOT's projection P(G) = G (I - U U^T) of a layer update onto the complement of the
old tasks' input subspace is idempotent, orthogonal to the basis, and removes only components in
the basis's span, for linear and convolutional weight shapes."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedcl.strategies.fot.math import project_update


@st.composite
def updates_and_bases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    out = draw(st.integers(1, 6))
    input_shape = draw(st.sampled_from([(7,), (3, 3), (2, 2, 2)]))  # linear, conv1d, conv2d
    d = int(np.prod(input_shape))
    k = draw(st.integers(0, d))
    basis, _ = np.linalg.qr(rng.normal(size=(d, max(k, 1))))
    update = rng.normal(scale=draw(st.sampled_from([1e-3, 1.0, 1e2])), size=(out, *input_shape))
    return torch.from_numpy(update), torch.from_numpy(basis[:, :k].copy())


@given(updates_and_bases())
def test_the_projection_is_idempotent_and_orthogonal_to_the_basis(
    case: tuple[torch.Tensor, torch.Tensor],
) -> None:
    update, basis = case
    projected = project_update(update, basis)
    assert projected.shape == update.shape
    scale = float(update.abs().max()) + 1e-30
    twice = project_update(projected, basis)
    torch.testing.assert_close(twice, projected, rtol=0, atol=1e-12 * scale)
    flat = projected.reshape(update.shape[0], -1)
    # no component left along any basis vector: old-task inputs see no change
    torch.testing.assert_close(
        flat @ basis,
        torch.zeros(flat.shape[0], basis.shape[1], dtype=flat.dtype),
        rtol=0,
        atol=1e-12 * scale,
    )
    # what was removed lies in the span of the basis
    removed = update.reshape(update.shape[0], -1) - flat
    torch.testing.assert_close(removed @ basis @ basis.T, removed, rtol=0, atol=1e-12 * scale)
    if basis.shape[1] == 0:
        assert projected is update  # an empty basis leaves the update as it is
