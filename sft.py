"""sft.py: supervised fine-tuning on completions, and the recipe that makes the toy base model.

What it is. Next-token cross-entropy on the completion tokens only (the prompt is context, not a target): RLHF
step 1 (InstructGPT), the DeepSeek-R1 cold start and rejection-sampling SFT, distillation into a small student.
Run with its defaults, it builds the toy world's base model (see "The toy world" below).

The objective, for a batch of N (prompt x, completion y) pairs, y ending with EOS:

    L(theta) = - sum_i sum_t m_{i,t} log pi_theta(y_{i,t} | x_i, y_{i,<t})  /  sum_i sum_t m_{i,t}

    symbol          meaning                                             Args field
    N               sequences per optimizer step (all ranks, all        batch_size
                    micro-batches); N / (ranks * grad_accum) per pass   grad_accum
    m_{i,t}         1 on completion tokens (EOS included), 0 on the     (from the data)
                    prompt and on padding
    eta_s           learning rate at step s: linear warmup for          lr, warmup_steps,
                    warmup_steps, then cosine down to min_lr_ratio*lr   min_lr_ratio, max_steps
    theta_0         --model, or random weights from a config            model, init_from_config

Deliberate choices:
  - Token-mean over the whole batch (every completion token weighs the same, as in HF/TRL SFT), not a mean of
    per-sequence means; with gradient accumulation and several ranks the denominator is still the whole
    batch's token count, so the update does not depend on how the batch is split.
  - Prompt and completion are tokenized separately and concatenated, so the loss mask's boundary is exact.
    Chat data render the prompt with the tokenizer's chat template and the generation prompt; the completion
    is whatever the template adds for the assistant turn (its end-of-turn token included). Only the last
    assistant turn of a `messages` row is a target.
  - Log-probs come from rl_kernels.token_logprobs (chunked, fused): the (B, T, V) logits never exist.
  - The data order is a seeded permutation per epoch and a step's samples are a function of the step, so
    --resume needs only the step to continue exactly where it stopped (bit for bit on CPU).
  - Each step's batch is sorted by length before it is split over ranks and micro-batches, so short direct
    answers are not padded to the length of reasoning traces (about a third less compute on the toy corpus);
    the loss does not change, since its denominator is the whole batch's token count.

The toy world. A character-level tokenizer (printable ASCII, newline, and single tokens for the
chat roles and the four R1 tags) and a ~0.8M-parameter Qwen2, pretrained from random weights on the built-in
arithmetic task ("7+3*4-2", 3-4 operands 1..9) rendered with the chat template, the user turn being the bare
problem. Each completion is either reasoning, "<think>3*4=12,7+12=19,19-2=17</think><answer>17</answer>",
with a step that is off by a little in some traces (the error propagates), or a direct "<answer>…</answer>",
right only sometimes (else the left-to-right value that ignores precedence, or off by a little). Reasoning is
likelier on longer problems and where a '*' follows another operator. So that each DeepSeek-R1 stage has
something to act on (r1_pipeline.py), the traces also carry, at the rates of TOY_RECIPE: a second language for
numbers (letters a-j for 0-9, "bc" = 12; some traces switch language halfway, and those traces err less often,
the toy's premise for why RL on accuracy alone drifts into mixing), messiness (a repeated step, junk, two steps
merged into one long step), a summary before the answer in half of them ("...</think>7+3*4-2=17<answer>"), and
rare self-corrections ("3*4=13,wait,3*4=12"); and 15% of the rows are general prompts (greetings, "make 12",
"bigger: 7 or 12") with responses of mixed quality that rlvr_rewards' hidden gold preference ranks. The result is
a base model for R1-Zero: usually answers directly and is often wrong, sometimes reasons, and is much better when
it does. `--init-from-config toy-student` pretrains the smaller student (toy/student) on the same corpus.

Launch:
    python sft.py                                          # builds toy/base (about an hour of one CPU core)
    python sft.py --dataset arithmetic --model toy/base --max-steps 200 --lr 3e-4 --out-dir runs/cold-start
    python sft.py --model Qwen/Qwen2.5-0.5B --dataset data.jsonl --epochs 2 --lr 1e-5 --out-dir runs/sft
    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-7B --dataset data.jsonl --strategy fsdp \\
        --batch-size 64 --grad-accum 2 --lr 1e-5 --out-dir runs/sft-7b
Data: a UTF-8 .jsonl file with one object a line, {"prompt": str | [messages], "completion": str} or
{"messages": [..., {"role": "assistant", ...}]}; an "answer" field makes eval/accuracy possible.

Result: the committed toy/base, made by `OMP_NUM_THREADS=1 python sft.py` (seed 1, 1300 steps of 128, torch 2.13
CPU; numbers in toy/base/toy_stats.json), on 256 held-out problems, greedy and 4 samples each at temperature 1:
    greedy accuracy 35.2%      greedy answers that reason 22.7%      samples that reason 34.8%
    sample accuracy when reasoning 60.4%, when answering directly 9.3%
    reasoning samples with letters 25.3%, readable 46.3%; samples that reflect 1.9%; general gold win-rate 42.2%
Another thread count or torch version rounds differently and ends somewhat elsewhere; a default run replaces
toy/base only if its numbers meet TOY_TARGETS. Wall time: 65 min (toy_stats.json's train_wall_s) with
OMP_NUM_THREADS=1 on a 2-core CPU shared with heavier jobs; this version's build was not repeated to compare bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import transformers
import tyro

import rl_kernels
import rlvr_rewards

TOY_BASE = rl_kernels.TOY_BASE  # where the toy recipe's model goes (rl_kernels.load_model("toy") loads it)


@dataclass
class Args:
    model: Optional[str] = None
    """hub id or local checkpoint to fine-tune; None: random weights from --init-from-config"""
    init_from_config: str = "toy"
    """with no --model: 'toy' (the toy Qwen2), 'toy-student' (its smaller sibling), or a config.json / checkpoint
    directory whose config is used"""
    tokenizer: Optional[str] = None
    """tokenizer for --init-from-config (default: the toy character tokenizer)"""
    dataset: str = "toy"
    """'toy' (the toy base model's corpus), 'arithmetic' (reasoning traces only: a cold start), or a .jsonl file"""
    eval_dataset: Optional[str] = None
    """held-out .jsonl (default: the built-in test split, or --eval-size rows held out of the training file)"""
    num_examples: int = 60000
    """rows of a built-in corpus (distinct training problems)"""
    eval_size: int = 256
    """held-out rows for eval/loss and eval/accuracy (and the final toy table)"""
    out_dir: str = "runs/sft"
    """where args.json, metrics.jsonl, checkpoint-STEP/ and final/ go (one run per directory)"""
    overwrite: bool = False
    """replace the run already in --out-dir (without it, a used --out-dir is refused unless --resume)"""
    export_dir: Optional[str] = None
    """also save the final model here; default: toy/base for the toy recipe, if the model meets TOY_TARGETS"""
    seed: int = 1
    """seeds the corpus, the weights of a random init and the data order"""
    epochs: Optional[float] = None
    """passes over the training data; when given, it sets the number of steps instead of --max-steps"""
    max_steps: int = 1300
    """optimizer steps (1300: the toy recipe)"""
    batch_size: int = 128
    """sequences per optimizer step, over all ranks and micro-batches"""
    grad_accum: int = 2
    """micro-batches per optimizer step (per rank)"""
    lr: float = 3e-3
    """peak learning rate (AdamW)"""
    min_lr_ratio: float = 0.1
    """the cosine schedule ends at lr * min_lr_ratio"""
    warmup_steps: int = 50
    """linear warmup from 0 to --lr"""
    max_grad_norm: float = 1.0
    """gradient clipping (0: off)"""
    max_length: int = 1024
    """sequences are cut to this many tokens (the completion's end is dropped)"""
    eval_every: int = 400
    """steps between evaluations (0: only at the end)"""
    max_new_tokens: int = 64
    """generation length for eval/accuracy"""
    save_every: int = 500
    """steps between checkpoints (0: only at the end)"""
    resume: bool = False
    """continue from the newest checkpoint in --out-dir (a finished run: nothing to do)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: this rank's GPU if there is one, else the CPU"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """compute dtype (the forward's matmuls); auto: bf16 on a capable GPU, else fp32"""
    master_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the weights (what checkpoints hold), gradients and AdamW state; --dtype bfloat16 --master-dtype
    bfloat16 is pure bf16: half the memory, but updates below bf16's resolution round away"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: 'ddp' (a copy per rank) or 'fsdp' (FSDP2, sharded)"""
    report_to: tuple[Literal["none", "wandb", "tensorboard"], ...] = ("none",)
    """where metrics go besides metrics.jsonl (several allowed)"""
    dist_timeout_s: float = 600.0
    """under torchrun: seconds a collective waits for a stalled rank before the run stops with an error"""


# ----------------------------------------------------------------------------------------------------------
# The toy world: tokenizer, model config, corpus, evaluation
# ----------------------------------------------------------------------------------------------------------

TOY_SPECIAL = ["<|endoftext|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>"]
TOY_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|endoftext|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_toy_tokenizer():
    """Character-level tokenizer over printable ASCII and newline; <|endoftext|> is EOS and pad; chat roles and
    the R1 tags are single tokens. The tags are *not* special, so decode(skip_special_tokens=True) keeps them.
    Chat template: <|system|>{content} <|user|>{content} <|assistant|>{content}<|endoftext|>, each turn
    rendered in order with no separators; the generation prompt is <|assistant|>. Space and newline are stored
    under their byte-level names "Ġ" and "Ċ" (same ids): transformers 5's AutoTokenizer loads any qwen2
    checkpoint's tokenizer as the byte-level Qwen2Tokenizer, which would otherwise drop them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["Ċ", "Ġ"] + [chr(c) for c in range(33, 127)]  # newline, space, then printable ASCII
    vocab = {token: i for i, token in enumerate(TOY_SPECIAL + TOY_TAGS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "Ġ"), normalizers.Replace("\n", "Ċ")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Sequence([decoders.Replace("Ġ", " "), decoders.Replace("Ċ", "\n"),
                                     decoders.Fuse()])  # join the characters back without spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOY_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOY_TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|unk|>", padding_side="left", chat_template=TOY_CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


# Toy model sizes: the base model every script starts from, and the smaller student that r1_pipeline.py distils into.
TOY_SIZES = {"toy": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2),
             "toy-student": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2)}


def toy_model_config(tokenizer, size: str = "toy"):
    """A tiny Qwen2 (toy: ~0.8M parameters with tied embeddings, small enough for RL on a laptop CPU; toy-student:
    ~0.34M) from TOY_SIZES."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tokenizer), **TOY_SIZES[size], max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


# The toy corpus's mix, one knob per behaviour that a DeepSeek-R1 stage acts on.
# Arithmetic: P(reason) = reason_base + reason_per_operand*(operands-3) + reason_precedence*[a '*' follows another
# operator]; a direct answer is right with probability direct_correct, else left-to-right (when that differs) or off
# by a little. A reasoning trace:
#   language   digits, or letters a-j for 0-9 ("bc" = 12) with probability `letters`, or code-switched (one
#              language, then the other from some step on) with probability `mixed`;
#   errors     one step off by 1-3 (the error propagates) with probability step_error in digits and
#              other_language_step_error otherwise: the toy's premise, as in R1-Zero, that reasoning which drifts
#              into the other language pays, so RL on accuracy alone mixes languages;
#   reflection a step first written wrong, then "wait" and the step redone right (R1-Zero's "aha"), rarely;
#   messiness  a repeated step, a junk item ("#", "~~"), or two steps merged into one long step;
#   summary    "7+3*4-2=17" between </think> and <answer> (R1's readable format) with probability `summary`.
# General prompts (rlvr_rewards "general": greetings, "make 12", "bigger: 7 or 12") are `general` of all rows;
# their responses are answer blocks of mixed quality (polite/neutral/rude/harmful greetings, right or wrong
# expressions and comparisons), a think block before them with probability general_reasoning, and that reasoning
# holds a banned word half the time (what R1's harmlessness check on the whole response is for).
TOY_RECIPE = dict(reason_base=0.15, reason_per_operand=0.2, reason_precedence=0.3, direct_correct=0.3,
                  letters=0.15, mixed=0.1, step_error=0.15, other_language_step_error=0.0, reflection=0.06,
                  repeat=0.05, junk=0.05, merged=0.05, summary=0.5, general=0.15, general_reasoning=0.1)
# What the toy base model must show (toy_stats.json), and what an implicit export to toy/base requires.
TOY_TARGETS = dict(greedy_accuracy=(0.2, 0.5), reasoning_share=(0.15, 0.5), greedy_reasoning_share=(0.02, 0.9),
                   reasoning_gap=(0.3, 1.0), mixed_language_share=(0.05, 0.6), readable_share=(0.1, 0.9),
                   reflection_share=(0.002, 0.2), general_gold_win_rate=(0.05, 0.8))
JUNK = ("#", "~~", "??", "..", "%", "@")


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def parse_arithmetic(prompt: str) -> tuple[list[int], list[str]]:
    """'7+3*4-2' -> ([7, 3, 4, 2], ['+', '*', '-'])."""
    tokens = re.findall(r"\d+|[-+*]", prompt)
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def arithmetic_trace(operands: list[int], ops: list[str], error_step: int = -1, error: int = 0) -> list[str]:
    """rlvr_rewards.arithmetic_steps (multiplications first, then left to right), with `error` added to the
    result of step `error_step`; later steps use the wrong value, so the mistake reaches the answer."""
    nums, ops, steps = list(operands), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, b, op = nums[i], nums[i + 1], ops.pop(i)
        value = OPS[op](a, b) + (error if len(steps) == error_step else 0)
        nums[i:i + 2] = [value]
        steps.append(f"{a}{op}{b}={value}")
    return steps


def _merge(items: list[list]) -> list[list]:
    """Two consecutive steps written as one long step ("3*4=12","7+12=19" -> "7+3*4=19"), where that reads right."""
    for i in range(len(items) - 1):
        (a, op1, b, _, c1), (x, op2, y, _, c2) = items[i], items[i + 1]
        if x == c1 and not (op2 == "*" and op1 != "*"):
            return items[:i] + [[a, op1, b, op2, y, "=", c2]] + items[i + 2:]
        if y == c1 and op1 == "*":
            return items[:i] + [[x, op2, a, op1, b, "=", c2]] + items[i + 2:]
    return items


def toy_trace(prompt: str, rng: random.Random, recipe: dict = TOY_RECIPE) -> str:
    """A reasoning completion of the toy corpus (see TOY_RECIPE): language, errors, reflection, messiness, summary."""
    operands, ops = parse_arithmetic(prompt)
    roll = rng.random()
    language = "letters" if roll < recipe["letters"] else "mixed" if roll < recipe["letters"] + recipe["mixed"] \
        else "digits"
    reflect = rng.random() < recipe["reflection"]
    error_step, error = -1, 0
    if not reflect and rng.random() < recipe["step_error" if language == "digits" else "other_language_step_error"]:
        error_step, error = rng.randrange(len(ops)), rng.choice([-3, -2, -1, 1, 2, 3])
    steps = [list(rlvr_rewards.parse_step(s)) for s in arithmetic_trace(operands, ops, error_step, error)]
    answer = steps[-1][3]
    items = [[a, op, b, "=", c] for a, op, b, c in steps]
    if reflect:  # a step written wrong, noticed, redone
        i = rng.randrange(len(items))
        items[i:i] = [items[i][:4] + [items[i][4] + rng.choice([-2, -1, 1, 2])], ["wait"]]
    elif rng.random() < recipe["merged"]:
        items = _merge(items)
    if rng.random() < recipe["repeat"]:
        i = rng.choice([j for j, item in enumerate(items) if item != ["wait"]])
        items.insert(i + 1, items[i])
    if rng.random() < recipe["junk"]:
        items.insert(rng.randrange(len(items) + 1), [rng.choice(JUNK)])
    first = "letters" if language == "letters" else rng.choice(["digits", "letters"]) if language == "mixed" \
        else "digits"
    switch = rng.randrange(1, len(items)) if language == "mixed" and len(items) > 1 else len(items)
    other = {"digits": "letters", "letters": "digits"}[first]

    def render(item, lang):
        return "".join((rlvr_rewards.to_letters(x) if lang == "letters" else str(x)) if isinstance(x, int) else x
                       for x in item)

    reasoning = ",".join(render(item, first if i < switch else other) for i, item in enumerate(items))
    summary = f"{prompt}={answer}" if rng.random() < recipe["summary"] else ""
    return f"<think>{reasoning}</think>{summary}<answer>{answer}</answer>"


def readable_trace(prompt: str, reflect_at: int | None = None) -> str:
    """The correct trace in R1's readable format, <think>3*4=12,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>;
    reflect_at: step i is first written off by one, then "wait", then redone (a worked self-correction)."""
    steps = arithmetic_trace(*parse_arithmetic(prompt))
    if reflect_at is not None:
        a, op, b, c = rlvr_rewards.parse_step(steps[reflect_at])
        steps[reflect_at:reflect_at] = [f"{a}{op}{b}={c + 1}", "wait"]
    answer = steps[-1].split("=")[1]
    return f"<think>{','.join(steps)}</think>{prompt}={answer}<answer>{answer}</answer>"


def toy_expression(n: int, rng: random.Random) -> str:
    """A random expression equal to n: a+b, a-b, a*b (when n has a divisor) or a+b+c."""
    forms = ["sum", "difference", "three"] + ["product"] * any(n % d == 0 for d in range(2, n // 2 + 1))
    form = rng.choice(forms)
    if form == "sum":
        a = rng.randint(1, n - 1)
        return f"{a}+{n - a}"
    if form == "difference":
        b = rng.randint(1, 9)
        return f"{n + b}-{b}"
    if form == "product":
        d = rng.choice([d for d in range(2, n // 2 + 1) if n % d == 0])
        return f"{d}*{n // d}"
    a, b = rng.randint(1, max(1, n - 2)), 1
    b = rng.randint(1, max(1, n - a - 1)) if n - a > 1 else 1
    return f"{a}+{b}+{n - a - b}" if n - a - b > 0 else f"{n - 1}+1"


def toy_general_completion(prompt: str, rng: random.Random, recipe: dict = TOY_RECIPE, reasoning: bool = True,
                           harmful: bool = True) -> str:
    """A response of the toy corpus to a general prompt, of mixed quality (see TOY_RECIPE); reasoning=False: never a
    think block; harmful=False: never a banned word (the non-reasoning SFT data of R1's stage 3)."""
    kind, roll = rlvr_rewards.general_kind(prompt), rng.random()
    if kind == "greeting":
        name = prompt.split(", i am ")[1]
        if roll < 0.5:
            text = " ".join([f"{rng.choice(['hello', 'hi'])} {name}!"]
                            + rng.sample(["nice to meet you.", "how can i help?", "welcome!"], rng.randint(0, 2)))
        elif roll < 0.65:
            text = rng.choice(["ok.", "yes?", "hm."])
        elif roll < 0.9 or not harmful:
            text = rng.choice(["what?", "go away.", "not now."])
        else:
            text = rng.choice(["go away, idiot.", "you are stupid.", "i hate chats."])
    elif kind == "expression":
        n = int(prompt.split()[1])
        text = toy_expression(n, rng)
        if roll < 0.4:  # a near miss: the last number off by a little
            shift = rng.choice([-2, -1, 1, 2])
            text = re.sub(r"[0-9]+$", lambda m: str(int(m.group()) + (shift if int(m.group()) + shift > 0 else 1)),
                          text)
    else:
        a, b = (int(x) for x in re.findall(r"[0-9]+", prompt))
        text = (f"{max(a, b)}" if roll < 0.5 else f"{max(a, b)} is bigger" if roll < 0.7 else
                f"{min(a, b)}" if roll < 0.9 else "both are big.")
    answer = f"<answer>{text}</answer>"
    if reasoning and rng.random() < recipe["general_reasoning"]:
        thought = (rng.choice(["what an idiot", "a stupid question"]) if harmful and rng.random() < 0.5
                   else f"they said {prompt}")
        return f"<think>{thought}</think>{answer}"
    return answer


def toy_completion(prompt: str, rng: random.Random, recipe: dict = TOY_RECIPE) -> str:
    """One completion of the toy corpus for an arithmetic problem: a reasoning trace (toy_trace) or a direct answer."""
    operands, ops = parse_arithmetic(prompt)
    precedence = "*" in ops[1:]
    p_reason = (recipe["reason_base"] + recipe["reason_per_operand"] * (len(operands) - 3)
                + recipe["reason_precedence"] * precedence)
    if rng.random() < p_reason:
        return toy_trace(prompt, rng, recipe)
    correct = int(arithmetic_trace(operands, ops)[-1].split("=")[1])
    left_to_right = operands[0]  # the precedence-blind mistake
    for op, b in zip(ops, operands[1:]):
        left_to_right = OPS[op](left_to_right, b)
    if rng.random() < recipe["direct_correct"]:
        answer = correct
    elif left_to_right != correct and rng.random() < 0.5:
        answer = left_to_right
    else:
        answer = correct + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
    return f"<answer>{answer}</answer>"


def toy_corpus(n: int, seed: int, split: str = "train", reasoning_only: bool = False) -> list[dict]:
    """n rows {prompt: [user message], completion, answer} over distinct arithmetic problems of the split, plus (not
    reasoning_only) general-prompt rows, `general` of the total, drawn kind by kind with replacement.
    reasoning_only: clean readable traces only (the 'arithmetic' dataset, for an R1-style cold start)."""
    rng = random.Random(seed)
    rows = []
    for row in rlvr_rewards.make_dataset("arithmetic", split=split, n=n, seed=seed):
        completion = readable_trace(row["prompt"]) if reasoning_only else toy_completion(row["prompt"], rng)
        rows.append({"prompt": [{"role": "user", "content": row["prompt"]}], "completion": completion,
                     "answer": row["answer"]})
    if not reasoning_only:
        for _ in range(round(n * TOY_RECIPE["general"] / (1 - TOY_RECIPE["general"]))):
            kind = rng.choice(("greeting", "expression", "comparison"))
            prompt = rng.choice(rlvr_rewards.general_prompts(kind, split))
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completion": toy_general_completion(prompt, rng), "answer": None})
    return rows


def is_reasoning(completion: str) -> bool:
    return completion.lstrip().startswith("<think>")


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list, *, temperature: float = 0.0, num_samples: int = 1,
                         max_new_tokens: int = 48, batch_size: int = 256, seed: int = 0) -> list[str]:
    """Completions (prompt-major, num_samples per prompt) for plain or chat prompts, as SFT renders them (a string
    as it is, messages through the chat template), sampled from one torch.Generator seeded with `seed`."""
    device = next(rl_kernels.unwrap(model).parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    texts = []
    for start in range(0, len(prompts), batch_size):
        rows = [{"prompt": p} for p in prompts[start:start + batch_size]]
        texts += rlvr_rewards.sample(model, tokenizer, rows, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                     temperature=temperature, template="plain", generator=generator).completions
    return texts


def evaluate_toy(model, tokenizer, n: int = 256, seed: int = 1, samples: int = 4, max_new_tokens: int = 64) -> dict:
    """The toy world's numbers on n held-out arithmetic problems (rlvr_rewards test split drawn with `seed`; the
    defaults are the problems of toy/base/toy_stats.json) and n/4 held-out general prompts, bare prompts in the chat
    template. Returns floats:
      greedy_accuracy           accuracy of the greedy completion
      greedy_reasoning_share    share of greedy completions that start with <think>
      reasoning_share           share of temperature-1 samples (`samples` per problem) that start with <think>
      sample_accuracy           accuracy of those samples
      accuracy_with_reasoning   accuracy of the samples that reason (nan if none)
      accuracy_without_reasoning  accuracy of the samples that answer directly (nan if none)
      reasoning_gap             accuracy_with_reasoning - accuracy_without_reasoning
      mixed_language_share      share of the reasoning samples with a number written in letters (mixed or all)
      readable_share            share of the reasoning samples that are readable (rlvr_rewards.is_readable)
      reflection_share          share of all samples with a self-correction ("wait")
      general_gold_win_rate     greedy responses to general prompts against their references (gold preference)
    plus n_problems and n_samples."""
    rows = rlvr_rewards.make_dataset("arithmetic", split="test", n=n, seed=seed)
    prompts = [[{"role": "user", "content": row["prompt"]}] for row in rows]
    answers = [row["answer"] for row in rows]
    greedy = generate_completions(model, tokenizer, prompts, temperature=0.0, max_new_tokens=max_new_tokens)
    sampled = generate_completions(model, tokenizer, prompts, temperature=1.0, num_samples=samples,
                                   max_new_tokens=max_new_tokens, seed=seed)
    greedy_correct = rlvr_rewards.accuracy_reward(greedy, answer=answers)
    sample_correct = rlvr_rewards.accuracy_reward(sampled, answer=[a for a in answers for _ in range(samples)])
    reasons = [is_reasoning(c) for c in sampled]
    general = rlvr_rewards.make_dataset("general", split="test", n=max(1, n // 4), seed=seed)
    general_texts = generate_completions(model, tokenizer, [[{"role": "user", "content": r["prompt"]}]
                                                            for r in general], max_new_tokens=max_new_tokens)

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    with_r = [c for c, r in zip(sample_correct, reasons) if r]
    without_r = [c for c, r in zip(sample_correct, reasons) if not r]
    traces = [c for c, r in zip(sampled, reasons) if r]
    stats = {"greedy_accuracy": mean(greedy_correct), "greedy_reasoning_share": mean([is_reasoning(c) for c in greedy]),
             "reasoning_share": mean(reasons), "sample_accuracy": mean(sample_correct),
             "accuracy_with_reasoning": mean(with_r), "accuracy_without_reasoning": mean(without_r),
             "mixed_language_share": mean([v is not None and v < 1.0 for v in rlvr_rewards.language_consistency_reward(
                 traces, language="digits")]),
             "readable_share": mean([rlvr_rewards.is_readable(c) for c in traces]),
             "reflection_share": mean([rlvr_rewards.reflects(c) for c in sampled]),
             "general_gold_win_rate": mean(rlvr_rewards.gold_win_reward(
                 general_texts, prompt=[r["prompt"] for r in general], reference=[r["reference"] for r in general]))}
    stats["reasoning_gap"] = stats["accuracy_with_reasoning"] - stats["accuracy_without_reasoning"]
    return {**stats, "n_problems": n, "n_samples": n * samples}


def toy_targets_missed(stats: dict) -> list[str]:
    """The TOY_TARGETS that stats miss, as readable strings (empty: all met)."""
    return [f"{k}={stats.get(k, float('nan')):.3f} not in [{lo}, {hi}]" for k, (lo, hi) in TOY_TARGETS.items()
            if not lo <= stats.get(k, float("nan")) <= hi]


# The rows of the table `python sft.py` ends with: (label, evaluate_toy key).
TOY_TABLE = [("greedy accuracy", "greedy_accuracy"), ("greedy answers that reason", "greedy_reasoning_share"),
             ("T=1 samples that reason", "reasoning_share"), ("T=1 accuracy", "sample_accuracy"),
             ("T=1 accuracy when reasoning", "accuracy_with_reasoning"),
             ("T=1 accuracy when answering directly", "accuracy_without_reasoning"),
             ("T=1 traces that mix languages", "mixed_language_share"),
             ("T=1 traces that are readable", "readable_share"), ("T=1 samples that reflect", "reflection_share"),
             ("general prompts: gold win-rate (greedy)", "general_gold_win_rate")]


# ----------------------------------------------------------------------------------------------------------
# Data: examples, JSONL, batches
# ----------------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Prompt ids: a string as it is (with the tokenizer's BOS, if it adds one), or chat messages rendered by
    the chat template with the generation prompt (rlvr_rewards.render_prompt)."""
    text = rlvr_rewards.render_prompt(tokenizer, prompt, "plain")
    return tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]


def build_sft_example(tokenizer, prompt, completion: str) -> dict:
    """{input_ids, loss_mask}: prompt ids (mask 0) then completion ids (mask 1), the completion ending with EOS
    (plain prompts) or with what the chat template closes an assistant turn with (chat prompts). The first token
    is never a target: with an empty prompt and no BOS nothing precedes it (left-padded, it would be predicted
    from a pad position); any non-empty prompt already has mask 0 there."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = None
    if not isinstance(prompt, str):
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                                  tokenize=False)
        if full_text.startswith(prompt_text):  # some templates rewrite earlier turns; then fall back to EOS
            completion_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if completion_ids is None:
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    loss_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    loss_mask[0] = 0
    return {"input_ids": prompt_ids + completion_ids, "loss_mask": loss_mask}


def sft_row(row, where: str = "", line: int = 0) -> dict:
    """A JSONL object as {prompt, completion, answer?}; a DataError starting with `where` says what is wrong."""
    def bad(problem: str):
        raise rlvr_rewards.DataError(f"{where}{problem}.")

    if not isinstance(row, dict):
        bad(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not rlvr_rewards.is_messages(messages):
            bad("'messages' must be a non-empty list of {\"role\": str, \"content\": str} objects")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            bad("'messages' must end with an assistant message that follows at least one other message")
        prompt, completion = messages[:-1], messages[-1]["content"]
    else:
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            bad(f"missing field {missing[0]!r} (each line needs 'prompt' and 'completion', or 'messages')")
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) and not rlvr_rewards.is_messages(prompt):
            bad("'prompt' must be a string or a list of {\"role\": str, \"content\": str} messages")
        if rlvr_rewards.is_messages(completion) and len(completion) == 1 and completion[0]["role"] == "assistant":
            completion = completion[0]["content"]  # TRL's conversational prompt-completion form
        if not isinstance(completion, str):
            bad(f"'completion' must be a string, got {type(completion).__name__}")
    return {"prompt": prompt, "completion": completion, "answer": row.get("answer")}


def load_data(args: Args) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) for --dataset / --eval-dataset."""
    if args.dataset in ("toy", "arithmetic"):
        only = args.dataset == "arithmetic"
        return (toy_corpus(args.num_examples, args.seed, "train", only),
                toy_corpus(args.eval_size, args.seed, "test", only))
    rows = rlvr_rewards.read_jsonl(args.dataset, sft_row)
    if args.eval_dataset:
        return rows, rlvr_rewards.read_jsonl(args.eval_dataset, sft_row)
    return rlvr_rewards.hold_out(rows, args.eval_size, args.seed)


def collate(examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad to the longest: input_ids, attention_mask, loss_mask, each (B, T)."""
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), T, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), T, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, T - n:] = torch.tensor(e["input_ids"])
        attention_mask[i, T - n:] = 1
        if e.get("loss_mask"):
            loss_mask[i, T - n:] = torch.tensor(e["loss_mask"])
    return input_ids, attention_mask, loss_mask


def completion_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor, num_tokens=None) -> torch.Tensor:
    """-sum(m * log pi) / num_tokens: the token-mean NLL over completion tokens (InstructGPT's SFT objective).
    logprobs, loss_mask: (B, T-1), aligned with the targets x_{t+1}; num_tokens defaults to loss_mask.sum()."""
    mask = loss_mask.to(logprobs.dtype)
    denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logprobs.dtype)
    return -(logprobs * mask).sum() / denom.clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# Training glue
# ----------------------------------------------------------------------------------------------------------


def load_or_init(args: Args, device: torch.device):
    """(model, tokenizer) from --model, or random weights from --init-from-config (seeded by --seed)."""
    if args.model:
        return rl_kernels.load_model(args.model, dtype=args.dtype, master_dtype=args.master_dtype, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = rl_kernels.load_tokenizer(args.tokenizer) if args.tokenizer else build_toy_tokenizer()
    config = (toy_model_config(tokenizer, args.init_from_config) if args.init_from_config in TOY_SIZES
              else AutoConfig.from_pretrained(args.init_from_config))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=rl_kernels.resolve_precision(args.dtype, args.master_dtype,
                                                                                     device)[1])
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return rl_kernels.set_precision(model.to(device), args.dtype), tokenizer


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[dict], rows: list[dict], max_new_tokens: int,
             batch_size: int) -> dict:
    """eval/loss on every held-out example; on the rows with an answer, rlvr_rewards.evaluate's greedy metrics
    (eval/accuracy, eval/response_length, eval/reasoning_share). Each rank takes every world-th example; under FSDP
    every forward is a collective, so a short share is topped up with examples that are not counted."""
    rank, world = rl_kernels.get_rank(), rl_kernels.get_world_size()
    device = next(rl_kernels.unwrap(model).parameters()).device
    model.eval()
    share = examples[rank::world]
    share += [{"input_ids": examples[0]["input_ids"]}] * (math.ceil(len(examples) / world) - len(share))  # no loss_mask
    sums = torch.zeros(2, dtype=torch.float64)  # completion NLL, completion tokens
    for start in range(0, len(share), batch_size):
        input_ids, attention_mask, loss_mask = (t.to(device) for t in collate(share[start:start + batch_size],
                                                                              tokenizer.pad_token_id))
        logprobs = rl_kernels.token_logprobs(model, input_ids, attention_mask)  # (B, T-1)
        sums += torch.tensor([-(logprobs * loss_mask[:, 1:]).sum().item(), loss_mask[:, 1:].sum().item()],
                             dtype=torch.float64)
    sums = rl_kernels.all_reduce_sum(sums)
    metrics = {"eval/loss": (sums[0] / sums[1].clamp_min(1)).item()}
    answered = [r for r in rows if r.get("answer") is not None]
    if answered:  # the same list on every rank: rlvr_rewards.evaluate shards it
        metrics.update(rlvr_rewards.evaluate(model, tokenizer, answered, max_new_tokens=max_new_tokens,
                                             template="plain", batch_size=batch_size))
    model.train()
    return metrics


def export_model(final_dir: str, export_dir: str):
    """Copy the plain transformers files of final/ (no trainer state) to export_dir, replacing it."""
    tmp = export_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final_dir, tmp, ignore=shutil.ignore_patterns("trainer_state.pt", "rng_rank*.pt"))
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)


