"""bench/cold_start.py: does the cold start earn its place? Reasoning RL (r1_pipeline's stage 2) from the cold-start
model against the same stage from the base (--no-cold-start), read from the runs' metrics.jsonl: the steps until
the training rollouts reach 80% accuracy and 95% readable (R1's format with a summary; a 5-step running mean), and
the share of groups whose 8 samples all score the same (zero advantage: the step learns nothing from them).

    for s in 0 1 2; do
      python r1_pipeline.py --out-dir runs/r1/seed$s --seeds $s
      python r1_pipeline.py --out-dir runs/r1_no_cs/seed$s --seeds $s --inputs-from runs/r1/seed$s \\
          --stages reasoning_rl --no-cold-start
    done
    python bench/cold_start.py --seeds 0 1 2        # the table (docs/r1_pipeline.md)

The same on the world where the cold start has a job (toy/messy: reasoning rare and messy in the base), with
`--base toy/messy --stages r1_zero cold_start reasoning_rl` in the first command, out dirs runs/messy and
runs/messy_no_cs, and `--with-cold-start runs/messy --from-base runs/messy_no_cs --plot docs/cold_start.png` here.
Besides the rollout curves, the held-out table: what stage 2 leaves at T = 0.6 and T = 1 (the final models are
sampled again here, 4 per problem at T = 1), and why the unreadable samples are unreadable.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    seeds: tuple[int, ...] = (0, 1, 2)
    with_cold_start: str = "runs/r1"
    """the pipelines' out dirs, one per seed: DIR/seed<k>"""
    from_base: str = "runs/r1_no_cs"
    """the --no-cold-start reasoning RL runs: DIR/seed<k>"""
    from_base_longer: str = ""
    """optional: --no-cold-start runs with more reasoning-RL steps (--reasoning-rl.steps), a third arm"""
    plot: str = ""
    """also draw the per-step curves here (a .png)"""


def arms(args: Args) -> list[tuple[str, str]]:
    """(label, root) of each arm in the tables and the plot."""
    return [("from the cold start", args.with_cold_start), ("from the base (--no-cold-start)", args.from_base)] + (
        [("from the base, longer", args.from_base_longer)] if args.from_base_longer else [])


def history(root: str, seed: int) -> list[dict]:
    path = os.path.join(root, f"seed{seed}", "2_reasoning_rl", "grpo", "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"bench/cold_start.py: {path} is missing; run the commands in this file's docstring first.")
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if "rollout/accuracy" in r]


def held_out(root: str, seed: int) -> tuple[dict, list[str], list[str], list[str]]:
    """Stage 2's held-out metrics, its 8 samples per problem at T = 0.6 (from the run), 4 more at T = 1 (drawn here
    from its final model, seeded), and the gold answers of the latter."""
    import torch

    import r1_pipeline as r1
    import rl_kernels as K
    import rlvr_rewards as env

    stage = os.path.join(root, f"seed{seed}", "2_reasoning_rl")
    marker = os.path.join(stage, "STAGE_DONE.json")
    if not os.path.exists(marker):
        raise SystemExit(f"bench/cold_start.py: {marker} is missing (stage 2 did not finish); rerun its command, "
                         "which resumes.")
    done = json.load(open(marker))["metrics"]
    args = r1.Args()  # the pipeline's held-out set and token cap (the runs used the defaults)
    rows, _ = r1.held_out(args)
    model, tokenizer = K.load_model(os.path.join(stage, "grpo", "final"))
    K.set_cpu_threads(0, model)
    hot = env.sample(model, tokenizer, rows, num_samples=4, max_new_tokens=args.max_new_tokens, temperature=1.0,
                     generator=torch.Generator().manual_seed(seed)).completions
    return done, done["reasoning_samples"], hot, [r["answer"] for r in rows for _ in range(4)]


