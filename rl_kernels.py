"""rl_kernels.py: the engine, i.e. what touches tensors and the model on the device. No algorithm choices live here
beyond the clipped policy loss that PPO and the GRPO family share; the engine knows nothing of runs (rl_runs.py:
files, processes, the clock) and imports nothing of the project's.

What is in this file, top to bottom:
  1. the loss:     policy_loss(...) the clipped surrogate with per-token beta*KL, four aggregation modes and
                   token- or sequence-level (GSPO) ratios; compiled with torch.compile on GPU, eager elsewhere.
  2. loading:      load_model(name_or_path | "toy") -> (model, tokenizer), left padding, a pad token always set,
                   FSDP2-sharded as it loads (shard=True: built on the meta device, filled from rank 0);
                   check_model_source (one sentence for a bad path or an unreachable hub); set_cpu_threads; mixed
                   precision (set_precision, compute_dtype: fp32 master weights, bf16 or fp16 compute).
  3. generation:   generate(...) batched sampling with a static KV cache, each prompt prefilled once and
                   shared by its num_samples rows, the one-token decode step compiled whole (CUDA graphs on GPU)
                   with one shape per use for a run (set_generation_length), grouped-query attention that reads
                   each KV head once, the output layer in fp32; eager (CPU), finished rows leave the batch. Sampling
                   noise keyed per row (rollout_noise_keys, eval_noise_keys), so samples do not depend on the batch,
                   the rank or a resume. Under mixed precision and FSDP2 it decodes a rollout copy of the weights;
                   caches, copy and compiled steps stay on the model, free_decode_state frees their memory for an
                   update; peak_memory_gb.
  4. log-probs:    token_logprobs(...) log pi(x_{t+1} | x_<=t) from the final hidden states and the output
                   embedding in chunks, so the (B, T, V) logits never exist, in the forward or the backward;
                   completion_logprobs / rollout_logprobs for a rollout batch, over length-sorted micro-batches
                   that come back trimmed (micro_batches).
  5. reductions:   masked_sum / masked_mean / masked_var / masked_whiten.
  6. collectives:  all_reduce_* / reduce_metrics / print0 / barrier; wrap_model (DDP or FSDP2 fully_shard, gradient
                   checkpointing), adamw, offload_optimizer (its state in CPU memory during a rollout),
                   full_state_dict; length_batches (length-sorted micro-batches), no_grad_sync (DDP: sync once).
  7. accumulation: accumulate_gradients (one optimizer step's gradients over trimmed micro-batches, the algorithm
                   giving one micro-batch's loss), fold_stats, guarded_step (no step on a NaN/inf; the gradients
                   freed after it), StepMeans; under fp16 compute a dynamic loss scale (loss_scale).
  8. LoRA:         add_lora (peft's adapter injected in place: fp32 adapter, frozen base in the compute dtype),
                   BaseReference (the KL reference: the policy with its adapter off, no second model),
                   adapter_state_dict / set_adapter_state_dict / save_adapter (peft's format), merged_state_dict
                   (W + (alpha/r) B A, the plain model); decoding reads merged weights (_rollout_model).

Shapes (declared once): B prompts, S samples per prompt (R = B*S rows), P prompt length, N new tokens,
T sequence length, H hidden size, V vocabulary size.

The policy loss (the equations live here because every algorithm file shares them):

    rho_t   = exp(logprobs_t - old_logprobs_t)                       token-level ratio (PPO, GRPO, DAPO)
    rho_i   = exp(mean_t(logprobs_t - old_logprobs_t))                sequence-level ratio (GSPO, Zheng et al. 2025)
    l_t     = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t    with log r = ref_logprobs_t - logprobs_t (Schulman 2020, "Approximating KL divergence"):
              k1 = -log r      k2 = (log r)^2 / 2      k3 = exp(log r) - 1 - log r
    loss_type, the surrogate l_t before the KL (A the advantage, sg a stop-gradient, eps_low/eps_high the clip):
      clip         -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)              PPO, GRPO, DAPO, GSPO (above)
      cispo        -sg(clip(rho, 1-eps_low, 1+eps_high)) A log pi_theta        CISPO (MiniMax-M1 2025), verl's form
      cispo_upper  -sg(min(rho, 1+eps_high)) A log pi_theta                    CISPO as TRL writes it (upper only)
      sapo         -(4/tau) sigmoid(tau (rho - 1)) A, tau = 1.0 (A > 0) or 1.05   SAPO (Qwen 2025): a soft gate
      gmpo         -A_i exp(mean_t sign(A) min(sign(A) log rho, sign(A) clip(log rho, -eps_low, eps_high)))
                   one loss per sequence, averaged over sequences                GMPO (Zhao et al. 2025)
      gpg          -A log pi_theta                                             GPG (Chu et al. 2025): no ratio
      clip_cov     clip, but a random max(1, 2e-4 n) of the unclipped tokens whose cov term
                   (A - mean A)(log pi - mean log pi) lies in (1, 5) leave the loss   Clip-Cov (Cui et al. 2025)
      kl_cov       -rho A + 0.1 |log rho| on the max(1, 2e-4 n) tokens of highest cov term, -rho A elsewhere  KL-Cov
    entropy bonus: -c H_t added to every l_t (entropy_coef; H from the chunked log-prob pass).
    (cispo and sapo clamp log rho to [-20, 20] first, as verl does.) Each is checked against verl's function of
    the same name (tests/test_objectives.py) and, at rho = 1, all have GRPO's gradient A grad log pi.
    aggregation over the mask m (verl's names):
      token-mean               sum_it m*l / sum_it m                                (DAPO)
      seq-mean-token-mean      mean_i [ sum_t m*l / sum_t m ]                         (GRPO, DeepSeekMath)
      seq-mean-token-sum       mean_i [ sum_t m*l ]
      seq-mean-token-sum-norm  sum_it m*l / (R * norm_length)                         (Dr. GRPO)

Deliberate choices:
  - The log-probs `generate` returns are those of the distribution it sampled from *before* top-k/top-p
    truncation, i.e. log_softmax(logits / temperature); `token_logprobs(..., temperature=...)` computes the
    same quantity, so pi_old from the sampler can stand in for a recomputation when numerics match.
  - The fused log-prob runs inside a forward pre-hook on the output embedding: the model's own forward runs
    (so DDP and FSDP2 hooks fire as usual), the hook computes the log-probs chunk by chunk from the hidden
    states it receives, and hands the head an empty tensor. Models that post-process logits (soft-capping,
    logit scaling) take the plain path instead.
  - Precision. `--dtype` is the compute dtype; the weights, gradients and AdamW state stay in master_dtype (fp32),
    because at real learning rates (1e-6) an update is far below bf16's resolution at weights of ~0.02 and AdamW
    on bf16 weights rounds it away. One process and DDP: torch.autocast around the model's forward; FSDP2:
    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). Pure bf16 is master_dtype = bf16. In both the
    sampler and the trainer the output layer sums in fp32 (head_logits): bf16 logits would be rounded by up to
    0.06 nats at a logit of 10, and differently in the two paths' shapes on a GPU. fp16 compute (`--dtype
    float16`, fp32 master weights only) has 3 more mantissa bits than bf16 and 5 fewer exponent bits: its largest
    value is 65504 and gradients below 6e-8 vanish, so its backward runs on the loss times a dynamic scale that
    guarded_step divides out of the fp32 gradients before clipping (loss_scale; bf16 and fp32 are never scaled).
  - Decoding reads bf16 weights under mixed precision and FSDP2: a rollout copy (_rollout_model says how).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# 1. The clipped policy loss (PPO and the GRPO family share it)
# ----------------------------------------------------------------------------------------------------------

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_unbiased")
LOSS_TYPES = ("clip", "cispo", "cispo_upper", "sapo", "gmpo", "gpg", "clip_cov", "kl_cov")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3",
               old_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate at sampled tokens, log r = ref - logprobs (Schulman 2020).
    k3_unbiased (DeepSeek-V3.2 §3.1): the tokens were drawn from pi_old (or the sampler), not pi_theta, so k3 is
    weighted by pi_theta / pi_old, not detached: E_old[(pi/pi_old) k3] = KL(pi || pi_ref), value and gradient."""
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    if estimator == "k3_unbiased":
        if old_logprobs is None:
            raise ValueError("k3_unbiased needs old_logprobs (the policy that sampled the tokens).")
        return torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)) * (torch.expm1(log_r) - log_r)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}.")


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: float | None = None,
                   num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-token losses (R, T) to a scalar by one of LOSS_AGGREGATIONS (verl's names).

    num_tokens overrides token-mean's denominator, for when a batch is split over ranks or micro-batches
    and the mean must be over the whole batch's tokens.
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (loss * mask).sum() / torch.clamp_min(torch.as_tensor(denom, dtype=loss.dtype), 1.0)
    if mode == "seq-mean-token-mean":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).mean()
    if mode == "seq-mean-token-sum":
        return (loss * mask).sum(-1).mean()
    if mode == "seq-mean-token-sum-norm":
        return (loss * mask).sum() / (loss.shape[0] * (norm_length or loss.shape[-1]))
    raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {mode!r}.")


def _policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ref_logprobs, kl_coef,
                 kl_estimator, loss_agg, ratio_level, norm_length, num_tokens, loss_type="clip", taus=(1.0, 1.05),
                 cov=(2e-4, 1.0, 5.0, 0.1), generator=None, entropy=None, entropy_coef=0.0, weights=None):
    maskf = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    # Padded positions may hold anything (a pad token's log-prob of -200 against a stored 0): zero them before
    # any exp, or inf * 0 would turn the loss and the gradient into NaN.
    live = mask.bool()
    log_ratio = torch.where(live, logprobs - old_logprobs, 0.0)
    if ratio_level == "sequence":  # GSPO: one length-normalised ratio per sequence, shared by its tokens
        seq_log_ratio = (log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp_min(1.0)
        log_ratio = seq_log_ratio[:, None].expand_as(logprobs)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}.")
    if loss_type in ("cispo", "cispo_upper", "sapo"):
        log_ratio = log_ratio.clamp(-20.0, 20.0)  # as verl: their weights stay finite at any drift
    ratio = torch.exp(log_ratio)
    if loss_type in ("clip", "clip_cov"):  # PPO / GRPO: the pessimistic (larger) of the unclipped and clipped losses
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        per_token, was_clipped = torch.maximum(unclipped, clipped), clipped > unclipped
        if loss_type == "clip_cov":  # Clip-Cov: also cut the gradient of a few random high-covariance tokens
            per_token, was_clipped = _clip_cov(per_token, was_clipped, logprobs, advantages, live, maskf, cov,
                                               generator)
    elif loss_type == "kl_cov":  # KL-Cov: no clip; the highest-covariance tokens get beta_cov * |log rho|
        chosen = _top_covariance(logprobs, advantages, live, cov[0])
        per_token = -advantages * ratio + cov[3] * log_ratio.abs() * chosen
        was_clipped = chosen.bool()
    elif loss_type in ("cispo", "cispo_upper"):  # CISPO: REINFORCE weighted by the clipped, detached IS ratio
        low = 0.0 if loss_type == "cispo_upper" else 1.0 - clip_low  # TRL clips above only, verl both sides
        weight = torch.clamp(ratio, low, 1.0 + clip_high)
        per_token, was_clipped = -weight.detach() * advantages * logprobs, weight != ratio
    elif loss_type == "sapo":  # SAPO: a soft sigmoid gate instead of the hard clip, steeper for A <= 0
        tau = torch.where(advantages > 0, taus[0], taus[1])
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * advantages
        was_clipped = torch.zeros_like(live)
    elif loss_type == "gmpo":  # GMPO: the geometric mean of sign-aware clipped token ratios, one per sequence
        sign = torch.sign(advantages)
        clamped = torch.clamp(log_ratio, -clip_low, clip_high)  # GMPO clips log rho (its eps, e.g. 0.4)
        kept = sign * torch.minimum(sign * log_ratio, sign * clamped)
        seq_ratio = torch.exp((kept * maskf).sum(-1) / maskf.sum(-1).clamp_min(1.0))
        seq_adv = (advantages * maskf).sum(-1) / maskf.sum(-1).clamp_min(1.0)
        per_token = (-seq_adv * seq_ratio)[:, None].expand_as(logprobs)  # the sequence's loss on each of its tokens
        was_clipped = clamped != log_ratio
    elif loss_type == "gpg":  # GPG: the plain policy gradient, no ratio
        per_token, was_clipped = -advantages * logprobs, torch.zeros_like(live)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if weights is not None:  # the mismatch correction's detached IS weights (and masks) scale the surrogate
        per_token = per_token * weights.detach()
    if entropy is not None and entropy_coef:  # the entropy bonus: -c H_t, aggregated as the loss is
        per_token = per_token - entropy_coef * entropy
    stats = {}
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, torch.where(live, ref_logprobs, logprobs.detach()), kl_estimator,
                        torch.where(live, old_logprobs, logprobs.detach()))
        per_token = per_token + kl_coef * kl
        stats["kl"] = _mean(kl.detach(), maskf)
    # GMPO's loss is a mean over sequences whatever loss_agg says: each sequence's loss once, not once per token
    loss = aggregate_loss(per_token, mask, "seq-mean-token-mean" if loss_type == "gmpo" else loss_agg, norm_length,
                          num_tokens)
    with torch.no_grad():
        stats["clip_frac"] = _mean(was_clipped.to(maskf.dtype), maskf)
        stats["approx_kl"] = _mean(torch.expm1(-log_ratio) + log_ratio, maskf)  # k3 of pi_old vs pi
        big = torch.finfo(ratio.dtype).max
        stats["ratio_mean"] = _mean(ratio, maskf)
        stats["ratio_max"] = torch.where(live, ratio, -big).max()
        stats["ratio_min"] = torch.where(live, ratio, big).min()
    return loss, stats


def _covariance(logprobs, advantages, live):
    """Per token, cov(log pi, A)'s summand over the batch's live tokens: (A - mean A)(log pi - mean log pi), the
    statistic Clip-Cov and KL-Cov rank tokens by (Cui et al. 2025: the entropy change follows it)."""
    maskf = live.to(logprobs.dtype)
    return (advantages - _mean(advantages, maskf)) * (logprobs.detach() - _mean(logprobs.detach(), maskf))


def _clip_cov(per_token, was_clipped, logprobs, advantages, live, maskf, cov, generator):
    """Clip-Cov (verl's clip_cov): among the live tokens PPO did not clip whose covariance lies in (lb, ub), pick
    max(1, int(ratio * tokens)) at random and take them out of the loss. Data-dependent: runs eagerly."""
    ratio, lower, upper, _ = cov
    score = _covariance(logprobs, advantages, live)
    candidates = torch.nonzero(live & ~was_clipped & (score > lower) & (score < upper))
    count = max(int(ratio * int(live.sum())), 1)
    if len(candidates):
        candidates = candidates[torch.randperm(len(candidates), generator=generator)[:count].to(candidates.device)]
    keep = torch.ones_like(per_token)
    keep[candidates[:, 0], candidates[:, 1]] = 0.0
    return per_token * keep, keep == 0


def _top_covariance(logprobs, advantages, live, ratio):
    """KL-Cov (verl's kl_cov): 1 at the max(1, int(ratio * tokens)) live tokens of highest covariance, else 0."""
    flat = torch.nonzero(live.flatten())[:, 0]
    adv, logp = advantages.flatten()[flat], logprobs.detach().flatten()[flat]
    score = (adv - adv.mean()) * (logp - logp.mean())
    chosen = torch.zeros(live.numel(), dtype=logprobs.dtype, device=logprobs.device)
    if len(flat):
        chosen[flat[torch.topk(score, max(1, int(len(flat) * ratio))).indices]] = 1.0
    return chosen.view_as(logprobs)


def _own_code(fn, tag: str):
    """fn with a code object of its own: dynamo keeps its compiled versions per code object and, under fullgraph,
    fails at the 9th (recompile_limit); decode states and loss settings each compile their own instead of piling
    versions onto one shared code object."""
    import types

    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _mean(x, maskf):
    return (x * maskf).sum() / maskf.sum().clamp_min(1.0)


