"""ppo.py: GAE, token rewards, the value loss and the KL controller by hand; the score on the last real token; the
critic's alignment and gradient; presets; short runs of every preset; exact resume; torchrun equivalence."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, left_padded_batch, tiny_causal_lm

import ppo
import rl_kernels as K
import rl_runs as runs
import toy_world as toy

# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------


def plain_gae(rewards, values, gamma, lam):
    """The textbook loop over one unpadded row (Schulman et al. 2016), as lists."""
    advantages, next_value, running = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t], next_value = running, values[t]
    return advantages


def test_gae_by_hand():
    """gamma 0.9, lam 0.8 on two rows of lengths 3 and 2: the hand computation, returns = A + V, zeros past the end."""
    r = torch.tensor([[0.0, 0.5, 1.0], [2.0, -1.0, 7.0]])
    v = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: d2 = 1 - .6 = .4; d1 = .5 + .9*.6 - .4 = .64; d0 = 0 + .9*.4 - .2 = .16
    #        A2 = .4; A1 = .64 + .72*.4 = .928; A0 = .16 + .72*.928 = .82816
    # row 1: d1 = -1 - .5 = -1.5; d0 = 2 + .9*.5 - 1 = 1.45; A1 = -1.5; A0 = 1.45 + .72*(-1.5) = .37
    adv, ret = ppo.gae(r, v, mask, 0.9, 0.8)
    assert torch.allclose(adv, torch.tensor([[0.82816, 0.928, 0.4], [0.37, -1.5, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[1.02816, 1.328, 1.0], [1.37, -1.0, 0.0]]), atol=1e-6)
    assert adv[0].tolist() == pytest.approx(plain_gae([0.0, 0.5, 1.0], [0.2, 0.4, 0.6], 0.9, 0.8))


def test_gae_lambda_zero_gives_td_errors_and_lambda_one_gives_return_minus_value():
    """lam = 0: A_t = r_t + gamma V_{t+1} - V_t; lam = gamma = 1: A_t = (sum of rewards from t) - V_t, R_t that sum."""
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.arange(6) < torch.tensor([6, 4, 1, 3])[:, None]).long()
    rm, vm = r * mask, v * mask
    next_v = torch.cat([vm[:, 1:], torch.zeros(4, 1)], 1)
    adv, _ = ppo.gae(r, v, mask, 0.95, 0.0)
    assert torch.allclose(adv, (rm + 0.95 * next_v - vm) * mask, atol=1e-6)
    adv, ret = ppo.gae(r, v, mask, 1.0, 1.0)
    to_go = rm.flip(-1).cumsum(-1).flip(-1) * mask
    assert torch.allclose(ret, to_go, atol=1e-5) and torch.allclose(adv, (to_go - vm) * mask, atol=1e-5)


def test_values_and_rewards_at_masked_positions_change_nothing():
    """Garbage (huge numbers, inf, NaN) at masked positions, after the end and in a hole in the middle, leaves every
    real position's advantage and return as it was (verl's test); a hole is skipped, not counted as a step."""
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 0]])
    adv, ret = ppo.gae(r, v, mask, 0.99, 0.95)
    for junk in (1e6, float("inf"), float("nan")):
        r2, v2 = r.masked_fill(mask == 0, junk), v.masked_fill(mask == 0, -junk)
        adv2, ret2 = ppo.gae(r2, v2, mask, 0.99, 0.95)
        assert torch.equal(adv2, adv) and torch.equal(ret2, ret)
    keep = mask[2].bool()  # the holed row equals GAE over its real tokens alone
    expect = plain_gae(r[2][keep].tolist(), v[2][keep].tolist(), 0.99, 0.95)
    assert adv[2][keep].tolist() == pytest.approx(expect, abs=1e-6) and (adv[2][~keep] == 0).all()


def test_gae_takes_one_lambda_per_row():
    """A (R,) lambda (VAPO's length-adaptive one) equals running each row with its own float lambda."""
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    lam = torch.tensor([0.0, 0.5, 1.0])
    adv, _ = ppo.gae(r, v, mask, 1.0, lam)
    for i in range(3):
        assert torch.allclose(adv[i], ppo.gae(r[i:i + 1], v[i:i + 1], mask[i:i + 1], 1.0, float(lam[i]))[0][0])
    assert ppo.length_adaptive_lam(torch.tensor([10, 20, 40, 200]), 0.05).tolist() == pytest.approx([0, 0, .5, .9])


# ---------------------------------------------------------------------------------------------------------
# Token rewards, the value loss, the KL controller
# ---------------------------------------------------------------------------------------------------------


def test_token_rewards_by_hand():
    """-beta * (log pi - log pi_ref) at every real token (k1), the score added at the last real one; k3 as option;
    whatever sits at masked positions is ignored."""
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 99.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -2.0, -99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    out = ppo.token_rewards(scores, lp, ref, mask, 0.1)
    assert torch.allclose(out, torch.tensor([[-0.05, 0.1, 2.0], [-0.01, 0.1 - 1.0, 0.0]]), atol=1e-6)
    log_r = ref - lp  # k3 = exp(log r) - 1 - log r
    k3 = (log_r.exp() - 1 - log_r) * mask
    out3 = ppo.token_rewards(scores, lp, ref, mask, 0.1, "k3")
    assert torch.allclose(out3, -0.1 * k3 + torch.tensor([[0, 0, 2.0], [0, -1.0, 0]]), atol=1e-6)
    assert torch.equal(ppo.token_rewards(scores, lp, None, mask, 0.1), torch.tensor([[0, 0, 2.0], [0, -1.0, 0]]))


def test_the_kl_penalty_in_the_reward_is_clamped_at_ten():
    """A token where pi_ref is e^30 times likelier than pi: k3 = e^30 - 31 ~ 10^13 (k1 -30) is clamped to 10 (-10), as
    OpenRLHF and verl clamp it, so one token cannot drown every score; kl_clamp=0 turns the clamp off."""
    lp, ref = torch.tensor([[-40.0, -1.0]]), torch.tensor([[-10.0, -1.0]])
    mask, scores = torch.tensor([[1, 1]]), torch.tensor([0.5])
    k3 = ppo.token_rewards(scores, lp, ref, mask, 0.1, "k3")
    assert torch.allclose(k3, torch.tensor([[-0.1 * 10.0, 0.5]]))
    k1 = ppo.token_rewards(scores, lp, ref, mask, 0.1, "k1")  # k1 = log pi - log pi_ref = -30 -> -10
    assert torch.allclose(k1, torch.tensor([[0.1 * 10.0, 0.5]]))
    assert ppo.token_rewards(scores, lp, ref, mask, 0.1, "k3", kl_clamp=0.0)[0, 0] < -1e11


def test_value_loss_by_hand_and_its_gradient():
    """1/2 mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2) over real tokens; the clip fraction counts tokens where
    the clipped term is larger; the gradient reaches V only where the unclipped term wins or V is inside the band."""
    values = torch.tensor([[1.0, 0.0, 5.0], [2.0, 7.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0], [2.5, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, clip_frac = ppo.value_loss(values, old, returns, mask, 0.2)
    # token (0,0): V 1 -> clipped .2; (1-2)^2 = 1 vs (.2-2)^2 = 3.24 -> 3.24 (clipped wins)
    # token (0,1): V 0 inside the band: 1 vs 1 -> 1;  token (1,0): V 2 -> clipped 2.3; 4 vs 5.29 -> 5.29 (clipped)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0 + 5.29) / 3)
    assert clip_frac.item() == pytest.approx(2 / 3)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, (0 - 1) / 3, 0.0], [0.0, 0.0, 0.0]]))
    unclipped, _ = ppo.value_loss(values.detach(), old, returns, mask, None)
    assert unclipped.item() == pytest.approx(0.5 * (1 + 1 + 4) / 3)


