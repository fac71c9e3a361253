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
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

import tyro


@dataclass
class Args:
    seeds: tuple[int, ...] = (0, 1, 2)
    with_cold_start: str = "runs/r1"
    """the pipelines' out dirs, one per seed: DIR/seed<k>"""
    from_base: str = "runs/r1_no_cs"
    """the --no-cold-start reasoning RL runs: DIR/seed<k>"""


def history(root: str, seed: int) -> list[dict]:
    path = os.path.join(root, f"seed{seed}", "2_reasoning_rl", "grpo", "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"bench/cold_start.py: {path} is missing; run the commands in this file's docstring first.")
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if "rollout/accuracy" in r]


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


def main(args: Args):
    lines = ["| reasoning RL (stage 2) | steps to 80% accurate | steps to 95% readable | zero-advantage groups, "
             "first 10 steps | rollout accuracy, last 10 | readable, last 10 |", "|---|---|---|---|---|---|"]
    for label, root in (("from the cold start", args.with_cold_start), ("from the base (--no-cold-start)",
                                                                       args.from_base)):
        runs = [history(root, s) for s in args.seeds]
        zero = [statistics.mean(r["rollout/zero_variance_group_share"] for r in rows[:10]) for rows in runs]
        acc = [statistics.mean(r["rollout/accuracy"] for r in rows[-10:]) for rows in runs]
        readable = [statistics.mean(r["rollout/readable_share"] for r in rows[-10:]) for rows in runs]
        lines.append(f"| {label} | {cell([steps_to(r, 'rollout/accuracy', 0.8) for r in runs])} | "
                     f"{cell([steps_to(r, 'rollout/readable_share', 0.95) for r in runs])} | {cell(zero)} | "
                     f"{cell(acc)} | {cell(readable)} |")
    print(f"Seeds {list(args.seeds)}; mean ± std (per seed in parentheses).\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
