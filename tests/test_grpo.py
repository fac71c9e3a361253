"""grpo.py: advantage maths by hand, presets, two steps of every preset, torchrun equivalence, exact resume."""

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import grpo
import rl_kernels as K
import rl_runs as runs
import rlvr_rewards as env


def small_args(model_dir, out_dir, **kw):
    base = dict(model=model_dir, out_dir=str(out_dir), max_steps=2, prompts_per_step=4, num_generations=4,
                max_new_tokens=12, eval_every=2, eval_size=8, eval_samples=2, plot=False)
    base.update(kw)
    return grpo.Args(**base)


# ---------------------------------------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    """Group z-score with unbiased std; mean-only; batch std of the centred rewards."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    # group 1: mean .5, unbiased std sqrt(1/3); group 2: mean 2.75, std 1.5
    z = grpo.group_advantages(r, 4, "group", eps=0.0)
    s1 = (1 / 3) ** 0.5
    expect = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -0.75 / 1.5, -0.75 / 1.5, -0.75 / 1.5, 2.25 / 1.5]
    assert torch.allclose(z, torch.tensor(expect), atol=1e-6)
    m = grpo.group_advantages(r, 4, "none")
    assert torch.allclose(m, torch.tensor([0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]))
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25])
    b = grpo.group_advantages(r, 4, "batch", eps=0.0)
    assert torch.allclose(b, centred / centred.std(), atol=1e-6)


def test_equal_rewards_give_zero_advantage_and_are_flagged():
    """A group whose rewards are all equal has advantage 0 (not NaN) and counts as zero-variance."""
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert torch.equal(grpo.group_advantages(r, 3)[:3], torch.zeros(3))
    assert grpo.zero_variance_groups(r, 3).tolist() == [True, False]


def test_rloo_advantages_by_hand():
    """RLOO: r_i minus the mean of the other G-1 rewards."""
    r = torch.tensor([1.0, 0.0, 0.0, 3.0])
    expect = [1 - 1.0, 0 - 4 / 3, 0 - 4 / 3, 3 - 1 / 3]
    assert torch.allclose(grpo.rloo_advantages(r, 4), torch.tensor(expect), atol=1e-6)


def test_reinforce_pp_advantages_by_hand():
    """REINFORCE++: reward at the last token, minus beta*k1 per token, return-to-go, whitened over the batch."""
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.0, 0.3, 0.1]])
    beta = 0.5
    # token rewards row 0: [-0.05, 1 - 0.1, 0]; row 1: [0, -0.15, -0.05]; returns-to-go:
    returns = torch.tensor([[0.85, 0.9], [-0.2, -0.2]])
    flat = torch.tensor([0.85, 0.9, -0.2, -0.2, -0.05])
    whitened = (flat - flat.mean()) / flat.std()
    adv = grpo.reinforce_pp_advantages(rewards, mask, kl, beta)
    assert torch.allclose(adv[0, :2], whitened[:2], atol=1e-5)
    assert torch.allclose(adv[1], whitened[2:], atol=1e-5)
    assert adv[0, 2] == 0 and returns.shape == (2, 2)


def test_presets_set_their_papers_switches():
    """Each preset sets the switches of its paper, and a value the user passed wins over the preset, from Python
    as on the command line (Args(preset="dapo", clip_high=0.2) keeps 0.2, the plain default)."""
    dapo = grpo.Args(preset="dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg, dapo.dynamic_sampling, dapo.overlong_filter,
            dapo.soft_overlong, dapo.kl_coef) == (0.2, 0.28, "token-mean", True, True, True, 0.0)
    dr = grpo.Args(preset="dr_grpo")
    assert (dr.advantage, dr.loss_agg) == ("mean", "seq-mean-token-sum-norm")
    gspo = grpo.Args(preset="gspo")
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 4e-4)
    assert grpo.Args(preset="rloo").advantage == "rloo"
    rpp = grpo.Args(preset="reinforce_pp")
    assert (rpp.advantage, rpp.kl_in_reward, rpp.kl_estimator) == ("batch", True, "k1") and rpp.kl_coef > 0
    g = grpo.Args(preset="grpo")
    assert (g.advantage, g.loss_agg, g.clip_low, g.clip_high, g.kl_coef) == ("group", "seq-mean-token-mean",
                                                                              0.2, 0.2, 0.0)
    assert grpo.Args(preset="dapo", clip_high=0.3).clip_high == 0.3
    assert grpo.Args(preset="dapo", clip_high=0.2).clip_high == 0.2  # equal to the plain default, and still wins
    assert grpo.Args(preset="dapo", dynamic_sampling=False) == grpo.cli(["--preset", "dapo", "--no-dynamic-sampling"])
    with pytest.raises(ValueError, match="Unknown preset"):
        grpo.Args(preset="ppo")