_COMPILED_LOSSES: dict = {}  # the loss's static settings -> its compiled function


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *, clip_low: float = 0.2, clip_high: float = 0.2, ref_logprobs: torch.Tensor | None = None,
                kl_coef: float = 0.0, kl_estimator: str = "k3", loss_agg: str = "token-mean",
                ratio_level: str = "token", norm_length: float | None = None,
                num_tokens: float | torch.Tensor | None = None, num_rows: int | None = None,
                loss_type: str = "clip", sapo_taus: tuple[float, float] = (1.0, 1.05),
                cov: tuple[float, float, float, float] = (2e-4, 1.0, 5.0, 0.1),
                generator: torch.Generator | None = None, entropy: torch.Tensor | None = None,
                entropy_coef: float = 0.0, weights: torch.Tensor | None = None, compile: bool | None = None):
    """The clipped surrogate plus beta*KL, aggregated; returns (loss, stats) with stats as detached 0-d tensors
    (clip_frac, approx_kl to pi_old, kl to pi_ref when given, ratio_mean/max/min), so no host sync happens here.
    loss_type picks the surrogate (the module docstring's table): clip (PPO, GRPO), cispo / cispo_upper, sapo
    (sapo_taus: tau for A > 0, for A <= 0), gmpo (a mean over sequences whatever loss_agg), gpg, clip_cov and kl_cov
    (cov: the share of tokens, Clip-Cov's covariance bounds, KL-Cov's coefficient; generator: Clip-Cov's random pick;
    both eager, their selection being data-dependent). entropy (R, T), entropy_coef: the bonus -c H_t per token.
    weights (R, T) or (R, 1): detached per-token factors on the surrogate (the mismatch correction's IS weights and
    sequence masks: rollout_correction, offpolicy_sequence_mask); the KL and entropy terms are not weighted.

    logprobs, old_logprobs, mask, ref_logprobs: (R, T); advantages: (R,) or (R, T).
    num_tokens / num_rows: the token-mean's / the sequence means' denominators when these rows are one micro-batch
    of a larger minibatch (accumulate_gradients' Share), so that the micro-batches' losses add up to its loss.
    compile: torch.compile the whole thing (default: on CUDA, where fusing the elementwise ops pays).
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}.")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}.")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape.")
    if compile is None:
        compile = logprobs.is_cuda and loss_type not in ("clip_cov", "kl_cov")
    fn = _policy_loss
    if compile:
        settings = (loss_agg, kl_estimator, ratio_level, ref_logprobs is None, loss_type, entropy is None,
                    weights is None)
        if settings not in _COMPILED_LOSSES:  # a break raises; each setting compiles on its own code object
            _COMPILED_LOSSES[settings] = torch.compile(_own_code(_policy_loss, str(len(_COMPILED_LOSSES))),
                                                       dynamic=True, fullgraph=True)
        fn = _COMPILED_LOSSES[settings]
        # One compiled graph for every micro-batch: sizes are dynamic, but a trimmed (non-contiguous) view's strides
        # would fail a contiguity guard and recompile; contiguous copies of these (R, T) tensors cost nothing.
        logprobs, old_logprobs, advantages, mask = (t.contiguous() for t in (logprobs, old_logprobs, advantages, mask))
        ref_logprobs = ref_logprobs.contiguous() if ref_logprobs is not None else None
    loss, stats = fn(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ref_logprobs, kl_coef,
                     kl_estimator, loss_agg, ratio_level, norm_length, num_tokens, loss_type, tuple(sapo_taus),
                     tuple(cov), generator, entropy, entropy_coef, weights)
    if num_rows is not None and (loss_agg != "token-mean" or loss_type == "gmpo"):  # a mean over num_rows sequences
        loss = loss * logprobs.shape[0] / num_rows
    return loss, stats


# ---- Sampler–trainer mismatch: the three policies, the metrics, the corrections
#
# mu the sampler (generate: its kernels, precision and batch shapes), pi_old the trainer's forward before the update,
# pi_theta the policy being updated. Per token  pi_theta / mu = (pi_old / mu) * (pi_theta / pi_old) = rho_t * r_t:
# rho is the engine's drift (exactly 1 when both compute alike), r the update's own (PPO clips r). With
#   log rho_t = log pi_old - log mu,   rho_seq = exp(sum_t log rho_t),   rho_geo = exp(mean_t log rho_t),
# the corrections (rollout_correction) reweight or drop what mu sampled so that the gradient is pi_old's:
#   IS, token      w_t = rho_t                    (low variance; biased, verl's note: O(T^2 Delta))
#   IS, sequence   w_t = rho_seq for every t      (unbiased, variance grows with T)
#   IS, geometric  w_t = rho_geo                  (length-invariant)
#   truncate       w <- clamp(w, low, high)       (TIS; verl: high only; OpenRLHF: [0.5, 5])
#   mask           w <- w * 1[low <= w <= high]   (MIS: TRL's sequence_mask; IcePop per token)
#   rejection      drop tokens / sequences whose k1 = -log rho, k2 = (log rho)^2 / 2 or k3 = rho - 1 - log rho,
#                  per token or aggregated per sequence (sum, mean, max), lies outside its bounds (verl's names:
#                  token_k1, seq_sum_k2, seq_mean_k1 with bounds 0.999_1.001 is geometric rejection, ...); the dropped
#                  tokens leave the loss and its normaliser
# decoupled mode: pi_old from one extra forward, loss = w_t * surrogate(r_t) (Hilton et al. 2021);
# bypass mode: pi_old := mu, no extra forward, the PPO ratio pi_theta / mu absorbs rho (and its clip bounds it).
# The weights are always detached: they change the measure, not the objective. Log-ratios are clamped at +-20 before
# any exp (as verl), so no weight overflows.

LOG_RATIO_BOUND = 20.0
REJECTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


@dataclass(frozen=True)
class Correction:
    """A sampler–trainer mismatch correction (the comment block above). is_level None: no weights; rejection: verl's
    option names, each with its bounds in rejection_bounds ("lo_hi" for k1, "hi" for k2/k3)."""
    is_level: str | None = None                   # None | token | sequence | geometric
    is_mode: str = "truncate"                     # truncate | mask
    is_low: float | None = None                   # None: no lower bound
    is_high: float = 2.0
    rejection: tuple[str, ...] = ()
    rejection_bounds: tuple[str, ...] = ()
    bypass: bool = False                          # pi_old := mu (no pi_old pass)

    @property
    def reweights(self) -> bool:
        """Whether the loss needs pi_old before the update (decoupled weights or a rejection mask)."""
        return self.is_level is not None or bool(self.rejection)


# The anchors' defaults, so that a user can reproduce theirs (--rollout-correction NAME).
CORRECTIONS = {
    "none": Correction(),                                                              # measure only
    "trl": Correction("sequence", "mask", None, 3.0),                  # TRL with vLLM: sequence_mask, cap 3.0
    "openrlhf": Correction("token", "truncate", 0.5, 5.0),                             # OpenRLHF token TIS [0.5, 5]
    "icepop": Correction("token", "mask", 0.5, 5.0),                                   # IcePop: mask outside [0.5, 5]
    "verl-token-tis": Correction("token", "truncate", None, 2.0),                      # verl decoupled_token_is
    "verl-seq-tis": Correction("sequence", "truncate", None, 2.0),                     # verl decoupled_seq_is
    "verl-seq-is-rs": Correction("sequence", "truncate", None, 2.0, ("seq_sum_k1",), ("0.5_2.0",)),
    "verl-geo-rs": Correction(rejection=("seq_mean_k1",), rejection_bounds=("0.999_1.001",)),  # decoupled_geo_rs
    "verl-k3-rs": Correction(rejection=("seq_mean_k3",), rejection_bounds=("0.01",)),
    "geo-tis": Correction("geometric", "truncate", None, 2.0),
    "bypass": Correction(bypass=True),                                                 # verl bypass_ppo_clip
}


def _rejection_bounds(option: str, spec: str) -> tuple[float, float]:
    """(lower, upper) of a rejection option on its statistic's scale: k1 bounds are ratios ("0.999_1.001", or one
    upper u meaning 1/u_u) turned into logs; k2/k3 take one upper bound."""
    parts = str(spec).split("_")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--rejection-bounds {spec!r} for {option}: not a number.") from None
    if option.endswith("k1"):
        low, high = (1.0 / values[0], values[0]) if len(values) == 1 else values
        if not 0 < low <= high or len(values) > 2:
            raise UserError(f"--rejection-bounds {spec!r} for {option}: give lower_upper ratios, 0 < lower <= upper.")
        return math.log(low), math.log(high)
    if len(values) != 1 or values[0] <= 0:
        raise UserError(f"--rejection-bounds {spec!r} for {option}: give one positive upper bound.")
    return -math.inf, values[0]


def check_correction(corr: Correction):
    """One sentence for a correction that cannot run."""
    if corr.is_level not in (None, "token", "sequence", "geometric"):
        raise UserError(f"--is-level {corr.is_level!r}: use token, sequence or geometric.")
    if corr.is_mode not in ("truncate", "mask"):
        raise UserError(f"--is-mode {corr.is_mode!r}: use truncate or mask.")
    if corr.is_high <= 0 or (corr.is_low is not None and not 0 <= corr.is_low <= corr.is_high):
        raise UserError(f"--is-bounds [{corr.is_low}, {corr.is_high}]: need 0 <= low <= high and high > 0.")
    unknown = [o for o in corr.rejection if o not in REJECTIONS]
    if unknown:
        raise UserError(f"--rejection {','.join(unknown)}: not one of {', '.join(REJECTIONS)}.")
    if len(corr.rejection_bounds) not in ((1, len(corr.rejection)) if corr.rejection else (0,)):
        raise UserError(f"--rejection-bounds: give one bound for all of --rejection {','.join(corr.rejection)}, or one "
                        "each.")
    for option, spec in zip(corr.rejection, corr.rejection_bounds * len(corr.rejection)):
        _rejection_bounds(option, spec)
    if corr.bypass and corr.reweights:
        raise UserError("Bypass mode (pi_old := mu) takes no IS weights or rejection here: the PPO ratio pi_theta/mu "
                        "already carries the correction; use the decoupled mode for weights or rejection.")


def _seq_sum(x, maskf):
    return (x * maskf).sum(-1)


def rollout_correction(log_ratio: torch.Tensor, mask: torch.Tensor, corr: Correction
                       ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The decoupled correction of one batch: (IS weights (R, T) detached, 0 on padding; None without IS, and the
    rejection's keep mask (R, T) in mask's dtype: 0 where a token or its sequence is dropped). log_ratio = log pi_old
    - log mu per token (R, T); mask: the response tokens. The equations are the comment block above."""
    maskf = mask.to(torch.float32)
    log_ratio = torch.where(mask.bool(), log_ratio.float(), 0.0).detach()
    safe = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    weights = None
    if corr.is_level is not None:
        if corr.is_level == "token":
            log_w = safe
        else:
            total = _seq_sum(log_ratio, maskf)
            if corr.is_level == "geometric":
                total = total / maskf.sum(-1).clamp_min(1.0)
            log_w = total.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)[:, None].expand_as(log_ratio)
        w = torch.exp(log_w)
        low = corr.is_low if corr.is_low is not None else 0.0
        if corr.is_mode == "truncate":
            w = w.clamp(low, corr.is_high)
        else:
            w = w * ((w >= low) & (w <= corr.is_high))
        weights = w * maskf
    keep = torch.ones_like(maskf)
    k = {"k1": -safe, "k2": 0.5 * safe.square(), "k3": torch.expm1(safe) - safe}
    for option, spec in zip(corr.rejection, corr.rejection_bounds * len(corr.rejection)):
        low, high = _rejection_bounds(option, spec)
        stat = k[option[-2:]]
        if option.startswith("seq_sum"):
            stat = _seq_sum(stat, maskf)[:, None]
        elif option.startswith("seq_mean"):
            stat = (_seq_sum(stat, maskf) / maskf.sum(-1).clamp_min(1.0))[:, None]
        elif option.startswith("seq_max"):
            stat = torch.where(mask.bool(), stat, -math.inf).max(-1).values.clamp_min(0.0)[:, None]
        keep = keep * ((stat >= low) & (stat <= high))
    return weights, (keep * maskf).to(mask.dtype)


