"""bench/generate.py: rl_kernels.generate against transformers' model.generate, tokens/s side by side.

What is measured: the wall time of one whole call (prefill + every decode step + sampling), for the same
random-initialised model, the same left-padded prompts, the same sampling settings (temperature 1, top-p 1,
no top-k) and the same number of new tokens N. EOS is switched off on both sides (the model's config has no
EOS, ours gets eos_token_id=-1), so both always make exactly R*N tokens; the script checks the output shapes.

    tokens/s = R * N / call time            R = B prompts * S samples per prompt
    ratio    = median over runs of (their call time / our call time), each pair timed back to back

A third contestant, "ours keyed", is rl_kernels.generate with noise_keys (per-row keyed sampling noise), the
way grpo.py samples. Each run times every contestant once, the order rotating and reversing from run to run,
after one untimed warm-up each, so a noisy shared machine slows all sides alike. On CUDA our decode step is compiled with CUDA graphs (rl_kernels.generate's default);
the warm-up call pays for the compile and the graph capture, and the table reports how many graphs were
compiled during the timed runs (should be 0: same shapes every call).

Memory-bandwidth roofline (CUDA only): a decode step must read every weight once and the keys/values of the
tokens so far; averaged over the N steps that is

    bytes/step = weight bytes + R * (P + (N - 1) / 2) * 2 * layers * kv_heads * head_dim * bytes per element
    share      = (bytes/step / step time) / copy bandwidth

where step time = our call time / N (the prefill included, so the share is a lower bound) and the copy
bandwidth is measured here with a large device-to-device tensor copy (read + write bytes). Our static cache
makes attention read all P + N positions every step; the table counts only the useful ones.

Host syncs (CUDA only): one more keyed call of ours under torch.cuda.set_sync_debug_mode("warn"), counting the
synchronizing operations it runs, divided by N. The decode loop's only one is the every-8-steps "has every row
finished?" check (1/8 per step; EOS is off here, so it never stops early), plus a few per call around the loop.

Also on CUDA: the peak memory of one keyed call of ours (torch.cuda.max_memory_allocated: the weights, the static
cache and the CUDA-graph pools it keeps, and the call's own working memory) and what it holds after the call; the
graph breaks and CUDA-graph skips torch logged in the whole run (torch._dynamo.utils.counters; both should be 0:
the decode step compiles whole, and a skip means it ran without graphs); and, after every shape is timed, the
rollout-to-update hand-over grpo.py makes every step: rl_kernels.free_decode_state, then the first shape's keyed
call again, which must give the same tokens (keyed noise depends only on the row's key and the step). The script
exits with status 1 when it does not.

Shapes: plain = 32 prompts x 1 sample, 16-token prompts; rl = 8 prompts x 8 samples, 128-token prompts
(transformers with num_return_sequences=8: it prefills every row, we prefill each prompt once); rl256 =
32 prompts x 8 samples, 128-token prompts.

    python bench/generate.py --quick                       # seconds: a sanity run on a tiny model
    python bench/generate.py                               # CPU: ~10M-parameter Qwen2, plain and rl shapes
    python bench/generate.py --device cuda --out gen.md    # GPU: Qwen2.5-0.5B-shaped bf16, rl and rl256
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
import rl_kernels as K  # noqa: E402


@dataclass
class Args:
    device: str = "cpu"
    """cpu or cuda"""
    model: str = "auto"
    """model shape: tiny | 10m | qwen2.5-0.5b (auto: tiny with --quick, 10m on CPU, qwen2.5-0.5b on CUDA)"""
    shapes: tuple[str, ...] = ()
    """shapes to run, from plain | rl | rl256 (empty: plain rl on CPU, rl rl256 on CUDA)"""
    new_tokens: int = 0
    """new tokens per row N (0: 8 with --quick, 64 on CPU, 512 on CUDA)"""
    runs: int = 0
    """timed runs per side, after one warm-up each (0: 2 with --quick, 5 on CPU, 3 on CUDA)"""
    threads: int = 0
    """torch CPU threads (0: rl_kernels.set_cpu_threads' rule, as the training scripts: 1 for a CPU model under 50M
    parameters, else torch's default); on a busy shared machine 1 gives far steadier timings"""
    compile: bool | None = None
    """compile our decode step (None: rl_kernels.generate's default, i.e. on CUDA only)"""
    keyed: bool = True
    """also time ours with keyed noise (noise_keys), the way grpo.py samples"""
    roofline: bool | None = None
    """measure the copy bandwidth and report the roofline share (None: on CUDA only)"""
    quick: bool = False
    """a fast sanity run: tiny model, few tokens, two runs"""
    out: str | None = None
    """also write the markdown table to this file (rewritten after every shape, so a cut-off run keeps rows)"""
    seed: int = 0
    """seed for the model weights and the prompts"""


# Shape name -> (B prompts, S samples per prompt, P prompt length).
SHAPES = {"plain": (32, 1, 16), "rl": (8, 8, 128), "rl256": (32, 8, 128)}


def model_config(name: str):
    """A Qwen2 config by name; no EOS token, so transformers' generate never stops early."""
    from transformers import Qwen2Config

    shapes = {
        "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=256),
        # ~10.1M parameters: 4.2M in the (tied) embedding, 1M in each of 6 layers.
        "10m": dict(vocab_size=16384, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=1024),
        "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, intermediate_size=4864, rope_theta=1e6, rms_norm_eps=1e-6),
    }
    if name not in shapes:
        raise ValueError(f"--model must be one of {sorted(shapes)}, got {name!r}.")
    return Qwen2Config(**shapes[name], tie_word_embeddings=True, max_position_embeddings=4096,
                       bos_token_id=None, eos_token_id=None, pad_token_id=0)


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(model_config(name))
    return model.to(dtype).eval()


def make_prompts(num_prompts: int, prompt_len: int, vocab_size: int, device: torch.device, seed: int):
    """Random left-padded prompts: row i has i % 4 pad tokens (id 0) in front of its real ones."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (num_prompts, prompt_len), generator=gen)  # (B, P)
    attention_mask = torch.ones_like(input_ids)
    for i in range(num_prompts):
        attention_mask[i, :i % 4] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids.to(device), attention_mask.to(device)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 10, repeats: int = 5) -> float:
    """Device memory bandwidth in bytes/s from a large tensor copy: each copy reads and writes nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: [dst.copy_(src) for _ in range(iters)], device)
        times.append(seconds)
    del src, dst
    return 2 * nbytes * iters / statistics.median(times)


