"""grpo.py: the GRPO family in one file: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, and the objectives of
2025-2026 (CISPO, SAPO, GMPO, GPG, Clip-Cov, KL-Cov, OPO, ReMax, pass@k, GDPO).

No critic. For each prompt q sample G responses o_1..o_G from pi_old, score them with verifiable rewards r_i,
turn the rewards into advantages by comparing each response with its group, and take clipped policy-gradient
steps:

    J(theta) = E_q E_{o_i ~ pi_old} [ agg_{i,t} ( min(rho_{i,t} A_{i,t}, clip(rho_{i,t}, 1-eps_low, 1+eps_high) A_{i,t})
                                                  - beta * KL_t(pi_theta || pi_ref) ) ]
    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})     (token level)
    rho_i     = exp( mean_t log rho_{i,t} )                                          (sequence level, GSPO)

Advantages (all computed per group of G responses to one prompt, except "batch"):
    group   A_i = (r_i - mean(r)) / (std(r) + eps)      std unbiased, as TRL and verl  (GRPO, DeepSeekMath 2024)
    mean    A_i = r_i - mean(r)                                                        (Dr. GRPO, Liu et al. 2025)
    rloo    A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean(r))                   (RLOO, Ahmadian et al. 2024)
    batch   A_{i,t} = whiten over the batch of  r_i - beta * sum_{s >= t} k1_s       (REINFORCE++, Hu 2025)
    rf_baseline A_{i,t} = whiten over the batch of  r_i - mean(r)                    (REINFORCE++ with a baseline)
    opo     A_i = r_i - sum_j L_j r_j / sum_j L_j, L_j response lengths              (OPO, Hao et al. 2025)
    remax   A_i = r_i - r(greedy response to the same prompt): one more greedy sample  (ReMax, Li et al. 2024)
    passk   A_best = (r_max - r_second) / std(r), 0 for the others                   (pass@k, Chen et al. 2025)
    gpg     A_i = alpha (r_i - mean(r)), alpha = R / #(r != 0) over the batch        (GPG, Chu et al. 2025)
    gdpo    A_i = whiten over the batch of  sum_k w_k zscore_group(r_k,i), each reward normalised on its own
                                                                                      (GDPO, NVIDIA 2026)

On-policy distillation (--teacher; the reverse-KL reward of GKD, Agarwal et al. 2024, as Thinking Machines 2025 run
it): a frozen teacher that shares the policy's tokenizer scores every sampled token, and minus the one-sample reverse
KL at that token is a dense reward, added to the advantage above with no return-to-go and no normalisation:
    A_{i,t} <- A_{i,t} + lambda * r_{i,t}
    r_{i,t}  = -( log pi_old(o_{i,t} | q, o_{i,<t}) - log pi_teacher(o_{i,t} | q, o_{i,<t}) )   (0 off the response)
so that E_{o_i ~ pi_old}[ sum_t r_{i,t} ] = -KL(pi_old || pi_teacher) of the whole response; pi_old's log-probs are
those the step already has (the pi_old pass, else the sampler's). With no task rewards (--rewards, no names) the run is
pure on-policy distillation; distill/reverse_kl logs the token-mean of log pi_old - log pi_teacher.

The surrogate itself (loss_type: PPO's clip, CISPO, SAPO, GMPO, GPG, Clip-Cov, KL-Cov) is rl_kernels.policy_loss's,
with its equations there; an entropy bonus -c H_t is entropy_coef. With one update per rollout (mu = 1, one
minibatch) every ratio is 1 and all of the surrogates but Clip-Cov give GRPO's gradient (tests/test_objectives.py):
they differ only when a rollout feeds several optimizer steps.

Shapes: B prompts per step (prompts_per_step), G samples per prompt, R = B*G rows (prompt-major: row i*G + j is
sample j of prompt i), P prompt tokens, N completion tokens, V vocabulary.

Symbols -> Args:  G -> num_generations, eps_low/eps_high -> clip_low/clip_high, beta -> kl_coef,
KL estimator -> kl_estimator (k1|k2|k3), agg -> loss_agg, mu (updates per rollout) -> num_iterations,
pi_ref -> the --model weights, replaced by the policy every ref_reset_every steps (DeepSeek-R1),
lambda -> teacher_coef, pi_teacher -> the --teacher weights (frozen).

Presets (`--preset NAME` sets the switches you leave unset, and any flag you pass wins; from Python,
Args(preset="dapo", clip_high=0.2) is the same as `--preset dapo --clip-high 0.2`):
    grpo          DeepSeekMath: group z-score advantages, seq-mean-token-mean, eps 0.2. Deviation: beta = 0
                  (current practice; the paper used 0.04: pass --kl-coef 0.04).
    dr_grpo       Dr. GRPO: mean-only advantages, loss summed over tokens / (G * L_max) (seq-mean-token-sum-norm),
                  removing GRPO's length and difficulty biases.
    dapo          DAPO: clip-higher 0.2/0.28, dynamic sampling (drop groups whose rewards are all equal and
                  sample more prompts until the batch is full, at most dynamic_sampling_rounds extra rounds),
                  token-mean loss, overlong filtering (truncated responses masked out of the loss) and the soft
                  overlong punishment added to the reward, no KL.
    gspo          GSPO: sequence-level ratio, clipped at 3e-4 / 4e-4.
    rloo          RLOO: leave-one-out baseline, no std scaling.
    reinforce_pp  REINFORCE++: k1 KL folded into the token rewards (beta 0.01), advantages whitened over the
                  whole batch (no group statistics), PPO clip.
    cispo         CISPO (MiniMax-M1 2025): REINFORCE weighted by the IS ratio clipped above only at 1 + 4 = 5
                  (TRL's epsilon_high 5; M1 tunes only the upper bound) and detached, token-mean.
    sapo          SAPO (Qwen 2025): the soft sigmoid gate, tau 1.0 for A > 0 and 1.05 for A <= 0, per-sequence mean.
    gmpo          GMPO (Zhao et al. 2025): geometric mean of the sign-aware clipped token ratios, log-space clip 0.4.
    gpg           GPG (Chu et al. 2025): no ratio, no clip; the group-mean baseline scaled by alpha, token-mean.
    clip_cov      Clip-Cov (Cui et al. 2025): PPO's clip, and 2e-4 of the tokens with cov(log pi, A) in (1, 5)
                  taken out of the loss (verl's constants), token-mean.
    kl_cov        KL-Cov (Cui et al. 2025): no clip; 0.1 |log rho| on the 2e-4 of tokens of highest cov, token-mean.
    opo           OPO (Hao et al. 2025): the length-weighted group baseline, no std; strictly on-policy (mu = 1).
    remax         ReMax (Li et al. 2024): the greedy response's reward as the baseline.
    gdpo          GDPO (NVIDIA 2026): each reward normalised within its group, summed by weight, whitened (for
                  several rewards: the default task + 0.1 format).

Deliberate choices:
  - One update per rollout by default (mu = 1, one minibatch): the ratio is exactly 1 and the gradient is
    REINFORCE's with the group baseline; pi_old is then the detached current log-prob, no extra pass. With
    mu > 1 or several minibatches, pi_old is recomputed once per rollout before any update.
  - Sampler and trainer: the sampler's log mu (of the distribution it drew from: top-k/top-p renormalised) and the
    trainer's pi_old are compared on every step (mismatch/ metrics, docs/mismatch.md); under top-p/top-k every
    log-prob pass renormalises over the sampler's kept set (--keep-sampling-mask). A correction (--rollout-correction)
    reweights or drops by rho_t = pi_old / mu (decoupled: one extra forward for pi_old, loss = w_t * surrogate) or sets
    pi_old := mu (bypass: the ratio pi_theta / mu carries rho); with --batch-invariant (fp32, CPU) rho is exactly 1.
  - Sampling noise is keyed by (seed, step, prompt index, sample index), so a run on W ranks samples exactly
    what a run on one process does, and a resumed run what an uninterrupted one did.
  - Each rank owns whole groups, so group statistics need no communication; metrics are all-reduced.
  - Forward/backward passes run over length-sorted micro-batches of at most micro_batch_tokens padded tokens,
    each cut to its own longest prompt and completion: rollouts are ragged (half of a toy batch is padding at
    the first step), and the sum of the micro-batches' gradients is the whole batch's. DDP all-reduces once per
    optimizer step, in the last backward; FSDP2 reduce-scatters every micro-batch, keeping gradients sharded.
  - A NaN/inf loss or gradient norm skips that update (counted in train/skipped_updates); nan_patience in a
    row saves a checkpoint and stops with a clear message.

Launch:
    python grpo.py                                   # R1-Zero in the toy world, CPU, ~3 minutes
    python grpo.py --preset dapo --out-dir runs/dapo
    python grpo.py --lora-rank 8 --lr 5e-4           # a rank-8 adapter: held-out 39.0% -> 92.5% (docs/lora.md)
    python grpo.py --model toy/student --teacher runs/grpo/final --rewards --out-dir runs/opd
                                   # on-policy distillation of `python grpo.py`'s policy, no reward: 27.5% -> 85.0%
    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset data.jsonl \\
        --template chat --prompts-per-step 64 --num-generations 16 --max-new-tokens 1024 --lr 1e-6 --strategy fsdp

Result of `python grpo.py` (toy world, seed 0, 80 steps, 2-core CPU; wall time in docs/grpo.md): held-out greedy
accuracy 39.0% -> 89.0%, pass@1 (4 samples, T=1) 25.6% -> 77.4%, reasoning share 26% -> 100%, response length
13.0 -> 23.9 tokens (2026-12-06, a 2-core AMD EPYC; 89.5% and 78.8% on the CPU of the earlier runs, whose kernels
round differently): accuracy, reasoning and length rise together, as in R1-Zero. More in docs/grpo.md.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import rl_kernels as K
import rl_runs as runs
import rlvr_rewards as env

Advantage = Literal["group", "mean", "rloo", "batch", "rf_baseline", "opo", "remax", "passk", "gpg", "gdpo"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class GRPOArgs:
    """GRPO's own flags: the preset and its switches, the rewards, the update."""
    # The preset and its switches (None: the preset's value, PRESETS; else the plain GRPO value)
    preset: Literal["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "cispo", "sapo", "gmpo", "gpg",
                    "clip_cov", "kl_cov", "opo", "remax", "gdpo"] = "grpo"
    """named set of the switches a paper changes (module docstring); fields left unset take the preset's values"""
    advantage: Advantage = None
    """how rewards become advantages (module docstring)"""
    loss_agg: LossAgg = None
    """loss aggregation (verl's names)"""
    ratio_level: Literal["token", "sequence"] = None
    """importance ratio per token (PPO/GRPO) or per sequence (GSPO)"""
    loss_type: Literal["clip", "cispo", "cispo_upper", "sapo", "gmpo", "gpg", "clip_cov", "kl_cov"] = None
    """the surrogate (rl_kernels' table): PPO's clip, or CISPO, SAPO, GMPO, GPG, Clip-Cov, KL-Cov"""
    clip_low: float = None
    """eps_low"""
    clip_high: float = None
    """eps_high (DAPO's clip-higher: 0.28)"""
    kl_coef: float = None
    """beta; the reference model is only loaded when > 0"""
    kl_estimator: Literal["k1", "k2", "k3", "k3_unbiased"] = None
    """KL estimator in the loss (Schulman); k3_unbiased: k3 times pi_theta/pi_old (DeepSeek-V3.2)"""
    kl_in_reward: bool = None
    """fold beta*k1 into the token rewards instead of the loss (REINFORCE++)"""
    dynamic_sampling: bool = None
    """DAPO: drop groups whose rewards are all equal and sample more"""
    overlong_filter: bool = None
    """DAPO: mask truncated responses out of the loss"""
    soft_overlong: bool = None
    """DAPO: add the soft overlong punishment to the reward"""
    # Rollouts, rewards and the update
    rewards: tuple[str, ...] = ("task", "format")
    """reward functions: built-in names, "task" (the dataset's verifier), or "module:function" of your own"""
    num_iterations: int = 1
    """mu: update passes over each rollout"""
    num_minibatches: int = 1
    """optimizer steps per pass (each rank's groups split evenly)"""
    lr: float = 2e-4
    """AdamW learning rate (toy model: 1e-3 collapses after ~10 steps; real LLMs: 1e-6 to 3e-6)"""
    warmup_steps: int = 5
    """linear warmup steps, constant after"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0: off)"""
    entropy_coef: float = 0.0
    """c: an entropy bonus -c H_t per token, aggregated as the loss (0: none, as usual for LLMs)"""
    ref_reset_every: int = 0
    """replace the reference by the current policy every N steps (DeepSeek-R1: 400); 0 never"""
    dynamic_sampling_rounds: int = 3
    """extra sampling rounds at most per step"""
    overlong_cache: int = 16
    """L_cache of the soft overlong punishment, in tokens"""
    # On-policy distillation (module docstring)
    teacher: Optional[str] = None
    """on-policy distillation: a frozen teacher with the policy's tokenizer (hub id, local directory, or "toy"); each
    sampled token earns lambda * (log pi_teacher - log pi_old), added to the advantage"""
    teacher_coef: float = 1.0
    """lambda: the weight of the teacher's per-token reward in the advantage"""


