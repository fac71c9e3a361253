"""bench/objectives.py: the leaderboard of grpo.py's objectives in the toy world, 3 seeds each, as a table and a plot.

Every preset (the older six and the nine of 2025-2026) runs `python grpo.py --preset P --seed S` with the same
budget: the toy world's default task (arithmetic, accuracy + 0.1 format), 16 prompts x 8 samples per step, 80
steps, held-out greedy accuracy on 200 problems every 10 steps (no sampled pass@1: it would double the evaluation
time), one torch thread per run, two runs at a time. One change from grpo.py's defaults, for every preset alike:
--num-minibatches 4, four optimizer steps per rollout. With one step per rollout every ratio is 1 and the
surrogates (CISPO, SAPO, GMPO, GPG, KL-Cov) all give GRPO's gradient (tests/test_objectives.py), so the board would
compare nothing but the advantages; with four, the later steps are off-policy and each surrogate acts as it does in
its paper's setting.

Per run, the accuracy curve is fitted with ScaleRL's saturating curve (Khatri et al. 2025),
    R(C) = R_0 + (A - R_0) / (1 + (C_mid / C)^B),
A the asymptote, C_mid the step at half the gain, B the sharpness: least squares over a grid of C_mid and B with
R_0 and A in closed form. The curve fitted is the per-step rollout accuracy (each step's 16 training prompts x 8
samples at T = 1, 80 points): the held-out greedy curve, evaluated every 10 steps, has done most of its rising by its
first evaluation after step 0, so it cannot place the midpoint (its fits all sat at the grid's floor). Per preset:
held-out greedy accuracy at step 0 and at the end (mean and min-max over the seeds), A and C_mid of the rollout
curve (mean and min-max); what the update did, as means over the steps and seeds: the share of tokens clipped (or
weight-capped, or picked by Clip-Cov/KL-Cov), the k3 approximate KL between pi_theta and pi_old, the policy's entropy
over the last 10 steps; the mean held-out response length at the end, seconds per step (median; two runs share the
two cores).

    python bench/objectives.py                               # 15 presets x 3 seeds (~45 min on an idle 2-core CPU)
    python bench/objectives.py --presets grpo cispo --seeds 1  # a subset

A run whose out dir already holds summary.json is read, not rerun (--rerun to redo it), so a cut-off board resumes.
Writes docs/objectives.md (the table) and docs/objectives.png.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
from ppo_vs_grpo import curve, run  # noqa: E402


@dataclass
class Args:
    presets: tuple[str, ...] = tuple(grpo.PRESETS)
    """which grpo.py presets"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds (each preset once per seed)"""
    steps: int = 80
    """steps per run (grpo.py's default)"""
    num_minibatches: int = 4
    """optimizer steps per rollout, for every preset (see the docstring)"""
    lr: float | None = None
    """learning rate for every preset (None: grpo.py's 2e-4)"""
    workers: int = 2
    """runs at a time, one torch thread each"""
    root: str = "runs/objectives"
    """where the runs write (one out dir per preset and seed)"""
    rerun: bool = False
    """rerun runs that already finished"""
    out: str = "docs/objectives.md"
    """the markdown table"""
    plot: str = "docs/objectives.png"
    """the plot"""


def saturating(step: float, r0: float, a: float, c_mid: float, b: float) -> float:
    return r0 + (a - r0) / (1.0 + (c_mid / step) ** b) if step > 0 else r0


def fit(points: list[tuple[int, float]]) -> tuple[float, float, float, float]:
    """(R_0, A, C_mid, B) of the saturating curve through (step, accuracy) points, by least squares: for each
    (C_mid, B) on a log grid, then on a finer one around the best, the curve is linear in R_0 and A (weights 1 - f and
    f, f = 1 / (1 + (C_mid / C)^B)), solved in closed form; the best quadruple wins."""
    def solve(c_mid: float, b: float) -> tuple[float, float, float]:
        f = [1.0 / (1.0 + (c_mid / s) ** b) if s > 0 else 0.0 for s, _ in points]
        y = [v for _, v in points]
        g = [1.0 - x for x in f]  # normal equations of y ~ r0 * g + a * f
        gg, gf, ff = sum(x * x for x in g), sum(x * z for x, z in zip(g, f)), sum(z * z for z in f)
        gy, fy = sum(x * v for x, v in zip(g, y)), sum(z * v for z, v in zip(f, y))
        det = gg * ff - gf * gf
        r0, a = ((ff * gy - gf * fy) / det, (gg * fy - gf * gy) / det) if abs(det) > 1e-12 else (y[0], y[0])
        if not 0.0 <= a <= 1.0:  # an accuracy: a curve that falls late must not buy a fit with A beyond [0, 1]
            a = min(max(a, 0.0), 1.0)
            r0 = sum(x * (v - a * z) for x, z, v in zip(g, f, y)) / max(gg, 1e-12)
        return sum((r0 * x + a * z - v) ** 2 for x, z, v in zip(g, f, y)), r0, a

    grid = [(2 ** (k / 4), 0.25 * j) for k in range(-8, 33) for j in range(2, 25)]  # C_mid 0.25-256 steps, B 0.5-6
    _, c_mid, b = min((solve(c, b)[0], c, b) for c, b in grid)
    fine = [(c_mid * 2 ** (k / 80), b + 0.0125 * j) for k in range(-10, 11) for j in range(-10, 11)
            if b + 0.0125 * j >= 0.5]  # below B = 0.5 a noisy curve buys its fit with an asymptote far away
    _, c_mid, b = min((solve(c, b)[0], c, b) for c, b in fine)
    _, r0, a = solve(c_mid, b)
    return r0, a, c_mid, b