def test_adaptive_kl_controller_by_hand():
    """beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n/horizon); no target: beta stays."""
    ctl = ppo.AdaptiveKLController(0.1, 6.0, 1000)
    ctl.update(9.0, 100)    # error +0.5 clipped to +0.2: 0.1 * 1.02
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 100)    # error -0.1: * 0.99
    assert ctl.value == pytest.approx(0.102 * 0.99)
    ctl.update(0.0, 500)    # error -1 clipped to -0.2: * 0.9
    assert ctl.value == pytest.approx(0.102 * 0.99 * 0.9)
    fixed = ppo.AdaptiveKLController(0.05, 0.0, 1000)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


def test_scores_for_responses_without_eos():
    """--missing-eos-score replaces a truncated response's reward (N+: -1, ORZ: 0); nan keeps it; clipping after."""
    rewards, truncated = torch.tensor([1.0, 3.0, -2.0]), torch.tensor([False, True, False])
    assert ppo.shape_scores(ppo.Args(), rewards, truncated).tolist() == [1.0, 3.0, -2.0]
    assert ppo.shape_scores(ppo.Args(preset="orz"), rewards, truncated).tolist() == [1.0, 0.0, -2.0]
    assert ppo.shape_scores(ppo.Args(missing_eos_score=-1.0, score_clip=1.5), rewards, truncated).tolist() == [
        1.0, -1.0, -1.5]


def masked_stats(x, mask):
    """Mean and unbiased std over the entries where mask is 1, by the plain formulas."""
    values = x[mask.bool()]
    return values.mean(), values.std()


