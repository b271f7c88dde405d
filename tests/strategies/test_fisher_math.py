"""Diagonal Fisher estimates against explicit loops, and the Fisher-weighted merge."""

import numpy as np
import pytest
import torch
from torch import nn

from fedcl.strategies.fisher.math import diagonal_fisher, fisher_merge


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 4)


def tiny_data(n: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


def loop_fisher(model: nn.Module, x: torch.Tensor, labels_and_weights) -> dict:
    """Σ_n Σ_(y, w) w (∂ log p(y | x_n) / ∂θ)² / N with one autograd call per example and label."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for n in range(x.shape[0]):
        log_probs = torch.log_softmax(model(x[n : n + 1]), dim=-1)[0]
        for label, weight in labels_and_weights(n, log_probs.detach().exp()):
            grads = torch.autograd.grad(log_probs[label], list(params.values()), retain_graph=True)
            for name, g in zip(params, grads, strict=True):
                fisher[name] += weight * g**2
    return {name: f / x.shape[0] for name, f in fisher.items()}


def assert_fishers_close(got: dict, expected: dict, **tol) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name].shape == expected[name].shape
        torch.testing.assert_close(got[name], expected[name], **tol)


def test_expected_fisher_matches_the_loop_over_examples_and_labels():
    model, (x, _) = tiny_model(), tiny_data()
    expected = loop_fisher(model, x, lambda n, p: [(c, p[c]) for c in range(4)])
    got = diagonal_fisher(model, x, mode="expected", batch_size=3)  # several batches
    assert_fishers_close(got, expected, atol=1e-7, rtol=1e-5)


def test_empirical_fisher_matches_the_loop_with_true_labels():
    model, (x, y) = tiny_model(), tiny_data()
    expected = loop_fisher(model, x, lambda n, p: [(int(y[n]), 1.0)])
    assert_fishers_close(diagonal_fisher(model, x, y, mode="empirical"), expected)


def test_num_examples_uses_the_first_examples_only():
    model, (x, y) = tiny_model(), tiny_data()
    expected = loop_fisher(model, x[:4], lambda n, p: [(int(y[n]), 1.0)])
    got = diagonal_fisher(model, x, y, mode="empirical", num_examples=4)
    assert_fishers_close(got, expected)


def test_sampled_fisher_approaches_expected_with_many_draws():
    model, (x, _) = tiny_model(), tiny_data()
    expected = diagonal_fisher(model, x, mode="expected")
    many = x.repeat(600, 1)  # 600 label draws per example
    sampled = diagonal_fisher(
        model, many, mode="sampled", generator=torch.Generator().manual_seed(0), batch_size=1024
    )
    for name in expected:
        error = torch.linalg.norm(sampled[name] - expected[name])
        assert error < 0.1 * torch.linalg.norm(expected[name]), name


def test_empirical_mode_needs_labels_and_unknown_modes_are_refused():
    model, (x, _) = tiny_model(), tiny_data()
    with pytest.raises(ValueError, match="true labels"):
        diagonal_fisher(model, x, mode="empirical")
    with pytest.raises(ValueError, match="mode"):
        diagonal_fisher(model, x, mode="observed")


def test_eval_mode_during_the_computation_and_frozen_parameters_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 4))
    model[0].bias.requires_grad_(False)
    model.train()
    x, y = tiny_data()
    got = diagonal_fisher(model, x, y, mode="empirical")
    assert model.training
    assert set(got) == {"0.weight", "3.weight", "3.bias"}
    model.eval()
    expected = loop_fisher(model, x, lambda n, p: [(int(y[n]), 1.0)])
    assert_fishers_close(got, expected)


def test_conv_model_with_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    model(torch.randn(8, 1, 6, 6))  # move the running statistics off their defaults
    x = torch.randn(5, 1, 6, 6)
    model.eval()
    expected = loop_fisher(model, x, lambda n, p: [(c, p[c]) for c in range(3)])
    model.train()
    assert_fishers_close(diagonal_fisher(model, x), expected, atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------- fisher_merge


def random_model(seed: int, shapes=((3, 2), (4,))):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def test_equal_fishers_give_the_weighted_average():
    params = [random_model(k) for k in range(3)]
    fisher = [np.full(p.shape, 0.7, dtype=np.float32) for p in params[0]]
    weights = [10, 30, 60]
    merged = fisher_merge(params, [fisher] * 3, weights)
    for j in range(2):
        expected = sum(
            w / 100 * p[j].astype(np.float64) for w, p in zip(weights, params, strict=True)
        )
        assert merged[j].dtype == np.float32 and merged[j].shape == params[0][j].shape
        np.testing.assert_allclose(merged[j], expected, rtol=1e-6, atol=1e-7)


def test_a_coordinate_only_one_client_cares_about_takes_its_value():
    params = [random_model(k) for k in range(3)]
    fishers = [[np.zeros_like(p) for p in params[0]] for _ in range(3)]
    fishers[1][0][2, 1] = 1.0
    floor = 1e-6
    merged = fisher_merge(params, fishers, [1, 1, 1], floor=floor)
    values = np.array([p[0][2, 1] for p in params], dtype=np.float64)
    # θ* − θ_1 = Σ_{k≠1} floor (θ_k − θ_1) / (1 + 2 floor) with equal λ.
    bound = floor * np.abs(values - values[1]).sum()
    assert abs(merged[0][2, 1] - values[1]) <= bound + 1e-7
    # Where every Fisher is at the floor, the merge is the plain average.
    np.testing.assert_allclose(merged[1], np.mean([p[1] for p in params], axis=0), rtol=1e-6)


def test_huge_prior_keeps_the_old_value_and_zero_prior_is_ignored():
    params = [random_model(k) for k in range(2)]
    fishers = [[np.ones_like(p) for p in params[0]] for _ in range(2)]
    old = random_model(9)
    huge = [np.full_like(p, 1e9) for p in old]
    merged = fisher_merge(params, fishers, [1, 1], prior=(old, huge, 1.0))
    for got, want in zip(merged, old, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    without = fisher_merge(params, fishers, [1, 1])
    with_zero = fisher_merge(params, fishers, [1, 1], prior=(old, huge, 0.0))
    for a, b in zip(without, with_zero, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prior_is_one_more_fisher_weighted_model():
    params = [random_model(k) for k in range(2)]
    fishers = [[np.abs(p) + 0.1 for p in random_model(10 + k)] for k in range(2)]
    old, old_fisher = random_model(20), [np.abs(p) for p in random_model(21)]
    merged = fisher_merge(params, fishers, [1, 3], prior=(old, old_fisher, 2.0))
    for j in range(2):
        num = 0.25 * fishers[0][j] * params[0][j] + 0.75 * fishers[1][j] * params[1][j]
        den = 0.25 * fishers[0][j] + 0.75 * fishers[1][j]
        num, den = num + 2.0 * old_fisher[j] * old[j], den + 2.0 * old_fisher[j]
        np.testing.assert_allclose(merged[j], num / den, rtol=1e-5)


def test_shape_mismatches_are_named():
    params = [random_model(0), random_model(1)]
    fishers = [[np.ones_like(p) for p in params[0]] for _ in range(2)]
    bad = [fishers[0], [fishers[1][0], np.ones(5)]]
    with pytest.raises(ValueError, match=r"client 1 fisher tensor 1 has shape \(5,\)"):
        fisher_merge(params, bad, [1, 1])
    with pytest.raises(ValueError, match="client 1 params has 1 tensors"):
        fisher_merge([params[0], params[1][:1]], fishers, [1, 1])
    with pytest.raises(ValueError, match="2 fishers and 3 weights"):
        fisher_merge(params, fishers, [1, 1, 1])
    with pytest.raises(ValueError, match="prior fisher tensor 0"):
        fisher_merge(params, fishers, [1, 1], prior=(params[0], [np.ones(2), np.ones(4)], 1.0))
    with pytest.raises(ValueError, match="negative"):
        fisher_merge(params, [fishers[0], [-f for f in fishers[1]]], [1, 1])


def test_diagonal_fisher_validation_messages() -> None:
    model, (x, y) = tiny_model(), tiny_data()
    cases = [
        ({"y": y[:3]}, r"^x has 7 examples but y has 3$"),
        ({"batch_size": 0}, r"^batch_size must be at least 1, got 0$"),
        ({"num_examples": 0}, r"^num_examples must be at least 1, got 0$"),
        ({"mode": "empirical"}, r'^mode "empirical" needs the true labels y$'),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            diagonal_fisher(model, x, **kwargs)
    with pytest.raises(ValueError, match=r"^diagonal_fisher needs at least one example$"):
        diagonal_fisher(model, x[:0])
    three_d = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (1, 4)))
    with pytest.raises(
        ValueError, match=r"^model must return logits \(batch, num_classes\), got \(7, 1, 4\)$"
    ):
        diagonal_fisher(three_d, x)


def test_one_example_at_a_time_and_a_single_example() -> None:
    model, (x, y) = tiny_model(), tiny_data()
    expected = loop_fisher(model, x, lambda n, p: [(int(y[n]), 1.0)])
    assert_fishers_close(diagonal_fisher(model, x, y, mode="empirical", batch_size=1), expected)
    first = loop_fisher(model, x[:1], lambda n, p: [(c, p[c]) for c in range(4)])
    assert_fishers_close(diagonal_fisher(model, x, num_examples=1), first, atol=1e-7, rtol=1e-5)


def test_sampled_fisher_draws_from_the_given_generator_only() -> None:
    model, (x, _) = tiny_model(), tiny_data()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the global generator differs between the runs
        generator = torch.Generator().manual_seed(3)
        runs.append(diagonal_fisher(model, x, mode="sampled", generator=generator))
    assert_fishers_close(runs[0], runs[1], atol=0, rtol=0)


def test_a_float64_model_and_int32_labels() -> None:
    model, (x, y) = tiny_model().double(), tiny_data()
    x = x.double()
    for mode in ("sampled", "empirical"):
        fisher = diagonal_fisher(model, x, y.to(torch.int32), mode=mode)
        assert all(f.dtype == torch.float64 for f in fisher.values())
    expected = loop_fisher(model, x, lambda n, p: [(int(y[n]), 1.0)])
    assert_fishers_close(diagonal_fisher(model, x, y.to(torch.int32), mode="empirical"), expected)


def test_fisher_merge_validation_messages() -> None:
    params = [[np.zeros(2)], [np.ones(2)]]
    fishers = [[np.ones(2)], [np.ones(2)]]
    with pytest.raises(ValueError, match=r"^fisher_merge needs at least one client$"):
        fisher_merge([], [], [])
    with pytest.raises(ValueError, match=r"^floor must be positive, got 0$"):
        fisher_merge(params, fishers, [1, 1], floor=0)
    for weights in ([2, -1], [np.inf, 1], [0, 0]):
        with pytest.raises(ValueError, match=r"^weights must be finite, non-negative and not all"):
            fisher_merge(params, fishers, weights)
    with pytest.raises(ValueError, match=r"^client 1 params tensor 0 has non-finite entries$"):
        fisher_merge([params[0], [np.array([0.0, np.nan])]], fishers, [1, 1])
    prior_cases = [
        (([np.zeros(2)], [np.ones(2)], -1.0), r"^prior weight gamma must be finite and non-neg"),
        (([np.zeros(3)], [np.ones(2)], 1.0), r"^prior params tensor 0 has shape \(3,\)"),
        (([np.zeros(2)], [-np.ones(2)], 1.0), r"^prior fisher tensor 0 has negative entries$"),
    ]
    for prior, message in prior_cases:
        with pytest.raises(ValueError, match=message):
            fisher_merge(params, fishers, [1, 1], prior=prior)


def test_fisher_merge_accepts_any_non_negative_weights() -> None:
    params = [[np.zeros(2)], [np.ones(2)]]
    fishers = [[np.ones(2)], [np.ones(2)]]
    np.testing.assert_allclose(fisher_merge(params, fishers, [1, 0])[0], [0.0, 0.0])
    np.testing.assert_allclose(fisher_merge(params, fishers, [0.25, 0.25])[0], [0.5, 0.5])
