"""A response ends at any of the model's end tokens: the generation config's EOS list, the tokenizer's EOS, and
the chat template's end of turn. Qwen2.5-Instruct's generation config lists <|im_end|> and <|endoftext|> while its
tokenizer's EOS is one of them; a base model under a chat template ends its turn with a token that is not its EOS.

The instrument: the toy base with its vocabulary renamed. The token the toy model ends a response with (id 0) is
renamed <|im_end|>, and a new <|endoftext|> (id 105, never sampled: it copies <|unk|>'s row) becomes the tokenizer's
EOS and pad. The weights of ids 0..104 are untouched, so every rollout must equal the original toy's token for
token, ending where the original ends, when and only when id 0 is a stop token: through the generation config's list,
or through the chat template that closes a turn with <|im_end|>."""

import json
import os
import shutil

import pytest
import torch

import grpo
import ppo
import rl_kernels as K
import rl_runs as runs
import rlvr_rewards as env
import toy_world as toy

END_OF_TURN, NEW_EOS = 0, 105


def renamed_toy(path, generation_eos, template_end: str = "<|im_end|>") -> str:
    """toy/base with id 0 renamed <|im_end|> and a new EOS/pad <|endoftext|> at id 105 (see the module docstring);
    generation_eos: the generation config's eos_token_id; template_end: what the chat template closes a turn with."""
    from transformers import AutoModelForCausalLM

    path = str(path)
    os.makedirs(path, exist_ok=True)
    spec = json.load(open(os.path.join(toy.TOY_BASE, "tokenizer.json")))
    renamed = {"<|endoftext|>": "<|im_end|>"}
    for token in spec["added_tokens"]:
        token["content"] = renamed.get(token["content"], token["content"])
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": NEW_EOS, "content": "<|endoftext|>"})
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {**{renamed.get(k, k): v for k, v in vocab.items()}, "<|endoftext|>": NEW_EOS}
    json.dump(spec, open(os.path.join(path, "tokenizer.json"), "w"))
    shutil.copy(os.path.join(toy.TOY_BASE, "tokenizer_config.json"), path)  # eos and pad: <|endoftext|>, now id 105
    template = open(os.path.join(toy.TOY_BASE, "chat_template.jinja")).read()
    open(os.path.join(path, "chat_template.jinja"), "w").write(template.replace("<|endoftext|>", template_end))

    model = AutoModelForCausalLM.from_pretrained(toy.TOY_BASE)
    model.resize_token_embeddings(NEW_EOS + 1)
    with torch.no_grad():
        model.get_input_embeddings().weight[NEW_EOS] = model.get_input_embeddings().weight[1]  # as <|unk|>: unsampled
    model.config.eos_token_id = model.config.pad_token_id = NEW_EOS
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = generation_eos, NEW_EOS
    model.save_pretrained(path)
    return path


def sampled(model_dir, rows, template, max_new_tokens=64):
    model, tokenizer = K.load_model(model_dir, device="cpu", dtype="float32")
    return env.sample(model, tokenizer, rows, num_samples=2, max_new_tokens=max_new_tokens, template=template,
                    noise_keys=list(range(2 * len(rows)))), tokenizer, model


@pytest.fixture(scope="module")
def rows():
    return env.make_dataset("arithmetic", "test", n=12, seed=3)


@pytest.mark.parametrize("case", ["generation_config_list", "chat_end_of_turn"])
def test_a_row_stops_at_any_end_token_as_the_original_toy_does(tmp_path, rows, case):
    """Each rollout of the renamed toy equals the original's token for token, mask for mask: it stops at the
    end-of-turn token, though the tokenizer's EOS is another id (before this fix every row ran to max_new_tokens,
    and every reward read junk after the answer). The case names which rule makes id 0 a stop token."""
    generation_eos, template = {"generation_config_list": ([END_OF_TURN, NEW_EOS], "r1"),
                                "chat_end_of_turn": (NEW_EOS, "chat")}[case]
    path = renamed_toy(tmp_path / "renamed", generation_eos)
    ours, tokenizer, model = sampled(path, rows, template)
    theirs, _, _ = sampled(toy.TOY_BASE, rows, template)
    assert tokenizer.eos_token_id == NEW_EOS and tokenizer.convert_ids_to_tokens(END_OF_TURN) == "<|im_end|>"
    stops = env.stop_token_ids(tokenizer, model, chat=template == "chat")
    assert END_OF_TURN in stops and NEW_EOS in stops
    assert (~theirs.gen.truncated).float().mean() > 0.5  # the toy ends most responses within 64 tokens
    assert torch.equal(ours.gen.truncated, theirs.gen.truncated)
    assert torch.equal(ours.gen.mask, theirs.gen.mask)
    assert torch.equal(ours.gen.tokens * ours.gen.mask, theirs.gen.tokens * theirs.gen.mask)
    assert ours.completions == theirs.completions and not any("<|" in c for c in ours.completions)
    lengths = ours.gen.mask.sum(-1)
    ended = ~ours.gen.truncated
    last_tokens = ours.gen.tokens[torch.arange(len(lengths)), lengths - 1]
    assert (last_tokens[ended] == END_OF_TURN).all()  # the mask keeps the token that ended the row, and no more
    assert (ours.gen.tokens[ours.gen.mask == 0] == NEW_EOS).all()  # what follows is the tokenizer's pad