def test_normalized_scores_are_standardised_over_the_batch_then_clipped():
    """--normalize-scores: (s - mean) / std (unbiased) over the batch; --score-clip clips after it."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0])
    truncated = torch.zeros(4, dtype=torch.bool)
    out = ppo.shape_scores(ppo.Args(normalize_scores=True), rewards, truncated)
    assert torch.allclose(out, (rewards - rewards.mean()) / rewards.std(), atol=1e-5)
    clipped = ppo.shape_scores(ppo.Args(normalize_scores=True, score_clip=1.0), rewards, truncated)
    assert torch.allclose(clipped, out.clamp(-1.0, 1.0)) and clipped.max() == 1.0


def test_compute_advantages_splits_lambda_between_critic_and_actor_and_whitens():
    """The critic's returns come from GAE with --lam, the actor's advantages from --actor-lam (or VAPO's per-row
    lambda); the advantages are whitened over the real tokens (mean 0, std 1) and 0 at masked positions."""
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = (torch.arange(6) < torch.tensor([6, 4, 2])[:, None]).long()
    whitened, returns, raw = ppo.compute_advantages(ppo.Args(lam=1.0, actor_lam=0.0), r, v, mask)
    assert torch.equal(returns, ppo.gae(r, v, mask, 1.0, 1.0)[1])
    assert torch.equal(raw, ppo.gae(r, v, mask, 1.0, 0.0)[0])
    mean, std = masked_stats(raw, mask)
    assert torch.allclose(whitened, (raw - mean) / std * mask, atol=1e-5)
    mean, std = masked_stats(whitened, mask)
    assert abs(mean) < 1e-6 and std == pytest.approx(1.0, abs=1e-5) and (whitened[mask == 0] == 0).all()
    _, _, vapo = ppo.compute_advantages(ppo.Args(preset="vapo"), r, v, mask)
    lams = ppo.length_adaptive_lam(mask.sum(-1), 0.05)  # lengths 6, 4, 2: all floored at 0
    assert torch.equal(vapo, ppo.gae(r, v, mask, 1.0, lams)[0])
    same, _, plain = ppo.compute_advantages(ppo.Args(lam=0.9), r, v, mask)
    assert torch.equal(plain, ppo.gae(r, v, mask, 1.0, 0.9)[0])


def test_whitened_rewards_are_scaled_with_their_mean_kept():
    """--whiten-rewards feeds GAE (r - mu) / sigma + mu over the real tokens (Ziegler's, TRL's shift_mean=False): with
    gamma = lam = 1 the returns are that reward's sums to go."""
    r = torch.tensor([[0.0, 0.0, 2.0], [1.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    mean, std = masked_stats(r, mask)  # over 0, 0, 2, 1, 3: mean 1.2
    expect = ((r - mean) / std + mean) * mask
    _, returns, _ = ppo.compute_advantages(ppo.Args(whiten_rewards=True), r, torch.zeros(2, 3), mask)
    assert torch.allclose(returns, expect.flip(-1).cumsum(-1).flip(-1) * mask, atol=1e-5)
    _, unwhitened, _ = ppo.compute_advantages(ppo.Args(), r, torch.zeros(2, 3), mask)
    assert not torch.allclose(unwhitened, returns)


def test_controller_kl_per_sequence_or_per_token():
    """The controller's KL: each response's k1 summed ("sequence": Ziegler, TRL) or averaged over its tokens ("token":
    verl, OpenRLHF), then averaged over the responses."""
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.5, -1.5, -1.5], [-1.0, -2.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # row 0: 0.5 x 4 = 2.0 (0.5 per token); row 1: -1 + 0 = -1.0 (-0.5 per token)
    assert ppo.controller_kl(mask, old, ref, "sequence") == pytest.approx(0.5)
    assert ppo.controller_kl(mask, old, ref, "token") == pytest.approx(0.0)


def test_dual_clip_caps_a_negative_advantage_loss_at_c_times_its_size():
    """Dual-clip (Ye et al. 2020): where A < 0 the clipped loss max(-rho A, -clip(rho) A) is capped at -c A, with no
    gradient; tokens with A > 0, or under the cap, are unchanged. policy_loss minus the excess is that, by hand."""
    logprobs = torch.log(torch.tensor([[5.0, 1.1, 5.0, 0.5]])).requires_grad_()  # old = 0: rho = 5, 1.1, 5, 0.5
    old, mask = torch.zeros(1, 4), torch.ones(1, 4)
    adv = torch.tensor([[-1.0, -1.0, 2.0, -2.0]])
    excess, frac = ppo.dual_clip_excess(logprobs, old, adv, mask, 0.2, 0.2, 3.0)
    # token 0: l = max(5, 1.2) = 5 > 3 -> excess 2; token 1: l = max(1.1, 1.1) = 1.1 under 3; token 2: A > 0 (l =
    # max(-10, -2.4) = -2.4); token 3: l = max(1.0, 1.6) = 1.6 under 6
    assert torch.allclose(excess, torch.tensor([[2.0, 0.0, 0.0, 0.0]])) and frac.item() == pytest.approx(0.25)
    loss, _ = K.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    dual = loss - K.aggregate_loss(excess, mask, "token-mean")
    assert dual.item() == pytest.approx((3.0 + 1.1 + -2.0 * 1.2 + 1.6) / 4)
    dual.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 1] != 0  # the capped token is constant


# ---------------------------------------------------------------------------------------------------------
# PPO-ptx
# ---------------------------------------------------------------------------------------------------------


def test_ptx_batches_hold_prompt_and_completion_and_the_loss_is_their_nll():
    """encode_ptx closes each completion with the stop token; ptx_minibatch left-pads prompts and right-pads
    completions, drawing the same rows for the same key; ptx_loss is the token-mean NLL of the completions."""
    model = tiny_causal_lm()
    examples = [([5, 6, 7], [8, 9, 2]), ([10], [11, 2]), ([12, 13], [14, 15, 16, 2])]
    a, b = (ppo.ptx_minibatch(examples, 4, (0, 1, 0, 0), 0, "cpu") for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["mask"].shape[0] == 4
    for i in range(4):
        n = int(a["mask"][i].sum())
        assert a["tokens"][i, n - 1] == 2 and (a["tokens"][i, n:] == 0).all() and a["prompt_mask"][i, -1] == 1
    ids, full = torch.cat([a["prompt_ids"], a["tokens"]], 1), torch.cat([a["prompt_mask"], a["mask"]], 1)
    logits = model(input_ids=ids, attention_mask=full, position_ids=K.position_ids_from_mask(full)).logits
    P = a["prompt_ids"].shape[1]
    logp = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, a["tokens"][..., None])[..., 0]
    nll = -(logp * a["mask"]).sum() / a["mask"].sum()
    assert ppo.ptx_loss(model, a).item() == pytest.approx(nll.item(), rel=1e-4)
    tokenizer = toy.build_toy_tokenizer()
    (prompt, completion), = ppo.encode_ptx(tokenizer, [{"prompt": "1+1", "completion": "2"}], "plain", None)
    assert completion == tokenizer("2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_a_malformed_ptx_line_stops_before_any_model_loads(tmp_path, monkeypatch):
    """--ptx-dataset with a line that has no completion: one sentence naming file and line, before any weights load."""
    monkeypatch.setattr(K, "load_model", lambda *a, **k: pytest.fail("weights loaded before the ptx data was read"))
    data = tmp_path / "ptx.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(K.UserError, match=r"ptx.jsonl, line 2: each --ptx-dataset line needs"):
        ppo.main(ppo.Args(out_dir=str(tmp_path / "o"), ptx_coef=1.0, ptx_dataset=str(data)))


# ---------------------------------------------------------------------------------------------------------
# The score on the last real token, through real generation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos_is_pad", [True, False])
def test_score_lands_on_the_last_real_token(eos_is_pad):
    """Rows that stop get their score on their EOS (kept in the mask even when EOS == PAD, the toy's case), truncated
    rows on their last token; nothing after (TRL's removed PPO put it one token late, on the first PAD, when
    EOS != PAD)."""
    model = tiny_causal_lm()
    ids, mask = left_padded_batch([5, 3])
    keys = torch.arange(32)
    free = K.generate(model, ids, mask, max_new_tokens=10, num_samples=16, eos_token_id=-1, noise_keys=keys)
    counts = torch.bincount(free.tokens[:, :9].flatten(), minlength=97)  # an EOS that stops some rows, not all
    eos = int(counts[3:].argmax()) + 3
    pad = eos if eos_is_pad else 0
    gen = K.generate(model, ids, mask, max_new_tokens=10, num_samples=16, eos_token_id=eos, pad_token_id=pad,
                     noise_keys=keys)
    assert gen.truncated.any() and (~gen.truncated).any()
    scores = torch.arange(1.0, 33.0)
    rewards = ppo.token_rewards(scores, gen.logprobs, gen.logprobs, gen.mask, 0.5)
    for row in range(32):
        tokens, n = gen.tokens[row].tolist(), gen.tokens.shape[1]
        last = tokens.index(eos) if not gen.truncated[row] else n - 1
        assert gen.mask[row, last] == 1 and gen.mask[row, last + 1:].sum() == 0
        assert rewards[row].nonzero().flatten().tolist() == [last] and rewards[row, last] == scores[row]


# ---------------------------------------------------------------------------------------------------------
# The critic
# ---------------------------------------------------------------------------------------------------------


def critic_from(policy):
    """A token-classification critic with the policy's backbone and, as its head, the policy's output row of token 5:
    its value at a position is then the policy's logit of token 5 there."""
    from transformers import Qwen2ForTokenClassification

    config = policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1})
    critic = Qwen2ForTokenClassification(config)
    critic.model.load_state_dict(policy.model.state_dict())
    with torch.no_grad():
        critic.score.weight.copy_(policy.lm_head.weight[5:6])
        critic.score.bias.zero_()
    return ppo.dropout_off(critic)


def test_values_are_read_where_the_token_is_predicted():
    """V(s_t) for response token t comes from the position that predicts token t (the last prompt token for t = 0),
    the position token_logprobs reads log pi(o_t) from; over length-sorted micro-batches too."""
    policy = tiny_causal_lm()
    critic = critic_from(policy)
    prompt_ids, prompt_mask = left_padded_batch([4, 2, 6], seed=3)
    tokens = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=tokens, mask=mask)
    values = ppo.critic_values(critic, batch)
    ids, full = torch.cat([prompt_ids, tokens], 1), torch.cat([prompt_mask, mask], 1)
    logits = policy(input_ids=ids, attention_mask=full, position_ids=K.position_ids_from_mask(full)).logits
    P = prompt_ids.shape[1]
    for t in range(5):
        assert torch.allclose(values[:, t], logits[:, P - 1 + t, 5], atol=1e-5)
    split = ppo.rollout_values(critic, batch, max_tokens=16)
    assert len(K.micro_batches(batch, 16)) > 1 and torch.allclose(split * mask, values * mask, atol=1e-5)


