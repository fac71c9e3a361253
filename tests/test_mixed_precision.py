"""Mixed precision on CPU (bf16 autocast stands in for a GPU's): fp32 master weights that learn at real-LLM learning
rates, bf16 compute, fp32 log-probs from the output layer in the sampler and the trainer, fp32 checkpoints."""

import copy
import math
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


# ---------------------------------------------------------------------------------------------------------
# fp16 compute: the dynamic loss scale (issue 23)
# ---------------------------------------------------------------------------------------------------------


class _RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients its last step read (guarded_step frees them after the step)."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def _toy_linear(dtype: str):
    torch.manual_seed(0)
    model = K.set_precision(torch.nn.Linear(8, 4), dtype)
    return model, _RecordingSGD(model.parameters(), lr=0.1)


def _toy_step(model, optimizer, state, factor: float = 1.0):
    """One guarded step of the toy linear layer on a fixed input; the loss times `factor`. Returns guarded_step's."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    loss = model(x).float().pow(2).mean() * factor
    K.scale_loss(model, loss, state).backward()
    return K.guarded_step(model, optimizer, 0.0, {"loss": loss.detach()}, state=state)


def test_loss_scale_keeps_gradients_fp16_would_flush_and_is_divided_out_exactly():
    """fp16 compute, a loss of ~1e-8: without a scale the fp16 activation gradient underflows and the weight gradient
    is 0; with S = 2^16 it survives, and the optimizer sees the fp32 reference's gradient up to fp16's rounding. At
    an ordinary loss the scale is divided out exactly (S is a power of two): the unscaled fp16 gradient bit for bit."""
    tiny = 2.0 ** -24  # dL/dy ~ 1e-9: under half fp16's smallest subnormal (6e-8); S = 2^16 lifts it to ~1e-4
    scaled_model, scaled_opt = _toy_linear("float16")
    _, stepped = _toy_step(scaled_model, scaled_opt, {}, tiny)
    assert stepped
    plain_model, plain_opt = _toy_linear("float16")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    (plain_model(x).float().pow(2).mean() * tiny).backward()  # no scale
    assert plain_model.weight.grad.abs().max() == 0
    reference, _ = _toy_linear("float32")
    (reference(x).pow(2).mean() * tiny).backward()
    error = (scaled_opt.seen[0] - reference.weight.grad).norm() / reference.weight.grad.norm()
    assert error < 1e-2  # fp16's rounding of x, w and dL/dy

    model, opt = _toy_linear("float16")
    values, _ = _toy_step(model, opt, {})
    assert values["loss_scale"] == K.LOSS_SCALE_INIT
    unscaled, _ = _toy_linear("float16")
    unscaled(x).float().pow(2).mean().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(opt.seen, unscaled.parameters()))


def test_loss_scale_grows_backs_off_on_overflow_and_leaves_nan_patience_to_real_nans(monkeypatch):
    """A toy optimizer under fp16 compute: S doubles after LOSS_SCALE_GROWTH good steps; a gradient that overflows
    at S > 1 skips the step (weights untouched), halves S, counts in skipped and leaves nan_streak as it was; at
    S = 1 the same overflow is the run's own and counts in nan_streak, S staying 1; a NaN loss counts and leaves S."""
    monkeypatch.setattr(K, "LOSS_SCALE_GROWTH", 3)
    model, opt = _toy_linear("float16")
    state = {"skipped": 0, "nan_streak": 0}
    for i in range(3):
        values, stepped = _toy_step(model, opt, state)
        assert stepped and values["loss_scale"] == K.LOSS_SCALE_INIT
    assert state["loss_scale"] == 2 * K.LOSS_SCALE_INIT and state["loss_scale_good_steps"] == 0
    _toy_step(model, opt, state)
    assert state["loss_scale_good_steps"] == 1

    state["nan_streak"] = 1  # an earlier NaN: an overflow must neither add to the streak nor end it
    before = [p.detach().clone() for p in model.parameters()]
    huge = 1e3  # dL/dy ~ 1e2 fits fp16; times S = 2^17 it does not
    values, stepped = _toy_step(model, opt, state, huge)
    assert not stepped and not math.isfinite(values["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert state["loss_scale"] == K.LOSS_SCALE_INIT and state["loss_scale_good_steps"] == 0
    assert state["skipped"] == 1 and state["nan_streak"] == 1

    state["loss_scale"] = 1.0
    values, stepped = _toy_step(model, opt, state, 1e6)  # past 65504 with no scale at all
    assert not stepped and values["loss_scale"] == 1.0
    assert state["loss_scale"] == 1.0 and state["skipped"] == 2 and state["nan_streak"] == 2

    state["loss_scale"] = 4.0
    _, stepped = _toy_step(model, opt, state, math.nan)
    assert not stepped and state["loss_scale"] == 4.0 and state["nan_streak"] == 3
    _, stepped = _toy_step(model, opt, state)
    assert stepped and state["nan_streak"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp32_and_bf16_are_never_scaled(dtype):
    """Only fp16 compute scales: under fp32 and bf16 scale_loss hands back the loss itself, and the run's state and
    guarded_step's stats gain no loss_scale."""
    model, opt = _toy_linear(dtype)
    state = {"skipped": 0, "nan_streak": 0}
    loss = model(torch.randn(3, 8)).float().sum()
    assert K.scale_loss(model, loss, state) is loss and K.loss_scale(model, state) == 1.0
    loss.backward()
    values, stepped = K.guarded_step(model, opt, 1.0, {"loss": loss.detach()}, state=state)
    assert stepped and "loss_scale" not in values and state == {"skipped": 0, "nan_streak": 0}


def test_fp16_needs_fp32_master_weights():
    """fp16 compute on bf16 weights is refused in one sentence (the scale could not be divided out of bf16
    gradients without flushing the small ones it kept)."""
    with pytest.raises(K.UserError, match="float16 needs float32 master weights"):
        K.resolve_precision("float16", "bfloat16", torch.device("cpu"))
    assert K.resolve_precision("float16", "float32", torch.device("cpu")) == (torch.float16, torch.float32)


def test_the_head_probe_tells_an_fp32_sum_from_an_fp16_one(monkeypatch):
    """The fp16 output layer is kept in fp16 only where a matmul sums its products in fp32: the probe accepts a
    widening matmul and refuses one that sums in fp16 (CPU: neither exists, the head is widened to fp32, and the
    products of the fp16-rounded values are the same)."""
    monkeypatch.setattr(K, "_mm_fp32_out", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(K, "_addmm_fp32_out_", lambda acc, a, b: acc.addmm_(a.float(), b.float()))
    assert K._probe_bf16_head("cpu", torch.float16) and K._probe_bf16_head("cpu", torch.bfloat16)
    monkeypatch.setattr(K, "_mm_fp32_out", lambda a, b: (a @ b).float())
    monkeypatch.setattr(K, "_addmm_fp32_out_", lambda acc, a, b: acc.add_((a @ b).float()))
    assert not K._probe_bf16_head("cpu", torch.float16)
    weight = torch.randn(7, 5)
    head = K.head_weight(weight, torch.float16)
    assert K.bf16_head(torch.device("cpu"), torch.float16) is False and head.dtype == torch.float32
    assert torch.equal(head, weight.half().float())


def _fp16_args(model_dir, out_dir, **kw):
    from test_grpo import small_args

    base = dict(dtype="float16", eval_every=0, rewards=("tag_count", "task"), reward_weights=(1.0, 1.0),
                num_iterations=2, num_minibatches=4)  # 8 optimizer steps per rollout step
    return small_args(model_dir, out_dir, **{**base, **kw})


def test_fp16_grpo_trains_and_survives_an_injected_overflow(tiny_model_dir, tmp_path, monkeypatch):
    """GRPO with fp16 compute on CPU (sampling, fused log-probs, update): finite losses, train/loss_scale logged and
    the weights changed (fp32 masters in the checkpoint). Started at S = 2^26 (far past what the tiny model's fp16
    gradients fit), with --nan-patience 1: the first steps overflow, are skipped and halve S, and the run goes on to
    take steps (an overflow counted as a NaN would have stopped it). bf16 logs no loss scale."""
    from safetensors.torch import load_file

    grpo.main(_fp16_args(tiny_model_dir, tmp_path / "fp16", max_steps=2))
    rows = runs.read_metrics(str(tmp_path / "fp16"))
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[-1]["train/loss_scale"] == K.LOSS_SCALE_INIT and rows[-1]["train/skipped_updates"] == 0
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    final = load_file(tmp_path / "fp16" / "final" / "model.safetensors")
    assert {v.dtype for v in final.values()} == {torch.float32}
    assert any(not torch.equal(final[k], init[k]) for k in init)

    monkeypatch.setattr(K, "LOSS_SCALE_INIT", 2.0 ** 26)
    grpo.main(_fp16_args(tiny_model_dir, tmp_path / "overflow", max_steps=2, nan_patience=1))
    first, second = runs.read_metrics(str(tmp_path / "overflow"))
    assert first["train/skipped_updates"] > 0 and second["train/loss_scale"] < first["train/loss_scale"] < 2.0 ** 26
    assert second["train/skipped_updates"] < 16  # steps were taken
    final = load_file(tmp_path / "overflow" / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], init[k]) for k in init)

    grpo.main(_fp16_args(tiny_model_dir, tmp_path / "bf16", dtype="bfloat16", max_steps=1, save_every=1))
    assert all("train/loss_scale" not in r for r in runs.read_metrics(str(tmp_path / "bf16")))
    extra = torch.load(tmp_path / "bf16" / "checkpoint-1" / "trainer_state.pt", weights_only=True)["extra"]
    assert not any(k.startswith("loss_scale") for k in extra)


def test_fp16_resume_is_bit_exact_with_the_loss_scale_restored(tiny_model_dir, tmp_path, monkeypatch):
    """Stopping an fp16 run after 3 steps and resuming to 4 ends with exactly the parameters and the loss-scale
    trace of a 4-step run. S starts at 2^26, so the first step's overflows bring it down: a resume that restarted S
    from 2^26 instead of the checkpoint's would skip those steps again and end elsewhere."""
    from safetensors.torch import load_file

    monkeypatch.setattr(K, "LOSS_SCALE_INIT", 2.0 ** 26)
    grpo.main(_fp16_args(tiny_model_dir, tmp_path / "straight", max_steps=4))
    parts = tmp_path / "parts"
    grpo.main(_fp16_args(tiny_model_dir, parts, max_steps=3, save_every=3))
    extra = torch.load(parts / "checkpoint-3" / "trainer_state.pt", weights_only=True)["extra"]
    assert extra["loss_scale"] < 2.0 ** 26
    grpo.main(_fp16_args(tiny_model_dir, parts, max_steps=4, resume=True))
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(parts / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    trace = [[(r["train/loss_scale"], r["train/skipped_updates"], r["train/loss"]) for r in runs.read_metrics(str(d))]
             for d in (tmp_path / "straight", parts)]
    assert trace[0][0][1] > 0 and trace[0] == trace[1]


def test_fp16_ppo_and_sft_take_scaled_steps(tmp_path):
    """PPO (policy and critic share one scale) and SFT (its own backward, through scale_loss) run two fp16 steps:
    finite losses and train/loss_scale logged."""
    import ppo
    import sft
    from test_ppo import small_args as ppo_args
    from test_sft import tiny_args

    from test_decoding import _tiny_model_dir

    policy = _tiny_model_dir(tmp_path / "policy")
    ppo.main(ppo_args(policy, tmp_path / "ppo", dtype="float16"))
    rows = runs.read_metrics(str(tmp_path / "ppo"))
    assert rows[-1]["train/loss_scale"] == K.LOSS_SCALE_INIT
    assert math.isfinite(rows[-1]["train/policy_loss"]) and math.isfinite(rows[-1]["train/value_loss"])
    result = sft.main(tiny_args(tmp_path, dtype="float16", eval_every=0, save_every=0))
    rows = [r for r in runs.read_metrics(result.out_dir) if "train/loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) and r["train/loss_scale"] > 1 for r in rows)