def host_syncs(fn, device: torch.device) -> int | None:
    """Synchronizing CUDA operations fn runs (torch.cuda.set_sync_debug_mode warns once per operation)."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_memory(fn, device: torch.device) -> tuple[float, float] | None:
    """(peak, held after) in GiB over one call of fn, from torch.cuda's allocator statistics (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.memory_allocated(device) / 2**30


def decode_bytes_per_step(model, rows: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(useful bytes, static-cache bytes) one decode step reads, averaged over the steps: every weight once
    (a tied embedding counts once) plus the keys and values of the positions attended to."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = next(model.parameters()).element_size()
    kv_per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * element
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    useful = weights + rows * (prompt_len + (new_tokens - 1) / 2) * kv_per_position
    static = weights + rows * (prompt_len + new_tokens) * kv_per_position
    return useful, static


def bench_shape(model, shape: str, args: Args, device: torch.device, new_tokens: int, runs: int) -> dict:
    """Time ours (and ours with keyed noise) and theirs on one shape, interleaved; returns one table row."""
    from torch._dynamo.utils import counters

    B, S, P = SHAPES[shape]
    R, N = B * S, new_tokens
    input_ids, attention_mask = make_prompts(B, P, model.config.vocab_size, device, args.seed)
    keys = torch.arange(R, device=device)  # grpo.py's per-row sampling keys

    def ours(noise_keys=None):
        return call_ours(model, input_ids, attention_mask, S, N, args, noise_keys)

    def theirs(max_new_tokens: int = N):
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                 num_return_sequences=S, pad_token_id=0)
        assert out.shape == (R, P + max_new_tokens), "transformers made a different number of tokens"
        return out

    contestants = {"ours": ours, "theirs": theirs}
    if args.keyed:
        contestants["keyed"] = lambda: ours(keys)
    # Warm-up, untimed: ours at the timed shape (compile + CUDA-graph capture happen here); theirs needs no
    # compile, so a short call warms its kernels.
    warm_ours, _ = timed(ours, device)
    if args.keyed:
        timed(contestants["keyed"], device)
    timed(lambda: theirs(min(N, 16)), device)
    graphs_before = counters["stats"]["unique_graphs"]

    seconds = {name: [] for name in contestants}
    names = list(contestants)
    for run in range(runs):
        order = names[run % len(names):] + names[:run % len(names)]  # rotate who goes first
        for name in order if run % 2 == 0 else order[::-1]:
            seconds[name].append(timed(contestants[name], device)[0])
        print(f"  {shape} run {run}: " + "  ".join(f"{n} {seconds[n][-1]:.3f}s" for n in names), flush=True)

    def ratios(name):  # theirs / ours, per run: each pair ran back to back
        return [t / o for o, t in zip(seconds[name], seconds["theirs"])]

    row = dict(shape=shape, B=B, S=S, P=P, N=N, R=R, warm_up_s=warm_ours,
               recompiles=counters["stats"]["unique_graphs"] - graphs_before,
               step_s=statistics.median(seconds["ours"]) / N)
    for name in contestants:
        row[f"{name}_tps"] = R * N / statistics.median(seconds[name])
        if name != "theirs":
            row[f"{name}_ratio"] = statistics.median(ratios(name))
            row[f"{name}_ratio_range"] = (min(ratios(name)), max(ratios(name)))
    row["useful_bytes"], row["static_bytes"] = decode_bytes_per_step(model, R, P, N)
    row["syncs"] = host_syncs(contestants["keyed"] if args.keyed else ours, device)
    row["memory"] = peak_memory(contestants["keyed"] if args.keyed else ours, device)
    return row


