"""Tests for rlhf_reward_model.py: the Bradley-Terry maths, last-token scoring, data checks, outputs, the scorer."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rl_runs as runs
import rlhf_reward_model
import rlvr_rewards as env
import toy_world as toy


def tiny_config(vocab_size: int, pad_token_id: int, eos_token_id: int, **overrides):
    from transformers import Qwen2Config

    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None,
                  pad_token_id=pad_token_id, eos_token_id=eos_token_id, tie_word_embeddings=True)
    return Qwen2Config(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    """A random-initialised tiny causal LM with the toy tokenizer, saved like any checkpoint directory."""
    from transformers import Qwen2ForCausalLM

    path = str(tmp_path_factory.mktemp("backbone"))
    tokenizer = toy.build_toy_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_args(tmp_path, backbone, **overrides) -> rlhf_reward_model.Args:
    base = dict(model=backbone, out_dir=str(tmp_path / "out"), max_steps=2, batch_size=4, eval_every=1, save_every=1,
                toy_train_prompts=8, toy_eval_prompts=4, device="cpu", lr=1e-3)
    return rlhf_reward_model.Args(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone):
    """The output directory of a two-step run on the toy preferences (shared by the tests that only read it)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    rlhf_reward_model.main(run_args(tmp_path, backbone))
    return tmp_path / "out"


# ---------------------------------------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_matches_hand_computation():
    """-log sigmoid(r_c - r_r - m), averaged, plus c*(r_c + r_r)^2, equals values worked out by hand."""
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262, -log sigmoid(-2) = log(1 + e^2) = 2.126928
    loss, stats = rlhf_reward_model.bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((0.313262 + 2.126928) / 2, abs=1e-5)
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == pytest.approx(-0.5)
    # margins (0.5, 1.0): -log sigmoid(0.5) = 0.474077, -log sigmoid(-3) = 3.048587
    loss, _ = rlhf_reward_model.bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 1.0]))
    assert loss.item() == pytest.approx((0.474077 + 3.048587) / 2, abs=1e-5)
    # centering 0.1 * mean((1 + 0)^2, (0 + 2)^2) = 0.1 * 2.5 = 0.25 on top of the plain loss
    loss, _ = rlhf_reward_model.bradley_terry_loss(chosen, rejected, center_coef=0.1)
    assert loss.item() == pytest.approx((0.313262 + 2.126928) / 2 + 0.25, abs=1e-5)
    loss, _ = rlhf_reward_model.bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 1.0]), center_coef=0.1)
    assert loss.item() == pytest.approx((0.474077 + 3.048587) / 2 + 0.25, abs=1e-5)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    """d loss / d r_c = -sigmoid(-(r_c - r_r)) / B and d loss / d r_r is its negative."""
    chosen, rejected = torch.tensor([0.3], requires_grad=True), torch.tensor([0.1], requires_grad=True)
    rlhf_reward_model.bradley_terry_loss(chosen, rejected)[0].backward()
    assert chosen.grad.item() == pytest.approx(-1 / (1 + math.exp(0.2)), abs=1e-6)
    assert rejected.grad.item() == pytest.approx(1 / (1 + math.exp(0.2)), abs=1e-6)


def test_expand_rankings_gives_every_pair_best_first():
    """A K-way ranking becomes its C(K, 2) pairs, the better-ranked response always chosen."""
    pairs = rlhf_reward_model.expand_rankings("q", ["a", "b", "c", "d"])
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"),
                                                             ("b", "d"), ("c", "d")]
    assert all(p["prompt"] == "q" for p in pairs)