def held_out_table(args: Args) -> str:
    """What stage 2 leaves, held out: pass@1 at T = 0.6; the readable share of the greedy answers, of the T = 0.6
    samples and of the T = 1 samples; among the T = 1 reasoning samples (where what is left shows), those with no
    summary, junk, a repeated step, a broken layout (a tag twice); and the accuracy of the messy (junk or repeat)
    T = 1 reasoning samples against the clean ones: whether the mess costs the accuracy reward anything."""
    import rlvr_rewards as env

    kinds = ("no summary", "junk", "repeat", "layout")
    lines = ["| held out after stage 2 | pass@1 T=0.6 | readable: greedy | T=0.6 | T=1 | T=1 reasoning samples: "
             + " | ".join(kinds) + " | T=1 accuracy, messy / clean reasoning samples (messy ones) |",
             "|---" * 10 + "|"]
    share = lambda flags: sum(flags) / max(1, len(flags))  # noqa: E731
    for label, root in arms(args):
        columns: list[list] = [[] for _ in range(8)]
        accuracy = []
        for seed in args.seeds:
            done, warm, hot, answers = held_out(root, seed)
            reasoning = [(t, c) for t, c in zip(hot, env.accuracy_reward(hot, answer=answers)) if env.reasons(t)]
            problems = [set(env.readability_problems(t)) for t, _ in reasoning]
            values = [done["eval/pass@1_k8_t0.6"], done["eval/readability"], share([env.is_readable(t) for t in warm]),
                      share([env.is_readable(t) for t in hot])] + [share([k in p for p in problems]) for k in kinds]
            for column, value in zip(columns, values):
                column.append(value)
            messy = [bool(p & {"junk", "repeat"}) for p in problems]
            right = lambda keep: share([c for (_, c), m in zip(reasoning, messy) if m == keep])  # noqa: E731
            accuracy.append(f"{right(True):.2f} / {right(False):.2f} ({sum(messy)})")
        lines.append(f"| {label} | " + " | ".join(cell(c) for c in columns) + " | " + ", ".join(accuracy) + " |")
    return "\n".join(lines)


def steps_to(rows: list[dict], key: str, threshold: float, window: int = 5) -> int | None:
    """The first step whose running mean of `key` over the last `window` steps is >= threshold (None: never)."""
    values = [r[key] for r in rows]
    for i in range(len(values)):
        recent = values[max(0, i - window + 1):i + 1]
        if sum(recent) / len(recent) >= threshold:
            return rows[i]["step"]
    return None


def cell(values: list) -> str:
    shown = ", ".join("never" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in values)
    numbers = [v for v in values if v is not None]
    if len(numbers) == len(values) and len(numbers) > 1:
        return f"{statistics.mean(numbers):.2f} ± {statistics.stdev(numbers):.2f} ({shown})"
    return shown


CURVES = [("rollout/accuracy", "rollout accuracy"), ("rollout/readable_share", "readable rollouts"),
          ("rollout/zero_variance_group_share", "zero-advantage groups")]


def plot(args: Args, title: str) -> None:
    """Per step of stage 2, both arms: each curve a 5-step running mean, the mean over seeds, the band min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, label) in zip(axes, CURVES):
        for arm, root in arms(args):
            runs = [history(root, s) for s in args.seeds]
            steps = [r["step"] for r in runs[0]]
            smooth = [[statistics.mean(v[max(0, i - 4):i + 1]) for i in range(len(v))]
                      for v in ([r[key] for r in rows] for rows in runs)]
            ax.plot(steps, [statistics.mean(col) for col in zip(*smooth)], label=arm,  # dashed: seen over a longer arm
                    linestyle="--" if "no-cold-start" in arm else "-", zorder=3 if "no-cold-start" in arm else 2)
            ax.fill_between(steps, [min(c) for c in zip(*smooth)], [max(c) for c in zip(*smooth)], alpha=0.15)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("GRPO step of stage 2")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (seeds {list(args.seeds)}; 5-step running mean, band: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"Wrote {args.plot}")


def main(args: Args):
    lines = ["| reasoning RL (stage 2) | steps to 80% accurate | steps to 95% readable | zero-advantage groups, "
             "first 10 steps | rollout accuracy, last 10 | readable, last 10 |", "|---|---|---|---|---|---|"]
    for label, root in arms(args):
        runs = [history(root, s) for s in args.seeds]
        zero = [statistics.mean(r["rollout/zero_variance_group_share"] for r in rows[:10]) for rows in runs]
        acc = [statistics.mean(r["rollout/accuracy"] for r in rows[-10:]) for rows in runs]
        readable = [statistics.mean(r["rollout/readable_share"] for r in rows[-10:]) for rows in runs]
        lines.append(f"| {label} | {cell([steps_to(r, 'rollout/accuracy', 0.8) for r in runs])} | "
                     f"{cell([steps_to(r, 'rollout/readable_share', 0.95) for r in runs])} | {cell(zero)} | "
                     f"{cell(acc)} | {cell(readable)} |")
    print(f"Seeds {list(args.seeds)}; mean ± std (per seed in parentheses).\n")
    print("\n".join(lines))
    print("\nHeld out (200 problems; stage 2's 8 samples each at T = 0.6, 4 more at T = 1 drawn here):\n")
    print(held_out_table(args))
    if args.plot:
        plot(args, "Reasoning RL (R1 stage 2): " + ", ".join(root for _, root in arms(args)))


if __name__ == "__main__":
    main(tyro.cli(Args))
