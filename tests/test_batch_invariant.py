"""Batch-invariant numerics (issue 23): under rl_kernels.set_batch_invariant the sampler's log-probs (log mu) equal the
trainer's (log pi_old, rollout_logprobs) bit for bit in fp32 on CPU, whatever the micro-batch size or the rank a row
lands on; with the mode off nothing changes. The micro-batch case is verl issue #6280.

Run at one CPU thread (as set_cpu_threads runs a model this small); the same equalities were measured at two.
`PYTHONPATH=. python tests/test_batch_invariant.py` prints the mode's cost on the toy rollout, on and off interleaved.
"""

import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch, tiny_causal_lm

import rl_kernels as K
import rlvr_rewards as rewards

PROMPTS, SAMPLES, NEW_TOKENS = 16, 8, 48


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(invariant: bool):
    model, tokenizer = K.load_model("toy", dtype="float32", device=torch.device("cpu"))
    return K.set_batch_invariant(model, invariant), tokenizer


def _toy_rollout(model, tokenizer, prompt_ids=range(PROMPTS)):
    rows = rewards.make_dataset("arithmetic", "train", PROMPTS, seed=0)
    prompt_ids = list(prompt_ids)
    return rewards.sample(model, tokenizer, [rows[i] for i in prompt_ids], num_samples=SAMPLES,
                          max_new_tokens=NEW_TOKENS, noise_keys=K.rollout_noise_keys(0, 0, 0, prompt_ids, SAMPLES))


@pytest.fixture(scope="module")
def invariant_rollout():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # made before one_thread runs (a wider scope sets up first), so set here too
    model, tokenizer = _toy(True)
    rollout = _toy_rollout(model, tokenizer)
    torch.set_num_threads(threads)
    return model, tokenizer, rollout


def _gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("rows_per_micro_batch", [1, 2, 8, "all"])
def test_sampler_logprobs_equal_the_trainers_at_every_micro_batch_size(invariant_rollout, rows_per_micro_batch):
    """log mu == log pi_old exactly on every completion token of a 128-row toy rollout, for micro-batches of one row,
    of at least 2 and at least 8 rows (max_tokens = rows x the padded length fits any such rows), and one pass."""
    model, _, rollout = invariant_rollout
    batch = rollout.batch()
    padded = batch["prompt_ids"].shape[1] + batch["tokens"].shape[1]
    max_tokens = 0 if rows_per_micro_batch == "all" else 1 if rows_per_micro_batch == 1 else \
        rows_per_micro_batch * padded
    sizes = [len(rows) for rows, _ in K.micro_batches(batch, max_tokens)]
    if rows_per_micro_batch == 1:
        assert set(sizes) == {1}
    old_logprobs = K.rollout_logprobs(model, batch, temperature=1.0, max_tokens=max_tokens)
    assert rollout.gen.mask.sum() > 1000
    assert _gap(rollout.gen.logprobs, old_logprobs, rollout.gen.mask) == 0.0, f"micro-batch rows {sorted(sizes)}"


