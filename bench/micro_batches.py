"""bench/micro_batches.py: what length-sorted micro-batches save in grpo.py's update, on real toy rollouts.

A rollout is ragged: G samples of one prompt stop at different lengths, and one padded (R, P + N) pass spends
much of its compute on padding. grpo.update packs rows sorted by length into micro-batches of at most
--micro-batch-tokens padded tokens, each cut to its own longest prompt and completion (rl_kernels.length_batches);
the gradient is the same sum. This script takes the rollouts of real grpo.py steps on the committed toy base
model (the first step, when short direct answers and long reasoning traces mix, and a later one), and times
grpo.update on each batch at several budgets, interleaved, with a learning rate of 0 so every repeat sees the
same weights. Each timed call directly follows an untimed call at the same budget (as in training, where every
step uses one budget): timed cold, right after a call of another shape, a pass is up to 20% slower on CPU
(the allocator maps fresh memory), which would flatter or penalise whichever budget comes first. Reported: micro-batches, the share of the padded
(rows x columns) tokens that are padding, the median update time and its ratio to the one-pass update (the
median of the per-repeat ratios).

    python bench/micro_batches.py                 # ~4 min on one CPU core
    python bench/micro_batches.py --out mb.md
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rl_kernels as K  # noqa: E402


@dataclass
class Args:
    budgets: tuple[int, ...] = (0, 8192, 4096, 2048, 1024, 512)
    """--micro-batch-tokens values to time (0: one pass over the whole padded batch, the reference)"""
    steps: tuple[int, ...] = (1, 30)
    """grpo.py steps whose rollouts are timed (1-based)"""
    repeats: int = 7
    """timed repeats per budget, after one untimed warm-up round"""
    device: str = "cpu"
    threads: int = 1
    out: str | None = None
    """also write the table to this file"""


def capture_batches(steps: tuple[int, ...], device: str, out_dir: str) -> dict[int, tuple]:
    """Run grpo.py's default toy recipe up to the last step asked for; keep (model copy, batch) at those steps."""
    import copy

    seen, kept = [0], {}
    real_update = grpo.update

    def spy(args, model, optimizer, scheduler, batch, state):
        seen[0] += 1
        if seen[0] in steps:
            kept[seen[0]] = (copy.deepcopy(K.unwrap(model)), {k: v for k, v in batch.items()})
        return real_update(args, model, optimizer, scheduler, batch, state)

    grpo.update = spy
    try:
        grpo.main(grpo.Args(max_steps=max(steps), eval_every=0, plot=False, out_dir=out_dir, device=device))
    finally:
        grpo.update = real_update
    return kept


def main(args: Args):
    import tempfile

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="micro_batches_") as tmp:
        batches = capture_batches(args.steps, args.device, tmp)
    lines = [f"### Length-sorted micro-batches in grpo.update (toy base model, {args.device}, "
             f"{torch.get_num_threads()} thread(s))", "",
             f"`python bench/micro_batches.py {' '.join(sys.argv[1:])}`: torch {torch.__version__}, transformers "
             f"{transformers.__version__}; median of {args.repeats} interleaved repeats per budget.", "",
             "| rollout | rows x columns | padding | --micro-batch-tokens | micro-batches | padding left | "
             "update s | speed-up vs one pass |", "|---|---|---|---|---|---|---|---|"]
    for step, (model, batch) in sorted(batches.items()):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        R = batch["mask"].shape[0]
        width = batch["prompt_mask"].shape[1] + batch["mask"].shape[1]
        real = int(batch["prompt_mask"].sum() + batch["mask"].sum())
        times = {b: [] for b in args.budgets}
        shape = {}
        for repeat in range(args.repeats + 1):
            for budget in args.budgets:
                run_args = grpo.Args(micro_batch_tokens=budget)
                parts = K.micro_batches(batch, budget)
                shape[budget] = (len(parts), sum(p["prompt_ids"].numel() + p["tokens"].numel() for _, p in parts))
                state = {"skipped": 0, "nan_streak": 0}
                grpo.update(run_args, model, optimizer, scheduler, batch, state)  # untimed: same shapes, warm
                t0 = time.perf_counter()
                grpo.update(run_args, model, optimizer, scheduler, batch, state)
                if repeat:
                    times[budget].append(time.perf_counter() - t0)
        base = times[args.budgets[0]]
        for budget in args.budgets:
            n_parts, padded = shape[budget]
            ratio = statistics.median(b / t for b, t in zip(base, times[budget]))
            lines.append(f"| step {step} | {R} x {width} | {1 - real / (R * width):.0%} | {budget} | {n_parts} | "
                         f"{1 - real / padded:.0%} | {statistics.median(times[budget]):.3f} | {ratio:.2f}x |")
        print("\n".join(lines[-len(args.budgets):]), flush=True)
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main(tyro.cli(Args))
