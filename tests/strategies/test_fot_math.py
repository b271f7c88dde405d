"""Properties of FOT's projection and Global Principal Subspace Extraction."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedcl.strategies.fot.math import (
    activation_sketch,
    expand_basis,
    layer_inputs,
    mean_residual_ratio,
    project_update,
    random_projection,
)

ATOL = 1e-5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen(seed)))
    return q


def assert_orthonormal(basis: torch.Tensor) -> None:
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    torch.testing.assert_close(basis.T @ basis, eye, atol=ATOL, rtol=0)


def cos_principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the spans of orthonormal a and b."""
    return torch.linalg.svdvals(a.T.double() @ b.double())


def span_of(matrix: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, s > s[0] * 1e-10]


# ---------------------------------------------------------------- project_update

SHAPES = {"linear": (5, 12), "conv1d": (4, 3, 5), "conv2d": (4, 3, 3, 3)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_projected_update_is_orthogonal_to_basis(shape):
    update = torch.randn(shape, generator=gen(1))
    d = update[0].numel()
    basis = orthonormal(d, d // 3)
    projected = project_update(update, basis)
    assert projected.shape == update.shape
    assert torch.linalg.norm(projected.reshape(shape[0], -1) @ basis) < ATOL


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_projection_is_idempotent_and_keeps_complement(shape):
    update = torch.randn(shape, generator=gen(2))
    d = update[0].numel()
    basis = orthonormal(d, d // 2)
    once = project_update(update, basis)
    torch.testing.assert_close(project_update(once, basis), once, atol=ATOL, rtol=0)
    # once already lies in the complement, so any such update passes unchanged.
    in_complement = 3.0 * once
    torch.testing.assert_close(
        project_update(in_complement, basis), in_complement, atol=ATOL, rtol=0
    )


def test_projection_removes_exactly_the_component_in_the_span():
    basis = orthonormal(12, 4)
    inside = torch.randn(5, 4, generator=gen(3)) @ basis.T
    assert torch.linalg.norm(project_update(inside, basis)) < ATOL


def test_no_basis_leaves_update_unchanged():
    update = torch.randn(4, 6, generator=gen(4))
    assert project_update(update, None) is update
    assert project_update(update, torch.zeros(6, 0)) is update


def test_projection_rejects_a_basis_of_the_wrong_width():
    with pytest.raises(ValueError, match="needs 27 rows"):
        project_update(torch.randn(4, 3, 3, 3), orthonormal(12, 2))


# ---------------------------------------------------------------- layer_inputs


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1, dilation=1)
        self.conv_dilated = nn.Conv2d(4, 2, kernel_size=2, dilation=2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(2 * 2 * 2, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.conv_dilated(h))
        return self.fc(self.drop(h.flatten(1)))


def test_conv_inputs_match_manual_unfold_and_reproduce_the_layer():
    torch.manual_seed(0)
    model = SmallNet()
    x = torch.randn(3, 3, 8, 8)
    a = layer_inputs(model, x, ["conv", "conv_dilated", "fc"])

    manual = F.unfold(x, 3, stride=2, padding=1)  # (batch, 27, positions)
    manual = torch.cat(list(manual), dim=1)  # columns batch-major
    torch.testing.assert_close(a["conv"], manual)
    assert a["conv"].shape == (27, 3 * 16)

    # W (out, d) @ A (+ bias) is the layer's output, column for column.
    for name, module in [("conv", model.conv), ("conv_dilated", model.conv_dilated)]:
        with torch.no_grad():
            conv_in = x if name == "conv" else torch.relu(model.conv(x))
            out = module(conv_in)  # (batch, out, h, w)
        expected = out.permute(1, 0, 2, 3).reshape(out.shape[1], -1)
        w = module.weight.detach().reshape(module.out_channels, -1)
        got = w @ a[name] + module.bias.detach()[:, None]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def test_linear_inputs_are_transposed_inputs_in_eval_mode_and_mode_is_restored():
    torch.manual_seed(0)
    model = SmallNet().train()
    x = torch.randn(4, 3, 8, 8)
    a = layer_inputs(model, x, ["fc"])
    with torch.no_grad():
        h = torch.relu(model.conv_dilated(torch.relu(model.conv(x)))).flatten(1)
    torch.testing.assert_close(a["fc"], h.T)  # no dropout applied
    assert model.training


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, kernel_size=3, stride=2, padding=2, dilation=2),
        nn.Conv1d(3, 4, kernel_size=4, padding="same", padding_mode="circular"),
        nn.Conv2d(3, 4, kernel_size=3, padding="same", padding_mode="reflect"),
    ],
    ids=["conv1d", "conv1d-same-circular", "conv2d-same-reflect"],
)
def test_conv_inputs_reproduce_the_layer_with_any_padding(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *([9] if isinstance(conv, nn.Conv1d) else [7, 7]))
    a = layer_inputs(nn.Sequential(conv), x, ["0"])["0"]
    with torch.no_grad():
        out = conv(x)
    expected = out.transpose(0, 1).reshape(out.shape[1], -1)
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    torch.testing.assert_close(w @ a + conv.bias.detach()[:, None], expected, atol=ATOL, rtol=1e-5)


