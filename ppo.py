"""ppo.py: PPO with a critic in one file: classic RLHF on a reward model, and Open-Reasoner-Zero on verifiable rewards.

For each prompt q sample G responses o from pi_old and score each (verifiable rewards, a learned reward model, or a
weighted mix). The score becomes per-token rewards with a KL penalty to a frozen reference; a critic V estimates the
value of every prefix; GAE turns rewards and values into advantages; mu epochs of minibatch steps of the clipped
surrogate then train the policy, and of the clipped value loss the critic, each with its own optimizer and learning
rate (Ouyang et al. 2022; Schulman et al. 2017):

    r_t     = -beta * clamp(KL_t, -10, 10) + [t = last real token] * score(q, o)
              KL_t = log pi_old(o_t) - log pi_ref(o_t) (k1) or k3; the clamp as OpenRLHF (any estimator), verl (k3)
    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),     V after the last real token = 0
    A_t     = sum_l (gamma * lam)^l delta_{t+l},     R_t = A_t + V(s_t)                            (GAE, Schulman 2016)
    A_t    <- (A_t - mean) / std over every response token of the batch, all ranks
    L_pi    = token-mean[ l_t + beta_loss * k3_t - c_H * H_t ] + gamma_ptx * token-mean_{x ~ D_ptx}[ -log pi_theta(x) ]
              l_t = max(-rho_t A_t, -clip(rho_t, 1 - eps_low, 1 + eps_high) A_t),  rho_t = pi_theta / pi_old
              l_t <- min(l_t, -c A_t) where A_t < 0                                   (dual-clip, Ye et al. 2020 eq. 5)
    L_V     = 1/2 token-mean[ max((V_t - R_t)^2, (clip(V_t, V_old,t - eps_v, V_old,t + eps_v) - R_t)^2) ]

    symbol        meaning                                                          Args
    G             samples per prompt (PPO needs no group: 1 works)                 num_generations
    score         weighted sum of the rewards; "reward_model" is the reward        rewards, reward_weights,
                  model at --reward-model, normalised by its held-out mean, std    reward_model
    beta          KL coefficient in the reward, fixed or Ziegler's controller      kl_coef (kl_target, kl_target_unit,
                                                                                   kl_horizon)
    gamma, lam    discount; GAE lambda of the critic's returns R_t                 gamma, lam
    lam_actor     the actor's lambda (VC-PPO), or 1 - 1/(alpha |o|) (VAPO)         actor_lam, actor_lam_alpha
    eps_low/high  policy clip (clip-higher: eps_high > eps_low)                    clip_low, clip_high
    c             dual-clip bound on a negative advantage's loss (0: off)          dual_clip
    beta_loss     a KL term in the loss instead, GRPO-style (k3 by default)        kl_loss_coef, kl_loss_estimator
    c_H           entropy bonus                                                    entropy_coef
    gamma_ptx     PPO-ptx: weight of the SFT/pretraining loss (InstructGPT eq. 2)  ptx_coef, ptx_dataset
    eps_v         value clip                                                       value_clip
    mu            epochs over each rollout: the policy's, the critic's             num_epochs, critic_epochs
    minibatches   optimizer steps per epoch: the policy's, the critic's            num_minibatches,
                                                                                   critic_num_minibatches
    V             the critic: a transformers token-classification model            critic, critic_lr

KL units: per token in the reward. The controller sees, by --kl-target-unit, the per-SEQUENCE KL (default: sum_t k1_t
averaged over the responses; Ziegler's and TRL's target of 6 nats is per sequence) or the per-TOKEN KL (verl's and
OpenRLHF's: each response's mean k1 per token, averaged over the responses), with n_steps = responses per step: a
per-token target copied into the per-sequence unit is 10-1000x too tight. Logged: train/kl_seq, train/kl_token_k1,
train/kl_token_k3 and beta as train/kl_coef.
Alignment: V(s_t), the value of the state before token t, is read at the position that predicts token t (the last
prompt token for t = 0), where rl_kernels.token_logprobs reads log pi(o_t). The score sits on each row's last real
token: its EOS (in the mask even when EOS == PAD) or, if truncated, its last token (TRL's removed PPO put it one
token late, on the first PAD, when EOS != PAD).
Shapes: B prompts, G samples each, R = B*G rows (prompt-major), P prompt tokens, N response tokens.

Presets (`--preset NAME` sets the switches you leave unset; any flag you pass wins, even at the plain value). Each
constant with its source; "toy" marks what is ours, sized for the toy world:
    ppo      (default) verifiable rewards task + 0.1 format (as grpo.py), critic from the policy, gamma = lam = 1
             (ORZ; VC-PPO), no KL, value clip 0.2 (N+), 2 epochs x 2 minibatches per rollout at lr 1e-4 (toy:
             between verl's 1 x 4, ppo_epochs 1 and ppo_mini_batch_size 256 of train_batch_size 1024, and N+'s 4 x 1),
             so three of each step's four optimizer steps see rho != 1 and the clip acts (train/clip_frac,
             train/value_clip_frac, train/approx_kl).
    rlhf     InstructGPT / "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024; their PpoHParams):
             the reward model's score alone, critic from the reward model (its head too), gamma 1, lam 0.95, fixed
             beta 0.05 (k1), 4 epochs x 1 minibatch (noptepochs 4, nminibatches 1: epochs 2-4 are off-policy), clip
             and value clip 0.2, a response without EOS scores -1 (penalty_reward_value). N+'s code also whitens the
             rewards: --whiten-rewards.
    ziegler  Ziegler et al. 2019 (lm-human-preferences): rlhf with the adaptive controller (beta_0 0.15, target 6 nats
             per sequence, horizon 10,000 responses) and whitened rewards ((r - mu) / sigma + mu over the batch).
    orz      Open-Reasoner-Zero (Hu et al. 2025; playground/orz_7b_ppo.py, ppo_base_exp.py): reward 1 only for a
             correct answer that stopped on its own (no format reward, a truncated response scores 0), gamma = lam =
             1, no KL and no reference, critic from the policy, one pass over each rollout (max_epochs 1): 1 policy
             optimizer step (policy_update_steps 1) and 12 critic optimizer steps (critic_update_steps 12).
    vapo     VAPO (Yue et al. 2025): 50 critic-only steps first (value pretraining), decoupled GAE with the critic's
             lam 1 (VC-PPO, Yuan et al. 2025) and the length-adaptive actor lam = 1 - 1/(0.05 |o|), clip-higher
             0.2/0.28 (DAPO), token-level loss, no KL; epochs and minibatches the default's (toy). Left out: its
             group sampling and its LM loss on correct samples.
More from the literature: --kl-estimator k3, --whiten-rewards, --normalize-scores, --score-clip (OpenRLHF),
--missing-eos-score (N+: -1, ORZ: 0), --log-ratio-clamp (verl), --critic-warmup-steps (verl), --dual-clip 3 (verl's
clip_ratio_c), --kl-loss-coef (verl's use_kl_loss, kl_loss_coef 0.001 with k3), --entropy-coef, --ptx-coef
(InstructGPT's PPO-ptx), --min-lr-ratio (a cosine schedule, as sft.py).

Deliberate choices:
  - Two optimizers, as OpenRLHF and verl (N+ had one loss pg + c_v * vf): with two models, the critic's learning rate
    plays c_v's part. Dropout is off in every model (N+ details).
  - A critic from a causal LM gets a new head, N(0, 0.001^2) with bias 0, so values start near 0; from a reward model
    it keeps the reward head (InstructGPT), normalised as the scores are, so values start at each prefix's score.
  - pi_ref and V_old are computed once per rollout at the sampling temperature, over length-sorted micro-batches;
    pi_old too when several epochs or minibatches need it, a decoupled correction does, a critic-only warm-up step
    has no policy forward to measure the mismatch in, or the k1 in the reward needs it exact and the sampler's
    log-probs are not (bf16: rl_kernels.sampled_logprobs_exact); else the sampler's log-probs serve.
    Minibatches are strided over each rank's prompts (the same rows on any number of ranks when the count divides
    each rank's prompts; else the first minibatches hold one prompt more, where ORZ drops the remainder), their order
    reshuffled every epoch. With the same count the policy and the critic step together on the same minibatches;
    with different counts each model makes its own pass. Sampling noise is keyed as in grpo.py: same seed, same
    prompts and first samples.
  - Sampler and trainer as in grpo.py (docs/mismatch.md): log mu against pi_old on every step (mismatch/ metrics),
    the kept set of top-p/top-k in every log-prob pass (--keep-sampling-mask), --rollout-correction decoupled (one
    pi_old pass, the policy loss weighted by w_t, a rejected token weighted 0 so the token-mean's denominator is
    unchanged) or bypass (pi_old := mu), --offpolicy-mask-delta, --batch-invariant. The critic fits every token:
    a correction reweights the policy's gradient, not the value targets.
  - PPO-ptx: each policy optimizer step adds the gradient of gamma_ptx times the mean NLL of --ptx-batch-size rows of
    --ptx-dataset (prompt, completion; "toy": toy_world.toy_corpus, the toy base's own pretraining recipe), drawn
    by (seed, step, epoch, minibatch), at temperature 1, in its own backward after the rollout's.
  - The run's life is grpo.py's (rl_kernels.Run): one run per --out-dir (--resume, --overwrite), SIGTERM/SIGINT save
    and exit 128 + the signal, a slow reward interrupted by one drops its step; mixed precision as grpo.py (the
    reference and the reward model frozen in the compute dtype, the critic trained over fp32 master weights).
  - A NaN/inf in either loss or gradient norm skips the optimizer step of both models (rl_kernels.guarded_step on
    both; each its own when their minibatch counts differ); nan_patience in a row saves and stops.

Launch:
    python ppo.py                                            # verifiable rewards in the toy world, CPU
    python rlhf_reward_model.py && python ppo.py --preset rlhf --track-kl    # classic RLHF on the toy reward model
    torchrun --nproc_per_node 8 ppo.py --preset orz --model Qwen/Qwen2.5-0.5B-Instruct --dataset data.jsonl \\
        --template chat --lr 1e-6 --critic-lr 5e-6 --max-new-tokens 1024 --strategy fsdp

Results in the toy world (toy/base, 80 steps of 16 prompts x 8 samples; docs/ppo.md has the tables, the plots and
the commands; 2 cores shared with other jobs, one torch thread):
    python ppo.py     held-out greedy accuracy 39.0% -> 87.5% (seed 0); over seeds 0-2 85.7 +- 1.8%, +48.5 to +53.0
                      points (+51.5 to +60.5 by step 10), a clip fraction of 0.45-0.47% on average and above 0 at
                      every step; grpo.py at the same 2 x 2 update and lr 87.5 +- 2.0%, a gap within the noise; a
                      step costs 1.72x GRPO's (bench/critic_cost.py, interleaved: the critic doubles the update).
    --lam 0.95        learns alike (86.5 +- 3.3% after 80 steps, seeds 0-2); its critic fits better in every seed
                      (explained variance 0.29-0.46 against 0.15-0.20 over the last 20 steps).
    --preset rlhf     on the toy reward model alone, 40 steps, seeds 0-2: without a KL penalty the true accuracy peaks
                      at 83.8 +- 3.8% (step 10) and falls to 12.2 +- 4.9% while the reward model's score keeps rising;
                      fixed beta 0.05 ends at 78.7 +- 3.7%, the adaptive controller at 80.5 +- 7.0% (no difference).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

import rl_kernels as K
import rl_runs as runs
import rlhf_reward_model
import rlvr_rewards as env
import toy_world as toy

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class PPOArgs:
    """PPO's own flags: the preset and its switches, the critic, the KL, the update."""
    # The preset and its switches (None: the preset's value, PRESETS; else the plain PPO value)
    preset: Literal["ppo", "rlhf", "ziegler", "orz", "vapo"] = "ppo"
    """named set of the switches a paper changes (module docstring); fields left unset take the preset's values"""
    rewards: tuple[str, ...] = None
    """reward functions: built-in names, "task" (the dataset's verifier), "reward_model", or "module:function\""""
    critic: str = None
    """where the critic starts: "policy" (ORZ), "reward_model" (InstructGPT) or a checkpoint path"""
    gamma: float = None
    """discount"""
    lam: float = None
    """GAE lambda of the critic's returns (and of the actor's advantages unless --actor-lam is set)"""
    actor_lam: float = None
    """GAE lambda of the actor's advantages (VC-PPO's decoupled GAE); -1: the same as --lam"""
    actor_lam_alpha: float = None
    """VAPO's length-adaptive actor lambda 1 - 1/(alpha * response length), floored at 0; 0: off (alpha >= 0)"""
    kl_coef: float = None
    """beta: the per-token KL coefficient in the reward (the initial one with --kl-target)"""
    kl_estimator: Literal["k1", "k3"] = None
    """the KL estimator in the reward (Schulman), clamped to [-10, 10] per token (OpenRLHF, verl)"""
    kl_target: float = None
    """Ziegler's adaptive controller: target KL in nats, PER SEQUENCE by default (Ziegler, TRL: 6); verl's and
    OpenRLHF's targets are per token: pass --kl-target-unit token with them (0: fixed beta)"""
    kl_target_unit: Literal["sequence", "token"] = None
    """what the controller compares with --kl-target: the summed KL of a response (Ziegler, TRL) or its mean per
    token (verl, OpenRLHF), averaged over the responses"""
    kl_horizon: int = None
    """the adaptive controller's horizon, in responses"""
    value_clip: float = None
    """eps_v (0: no value clipping)"""
    clip_low: float = None
    """eps_low"""
    clip_high: float = None
    """eps_high (clip-higher: 0.28)"""
    loss_agg: LossAgg = None
    """policy-loss aggregation (verl's names)"""
    num_epochs: int = None
    """mu: policy epochs over each rollout"""
    num_minibatches: int = None
    """policy optimizer steps per epoch (each rank's prompts split into as many strided minibatches)"""
    critic_epochs: int = None
    """critic epochs over each rollout (0: the same as --num-epochs)"""
    critic_num_minibatches: int = None
    """critic optimizer steps per epoch (0: the same as --num-minibatches)"""
    critic_warmup_steps: int = None
    """first steps that train only the critic (VAPO's value pretraining, verl's critic_warmup)"""
    whiten_rewards: bool = None
    """whiten the token rewards over the batch's response tokens, keeping their mean, (r - mu) / sigma + mu, before
    GAE (Ziegler's and TRL's whiten(shift_mean=False))"""
    normalize_scores: bool = None
    """standardise the scores over the batch (all ranks)"""
    score_clip: float = None
    """clip the scores to [-c, c] after normalisation (0: off)"""
    missing_eos_score: float = None
    """the score of a response that never emitted EOS, replacing its reward (N+: -1; ORZ: 0); nan: keep its reward"""
    # Rollouts, rewards and the update
    reward_model: str = "runs/rlhf_reward_model/final"
    """reward model (rlhf_reward_model.py's output) behind the "reward_model" reward and --critic reward_model"""
    dual_clip: float = 0.0
    """c: cap a negative advantage's per-token loss at -c A (Ye et al. 2020; verl's clip_ratio_c 3); 0: off, else > 1"""
    kl_loss_coef: float = 0.0
    """beta_loss: a KL(pi_theta || pi_ref) term in the policy loss, GRPO-style (verl's use_kl_loss: 0.001); 0: off"""
    kl_loss_estimator: Literal["k1", "k2", "k3"] = "k3"
    """the KL estimator of --kl-loss-coef's term (verl's low_var_kl is k3)"""
    entropy_coef: float = 0.0
    """c_H: the entropy bonus -c_H * H_t per token in the policy loss"""
    ptx_coef: float = 0.0
    """gamma_ptx: PPO-ptx's weight of the SFT/pretraining NLL in the policy loss (InstructGPT); 0: off"""
    ptx_dataset: str = "toy"
    """PPO-ptx's data: "toy" (toy_world.toy_corpus, the toy base's pretraining recipe) or a .jsonl of {prompt,
    completion}"""
    ptx_batch_size: int = 16
    """PPO-ptx rows per policy optimizer step (split over the ranks)"""
    lr: float = 1e-4
    """policy AdamW learning rate (toy model, sized for the default's 4 steps per rollout; real LLMs: 1e-6 to 3e-6)"""
    critic_lr: float = 5e-4
    """critic AdamW learning rate (toy model; real LLMs: 2e-6 to 1e-5)"""
    warmup_steps: int = 5
    """linear warmup steps of each model's learning rate, then constant, or cosine with --min-lr-ratio"""
    min_lr_ratio: float = 1.0
    """after the warmup, cosine from lr down to lr * min_lr_ratio at --max-steps (sft.py's schedule); 1: constant"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0: off)"""
    log_ratio_clamp: float = 20.0
    """clamp log(pi/pi_old) in the loss to [-c, c], no gradient beyond (verl: 20); 0: off. (The KL in the reward is
    clamped apart, its estimate to [-10, 10] as OpenRLHF)"""
    track_kl: bool = False
    """load the reference even when beta = 0, to log the KL to it (one more forward per step)"""


