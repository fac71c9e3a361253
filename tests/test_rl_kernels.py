"""rl_kernels.py: every fast path against its plain reference, and the loss maths against hand computations."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, left_padded_batch, tiny_causal_lm

import rl_kernels as K
import rl_runs as runs

# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------


def _hf_greedy(model, ids, mask, max_new_tokens, eos):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_generate_equals_transformers_greedy(arch):
    """temperature=0 gives transformers' greedy tokens, with rows stopping at EOS early and others running on."""
    model = tiny_causal_lm(arch)
    ids, mask = left_padded_batch([7, 3, 11, 5])
    free = K.generate(model, ids, mask, max_new_tokens=16, temperature=0, eos_token_id=-1, pad_token_id=0).tokens
    # Choose as EOS a token that row 0 emits at step 2 and that some other row never emits: mixed stopping.
    eos = next(int(t) for t in free[0, 2:] if any(int(t) not in free[r].tolist() for r in range(1, 4)))
    ours = K.generate(model, ids, mask, max_new_tokens=16, temperature=0, eos_token_id=eos, pad_token_id=0)
    ref = _hf_greedy(model, ids, mask, 16, eos)
    assert ours.truncated.any() and (~ours.truncated).any()
    n = ours.tokens.shape[1]
    assert torch.equal(ours.tokens, ref[:, :n]) and (ref[:, n:] == 0).all()
    # mask covers generated tokens including the EOS, and nothing after it
    for r in range(4):
        row = ours.tokens[r].tolist()
        length = row.index(eos) + 1 if eos in row else n
        assert ours.mask[r].tolist() == [1] * length + [0] * (n - length)
        assert bool(ours.truncated[r]) == (eos not in row)


