"""bench/memory_table.py: per-rank GPU memory of a GRPO step (grpo.py's design) for Qwen2.5 0.5B to 72B, computed.

Nothing here runs on a GPU: the parameter counts are exact (each model is built from its config on the meta device
and counted), every other number is the arithmetic below. GB = 1e9 bytes. N ranks; P parameters; V vocabulary;
H hidden; L layers; I MLP width; Pl one decoder layer's parameters; Pm the nn.Linear (matmul) parameters, the head
included; kvd = kv heads x head dim; E = V*H (one embedding matrix; the head is a second one unless tied).

FSDP2 (fp32 master weights sharded with their gradients and AdamW state, bf16 compute):
    load, old path    each rank loads the whole fp32 model onto its GPU: 4P, + 4P for the reference (cast later)
    load, new path    meta device, shard, rank 0 broadcasts one tensor at a time: 4P/N + 4E, + 2P/N reference
    rollout           4P/N weights + 8P/N AdamW (0 with --offload-optimizer: on the CPU) + 2P/N reference
                      + 2P the unsharded bf16 rollout copy + KV cache rows*L*2*kvd*T*2
                      + 3 * rows*V*4 decode logits and sampling temporaries; gradients are None (freed each step)
    update            4P/N weights + 4P/N fp32 gradients + 8P/N AdamW + 2P/N reference
                      + 2*2*Pl two gathered bf16 layers (one computing, one prefetched) + 6*Pl one layer's gradient
                      in flight (bf16, then fp32 for the reduce-scatter) + 2E (x2 untied) the gathered root
                      (embedding, head) + 6E the head's gradient (summed in fp32, cast to bf16) + activations
                      + 2 * chunk*V*4 one chunk of fp32 logits and its gradient (rl_kernels.default_chunk_size
                      on a GPU); the rollout copy and KV cache are freed first (--decode-memory auto: free under FSDP2)
DDP (a full copy per rank) and one GPU (N = 1, no wrapper; the same without DDP's buckets):
    load              4P, + 4P for the reference (loaded in fp32, then its matmul weights cast to bf16)
    rollout           4P weights + 8P AdamW + 4P DDP's gradient buckets (allocated once and kept; the gradients
                      are views into them: gradient_as_bucket_view) + 2Pm bf16 matmul copy + the reference
                      2(Pm - E) + 4(P - Pm + E) (frozen: bf16 matmul weights, its head and embeddings kept fp32)
                      + KV cache + decode logits, as above
    update            4P + 4P gradients (DDP: the buckets themselves) + 8P AdamW + reference + 2Pm autocast's bf16
                      weight casts (saved for the backward) + 4E head gradient + activations + logits chunk, and the
                      decode state kept from the rollout (--decode-memory auto: keep outside FSDP2): 2Pm bf16 copy,
                      KV cache and decode logits
Activations of one micro-batch of t tokens (--micro-batch-tokens, 8,192 on a GPU), bf16, SDPA/flash attention:
    t * (L * (20H + 8I + 4kvd) + 6H) bytes; with --gradient-checkpointing t * (L * 2H + (20H + 8I + 4kvd) + 6H).
    20H + 8I + 4kvd per token and layer is what autograd saves in a Qwen2 layer (counted on the CPU by
    check_activations: the fp32 inputs of the two RMSNorms, q, k, v and the attention output, SwiGLU's four I-wide
    tensors), where the textbook 34H (Korthikanti et al. 2022, GPT's 4H GeLU MLP, bf16 norms) counts half of it.
Fits: peak <= (1 - margin) * the card, the margin for the CUDA context, NCCL and the allocator's fragmentation.

    python bench/memory_table.py                      # 8 x 80 GB
    python bench/memory_table.py --ranks 1 --models 0.5b 7b --out one_gpu.md
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl_kernels as K  # noqa: E402

# Qwen2.5 public configs: hidden, layers, heads, kv heads, intermediate, vocabulary, tied embeddings
CONFIGS = {"0.5b": (896, 24, 14, 2, 4864, 151936, True), "7b": (3584, 28, 28, 4, 18944, 152064, False),
           "14b": (5120, 48, 40, 8, 13824, 152064, False), "32b": (5120, 64, 40, 8, 27648, 152064, False),
           "72b": (8192, 80, 64, 8, 29568, 152064, False)}


@dataclass
class Args:
    ranks: int = 8
    """N GPUs, one rank each (1: one process, no sharding)"""
    gpu_gb: float = 80.0
    """memory of one card, GB"""
    margin: float = 0.10
    """share of the card kept free for the CUDA context, NCCL buffers and fragmentation"""
    models: tuple[str, ...] = tuple(CONFIGS)
    rows_per_rank: int = 128
    """rollout rows decoded at once per rank (prompts x samples / N; 64 x 16 / 8 = 128)"""
    cache_tokens: int = 2048
    """KV cache length: prompt + new tokens"""
    micro_batch_tokens: int = -1
    """padded tokens per forward/backward in the update (-1: grpo.py's GPU default)"""
    ddp_max_b: float = 8.0
    """show DDP rows for models up to this many billion parameters"""
    out: str | None = None
    """also write the table to this file"""


def shapes(name: str) -> dict:
    """Exact parameter counts of a Qwen2.5 model built on the meta device, and the shape numbers the formulas need."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    H, L, heads, kv, I, V, tied = CONFIGS[name]
    config = Qwen2Config(hidden_size=H, num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=I, vocab_size=V, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    linear = {id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    return dict(P=sum(p.numel() for p in model.parameters()), Pm=sum(linear.values()), H=H, L=L, I=I, V=V,
                tied=tied, E=V * H, Pl=sum(p.numel() for p in model.model.layers[0].parameters()),
                kvd=kv * (H // heads))


def layer_bytes(s: dict) -> int:
    """Bytes autograd saves per token in one Qwen2 decoder layer (bf16, SDPA), as check_activations counts them."""
    return 20 * s["H"] + 8 * s["I"] + 4 * s["kvd"]


def check_activations() -> tuple[float, float]:
    """(counted, formula) bytes per token and layer in a small bf16 Qwen2 on the CPU: autograd's saved tensors of a
    3-layer model minus a 1-layer model's, over 2 layers, weights excluded (a check that layer_bytes is right)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def saved(layers: int, tokens: int = 256) -> int:
        config = Qwen2Config(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=704, vocab_size=512, attn_implementation="sdpa")
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        weights, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            return t
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=torch.randint(0, 512, (1, tokens)))
        return sum(seen.values())
    return (saved(3) - saved(1)) / 2 / 256, layer_bytes(dict(H=256, I=704, kvd=128))