def test_layer_inputs_rejects_unknown_or_unsupported_modules():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no module named"):
        layer_inputs(model, torch.randn(2, 3), ["0.weight"])
    with pytest.raises(ValueError, match="ReLU"):
        layer_inputs(model, torch.randn(2, 3), ["1"])


# ---------------------------------------------------------------- client sketch


def test_random_projection_kinds_and_determinism():
    q = random_projection(50, 20, gen(5))
    assert q.shape == (50, 20) and q.min() >= -1 and q.max() < 1
    torch.testing.assert_close(q, random_projection(50, 20, gen(5)))
    g = random_projection(2000, 10, gen(6), kind="gaussian")
    assert abs(g.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="kind"):
        random_projection(3, 3, gen(), kind="rademacher")


def test_sketch_without_basis_is_a_times_q_with_ratio_one():
    a = torch.randn(6, 10, generator=gen(7))
    q = random_projection(10, 6, gen(8))
    sketch, ratio = activation_sketch(a, None, q)
    torch.testing.assert_close(sketch, a @ q)
    assert ratio == 1.0


def test_sketch_with_basis_uses_the_residual_and_the_unsquared_ratio():
    basis = orthonormal(6, 2)
    a = torch.randn(6, 10, generator=gen(9))
    q = random_projection(10, 6, gen(10), kind="gaussian")
    sketch, ratio = activation_sketch(a, basis, q)
    residual = a - basis @ basis.T @ a
    torch.testing.assert_close(sketch, residual @ q, atol=ATOL, rtol=1e-5)
    assert ratio == pytest.approx((residual.norm() / a.norm()).item(), rel=1e-5)
    assert torch.linalg.norm(basis.T @ sketch) < 1e-4


def test_mean_residual_ratio_is_sample_weighted():
    assert mean_residual_ratio([0.2, 0.8], [300, 100]) == pytest.approx(0.35)
    with pytest.raises(ValueError):
        mean_residual_ratio([0.5], [1, 2])


# ---------------------------------------------------------------- server expansion


def test_expanded_basis_is_orthonormal_and_contains_the_old_span():
    d = 10
    old = orthonormal(d, 3, seed=11)
    a = torch.randn(d, 40, generator=gen(12))
    sketch, ratio = activation_sketch(a, old, random_projection(40, d, gen(13)))
    new = expand_basis(old, sketch, ratio, threshold=0.9)
    assert 3 < new.shape[1] <= d
    assert_orthonormal(new)
    # Every old direction lies in the new span, and the old columns come back first.
    torch.testing.assert_close(new @ (new.T @ old), old, atol=ATOL, rtol=0)
    torch.testing.assert_close(new[:, :3], old, atol=ATOL, rtol=0)


def test_no_new_vectors_when_the_threshold_is_already_met():
    y = torch.randn(8, 8, generator=gen(14))
    empty = expand_basis(None, y, mean_ratio=1.0, threshold=0.0)  # ε' = 0
    assert empty.shape == (8, 0)
    old = orthonormal(8, 3)
    # r̄ = 0.05 ≤ 1 − ε: the old basis already covers ε, so ε' < 0.
    kept = expand_basis(old, y, mean_ratio=0.05, threshold=0.9)
    torch.testing.assert_close(kept, old)


