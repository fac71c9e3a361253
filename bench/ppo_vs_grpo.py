"""bench/ppo_vs_grpo.py: PPO against GRPO in the same toy world, and the lambda question, as a table and a plot.

Runs, each a fresh process with one torch thread (OMP_NUM_THREADS=1), the scripts' defaults unless named:
    grpo            python grpo.py --seed S --num-iterations 2 --num-minibatches 2 --lr LR
                    GRPO, group z-score advantages, no critic, at PPO's update: 2 epochs x 2 minibatches, PPO's lr
    ppo             python ppo.py --seed S                  PPO, critic from the policy, gamma = lam = 1 (ORZ, VC-PPO)
    ppo_lam0.95     python ppo.py --seed S --lam 0.95       classic RLHF's lambda with the end-of-sequence reward
Both algorithms see the same task (arithmetic, rewards accuracy + 0.1 format), the same 16 prompts x 8 samples per
step for 80 steps, the same update (epochs, minibatches, policy learning rate), the same seed, hence the same prompts
and the same sampling noise (keyed by seed, step, prompt and sample), and the same held-out evaluation (200 test
problems, greedy, and 4 samples at T = 1, every 10 steps). Seeds run outermost, so the runs of a seed follow one
another (grpo, ppo, ppo_lam0.95, grpo, ...): the seconds per step of each pair are measured side by side, under the
same load, and reported as per-seed ratios.
Reported per run: held-out greedy accuracy before, after and at its best, pass@1, training seconds (the sum of the
steps' wall time, evaluations excluded), the whole process's wall time, seconds per step, the peak resident memory
of the process (os.wait4's ru_maxrss) and the models it holds. The plot draws held-out greedy accuracy against
steps and against training seconds.

    python bench/ppo_vs_grpo.py --seeds 0 1 2              # docs/ppo.md: nine runs, 2-8 min each on a shared 2-core CPU
    python bench/ppo_vs_grpo.py --runs grpo ppo --seeds 1  # a subset

A run whose out dir already holds summary.json is read, not rerun (--rerun to redo it), so a cut-off sweep resumes; a
run cut off before its summary starts again (--overwrite).
Writes docs/ppo_vs_grpo.md (the table) and docs/ppo_vs_grpo.png.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
PPO_UPDATE = ["--num-iterations", "2", "--num-minibatches", "2"]  # grpo.py's names for ppo.py's default 2 epochs x 2
RUNS = {"grpo": ["grpo.py", *PPO_UPDATE], "ppo": ["ppo.py"], "ppo_lam0.95": ["ppo.py", "--lam", "0.95"]}


@dataclass
class Args:
    runs: tuple[str, ...] = tuple(RUNS)
    """which runs: grpo | ppo | ppo_lam0.95"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds (each run once per seed)"""
    lr: float = 1e-4
    """the policy's learning rate of every run (ppo.py's default)"""
    root: str = "runs/ppo_vs_grpo"
    """where the runs write (one out dir per run and seed)"""
    rerun: bool = False
    """rerun runs that already finished"""
    out: str = "docs/ppo_vs_grpo.md"
    """the markdown table"""
    plot: str = "docs/ppo_vs_grpo.png"
    """the plot"""