@dataclass
class Args(runs.RunArgs, env.RLArgs, PPOArgs):
    """ppo.py's command line, in --help's order: PPO's flags (PPOArgs), those every RL script shares
    (rlvr_rewards.RLArgs: the policy, the task, rollouts, evaluation), and the run's (rl_runs.RunArgs)."""
    out_dir: str = "runs/ppo"

    def __post_init__(self):
        runs.apply_preset(self, PRESETS, PRESET_FIELDS)


# The switches a preset sets, at their plain PPO values, and what each preset changes.
PRESET_FIELDS = dict(rewards=("task", "format"), critic="policy", gamma=1.0, lam=1.0, actor_lam=-1.0,
                     actor_lam_alpha=0.0, kl_coef=0.0, kl_estimator="k1", kl_target=0.0, kl_target_unit="sequence",
                     kl_horizon=10_000, value_clip=0.2, clip_low=0.2, clip_high=0.2, loss_agg="token-mean",
                     num_epochs=2, num_minibatches=2, critic_epochs=0, critic_num_minibatches=0,
                     critic_warmup_steps=0, whiten_rewards=False, normalize_scores=False, score_clip=0.0,
                     missing_eos_score=math.nan)
_RLHF = dict(rewards=("reward_model",), critic="reward_model", lam=0.95, kl_coef=0.05, num_epochs=4,
             num_minibatches=1, missing_eos_score=-1.0)
