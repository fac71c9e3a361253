"""Helper for test_kernels: two AdamW steps on a fixed batch, each rank taking its share of the rows.

Run under torchrun (strategy ddp | fsdp) or as one process (strategy none); saves the full parameters.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as K  # noqa: E402
from conftest import left_padded_batch, tiny_causal_lm  # noqa: E402

strategy, out_dir = sys.argv[1], sys.argv[2]
info = K.init_distributed("cpu")
model = tiny_causal_lm(tie=True).train()
model = K.wrap_model(model, strategy)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids, mask = left_padded_batch([9, 4, 7, 6], seed=3)
old = torch.randn(4, 8, generator=torch.Generator().manual_seed(4)) * 0.1 - 4
adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
rows = slice(info.rank * 4 // info.world_size, (info.rank + 1) * 4 // info.world_size)
for _ in range(2):
    lp = K.token_logprobs(model, ids[rows], mask[rows])  # (b, 8)
    loss, _ = K.policy_loss(lp, old[rows], adv[rows], mask[rows, 1:], loss_agg="seq-mean-token-mean")
    opt.zero_grad()
    loss.backward()
    opt.step()
# every rank's own view of the full parameters (FSDP2 shards are gathered with full_tensor)
state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
         for n, p in K.unwrap(model).named_parameters()}
torch.save(state, os.path.join(out_dir, f"params_{strategy}_rank{info.rank}.pt"))
if K.is_distributed():
    torch.distributed.destroy_process_group()