def test_zero_sketch_adds_nothing():
    assert expand_basis(None, torch.zeros(5, 7), 1.0, 0.99).shape == (5, 0)


@pytest.mark.parametrize("threshold", [1.0, 0.999999])
def test_threshold_near_one_gives_full_rank(threshold):
    d = 8
    y = torch.randn(d, 4 * d, generator=gen(15))  # full row rank
    basis = expand_basis(None, y, mean_ratio=1.0, threshold=threshold)
    assert basis.shape == (d, d)
    assert_orthonormal(basis)


def test_never_more_than_d_columns():
    d = 6
    old = orthonormal(d, d - 1)
    # A sketch that was not projected off the old basis: only one direction is new.
    y = torch.randn(d, 3 * d, generator=gen(16))
    basis = expand_basis(old, y, mean_ratio=1.0, threshold=1.0)
    assert basis.shape == (d, d)
    assert_orthonormal(basis)


def client_activations(mixing: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return mixing @ torch.randn(mixing.shape[1], n, generator=gen(seed))


@pytest.mark.parametrize("threshold", [0.99999, 1.0])
def test_summed_sketches_recover_the_low_rank_activation_subspace(threshold):
    d, r = 12, 3
    mixing = torch.randn(d, r, generator=gen(17))
    sizes = [30, 50, 20]
    sketches, ratios = [], []
    for k, n in enumerate(sizes):
        a = client_activations(mixing, n, seed=100 + k)
        sketch, ratio = activation_sketch(a, None, random_projection(n, d, gen(200 + k)))
        sketches.append(sketch)
        ratios.append(ratio)
    y = torch.stack(sketches).sum(0)
    basis = expand_basis(None, y, mean_residual_ratio(ratios, sizes), threshold=threshold)
    assert basis.shape == (d, r)
    cosines = cos_principal_angles(basis, span_of(mixing))
    torch.testing.assert_close(cosines, torch.ones(r, dtype=torch.float64), atol=1e-5, rtol=0)


def test_summed_sketches_find_the_dominant_subspace_of_the_concatenation():
    d, r = 10, 2
    strong = torch.randn(d, r, generator=gen(18)) * 10
    acts = [
        client_activations(strong, n, 300 + k) + 0.1 * torch.randn(d, n, generator=gen(400 + k))
        for k, n in enumerate([60, 40, 80])
    ]
    projections = [
        random_projection(a.shape[1], 5 * d, gen(500 + k), "gaussian") for k, a in enumerate(acts)
    ]
    y = sum(activation_sketch(a, None, q)[0] for a, q in zip(acts, projections, strict=True))
    basis = expand_basis(None, y, mean_ratio=1.0, threshold=0.99)
    assert basis.shape == (d, r)
    top = torch.linalg.svd(torch.cat(acts, dim=1).double())[0][:, :r]
    assert cos_principal_angles(basis, top).min() > 0.995


def test_second_task_adds_only_new_directions():
    d = 12
    task1 = torch.randn(d, 2, generator=gen(19))
    task2 = torch.randn(d, 2, generator=gen(20))
    a1 = client_activations(task1, 40, 21)
    y1, r1 = activation_sketch(a1, None, random_projection(40, d, gen(22)))
    basis = expand_basis(None, y1, r1, threshold=0.99999)
    assert basis.shape == (d, 2)

    # Task 2 activations mix both subspaces; only task2's span is new.
    a2 = client_activations(torch.cat([task1, task2], dim=1), 40, 23)
    y2, r2 = activation_sketch(a2, basis, random_projection(40, d, gen(24)))
    assert 0 < r2 < 1
    basis = expand_basis(basis, y2, r2, threshold=0.99999)
    assert basis.shape == (d, 4)
    assert_orthonormal(basis)
    both = span_of(torch.cat([task1, task2], dim=1))
    torch.testing.assert_close(
        cos_principal_angles(basis, both), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # An update projected with this basis no longer moves either task's activations.
    update = project_update(torch.randn(7, d, generator=gen(25)), basis)
    assert torch.linalg.norm(update @ a1) < 1e-3 * a1.norm()
    assert torch.linalg.norm(update @ a2) < 1e-3 * a2.norm()


# ---------------------------------------------------------------- edges and messages


def test_mean_residual_ratio_edges_and_messages() -> None:
    assert mean_residual_ratio([0.3], [5]) == pytest.approx(0.3)  # one client
    assert mean_residual_ratio([0.4], [1]) == pytest.approx(0.4)
    assert mean_residual_ratio([0.5, 0.1], [0, 2]) == pytest.approx(0.1)  # a client without data
    cases = [
        (([0.5], [1, 2]), r"^1 ratios but 2 counts$"),
        (([], []), r"^mean_residual_ratio needs at least one client$"),
        (([0.5, 0.5], [1, -1]), r"^counts must be non-negative, got \[1, -1\]$"),
        (([0.5], [0]), r"^counts sum to zero$"),
    ]
    for (ratios, counts), message in cases:
        with pytest.raises(ValueError, match=message):
            mean_residual_ratio(ratios, counts)


def test_random_projection_sizes_and_generator() -> None:
    assert random_projection(1, 1, gen()).shape == (1, 1)
    for n, m in [(0, 3), (3, 0)]:
        with pytest.raises(
            ValueError, match=rf"^random_projection needs n >= 1 and m >= 1, got n={n}, m={m}$"
        ):
            random_projection(n, m, gen())
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # only the given generator may matter
        draws.append(random_projection(4, 3, gen(7), kind="gaussian"))
    torch.testing.assert_close(draws[0], draws[1], atol=0, rtol=0)


def test_project_update_refuses_a_vector_and_keeps_the_update_dtype() -> None:
    with pytest.raises(
        ValueError,
        match=r"^project_update needs a weight with an output and an input dimension, got shape "
        r"\(5,\)$",
    ):
        project_update(torch.ones(5), orthonormal(5, 2))
    basis = orthonormal(12, 3).double()
    projected = project_update(torch.randn(5, 12, generator=gen(2)), basis)
    assert projected.dtype == torch.float32
    assert torch.linalg.norm(projected @ basis.float()) < 1e-4


def test_activation_sketch_messages() -> None:
    a, q = torch.randn(6, 10, generator=gen(1)), random_projection(10, 4, gen(2))
    with pytest.raises(
        ValueError,
        match=r"^activation_sketch needs 2-D activations \(d, n\) and projection \(n, m\)$",
    ):
        activation_sketch(a[0], None, q)
    with pytest.raises(
        ValueError, match=r"^projection has 3 rows but activations have 10 columns$"
    ):
        activation_sketch(a, None, q[:3])
    with pytest.raises(
        ValueError, match=r"^basis shape \(5, 2\) does not fit activations with 6 rows$"
    ):
        activation_sketch(a, orthonormal(5, 2), q)


def test_activation_sketch_ratio_of_small_and_zero_activations_and_mixed_dtypes() -> None:
    basis = orthonormal(6, 2)
    a = 1e-3 * torch.randn(6, 10, generator=gen(3))  # ‖A‖_F < 1
    q = random_projection(10, 4, gen(4))
    _, ratio = activation_sketch(a, basis, q)
    residual = a - basis @ basis.T @ a
    assert ratio == pytest.approx((residual.norm() / a.norm()).item(), rel=1e-5)
    sketch, ratio = activation_sketch(torch.zeros(6, 10), basis, q)
    assert ratio == 0.0 and not sketch.any()
    sketch, _ = activation_sketch(a, basis.double(), q.double())  # float32 activations
    assert sketch.dtype == torch.float32
    torch.testing.assert_close(sketch, residual @ q, atol=1e-7, rtol=1e-4)


def test_expand_basis_messages() -> None:
    y = torch.randn(6, 4, generator=gen(1))
    with pytest.raises(ValueError, match=r"^summed_sketch must be 2-D \(d, m\), got \(6,\)$"):
        expand_basis(None, y[:, 0], 1.0, 0.9)
    with pytest.raises(
        ValueError, match=r"^basis shape \(5, 2\) does not fit a sketch with 6 rows$"
    ):
        expand_basis(orthonormal(5, 2), y, 1.0, 0.9)
    with pytest.raises(ValueError, match=r"^threshold must be in \[0, 1\], got 1.5$"):
        expand_basis(None, y, 1.0, 1.5)


def test_expand_basis_edges() -> None:
    old = orthonormal(6, 2, seed=3)
    y = torch.randn(6, 4, generator=gen(1))
    # No residual energy left: the old basis, exactly.
    torch.testing.assert_close(expand_basis(old, y, 0.0, 0.9), old, atol=0, rtol=0)
    # A sketch of norm exactly 1 still gives its direction.
    e = torch.zeros(6, 1, dtype=torch.float64)
    e[2, 0] = 1.0
    torch.testing.assert_close(expand_basis(None, e, 1.0, 0.5).abs(), e)
    # A rank-1 sketch gives one direction even when every direction is asked for.
    v = torch.randn(5, 1, generator=gen(4), dtype=torch.float64)
    rank_one = v @ torch.randn(1, 3, generator=gen(5), dtype=torch.float64)
    basis = expand_basis(None, rank_one, 1.0, 1.0)
    assert basis.shape == (5, 1)
    torch.testing.assert_close((basis.T @ v).abs().item(), v.norm().item(), atol=1e-12, rtol=0)


def test_expand_basis_keeps_the_old_columns_and_drops_directions_inside_their_span() -> None:
    old, _ = torch.linalg.qr(torch.randn(8, 3, generator=gen(5), dtype=torch.float64))
    old = old * torch.sign(old[0])  # a QR of [old, new] would flip the first column's sign
    inside = old @ torch.randn(3, 4, generator=gen(6), dtype=torch.float64)
    # Not residual sketches: all of it, or all but 1e-10 of it, lies in the old span: nothing new.
    w = torch.randn(8, 1, generator=gen(7), dtype=torch.float64)
    w = w - old @ (old.T @ w)
    nearly = old[:, :1] + 1e-10 * w / w.norm()
    for sketch in (inside, nearly):
        torch.testing.assert_close(expand_basis(old, sketch, 1.0, 1.0), old, atol=1e-12, rtol=0)
    grown = expand_basis(old, torch.randn(8, 2, generator=gen(8), dtype=torch.float64), 1.0, 1.0)
    assert grown.shape == (8, 5)
    torch.testing.assert_close(grown[:, :3], old, atol=1e-12, rtol=0)  # the same columns


def test_layer_inputs_messages_and_a_layer_called_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.shared(x))

    model = Twice()
    x = torch.randn(4, 3, generator=gen(1))
    a = layer_inputs(model, x, ["shared"])["shared"]
    with torch.no_grad():
        torch.testing.assert_close(a, torch.cat([x.T, model.shared(x).T], dim=1))
    with pytest.raises(
        ValueError, match=r"^layer_inputs: module 'unused' was not called by the forward$"
    ):
        layer_inputs(model, x, ["unused"])
    relu = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"is ReLU; supported are Linear, Conv1d and Conv2d$"):
        layer_inputs(relu, x, ["1"])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(
        ValueError, match=r"^layer_inputs supports convolutions with groups=1 only, got groups=2$"
    ):
        layer_inputs(grouped, torch.randn(1, 4, 5, 5), ["0"])


def test_linear_inputs_with_extra_leading_dimensions() -> None:
    x = torch.randn(2, 5, 3, generator=gen(2))
    a = layer_inputs(nn.Sequential(nn.Linear(3, 4)), x, ["0"])["0"]
    torch.testing.assert_close(a, x.reshape(10, 3).T)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, kernel_size=3, padding="same"),
        nn.Conv2d(3, 4, kernel_size=3, padding=1, padding_mode="reflect"),
        nn.Conv1d(3, 4, kernel_size=3, padding=1, padding_mode="replicate"),
    ],
    ids=["conv2d-same-zeros", "conv2d-reflect-1", "conv1d-replicate-1"],
)
def test_conv_inputs_reproduce_the_layer_with_other_paddings(conv: nn.Module) -> None:
    test_conv_inputs_reproduce_the_layer_with_any_padding(conv)
