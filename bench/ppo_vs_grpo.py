"""bench/ppo_vs_grpo.py: PPO against GRPO in the same toy world, and the lambda question, as a table and a plot.

Runs, each a fresh process with one torch thread (OMP_NUM_THREADS=1), the scripts' defaults unless named:
    grpo            python grpo.py --seed S                 GRPO, group z-score advantages, no critic
    ppo             python ppo.py --seed S                  PPO, critic from the policy, gamma = lam = 1 (ORZ, VC-PPO)
    ppo_lam0.95     python ppo.py --seed S --lam 0.95       classic RLHF's lambda with the end-of-sequence reward
Both algorithms see the same task (arithmetic, rewards accuracy + 0.1 format), the same 16 prompts x 8 samples per
step for 80 steps, the same seed, hence the same prompts and the same sampling noise (keyed by seed, step, prompt and
sample), and the same held-out evaluation (200 test problems, greedy, and 4 samples at T = 1, every 10 steps).
Reported per run: held-out greedy accuracy before, after and at its best, pass@1, training seconds (the sum of the
steps' wall time, evaluations excluded), the whole process's wall time, seconds per step, the peak resident memory
of the process (os.wait4's ru_maxrss) and the models it holds. The plot draws held-out greedy accuracy against
steps and against training seconds.

    python bench/ppo_vs_grpo.py                            # seed 0: the three runs (~10 min on an idle 2-core CPU)
    python bench/ppo_vs_grpo.py --seeds 0 1 2              # the lambda question over three seeds
    python bench/ppo_vs_grpo.py --runs grpo ppo --seeds 1  # a subset

A run whose out dir already holds summary.json is read, not rerun (--rerun to redo it), so a cut-off sweep resumes; a
run cut off before its summary starts again (--overwrite).
Writes docs/ppo_vs_grpo.md (the table) and docs/ppo_vs_grpo.png.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"grpo": ["grpo.py"], "ppo": ["ppo.py"], "ppo_lam0.95": ["ppo.py", "--lam", "0.95"]}


@dataclass
class Args:
    runs: tuple[str, ...] = tuple(RUNS)
    """which runs: grpo | ppo | ppo_lam0.95"""
    seeds: tuple[int, ...] = (0,)
    """seeds (each run once per seed)"""
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


def table_row(name: str, seed: int, out_dir: str, process: dict) -> str:
    history = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    evals = curve(history)
    best = max(evals, key=lambda e: e[2])
    pass1 = [v for k, v in history[-1].items() if k.startswith("eval/pass@1")]
    step_s = statistics.median(r["perf/step_s"] for r in history if "perf/step_s" in r)
    return (f"| {name} | {seed} | {evals[0][2]:.1%} | **{evals[-1][2]:.1%}** | {best[2]:.1%} (step {best[0]}) | "
            f"{pass1[0]:.1%} | {evals[-1][1]:.0f} | {process['wall_s']:.0f} | {step_s:.2f} | "
            f"{process['peak_rss_mb']:.0f} | {models_held(out_dir)} |")


def main(args: Args):
    rows = ["| run | seed | held-out greedy before | after | best | pass@1 (k=4, T=1) after | training s | wall s | "
            "s/step (median) | peak RSS MB | models held |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    curves = {}
    for seed in args.seeds:
        for name in args.runs:
            out_dir = os.path.join(args.root, f"{name}-s{seed}")
            process = run([*RUNS[name], "--seed", str(seed)], out_dir, args.rerun)
            rows.append(table_row(name, seed, out_dir, process))
            curves[(name, seed)] = curve([json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))])
            print(rows[-1], flush=True)
    text = (f"`python bench/ppo_vs_grpo.py {' '.join(sys.argv[1:])}` (load average at the end of the last run: "
            f"{process['load_avg']:.1f} on {os.cpu_count()} cores)\n\n" + "\n".join(rows) + "\n")
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
