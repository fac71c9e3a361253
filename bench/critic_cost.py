"""bench/critic_cost.py: what PPO's critic costs per step, against GRPO at the same update, timed side by side.

Runs alternate ABBA in each round (ppo, grpo, grpo, ppo), each a fresh process with one torch thread
(OMP_NUM_THREADS=1), so both see the same load within a round:
    ppo     python ppo.py  --seed S --max-steps N --eval-every 0                          (2 epochs x 2 minibatches)
    grpo    python grpo.py --seed S --max-steps N --eval-every 0 --num-iterations 2 --num-minibatches 2 --lr 1e-4
Same task, rewards, prompts, sampling noise and update shape; PPO adds the critic (a second model of the policy's
size): its pass over the rollout (V_old) and its forward/backward/optimizer step in each minibatch. The first
--warmup steps of each run are dropped; each phase is the median over the remaining steps (perf/*_s in
metrics.jsonl). The headline is the median over rounds of each round's PPO / GRPO ratio (the two PPO runs against
the two GRPO runs of the round), with the rounds' range; generated tokens per step are shown because the two
policies' responses drift apart in length.

    python bench/critic_cost.py                      # docs/ppo.md: 4 rounds of 10 steps, ~10 min on 2 cores
Writes docs/ppo_critic_cost.md.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rl_runs as runs  # noqa: E402

PHASES = ("generate", "policy_pass", "critic_pass", "update", "step")


@dataclass
class Args:
    rounds: int = 4
    """ABBA rounds"""
    steps: int = 10
    """steps per run"""
    warmup: int = 2
    """first steps of each run left out"""
    seed: int = 0
    """the seed of every run (same prompts and noise each round)"""
    root: str = "runs/critic_cost"
    """where the runs write (each run overwrites its own)"""
    out: str = "docs/ppo_critic_cost.md"


COMMANDS = {
    "ppo": ["ppo.py"],
    "grpo": ["grpo.py", "--num-iterations", "2", "--num-minibatches", "2", "--lr", "1e-4"],
}


def timed_run(name: str, args: Args, out_dir: str) -> dict[str, float]:
    """One run in a fresh process; the median seconds of each phase over its steps after the warm-up, and the median
    generated tokens per step."""
    command = [sys.executable, *COMMANDS[name], "--seed", str(args.seed), "--max-steps", str(args.steps),
               "--eval-every", "0", "--log-samples", "0", "--no-plot", "--out-dir", out_dir, "--overwrite"]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"`{' '.join(command)}` failed (exit {done.returncode}): {tail[0]}")
    rows = [r for r in runs.read_metrics(out_dir) if "perf/step_s" in r][args.warmup:]
    names = {"policy_pass": ("perf/policy_pass_s", "perf/logprobs_s")}  # grpo.py times its pi_old pass as logprobs
    result = {phase: statistics.median(sum(r.get(k, 0.0) for k in names.get(phase, (f"perf/{phase}_s",)))
                                       for r in rows) for phase in PHASES}
    result["tokens"] = statistics.median(r["perf/gen_tokens_per_s"] * r["perf/generate_s"] for r in rows)
    return result


def main(args: Args):
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup {args.warmup} must leave steps to time: 0 <= warmup < --steps {args.steps}.")
    per_round = []
    for r in range(args.rounds):
        got = {"ppo": [], "grpo": []}
        for i, name in enumerate(("ppo", "grpo", "grpo", "ppo")):
            got[name].append(timed_run(name, args, os.path.join(args.root, f"{name}_{i}")))
            print(f"round {r} {name}: " + " ".join(f"{k} {v:.2f}" for k, v in got[name][-1].items()), flush=True)
        per_round.append({name: {k: statistics.mean(run[k] for run in runs_) for k in runs_[0]}
                          for name, runs_ in got.items()})
    lines = [f"`python bench/critic_cost.py --rounds {args.rounds} --steps {args.steps}` (seed {args.seed}, one torch "
             f"thread per process, steps {args.warmup + 1}-{args.steps} of each run; medians over steps, then the mean "
             f"of a round's two runs). Seconds per step:", "",
             "| phase | grpo | ppo | ppo / grpo, median over rounds (range) |", "|---|---|---|---|"]
    for key in (*PHASES, "tokens"):
        grpo = statistics.median(p["grpo"][key] for p in per_round)
        ppo = statistics.median(p["ppo"][key] for p in per_round)
        ratios = [p["ppo"][key] / p["grpo"][key] for p in per_round if p["grpo"][key] > 0]
        spread = (f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else "—")
        label = "generated tokens per step" if key == "tokens" else key
        fmt = ".0f" if key == "tokens" else ".3f"
        lines.append(f"| {label} | {grpo:{fmt}} | {ppo:{fmt}} | {spread} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