def call_ours(model, input_ids, attention_mask, samples: int, new_tokens: int, args: Args, noise_keys=None):
    """One call of rl_kernels.generate, EOS off: exactly rows x new_tokens tokens."""
    out = K.generate(model, input_ids, attention_mask, max_new_tokens=new_tokens, num_samples=samples,
                     temperature=1.0, top_p=1.0, top_k=0, eos_token_id=-1, pad_token_id=0, noise_keys=noise_keys,
                     compile=args.compile)
    assert out.tokens.shape == (len(input_ids) * samples, new_tokens) and bool(out.mask.all()), \
        "ours made a different number of tokens"
    return out


def after_free(model, shape: str, args: Args, device: torch.device, new_tokens: int) -> dict:
    """grpo.py's hand-over from rollout to update and back: a keyed call, free_decode_state, the same call again."""
    from torch._dynamo.utils import counters

    B, S, P = SHAPES[shape]
    input_ids, attention_mask = make_prompts(B, P, model.config.vocab_size, device, args.seed)
    keys = torch.arange(B * S, device=device)
    before = call_ours(model, input_ids, attention_mask, S, new_tokens, args, keys).tokens
    K.free_decode_state(model)
    graphs = counters["stats"]["unique_graphs"]
    seconds, again = timed(lambda: call_ours(model, input_ids, attention_mask, S, new_tokens, args, keys), device)
    return dict(shape=shape, same=torch.equal(before, again.tokens), differ=int((before != again.tokens).sum()),
                tokens=before.numel(), seconds=seconds, graphs=counters["stats"]["unique_graphs"] - graphs)