def test_generate_rows_are_prompt_major_and_seeded_sampling_reproducible():
    """Row i*S+j is sample j of prompt i; the same generator seed gives the same samples."""
    model = tiny_causal_lm()
    ids, mask = left_padded_batch([4, 9])
    kw = dict(max_new_tokens=10, temperature=1.0, num_samples=3, eos_token_id=-1, pad_token_id=0)
    a = K.generate(model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    b = K.generate(model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    c = K.generate(model, ids, mask, generator=torch.Generator().manual_seed(6), **kw)
    assert a.tokens.shape == (6, 10)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    # prompt-major: with greedy decoding every sample of one prompt is identical, and differs across prompts
    g = K.generate(model, ids, mask, max_new_tokens=6, temperature=0, num_samples=3, eos_token_id=-1, pad_token_id=0)
    assert torch.equal(g.tokens[0], g.tokens[2]) and torch.equal(g.tokens[3], g.tokens[5])
    single = K.generate(model, ids[1:], mask[1:], max_new_tokens=6, temperature=0, eos_token_id=-1, pad_token_id=0)
    assert torch.equal(g.tokens[4], single.tokens[0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_token_logprobs(temperature):
    """The log-probs generate returns equal token_logprobs of the same sequences at the same temperature."""
    model = tiny_causal_lm()
    ids, mask = left_padded_batch([5, 8, 2])
    gen = K.generate(model, ids, mask, max_new_tokens=12, temperature=temperature, num_samples=2, eos_token_id=7,
                     pad_token_id=0, generator=torch.Generator().manual_seed(0))
    full = torch.cat([ids.repeat_interleave(2, 0), gen.tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(2, 0), gen.mask], 1)
    lp = K.token_logprobs(model, full, full_mask, last_n=gen.tokens.shape[1], temperature=temperature)
    assert torch.allclose(lp * gen.mask, gen.logprobs, atol=1e-4)


def test_top_k_and_top_p_restrict_the_support():
    """top_k keeps the k most likely tokens; top_p keeps the smallest set with mass >= p."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    k2 = K.sample_tokens(logits, top_k=2, generator=gen).tokens
    assert set(k2.tolist()) == {0, 1}
    p = K.sample_tokens(logits, top_p=0.8, generator=gen).tokens  # 0.5 + 0.3 reaches 0.8
    assert set(p.tolist()) == {0, 1}
    p9 = K.sample_tokens(logits, top_p=0.9, generator=gen).tokens
    assert set(p9.tolist()) == {0, 1, 2}
    full = K.sample_tokens(logits, generator=gen).tokens
    freq = torch.bincount(full, minlength=4).float() / len(full)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


def test_generate_rejects_right_padding():
    """Right-padded prompts get a clear error instead of silently wrong completions."""
    model = tiny_causal_lm()
    ids, mask = left_padded_batch([3, 5])
    with pytest.raises(ValueError, match="left-padded"):
        K.generate(model, ids.flip(1), mask.flip(1), max_new_tokens=3)


# ---------------------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------------------


def _naive(model, ids, mask, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=K.position_ids_from_mask(mask)).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    return logp.gather(-1, ids[:, 1:, None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("tie,chunk,temperature", [(False, 7, 1.0), (True, 5, 1.0), (False, 1000, 0.6)])
def test_token_logprobs_equal_naive_values_and_gradients(tie, chunk, temperature):
    """Chunked fused log-probs and entropy equal log_softmax.gather, values and grads, uneven chunks, pads."""
    model = tiny_causal_lm(tie=tie).train()
    ids, mask = left_padded_batch([13, 6, 9])
    weights = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            lp, ent = K.token_logprobs(model, ids, mask, with_entropy=True, chunk_size=chunk, temperature=temperature)
        else:
            lp, ent = _naive(model, ids, mask, temperature)
        ((lp * weights * mask[:, 1:]).sum() + 0.3 * (ent * mask[:, 1:]).sum()).backward()
        results.append((lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp1, e1, g1), (lp2, e2, g2) = results
    assert torch.allclose(lp1, lp2, atol=1e-5) and torch.allclose(e1, e2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_token_logprobs_last_n_is_the_tail():
    """last_n returns the last n columns of the full (B, T-1) result."""
    model = tiny_causal_lm()
    ids, mask = left_padded_batch([10, 4])
    full = K.token_logprobs(model, ids, mask)
    tail = K.token_logprobs(model, ids, mask, last_n=4)
    assert full.shape == (2, 9) and torch.allclose(full[:, -4:], tail, atol=1e-6)


def test_chunked_logprobs_never_build_full_logits():
    """The head receives an empty tensor: no (B, T, V) logits are built by the fused path."""
    model = tiny_causal_lm()
    ids, mask = left_padded_batch([10, 4])
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        K.token_logprobs(model, ids, mask)
    finally:
        handle.remove()
    assert seen and all(shape[1] == 0 for shape in seen)


# ---------------------------------------------------------------------------------------------------------
# policy_loss
# ---------------------------------------------------------------------------------------------------------


def _case():
    logprobs = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, -0.7]])
    old = torch.tensor([[-1.1, -0.5, -1.0], [-0.3, -1.2, -0.7]])
    ref = torch.tensor([[-0.9, -0.7, -2.0], [-0.2, -1.0, -0.9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    return logprobs, old, ref, mask, adv


def _hand_per_token(logprobs, old, adv, eps_low, eps_high):
    out = []
    for i in range(2):
        row = []
        for t in range(3):
            r = math.exp(logprobs[i][t] - old[i][t])
            a = float(adv[i])
            row.append(max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)))
        out.append(row)
    return out


@pytest.mark.parametrize("agg", K.LOSS_AGGREGATIONS)
def test_policy_loss_aggregations_match_hand_computation(agg):
    """Each aggregation mode equals its definition, computed by hand with Python floats."""
    logprobs, old, _, mask, adv = _case()
    per = _hand_per_token(logprobs.tolist(), old.tolist(), adv, 0.2, 0.2)
    m = mask.tolist()
    if agg == "token-mean":
        expect = sum(per[i][t] * m[i][t] for i in range(2) for t in range(3)) / 5
    elif agg == "seq-mean-token-mean":
        expect = (sum(per[0][t] * m[0][t] for t in range(3)) / 2 + sum(per[1]) / 3) / 2
    elif agg == "seq-mean-token-sum":
        expect = (sum(per[0][t] * m[0][t] for t in range(3)) + sum(per[1])) / 2
    else:
        expect = sum(per[i][t] * m[i][t] for i in range(2) for t in range(3)) / (2 * 10)
    loss, _ = K.policy_loss(logprobs, old, adv, mask, loss_agg=agg, norm_length=10 if "norm" in agg else None)
    assert loss.item() == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_schulman(estimator):
    """k1 = -log r, k2 = (log r)^2/2, k3 = r - 1 - log r with log r = ref - logprobs; beta*KL is added per token."""
    logprobs, old, ref, mask, adv = _case()
    log_r = (ref - logprobs).tolist()
    fn = {"k1": lambda x: -x, "k2": lambda x: 0.5 * x * x, "k3": lambda x: math.exp(x) - 1 - x}[estimator]
    kl = [[fn(log_r[i][t]) for t in range(3)] for i in range(2)]
    per = _hand_per_token(logprobs.tolist(), old.tolist(), adv, 0.2, 0.2)
    m = mask.tolist()
    expect = sum((per[i][t] + 0.1 * kl[i][t]) * m[i][t] for i in range(2) for t in range(3)) / 5
    loss, stats = K.policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(sum(kl[i][t] * m[i][t] for i in range(2) for t in range(3)) / 5,
                                               rel=1e-6)


def test_clipping_active_and_inactive_with_asymmetric_bounds():
    """Clip-higher: ratio 1.25 is clipped at 1.2 with eps_high 0.2 but not with 0.28; clip_frac counts it."""
    logprobs = torch.tensor([[math.log(1.25), math.log(0.7)]])
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    adv = torch.tensor([1.0])
    loss, stats = K.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # token 1: min(1.25, 1.2) = 1.2 (clipped); token 2: min(0.7, 0.8) = 0.7 (pessimistic, unclipped)
    assert loss.item() == pytest.approx(-(1.2 + 0.7) / 2, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    loss, stats = K.policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-(1.25 + 0.7) / 2, rel=1e-6)
    assert stats["clip_frac"].item() == 0.0
    # negative advantage: the low clip binds at 0.8
    loss, _ = K.policy_loss(logprobs, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((1.25 + 0.8) / 2, rel=1e-6)


def test_gspo_sequence_ratio():
    """GSPO: the ratio is exp of the mean token log-ratio over the sequence, clipped per sequence."""
    logprobs, old, _, mask, adv = _case()
    loss, _ = K.policy_loss(logprobs, old, adv, mask, ratio_level="sequence", clip_low=0.2, clip_high=0.2,
                            loss_agg="seq-mean-token-mean")
    lr = (logprobs - old).tolist()
    s0 = math.exp((lr[0][0] + lr[0][1]) / 2)
    s1 = math.exp(sum(lr[1]) / 3)
    l0 = max(-1.0 * s0, -1.0 * min(max(s0, 0.8), 1.2))
    l1 = max(2.0 * s1, 2.0 * min(max(s1, 0.8), 1.2))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_on_policy_gradient_is_reinforce():
    """With ratio 1 (logprobs == old), d loss / d logprobs = -A * m / sum(m): REINFORCE's gradient."""
    torch.manual_seed(0)
    logprobs = torch.randn(3, 5).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, stats = K.policy_loss(logprobs, logprobs.detach(), adv, mask, loss_agg="token-mean")
    loss.backward()
    expect = -adv[:, None] * mask / mask.sum()
    assert torch.allclose(logprobs.grad, expect, atol=1e-7)
    assert stats["clip_frac"].item() == 0 and abs(stats["approx_kl"].item()) < 1e-7


def test_compiled_policy_loss_equals_eager():
    """torch.compile'd loss gives the eager loss, stats and gradients."""
    torch.manual_seed(0)
    logprobs = (torch.randn(4, 9) * 0.3 - 1).requires_grad_(True)
    old, ref = logprobs.detach() + 0.2 * torch.randn(4, 9), logprobs.detach() + 0.1 * torch.randn(4, 9)
    mask = (torch.rand(4, 9) > 0.3).long()
    adv = torch.randn(4)
    out = []
    for compile in (False, True):
        logprobs.grad = None
        loss, stats = K.policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, kl_coef=0.05, clip_high=0.28,
                                    loss_agg="seq-mean-token-mean", compile=compile)
        loss.backward()
        out.append((loss.detach(), {k: v.item() for k, v in stats.items()}, logprobs.grad.clone()))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-6)
    assert torch.allclose(out[0][2], out[1][2], atol=1e-6)
    for k in out[0][1]:
        assert out[0][1][k] == pytest.approx(out[1][1][k], abs=1e-6)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_padding_values_never_reach_the_loss(ratio_level):
    """Whatever sits at masked positions (a pad token's log-prob of -250 against a stored 0) leaves the loss, its
    gradient and the stats finite and equal to those with harmless padding."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    lp = torch.randn(3, 5, generator=g) * 0.1 - 2
    old = lp + torch.randn(3, 5, generator=g) * 0.05
    ref = lp + torch.randn(3, 5, generator=g) * 0.05
    adv = torch.tensor([1.0, -0.5, 0.3])
    out = []
    for fill_lp, fill_other in ((None, None), (-250.0, 0.0)):
        x, o, r = lp.clone(), old.clone(), ref.clone()
        if fill_lp is not None:
            x[mask == 0], o[mask == 0], r[mask == 0] = fill_lp, fill_other, fill_other
        x.requires_grad_(True)
        loss, stats = K.policy_loss(x, o, adv, mask, ref_logprobs=r, kl_coef=0.1, kl_estimator="k3",
                                    ratio_level=ratio_level, loss_agg="token-mean")
        loss.backward()
        out.append((loss.detach(), x.grad * mask, stats))
    (l0, g0, s0), (l1, g1, s1) = out
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    assert torch.allclose(l0, l1) and torch.allclose(g0, g1)
    for k in s0:
        assert torch.allclose(s0[k], s1[k]), k


def test_policy_loss_rejects_bad_settings():
    """Unknown aggregation or estimator names and mismatched shapes are one clear error each."""
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss_agg"):
        K.policy_loss(x, x, torch.zeros(2), x, loss_agg="mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        K.policy_loss(x, x, torch.zeros(2), x, kl_estimator="k4")
    with pytest.raises(ValueError, match="same shape"):
        K.policy_loss(x, torch.zeros(2, 4), torch.zeros(2), x)


# ---------------------------------------------------------------------------------------------------------
# masked reductions
# ---------------------------------------------------------------------------------------------------------


def test_masked_whiten_uses_only_masked_entries():
    """Whitening ignores masked-out values: masked entries get mean 0 and unbiased std 1."""
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    w = K.masked_whiten(x, m)
    assert torch.allclose(w[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)
    assert K.masked_mean(x, m).item() == pytest.approx(2.0)
    assert K.masked_var(x, m).item() == pytest.approx(1.0)


def test_length_batches_partition_sorted_rows_within_the_budget(monkeypatch):
    """Every row lands in exactly one micro-batch; rows are grouped by completion length; each micro-batch's
    padded size (rows x (longest prompt + longest completion)) fits the budget unless it is a single row; and a
    rank that needs fewer micro-batches than another splits its largest ones to match."""
    g = torch.Generator().manual_seed(0)
    plen, clen = torch.randint(3, 12, (40,), generator=g), torch.randint(1, 60, (40,), generator=g)
    clen[7] = 200  # longer than the budget on its own
    parts = K.length_batches(plen, clen, max_tokens=256)
    assert sorted(torch.cat(parts).tolist()) == list(range(40))
    for a, b in zip(parts, parts[1:]):
        assert clen[a].max() <= clen[b].min()
    for rows in parts:
        assert len(rows) == 1 or len(rows) * (plen[rows].max() + clen[rows].max()) <= 256
    assert [7] in [rows.tolist() for rows in parts]
    assert len(K.length_batches(plen, clen, max_tokens=0)) == 1
    monkeypatch.setattr(K, "all_reduce_max", lambda n: n + 3)  # another rank needs 3 more micro-batches
    more = K.length_batches(plen, clen, max_tokens=256)
    assert len(more) == len(parts) + 3 and sorted(torch.cat(more).tolist()) == list(range(40))
    monkeypatch.setattr(K, "all_reduce_max", lambda n: 41)
    with pytest.raises(ValueError, match="micro-batches"):
        K.length_batches(plen, clen, max_tokens=256)


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------


def _train_steps(model, opt, sched, n):
    for _ in range(n):
        ids = torch.randint(3, 97, (2, 8))  # global RNG use: resume must restore it
        noise = torch.randn(1)  # global RNG use: resume must restore it
        lp = K.token_logprobs(model, ids, torch.ones_like(ids))
        loss = -(lp.mean()) * (1 + 0.01 * noise.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_checkpoint_loads_in_transformers_and_resume_continues_exactly(tmp_path):
    """save_checkpoint writes a from_pretrained-loadable model; resumed optimizer/RNG states continue bit for bit."""
    from transformers import AutoModelForCausalLM

    def fresh():
        model = tiny_causal_lm().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return model, opt, sched

    torch.manual_seed(1)
    model, opt, sched = fresh()
    _train_steps(model, opt, sched, 4)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(1)
    model, opt, sched = fresh()
    _train_steps(model, opt, sched, 2)
    path = runs.save_checkpoint(str(tmp_path), 2, model, optimizer=opt, scheduler=sched, extra={"data_pos": 7})
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    assert runs.latest_checkpoint(str(tmp_path)) == path
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    torch.manual_seed(123)  # scramble every RNG before resuming
    model, opt, sched = fresh()
    state = runs.load_checkpoint(path, model, opt, sched)
    assert state == {"step": 2, "extra": {"data_pos": 7}}
    _train_steps(model, opt, sched, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_incomplete_checkpoint_is_ignored(tmp_path):
    """A temporary (crashed mid-save) directory never counts as a checkpoint."""
    os.makedirs(tmp_path / ".tmp-checkpoint-9")
    os.makedirs(tmp_path / "checkpoint-5")  # no trainer_state.pt: incomplete
    assert runs.latest_checkpoint(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------------------
# torchrun: DDP and FSDP2 keep ranks identical
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy,micro", [("ddp", ""), ("fsdp", ""), ("ddp", "micro"), ("fsdp", "micro")])
def test_two_process_training_step_keeps_ranks_identical(strategy, micro, tmp_path):
    """A two-process gloo torchrun training step (DDP, FSDP2) ends with identical parameters on both ranks,
    equal to one process training on the whole batch; also when each rank accumulates micro-batches and syncs
    only in the last backward (no_grad_sync)."""
    script = os.path.join(ROOT, "tests", "dist_step.py")
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           script, strategy, str(tmp_path), micro]
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = subprocess.run([sys.executable, script, "none", str(tmp_path)], env=environ, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    tag = f"{strategy}_micro" if micro else strategy
    r0 = torch.load(tmp_path / f"params_{tag}_rank0.pt")
    r1 = torch.load(tmp_path / f"params_{tag}_rank1.pt")
    one = torch.load(tmp_path / "params_none_rank0.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.allclose(r0[k], one[k], atol=2e-5), k  # AdamW normalises tiny float differences


@pytest.mark.slow
def test_two_process_train_stats_are_token_weighted_like_one_process(tmp_path):
    """Rank 0 holds 35 loss tokens, rank 1 holds 3 (and a row the overlong filter masked): the train/ stats a
    2-rank run logs (clip fraction, ratio mean and extremes, entropy, k3 KL) equal one process's over the whole
    minibatch, the same on both ranks. A plain mean over ranks would weigh the 3 tokens like the 35. So are the
    rollout's means over some of its rows (the length of correct responses, a reward that applies to some)."""
    import json

    script = os.path.join(ROOT, "tests", "dist_metrics.py")
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           script, "ddp", str(tmp_path)], env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = subprocess.run([sys.executable, script, "none", str(tmp_path)], env=environ, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    r0, r1, one = (json.load(open(tmp_path / f"metrics_{name}.json")) for name in ("rank0", "rank1", "none"))
    assert r0 == r1 and r0.keys() == one.keys()
    token_stats = [k for k in one if k not in ("loss", "grad_norm") and "/" not in k]
    assert {"entropy", "ratio_max", "ratio_min"} <= set(token_stats) and one["ratio_max"] > one["ratio_min"]
    assert one["rollout/length_correct"] == 9.0 and one["rewards/judge"] == 1.75 / 3  # (12 + 11 + 12 + 1) / 4
    assert {"mismatch/chi2_seq", "mismatch/ess", "mismatch/logprob_diff_max", "mismatch/rejected_share",
            "mismatch/is_weight_max"} <= set(one) and 0 < one["mismatch/rejected_share"] < 1
    for k in one:
        assert math.isclose(r0[k], one[k], rel_tol=1e-4, abs_tol=1e-6), (k, r0[k], one[k])


def test_the_token_mean_normaliser_counts_only_loss_active_tokens():
    """accumulate_gradients(mask="loss_mask") over micro-batches gives the gradient of sum(loss over loss-active
    tokens) / (number of loss-active tokens): a response masked out of the loss (DAPO's overlong filter) adds
    neither to the sum nor to the count (TRL #6439 divided by every completion token)."""
    model = tiny_causal_lm().train()
    prompt_ids, prompt_mask = left_padded_batch([4, 3, 5, 2], seed=5)
    tokens = torch.randint(3, 97, (4, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    loss_mask = mask.clone()
    loss_mask[2] = 0  # truncated: out of the loss
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "tokens": tokens, "mask": mask,
             "loss_mask": loss_mask, "old_logprobs": torch.full((4, 6), -4.6),
             "advantages": torch.tensor([1.0, -0.5, 0.7, -0.8])}

    def micro_loss(part, share):
        logprobs = K.completion_logprobs(model, part)
        return K.policy_loss(logprobs, part["old_logprobs"], part["advantages"], part["loss_mask"],
                             loss_agg="token-mean", num_tokens=share.tokens, num_rows=share.rows)

    K.accumulate_gradients(model, batch, micro_loss, max_tokens=10, mask="loss_mask")  # one row per micro-batch
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logprobs = K.completion_logprobs(model, batch)
    ratio = torch.exp(logprobs - batch["old_logprobs"])
    per_token = -torch.minimum(ratio * batch["advantages"][:, None],
                               ratio.clamp(0.8, 1.2) * batch["advantages"][:, None])
    reference = (per_token * loss_mask).sum() / loss_mask.sum()  # 16 tokens; mask.sum() would be 22
    reference.backward()
    assert loss_mask.sum() == 16 and mask.sum() == 22
    for n, p in model.named_parameters():
        assert torch.allclose(fast[n], p.grad, rtol=1e-4, atol=1e-7), n


def test_offload_optimizer_round_trips_a_loaded_state():
    """offload_optimizer empties every AdamW state tensor inside the block and restores it bit for bit after, also
    when the state came from torch.load (whose storages cannot be resized: a resumed run), and the next step runs."""
    import io

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt.load_state_dict(torch.load(buffer))
    states = [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
    before = [v.clone() for v in states]
    with K.offload_optimizer(opt):
        assert all(v.untyped_storage().nbytes() == 0 for v in states)
    assert all(torch.equal(a, b) for a, b in zip(states, before))
    assert [v for s in opt.state.values() for v in s.values() if v.dim() > 0] == states  # the same objects
    model(torch.ones(2, 4)).sum().backward()
    opt.step()


def test_decode_states_never_reach_the_recompile_limit():
    """Every decode state compiles on a code object of its own: at a recompile limit of 1, a second state (another
    row count) compiles instead of failing fullgraph's hard limit, as it did when they shared one."""
    torch._dynamo.reset()
    model = tiny_causal_lm(vocab_size=101)
    ids, mask = left_padded_batch([6, 9], vocab_size=101)
    with torch._dynamo.config.patch(recompile_limit=1):
        for samples in (1, 2):
            gen = K.generate(model, ids, mask, max_new_tokens=4, num_samples=samples, eos_token_id=-1,
                             pad_token_id=0, compile=True, noise_keys=torch.arange(2 * samples))
            assert gen.tokens.shape == (2 * samples, 4)


def test_gradient_checkpointing_saves_activations_and_changes_no_gradient():
    """wrap_model(checkpointing=True): the fused log-prob pass keeps a fraction of the activations for the backward
    (each layer's input instead of everything inside it), recomputes them there, and the gradients are the same."""
    ids, mask = left_padded_batch([5, 7, 9])
    results = []
    for checkpointing in (False, True):
        model = K.wrap_model(tiny_causal_lm().train(), "none", checkpointing=checkpointing)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            logprobs = K.token_logprobs(model, ids, mask)
        (logprobs * mask[:, 1:]).sum().backward()
        results.append((sum(saved), [p.grad.clone() for p in model.parameters()]))
    (plain, grads), (checkpointed, grads_ck) = results
    assert checkpointed < plain / 4, (checkpointed, plain)
    for a, b in zip(grads, grads_ck):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_a_sharded_load_never_holds_the_whole_model_on_a_rank(tmp_path):
    """load_model(shard=True) under a 2-rank gloo torchrun: no parameter exists on a rank's device when FSDP2 shards
    the model (it is built on the meta device), each rank then holds half of it, and what it holds is the checkpoint:
    the full state dict, the buffers the checkpoint lacks (rotary inv_freq) and the EOS ids equal a plain load's, and
    the state and log-probs equal those of loading the whole model on each rank and then sharding it (the old way),
    for a trainable fp32 model and a frozen bf16 reference alike (the fp32 one's log-probs equal a plain load's)."""
    import transformers

    import toy_world as toy

    tokenizer = toy.build_toy_tokenizer()
    config = transformers.Qwen2Config(**{**toy.toy_model_config(tokenizer).to_dict(), "hidden_size": 32,
                                         "intermediate_size": 64, "num_hidden_layers": 2, "layer_types": None,
                                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    transformers.GenerationConfig(eos_token_id=[0, 5]).save_pretrained(str(model_dir))
    short = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**config.to_dict(),
                                                                      "vocab_size": len(tokenizer) - 3}))
    short.save_pretrained(str(tmp_path / "short"))
    tokenizer.save_pretrained(str(tmp_path / "short"))
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           os.path.join(ROOT, "tests", "dist_load.py"), str(model_dir), str(tmp_path)],
                          env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"load_rank{r}.pt") for r in range(2)]
    # a checkpoint with fewer embedding rows than its tokenizer: resized on the meta device too, the same on each rank
    assert ranks[0]["short"]["rows"] == ranks[1]["short"]["rows"] == len(tokenizer)
    assert all(torch.equal(ranks[0]["short"]["state"][k], v) for k, v in ranks[1]["short"]["state"].items())
    for name, kw in (("policy", {}), ("reference", dict(dtype="bfloat16", frozen=True))):
        plain, tok = K.load_model(str(model_dir), device="cpu", **kw)
        ids, mask = left_padded_batch([9, 5, 7], vocab_size=len(tok), seed=2)
        expected = plain.state_dict()
        whole = sum(t.numel() * t.element_size() for t in plain.parameters())
        for part in ranks:
            got = part[name]
            assert got["fsdp"] and got["bytes_at_sharding"] == 0, got["bytes_at_sharding"]
            assert 0.4 * whole < got["local_bytes"] < 0.6 * whole, (got["local_bytes"], whole)
            assert got["compute"] == K.compute_dtype(plain) and got["eos"] == [0, 5]
            for key, value in got["state"].items():  # FSDP2 keeps a frozen model all in its compute dtype
                assert torch.equal(value, expected[key].to(value.dtype)), (name, key)
                assert torch.equal(value, got["old_state"][key]), (name, key)
            for key, value in plain.named_buffers():
                assert torch.equal(got["buffers"][key], value), (name, key)
            assert torch.equal(got["logprobs"], got["old_logprobs"]), name
        assert torch.allclose(got["logprobs"], K.token_logprobs(plain, ids, mask), atol=1e-5) or name != "policy"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_dropping_finished_rows_changes_no_sample(temperature):
    """Eager decoding drops rows that have finished from the batch; with keyed noise (or greedy) every row's
    tokens, log-probs, mask and truncation are those of decoding all rows to the end, and the static cache is
    whole again for the next call."""
    model = tiny_causal_lm()
    ids, mask = left_padded_batch([6, 9, 4, 7])
    eos = list(range(3, 14)) if temperature else [int(t) for t in K.generate(
        model, ids, mask, max_new_tokens=12, temperature=0.0, num_samples=1, eos_token_id=-1).tokens[:, 5:9].flatten()]
    kw = dict(max_new_tokens=24, temperature=temperature, num_samples=4, eos_token_id=eos, pad_token_id=0,
              noise_keys=torch.arange(16))
    for _ in range(2):  # the second call reuses the decode state the first one compacted
        cut, whole = K.generate(model, ids, mask, compact=True, **kw), K.generate(model, ids, mask, compact=False, **kw)
        lengths = whole.mask.sum(-1)
        assert lengths.min() < lengths.max()  # rows did stop at different steps
        assert torch.equal(cut.tokens, whole.tokens) and torch.equal(cut.mask, whole.mask)
        assert torch.equal(cut.truncated, whole.truncated)
        assert torch.allclose(cut.logprobs, whole.logprobs, atol=1e-6)