def test_value_loss_sends_a_gradient_to_the_whole_critic():
    """The clipped value loss through critic_values reaches the head and the backbone."""
    critic = critic_from(tiny_causal_lm())
    prompt_ids, prompt_mask = left_padded_batch([4, 3], seed=5)
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=torch.randint(3, 97, (2, 4)),
                 mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    values = ppo.critic_values(critic, batch)
    loss, _ = ppo.value_loss(values, values.detach(), torch.ones(2, 4), batch["mask"], 0.2)
    loss.backward()
    assert critic.score.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in critic.named_parameters()
               if "layers.0.self_attn.q_proj" in n)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A tiny random policy and a tiny random reward model (with held-out statistics), both with the toy tokenizer."""
    import transformers

    root = tmp_path_factory.mktemp("tiny_ppo")
    tokenizer = toy.build_toy_tokenizer()
    config = transformers.Qwen2Config(**{**toy.toy_model_config(tokenizer).to_dict(), "hidden_size": 32,
                                         "intermediate_size": 64, "num_hidden_layers": 1, "layer_types": None,
                                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(root / "policy")
    rm_config = transformers.Qwen2Config(**{**config.to_dict(), "num_labels": 1})
    rm_config.reward_mean, rm_config.reward_std = 0.1, 2.0
    transformers.Qwen2ForSequenceClassification(rm_config).save_pretrained(root / "rm")
    for d in ("policy", "rm"):
        tokenizer.save_pretrained(root / d)
    return str(root / "policy"), str(root / "rm")


def test_critic_heads_start_small_or_from_the_reward_model(tiny_dirs):
    """From a causal LM the head is new (std 1e-3, bias 0); from a reward model it is the reward head; dropout off."""
    from safetensors.torch import load_file

    policy_dir, rm_dir = tiny_dirs
    new = ppo.load_critic(ppo.Args(model=policy_dir), "cpu")
    assert new.score.weight.std().item() == pytest.approx(1e-3, rel=0.3) and new.score.bias.abs().max() == 0
    assert new.config.classifier_dropout == 0.0 and not any(isinstance(m, torch.nn.Dropout) and m.p
                                                            for m in new.modules())
    from_rm = ppo.load_critic(ppo.Args(model=policy_dir, reward_model=rm_dir, critic="reward_model"), "cpu")
    rm_head = load_file(os.path.join(rm_dir, "model.safetensors"))["score.weight"]  # normalised as the scores are:
    assert torch.allclose(from_rm.score.weight * 2.0, rm_head) and torch.allclose(from_rm.score.bias, torch.tensor(
        [-0.1 / 2.0]))  # (r - mean) / std with the reward model's saved mean 0.1 and std 2.0


# ---------------------------------------------------------------------------------------------------------
# Presets and errors
# ---------------------------------------------------------------------------------------------------------


def test_presets_set_their_papers_switches_and_flags_win():
    """Each preset's switches; a flag given wins over the preset, even at the plain value, from Python and the CLI."""
    rlhf = ppo.Args(preset="rlhf")
    assert (rlhf.critic, rlhf.lam, rlhf.kl_coef, rlhf.kl_target, rlhf.num_epochs, rlhf.num_minibatches,
            rlhf.missing_eos_score, rlhf.rewards) == ("reward_model", 0.95, 0.05, 0.0, 4, 1, -1.0, ("reward_model",))
    zieg = ppo.Args(preset="ziegler")
    assert (zieg.kl_coef, zieg.kl_target, zieg.kl_horizon, zieg.whiten_rewards) == (0.15, 6.0, 10_000, True)
    orz = ppo.Args(preset="orz")
    assert (orz.gamma, orz.lam, orz.kl_coef, orz.critic, orz.missing_eos_score, orz.rewards) == (
        1.0, 1.0, 0.0, "policy", 0.0, ("task",))
    # ORZ's code: one pass (max_epochs 1), 1 policy step (policy_update_steps 1), 12 critic steps (critic_update_steps)
    assert (orz.num_epochs, orz.num_minibatches, orz.critic_epochs, orz.critic_num_minibatches) == (1, 1, 1, 12)
    vapo = ppo.Args(preset="vapo")
    assert (vapo.critic_warmup_steps, vapo.lam, vapo.actor_lam_alpha, vapo.clip_high, vapo.loss_agg) == (
        50, 1.0, 0.05, 0.28, "token-mean")
    plain = ppo.Args()
    assert (plain.preset, plain.lam, plain.kl_coef, plain.critic, math.isnan(plain.missing_eos_score)) == (
        "ppo", 1.0, 0.0, "policy", True)
    assert plain.num_epochs * plain.num_minibatches > 1 and plain.kl_target_unit == "sequence"  # the clip can act
    assert ppo.Args(preset="rlhf", lam=1.0).lam == 1.0
    assert ppo.cli(["--preset", "rlhf", "--lam", "1.0", "--kl-coef", "0"]) == ppo.Args(preset="rlhf", lam=1.0,
                                                                                      kl_coef=0.0)
    assert ppo.cli([]) == ppo.Args()
    with pytest.raises(ValueError, match="Unknown preset"):
        ppo.Args(preset="grpo")