def test_last_token_index_for_left_and_right_padding():
    """The index is the last position whose attention mask is 1, on either padding side."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert rlhf_reward_model.last_token_index(mask).tolist() == [3, 2, 3, 1]


def test_score_is_read_at_last_real_token_whatever_the_padding_side():
    """Left- and right-padded batches give the same scores as each sequence alone, even when a sequence
    ends in the pad id (EOS == pad), where transformers' own pad-id pooling reads the wrong token."""
    from transformers import Qwen2ForSequenceClassification

    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(tiny_config(50, pad_token_id=0, eos_token_id=0, num_labels=1)).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 50, (n,), generator=g) for n in (5, 9, 3)]
    seqs[0][-1] = 0                                            # ends with EOS, which is also the pad id
    T = max(len(s) for s in seqs)
    left, right = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    left_mask, right_mask = torch.zeros_like(left), torch.zeros_like(right)
    for i, s in enumerate(seqs):
        left[i, T - len(s):], left_mask[i, T - len(s):] = s, 1
        right[i, :len(s)], right_mask[i, :len(s)] = s, 1
    with torch.no_grad():
        alone = torch.cat([rlhf_reward_model.sequence_rewards(model, s[None], torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        from_left = rlhf_reward_model.sequence_rewards(model, left, left_mask)
        from_right = rlhf_reward_model.sequence_rewards(model, right, right_mask)
        transformers_pooling = model(input_ids=right, attention_mask=right_mask).logits[:, 0]
    torch.testing.assert_close(from_left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_right, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(transformers_pooling[0], alone[0])   # the case we do not rely on pad_token_id for


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "identical"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"chosen": "a", "rejected": "b"}', "missing field 'prompt'"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b",', "not valid JSON"),
    ('{"prompt": "p", "responses": ["a"]}', "at least two"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}', "'margin' must be a finite number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "'margin' must be a finite number, got nan"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}', "'margin' must be a finite number"),
    ('{"prompt": "p", "responses": ["a", "b", "c"], "margin": 1}', "not to a 'responses' ranking"),
    ('{"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"}', "message 1 of 'prompt' must be an object "
                                                                       "with a string 'role'"),
    ('{"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant"}]}', "message 1 of 'rejected'"),
    ('{"prompt": "p", "responses": ["a", [{"role": 1, "content": "b"}]]}', "message 1 of 'responses[1]'"),
    pytest.param("[" * 100_000, "JSON nested too deeply", id="nested-too-deeply"),
])
def test_bad_data_gives_a_clear_message_with_file_and_line(tmp_path, line, expected):
    """A bad line stops loading with the file name, the line number and what is wrong."""
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n' + line + "\n")
    with pytest.raises(env.DataError) as err:
        rlhf_reward_model.load_preference_jsonl(str(path))
    assert f"{path}, line 3:" in str(err.value) and expected in str(err.value)


def test_undecodable_line_names_file_and_line_and_utf8_is_read_as_utf8(tmp_path):
    """A line that is not UTF-8 raises DataError with the file and line (not a bare UnicodeDecodeError); valid
    UTF-8, with or without a byte-order mark, loads."""
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff", "chosen": "a", '
                     b'"rejected": "b"}\n')
    with pytest.raises(env.DataError, match=re.escape(f"{path}, line 2: not valid UTF-8")):
        rlhf_reward_model.load_preference_jsonl(str(path))
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "2×3", "chosen": "6 ✓", "rejected": "5"}\n'.encode())
    assert rlhf_reward_model.load_preference_jsonl(str(path))[0]["chosen"] == "6 ✓"


def test_bad_data_stops_main_before_any_model_is_loaded(tmp_path):
    """main() rejects a bad file before touching the model (the model name here does not even exist)."""
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n')
    with pytest.raises(env.DataError, match="line 1"):
        rlhf_reward_model.main(run_args(tmp_path, "/nonexistent/model", dataset=str(path)))