def test_impossible_settings_fail_before_any_compute(tmp_path):
    """Batch not divisible, G = 1 with a group advantage, and missing dataset fields: one clear error each."""
    info = runs.DistInfo(rank=0, world_size=3)
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        grpo.check_args(grpo.Args(prompts_per_step=16), info)
    with pytest.raises(ValueError, match="num-generations 1"):
        grpo.check_args(grpo.Args(num_generations=1), runs.DistInfo())
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1"}) + "\n")
    with pytest.raises(ValueError, match="line 1: no 'answer', which the rewards need"):
        grpo.main(grpo.Args(dataset=str(data), out_dir=str(tmp_path / "o"), rewards=("accuracy",),
                            reward_weights=(1.0,)))
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2"):
        grpo.main(grpo.Args(dataset=str(data), out_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="num-iterations"):
        grpo.check_args(grpo.Args(num_iterations=0), runs.DistInfo())
    with pytest.raises(ValueError, match="temperature > 0"):
        grpo.check_args(grpo.Args(temperature=0.0), runs.DistInfo())


def test_a_rank_without_loss_tokens_reports_every_metric():
    """All rows truncated under the overlong filter: no loss token, and still every key (ratio extremes NaN), so
    the ranks' metric all-reduce lines up."""
    from conftest import left_padded_batch, tiny_causal_lm

    prompt_ids, prompt_mask = left_padded_batch([3, 5], seed=1)
    mask = torch.ones(2, 4, dtype=torch.long)
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=torch.randint(3, 97, (2, 4)), mask=mask,
                 loss_mask=torch.zeros_like(mask), advantages=torch.tensor([1.0, -1.0]))
    model = tiny_causal_lm().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats, _ = grpo.update(grpo.Args(), model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), batch,
                        {"skipped": 0, "nan_streak": 0})
    assert {"train/ratio_max", "train/ratio_min", "train/clip_frac", "train/loss"} <= set(stats)
    assert math.isnan(stats["train/ratio_max"]) and stats["train/loss"] == 0.0


@pytest.mark.parametrize("bad, why", [(b'{"prompt": "caf\xff"}', "not valid UTF-8"), (b"[" * 100_000, "nested too deeply"),
                                      (b'{"prompt": [{"content": "hi"}]}', "list of messages"),
                                      (b'{"prompt": 3}', "string or a non-empty list")])