def test_impossible_settings_fail_before_any_model_loads(tmp_path):
    """Uneven batches, a bad lambda, an adaptive controller at beta 0, a missing reward model: one clear error each."""
    cases = [(dict(prompts_per_step=6, num_minibatches=8), "cannot fill --num-minibatches 8"),
             (dict(prompts_per_step=6, critic_num_minibatches=12), "--critic-num-minibatches 12"),
             (dict(actor_lam_alpha=-0.05), "--actor-lam-alpha -0.05 would make the actor's lambda"),
             (dict(dual_clip=0.5), "--dual-clip 0.5 must exceed 1"), (dict(min_lr_ratio=2.0), "--min-lr-ratio"),
             (dict(lam=1.5), "--lam"),
             (dict(kl_target=6.0), "--kl-coef > 0"), (dict(rewards=("task",), reward_weights=(1.0, 2.0)), "one weight"),
             (dict(preset="rlhf", reward_model=str(tmp_path / "nope")), "does not exist"),
             (dict(temperature=0.0), "temperature > 0"), (dict(critic_lr=0.0), "--critic-lr must be positive"),
             (dict(lr=-1.0), "--lr -1.0: must be positive")]
    for kw, message in cases:
        with pytest.raises(K.UserError, match=message):
            ppo.check_args(ppo.Args(**kw), runs.DistInfo())
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1"}) + "\n")
    with pytest.raises(K.UserError, match="no 'answer', which the rewards need"):
        ppo.main(ppo.Args(dataset=str(data), out_dir=str(tmp_path / "o"), rewards=("accuracy",), reward_weights=(1.0,)))


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------