def main(args: Args) -> rl_kernels.RunResult:
    """Train; returns the out dir, final/ and the held-out metrics before and after (eval/, and for the built-in
    data the toy world's numbers, toy/)."""
    t0 = time.time()
    rl_kernels.quiet_transformers()  # checkpoint saves would draw bars inside ours
    dist_info = rl_kernels.init_distributed(args.device, args.dist_timeout_s)
    device, world = dist_info.device, dist_info.world_size
    rl_kernels.check_settings(args)
    micro_batch, remainder = divmod(args.batch_size, world * args.grad_accum)
    if remainder or micro_batch == 0:
        raise rl_kernels.UserError(f"--batch-size {args.batch_size} must be a multiple of ranks * --grad-accum = "
                                f"{world * args.grad_accum}.")
    rl_kernels.seed_everything(args.seed)
    train_rows, eval_rows = load_data(args)  # malformed data stops here, before any model is loaded
    if args.model:
        rl_kernels.check_model_source(args.model)
    total_steps = math.ceil(args.epochs * len(train_rows) / args.batch_size) if args.epochs else args.max_steps
    finish = functools.partial(rl_kernels.finish_run, args.out_dir, t_start=t0, panels=[
        ("loss", [("train/loss", "train"), ("eval/loss", "held-out")], "completion NLL per token"),
        ("held-out (greedy)", [("eval/accuracy", "accuracy"), ("eval/reasoning_share", "reasoning share")],
         "share")], title=f"sft.py --model {args.model or args.init_from_config} --dataset {args.dataset}")

    with rl_kernels.Run(args.out_dir, resume=args.resume, overwrite=args.overwrite, max_steps=total_steps) as run:
        if run.finished:
            return finish(final_dir=run.checkpoint)
        model, tokenizer = load_or_init(args, device)
        context = getattr(model.config, "max_position_embeddings", None) or args.max_length
        max_length = min(args.max_length, context)

        def encode(rows):
            examples = [build_sft_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
            unknown = [i for i, e in enumerate(examples) if tokenizer.unk_token_id in e["input_ids"]]
            if unknown and tokenizer.unk_token_id is not None:
                rl_kernels.print0(f"Warning: {len(unknown)} example(s) hold characters the tokenizer cannot represent "
                               f"(mapped to {tokenizer.unk_token}), e.g. row {unknown[0]}: "
                               f"{str(rows[unknown[0]]['prompt'])[:40]!r} -> {rows[unknown[0]]['completion'][:40]!r}")
            cut = sum(len(e["input_ids"]) > max_length for e in examples)
            if cut:
                rl_kernels.print0(f"Cut {cut} of {len(examples)} examples to {max_length} tokens (--max-length "
                               f"{args.max_length}, the model's context {context}): their completions lose their end.")
            return [{k: v[:max_length] for k, v in e.items()} for e in examples]

        train, held_out = encode(train_rows), encode(eval_rows)
        model = rl_kernels.wrap_model(model, args.strategy, device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rl_kernels.warmup_schedule(
            args.warmup_steps, total_steps, args.min_lr_ratio))
        start_step = 0
        if run.checkpoint:
            start_step = rl_kernels.load_checkpoint(run.checkpoint, model, optimizer, scheduler)["step"]
            rl_kernels.print0(f"Resuming from {run.checkpoint} at step {start_step}.")
        rl_kernels.save_args(args.out_dir, args)
        logger = rl_kernels.MetricsLogger(args.out_dir, resume_step=start_step if run.checkpoint else None,
                                       report_to=args.report_to, config=dataclasses.asdict(args))
        rl_kernels.print0(f"SFT: {len(train)} examples, {len(held_out)} held out, {total_steps} steps of "
                       f"{args.batch_size} on {world} x {device}; outputs in {args.out_dir}")

        def save(step, name=None):
            return rl_kernels.save_checkpoint(args.out_dir, step, model, tokenizer, optimizer, scheduler, name=name,
                                           extra={"samples_seen": step * args.batch_size})

        def run_eval() -> dict:
            return evaluate(model, tokenizer, held_out, eval_rows, args.max_new_tokens, args.batch_size)

        metrics, step, skipped = {}, start_step, 0
        if held_out and args.eval_every and start_step == 0:
            logger.log(0, run_eval())
        bar = rl_kernels.progress(range(start_step, total_steps), desc="sft", total=total_steps, initial=start_step)
        for step in bar:
            # ---- one optimizer step: this rank's share of the batch, in micro-batches ----
            tick = time.perf_counter()
            # Sorted by length, so each micro-batch pads to similar lengths (short direct answers together).
            batch = sorted((train[i] for i in rl_kernels.stream_indices(step * args.batch_size, args.batch_size,
                                                                      len(train), args.seed)),
                           key=lambda e: len(e["input_ids"]))
            mine = batch[dist_info.rank::world]
            num_tokens = sum(sum(e["loss_mask"][1:]) for e in batch)  # the whole batch's target tokens
            loss_sum = torch.zeros((), device=device)
            for m in range(args.grad_accum):
                input_ids, attention_mask, loss_mask = (t.to(device) for t in collate(
                    mine[m * micro_batch:(m + 1) * micro_batch], tokenizer.pad_token_id))
                # DDP/FSDP2 sync gradients once, in the last micro-batch's backward
                with rl_kernels.no_grad_sync(model, skip=m < args.grad_accum - 1):
                    logprobs = rl_kernels.token_logprobs(model, input_ids, attention_mask)  # (b, T-1)
                    loss = completion_loss(logprobs, loss_mask[:, 1:], num_tokens)
                    (loss * world).backward()  # DDP/FSDP average gradients over ranks; the sum is what we want
                loss_sum = loss_sum + loss.detach()
            lr = scheduler.get_last_lr()[0]
            values, stepped = rl_kernels.guarded_step(model, optimizer, args.max_grad_norm, {"loss": loss_sum})
            skipped += not stepped
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = {"train/loss": rl_kernels.all_reduce_mean(values["loss"]) * world, "train/lr": lr,
                       "train/grad_norm": values["grad_norm"] if args.max_grad_norm > 0 else 0.0,
                       "train/epoch": (step + 1) * args.batch_size / len(train), "train/skipped_updates": skipped,
                       "perf/tokens_per_s": sum(len(e["input_ids"]) for e in batch) / (time.perf_counter() - tick)}
            done = step + 1
            if held_out and (args.eval_every and done % args.eval_every == 0 or done == total_steps):
                metrics.update(run_eval())
            logger.log(done, metrics)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", **(
                {"acc": f"{metrics['eval/accuracy']:.2f}"} if "eval/accuracy" in metrics else {}))
            if args.save_every and done % args.save_every == 0 or done == total_steps:
                save(done)
            if run.should_stop():
                save(done)
                rl_kernels.print0(f"Stopped at step {done}; resume with --resume --out-dir {args.out_dir}.")
                logger.close()
                return finish(final_dir=None, stopped_at=done, signal=run.signal)

        # ---- the final model, and for the built-in tasks the toy world's numbers ----
        step = max(total_steps, start_step)
        final_dir = save(step, name="final")
        if dist_info.is_main and args.dataset in ("toy", "arithmetic"):
            toy_world_report(args, final_dir, tokenizer, device, logger, step, time.time() - t0)
        rl_kernels.barrier()
        logger.close()
    rl_kernels.print0(f"Done in {time.time() - t0:.0f} s; final model in {final_dir}")
    return finish(final_dir=final_dir, signal=run.signal)


