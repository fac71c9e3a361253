"""bench/mismatch.py: the sampler-trainer mismatch in the toy world, measured and then injected.

(a) gap: how far the sampler's log mu is from the trainer's pi_old on the same rollout (16 prompts x 8 samples, the
    toy model, one CPU thread), per numerics configuration: fp32; fp32 with batch-invariant kernels; bf16 compute
    with our fp32 output layer; bf16 with bf16-rounded logits (what engines that round the logits compute); fp16
    compute; top-p 0.8 with and without the keep-sampling mask. pi_old is computed in one pass and in micro-batches
    of about 1 and 8 rows (verl #6280's case: the trainer disagreeing with itself across micro-batch sizes).
(b) train: GRPO (`python grpo.py`, the toy world's default run, 80 steps) with a mismatch injected into the sampler,
    keyed Gaussian noise of std --noise on its logits / T (--sampler-logit-noise), 3 seeds per arm: no mismatch (the
    control), the mismatch uncorrected, token TIS (verl-token-tis: w = min(rho, 2)), the sequence mask (trl:
    rho_seq * 1[rho_seq <= 3]) and geometric rejection (verl-geo-rs: keep a sequence if 0.999 <= rho_geo <= 1.001).
    Held-out greedy accuracy every 10 steps, and per step the measured KL(mu || pi_old) (k3), the share of tokens
    with rho outside [0.9, 1.1], the share rejected and the mean IS weight.
(c) the bias of token TIS against the sequence estimator, exactly, is bench/tis_bias.py (docs/mismatch_bias.md).

    python bench/mismatch.py --part gap                 # (a), ~1 min
    python bench/mismatch.py --part train               # (b), 15 runs, two at a time (~35 min on 2 idle cores)
    python bench/mismatch.py                            # both
    python bench/mismatch.py --part gap --device cuda --model Qwen/Qwen2.5-0.5B-Instruct   # (a) on a GPU (not run)

A run whose out dir holds summary.json is read, not rerun (--rerun to redo it). Writes docs/mismatch_gap.md,
docs/mismatch_train.md, docs/mismatch_train.png and bench/results/mismatch.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl_kernels as K  # noqa: E402
import rlvr_rewards as env  # noqa: E402
from ppo_vs_grpo import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {  # name -> (noise on, grpo.py flags)
    "no mismatch": (False, ["--rollout-correction", "none"]),
    "uncorrected": (True, ["--rollout-correction", "none"]),
    "token TIS": (True, ["--rollout-correction", "verl-token-tis"]),
    "sequence mask": (True, ["--rollout-correction", "trl"]),
    "geometric rejection": (True, ["--rollout-correction", "verl-geo-rs"]),
}


@dataclass
class Args:
    part: Literal["gap", "train", "all"] = "all"
    model: str = "toy"
    """the model of the gap part (a hub id or a directory; the training part is the toy world's)"""
    device: str = "cpu"
    """the gap part's device (cuda: the batch-invariant row, CPU-only, is left out)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every training arm"""
    noise: float = 2.0
    """std of the injected logit noise (the training arms)"""
    arms: tuple[str, ...] = tuple(ARMS)
    steps: int = 80
    out_dir: str = "runs/bench_mismatch"
    rerun: bool = False
    parallel: int = 2
    """training runs at a time (one torch thread each)"""


# ---------------------------------------------------------------------------------------------------- (a) the gap


def _rollout(model, tokenizer, top_p: float = 1.0):
    rows = env.make_dataset("arithmetic", "train", 16, seed=0)
    return env.sample(model, tokenizer, rows, num_samples=8, max_new_tokens=48, top_p=top_p,
                      noise_keys=K.rollout_noise_keys(0, 0, 0, list(range(16)), 8))


def _bf16_logits(head_logits):
    """head_logits whose fp32 logits are rounded to bf16: the output layer of an engine that keeps bf16 logits."""
    def rounded(*args, **kwargs):
        return head_logits(*args, **kwargs).to(torch.bfloat16).float()
    return rounded


CONFIGS = {  # name -> (compute dtype, top_p, keep sampling mask, batch-invariant kernels, bf16-rounded logits)
    "fp32": ("float32", 1.0, True, False, False),
    "fp32, batch-invariant kernels": ("float32", 1.0, True, True, False),
    "bf16 compute, fp32 output layer": ("bfloat16", 1.0, True, False, False),
    "bf16 compute, bf16 logits": ("bfloat16", 1.0, True, False, True),
    "fp16 compute, fp32 output layer": ("float16", 1.0, True, False, False),
    "fp32, top-p 0.8, keep sampling mask": ("float32", 0.8, True, False, False),
    "fp32, top-p 0.8, full vocabulary": ("float32", 0.8, False, False, False),
}


def gap(config: str, model_name: str = "toy", device: str = "cpu") -> list[dict]:
    """One row per pi_old micro-batch size: the mismatch/ metrics of the sampler against the trainer."""
    dtype, top_p, keep, invariant, bf16_logits = CONFIGS[config]
    torch.manual_seed(0)
    original = K.head_logits
    if bf16_logits:
        K.head_logits = _bf16_logits(original)
    try:
        model, tokenizer = K.load_model(model_name, dtype=dtype, device=torch.device(device))
        if invariant:
            K.set_batch_invariant(model, True)
        rollout = _rollout(model, tokenizer, top_p)
        batch = rollout.batch(keep)
        rows = []
        for name, max_tokens in [("one pass", 0), ("~8 rows", 8 * batch["tokens"].shape[1] + 8 * 16),
                                 ("~1 row", 40)]:
            old = K.rollout_logprobs(model, batch, max_tokens=max_tokens)
            metrics = K.mismatch_metrics(rollout.gen.logprobs, old, rollout.gen.mask, rollout.gen.kept_logmass)
            rows.append({"config": config, "micro_batches": name, **{k.split("/")[1]: v for k, v in metrics.items()}})
        return rows
    finally:
        K.head_logits = original


def gap_table(rows: list[dict]) -> str:
    lines = ["| configuration | pi_old micro-batches | mean \\|log mu - log pi_old\\| | max | ratio outside [0.9, 1.1] | "
             "KL k3 | token_mult_prob_error | kept mass |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['micro_batches']} | {r['logprob_diff_mean']:.2e} | {r['logprob_diff_max']:.2e} | "
                     f"{r['ratio_out_share']:.2%} | {r['kl_k3']:.2e} | {r['token_mult_prob_error']:.6f} | "
                     f"{r['kept_mass']:.4f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- (b) training


def arm_dir(args: Args, arm: str, seed: int) -> str:
    return os.path.join(args.out_dir, f"{arm.replace(' ', '_')}_noise{args.noise:g}_seed{seed}")


def train(args: Args) -> dict:
    jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]

    def one(job):
        arm, seed = job
        noisy, flags = ARMS[arm]
        command = ["grpo.py", "--seed", str(seed), "--max-steps", str(args.steps), "--eval-samples", "0",
                   "--log-samples", "0", "--no-plot", *flags,
                   *(["--sampler-logit-noise", f"{args.noise:g}"] if noisy else [])]
        run(command, arm_dir(args, arm, seed), args.rerun)
        return job

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, jobs))
    results = {}
    for arm in args.arms:
        for seed in args.seeds:
            history = [json.loads(line) for line in open(os.path.join(arm_dir(args, arm, seed), "metrics.jsonl"))]
            results.setdefault(arm, []).append(history)
    return results


