"""Decoding that stays fast on a GPU, checked on CPU: grouped-query attention that reads each KV head once (also
compiled), sampling noise made before the loop, FSDP2 rollouts that gather once per call, a compiled run that meets
few shapes, and the decode state freed before the update."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, left_padded_batch, tiny_causal_lm

import rl_kernels as K
import rl_runs as runs
import toy_world as toy


def test_keyed_noise_table_is_the_per_step_noise_bit_for_bit():
    """keyed_uniforms(keys, N)[t] == keyed_uniform(keys, t) for every step: samples stay today's keyed samples,
    while the decode loop no longer makes a device tensor from a Python int at every step."""
    keys = torch.tensor([0, 1, 7, 2**62 + 12345, 2**63 - 1, 31337])
    table = K.keyed_uniforms(keys, 300)
    assert table.shape == (300, 6) and table.dtype == torch.float64
    for t in range(300):
        assert torch.equal(table[t], K.keyed_uniform(keys, t)), t


def _hf_greedy(model, ids, mask, max_new_tokens):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("compile", [False, True])
def test_grouped_attention_greedy_equals_transformers_and_never_repeats_the_cache(arch, compile, monkeypatch):
    """Greedy decoding with grouped_sdpa_attention (4 query heads per KV head, left padding) gives transformers'
    greedy tokens, eager and compiled, and no decode step expands the KV cache with repeat_kv (transformers' SDPA
    path under torch.compile does, moving the cache G times per step)."""
    import transformers.integrations.sdpa_attention as sdpa

    model = tiny_causal_lm(arch, num_attention_heads=8, num_key_value_heads=2)
    ids, mask = left_padded_batch([7, 3, 11, 5])
    reference = _hf_greedy(model, ids, mask, 20)
    repeated = []
    original = sdpa.repeat_kv

    def spy(hidden_states, n_rep):
        repeated.append(hidden_states.shape[2])  # the key length it expands
        return original(hidden_states, n_rep)

    monkeypatch.setattr(sdpa, "repeat_kv", spy)
    torch._dynamo.reset()
    ours = K.generate(model, ids, mask, max_new_tokens=20, temperature=0, eos_token_id=-1, pad_token_id=0,
                      compile=compile, compact=False)
    assert torch.equal(ours.tokens, reference)
    cache_len = 16 + 20  # prompts bucketed to 16 columns, plus the new tokens
    assert cache_len not in repeated, f"repeat_kv expanded the {cache_len}-long cache {repeated.count(cache_len)}x"
    assert model.config._attn_implementation == "sdpa"  # the model's own setting is back


def test_grouped_attention_keeps_the_padding_mask():
    """Registered with SDPA's mask function, the grouped attention still masks left padding: a prompt's greedy
    continuation does not depend on how much padding precedes it (without the mask function transformers builds
    no mask and the pad tokens would be attended to)."""
    model = tiny_causal_lm(num_attention_heads=8, num_key_value_heads=2)
    ids, mask = left_padded_batch([5, 12])
    alone = K.generate(model, ids[:1, -5:], mask[:1, -5:], max_new_tokens=12, temperature=0, eos_token_id=-1,
                       pad_token_id=0, pad_to_multiple=1)
    padded = K.generate(model, ids, mask, max_new_tokens=12, temperature=0, eos_token_id=-1, pad_token_id=0,
                        pad_to_multiple=1)
    assert torch.equal(alone.tokens[0], padded.tokens[0])


@pytest.mark.slow
def test_fsdp_rollouts_equal_one_process_and_gather_once_per_call(tmp_path):
    """2-rank gloo FSDP2: each rank's keyed samples equal one process's for the same rows, and a generate call
    all-gathers each sharded module once, however many tokens it decodes (4 or 16), instead of once per token."""
    script = os.path.join(ROOT, "tests", "dist_generate.py")
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          script, "fsdp", str(tmp_path)], env=environ, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, script, "none", str(tmp_path)], env=environ, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    single = torch.load(tmp_path / "generate_none_rank0.pt")
    ranks = [torch.load(tmp_path / f"generate_fsdp_rank{r}.pt") for r in range(2)]
    for n in (4, 16):
        for rank, part in enumerate(ranks):
            rows = slice(rank * 6, (rank + 1) * 6)  # 2 prompts x 3 samples per rank
            width = part[n]["tokens"].shape[1]
            assert torch.equal(part[n]["tokens"], single[n]["tokens"][rows, :width]), (n, rank)
            assert torch.allclose(part[n]["logprobs"], single[n]["logprobs"][rows, :width], atol=1e-6)
    for part in ranks:
        print(f"all-gathers per generate call: {part[4]['gathers']} (4 tokens), {part[16]['gathers']} (16 tokens); "
              f"{part['fsdp_modules']} sharded modules")
        assert part[4]["gathers"] == part[16]["gathers"] <= part["fsdp_modules"]
        assert part["sharded_after"]  # resharded: the update gets its memory back


@pytest.mark.parametrize("compile", [False, True])
def test_free_decode_state_frees_memory_and_keeps_the_compiled_step(compile):
    """free_decode_state frees the KV caches and the bf16 rollout copy's weights but keeps the decode states, so the
    next call reuses the same step (compiled: no new graph; on a GPU, CUDA graphs and their tree manager stay alive)
    on the same tensors, whose memory comes back, and samples exactly what it sampled before. Without the free, the
    state and its memory stay between calls. peak_memory_gb reports the process's peak."""
    import torch._dynamo.utils as dynamo_utils

    model = tiny_causal_lm(vocab_size=101)
    K.set_precision(model, "bfloat16")
    ids, mask = left_padded_batch([6, 9], vocab_size=101)
    kw = dict(max_new_tokens=10, num_samples=2, eos_token_id=-1, pad_token_id=0, noise_keys=torch.arange(4),
              compile=compile)
    first = K.generate(model, ids, mask, **kw)
    gen = model.__dict__["_rl_generation"]
    assert gen.states and gen.owned and all(t.dtype == torch.bfloat16 for t, _ in gen.owned)
    (state,) = gen.states.values()
    step, caches = state.step, state._tensors()
    assert all(t.untyped_storage().nbytes() > 0 for t in caches)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    K.free_decode_state(model)
    assert list(gen.states.values()) == [state]
    assert all(t.untyped_storage().nbytes() == 0 for t in caches)
    assert all(t.untyped_storage().nbytes() == 0 for t, _ in gen.owned)
    again = K.generate(model, ids, mask, **kw)
    assert list(gen.states.values()) == [state] and state.step is step
    assert all(a is b and a.untyped_storage().nbytes() == a.numel() * a.element_size()
               for a, b in zip(state._tensors(), caches))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)
    assert K.peak_memory_gb("cpu") > 0.01


