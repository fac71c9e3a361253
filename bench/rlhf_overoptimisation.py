"""bench/rlhf_overoptimisation.py: classic RLHF in the toy world, and reward over-optimisation made visible.

PPO (the `rlhf` preset: InstructGPT / N+ details) on the toy reward model's score alone, no verifiable reward, under
three kinds of KL control; the verifier still judges every response, so the true ("gold") score can be watched while
the policy optimises a proxy (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"). The toy reward model
learned consistency, not arithmetic: a neat trace whose answer agrees with its own (wrong) steps scores high.

    beta0      python ppo.py --preset rlhf --kl-coef 0 --track-kl        no KL penalty (the reference only measures)
    fixed      python ppo.py --preset rlhf                               beta = 0.05 per token (N+ details)
    adaptive   python ppo.py --preset rlhf --kl-target T --kl-horizon H  Ziegler's controller from beta 0.05

Every run: 16 prompts x 8 samples per step, held-out greedy accuracy every 5 steps (--eval-samples 0), the reward model
normalised by its held-out mean and std, each variant over --seeds. Needs the toy reward model: `python
rlhf_reward_model.py` (writes runs/rlhf_reward_model/final). A finished run is read, not rerun (--rerun to redo it).

Gao et al.'s axes: every step's rollout (128 samples from pi_old at T = 1) gives, on the same samples, the gold score
(rollout/accuracy, the verifier's), the proxy score (rewards/reward_model) and the KL(pi_old || pi_ref) per sequence
(train/kl_seq); the figure draws gold and proxy against sqrt(KL) on one plot. The held-out greedy accuracy logged at
step s is that of the policy after s updates, whose KL is measured by the rollout of step s + 1 (the row logged at
s holds the KL of the policy one update earlier): eval_kl_pairs pairs them so.

    python bench/rlhf_overoptimisation.py --steps 40 --seeds 0 1 2        # docs/ppo.md's runs
Writes docs/rlhf_overoptimisation.md (the table) and docs/rlhf_overoptimisation.png.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_grpo import mean_sd, run  # noqa: E402


@dataclass
class Args:
    kl_target: float = 4.0
    """the adaptive run's target KL, nats per sequence"""
    kl_horizon: int = 2000
    """the adaptive run's horizon, in responses (Ziegler: 10,000 over far longer runs)"""
    steps: int = 80
    """steps per run"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds (each variant once per seed)"""
    reward_model: str = "runs/rlhf_reward_model/final"
    """the trained toy reward model"""
    root: str = "runs/rlhf_overoptimisation"
    """where the runs write"""
    rerun: bool = False
    """rerun runs that already finished"""
    out: str = "docs/rlhf_overoptimisation.md"
    plot: str = "docs/rlhf_overoptimisation.png"


def eval_kl_pairs(history: list[dict]) -> list[tuple[int, float, float]]:
    """(step, held-out greedy accuracy, KL per sequence of that same policy) for every evaluation: the policy evaluated
    at step s sampled the rollout logged at step s + 1, whose train/kl_seq is its KL to pi_ref; step 0's policy is
    the reference (KL 0). The last evaluation has no later rollout: its KL is NaN."""
    kl = {h["step"]: h["train/kl_seq"] for h in history if "train/kl_seq" in h}
    return [(h["step"], h["eval/accuracy"], 0.0 if h["step"] == 0 else kl.get(h["step"] + 1, math.nan))
            for h in history if "eval/accuracy" in h]


def gao_points(history: list[dict]) -> list[tuple[float, float, float]]:
    """(sqrt(KL per sequence), gold score, proxy score) of every step's rollout: all three read off the same samples."""
    return [(math.sqrt(max(h["train/kl_seq"], 0.0)), h["rollout/accuracy"], h["rewards/reward_model"])
            for h in history if "train/kl_seq" in h and "rewards/reward_model" in h]


