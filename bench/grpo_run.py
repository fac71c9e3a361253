"""bench/grpo_run.py: a short real GRPO run (grpo.main) on a Qwen2.5-0.5B-shaped random model, in the precision and
with the compiled decoding a GPU run uses; reports each step's time split, tokens/s, peak memory and recompiles.

What it checks on a GPU (issue 11): bf16 compute with fp32 master weights runs end to end, plain and under FSDP2
(one GPU, a process group of one, so fully_shard really wraps the model: every rollout then refreshes the
unsharded rollout copy by gathering each layer once); the compiled decode step compiles for the first rollout and
never again (TORCH_LOGS=recompiles, counted); the decode state stays between steps in one process (its CUDA graphs
replay) and is freed before each update under FSDP2 (--decode-memory auto); the step's peak memory (perf/peak_mem_gb)
and the rollout's and the update's apart (perf/peak_memory_rollout_gb, perf/peak_memory_update_gb), all in GiB.

    python bench/grpo_run.py --quick                                   # CPU sanity run: tiny model, 3 steps
    python bench/grpo_run.py --quick --strategy fsdp                   # the same under FSDP2 (gloo, one rank)
    python bench/grpo_run.py --device cuda --out grpo_plain.md         # GPU: 0.5B shape, 10 steps (~2 min)
    python bench/grpo_run.py --device cuda --strategy fsdp --out grpo_fsdp.md

The model is random, so rewards are 0 and it never samples EOS: every rollout decodes max_new_tokens for every row,
and the update runs its full forward and backward (with a zero advantage). Evaluation is off (each evaluation
shape would compile its own decode step; tests/test_decoding.py counts those on CPU).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rl_runs as runs  # noqa: E402
from grpo_step import make_model_dir, no_checkpoints  # noqa: E402


@dataclass
class Args:
    device: str = "cpu"
    """cpu or cuda"""
    strategy: str = "none"
    """none (one process) or fsdp (FSDP2 over a process group of one)"""
    model: str = "auto"
    """toy | 100m | qwen2.5-0.5b (auto: toy with --quick, qwen2.5-0.5b otherwise)"""
    steps: int = 0
    """GRPO steps (0: 3 with --quick, 10 otherwise)"""
    prompts: int = 8
    """B prompts per step"""
    generations: int = 8
    """G samples per prompt"""
    new_tokens: int = 0
    """max_new_tokens (0: 16 with --quick, 256 otherwise)"""
    dtype: str = "auto"
    """compute dtype (auto: bf16 on a GPU, fp32 on CPU; --dtype bfloat16 on CPU runs autocast)"""
    compile: bool | None = None
    """compile the decode step and the loss (None: grpo's default, on CUDA)"""
    quick: bool = False
    """a fast sanity run on CPU"""
    out: str | None = None
    """also write the markdown table to this file (rewritten after the run; the run log goes to stdout)"""
    seed: int = 0


class _Lines(logging.Handler):
    """Collects the messages of a logger (here: dynamo's recompile log)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(args: Args):
    device = torch.device(args.device)
    name = args.model if args.model != "auto" else "toy" if args.quick else "qwen2.5-0.5b"
    steps = args.steps or (3 if args.quick else 10)
    new_tokens = args.new_tokens or (16 if args.quick else 256)
    if args.strategy == "fsdp" and not torch.distributed.is_initialized():
        # A process group of one: wrap_model shards with FSDP2 (one shard), so every FSDP2 path runs.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    recompiles = _Lines()
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(recompiles)
    torch._logging.set_logs(recompiles=True)
    root = tempfile.mkdtemp(prefix="grpo_run_")
    path, what = make_model_dir(name, root, args.seed)
    run = grpo.Args(model=path, dataset="arithmetic", rewards=("task", "format"), reward_weights=(1.0, 0.1),
                    out_dir=os.path.join(root, "run"), seed=args.seed, max_steps=steps, lr=1e-6, eval_every=0,
                    device=args.device, dtype=args.dtype, strategy="fsdp" if args.strategy == "fsdp" else "ddp",
                    prompts_per_step=args.prompts, num_generations=args.generations, max_new_tokens=new_tokens,
                    compile=args.compile, plot=False)
    start = time.perf_counter()
    with no_checkpoints():
        grpo.main(run)
    wall = time.perf_counter() - start
    rows = [r for r in runs.read_metrics(run.out_dir) if "perf/step_s" in r]

    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    # Per-phase peaks, where this version of the metrics has them: the rollout holds the KV cache, the update
    # the activations and gradients, and only the larger of the two must fit.
    phases = [(key, name) for key, name in (("perf/peak_memory_rollout_gb", "rollout peak GiB"),
                                            ("perf/peak_memory_update_gb", "update peak GiB"))
              if any(key in r for r in rows)]
    lines = [f"### grpo.main, {steps} steps: {what}, {args.strategy} ({where})", "",
             f"`python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}`: B x G = {args.prompts} x "
             f"{args.generations}, N = {new_tokens}, dtype {args.dtype} (fp32 master weights), compile "
             f"{args.compile}; torch {torch.__version__}, transformers {transformers.__version__}; wall {wall:.0f} s "
             "including model building and compilation.", "",
             "| step | step s | generate s | update s | gen tok/s | peak GiB | "
             + "".join(f"{name} | " for _, name in phases) + "response length |",
             "|---|---|---|---|---|---|" + "---|" * len(phases) + "---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['perf/step_s']:.2f} | {r.get('perf/generate_s', 0):.2f} | "
                     f"{r.get('perf/update_s', 0):.2f} | {r['perf/gen_tokens_per_s']:,.0f} | "
                     f"{r.get('perf/peak_mem_gb', float('nan')):.2f} | "
                     + "".join(f"{r.get(key, float('nan')):.2f} | " for key, _ in phases)
                     + f"{r['rollout/response_length']:.0f} |")
    later = rows[1:] or rows
    lines += ["", f"Median of steps 2-{steps}: {statistics.median(r['perf/step_s'] for r in later):.2f} s/step, "
              f"{statistics.median(r['perf/gen_tokens_per_s'] for r in later):,.0f} generated tok/s. "
              f"First step (compiles): {rows[0]['perf/step_s']:.1f} s. Recompiles logged: {len(recompiles.messages)}."]
    lines += [f"    {m.splitlines()[0]} | {m.splitlines()[-1].strip()}" for m in recompiles.messages]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(tyro.cli(Args))