def correction_metrics(weights: torch.Tensor | None, keep: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """What a correction did to a batch, over every rank's tokens (a collective): mismatch/rejected_share (tokens
    whose token or sequence was dropped), mismatch/is_weight_mean, _max and _min (IS weights on the kept tokens)."""
    maskf, keepf = mask.double(), keep.double()
    w = torch.ones_like(maskf) if weights is None else weights.double()
    big = torch.finfo(torch.float64).max
    sums = torch.stack([maskf.sum(), ((1 - keepf) * maskf).sum(), keepf.sum(), (w * keepf).sum()])
    extremes = torch.stack([torch.where(keepf > 0, w, -big).max(), -torch.where(keepf > 0, w, big).min()])
    if is_distributed():
        sums = all_reduce_sum(sums)
        extremes = extremes.to(_backend_device())
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    sums, extremes = sums.tolist(), extremes.tolist()
    out = {"rejected_share": sums[1] / max(sums[0], 1.0)}
    if weights is not None:
        kept = sums[2] > 0
        out.update(is_weight_mean=sums[3] / sums[2] if kept else math.nan,
                   is_weight_max=extremes[0] if kept else math.nan, is_weight_min=-extremes[1] if kept else math.nan)
    return {f"mismatch/{k}": v for k, v in out.items()}


def offpolicy_sequence_mask(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, advantages: torch.Tensor,
                            mask: torch.Tensor, delta: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence masking (2512.02556 §3.1): a sequence with a negative advantage whose
    mean log(mu / pi_theta) over its tokens exceeds delta leaves the loss; (R, 1) of 0/1, detached. Positive
    advantages are always kept: learning from one's own mistakes is what drifts when the sampler is far off."""
    maskf = mask.to(torch.float32)
    drift = _seq_sum((sampler_logprobs - logprobs).detach().float(), maskf) / maskf.sum(-1).clamp_min(1.0)
    adv = advantages if advantages.dim() == 1 else _seq_sum(advantages.float(), maskf) / maskf.sum(-1).clamp_min(1.0)
    return (~((adv < 0) & (drift > delta)))[:, None].to(torch.float32)


def mismatch_metrics(sampler_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                     kept_logmass: torch.Tensor | None = None) -> dict[str, float]:
    """The sampler–trainer gap of a batch, `mismatch/` keys, over every rank's tokens (a collective: every rank
    calls it). With rho_t = pi_old / mu per token (log-ratios clamped at +-20):
      logprob_diff_mean / _max   mean / max |log mu - log pi_old|
      ratio_mean / _max / _min   of rho_t
      ratio_out_share            share of tokens with rho_t outside [0.9, 1.1]
      kl_k1, kl_k3               KL(mu || pi_old): mean(log mu - log pi_old), mean(rho - 1 - log rho)
      chi2_token, chi2_seq       mean(rho_t^2) - 1 over tokens; mean(rho_seq^2) - 1 over sequences
      ess                        the effective sample size of the token weights, (sum rho)^2 / (n sum rho^2), in (0, 1]
      token_mult_prob_error      mean exp|log mu - log pi_old| (NeMo-RL's; above 1.05 read as a bug)
      kept_mass                  mean kept mass S_t of top-k / top-p (1 without truncation)
    The means weigh each rank by its tokens (or sequences), as if one process held the whole batch."""
    maskf = mask.to(torch.float64)
    live = mask.bool()
    diff = torch.where(live, old_logprobs.double() - sampler_logprobs.double(), 0.0)  # log rho
    log_rho = diff.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    rho = torch.exp(log_rho)
    seq_log_rho = _seq_sum(diff, maskf).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    has = maskf.sum(-1) > 0
    kept = torch.zeros_like(diff) if kept_logmass is None else kept_logmass.double()
    sums = torch.stack([maskf.sum(), has.double().sum(),
                        _seq_sum(diff.abs(), maskf).sum(), _seq_sum(rho, maskf).sum(),
                        _seq_sum(((rho < 0.9) | (rho > 1.1)).double(), maskf).sum(),
                        _seq_sum(-diff, maskf).sum(), _seq_sum(torch.expm1(log_rho) - log_rho, maskf).sum(),
                        _seq_sum(rho.square(), maskf).sum(), (torch.exp(2 * seq_log_rho) * has).sum(),
                        _seq_sum(torch.exp(diff.abs().clamp(max=LOG_RATIO_BOUND)), maskf).sum(),
                        _seq_sum(torch.exp(kept), maskf).sum()])
    big = torch.finfo(torch.float64).max
    extremes = torch.stack([torch.where(live, diff.abs(), -big).max(), torch.where(live, rho, -big).max(),
                            -torch.where(live, rho, big).min()])
    if is_distributed():
        sums = all_reduce_sum(sums)
        extremes = extremes.to(_backend_device())
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    sums, extremes = sums.tolist(), extremes.tolist()
    n, seqs = max(sums[0], 1.0), max(sums[1], 1.0)
    out = {"logprob_diff_mean": sums[2] / n, "logprob_diff_max": extremes[0], "ratio_mean": sums[3] / n,
           "ratio_max": extremes[1], "ratio_min": -extremes[2], "ratio_out_share": sums[4] / n,
           "kl_k1": sums[5] / n, "kl_k3": sums[6] / n, "chi2_token": sums[7] / n - 1.0,
           "chi2_seq": sums[8] / seqs - 1.0, "ess": sums[3] ** 2 / (n * max(sums[7], 1e-300)),
           "token_mult_prob_error": sums[9] / n, "kept_mass": sums[10] / n}
    if sums[0] == 0:
        out = {k: math.nan for k in out}
    return {f"mismatch/{k}": v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------
# 2. Loading
# ----------------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class UserError(ValueError):
    """A mistake the user can fix (a bad flag value, a missing file, malformed data, a used out-dir). A script's
    command line prints `error: <the message>` and exits 2, with no traceback (RL_DEBUG=1 shows it); our own bugs
    keep their tracebacks. The message is one sentence that says what to change."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda (this rank's GPU under torchrun) when available, else cpu; 'cuda' without a GPU is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use auto, cpu or cuda.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                        f"CUDA {torch.version.cuda or 'not built in'}); use --device cpu or auto.")
    if resolved.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: only cpu and cuda are supported; use auto, cpu or cuda.")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not a dtype; use one of {sorted(DTYPES)} or auto.")
    return DTYPES[dtype]


TOY_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "base")


def resolve_model_path(name_or_path: str) -> str:
    """"toy" -> the toy world's base model directory (toy/base, committed; `python sft.py --preset toy_base` rebuilds
    it); any other name is returned as it is."""
    if name_or_path != "toy":
        return name_or_path
    if not os.path.exists(os.path.join(TOY_BASE, "config.json")):
        raise UserError(f"No toy base model at {TOY_BASE}: restore it with `git checkout -- toy/base`, or rebuild it "
                        "with `python sft.py --preset toy_base` (15-65 min on one CPU core).")
    return TOY_BASE


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the model hub's host accepts a TCP connection within timeout_s (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    result = []

    def connect():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)  # a name lookup can hang past any socket timeout
    worker.start()
    worker.join(timeout_s)
    return bool(result)


def check_model_source(name_or_path: str, flag: str = "--model"):
    """Fail fast, with one sentence, where transformers would print a long traceback or retry for a minute: a
    local path that does not exist or is not a checkpoint, or a hub id that is neither cached nor reachable."""
    if name_or_path == "toy":
        return
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise UserError(f"{flag} {name_or_path}: the directory holds no config.json, so it is not a "
                            "transformers checkpoint.")
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or os.path.exists(name_or_path):
        raise UserError(f"{flag} {name_or_path!r}: no such directory; pass a local checkpoint directory, a hub id "
                        "such as Qwen/Qwen2.5-0.5B-Instruct, or toy.")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return  # in the local cache: transformers will find it
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError(f"{flag} {name_or_path}: not in the local hub cache and HF_HUB_OFFLINE is set; download it "
                        "first or pass a local directory.")
    if not _hub_reachable():
        raise UserError(f"{flag} {name_or_path}: not in the local hub cache, and the model hub cannot be reached "
                        "from here; pass a local directory (or set HF_HUB_OFFLINE=1 where it is cached).")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str = "left"):
    """A tokenizer with left padding (generation appends on the right) and a pad token always set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        # Reusing EOS as pad is safe here: every mask we build comes from attention_mask, never from ids.
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def load_model(name_or_path: str, *, dtype: str | torch.dtype | None = "auto",
               master_dtype: str | torch.dtype | None = "float32", frozen: bool = False,
               device: str | torch.device = "auto", trust_remote_code: bool = False, model_class=None,
               attn_implementation: str | None = None, shard: bool = False, lora: LoRA | None = None,
               **model_kwargs):
    """Load (model, tokenizer) from a hub id, a local directory or "toy", through transformers' Auto classes.

    dtype is the compute dtype ('auto': bf16 on a GPU that supports it, else fp32) and master_dtype the dtype the
    weights are kept in: what AdamW updates, gradients accumulate in and checkpoints hold (set_precision). frozen: a
    model that is never trained (a KL reference, a reward scorer) keeps its matmul weights in the compute dtype only.
    shard: under a process group, come back FSDP2-sharded (wrap_model) without any rank ever holding the whole model on
    its device: built on the meta device, sharded, then filled from rank 0's copy in host memory one tensor at a time
    (_load_sharded). Without a process group shard is ignored. lora: give the model a LoRA adapter (add_lora), before
    it is sharded or moved to the device, so that its initialisation is the same on every rank and device.
    """
    from transformers import AutoModelForCausalLM

    check_model_source(name_or_path)
    name_or_path = resolve_model_path(name_or_path)
    device = resolve_device(device) if isinstance(device, str) else device
    compute, master = resolve_precision(dtype, master_dtype, device)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model_class = model_class or AutoModelForCausalLM
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    load = functools.partial(model_class.from_pretrained, name_or_path, trust_remote_code=trust_remote_code)
    try:
        if shard and is_distributed():
            model = _load_sharded(load, model_class, master, compute, frozen, device, len(tokenizer), model_kwargs,
                                  lora)
        else:
            model = _fit_vocabulary(load(dtype=master, **model_kwargs), len(tokenizer))
            if lora is not None:
                add_lora(model, lora, compute, base=name_or_path)
            model = model.to(device)
            set_precision(model, compute, frozen=frozen)
    except OSError as error:  # transformers' "not a valid model identifier", a missing weights file, ...
        raise UserError(f"--model {name_or_path}: {str(error).splitlines()[0]}") from error
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _fit_vocabulary(model, vocabulary: int):
    if vocabulary > model.get_input_embeddings().weight.shape[0]:  # load_tokenizer added a pad token, or the
        # tokenizer has more tokens than the checkpoint's rows; a meta-device model cannot compute the new rows'
        # mean (rank 0's real copy does, and broadcasts them)
        model.resize_token_embeddings(vocabulary, mean_resizing=not model.get_input_embeddings().weight.is_meta)
    return model


@torch.no_grad()
def _load_sharded(load, model_class, master: torch.dtype, compute: torch.dtype, frozen: bool, device: torch.device,
                  vocabulary: int, model_kwargs: dict, lora: LoRA | None = None):
    """load_model(shard=True): every rank builds the architecture on the meta device (no memory), applies the
    precision and FSDP2 (wrap_model) there, and allocates only its shards on its device; rank 0 alone reads the
    checkpoint, in its own dtype, into host memory, and set_model_state_dict(broadcast_from_rank0=True) sends it one
    tensor at a time, each rank keeping its shard (cast to the shard's dtype). The buffers the checkpoint does not
    hold (rotary inv_freq) are broadcast from rank 0's model. Peak device memory per rank: its shards plus the
    largest tensor, instead of the whole fp32 model. lora: the adapter is injected on the meta model and on rank 0's
    copy alike (add_lora, from its own seed), so its initial A comes from rank 0 like every other tensor."""
    from transformers import AutoConfig, GenerationConfig

    kwargs = dict(model_kwargs)
    attn = kwargs.pop("attn_implementation", None)
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(load.args[0], **load.keywords, **kwargs)
    with torch.device("meta"):  # its own config: resizing the vocabulary below writes to it
        model = model_class.from_config(copy.deepcopy(config), dtype=master,
                                        trust_remote_code=load.keywords["trust_remote_code"],
                                        **({"attn_implementation": attn} if attn else {}))
    _fit_vocabulary(model, vocabulary).eval()  # as from_pretrained returns it
    if lora is not None:
        add_lora(model, lora, compute, base=load.args[0])
    try:
        model.generation_config = GenerationConfig.from_pretrained(load.args[0])  # its EOS ids (eos_token_ids)
    except OSError:
        pass
    set_precision(model, compute, frozen=frozen)
    model = wrap_model(model, "fsdp", device)
    model.to_empty(device=device)
    full, buffers = {}, {}
    if get_rank() == 0:
        source = _fit_vocabulary(load(config=config, dtype="auto", **({"attn_implementation": attn} if attn else {})),
                                 vocabulary)
        if lora is not None:
            add_lora(source, lora, compute, base=load.args[0])
        full, buffers = source.state_dict(), dict(source.named_buffers())
        del source
    set_full_state_dict(model, full, source=load.args[0], from_rank0=True)
    del full
    for name, buffer in model.named_buffers():
        if get_rank() == 0:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return model


# ---- mixed precision: fp32 master weights, bf16 or fp16 compute (the module docstring's "Precision" says why)


def resolve_precision(dtype: str | torch.dtype | None, master_dtype: str | torch.dtype | None,
                      device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, master dtype) from the flags; master_dtype None or 'auto' is fp32. Raises ValueError for a
    compute dtype finer than the weights (autocast only lowers precision), and for fp16 compute on weights that are
    not fp32: fp16's gradients are loss-scaled (guarded_step), and dividing the scale out of a bf16 or fp16
    gradient would underflow the small gradients the scale was there to keep."""
    compute = resolve_dtype(dtype, device)
    master = torch.float32 if master_dtype in (None, "auto") else resolve_dtype(master_dtype, device)
    if torch.finfo(compute).bits > torch.finfo(master).bits:
        raise ValueError(f"Compute dtype {compute} is finer than the weights' {master}: pass --dtype {master} too, "
                         "or keep the weights in float32 (--master-dtype float32).")
    if compute == torch.float16 and master != torch.float32:  # the loss scaler unscales into fp32 gradients
        raise UserError(f"--dtype float16 needs float32 master weights (not {master}): pass --master-dtype float32.")
    return compute, master


def _matmul_params(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, name) of every nn.Linear weight and bias: what autocast multiplies in the compute dtype."""
    return [(m, name) for m in model.modules() if isinstance(m, torch.nn.Linear)
            for name in ("weight", "bias") if getattr(m, name, None) is not None]


def set_precision(model: torch.nn.Module, dtype: str | torch.dtype | None = "auto", *, frozen: bool = False):
    """Compute in `dtype` while the weights stay in their own (master) dtype: the model's forward runs under
    torch.autocast when the two differ (wrap_model swaps that for FSDP2's MixedPrecisionPolicy), and generate and
    token_logprobs follow compute_dtype(model). frozen: cast the matmul weights to the compute dtype (no master copy
    is needed without an optimizer); the forward under autocast computes exactly what it would on fp32 weights.
    Returns the model."""
    plain = unwrap(model)
    weights = plain.get_input_embeddings().weight if hasattr(plain, "get_input_embeddings") else \
        next(plain.parameters())
    compute, master = resolve_precision(dtype, weights.dtype, weights.device)
    if frozen and compute != master:
        head = plain.get_output_embeddings() if hasattr(plain, "get_output_embeddings") else None
        for module, name in _matmul_params(plain):
            if module is head:  # kept as it is (often tied to the input embedding); head_logits rounds it anyway
                continue
            tensor = getattr(module, name)
            module._parameters[name] = torch.nn.Parameter(tensor.detach().to(compute), requires_grad=False)
    plain._rl_compute_dtype = compute
    plain._rl_frozen = frozen
    if compute != master and "forward" not in plain.__dict__:
        plain.forward = _AutocastForward(plain.forward, compute)
    return model


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model's matmuls run in (set_precision; else the dtype of its weights)."""
    plain = unwrap(model)
    dtype = getattr(plain, "_rl_compute_dtype", None)
    return dtype if dtype is not None else next(plain.parameters()).dtype


class _AutocastForward:
    """A model's bound forward, run under torch.autocast(dtype) on the model's device (as accelerate does). A class
    rather than a closure, so that deepcopy and pickle rebind it to the copied model."""
    _rl_autocast = True

    def __init__(self, forward, dtype: torch.dtype):
        functools.update_wrapper(self, forward)  # inspect.signature (transformers reads it) sees forward's own
        self.forward, self.dtype = forward, dtype

    def __call__(self, *args, **kwargs):
        with torch.autocast(next(self.forward.__self__.parameters()).device.type, dtype=self.dtype):
            return self.forward(*args, **kwargs)


def sampled_logprobs_exact(model: torch.nn.Module) -> bool:
    """Whether the log-probs generate returns are the trainer's (token_logprobs') up to fp32 rounding: in fp32, yes;
    in bf16 the sampler's shapes (one token at a time against a cache) round differently from the trainer's (the
    whole sequence), so an estimate that must be exact at equal weights (a k1 KL folded into the reward) should
    recompute pi_old with token_logprobs."""
    return compute_dtype(model) == torch.float32


def set_cpu_threads(threads: int, model: torch.nn.Module | None = None, small: int = 50_000_000) -> int:
    """torch's CPU thread count: `threads` if > 0, else 1 for a model under `small` parameters (its small
    matmuls gain little from a second thread and slow down many-fold when the cores are shared), else
    torch's default. No effect on GPU work. Returns the count in force."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif model is not None and next(model.parameters()).device.type == "cpu" \
            and sum(p.numel() for p in model.parameters()) < small:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model inside a DDP (or torch.compile) wrapper; FSDP2 modules are already plain."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def eos_token_ids(model) -> list[int]:
    """The ids the model itself ends on: its generation_config.eos_token_id (one id or a list), else its config's."""
    model = unwrap(model)
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = model.config.eos_token_id if ids is None else ids
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: real tokens count positions from 0, pads get position 0 (as transformers' generate)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------
# 3. Generation with a static KV cache
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    tokens: torch.Tensor      # (R, N) completion ids, pad after EOS
    mask: torch.Tensor        # (R, N) 1 on generated tokens, EOS included
    truncated: torch.Tensor   # (R,) True where no EOS came within max_new_tokens
    logprobs: torch.Tensor    # (R, N) log mu: each sampled token's log-prob under the distribution it was drawn
    #                           from (logits / temperature, cut by top-k / top-p, renormalised over the kept set)
    kept_logmass: torch.Tensor | None = None  # (R, N) log of the kept set's mass under softmax(logits / T) (0: all)
    keep_ids: torch.Tensor | None = None      # (R, N, M) int32 ids of the kept set per token, -1 padded; a row of
    #                                           -1 means the whole vocabulary; None when nothing was truncated

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def select(self, rows) -> "Generation":
        """The rows `rows` (a list or index tensor)."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return Generation(self.tokens[rows], self.mask[rows], self.truncated[rows], self.logprobs[rows],
                          pick(self.kept_logmass), pick(self.keep_ids))

    @staticmethod
    def cat(gens: Sequence["Generation"], pad_token_id: int = 0) -> "Generation":
        """Several generations' rows as one, completions right-padded to the longest (kept ids -1 padded)."""
        N = max(g.tokens.shape[1] for g in gens)
        right = lambda x, v=0: F.pad(x, (0, N - x.shape[1]), value=v)  # noqa: E731
        kept_logmass = None
        if any(g.kept_logmass is not None for g in gens):
            kept_logmass = torch.cat([right(g.kept_logmass if g.kept_logmass is not None else
                                            torch.zeros_like(g.logprobs)) for g in gens])
        keep_ids = None
        if any(g.keep_ids is not None for g in gens):
            M = max(g.keep_ids.shape[2] for g in gens if g.keep_ids is not None)
            keep_ids = torch.cat([F.pad(g.keep_ids, (0, M - g.keep_ids.shape[2], 0, N - g.keep_ids.shape[1]), value=-1)
                                  if g.keep_ids is not None else
                                  torch.full((*g.tokens.shape[:1], N, M), -1, dtype=torch.int32,
                                             device=g.tokens.device) for g in gens])
        return Generation(torch.cat([right(g.tokens, pad_token_id) for g in gens]),
                          torch.cat([right(g.mask) for g in gens]), torch.cat([g.truncated for g in gens]),
                          torch.cat([right(g.logprobs) for g in gens]), kept_logmass, keep_ids)


def _i64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping multiplies, logical shifts): a counter-based hash."""
    z = z + _i64(0x9E3779B97F4A7C15)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _i64(0x94D049BB133111EB)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def keyed_uniform(keys: torch.Tensor, step: int) -> torch.Tensor:
    """One U[0, 1) draw (R,) float64 per row that is a pure function of (row key, step): sampling with it gives
    the same completion for a row whatever batch, rank or world size the row lands in (so a 2-rank run samples
    what a 1-rank run samples, and a resumed run what an uninterrupted one did)."""
    z = _splitmix64(keys.long() * 1_000_003 + _splitmix64(torch.tensor(step, device=keys.device)))
    return ((z >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)


def keyed_uniforms(keys: torch.Tensor, steps: int) -> torch.Tensor:
    """keyed_uniform(keys, t) for t = 0 .. steps-1 as one (steps, R) table, bit for bit, made before a decode loop so
    that no step turns a Python int into a device tensor (a blocking host-to-device copy on CUDA)."""
    z = _splitmix64(keys.long()[None, :] * 1_000_003
                    + _splitmix64(torch.arange(steps, device=keys.device))[:, None])
    return ((z >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)


def keyed_normal(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(R, V) standard normal draws, each a pure function of (row key, step, token id) (Box-Muller on two keyed
    uniforms): the logit noise of an injected sampler mismatch is then the same on any rank, batch or resume."""
    salt = _splitmix64(keys.long()[:, None] * 1_000_003 + step * 7919 + 104_729
                       + torch.arange(vocab, device=keys.device)[None, :] * 2_654_435_761)
    u1 = (((salt >> 11) & ((1 << 53) - 1)).double() + 1.0) / float(1 << 53)  # (0, 1]: log never meets 0
    u2 = ((_splitmix64(salt) >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()


def rollout_noise_keys(seed: int, step: int, round_: int, prompt_ids: Sequence[int], num_samples: int) -> list[int]:
    """One sampling-noise key per row (prompt-major) for training rollouts: a function of (seed, step, sampling round,
    the prompt's global index in the data stream, sample index), so that each row samples the same completion on
    any number of ranks and after a resume. Reduced mod 2^63, so any seed fits an int64."""
    return [(((seed * 1_000_003 + step) * 7919 + round_) * 1_000_003 + prompt * num_samples + j) % 2**63
            for prompt in prompt_ids for j in range(num_samples)]


def eval_noise_keys(seed: int, row_ids: Sequence[int], num_samples: int) -> list[int]:
    """Sampling-noise keys for held-out evaluation: a function of (seed, the row's index in the held-out set, sample
    index) alone, so the evaluation samples the same completions on any number of ranks and at every step."""
    return [(seed * 7 + 10_000_019 * row + j) % 2**63 for row in row_ids for j in range(num_samples)]


def truncation_mask(logits: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor | None:
    """The kept set of top-k then top-p truncation, as a (R, V) bool mask over logits already divided by the
    temperature; None when nothing is cut (top_p = 1, top_k = 0 or >= V). Top-k keeps exactly k tokens; top-p keeps the smallest prefix of the sorted, renormalised top-k distribution whose mass reaches top_p."""
    keep = None
    if top_k and top_k < logits.shape[-1]:  # exactly k ids (ties broken as topk breaks them): kept_ids needs no sync
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, torch.topk(logits, top_k, dim=-1).indices, True)
    if top_p < 1.0:
        masked = logits if keep is None else logits.masked_fill(~keep, float("-inf"))
        sorted_logits, order = torch.sort(masked, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p  # keep the smallest prefix with mass >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        keep = ~drop if keep is None else keep & ~drop
    return keep


def kept_ids(keep: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """A (R, V) kept-set mask as (R, M) int32 token ids, -1 padded; a row that keeps the whole vocabulary is all -1
    (so "no truncation" costs no ids). width: M when known (top-k alone: k); else the largest kept set, which costs
    one host sync (top-p's sets vary per row and step)."""
    counts = keep.sum(-1)
    if width is None:
        cut = counts < keep.shape[-1]
        width = int(torch.where(cut, counts, 0).max())
    if width == 0:
        return torch.full((keep.shape[0], 1), -1, dtype=torch.int32, device=keep.device)
    ids = torch.topk(keep.to(torch.int8), width, dim=-1, sorted=True).indices  # the kept ids first in each row
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    valid &= (counts < keep.shape[-1])[:, None]
    return torch.where(valid, ids, -1).to(torch.int32)


def keep_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """kept_ids' inverse: (..., M) ids, -1 padded, to a (..., V) bool mask; an all -1 row keeps everything."""
    flat = ids.reshape(-1, ids.shape[-1]).long()
    valid = flat >= 0
    has = valid.any(-1)
    first = torch.where(has, flat[:, 0], 0)[:, None]  # kept_ids puts a valid id first: fill the padding with it
    mask = torch.zeros(flat.shape[0], vocab, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, torch.where(valid, flat, first), True)
    mask[~has] = True
    return mask.view(*ids.shape[:-1], vocab)


@dataclass
class Sampled:
    tokens: torch.Tensor               # (R,) the sampled ids
    logprobs: torch.Tensor             # (R,) log mu(token): the processed distribution's (truncated, renormalised)
    kept_logmass: torch.Tensor         # (R,) log of the kept set's mass under softmax(logits / T); 0 when nothing cut
    keep: torch.Tensor | None = None   # (R, V) the kept set (truncation_mask), None when nothing was cut


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None, uniform: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None) -> Sampled:
    """Sample one token per row without a host sync, and say what it was drawn from (Sampled).

    The sampler's distribution mu: z = logits / T, cut to the kept set K (top-k, then top-p: truncation_mask) and
    renormalised,  log mu(v) = z_v - logsumexp_{u in K} z_u  for v in K. Its kept mass under the untruncated policy is
    S = sum_{u in K} softmax(z)_u, so log mu = log pi - log S: a trainer that computes log pi over the whole
    vocabulary is off by log S at every token ("keep sampling mask", DeepSeek-V3.2: renormalise over K instead).
    noise: (R, V) added to z before the cut (an injected sampler/trainer mismatch of known size; mu is then the
    perturbed distribution, as an engine with other numerics would report).

    Inverse-CDF sampling: the first token whose cumulative probability exceeds u * total, u ~ U[0, 1) one per
    row (float64 cumsum, so rounding shifts no token's probability by more than ~1e-16). An exact draw that
    needs R random numbers, not R * V, and never waits on the device. uniform: the (R,) draws to use.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        lse = torch.logsumexp(logits, -1)
        return Sampled(tokens, logits.gather(-1, tokens[:, None])[:, 0] - lse, torch.zeros_like(lse))
    z = logits / temperature if temperature != 1 else logits
    if noise is not None:
        z = z + noise
    lse = torch.logsumexp(z, -1)  # (R,)
    keep = truncation_mask(z, top_p, top_k)
    masked = z if keep is None else z.masked_fill(~keep, float("-inf"))
    lse_kept = lse if keep is None else torch.logsumexp(masked, -1)
    cdf = (masked - lse[:, None]).exp().cumsum(-1, dtype=torch.float64)  # (R, V) unnormalised if truncated
    if uniform is None:
        uniform = torch.rand(logits.shape[0], dtype=torch.float64, device=logits.device, generator=generator)
    target = (uniform.to(cdf.device, torch.float64) * cdf[:, -1])[:, None]
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)
    return Sampled(tokens, z.gather(-1, tokens[:, None])[:, 0] - lse_kept, lse_kept - lse, keep)


# ---- the decode-time model: grouped-query attention, an fp32 output layer, a rollout copy of the weights


GROUPED_ATTENTION = "rl_grouped_sdpa"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """transformers' SDPA attention, except that a one-token query (a decode step) over grouped KV heads is laid out
    as (R, Hkv, G, D): the G query heads that share a KV head attend to it together, so every step reads the cache
    once. transformers does the same in eager mode, but under torch.compile it repeats the whole cache G times
    (repeat_kv), ~15x the cache's bytes per step for Qwen2.5-0.5B (G = 7). Other shapes go to transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    R, Hq, _, D = query.shape
    query = query.reshape(R, Hq // groups, groups, D)                        # (R, Hkv, G, D): G queries per KV head
    if attention_mask is not None and attention_mask.shape[1] != 1:          # a per-head mask, grouped the same way
        attention_mask = attention_mask.reshape(R, Hq // groups, groups, -1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=False)    # (R, Hkv, G, D)
    return out.reshape(R, Hq, 1, D).transpose(1, 2).contiguous(), None     # (R, 1, Hq, D), as transformers returns


_GROUPED_REGISTERED = []


def _use_grouped_attention(config) -> bool:
    """Switch a config from transformers' "sdpa" to grouped_sdpa_attention (registered once, with SDPA's mask
    function: without a registered mask function transformers builds no mask at all and left padding would be
    attended to). Other implementations (eager, flash) are left alone. Returns whether the config was switched."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not _GROUPED_REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(GROUPED_ATTENTION, grouped_sdpa_attention)
        AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)
        _GROUPED_REGISTERED.append(True)
    config._attn_implementation = GROUPED_ATTENTION
    return True


# ---- batch-invariant numerics: the sampler's log-probs equal the trainer's bit for bit (fp32, CPU)
#
# Off by default (set_batch_invariant turns it on). In fp32 the sampler (a prefill, then one token per step against
# a KV cache) and the trainer (whole left-padded sequences in length-sorted micro-batches) compute the same function
# with different shapes, and on CPU three of those shape changes move the rounding (measured, torch 2.13, MKL,
# AVX-512, one and two threads; tests/test_batch_invariant.py):
#   1. a matmul's row i depends on how many rows M it has for M < 4 (M = 1, 2, 3 take other kernels), and with
#      several threads for some M up to 11; from 16 rows on, in multiples of 16, row i is the same whatever M or its
#      place (1, 2, 4, 8 threads). A decode step has R rows, fewer as rows finish; a micro-batch's last chunk can be
#      one row.
#   2. attention reduces over the keys in blocks: where a token's keys sit (behind how much left padding, in a cache
#      of what length, beside how many masked keys) changes the partial sums. The sampler's cache is [bucket's left
#      pad, prompt, completion so far, unused]; the trainer's keys are [micro-batch's left pad, prompt, completion,
#      trailing pad]: the same keys at other offsets.
#   3. torch's elementwise loops run whole vector steps and finish a tensor's last elements (numel mod 32 on AVX-512)
#      with the scalar function, and SiLU's scalar function rounds differently from its vector one (85 of 2,000
#      random values): where the MLP's width is not a multiple of 32, whether a row's activations land in that tail
#      depends on the batch (a tiny model of width 100 or 90: 4.8e-7 apart without the fix below).
# The mode removes all three: every linear layer (the output layer too) runs on rows padded with zeros to a multiple
# of ROW_TILE and every activation on an input padded to whole vector steps (_RowTiles); attention
# (batch_invariant_attention) first moves each row's real keys to a frame indexed by position (the key at position j
# in slot j, whatever the padding) and reduces over it in fixed blocks of KEY_BLOCK keys, one block after another. A
# masked key gets weight exp(-inf) = 0 exactly, so a block of masked keys adds exact zeros (x + 0 = x) and a longer
# frame changes nothing. What is left works on one row's own features with the same operands in both paths (RMSNorm's
# mean, rotary's cos and sin, exp, the log-softmax over the vocabulary: measured invariant to the rows around them).
# Then every per-token number is a function of that row's tokens alone: log mu == log pi_old exactly, across
# batches, micro-batch sizes and ranks. Compiled decoding is refused (its kernels are another question).

ROW_TILE = 16
KEY_BLOCK = 64
VECTOR_TILE = 64  # elements: two AVX-512 vectors of fp32, the step of torch's vectorised elementwise loops, or more
_ACTIVATIONS = (F.silu, F.gelu)
INVARIANT_ATTENTION = "rl_batch_invariant"
_INVARIANT_REGISTERED = []


def set_batch_invariant(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Make generate's and token_logprobs' per-token numbers functions of each row's own tokens (the block comment
    above says how), so the log-probs generate returns equal token_logprobs' bit for bit in any batch or micro-batch.
    fp32 on CPU only, without LoRA or FSDP (each raises UserError). Stored on the model, as set_precision's dtype is.
    Cost on the toy's 128-row rollout, on/off, interleaved at one thread: sampling 2.7x, rollout_logprobs 1.2-1.3x
    (`PYTHONPATH=. python tests/test_batch_invariant.py`). Returns the model."""
    plain = unwrap(model)
    if enabled:
        weights = next(plain.parameters())
        if compute_dtype(plain) != torch.float32 or any(p.dtype != torch.float32 for p in plain.parameters()):
            raise UserError(f"Batch-invariant numerics need float32 weights and compute; this model computes in "
                            f"{compute_dtype(plain)}: load it with --dtype float32.")
        if weights.device.type != "cpu":
            raise UserError(f"Batch-invariant numerics are established on CPU only (the model is on {weights.device}): "
                            "GPU kernels, chosen by shape, were not measured; move the model to the CPU.")
        if _is_fsdp(plain) or has_lora(plain):
            raise UserError("Batch-invariant numerics do not cover LoRA or FSDP2 (their sampler decodes a merged or "
                            "gathered copy of the weights): turn off --lora-rank / --strategy fsdp.")
        if not _INVARIANT_REGISTERED:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(INVARIANT_ATTENTION, batch_invariant_attention)
            AttentionMaskInterface.register(INVARIANT_ATTENTION, sdpa_mask)  # boolean (R, 1, q, L) masks, or None
            _INVARIANT_REGISTERED.append(True)
    plain._rl_batch_invariant = bool(enabled)
    return model


def batch_invariant(model: torch.nn.Module) -> bool:
    """Whether set_batch_invariant turned the mode on for this model."""
    return bool(getattr(unwrap(model), "_rl_batch_invariant", False))


class _RowTiles(torch.overrides.TorchFunctionMode):
    """F.linear on its input's rows padded with zeros to a multiple of ROW_TILE (rows: every dimension but the last),
    so that no row ever meets the kernels a matmul takes for fewer rows (the block comment's point 1); the activations
    (_ACTIVATIONS) on their input flattened and padded to a multiple of VECTOR_TILE elements, so that every element
    takes the vector path (point 3). The padding's outputs are dropped; a row's own result never depends on it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args:
            x, rest = args[0], args[1:]
            rows = x.numel() // x.shape[-1]
            flat = x.reshape(rows, x.shape[-1])                                          # (M, in)
            if rows % ROW_TILE:
                flat = torch.cat([flat, flat.new_zeros(-rows % ROW_TILE, x.shape[-1])])  # (M rounded up, in)
            out = func(flat, *rest, **kwargs)[:rows]                                     # (M, out)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if func in _ACTIVATIONS and args and not kwargs.get("inplace") and args[0].numel() % VECTOR_TILE:
            x = args[0]
            out = func(F.pad(x.reshape(-1), (0, -x.numel() % VECTOR_TILE)), *args[1:], **kwargs)
            return out[:x.numel()].view(x.shape)
        return func(*args, **kwargs)


def batch_invariant_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              is_causal=None, **kwargs):
    """softmax(q k^T * scale) v with every key at its position's place and fixed-size reductions (the block comment's
    point 2), for the trainer's full sequences (q = L), the sampler's prefill (q = L) and its decode steps (q = 1).

      frame:   the row's real keys (the mask's last query row: causal, so it sees every one) moved to slots 0 .. n-1,
               slot j = position j; pads after them. (R, Hkv, F, D), F = L rounded up to KEY_BLOCK.
      queries: grouped as (R, Hkv, G*q, D), the G query heads that share a KV head together, rows padded to ROW_TILE;
               a query at position p sees slots 0 .. p (causal in the frame; pad queries see slot 0 onwards, unused).
      scores:  s = q k^T * scale, -inf where unseen; m = max over the frame (exact in any order)
      sums:    l = sum_b sum_{j in block b} exp(s_j - m),  o = sum_b exp(s_b - m) v_b,  out = o / l
               over blocks b of KEY_BLOCK slots in order: a block past the row's keys adds exact zeros.
    """
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap") or getattr(module, "sinks", None) is not None:
        raise UserError(f"Batch-invariant attention covers plain causal attention; {type(module).__name__} uses "
                        "dropout, a sliding window, soft-capping or sinks: turn the mode off for this model.")
    R, Hq, q, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    G = Hq // Hkv
    if attention_mask is None:  # transformers skips the mask when nothing is padded: every key is real
        real = torch.ones(R, L, dtype=torch.bool, device=key.device)
    else:
        real = (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)[:, 0, -1, :]  # (R, L)
    count = real.sum(-1)                                                                 # (R,) real keys
    if q == L:
        positions = (real.cumsum(-1) - 1).clamp(min=0)                                   # (R, q) query i is key i
    elif q == 1:
        positions = (count - 1)[:, None]                                                 # the newest key
    else:
        raise NotImplementedError(f"batch_invariant_attention handles q = L or q = 1 queries, not {q} of {L} keys.")
    # the frame: real keys first in their order (a stable sort of the mask), padded with zeros to whole blocks. The
    # pads' keys and values follow the real ones; unseen, they get weight 0, and 0 * v = 0 for the finite values
    # there (pad tokens' own, or the cache's zeros)
    frame = _round_up(L, KEY_BLOCK)
    order = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)                  # (R, L)
    index = order[:, None, :, None].expand(R, Hkv, L, D)
    keys = F.pad(key.gather(2, index), (0, 0, 0, frame - L))                             # (R, Hkv, F, D)
    values = F.pad(value.gather(2, index), (0, 0, 0, frame - L))
    # queries grouped per KV head, rows padded to a whole tile
    M = G * q
    queries = query.reshape(R, Hkv, M, D)                                                # (R, Hkv, G*q, D)
    queries = F.pad(queries, (0, 0, 0, -M % ROW_TILE))                                   # (R, Hkv, M', D)
    positions = F.pad(positions.repeat(1, G), (0, -M % ROW_TILE), value=frame)          # (R, M'): pad rows see all
    seen = torch.arange(frame, device=key.device) <= positions[:, None, :, None]         # (R, 1, M', F)
    scale = scaling if scaling is not None else D ** -0.5
    scores = (queries @ keys.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))   # (R, Hkv, M', F)
    top = scores.amax(-1, keepdim=True)                                                  # (R, Hkv, M', 1)
    total = torch.zeros_like(top)
    out = torch.zeros_like(queries)
    for start in range(0, frame, KEY_BLOCK):
        block = slice(start, start + KEY_BLOCK)
        weights = (scores[..., block] - top).exp()                  # (R, Hkv, M', KEY_BLOCK), exactly 0 where unseen
        total = total + weights.sum(-1, keepdim=True)
        out = out + weights @ values[:, :, block]                                        # (R, Hkv, M', D)
    out = (out / total)[:, :, :M].reshape(R, Hkv * G, q, D)                              # (R, Hq, q, D)
    return out.transpose(1, 2).contiguous(), None                                       # (R, q, Hq, D)


def _honours_batch_invariance(fn):
    """generate and token_logprobs under set_batch_invariant: for the call, the model's attention is
    batch_invariant_attention and every F.linear and activation runs in whole tiles (_RowTiles). Nothing changes when
    the mode is off."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not batch_invariant(model):
            return fn(model, *args, **kwargs)
        if kwargs.get("compile"):
            raise UserError("Compiled decoding is not covered by batch-invariant numerics: pass compile=False, or "
                            "turn the mode off.")
        config = unwrap(model).config
        previous, config._attn_implementation = config._attn_implementation, INVARIANT_ATTENTION
        try:
            with _RowTiles():
                return fn(model, *args, **kwargs)
        finally:
            config._attn_implementation = previous
    return wrapper


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 (or fp16) a and b, the products summed into an fp32 result (CUDA's mm with out_dtype)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm_fp32_out_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place, for fp32 acc and bf16 (or fp16) a and b, summed in fp32."""
    return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _probe_bf16_head(device_type: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Run once per device type and dtype (bf16 or fp16), outside any compiled code: whether _mm_fp32_out works
    there and sums in fp32. Returns a Python bool: a tensor here would make every compiled step that asks branch on
    the device (a graph break and a host sync per decoded token)."""
    try:
        x = 1 + torch.finfo(dtype).eps  # x*x = 1 + 2 eps + eps^2: only an fp32 sum keeps the eps^2
        a = torch.full((2, 2), x, device=device_type, dtype=dtype)
        out = _mm_fp32_out(a, a)
        acc = torch.zeros(2, 2, device=device_type)  # the chunked log-prob backward's accumulation, in place
        _addmm_fp32_out_(acc, a, a)
        exact = 2 * x ** 2
        return bool(out.dtype == torch.float32 and out[0, 0].item() == exact and acc[0, 0].item() == exact)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


_BF16_HEAD: dict[str, bool] = {"cpu": False}  # device type -> head_logits multiplies a bf16 head into fp32 there
_FP16_HEAD: dict[str, bool] = {"cpu": False}  # the same for an fp16 head
# (probed; the CPU has no such matmul, and widening the bf16 or fp16 values to fp32 there computes the same products)


def bf16_head(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the output layer's weight stays in the compute dtype `dtype` (bf16 or fp16) on this device
    (head_weight), a Python bool probed once per device type and dtype; False for fp32."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    table = _FP16_HEAD if dtype == torch.float16 else _BF16_HEAD
    if device.type not in table:
        table[device.type] = _probe_bf16_head(device.type, dtype)
    return table[device.type]


def head_weight(weight: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """The output layer's weight as head_logits multiplies it, cast once per call: as it is in fp32; rounded to the
    compute dtype in bf16 or fp16 (kept in it on a device that multiplies it into fp32, else widened back to fp32:
    every bf16 or fp16 value is an fp32 value, so the products are the same)."""
    if compute == torch.float32:
        return weight
    rounded = weight.to(compute)
    return rounded if bf16_head(rounded.device, compute) else rounded.float()


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                compute: torch.dtype) -> torch.Tensor:
    """The output layer in fp32, the same way in the sampler and the trainer: (..., H) hidden states -> (..., V) fp32
    logits, with weight from head_weight. fp32: F.linear. bf16 and fp16: the inputs rounded to the compute dtype as
    autocast would round them, the products summed in fp32 and never rounded back (at a logit of 10, bf16's step is
    0.06 nats and fp16's 0.008; a sum past 65504 would be inf in fp16)."""
    with torch.autocast(hidden.device.type, enabled=False):
        if compute == torch.float32:
            return F.linear(hidden, weight, bias).float()
        hidden = hidden.to(compute)
        bias = None if bias is None else bias.to(compute).float()
        if weight.dtype == torch.float32:  # CPU (or no bf16->fp32 matmul): exact products of the bf16 values in fp32
            return F.linear(hidden.float(), weight, bias)
        logits = _mm_fp32_out(hidden.reshape(-1, hidden.shape[-1]), weight.t())
        logits = logits.view(*hidden.shape[:-1], -1)
        return logits if bias is None else logits + bias


def _backbone(model):
    """The decoder under a causal-LM head (model.model for Qwen2 and Llama), whose output is the last hidden state."""
    return getattr(model, model.base_model_prefix)


def _last_logits(model, compute: torch.dtype, autocast: torch.dtype | None, **inputs) -> torch.Tensor:
    """fp32 logits (R, V) at the last position, through the backbone and head_logits (models that post-process
    their logits go through their own forward)."""
    context = torch.autocast(inputs["input_ids"].device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        if _logits_are_postprocessed(model.config):
            return model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        hidden = _backbone(model)(**inputs).last_hidden_state        # (R, T, H)
    head = model.get_output_embeddings()
    # hidden[:, -1:] as transformers' own logits_to_keep=1 slices it, so fp32 logits equal the model's bit for bit
    return head_logits(hidden[:, -1:, :], head_weight(head.weight, compute), head.bias, compute)[:, -1]


class _Generation:
    """What generate keeps on a model between calls: the rollout copy of its weights and a small dict of decode
    states (KV caches), one per use (training rollout, greedy and sampled evaluation), so that the compiled decode
    step meets the same few shapes for a whole run. They live as long as the model, memory included: free_decode_state
    releases the memory (and keeps the compiled steps). A copied or pickled model starts afresh (the states' compiled
    steps belong to the original)."""

    def __reduce__(self):
        return _Generation, ()

    def __init__(self):
        self.copy = None             # the module decoding runs on when it is not the model itself
        self.owned: list = []        # (copy tensor, the model's parameter it mirrors): refreshed by _sync
        self.synced = None           # the model's parameter versions at the last refresh (None: refresh)
        self.autocast = None         # compute dtype to autocast to while decoding (mixed-dtype copy), else None
        self.states: dict = {}       # shape key -> _DecodeState
        self.max_len: int | None = None  # the run's KV-cache length for compiled decoding (set_generation_length)
        self.cuda_graphs = True          # compiled decoding on a GPU replays CUDA graphs (set_generation_length)


def _generation(model) -> _Generation:
    gen = model.__dict__.get("_rl_generation")
    if gen is None:
        gen = model.__dict__["_rl_generation"] = _Generation()  # a plain attribute: not a submodule, not saved
    return gen


def set_generation_length(model, max_prompt_tokens: int, max_new_tokens: int, pad_to_multiple: int = 16,
                          cuda_graphs: bool = True):
    """Fix the KV-cache length of compiled decoding for the run: the longest prompt (bucketed as generate buckets it)
    plus max_new_tokens, rounded up to a multiple of pad_to_multiple (SDPA's kernels want the mask's last dimension
    aligned), so that the compiled step meets one cache shape per use instead of one per prompt length. Only ever
    grows (evaluation may ask for less than the rollouts need). Eager decoding ignores it.
    cuda_graphs=False: compile the decode step without CUDA graphs, for a run that calls free_decode_state between
    rollouts (its memory comes back at new addresses, and a recorded graph replays on the old ones)."""
    gen = _generation(unwrap(model))
    length = _round_up(_round_up(max_prompt_tokens, pad_to_multiple) + max_new_tokens, pad_to_multiple)
    gen.max_len = max(gen.max_len or 0, length)
    gen.cuda_graphs = gen.cuda_graphs and cuda_graphs


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def _rollout_model(model):
    """The module generate decodes with, its weights refreshed from the model's when they changed (or always,
    under FSDP, where a refresh is one all-gather per sharded module: O(1) per rollout, not per token):

    - fp32 or pure bf16, one process or DDP: the model itself.
    - mixed precision, one process or DDP: a copy whose matmul weights (the output layer's too) are bf16 and whose
      other weights (embeddings, norms) are the model's own fp32 tensors, decoded under autocast. It computes what
      the trainer computes (autocast rounds the same weights to bf16 in the same way) while reading bf16 weights,
      where autocast over the fp32 weights would read 4 bytes and write 2 per weight per token. Memory: 2 bytes
      per matmul weight, freed before the update (free_decode_state).
    - FSDP2: a plain unsharded copy in the compute dtype (what MixedPrecisionPolicy computes with), filled by
      gathering each sharded module once; decoding then runs no collective and no FSDP hook (which torch.compile
      cannot trace). Memory: the full model in bf16 per rank during the rollout, as gather-once would hold; freed
      before the update.
    - LoRA (add_lora), in every case above: a plain copy whose adapted weights are merged, W + (alpha / r) B A, once
      per refresh (after each update), so decoding runs the base architecture at the base's speed and never pays
      for the adapter's two extra matmuls per layer per token. Memory: one compute-dtype tensor per adapted weight.
    """
    gen = _generation(model)
    compute, fsdp = compute_dtype(model), _is_fsdp(model)
    mixed = any(p.dtype != compute for p in model.parameters())
    if not fsdp and not mixed and not has_lora(model):
        return model
    if gen.copy is None:
        gen.copy, gen.owned = _build_rollout_copy(model, compute, fsdp)
        gen.autocast = compute if not fsdp and mixed else None  # a LoRA copy in fp32 needs no autocast
        _use_grouped_attention(gen.copy.config)
    _sync_rollout_copy(model, gen, fsdp)
    return gen.copy


def _build_rollout_copy(model, compute: torch.dtype, fsdp: bool):
    """(copy, owned): the model's architecture built on the meta device, then given the model's own tensors
    (shared) or new compute-dtype tensors of the same shape (owned, listed with their source parameter name). A LoRA
    model's copy is the plain architecture: an adapted weight (`q_proj.base_layer.weight`) becomes an owned
    `q_proj.weight` that _sync_rollout_copy fills with the merged weight; the adapter's own tensors stay out."""
    import copy as copylib

    cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))  # FSDP2 subclasses the model
    with torch.device("meta"):
        clone = cls(copylib.deepcopy(model.config))
    device = next(model.parameters()).device
    matmul = {id(module) for module, _ in _matmul_params(model)}
    sources, targets = dict(model.named_modules()), dict(clone.named_modules())
    owned, made = [], {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        plain = _plain_name(name)
        if plain is None:  # a LoRA adapter's own weight: merged into its layer's, not in the copy
            continue
        merged = name.endswith(".base_layer.weight")
        # a new compute-dtype tensor (tied names share one): under FSDP2, for a merged weight, for a matmul weight
        # kept in another dtype
        if fsdp or merged or (id(sources[module_name]) in matmul and param.dtype != compute):
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=compute, device=device),
                                                     requires_grad=False)
                owned.append((made[id(param)], name))
            param = made[id(param)]
        target_module, _, target_attr = plain.rpartition(".")
        targets[target_module]._parameters[target_attr] = param  # else the model's own tensor: always current
    for name, buffer in model.named_buffers(remove_duplicate=False):
        module_name, _, attr = _plain_name(name).rpartition(".")
        targets[module_name]._buffers[attr] = buffer
    left = [n for n, t in [*clone.named_parameters(), *clone.named_buffers()] if t.is_meta]
    if left:
        raise NotImplementedError(f"Cannot build a rollout copy of {cls.__name__}: {left[:3]} have no source.")
    return clone.eval(), owned  # eval() sets the copy's own modules' flags; shared tensors are untouched


def _sync_rollout_copy(model, gen: _Generation, fsdp: bool):
    """Refresh the copy's owned tensors from the model: re-allocated if free_decode_state freed them; under FSDP2 one
    unshard (all-gather) per sharded module, read, then resharded, so at most one module is gathered at a time. A LoRA
    layer's weight is merged as it is copied: W + (alpha / r) B A in fp32, rounded once to the copy's dtype."""
    layers = _lora_layers(model)

    def merged(name, param):  # the weight the copy holds for the model's parameter `name`
        layer = layers.get(name.removesuffix(".base_layer.weight")) if name.endswith(".base_layer.weight") else None
        return param if layer is None else param.float() + _lora_delta(layer)

    for tensor, _ in gen.owned:
        if tensor.untyped_storage().nbytes() == 0:  # freed before the last update
            tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())
            gen.synced = None
    targets = {name: tensor for tensor, name in gen.owned}
    if not fsdp:
        params = dict(model.named_parameters(remove_duplicate=False))
        versions = tuple(params[name]._version for name in targets) + tuple(
            p._version for name, p in params.items() if ".lora_" in name)  # an update moves the adapter only
        if versions != gen.synced:
            for name, tensor in targets.items():
                tensor.copy_(merged(name, params[name]))
            gen.synced = versions
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    filled = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        module.unshard()
        prefix = module_name + "." if module_name else ""
        for name, param in module.named_parameters(remove_duplicate=False):
            if prefix + name in targets and not isinstance(param, DTensor):  # this module's own, now gathered
                targets[prefix + name].copy_(merged(prefix + name, param))  # its layer's adapter is gathered too
                filled.add(prefix + name)
        module.reshard()
    if filled != set(targets):  # a tensor left unfilled would decode with garbage weights
        raise RuntimeError(f"The FSDP2 rollout copy missed {sorted(set(targets) - filled)[:3]}: no sharded module "
                           "gathered them.")


def _casting_cache_layer(layer):
    """A StaticCache layer whose update first casts the new keys/values to the cache's dtype: under autocast the
    keys leave RoPE in fp32, and a bf16 cache is what the trainer's attention sees (autocast rounds them the same)."""
    base = type(layer)
    if base.__name__.startswith("_Casting"):
        return layer
    if base not in _CASTING_LAYERS:
        def update(self, key_states, value_states, *args, **kwargs):
            return base.update(self, key_states.to(self.keys.dtype), value_states.to(self.values.dtype), *args,
                               **kwargs)
        _CASTING_LAYERS[base] = type(f"_Casting{base.__name__}", (base,), {"update": update})
    layer.__class__ = _CASTING_LAYERS[base]
    return layer


_CASTING_LAYERS: dict = {}


class _DecodeState:
    """A static KV cache and the (optionally compiled) decode step for one shape of rows x cache length, kept between
    calls, so consecutive rollouts reuse the buffers and never recompile (CUDA graphs also need the addresses)."""

    def __init__(self, model, rows: int, max_len: int, compute: torch.dtype, autocast: torch.dtype | None,
                 device: torch.device, compile: bool, cuda_graphs: bool = True):
        from transformers import StaticCache

        config = model.config.get_text_config(decoder=True)
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.cache.early_initialization(batch_size=rows, num_heads=num_kv, head_dim=head_dim, dtype=compute,
                                        device=device)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise NotImplementedError("generate() supports full-attention models; this one has sliding-window "
                                      "layers. Use transformers' model.generate for it.")
        for layer in self.cache.layers:
            _casting_cache_layer(layer)
        bf16_head(device, compute)  # probed here, eagerly: the compiled step then only reads a bool

        def step(input_ids, position_ids, attention_mask):  # (R, 1), (R, 1), (R, L) -> fp32 logits (R, V)
            return _last_logits(model, compute, autocast, input_ids=input_ids, position_ids=position_ids,
                                attention_mask=attention_mask, cache=self.cache, use_cache=True)

        # fullgraph: one graph per decoded token or an error, never a silent break (a host sync per token); a code
        # object per state, so that many states (evaluations, pipeline stages) never reach dynamo's recompile limit
        self.cuda_graphs = compile and device.type == "cuda" and cuda_graphs
        self.step = torch.compile(_own_code(step, f"{rows}x{max_len}_{id(self)}"), dynamic=False, fullgraph=True,
                                  mode="reduce-overhead" if self.cuda_graphs else "default") if compile else step

    def _tensors(self):
        return [t for layer in self.cache.layers for t in (layer.keys, layer.values)]

    def release(self):
        """Free the KV cache's memory, keeping its tensors (and so the compiled step that reads them)."""
        for tensor in self._tensors():
            tensor.untyped_storage().resize_(0)

    def load_prefix(self, prefill_cache, repeats: int, prompt_len: int):
        """Copy the prefilled (B, ...) keys/values into rows [i*S, (i+1)*S) of the static cache (its memory
        allocated again first if release freed it)."""
        for tensor in self._tensors():
            if tensor.untyped_storage().nbytes() == 0:
                tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())
        for static_layer, layer in zip(self.cache.layers, prefill_cache.layers):
            static_layer.keys.zero_()
            static_layer.values.zero_()
            static_layer.keys[:, :, :prompt_len].copy_(layer.keys.repeat_interleave(repeats, 0))
            static_layer.values[:, :, :prompt_len].copy_(layer.values.repeat_interleave(repeats, 0))
            static_layer.cumulative_length.fill_(prompt_len)


MAX_DECODE_STATES = 4  # uses per run: training rollout, greedy evaluation, sampled evaluation (+1 spare)


def free_decode_state(model):
    """Release the memory decoding holds between rollouts, for an update that needs it: the KV caches and the
    rollout copy's own weights (both allocated again at the next generate). The decode states and their compiled
    steps stay, so nothing recompiles. CUDA graphs replay on the addresses they recorded, which freed memory does
    not come back at: a state that decodes with them is dropped and the model decodes without graphs from then on
    (a run that frees on every step says so up front: set_generation_length(..., cuda_graphs=False)). The graph
    trees themselves are never reset: dynamo keeps the compiled step, whose replay would meet a dead manager; so the
    dropped graphs' memory pool stays with the process (grpo.py and ppo.py never drop one: --decode-memory free
    compiles without graphs from the start)."""
    gen = unwrap(model).__dict__.get("_rl_generation")
    if gen is None:
        return
    for state in gen.states.values():
        state.release()
    for tensor, _ in gen.owned:
        tensor.untyped_storage().resize_(0)
    gen.synced = None
    graphed = [key for key, state in gen.states.items() if state.cuda_graphs]
    if graphed:
        print0("free_decode_state: decoding goes on without CUDA graphs (their recorded addresses were freed); "
               "call set_generation_length(..., cuda_graphs=False) before the first rollout to compile it so.")
        for key in graphed:
            del gen.states[key]
        gen.cuda_graphs = False


def peak_memory_gb(device: torch.device | str | None = None) -> float:
    """This process's peak memory in GiB: CUDA's max_memory_allocated on a GPU, else the peak resident set size."""
    device = torch.device(device) if device is not None else resolve_device("auto")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _is_fsdp(model) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


@_honours_batch_invariance
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_samples: int = 1,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, noise_keys: torch.Tensor | None = None,
             compile: bool | None = None, pad_to_multiple: int = 16, check_every: int = 8,
             compact: bool | None = None, logit_noise: float = 0.0) -> Generation:
    """Sample num_samples completions for each of B left-padded prompts; rows are prompt-major
    (row i*S + j is sample j of prompt i). temperature=0 is greedy.

    compile: compile the one-token decode step, whole (fullgraph; default: on CUDA only, with CUDA graphs unless
    set_generation_length said otherwise). Its shapes are fixed per use: the rows (the caller keeps them fixed, as
    rlvr_rewards.evaluate pads its batches) and the KV-cache length (set_generation_length; else the prompt length
    bucketed to a multiple of pad_to_multiple, plus max_new_tokens, rounded up to that multiple). The decode state
    (cache, compiled step) is kept on the model for the next call; free_decode_state releases its memory.
    check_every: how often (in steps) to ask the device whether every row has finished (a host sync).
    noise_keys: (R,) int64 per-row keys; when given, sampling noise comes from keyed_uniform instead of
    generator, so each row's sample depends only on its key (rank- and batch-invariant).
    compact: drop finished rows from the decode batch as they accumulate (default: when not compiled). With
    noise_keys or greedy the samples are the same either way; with a generator its stream is consumed by
    fewer rows, so the samples differ (each setting is reproducible).
    The log-probs come from fp32 logits (head_logits), as token_logprobs computes them, and are those of the
    distribution each token was drawn from (sample_tokens: truncated by top_k / top_p and renormalised); the kept sets
    come back as keep_ids for a trainer to renormalise over (token_logprobs' keep_ids). Under mixed precision and
    FSDP2 decoding runs on a rollout copy of the weights (_rollout_model); free_decode_state releases it.
    logit_noise: sigma of keyed Gaussian noise added to the sampler's logits / T (needs noise_keys): a sampler that
    deliberately differs from the trainer by a known amount, to study the mismatch corrections.
    """
    model = unwrap(model)
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, P); got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}.")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1.")
    if attention_mask[:, -1].min() < 1:
        raise ValueError("Prompts must be left-padded (the last column of attention_mask must be all ones); "
                         "set tokenizer.padding_side = 'left'.")
    if logit_noise and noise_keys is None:
        raise ValueError("logit_noise needs noise_keys: the injected noise is keyed per row, step and token.")
    device = input_ids.device
    cfg = model.config
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    if eos_token_id is None:
        eos_token_id = eos_token_ids(model)
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [-1]),
                           device=device)
    if compile is None:
        compile = device.type == "cuda"
    if device.type == "cpu":
        check_every = 1  # asking whether every row has finished costs nothing on CPU; decoding past it does

    # Bucket the prompt length (left pad) so shapes repeat across calls.
    B, P0 = input_ids.shape
    P = _round_up(P0, pad_to_multiple)
    if P > P0:
        input_ids = F.pad(input_ids, (P - P0, 0), value=pad_token_id)
        attention_mask = F.pad(attention_mask, (P - P0, 0), value=0)
    S, R, L = num_samples, B * num_samples, P + max_new_tokens
    if compile:  # a multiple of 16: SDPA's fused kernels want the mask's last dimension aligned
        L = _round_up(L, pad_to_multiple)
    gen = _generation(model)
    if compile and gen.max_len is not None:  # one cache length per run, so the compiled step never meets a new one
        if L > gen.max_len:
            print0(f"generate: a {P0}-token prompt needs a KV cache of {L} > the run's {gen.max_len} "
                   "(set_generation_length); growing it, which recompiles the decode step.")
            gen.max_len = L
        L = gen.max_len

    decoder = _rollout_model(model)   # the model itself, or its rollout copy (refreshed here)
    compute = compute_dtype(model)
    key = (R, L, compute, device, compile)
    state = gen.states.pop(key, None)  # popped and put back: the dict's order is the most recent use last
    if state is None:
        while len(gen.states) >= MAX_DECODE_STATES:
            gen.states.pop(next(iter(gen.states)))
        state = _DecodeState(decoder, R, L, compute, gen.autocast, device, compile, gen.cuda_graphs)
    gen.states[key] = state

    tokens = torch.full((R, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=device)
    kept_logmass = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=device)
    truncating = bool(temperature) and (top_p < 1.0 or 0 < top_k < unwrap(model).config.get_text_config(
        decoder=True).vocab_size)
    keep_steps = []  # per step: (rows, (r, m) kept ids) when top-k / top-p cut the distribution
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    # Every step's sampling noise, made before the loop: a step then turns no Python int into a device tensor.
    uniforms = keyed_uniforms(noise_keys, max_new_tokens) if noise_keys is not None and temperature else None
    steps = max_new_tokens
    # Eager decoding drops finished rows from the batch once an eighth of it has finished, since a step costs in
    # proportion to its rows; `live` holds the rows still decoded (None: all). Compiled decoding keeps every row,
    # as CUDA graphs need fixed shapes. The cache's full tensors are put back at the end for the next call.
    compact = not compile if compact is None else compact
    live, full_cache = None, [(layer.keys, layer.values) for layer in state.cache.layers]
    switched = decoder is model and _use_grouped_attention(decoder.config)  # a copy is switched for good
    try:
        # Prefill each prompt once, then share its cache across its S rows.
        from transformers import DynamicCache

        prefill_cache = DynamicCache(config=cfg.get_text_config(decoder=True))
        logits = _last_logits(decoder, compute, gen.autocast, input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), cache=prefill_cache,
                              use_cache=True).repeat_interleave(S, 0)  # (R, V) fp32
        state.load_prefix(prefill_cache, S, P)
        del prefill_cache

        full_mask = torch.zeros(R, L, dtype=attention_mask.dtype, device=device)
        full_mask[:, :P] = attention_mask.repeat_interleave(S, 0)
        next_position = attention_mask.sum(-1).repeat_interleave(S, 0)[:, None]  # (R, 1) position of the next token
        for t in range(max_new_tokens):
            uniform = None if uniforms is None else uniforms[t] if live is None else uniforms[t, live]
            rows = slice(None) if live is None else live
            noise = logit_noise * keyed_normal(noise_keys[rows], t, logits.shape[-1]) if logit_noise else None
            drawn = sample_tokens(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                                  uniform=uniform, noise=noise)
            done = finished[rows]
            tokens[rows, t] = torch.where(done, pad_token_id, drawn.tokens)
            logprobs[rows, t] = torch.where(done, 0.0, drawn.logprobs)
            kept_logmass[rows, t] = torch.where(done, 0.0, drawn.kept_logmass)
            if truncating and drawn.keep is not None:
                keep_steps.append((rows, kept_ids(drawn.keep, top_k if top_p >= 1.0 else None)))
            else:
                keep_steps.append(None)
            finished[rows] = done | torch.isin(drawn.tokens, eos_ids)
            if t == max_new_tokens - 1:
                break
            # Decoding runs no collective (under FSDP it reads the gathered copy), so ranks may stop at different
            # steps; this is the loop's one host sync, every check_every steps.
            if (t + 1) % check_every == 0 and not (~finished).any().item():
                steps = t + 1
                break
            full_mask[:, P + t] = 1
            if compact:
                keep = ~finished[rows]
                n_left = int(keep.sum())  # one host sync (eager decoding only)
                if 0 < n_left <= len(keep) * 7 // 8:
                    live = torch.nonzero(~finished)[:, 0] if live is None else live[keep]
                    for layer in state.cache.layers:
                        layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            rows = slice(None) if live is None else live
            logits = state.step(tokens[rows, t:t + 1].clone(), next_position[rows] + t, full_mask[rows])
    finally:
        for layer, (keys, values) in zip(state.cache.layers, full_cache):
            layer.keys, layer.values = keys, values
        if switched:
            decoder.config._attn_implementation = "sdpa"
    tokens, logprobs = tokens[:, :steps], logprobs[:, :steps]
    is_pad_after_eos = torch.cat([torch.zeros_like(finished[:, None]),
                                  torch.isin(tokens[:, :-1], eos_ids)], 1).cumsum(-1) > 0
    mask = (~is_pad_after_eos).long()
    tokens = tokens.masked_fill(is_pad_after_eos, pad_token_id)
    # Columns decoded after the last row's EOS (between two checks) are all padding: drop them, so the log-prob
    # and update passes do not run over them.
    longest = max(int(mask.sum(-1).max()), 1)
    tokens, mask, logprobs = tokens[:, :longest], mask[:, :longest], logprobs[:, :longest]
    keep = None
    if truncating:  # the kept ids of every (row, step), -1 padded to the widest kept set; -1 rows where nothing was cut
        width = max([ids.shape[1] for part in keep_steps[:longest] if part is not None for ids in part[1:]] or [1])
        keep = torch.full((R, longest, width), -1, dtype=torch.int32, device=device)
        for t, part in enumerate(keep_steps[:longest]):
            if part is not None:
                keep[part[0], t, :part[1].shape[1]] = part[1]
        keep = keep.masked_fill(mask[..., None] == 0, -1)
    return Generation(tokens=tokens, mask=mask, truncated=~finished, logprobs=logprobs * mask,
                      kept_logmass=kept_logmass[:, :longest] * mask, keep_ids=keep)


