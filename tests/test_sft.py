import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rl_kernels as K
import rl_runs as runs
import rlvr_rewards as env
import sft
import toy_world as toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(tmp_path, **overrides) -> sft.Args:
    """A toy run small enough for a test: random init, a few steps, tiny eval."""
    kwargs = dict(preset="toy_base", out_dir=str(tmp_path / "run"), export_dir="", num_examples=64, eval_size=8, batch_size=8,
                  grad_accum=2, max_steps=2, warmup_steps=1, eval_every=1, save_every=1, max_new_tokens=16,
                  device="cpu")
    kwargs.update(overrides)
    return sft.Args(**kwargs)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------- the loss


def test_completion_loss_matches_hand_computation_and_ignores_prompt():
    """completion_loss is -sum(m*logp)/sum(m); values and gradients at masked positions do not matter."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    loss = sft.completion_loss(logprobs, mask)
    assert loss.item() == pytest.approx((2 + 3 + 6) / 3)
    loss.backward()
    assert torch.equal(logprobs.grad, -mask.float() / 3)
    changed = torch.tensor([[-9.0, -2.0, -3.0], [-0.1, -7.0, -6.0]])  # only prompt positions differ
    assert sft.completion_loss(changed, mask).item() == loss.item()
    assert sft.completion_loss(logprobs, mask, num_tokens=6).item() == pytest.approx(11 / 6)


def test_completion_loss_on_a_model_equals_nll_of_completion_tokens():
    """Through build_sft_example, collate and the fused log-probs, the loss is the plain NLL of the completion
    tokens only (EOS included); changing the logits of prompt targets leaves it unchanged."""
    tokenizer = toy.build_toy_tokenizer()
    torch.manual_seed(0)
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(toy.toy_model_config(tokenizer)).eval()
    examples = [sft.build_sft_example(tokenizer, "7+3*4", "<answer>19</answer>"),
                sft.build_sft_example(tokenizer, [{"role": "user", "content": "2-1"}], "<answer>1</answer>")]
    input_ids, attention_mask, loss_mask = sft.collate(examples, tokenizer.pad_token_id)
    logprobs = K.token_logprobs(model, input_ids, attention_mask)
    loss = sft.completion_loss(logprobs, loss_mask[:, 1:])

    position_ids = K.position_ids_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
    nll, count = 0.0, 0
    for i, e in enumerate(examples):
        T, n = input_ids.shape[1], len(e["input_ids"])
        for t in range(T - n, T - 1):  # t predicts t+1
            if e["loss_mask"][t + 1 - (T - n)]:
                nll -= F.log_softmax(logits[i, t].double(), -1)[input_ids[i, t + 1]].item()
                count += 1
    assert count == sum(sum(e["loss_mask"]) for e in examples)
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)
    noisy = logprobs.detach().clone()
    noisy[loss_mask[:, 1:] == 0] = -123.0
    assert sft.completion_loss(noisy, loss_mask[:, 1:]).item() == pytest.approx(loss.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- data


def test_plain_and_chat_prompts_mask_exactly_the_completion():
    """Plain prompts and chat messages both give prompt ids (mask 0) then completion ids + EOS (mask 1)."""
    tokenizer = toy.build_toy_tokenizer()
    eos = tokenizer.eos_token_id
    plain = sft.build_sft_example(tokenizer, "7+3=", "10")
    assert plain["input_ids"] == tokenizer("7+3=")["input_ids"] + tokenizer("10")["input_ids"] + [eos]
    assert plain["loss_mask"] == [0] * 4 + [1] * 3
    chat = sft.build_sft_example(tokenizer, [{"role": "user", "content": "7+3"}], "<answer>10</answer>")
    text = tokenizer.decode(chat["input_ids"])
    assert text == "<|user|>7+3<|assistant|><answer>10</answer><|endoftext|>"
    prompt_len = len(tokenizer("<|user|>7+3<|assistant|>")["input_ids"])
    assert chat["loss_mask"] == [0] * prompt_len + [1] * (len(chat["input_ids"]) - prompt_len)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1"}]
    system = sft.encode_prompt(tokenizer, messages)
    assert tokenizer.decode(system) == "<|system|>Be brief.<|user|>1+1<|assistant|>"


def test_an_empty_prompt_never_makes_the_first_token_a_target():
    """With prompt "" and no BOS the first completion token has no context: its mask is 0, so a left-padded batch
    trains on exactly the num_tokens main() divides by, and each row's loss is the one it has alone."""
    tokenizer = toy.build_toy_tokenizer()
    empty = sft.build_sft_example(tokenizer, "", "<answer>5</answer>")
    assert empty["input_ids"] == tokenizer("<answer>5</answer>")["input_ids"] + [tokenizer.eos_token_id]
    assert empty["loss_mask"] == [0] + [1] * (len(empty["input_ids"]) - 1)
    examples = [empty, sft.build_sft_example(tokenizer, "7+3*4=", "19")]
    input_ids, attention_mask, loss_mask = sft.collate(examples, tokenizer.pad_token_id)  # the empty row is padded
    assert loss_mask[:, 1:].sum().item() == sum(sum(e["loss_mask"][1:]) for e in examples)
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(toy.toy_model_config(tokenizer)).eval()
    with torch.no_grad():
        batched = -(K.token_logprobs(model, input_ids, attention_mask) * loss_mask[:, 1:]).sum(-1)
        for e, loss in zip(examples, batched):
            ids, mask, alone_mask = sft.collate([e], tokenizer.pad_token_id)
            alone = -(K.token_logprobs(model, ids, mask) * alone_mask[:, 1:]).sum()
            assert loss.item() == pytest.approx(alone.item(), rel=1e-5)