def test_jsonl_pairs_rankings_margins_and_chat_messages(tmp_path):
    """Plain pairs, margins, best-first rankings and chat-message fields all load into pairs."""
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2},
            {"prompt": [{"role": "user", "content": "q"}], "responses": ["x", "y", "z"]},
            {"prompt": "r", "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}]}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = rlhf_reward_model.load_preference_jsonl(str(path))
    assert len(pairs) == 1 + 3 + 1 and pairs[0]["margin"] == 2.0 and [p["line"] for p in pairs] == [1, 2, 2, 2, 3]
    tokenizer = toy.build_toy_tokenizer()
    assert rlhf_reward_model.render(tokenizer, pairs[4]["prompt"], pairs[4]["chosen"], "plain") == "rgood"
    assert rlhf_reward_model.render(tokenizer, "r", "good", "Q: {prompt} A: {completion}") == "Q: r A: good"
    chat = rlhf_reward_model.render(tokenizer, "r", "good", "chat")
    assert chat.endswith("good") and "r" in chat and chat != "rgood"


def test_toy_pairs_cover_three_preferences_and_chosen_is_correct_and_well_formed():
    """Each toy prompt gives a correctness, a format and a concision pair; the chosen side is always the correct
    trace in R1's template, and the rejected one differs only in what its kind names."""
    rows = env.make_dataset("arithmetic", split="train", n=30, seed=0)
    pairs = toy.toy_preference_pairs("train", 30, seed=0)
    assert [p["kind"] for p in pairs] == ["correct", "format", "concise"] * 30
    assert [p["prompt"] for p in pairs] == [row["prompt"] for row in rows for _ in range(3)]
    answers = [row["answer"] for row in rows for _ in range(3)]
    chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    assert env.format_reward(chosen) == [1.0] * 90 and env.accuracy_reward(chosen, answer=answers) == [1.0] * 90
    well_formed, correct = env.format_reward(rejected), env.accuracy_reward(rejected, answer=answers)
    for p, f, c in zip(pairs, well_formed, correct):
        assert p["chosen"] != p["rejected"]
        if p["kind"] == "correct":
            assert (f, c) == (1.0, 0.0)                                   # well-formed, wrong answer
        elif p["kind"] == "format":
            assert f == 0.0                                               # outside the template
        else:
            assert (f, c) == (1.0, 1.0) and len(p["rejected"]) > len(p["chosen"])   # right, but padded


def test_help_lists_the_shared_flags():
    """`python rlhf_reward_model.py --help` works and shows the flags every training script shares."""
    out = subprocess.run([sys.executable, os.path.abspath(rlhf_reward_model.__file__), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--dataset", "--out-dir", "--seed", "--max-steps", "--lr", "--eval-every",
                 "--save-every", "--resume", "--device", "--strategy", "--center-coef"):
        assert flag in out.stdout, flag


# ---------------------------------------------------------------------------------------------------------
# Training run, outputs, resume, the scorer
# ---------------------------------------------------------------------------------------------------------


def test_two_step_run_writes_outputs_and_final_reloads_with_identical_scores(trained):
    """Two steps on the toy preferences write args.json, metrics.jsonl, checkpoints and final/, which
    AutoModelForSequenceClassification loads with the same scores the scorer gives."""
    from transformers import AutoModelForSequenceClassification

    out = trained
    assert {"args.json", "metrics.jsonl", "checkpoint-1", "checkpoint-2", "final"} <= set(os.listdir(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows) and any("eval/accuracy" in r for r in rows)

    scorer = rlhf_reward_model.RewardModelScorer(str(out / "final"), device="cpu", batch_size=3)
    completions = ["<answer>17</answer>", "<think>3*4=12</think><answer>12</answer>", "17", "<answer>9</answer>x"]
    prompts = ["7+3*4-2", "3*4", "7+3*4-2", "2+7"]
    scores = scorer(completions, prompt=prompts)
    plain = AutoModelForSequenceClassification.from_pretrained(str(out / "final")).eval()
    assert plain.config.num_labels == 1 and plain.config.pad_token_id == scorer.tokenizer.pad_token_id
    with torch.no_grad():
        for text_prompt, completion, score in zip(prompts, completions, scores):
            ids = scorer.tokenizer(rlhf_reward_model.render(scorer.tokenizer, text_prompt, completion), add_special_tokens=False,
                                   return_tensors="pt")["input_ids"]
            assert plain(input_ids=ids).logits[0, 0].item() == pytest.approx(score, abs=1e-5)


def test_scorer_has_the_project_reward_signature(trained):
    """Called as grpo calls rewards, fn(completions, prompt=[...], answer=[...]), it returns one float per
    completion, batched without changing the values; normalize=True applies the saved held-out mean and std."""
    final = str(trained / "final")
    scorer = rlhf_reward_model.RewardModelScorer(final, device="cpu", batch_size=2)
    completions = ["<answer>17</answer>", "<answer>5</answer>", "<think>2+3=5</think><answer>5</answer>"]
    scores = scorer(completions, prompt=["7+3*4-2", "2+3", "2+3"], answer=["17", "5", "5"], steps=[[], [], []])
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    one_by_one = [rlhf_reward_model.RewardModelScorer(final, device="cpu", batch_size=1)([c], prompt=[p])[0]
                  for c, p in zip(completions, ["7+3*4-2", "2+3", "2+3"])]
    assert scores == pytest.approx(one_by_one, abs=1e-5)
    normalized = rlhf_reward_model.RewardModelScorer(final, device="cpu", normalize=True)
    config = normalized.model.config
    expected = [(s - config.reward_mean) / config.reward_std for s in scores]
    assert normalized(completions, prompt=["7+3*4-2", "2+3", "2+3"]) == pytest.approx(expected, abs=1e-5)
    assert callable(scorer) and scorer.__name__ == "reward_model"


def test_grpo_accepts_the_reward_model_as_a_named_reward(tmp_path, backbone, trained, monkeypatch):
    """grpo.py takes the trained reward model through --rewards rlhf_reward_model:reward_model and runs a step."""
    grpo = pytest.importorskip("grpo")

    monkeypatch.setenv("RLHF_REWARD_MODEL", str(trained / "final"))
    spec = "rlhf_reward_model:reward_model"
    grpo.main(grpo.Args(model=backbone, out_dir=str(tmp_path / "grpo"), rewards=(spec,), reward_weights=(1.0,),
                        max_steps=1, prompts_per_step=2, num_generations=2, max_new_tokens=8, eval_every=0,
                        device="cpu", plot=False))
    rows = runs.read_metrics(str(tmp_path / "grpo"))
    assert any(math.isfinite(r.get(f"rewards/{spec}", float("nan"))) for r in rows)


def test_resume_continues_bit_identically(tmp_path, backbone):
    """A run resumed from checkpoint-2 ends with exactly the weights of an uninterrupted four-step run."""
    from safetensors.torch import load_file

    full = run_args(tmp_path, backbone, max_steps=4, save_every=2, eval_every=0, out_dir=str(tmp_path / "full"))
    rlhf_reward_model.main(full)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for name in ("checkpoint-4", "final"):
        shutil.rmtree(tmp_path / "resumed" / name)
    rlhf_reward_model.main(run_args(tmp_path, backbone, max_steps=4, save_every=2, eval_every=0, out_dir=str(tmp_path / "resumed"),
                    resume=True))
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


@pytest.mark.slow
def test_two_process_fsdp_run_equals_one_process(tmp_path, backbone):
    """torchrun with two gloo ranks (FSDP2, each rank half of every batch and of an odd-sized held-out set)
    ends with the weights and held-out metrics of one process on the same global batch."""
    from safetensors.torch import load_file

    rows = [{"prompt": f"{i}+1", "chosen": f"<answer>{i + 1}</answer>", "rejected": f"<answer>{i}</answer>"}
            for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:9]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[9:]))
    script = os.path.abspath(rlhf_reward_model.__file__)
    flags = ["--model", backbone, "--dataset", str(tmp_path / "train.jsonl"), "--eval-dataset",
             str(tmp_path / "eval.jsonl"), "--max-steps", "2", "--batch-size", "4", "--device", "cpu",
             "--save-every", "0", "--eval-every", "0"]
    environ = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, *flags, "--strategy", "fsdp", "--out-dir", str(tmp_path / "two")],
                         env=environ, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, script, *flags, "--out-dir", str(tmp_path / "one")], env=environ,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    bad = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.allclose(a[k], b[k], atol=1e-6)}
    assert not bad, bad
    metrics = {d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][-1]
               for d in ("one", "two")}
    held_out = [k for k in metrics["one"] if k.startswith("eval/")]  # the last line: step 2's train and eval metrics
    assert held_out and metrics["one"].keys() == metrics["two"].keys()
    assert all(metrics["one"][k] == pytest.approx(metrics["two"][k], abs=1e-5) for k in held_out)
