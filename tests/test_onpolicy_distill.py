"""grpo.py --teacher (on-policy distillation): the token advantages by hand, a teacher equal to the policy changes
nothing, the reverse KL falls in a short run, a teacher of another tokenizer is one sentence, exact resume."""

import json
import os
import re

import pytest
import torch

import grpo
import rl_kernels as K
import rl_runs as runs
import toy_world as toy


def small_args(model_dir, out_dir, **kw):
    base = dict(model=model_dir, out_dir=str(out_dir), max_steps=1, prompts_per_step=4, num_generations=4,
                max_new_tokens=12, eval_every=0, plot=False, rewards=("tag_count", "task"),
                reward_weights=(1.0, 1.0))  # tag_count: a task signal even from a random model
    base.update(kw)
    return grpo.Args(**base)


def plain_logprobs(model, batch):
    """log pi of each completion token from the model's own logits, one forward over the whole padded batch."""
    ids = torch.cat([batch["prompt_ids"], batch["tokens"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["mask"]], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    N = batch["tokens"].shape[1]
    logp = torch.log_softmax(logits[:, -N - 1:-1], -1)
    return logp.gather(-1, batch["tokens"][..., None])[..., 0]  # (R, N)


def test_distill_advantages_by_hand():
    """On a tiny random policy and teacher, the advantage added is teacher_coef * -(log pi_old - log pi_teacher) on
    each response token and exactly 0 elsewhere (a -inf at a padded position included), on top of the task's
    (R,) advantage at every token or its (R, N) advantage as it is."""
    from conftest import left_padded_batch, tiny_causal_lm

    R, N, coef = 4, 6, 0.7
    prompt_ids, prompt_mask = left_padded_batch([3, 5, 2, 4], seed=1)
    g = torch.Generator().manual_seed(3)
    mask = (torch.arange(N) < torch.tensor([6, 2, 4, 1])[:, None]).long()
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=torch.randint(3, 97, (R, N), generator=g),
                 mask=mask)
    policy, teacher = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)
    old, teach = K.rollout_logprobs(policy, batch), K.rollout_logprobs(teacher, batch)  # as main computes them
    expect = torch.zeros(R, N)
    hand_old, hand_teacher = plain_logprobs(policy, batch), plain_logprobs(teacher, batch)
    for i in range(R):
        for t in range(N):
            if mask[i, t]:
                expect[i, t] = coef * -(hand_old[i, t] - hand_teacher[i, t])
    assert expect.abs().max() > 0.1  # the two models disagree: the check is not of zeros
    teach[~mask.bool()] = float("-inf")  # a padded position may hold anything
    added = grpo.distill_advantages(old, teach, mask, coef)
    assert torch.allclose(added, expect, atol=1e-5)
    assert torch.equal(added[~mask.bool()], torch.zeros(int((mask == 0).sum())))
    task = torch.tensor([1.0, -1.0, 0.5, 0.0])
    assert torch.allclose(grpo.with_token_advantages(task, added), task[:, None] + expect, atol=1e-5)
    token_task = torch.randn(R, N, generator=g)
    assert torch.allclose(grpo.with_token_advantages(token_task, added), token_task + expect, atol=1e-5)


@pytest.mark.parametrize("old", [dict(batch_invariant=True), dict(num_iterations=2)],
                         ids=["sampler-logprobs", "pi-old-pass"])