def test_rows_with_a_non_empty_prompt_keep_the_loss_mask_they_always_had():
    """Forcing the first token's mask to 0 changes nothing where a prompt exists (the toy recipe's chat rows, plain
    prompts): the mask is still 0 on every prompt token and 1 on every completion token, so toy/base stands."""
    tokenizer = toy.build_toy_tokenizer()
    rows = [(r["prompt"], r["completion"]) for r in toy.toy_corpus(50, seed=1)]
    rows += [("7+3=", "10"), (" ", ""), ("x", "<think>1</think>")]
    for prompt, completion in rows:
        example = sft.build_sft_example(tokenizer, prompt, completion)
        prompt_len = len(sft.encode_prompt(tokenizer, prompt))
        assert prompt_len > 0
        assert example["loss_mask"] == [0] * prompt_len + [1] * (len(example["input_ids"]) - prompt_len)


def test_messages_without_chat_template_raise_a_clear_error():
    """Chat data with a tokenizer that has no chat template is refused with a sentence that says so."""
    tokenizer = toy.build_toy_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        sft.build_sft_example(tokenizer, [{"role": "user", "content": "1+1"}], "2")


def test_malformed_jsonl_stops_before_training_with_file_and_line(tmp_path):
    """Bad JSON, a missing field or a wrong type raise before any output is written, naming file and line."""
    good = {"prompt": "1+1", "completion": "2"}
    cases = [("not json {", "line 2: not valid JSON"),
             (json.dumps({"prompt": "1+1"}), "line 2: missing field 'completion'"),
             (json.dumps({"prompt": "1+1", "completion": 3}), "line 2: 'completion' must be a string"),
             (json.dumps({"prompt": 5, "completion": "x"}), "line 2: 'prompt' must be a string"),
             (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "line 2: 'messages' must end with"),
             (json.dumps([1, 2]), "line 2: expected a JSON object")]
    for i, (bad, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"data{i}.jsonl", [good, bad, good])
        out_dir = tmp_path / f"out{i}"
        with pytest.raises(ValueError) as error:
            sft.main(tiny_args(tmp_path, dataset=path, out_dir=str(out_dir)))
        assert path in str(error.value) and message in str(error.value)
        assert not out_dir.exists()  # nothing was written: it stopped before training


