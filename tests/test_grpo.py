"""grpo.py: advantage maths by hand, presets, two steps of every preset, torchrun equivalence, exact resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import grpo
import kernels as K


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised model with the toy tokenizer (tiny, so every run here takes seconds)."""
    import transformers

    import sft

    path = str(tmp_path_factory.mktemp("tiny_toy"))
    tokenizer = sft.build_toy_tokenizer()
    config = transformers.Qwen2Config(**{**sft.toy_model_config(tokenizer).to_dict(), "hidden_size": 32,
                                         "intermediate_size": 64, "num_hidden_layers": 1, "layer_types": None,
                                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16})
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
    """Each preset sets the switches of its paper, and a flag the user passed wins over the preset."""
    dapo = grpo.apply_preset(grpo.Args(preset="dapo"))
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg, dapo.dynamic_sampling, dapo.overlong_filter,
            dapo.soft_overlong, dapo.kl_coef) == (0.2, 0.28, "token-mean", True, True, True, 0.0)
    dr = grpo.apply_preset(grpo.Args(preset="dr_grpo"))
    assert (dr.advantage, dr.loss_agg) == ("mean", "seq-mean-token-sum-norm")
    gspo = grpo.apply_preset(grpo.Args(preset="gspo"))
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 4e-4)
    assert grpo.apply_preset(grpo.Args(preset="rloo")).advantage == "rloo"
    rpp = grpo.apply_preset(grpo.Args(preset="reinforce_pp"))
    assert (rpp.advantage, rpp.kl_in_reward, rpp.kl_estimator) == ("batch", True, "k1") and rpp.kl_coef > 0
    g = grpo.apply_preset(grpo.Args(preset="grpo"))
    assert (g.advantage, g.loss_agg, g.clip_low, g.clip_high, g.kl_coef) == ("group", "seq-mean-token-mean",
                                                                              0.2, 0.2, 0.0)
    assert grpo.apply_preset(grpo.Args(preset="dapo", clip_high=0.3)).clip_high == 0.3


def test_impossible_settings_fail_before_any_compute(tmp_path):
    """Batch not divisible, G = 1 with a group advantage, and missing dataset fields: one clear error each."""
    info = K.DistInfo(rank=0, world_size=3)
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        grpo.check_args(grpo.Args(prompts_per_step=16), info)
    with pytest.raises(ValueError, match="num-generations 1"):
        grpo.check_args(grpo.Args(num_generations=1), K.DistInfo())
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1"}) + "\n")
    with pytest.raises(ValueError, match="needs dataset field"):
        grpo.main(grpo.Args(dataset=str(data), out_dir=str(tmp_path / "o"), rewards=("accuracy",),
                            reward_weights=(1.0,)))
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2"):
        grpo.main(grpo.Args(dataset=str(data), out_dir=str(tmp_path / "o")))


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(grpo.PRESETS))
def test_every_preset_runs_two_steps(preset, tiny_model_dir, tmp_path):
    """Two steps of each preset write metrics with the diagnostics, a loadable final model and a summary."""
    extra = {"num_iterations": 2, "num_minibatches": 2} if preset == "gspo" else {}
    grpo.main(small_args(tiny_model_dir, tmp_path, preset=preset, **extra))
    rows = K.read_metrics(str(tmp_path))
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
    rows = K.read_metrics(str(tmp_path))
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)


def test_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    """Stopping after 2 steps and resuming to 4 ends with exactly the parameters of a 4-step run."""
    kw = dict(eval_every=0, rewards=("tag_count", "task"), reward_weights=(1.0, 1.0))  # tag_count: a signal
    straight = tmp_path / "straight"
    grpo.main(small_args(tiny_model_dir, straight, max_steps=4, **kw))
    parts = tmp_path / "parts"
    grpo.main(small_args(tiny_model_dir, parts, max_steps=2, save_every=2, **kw))
    grpo.main(small_args(tiny_model_dir, parts, max_steps=4, resume=True, **kw))
    from safetensors.torch import load_file

    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(parts / "final" / "model.safetensors")
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in K.read_metrics(str(parts))] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tiny_model_dir, tmp_path):
    """torchrun with 2 ranks (gloo) logs the metrics and ends with the parameters of a one-process run with the
    same global batch (rank-invariant sampling noise, global token counts)."""
    common = ["--model", tiny_model_dir, "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "4",
              "--max-new-tokens", "12", "--eval-every", "0", "--device", "cpu", "--no-plot",
              "--rewards", "tag_count", "task", "--reward-weights", "1.0", "1.0"]  # tag_count: nonzero variance
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path / "two"), *common],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--out-dir", str(tmp_path / "one"),
                          *common], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    m2, m1 = K.read_metrics(str(tmp_path / "two")), K.read_metrics(str(tmp_path / "one"))
    for r1, r2 in zip(m1, m2):
        for k in r1:
            if k.startswith(("rollout/", "train/loss", "train/clip_frac", "train/entropy")):
                assert r1[k] == pytest.approx(r2[k], abs=1e-4, nan_ok=True), k
    from safetensors.torch import load_file

    assert m1[0]["rollout/reward_std"] > 0  # there was a learning signal
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a)  # and the parameters moved
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
