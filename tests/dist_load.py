"""Helper for test_rl_kernels: load_model(shard=True) under torchrun (2 ranks, gloo): a trainable fp32 model and a
frozen bf16 reference, each built on the meta device and filled from rank 0. Saves, per rank, the bytes of the model's
parameters that were materialised when FSDP2 sharded it, the local shard bytes after loading, the full state dict,
the buffers, the EOS ids and the log-probs of a fixed batch; and the state and log-probs of the same model loaded whole
and then sharded (wrap_model), the way it was loaded before; and a checkpoint with fewer embedding rows than its
tokenizer (OUT_DIR/short), which the meta-device model is resized for.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/dist_load.py MODEL_DIR OUT_DIR
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_kernels as K  # noqa: E402
import rl_runs as runs  # noqa: E402
from conftest import left_padded_batch  # noqa: E402

model_dir, out_dir = sys.argv[1], sys.argv[2]
info = runs.init_distributed("cpu")
seen = []
wrap = K.wrap_model


def counting_wrap(model, *args, **kwargs):  # what exists on the device at the moment the model is sharded
    seen.append(sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta))
    return wrap(model, *args, **kwargs)


K.wrap_model = counting_wrap


def full(model) -> dict:  # every rank's own view of the whole model (K.full_state_dict gives rank 0 alone)
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in K.unwrap(model).named_parameters()}


out = {}
for name, kw in (("policy", {}), ("reference", dict(dtype="bfloat16", frozen=True))):
    model, tokenizer = K.load_model(model_dir, device="cpu", shard=True, **kw)
    ids, mask = left_padded_batch([9, 5, 7], vocab_size=len(tokenizer), seed=2)
    out[name] = {"bytes_at_sharding": seen[-1], "fsdp": K._is_fsdp(model),
                 "local_bytes": sum(p.to_local().numel() * p.element_size() for p in model.parameters()),
                 "state": full(model), "buffers": {n: b.clone() for n, b in model.named_buffers()},
                 "eos": K.eos_token_ids(model), "compute": K.compute_dtype(model),
                 "logprobs": K.token_logprobs(model, ids, mask).detach()}
    # the old way, for comparison: each rank loads the whole model, then shards it
    old = K.wrap_model(K.load_model(model_dir, device="cpu", **kw)[0], "fsdp")
    out[name]["old_state"], out[name]["old_logprobs"] = full(old), K.token_logprobs(old, ids, mask).detach()
short, tokenizer = K.load_model(os.path.join(out_dir, "short"), device="cpu", shard=True)  # fewer rows than tokens
out["short"] = {"rows": full(short)["model.embed_tokens.weight"].shape[0], "state": full(short)}
torch.save(out, os.path.join(out_dir, f"load_rank{info.rank}.pt"))
runs.close_distributed()