def test_undecodable_or_too_deeply_nested_lines_name_file_and_line(tmp_path):
    """A line that is not UTF-8, or JSON nested past the parser's recursion limit, raises ValueError naming the
    file and the line (not a bare UnicodeDecodeError / RecursionError); files are read as UTF-8 (a BOM allowed)."""
    good = b'{"prompt": "1+1", "completion": "2"}\n'
    for name, bad, message in [("utf8", b'{"prompt": "\xff", "completion": "2"}\n', "line 2: not valid UTF-8"),
                               ("deep", b"[" * 100_000 + b"\n", "line 2: JSON nested too deeply")]:
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(good + bad + good)
        with pytest.raises(ValueError) as error:
            env.read_jsonl(str(path), sft.sft_row)
        assert f"{path}, {message}" in str(error.value)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "2\u00d73 ≈", "completion": "6"}\n'.encode())
    assert env.read_jsonl(str(path), sft.sft_row)[0]["prompt"] == "2×3 ≈"


def test_jsonl_accepts_prompt_completion_messages_and_conversational_forms(tmp_path):
    """The three row shapes load to {prompt, completion, answer}; blank lines are skipped."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "1+1", "completion": "2", "answer": "2"}, "",
        {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]},
        {"prompt": [{"role": "user", "content": "3+3"}], "completion": [{"role": "assistant", "content": "6"}]}])
    rows = env.read_jsonl(path, sft.sft_row)
    assert [r["completion"] for r in rows] == ["2", "4", "6"]
    assert rows[0]["answer"] == "2" and rows[1]["prompt"] == [{"role": "user", "content": "2+2"}]


# ---------------------------------------------------------------------------------------------- the toy world


def test_toy_tokenizer_round_trips_through_save_and_auto_tokenizer(tmp_path):
    """Characters and the tags encode and decode exactly, tags are single non-special tokens, and the saved
    tokenizer reloads with AutoTokenizer with the same ids, chat template, EOS/pad and left padding, also beside a
    qwen2 config.json (where transformers 5 loads it as the byte-level Qwen2Tokenizer: spaces must survive)."""
    from transformers import AutoTokenizer

    tokenizer = toy.build_toy_tokenizer()
    text = "<think>3*4=12,7+12=19</think><answer>-17</answer> ~{}\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    for tag in toy.TOY_TAGS:
        assert len(tokenizer(tag)["input_ids"]) == 1
    assert tokenizer("é")["input_ids"] == [tokenizer.unk_token_id]
    tokenizer.save_pretrained(tmp_path)
    toy.toy_model_config(tokenizer).save_pretrained(tmp_path)  # as in a checkpoint: model_type qwen2
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("hello, i am ana")["input_ids"] == tokenizer("hello, i am ana")["input_ids"]
    assert loaded(text)["input_ids"] == ids and loaded.decode(ids) == text
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>" and loaded.padding_side == "left"
    messages = [{"role": "user", "content": "7+3"}]
    assert (loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == "<|user|>7+3<|assistant|>")


def test_toy_corpus_traces_follow_the_task_and_errors_propagate():
    """Error-free traces equal rlvr_rewards' steps; every reasoning completion's answer is its last step's value;
    the 'arithmetic' dataset holds only correct, readable traces."""
    for row in env.make_dataset("arithmetic", split="train", n=200, seed=5):
        operands, ops = toy.parse_arithmetic(row["prompt"])
        assert toy.arithmetic_trace(operands, ops) == row["steps"]
    wrong = toy.arithmetic_trace([7, 3, 4, 2], ["+", "*", "-"], error_step=0, error=1)
    assert wrong == ["3*4=13", "7+13=20", "20-2=18"]
    rows = [r for r in toy.toy_corpus(400, seed=0) if r["answer"] is not None]  # arithmetic, not general prompts
    reasoning = [r for r in rows if env.reasons(r["completion"])]
    assert 0.2 < len(reasoning) / len(rows) < 0.8
    for r in reasoning:  # the last step's value, in either number language, is the answer
        steps = [s for s in r["completion"].split("<think>")[1].split("</think>")[0].split(",") if "=" in s]
        assert env.read_number(steps[-1].split("=")[1]) == int(env.extract_answer(r["completion"]))
    clean = toy.toy_corpus(100, seed=0, reasoning_only=True)
    assert all(env.accuracy_reward([r["completion"]], answer=[r["answer"]]) == [1.0] for r in clean)
    assert all(env.is_readable(r["completion"]) for r in clean)


def test_committed_toy_base_loads_and_meets_its_targets():
    """toy/base is a transformers checkpoint of a small model whose stored numbers meet TOY_TARGETS, and its
    greedy accuracy re-measured here agrees with the stored one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = K.resolve_model_path("toy")  # present, so nothing is built
    assert path == toy.TOY_BASE and os.path.exists(os.path.join(path, "config.json"))
    size_mb = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20
    assert size_mb < 10
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    with open(os.path.join(path, "toy_stats.json")) as f:
        stats = json.load(f)
    assert toy.toy_targets_missed(stats) == []
    rows = env.make_dataset("arithmetic", split="test", n=stats["n_problems"], seed=stats["args"]["seed"])
    completions = toy.generate_completions(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows],
                                           max_new_tokens=stats["args"]["max_new_tokens"])
    accuracy = sum(env.accuracy_reward(completions, answer=[r["answer"] for r in rows])) / len(rows)
    assert accuracy == pytest.approx(stats["greedy_accuracy"], abs=0.03)