# ----------------------------------------------------------------------------------------------------------
# 4. Chunked fused log-probs: never the (B, T, V) logits
# ----------------------------------------------------------------------------------------------------------


class _ChunkedLogprobs(torch.autograd.Function):
    """log_softmax(h W^T + b)[target] (and the entropy) over rows of h in chunks. The backward recomputes each
    chunk's logits, so memory is O(chunk * V) instead of O(rows * V) in both passes. The logits are fp32 whatever
    the compute dtype (head_logits), as the sampler's are.

    d logprob / d z = onehot(target) - p        d entropy / d z = -p * (log p + entropy)

    keep_ids (rows, M), the sampler's kept sets (generate's keep_ids): the log-prob is then over the kept set K,
    log p~ = z_target - logsumexp_{K} z, with d/dz = onehot - p~ (p~ = p / S on K, 0 elsewhere, S the kept mass);
    the entropy stays the whole distribution's.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy, compute, keep_ids=None):
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_kept = torch.empty(n, dtype=torch.float32, device=hidden.device) if keep_ids is not None else None
        head = head_weight(weight, compute)  # cast once per call, not per chunk
        with torch.autocast(hidden.device.type, enabled=False):  # the model's forward may run under autocast
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[sl], head, bias, temperature, compute)  # (C, V) fp32
                lse = torch.logsumexp(logits, -1)
                lse_all[sl] = lse
                norm = lse
                if keep_ids is not None:
                    norm = torch.logsumexp(logits.masked_fill(~keep_mask(keep_ids[sl], logits.shape[-1]),
                                                              float("-inf")), -1)
                    lse_kept[sl] = norm
                logprobs[sl] = logits.gather(-1, targets[sl, None])[:, 0] - norm
                if with_entropy:
                    entropy[sl] = lse - (logits.softmax(-1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all, entropy, keep_ids, lse_kept)
        # One chunk: keep its logits (no more memory than the backward's own chunk) instead of recomputing them.
        ctx.logits = logits if n <= chunk_size else None
        ctx.set_materialize_grads(False)  # an unused entropy output gets None, not a (n,) tensor of zeros
        ctx.temperature, ctx.chunk_size, ctx.with_entropy, ctx.compute = temperature, chunk_size, with_entropy, compute
        return (logprobs, entropy) if with_entropy else (logprobs, torch.empty(0, device=hidden.device))

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, lse_all, entropy, keep_ids, lse_kept = ctx.saved_tensors
        compute = ctx.compute
        if grad_logprobs is None:  # only the entropy is differentiated
            grad_logprobs = torch.zeros_like(lse_all)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        with_entropy = ctx.with_entropy and grad_entropy is not None and grad_entropy.numel()
        kept, ctx.logits = ctx.logits, None  # used up here: a second backward (retain_graph) recomputes
        head = head_weight(weight, compute)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            # One (C, V) buffer, in place: log p = z - lse; dz = onehot * g - p * (g + (log p + H) * g_H)
            logits = kept if kept is not None else _chunk_logits(hidden[sl], head, bias, ctx.temperature, compute)
            grad_logits = logits.sub_(lse_all[sl, None])  # log p
            coef = grad_logprobs[sl, None]
            if keep_ids is not None:  # p~ = p * exp(lse - lse_K) on K: the kept set's renormalised distribution
                scale = (lse_all[sl] - lse_kept[sl]).exp_()
                coef = keep_mask(keep_ids[sl], logits.shape[-1]).to(logits.dtype).mul_((coef[:, 0] * scale)[:, None])
            if with_entropy:
                coef = (grad_logits + entropy[sl, None]).mul_(grad_entropy[sl, None]).add_(coef)
            grad_logits.exp_().mul_(coef).neg_()
            grad_logits.scatter_add_(-1, targets[sl, None], grad_logprobs[sl, None])
            if ctx.temperature != 1.0:
                grad_logits /= ctx.temperature
            if compute == torch.float32:  # fp32: the plain head's backward
                if grad_hidden is not None:
                    grad_hidden[sl] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t(), hidden[sl].float())  # no (V, H) temporary per chunk
            elif head.dtype == torch.float32:  # bf16 emulated in fp32 (CPU): the forward's rounded operands
                if grad_hidden is not None:
                    grad_hidden[sl] = (grad_logits @ head).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t(), hidden[sl].to(compute).float())
            else:  # bf16 tensor cores, fp32 sums: straight into the fp32 gradient, no (V, H) temporary per chunk
                grad_bf16 = grad_logits.to(compute)
                if grad_hidden is not None:
                    grad_hidden[sl] = _mm_fp32_out(grad_bf16, head).to(hidden.dtype)
                if grad_weight is not None:
                    _addmm_fp32_out_(grad_weight, grad_bf16.t(), hidden[sl].to(compute))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _chunk_logits(hidden, head, bias, temperature, compute):
    """One chunk's fp32 logits (C, V) at the temperature; head from head_weight."""
    logits = head_logits(hidden, head, bias, compute)
    return logits / temperature if temperature != 1.0 else logits


