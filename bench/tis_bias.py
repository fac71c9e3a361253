"""bench/tis_bias.py: the exact bias of token-level truncated importance sampling (token TIS) against the sequence
estimator, by enumerating every sequence of a small tabular autoregressive policy (issue 23, sampler-trainer mismatch).

The sampler's policy mu differs a little from the trainer's pi. With y = (y_1..y_T) drawn from mu, the per-token
ratio rho_t = pi(y_t | y_<t) / mu(y_t | y_<t) and the score s_t = grad log pi(y_t | y_<t), the estimators of
grad J = grad E_pi[R(y)] = sum_y pi(y) R(y) sum_t s_t are

    none        g = R(y) * sum_t s_t                              (no correction: the policy gradient of mu's samples)
    token       g = R(y) * sum_t rho_t * s_t                      (per-token IS, C = infinity)
    token_tis   g = R(y) * sum_t min(rho_t, C) * s_t              (token TIS: OpenRLHF, verl's rollout_is="token")
    sequence    g = (prod_t rho_t) * R(y) * sum_t s_t             (sequence IS: unbiased, E_mu[g] = grad J)

verl's docs/algo/rollout_corr_math.md (section 3.3.1) states that token-level correction has O(T^2 Delta_max) bias,
Delta_max "the maximum per-token policy divergence"; the series it cites measures that divergence with the total
variation distance, so here
    Delta = max over contexts c of TV(pi(.|c), mu(.|c)),   TV(p, q) = 1/2 sum_v |p(v) - q(v)|.
Every expectation is an exact sum over all V^T sequences in float64 (no sampling noise):
    E_mu[g] = sum_y mu(y) g(y),   E_mu[||g||^2] = sum_y mu(y) ||g(y)||^2,
with g(y) written out per sequence (the tabular score is onehot(y_t) - pi(.|c_t) in row c_t of theta), while grad J
comes from autograd on sum_y pi(y) R(y): the sequence estimator must match it to float64 rounding, and the script
asserts it (the check that the enumeration is right).

The policy (tabular, so that the whole sequence space can be summed): pi(y_t | y_<t) = softmax(theta[c_t]), the
context c_t being
    previous    the previous token (a begin token at t = 1): one table shared by every position, as an LLM's
                weights are, so the per-position gradients add up in the same parameters;
    position    the position and the previous token: a separate table per position (parameters never shared).
theta[c] ~ logit_scale * N(0, 1), plus `stickiness` on the logit of repeating the previous token (a slowly mixing
chain: what y_t changes then lasts many steps; at stickiness 3 and V = 3 a token repeats with probability ~0.83).
The sampler mu = softmax(theta + s * eps), eps ~ N(0, 1) one fixed random table per seed (its sign per context chosen so
that TV can reach 1/2 everywhere) and s >= 0 one scale found by bisection so that
max_c TV(pi(.|c), mu(.|c)) = Delta exactly: a random logit perturbation of a given size, as bf16 and kernel
differences are. Also reported: the largest KL(mu || pi) over contexts (what verl's `kl` metric estimates), the
largest |log mu - log pi|, the largest rho and the share of tokens (under mu) whose rho the cap C truncates.
The rewards: count (the number of times token 0 occurs, a dense reward) and last (1 if y_T = 0, a terminal one). No
baseline: R enters as it is (the estimators above), so a weight whose mean under mu is not 1 biases by R's full size.

Reported per (context, reward, seed, T, Delta) and estimator: the relative bias ||E_mu[g] - grad J|| / ||grad J||,
the absolute bias ||E_mu[g] - grad J||, the cosine between E_mu[g] and grad J, and the exact second moment
E_mu[||g||^2] (the variance side: the reason token TIS exists). A policy family is a (context, stickiness) pair, one
random policy pair per seed. Two sweeps: T at each fixed Delta (--t-deltas), Delta at fixed T (--horizon); log-log
slopes fitted per seed, reported as mean and spread over seeds.

    OMP_NUM_THREADS=1 python bench/tis_bias.py     # the study (V = 3, T = 1..10, 5 seeds x 4 policy families): ~40 s
    OMP_NUM_THREADS=1 python bench/tis_bias.py --seeds 0 --horizons 1 2 3 4 --horizon 4   # a quick look

Result (docs/mismatch_bias.md): sequence IS matches grad J to 3e-13; token TIS's bias is first order in Delta
(exponent 1.00 +- 0.01 for Delta <= 0.02); its relative bias grows with T with an exponent between 0 (fast-mixing
chains) and ~0.9 (sticky chains), its absolute bias at most ~T^1.8: within verl's O(T^2 Delta), never scaling as T^2.

Writes bench/results/tis_bias.json (every number) and docs/mismatch_bias.png (bias vs T, bias vs Delta, second
moment vs T); prints the markdown tables that docs/mismatch_bias.md holds (also kept in the json).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ("none", "token", "token_tis", "sequence")
CONTEXTS = ("previous", "position")
REWARDS = ("count", "last")
TARGET = 0  # the rewarded token


@dataclass
class Args:
    vocab: int = 3
    """V: tokens in the vocabulary (the study enumerates V^T sequences)"""
    horizons: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    """T sweep: the horizons (at each of --t-deltas)"""
    t_deltas: tuple[float, ...] = (0.02, 0.2)
    """the T sweeps' Deltas: the largest per-token total variation between pi and mu"""
    deltas: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    """Delta sweep: the divergences (at --horizon)"""
    horizon: int = 8
    """the Delta sweep's T"""
    cap: float = 2.0
    """C: token TIS's truncation cap (verl's token-TIS preset)"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """one random policy pair (theta, eps) per seed"""
    contexts: tuple[str, ...] = CONTEXTS
    """which policies: previous (one table shared by every position) | position (a table per position)"""
    rewards: tuple[str, ...] = REWARDS
    """which rewards: count (occurrences of token 0) | last (1 if the last token is 0)"""
    logit_scale: float = 1.0
    """theta ~ logit_scale * N(0, 1)"""
    stickiness: tuple[float, ...] = (0.0, 3.0)
    """added to the logit of repeating the previous token: 0 mixes within a step or two, 3 takes many"""
    threads: int = 1
    """torch threads"""
    results: str = "bench/results/tis_bias.json"
    """every number"""
    plot: str = "docs/mismatch_bias.png"
    """the figure"""


# ---------------------------------------------------------------------------------------------------------------------
# The policy pair and the sequence space
# ---------------------------------------------------------------------------------------------------------------------

def sequences(vocab: int, horizon: int) -> torch.Tensor:
    """All vocab^horizon sequences, (N, T) with N = V^T, in lexicographic order."""
    index = torch.arange(vocab ** horizon)
    powers = vocab ** torch.arange(horizon - 1, -1, -1)
    return (index[:, None] // powers) % vocab  # (N, T)


def contexts(seqs: torch.Tensor, vocab: int, kind: str) -> torch.Tensor:
    """The context index c_t of every token, (N, T): the previous token (vocab for the begin token at t = 1), and for
    kind "position" also the position, c_t = t * (V + 1) + previous."""
    previous = torch.cat([torch.full_like(seqs[:, :1], vocab), seqs[:, :-1]], 1)  # (N, T)
    if kind == "previous":
        return previous
    if kind == "position":
        return torch.arange(seqs.shape[1])[None, :] * (vocab + 1) + previous
    raise ValueError(f"unknown context kind {kind!r}: previous | position")


def num_contexts(vocab: int, horizon: int, kind: str) -> int:
    return vocab + 1 if kind == "previous" else horizon * (vocab + 1)


def random_policy(vocab: int, n_contexts: int, seed: int, logit_scale: float = 1.0, stickiness: float = 0.0):
    """theta (n_contexts, V) and the sampler's direction eps (n_contexts, V), both from one seeded generator. Row c's
    previous token is c mod (V + 1) (V: the begin token), so a table for T positions is the first T * (V + 1) rows of
    the table for more: the T sweep keeps the same policy and only lengthens it."""
    generator = torch.Generator().manual_seed(seed)
    theta = logit_scale * torch.randn(n_contexts, vocab, generator=generator, dtype=torch.float64)
    eps = torch.randn(n_contexts, vocab, generator=generator, dtype=torch.float64)
    previous = torch.arange(n_contexts) % (vocab + 1)
    repeat = previous < vocab
    theta[repeat, previous[repeat]] += stickiness
    # orient eps so that, as its scale grows, mu's mass goes to whichever of eps's extreme tokens pi finds less likely:
    # TV can then reach at least 1/2 in every context, whatever pi's shape
    probs = theta.softmax(-1)
    flip = probs.gather(1, eps.argmax(1, keepdim=True)) > probs.gather(1, eps.argmin(1, keepdim=True))
    return theta, torch.where(flip, -eps, eps)


def total_variation(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """TV(softmax(a), softmax(b)) = 1/2 sum_v |p(v) - q(v)| per row."""
    return 0.5 * (logits_a.softmax(-1) - logits_b.softmax(-1)).abs().sum(-1)


def sampler_logits(theta: torch.Tensor, eps: torch.Tensor, delta: float) -> torch.Tensor:
    """mu's logits theta + s * eps, one scale s >= 0 for the whole table, found by bisection so that the largest
    per-context total variation max_c TV(pi(.|c), mu(.|c)) is delta (to float64 rounding)."""
    if delta == 0:
        return theta.clone()
    def tv_max(scale: float) -> float:
        return total_variation(theta, theta + scale * eps).max().item()
    low, high = 0.0, 1.0
    while tv_max(high) < delta:  # grow the bracket; TV can reach 1/2 in every context (random_policy orients eps)
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"delta {delta} is beyond the total variation the direction eps can reach: use a "
                             "smaller --delta/--deltas")
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (low, middle) if tv_max(middle) > delta else (middle, high)
    return theta + (low + high) / 2 * eps


def reward(seqs: torch.Tensor, kind: str) -> torch.Tensor:
    """R(y), (N,): count = the number of tokens equal to TARGET; last = 1 if the last token is TARGET."""
    if kind == "count":
        return (seqs == TARGET).sum(-1).double()
    if kind == "last":
        return (seqs[:, -1] == TARGET).double()
    raise ValueError(f"unknown reward {kind!r}: count | last")


def divergence(theta: torch.Tensor, sampler: torch.Tensor) -> dict:
    """The per-token divergences between pi and mu, each the largest over contexts."""
    log_pi, log_mu = theta.log_softmax(-1), sampler.log_softmax(-1)
    kl = (log_mu.exp() * (log_mu - log_pi)).sum(-1)  # KL(mu || pi) per context
    return {"tv_max": total_variation(theta, sampler).max().item(), "kl_max": kl.max().item(),
            "kl_mean": kl.mean().item(), "log_ratio_max": (log_pi - log_mu).abs().max().item(),
            "ratio_max": (log_pi - log_mu).exp().max().item()}


# ---------------------------------------------------------------------------------------------------------------------
# The exact expectations
# ---------------------------------------------------------------------------------------------------------------------

def true_gradient(theta: torch.Tensor, seqs: torch.Tensor, ctx: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """grad J, J(theta) = sum_y pi_theta(y) R(y), by autograd on the exact sum (no score function involved)."""
    theta = theta.detach().clone().requires_grad_(True)
    logp = theta.log_softmax(-1)[ctx, seqs]  # (N, T)
    (grad,) = torch.autograd.grad((logp.sum(-1).exp() * rewards).sum(), theta)
    return grad


def per_sample_gradients(theta: torch.Tensor, seqs: torch.Tensor, ctx: torch.Tensor,
                         coefficients: torch.Tensor) -> torch.Tensor:
    """g(y) = sum_t coefficient_t(y) * grad log pi(y_t | c_t) for every sequence, (N, n_contexts, V). The tabular
    score of one token is onehot(y_t) - pi(.|c_t), in row c_t of theta and zero elsewhere."""
    n, horizon = seqs.shape
    probs = theta.softmax(-1)
    score = torch.nn.functional.one_hot(seqs, theta.shape[1]).double() - probs[ctx]  # (N, T, V)
    grads = torch.zeros(n, *theta.shape, dtype=theta.dtype)  # (N, n_contexts, V)
    grads.scatter_add_(1, ctx[:, :, None].expand(n, horizon, theta.shape[1]), coefficients[:, :, None] * score)
    return grads


def estimator_coefficients(log_ratio: torch.Tensor, rewards: torch.Tensor, cap: float) -> dict:
    """Each estimator's per-token coefficient of grad log pi(y_t | c_t), (N, T): R * weight_t."""
    ratio = log_ratio.exp()  # (N, T) rho_t
    sequence_ratio = log_ratio.sum(-1, keepdim=True).exp()  # (N, 1) prod_t rho_t
    weights = {"none": torch.ones_like(ratio), "token": ratio, "token_tis": ratio.clamp(max=cap),
               "sequence": sequence_ratio.expand_as(ratio)}
    return {name: rewards[:, None] * w for name, w in weights.items()}