# ---------------------------------------------------------------------------------------------- runs


def test_two_step_run_writes_args_metrics_and_a_loadable_checkpoint(tmp_path):
    """A two-step run from random weights on JSONL with plain and chat rows writes args.json, namespaced
    metrics, checkpoint-2/ and final/ that AutoModelForCausalLM and AutoTokenizer load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)} for a in range(5) for b in range(4)]
    rows += [{"messages": [{"role": "user", "content": f"{a}*2"}, {"role": "assistant", "content": str(2 * a)}],
              "answer": str(2 * a)} for a in range(10)]
    args = tiny_args(tmp_path, dataset=write_jsonl(tmp_path / "train.jsonl", rows), eval_size=6)
    result = sft.main(args)
    out = args.out_dir
    assert json.load(open(os.path.join(out, "args.json")))["max_steps"] == 2
    metrics = runs.read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2]  # step 0: the held-out metrics before training
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy"} <= set(metrics[-1])
    assert result.after["eval/loss"] == metrics[-1]["eval/loss"] and result.final_dir.endswith("final")
    assert result.before["eval/loss"] == metrics[0]["eval/loss"] != result.after["eval/loss"]
    for name in ("checkpoint-2", "final"):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name))
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, name))
        assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_template is not None


def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """4 steps straight and (2 steps, SIGTERM-style stop, --resume for the rest) give identical weights and
    losses (bit for bit on CPU)."""
    from safetensors.torch import load_file

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)  # no answers: eval is the loss only, no generation
    straight = sft.main(tiny_args(tmp_path, dataset=data, out_dir=str(tmp_path / "straight"), max_steps=4,
                                  save_every=0, eval_every=0))
    calls = {"n": 0}

    def stop_after_two_steps(self):
        calls["n"] += 1
        return calls["n"] == 2

    monkeypatch.setattr(runs.StopSignal, "should_stop", stop_after_two_steps)
    interrupted = sft.main(tiny_args(tmp_path, dataset=data, out_dir=str(tmp_path / "resumed"), max_steps=4,
                                     save_every=0, eval_every=0))
    assert interrupted.stopped_at == 2 and runs.latest_checkpoint(str(tmp_path / "resumed")).endswith("checkpoint-2")
    resumed = sft.main(tiny_args(tmp_path, dataset=data, out_dir=str(tmp_path / "resumed"), max_steps=4,
                                 save_every=0, eval_every=0, resume=True))
    a = load_file(os.path.join(straight.final_dir, "model.safetensors"))
    b = load_file(os.path.join(resumed.final_dir, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[m["train/loss"] for m in runs.read_metrics(d) if "train/loss" in m]
              for d in (straight.out_dir, resumed.out_dir)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_evaluate_runs_as_many_generate_calls_as_the_busiest_rank(monkeypatch):
    """evaluate shares the answered prompts out over the ranks, the short shares topped up, so FSDP ranks run the
    same number of generate calls whatever their share of answers; the filler changes no metric."""
    model, tokenizer = K.load_model(toy.TOY_BASE, device="cpu", dtype="float32")
    problems = env.make_dataset("arithmetic", split="test", n=5, seed=1)
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "completion": f"<answer>{p['answer']}</answer>",
             "answer": p["answer"] if i % 2 == 0 else None} for i, p in enumerate(problems)]  # 3 answered
    examples = [sft.build_sft_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
    batch_sizes, generate = [], K.generate
    monkeypatch.setattr(K, "generate", lambda model, ids, *a, **k: batch_sizes.append(len(ids)) or
                        generate(model, ids, *a, **k))
    alone = sft.evaluate(model, tokenizer, examples, rows, max_new_tokens=24, batch_size=2)
    assert batch_sizes == [2, 1]
    batch_sizes.clear()
    monkeypatch.setattr(K, "get_world_size", lambda: 2)  # as rank 0 of 2: rows 0 and 2 of the 3 answered
    monkeypatch.setattr(K, "all_reduce_sum", lambda t: t)
    busy = sft.evaluate(model, tokenizer, examples, rows, max_new_tokens=24, batch_size=2)
    assert batch_sizes == [2]  # rank 1 (one answered row) would run one call of 2 rows too: its row and a filler
    assert busy.keys() == alone.keys() == {"eval/loss", "eval/accuracy", "eval/reasoning_share",
                                           "eval/response_length"}



def test_help_lists_the_shared_flags():
    """`python sft.py --help` works and shows the flags every training script shares."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model", "--dataset", "--out-dir", "--seed", "--max-steps", "--lr", "--eval-every",
                 "--save-every", "--resume", "--device", "--init-from-config"):
        assert flag in out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, strategy):
    """Two ranks (gloo, CPU), each accumulating two micro-batches, reach the weights of one process that
    accumulates the same batch in four."""
    from safetensors.torch import load_file

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    common = ["--preset", "toy_base", "--dataset", data, "--max-steps", "2", "--batch-size", "16", "--warmup-steps", "1",
              "--eval-every", "0",
              "--save-every", "0", "--device", "cpu", "--export-dir", ""]
    environ = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(ROOT, "sft.py"), *common, "--grad-accum", "2", "--strategy", strategy,
                    "--out-dir", str(tmp_path / "two")], check=True, env=environ, capture_output=True, timeout=300)
    sft.main(tiny_args(tmp_path, dataset=data, max_steps=2, batch_size=16, grad_accum=4, eval_every=0, save_every=0,
                       out_dir=str(tmp_path / "one")))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    assert set(one) <= set(two)  # FSDP's full state dict also names the tied lm_head
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torchrun_fsdp_evaluation_with_uneven_answers_matches_one_process(tmp_path):
    """Seven held-out rows, rank 0 holding three with an answer and rank 1 one: two FSDP ranks (gloo, CPU) finish,
    each running as many generate calls, with the eval metrics of one process, every row counted once."""
    problems = env.make_dataset("arithmetic", split="test", n=7, seed=1)
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "completion": f"<answer>{p['answer']}</answer>"}
            for p in problems]
    for i in (0, 1, 2, 4):  # rank 0 takes rows 0, 2, 4, 6 and rank 1 rows 1, 3, 5
        rows[i]["answer"] = problems[i]["answer"]
    train = write_jsonl(tmp_path / "train.jsonl", toy.toy_corpus(4, seed=0))
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows)
    common = ["--model", toy.TOY_BASE, "--dataset", train, "--eval-dataset", held_out, "--max-steps", "1",
              "--batch-size", "2", "--lr", "1e-6", "--warmup-steps", "1", "--eval-every", "0", "--save-every", "0",
              "--max-new-tokens", "24", "--device", "cpu", "--export-dir", ""]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            os.path.join(ROOT, "sft.py"), *common, "--grad-accum", "1", "--strategy", "fsdp",
                            "--out-dir", str(tmp_path / "two")], env=dict(os.environ, OMP_NUM_THREADS="1"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = two.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:  # deadlocked: SIGTERM makes torchrun stop its workers (SIGKILL after 30 s)
        two.terminate()
        two.communicate()
        raise
    assert two.returncode == 0, output[-3000:]
    sft.main(tiny_args(tmp_path, model=toy.TOY_BASE, dataset=train, eval_dataset=held_out, max_steps=1, batch_size=2,
                       grad_accum=2, lr=1e-6, eval_every=0, save_every=0, max_new_tokens=24,
                       out_dir=str(tmp_path / "one")))
    last = {d: runs.read_metrics(str(tmp_path / d))[-1] for d in ("one", "two")}
    keys = {"eval/loss", "eval/accuracy", "eval/reasoning_share"}
    assert keys <= set(last["one"]) and keys <= set(last["two"])
    assert all(last["two"][k] == pytest.approx(last["one"][k], abs=1e-5) for k in keys)


def test_toy_presets_are_the_recipes_that_made_the_committed_toy_models():
    """--preset toy_base and toy_student set every argument that toy/base's and toy/student's toy_stats.json record
    (what made them), apart from where the run writes; a random init either way (model None then, "" now); they run
    on one thread, as those builds did. The default preset is the R1 cold start on toy/base."""
    import dataclasses

    for preset, path in (("toy_base", toy.TOY_BASE), ("toy_student", toy.TOY_STUDENT)):
        recorded = json.load(open(os.path.join(path, "toy_stats.json")))
        args = dataclasses.asdict(sft.Args(preset=preset))
        differ = {k: (v, args.get(k)) for k, v in recorded["args"].items() if args.get(k) != v}
        assert set(differ) == {"model", "out_dir", "export_dir"} and not differ["model"][0] and not args["model"], differ
        assert os.path.abspath(args["export_dir"]) == os.path.abspath(path) and recorded["torch_threads"] == 1
        assert args["threads"] == 0  # rl_kernels.set_cpu_threads: 1 thread for a model this small
    cold = sft.Args()
    assert (cold.preset, cold.model, cold.dataset, cold.export_dir) == ("cold_start", "toy", "arithmetic", "")


@pytest.mark.parametrize("max_new_tokens", [300, 100_000])
def test_a_length_past_the_context_stops_before_any_weights_load(max_new_tokens, tmp_path, monkeypatch):
    """--max-new-tokens (eval/accuracy's generation length) past the toy model's context of 256: one sentence before
    any weights load or initialise, from --model and from --init-from-config."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(K, "load_model", lambda *a, **k: pytest.fail("weights loaded before the length check"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", lambda *a, **k: pytest.fail("weights made first"))
    for args in (sft.Args(max_new_tokens=max_new_tokens, out_dir=str(tmp_path / "a")),
                 tiny_args(tmp_path, max_new_tokens=max_new_tokens)):
        with pytest.raises(K.UserError, match=rf"--max-new-tokens {max_new_tokens} plus the held-out set's longest "
                                              r"prompt .* context of 256 tokens"):
            sft.main(args)