PRESETS: dict[str, dict] = {
    "ppo": {},
    "rlhf": _RLHF,
    "ziegler": {**_RLHF, "kl_coef": 0.15, "kl_target": 6.0, "whiten_rewards": True},
    "orz": dict(rewards=("task",), missing_eos_score=0.0, num_epochs=1, num_minibatches=1, critic_epochs=1,
                critic_num_minibatches=12),
    "vapo": dict(critic_warmup_steps=50, actor_lam_alpha=0.05, clip_high=0.28),
}
PANELS = [("held-out (greedy) and rollouts", [("eval/accuracy", "held-out greedy accuracy"),
                                               ("rollout/accuracy", "rollout accuracy (T=1)"),
                                               ("rollout/eos_rate", "rollout EOS rate")], "share"),
          ("score and KL", [("rollout/score_mean", "score"), ("train/kl_seq", "KL per sequence"),
                            ("train/kl_coef", "beta")], "score / nats"),
          ("critic", [("train/explained_variance", "explained variance"), ("train/value_loss", "value loss")], ""),
          ("trust region", [("train/clip_frac", "policy clip fraction"),
                            ("train/value_clip_frac", "value clip fraction"),
                            ("train/approx_kl", "approx KL(pi_old || pi_theta)")], "")]


def cli(argv: list[str] | None = None) -> Args:
    """The command line on top of Args(preset=...): --help shows the preset's values, and every flag given wins."""
    return runs.preset_cli(Args, PRESETS, "ppo", argv)


# ----------------------------------------------------------------------------------------------------------
# The maths: pure functions. R responses, N response tokens; mask (R, N) is 1 on real tokens (EOS included).
# ----------------------------------------------------------------------------------------------------------


KL_CLAMP = 10.0  # the per-token KL estimate in the reward, clamped to [-10, 10]: OpenRLHF (any estimator), verl (k3)


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                  mask: torch.Tensor, kl_coef: float, kl_estimator: str = "k1", kl_clamp: float = KL_CLAMP
                  ) -> torch.Tensor:
    """Per-token rewards with the KL in the reward (Ziegler et al. 2019 eq. 2; InstructGPT eq. 2): -kl_coef * KL_t
    at every response token (k1 = log pi - log pi_ref, or k3, clamped to [-kl_clamp, kl_clamp]: k3 = e^x - 1 - x
    of a log-ratio of -30 is 10^13, one token that would drown every score), plus each row's score at its last real
    token. (R, N), 0 where mask is 0; ref_logprobs None: the scores alone."""
    live = mask.bool()
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if ref_logprobs is not None and kl_coef:
        log_ratio = torch.where(live, logprobs - ref_logprobs, 0.0).float()
        kl = K.kl_penalty(log_ratio, torch.zeros_like(log_ratio), kl_estimator)
        kl = kl.clamp(-kl_clamp, kl_clamp) if kl_clamp else kl
        rewards = torch.where(live, -kl_coef * kl, 0.0)
    rows = torch.nonzero(live.any(-1))[:, 0]
    last = (torch.arange(mask.shape[1], device=mask.device) * live).argmax(-1)  # (R,) each row's last real token
    rewards[rows, last[rows]] += scores.to(rewards)[rows]
    return rewards


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), right to left over each row:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}, with V and A past the last real token 0.
    Masked positions are skipped (the next real token's V and A pass through them), so nothing at a masked position
    reaches a real one. lam: a float or one per row (R,). Returns (advantages, returns = advantages + values), (R, N)
    each, 0 where mask is 0; not whitened."""
    live = mask.bool()
    lam = torch.as_tensor(lam, dtype=values.dtype, device=values.device).expand(values.shape[0])
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        advantage = token_rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        advantages[:, t] = torch.where(live[:, t], advantage, 0.0)
        next_value = torch.where(live[:, t], values[:, t], next_value)
        next_advantage = torch.where(live[:, t], advantage, next_advantage)
    return advantages, torch.where(live, advantages + values, 0.0)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None, num_tokens: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (OpenAI baselines' cliprange_value; N+ details): 1/2 token-mean of
    max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2), and the share of tokens where the clipped term is
    the larger. clip None or 0: unclipped. num_tokens: the token-mean's denominator (default: mask's tokens)."""
    live = mask.bool()
    values, old_values, returns = (torch.where(live, x, 0.0) for x in (values, old_values, returns))
    per_token = unclipped = (values - returns).square()
    clip_frac = torch.zeros((), device=values.device)
    if clip:
        clipped = (torch.clamp(values, old_values - clip, old_values + clip) - returns).square()
        per_token = torch.maximum(unclipped, clipped)
        clip_frac = ((clipped > unclipped) & live).sum() / live.sum().clamp_min(1)
    denom = torch.as_tensor(live.sum() if num_tokens is None else num_tokens, dtype=values.dtype)
    return 0.5 * (per_token * live).sum() / denom.clamp_min(1.0), clip_frac


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon),
    KL the per-sequence KL of the last rollout and n_steps the responses it held. target None or 0: beta stays."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl: float, n_steps: int):
        if self.target:
            self.value *= 1.0 + min(max(current_kl / self.target - 1.0, -0.2), 0.2) * n_steps / self.horizon