def small_args(policy_dir, out_dir, **kw):
    base = dict(model=policy_dir, out_dir=str(out_dir), max_steps=2, prompts_per_step=4, num_generations=2,
                max_new_tokens=10, eval_every=0, plot=False, rewards=("tag_count", "task"), reward_weights=(1.0, 1.0))
    return ppo.Args(**{**base, **kw})


@pytest.mark.parametrize("preset", list(ppo.PRESETS))
def test_every_preset_runs_two_steps(preset, tiny_dirs, tmp_path):
    """Two steps of each preset (the RLHF ones on a tiny reward model) log the diagnostics and leave a loadable
    policy and critic, both changed (except the policy during VAPO's critic warm-up)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    policy_dir, rm_dir = tiny_dirs
    kw = {"rlhf": dict(rewards=("reward_model",), reward_weights=(1.0,), num_epochs=2, num_minibatches=2),
          "ziegler": dict(rewards=("reward_model", "task"), reward_weights=(1.0, 1.0), kl_horizon=100),
          "orz": dict(rewards=("task",), reward_weights=(1.0,), critic_epochs=2, critic_num_minibatches=4),
          "vapo": dict(critic_warmup_steps=1)}.get(preset, {})
    ppo.main(small_args(policy_dir, tmp_path, preset=preset, reward_model=rm_dir, eval_every=2, eval_size=4,
                        eval_samples=1, **kw))
    rows = runs.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("rollout/reward_mean", "rollout/eos_rate", "rollout/response_length", "train/value_loss",
                "train/value_clip_frac", "train/explained_variance", "train/advantage_std", "train/return_mean",
                "train/policy_loss", "train/clip_frac", "train/ratio_max", "train/entropy", "train/kl_coef",
                "eval/accuracy", "perf/critic_pass_s"):
        assert key in rows[-1], key
    if preset in ("rlhf", "ziegler"):
        assert "train/kl_seq" in rows[-1] and "train/kl_token_k3" in rows[-1] and "perf/reference_pass_s" in rows[-1]
        assert rows[1]["train/kl_seq"] == pytest.approx(0.0, abs=1e-6)  # the first rollout: policy = reference
    if preset == "ziegler":
        assert rows[2]["train/kl_coef"] < 0.15  # KL far under its target: beta shrank
    final = tmp_path / "final"
    critic = AutoModelForTokenClassification.from_pretrained(final / "critic")  # an ordinary checkpoint
    start = load_file(os.path.join(rm_dir if preset in ("rlhf", "ziegler") else policy_dir, "model.safetensors"))
    moved = {k: not torch.equal(v, start[k]) for k, v in critic.state_dict().items() if k in start}
    assert any(moved.values())
    policy, init = load_file(final / "model.safetensors"), load_file(os.path.join(policy_dir, "model.safetensors"))
    assert any(not torch.equal(policy[k], init[k]) for k in init)


def test_the_default_preset_exercises_the_trust_region(tiny_dirs, tmp_path):
    """`ppo` (2 epochs x 2 minibatches) takes optimizer steps off-policy: with a large learning rate the ratio leaves
    1, the policy clip and the value clip both act, and the approx-KL to pi_old is logged (one epoch of one minibatch
    had the ratio exactly 1, so nothing was ever clipped)."""
    ppo.main(small_args(tiny_dirs[0], tmp_path, lr=3e-2, critic_lr=3e-2, warmup_steps=0))
    rows = runs.read_metrics(str(tmp_path))[1:]
    assert all(r["train/ratio_max"] != 1.0 and r["train/approx_kl"] > 0 for r in rows)
    assert max(r["train/clip_frac"] for r in rows) > 0 and max(r["train/value_clip_frac"] for r in rows) > 0


def recorded_steps(monkeypatch) -> list:
    """Which models each optimizer step of a run stepped (rl_kernels.guarded_step's names), in order."""
    steps, real = [], K.guarded_step
    monkeypatch.setattr(K, "guarded_step", lambda *a, names=None, **k: steps.append(tuple(names)) or real(
        *a, names=names, **k))
    return steps


def test_policy_and_critic_take_their_own_minibatch_counts(tiny_dirs, tmp_path, monkeypatch):
    """Equal counts: both models step together, epochs x minibatches times; --critic-num-minibatches apart: each its
    own pass; ORZ's preset: per rollout 1 policy step and 12 critic steps (12 prompts: one each)."""
    steps = recorded_steps(monkeypatch)
    ppo.main(small_args(tiny_dirs[0], tmp_path / "same", max_steps=1))
    assert steps == [("policy", "critic")] * 4  # 2 epochs x 2 minibatches
    steps.clear()
    ppo.main(small_args(tiny_dirs[0], tmp_path / "apart", max_steps=1, num_epochs=1, critic_num_minibatches=4))
    assert steps == [("policy",)] * 2 + [("critic",)] * 4
    steps.clear()
    ppo.main(small_args(tiny_dirs[0], tmp_path / "orz", max_steps=1, preset="orz", prompts_per_step=12,
                        num_generations=1, rewards=("task",), reward_weights=(1.0,)))
    assert steps == [("policy",)] + [("critic",)] * 12


def test_each_loss_option_reaches_the_policy(tiny_dirs, tmp_path):
    """PPO-ptx (on the toy corpus), a KL term in the loss, the entropy bonus and dual-clip each run, log their metric,
    and (all but dual-clip, which may find no ratio above its cap) move the policy elsewhere than the plain run."""
    from safetensors.torch import load_file

    options = {"plain": {}, "ptx": dict(ptx_coef=1.0, ptx_batch_size=4), "kl_loss": dict(kl_loss_coef=0.5),
               "entropy": dict(entropy_coef=0.5), "dual_clip": dict(dual_clip=3.0)}
    logged = {"ptx": "train/ptx_loss", "kl_loss": "train/kl", "entropy": "train/entropy",
              "dual_clip": "train/dual_clip_frac"}
    weights = {}
    for name, kw in options.items():
        ppo.main(small_args(tiny_dirs[0], tmp_path / name, max_steps=1, lr=1e-2, warmup_steps=0, **kw))
        weights[name] = load_file(tmp_path / name / "final" / "model.safetensors")
        if name in logged:
            assert math.isfinite(runs.read_metrics(str(tmp_path / name))[-1][logged[name]]), name
    for name in ("ptx", "kl_loss", "entropy"):
        assert any(not torch.equal(weights[name][k], weights["plain"][k]) for k in weights["plain"]), name
    assert runs.read_metrics(str(tmp_path / "kl_loss"))[-1]["train/kl"] > 0  # pi_ref loaded and read


def test_a_cosine_schedule_decays_each_model_learning_rate(tiny_dirs, tmp_path):
    """--min-lr-ratio 0.1: after 1 warmup step the learning rate follows a cosine down to 0.1 lr at --max-steps."""
    ppo.main(small_args(tiny_dirs[0], tmp_path, max_steps=3, lr=1e-3, warmup_steps=1, min_lr_ratio=0.1))
    factor = runs.warmup_schedule(1, 3, 0.1)
    assert [r["train/lr"] for r in runs.read_metrics(str(tmp_path)) if "train/lr" in r] == pytest.approx(
        [1e-3 * factor(s) for s in (1, 2, 3)])
    assert factor(3) == pytest.approx(0.1)


def test_critic_warmup_leaves_the_policy_alone(tiny_dirs, tmp_path):
    """During the critic-only steps the policy keeps its weights while the critic trains."""
    from safetensors.torch import load_file

    ppo.main(small_args(tiny_dirs[0], tmp_path, preset="vapo", max_steps=1))
    policy, init = load_file(tmp_path / "final" / "model.safetensors"), load_file(
        os.path.join(tiny_dirs[0], "model.safetensors"))
    assert all(torch.equal(policy[k], init[k]) for k in init)
    assert "train/policy_loss" not in runs.read_metrics(str(tmp_path))[-1]


def test_resume_matches_uninterrupted_run(tiny_dirs, tmp_path):
    """Stopped after 2 steps and resumed to 3, the run ends with the policy, the critic and the adaptive beta of an
    uninterrupted 3-step run, bit for bit; a critic left beside its checkpoint by a cut-off save is found."""
    from safetensors.torch import load_file

    kw = dict(kl_coef=0.2, kl_target=0.001, kl_horizon=10, num_epochs=2)  # beta moves every step
    ppo.main(small_args(tiny_dirs[0], tmp_path / "straight", max_steps=3, **kw))
    parts = tmp_path / "parts"
    ppo.main(small_args(tiny_dirs[0], parts, max_steps=2, save_every=2, **kw))
    os.replace(parts / "checkpoint-2" / "critic", parts / ".critic-checkpoint-2")  # as if cut off before the move
    ppo.main(small_args(tiny_dirs[0], parts, max_steps=3, resume=True, **kw))
    for sub in ("", "critic"):
        a = load_file(tmp_path / "straight" / "final" / sub / "model.safetensors")
        b = load_file(parts / "final" / sub / "model.safetensors")
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    betas = [r["train/kl_coef"] for r in runs.read_metrics(str(tmp_path / "straight"))]
    assert betas[2] != betas[0] and betas == [r["train/kl_coef"] for r in runs.read_metrics(str(parts))]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(strategy, tiny_dirs, tmp_path):
    """torchrun with 2 ranks ends with the policy and critic of one process with the same global batch: rank-invariant
    sampling, minibatches strided over prompts, advantages whitened and token means taken over both ranks, and
    PPO-ptx's gradient (every rank draws the same rows; its own backward after the rollout's) averaged as one."""
    from safetensors.torch import load_file

    common = ["--model", tiny_dirs[0], "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "2",
              "--max-new-tokens", "10", "--eval-every", "0", "--device", "cpu", "--no-plot", "--num-epochs", "2",
              "--num-minibatches", "2", "--rewards", "tag_count", "task", "--reward-weights", "1.0", "1.0",
              "--kl-coef", "0.1", "--ptx-coef", "0.5", "--ptx-batch-size", "4", "--strategy", strategy]
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "ppo.py"), "--out-dir", str(tmp_path / "two"), *common,
                          "--micro-batch-tokens", "48"], env=environ, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "ppo.py"), "--out-dir", str(tmp_path / "one"), *common],
                         env=environ, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    m1, m2 = runs.read_metrics(str(tmp_path / "one")), runs.read_metrics(str(tmp_path / "two"))
    for r1, r2 in zip(m1, m2):
        for k in ("rollout/reward_mean", "train/policy_loss", "train/value_loss", "train/kl_seq", "train/ptx_loss"):
            assert r1[k] == pytest.approx(r2[k], abs=1e-4), k
    for sub in ("", "critic"):
        a = load_file(tmp_path / "one" / "final" / sub / "model.safetensors")
        b = load_file(tmp_path / "two" / "final" / sub / "model.safetensors")
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (sub, k)


