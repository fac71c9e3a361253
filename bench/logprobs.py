"""bench/logprobs.py: chunked rl_kernels.token_logprobs against the naive full-logits log-softmax, forward + backward.

What is measured, for B x T tokens (B rows of T tokens) and the 151,936-token Qwen2.5 vocabulary V:

    step  = token_logprobs(model, ids, mask) -> (B, T-1);  loss = sum(logprobs * weights);  loss.backward()
    naive = rl_kernels.token_logprobs(..., fused=False): the model's (B, T, V) logits, log_softmax, gather
    ours  = rl_kernels.token_logprobs(...) (fused): the head applied chunk by chunk, logits recomputed in the backward

The model body is small (2 layers) so the V-wide head dominates, as it does for a 0.5B model at RL lengths.

Peak extra memory: the peak during one step minus the memory held before it (model, inputs, and the
parameters' .grad buffers, allocated beforehand as they are in a training loop). On CPU each measurement is a
separate process: its resident-set peak (VmHWM, reset through /proc/self/clear_refs just before the step) minus
its resident set before the step, with glibc told to return every block over 64 KiB to the OS on free, so the
resident set follows the live tensors. On CUDA: torch.cuda.max_memory_allocated after a reset, minus
memory_allocated before.

Time: median over runs interleaved (ours, naive, naive, ours, ...) in one process, each run one step; the
ratio is the median of the per-pair ratios ours / naive. Targets (issue 2): at 8,192 tokens, ours uses at most
1/10 of naive's extra memory, and at most 1.3x its time.

    python bench/logprobs.py --quick                      # seconds: 256 and 512 tokens
    python bench/logprobs.py                              # CPU: 1,024 ... 8,192 tokens (naive needs ~15 GB)
    python bench/logprobs.py --device cuda --out lp.md    # GPU: bf16, hidden 896
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl_kernels as K  # noqa: E402


@dataclass
class Args:
    device: str = "cpu"
    """cpu or cuda"""
    tokens: tuple[int, ...] = ()
    """token counts B*T to measure (empty: 256 512 with --quick, else 1024 2048 4096 8192)"""
    batch: int = 4
    """rows B; each row has tokens / B tokens"""
    hidden: int = 0
    """hidden size of the model body (0: 256 on CPU, 896 on CUDA)"""
    layers: int = 2
    """decoder layers of the model body"""
    vocab: int = 151936
    """vocabulary size V (Qwen2.5's by default)"""
    runs: int = 0
    """timed runs per side, after a warm-up (0: 2 with --quick, 3 on CPU, 5 on CUDA)"""
    threads: int = 0
    """torch CPU threads (0: rl_kernels.set_cpu_threads' rule, as the training scripts: 1 for a CPU model under 50M
    parameters, else torch's default); on a busy shared machine 1 gives far steadier timings"""
    quick: bool = False
    """a fast sanity run: two small token counts, two runs"""
    out: str | None = None
    """also write the markdown table to this file"""
    seed: int = 0
    """seed for the model weights and the inputs"""
    measure: str = ""
    """internal: 'naive:TOKENS' or 'chunked:TOKENS' measures one peak in this process and prints it as JSON"""


METHODS = {"naive": False, "chunked": True}  # name -> the fused= argument of rl_kernels.token_logprobs


def build_model(args: Args, device: torch.device, dtype: torch.dtype):
    """A random Qwen2 with a small body and the full vocabulary; tied embeddings, as Qwen2.5-0.5B."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(1, args.hidden // 64)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=2 if heads % 2 == 0 else 1,
                         intermediate_size=4 * args.hidden if args.hidden < 896 else 4864,
                         tie_word_embeddings=True, max_position_embeddings=32768, pad_token_id=0)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype).train()
    for p in model.parameters():  # allocated up front, as in a training loop after its first step
        p.grad = torch.zeros_like(p)
    return model


def make_inputs(args: Args, tokens: int, device: torch.device):
    """(B, T) random ids, left padding on a few rows, and random per-token loss weights (B, T-1)."""
    B, T = args.batch, tokens // args.batch
    gen = torch.Generator().manual_seed(args.seed + tokens)
    input_ids = torch.randint(1, args.vocab, (B, T), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    for i in range(B):
        attention_mask[i, :(i % 2) * (T // 8)] = 0
    weights = torch.randn(B, T - 1, generator=gen) * attention_mask[:, 1:]
    return input_ids.to(device), attention_mask.to(device), weights.to(device)


def step(model, inputs, fused: bool) -> torch.Tensor:
    """One forward + backward of sum(logprobs * weights); returns the detached log-probs."""
    input_ids, attention_mask, weights = inputs
    logprobs = K.token_logprobs(model, input_ids, attention_mask, fused=fused)  # (B, T-1)
    (logprobs * weights).sum().backward()
    return logprobs.detach()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_bytes(model, inputs, fused: bool, device: torch.device) -> int:
    """Peak memory during one step minus the memory held just before it (see the module docstring)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(model, inputs, fused)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident set
        f.write("5")
    step(model, inputs, fused)
    return (_proc_status_kib("VmHWM") - before) * 1024


def measure_in_this_process(args: Args, device: torch.device, dtype: torch.dtype):
    """The --measure child: build the model and inputs, warm up on a tiny input, print one peak as JSON."""
    method, tokens = args.measure.split(":")
    fused = METHODS[method]
    model = build_model(args, device, dtype)
    K.set_cpu_threads(args.threads, model)
    step(model, make_inputs(args, 8 * args.batch, device), fused)  # library initialisation, untimed, unmeasured
    inputs = make_inputs(args, int(tokens), device)
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(model, inputs, fused, device)}))