def test_malformed_jsonl_lines_are_named(bad, why, tmp_path):
    """Undecodable bytes, pathological nesting and malformed chat messages stop the load with the line number."""
    data = tmp_path / "d.jsonl"
    data.write_bytes(json.dumps({"prompt": "1+1", "answer": "2"}).encode() + b"\n\n" + bad + b"\n")
    with pytest.raises(ValueError, match=f"line 3: .*{why}"):
        env.load_prompts(str(data), "train", 10, 0)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_length_sorted_micro_batches_give_the_whole_batch_gradient(loss_agg, num_iterations):
    """Splitting the update into length-sorted, trimmed micro-batches (--micro-batch-tokens) leaves the gradient
    and the logged loss those of one pass over the whole padded batch."""
    from conftest import left_padded_batch, tiny_causal_lm

    R, N = 8, 7
    prompt_ids, prompt_mask = left_padded_batch([3, 5, 5, 2, 4, 4, 5, 1], seed=1)
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([7, 2, 5, 1, 7, 3, 6, 4])
    mask = (torch.arange(N) < lengths[:, None]).long()
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=torch.randint(3, 97, (R, N), generator=g),
                 mask=mask, loss_mask=mask.clone(), advantages=torch.randn(R, generator=g),
                 old_logprobs=torch.randn(R, N, generator=g) * 0.1 - 4.5)
    results = []
    for budget in (0, 24):
        args = grpo.Args(micro_batch_tokens=budget, loss_agg=loss_agg, num_iterations=num_iterations,
                         max_new_tokens=N, max_grad_norm=1e9)
        model = tiny_causal_lm().train()
        assert len(K.micro_batches(batch, budget)) == (1 if budget == 0 else 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the weights
        grads = {}  # the last step's gradient, as the optimizer sees it (guarded_step then sets .grad to None)
        opt.register_step_pre_hook(lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters()}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        stats, _ = grpo.update(args, model, opt, sched, batch, {"skipped": 0, "nan_streak": 0})
        results.append((stats, grads))
        if num_iterations == 2:
            old = K.rollout_logprobs(model, batch, max_tokens=budget)
            ref = K.completion_logprobs(model, batch)
            assert torch.allclose(old * mask, ref * mask, atol=1e-5)
    (s0, g0), (s1, g1) = results
    assert s0.keys() == s1.keys()
    for k in s0:  # loss, entropy, clip_frac, approx_kl, ratio mean/max/min, grad_norm
        assert s0[k] == pytest.approx(s1[k], rel=1e-5, abs=1e-6), k
    if num_iterations == 2:
        assert s0["train/clip_frac"] > 0  # pi_old differs from pi: the ratios and their stats are not trivial
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), n


def test_no_grad_sync_skips_ddp_all_reduce_only():
    """Under DDP every micro-batch but the last skips the all-reduce; FSDP2 is left reduce-scattering (keeping
    gradients sharded); the last micro-batch always syncs."""
    calls = []

    class FakeDDP(torch.nn.Module):
        def no_sync(self):
            calls.append("no_sync")
            return contextlib.nullcontext()

    class FakeFSDP(torch.nn.Module):
        def set_requires_gradient_sync(self, flag):
            calls.append(flag)

    with K.no_grad_sync(FakeDDP(), skip=True):
        pass
    with K.no_grad_sync(FakeDDP(), skip=False), K.no_grad_sync(FakeFSDP(), skip=True):
        pass
    assert calls == ["no_sync"]


def test_command_line_flags_beat_the_preset_even_at_plain_defaults():
    """--preset dapo --no-dynamic-sampling switches DAPO's dynamic sampling off; a flag equal to the plain default
    still wins over the preset; unset fields take the preset's values."""
    dapo = grpo.cli(["--preset", "dapo", "--no-dynamic-sampling", "--clip-high", "0.2"])
    assert (dapo.dynamic_sampling, dapo.clip_high, dapo.loss_agg, dapo.overlong_filter) == (False, 0.2, "token-mean",
                                                                                            True)
    dr = grpo.cli(["--preset=dr_grpo", "--loss-agg", "seq-mean-token-mean"])
    assert (dr.loss_agg, dr.advantage) == ("seq-mean-token-mean", "mean")
    assert grpo.cli([]) == grpo.Args()