@pytest.mark.parametrize("max_new_tokens", [300, 100_000])
def test_a_length_past_the_context_stops_before_any_weights_load(max_new_tokens, tmp_path, monkeypatch):
    """--max-new-tokens past the toy model's context of 256 on a built-in task: one sentence, before any weights
    load (the policy's, the reference's or the critic's)."""
    monkeypatch.setattr(K, "load_model", lambda *a, **k: pytest.fail("weights loaded before the length check"))
    with pytest.raises(K.UserError, match=rf"--max-new-tokens {max_new_tokens} plus arithmetic's longest prompt .* "
                                          r"context of 256 tokens"):
        ppo.main(ppo.Args(max_new_tokens=max_new_tokens, out_dir=str(tmp_path)))


def test_a_cap_that_cuts_most_rollouts_is_warned_about_once(tiny_dirs, tmp_path):
    """--max-new-tokens 2 cuts most rollouts: one warning over two steps, naming the share and the flag."""
    with pytest.warns(RuntimeWarning) as caught:
        ppo.main(small_args(tiny_dirs[0], tmp_path, max_new_tokens=2))
    messages = [str(w.message) for w in caught if "hit --max-new-tokens 2" in str(w.message)]
    assert len(messages) == 1 and re.match(r"\d+% of step 1's rollouts", messages[0])