@dataclass
class Args(runs.RunArgs, env.RLArgs, GRPOArgs):
    """grpo.py's command line, in --help's order: GRPO's flags (GRPOArgs), those every RL script shares
    (rlvr_rewards.RLArgs: the policy, the task, rollouts, evaluation), and the run's (rl_runs.RunArgs)."""
    out_dir: str = "runs/grpo"

    def __post_init__(self):
        runs.apply_preset(self, PRESETS, PRESET_FIELDS)


# The switches a preset sets, at their plain GRPO values, and what each preset changes.
PRESET_FIELDS = dict(advantage="group", loss_agg="seq-mean-token-mean", ratio_level="token", loss_type="clip",
                     clip_low=0.2, clip_high=0.2, kl_coef=0.0, kl_estimator="k3", kl_in_reward=False,
                     dynamic_sampling=False, overlong_filter=False, soft_overlong=False)
PRESETS: dict[str, dict] = {
    "grpo": {},
    "dr_grpo": dict(advantage="mean", loss_agg="seq-mean-token-sum-norm"),
    "dapo": dict(loss_agg="token-mean", clip_high=0.28, dynamic_sampling=True, overlong_filter=True,
                 soft_overlong=True),
    "gspo": dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4),
    "rloo": dict(advantage="rloo"),
    "reinforce_pp": dict(advantage="batch", kl_coef=0.01, kl_estimator="k1", kl_in_reward=True, loss_agg="token-mean"),
    "cispo": dict(loss_type="cispo_upper", clip_high=4.0, loss_agg="token-mean"),
    "sapo": dict(loss_type="sapo"),
    "gmpo": dict(loss_type="gmpo", clip_low=0.4, clip_high=0.4),
    "gpg": dict(loss_type="gpg", advantage="gpg", loss_agg="token-mean"),
    "clip_cov": dict(loss_type="clip_cov", loss_agg="token-mean"),
    "kl_cov": dict(loss_type="kl_cov", loss_agg="token-mean"),
    "opo": dict(advantage="opo"),
    "remax": dict(advantage="remax"),
    "gdpo": dict(advantage="gdpo"),
}


