"""Mixed precision on CPU (bf16 autocast stands in for a GPU's): fp32 master weights that learn at real-LLM learning
rates, bf16 compute, fp32 log-probs from the output layer in the sampler and the trainer, fp32 checkpoints."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch, tiny_causal_lm

import grpo
import rl_kernels as K
import rl_runs as runs
import rlvr_rewards as env
import toy_world as toy

TOY = toy.TOY_BASE


def _weights(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.slow
def test_bf16_run_at_a_real_llm_learning_rate_moves_the_weights_like_fp32(tmp_path):
    """GRPO on the toy model at lr 1e-6 for 4 steps of 16 prompts x 8 samples: the bf16 run (fp32 master weights)
    changes the weights by the fp32 run's amount (norm within 2x) in its direction (cosine >= 0.9), and its
    checkpoint holds fp32 weights; the control, pure bf16 (AdamW on bf16 weights), rounds the ~1e-6 updates to whole
    bf16 steps of weights of ~0.02 (cosine ~0, a change far too large). The batch is the default run's: AdamW's first
    updates are about lr * sign(g), so each weight whose gradient is below bf16's rounding noise moves a full lr in a
    random direction, and with 8 x 4 samples on the rebuilt toy base that alone held the cosine at 0.67."""
    kw = dict(model="toy", max_steps=4, prompts_per_step=16, num_generations=8, max_new_tokens=32, eval_every=0,
              lr=1e-6, warmup_steps=0, device="cpu", plot=False)
    cases = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
            "pure_bf16": dict(dtype="bfloat16", master_dtype="bfloat16")}
    for name, precision in cases.items():
        grpo.main(grpo.Args(**kw, **precision, out_dir=str(tmp_path / name)))
    start = _weights(TOY)
    changes = {}
    for name in cases:
        final = _weights(str(tmp_path / name / "final"))
        if name != "pure_bf16":
            assert all(v.dtype == torch.float32 for v in final.values()), name  # the master weights
        changes[name] = torch.cat([(final[k].float() - start[k].float()).flatten() for k in sorted(start)])
    fp32 = changes["float32"]
    assert fp32.norm() > 0
    measured = {name: (F.cosine_similarity(fp32, changes[name], dim=0).item(), (changes[name].norm() / fp32.norm()).item())
                for name in ("bfloat16", "pure_bf16")}
    print("cosine and norm ratio of the weight changes against fp32:", measured)
    cosine, ratio = measured["bfloat16"]
    assert cosine >= 0.9 and 0.5 <= ratio <= 2.0
    control_cosine, control_ratio = measured["pure_bf16"]
    assert control_cosine < 0.2 and not 0.5 <= control_ratio <= 2.0  # what the bounds above tell apart


def test_load_model_keeps_fp32_masters_and_computes_in_bf16(tmp_path):
    """--dtype is the compute dtype: the weights stay fp32 (or bf16 with master_dtype=bfloat16, pure bf16), the
    forward's matmuls run in bf16, gradients are fp32, and a checkpoint saves the fp32 weights, which load back into
    a bf16-compute model. A compute dtype finer than the weights is refused."""
    model, _ = K.load_model(TOY, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert K.compute_dtype(model) == torch.bfloat16
    ids, mask = left_padded_batch([9, 5], vocab_size=100)
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    K.token_logprobs(model.train(), ids, mask).sum().backward()
    handle.remove()
    assert seen == [torch.bfloat16]
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    clone = copy.deepcopy(model)  # its autocast forward cases the clone, not the original
    with torch.no_grad():
        clone.model.norm.weight.mul_(2)
        assert not torch.equal(clone(ids).logits, model(ids).logits) and clone(ids).logits.dtype == torch.bfloat16
    path = runs.save_checkpoint(str(tmp_path), 1, model)
    assert {v.dtype for v in _weights(path).values()} == {torch.float32}
    again, _ = K.load_model(path, dtype="bfloat16", device="cpu")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)

    pure, _ = K.load_model(TOY, dtype="bfloat16", master_dtype="bfloat16", device="cpu")
    assert {p.dtype for p in pure.parameters()} == {torch.bfloat16} and "forward" not in pure.__dict__
    with pytest.raises(ValueError, match="finer than the weights"):
        K.load_model(TOY, dtype="float32", master_dtype="bfloat16", device="cpu")


def test_frozen_model_computes_what_the_trainable_one_does():
    """A frozen model (a KL reference) keeps only bf16 matmul weights (the tied output layer aside), yet under
    autocast its log-probs are the fp32-master model's exactly: autocast rounds the same weights to bf16 the same
    way. So beta*KL starts at 0, and grpo's reference reset copies parameter to parameter."""
    trainable, _ = K.load_model(TOY, dtype="bfloat16", device="cpu")
    frozen, _ = K.load_model(TOY, dtype="bfloat16", device="cpu", frozen=True)
    assert frozen.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert frozen.model.embed_tokens.weight.dtype == torch.float32
    assert frozen.lm_head.weight is frozen.model.embed_tokens.weight  # still tied: parameters() pair up one to one
    assert [n for n, _ in frozen.named_parameters()] == [n for n, _ in trainable.named_parameters()]
    ids, mask = left_padded_batch([12, 7, 10], vocab_size=100)
    with torch.no_grad():
        assert torch.equal(K.token_logprobs(trainable, ids, mask), K.token_logprobs(frozen, ids, mask))


