"""LoRA through peft (rl_kernels section 8): only the adapter trains, decoding reads merged weights, the reference is
the base with the adapter off, checkpoints hold the adapter (final/ the merged model too), resume is exact, every
script takes the flags, and two torchrun ranks (DDP, FSDP2) equal one process."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, left_padded_batch, tiny_causal_lm

pytest.importorskip("peft", reason="LoRA needs the optional peft package (pip install peft)")

import grpo  # noqa: E402
import rl_kernels as K  # noqa: E402
import rl_runs as runs  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def lora_model(rank: int = 4, seed: int = 0, **lora):
    """A tiny Qwen2 with an adapter whose B is random (a fresh adapter's B is 0, so it would equal the base)."""
    model = tiny_causal_lm()
    K.add_lora(model, K.LoRA(rank, seed=seed, **lora))
    K.set_precision(model, torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def small_args(model_dir, out_dir, **kw):
    base = dict(model=model_dir, out_dir=str(out_dir), max_steps=2, prompts_per_step=4, num_generations=4,
                max_new_tokens=12, eval_every=0, eval_size=8, eval_samples=2, plot=False, lora_rank=4, lr=5e-3,
                rewards=("tag_count", "task"), reward_weights=(1.0, 1.0))  # tag_count: a signal from the first step
    base.update(kw)
    return grpo.Args(**base)


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------


def test_only_the_adapter_trains_and_holds_optimizer_state():
    """After add_lora only lora_A/lora_B require gradients, in fp32, and AdamW holds state for them alone; under a
    bf16 compute dtype the frozen base's matmul weights are stored in bf16 (the head and embeddings stay fp32)."""
    model = tiny_causal_lm()
    K.add_lora(model, K.LoRA(2), compute=torch.bfloat16)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * model.config.num_hidden_layers  # q k v o gate up down, A and B each
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    optimizer = K.adamw(model.parameters(), lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    ids, mask = left_padded_batch([6, 4])
    K.set_precision(model, torch.bfloat16)
    K.token_logprobs(model, ids, mask).sum().backward()
    optimizer.step()
    stated = {id(p) for p in optimizer.state}
    assert stated == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    in_plus_out = (64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64)  # q, k v, o, gate up, down
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * in_plus_out  # rank * layers


def test_a_fresh_adapter_is_the_base_and_its_init_is_seeded():
    """B starts at 0, so a new adapter's model computes the base's log-probs exactly; A comes from LoRA.seed alone
    (the same on every rank; the global RNG is not drawn from)."""
    base = tiny_causal_lm()
    ids, mask = left_padded_batch([7, 5])
    expected = K.token_logprobs(base, ids, mask)
    model = tiny_causal_lm()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    K.add_lora(model, K.LoRA(4, seed=7))
    assert torch.equal(torch.rand(1), before)  # no global draw
    assert torch.equal(K.token_logprobs(model, ids, mask), expected)
    again = K.add_lora(tiny_causal_lm(), K.LoRA(4, seed=7))
    a = model.model.layers[1].self_attn.v_proj.lora_A["default"].weight
    assert torch.equal(a, again.model.layers[1].self_attn.v_proj.lora_A["default"].weight) and a.abs().sum() > 0


def test_decoding_reads_merged_weights_equal_to_the_adapter_forward():
    """generate decodes a plain copy whose weights are W + (alpha/r) B A (no LoRA layer in it): its greedy tokens
    equal transformers' generate on the unmerged adapter model, and its sampled log-probs equal token_logprobs' (the
    adapter's own forward) within fp32 rounding; after an update the copy is merged again."""
    model = lora_model()
    ids, mask = left_padded_batch([5, 7, 3])
    out = K.generate(model, ids, mask, max_new_tokens=8, temperature=0.0, eos_token_id=[])
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert torch.equal(out.tokens, ref[:, ids.shape[1]:])
    copy = model.__dict__["_rl_generation"].copy
    assert copy is not model and not any("lora" in n for n, _ in copy.named_parameters())
    merged = model.model.layers[0].self_attn.q_proj
    delta = merged.scaling["default"] * merged.lora_B["default"].weight @ merged.lora_A["default"].weight
    assert torch.allclose(copy.model.layers[0].self_attn.q_proj.weight, merged.base_layer.weight + delta, atol=1e-6)
    sampled = K.generate(model, ids, mask, max_new_tokens=8, temperature=1.0,
                         generator=torch.Generator().manual_seed(0), eos_token_id=[])
    full, full_mask = torch.cat([ids, sampled.tokens], 1), torch.cat([mask, sampled.mask], 1)
    assert torch.allclose(K.token_logprobs(model, full, full_mask, last_n=8), sampled.logprobs, atol=1e-5)
    optimizer = K.adamw(model.parameters(), lr=0.05, weight_decay=0.0, device=torch.device("cpu"))  # fused
    K.token_logprobs(model, full, full_mask).sum().backward()
    before = copy.model.layers[0].self_attn.q_proj.weight.clone()
    K.guarded_step(model, optimizer, 1.0, {"loss": torch.tensor(0.0)})  # an update: the copy follows it
    K.generate(model, ids, mask, max_new_tokens=2, temperature=0.0, eos_token_id=[])
    assert not torch.equal(copy.model.layers[0].self_attn.q_proj.weight, before)
    delta = merged.scaling["default"] * merged.lora_B["default"].weight @ merged.lora_A["default"].weight
    assert torch.allclose(copy.model.layers[0].self_attn.q_proj.weight, merged.base_layer.weight + delta, atol=1e-6)


def test_mixed_precision_decodes_a_bf16_merged_copy():
    """Under a bf16 compute dtype the copy's adapted weights are (W + (alpha/r) B A) rounded once to bf16 from the bf16
    base and the fp32 adapter, and its sampled log-probs agree with the trainer's (bf16 autocast) within bf16 noise."""
    model = tiny_causal_lm()
    K.add_lora(model, K.LoRA(4), compute=torch.bfloat16)
    K.set_precision(model, torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    ids, mask = left_padded_batch([5, 7])
    out = K.generate(model, ids, mask, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(0),
                     eos_token_id=[])
    layer = model.model.layers[1].mlp.down_proj
    copied = model.__dict__["_rl_generation"].copy.model.layers[1].mlp.down_proj.weight
    expected = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    assert copied.dtype == torch.bfloat16 and torch.equal(copied, expected)
    full, full_mask = torch.cat([ids, out.tokens], 1), torch.cat([mask, out.mask], 1)
    trainer = K.token_logprobs(model, full, full_mask, last_n=out.tokens.shape[1])
    assert torch.allclose(trainer, out.logprobs, atol=0.1)


def test_the_reference_is_the_base_model_exactly():
    """BaseReference(policy), the policy with its adapter disabled, gives the log-probs of the base model loaded on
    its own, bit for bit, while the policy's own differ; the adapter's requires_grad comes back after it."""
    policy, base = lora_model(), tiny_causal_lm()
    ids, mask = left_padded_batch([6, 8, 4])
    batch = {"prompt_ids": ids[:, :4], "prompt_mask": mask[:, :4], "tokens": ids[:, 4:], "mask": mask[:, 4:]}
    reference = K.rollout_logprobs(K.BaseReference(policy), batch)
    assert torch.equal(reference, K.rollout_logprobs(base, batch))
    assert not torch.allclose(K.rollout_logprobs(policy, batch), reference, atol=1e-4)
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".lora_" in n)


def test_gradient_checkpointing_gives_the_adapter_the_same_gradient():
    """--gradient-checkpointing with a frozen base (whose layer inputs need no gradient) still reaches every adapter
    weight, with the gradient of the plain backward."""
    ids, mask = left_padded_batch([6, 4])
    grads = []
    for checkpointing in (False, True):
        model = K.wrap_model(lora_model().train(), "none", checkpointing=checkpointing)
        K.token_logprobs(model, ids, mask).sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_merged_state_dict_is_the_plain_models():
    """merged_state_dict has the plain architecture's names and shapes, and a plain model loading it computes what the
    adapter model computes."""
    model, plain = lora_model(), tiny_causal_lm()
    merged = K.merged_state_dict(model, K.full_state_dict(model))
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    ids, mask = left_padded_batch([5, 6])
    assert torch.allclose(K.token_logprobs(plain, ids, mask), K.token_logprobs(model, ids, mask), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# grpo.py: the reference for free, learning, resume, final/ both ways
# ---------------------------------------------------------------------------------------------------------


def held_bytes(*models) -> int:
    """Bytes of the distinct parameter tensors the models hold."""
    seen = {}
    for model in models:
        for p in K.unwrap(model).parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def test_lora_loads_no_reference_model(tiny_model_dir):
    """With --kl-coef > 0 full fine-tuning loads a second model as pi_ref; with --lora-rank the reference is the
    policy itself (adapter off): the parameters held are the policy's plus the adapter's, not twice the model's."""
    info = runs.DistInfo()
    full_policy, full_ref, _ = grpo.load_models(small_args(tiny_model_dir, "unused", lora_rank=0, kl_coef=0.04), info)
    policy, ref, _ = grpo.load_models(small_args(tiny_model_dir, "unused", kl_coef=0.04), info)
    assert isinstance(ref, K.BaseReference) and K.unwrap(ref) is K.unwrap(policy)
    adapter = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    base = sum(p.numel() for p in full_policy.parameters())
    assert sum(p.numel() for p in policy.parameters()) == base + adapter  # one model: the base plus the adapter
    assert held_bytes(policy, ref) == held_bytes(full_policy) + 4 * adapter
    assert held_bytes(full_policy, full_ref) == 2 * held_bytes(full_policy)


def test_grpo_lora_learns_resumes_exactly_and_final_loads_both_ways(tiny_model_dir, tmp_path):
    """grpo.py --lora-rank 4 with a KL to the base: the adapter moves, train/kl rises from 0; stopping at step 2 and
    resuming to 4 ends with the adapter (and metrics) of a straight 4-step run, bit for bit; checkpoint-2 holds only
    the adapter and its AdamW state; final/ holds the adapter, which PeftModel.from_pretrained loads onto the base,
    and the merged model, which AutoModelForCausalLM loads, and the two give the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kw = dict(kl_coef=0.04)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    grpo.main(small_args(tiny_model_dir, straight, max_steps=4, **kw))
    grpo.main(small_args(tiny_model_dir, parts, max_steps=2, save_every=2, **kw))
    checkpoint = parts / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists() and (checkpoint / "adapter" / "adapter_config.json").exists()
    optimizer = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]
    adapter = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    assert len(optimizer["state"]) == len(adapter) == 2 * 7  # one layer: 7 adapted linears, A and B
    grpo.main(small_args(tiny_model_dir, parts, max_steps=4, resume=True, **kw))
    a = load_file(straight / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(parts / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # B left 0: it learned
    m1, m2 = runs.read_metrics(str(straight)), runs.read_metrics(str(parts))
    assert [r["train/kl"] for r in m1] == [r["train/kl"] for r in m2]
    assert m1[0]["train/kl"] == pytest.approx(0.0, abs=1e-7) and m1[-1]["train/kl"] > 0

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, str(straight / "final" / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(straight / "final")).eval()
    ids, mask = left_padded_batch([9, 6], vocab_size=merged.config.vocab_size)
    with torch.no_grad():
        adapter_logits = with_adapter(input_ids=ids, attention_mask=mask).logits
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)


def test_lora_settings_a_user_can_get_wrong(tiny_model_dir, tmp_path):
    """A negative rank, a zero alpha, a reference reset (the reference is the base) and targets the model lacks each
    stop with one sentence; a LoRA run's out-dir refuses a full fine-tuning resume (the flags define the run)."""
    info = runs.DistInfo()
    with pytest.raises(K.UserError, match="--lora-rank -1"):
        grpo.check_args(small_args(tiny_model_dir, tmp_path, lora_rank=-1), info)
    with pytest.raises(K.UserError, match="--lora-alpha"):
        grpo.check_args(small_args(tiny_model_dir, tmp_path, lora_alpha=0.0), info)
    with pytest.raises(K.UserError, match="--ref-reset-every 2 needs full fine-tuning"):
        grpo.check_args(small_args(tiny_model_dir, tmp_path, kl_coef=0.04, ref_reset_every=2), info)
    import sft

    with pytest.raises(K.UserError, match="--lora-rank adapts a trained model"):
        sft.check_args(sft.Args(model="", lora_rank=2), info)
    with pytest.raises(K.UserError, match="--lora-targets nope"):
        K.add_lora(tiny_causal_lm(), K.LoRA(2, targets=("nope",)))
    grpo.main(small_args(tiny_model_dir, tmp_path / "run", max_steps=1))
    with pytest.raises(K.UserError, match="--lora-rank 0 \\(recorded: 4\\)"):
        grpo.main(small_args(tiny_model_dir, tmp_path / "run", max_steps=2, lora_rank=0, resume=True))


def test_lora_targets_pick_the_layers(tiny_model_dir):
    """--lora-targets q_proj v_proj adapts those two projections only."""
    model, _ = K.load_model(tiny_model_dir, device="cpu", lora=K.LoRA(2, targets=("q_proj", "v_proj")))
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}


# ---------------------------------------------------------------------------------------------------------
# The other scripts: sft.py, ppo.py (policy and critic), rlhf_reward_model.py
# ---------------------------------------------------------------------------------------------------------


def adapter_moved(final_dir) -> bool:
    adapter = load_file(os.path.join(final_dir, "adapter", "adapter_model.safetensors"))
    return any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())


def test_sft_trains_an_adapter(tiny_model_dir, tmp_path):
    """sft.py --lora-rank 2: two steps train the adapter; final/ holds it and the merged model."""
    import sft

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(5) for b in range(5)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    result = sft.main(sft.Args(model=tiny_model_dir, dataset=str(data), out_dir=str(tmp_path / "sft"), max_steps=2,
                               batch_size=4, eval_every=0, plot=False, lora_rank=2, lr=1e-2))
    assert adapter_moved(result.final_dir) and os.path.exists(os.path.join(result.final_dir, "model.safetensors"))


def test_ppo_trains_adapters_on_policy_and_critic(tiny_model_dir, tmp_path):
    """ppo.py --lora-rank 2 with a KL: the policy's adapter and the critic's (with its value head trained whole)
    move; the reference is the policy's base; final/critic/ holds the critic's adapter and head."""
    import ppo

    args = ppo.Args(model=tiny_model_dir, out_dir=str(tmp_path / "ppo"), max_steps=2, prompts_per_step=4,
                    num_generations=4, max_new_tokens=12, eval_every=0, plot=False, lora_rank=2, lr=5e-3,
                    kl_coef=0.05, rewards=("tag_count", "task"), reward_weights=(1.0, 1.0))
    result = ppo.main(args)
    assert adapter_moved(result.final_dir) and adapter_moved(os.path.join(result.final_dir, "critic"))
    critic = load_file(os.path.join(result.final_dir, "critic", "adapter", "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in critic
    assert runs.read_metrics(args.out_dir)[-1]["train/kl_token_k3"] >= 0


def test_reward_model_trains_an_adapter_and_its_head(tiny_model_dir, tmp_path):
    """rlhf_reward_model.py --lora-rank 2: the adapter and the score head train; final/ loads as a plain
    sequence-classification model (the merged one)."""
    import rlhf_reward_model as rm
    from transformers import AutoModelForSequenceClassification

    result = rm.main(rm.Args(model=tiny_model_dir, out_dir=str(tmp_path / "rm"), max_steps=2, batch_size=4,
                             eval_every=0, plot=False, lora_rank=2))
    adapter = load_file(os.path.join(result.final_dir, "adapter", "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in adapter
    AutoModelForSequenceClassification.from_pretrained(result.final_dir)


# ---------------------------------------------------------------------------------------------------------
# torchrun: two gloo ranks equal one process
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_lora_matches_one_process(strategy, tiny_model_dir, tmp_path):
    """grpo.py --lora-rank 4 --kl-coef 0.04 on 2 gloo ranks (DDP; FSDP2 with the adapter sharded beside the base),
    stopped after step 1 and resumed from its checkpoint (the adapter and its AdamW state reloaded shard by shard),
    logs the metrics of one process's straight 2-step run, the KL to the base included, and ends with its adapter and
    merged model."""
    common = ["--model", tiny_model_dir, "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4",
              "--max-new-tokens", "12", "--eval-every", "0", "--device", "cpu", "--no-plot", "--lora-rank", "4",
              "--lr", "5e-3", "--kl-coef", "0.04", "--save-every", "1", "--rewards", "tag_count", "task",
              "--reward-weights", "1.0", "1.0", "--strategy", strategy]
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for extra in (["--max-steps", "1"], ["--resume"]):
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path / "two"), *common,
                              "--micro-batch-tokens", "64", *extra], env=environ, capture_output=True, text=True,
                             timeout=600)
        assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path / "one"),
                          *common], env=environ, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    m1, m2 = runs.read_metrics(str(tmp_path / "one")), runs.read_metrics(str(tmp_path / "two"))
    assert m1[0]["rollout/reward_std"] > 0 and m1[-1]["train/kl"] > 0
    for r1, r2 in zip(m1, m2):
        for k in r1:
            if k.startswith(("rollout/", "train/loss", "train/kl", "train/entropy")):
                assert r1[k] == pytest.approx(r2[k], abs=1e-4, nan_ok=True), k
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(tmp_path / "one" / "final" / name), load_file(tmp_path / "two" / "final" / name)
        assert set(a) <= set(b)  # FSDP2's gathered state dict also stores a tied head under its own name
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (name, k)
    assert adapter_moved(tmp_path / "one" / "final")


@pytest.mark.slow
def test_two_process_fsdp_lora_trains_under_mixed_precision(tiny_model_dir, tmp_path):
    """FSDP2 with --dtype bfloat16: the frozen bf16 base and the fp32 adapter share each layer's FSDP2 group, and a
    reference pass (adapter off) before the first update leaves the adapter trainable: its bf16 gradients reach its
    fp32 shards, it moves, the KL to the base rises from 0, and final/ saves it in fp32."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path), "--model", tiny_model_dir,
                          "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4", "--max-new-tokens",
                          "12", "--eval-every", "0", "--device", "cpu", "--no-plot", "--lora-rank", "4", "--lr", "5e-3",
                          "--kl-coef", "0.04", "--rewards", "tag_count", "task", "--reward-weights", "1.0", "1.0",
                          "--strategy", "fsdp", "--dtype", "bfloat16"], env=environ, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    kl = [r["train/kl"] for r in runs.read_metrics(str(tmp_path))]
    assert kl[0] == 0.0 and kl[1] > 0
    adapter = load_file(tmp_path / "final" / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values()) and adapter_moved(tmp_path / "final")