def test_keyed_sampling_is_batch_invariant_and_exponential():
    """With noise_keys, a row's sample depends only on its key: the same rows sampled inside a larger batch or
    alone match; the keyed draws are uniform on [0, 1) and differ across steps."""
    model = tiny_causal_lm()
    ids, mask = left_padded_batch([6, 9, 4])
    kw = dict(max_new_tokens=10, temperature=1.0, num_samples=2, eos_token_id=-1, pad_token_id=0)
    keys = torch.arange(100, 106)
    full = K.generate(model, ids, mask, noise_keys=keys, **kw)
    tail = K.generate(model, ids[1:], mask[1:], noise_keys=keys[2:], **kw)
    assert torch.equal(full.tokens[2:], tail.tokens)
    assert not torch.equal(full.tokens[2:4], full.tokens[4:6])
    u = K.keyed_uniform(torch.arange(20000), 3)
    assert 0 <= u.min() and u.max() < 1
    assert torch.allclose(torch.histc(u.float(), 10, 0, 1) / len(u), torch.full((10,), 0.1), atol=0.01)
    assert abs(torch.corrcoef(torch.stack([u, K.keyed_uniform(torch.arange(20000), 4)]))[0, 1]) < 0.03


def test_stream_order_is_one_shuffle_per_epoch_made_once(monkeypatch):
    """stream_indices reads the seeded randperm of each epoch at the stream's positions, across epoch boundaries,
    drawing each epoch's permutation once, not once per sample; every epoch is a permutation of the rows."""
    n, seed = 10, 3

    def reference(position):  # the per-sample definition
        epoch, index = divmod(position, n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))[index].item()

    expected = [reference(p) for p in range(32)]   # epochs 0-3
    runs._EPOCH_CACHE.clear()
    calls, randperm = [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a[0]) or randperm(*a, **k))
    assert sum((runs.stream_indices(start, 4, n, seed) for start in range(0, 32, 4)), []) == expected
    assert calls == [n] * 4                                             # one permutation per epoch
    assert sorted(expected[:10]) == sorted(expected[10:20]) == list(range(10)) and expected[:10] != expected[10:20]