def exact_study(theta: torch.Tensor, sampler: torch.Tensor, seqs: torch.Tensor, ctx: torch.Tensor,
                rewards: dict[str, torch.Tensor], cap: float) -> dict:
    """Every estimator's exact mean and second moment under mu, against grad J, for each reward {name: R (N,)};
    raises if the sequence estimator's mean is not grad J (the enumeration would then be wrong). R(y) multiplies the
    whole per-sample gradient, g(y) = R(y) * sum_t w_t(y) s_t(y), so the sum h(y) = sum_t w_t s_t is made once per
    estimator and shared by the rewards."""
    log_pi = theta.log_softmax(-1)[ctx, seqs]  # (N, T)
    log_mu = sampler.log_softmax(-1)[ctx, seqs]  # (N, T)
    mu = log_mu.sum(-1).exp()  # (N,) mu(y)
    ones = torch.ones(len(seqs), dtype=theta.dtype)
    gradients = {name: per_sample_gradients(theta, seqs, ctx, weight).flatten(1)  # (N, n_contexts * V): h(y)
                 for name, weight in estimator_coefficients(log_pi - log_mu, ones, cap).items()}
    squares = {name: h.pow(2).sum(-1) for name, h in gradients.items()}  # (N,) ||h(y)||^2
    token_mu = mu[:, None].expand_as(log_pi)  # the share of tokens (under mu) whose ratio the cap truncates
    truncated = ((token_mu * (log_pi - log_mu > math.log(cap))).sum() / token_mu.sum()).item()
    out = {}
    for reward_name, rewards_y in rewards.items():
        grad = true_gradient(theta, seqs, ctx, rewards_y).flatten()
        grad_norm = grad.norm().item()
        result = {"grad_norm": grad_norm, "truncated_share": truncated, "estimators": {}}
        for name, h in gradients.items():
            mean = (mu * rewards_y) @ h  # E_mu[g]
            second_moment = (mu * rewards_y.pow(2) * squares[name]).sum().item()  # E_mu[||g||^2]
            bias = (mean - grad).norm().item()
            result["estimators"][name] = {
                "relative_bias": bias / grad_norm, "bias": bias,
                "cosine": torch.nn.functional.cosine_similarity(mean, grad, 0).item(),
                "second_moment": second_moment, "variance": second_moment - mean.pow(2).sum().item(),
                "max_abs_diff": (mean - grad).abs().max().item()}
        error = result["estimators"]["sequence"]["max_abs_diff"]
        assert error < 1e-10 * max(1.0, grad.abs().max().item()), \
            f"E_mu[g_seq] differs from grad J by {error:.3g} ({reward_name}): the enumeration is wrong"
        out[reward_name] = result
    return out


