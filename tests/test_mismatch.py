"""Sampler-trainer mismatch (rl_kernels: sample_tokens, the kept-set log-probs, rollout_correction, mismatch_metrics):
what the sampler returns under top-k/top-p, the trainer renormalising over the sampler's kept set ("keep sampling
mask"), the corrections against verl's rollout_corr_helper compiled from the fetched snapshot (skipped without one, as
tests/test_objectives.py), the metrics against verl's and by hand, and the switches in grpo.py."""

import ast
import functools
import json
import math

import pytest
import torch

import grpo
import rl_kernels as K
import rlvr_rewards as env
from conftest import tiny_causal_lm
from test_objectives import VERL, _functions, _verl_source

ARGS = ["--max-steps", "2", "--eval-every", "0", "--prompts-per-step", "4", "--num-generations", "4",
        "--max-new-tokens", "24", "--log-samples", "0"]


def _logits(rows=64, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("top_p,top_k", [(0.8, 0), (1.0, 5), (0.9, 7), (0.5, 0)])
def test_the_sampler_returns_the_log_prob_of_what_it_sampled_from(top_p, top_k):
    """log mu = z - logsumexp over the kept set (truncated, renormalised), the kept mass S = sum of the untruncated
    probabilities on it, so log mu = log pi - log S; every sampled token is in the kept set; top-k keeps exactly k."""
    logits = _logits()
    drawn = K.sample_tokens(logits, temperature=0.7, top_p=top_p, top_k=top_k, generator=torch.Generator().manual_seed(1))
    z = logits / 0.7
    keep = drawn.keep
    assert keep is not None and keep[torch.arange(len(z)), drawn.tokens].all()
    if top_k:  # at most k (top-p may cut further), exactly k without top-p
        assert (keep.sum(-1) <= top_k).all() and ((keep.sum(-1) == top_k).all() or top_p < 1)
    mu = torch.log_softmax(z.masked_fill(~keep, float("-inf")), -1).gather(-1, drawn.tokens[:, None])[:, 0]
    full = torch.log_softmax(z, -1)
    mass = torch.logsumexp(full.masked_fill(~keep, float("-inf")), -1)
    assert torch.allclose(drawn.logprobs, mu, atol=1e-6)
    assert torch.allclose(drawn.kept_logmass, mass, atol=1e-6) and (drawn.kept_logmass < 0).any()
    assert torch.allclose(drawn.logprobs, full.gather(-1, drawn.tokens[:, None])[:, 0] - mass, atol=1e-5)
    ids = K.kept_ids(keep)
    assert torch.equal(K.keep_mask(ids, z.shape[-1]), keep)


def test_without_truncation_nothing_changes():
    """top_p = 1, top_k = 0: the log-probs are the plain log_softmax's, the kept mass is 1, there is no kept set."""
    logits = _logits(seed=3)
    drawn = K.sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    assert drawn.keep is None and torch.equal(drawn.kept_logmass, torch.zeros(len(logits)))
    assert torch.allclose(drawn.logprobs, torch.log_softmax(logits, -1).gather(-1, drawn.tokens[:, None])[:, 0])
    assert K.truncation_mask(logits, 1.0, 0) is None and K.truncation_mask(logits, 1.0, 50) is None


def test_kept_ids_mark_the_whole_vocabulary_with_minus_one():
    keep = torch.tensor([[True, False, True, False], [True, True, True, True], [False, False, False, True]])
    ids = K.kept_ids(keep)
    assert ids.shape == (3, 2) and ids[1].tolist() == [-1, -1] and sorted(ids[0].tolist()) == [0, 2]
    assert ids[2].tolist() == [3, -1]
    assert torch.equal(K.keep_mask(ids, 4), keep)


@pytest.mark.parametrize("temperature,with_entropy", [(1.0, False), (0.7, True)])
def test_the_fused_kept_set_log_probs_equal_the_plain_reference_and_their_gradients(temperature, with_entropy):
    """token_logprobs(keep_ids=...) renormalises over the kept set in the chunked fused pass exactly as the plain
    path (the model's logits, masked, log_softmax) does: values and gradients (of the log-probs and the entropy),
    with chunks smaller than the batch so the backward recomputes; all -1 rows (no truncation) are the plain ones."""
    model = tiny_causal_lm(seed=2)
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    n = 6
    keep = torch.full((3, n, 12), -1, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    for r in range(3):
        for t in range(n):
            if (r + t) % 4:  # some positions untruncated
                chosen = torch.randperm(97, generator=g)[:int(torch.randint(1, 12, (1,), generator=g))]
                chosen[0] = ids[r, 9 - n + t]  # the sampled token is always kept
                keep[r, t, :len(chosen)] = chosen.to(torch.int32)
    results = []
    for fused in (True, False):
        model.zero_grad()
        out = K.token_logprobs(model, ids, mask, last_n=n, temperature=temperature, with_entropy=with_entropy,
                               fused=fused, chunk_size=4, keep_ids=keep)
        lp, ent = out if with_entropy else (out, None)
        weights = torch.randn(3, n, generator=torch.Generator().manual_seed(5))
        total = (lp * weights).sum() + (0.3 * ent.sum() if ent is not None else 0)
        total.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((lp.detach(), grads))
    (lp_f, g_f), (lp_p, g_p) = results
    assert torch.allclose(lp_f, lp_p, atol=1e-5)
    assert g_f.keys() == g_p.keys()
    for k in g_f:
        assert torch.allclose(g_f[k], g_p[k], atol=1e-5, rtol=1e-4), k
    plain = K.token_logprobs(model, ids, mask, last_n=n, temperature=temperature)
    untruncated = keep[..., 0] < 0
    assert torch.equal(lp_f[untruncated], plain.detach()[untruncated])
    assert (lp_f[~untruncated] >= plain.detach()[~untruncated] - 1e-6).all()  # renormalising raises a log-prob


def _toy_rollout(top_p=0.8, top_k=0, rows=8, samples=4, noise=0.0):
    model, tok = K.load_model("toy", dtype="float32", device=torch.device("cpu"))
    prompts = env.make_dataset("arithmetic", "train", rows, seed=0)
    rollout = env.sample(model, tok, prompts, num_samples=samples, max_new_tokens=24, top_p=top_p, top_k=top_k,
                         noise_keys=K.rollout_noise_keys(0, 0, 0, list(range(rows)), samples), logit_noise=noise)
    return model, rollout


def test_under_top_p_the_trainer_over_the_kept_set_is_the_sampler_and_without_it_off_by_the_kept_mass():
    """The toy model in fp32 at top_p 0.8: pi_old over the sampler's kept set equals the sampler's log mu (to fp32
    kernel rounding, ~1e-6), whatever the micro-batch size; over the whole vocabulary (what TRL, verl and OpenRLHF
    compute) it is off by exactly the kept mass, log pi = log mu + log S, at every truncated token."""
    model, rollout = _toy_rollout()
    gen = rollout.gen
    assert gen.keep_ids is not None and (gen.kept_logmass < -1e-3).any()
    mask = gen.mask.bool()
    for max_tokens in (0, 40, 160):
        kept = K.rollout_logprobs(model, rollout.batch(), max_tokens=max_tokens)
        assert (kept - gen.logprobs)[mask].abs().max() < 2e-5
    full = K.rollout_logprobs(model, rollout.batch(keep_sampling_mask=False))
    assert ((full - gen.logprobs - gen.kept_logmass)[mask]).abs().max() < 2e-5
    off = (full - gen.logprobs)[mask].exp()
    assert ((off < 0.9) | (off > 1.1)).float().mean() > 0.01  # TRL #6789's symptom, here at the toy's scale
    metrics = K.mismatch_metrics(gen.logprobs, full, gen.mask, gen.kept_logmass)
    assert math.isclose(metrics["mismatch/kept_mass"], gen.kept_logmass[mask].exp().mean().item(), rel_tol=1e-6)
    assert metrics["mismatch/ratio_out_share"] > 0.01


@pytest.mark.parametrize("top_p,top_k", [(0.8, 8)])
def test_with_batch_invariant_kernels_the_kept_set_log_probs_are_the_samplers_exactly(top_p, top_k):
    """fp32 on CPU with rl_kernels.set_batch_invariant: under top-p/top-k the trainer's pi_old over the sampler's kept
    set equals the sampler's log mu bit for bit, in one pass and in micro-batches of about 1, 2 and 8 rows; so the
    ratio pi_theta / mu of a first update (bypass mode) is exactly 1 on every token (the kept mass makes it anything
    but 1 without the keep mask)."""
    model, tok = K.load_model("toy", dtype="float32", device=torch.device("cpu"))
    K.set_batch_invariant(model, True)
    prompts = env.make_dataset("arithmetic", "train", 6, seed=1)
    rollout = env.sample(model, tok, prompts, num_samples=4, max_new_tokens=24, top_p=top_p, top_k=top_k,
                         noise_keys=K.rollout_noise_keys(0, 3, 0, list(range(6)), 4))
    gen, batch, mask = rollout.gen, rollout.batch(), rollout.gen.mask.bool()
    assert (gen.kept_logmass[mask] < 0).any()
    width = batch["tokens"].shape[1] + batch["prompt_ids"].shape[1]
    for max_tokens in (0, 1, 2 * width, 8 * width):
        old = K.rollout_logprobs(model, batch, max_tokens=max_tokens)
        assert (old - gen.logprobs)[mask].abs().max().item() == 0.0, max_tokens
    model.train()
    ratio = torch.exp(K.completion_logprobs(model, batch) - gen.logprobs)[mask]
    assert torch.equal(ratio, torch.ones_like(ratio))
    full = K.rollout_logprobs(model, rollout.batch(keep_sampling_mask=False))
    assert (full - gen.logprobs)[mask].abs().max() > 1e-3


def test_injected_logit_noise_is_keyed_and_of_the_size_asked():
    """sampler_logit_noise: the same rows sample the same under the same keys; the sampler's log mu differs from the
    trainer's pi_old by about the noise, and not at all without it."""
    model, clean = _toy_rollout(top_p=1.0)
    _, noisy = _toy_rollout(top_p=1.0, noise=0.5)
    _, again = _toy_rollout(top_p=1.0, noise=0.5)
    assert torch.equal(noisy.gen.tokens, again.gen.tokens) and not torch.equal(noisy.gen.tokens, clean.gen.tokens)
    small = K.mismatch_metrics(clean.gen.logprobs, K.rollout_logprobs(model, clean.batch()), clean.gen.mask)
    big = K.mismatch_metrics(noisy.gen.logprobs, K.rollout_logprobs(model, noisy.batch()), noisy.gen.mask)
    assert small["mismatch/logprob_diff_mean"] < 1e-5 < 0.05 < big["mismatch/logprob_diff_mean"]
    assert big["mismatch/kl_k3"] > 0.01 and big["mismatch/ess"] < 1.0


# ---- the corrections against verl's rollout_corr_helper, and by hand


@functools.cache
def verl_corr() -> dict:
    try:
        helper = _verl_source("verl/trainer/ppo/rollout_corr_helper.py")
        functional = _verl_source("verl/utils/torch_functional.py")
    except Exception:  # noqa: BLE001
        pytest.skip(f"no verl snapshot at {VERL} (fetch github:volcengine/verl, or set VERL_SNAPSHOT)")
    helper_ns = {"torch": torch}
    names = ("masked_sum", "masked_mean")
    exec(compile(ast.Module(_functions(functional, set(names)), []), "verl_F", "exec"), helper_ns)
    from typing import Any, Optional

    namespace = {"torch": torch, "math": math, "Optional": Optional, "Any": Any,
                 "verl_F": type("verl_F", (), {k: staticmethod(helper_ns[k]) for k in names})}
    constants = [n for n in ast.parse(helper).body if isinstance(n, (ast.Assign, ast.AnnAssign))]
    wanted = {"_parse_rollout_rs_thresholds", "compute_rollout_rejection_mask", "compute_rs_metrics",
              "compute_rollout_correction_weights", "compute_is_metrics", "compute_offpolicy_metrics"}
    nodes = _functions(helper, wanted)
    assert {n.name for n in nodes} == wanted, f"verl renamed {wanted - {n.name for n in nodes}}"
    exec(compile(ast.Module(constants + nodes, []), "rollout_corr_helper", "exec"), namespace)
    return namespace


def _batch(seed, rows=10, width=13, drift=0.4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).float()
    log_ratio = drift * torch.randn(rows, width, generator=g) + 0.05
    return log_ratio, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level,threshold", [("token", 2.0), ("sequence", 2.0), ("token", 1.3), ("sequence", 5.0)])
def test_is_weights_equal_verls(seed, level, threshold):
    log_ratio, mask = _batch(seed)
    theirs, _ = verl_corr()["compute_rollout_correction_weights"](log_ratio, mask, rollout_is=level,
                                                                  rollout_is_threshold=threshold)
    ours, keep = K.rollout_correction(log_ratio, mask, K.Correction(level, "truncate", None, threshold))
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7) and torch.equal(keep, mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("option,bounds", [("token_k1", "0.7_1.4"), ("token_k2", "0.05"), ("token_k3", "0.05"),
                                           ("seq_sum_k1", "0.5_2.0"), ("seq_sum_k2", "0.5"), ("seq_sum_k3", "0.4"),
                                           ("seq_mean_k1", "0.95_1.05"), ("seq_mean_k2", "0.05"),
                                           ("seq_mean_k3", "0.05"), ("seq_max_k2", "0.2"), ("seq_max_k3", "0.2"),
                                           ("seq_mean_k1", "1.2")])
def test_rejection_masks_equal_verls(seed, option, bounds):
    log_ratio, mask = _batch(seed, drift=0.3)
    theirs, _ = verl_corr()["compute_rollout_rejection_mask"](log_ratio, mask, rollout_rs=option,
                                                              rollout_rs_threshold=bounds)
    weights, ours = K.rollout_correction(log_ratio, mask, K.Correction(rejection=(option,), rejection_bounds=(bounds,)))
    assert weights is None and torch.equal(ours, theirs)
    assert 0 < ours.sum() < mask.sum() or option in ("seq_mean_k1",)  # the bounds bite on these batches


def test_chained_rejection_and_weights_equal_verls():
    """verl's decoupled_seq_is_rs: sequence IS at 2.0 and seq_sum_k1 rejection at 0.5_2.0, and two options chained."""
    log_ratio, mask = _batch(7, drift=0.2)
    w_theirs, _ = verl_corr()["compute_rollout_correction_weights"](log_ratio, mask, "sequence", 2.0)
    m_theirs, _ = verl_corr()["compute_rollout_rejection_mask"](log_ratio, mask, "seq_sum_k1,token_k3", "0.5_2.0,0.1")
    w, keep = K.rollout_correction(log_ratio, mask, K.Correction("sequence", "truncate", None, 2.0,
                                                                 ("seq_sum_k1", "token_k3"), ("0.5_2.0", "0.1")))
    assert torch.allclose(w, w_theirs, rtol=1e-6) and torch.equal(keep, m_theirs)
    preset = K.CORRECTIONS["verl-seq-is-rs"]
    assert (preset.is_level, preset.is_high, preset.rejection, preset.rejection_bounds) == \
        ("sequence", 2.0, ("seq_sum_k1",), ("0.5_2.0",))


def test_mismatch_metrics_equal_verls_off_policy_metrics():
    """kl (k1), k3 and chi-squared per token and per sequence against verl's compute_offpolicy_metrics."""
    log_ratio, mask = _batch(3, drift=0.3)
    sampler = -torch.rand(log_ratio.shape, generator=torch.Generator().manual_seed(9)) * 3
    old = sampler + log_ratio
    theirs = verl_corr()["compute_offpolicy_metrics"](old, sampler, mask)
    ours = K.mismatch_metrics(sampler, old, mask)
    for mine, verls in [("kl_k1", "kl"), ("kl_k3", "k3_kl"), ("chi2_token", "chi2_token"), ("chi2_seq", "chi2_seq")]:
        assert math.isclose(ours[f"mismatch/{mine}"], theirs[verls], rel_tol=1e-5, abs_tol=1e-7), mine


def test_mismatch_metrics_by_hand():
    sampler = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.4, 0.9]]))
    old = torch.log(torch.tensor([[0.5, 0.5, 0.3], [0.2, 0.44, 0.9]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rho = torch.tensor([1.0, 2.0, 1.0, 1.1, 1.0])
    m = K.mismatch_metrics(sampler, old, mask)
    assert math.isclose(m["mismatch/ratio_mean"], rho.mean().item(), rel_tol=1e-6)
    assert math.isclose(m["mismatch/ratio_max"], 2.0, rel_tol=1e-6) and math.isclose(m["mismatch/ratio_min"], 1.0)
    assert math.isclose(m["mismatch/ratio_out_share"], 1 / 5)  # 1.1 sits on the bound ([0.9, 1.1] inclusive)
    assert math.isclose(m["mismatch/logprob_diff_max"], math.log(2), rel_tol=1e-6)
    assert math.isclose(m["mismatch/chi2_seq"], ((2.0 ** 2) + (1.1 ** 2)) / 2 - 1, rel_tol=1e-5)
    assert math.isclose(m["mismatch/ess"], rho.sum().item() ** 2 / (5 * rho.square().sum().item()), rel_tol=1e-6)
    assert math.isclose(m["mismatch/token_mult_prob_error"], rho.mean().item(), rel_tol=1e-6)  # all rho >= 1 here
    assert m["mismatch/kept_mass"] == 1.0


def test_geometric_is_and_masking_by_hand():
    log_ratio = torch.tensor([[0.2, -0.4, 2.0], [0.1, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, _ = K.rollout_correction(log_ratio, mask, K.Correction("geometric", "truncate", None, 2.0))
    assert torch.allclose(w[0], torch.full((3,), math.exp(1.8 / 3))) and torch.allclose(w[1, :2], torch.full((2,), math.exp(0.1)))
    w, _ = K.rollout_correction(log_ratio, mask, K.Correction("token", "mask", 0.5, 5.0))  # IcePop
    assert torch.allclose(w, torch.tensor([[math.exp(0.2), math.exp(-0.4), 0.0], [math.exp(0.1), math.exp(0.1), 0.0]]))
    w, _ = K.rollout_correction(log_ratio, mask, K.CORRECTIONS["trl"])  # sequence mask at 3: exp(1.8) > 3 drops row 0
    assert torch.equal(w[0], torch.zeros(3)) and torch.allclose(w[1, :2], torch.full((2,), math.exp(0.2)))
    w, _ = K.rollout_correction(log_ratio, mask, K.CORRECTIONS["openrlhf"])  # token TIS [0.5, 5]
    assert torch.allclose(w[0], torch.tensor([math.exp(0.2), math.exp(-0.4), 5.0]))


def test_deepseek_v32_sequence_mask_and_unbiased_kl_by_hand():
    """Off-policy sequence masking drops only a sequence with A < 0 whose mean log(mu / pi) > delta; k3_unbiased is
    k3 times pi/pi_old, so at pi = pi_old it is k3, and its gradient is the ratio-weighted one."""
    logprobs = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))
    sampler = torch.log(torch.tensor([[0.9, 0.9], [0.9, 0.9], [0.5, 0.55]]))
    mask = torch.ones(3, 2)
    keep = K.offpolicy_sequence_mask(logprobs, sampler, torch.tensor([-1.0, 1.0, -1.0]), mask, 0.2)
    assert keep[:, 0].tolist() == [0.0, 1.0, 1.0]
    lp = torch.log(torch.tensor([0.3, 0.6])).requires_grad_(True)
    old, ref = torch.log(torch.tensor([0.3, 0.5])), torch.log(torch.tensor([0.2, 0.7]))
    kl = K.kl_penalty(lp, ref, "k3_unbiased", old)
    k3 = K.kl_penalty(lp.detach(), ref, "k3")
    assert torch.isclose(kl[0], k3[0]) and torch.isclose(kl[1], k3[1] * 0.6 / 0.5)
    kl.sum().backward()
    r = torch.tensor([1.0, 1.2])
    log_r = ref - lp.detach()
    expected = r * (torch.expm1(log_r) - log_r) + r * (1 - torch.exp(log_r))  # d/dlp of r * k3
    assert torch.allclose(lp.grad, expected, atol=1e-6)


def test_impossible_corrections_get_one_sentence():
    for corr, words in [(K.Correction(bypass=True, is_level="token"), "Bypass"),
                        (K.Correction(rejection=("seq_mean_k4",), rejection_bounds=("1",)), "not one of"),
                        (K.Correction(rejection=("token_k1",), rejection_bounds=("2_1",)), "lower <= upper"),
                        (K.Correction(rejection=("token_k2",), rejection_bounds=("0.1_0.2",)), "one positive"),
                        (K.Correction("token", is_low=3.0, is_high=2.0), "low <= high")]:
        with pytest.raises(K.UserError, match=words):
            K.check_correction(corr)


# ---- the switches in grpo.py


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_every_grpo_step_logs_the_mismatch_and_a_correction_changes_the_update(tmp_path):
    """mismatch/ metrics in every step of a plain run (measured in the update's own forward: no extra pass) and of a
    corrected one; with an injected mismatch, token TIS weighs the loss (is_weight_* logged, weights capped at 2) and
    bypass mode's ratio is pi_theta / mu (ratio_max > 1 at the first step, which a plain on-policy run never has)."""
    grpo.main(grpo.cli(ARGS + ["--out-dir", str(tmp_path / "plain")]))
    rows = _metrics(tmp_path / "plain")
    assert all("mismatch/kl_k3" in r and r["mismatch/logprob_diff_max"] < 1e-4 for r in rows)
    assert all(r["train/ratio_max"] == 1.0 for r in rows)
    grpo.main(grpo.cli(ARGS + ["--out-dir", str(tmp_path / "tis"), "--sampler-logit-noise", "0.5",
                                     "--rollout-correction", "verl-token-tis", "--top-k", "10"]))
    rows = _metrics(tmp_path / "tis")
    assert all(r["mismatch/logprob_diff_mean"] > 0.02 and r["mismatch/is_weight_max"] <= 2.0 + 1e-6 for r in rows)
    assert all(r["mismatch/kept_mass"] < 1.0 for r in rows)
    grpo.main(grpo.cli(ARGS + ["--out-dir", str(tmp_path / "bypass"), "--sampler-logit-noise", "0.5",
                                        "--rollout-correction", "bypass"]))
    rows = _metrics(tmp_path / "bypass")
    assert rows[0]["train/ratio_max"] > 1.0 and "mismatch/kl_k3" in rows[0]