@pytest.mark.parametrize("task", ["arithmetic", "countdown", "code"])
def test_correctness_uses_the_tasks_own_verifier(task):
    """Accuracy metrics judge a countdown answer by its expression and code by its tests, not by string equality
    with the row's `answer` field; the same verdicts whether or not the task reward is among the rewards."""
    row = env.make_dataset(task, split="test", n=1, seed=0)[0]
    if task == "countdown":
        row = dict(row, numbers=[12, 12, 1], target=25, answer="12+12+1")
        good, bad = "<answer>12 + 1 + 12</answer>", "<answer>25</answer>"  # bad: the target is not an expression
    elif task == "code":
        good, bad = f"```python\n{row['answer']}```", "```python\ndef f(x):\n    return 0\n```"
    else:
        good, bad = f"<answer>{row['answer']}</answer>", "<answer>-1</answer>"
    rows = [row, row]
    assert env.verify([good, bad], rows) == [True, False]
    fn = env.TASK_REWARDS[task]
    rollout = env.Rollout(None, None, None, [good, bad], rows)
    assert env.score(rollout, [("task", fn)], [1.0]).correct == [True, False]


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(grpo.PRESETS))
def test_every_preset_runs_two_steps(preset, tiny_model_dir, tmp_path):
    """Two steps of each preset write metrics with the diagnostics, a loadable final model and a summary."""
    extra = {"num_iterations": 2, "num_minibatches": 2} if preset == "gspo" else {}
    grpo.main(small_args(tiny_model_dir, tmp_path, preset=preset, **extra))
    rows = runs.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("rollout/reward_mean", "rollout/accuracy", "rollout/response_length", "rollout/truncated_share",
                "rollout/zero_variance_group_share", "train/entropy", "train/clip_frac", "train/approx_kl",
                "train/grad_norm", "perf/gen_tokens_per_s", "eval/accuracy"):
        assert key in rows[-1], key
    if preset == "reinforce_pp":
        assert "train/kl" not in rows[-1]  # the KL went into the reward, not the loss
    assert os.path.exists(tmp_path / "final" / "model.safetensors")
    assert json.load(open(tmp_path / "args.json"))["preset"] == preset


def test_kl_in_loss_loads_a_reference_and_logs_kl(tiny_model_dir, tmp_path):
    """With beta > 0 the reference is loaded and train/kl is logged; on the first step it is 0 (same weights)."""
    grpo.main(small_args(tiny_model_dir, tmp_path, kl_coef=0.04, max_steps=1, eval_every=0))
    rows = runs.read_metrics(str(tmp_path))
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("reference", [False, True])
def test_resume_matches_uninterrupted_run(reference, tiny_model_dir, tmp_path):
    """Stopping after 3 steps and resuming to 4 ends with exactly the parameters of a 4-step run; with a KL
    reference reset every 2 steps, the reference saved in the checkpoint comes back too (and only there: the
    policy does not load it), so the KL logged after the resume is the uninterrupted run's."""
    kw = dict(eval_every=0, rewards=("tag_count", "task"), reward_weights=(1.0, 1.0))  # tag_count: a signal
    if reference:
        kw.update(kl_coef=0.04, ref_reset_every=2)
    straight = tmp_path / "straight"
    grpo.main(small_args(tiny_model_dir, straight, max_steps=4, **kw))
    parts = tmp_path / "parts"
    grpo.main(small_args(tiny_model_dir, parts, max_steps=3, save_every=3, **kw))
    grpo.main(small_args(tiny_model_dir, parts, max_steps=4, resume=True, **kw))
    from safetensors.torch import load_file

    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(parts / "final" / "model.safetensors")
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in runs.read_metrics(str(parts))] == [1, 2, 3, 4]
    if reference:
        kl = [r["train/kl"] for r in runs.read_metrics(str(straight))]
        assert kl[3] > 0 and kl == [r["train/kl"] for r in runs.read_metrics(str(parts))]
        os.remove(parts / "final" / "reference.safetensors")  # e.g. a checkpoint from another program
        with pytest.raises(ValueError, match="no reference.safetensors"):
            grpo.main(small_args(tiny_model_dir, parts, max_steps=5, resume=True, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("preset, extra", [
    ("grpo", []),
    ("reinforce_pp", []),  # whitening over both ranks' tokens
    ("grpo", ["--strategy", "fsdp", "--kl-coef", "0.04", "--ref-reset-every", "2", "--save-every", "2"]),  # sharded
    ("grpo", ["--batch-invariant", "--top-p", "0.8", "--rollout-correction", "bypass"]),  # mismatch exactly 0
    ("grpo", ["--strategy", "fsdp", "--teacher", "toy"]),  # on-policy distillation: the teacher sharded as it loads
])  # reference: reset from the sharded policy, gathered into the checkpoint
def test_two_process_torchrun_matches_one_process(preset, extra, tiny_model_dir, tmp_path):
    """torchrun with 2 ranks (gloo) logs the metrics and ends with the parameters of a one-process run with the
    same global batch (rank-invariant sampling noise, global token counts). The ranks split their rows into
    small length-sorted micro-batches (as many on each rank, gradients synced once); the one process does not."""
    common = ["--model", tiny_model_dir, "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4",
              "--max-new-tokens", "12", "--eval-every", "0", "--device", "cpu", "--no-plot",
              "--rewards", "tag_count", "task", "--reward-weights", "1.0", "1.0",  # tag_count: nonzero variance
              "--preset", preset, *extra]
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path / "two"), *common,
                          "--micro-batch-tokens", "64"],
                         env=environ, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path / "one"),
                          *common], env=environ, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    m2, m1 = runs.read_metrics(str(tmp_path / "two")), runs.read_metrics(str(tmp_path / "one"))
    for r1, r2 in zip(m1, m2):
        for k in r1:
            if k.startswith(("rollout/", "train/loss", "train/clip_frac", "train/entropy", "train/kl", "distill/")):
                assert r1[k] == pytest.approx(r2[k], abs=1e-4, nan_ok=True), k
    from safetensors.torch import load_file

    assert m1[0]["rollout/reward_std"] > 0  # there was a learning signal
    if "--batch-invariant" in extra:  # sampler and trainer agree bit for bit on both ranks and in one process: under
        for row in m1 + m2:           # bypass the first step's ratio pi_theta / mu is exactly 1 on every token
            assert row["mismatch/logprob_diff_max"] == 0.0 and row["mismatch/kept_mass"] < 1.0
        assert m1[0]["train/ratio_max"] == m1[0]["train/ratio_min"] == m2[0]["train/ratio_max"] == 1.0
    if "--teacher" in extra:  # the token-weighted mean over both ranks' tokens is the one process's
        assert all(row["distill/reverse_kl"] > 0 for row in m1 + m2)
    if "--kl-coef" in extra:
        assert m1[1]["train/kl"] > 0 and os.path.exists(tmp_path / "two" / "checkpoint-2" / "reference.safetensors")
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a)  # and the parameters moved
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.parametrize("memory", [dict(gradient_checkpointing=True), dict(offload_optimizer=True),
                                    dict(decode_memory="free")], ids=lambda m: next(iter(m)))