def main(args: Args):
    if not os.path.isdir(args.reward_model):
        raise SystemExit(f"No reward model at {args.reward_model}: train it first with `python rlhf_reward_model.py`.")
    common = ["ppo.py", "--preset", "rlhf", "--reward-model", args.reward_model, "--max-steps", str(args.steps),
              "--eval-every", "5", "--eval-samples", "0"]
    variants = {"beta0": ["--kl-coef", "0", "--track-kl"], "fixed": [],
                "adaptive": ["--kl-target", str(args.kl_target), "--kl-horizon", str(args.kl_horizon)]}
    rows = [f"| run | seeds | beta at the end | RM score, step 1 -> {args.steps} | held-out accuracy: peak | its KL/seq "
            f"| after {args.steps} steps | KL/seq of the last rollout | clip frac (mean) |",
            "|---|---|---|---|---|---|---|---|---|"]
    histories = {}
    for name, extra in variants.items():
        for seed in args.seeds:
            out_dir = os.path.join(args.root, f"{name}-s{seed}")
            run([*common, *extra, "--seed", str(seed)], out_dir, args.rerun)
            histories[(name, seed)] = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
        per_seed = []
        for seed in args.seeds:
            history = histories[(name, seed)]
            train = [h for h in history if "train/kl_coef" in h]
            pairs = eval_kl_pairs(history)
            peak = max(pairs, key=lambda p: p[1])
            per_seed.append(dict(beta=train[-1]["train/kl_coef"], rm0=train[0]["rewards/reward_model"],
                                 rm1=train[-1]["rewards/reward_model"], peak=peak[1], peak_kl=peak[2],
                                 after=pairs[-1][1], kl=train[-1]["train/kl_seq"],
                                 clip=statistics.mean(h["train/clip_frac"] for h in train)))
        col = lambda key, **kw: mean_sd([s[key] for s in per_seed], **kw)  # noqa: E731
        rows.append(f"| {name} | {len(per_seed)} | {col('beta', fmt='.3f')} | {col('rm0', fmt='+.2f')} -> "
                    f"{col('rm1', fmt='+.2f')} | {col('peak', scale=100)}% | {col('peak_kl')} | "
                    f"**{col('after', scale=100)}%** | {col('kl')} | {col('clip', fmt='.4f')} |")
        print(rows[-1], flush=True)
    text = (f"`python bench/rlhf_overoptimisation.py {' '.join(sys.argv[1:])}`; mean ± standard deviation over the "
            "seeds; commands: "
            + "; ".join(f"{k}: `python {' '.join(common + v)} --seed S`" for k, v in variants.items())
            + "\n\n" + "\n".join(rows) + "\n")
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"beta0": "tab:red", "fixed": "tab:blue", "adaptive": "tab:green"}
    for name in variants:
        points = [gao_points(histories[(name, seed)]) for seed in args.seeds]
        n = min(map(len, points))
        mean = [[statistics.mean(p[i][k] for p in points) for k in range(3)] for i in range(n)]  # over seeds, per step
        axes[0].plot([m[0] for m in mean], [m[1] for m in mean], "-", color=colors[name], label=f"{name}: gold")
        axes[0].plot([m[0] for m in mean], [m[2] for m in mean], "--", color=colors[name], label=f"{name}: proxy")
        for seed in args.seeds:
            pairs = eval_kl_pairs(histories[(name, seed)])
            axes[1].plot([p[0] for p in pairs], [p[1] for p in pairs], "o-", color=colors[name], alpha=0.4,
                         markersize=2, label=name if seed == args.seeds[0] else None)
    axes[0].set_title("Gao et al.'s axes: gold (verifier accuracy) and proxy (RM score) of each step's samples,\n"
                      f"mean over seeds {', '.join(map(str, args.seeds))}", fontsize=9)
    axes[0].set_xlabel("sqrt(KL(pi || pi_ref) per sequence / nats)"), axes[0].set_ylabel("gold: accuracy; proxy: "
                                                                                       "normalised RM score")
    axes[1].set_title("held-out greedy accuracy (true), each seed", fontsize=9)
    axes[1].set_xlabel("step"), axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.suptitle("ppo.py --preset rlhf on the toy reward model alone: beta = 0, fixed beta 0.05, adaptive", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main(tyro.cli(Args))