def test_two_ranks_sample_and_score_what_one_rank_does(invariant_rollout):
    """The rollout's prompts split over two 'ranks' (each sampled and scored alone, with its rows' noise keys) give
    the one-batch rollout's tokens and log-probs, sampler's and trainer's, bit for bit."""
    model, tokenizer, whole = invariant_rollout
    halves = [_toy_rollout(model, tokenizer, ids) for ids in (range(PROMPTS // 2), range(PROMPTS // 2, PROMPTS))]
    rows = PROMPTS // 2 * SAMPLES
    for rank, half in enumerate(halves):
        part = slice(rank * rows, (rank + 1) * rows)
        n = half.gen.tokens.shape[1]
        assert torch.equal(half.gen.mask, whole.gen.mask[part, :n]) and whole.gen.mask[part, n:].sum() == 0
        assert torch.equal(half.gen.tokens, whole.gen.tokens[part, :n])
        assert torch.equal(half.gen.logprobs, whole.gen.logprobs[part, :n])
        mask = half.gen.mask.bool()  # past a row's end the values depend on its micro-batch's width: not compared
        assert torch.equal(K.rollout_logprobs(model, half.batch(), max_tokens=256)[mask],
                           K.rollout_logprobs(model, whole.batch(), max_tokens=256)[part, :n][mask])


@pytest.mark.parametrize("arch,width", [("llama", 128), ("qwen2", 128), ("llama", 100), ("qwen2", 90)])
@pytest.mark.parametrize("prompts", [1, 3])
def test_tiny_models_of_other_architectures_agree_with_few_rows(arch, width, prompts):
    """A tiny random Llama and Qwen2 (head_dim 16, two query heads per KV head, left padding; MLP width a multiple of
    32 floats or not) decoding 2 or 6 rows: fewer than four rows take other matmul kernels unless tiled, a width of 100
    puts some rows' SiLU in the scalar tail unless padded, yet log mu == log pi_old exactly, one pass and one row per
    micro-batch; and the mode's log-probs stay within fp32 rounding of the plain model's."""
    model = K.set_batch_invariant(tiny_causal_lm(arch, tie=arch == "qwen2", intermediate_size=width), True)
    ids, mask = left_padded_batch([5, 11, 8][:prompts])
    gen = K.generate(model, ids, mask, max_new_tokens=24, num_samples=2, eos_token_id=2, pad_token_id=0,
                     noise_keys=torch.arange(2 * prompts) + 11)
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    batch = {"prompt_ids": ids, "prompt_mask": mask, "tokens": gen.tokens, "mask": gen.mask}
    for max_tokens in (0, 1):
        assert _gap(gen.logprobs, K.rollout_logprobs(model, batch, max_tokens=max_tokens), gen.mask) == 0.0
    invariant = K.rollout_logprobs(model, batch)
    K.set_batch_invariant(model, False)
    assert _gap(invariant, K.rollout_logprobs(model, batch), gen.mask) < 1e-5  # measured: 5e-7 or less


def test_invariant_attention_is_sdpa_and_ignores_where_the_keys_sit():
    """batch_invariant_attention gives one row's last-token output bit for bit the same alone, behind 3 pads beside a
    longer row, and as a decode step against a 100-slot cache (2 pads before it, 60 unused slots after), and
    equals F.scaled_dot_product_attention within fp32 rounding."""
    torch.manual_seed(0)
    n, Hq, Hkv, D = 37, 4, 2, 16
    q, k, v = torch.randn(1, Hq, n, D), torch.randn(1, Hkv, n, D), torch.randn(1, Hkv, n, D)
    module = torch.nn.Module()

    def attend(query, key, value, real, q_len):  # real: (R, L) bool; a causal boolean mask as transformers makes it
        L = key.shape[2]
        causal = torch.ones(L, L, dtype=torch.bool).tril()[L - q_len:] if q_len == L else real[:, None, :]
        mask = (real[:, None, None, :] & causal).expand(len(real), 1, q_len, L)
        return K.batch_invariant_attention(module, query, key, value, mask)[0]  # (R, q, Hq, D)

    alone = attend(q, k, v, torch.ones(1, n, dtype=torch.bool), n)[0, -1]
    other = torch.randn(1, Hq, n + 3, D), torch.randn(1, Hkv, n + 3, D), torch.randn(1, Hkv, n + 3, D)
    pad = lambda x: F.pad(x, (0, 0, 3, 0), value=0.5)  # noqa: E731  the pads' keys are junk, not zeros
    real = torch.ones(2, n + 3, dtype=torch.bool)
    real[1, :3] = False
    padded = attend(torch.cat([other[0], pad(q)]), torch.cat([other[1], pad(k)]), torch.cat([other[2], pad(v)]),
                    real, n + 3)[1, -1]
    cache = lambda x: F.pad(x, (0, 0, 2, 61))  # noqa: E731
    real = torch.zeros(1, 100, dtype=torch.bool)
    real[0, 2:2 + n] = True
    decoded = attend(q[:, :, -1:], cache(k), cache(v), real, 1)[0, -1]
    assert torch.equal(alone, padded) and torch.equal(alone, decoded)
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1),
                                               is_causal=True)[0, :, -1]
    torch.testing.assert_close(alone, reference, rtol=1e-5, atol=1e-6)


def test_mode_off_changes_nothing():
    """A model whose mode was turned on and off again samples and scores exactly as one never touched, and each
    call leaves the config's attention as it found it. The off-mode gap is printed (it may be 0 on another machine)."""
    fresh, tokenizer = _toy(False)
    toggled, _ = _toy(True)
    on = _toy_rollout(toggled, tokenizer, range(4))
    on_logprobs = K.rollout_logprobs(toggled, on.batch())
    assert toggled.config._attn_implementation == "sdpa"
    K.set_batch_invariant(toggled, False)
    before, after = _toy_rollout(fresh, tokenizer, range(4)), _toy_rollout(toggled, tokenizer, range(4))
    assert torch.equal(before.gen.tokens, after.gen.tokens) and torch.equal(before.gen.logprobs, after.gen.logprobs)
    old = K.rollout_logprobs(fresh, before.batch(), max_tokens=64)
    assert torch.equal(old, K.rollout_logprobs(toggled, after.batch(), max_tokens=64))
    on_vs_off = _gap(on_logprobs, K.rollout_logprobs(fresh, on.batch()), on.gen.mask)
    print(f"\nmode off: max |log mu - log pi_old| = {_gap(before.gen.logprobs, old, before.gen.mask):.3g}; "
          f"mode on vs off on the same tokens: {on_vs_off:.3g}")


def test_training_forward_runs_in_the_mode_and_its_ratio_is_exactly_one(invariant_rollout):
    """token_logprobs with gradients under the mode: the first update's ratio exp(log pi_theta - log mu) is exactly 1
    on every token, and the loss has a gradient."""
    model, _, rollout = invariant_rollout
    batch = K.slice_rows(rollout.batch(), slice(0, 8))
    logprobs = K.completion_logprobs(model, batch)
    mask = batch["mask"].bool()
    assert torch.equal(logprobs[mask].detach(), rollout.gen.logprobs[:8][mask])
    (-logprobs[mask].sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_mode_refuses_what_it_does_not_cover():
    """bf16 compute and compiled decoding each get one sentence (UserError), before any work."""
    model = tiny_causal_lm("qwen2")
    with pytest.raises(K.UserError, match="float32"):
        K.set_batch_invariant(K.set_precision(tiny_causal_lm("qwen2"), "bfloat16"), True)
    K.set_batch_invariant(model, True)
    ids, mask = left_padded_batch([4, 6])
    with pytest.raises(K.UserError, match="Compiled decoding"):
        K.generate(model, ids, mask, max_new_tokens=4, compile=True)


def _measure_cost(repeats: int = 3):
    """Seconds of a 128-row toy rollout (sample) and of rollout_logprobs on it (max_tokens 0 and 2048), mode on and
    off, interleaved in one process at one thread; prints the median of `repeats` and the ratio."""
    torch.set_num_threads(1)
    models = {mode: _toy(mode)[0] for mode in (False, True)}
    _, tokenizer = _toy(False)
    times = {(mode, phase): [] for mode in models for phase in ("sample", "pi_old one pass", "pi_old 2048")}
    for _ in range(repeats):
        for mode, model in models.items():
            start = time.perf_counter()
            rollout = _toy_rollout(model, tokenizer)
            times[mode, "sample"].append(time.perf_counter() - start)
            for phase, max_tokens in (("pi_old one pass", 0), ("pi_old 2048", 2048)):
                start = time.perf_counter()
                K.rollout_logprobs(model, rollout.batch(), max_tokens=max_tokens)
                times[mode, phase].append(time.perf_counter() - start)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for phase in ("sample", "pi_old one pass", "pi_old 2048"):
        off, on = median(times[False, phase]), median(times[True, phase])
        print(f"{phase:16s} off {off:6.3f} s   on {on:6.3f} s   on/off {on / off:4.2f}")


if __name__ == "__main__":
    _measure_cost(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