def test_without_the_end_token_listed_nothing_stops(tmp_path, rows):
    """The control that shows the instrument can fail: a generation config and a template that do not name id 0
    leave every row running to max_new_tokens, as every row did before this fix."""
    path = renamed_toy(tmp_path / "renamed", NEW_EOS, template_end="<|unk|>")
    ours, tokenizer, model = sampled(path, rows, "chat", max_new_tokens=24)
    assert END_OF_TURN not in env.stop_token_ids(tokenizer, model, chat=True)
    assert ours.gen.truncated.all()


def test_stop_token_ids_read_every_source():
    """Qwen2.5-Instruct's pair: generation config [151645, 151643], tokenizer EOS 151643, and a chat template that
    closes a turn with <|im_end|>; ids repeat once; a tokenizer with no template adds nothing for chat."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {f"t{i}": i for i in range(100)} | {"<|endoftext|>": 151643, "<|im_end|>": 151645}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_end|>"])
    config = Qwen2Config(vocab_size=151936, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, eos_token_id=151643)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [151645, 151643]
    assert env.stop_token_ids(tokenizer, model) == [151645, 151643]
    assert env.stop_token_ids(tokenizer, model, chat=True) == [151645, 151643]  # no template: nothing more
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}<|im_end|>t1{% endfor %}"
                               "{% if add_generation_prompt %}assistant {% endif %}")
    model.generation_config.eos_token_id = 151643  # a base model: one id
    assert env.stop_token_ids(tokenizer, model) == [151643]
    assert env.stop_token_ids(tokenizer, model, chat=True) == [151643, 151645]
    assert env.end_of_turn_id(tokenizer) == 151645
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}t1{% endfor %}"  # a plain token follows
    assert env.end_of_turn_id(tokenizer) is None
    model.generation_config.eos_token_id = 0  # id 0 is an id, not "unset": the config's 151643 must not replace it
    assert K.eos_token_ids(model) == [0]
    model.generation_config.eos_token_id = None
    assert K.eos_token_ids(model) == [151643]


@pytest.mark.slow
def test_grpo_and_ppo_runs_stop_at_the_end_of_turn(tmp_path):
    """Through grpo.main and ppo.main on the renamed toy (base-model-like: one EOS in the generation config, the turn
    closed by <|im_end|>): rollouts end (truncated share well under 1, as in the original toy), and PPO's score sits
    on the <|im_end|> token that ended each row."""
    path = renamed_toy(tmp_path / "renamed", NEW_EOS)
    common = dict(model=path, max_steps=1, prompts_per_step=4, num_generations=2, max_new_tokens=64, eval_every=0,
                  plot=False)
    grpo.main(grpo.Args(out_dir=str(tmp_path / "grpo"), **common))
    ppo.main(ppo.Args(out_dir=str(tmp_path / "ppo"), **common))
    step = {name: runs.read_metrics(str(tmp_path / name))[0] for name in ("grpo", "ppo")}
    assert step["grpo"]["rollout/truncated_share"] < 0.5 and step["ppo"]["rollout/eos_rate"] > 0.5, step

    rows = env.make_dataset("arithmetic", "train", n=4, seed=0)
    rollout, _, _ = sampled(path, rows, "chat")
    lengths = rollout.gen.mask.sum(-1)
    scores = torch.arange(1.0, len(lengths) + 1)
    rewards = ppo.token_rewards(scores, rollout.gen.logprobs, None, rollout.gen.mask, kl_coef=0.0)
    at = rewards.nonzero()
    assert torch.equal(rewards[at[:, 0], at[:, 1]], scores) and torch.equal(at[:, 1], lengths - 1)
    ended = ~rollout.gen.truncated
    assert ended.any() and (rollout.gen.tokens[ended, lengths[ended] - 1] == END_OF_TURN).all()