def controller_kl(mask: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, unit: str) -> float:
    """What the adaptive controller compares with its target, this rank's: the k1 KL of each response summed over its
    tokens ("sequence": Ziegler, TRL) or averaged over them ("token": verl's and OpenRLHF's current_kl), then
    averaged over the responses."""
    live = mask.bool()
    per_row = torch.where(live, old_logprobs - ref_logprobs, 0.0).sum(-1)  # (R,)
    if unit == "token":
        per_row = per_row / live.sum(-1).clamp_min(1)
    return per_row.mean().item()


def dual_clip_excess(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_low: float, clip_high: float, dual_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-clip PPO (Ye et al. 2020, eq. 5): where A_t < 0 the clipped loss l_t = max(-rho A, -clip(rho) A) grows
    without bound in rho; dual-clip caps it at -c A (a constant: no gradient). Returns the per-token excess
    where(A < 0, relu(l_t + c A), 0), (R, N), which subtracted from l_t gives min(l_t, -c A) (rl_kernels.policy_loss
    computes l_t; aggregating the excess the same way and subtracting it is the dual-clip loss), and the share of
    live tokens capped."""
    live = mask.bool()
    ratio = torch.exp(torch.where(live, logprobs - old_logprobs, 0.0))
    clipped_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    excess = torch.where(live & (advantages < 0), torch.relu(clipped_loss + dual_clip * advantages), 0.0)
    return excess, ((excess > 0) & live).sum() / live.sum().clamp_min(1)


def length_adaptive_lam(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO (Yue et al. 2025, eq. 7): the actor's lambda 1 - 1 / (alpha * |o|) per response (R,), floored at 0."""
    return (1.0 - 1.0 / (alpha * lengths.float().clamp_min(1.0))).clamp_min(0.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the response tokens of every rank: 1 a perfect critic, 0 a constant, < 0 worse."""
    live = mask.bool()
    r, err = torch.where(live, returns, 0.0).double(), torch.where(live, returns - values, 0.0).double()
    n, sr, srr, se, see = K.all_reduce_sum(torch.stack([live.sum().double(), r.sum(), r.square().sum(), err.sum(),
                                                        err.square().sum()])).tolist()
    var_r, var_e = srr / max(n, 1) - (sr / max(n, 1)) ** 2, see / max(n, 1) - (se / max(n, 1)) ** 2
    return 1.0 - var_e / var_r if var_r > 1e-12 else math.nan


def shape_scores(args: Args, rewards: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """The score of each response (R,): its reward, replaced where it never emitted EOS (--missing-eos-score),
    standardised over the batch (--normalize-scores), clipped (--score-clip)."""
    scores = rewards.float().clone()
    if not math.isnan(args.missing_eos_score):
        scores[truncated.to(scores.device)] = args.missing_eos_score
    if args.normalize_scores:
        scores = K.masked_whiten(scores, torch.ones_like(scores), all_ranks=True)
    return scores.clamp(-args.score_clip, args.score_clip) if args.score_clip else scores


def compute_advantages(args: Args, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """(whitened actor advantages, the critic's returns, the raw advantages), (R, N) each: GAE with the critic's lambda
    gives the returns, GAE with the actor's (the same unless --actor-lam or --actor-lam-alpha) the advantages."""
    if args.whiten_rewards:  # Ziegler, TRL: (r - mu) / sigma + mu over the response tokens
        rewards = K.masked_whiten(rewards, mask, shift_mean=False, all_ranks=True) * mask
    advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
    if args.actor_lam_alpha or args.actor_lam not in (-1, args.lam):
        actor_lam = length_adaptive_lam(mask.sum(-1), args.actor_lam_alpha) if args.actor_lam_alpha else args.actor_lam
        advantages = gae(rewards, values, mask, args.gamma, actor_lam)[0]
    return K.masked_whiten(advantages, mask, all_ranks=True) * mask, returns, advantages


# ----------------------------------------------------------------------------------------------------------
# PPO-ptx: an SFT / pretraining loss mixed into the policy's (InstructGPT, Ouyang et al. 2022, eq. 2)
# ----------------------------------------------------------------------------------------------------------

PTX_TOY_ROWS = 2000  # arithmetic problems of toy_world.toy_corpus (plus its general-prompt rows)


def ptx_row(row, where: str = "", line: int = 0) -> dict:
    """A PPO-ptx JSONL object as {prompt, completion}; a DataError starting with `where` says what is wrong."""
    if not isinstance(row, dict) or "prompt" not in row or not isinstance(row.get("completion"), str):
        raise env.DataError(f"{where}each --ptx-dataset line needs a 'prompt' (a string or chat messages) and a "
                            "'completion' string.")
    if not isinstance(row["prompt"], str) and not env.is_messages(row["prompt"]):
        raise env.DataError(f"{where}'prompt' must be a string or a list of {{\"role\", \"content\"}} messages.")
    return {"prompt": row["prompt"], "completion": row["completion"]}


def load_ptx_rows(args: Args) -> list[dict]:
    """--ptx-dataset's rows ([] without --ptx-coef): "toy" is toy_world.toy_corpus (the toy base's pretraining
    recipe: prompts and completions, reasoned or not, right or wrong), else a JSONL file read with ptx_row."""
    if not args.ptx_coef:
        return []
    if args.ptx_dataset == "toy":
        return toy.toy_corpus(PTX_TOY_ROWS, args.seed, "train")
    return env.read_jsonl(args.ptx_dataset, ptx_row)


def encode_ptx(tokenizer, rows: list[dict], template: str, system_prompt: str | None,
               stop_id: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per row: the prompt rendered as the rollouts render theirs, the completion closed
    by the token that ends a response (the chat template's end of turn, else EOS), as the policy would stop."""
    examples = []
    for row in rows:
        chat = env.uses_chat_template(tokenizer, row["prompt"], template)
        text = env.render_prompt(tokenizer, row["prompt"], template, system_prompt)
        stop = stop_id if stop_id is not None else (env.end_of_turn_id(tokenizer) if chat else None)
        stop = tokenizer.eos_token_id if stop is None else stop
        examples.append((tokenizer(text, add_special_tokens=not chat)["input_ids"],
                         tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [stop]))
    return examples


def ptx_minibatch(examples: list, size: int, key: tuple[int, ...], pad_id: int, device) -> dict:
    """`size` examples drawn with replacement by a generator keyed by `key` (the same draw on every rank, each rank
    taking every world-th one), as a rollout-shaped batch: prompt_ids, prompt_mask (r, P) left-padded; tokens, mask
    (r, N) right-padded."""
    seed = 0
    for k in key:
        seed = seed * 1_000_003 + k
    picks = torch.randint(len(examples), (size,), generator=torch.Generator().manual_seed(seed % 2**63)).tolist()
    chosen = [examples[i] for i in picks[K.get_rank()::K.get_world_size()]]
    P, N = max(len(p) for p, _ in chosen), max(len(c) for _, c in chosen)
    batch = {k: torch.full((len(chosen), n), pad_id if "ids" in k or k == "tokens" else 0, dtype=torch.long)
             for k, n in (("prompt_ids", P), ("prompt_mask", P), ("tokens", N), ("mask", N))}
    for i, (prompt, completion) in enumerate(chosen):
        batch["prompt_ids"][i, P - len(prompt):] = torch.tensor(prompt)
        batch["prompt_mask"][i, P - len(prompt):] = 1
        batch["tokens"][i, :len(completion)] = torch.tensor(completion)
        batch["mask"][i, :len(completion)] = 1
    return {k: v.to(device) for k, v in batch.items()}


def ptx_loss(policy, batch: dict) -> torch.Tensor:
    """PPO-ptx's term before gamma_ptx: the token-mean negative log-likelihood of the completions, at temperature 1,
    over every rank's rows: this rank's summed NLL over all ranks' tokens, times the world size (DDP and FSDP2 average
    gradients over ranks), so W ranks step as one process would; the mean of the ranks' values is the token-mean."""
    logprobs = K.completion_logprobs(policy, batch)  # (r, n)
    maskf = batch["mask"].to(torch.float32)
    tokens = K.all_reduce_sum(maskf.sum()).clamp_min(1.0)
    return -(logprobs.float() * maskf).sum() * K.get_world_size() / tokens


# ----------------------------------------------------------------------------------------------------------
# The critic: a token-classification model with one output, read where the policy's log-probs are
# ----------------------------------------------------------------------------------------------------------


def dropout_off(model: torch.nn.Module) -> torch.nn.Module:
    """No dropout anywhere (N+ details): PPO compares log-probs and values across passes, which dropout makes noisy."""
    model.config.update({k: 0.0 for k, v in model.config.to_dict().items() if "drop" in k and isinstance(v, float)})
    for module in model.modules():
        for attr in ("p", "attention_dropout") if isinstance(module, torch.nn.Dropout) else ("attention_dropout",):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def load_critic(args: Args, device) -> torch.nn.Module:
    """AutoModelForTokenClassification with one output, from the policy, the reward model or a path; a head that is
    not a trained value or reward head starts at N(0, 0.001^2), a bias at 0."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    path = K.resolve_model_path({"policy": args.model, "reward_model": args.reward_model}.get(args.critic, args.critic))
    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.classifier_dropout = 0.0  # transformers' token-classification head defaults to 0.1
    arch = (config.architectures or [""])[0]
    critic, _ = K.load_model(path, model_class=AutoModelForTokenClassification, config=config, dtype=args.dtype,
                             master_dtype=args.master_dtype, device=device)
    lora = runs.lora_of(args, heads=("score",))  # the value head trained whole beside the adapter
    if not isinstance(getattr(critic, "score", None), torch.nn.Linear):
        raise K.UserError(f"{path}: expected a token-classification head named 'score' (Llama, Qwen, Mistral style).")
    with torch.no_grad():
        if not arch.endswith("ForTokenClassification") and critic.score.bias is not None:
            critic.score.bias.zero_()
        if not arch.endswith(("ForTokenClassification", "ForSequenceClassification")):
            critic.score.weight.normal_(0.0, 1e-3)
        elif arch.endswith("ForSequenceClassification") and getattr(config, "reward_std", None):
            critic.score.weight.div_(config.reward_std)  # scores are normalised (resolve_rewards), so are values
            critic.score.bias.fill_(-config.reward_mean / config.reward_std)
    if lora is not None:  # after the head's initialisation, which reads a plain nn.Linear
        K.add_lora(critic, lora, K.compute_dtype(critic), base=path)
    return dropout_off(critic)


def critic_values(critic, batch: dict) -> torch.Tensor:
    """V(s_t) at every response token (r, n) in fp32: the critic's output at the position that predicts token t (the
    last prompt token for t = 0), where token_logprobs reads log pi(o_t)."""
    ids = torch.cat([batch["prompt_ids"], batch["tokens"]], 1)           # (r, P + n)
    mask = torch.cat([batch["prompt_mask"], batch["mask"]], 1)
    out = critic(input_ids=ids, attention_mask=mask, position_ids=K.position_ids_from_mask(mask), use_cache=False)
    return out.logits[:, -batch["tokens"].shape[1] - 1:-1, 0].float()


@torch.no_grad()
def rollout_values(critic, batch: dict, max_tokens: int) -> torch.Tensor:
    """V_old at every response token of a rollout batch (R, N), over length-sorted micro-batches, without gradients."""
    out = torch.zeros(batch["mask"].shape, dtype=torch.float32, device=batch["mask"].device)
    for rows, part in K.micro_batches(batch, max_tokens):
        values = critic_values(critic, part)
        out[rows, :values.shape[1]] = values
    if hasattr(critic, "reshard"):  # FSDP2 leaves the root unsharded after a forward with no backward
        critic.reshard()
    return out


# ----------------------------------------------------------------------------------------------------------
# Update: epochs x minibatches of the clipped surrogate (policy) and the clipped value loss (critic)
# ----------------------------------------------------------------------------------------------------------


def minibatch_order(seed: int, step: int, epoch: int, count: int) -> list[int]:
    """The order of the minibatches in one epoch: a permutation that is a function of (seed, step, epoch) alone."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def minibatch_rows(mb: int, count: int, prompts: int, G: int) -> torch.Tensor:
    """The rows of minibatch mb of count: prompts mb, mb + count, ... (strided), each with its G samples. When count
    does not divide the prompts the first minibatches hold one prompt more (ORZ's loader drops the remainder)."""
    return torch.tensor([j * G + g for j in range(mb, prompts, count) for g in range(G)])


def update(args: Args, models: dict, optimizers: dict, batch: dict, state: dict, step: int, train_policy: bool,
           ptx_examples: list | None = None, pad_id: int = 0) -> tuple[dict, dict]:
    """Epochs x minibatches of optimizer steps of the policy (unless critic-only) and the critic, each a sum over
    length-sorted micro-batches (rl_kernels.accumulate_gradients); returns (the averaged train/ stats, the mismatch/
    metrics measured in the policy's first forward when no pi_old pass ran, else {}). batch: prompt_ids,
    prompt_mask, tokens, mask, rows, advantages, values, returns, sampler_logprobs, old_logprobs when pi_old was
    recomputed (bypass: the sampler's), ref_logprobs with --kl-loss-coef, is_weights with a correction. With the same
    minibatch count the two models step together on the same minibatches (both or neither on a NaN); else each makes
    its own pass. ptx_examples: PPO-ptx's data."""
    G = args.num_generations
    prompts = batch["mask"].shape[0] // G
    epochs = {"policy": args.num_epochs if train_policy else 0, "critic": args.critic_epochs or args.num_epochs}
    counts = {"policy": args.num_minibatches, "critic": args.critic_num_minibatches or args.num_minibatches}
    means, mismatch = K.StepMeans(), {}
    # pi_old as the policy's first forward sees it (before any optimizer step), for the mismatch/ metrics when no
    # pi_old pass ran: free, as in grpo.py
    measure = train_policy and "sampler_logprobs" in batch and (
        "old_logprobs" not in batch or env.correction_of(args).bypass)
    seen = torch.full(batch["mask"].shape, float("nan"), device=batch["mask"].device) if measure else None
    recording = False
    for epoch in range(max(epochs.values())):
        trained = [name for name in ("policy", "critic") if epoch < epochs[name]]
        groups = [trained] if len({counts[n] for n in trained}) == 1 else [[n] for n in trained]

        for group in groups:

            def micro_loss(part: dict, share: K.Share):
                losses, stats = {}, {}
                if "policy" in group:
                    logprobs, entropy = K.completion_logprobs(models["policy"], part, temperature=args.temperature,
                                                              with_entropy=True)  # (r, n) each
                    # one epoch of one minibatch: pi_old is pi_theta, the ratio exactly 1, yet its gradient is
                    # REINFORCE's; the detached log-probs serve and no pass over the rollout was needed
                    old = part["old_logprobs"] if "old_logprobs" in part else logprobs.detach()
                    if recording:
                        seen[part["rows"], :logprobs.shape[1]] = logprobs.detach().float()
                    weights = part.get("is_weights")  # the rollout correction's, detached
                    if args.offpolicy_mask_delta is not None:  # DeepSeek-V3.2: far-off-policy sequences with A < 0
                        keep = K.offpolicy_sequence_mask(logprobs, part["sampler_logprobs"], part["advantages"],
                                                         part["mask"], args.offpolicy_mask_delta)
                        weights = keep if weights is None else weights * keep
                    if args.log_ratio_clamp:  # verl: no exp overflow, and no gradient beyond the clamp
                        logprobs = old + (logprobs - old).clamp(-args.log_ratio_clamp, args.log_ratio_clamp)
                    clip = dict(clip_low=args.clip_low, clip_high=args.clip_high)
                    norms = dict(norm_length=args.max_new_tokens, num_tokens=share.tokens)
                    losses["policy_loss"], stats = K.policy_loss(
                        logprobs, old, part["advantages"], part["mask"], **clip, loss_agg=args.loss_agg, **norms,
                        num_rows=share.rows, ref_logprobs=part.get("ref_logprobs") if args.kl_loss_coef else None,
                        kl_coef=args.kl_loss_coef, kl_estimator=args.kl_loss_estimator,
                        entropy=entropy if args.entropy_coef else None, entropy_coef=args.entropy_coef,
                        weights=weights, compile=args.compile)
                    if args.dual_clip:  # min(l_t, -c A_t) where A_t < 0: the excess over the cap, taken off
                        excess, stats["dual_clip_frac"] = dual_clip_excess(
                            logprobs, old, part["advantages"], part["mask"], **clip, dual_clip=args.dual_clip)
                        if weights is not None:  # the capped surrogate is weighted as the surrogate is
                            excess = excess * weights
                        rows_share = 1.0 if args.loss_agg == "token-mean" else part["mask"].shape[0] / share.rows
                        losses["policy_loss"] = losses["policy_loss"] - rows_share * K.aggregate_loss(
                            excess, part["mask"], args.loss_agg, **norms)  # aggregated as policy_loss aggregates
                    stats["entropy"] = K.masked_mean(entropy.detach(), part["mask"])
                if "critic" in group:
                    losses["value_loss"], stats["value_clip_frac"] = value_loss(
                        critic_values(models["critic"], part), part["values"], part["returns"], part["mask"],
                        args.value_clip, share.tokens)
                return losses, stats

            count = counts[group[0]]
            for mb in minibatch_order(args.seed, step, epoch, count):
                minibatch = K.slice_rows(batch, minibatch_rows(mb, count, prompts, G).to(batch["mask"].device))
                recording = measure and not mismatch and "policy" in group  # the first policy forward: pi_old's
                stats = K.accumulate_gradients([models[n] for n in group], minibatch, micro_loss,
                                               max_tokens=args.micro_batch_tokens, state=state)
                if recording:
                    rows = minibatch["rows"]
                    mismatch = K.mismatch_metrics(batch["sampler_logprobs"][rows], seen[rows], batch["mask"][rows],
                                                  batch["kept_logmass"][rows])
                    recording = False
                if ptx_examples and "policy" in group:  # PPO-ptx: its gradient joins the policy's before the step
                    ptx = ptx_minibatch(ptx_examples, args.ptx_batch_size, (args.seed, step, epoch, mb), pad_id,
                                        batch["mask"].device)
                    stats["ptx_loss"] = args.ptx_coef * ptx_loss(models["policy"], ptx)
                    K.scale_loss(models["policy"], stats["ptx_loss"], state).backward()  # fp16: the same loss scale
                    stats["ptx_loss"] = stats["ptx_loss"].detach()
                # the group's models step, or (a NaN/inf loss or gradient norm on any rank) none does
                means.add(K.guarded_step([models[n] for n in group], [optimizers[n] for n in group],
                                         args.max_grad_norm, stats, names=group, state=state)[0])
    return means.result(), mismatch


# ----------------------------------------------------------------------------------------------------------
# Setup: checks, rewards, models, checkpoints
# ----------------------------------------------------------------------------------------------------------


def check_args(args: Args, info: runs.DistInfo):
    """Impossible settings fail here, before any data or model is loaded."""
    runs.check_settings(args)
    per_rank = args.prompts_per_step // info.world_size
    if args.prompts_per_step % info.world_size:
        raise K.UserError(f"--prompts-per-step {args.prompts_per_step} must split evenly over the {info.world_size} "
                          "rank(s).")
    if per_rank < max(args.num_minibatches, args.critic_num_minibatches) or args.critic_num_minibatches < 0:
        raise K.UserError(f"Each rank's {per_rank} prompt(s) per step cannot fill --num-minibatches "
                          f"{args.num_minibatches} or --critic-num-minibatches {args.critic_num_minibatches} (0: the "
                          "same); raise --prompts-per-step or lower the minibatch counts.")
    if args.temperature <= 0:
        raise K.UserError(f"--temperature {args.temperature}: training samples and log-probs need a temperature > 0.")
    if not args.critic_lr > 0 or min(args.num_epochs, args.num_minibatches) < 1:
        raise K.UserError("--critic-lr must be positive; --num-epochs and --num-minibatches at least 1.")
    if not (0 < args.gamma <= 1 and 0 <= args.lam <= 1 and (args.actor_lam == -1 or 0 <= args.actor_lam <= 1)
            and args.critic_epochs >= 0):
        raise K.UserError("--gamma must be in (0, 1], --lam and --actor-lam in [0, 1] (--actor-lam -1: --lam's), "
                          "--critic-epochs >= 0.")
    if args.actor_lam_alpha < 0:
        raise K.UserError(f"--actor-lam-alpha {args.actor_lam_alpha} would make the actor's lambda 1 - 1/(alpha |o|) "
                          "exceed 1; use alpha > 0 (VAPO: 0.05), or 0 for off.")
    if args.dual_clip and args.dual_clip <= 1:
        raise K.UserError(f"--dual-clip {args.dual_clip} must exceed 1 (Ye et al. and verl: 3), or be 0 for off.")
    if min(args.kl_loss_coef, args.ptx_coef) < 0 or not 0 <= args.min_lr_ratio <= 1:
        raise K.UserError("--kl-loss-coef and --ptx-coef must be >= 0 and --min-lr-ratio in [0, 1].")
    if args.ptx_coef and args.ptx_batch_size < info.world_size:
        raise K.UserError(f"--ptx-batch-size {args.ptx_batch_size} must give each of the {info.world_size} rank(s) "
                          "at least one row.")
    if args.kl_target and (args.kl_coef <= 0 or args.kl_horizon <= 0):
        raise K.UserError("--kl-target (the adaptive controller) needs --kl-coef > 0 and --kl-horizon > 0.")
    env.check_reward_weights(args.rewards, args.reward_weights)
    if ("reward_model" in args.rewards or args.critic == "reward_model") and not os.path.isdir(args.reward_model):
        raise K.UserError(f"--reward-model {args.reward_model!r} does not exist; train one with `python "
                          "rlhf_reward_model.py` or pass the directory of a trained reward model.")
    if args.critic not in ("policy", "reward_model"):
        K.check_model_source(args.critic, "--critic")


def reward_functions(args: Args, device=None) -> tuple[list, tuple[float, ...]]:
    """([(name, fn)], weights) for args.rewards: weights as given, else 1 each but 0.1 for a shaping reward beside
    others. "reward_model" becomes a RewardModelScorer (loaded only when device is given: the data checks before
    any model loads go without it), normalised by the held-out mean and std its training saved, if it saved them."""
    fns = []
    for name in args.rewards:
        if name != "reward_model":
            fns += env.resolve_rewards([name], args.dataset)
        elif device is not None:
            from transformers import AutoConfig

            saved = getattr(AutoConfig.from_pretrained(args.reward_model), "reward_std", None) is not None
            fns.append(("reward_model", rlhf_reward_model.RewardModelScorer(
                args.reward_model, device=device, normalize=saved, dtype=args.dtype)))
    return fns, env.reward_weights(args.rewards, args.reward_weights)


def needs_reference(args: Args) -> bool:
    """pi_ref is loaded for a KL in the reward (beta > 0 or the controller), a KL in the loss, or --track-kl."""
    return bool(args.kl_coef > 0 or args.kl_target or args.kl_loss_coef > 0 or args.track_kl)


def load_models(args: Args, info: runs.DistInfo) -> tuple[dict, object]:
    """({"policy", "critic", "ref"}, tokenizer): policy and critic wrapped for DDP/FSDP2; the frozen reference (in the
    compute dtype, sharded under FSDP) only when needs_reference."""
    precision = dict(dtype=args.dtype, master_dtype=args.master_dtype, device=info.device,
                     shard=args.strategy == "fsdp")  # FSDP2: sharded as they load, never whole on a GPU
    policy, tokenizer = K.load_model(args.model, lora=runs.lora_of(args), **precision)
    K.set_batch_invariant(policy, args.batch_invariant)  # refuses what it cannot make exact (bf16, GPU, LoRA, FSDP)
    K.set_cpu_threads(args.threads, policy)
    ref = None
    if needs_reference(args) and not args.lora_rank:
        ref = dropout_off(K.load_model(args.model, frozen=True, **precision)[0]).eval().requires_grad_(False)
    critic = load_critic(args, info.device)  # whole, then sharded: its head is re-initialised on the plain model
    wrap = functools.partial(K.wrap_model, strategy=args.strategy, device=info.device,
                             checkpointing=args.gradient_checkpointing)
    policy = wrap(dropout_off(policy).train())
    if needs_reference(args) and args.lora_rank:
        ref = K.BaseReference(policy)  # pi_ref = the base: the policy with its adapter disabled, no second model
    return {"policy": policy, "critic": wrap(critic.train()), "ref": ref}, tokenizer


def save(args: Args, step: int, models: dict, tokenizer, optimizers: dict, schedulers: dict, state: dict,
         name: str | None = None) -> str:
    """The critic (a transformers checkpoint with its optimizer and scheduler) first, then the policy's checkpoint,
    each written atomically; then the critic moves into CKPT/critic. A crash anywhere leaves no checkpoint without
    its critic (restore looks beside it for .critic-NAME)."""
    name = name or f"{runs.CHECKPOINT_PREFIX}{step}"
    runs.save_checkpoint(args.out_dir, step, models["critic"], tokenizer, optimizers["critic"], schedulers["critic"],
                         name=f".critic-{name}")
    path = runs.save_checkpoint(args.out_dir, step, models["policy"], tokenizer, optimizers["policy"],
                                schedulers["policy"], extra=state, name=name)
    if K.get_rank() == 0:
        os.replace(os.path.join(args.out_dir, f".critic-{name}"), os.path.join(path, "critic"))
    K.barrier()
    return path


def restore(checkpoint: str, models: dict, optimizers: dict, schedulers: dict, state: dict) -> int:
    """--resume: the checkpoint's policy, critic, both optimizers and schedulers, data position and KL coefficient.
    Returns the step to start from."""
    beside = os.path.join(os.path.dirname(checkpoint), f".critic-{os.path.basename(checkpoint)}")  # a cut-off move
    critic = next((d for d in (os.path.join(checkpoint, "critic"), beside) if os.path.isdir(d)), None)
    if critic is None:
        raise runs.CheckpointError(f"{checkpoint} has no critic/ (not written by ppo.py?); PPO cannot resume from it.")
    runs.load_checkpoint(critic, models["critic"], optimizers["critic"], schedulers["critic"])
    loaded = runs.load_checkpoint(checkpoint, models["policy"], optimizers["policy"], schedulers["policy"])  # RNG: its
    state.update(loaded["extra"])
    return loaded["step"]


def kl_stats(mask: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None) -> dict:
    """KL(pi_old || pi_ref): per sequence (the sum over the response, what the adaptive controller sees) and per
    token, k1 and k3; {} without a reference."""
    if ref_logprobs is None:
        return {}
    log_ratio = torch.where(mask.bool(), old_logprobs - ref_logprobs, 0.0)  # k1 per token
    return {"train/kl_seq": log_ratio.sum(-1).mean().item(), "train/kl_token_k1": K.masked_mean(log_ratio, mask).item(),
            "train/kl_token_k3": K.masked_mean(torch.expm1(-log_ratio) + log_ratio, mask).item()}


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def main(args: Args) -> runs.RunResult:
    """Train with PPO (or the preset's variant); returns where the run wrote and the held-out metrics before and
    after (rl_runs.RunResult)."""
    session = runs.Session(args, check=check_args, desc=f"ppo ({args.preset})", panels=PANELS,
                           title=f"ppo.py --preset {args.preset} --model {args.model}")
    info = session.info
    reward_fns, weights = reward_functions(args)  # a user's mistake in the data or rewards stops here
    args, train_rows, eval_rows = env.load_task(args, reward_fns, weights, info.device)
    ptx_rows = load_ptx_rows(args)  # PPO-ptx's data, read before any model loads

    with session:
        if session.finished:
            return session.result()
        models, tokenizer = load_models(args, info)
        policy, critic, ref = models["policy"], models["critic"], models["ref"]
        reward_fns = reward_functions(args, info.device)[0]
        train_rows, eval_rows = env.fit_task(args, policy, tokenizer, train_rows, eval_rows)
        ptx_examples = encode_ptx(tokenizer, ptx_rows, args.template, args.system_prompt)
        optimizers = {name: K.adamw(models[name].parameters(), lr=lr, weight_decay=args.weight_decay,
                                    device=info.device, strategy=args.strategy)
                      for name, lr in (("policy", args.lr), ("critic", args.critic_lr))}
        schedule = runs.warmup_schedule(args.warmup_steps, session.max_steps, args.min_lr_ratio)  # per PPO step
        schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, schedule) for name, opt in optimizers.items()}
        state = session.state
        state.update(cursor=0, kl_coef=args.kl_coef)  # the prompt stream's position; beta (the controller moves it)
        parts = dict(models=models, optimizers=optimizers, schedulers=schedulers, state=state)
        steps = session.start(args, evaluate=env.evaluator(args, policy, tokenizer, eval_rows),
                              save=functools.partial(save, args, tokenizer=tokenizer, **parts),
                              restore=lambda checkpoint: restore(checkpoint, **parts))
        kl_ctl = AdaptiveKLController(state["kl_coef"], args.kl_target, args.kl_horizon)
        truncation_warned = mismatch_warned = False  # warn_truncation, warn_mismatch: once per run
        correction = env.correction_of(args)
        for step in steps:
            timer = runs.Timer()

            # ---- rollout: G samples per prompt from pi_old, scored; each response's score
            policy.eval()
            try:
                with K.offload_optimizer(list(optimizers.values()), args.offload_optimizer), \
                        timer.peak_memory("rollout"):
                    rows, positions = runs.next_rows(train_rows, state, args.prompts_per_step, args.seed)
                    keys = K.rollout_noise_keys(args.seed, step, 0, positions, args.num_generations)
                    rollout = env.rollout(args, policy, tokenizer, rows, reward_fns, keys, timer,
                                          session.stop_requested)
            except env.Interrupted:  # a signal during a slow reward: drop this step, save the ones done
                session.drop_step(step)
            if args.decode_memory == "free":                         # the update gets the KV caches' memory
                K.free_decode_state(policy)
            policy.train()
            batch = rollout.batch(args.keep_sampling_mask)           # prompt_ids (R, P), tokens and mask (R, N), log mu
            mask = batch["mask"]
            scores = shape_scores(args, rollout.rewards, rollout.gen.truncated).to(mask.device)  # (R,)

            # ---- passes, once per rollout: pi_old (when needed), pi_ref and V_old at every response token, (R, N)
            logprob_pass = dict(batch=batch, temperature=args.temperature, max_tokens=args.micro_batch_tokens)
            if correction.bypass:                                    # pi_old := mu, no pass
                batch["old_logprobs"] = batch["sampler_logprobs"].float()
            elif args.num_epochs > 1 or args.num_minibatches > 1 or correction.reweights or (
                    step < args.critic_warmup_steps) or (  # critic-only: no policy forward to measure the gap in
                    ref is not None and not K.sampled_logprobs_exact(policy)):  # bf16: the sampler's differ
                with timer("policy_pass"):
                    batch["old_logprobs"] = K.rollout_logprobs(policy, **logprob_pass)
            old_logprobs = batch.get("old_logprobs", batch["sampler_logprobs"].to(mask.device).float())
            mismatch, weights, keep = env.sampler_gap(batch, correction)  # the sampler against pi_old's pass
            if keep is not None:  # decoupled: weights and rejection from rho, on the policy loss only
                batch["is_weights"] = keep if weights is None else weights * keep  # a rejected token weighs 0
            ref_logprobs = None
            if ref is not None:
                with timer("reference_pass"):
                    ref_logprobs = K.rollout_logprobs(ref, **logprob_pass)
                if args.kl_loss_coef:  # the KL term of the loss reads it per minibatch
                    batch["ref_logprobs"] = ref_logprobs
            with timer("critic_pass"):
                batch["values"] = rollout_values(critic, batch, args.micro_batch_tokens)

            # ---- advantages: the KL in the reward, GAE, whitening over every rank's tokens
            beta = kl_ctl.value
            rewards = token_rewards(scores, old_logprobs, ref_logprobs, mask, beta, args.kl_estimator)  # (R, N)
            batch["advantages"], batch["returns"], advantages = compute_advantages(args, rewards, batch["values"], mask)

            # ---- update: epochs x minibatches of both models (the critic alone during its warm-up)
            train_policy = step >= args.critic_warmup_steps
            with timer("update"), timer.peak_memory("update"):
                train_stats, measured = update(args, models, optimizers, batch, state, step, train_policy,
                                               ptx_examples, tokenizer.pad_token_id)
            mismatch = mismatch or measured
            for name in ("policy", "critic") if train_policy else ("critic",):  # a schedule counts its model's steps
                schedulers[name].step()
            kl = kl_stats(mask, old_logprobs, ref_logprobs)
            if kl:  # the controller's KL per sequence or per token (--kl-target-unit), over every rank's responses
                kl_ctl.update(K.all_reduce_mean(controller_kl(mask, old_logprobs, ref_logprobs, args.kl_target_unit)),
                              args.prompts_per_step * args.num_generations)
            state["kl_coef"] = kl_ctl.value

            # ---- log / evaluate / save
            mismatch_warned = env.warn_mismatch(mismatch, step + 1, mismatch_warned)
            metrics = {**env.rollout_metrics(rollout), **kl, **train_stats, **mismatch,
                       "rollout/eos_rate": 1.0 - rollout.gen.truncated.float().mean().item(),
                       "rollout/score_mean": scores.mean().item(),
                       "train/value_mean": K.masked_mean(batch["values"], mask).item(),
                       "train/advantage_mean": K.masked_mean(advantages, mask).item(),
                       "train/advantage_sq_mean": K.masked_mean(advantages.square(), mask).item(),
                       "train/return_mean": K.masked_mean(batch["returns"], mask).item(),
                       "train/return_sq_mean": K.masked_mean(batch["returns"].square(), mask).item()}
            per_token = [k for k in metrics if k.startswith(("train/kl_token", "train/value_", "train/advantage_",
                                                              "train/return_"))]  # over every rank's tokens
            metrics = env.finish_reward_std(K.reduce_metrics(metrics, weights={
                **env.rollout_metric_weights(rollout), **dict.fromkeys(per_token, float(mask.sum()))}))
            for name in ("advantage", "return"):  # the std over every rank's tokens, from its two moments
                second = metrics.pop(f"train/{name}_sq_mean")
                metrics[f"train/{name}_std"] = math.sqrt(max(0.0, second - metrics[f"train/{name}_mean"] ** 2))
            truncation_warned = env.warn_truncation(metrics, step + 1, args.max_new_tokens, truncation_warned)
            metrics["train/explained_variance"] = explained_variance(batch["values"], batch["returns"], mask)
            metrics["train/kl_coef"] = beta
            metrics.update(timer.step_metrics(int(mask.sum()) * info.world_size, info.device))
            metrics["train/lr"] = schedulers["policy"].get_last_lr()[0]
            samples = env.rollout_samples(rollout, batch["advantages"], args.log_samples)
            session.end_step(step + 1, metrics, samples=samples, postfix=dict(
                score="rollout/score_mean", acc="rollout/accuracy", ev="train/explained_variance"))
    return session.result()


if __name__ == "__main__":
    runs.run_cli(main, cli())