def _logits_are_postprocessed(config) -> bool:
    """Soft-capping (Gemma 2), logit scaling (Cohere, Granite) change logits after the head: use the plain path."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return any(getattr(cfg, name, None) not in (None, 1.0, 0.0) for name in
               ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk of the fused log-prob pass: fp32 logits of 2^25 elements (128 MiB) on CPU, 2^28 (1 GiB) on a
    GPU. Each chunk's backward reads and writes the whole fp32 output-layer gradient (V x H), so small chunks on a
    GPU would move that gradient tens of times per micro-batch (~0.5 GB each for Qwen2.5-0.5B); a GPU has the memory
    for fewer, larger ones."""
    budget = 1 << 28 if torch.device(device).type == "cuda" else 1 << 25
    return max(16, min(8192, budget // max(vocab_size, 1)))


@_honours_batch_invariance
def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False, last_n: int | None = None, chunk_size: int | None = None,
                   fused: bool | None = None, keep_ids: torch.Tensor | None = None):
    """log pi(x_{t+1} | x_<=t) for every position: (B, T-1), or (B, last_n) for the last last_n targets only
    (the completion, in RL). With with_entropy=True returns (logprobs, entropy) of the same shape.
    keep_ids (B, n, M): the sampler's kept set of each target (generate's keep_ids, -1 padded): each log-prob is
    then renormalised over it, log pi~ = log pi - log S_t (the entropy stays the whole distribution's).

    fused (default: unless the model post-processes its logits) computes the log-probs chunk by chunk from
    the hidden states that reach the output embedding, with the output layer in fp32 (head_logits, as generate's
    sampler computes it); fused=False is the plain reference (the model's own logits).
    """
    base = unwrap(model)
    B, T = input_ids.shape
    n = T - 1 if last_n is None else last_n
    if not 0 < n <= T - 1:
        raise ValueError(f"last_n={last_n} must be in [1, T-1={T - 1}].")
    targets = input_ids[:, T - n:]  # (B, n)
    position_ids = position_ids_from_mask(attention_mask)
    if fused is None:
        fused = not _logits_are_postprocessed(base.config)

    if keep_ids is not None and keep_ids.shape[:2] != (B, n):
        raise ValueError(f"keep_ids {tuple(keep_ids.shape)} must be (B, n, M) = ({B}, {n}, M).")
    if not fused:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[:, T - 1 - n:T - 1].float() / temperature
        logp = torch.log_softmax(logits, -1)
        kept = logp if keep_ids is None else torch.log_softmax(
            logits.masked_fill(~keep_mask(keep_ids, logits.shape[-1]), float("-inf")), -1)
        lp = kept.gather(-1, targets[..., None])[..., 0]
        return (lp, -(logp.exp() * logp).sum(-1)) if with_entropy else lp

    head = base.get_output_embeddings()
    chunk = chunk_size or default_chunk_size(head.weight.shape[0], head.weight.device)
    compute = compute_dtype(base)
    result = {}

    def fused_head(module, args):
        hidden = args[0]  # (B, T, H): the final hidden states, after the last norm
        h = hidden[:, T - 1 - n:T - 1].reshape(B * n, -1)
        keep = None if keep_ids is None else keep_ids.reshape(B * n, keep_ids.shape[-1])
        lp, ent = _ChunkedLogprobs.apply(h, module.weight, module.bias, targets.reshape(-1), float(temperature),
                                         chunk, with_entropy, compute, keep)
        result["logprobs"], result["entropy"] = lp.view(B, n), ent.view(B, n) if with_entropy else None
        return (hidden[:, :0],)  # the head now makes an empty (B, 0, V) tensor instead of the full logits

    handle = head.register_forward_pre_hook(fused_head)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    if "logprobs" not in result:
        raise RuntimeError(f"{type(base).__name__} never called its output embedding; use fused=False.")
    return (result["logprobs"], result["entropy"]) if with_entropy else result["logprobs"]


def completion_logprobs(model, batch: dict, *, temperature: float = 1.0, with_entropy: bool = False):
    """log pi at each completion token (R, N) of a rollout batch {prompt_ids, prompt_mask (R, P) left-padded,
    tokens, mask (R, N), and keep_ids (R, N, M) when the sampler truncated}, at the sampling temperature, over the
    sampler's kept set when the batch has one; with_entropy: also the entropy (R, N)."""
    ids = torch.cat([batch["prompt_ids"], batch["tokens"]], 1)          # (R, P + N)
    mask = torch.cat([batch["prompt_mask"], batch["mask"]], 1)
    return token_logprobs(model, ids, mask, last_n=batch["tokens"].shape[1], temperature=temperature,
                          with_entropy=with_entropy, keep_ids=batch.get("keep_ids"))


def slice_rows(batch: dict, rows) -> dict:
    """The rows `rows` of every per-row tensor of a batch dict (first dimension R); other values as they are."""
    R = batch["mask"].shape[0]
    return {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == R else v) for k, v in batch.items()}