def torch_notes(device: torch.device, free_check: dict | None) -> list[str]:
    """The graph breaks and CUDA-graph skips torch counted in this process, and the free_decode_state check."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    skips = counters["inductor"]["cudagraph_skips"]
    lines = [f"Graph breaks in the whole run: {sum(breaks.values())}"
             + "".join(f"; {count} x {reason.splitlines()[0][:120]}" for reason, count in breaks.most_common(3))
             + "." + (f" CUDA-graph skips: {skips}" + (" (ours ran without graphs there)." if skips else ".")
                      if device.type == "cuda" else "")]
    if free_check:
        c = free_check
        lines.append(f"After rl_kernels.free_decode_state, the {c['shape']} keyed call again: "
                     + ("same tokens" if c["same"] else f"DIFFERENT tokens ({c['differ']:,} of {c['tokens']:,})")
                     + f", {c['seconds']:.1f} s, {c['graphs']} graph(s) compiled by it"
                     + (" (the decode state it rebuilds runs without CUDA graphs: rl_kernels.free_decode_state says "
                        "why)." if device.type == "cuda" else "."))
    return lines


TARGETS = {"cpu": {"plain": 1.0, "rl": 1.5}, "cuda": {"rl": 5.0, "rl256": 5.0}}  # ratio theirs/ours, issue 2
ROOFLINE_TARGET = 0.40  # share of the copy bandwidth, on CUDA


def markdown(rows: list[dict], args: Args, header: str, device: torch.device, copy_bw: float | None) -> str:
    keyed = all("keyed_tps" in r for r in rows)
    cols = ["shape", "B x S", "P", "N", "ours tok/s", "transformers tok/s", "ratio (min-max)", "target"]
    if keyed:
        cols += ["ours keyed tok/s", "keyed ratio (min-max)"]
    if copy_bw:
        cols += ["step ms", "GB/step", "GB/s", "roofline share"]
    syncs = all(r.get("syncs") is not None for r in rows)
    if syncs:
        cols += ["host syncs / step"]
    memory = all(r.get("memory") for r in rows)
    if memory:
        cols += ["peak GiB (held after)"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        target = TARGETS.get(device.type, {}).get(r["shape"])
        low, high = r["ours_ratio_range"]
        cells = [r["shape"], f"{r['B']} x {r['S']}", str(r["P"]), str(r["N"]), f"{r['ours_tps']:,.0f}",
                 f"{r['theirs_tps']:,.0f}", f"**{r['ours_ratio']:.2f}x** ({low:.2f}-{high:.2f})",
                 "-" if target is None or args.quick else
                 f">= {target}x {'met' if r['ours_ratio'] >= target else 'MISSED'}"]
        if keyed:
            low, high = r["keyed_ratio_range"]
            cells += [f"{r['keyed_tps']:,.0f}", f"{r['keyed_ratio']:.2f}x ({low:.2f}-{high:.2f})"]
        if copy_bw:
            achieved = r["useful_bytes"] / r["step_s"]
            share = achieved / copy_bw
            cells += [f"{r['step_s'] * 1e3:.2f}", f"{r['useful_bytes'] / 1e9:.3g}", f"{achieved / 1e9:,.0f}",
                      f"{share:.0%}" + ("" if device.type != "cuda" or args.quick else
                                        f" (>= {ROOFLINE_TARGET:.0%} {'met' if share >= ROOFLINE_TARGET else 'MISSED'})")]
        if syncs:
            cells += [f"{r['syncs'] / r['N']:.3f} ({r['syncs']} in {r['N']} steps)"]
        if memory:
            cells += [f"{r['memory'][0]:.2f} ({r['memory'][1]:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("ratio = median over the interleaved runs of transformers' call time / ours; tokens/s = rows x N / "
                 "median call time (prefill included).")
    if memory:
        lines.append("peak GiB: torch.cuda.max_memory_allocated over one keyed call of ours (weights, static cache, "
                     "CUDA-graph pools and the call's working memory); held after: what stays allocated between calls.")
    if keyed:
        lines.append("ours keyed = K.generate with noise_keys (one keyed uniform per row and step), the way grpo.py "
                     "samples; the plain columns use the default torch.Generator noise.")
    if copy_bw:
        lines.append(f"Copy bandwidth measured here: {copy_bw / 1e9:,.0f} GB/s (read + write). GB/step = weights + "
                     "the KV of the tokens so far, averaged over the steps; step time = our (unkeyed) call time / N "
                     "(prefill included, so the share is a lower bound). Our static cache actually reads all P + N "
                     "positions: " + ", ".join(f"{r['shape']} {r['static_bytes'] / 1e9:.3g} GB/step, "
                                              f"{r['static_bytes'] / r['step_s'] / copy_bw:.0%}" for r in rows) + ".")
    if device.type == "cuda" or args.compile:
        lines.append("Graphs compiled during the timed runs (should be 0): "
                     + ", ".join(f"{r['shape']} {r['recompiles']}" for r in rows)
                     + "; first (warm-up) call of ours: "
                     + ", ".join(f"{r['shape']} {r['warm_up_s']:.0f}s" for r in rows) + ".")
    return "\n".join(lines) + "\n"


def main(args: Args):
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU; run on CPU with --device cpu.")
    gpu = device.type == "cuda"
    model_name = args.model if args.model != "auto" else "tiny" if args.quick else "qwen2.5-0.5b" if gpu else "10m"
    shapes = args.shapes or (("rl", "rl256") if gpu else ("plain", "rl"))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"Unknown shape(s) {unknown}; choose from {sorted(SHAPES)}.")
    new_tokens = args.new_tokens or (8 if args.quick else 512 if gpu else 64)
    runs = args.runs or (2 if args.quick else 3 if gpu else 5)
    dtype = torch.bfloat16 if gpu else torch.float32

    model = build_model(model_name, device, dtype, args.seed)
    K.set_cpu_threads(args.threads, model)
    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} thread(s)"
    header = (f"### generate: K.generate vs transformers generate ({where})\n\n"
              f"`python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}`: random Qwen2 `{model_name}` "
              f"({params / 1e6:.1f}M parameters, {str(dtype).replace('torch.', '')}), temperature 1, top-p 1, "
              f"EOS off, {runs} interleaved runs after a warm-up; torch {torch.__version__}, transformers "
              f"{transformers.__version__}.")
    print(header, flush=True)
    copy_bw = copy_bandwidth(device) if (gpu if args.roofline is None else args.roofline) else None

    rows = []
    for shape in shapes:  # shapes outermost: each keeps one static cache and one compiled graph while timed
        rows.append(bench_shape(model, shape, args, device, new_tokens, runs))
        table = markdown(rows, args, header, device, copy_bw)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(table)
    # After every shape is timed: freeing drops the CUDA graphs of every decode state (rl_kernels.free_decode_state).
    free_check = after_free(model, shapes[0], args, device, new_tokens) if args.keyed else None
    table += "\n".join(torch_notes(device, free_check)) + "\n"
    if args.out:
        Path(args.out).write_text(table)
    print("\n" + table)
    if args.out:
        print(f"table written to {args.out}")
    if free_check and not free_check["same"]:
        raise SystemExit("The keyed call after rl_kernels.free_decode_state gave different tokens.")


if __name__ == "__main__":
    main(tyro.cli(Args))
