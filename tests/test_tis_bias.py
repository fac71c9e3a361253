"""bench/tis_bias.py's exact enumeration: the sequence IS estimator is unbiased, token TIS is biased exactly when the
sampler differs from the trainer, and its bias grows with the horizon. Small cases only (V = 3, T <= 5): seconds."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import tis_bias  # noqa: E402


def test_the_enumeration_covers_every_sequence_once_and_mu_sums_to_one():
    """V^T distinct sequences, and both policies' sequence probabilities sum to 1 over them."""
    seqs = tis_bias.sequences(3, 4)
    assert seqs.shape == (81, 4) and len({tuple(s) for s in seqs.tolist()}) == 81
    for kind in tis_bias.CONTEXTS:
        theta, eps = tis_bias.random_policy(3, tis_bias.num_contexts(3, 4, kind), seed=0)
        sampler = tis_bias.sampler_logits(theta, eps, 0.1)
        ctx = tis_bias.contexts(seqs, 3, kind)
        for logits in (theta, sampler):
            assert logits.log_softmax(-1)[ctx, seqs].sum(-1).exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_the_sampler_is_at_exactly_the_asked_total_variation():
    """Delta is the largest per-context TV between pi and mu, hit by the bisection to float64 rounding."""
    theta, eps = tis_bias.random_policy(3, 4, seed=1, stickiness=3.0)
    for delta in (0.001, 0.05, 0.3):
        sampler = tis_bias.sampler_logits(theta, eps, delta)
        assert tis_bias.total_variation(theta, sampler).max().item() == pytest.approx(delta, abs=1e-12)


@pytest.mark.parametrize("context", tis_bias.CONTEXTS)
def test_sequence_is_is_exactly_unbiased(context):
    """E_mu[(prod_t rho_t) R sum_t grad log pi] equals grad E_pi[R] (autograd on the exact sum) within 1e-10."""
    for seed in (0, 1):
        result = tis_bias.one_case(3, 5, 0.2, seed, context, cap=2.0, stickiness=3.0 * seed)
        for reward_name, r in result.items():
            assert r["estimators"]["sequence"]["max_abs_diff"] < 1e-10, (reward_name, r)
            assert r["estimators"]["sequence"]["relative_bias"] < 1e-10


def test_token_tis_is_biased_when_mu_differs_and_exact_when_it_does_not():
    """Relative bias clearly above 0 at Delta > 0 for token IS, token TIS and no correction; at Delta = 0 every
    weight is 1, all estimators are REINFORCE and the bias is 0 to float64 rounding."""
    for delta in (0.01, 0.1):
        for reward_name, r in tis_bias.one_case(3, 4, delta, 0, "previous", cap=2.0).items():
            for estimator in ("token", "token_tis", "none"):
                assert r["estimators"][estimator]["relative_bias"] > 1e-3, (delta, reward_name, estimator)
    for reward_name, r in tis_bias.one_case(3, 4, 0.0, 0, "previous", cap=2.0).items():
        for estimator in tis_bias.ESTIMATORS:
            assert r["estimators"][estimator]["relative_bias"] < 1e-12, (reward_name, estimator)


def test_the_cap_only_matters_where_a_ratio_exceeds_it():
    """token TIS equals plain token IS when no token's ratio reaches C, and differs from it when some do."""
    small = tis_bias.one_case(3, 4, 0.01, 0, "previous", cap=2.0)["count"]
    assert small["ratio_max"] < 2.0
    assert small["estimators"]["token_tis"]["bias"] == small["estimators"]["token"]["bias"]
    large = tis_bias.one_case(3, 4, 0.01, 0, "previous", cap=1.001)["count"]
    assert large["truncated_share"] > 0
    assert large["estimators"]["token_tis"]["bias"] != pytest.approx(large["estimators"]["token"]["bias"], rel=1e-6)


def test_token_tis_bias_grows_with_the_horizon():
    """At fixed Delta (same policy pair, a sticky chain), the absolute and relative bias of token TIS grow with T;
    at T = 1 token IS is the sequence estimator and has none."""
    biases = [tis_bias.one_case(3, horizon, 0.05, 0, "previous", cap=2.0, rewards=("count",), stickiness=3.0,
                                max_horizon=5)["count"]["estimators"]["token_tis"] for horizon in (1, 2, 3, 4, 5)]
    assert biases[0]["relative_bias"] < 1e-12
    relative = [b["relative_bias"] for b in biases[1:]]
    absolute = [b["bias"] for b in biases[1:]]
    assert all(a < b for a, b in zip(relative, relative[1:])), relative
    assert all(a < b for a, b in zip(absolute, absolute[1:])), absolute
    assert relative[-1] > 3 * relative[0]


def test_the_slope_fit_recovers_a_power_law():
    """slope() returns p for y = c x^p."""
    xs = [1.0, 2.0, 4.0, 8.0]
    assert tis_bias.slope(xs, [0.3 * x ** 1.7 for x in xs]) == pytest.approx(1.7, abs=1e-12)


def test_per_sample_gradients_match_autograd():
    """The closed-form tabular score sum_t c_t (onehot(y_t) - pi(.|c_t)) equals autograd of sum_t c_t log pi."""
    seqs = tis_bias.sequences(3, 3)
    ctx = tis_bias.contexts(seqs, 3, "position")
    theta, _ = tis_bias.random_policy(3, tis_bias.num_contexts(3, 3, "position"), seed=2)
    coefficients = torch.rand(seqs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = tis_bias.per_sample_gradients(theta, seqs, ctx, coefficients)
    for n in (0, 7, 26):
        leaf = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((coefficients[n] * leaf.log_softmax(-1)[ctx[n], seqs[n]]).sum(), leaf)
        assert torch.allclose(ours[n], grad, atol=1e-14)


def test_a_users_mistake_is_one_sentence():
    """check_args names the flag to change: an unknown reward, a Delta the sampler cannot reach, too many sequences."""
    assert tis_bias.check_args(tis_bias.Args()) is None
    assert "--rewards" in tis_bias.check_args(tis_bias.Args(rewards=("length",)))
    assert "[0, 0.5)" in tis_bias.check_args(tis_bias.Args(deltas=(0.7,)))
    assert "enumerated" in tis_bias.check_args(tis_bias.Args(vocab=5, horizons=(12,)))