def phases(s: dict, a: Args, setup: str) -> dict:
    """Per-rank bytes at load (old and new path), rollout and update for one setup, and what scales with rows or
    with micro-batch tokens (for the verdict)."""
    N, P, Pm, E, V = a.ranks, s["P"], s["Pm"], s["E"], s["V"]
    ref, ckpt, offload = "ref" in setup, "GC" in setup, "offload" in setup
    tokens = a.micro_batch_tokens if a.micro_batch_tokens >= 0 else K.micro_batch_tokens(-1, torch.device("cuda"))
    per_row = s["L"] * 2 * s["kvd"] * a.cache_tokens * 2 + 3 * V * 4
    per_token = (s["L"] * 2 * s["H"] + layer_bytes(s) if ckpt else s["L"] * layer_bytes(s)) + 6 * s["H"]
    chunk = 2 * K.default_chunk_size(V, "cuda") * V * 4
    if setup.startswith("FSDP2"):
        reference = 2 * P / N if ref else 0
        old = 4 * P + (4 * P if ref else 0)
        new = 4 * P / N + reference + 4 * E
        rollout = 4 * P / N + (0 if offload else 8 * P / N) + reference + 2 * P
        update = (16 * P / N + reference + 2 * 2 * s["Pl"] + 6 * s["Pl"] + 2 * E * (1 if s["tied"] else 2)
                  + 6 * E + chunk)
    else:  # DDP, or one process
        buckets = 4 * P if setup.startswith("DDP") else 0
        reference = 2 * (Pm - E) + 4 * (P - Pm + E) if ref else 0  # frozen: bf16 matmuls, the head kept fp32
        old = new = 4 * P + (4 * P if ref else 0)
        rollout = 4 * P + (0 if offload else 8 * P) + buckets + 2 * Pm + reference
        kept = 2 * Pm + a.rows_per_rank * per_row  # the decode state stays (--decode-memory keep)
        update = 16 * P + reference + 2 * Pm + 4 * E + chunk + kept
    return dict(old=old, new=new, rollout=rollout, per_row=per_row, update=update, per_token=per_token,
                tokens=tokens)