def run(command: list[str], out_dir: str, rerun: bool = False) -> dict:
    """Run `python COMMAND --out-dir OUT_DIR` in a fresh process (skipped if it finished before); returns its wall time
    and peak RSS (MB), also kept in OUT_DIR/process.json."""
    record = os.path.join(out_dir, "process.json")
    if not rerun and os.path.exists(os.path.join(out_dir, "summary.json")) and os.path.exists(record):
        return json.load(open(record))
    argv = [sys.executable, *command, "--out-dir", out_dir, "--overwrite"]  # a cut-off run starts again
    print("$ OMP_NUM_THREADS=1", " ".join(argv[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{' '.join(argv)} failed with status {status}")
    result = {"command": " ".join(["python", *command, "--out-dir", out_dir]), "wall_s": time.perf_counter() - t0,
              "peak_rss_mb": usage.ru_maxrss / 1024, "load_avg": os.getloadavg()[0]}
    json.dump(result, open(record, "w"), indent=2)
    return result


def models_held(out_dir: str) -> str:
    """The models the run held, with their parameter counts (read from the saved safetensors headers)."""
    def params(path: str) -> float:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return sum(eval("*".join(map(str, v["shape"])) or "1") for k, v in header.items() if k != "__metadata__") / 1e6

    args = json.load(open(os.path.join(out_dir, "args.json")))
    held = [f"policy {params(os.path.join(out_dir, 'final', 'model.safetensors')):.2f}M"]
    critic = os.path.join(out_dir, "final", "critic", "model.safetensors")
    if os.path.exists(critic):
        held.append(f"critic {params(critic):.2f}M")
    if args.get("kl_coef", 0) > 0 or args.get("kl_target") or args.get("track_kl"):
        held.append("reference (frozen)")
    if "reward_model" in args.get("rewards", []):
        held.append("reward model (frozen)")
    return " + ".join(held)


def curve(history: list[dict], key: str = "eval/accuracy") -> list[tuple[int, float, float]]:
    """(step, training seconds so far, value) wherever `key` was logged."""
    seconds, out = 0.0, []
    for row in history:
        seconds += row.get("perf/step_s", 0.0)
        if key in row:
            out.append((row["step"], seconds, row[key]))
    return out


def summary(out_dir: str, process: dict) -> dict:
    """One run's numbers: held-out greedy accuracy before, after, at 10 steps and at its best; pass@1 after; training
    seconds; median seconds per step; the mean policy clip fraction and approx-KL to pi_old over the steps."""
    history = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    evals = curve(history)
    best = max(evals, key=lambda e: e[2])
    train = [r for r in history if "train/clip_frac" in r]
    return {"before": evals[0][2], "after": evals[-1][2], "step10": next((e[2] for e in evals if e[0] == 10), math.nan),
            "best": best[2], "best_step": best[0],
            "pass1": next(v for k, v in history[-1].items() if k.startswith("eval/pass@1")),
            "train_s": evals[-1][1], "wall_s": process["wall_s"], "peak_rss_mb": process["peak_rss_mb"],
            "step_s": statistics.median(r["perf/step_s"] for r in history if "perf/step_s" in r),
            "clip_frac": statistics.mean(r["train/clip_frac"] for r in train),
            "approx_kl": statistics.mean(r["train/approx_kl"] for r in train)}


def mean_sd(values: list[float], fmt: str = ".1f", scale: float = 1.0) -> str:
    """'mean +- sd' (sample standard deviation over the seeds; the mean alone for one seed)."""
    values = [v * scale for v in values]
    if len(values) < 2:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def table_row(name: str, seed: int, s: dict, out_dir: str) -> str:
    return (f"| {name} | {seed} | {s['before']:.1%} | {s['step10']:.1%} | **{s['after']:.1%}** | {s['best']:.1%} "
            f"(step {s['best_step']}) | {s['pass1']:.1%} | {s['clip_frac']:.4f} | {s['approx_kl']:.4f} | "
            f"{s['train_s']:.0f} | {s['wall_s']:.0f} | {s['step_s']:.2f} | {s['peak_rss_mb']:.0f} | "
            f"{models_held(out_dir)} |")


def main(args: Args):
    rows = ["| run | seed | held-out greedy before | at step 10 | after | best | pass@1 (k=4, T=1) after | clip frac "
            "(mean) | approx-KL to pi_old (mean) | training s | wall s | s/step (median) | peak RSS MB | models held |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    curves, summaries, loads = {}, {}, []
    for seed in args.seeds:  # seeds outermost: the runs of one seed follow one another, under the same load
        for name in args.runs:
            out_dir = os.path.join(args.root, f"{name}-s{seed}")
            process = run([*RUNS[name], "--lr", str(args.lr), "--seed", str(seed)], out_dir, args.rerun)
            summaries[(name, seed)] = summary(out_dir, process)
            loads.append(process["load_avg"])
            rows.append(table_row(name, seed, summaries[(name, seed)], out_dir))
            curves[(name, seed)] = curve([json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))])
            print(rows[-1], flush=True)
    means = ["| run | seeds | held-out greedy at step 10 | after | best | pass@1 after | s/step, ratio to grpo's "
             "of the same seed |", "|---|---|---|---|---|---|---|"]
    for name in args.runs:
        s = [summaries[(name, seed)] for seed in args.seeds]
        ratios = [summaries[(name, seed)]["step_s"] / summaries[("grpo", seed)]["step_s"] for seed in args.seeds
                  if ("grpo", seed) in summaries]
        means.append(f"| {name} | {len(s)} | {mean_sd([x['step10'] for x in s], scale=100)} | "
                     f"**{mean_sd([x['after'] for x in s], scale=100)}** | {mean_sd([x['best'] for x in s], scale=100)}"
                     f" | {mean_sd([x['pass1'] for x in s], scale=100)} | "
                     + (f"{mean_sd(ratios, '.2f')}x |" if ratios else "— |"))
    text = (f"`python bench/ppo_vs_grpo.py {' '.join(sys.argv[1:])}` (load average at the end of each run: "
            f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores). Held-out greedy accuracy in percent, mean "
            f"± standard deviation over the seeds:\n\n" + "\n".join(means) + "\n\nPer run:\n\n" + "\n".join(rows)
            + "\n")
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"grpo": "tab:blue", "ppo": "tab:red", "ppo_lam0.95": "tab:orange"}
    for (name, seed), points in curves.items():  # each seed thin, the mean over seeds bold
        for ax, x in zip(axes, (0, 1)):
            ax.plot([p[x] for p in points], [p[2] for p in points], "-", color=colors.get(name), alpha=0.3, lw=1)
    for name in args.runs:
        runs = [curves[(name, seed)] for seed in args.seeds]
        mean = [[statistics.mean(r[i][k] for r in runs) for k in range(3)] for i in range(min(map(len, runs)))]
        for ax, x in zip(axes, (0, 1)):
            ax.plot([p[x] for p in mean], [p[2] for p in mean], "o-", color=colors.get(name), markersize=3,
                    label=f"{name} (mean of {len(runs)} seeds)")
    for ax, xlabel in zip(axes, ("step", "training seconds (evaluations excluded)")):
        ax.set_xlabel(xlabel), ax.set_ylabel("held-out greedy accuracy"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.suptitle(f"PPO vs GRPO in the toy world (seeds {', '.join(map(str, args.seeds))})", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main(tyro.cli(Args))