def test_memory_switches_change_no_number(memory, tiny_model_dir, tmp_path, monkeypatch):
    """--gradient-checkpointing, --offload-optimizer and --decode-memory free save memory and change nothing else:
    3 steps end with the plain run's parameters, bit for bit, and its metrics. In every rollout no gradient is alive
    (guarded_step sets them to None after each step), and under --offload-optimizer AdamW's state holds no memory
    on the device during the rollout (and all of it again for the update)."""
    from safetensors.torch import load_file

    made, seen = [], []
    real_adamw, real_collect = K.adamw, grpo.collect_rollout
    monkeypatch.setattr(K, "adamw", lambda *a, **kw: made.append(real_adamw(*a, **kw)) or made[-1])

    def spy(args, policy, *rest):
        state = [v for s in made[-1].state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        seen.append((any(p.grad is not None for p in policy.parameters()), len(state),
                     sum(v.untyped_storage().nbytes() for v in state)))
        return real_collect(args, policy, *rest)

    monkeypatch.setattr(grpo, "collect_rollout", spy)
    kw = dict(max_steps=3, eval_every=0, rewards=("tag_count", "task"), reward_weights=(1.0, 1.0))
    grpo.main(small_args(tiny_model_dir, tmp_path / "plain", **kw))
    grpo.main(small_args(tiny_model_dir, tmp_path / "switched", **kw, **memory))
    plain, switched = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("plain", "switched"))
    for key in plain:
        assert torch.equal(plain[key], switched[key]), key
    ignore = ("perf/", "timing/")
    rows = [[{k: v for k, v in r.items() if not k.startswith(ignore)} for r in runs.read_metrics(str(tmp_path / n))]
            for n in ("plain", "switched")]
    assert rows[0] == rows[1]
    assert len(seen) == 6 and not any(grads for grads, _, _ in seen)
    states = [(count, nbytes) for _, count, nbytes in seen[4:]]  # the switched run's steps 2 and 3
    assert all(count > 0 for count, _ in states)
    assert all((nbytes == 0) == bool(memory.get("offload_optimizer")) for _, nbytes in states)
    assert all(v.untyped_storage().nbytes() > 0 for s in made[-1].state.values() for v in s.values()
               if torch.is_tensor(v))