def test_overoptimisation_bench_pairs_each_accuracy_with_the_kl_of_the_same_policy():
    """The accuracy evaluated at step s is the policy after s updates; its KL is logged by the rollout of step s + 1
    (the row of step s holds the KL of the policy one update earlier). Gao's points read gold, proxy and KL off one
    rollout."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import rlhf_overoptimisation as bench

    history = [{"step": 0, "eval/accuracy": 0.4}, {"step": 1, "train/kl_seq": 0.0},
               {"step": 5, "train/kl_seq": 2.0, "eval/accuracy": 0.7}, {"step": 6, "train/kl_seq": 3.0},
               {"step": 10, "train/kl_seq": 5.0, "eval/accuracy": 0.5}]
    pairs = bench.eval_kl_pairs(history)
    assert pairs[:2] == [(0, 0.4, 0.0), (5, 0.7, 3.0)] and pairs[2][:2] == (10, 0.5) and math.isnan(pairs[2][2])
    rollout = {"step": 3, "train/kl_seq": 4.0, "rollout/accuracy": 0.6, "rewards/reward_model": 1.5}
    assert bench.gao_points([rollout, {"step": 4, "eval/accuracy": 0.1}]) == [(2.0, 0.6, 1.5)]


def test_every_ppo_step_logs_the_mismatch_and_takes_the_corrections(tiny_dirs, tmp_path):
    """mismatch/ metrics in every step: from the pi_old pass of the default 2 x 2 update and, with 1 x 1 (no pass),
    from the update's own first forward (or a pi_old pass in a critic-only warm-up step, which has no policy forward); with an injected mismatch, token TIS weighs the policy loss (is_weight_*
    logged, capped at 2, the first step's policy loss unlike the uncorrected run's on the same rollout), bypass makes
    the ratio pi_theta / mu (above 1 at the first step), and the off-policy sequence mask runs."""
    runs_ = {"plain": {}, "one_pass": dict(num_epochs=1, num_minibatches=1),
             "critic_warmup": dict(num_epochs=1, num_minibatches=1, critic_warmup_steps=1),
             "noise": dict(sampler_logit_noise=0.5, top_k=10),
             "tis": dict(sampler_logit_noise=0.5, top_k=10, rollout_correction="verl-token-tis"),
             "bypass": dict(sampler_logit_noise=0.5, rollout_correction="bypass", num_epochs=1, num_minibatches=1),
             "offpolicy": dict(sampler_logit_noise=0.5, offpolicy_mask_delta=0.01)}
    rows = {}
    for name, kw in runs_.items():
        ppo.main(small_args(tiny_dirs[0], tmp_path / name, max_new_tokens=16, **kw))
        rows[name] = runs.read_metrics(str(tmp_path / name))
        assert len(rows[name]) == 2 and all("mismatch/kl_k3" in r for r in rows[name]), name
    for name in ("plain", "one_pass", "critic_warmup"):
        assert all(r["mismatch/logprob_diff_max"] < 1e-4 and r["mismatch/kept_mass"] == 1.0 for r in rows[name])
    assert all(r["mismatch/logprob_diff_mean"] > 0.02 and r["mismatch/kept_mass"] < 1.0 for r in rows["noise"])
    assert all(r["mismatch/is_weight_max"] <= 2.0 + 1e-6 for r in rows["tis"])
    assert "mismatch/is_weight_max" not in rows["noise"][0]
    assert rows["tis"][0]["train/policy_loss"] != rows["noise"][0]["train/policy_loss"]
    assert rows["bypass"][0]["train/ratio_max"] > 1.0
    assert rows["one_pass"][0]["train/ratio_max"] == 1.0