def summarise(out_dir: str) -> dict:
    """A run's held-out greedy curve (every 10 steps: final and step 0) and the saturating fit of its per-step
    rollout accuracy (the step's training prompts, T = 1): 80 points, where the held-out curve's 9 cannot place a
    midpoint that falls before its first evaluation."""
    history = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    points = [(step, value) for step, _, value in curve(history)]
    r0, a, c_mid, b = fit([(r["step"], r["rollout/accuracy"]) for r in history if "rollout/accuracy" in r])
    last_eval = next(r for r in reversed(history) if "eval/accuracy" in r)

    def mean(key: str, rows=history) -> float:
        return statistics.mean(r[key] for r in rows if key in r)
    return dict(points=points, final=points[-1][1], best=max(v for _, v in points), r0=r0, a=a, c_mid=c_mid, b=b,
                clip_frac=mean("train/clip_frac"), approx_kl=mean("train/approx_kl"),
                entropy=mean("train/entropy", history[-10:]),
                length=last_eval.get("eval/response_length", float("nan")),
                step_s=statistics.median(r["perf/step_s"] for r in history if "perf/step_s" in r))


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.mean(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main(args: Args):
    jobs = [(preset, seed) for preset in args.presets for seed in args.seeds]

    def one(job):
        preset, seed = job
        out_dir = os.path.join(args.root, f"{preset}-s{seed}")
        run(["grpo.py", "--preset", preset, "--seed", str(seed), "--max-steps", str(args.steps),
             "--num-minibatches", str(args.num_minibatches), "--eval-samples", "0", "--no-plot",
             *(["--lr", str(args.lr)] if args.lr else [])], out_dir, args.rerun)
        return job, summarise(out_dir)

    with ThreadPoolExecutor(args.workers) as pool:
        results = dict(pool.map(one, jobs))
    rows = ["| preset | held-out greedy, step 0 (mean) | held-out greedy, final (mean, min-max over seeds) | "
            "best on the way | rollout accuracy fit: asymptote A | C_mid (steps) | clip fraction | approx-KL to "
            "pi_old | entropy, last 10 steps | response length | s/step |", "|" + "---|" * 11]
    ranked = sorted(args.presets, key=lambda p: -statistics.mean(results[(p, s)]["final"] for s in args.seeds))
    for preset in ranked:
        runs_ = [results[(preset, s)] for s in args.seeds]
        rows.append(f"| {preset} | {statistics.mean(r['points'][0][1] for r in runs_):.1%} | "
                    f"**{spread([r['final'] for r in runs_], '.1%')}** | {spread([r['best'] for r in runs_], '.1%')} "
                    f"| {spread([r['a'] for r in runs_], '.1%')} | {spread([r['c_mid'] for r in runs_], '.1f')} | "
                    f"{statistics.mean(r['clip_frac'] for r in runs_):.2%} | "
                    f"{statistics.mean(r['approx_kl'] for r in runs_):.4f} | "
                    f"{statistics.mean(r['entropy'] for r in runs_):.3f} | "
                    f"{statistics.mean(r['length'] for r in runs_):.1f} | "
                    f"{statistics.median(r['step_s'] for r in runs_):.2f} |")
    text = (f"`python bench/objectives.py {' '.join(sys.argv[1:])}`: seeds {', '.join(map(str, args.seeds))}; "
            f"{args.steps} steps, --num-minibatches {args.num_minibatches}"
            + (f", --lr {args.lr}" if args.lr else "") + f", {args.workers} runs at a time on "
            f"{os.cpu_count()} cores\n\n" + "\n".join(rows) + "\n")
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab20")
    for k, preset in enumerate(ranked):
        curves = [results[(preset, s)]["points"] for s in args.seeds]
        steps = [s for s, _ in curves[0]]
        values = [[v for _, v in c] for c in curves]
        mean = [statistics.mean(col) for col in zip(*values)]
        ax.plot(steps, mean, color=colours(k), label=preset, lw=1.6)
        ax.fill_between(steps, [min(col) for col in zip(*values)], [max(col) for col in zip(*values)],
                        color=colours(k), alpha=0.08)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out greedy accuracy (200 problems)")
    ax.set_title(f"grpo.py presets in the toy world: mean of {len(args.seeds)} seeds (band: min-max)")
    ax.legend(ncol=3, fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main(tyro.cli(Args))
