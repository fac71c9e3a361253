"""Helper for test_decoding: rl_kernels.generate on a tiny GQA model under torchrun with FSDP2, or in one process
(strategy none), each rank sampling its share of the prompts; saves the samples and the all-gathers each call ran."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_kernels as K  # noqa: E402
import rl_runs as runs  # noqa: E402
from conftest import left_padded_batch, tiny_causal_lm  # noqa: E402

strategy, out_dir = sys.argv[1], sys.argv[2]
info = runs.init_distributed("cpu")
gathers = []
for name in ("all_gather_single", "all_gather_into_tensor", "all_gather"):  # FSDP2 unshards with the first there is
    if not hasattr(dist, name):  # torch 2.11 has no all_gather_single
        continue

    def counting(*args, _original=getattr(dist, name), **kwargs):
        gathers.append(1)
        return _original(*args, **kwargs)
    setattr(dist, name, counting)

model = K.wrap_model(tiny_causal_lm(num_attention_heads=8, num_key_value_heads=2), strategy)
ids, mask = left_padded_batch([7, 3, 11, 5])
prompts = slice(info.rank * 4 // info.world_size, (info.rank + 1) * 4 // info.world_size)
S = 3
keys = (torch.arange(4 * S).view(4, S)[prompts] + 100).flatten()  # keyed by global row: rank-invariant samples
out = {}
for max_new_tokens in (4, 16):
    before = len(gathers)
    gen = K.generate(model, ids[prompts], mask[prompts], max_new_tokens=max_new_tokens, num_samples=S,
                     eos_token_id=7, pad_token_id=0, noise_keys=keys)
    out[max_new_tokens] = {"tokens": gen.tokens, "logprobs": gen.logprobs, "gathers": len(gathers) - before}
K.free_decode_state(model)
out["fsdp_modules"] = sum(type(m).__name__.startswith("FSDP") for m in model.modules())
out["sharded_after"] = all(type(p).__name__ == "DTensor" for p in model.parameters()) if strategy == "fsdp" else None
torch.save(out, os.path.join(out_dir, f"generate_{strategy}_rank{info.rank}.pt"))
runs.close_distributed()
