"""bench/lora_rank.py: is rank-1 LoRA enough for RL? Full fine-tuning against LoRA ranks 1, 4 and 32 in the toy world,
each at its own best learning rate, as a table and a plot.

The claim under test ("LoRA Without Regret", Thinking Machines 2025): for policy-gradient RL even rank 1 matches full
fine-tuning, at a learning rate about 10x full fine-tuning's, because an episode carries a few bits. Every run is
`python grpo.py` (GRPO, the toy arithmetic task, rewards accuracy + 0.1 format, 16 prompts x 8 samples per step), a
fresh process with one torch thread (OMP_NUM_THREADS=1), with --max-steps and --eval-every as given here, and:
    full     --lora-rank 0 --lr LR         every weight trained (the script's default lr is 2e-4)
    rN       --lora-rank N --lr LR         a peft adapter on every linear layer of attention and MLP, alpha 32
Two phases:
  1. the sweep: seed 0 only, each config at each of its learning rates (--full-lrs, --lora-lrs): a coarse sweep, one
     seed, the best lr picked by the mean held-out greedy accuracy over the run's evaluations after step 0 (how fast
     and how far it learns). Not by the last evaluation alone: that one is flat within its noise (+-1.7 points at
     200 problems) over a 4x range of rates for every config, so it would pick by chance;
  2. the seeds: every config at its best lr for each of --seeds (seed 0's run is the sweep's).
Reported per config: held-out greedy accuracy (200 test problems) after training, mean and spread (min..max and the
sample std) over the seeds, trainable parameters, AdamW state bytes (read from final/trainer_state.pt), median
seconds per training step and decode tokens per second (their median over the run's steps, averaged over the seeds;
a shared machine's timings, to compare within one table). The plot draws each config's mean held-out accuracy curve
(seeds thin) against steps.

    python bench/lora_rank.py                         # 27 runs of 80 steps: ~80 min on a shared 2-core CPU
    python bench/lora_rank.py --max-steps 40          # half the length

A run whose out dir already holds summary.json is read, not rerun (--rerun to redo it), so a cut-off sweep resumes;
a run cut off before its summary starts again (--overwrite). Writes docs/lora_rank.md (the tables),
docs/lora_rank.png and bench/results/lora_rank.json (every run's numbers).
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

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    ranks: tuple[int, ...] = (0, 1, 4, 32)
    """configs: LoRA ranks, 0 being full fine-tuning"""
    full_lrs: tuple[float, ...] = (5e-5, 1e-4, 2e-4, 4e-4)
    """full fine-tuning's sweep (seed 0)"""
    lora_lrs: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)
    """every LoRA rank's sweep (seed 0)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of the final comparison, each config at its best lr"""
    max_steps: int = 80
    """training steps per run (grpo.py's default is 80)"""
    eval_every: int = 10
    """held-out evaluation every N steps"""
    root: str = "runs/lora_rank"
    """where the runs write (one out dir per config, lr and seed)"""
    rerun: bool = False
    """rerun runs that already finished"""
    out: str = "docs/lora_rank.md"
    """the markdown tables"""
    plot: str = "docs/lora_rank.png"
    """the plot"""
    results: str = "bench/results/lora_rank.json"
    """every run's numbers"""


def name_of(rank: int) -> str:
    return "full" if rank == 0 else f"r{rank}"