def test_a_teacher_equal_to_the_policy_adds_nothing(old, tiny_model_dir, tmp_path, monkeypatch):
    """--teacher set to the policy's own weights: on the first step the distillation advantages are exactly 0 and
    distill/reverse_kl is 0, and the step ends with the parameters and advantages of a run without a teacher, bit for
    bit; with pi_old the sampler's log-probs (batch-invariant, mu = 1) or the pi_old pass's (mu = 2)."""
    from safetensors.torch import load_file

    added, real = [], grpo.distill_advantages
    monkeypatch.setattr(grpo, "distill_advantages", lambda *a: added.append(real(*a)) or added[-1])
    grpo.main(small_args(tiny_model_dir, tmp_path / "plain", **old))
    grpo.main(small_args(tiny_model_dir, tmp_path / "teacher", teacher=tiny_model_dir, **old))
    assert len(added) == 1 and torch.count_nonzero(added[0]) == 0
    plain, taught = (runs.read_metrics(str(tmp_path / name))[-1] for name in ("plain", "teacher"))
    assert taught["distill/reverse_kl"] == 0.0 and "distill/reverse_kl" not in plain
    assert plain["rollout/reward_std"] > 0  # the task rewards gave a signal
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("plain", "teacher"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    samples = [[json.loads(line)["advantage"] for line in open(tmp_path / name / "samples.jsonl")]
               for name in ("plain", "teacher")]
    assert samples[0] == pytest.approx(samples[1], rel=1e-6)  # a token-mean of A_i there


def softened_student(path: str, scale: float = 0.5) -> str:
    """toy/student with its logits scaled by `scale` (its final norm's weight: it samples as at T = 1/scale), saved."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(toy.TOY_STUDENT)
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    model.save_pretrained(path)
    K.load_tokenizer(toy.TOY_STUDENT).save_pretrained(path)
    return path


@pytest.mark.slow
def test_distillation_lowers_the_reverse_kl_to_the_teacher(tmp_path):
    """Pure on-policy distillation (no task reward) of a softened toy/student into toy/base: distill/reverse_kl falls
    by over a fifth in 30 steps (measured: ~1.1 -> ~0.65 nats per token). toy/student as it is sits within ~0.1 nats
    per token of toy/base, too close for 30 small steps to show a fall through the estimate's noise."""
    student = softened_student(str(tmp_path / "student"))
    grpo.main(grpo.Args(model=student, teacher=K.TOY_BASE, rewards=(), out_dir=str(tmp_path / "run"), max_steps=30,
                        prompts_per_step=16, num_generations=4, max_new_tokens=32, lr=1e-3, warmup_steps=0,
                        eval_every=0, plot=False))
    kl = [row["distill/reverse_kl"] for row in runs.read_metrics(str(tmp_path / "run"))]
    first, last = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    assert first > 0.5, kl  # the softened student starts far from the teacher
    assert last < 0.8 * first, kl


def retokenized(tiny_model_dir: str, path, change: str) -> str:
    """The tiny model's checkpoint files with a tokenizer that differs from the toy's: one more token, or two
    characters' ids swapped (as many tokens)."""
    os.makedirs(path)
    with open(os.path.join(tiny_model_dir, "config.json")) as f, open(os.path.join(path, "config.json"), "w") as g:
        g.write(f.read())
    tokenizer = toy.build_toy_tokenizer()
    if change == "extra":
        tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(path)
    if change == "swapped":
        with open(os.path.join(path, "tokenizer.json")) as f:
            spec = json.load(f)
        vocab = spec["model"]["vocab"]
        vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump(spec, f)
    return str(path)


@pytest.mark.parametrize("change, detail", [("extra", r"106 tokens against 105"),
                                            ("swapped", r"'1' is id \d+ there and \d+ here")],
                         ids=["one-token-more", "two-ids-swapped"])
def test_a_teacher_of_another_tokenizer_is_one_sentence(change, detail, tiny_model_dir, tmp_path, monkeypatch,
                                                        capsys):
    """A teacher whose tokenizer differs from the policy's (a token more, or two ids swapped) stops the command line
    with one sentence naming the difference, no traceback, before any weights load; so does a negative coefficient."""
    monkeypatch.setattr(K, "load_model", lambda *a, **k: pytest.fail("weights loaded before the tokenizer check"))
    monkeypatch.delenv("RL_DEBUG", raising=False)
    teacher = retokenized(tiny_model_dir, tmp_path / "teacher", change)
    with pytest.raises(SystemExit) as exit_:
        runs.run_cli(grpo.main, small_args(tiny_model_dir, tmp_path / "run", teacher=teacher))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: --teacher {teacher} does not share --model {tiny_model_dir}'s tokenizer (")
    assert re.search(detail, err), err
    with pytest.raises(K.UserError, match=r"--teacher-coef -1.0: must be a finite number, 0 or more"):
        grpo.check_args(small_args(tiny_model_dir, tmp_path, teacher=tiny_model_dir, teacher_coef=-1.0),
                        runs.DistInfo())


def test_resume_with_a_teacher_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    """With a teacher (toy/base, frozen, loaded again from --teacher), stopping after 2 steps and resuming to 3 ends
    with the parameters and the distill/reverse_kl of a 3-step run exactly; a resume that names another teacher is
    refused."""
    from safetensors.torch import load_file

    kw = dict(teacher="toy", teacher_coef=0.5)
    grpo.main(small_args(tiny_model_dir, tmp_path / "straight", max_steps=3, **kw))
    parts = tmp_path / "parts"
    grpo.main(small_args(tiny_model_dir, parts, max_steps=2, save_every=2, **kw))
    grpo.main(small_args(tiny_model_dir, parts, max_steps=3, resume=True, **kw))
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(parts / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    kl = [[row["distill/reverse_kl"] for row in runs.read_metrics(str(d))] for d in (tmp_path / "straight", parts)]
    assert kl[0] == kl[1] and min(kl[0]) > 0.1  # a random policy is far from toy/base
    with pytest.raises(K.UserError, match=r"--resume would change the run in .*--teacher"):
        grpo.main(small_args(tiny_model_dir, parts, max_steps=4, resume=True, teacher=tiny_model_dir))