def cli(argv: list[str] | None = None) -> Args:
    """The command line on top of Args(preset=...): --help shows the preset's values, and every flag given wins
    (--preset dapo --no-dynamic-sampling turns DAPO's dynamic sampling off)."""
    return runs.preset_cli(Args, PRESETS, "grpo", argv)


# ----------------------------------------------------------------------------------------------------------
# The maths: pure functions. Shapes: B prompts, G samples each, R = B*G rows, N completion tokens.
# ----------------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath §4.1.2): r_i - mean over the group of G, divided by the group's
    unbiased std ("group"), the whole batch's std of the centred rewards ("batch"), or nothing ("none", Dr. GRPO)."""
    r = rewards.view(-1, group_size)  # (B, G)
    centred = r - r.mean(-1, keepdim=True)
    if scale == "group":
        return (centred / (r.std(-1, keepdim=True) + eps)).flatten()
    if scale == "batch":
        return (centred / (centred.std() + eps)).flatten()
    if scale == "none":
        return centred.flatten()
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline (Ahmadian et al. 2024): r_i - mean_{j != i} r_j."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    r = rewards.view(-1, group_size)  # (B, G)
    return ((r - r.mean(-1, keepdim=True)) * group_size / (group_size - 1)).flatten()


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                            kl_coef: float = 0.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): token reward -beta*k1_t at every token plus r_i at the last one, return-to-go with
    gamma = 1, then whitened over every token of the batch (no per-group statistics). Returns (R, N)."""
    maskf = mask.float()
    token_rewards = torch.zeros_like(maskf)  # (R, N)
    last = (maskf.sum(-1).long() - 1).clamp(min=0)
    token_rewards[torch.arange(len(rewards)), last] = rewards.float()
    if kl is not None and kl_coef:
        token_rewards = token_rewards - kl_coef * kl * maskf
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * maskf  # sum_{s >= t}
    return K.masked_whiten(returns, maskf, all_ranks=True) * maskf  # over every rank's tokens


def rf_baseline_advantages(rewards: torch.Tensor, group_size: int, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ with a group baseline (verl's reinforce_plus_plus_baseline): r_i - mean of its group, on every
    token, whitened over every rank's tokens. Returns (R, N)."""
    centred = group_advantages(rewards, group_size, "none")[:, None] * mask
    return K.masked_whiten(centred, mask, all_ranks=True) * mask