def one_case(vocab: int, horizon: int, delta: float, seed: int, context: str, cap: float,
             rewards: tuple[str, ...] = REWARDS, logit_scale: float = 1.0, stickiness: float = 0.0,
             max_horizon: int | None = None) -> dict:
    """The exact study of one policy pair at one (T, Delta), {reward: numbers}. Both tables are made for max_horizon
    positions (default: horizon), Delta holding over all of them, and cut to horizon: one seed is one policy pair
    across a T sweep."""
    theta, eps = random_policy(vocab, num_contexts(vocab, max_horizon or horizon, context), seed, logit_scale,
                               stickiness)
    sampler = sampler_logits(theta, eps, delta)
    diagnostics = divergence(theta, sampler)
    theta, sampler = theta[:num_contexts(vocab, horizon, context)], sampler[:num_contexts(vocab, horizon, context)]
    seqs = sequences(vocab, horizon)
    ctx = contexts(seqs, vocab, context)
    results = exact_study(theta, sampler, seqs, ctx, {name: reward(seqs, name) for name in rewards}, cap)
    return {name: {"T": horizon, "delta": delta, "seed": seed, **diagnostics, **r} for name, r in results.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The sweeps, the fits, the tables, the figure
# ---------------------------------------------------------------------------------------------------------------------

def family_name(context: str, stickiness: float) -> str:
    return f"{context}, stick {stickiness:g}"


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of log y against log x: the exponent p of y ~ x^p."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(std)}"


def run_sweeps(args: Args) -> list[dict]:
    """Every case: the T sweep at each of --t-deltas and the Delta sweep at --horizon, per policy family and seed."""
    cases = []
    families = [(c, s) for c in args.contexts for s in args.stickiness]
    for context, stickiness in families:
        t0 = time.perf_counter()
        for seed in args.seeds:
            points = [("T", horizon, delta) for delta in args.t_deltas for horizon in args.horizons]
            points += [("delta", args.horizon, delta) for delta in args.deltas]
            for sweep, horizon, delta in points:
                max_horizon = max(args.horizons) if sweep == "T" else horizon
                result = one_case(args.vocab, horizon, delta, seed, context, args.cap, args.rewards, args.logit_scale,
                                  stickiness, max_horizon)
                for reward_name, r in result.items():
                    cases.append({"context": context, "stickiness": stickiness, "reward": reward_name,
                                  "sweep": sweep, **r})
        print(f"{family_name(context, stickiness)}: {len(args.seeds)} seeds in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return cases


def select(cases: list[dict], **where) -> list[dict]:
    return [c for c in cases if all(c[k] == v for k, v in where.items())]


def fit_slopes(args: Args, cases: list[dict]) -> list[dict]:
    """Per family, reward, estimator and seed: the log-log slopes of the bias against T (T >= 2: at T = 1 token IS
    is the sequence estimator) at each of --t-deltas, and against Delta; returned with their mean, std, min and max
    over seeds."""
    rows = []
    for context, stickiness in [(c, s) for c in args.contexts for s in args.stickiness]:
        for reward_name in args.rewards:
            for estimator in ("token", "token_tis", "none"):
                fits = {}
                for seed in args.seeds:
                    where = dict(context=context, stickiness=stickiness, reward=reward_name, seed=seed)
                    pick = {}
                    for delta in args.t_deltas:
                        t_cases = [c for c in select(cases, sweep="T", delta=delta, **where) if c["T"] >= 2]
                        upper = [c for c in t_cases if c["T"] >= max(args.horizons) / 2]
                        pick[f"relative_vs_T@{delta:g}"] = (t_cases, "T", "relative_bias")
                        pick[f"relative_vs_T_upper@{delta:g}"] = (upper, "T", "relative_bias")
                        pick[f"absolute_vs_T@{delta:g}"] = (t_cases, "T", "bias")
                    d_cases = select(cases, sweep="delta", **where)
                    pick["relative_vs_delta"] = (d_cases, "delta", "relative_bias")
                    pick["relative_vs_delta_small"] = ([c for c in d_cases if c["delta"] <= 0.02], "delta",
                                                       "relative_bias")
                    for key, (chosen, x, y) in pick.items():
                        if len(chosen) >= 2:
                            fits.setdefault(key, []).append(slope([c[x] for c in chosen],
                                                                  [c["estimators"][estimator][y] for c in chosen]))
                rows.append({"context": context, "stickiness": stickiness, "reward": reward_name,
                             "estimator": estimator,
                             **{k: {"per_seed": v, "mean": statistics.mean(v),
                                    "std": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v), "max": max(v)}
                                for k, v in fits.items()}})
    return rows


ESTIMATOR_NAMES = {"token": "token IS (C = inf)", "token_tis": "token TIS", "none": "no correction",
                   "sequence": "sequence IS"}


def tables(args: Args, cases: list[dict], slopes: list[dict]) -> str:
    """The markdown tables of docs/mismatch_bias.md."""
    families = [(c, s) for c in args.contexts for s in args.stickiness]
    out = []

    def over_seeds(family, reward_name, get, **where):
        return [get(r) for r in select(cases, context=family[0], stickiness=family[1], reward=reward_name, **where)]

    # ---- the divergence each Delta means
    out += [f"Per-token divergence at each Delta (the Delta sweep, T = {args.horizon}; mean over families and seeds, "
            "min..max):", "",
            "| Delta = max TV | max KL(mu‖pi) | max abs(log mu - log pi) | max rho | tokens with rho > C "
            "(under mu) |",
            "|---|---|---|---|---|"]
    for delta in args.deltas:
        rows = select(cases, sweep="delta", delta=delta, reward=args.rewards[0])
        cells = []
        for key, fmt in (("kl_max", "{:.2g}"), ("log_ratio_max", "{:.3f}"), ("ratio_max", "{:.3f}"),
                         ("truncated_share", "{:.2%}")):
            v = [r[key] for r in rows]
            cells.append(f"{fmt.format(statistics.mean(v))} ({fmt.format(min(v))}..{fmt.format(max(v))})")
        out.append(f"| {delta:g} | " + " | ".join(cells) + " |")

    # ---- bias against T, against Delta
    sweeps = [("T", "T", args.horizons, dict(delta=d), f"Delta = {d:g}") for d in args.t_deltas]
    sweeps.append(("delta", "delta", args.deltas, dict(T=args.horizon), f"T = {args.horizon}"))
    for sweep, key, values, fixed, fixed_text in sweeps:
        for estimator in ("token_tis", "none"):
            label = ESTIMATOR_NAMES[estimator] + (f" (C = {args.cap:g})" if estimator == "token_tis" else "")
            out += ["", f"Relative bias ||E[g] - grad J|| / ||grad J|| of {label}, in %, against {key} at "
                    f"{fixed_text} (mean ± std over {len(args.seeds)} seeds):", "",
                    "| family | reward | " + " | ".join(f"{key} = {v:g}" for v in values) + " |",
                    "|---|---|" + "---|" * len(values)]
            for family in families:
                for reward_name in args.rewards:
                    cells = [spread(over_seeds(family, reward_name,
                                               lambda r: 100 * r["estimators"][estimator]["relative_bias"],
                                               sweep=sweep, **fixed, **{key: v})) for v in values]
                    out.append(f"| {family_name(*family)} | {reward_name} | " + " | ".join(cells) + " |")

    # ---- the fitted exponents
    keys = [k for k in slopes[0] if k.startswith(("relative_vs", "absolute_vs"))]
    out += ["", "Log-log slopes (the exponent p in bias ~ x^p), fitted per seed, mean ± std (min..max) over seeds. "
            f"vs T: T = 2..{max(args.horizons)} at the Delta after @ (at T = 1 token IS is the sequence estimator), "
            f"'upper': T >= {max(args.horizons) / 2:g}; vs Delta: Delta = {', '.join(f'{d:g}' for d in args.deltas)} "
            f"at T = {args.horizon}, 'small': Delta <= 0.02:", "",
            "| family | reward | estimator | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
            "|---|---|---|" + "---|" * len(keys)]
    for row in slopes:
        cells = [f"{spread(row[k]['per_seed'])} ({row[k]['min']:.2f}..{row[k]['max']:.2f})" for k in keys]
        out.append(f"| {family_name(row['context'], row['stickiness'])} | {row['reward']} | "
                   f"{ESTIMATOR_NAMES[row['estimator']]} | " + " | ".join(cells) + " |")

    # ---- direction: cosine at the largest Delta
    big = max(args.deltas)
    out += ["", f"Cosine between E[g] and grad J at T = {args.horizon}, Delta = {big:g} (mean over seeds, and the "
            "smallest):", "", "| family | reward | " + " | ".join(ESTIMATOR_NAMES.values()) + " |",
            "|---|---|---|---|---|---|"]
    for family in families:
        for reward_name in args.rewards:
            cells = []
            for estimator in ESTIMATOR_NAMES:
                v = over_seeds(family, reward_name, lambda r: r["estimators"][estimator]["cosine"], sweep="delta",
                               delta=big)
                cells.append(f"{statistics.mean(v):.4f} ({min(v):.4f})")
            out.append(f"| {family_name(*family)} | {reward_name} | " + " | ".join(cells) + " |")

    # ---- the variance side
    for delta in args.t_deltas:
        out += ["", f"Second moment E_mu[||g||^2] against T at Delta = {delta:g}, reward {args.rewards[0]}: sequence "
                "IS / token TIS (mean over seeds), and their ratio (mean over seeds of the per-seed ratio):", "",
                "| family | " + " | ".join(f"T = {t}" for t in args.horizons) + " |",
                "|---|" + "---|" * len(args.horizons)]
        for family in families:
            cells = []
            for t in args.horizons:
                rows = select(cases, sweep="T", context=family[0], stickiness=family[1], reward=args.rewards[0], T=t,
                              delta=delta)
                seq = [r["estimators"]["sequence"]["second_moment"] for r in rows]
                tis = [r["estimators"]["token_tis"]["second_moment"] for r in rows]
                ratio = statistics.mean(a / b for a, b in zip(seq, tis))
                cells.append(f"{statistics.mean(seq):.3g} / {statistics.mean(tis):.3g} (x{ratio:.2f})")
            out.append(f"| {family_name(*family)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(args: Args, cases: list[dict]) -> None:
    """Three log-log panels: token TIS's relative bias against T and against Delta, the second moments against T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [(c, s) for c in args.contexts for s in args.stickiness]
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))

    def band(ax, family, reward_name, xkey, values, get, color, style, label, **where):
        means, lows, highs = [], [], []
        for v in values:
            ys = [get(r) for r in select(cases, context=family[0], stickiness=family[1], reward=reward_name,
                                         **where, **{xkey: v})]
            means.append(statistics.mean(ys)), lows.append(min(ys)), highs.append(max(ys))
        ax.plot(values, means, style, color=color, marker="o", markersize=3, label=label)
        ax.fill_between(values, lows, highs, color=color, alpha=0.07)

    small, large = min(args.t_deltas), max(args.t_deltas)
    horizons = [t for t in args.horizons if t >= 2]
    tis = lambda r: r["estimators"]["token_tis"]["relative_bias"]  # noqa: E731
    for i, family in enumerate(families):
        for j, reward_name in enumerate(args.rewards):
            label = f"{family_name(*family)}, {reward_name}"
            band(axes[0], family, reward_name, "T", horizons, tis, colors[i], styles[j], label, sweep="T", delta=small)
            band(axes[1], family, reward_name, "delta", list(args.deltas), tis, colors[i], styles[j], label,
                 sweep="delta")
        for j, estimator in enumerate(("sequence", "token_tis")):
            band(axes[2], family, args.rewards[0], "T", list(args.horizons),
                 lambda r: r["estimators"][estimator]["second_moment"], colors[i], styles[j],
                 f"{family_name(*family)}, {ESTIMATOR_NAMES[estimator]}", sweep="T", delta=large)
    t_ref = [horizons[0], horizons[-1]]
    axes[0].plot(t_ref, [0.003 * (t / t_ref[0]) ** 2 for t in t_ref], color="gray", lw=1, label="slope 2 (T^2)")
    axes[0].plot(t_ref, [0.003 * (t / t_ref[0]) for t in t_ref], color="gray", lw=1, ls=":", label="slope 1 (T)")
    d_ref = [min(args.deltas), max(args.deltas)]
    axes[1].plot(d_ref, [0.3 * d for d in d_ref], color="gray", lw=1, label="slope 1 (Delta)")
    titles = (f"token TIS (C = {args.cap:g}): relative bias vs T, Delta = {small:g}",
              f"token TIS (C = {args.cap:g}): relative bias vs Delta, T = {args.horizon}",
              f"E_mu ||g||^2 vs T, Delta = {large:g}, reward {args.rewards[0]}\n"
              "(solid: sequence IS, dashed: token TIS)")
    xlabels = ("T", "Delta = max TV(pi, mu) per token", "T")
    ylabels = ("||E g - grad J|| / ||grad J||", "||E g - grad J|| / ||grad J||", "E_mu ||g||^2")
    for ax, title, xl, yl in zip(axes, titles, xlabels, ylabels):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_title(title, fontsize=9)
        ax.set_xlabel(xl), ax.set_ylabel(yl), ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=6)
    for ax, ticks in ((axes[0], horizons), (axes[2], list(args.horizons))):
        ax.set_xticks(ticks, [str(t) for t in ticks]), ax.minorticks_off()
    fig.suptitle(f"Exact enumeration, V = {args.vocab}, {len(args.seeds)} seeds per family (line: mean, band: "
                 "min..max over seeds)", fontsize=10)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


CASE_FIELDS = ("relative_bias", "bias", "cosine", "second_moment", "max_abs_diff")


def compact(case: dict) -> dict:
    """A case for the json: each estimator's numbers as a list in CASE_FIELDS' order."""
    return {**case, "estimators": {name: [e[k] for k in CASE_FIELDS] for name, e in case["estimators"].items()}}


def rounded(value, digits: int = 5):
    """value with every float cut to `digits` significant digits (the json's size; the exactness checks ran on the
    full float64 numbers before)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def check_args(args: Args) -> str | None:
    """The user's mistake in one sentence, or None."""
    for name, allowed, given in (("--contexts", CONTEXTS, args.contexts), ("--rewards", REWARDS, args.rewards)):
        if not given or not set(given) <= set(allowed):
            return f"{name} takes {' | '.join(allowed)}, got {' '.join(given) or 'nothing'}"
    if min(args.horizons) < 1 or args.horizon < 1:
        return "horizons must be at least 1"
    if args.vocab < 2 or args.vocab ** max(max(args.horizons), args.horizon) > 2e6:
        return (f"V^T = {args.vocab}^{max(max(args.horizons), args.horizon)} sequences cannot be enumerated here: "
                "use --vocab >= 2 and at most 2 million sequences")
    if not all(0 <= d < 0.5 for d in (*args.t_deltas, *args.deltas)):
        return "every Delta (--t-deltas, --deltas) must be in [0, 0.5): a total variation the sampler can reach"
    if args.cap <= 1:
        return "--cap must be above 1"
    return None


def main(args: Args):
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cases = run_sweeps(args)
    slopes = fit_slopes(args, cases)
    text = tables(args, cases, slopes)
    command = "OMP_NUM_THREADS=1 python bench/tis_bias.py " + " ".join(sys.argv[1:])
    header = (f"`{command.strip()}` (torch {torch.__version__}, {torch.get_num_threads()} thread, float64, "
              f"{time.perf_counter() - t0:.0f} s)\n\n")
    print("\n" + header + text)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command.strip(), "args": vars(args), "wall_s": round(time.perf_counter() - t0, 1),
              "case_estimator_fields": list(CASE_FIELDS),
              "tables": header + text, "slopes": rounded(slopes)}
    lines = json.dumps(record, indent=1)[:-2] + ',\n "cases": [\n'  # one case a line: a 1,000-case file stays readable
    lines += ",\n".join(json.dumps(rounded(compact(case))) for case in cases) + "\n ]\n}\n"
    Path(args.results).write_text(lines)
    plot(args, cases)
    print(f"wrote {args.results} and {args.plot}")
    return {"cases": cases, "slopes": slopes}


if __name__ == "__main__":
    main(tyro.cli(Args))