def verdict(ph: dict, a: Args) -> str:
    """'yes', or what has to shrink (rows per rank, micro-batch tokens) or cannot fit at all."""
    usable = a.gpu_gb * 1e9 * (1 - a.margin)
    problems = []
    if ph["new"] > usable:
        problems.append("load: no")
    if ph["rollout"] + a.rows_per_rank * ph["per_row"] > usable:
        rows = int((usable - ph["rollout"]) // ph["per_row"])
        problems.append(f"rollout: <= {rows} rows/rank" if rows >= 1 else
                        f"rollout: no ({gb(ph['rollout'])} GB before the KV cache)")
    if ph["update"] + ph["tokens"] * ph["per_token"] > usable:
        tokens = int((usable - ph["update"]) // ph["per_token"]) // 256 * 256
        problems.append(f"update: <= {tokens:,} tokens/micro-batch" if tokens >= 256 else
                        f"update: no ({gb(ph['update'])} GB before the activations)")
    return "yes" if not problems else "; ".join(problems)


def setups(s: dict, a: Args) -> list[str]:
    if a.ranks == 1:
        return ["1 GPU", "1 GPU + ref", "1 GPU + ref + GC", "1 GPU + ref + GC + offload"]
    ddp = ["DDP", "DDP + ref"] if s["P"] <= a.ddp_max_b * 1e9 else []
    return ddp + ["FSDP2", "FSDP2 + ref", "FSDP2 + ref + GC", "FSDP2 + ref + GC + offload"]


def gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def main(a: Args):
    import transformers

    counted, formula = check_activations()
    lines = [f"### GRPO per-rank GPU memory on {a.ranks} x {a.gpu_gb:g} GB: computed, not measured", "",
             f"`{' '.join(['python bench/memory_table.py', *sys.argv[1:]])}`: torch {torch.__version__}, transformers "
             f"{transformers.__version__}. GB = 1e9 bytes; {a.rows_per_rank} rollout rows per rank x "
             f"{a.cache_tokens} cache tokens; fits = peak <= {1 - a.margin:.0%} of the card.", "",
             "| model | P | setup | load old -> new | rollout | update | peak | fits? |",
             "|---|---|---|---|---|---|---|---|"]
    for name in a.models:
        s = shapes(name)
        for setup in setups(s, a):
            ph = phases(s, a, setup)
            rollout = ph["rollout"] + a.rows_per_rank * ph["per_row"]
            update = ph["update"] + ph["tokens"] * ph["per_token"]
            load = gb(ph["new"]) if ph["old"] == ph["new"] else f"{gb(ph['old'])} -> {gb(ph['new'])}"
            lines.append(f"| {name} | {s['P'] / 1e9:.3f}B | {setup} | {load} | {gb(rollout)} | {gb(update)} | "
                         f"{gb(max(ph['new'], rollout, update))} | {verdict(ph, a)} |")
    tokens = phases(shapes(a.models[0]), a, "FSDP2")["tokens"]
    lines += ["", f"Setups: ref = a KL reference (beta > 0); GC = --gradient-checkpointing; offload = "
              "--offload-optimizer (AdamW state on the CPU during the rollout). Peak = the largest of load (new "
              f"path; DDP and one GPU have one: a full copy), rollout and update. Update: one micro-batch of {tokens:,} tokens. Activations: "
              f"(20H + 8I + 4kvd) bytes per token and layer (autograd's saved tensors in a bf16 Qwen2 layer, "
              f"counted here on the CPU: {counted:,.0f} bytes vs the formula's {formula:,}). Not counted: the "
              "log-prob passes before the update (forward only, smaller than the update), the one module "
              "gathered at a time while the rollout copy is refreshed, host memory (the old load path holds "
              "4P of CPU RAM per rank, the new one 2P on rank 0 only)."]
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(table)


if __name__ == "__main__":
    main(tyro.cli(Args))