def split_rows(batch: dict, parts: int) -> list[dict]:
    """A batch dict cut into `parts` minibatches of consecutive rows (the rows must split evenly)."""
    rows = batch["mask"].shape[0] // parts
    return [slice_rows(batch, slice(i * rows, (i + 1) * rows)) for i in range(parts)]


def micro_batch_tokens(requested: int, device: torch.device) -> int:
    """--micro-batch-tokens, -1 meaning the default: 8,192 padded tokens per forward/backward on a GPU, 2,048 on CPU."""
    return requested if requested >= 0 else 8192 if device.type == "cuda" else 2048


def micro_batches(batch: dict, max_tokens: int) -> list[tuple[torch.Tensor, dict]]:
    """A rollout batch in length-sorted micro-batches (length_batches), each trimmed to its own longest row:
    prompt_* columns to its longest prompt (left padding), other (R, N) columns to its longest completion.
    Returns [(row indices, micro-batch)]; the micro-batches' rows together are the batch's."""
    R, N = batch["mask"].shape
    parts = []
    for rows in length_batches(batch["prompt_mask"].sum(1), batch["mask"].sum(1), max_tokens):
        part = slice_rows(batch, rows)
        p = max(1, int(part["prompt_mask"].sum(1).max()))
        n = max(1, int(part["mask"].sum(1).max()))
        for k, v in part.items():
            if k.startswith("prompt_"):
                part[k] = v[:, v.shape[1] - p:]
            elif torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (len(rows), N):  # (R, N) and (R, N, M)
                part[k] = v[:, :n]
        parts.append((rows, part))
    return parts