def test_large_seeds_run(tiny_model_dir, tmp_path):
    """Sampling keys stay inside int64 for any seed (seed 2024 once overflowed them)."""
    grpo.main(small_args(tiny_model_dir, tmp_path, seed=2024, max_steps=1, eval_every=0))
    assert runs.read_metrics(str(tmp_path))[-1]["step"] == 1


@pytest.mark.slow
def test_fsdp_evaluation_with_uneven_shards_matches_one_process(tiny_model_dir, tmp_path):
    """129 held-out rows on 2 FSDP ranks (65 and 64: two generate calls against one) finish, and give the
    evaluation metrics of one process: every rank runs as many calls, and the noise is keyed by global row."""
    common = ["--model", tiny_model_dir, "--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
              "--max-new-tokens", "8", "--eval-every", "1", "--eval-size", "129", "--eval-samples", "1",
              "--device", "cpu", "--no-plot", "--strategy", "fsdp"]
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path / "two"), *common],
                         env=environ, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path / "one"),
                          *common], env=environ, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    e1, e2 = runs.read_metrics(str(tmp_path / "one"))[0], runs.read_metrics(str(tmp_path / "two"))[0]
    keys = [k for k in e1 if k.startswith("eval/")]
    assert len(keys) == 4
    for k in keys:
        assert e1[k] == pytest.approx(e2[k], abs=1e-9), k


@pytest.mark.parametrize("max_new_tokens", [300, 100_000])
def test_a_length_past_the_context_stops_before_any_weights_load(max_new_tokens, tmp_path, monkeypatch):
    """--max-new-tokens past the toy model's context of 256 on a built-in task is one sentence, raised before any
    weights load (it used to run: 100,000 allocated a KV cache until the OOM killer stopped the process)."""
    monkeypatch.setattr(K, "load_model", lambda *a, **k: pytest.fail("weights loaded before the length check"))
    with pytest.raises(K.UserError, match=rf"--max-new-tokens {max_new_tokens} plus arithmetic's longest prompt "
                                          r"\(\d+ tokens\) exceeds the model's context of 256 tokens .* use "
                                          r"--max-new-tokens \d+ or less"):
        grpo.main(grpo.Args(max_new_tokens=max_new_tokens, out_dir=str(tmp_path)))


def test_kv_caches_larger_than_free_memory_stop_before_any_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    """KV caches of rollouts and evaluations that cannot fit in the memory available are one sentence naming the
    sizes and the flags to lower, before any weights load."""
    monkeypatch.setattr(K, "load_model", lambda *a, **k: pytest.fail("weights loaded before the memory check"))
    monkeypatch.setattr(env, "available_memory", lambda device: 1000)
    with pytest.raises(K.UserError, match=r"KV caches of generation would take .* \(16 rollout \+ 8 greedy evaluation "
                                          r"\+ 16 sampled evaluation rows x 28 positions .* lower --max-new-tokens 12"):
        grpo.main(small_args(tiny_model_dir, tmp_path))


def test_a_cap_that_cuts_most_rollouts_is_warned_about_once_with_the_share(tiny_model_dir, tmp_path):
    """--max-new-tokens 2 cuts every rollout of the random tiny model: one warning, at the first step, names the
    share measured (rollout/truncated_share) and says to raise --max-new-tokens; a later step does not repeat it."""
    with pytest.warns(RuntimeWarning) as caught:
        grpo.main(small_args(tiny_model_dir, tmp_path, max_new_tokens=2, eval_every=0))
    messages = [str(w.message) for w in caught if "hit --max-new-tokens" in str(w.message)]
    share = runs.read_metrics(str(tmp_path))[0]["rollout/truncated_share"]
    assert share > 0.5
    assert messages == [f"{share:.0%} of step 1's rollouts hit --max-new-tokens 2 before their end "
                        "(rollout/truncated_share): a cut response has no final answer, so the cap decides their "
                        "rewards; raise --max-new-tokens (this warning is shown once per run)"]
