"""bench/mismatch_precision.py: the sampler-vs-trainer log-prob gap per compute dtype (fp32, bf16, fp16), on the toy.

What is measured, for one rollout of B prompts x G samples of the toy world's arithmetic task (the first B rows of
its train split, step 0's noise keys, temperature 1, 48 new tokens: the default GRPO run's batch shape), per
compute dtype with fp32 master weights:

    sampler = rlvr_rewards.sample(...).gen.logprobs        log pi of each sampled token, as generate computed it
                                                            (one token at a time against the KV cache)
    trainer = rl_kernels.rollout_logprobs(model, batch)     the same tokens' log pi from the fused log-prob pass
                                                            (the whole sequence at once), as the update computes them
    gap     = |sampler - trainer| over the completion tokens: its mean, max, and the share of tokens above 1e-4 nats
    exact   = |trainer - trainer in fp32| on the same tokens: how far that dtype's trainer is from fp32's

"Defeating the training-inference mismatch via FP16" (Qi et al. 2025, arXiv 2510.26788) reports that fp16 compute
removes most of the gap bf16 leaves. Each dtype samples its own tokens (its numerics differ), from the same keys.
On CPU bf16 and fp16 are what this CPU's kernels do (oneDNN; on a GPU the numbers will differ): a measurement of
this machine, not of a GPU.

    OMP_NUM_THREADS=1 python bench/mismatch_precision.py                 # the toy, CPU, 1 thread: ~1 min
    python bench/mismatch_precision.py --device cuda --model Qwen/Qwen2.5-0.5B-Instruct
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl_kernels as K  # noqa: E402
import rlvr_rewards as env  # noqa: E402


@dataclass
class Args:
    model: str = "toy"
    """the policy: "toy" (toy/base), a local directory or a hub id"""
    device: str = "cpu"
    """cpu or cuda"""
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    """compute dtypes to measure (fp32 master weights in each)"""
    prompts: int = 16
    """B: prompts in the rollout (the first B rows of the arithmetic task's train split)"""
    samples: int = 8
    """G: samples per prompt"""
    max_new_tokens: int = 48
    """tokens per completion at most"""
    seed: int = 0
    """the noise keys' seed (rl_kernels.rollout_noise_keys at step 0)"""
    threads: int = 1
    """CPU threads (torch.set_num_threads)"""


def precision_gap(dtype: str, *, model: str = "toy", device: str = "cpu", prompts: int = 16, samples: int = 8,
                  max_new_tokens: int = 48, seed: int = 0, reference: str = "float32") -> dict[str, float]:
    """One rollout in compute dtype `dtype` (fp32 master weights): the mean and max |sampler - trainer| log-prob gap
    over its completion tokens and the share of them above 1e-4 nats, the mean and max |trainer - trainer in `reference`| on the same tokens, the token
    count, and the seconds it took."""
    tick = time.perf_counter()
    policy, tokenizer = K.load_model(model, dtype=dtype, device=device)
    rows = env.load_prompts("arithmetic", "train", 20_000, seed)[:prompts]
    keys = K.rollout_noise_keys(seed, 0, 0, list(range(prompts)), samples)
    rollout = env.sample(policy, tokenizer, rows, num_samples=samples, max_new_tokens=max_new_tokens,
                         temperature=1.0, noise_keys=keys, compile=False)
    gen = rollout.gen
    batch = dict(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask, tokens=gen.tokens, mask=gen.mask)
    live = gen.mask.bool()                                                            # (R, N)
    trainer = K.rollout_logprobs(policy, batch)                                       # (R, N) fp32
    gap = (gen.logprobs.float() - trainer)[live].abs()
    exact, _ = K.load_model(model, dtype=reference, device=device)
    off = (trainer - K.rollout_logprobs(exact, batch))[live].abs()
    return {"gap_mean": gap.mean().item(), "gap_max": gap.max().item(),
            "gap_share": (gap > 1e-4).float().mean().item(), "vs_fp32_mean": off.mean().item(),
            "vs_fp32_max": off.max().item(), "tokens": int(live.sum()), "seconds": time.perf_counter() - tick}


def main(args: Args):
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    print(f"{args.model}, {args.prompts} prompts x {args.samples} samples, {args.max_new_tokens} new tokens, "
          f"{args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print("| compute | tokens | mean abs(sampler - trainer) | max | share > 1e-4 | mean abs(trainer - fp32 trainer) | "
          "max |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        r = precision_gap(dtype, model=args.model, device=args.device, prompts=args.prompts, samples=args.samples,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)
        print(f"| {dtype} | {r['tokens']} | {r['gap_mean']:.2e} | {r['gap_max']:.2e} | {r['gap_share']:.1%} | "
              f"{r['vs_fp32_mean']:.2e} | "
              f"{r['vs_fp32_max']:.2e} |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