def test_a_compiled_cache_length_is_a_multiple_of_16():
    """Compiled decoding sizes its KV cache to a multiple of 16 (SDPA's fused kernels want the mask aligned): from
    set_generation_length and without it."""
    model = tiny_causal_lm(vocab_size=101)
    K.set_generation_length(model, 21, 13)
    assert model.__dict__["_rl_generation"].max_len == 48  # 32 + 13 = 45 -> 48
    other = tiny_causal_lm(vocab_size=101)
    ids, mask = left_padded_batch([6, 9], vocab_size=101)
    K.generate(other, ids, mask, max_new_tokens=5, eos_token_id=-1, pad_token_id=0, compile=True)
    (state,) = other.__dict__["_rl_generation"].states.values()
    assert state.cache.layers[0].keys.shape[2] == 32  # 16 + 5 -> 32


class _RecompileCounter(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_a_compiled_run_recompiles_at_most_twice(tmp_path):
    """grpo.main with compile=True on CPU: 6 steps, 4 evaluations (greedy and sampled, 20 held-out prompts: a short
    batch), prompts of 3 to 45 characters (four length buckets). The decode step meets one shape per use (rollout,
    greedy and sampled evaluation: two recompiles) and the loss compiles once, with dynamic shapes."""
    import json

    import grpo
    from test_grpo import small_args

    data = tmp_path / "sums.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            terms = [str(1 + (i + j) % 9) for j in range(2 + i % 4 * 7)]  # 2 to 23 terms
            f.write(json.dumps({"prompt": "+".join(terms), "answer": str(sum(map(int, terms)))}) + "\n")
    counter = _RecompileCounter()
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(counter)
    torch._dynamo.reset()
    try:
        model_dir = _tiny_model_dir(tmp_path / "model")
        grpo.main(small_args(model_dir, tmp_path / "run", dataset=str(data), eval_dataset=str(data), max_steps=6,
                             eval_every=2, eval_size=20, eval_samples=2, compile=True, max_new_tokens=10,
                             rewards=("tag_count", "task"), reward_weights=(1.0, 1.0)))
    finally:
        logger.removeHandler(counter)
        torch._logging.set_logs()
    rows = runs.read_metrics(str(tmp_path / "run"))
    assert sum("eval/accuracy" in r for r in rows) >= 3 and rows[-1]["step"] == 6
    for message in counter.messages:
        print(message)
    assert len(counter.messages) <= 2


def _tiny_model_dir(path) -> str:
    """test_grpo's tiny model with the toy tokenizer, saved under path."""
    import transformers

    tokenizer = toy.build_toy_tokenizer()
    config = transformers.Qwen2Config(**{**toy.toy_model_config(tokenizer).to_dict(), "hidden_size": 32,
                                         "intermediate_size": 64, "num_hidden_layers": 1, "layer_types": None,
                                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def test_the_decode_step_compiles_whole_under_the_gpu_branch(monkeypatch):
    """The GPU branch, emulated on the CPU: fp32 master weights, bf16 compute, the output layer kept in bf16 and
    multiplied into fp32 (the CPU has no mm with out_dtype: the test widens instead). The device probe answers a
    Python bool (a tensor there made every compiled token branch on the device: a graph break and a host sync), and
    the decode step compiles with fullgraph=True, which raises at any break, into one graph that gives the eager
    tokens and log-probs."""
    import torch._dynamo.utils as dynamo_utils

    monkeypatch.setattr(K, "_mm_fp32_out", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(K, "_addmm_fp32_out_", lambda acc, a, b: acc.addmm_(a.float(), b.float()))
    monkeypatch.delitem(K._BF16_HEAD, "cpu")
    assert K.bf16_head(torch.device("cpu")) is True
    model = tiny_causal_lm(vocab_size=101)
    K.set_precision(model, "bfloat16")
    assert K.head_weight(model.lm_head.weight, torch.bfloat16).dtype == torch.bfloat16
    ids, mask = left_padded_batch([6, 9], vocab_size=101)
    kw = dict(max_new_tokens=8, num_samples=2, eos_token_id=-1, pad_token_id=0, noise_keys=torch.arange(4))
    eager = K.generate(model, ids, mask, compile=False, **kw)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled = K.generate(model, ids, mask, compile=True, **kw)
    assert not dynamo_utils.counters["graph_break"]
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    # inductor's fused bf16 kernels round differently from eager, so the two may sample differently: each path's
    # log-probs are checked against the trainer's on its own samples
    for gen in (eager, compiled):
        full = torch.cat([ids.repeat_interleave(2, 0), gen.tokens], 1)
        full_mask = torch.cat([mask.repeat_interleave(2, 0), gen.mask], 1)
        trainer = K.token_logprobs(model, full, full_mask, last_n=gen.tokens.shape[1])
        assert (trainer * gen.mask - gen.logprobs).abs().max() < 1e-2  # measured 8e-4 (eager), 6e-4 (compiled)