def _series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in history if key in row]


def _mean_range(values: list[float], fmt: str = "{:.1%}") -> str:
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def train_table(args: Args, results: dict) -> str:
    lines = ["| arm | held-out greedy at step 10 | at step 40 | at the end | best | KL(mu \\|\\| pi_old) k3 | ratio "
             "outside [0.9, 1.1] | rejected | mean IS weight |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, runs_ in results.items():
        evals = [dict(_series(h, "eval/accuracy")) for h in runs_]

        def step_mean(key):
            values = [statistics.mean(v for _, v in _series(h, key)) for h in runs_ if _series(h, key)]
            return _mean_range(values, "{:.3f}") if values else "–"
        lines.append(f"| {arm} | {_mean_range([e[10] for e in evals])} | {_mean_range([e[40] for e in evals])} | "
                     f"{_mean_range([e[max(e)] for e in evals])} | {_mean_range([max(e.values()) for e in evals])} | "
                     f"{step_mean('mismatch/kl_k3')} | {step_mean('mismatch/ratio_out_share')} | "
                     f"{step_mean('mismatch/rejected_share')} | {step_mean('mismatch/is_weight_mean')} |")
    return "\n".join(lines)


def plot(args: Args, results: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval/accuracy", "held-out greedy accuracy"), ("rollout/accuracy", "rollout accuracy (the sampler's)"),
              ("mismatch/kl_k3", "KL(mu || pi_old), k3"), ("mismatch/ratio_out_share", "tokens with rho outside [0.9, 1.1]")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for (key, title), ax in zip(panels, axes):
        for arm, runs_ in results.items():
            series = [dict(_series(h, key)) for h in runs_]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            values = [[s[t] for s in series] for t in steps]
            mean = [statistics.mean(v) for v in values]
            line, = ax.plot(steps, mean, label=arm)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                            color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"GRPO in the toy world with the sampler's logits perturbed by N(0, {args.noise:g}^2): mean and "
                 f"min-max of seeds {', '.join(map(str, args.seeds))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: Args):
    os.chdir(ROOT)
    torch.set_num_threads(1)
    record = {}
    if args.part in ("gap", "all"):
        configs = [c for c in CONFIGS if args.device == "cpu" or not CONFIGS[c][3]]
        rows = [row for config in configs for row in gap(config, args.model, args.device)]
        record["gap"] = rows
        table = gap_table(rows)
        print(table)
        Path("docs/mismatch_gap.md").write_text(
            "# The sampler-trainer gap per numerics configuration (toy world, CPU)\n\n`python bench/mismatch.py "
            "--part gap` (16 prompts x 8 samples, 48 new tokens, one thread; mu: the sampler's log-probs; pi_old: "
            "rl_kernels.rollout_logprobs in one pass and in micro-batches of about 8 and 1 rows).\n\n" + table + "\n")
    if args.part in ("train", "all"):
        results = train(args)
        table = train_table(args, results)
        print(table)
        plot(args, results, "docs/mismatch_train.png")
        record["train"] = {arm: [[{k: v for k, v in row.items() if k.startswith(("eval/acc", "mismatch/", "step",
                                                                                   "rollout/accuracy"))}
                                  for row in history] for history in runs_] for arm, runs_ in results.items()}
        record["train_args"] = {"noise": args.noise, "seeds": list(args.seeds), "steps": args.steps}
        Path("docs/mismatch_train.md").write_text(
            f"# GRPO with an injected sampler mismatch (noise std {args.noise:g} on the logits / T)\n\n`python "
            f"bench/mismatch.py --part train --noise {args.noise:g}` (seeds {', '.join(map(str, args.seeds))}; "
            "mean and min-max)\n\n" + table + "\n\n![curves](mismatch_train.png)\n")
    os.makedirs("bench/results", exist_ok=True)
    old = json.load(open("bench/results/mismatch.json")) if os.path.exists("bench/results/mismatch.json") else {}
    json.dump({**old, **record}, open("bench/results/mismatch.json", "w"))


if __name__ == "__main__":
    main(tyro.cli(Args))
