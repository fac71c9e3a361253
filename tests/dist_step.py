"""Helper for test_rl_kernels: two AdamW steps on a fixed batch, each rank taking its share of the rows.

Run under torchrun (strategy ddp | fsdp) or as one process (strategy none); saves the full parameters.
A third argument "micro" makes each rank accumulate its rows one micro-batch at a time, syncing gradients only in
the last backward (rl_kernels.no_grad_sync).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_kernels as K  # noqa: E402
import rl_runs as runs  # noqa: E402
from conftest import left_padded_batch, tiny_causal_lm  # noqa: E402

strategy, out_dir = sys.argv[1], sys.argv[2]
info = runs.init_distributed("cpu")
model = tiny_causal_lm(tie=True).train()
model = K.wrap_model(model, strategy)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids, mask = left_padded_batch([9, 4, 7, 6], seed=3)
old = torch.randn(4, 8, generator=torch.Generator().manual_seed(4)) * 0.1 - 4
adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
rows = slice(info.rank * 4 // info.world_size, (info.rank + 1) * 4 // info.world_size)
micro = len(sys.argv) > 3 and sys.argv[3] == "micro"
mine = list(range(4))[rows]
parts = [[r] for r in mine] if micro else [mine]
for _ in range(2):
    opt.zero_grad()
    for i, part in enumerate(parts):
        with K.no_grad_sync(model, skip=i < len(parts) - 1):
            lp = K.token_logprobs(model, ids[part], mask[part])  # (b, 8)
            loss, _ = K.policy_loss(lp, old[part], adv[part], mask[part, 1:], loss_agg="seq-mean-token-mean")
            (loss * len(part) / len(mine)).backward()
    opt.step()
# every rank's own view of the full parameters (FSDP2 shards are gathered with full_tensor)
state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
         for n, p in K.unwrap(model).named_parameters()}
torch.save(state, os.path.join(out_dir, f"params_{strategy}{'_micro' if micro else ''}_rank{info.rank}.pt"))
del model, opt, lp, loss
runs.close_distributed()
