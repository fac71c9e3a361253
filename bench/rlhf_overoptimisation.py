"""bench/rlhf_overoptimisation.py: classic RLHF in the toy world, and reward over-optimisation made visible.

PPO (the `rlhf` preset: InstructGPT / N+ details) on the toy reward model's score alone, no verifiable reward, under
three kinds of KL control; the verifier still judges every response, so the true accuracy can be watched while the
policy optimises a proxy (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"). The toy reward model
learned consistency, not arithmetic: a neat trace whose answer agrees with its own (wrong) steps scores high.

    beta0      python ppo.py --preset rlhf --kl-coef 0 --track-kl        no KL penalty (the reference only measures)
    fixed      python ppo.py --preset rlhf                               beta = 0.05 per token (N+ details)
    adaptive   python ppo.py --preset rlhf --kl-target T --kl-horizon H  Ziegler's controller from beta 0.05

Every run: seed 0, 16 prompts x 8 samples per step, 80 steps, held-out greedy accuracy every 5 steps (--eval-samples
0), the reward model normalised by its held-out mean and std. Needs the toy reward model: `python rlhf_reward_model.py`
(writes runs/rlhf_reward_model/final). A finished run is read, not rerun (--rerun to redo it).

    python bench/rlhf_overoptimisation.py                     # ~30 min on an idle 2-core CPU
    python bench/rlhf_overoptimisation.py --steps 40          # docs/ppo.md's runs: half as long
Writes docs/rlhf_overoptimisation.md (the table) and docs/rlhf_overoptimisation.png: the reward model's score, the
true held-out accuracy and the KL to the reference against steps, and the true accuracy against sqrt(KL).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_grpo import curve, run  # noqa: E402


@dataclass
class Args:
    kl_target: float = 4.0
    """the adaptive run's target KL, nats per sequence"""
    kl_horizon: int = 2000
    """the adaptive run's horizon, in responses (Ziegler: 10,000 over far longer runs)"""
    steps: int = 80
    """steps per run"""
    reward_model: str = "runs/rlhf_reward_model/final"
    """the trained toy reward model"""
    root: str = "runs/rlhf_overoptimisation"
    """where the runs write"""
    rerun: bool = False
    """rerun runs that already finished"""
    out: str = "docs/rlhf_overoptimisation.md"
    plot: str = "docs/rlhf_overoptimisation.png"


def main(args: Args):
    if not os.path.isdir(args.reward_model):
        raise SystemExit(f"No reward model at {args.reward_model}: train it first with `python rlhf_reward_model.py`.")
    common = ["ppo.py", "--preset", "rlhf", "--reward-model", args.reward_model, "--max-steps", str(args.steps),
              "--eval-every", "5", "--eval-samples", "0"]
    variants = {"beta0": ["--kl-coef", "0", "--track-kl"], "fixed": [],
            "adaptive": ["--kl-target", str(args.kl_target), "--kl-horizon", str(args.kl_horizon)]}
    rows = [f"| run | beta (start -> end) | RM score (step 1 -> {args.steps}) | held-out accuracy: before | peak (step, KL/seq) | "
            "after | KL per sequence after | rollout EOS rate after |", "|---|---|---|---|---|---|---|---|"]
    histories = {}
    for name, extra in variants.items():
        out_dir = os.path.join(args.root, name)
        run([*common, *extra], out_dir, args.rerun)
        history = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
        histories[name] = history
        train = [h for h in history if "train/kl_coef" in h]
        evals = [(h["step"], h["eval/accuracy"], next((t.get("train/kl_seq", 0.0) for t in train if t["step"] == h["step"]),
                                                      0.0)) for h in history if "eval/accuracy" in h]
        peak = max(evals, key=lambda e: e[1])
        rows.append(f"| {name} | {train[0]['train/kl_coef']:.3f} -> {train[-1]['train/kl_coef']:.3f} | "
                    f"{train[0]['rewards/reward_model']:+.2f} -> {train[-1]['rewards/reward_model']:+.2f} | "
                    f"{evals[0][1]:.1%} | {peak[1]:.1%} (step {peak[0]}, {peak[2]:.1f} nats) | **{evals[-1][1]:.1%}** | "
                    f"{train[-1]['train/kl_seq']:.1f} | {train[-1]['rollout/eos_rate']:.0%} |")
        print(rows[-1], flush=True)
    text = (f"`python bench/rlhf_overoptimisation.py {' '.join(sys.argv[1:])}`; commands: "
            + "; ".join(f"{k}: `python {' '.join(common + v)}`" for k, v in variants.items()) + "\n\n" + "\n".join(rows) + "\n")
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name, history in histories.items():
        for ax, key in zip(axes[:3], ("rewards/reward_model", "eval/accuracy", "train/kl_seq")):
            points = curve(history, key)
            ax.plot([p[0] for p in points], [p[2] for p in points], "o-" if key == "eval/accuracy" else "-",
                    markersize=3, label=name)
        kl = {h["step"]: h.get("train/kl_seq", 0.0) for h in history}
        acc = curve(history, "eval/accuracy")
        axes[3].plot([max(kl.get(s, 0.0), 0.0) ** 0.5 for s, _, _ in acc], [a for _, _, a in acc], "o-", markersize=3,
                     label=name)
    titles = ("reward model score (normalised), rollouts", "true accuracy (verifier), held-out greedy",
              "KL(pi || pi_ref) per sequence, nats", "true accuracy against sqrt(KL) (Gao et al.'s axis)")
    for ax, title, xlabel in zip(axes, titles, ("step", "step", "step", "sqrt(KL per sequence / nats)")):
        ax.set_title(title, fontsize=9), ax.set_xlabel(xlabel), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.suptitle("ppo.py --preset rlhf on the toy reward model alone: beta = 0, fixed beta 0.05, adaptive", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main(tyro.cli(Args))