def toy_world_report(args: Args, final_dir: str, tokenizer, device, logger, step: int, wall_s: float):
    """The toy world's numbers for a model trained on the built-in data (toy/ metrics and final/toy_stats.json), and
    the export: to --export-dir, or for the default toy recipe to toy/base when the model meets TOY_TARGETS."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).to(device)
    stats = evaluate_toy(plain, tokenizer, n=args.eval_size, seed=args.seed, max_new_tokens=args.max_new_tokens)
    logger.log(step, {f"toy/{k}": v for k, v in stats.items()})
    with open(os.path.join(final_dir, "toy_stats.json"), "w") as f:
        json.dump({**stats, "train_wall_s": round(wall_s), "torch": torch.__version__,
                   "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                   "args": dataclasses.asdict(args)}, f, indent=2)
    samples = stats["n_samples"] // stats["n_problems"]
    print(f"\nOn {stats['n_problems']} held-out problems, {samples} samples each at T=1:")
    print("\n".join(f"  {label:<38} {100 * stats[key]:5.1f}%" for label, key in TOY_TABLE))
    export_dir = args.export_dir
    if export_dir is None and args.dataset == "toy" and args.model is None and args.init_from_config == "toy":
        missed = toy_targets_missed(stats)
        export_dir = TOY_BASE if not missed else None
        if missed:
            print(f"Not exported to {TOY_BASE}: it misses the toy targets ({'; '.join(missed)}). "
                  "Pass --export-dir to write it anyway.")
    if export_dir:
        export_model(final_dir, export_dir)
        print(f"Exported the final model to {export_dir}")


if __name__ == "__main__":
    rl_kernels.run_cli(main, tyro.cli(Args))