def test_bf16_log_probs_come_from_fp32_logits_in_the_sampler_and_the_trainer(monkeypatch):
    """In bf16 compute, generate's and token_logprobs' log-probs come from fp32 logits, never rounded to bf16.

    The trainer's equal log_softmax of fp32 logits from the same hidden states (the head's inputs rounded to bf16,
    their products summed in fp32) within 1e-4 nats: the same forward, the same kernels. The sampler's each step
    are log_softmax of the fp32 logits it sampled from, and those logits are not bf16 values. Sampler and trainer
    then differ only where the KV-cache decode path's bf16 kernels round the hidden states differently from the
    full forward's, which depends on the CPU (this machine, AMD EPYC with avx512_bf16: 9.1e-4 nats). So that gap is
    bounded by what the same CPU's bf16 costs: an eighth of the error of bf16-rounded logits (here 4.1e-2, ~0.03-0.06
    on the toy model). That rounding, the old head's, is what makes pi_old and pi_theta disagree on a GPU."""
    calls = []
    sample_tokens = K.sample_tokens

    def recorded(logits, **kw):
        drawn = sample_tokens(logits, **kw)
        calls.append((logits.clone(), drawn.tokens, drawn.logprobs))
        return drawn

    monkeypatch.setattr(K, "sample_tokens", recorded)
    model, tokenizer = K.load_model(TOY, dtype="bfloat16", device="cpu")
    rows = env.load_prompts("arithmetic", "train", 64, 0)[:8]
    rollout = env.sample(model, tokenizer, rows, num_samples=4, max_new_tokens=32, temperature=1.0,
                       noise_keys=K.rollout_noise_keys(0, 0, 0, list(range(8)), 4))
    for logits, token, logprob in calls:  # temperature 1, no truncation: log_softmax of the logits as they are
        assert logits.dtype == torch.float32 and (logits != logits.to(torch.bfloat16).float()).float().mean() > 0.5
        assert torch.allclose(logprob, logits.log_softmax(-1).gather(-1, token[:, None])[:, 0], rtol=0, atol=1e-5)
    gen, n = rollout.gen, rollout.gen.tokens.shape[1]
    ids = torch.cat([rollout.prompt_ids, gen.tokens], 1)
    mask = torch.cat([rollout.prompt_mask, gen.mask], 1)
    with torch.no_grad():
        trainer = K.token_logprobs(model, ids, mask, last_n=n)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids, attention_mask=mask,
                                 position_ids=K.position_ids_from_mask(mask)).last_hidden_state[:, -n - 1:-1]
        weight = model.get_output_embeddings().weight.to(torch.bfloat16)
        logits = F.linear(hidden.to(torch.bfloat16).float(), weight.float())  # (R, n, V) fp32
        exact = logits.log_softmax(-1).gather(-1, gen.tokens[..., None])[..., 0]
        rounded = logits.to(torch.bfloat16).float().log_softmax(-1).gather(-1, gen.tokens[..., None])[..., 0]
    live = gen.mask.bool()
    trainer_error = (trainer - exact)[live].abs().max().item()
    sampler_error = (gen.logprobs - exact)[live].abs().max().item()
    sampler_vs_trainer = (gen.logprobs - trainer)[live].abs().max().item()
    bf16_logits_error = (rounded - exact)[live].abs().max().item()
    print(f"max |error| nats: trainer {trainer_error:.2e}, sampler {sampler_error:.2e}, sampler vs trainer "
          f"{sampler_vs_trainer:.2e}; bf16 logits would be off by {bf16_logits_error:.2e}")
    assert bf16_logits_error > 1e-2  # the rounding the fp32 head avoids is visible at this model's logits
    assert trainer_error < 1e-4
    assert sampler_error < bf16_logits_error / 8 and sampler_vs_trainer < bf16_logits_error / 8