def measure_in_subprocess(args: Args, method: str, tokens: int) -> int | str:
    """Run one --measure child; its peak in bytes, or a short reason when it could not finish."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--batch", str(args.batch),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--threads", str(args.threads), "--seed", str(args.seed), "--measure", f"{method}:{tokens}"]
    # Blocks over 64 KiB come from mmap and go back to the OS on free: the resident set follows live tensors.
    environ = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        return "killed (out of memory?)" if proc.returncode < 0 else f"failed (exit {proc.returncode})"
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def naive_bytes_estimate(tokens: int, vocab: int) -> int:
    """Naive's peak on CPU, measured: about three fp32 (B*T, V) tensors (logits, log-softmax, a gradient); 3.5
    leaves a margin."""
    return int(3.5 * tokens * vocab * 4)


def available_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def main(args: Args):
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU; run on CPU with --device cpu.")
    args.hidden = args.hidden or (896 if gpu else 256)
    dtype = torch.bfloat16 if gpu else torch.float32
    if args.measure:
        return measure_in_this_process(args, device, dtype)
    token_counts = args.tokens or ((256, 512) if args.quick else (1024, 2048, 4096, 8192))
    bad = [n for n in token_counts if n % args.batch or n // args.batch < 2]
    if bad:
        raise SystemExit(f"--tokens {bad}: each count must be a multiple of --batch {args.batch} (and >= 2 per row).")
    runs = args.runs or (2 if args.quick else 5 if gpu else 3)

    model = build_model(args, device, dtype)
    K.set_cpu_threads(args.threads, model)
    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} thread(s)"
    header = (f"### token_logprobs: chunked vs naive full logits, forward + backward ({where})\n\n"
              f"`python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}`: random Qwen2, {args.layers} layers, "
              f"hidden {args.hidden}, V = {args.vocab:,} ({params / 1e6:.0f}M parameters, "
              f"{str(dtype).replace('torch.', '')}), B = {args.batch}, chunk "
              f"{K.default_chunk_size(args.vocab)} rows; {runs} interleaved runs; torch {torch.__version__}.")
    print(header, flush=True)

    rows = []
    for n, tokens in enumerate(token_counts):
        row = {"tokens": tokens}
        if not gpu and naive_bytes_estimate(tokens, args.vocab) > 0.9 * available_bytes():
            row["skip"] = f"naive needs ~{naive_bytes_estimate(tokens, args.vocab) / 2**30:.0f} GiB"
            print(f"  {tokens} tokens: skipped, {row['skip']}", flush=True)
            rows.append(row)
            table = markdown(rows, args, header)
            continue
        inputs = make_inputs(args, tokens, device)
        # Peak memory: separate processes on CPU (a process's peak resident set only grows), in place on CUDA.
        for name, fused in METHODS.items():
            row[f"{name}_mem"] = (peak_extra_bytes(model, inputs, fused, device) if gpu
                                  else measure_in_subprocess(args, name, tokens))
            model.zero_grad(set_to_none=False)
        # Time: warm up (every size on CUDA, once on CPU), then interleave.
        if gpu or n == 0:
            lp = {name: step(model, inputs, fused) for name, fused in METHODS.items()}
            row["max_diff"] = (lp["chunked"].float() - lp["naive"].float()).abs().max().item()
        times = {name: [] for name in METHODS}
        for run in range(runs):
            order = list(METHODS.items())
            for name, fused in order if run % 2 == 0 else order[::-1]:
                model.zero_grad(set_to_none=False)
                synchronize(device)
                start = time.perf_counter()
                step(model, inputs, fused)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
            print(f"  {tokens} tokens run {run}: chunked {times['chunked'][-1]:.3f}s  naive {times['naive'][-1]:.3f}s",
                  flush=True)
        model.zero_grad(set_to_none=False)
        del inputs
        row["naive_s"], row["chunked_s"] = statistics.median(times["naive"]), statistics.median(times["chunked"])
        ratios = [c / v for c, v in zip(times["chunked"], times["naive"])]
        row["time_ratio"], row["time_ratio_min"], row["time_ratio_max"] = statistics.median(ratios), min(ratios), max(ratios)
        rows.append(row)
        print(f"  {tokens} tokens: {row}", flush=True)
        table = markdown(rows, args, header)
        if args.out:  # after every row, so a run cut short keeps what it finished
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(table)

    print("\n" + table)
    if args.out:
        print(f"table written to {args.out}")


def markdown(rows: list[dict], args: Args, header: str) -> str:
    def mib(value):
        return f"{value / 2**20:,.0f}" if isinstance(value, (int, float)) else str(value)

    cols = ["B x T", "naive extra MiB", "chunked extra MiB", "memory chunked/naive", "naive s", "chunked s",
            "time chunked/naive (min-max)", "target (8,192 tokens)"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        shape = f"{args.batch} x {r['tokens'] // args.batch}"
        if "skip" in r:
            lines.append(f"| {shape} | skipped: {r['skip']} |" + " |" * (len(cols) - 2))
            continue
        both = all(isinstance(r[f"{m}_mem"], (int, float)) for m in METHODS)
        mem_ratio = r["chunked_mem"] / r["naive_mem"] if both and r["naive_mem"] > 0 else None
        target = "-"
        if r["tokens"] == 8192 and mem_ratio is not None:
            ok_mem, ok_time = mem_ratio <= 0.1, r["time_ratio"] <= 1.3
            target = (f"memory <= 1/10 {'met' if ok_mem else 'MISSED'}, time <= 1.3x {'met' if ok_time else 'MISSED'}")
        lines.append("| " + " | ".join([
            shape, mib(r["naive_mem"]), mib(r["chunked_mem"]),
            "-" if not mem_ratio else f"1/{1 / mem_ratio:.1f}" if mem_ratio < 1 else f"{mem_ratio:.1f}x", f"{r['naive_s']:.3f}", f"{r['chunked_s']:.3f}",
            f"**{r['time_ratio']:.2f}x** ({r['time_ratio_min']:.2f}-{r['time_ratio_max']:.2f})", target]) + " |")
    lines.append("")
    diffs = [r["max_diff"] for r in rows if "max_diff" in r]
    lines.append("Extra memory = peak during one forward + backward minus the memory held before it (model, inputs, "
                 "and .grad buffers already allocated). "
                 + (f"Max |chunked - naive| log-prob seen: {max(diffs):.1e}." if diffs else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(tyro.cli(Args))