def test_toy_resolves_to_toy_base_and_a_missing_one_is_one_sentence(monkeypatch, tmp_path):
    """resolve_model_path("toy") is the toy base's directory; when it is missing, a UserError names the commands that
    restore or rebuild it (the engine never starts a training script); any other name passes through."""
    assert K.resolve_model_path("toy") == K.TOY_BASE
    monkeypatch.setattr(K, "TOY_BASE", str(tmp_path / "missing"))
    with pytest.raises(K.UserError, match=r"git checkout -- toy/base.*python sft.py --preset toy_base"):
        K.resolve_model_path("toy")
    assert K.resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_warmup_schedule():
    """Linear warmup to 1, then constant (min_ratio 1) or cosine down to min_ratio at total_steps."""
    constant = runs.warmup_schedule(4)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = runs.warmup_schedule(2, 10, 0.1)
    assert [cosine(0), cosine(1), cosine(2)] == [0.5, 1.0, 1.0]
    assert cosine(6) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cosine(10) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.1)
    assert runs.warmup_schedule(0)(0) == 1.0


def test_guarded_step_steps_all_models_or_none():
    """With two models (PPO's policy and critic), a non-finite gradient in either drops both steps and both
    gradients; finite ones step both, each clipped on its own and reported under its name, and the gradients are
    set to None after the step as well."""
    models = [torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=1.0) for m in models]
    before = [[p.detach().clone() for p in m.parameters()] for m in models]
    for m, grad in zip(models, (1.0, math.nan)):
        for p in m.parameters():
            p.grad = torch.full_like(p, grad)
    values, stepped = K.guarded_step(models, optimizers, 1.0, {"loss": torch.tensor(0.5)}, names=["policy", "critic"])
    assert not stepped and math.isnan(values["critic_grad_norm"]) and values["policy_grad_norm"] == pytest.approx(3 ** 0.5)
    assert all(p.grad is None for m in models for p in m.parameters())
    assert all(torch.equal(p, q) for m, b in zip(models, before) for p, q in zip(m.parameters(), b))
    for m in models:
        for p in m.parameters():
            p.grad = torch.full_like(p, 3.0)
    values, stepped = K.guarded_step(models, optimizers, 1.0, {"loss": torch.tensor(0.5)}, names=["policy", "critic"])
    assert stepped and values["critic_grad_norm"] == pytest.approx(3 * 3 ** 0.5)
    assert all(p.grad is None for m in models for p in m.parameters())  # freed until the next backward
    for m, b in zip(models, before):  # each clipped to norm 1: every entry moved by 1/sqrt(3)
        assert all(torch.allclose(q - p, torch.full_like(p, 3 ** -0.5)) for p, q in zip(m.parameters(), b))


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_accumulate_gradients_equals_one_backward_over_the_whole_minibatch(loss_agg):
    """accumulate_gradients over length-sorted, trimmed micro-batches, with two models and a dict of losses (PPO's
    policy and critic), leaves each model the gradient, and the summed losses, of one plain backward over the whole
    padded minibatch; its folded stats are the whole minibatch's token means."""
    from conftest import left_padded_batch, tiny_causal_lm

    R, N = 6, 5
    prompt_ids, prompt_mask = left_padded_batch([3, 5, 2, 4, 4, 1], seed=3)
    g = torch.Generator().manual_seed(4)
    mask = (torch.arange(N) < torch.tensor([5, 1, 3, 2, 5, 4])[:, None]).long()
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=torch.randint(3, 97, (R, N), generator=g),
                 mask=mask, advantages=torch.randn(R, generator=g))

    def losses(policy, other, part, tokens, rows):
        logprobs = K.completion_logprobs(policy, part)                                       # (r, n)
        loss, stats = K.policy_loss(logprobs, logprobs.detach() - 0.1, part["advantages"], part["mask"],
                                    loss_agg=loss_agg, num_tokens=tokens, num_rows=rows)
        nll = -(K.completion_logprobs(other, part) * part["mask"]).sum() / tokens            # a token-mean NLL
        return {"policy_loss": loss, "other_loss": nll}, {"clip_frac": stats["clip_frac"]}

    grads, totals = [], []
    for accumulated in (True, False):
        policy, other = tiny_causal_lm(seed=1).train(), tiny_causal_lm(seed=2).train()
        if accumulated:
            stats = K.accumulate_gradients([policy, other], batch, lambda part, share: losses(
                policy, other, part, share.tokens, share.rows), max_tokens=16)
            assert len(K.micro_batches(batch, 16)) > 2
        else:  # the plain reference: the whole padded minibatch in one forward and one backward
            named, stats = losses(policy, other, batch, mask.sum(), None)
            sum(named.values()).backward()
            stats = {**stats, **{k: v.detach() for k, v in named.items()}}
        totals.append({k: float(v) for k, v in stats.items()})
        grads.append({f"{i}.{n}": p.grad.clone() for i, m in enumerate((policy, other)) for n, p in m.named_parameters()})
    assert totals[0].keys() == totals[1].keys() == {"clip_frac", "policy_loss", "other_loss"}
    for k in totals[0]:
        assert totals[0][k] == pytest.approx(totals[1][k], rel=1e-5, abs=1e-7), k
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


def test_guarded_step_skips_every_model_on_a_non_finite_loss_and_counts_it():
    """A NaN in any named loss (PPO's value_loss) skips the step of every model and counts in state (skipped, and
    nan_streak in a row); a finite step resets the streak."""
    model, other = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    optimizers = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (model, other)]
    state = {"skipped": 0, "nan_streak": 0}
    for value_loss, expect_step in ((float("nan"), False), (float("nan"), False), (1.0, True)):
        before = [m.weight.detach().clone() for m in (model, other)]
        for m in (model, other):
            m(torch.ones(1, 2)).sum().backward()
        stats = {"policy_loss": torch.tensor(0.5), "value_loss": torch.tensor(value_loss)}
        _, stepped = K.guarded_step([model, other], optimizers, 1.0, stats, names=["policy", "critic"], state=state)
        assert stepped == expect_step
        assert all(torch.equal(b, m.weight) != expect_step for b, m in zip(before, (model, other)))
    assert state == {"skipped": 2, "nan_streak": 0}