def opo_advantages(rewards: torch.Tensor, group_size: int, lengths: torch.Tensor) -> torch.Tensor:
    """OPO (Hao et al. 2025): the optimal baseline under its assumptions is the length-weighted mean reward of the
    group, b = sum_j L_j r_j / sum_j L_j (L_j the response's tokens); A_i = r_i - b."""
    r, weights = rewards.view(-1, group_size), lengths.view(-1, group_size).to(rewards.dtype)
    baseline = (weights * r).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp_min(1.0)
    return (r - baseline).flatten()


def passk_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """pass@k training (Chen et al. 2025, verl's grpo_passk): only each group's best response moves, by its margin
    over the second best, in units of the group's std: A_best = (r_max - r_second) / (std(r) + eps), others 0."""
    if group_size < 2:
        raise ValueError("pass@k advantages need at least 2 samples per prompt")
    r = rewards.view(-1, group_size)
    top = torch.topk(r, 2, dim=-1)
    margin = (top.values[:, 0] - top.values[:, 1]) / (r.std(-1) + eps)
    return torch.zeros_like(r).scatter_(-1, top.indices[:, :1], margin[:, None]).flatten()


def gpg_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GPG (Chu et al. 2025, verl's gpg estimator): r_i - mean of its group, times alpha = (responses) / (responses
    with a non-zero reward) over every rank's batch, which undoes the dilution by groups that carry no signal."""
    counts = K.all_reduce_sum(torch.tensor([float(rewards.numel()), float(torch.count_nonzero(rewards))]))
    return counts[0] / counts[1].clamp_min(1.0) * group_advantages(rewards, group_size, "none")