def run(args: Args, rank: int, lr: float, seed: int) -> dict:
    """One grpo.py run in a fresh process (read back if it finished before); returns its numbers."""
    out_dir = os.path.join(args.root, f"{name_of(rank)}-lr{lr:g}-s{seed}")
    command = ["grpo.py", "--lora-rank", str(rank), "--lr", f"{lr:g}", "--seed", str(seed), "--max-steps",
               str(args.max_steps), "--eval-every", str(args.eval_every), "--no-plot"]
    record = os.path.join(out_dir, "process.json")
    if args.rerun or not (os.path.exists(os.path.join(out_dir, "summary.json")) and os.path.exists(record)):
        argv = [sys.executable, *command, "--out-dir", out_dir, "--overwrite"]
        print("$ OMP_NUM_THREADS=1", " ".join(argv[1:]), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
        json.dump({"command": " ".join(["python", *command, "--out-dir", out_dir]),
                   "wall_s": time.perf_counter() - t0, "load_avg": os.getloadavg()[0]}, open(record, "w"), indent=2)
    process = json.load(open(record))
    history = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    evals = [(row["step"], row["eval/accuracy"]) for row in history if "eval/accuracy" in row]
    final = os.path.join(out_dir, "final")
    weights = os.path.join(final, "adapter", "adapter_model.safetensors") if rank else \
        os.path.join(final, "model.safetensors")
    optimizer = torch.load(os.path.join(final, "trainer_state.pt"), weights_only=True, map_location="cpu")["optimizer"]
    return {"config": name_of(rank), "rank": rank, "lr": lr, "seed": seed, "out_dir": out_dir,
            "command": process["command"], "wall_s": process["wall_s"], "load_avg": process["load_avg"],
            "evals": evals, "final_accuracy": evals[-1][1],
            "mean_eval_accuracy": statistics.mean(v for _, v in evals[1:]),
            "trainable_params": trainable(weights),
            "optimizer_state_bytes": sum(v.numel() * v.element_size() for s in optimizer["state"].values()
                                         for v in s.values() if torch.is_tensor(v)),
            "step_s": statistics.median(r["perf/step_s"] for r in history if "perf/step_s" in r),
            "gen_tokens_per_s": statistics.median(r["perf/gen_tokens_per_s"] for r in history
                                                  if "perf/gen_tokens_per_s" in r)}


def trainable(path: str) -> int:
    """Parameters in a safetensors file (its header only): the adapter, or the whole model in full fine-tuning (a tied
    embedding is stored, and trained, once)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    count = 0
    for key, value in header.items():
        if key != "__metadata__":
            n = 1
            for d in value["shape"]:
                n *= d
            count += n
    return count


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1%} ± {std:.1%} ({min(values):.1%}..{max(values):.1%})"


def main(args: Args):
    results = {"args": {k: v for k, v in vars(args).items()}, "sweep": [], "seeds": []}
    # ---- 1. the sweep: seed 0, every lr
    best = {}
    for rank in args.ranks:
        runs = [run(args, rank, lr, args.seeds[0]) for lr in (args.lora_lrs if rank else args.full_lrs)]
        results["sweep"] += runs
        best[rank] = max(runs, key=lambda r: (r["mean_eval_accuracy"], r["final_accuracy"]))["lr"]
        for r in runs:
            print(f"sweep {r['config']} lr {r['lr']:g}: final {r['final_accuracy']:.1%}, mean over evals "
                  f"{r['mean_eval_accuracy']:.1%}", flush=True)
    # ---- 2. the seeds: each config at its best lr
    for rank in args.ranks:
        for seed in args.seeds:
            results["seeds"].append(run(args, rank, best[rank], seed))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2))

    sweep = ["| config | lr | held-out greedy after (seed 0) | mean over evaluations |", "|---|---|---|---|"]
    sweep += [f"| {r['config']} | {r['lr']:g}{' (best)' if best[r['rank']] == r['lr'] else ''} | "
              f"{r['final_accuracy']:.1%} | {r['mean_eval_accuracy']:.1%} |" for r in results["sweep"]]
    table = ["| config | best lr (sweep) | held-out greedy after: mean ± std (min..max) | before (mean) | trainable "
             "parameters | AdamW state | s/step (median) | decode tokens/s (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for rank in args.ranks:
        rows = [r for r in results["seeds"] if r["rank"] == rank]
        table.append(f"| {name_of(rank)} | {best[rank]:g} | {spread([r['final_accuracy'] for r in rows])} | "
                     f"{statistics.mean(r['evals'][0][1] for r in rows):.1%} | {rows[0]['trainable_params']:,} | "
                     f"{rows[0]['optimizer_state_bytes'] / 2**20:.2f} MiB | "
                     f"{statistics.mean(r['step_s'] for r in rows):.2f} | "
                     f"{statistics.mean(r['gen_tokens_per_s'] for r in rows):,.0f} |")
    text = (f"`OMP_NUM_THREADS=1 python bench/lora_rank.py {' '.join(sys.argv[1:])}` ({len(args.seeds)} seeds, "
            f"{args.max_steps} steps per run; load average at the end of the last run "
            f"{results['seeds'][-1]['load_avg']:.1f} on {os.cpu_count()} cores)\n\n" + "\n".join(table)
            + "\n\nThe sweep (seed 0):\n\n" + "\n".join(sweep) + "\n")
    print("\n" + text)
    Path(args.out).write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"full": "black", "r1": "tab:red", "r4": "tab:orange", "r32": "tab:blue"}
    for rank in args.ranks:
        rows = [r for r in results["seeds"] if r["rank"] == rank]
        color = colors.get(name_of(rank))
        for r in rows:
            ax.plot(*zip(*r["evals"]), "-", color=color, alpha=0.25, lw=1)
        steps = [s for s, _ in rows[0]["evals"]]
        mean = [statistics.mean(r["evals"][i][1] for r in rows) for i in range(len(steps))]
        ax.plot(steps, mean, "o-", color=color, markersize=3,
                label=f"{name_of(rank)}, lr {best[rank]:g} ({rows[0]['trainable_params']:,} trained)")
    ax.set_xlabel("step"), ax.set_ylabel("held-out greedy accuracy"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title(f"GRPO in the toy world: full fine-tuning vs LoRA ranks (mean of {len(args.seeds)} seeds, thin: "
                 "each seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.out}, {args.plot} and {args.results}")


if __name__ == "__main__":
    main(tyro.cli(Args))
