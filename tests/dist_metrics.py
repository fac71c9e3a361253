"""Helper for test_rl_kernels: one optimizer step's train/ stats under torchrun equal one process's over the whole
minibatch, when the ranks hold very different numbers of loss tokens (rank 0: three long rows, rank 1: two short
rows and one whose loss_mask is all zero, as DAPO's overlong filter leaves a truncated response).

Also the rollout metrics that are means over a subset of the rows (correct responses, those a reward applies to), and
the sampler-trainer mismatch/ metrics (means over tokens and over sequences, extremes).

Run under torchrun (saves metrics_rank{R}.json) or as one process with "none" (saves metrics_none.json): the
scripts' path, accumulate_gradients -> guarded_step -> reduce_metrics.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_kernels as K  # noqa: E402
import rl_runs as runs  # noqa: E402
import rlvr_rewards as env  # noqa: E402
from conftest import left_padded_batch, tiny_causal_lm  # noqa: E402

strategy, out_dir = sys.argv[1], sys.argv[2]
info = runs.init_distributed("cpu")
model = K.wrap_model(tiny_causal_lm().train(), "ddp")  # a no-op in one process
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
prompt_ids, prompt_mask = left_padded_batch([3, 3, 3, 3, 3, 3], seed=1)
tokens = torch.randint(3, 97, (6, 12), generator=torch.Generator().manual_seed(2))
lengths = torch.tensor([12, 11, 12, 2, 7, 1])
mask = (torch.arange(12) < lengths[:, None]).long()
loss_mask = mask.clone()
loss_mask[4] = 0  # a truncated response the overlong filter masks: not one of the loss's tokens
old = torch.randn(6, 12, generator=torch.Generator().manual_seed(4)) * 0.3 - 4.5
batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "tokens": tokens, "mask": mask,
         "loss_mask": loss_mask, "old_logprobs": old, "advantages": torch.tensor([1.0, -0.5, 0.3, -0.8, 0.9, 0.4])}
rows = [0, 1, 2] if info.rank == 0 else [3, 4, 5]
mine = {k: v[rows] for k, v in batch.items()} if strategy != "none" else batch


def micro_loss(part, share):
    logprobs, entropy = K.completion_logprobs(model, part, with_entropy=True)
    loss, stats = K.policy_loss(logprobs, part["old_logprobs"], part["advantages"], part["loss_mask"],
                                clip_low=0.2, clip_high=0.2, loss_agg="token-mean", num_tokens=share.tokens,
                                num_rows=share.rows)
    return loss, {**stats, "entropy": K.masked_mean(entropy.detach(), part["loss_mask"])}


stats = K.accumulate_gradients(model, mine, micro_loss, max_tokens=16, mask="loss_mask")  # 1-2 rows per micro-batch
values, _ = K.guarded_step(model, opt, 1.0, stats)
metrics = K.reduce_metrics(values)

# The rollout's means over a subset of its rows: rank 0 has 3 correct responses of lengths 12, 11, 12, rank 1 one
# of length 1 (and two incorrect); a reward that applies to 2 responses on rank 0 and 1 on rank 1.
gen = K.Generation(tokens, mask, lengths >= 12, torch.zeros(6, 12))
rollout = env.Rollout(prompt_ids, prompt_mask, gen, [f"answer {i}" for i in range(6)], [{}] * 6,
                      rewards=torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0]),
                      per_reward={"judge": [0.5, None, 1.0, None, None, 0.25]},
                      correct=[True, True, True, False, False, True])
if strategy != "none":
    rollout = rollout.select(rows)
metrics.update(env.finish_reward_std(K.reduce_metrics(env.rollout_metrics(rollout),
                                                      weights=env.rollout_metric_weights(rollout))))
# The sampler-trainer mismatch metrics and a correction's: means over every rank's tokens (and sequences)
sampler = old + 0.2 * torch.randn(6, 12, generator=torch.Generator().manual_seed(5))
kept = -0.1 * torch.rand(6, 12, generator=torch.Generator().manual_seed(6))
part = {"s": sampler, "o": old, "m": mask, "k": kept}
part = {k: v[rows] for k, v in part.items()} if strategy != "none" else part
metrics.update(K.mismatch_metrics(part["s"], part["o"], part["m"], part["k"]))
weights, keep = K.rollout_correction(part["o"] - part["s"], part["m"], K.Correction(
    "token", "truncate", 0.8, 1.2, ("seq_max_k3",), ("0.08",)))
metrics.update(K.correction_metrics(weights, keep, part["m"]))
name = f"metrics_rank{info.rank}.json" if strategy != "none" else "metrics_none.json"
with open(os.path.join(out_dir, name), "w") as f:
    json.dump(metrics, f)
runs.close_distributed()