def gdpo_advantages(per_reward: dict, weights, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GDPO (NVIDIA 2026, TRL's normalize-then-sum): each reward z-scored within its group on its own, then the
    weighted sum, whitened over every rank's responses; a reward that does not apply to a response (None) counts
    0. Against GRPO's z-score of the weighted sum, a reward whose scale is small keeps its resolution."""
    total = 0.0
    for values, weight in zip(per_reward.values(), weights):
        r = torch.tensor([0.0 if v is None else float(v) for v in values])
        total = total + weight * group_advantages(r, group_size, "group", eps)
    return K.masked_whiten(total, torch.ones_like(total), all_ranks=True)


def compute_advantages(args: Args, rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None,
                       baseline: torch.Tensor | None = None, per_reward: dict | None = None) -> torch.Tensor:
    """Dispatch on args.advantage: (R,) sequence advantages, or (R, N) token advantages ("batch", "rf_baseline").
    baseline: REMAX's greedy rewards (R,); per_reward: GDPO's rewards, name -> R values."""
    G = args.num_generations
    if args.advantage == "group":
        return group_advantages(rewards, G, "group")
    if args.advantage == "mean":
        return group_advantages(rewards, G, "none")
    if args.advantage == "rloo":
        return rloo_advantages(rewards, G)
    if args.advantage == "rf_baseline":
        return rf_baseline_advantages(rewards, G, mask.float())
    if args.advantage == "opo":
        return opo_advantages(rewards, G, mask.sum(-1))
    if args.advantage == "remax":  # ReMax (Li et al. 2024): the greedy response's reward as the baseline
        return rewards - baseline
    if args.advantage == "passk":
        return passk_advantages(rewards, G)
    if args.advantage == "gpg":
        return gpg_advantages(rewards, G)
    if args.advantage == "gdpo":
        return gdpo_advantages(per_reward, args.reward_weights, G).to(rewards.device)
    return reinforce_pp_advantages(rewards, mask, kl, args.kl_coef if args.kl_in_reward else 0.0)


def distill_advantages(old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                       coef: float) -> torch.Tensor:
    """On-policy distillation's token advantages (GKD, Agarwal et al. 2024; Thinking Machines 2025): each sampled
    token's reward is minus its reverse-KL estimate, log pi_teacher - log pi_old, times coef; its own reward only
    (discount 0, no return-to-go), not normalised; 0 off the response. Returns (R, N)."""
    # where, not a product: a padded position may hold -inf (a pad token outside the sampler's kept set)
    return torch.where(mask.bool(), coef * (teacher_logprobs - old_logprobs), 0.0)


def with_token_advantages(advantages: torch.Tensor, token_advantages: torch.Tensor) -> torch.Tensor:
    """advantages (R,) or (R, N) plus token_advantages (R, N): a sequence advantage counts at every token."""
    return (advantages[:, None] if advantages.dim() == 1 else advantages) + token_advantages


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) True where every response of the prompt got the same reward: no learning signal (DAPO)."""
    r = rewards.view(-1, group_size)  # (B, G)
    return (r.max(-1).values - r.min(-1).values) < 1e-9



# ----------------------------------------------------------------------------------------------------------
# Rollout: sample, score, (DAPO) sample more until the batch is informative
# ----------------------------------------------------------------------------------------------------------


def collect_rollout(args: Args, model, tokenizer, reward_fns, train_rows: list[dict], state: dict, step: int,
                    timer: runs.Timer, should_stop=None) -> tuple[env.Rollout, int, float]:
    """This rank's share of the step's prompts, G samples each, scored; under dynamic sampling further rounds of
    prompts until every rank holds its share of informative groups (or the rounds run out), informative groups
    first. Returns (rollout, sampling rounds, share of the sampled groups with zero reward variance). A stop
    requested while a reward runs raises rlvr_rewards.Interrupted (should_stop: the local flag)."""
    per_rank, G = args.prompts_per_step // K.get_world_size(), args.num_generations
    parts, rounds = [], 0
    while True:
        rows, positions = runs.next_rows(train_rows, state, args.prompts_per_step, args.seed)
        keys = K.rollout_noise_keys(args.seed, step, rounds, positions, G)
        part = env.rollout(args, model, tokenizer, rows, reward_fns, keys, timer, should_stop)
        parts.append(part)
        if not args.dynamic_sampling:
            return part, 1, zero_variance_groups(part.rewards, G).float().mean().item()
        informative = (~zero_variance_groups(torch.cat([p.rewards for p in parts]), G)).sum()
        # each rank keeps at most its own share: the batch is full when every rank's share is
        kept = int(K.all_reduce_sum(informative.clamp(max=per_rank).double()).item())
        rounds += 1
        if kept >= args.prompts_per_step or rounds > args.dynamic_sampling_rounds:
            break
    rollout = env.Rollout.cat(parts)
    zero_var = zero_variance_groups(rollout.rewards, G)
    # informative groups first, filled up with zero-variance ones (advantage 0) to keep the shapes fixed
    groups = torch.cat([torch.nonzero(~zero_var)[:, 0], torch.nonzero(zero_var)[:, 0]])[:per_rank]
    kept = rollout.select((groups[:, None] * G + torch.arange(G)[None]).flatten().tolist())
    return kept, rounds, zero_var.float().mean().item()


def greedy_baseline(args: Args, model, tokenizer, reward_fns, rollout: env.Rollout, timer: runs.Timer,
                    should_stop=None) -> torch.Tensor:
    """ReMax's baseline: one greedy response per prompt of the rollout, scored by the same rewards, repeated over
    the prompt's G rows (R,). Greedy decoding needs no noise keys: it is the same on every rank and resume."""
    rows = rollout.rows[::args.num_generations]
    with timer("generate"):
        greedy = env.sample(model, tokenizer, rows, num_samples=1, max_new_tokens=args.max_new_tokens,
                            temperature=0.0, template=args.template, system_prompt=args.system_prompt,
                            compile=args.compile)
    with timer("reward"):
        env.score(greedy, reward_fns, args.reward_weights, reward_timeout_s=args.reward_timeout_s,
                  should_stop=should_stop, completion_lengths=greedy.gen.lengths.tolist(), group_size=1)
    return greedy.rewards.repeat_interleave(args.num_generations)


# ----------------------------------------------------------------------------------------------------------
# Update: mu passes of minibatch steps of the clipped surrogate over one rollout
# ----------------------------------------------------------------------------------------------------------


def update(args: Args, model, optimizer, scheduler, batch: dict, state: dict) -> tuple[dict, dict]:
    """mu passes over the rollout, each split into num_minibatches optimizer steps of the clipped surrogate (each a
    sum over length-sorted micro-batches: rl_kernels.accumulate_gradients); returns (the averaged train/ stats, the
    mismatch/ metrics measured in the first optimizer step's forward when no pi_old pass ran, else {}). batch:
    prompt_ids, prompt_mask, tokens, mask, loss_mask, advantages, sampler_logprobs, rows, and old_logprobs (unless
    mu = 1 with one minibatch; bypass: the sampler's), ref_logprobs (beta > 0), is_weights (a correction)."""
    # With one pass and one minibatch pi_old is the current policy: the ratio is exactly 1, yet its gradient is
    # REINFORCE's; so the detached log-probs serve as old_logprobs and no extra pass is needed (bypass mode instead
    # sets old_logprobs to the sampler's: the ratio pi_theta / mu then carries the mismatch).
    correction = env.correction_of(args)
    on_policy = args.num_iterations == 1 and args.num_minibatches == 1 and not correction.bypass
    ref_in_loss = not args.kl_in_reward  # REINFORCE++ has its KL in the reward instead
    pick = torch.Generator().manual_seed(args.seed * 1_000_003 + scheduler.last_epoch)  # Clip-Cov: resumes alike
    # pi_old as the update's first forward sees it, for the mismatch/ metrics when no pi_old pass ran (free)
    measure = "sampler_logprobs" in batch and ("old_logprobs" not in batch or correction.bypass)
    if measure and "rows" not in batch:
        batch = {**batch, "rows": torch.arange(batch["mask"].shape[0], device=batch["mask"].device)}
    seen = torch.full(batch["mask"].shape, float("nan"), device=batch["mask"].device) if measure else None

    def micro_loss(part: dict, share: K.Share):
        logprobs, entropy = K.completion_logprobs(model, part, temperature=args.temperature,
                                                  with_entropy=True)                      # (r, n) each
        if recording:
            seen[part["rows"], :logprobs.shape[1]] = logprobs.detach().float()
        ref = part.get("ref_logprobs") if ref_in_loss else None
        weights = part.get("is_weights")
        if args.offpolicy_mask_delta is not None:  # DeepSeek-V3.2: drop far-off-policy sequences with A < 0
            keep = K.offpolicy_sequence_mask(logprobs, part["sampler_logprobs"], part["advantages"], part["loss_mask"],
                                             args.offpolicy_mask_delta)
            weights = keep if weights is None else weights * keep
        loss, stats = K.policy_loss(
            logprobs, logprobs.detach() if on_policy else part["old_logprobs"], part["advantages"], part["loss_mask"],
            clip_low=args.clip_low, clip_high=args.clip_high, ref_logprobs=ref,
            kl_coef=args.kl_coef if ref is not None else 0.0, kl_estimator=args.kl_estimator, loss_agg=args.loss_agg,
            ratio_level=args.ratio_level, norm_length=args.max_new_tokens, num_tokens=share.tokens,
            num_rows=share.rows, loss_type=args.loss_type, generator=pick, entropy=entropy,
            entropy_coef=args.entropy_coef, weights=weights, compile=args.compile)
        return loss, {**stats, "entropy": K.masked_mean(entropy.detach(), part["loss_mask"])}

    means, mismatch = K.StepMeans(), {}
    for i in range(args.num_iterations):
        for j, minibatch in enumerate(K.split_rows(batch, args.num_minibatches)):
            recording = measure and i == 0 and j == 0  # before any optimizer step: the forward is pi_old's
            stats = K.accumulate_gradients(model, minibatch, micro_loss, max_tokens=args.micro_batch_tokens,
                                           mask="loss_mask", state=state)
            if recording:
                rows = minibatch["rows"]
                kept = batch.get("kept_logmass")
                mismatch = K.mismatch_metrics(batch["sampler_logprobs"][rows], seen[rows], batch["mask"][rows],
                                              None if kept is None else kept[rows])
            means.add(K.guarded_step(model, optimizer, args.max_grad_norm, stats, state=state)[0])
    scheduler.step()  # the schedule counts rollout steps
    return means.result(always=("ratio_max", "ratio_min")), mismatch  # every rank the same keys


# ----------------------------------------------------------------------------------------------------------
# Setup: checks, rewards, models
# ----------------------------------------------------------------------------------------------------------


def check_args(args: Args, info: runs.DistInfo):
    """Impossible settings fail here, before any data or model is loaded."""
    runs.check_settings(args)
    if args.prompts_per_step % info.world_size:
        raise K.UserError(f"--prompts-per-step {args.prompts_per_step} must be divisible by the number of ranks "
                          f"({info.world_size}): each rank owns whole groups.")
    per_rank = args.prompts_per_step // info.world_size
    if args.temperature <= 0:
        raise K.UserError(f"--temperature {args.temperature}: training samples and log-probs need a temperature > 0 "
                          "(greedy decoding has no probabilities to learn from).")
    if args.num_iterations < 1 or args.num_minibatches < 1:
        raise K.UserError(f"--num-iterations ({args.num_iterations}) and --num-minibatches ({args.num_minibatches}) "
                          "must be at least 1.")
    if per_rank % args.num_minibatches:
        raise K.UserError(f"Each rank's {per_rank} prompts must split evenly into --num-minibatches "
                          f"{args.num_minibatches}.")
    if args.num_generations < 2 and args.advantage not in ("batch", "remax"):
        raise K.UserError(f"--num-generations {args.num_generations} leaves one sample per group: the "
                          f"'{args.advantage}' advantage is then always 0. Use G >= 2 or --advantage batch.")
    if args.kl_in_reward and args.kl_coef <= 0:
        raise K.UserError("--kl-in-reward needs --kl-coef > 0.")
    if args.lora_rank and args.ref_reset_every:  # the reference is the base with the adapter off (docs/lora.md)
        raise K.UserError(f"--ref-reset-every {args.ref_reset_every} needs full fine-tuning: with --lora-rank the KL "
                          "reference is the frozen base, which a reset would have to overwrite; use --lora-rank 0 or "
                          "--ref-reset-every 0.")
    env.check_reward_weights(args.rewards, args.reward_weights)
    if args.teacher is not None:
        check_teacher(args)


def check_teacher(args: Args):
    """--teacher scores the policy's sampled token ids, so it must read them as the policy does: the same tokenizer,
    every token at the same id (the checkpoints' embedding tables may still be padded differently). Checked from
    the tokenizer files, before any weights load."""
    if not 0 <= args.teacher_coef < float("inf"):  # NaN fails too
        raise K.UserError(f"--teacher-coef {args.teacher_coef}: must be a finite number, 0 or more.")
    K.check_model_source(args.model)
    K.check_model_source(args.teacher, "--teacher")
    try:
        ours, theirs = (K.load_tokenizer(K.resolve_model_path(name)).get_vocab() for name in (args.model, args.teacher))
    except (OSError, ValueError) as error:  # a checkpoint directory without tokenizer files
        raise K.UserError(f"--teacher {args.teacher}: its tokenizer could not be loaded to compare with --model's "
                          f"({str(error).splitlines()[0]}).") from error
    if ours != theirs:
        moved = next((token for token in sorted(ours, key=ours.get) if theirs.get(token) != ours[token]), None)
        detail = (f"{len(theirs)} tokens against {len(ours)}" if moved is None or len(ours) != len(theirs) else
                  f"{moved!r} is id {theirs.get(moved)} there and {ours[moved]} here")
        raise K.UserError(f"--teacher {args.teacher} does not share --model {args.model}'s tokenizer ({detail}), so "
                          "it cannot score the policy's token ids; use a teacher of the same tokenizer (a larger "
                          "model of the same family).")


def reward_functions(args: Args) -> tuple[list, tuple[float, ...]]:
    """[(name, fn)] and their weights: args.rewards (weights: as given, else 1 each but 0.1 for a shaping reward
    beside others), plus DAPO's soft overlong punishment (weight 1) when on."""
    reward_fns = env.resolve_rewards(args.rewards, args.dataset)
    weights = env.reward_weights(args.rewards, args.reward_weights)
    if args.soft_overlong:
        reward_fns.append(("soft_overlong", functools.partial(
            env.soft_overlong_reward, max_length=args.max_new_tokens, cache_length=args.overlong_cache)))
        weights += (1.0,)
    return reward_fns, weights


def load_models(args: Args, info: runs.DistInfo):
    """(policy, the frozen reference or None, tokenizer): the policy wrapped for DDP/FSDP2; the reference loaded
    only when beta > 0, and sharded like the policy under FSDP (both sharded as they load). With --lora-rank the
    policy is the base plus an adapter and the reference is the same model with the adapter off: nothing loads twice."""
    precision = dict(dtype=args.dtype, master_dtype=args.master_dtype, device=info.device,
                     shard=args.strategy == "fsdp")  # FSDP2: sharded as it loads, never whole on a GPU
    model, tokenizer = K.load_model(args.model, lora=runs.lora_of(args), **precision)
    K.set_batch_invariant(model, args.batch_invariant)  # refuses what it cannot make exact (bf16, GPU, LoRA, FSDP)
    K.set_cpu_threads(args.threads, model)
    ref_model = None
    if args.kl_coef > 0 and not args.lora_rank:  # frozen: bf16 matmul weights only, as the policy computes
        ref_model, _ = K.load_model(args.model, frozen=True, **precision)
        ref_model.eval().requires_grad_(False)
    model.train()
    policy = K.wrap_model(model, args.strategy, info.device, args.gradient_checkpointing)
    if args.kl_coef > 0 and args.lora_rank:
        ref_model = K.BaseReference(policy)  # pi_ref = the base: the policy with its adapter disabled
    return policy, ref_model, tokenizer


def load_teacher(args: Args, info: runs.DistInfo):
    """The frozen teacher of --teacher (None without one), loaded as the KL reference is: in the compute dtype,
    sharded like the policy under FSDP, a whole copy on every rank under DDP. Nothing of it is checkpointed: a
    resume loads it again from --teacher."""
    if args.teacher is None:
        return None
    teacher, _ = K.load_model(args.teacher, frozen=True, dtype=args.dtype, master_dtype=args.master_dtype,
                              device=info.device, shard=args.strategy == "fsdp")
    K.set_batch_invariant(teacher, args.batch_invariant)  # a teacher equal to the policy then gives exactly 0
    return teacher.eval().requires_grad_(False)


def restore_reference(args: Args, ref_model, checkpoint: str):
    """--resume: the reference the checkpoint holds when it has been reset since the start (--ref-reset-every)."""
    ref_file = os.path.join(checkpoint, "reference.safetensors")
    if ref_model is not None and os.path.exists(ref_file):
        from safetensors.torch import load_file

        K.set_full_state_dict(ref_model, load_file(ref_file), source=ref_file)
    elif ref_model is not None and args.ref_reset_every and runs.checkpoint_step(checkpoint) >= args.ref_reset_every:
        raise K.UserError(f"{checkpoint} has no reference.safetensors, but with --ref-reset-every "
                          f"{args.ref_reset_every} the reference was replaced by the policy before step "
                          f"{runs.checkpoint_step(checkpoint)}; resuming would measure the KL against the wrong model.")


PANELS = [("held-out (greedy) and rollouts", [("eval/accuracy", "held-out greedy accuracy"),
                                               ("eval/reasoning_share", "held-out reasoning share"),
                                               ("rollout/accuracy", "rollout accuracy (T=1)")], "share"),
          ("rollout response length", [("rollout/response_length", "all"),
                                       ("rollout/length_incorrect", "incorrect")], "tokens")]


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def main(args: Args) -> runs.RunResult:
    """Train with GRPO (or the preset's variant); returns where the run wrote and the held-out metrics before and
    after (rl_runs.RunResult)."""
    session = runs.Session(args, check=check_args, desc="grpo", panels=PANELS,
                           title=f"grpo.py --preset {args.preset} --model {args.model}")
    info = session.info
    torch.set_num_threads(max(1, torch.get_num_threads()))
    reward_fns, weights = reward_functions(args)  # a user's mistake in the data or rewards stops here
    args, train_rows, eval_rows = env.load_task(args, reward_fns, weights, info.device)

    with session:
        if session.finished:
            return session.result()
        policy, ref_model, tokenizer = load_models(args, info)
        teacher = load_teacher(args, info)
        train_rows, eval_rows = env.fit_task(args, policy, tokenizer, train_rows, eval_rows)
        optimizer = K.adamw(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay, device=info.device,
                            strategy=args.strategy)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, runs.warmup_schedule(args.warmup_steps))
        state = session.state
        state["cursor"] = 0  # the position in the shuffled prompt stream
        reference = ((lambda: {"reference.safetensors": K.full_state_dict(ref_model)})  # it changes: checkpoint it
                     if ref_model is not None and args.ref_reset_every else None)
        truncation_warned = mismatch_warned = False  # warn_truncation, warn_mismatch: once per run
        correction = env.correction_of(args)
        steps = session.start(args, model=policy, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                              evaluate=env.evaluator(args, policy, tokenizer, eval_rows),
                              tensor_files=reference,
                              on_restore=functools.partial(restore_reference, args, ref_model))
        for step in steps:
            timer = runs.Timer()

            # ---- rollout: G samples per prompt from pi_old, scored by the rewards
            policy.eval()
            try:
                with K.offload_optimizer(optimizer, args.offload_optimizer), timer.peak_memory("rollout"):
                    rollout, rounds, zero_var_share = collect_rollout(args, policy, tokenizer, reward_fns, train_rows,
                                                                      state, step, timer, session.stop_requested)
                    baseline = (greedy_baseline(args, policy, tokenizer, reward_fns, rollout, timer,
                                                session.stop_requested).to(info.device)
                                if args.advantage == "remax" else None)  # ReMax: the greedy response's reward
            except env.Interrupted:  # a signal during a slow reward: drop this step, save the ones done
                session.drop_step(step)
            if args.decode_memory == "free":                   # the update gets the KV caches' memory
                K.free_decode_state(policy)
            policy.train()
            batch = rollout.batch(args.keep_sampling_mask)     # prompt_ids (R, P), tokens and mask (R, N), log mu
            batch["loss_mask"] = rollout.gen.mask.clone()
            if args.overlong_filter:                           # DAPO: truncated responses teach nothing
                batch["loss_mask"][rollout.gen.truncated] = 0
            with timer("logprobs"):
                logprob_pass = functools.partial(K.rollout_logprobs, batch=batch, temperature=args.temperature,
                                                 max_tokens=args.micro_batch_tokens)
                if correction.bypass:                                      # pi_old := mu, no pass
                    batch["old_logprobs"] = batch["sampler_logprobs"]
                elif not (args.num_iterations == 1 and args.num_minibatches == 1) or correction.reweights or (
                        args.kl_in_reward and not K.sampled_logprobs_exact(policy)):  # bf16: the sampler's differ
                    batch["old_logprobs"] = logprob_pass(policy)           # (R, N) pi_old, fixed for mu passes
                if ref_model is not None:
                    batch["ref_logprobs"] = logprob_pass(ref_model)        # (R, N) pi_ref
                if teacher is not None:  # over the sampler's kept set under top-p/top-k, as pi_old and pi_ref
                    teacher_logprobs = logprob_pass(teacher)               # (R, N) pi_teacher
            mismatch, weights, keep = env.sampler_gap(batch, correction)  # the sampler against pi_old's pass
            if keep is not None:                               # decoupled: IS weights and rejection from rho
                batch["loss_mask"] = batch["loss_mask"] * keep
                if weights is not None:
                    batch["is_weights"] = weights

            # ---- advantages: each response against its group (or the batch)
            kl = None
            if args.kl_in_reward:                              # REINFORCE++: beta * k1 folded into the rewards
                kl = K.kl_penalty(batch.get("old_logprobs", rollout.gen.logprobs), batch["ref_logprobs"], "k1")
            batch["advantages"] = compute_advantages(args, rollout.rewards.to(batch["mask"].device), batch["mask"],
                                                     kl, baseline, rollout.per_reward)  # (R,) or (R, N)
            distill = {}
            if teacher is not None:                            # on-policy distillation: the teacher's token rewards
                old_logprobs = batch.get("old_logprobs", batch["sampler_logprobs"])  # (R, N) what pi_old we have
                batch["advantages"] = with_token_advantages(batch["advantages"], distill_advantages(
                    old_logprobs, teacher_logprobs, batch["mask"], args.teacher_coef))  # (R, N)
                reverse_kl = torch.where(batch["mask"].bool(), old_logprobs - teacher_logprobs, 0.0)  # (R, N)
                distill = {"distill/reverse_kl": K.masked_mean(reverse_kl, batch["mask"]).item()}

            # ---- update
            with timer("update"), timer.peak_memory("update"):
                train_stats, measured = update(args, policy, optimizer, scheduler, batch, state)
            mismatch = mismatch or measured
            if ref_model is not None and args.ref_reset_every and (step + 1) % args.ref_reset_every == 0:
                K.copy_weights(ref_model, policy)              # DeepSeek-R1: the reference becomes the policy

            # ---- log / evaluate / save
            metrics = {**env.rollout_metrics(rollout), "rollout/zero_variance_group_share": zero_var_share,
                       "rollout/sampling_rounds": rounds, **mismatch, **distill}
            mismatch_warned = env.warn_mismatch(mismatch, step + 1, mismatch_warned)
            counts = {**env.rollout_metric_weights(rollout), "distill/reverse_kl": float(rollout.gen.mask.sum())}
            metrics = env.finish_reward_std(K.reduce_metrics({**metrics, **train_stats}, weights=counts))
            truncation_warned = env.warn_truncation(metrics, step + 1, args.max_new_tokens, truncation_warned)
            metrics.update(timer.step_metrics(int(rollout.gen.mask.sum()) * info.world_size, info.device))
            metrics["train/lr"] = scheduler.get_last_lr()[0]
            samples = env.rollout_samples(rollout, batch["advantages"], args.log_samples)
            session.end_step(step + 1, metrics, samples=samples, postfix=dict(
                reward="rollout/reward_mean", acc="rollout/accuracy", len="rollout/response_length"))
    return session.result()


if __name__ == "__main__":
    runs.run_cli(main, cli())