def _round_bf16(x):
    """x rounded to bf16 in value, with the gradient passed straight through in fp32."""
    return x + (x.to(torch.bfloat16).float() - x).detach()


def test_fused_bf16_gradients_match_the_fp32_head_reference():
    """The chunked backward in bf16 compute (fp32 masters under autocast) gives the gradients of the plain head in
    fp32 on the bf16-rounded operands (gradients passed straight through the rounding): values and gradients,
    several chunks, a temperature."""
    model = tiny_causal_lm(vocab_size=301, tie=True).train()
    K.set_precision(model, "bfloat16")
    ids, mask = left_padded_batch([13, 6, 9], vocab_size=301)
    out = []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            lp = K.token_logprobs(model, ids, mask, chunk_size=8, temperature=0.7)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = model.model(input_ids=ids, attention_mask=mask,
                                     position_ids=K.position_ids_from_mask(mask)).last_hidden_state[:, :-1]
            logits = F.linear(_round_bf16(hidden), _round_bf16(model.lm_head.weight)) / 0.7
            lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        (lp * mask[:, 1:]).sum().backward()
        out.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_bf16_reference_starts_and_resets_at_zero_kl(tmp_path):
    """GRPO in bf16 compute with a KL reference reset from the policy after every step: the frozen reference (bf16
    matmul weights) computes what the fp32-master policy computes, so the KL is 0 at the first step and again after
    each reset (the reset copies parameter to parameter). REINFORCE++'s k1 KL in the reward cases too, with pi_old
    recomputed by the trainer (the bf16 sampler's numerics are not the trainer's)."""
    from test_grpo import small_args
    from test_decoding import _tiny_model_dir

    model_dir = _tiny_model_dir(tmp_path / "model")
    grpo.main(small_args(model_dir, tmp_path / "grpo", dtype="bfloat16", kl_coef=0.04, ref_reset_every=1,
                         max_steps=2, eval_every=0, rewards=("tag_count", "task"), reward_weights=(1.0, 1.0)))
    rows = runs.read_metrics(str(tmp_path / "grpo"))
    assert [r["train/kl"] for r in rows] == [pytest.approx(0.0, abs=1e-6)] * 2
    grpo.main(small_args(model_dir, tmp_path / "rpp", preset="reinforce_pp", dtype="bfloat16", max_steps=1,
                         eval_every=0))
    assert runs.read_metrics(str(tmp_path / "rpp"))[-1]["step"] == 1
