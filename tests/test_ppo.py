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
    assert ppo.token_rewards(scores, lp, ref, mask, 0.1, clamp=0.2)[1, 1] == pytest.approx(0.02 - 1.0)


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


# ---------------------------------------------------------------------------------------------------------
# The score on the last real token, through real generation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos_is_pad", [True, False])
def test_score_lands_on_the_last_real_token(eos_is_pad):
    """Rows that stop get their score on their EOS (kept in the mask even when EOS == PAD, the toy's case), truncated
    rows on their last token; nothing after (TRL's removed PPO put it one token early when EOS == PAD)."""
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
    assert (rlhf.critic, rlhf.lam, rlhf.kl_coef, rlhf.kl_target, rlhf.num_epochs, rlhf.missing_eos_score,
            rlhf.rewards) == ("reward_model", 0.95, 0.05, 0.0, 4, -1.0, ("reward_model",))
    zieg = ppo.Args(preset="ziegler")
    assert (zieg.kl_coef, zieg.kl_target, zieg.kl_horizon, zieg.whiten_rewards) == (0.15, 6.0, 10_000, True)
    orz = ppo.Args(preset="orz")
    assert (orz.gamma, orz.lam, orz.kl_coef, orz.critic, orz.missing_eos_score, orz.critic_epochs,
            orz.rewards) == (1.0, 1.0, 0.0, "policy", 0.0, 12, ("task",))
    vapo = ppo.Args(preset="vapo")
    assert (vapo.critic_warmup_steps, vapo.lam, vapo.actor_lam_alpha, vapo.clip_high, vapo.loss_agg) == (
        50, 1.0, 0.05, 0.28, "token-mean")
    plain = ppo.Args()
    assert (plain.preset, plain.lam, plain.kl_coef, plain.critic, math.isnan(plain.missing_eos_score)) == (
        "ppo", 1.0, 0.0, "policy", True)
    assert ppo.Args(preset="rlhf", lam=1.0).lam == 1.0
    assert ppo.cli(["--preset", "rlhf", "--lam", "1.0", "--kl-coef", "0"]) == ppo.Args(preset="rlhf", lam=1.0,
                                                                                      kl_coef=0.0)
    assert ppo.cli([]) == ppo.Args()
    with pytest.raises(ValueError, match="Unknown preset"):
        ppo.Args(preset="grpo")


def test_impossible_settings_fail_before_any_model_loads(tmp_path):
    """Uneven batches, a bad lambda, an adaptive controller at beta 0, a missing reward model: one clear error each."""
    cases = [(dict(prompts_per_step=6, num_minibatches=4), "split evenly"), (dict(lam=1.5), "--lam"),
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
          "orz": dict(rewards=("task",), reward_weights=(1.0,), critic_epochs=2),
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
    sampling, minibatches strided over prompts, advantages whitened and token means taken over both ranks."""
    from safetensors.torch import load_file

    common = ["--model", tiny_dirs[0], "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "2",
              "--max-new-tokens", "10", "--eval-every", "0", "--device", "cpu", "--no-plot", "--num-epochs", "2",
              "--num-minibatches", "2", "--rewards", "tag_count", "task", "--reward-weights", "1.0", "1.0",
              "--kl-coef", "0.1", "--strategy", strategy]
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
        for k in ("rollout/reward_mean", "train/policy_loss", "train/value_loss", "train/kl_seq"):
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