@torch.no_grad()
def rollout_logprobs(model, batch: dict, *, temperature: float = 1.0, max_tokens: int = 0) -> torch.Tensor:
    """log pi at every completion token of a rollout batch (R, N) in fp32, without gradients, in length-sorted
    micro-batches of at most max_tokens padded tokens (0: one pass). For pi_old, pi_ref and the critic's inputs."""
    out = torch.zeros(batch["mask"].shape, dtype=torch.float32, device=batch["mask"].device)
    for rows, part in micro_batches(batch, max_tokens):
        logprobs = completion_logprobs(model, part, temperature=temperature)
        out[rows, :logprobs.shape[1]] = logprobs.float()
    if hasattr(model, "reshard"):  # FSDP2 leaves the root unsharded after a forward with no backward
        model.reshard()
    return out


# ----------------------------------------------------------------------------------------------------------
# 5. Masked reductions
# ----------------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp_min(1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_ranks: bool = False) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased var); shift_mean=False keeps the mean (as TRL/verl).
    all_ranks: the mean and variance of every rank's entries together (what one process would compute)."""
    if all_ranks and is_distributed():
        maskf = mask.to(torch.float64)
        x64 = x.to(torch.float64)
        n, total = all_reduce_sum(torch.stack([maskf.sum(), (x64 * maskf).sum()]))
        mean = total / n.clamp_min(1.0)
        var = all_reduce_sum(((x64 - mean).square() * maskf).sum()) / (n - 1).clamp_min(1.0)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    else:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# ----------------------------------------------------------------------------------------------------------
# 6. Collectives and data parallelism (torchrun: gloo on CPU, nccl on GPU)
# ----------------------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if is_distributed():
        dist.barrier()


def _backend_device():
    """Where the process group's collectives want their tensors: the current GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value):
    """Average a tensor, a float, or a dict of them over ranks (a no-op in one process)."""
    if isinstance(value, dict):
        if not value:
            return {}
        keys = sorted(value)
        stacked = torch.tensor([float(value[k]) for k in keys], dtype=torch.float64)
        return dict(zip(keys, all_reduce_mean(stacked).tolist()))
    if not is_distributed():
        return value
    tensor = value if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
    backend_device = _backend_device()
    out = tensor.detach().to(backend_device, torch.float64).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    out = (out / dist.get_world_size()).to(tensor.device, tensor.dtype) if torch.is_tensor(value) else out.item()
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    backend_device = _backend_device()
    out = tensor.detach().to(backend_device).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_reduce_max(value: int) -> int:
    """The largest of the ranks' integers (the value itself in one process)."""
    if not is_distributed():
        return int(value)
    backend_device = _backend_device()
    out = torch.tensor(int(value), dtype=torch.int64, device=backend_device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out.item())


def reduce_metrics(metrics: dict[str, float], weights: dict[str, float] | None = None) -> dict[str, float]:
    """Average a dict of floats over ranks in one collective, each metric weighted by weights[key]: this rank's count
    of what the metric is a mean over (its tokens for a per-token mean, its correct responses for the mean length of
    correct ones), so the result is the mean over every rank's items; a metric without a weight is a plain mean over
    ranks (right for means over the same number of rows on every rank). A NaN (e.g. no incorrect response on a rank)
    weighs 0. The same keys on every rank. A no-op in one process."""
    if not is_distributed():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    weight = torch.tensor([float((weights or {}).get(k, 1.0)) for k in keys], dtype=torch.float64)
    weight = weight * (~torch.isnan(values)).double()
    sums = all_reduce_sum(torch.stack([torch.nan_to_num(values) * weight, weight]))
    return {k: (s / c).item() if c > 0 else float("nan") for k, s, c in zip(keys, sums[0], sums[1])}


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, skip: bool = True):
    """Under DDP, backward inside the block only accumulates local gradients (no all-reduce).

    For every micro-batch of an optimizer step but the last, whose backward then all-reduces the sum once.
    FSDP2 keeps reduce-scattering every micro-batch: skipping it would hold full unsharded gradients on every
    rank between micro-batches, the memory FSDP exists to save. skip=False, FSDP2 or a plain model: a no-op.
    """
    if skip and hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def length_batches(prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, max_tokens: int,
                   ) -> list[torch.Tensor]:
    """Split rows into micro-batches of similar length, so that each pads little once trimmed.

    Rows are sorted by completion length and packed greedily while rows x (longest prompt + longest completion)
    stays within max_tokens (a row longer than that goes alone; max_tokens <= 0: one micro-batch). Each
    micro-batch is a tensor of row indices; trimming its columns to its longest prompt and completion is the
    caller's. Under torchrun every rank gets the same number of micro-batches (the most any rank needs, by
    splitting its largest ones), because each forward and backward is a collective under FSDP2 and DDP.
    """
    R = len(completion_lengths)
    order = torch.argsort(completion_lengths.cpu(), stable=True)
    plen, clen = prompt_lengths.cpu()[order].tolist(), completion_lengths.cpu()[order].tolist()
    bounds, start, p_max = [], 0, 0  # [start, end) ranges of the sorted order
    for i in range(R):
        p_max = max(p_max, plen[i])
        if max_tokens > 0 and i > start and (i - start + 1) * (p_max + clen[i]) > max_tokens:
            bounds.append((start, i))
            start, p_max = i, plen[i]
    bounds.append((start, R))
    target = all_reduce_max(len(bounds))
    while len(bounds) < target:  # split the largest (in padded tokens) splittable micro-batch in two
        cost = [(e - s) * (max(plen[s:e]) + clen[e - 1]) if e - s > 1 else -1 for s, e in bounds]
        k = max(range(len(bounds)), key=cost.__getitem__)
        if cost[k] < 0:
            raise ValueError(f"Cannot split {R} rows into the {target} micro-batches another rank needs.")
        s, e = bounds[k]
        bounds[k:k + 1] = [(s, (s + e) // 2), ((s + e) // 2, e)]
    return [order[s:e].to(completion_lengths.device) for s, e in bounds]


def wrap_model(model: torch.nn.Module, strategy: str = "ddp", device: torch.device | None = None,
               checkpointing: bool = False):
    """DDP for small models (a full copy per rank), FSDP2 `fully_shard` per decoder layer for large ones (a model
    load_model already sharded is returned as it is).
    checkpointing: gradient checkpointing, each decoder layer's activations recomputed in the backward (transformers'
    own, non-reentrant), in one process too.

    A no-op in one process without a process group (with one, even of size 1, it wraps: bench/grpo_run.py times
    FSDP2 on one GPU that way). Mixed precision (set_precision) carries over: DDP runs the model's autocast forward and
    all-reduces its fp32 gradients; under FSDP2 the autocast is replaced by MixedPrecisionPolicy(param_dtype=compute,
    reduce_dtype=fp32): each layer is gathered in bf16, its gradients reduce-scattered in fp32 into the fp32 shards
    (a frozen model is stored in the compute dtype, which is what that policy computes with anyway).
    FSDP2's root keeps its parameters unsharded between forward and backward, which token_logprobs relies on: its
    fused head uses the output embedding inside the root's forward.
    """
    if checkpointing:
        unwrap(model).activation_checkpointing_enable({"use_reentrant": False})
    if strategy == "none" or not (dist.is_available() and dist.is_initialized()):  # a group of 1 still wraps
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [device.index] if device is not None and device.type == "cuda" else None
        return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)  # no second copy of the gradients
    if _is_fsdp(model):
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        compute = compute_dtype(model)
        if getattr(model, "_rl_frozen", False):
            for param in model.parameters():
                param.data = param.data.to(compute)
        policy = MixedPrecisionPolicy()
        if any(p.dtype != compute for p in model.parameters()):
            policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        if getattr(model.__dict__.get("forward"), "_rl_autocast", False):
            del model.forward  # the policy casts the weights; an autocast on top would compute differently
        block_names = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ValueError(f"strategy must be 'ddp', 'fsdp' or 'none', got {strategy!r}.")


def adamw(params, *, lr: float, weight_decay: float, device: torch.device, strategy: str = "ddp",
          betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW as the RL scripts use it: fused (one kernel per step instead of ~10 passes per parameter, 10x faster
    on 100M parameters on a CPU) wherever it can be, i.e. on CPU and CUDA outside FSDP2's sharded tensors. Only the
    parameters that require gradients join it: with LoRA the adapter, so only it has (and checkpoints) AdamW state."""
    params = [p for p in params if p.requires_grad]
    fused = device.type in ("cpu", "cuda") and not (is_distributed() and strategy == "fsdp")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


@contextlib.contextmanager
def offload_optimizer(optimizers, enabled: bool = True):
    """`with offload_optimizer(optimizer):` the optimizer's state (AdamW: exp_avg and exp_avg_sq, 8 bytes per
    parameter) lives in CPU memory inside the block and is back on the device after it, an exception included: for
    the rollout of a model whose update barely fits (docs/memory.md). optimizers: one or a list; enabled=False: a
    no-op. Every state tensor stays the same object, its storage swapped for an empty one and back, so the optimizer,
    a fused step and FSDP2's DTensors (their local shards) see no change; 0-d tensors (AdamW's step) stay."""
    optimizers = [] if not enabled else optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    tensors = [getattr(value, "_local_tensor", value)  # a DTensor's shard
               for opt in optimizers for state in opt.state.values() for value in state.values()]
    held = []
    try:
        for local in (t for t in tensors if torch.is_tensor(t) and t.dim() > 0):
            copy = local.detach().to("cpu", copy=True)
            local.set_(local.new_empty(0))  # set_, not resize_: a loaded state's storage is fixed
            held.append((local, copy))
        yield
    finally:
        for local, copy in held:
            local.set_(copy.to(local.device))


def full_state_dict(model: torch.nn.Module) -> dict:
    """A full (unsharded) CPU state dict of the plain model; DDP/FSDP aware. Under FSDP2 only rank 0 gets it (the
    others an empty dict): every rank must call it, rank 0 saves."""
    model = unwrap(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def copy_weights(target: torch.nn.Module, source: torch.nn.Module):
    """target's parameters := source's (same architecture, same wrapping): shard to shard under FSDP2."""
    for target_param, param in zip(unwrap(target).parameters(), unwrap(source).parameters()):
        target_param.copy_(param)


def set_full_state_dict(model: torch.nn.Module, state: dict, source: str = "the state dict",
                        from_rank0: bool = False):
    """Load a full (unsharded) state dict into a plain, DDP or FSDP2 model (FSDP2: each rank keeps its shard;
    from_rank0: only rank 0 holds `state`, which it broadcasts one tensor at a time, the others pass {})."""
    plain = unwrap(model)
    fsdp = _is_fsdp(plain)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=from_rank0)
        missing, unexpected = set_model_state_dict(plain, state, options=options)
    else:
        missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (plain.config.tie_word_embeddings and "lm_head" in k)]
    if missing or unexpected:
        raise RuntimeError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    if plain.config.tie_word_embeddings and not fsdp:  # FSDP2 keeps the tie: the two names share one parameter
        plain.tie_weights()


# ----------------------------------------------------------------------------------------------------------
# 7. Gradient accumulation and the guarded optimizer step
# ----------------------------------------------------------------------------------------------------------


def fold_stats(total: dict, stats: dict, weight: torch.Tensor):
    """Fold one micro-batch's loss stats (0-d tensors) into a running total, on the device (no host sync): means
    weighted by the micro-batch's share of the tokens, `*_max` / `*_min` by fmax / fmin (NaN where a micro-batch has
    no token, which fmax / fmin ignore)."""
    for k, v in stats.items():
        if k.endswith(("_max", "_min")):
            v = torch.where(weight > 0, v, torch.nan)
            total[k] = (torch.fmax if k.endswith("_max") else torch.fmin)(total[k], v) if k in total else v
        else:
            total[k] = total.get(k, 0.0) + v * weight


# ---- dynamic loss scaling (fp16 compute only): Micikevicius et al. 2018, "Mixed Precision Training", section 3.2
#
#   backward of S * loss      the fp16 activation gradients are S times larger: fewer fall below fp16's 6e-8
#   g = grad / S              in the fp32 master gradients, before clipping (S a power of two: exact)
#   g not finite, loss finite skip the step, S <- S / 2 (S pushed a gradient past fp16's 65504)
#   LOSS_SCALE_GROWTH steps   S <- 2 S (probe whether a larger scale fits again)
#
# An overflow at S > 1 is the scale's fault, not the run's: it is skipped (train/skipped_updates) but does not count
# toward --nan-patience. At S = 1 (the floor) it is the run's own, a gradient past fp16's range with no scale at
# all: it counts as a NaN loss does. A NaN loss is computed before any scaling: it counts, and leaves S alone. bf16
# and fp32 compute never scale (bf16 has fp32's range), so their steps are what they were before the scaler.

LOSS_SCALE_INIT = 2.0 ** 16  # torch's GradScaler's start: the first overflows halve it down to what fits
LOSS_SCALE_GROWTH = 200  # good steps between doublings; GradScaler's 2000 exceeds a whole RL run's steps (a few
# hundred), so one early back-off would stay for good. Each doubling that overflows costs one skipped step: <= 0.5%


def loss_scale(models, state: dict | None = None) -> float:
    """The factor the next backward multiplies its loss by: 1.0 unless one of the models computes in fp16, then the
    dynamic scale S kept in state["loss_scale"] (with state["loss_scale_good_steps"], the steps since it last
    changed; a checkpoint saves them with the rest of the run's state, so a resume goes on with the same S). state
    None: kept on the first model instead (not checkpointed). Each model records the S its gradients now carry, and
    the state that holds S: guarded_step divides that S out and updates that state, whatever state it is given."""
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not any(compute_dtype(m) == torch.float16 for m in models):
        return 1.0
    scaler = state if state is not None else unwrap(models[0]).__dict__.setdefault("_rl_loss_scaler", {})
    scale = scaler.setdefault("loss_scale", LOSS_SCALE_INIT)
    scaler.setdefault("loss_scale_good_steps", 0)
    for m in models:
        unwrap(m).__dict__["_rl_grad_scale"] = (scale, scaler)
    return scale


def scale_loss(models, loss: torch.Tensor, state: dict | None = None) -> torch.Tensor:
    """loss * loss_scale(models, state), for a script whose loop calls backward itself; loss itself when S is 1."""
    scale = loss_scale(models, state)
    return loss if scale == 1.0 else loss * scale


def _unscale_gradients(pairs) -> tuple[float, dict] | None:
    """Divide the loss scale out of the models' gradients (loss_scale recorded it on each model); returns (S, the
    state that holds it), or None when no backward was scaled."""
    carried = [unwrap(m).__dict__.pop("_rl_grad_scale", None) for m, _ in pairs]
    carried = [c for c in carried if c is not None]
    if not carried:
        return None
    scale, scaler = carried[0]
    for m, _ in pairs:
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        if grads and scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / scale)
    return scale, scaler


def _update_loss_scale(scaler: dict, stepped: bool, gradient_overflow: bool):
    """S / 2 (not below 1) after a gradient overflow, S * 2 after LOSS_SCALE_GROWTH steps in a row; a step skipped
    for a non-finite loss (computed before any scaling) leaves S and the count as they were."""
    if gradient_overflow:
        scaler["loss_scale"] = max(scaler["loss_scale"] / 2, 1.0)
        scaler["loss_scale_good_steps"] = 0
    elif not stepped:
        return
    elif scaler["loss_scale_good_steps"] + 1 >= LOSS_SCALE_GROWTH:
        scaler["loss_scale"] *= 2
        scaler["loss_scale_good_steps"] = 0
    else:
        scaler["loss_scale_good_steps"] += 1


def guarded_step(model, optimizer, max_grad_norm: float, stats: dict, names: Sequence[str] | None = None,
                 state: dict | None = None) -> tuple[dict[str, float], bool]:
    """Clip the gradient to max_grad_norm (0: no clipping) and take the optimizer step, unless a loss (stats["loss"],
    stats["*_loss"]) or the gradient norm is not finite on some rank: then the gradient is dropped on every rank (a
    skip on one rank only would let the replicas drift apart). stats (0-d tensors) and the norm come back as floats
    in one host sync. model and optimizer may be parallel lists (PPO's policy and critic): each model is clipped on
    its own, its norm reported as f"{name}_grad_norm" (names), and all of them step or none does. state: the run's
    counters, updated here: skipped (every skipped step) and nan_streak (skipped in a row, for --nan-patience).
    fp16 compute (the backward ran on loss_scale's S times the loss): the gradients are divided by S before the
    clipping, "loss_scale" (S) joins the stats, and S is updated (_update_loss_scale); a step skipped because the
    gradient overflowed at S > 1 counts in skipped but not in nan_streak, which it leaves as it was.
    The gradients are set to None afterwards, stepped or not, so their memory is free until the next backward.
    Returns (stats with the norms, stepped)."""
    pairs = list(zip(model, optimizer)) if isinstance(model, (list, tuple)) else [(model, optimizer)]
    keys = [f"{name}_grad_norm" for name in names] if names is not None else ["grad_norm"]
    assert len(keys) == len(pairs), "one name per model"
    stats = dict(stats)
    scaled = _unscale_gradients(pairs)
    for key, (m, _) in zip(keys, pairs):
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        stats[key] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    device = stats[keys[0]].device
    values = dict(zip(stats, torch.stack([torch.as_tensor(v).float().to(device)
                                          for v in stats.values()]).tolist()))  # one host sync
    losses_finite = all(math.isfinite(v) for k, v in values.items() if k == "loss" or k.endswith("_loss"))
    norms_finite = all(math.isfinite(values[k]) for k in keys)
    bad_losses, bad_norms = all_reduce_sum(torch.tensor([float(not losses_finite), float(not norms_finite)])).tolist()
    stepped = bad_losses == 0 and bad_norms == 0
    gradient_overflow = scaled is not None and bad_losses == 0 and bad_norms > 0  # at S = 1 it is the run's own
    overflow = gradient_overflow and scaled[0] > 1.0
    for m, opt in pairs:
        if stepped:
            opt.step()
            gen = unwrap(m).__dict__.get("_rl_generation")
            if gen is not None:  # a fused AdamW step leaves the parameters' _version as it was: refresh the copy
                gen.synced = None
        opt.zero_grad(set_to_none=True)  # no gradient stays alive through the next rollout
    if scaled is not None:
        values["loss_scale"] = scaled[0]  # the S this step's gradients carried
        _update_loss_scale(scaled[1], stepped, gradient_overflow)
    if state is not None:
        state["skipped"] = state.get("skipped", 0) + (not stepped)
        if not overflow:
            state["nan_streak"] = 0 if stepped else state.get("nan_streak", 0) + 1
    return values, stepped


@dataclass
class Share:
    """What one micro-batch's loss is a share of: the minibatch's loss tokens over every rank divided by the ranks
    (a token-mean's denominator, since DDP then averages the ranks' gradients) and the minibatch's rows on this rank
    (a sequence-mean's)."""
    tokens: torch.Tensor
    rows: int


def accumulate_gradients(models, minibatch: dict, micro_loss, *, max_tokens: int, mask: str = "mask",
                         state: dict | None = None) -> dict:
    """The gradients of one optimizer step over a rollout minibatch, in length-sorted micro-batches of at most
    max_tokens padded tokens, each trimmed to its own longest row (micro_batches).

    micro_loss(part, share) -> (loss, stats) is one micro-batch's part of the minibatch's loss (normalised by
    share.tokens or share.rows, so that the micro-batches' gradients add up to the minibatch's); loss may be a dict
    {name: loss} (PPO's policy and value losses, each its own model's). Under DDP the gradients are all-reduced once,
    in the last micro-batch's backward; FSDP2 reduce-scatters each. Returns the stats (0-d tensors, no host sync)
    folded over micro-batches by fold_stats, each weighted by its share of the minibatch's `mask` tokens, and each
    loss summed ("loss" when micro_loss returns one tensor). Under torchrun the stats are then the whole minibatch's
    over every rank (reduce_token_stats: a rank with more tokens weighs more), the same on every rank, while each
    loss stays this rank's share of the minibatch's loss (whose mean over ranks is the loss). Under fp16 compute each
    backward runs on the loss times loss_scale's S (state: the run's state, which keeps S; guarded_step divides it
    out); the losses returned are unscaled."""
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    for model in models:
        model.zero_grad(set_to_none=True)
    tokens = minibatch[mask].sum()
    share = Share(all_reduce_sum(tokens.double()) / get_world_size(), minibatch[mask].shape[0])
    tokens = tokens.clamp_min(1)  # each micro-batch's stats weigh its share of them
    stats, losses = {}, {}
    parts = micro_batches(minibatch, max_tokens)
    for i, (_, part) in enumerate(parts):
        with contextlib.ExitStack() as no_sync:
            for model in models:  # DDP all-reduces in the last backward only
                no_sync.enter_context(no_grad_sync(model, skip=i < len(parts) - 1))
            loss, part_stats = micro_loss(part, share)
            named = loss if isinstance(loss, dict) else {"loss": loss}
            scale_loss(models, sum(named.values()), state).backward()
        for name, value in named.items():
            losses[name] = losses.get(name, 0.0) + value.detach().float()
        fold_stats(stats, part_stats, part[mask].sum() / tokens)
    return {**reduce_token_stats(stats, minibatch[mask].sum()), **losses}


def reduce_token_stats(stats: dict, tokens: torch.Tensor) -> dict:
    """fold_stats' totals over every rank, as if one process had folded all the ranks' micro-batches: each mean
    weighted by its rank's `tokens` (a plain mean over ranks would give a rank with 3 loss tokens the weight of one
    with 300), `*_max` the largest and `*_min` the smallest (NaN where no rank has a token). Two collectives, no host
    sync; the same stats on every rank. A no-op in one process."""
    if not is_distributed() or not stats:
        return stats
    means = sorted(k for k in stats if not k.endswith(("_max", "_min")))
    extremes = sorted(k for k in stats if k.endswith(("_max", "_min")))
    reduced = dict(stats)
    if means:
        weight = tokens.double()
        sums = all_reduce_sum(torch.stack([stats[k].double() * weight for k in means] + [weight]))
        for i, k in enumerate(means):
            reduced[k] = (sums[i] / sums[-1].clamp_min(1)).to(stats[k].dtype)
    if extremes:  # a min is the max of the negatives; -inf stands for a rank's NaN (no token), which MAX ignores
        signs = torch.tensor([1.0 if k.endswith("_max") else -1.0 for k in extremes], dtype=torch.float64,
                             device=stats[extremes[0]].device)
        values = torch.stack([stats[k].double().to(signs.device) for k in extremes]) * signs
        out = torch.nan_to_num(values, nan=-math.inf).to(_backend_device())
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        out = out.to(values.device)
        out = torch.where(torch.isinf(out) & (out < 0), torch.nan, out) * signs
        for i, k in enumerate(extremes):
            reduced[k] = out[i].to(stats[k].device, stats[k].dtype)
    return reduced


class StepMeans:
    """An update's train/ metrics: each stat of its optimizer steps (guarded_step's values) averaged over the steps;
    a ratio extreme that is NaN (no loss token in that step) is left out of its mean."""

    def __init__(self):
        self.totals, self.counts = {}, {}

    def add(self, values: dict[str, float]):
        for k, v in values.items():
            if not (k.startswith("ratio_m") and math.isnan(v)):
                self.totals[k] = self.totals.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def result(self, always: Sequence[str] = ()) -> dict[str, float]:
        """{"train/NAME": mean}; `always`: keys reported as NaN when no step had them (every rank the same keys)."""
        means = {f"train/{k}": v / self.counts[k] for k, v in self.totals.items()}
        return {**means, **{f"train/{k}": math.nan for k in always if k not in self.totals}}


# ----------------------------------------------------------------------------------------------------------
# 8. LoRA through peft: the adapter, its merged decode weights, the base as a free KL reference
# ----------------------------------------------------------------------------------------------------------
# With LoRA (Hu et al. 2021) each targeted linear layer computes W x + (alpha / r) B A x: W frozen, A (r, in) and
# B (out, r) trained, B = 0 at the start so the policy starts as the base. peft's layers do the work (injected into
# the transformers model in place, so the model stays the same class and every path above sees an ordinary model
# whose linear layers gained a `base_layer`); what the engine adds: the frozen base kept in the compute dtype with the
# adapter's master weights in fp32; decoding on merged weights W + (alpha / r) B A (the rollout copy: _rollout_model);
# the reference policy as the same model with its adapters switched off (no second model); an adapter-only state
# dict for checkpoints and a merged one for final/.

LORA_ALL_LINEAR = ("all-linear",)


@dataclass
class LoRA:
    """A LoRA adapter's settings (the --lora-* flags). targets: peft's target_modules ("all-linear": every linear
    layer of the attention and the MLP, not the output layer); heads: modules trained whole beside the adapter (a
    critic's or reward model's new `score` head: peft's modules_to_save); seed: A's initialisation, drawn from its
    own generator so every rank and a one-process run draw the same."""
    rank: int
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_ALL_LINEAR
    heads: tuple[str, ...] = ()
    seed: int = 0


def require_peft(flag: str = "--lora-rank"):
    """peft, or one sentence saying how to install it (an optional dependency: requirements.txt's extras)."""
    try:
        import peft
    except ImportError:
        raise UserError(f"{flag} needs the peft package: pip install peft (or --lora-rank 0 for full "
                        "fine-tuning).") from None
    return peft


def add_lora(model: torch.nn.Module, lora: LoRA, compute: torch.dtype | None = None, base: str = ""):
    """Inject peft's LoRA layers into a plain transformers model in place (before wrap_model) and freeze all else:
    only the adapter (and lora.heads) keeps requires_grad, in fp32 (its master weights); the frozen matmul weights are
    cast to `compute` (bf16 on a GPU), which is what autocast multiplies them in anyway, halving the base's memory.
    base: the --model the adapter belongs to (adapter_config.json's base_model_name_or_path). Returns the model."""
    peft = require_peft()
    targets = lora.targets[0] if tuple(lora.targets) == LORA_ALL_LINEAR else list(lora.targets)
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             modules_to_save=list(lora.heads) or None, base_model_name_or_path=base or None)
    master = model.get_input_embeddings().weight.dtype
    with torch.random.fork_rng(devices=[]):  # A's init from its own seed: the same on every rank, no global draw
        torch.default_generator.manual_seed(lora.seed)  # peft draws A on the CPU, then moves it
        try:
            peft.inject_adapter_in_model(config, model)
        except ValueError as error:  # peft: "Target modules {...} not found in the base model"
            raise UserError(f"--lora-targets {' '.join(lora.targets)}: {str(error).splitlines()[0]}") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # the adapter and its heads: fp32 master weights
                param.data = param.data.to(master if master.is_floating_point else torch.float32)
        if compute is not None:
            for module, name in _matmul_params(model):
                param = getattr(module, name)
                if module is not head and not param.requires_grad and param.dtype != compute:
                    module._parameters[name] = torch.nn.Parameter(param.detach().to(compute), requires_grad=False)
    return model


def has_lora(model: torch.nn.Module) -> bool:
    """Whether add_lora gave the model (plain, DDP or FSDP2) an adapter."""
    return "default" in getattr(unwrap(model), "peft_config", {})


def lora_config(model: torch.nn.Module):
    """The adapter's peft LoraConfig (None without one)."""
    return getattr(unwrap(model), "peft_config", {}).get("default")


def _lora_layers(model: torch.nn.Module) -> dict:
    """{module name: peft LoRA layer} of the plain model."""
    return {name: module for name, module in unwrap(model).named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "base_layer")}


def _plain_name(name: str) -> str | None:
    """A LoRA model's parameter name -> the plain model's (`q_proj.base_layer.weight` -> `q_proj.weight`, a head's
    trained copy `score.modules_to_save.default.weight` -> `score.weight`); None for the adapter's own weights and a
    head's untouched original."""
    if ".lora_" in name or ".original_module." in name:
        return None
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def _lora_delta(layer) -> torch.Tensor:
    """(alpha / r) B A of one peft LoRA layer, in fp32 (peft's get_delta_weight, in the adapter's dtype)."""
    return layer.get_delta_weight("default").float()


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of what the optimizer updates: everything in full fine-tuning, the adapter with LoRA."""
    return [(name, p) for name, p in unwrap(model).named_parameters() if p.requires_grad]


def _adapter_key(name: str) -> str:
    """A trainable parameter's name in peft's saved adapter files (PeftModel.save_pretrained's naming: the model
    under base_model.model, the adapter name dropped)."""
    return "base_model.model." + name.replace(".lora_A.default.", ".lora_A.").replace(
        ".lora_B.default.", ".lora_B.").replace(".modules_to_save.default.", ".")


def adapter_state_dict(model: torch.nn.Module) -> dict:
    """The adapter's full (unsharded) CPU tensors under peft's saved names ({} on ranks > 0 under FSDP2; every rank
    must call it: one all-gather per adapter tensor, a few MB, never the base)."""
    out = {}
    for name, param in trainable_parameters(model):
        value = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2: a DTensor
        if get_rank() == 0 or not _is_fsdp(unwrap(model)):
            out[_adapter_key(name)] = value.detach().cpu().clone()
    return out


def adapter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{saved name: full shape} of the adapter, for checking a file before loading it."""
    return {_adapter_key(name): tuple(p.shape) for name, p in trainable_parameters(model)}


@torch.no_grad()
def set_adapter_state_dict(model: torch.nn.Module, state: dict):
    """Load adapter_state_dict's tensors (peft's saved names) into a plain, DDP or FSDP2 model with the same adapter
    (FSDP2: each rank keeps its shard of the full tensors every rank passes)."""
    params = dict(trainable_parameters(model))
    names = {_adapter_key(name): name for name in params}
    missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or unexpected:
        raise RuntimeError(f"The adapter does not match the model's: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}.")
    for key, value in state.items():
        param = params[names[key]]
        if hasattr(param, "device_mesh"):  # FSDP2: this rank's shard of the full tensor
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh,
                                      param.placements)
        param.copy_(value)


def save_adapter(model: torch.nn.Module, state: dict, directory: str):
    """Write `state` (adapter_state_dict) as peft writes an adapter: adapter_model.safetensors and adapter_config.json,
    so PeftModel.from_pretrained(base, directory) loads it."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "adapter_model.safetensors"))
    lora_config(model).save_pretrained(directory)


def merged_state_dict(model: torch.nn.Module, state: dict) -> dict:
    """A LoRA model's full state dict (full_state_dict) -> the plain model's, each adapted weight merged,
    W + (alpha / r) B A, computed in fp32 and stored in W's dtype: what AutoModelForCausalLM.from_pretrained loads."""
    layers, out = _lora_layers(model), {}
    for key, value in state.items():
        name = _plain_name(key)
        if name is None:
            continue
        module_name = key.rpartition(".")[0].removesuffix(".base_layer")
        layer = layers.get(module_name)
        if layer is not None and key.endswith(".base_layer.weight"):
            scaling = layer.scaling["default"]
            a, b = state[f"{module_name}.lora_A.default.weight"], state[f"{module_name}.lora_B.default.weight"]
            value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        out[name] = value
    return out


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Inside the block the model computes as its base: every LoRA layer (and head copy) off, through peft's
    enable_adapters(False). That switch also drops the adapter's requires_grad; it is kept here, so that the trainable
    set never changes: FSDP2 fixes each parameter's gradient handling when it first runs the model, which may be this
    block (a reference pass before any update), and would then never reduce the adapter's bf16 gradients into its
    fp32 shards. Plain, DDP or FSDP2."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unwrap(model).modules() if isinstance(m, BaseTunerLayer)]
    trainable = [p for p in unwrap(model).parameters() if p.requires_grad]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        for param in trainable:
            param.requires_grad_(True)
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param in trainable:
            param.requires_grad_(True)


class BaseReference:
    """The KL reference pi_ref of a LoRA policy: the policy itself with its adapters disabled (the base), so no
    second model is loaded. Called like the model (rollout_logprobs, token_logprobs); unwrap reaches the policy."""

    def __init__(self, policy: torch.nn.Module):
        self.module = policy

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.module):
            return self.module(*args, **kwargs)

    def reshard(self):  # FSDP2's root stays unsharded after a forward without backward (rollout_logprobs)
        if hasattr(self.module, "reshard"):
            self.module.reshard()

    def eval(self):
        return self
