"""toy_world.py: the built-in toy world every script's defaults run in, so a newcomer sees the real thing work in
minutes on a laptop CPU (and tests run without a model hub).

What is here: a character-level tokenizer, the sizes of the toy base model and of its smaller student, the
synthetic corpus they are pretrained on (its recipe, TOY_RECIPE, and generators), what the base must show
(TOY_TARGETS), toy preference pairs for the reward model, and the toy evaluation (evaluate_toy). The models
themselves are ordinary transformers checkpoints in toy/base and toy/student, so every code path is the one real
models take; `rl_kernels.load_model("toy")` loads toy/base. Training lives in sft.py, which this file knows nothing of.

The toy world. A character-level tokenizer (printable ASCII, newline, and single tokens for the chat roles and the
four R1 tags) and a ~0.8M-parameter Qwen2, pretrained from random weights on the built-in arithmetic task
("7+3*4-2", 3-4 operands 1..9) rendered with the chat template, the user turn being the bare problem. Each
completion is either reasoning, "<think>3*4=12,7+12=19,19-2=17</think><answer>17</answer>", with a step that is
off by a little in some traces (the error propagates), or a direct "<answer>…</answer>", right only sometimes (else
the left-to-right value that ignores precedence, or off by a little). Reasoning is likelier on longer problems and
where a '*' follows another operator. So that each DeepSeek-R1 stage has something to act on (r1_pipeline.py), the
traces also carry, at the rates of TOY_RECIPE: a second language for numbers (letters a-j for 0-9, "bc" = 12; some
traces switch language halfway, and those traces err less often, the toy's premise for why RL on accuracy alone
drifts into mixing), messiness (a repeated step, junk, two steps merged into one long step), a summary before the
answer in half of them ("...</think>7+3*4-2=17<answer>"), and rare self-corrections ("3*4=13,wait,3*4=12"); and 15%
of the rows are general prompts (greetings, "make 12", "bigger: 7 or 12") with responses of mixed quality that
rlvr_rewards' hidden gold preference ranks. The result is a base model for R1-Zero: usually answers directly and is
often wrong, sometimes reasons, and is much better when it does.

The verification world (TOY_WORLDS, docs/aha.md): the same corpus, except that steps with a two-digit operand
slip (off by 1-3, the error propagating), and some traces check each such step on units digits ("12*7=84,2*7=14")
and write "wait" and redo the step exactly when the check fails, so that reflection has a function; three
controls change one thing each (no checks; "wait" at random; a redo wrong half the time). Their bases, toy/checks,
toy/no_checks, toy/random_wait and toy/wrong_redo, are continued pretraining of toy/base (toy/README.md has the
commands); trace_stats reads checks, waits and redos back out of samples.

Rebuilding the models (15-65 min each on one CPU core; sft.py's presets):
    OMP_NUM_THREADS=1 python sft.py --preset toy_base       # toy/base, exported only if it meets TOY_TARGETS
    OMP_NUM_THREADS=1 python sft.py --preset toy_student    # toy/student, which r1_pipeline.py distils into

Result: the committed toy/base (seed 1, 1300 steps of 128, torch 2.13 CPU; numbers in toy/base/toy_stats.json), on
256 held-out problems, greedy and 4 samples each at temperature 1 (`python toy_world.py` prints them again):
    greedy accuracy 35.2%      greedy answers that reason 22.7%      samples that reason 34.8%
    sample accuracy when reasoning 60.4%, when answering directly 9.3%
    reasoning samples with letters 25.3%, readable 46.3%; samples that reflect 1.9%; general gold win-rate 42.2%
Another machine or library version rounds differently and ends somewhat elsewhere: rebuilt on 2026-12-06 (a 2-core
AMD EPYC, transformers 5.25.0; 13-16 min) it reaches 34.0% greedy, within every TOY_TARGETS range, with bytes that
differ from the committed model's (docs/sft.md has the table). Wall time of the committed build: 65 min
(toy_stats.json's train_wall_s) with OMP_NUM_THREADS=1 on a 2-core CPU shared with heavier jobs.
"""

from __future__ import annotations

import json
import operator
import os
import random
import re
import sys

import torch

import rl_kernels as K
import rlvr_rewards as env

TOY_BASE = K.TOY_BASE  # toy/base: what rl_kernels.load_model("toy") loads
TOY_STUDENT = os.path.join(os.path.dirname(TOY_BASE), "student")
TOY_CHECKS = os.path.join(os.path.dirname(TOY_BASE), "checks")  # the verification world's base (r1_pipeline's)

# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model sizes
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


# ----------------------------------------------------------------------------------------------------------
# The corpus: its recipe and generators
# ----------------------------------------------------------------------------------------------------------

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

# The verification world (the "aha moment" with a function) and its controls: the TOY_RECIPE corpus, except that
# reasoning traces come from verification_trace instead of toy_trace. A *hard* step has an operand of two digits or
# more (operands, result >= 0: "7+12=19", "12*7=84", "23-5=18"); each hard step slips (its result off by 1-3, the
# error propagating) with probability hard_slip, in every language. In `check` of the reasoning traces every hard
# step is followed by a cheap visible check on units digits (check_step: "12*7=84,2*7=14" -- the 4s agree;
# "23-5=18,8+5=13" -- the inverse, whose 3 must be 23's) and its verdict, the expected units digit minus the
# written one (verdict_step: "4-4=0"; "12*7=82,2*7=14,4-2=2" fails), and then:
#   wait="check"   "wait" exactly when the check fails, and the step redone without the first pass's slip
#                  ("wait,12*7=84"), wrong with probability redo_error;
#   wait="random"  "wait" (and the redo) with probability hard_slip after any check, failed or not: reflection as
#                  form without function, like the staged "wait" of TOY_RECIPE.
# Worlds: "toy-checks" (the main world), and the controls "toy-no-checks" (a: no checks, so no wait),
# "toy-random-wait" (b) and "toy-wrong-redo" (c: the redo is wrong half the time). The staged reflection of
# TOY_RECIPE is off in all four, so every "wait" in them is the one the world defines.
VERIFICATION = dict(TOY_RECIPE, reflection=0.0, merged=0.0, hard_slip=0.25, check=0.15, wait="check",
                    redo_error=0.0)
TOY_WORLDS = {"toy": TOY_RECIPE, "toy-checks": VERIFICATION,
              "toy-no-checks": dict(VERIFICATION, check=0.0),
              "toy-random-wait": dict(VERIFICATION, wait="random"),
              "toy-wrong-redo": dict(VERIFICATION, redo_error=0.5)}
# A world where R1's cold start has a job (docs/r1_pipeline.md, bench/cold_start.py): the main world, except that the
# base rarely reasons (about 1 problem in 8, against 1 in 3) and its reasoning is messy, a repeated step and a junk
# item each in half the traces and a summary in 1 in 5, so the readable layout is the exception. Stage 2's rewards
# score the summary (summary_format) but neither junk nor repeats: RL from this base has to find reasoning on its
# own, and only accuracy can pay for clean traces, indirectly (it does: docs/r1_pipeline.md).
TOY_WORLDS["toy-messy"] = dict(VERIFICATION, reason_base=0.05, reason_per_operand=0.1, reason_precedence=0.1,
                               repeat=0.5, junk=0.5, summary=0.2)
# The first phase of the bases' build (toy/README.md): the same worlds with checks in 60% of reasoning traces, so a
# 0.8M-parameter model sees enough failed checks to learn the trigger; the second phase makes checks rare again.
TOY_WORLDS.update({f"{name}-often": dict(recipe, check=0.6 if recipe["check"] else 0.0)
                   for name, recipe in list(TOY_WORLDS.items()) if name != "toy"})
SLIPS = (-3, -2, -1, 1, 2, 3)


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


def _language(rng: random.Random, recipe: dict) -> str:
    roll = rng.random()
    return "letters" if roll < recipe["letters"] else "mixed" if roll < recipe["letters"] + recipe["mixed"] \
        else "digits"


def _finish(prompt: str, items: list[list], answer: int, language: str, rng: random.Random, recipe: dict) -> str:
    """The rest of a reasoning completion from its items: messiness (a repeated step, junk), the language(s) the
    numbers are written in, the think block, the summary and the answer."""
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
        return "".join((env.to_letters(x) if lang == "letters" else str(x)) if isinstance(x, int) else x
                       for x in item)

    reasoning = ",".join(render(item, first if i < switch else other) for i, item in enumerate(items))
    summary = f"{prompt}={answer}" if rng.random() < recipe["summary"] else ""
    return f"<think>{reasoning}</think>{summary}<answer>{answer}</answer>"


def toy_trace(prompt: str, rng: random.Random, recipe: dict = TOY_RECIPE) -> str:
    """A reasoning completion of the toy corpus (see TOY_RECIPE): language, errors, reflection, messiness, summary."""
    operands, ops = parse_arithmetic(prompt)
    language = _language(rng, recipe)
    reflect = rng.random() < recipe["reflection"]
    error_step, error = -1, 0
    if not reflect and rng.random() < recipe["step_error" if language == "digits" else "other_language_step_error"]:
        error_step, error = rng.randrange(len(ops)), rng.choice([-3, -2, -1, 1, 2, 3])
    steps = [list(env.parse_step(s)) for s in arithmetic_trace(operands, ops, error_step, error)]
    answer = steps[-1][3]
    items = [[a, op, b, "=", c] for a, op, b, c in steps]
    if reflect:  # a step written wrong, noticed, redone
        i = rng.randrange(len(items))
        items[i:i] = [items[i][:4] + [items[i][4] + rng.choice([-2, -1, 1, 2])], ["wait"]]
    elif rng.random() < recipe["merged"]:
        items = _merge(items)
    return _finish(prompt, items, answer, language, rng, recipe)


is_hard, check_step, verdict_step = env.is_hard, env.check_step, env.verdict_step  # hard steps, checks (rlvr_rewards)


def _off(value: int, slip: int) -> int:
    """value + slip, kept >= 0 (a slip the other way when it would cross zero)."""
    return value + slip if value + slip >= 0 else value - slip


def verification_trace(prompt: str, rng: random.Random, recipe: dict = VERIFICATION) -> str:
    """A reasoning completion of the verification world (VERIFICATION, TOY_WORLDS): slips on hard steps that
    propagate, and in `check` of the traces a check after every hard step, then "wait" and a redo when the world
    says so (on a failed check, or at random), right unless the world's redo_error strikes."""
    operands, ops = parse_arithmetic(prompt)
    language = _language(rng, recipe)
    checks = rng.random() < recipe["check"]
    error_step, error = -1, 0  # TOY_RECIPE's premise: digit traces err more (on any step)
    if rng.random() < recipe["step_error" if language == "digits" else "other_language_step_error"]:
        error_step, error = rng.randrange(len(ops)), rng.choice(SLIPS)
    nums, pending, items, value = list(operands), list(ops), [], 0
    for k in range(len(ops)):
        i = pending.index("*") if "*" in pending else 0
        a, b, op = nums[i], nums[i + 1], pending.pop(i)
        hard = is_hard(a, op, b)
        slip = error if k == error_step else rng.choice(SLIPS) if hard and rng.random() < recipe["hard_slip"] else 0
        value = _off(OPS[op](a, b), slip) if hard else OPS[op](a, b) + slip
        items.append([a, op, b, "=", value])
        if checks and hard:
            check, passed = check_step(a, op, b, value)
            items += [check, verdict_step(a, op, b, value)]
            if not passed if recipe["wait"] == "check" else rng.random() < recipe["hard_slip"]:
                slip = rng.choice(SLIPS) if rng.random() < recipe["redo_error"] else 0
                value = _off(OPS[op](a, b), slip)
                items += [["wait"], [a, op, b, "=", value]]  # the step redone, without the first pass's slip
        nums[i:i + 2] = [value]
    return _finish(prompt, items, value, language, rng, recipe)


def readable_trace(prompt: str, reflect_at: int | None = None, checks: bool = False) -> str:
    """The correct trace in R1's readable format, <think>3*4=12,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>;
    reflect_at: step i is first written off by one, then "wait", then redone (a staged self-correction); checks:
    every hard step followed by its units-digit check (the verification world's, check_step: 7+12=19,7+2=9)."""
    steps = arithmetic_trace(*parse_arithmetic(prompt))
    answer = steps[-1].split("=")[1]
    if checks:
        checked = []
        for step in steps:
            checked.append(step)
            parsed = env.parse_step(step)
            if is_hard(*parsed[:3]):
                checked += ["{}{}{}={}".format(*[x for x in item if x != "="])
                            for item in (check_step(*parsed)[0], verdict_step(*parsed))]
        steps = checked
    if reflect_at is not None:
        a, op, b, c = env.parse_step(steps[reflect_at])
        steps[reflect_at:reflect_at] = [f"{a}{op}{b}={c + 1}", "wait"]
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
    kind, roll = env.general_kind(prompt), rng.random()
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
        return (verification_trace if "hard_slip" in recipe else toy_trace)(prompt, rng, recipe)
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


def toy_corpus(n: int, seed: int, split: str = "train", reasoning_only: bool = False, world: str = "toy") -> list[dict]:
    """n rows {prompt: [user message], completion, answer} over distinct arithmetic problems of the split, plus (not
    reasoning_only) general-prompt rows, `general` of the total, drawn kind by kind with replacement.
    reasoning_only: clean readable traces only (the 'arithmetic' dataset, for an R1-style cold start); world: a
    corpus of TOY_WORLDS ("toy": TOY_RECIPE's, the toy base's; "toy-checks" and its controls)."""
    recipe, rng = TOY_WORLDS[world], random.Random(seed)
    rows = []
    for row in env.make_dataset("arithmetic", split=split, n=n, seed=seed):
        completion = readable_trace(row["prompt"]) if reasoning_only else toy_completion(row["prompt"], rng, recipe)
        rows.append({"prompt": [{"role": "user", "content": row["prompt"]}], "completion": completion,
                     "answer": row["answer"]})
    if not reasoning_only:
        for _ in range(round(n * recipe["general"] / (1 - recipe["general"]))):
            kind = rng.choice(("greeting", "expression", "comparison"))
            prompt = rng.choice(env.general_prompts(kind, split))
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completion": toy_general_completion(prompt, rng, recipe), "answer": None})
    return rows


# ----------------------------------------------------------------------------------------------------------
# The toy evaluation
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list, *, temperature: float = 0.0, num_samples: int = 1,
                         max_new_tokens: int = 48, batch_size: int = 256, seed: int = 0) -> list[str]:
    """Completions (prompt-major, num_samples per prompt) for plain or chat prompts, as SFT renders them (a string
    as it is, messages through the chat template), sampled from one torch.Generator seeded with `seed`."""
    device = next(K.unwrap(model).parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    texts = []
    for start in range(0, len(prompts), batch_size):
        rows = [{"prompt": p} for p in prompts[start:start + batch_size]]
        texts += env.sample(model, tokenizer, rows, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                     temperature=temperature, template="plain", generator=generator).completions
    return texts


# trace_stats' measures that evaluate_toy reports (on its T=1 samples).
REFLECTION_KEYS = ("check_share", "wait_share", "p_wait_wrong_step", "p_wait_right_step", "p_wait_failed_check",
                   "p_wait_passed_check", "p_correct_wait", "p_correct_wrong_no_wait", "reasoning_length",
                   "accuracy_hard2")


def evaluate_toy(model, tokenizer, n: int = 256, seed: int = 1, samples: int = 4, max_new_tokens: int = 64) -> dict:
    """The toy world's numbers on n held-out arithmetic problems (rlvr_rewards test split drawn with `seed`; the
    defaults are the problems of toy/base/toy_stats.json) and n/4 held-out general prompts, bare prompts in the chat
    template. Returns floats:
      greedy_accuracy           accuracy of the greedy completion
      greedy_reasoning_share    share of greedy completions that reason (rlvr_rewards.reasons: a <think> block)
      reasoning_share           share of temperature-1 samples (`samples` per problem) that reason
      sample_accuracy           accuracy of those samples
      accuracy_with_reasoning   accuracy of the samples that reason (nan if none)
      accuracy_without_reasoning  accuracy of the samples that answer directly (nan if none)
      reasoning_gap             accuracy_with_reasoning - accuracy_without_reasoning
      mixed_language_share      share of the reasoning samples with a number written in letters (mixed or all)
      readable_share            share of the reasoning samples that are readable (rlvr_rewards.is_readable)
      reflection_share          share of all samples with a self-correction ("wait")
      general_gold_win_rate     greedy responses to general prompts against their references (gold preference)
      and REFLECTION_KEYS       trace_stats of the samples (the verification world's checks and waits)
    plus n_problems and n_samples."""
    rows = env.make_dataset("arithmetic", split="test", n=n, seed=seed)
    prompts = [[{"role": "user", "content": row["prompt"]}] for row in rows]
    answers = [row["answer"] for row in rows]
    greedy = generate_completions(model, tokenizer, prompts, temperature=0.0, max_new_tokens=max_new_tokens)
    sampled = generate_completions(model, tokenizer, prompts, temperature=1.0, num_samples=samples,
                                   max_new_tokens=max_new_tokens, seed=seed)
    greedy_correct = env.accuracy_reward(greedy, answer=answers)
    sample_correct = env.accuracy_reward(sampled, answer=[a for a in answers for _ in range(samples)])
    reasons = [env.reasons(c) for c in sampled]
    general = env.make_dataset("general", split="test", n=max(1, n // 4), seed=seed)
    general_texts = generate_completions(model, tokenizer, [[{"role": "user", "content": r["prompt"]}]
                                                            for r in general], max_new_tokens=max_new_tokens)

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    with_r = [c for c, r in zip(sample_correct, reasons) if r]
    without_r = [c for c, r in zip(sample_correct, reasons) if not r]
    traces = [c for c, r in zip(sampled, reasons) if r]
    stats = {"greedy_accuracy": mean(greedy_correct), "greedy_reasoning_share": mean([env.reasons(c) for c in greedy]),
             "reasoning_share": mean(reasons), "sample_accuracy": mean(sample_correct),
             "accuracy_with_reasoning": mean(with_r), "accuracy_without_reasoning": mean(without_r),
             "mixed_language_share": mean([v is not None and v < 1.0 for v in env.language_consistency_reward(
                 traces, language="digits")]),
             "readable_share": mean([env.is_readable(c) for c in traces]),
             "reflection_share": mean([env.reflects(c) for c in sampled]),
             "general_gold_win_rate": mean(env.gold_win_reward(
                 general_texts, prompt=[r["prompt"] for r in general], reference=[r["reference"] for r in general]))}
    stats["reasoning_gap"] = stats["accuracy_with_reasoning"] - stats["accuracy_without_reasoning"]
    reflection = trace_stats(sampled, [a for a in answers for _ in range(samples)],
                             [row["prompt"] for row in rows for _ in range(samples)])
    stats.update({k: reflection[k] for k in REFLECTION_KEYS})
    return {**stats, "n_problems": n, "n_samples": n * samples}


def read_trace(text: str) -> list[dict]:
    """The think block of a response, item by item, as the verification world reads it: each main step (the
    problem's evaluation, first pass) {"step": (a, op, b, c), "wrong": c != a op b, "hard": is_hard, "check": None
    or whether its check passed (the item after a hard step that is check_step's operands; its verdict, if written,
    is skipped), "wait": whether "wait" follows (after the check), "redo_right": None or whether the step rewritten
    after the wait is right}. Items that are neither steps, checks, waits nor redos (junk, long steps) are skipped.
    A next step that happens to have a check's operands is read as a check (rarely: "12-9=5,5+9=14")."""
    items = text.partition("<think>")[2].partition("</think>")[0].split(",")
    steps, i = [], 0
    while i < len(items):
        parsed = env.parse_step(items[i])
        i += 1
        if parsed is None:
            continue
        a, op, b, c = parsed
        if None in parsed:
            continue
        hard = is_hard(a, op, b)
        entry = {"step": parsed, "wrong": c != OPS[op](a, b), "hard": hard, "check": None, "wait": False,
                 "redo_right": None}
        if hard and i < len(items) and env.is_check_of(parsed, env.parse_step(items[i])):
            r = env.parse_step(items[i])[3]
            entry["check"] = r is not None and r % 10 == (a if op == "-" else c) % 10
            i += 1
            if i < len(items) and env.is_check_of(parsed, env.parse_step(items[i]), verdict=True):
                i += 1  # the verdict ("4-2=2")
        while i < len(items) and env.parse_step(items[i]) is None and items[i].strip() != "wait":
            i += 1  # junk between a step and its "wait"
        if i < len(items) and items[i].strip() == "wait":
            entry["wait"], i = True, i + 1
            redo = env.parse_step(items[i]) if i < len(items) else None
            if redo is not None and None not in redo and tuple(redo[:3]) == (a, op, b):  # the step rewritten
                entry["redo_right"], i = redo[3] == OPS[op](a, b), i + 1
        steps.append(entry)
    return steps


def hard_steps(prompt: str) -> int:
    """How many steps of the problem's correct evaluation are hard (is_hard)."""
    operands, ops = parse_arithmetic(prompt)
    return sum(is_hard(*env.parse_step(s)[:3]) for s in arithmetic_trace(operands, ops))


def token_count(text: str) -> int:
    """Tokens of a toy response: one per character, the four R1 tags one each."""
    return len(re.sub("|".join(map(re.escape, TOY_TAGS)), "#", text))


def trace_stats(completions: list[str], answers: list | None, prompts: list[str], correct: list | None = None) -> dict:
    """Reflection as the verification world defines it, measured on samples (prompt-aligned lists; prompts are
    the bare problems; correct: the verdicts, when known, instead of answers). Returns floats (nan where a
    conditioning set is empty):
      reasoning_share             samples that reason (a think block)
      check_share, wait_share     reasoning samples with a check, with a "wait"
      check_rate                  hard first-pass steps followed by their check
      p_wait_wrong_step           P(wait | a first-pass step is wrong), and p_wait_right_step beside it
      p_wait_failed_check         P(wait | the check failed), and p_wait_passed_check
      p_redo_right                P(the redo's value is right | wait)
      p_correct_wait              P(answer right | the sample waits)
      p_correct_wrong_no_wait     P(answer right | a first-pass step is wrong and the sample never waits)
      p_correct_reasoning         accuracy of the reasoning samples
      reasoning_length            mean tokens of the reasoning samples (token_count)
      accuracy, accuracy_hard2    accuracy of all samples, and on problems with >= 2 hard steps
    and n_samples, n_reasoning."""
    correct = [float(c) for c in correct] if correct is not None else env.accuracy_reward(completions, answer=answers)
    reasoning, hard2 = [], []
    steps_all = []
    for text, ok, prompt in zip(completions, correct, prompts):
        if hard_steps(prompt) >= 2:
            hard2.append(ok)
        if env.reasons(text):
            steps = read_trace(text)
            reasoning.append((text, ok, steps))
            steps_all += steps

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    waits = [any(s["wait"] for s in steps) for _, _, steps in reasoning]
    wrong = [any(s["wrong"] for s in steps) for _, _, steps in reasoning]
    return {
        "reasoning_share": mean(env.reasons(t) for t in completions),
        "check_share": mean(any(s["check"] is not None for s in steps) for _, _, steps in reasoning),
        "wait_share": mean(waits),
        "check_rate": mean(s["check"] is not None for s in steps_all if s["hard"]),
        "p_wait_wrong_step": mean(s["wait"] for s in steps_all if s["wrong"]),
        "p_wait_right_step": mean(s["wait"] for s in steps_all if not s["wrong"]),
        "p_wait_failed_check": mean(s["wait"] for s in steps_all if s["check"] is False),
        "p_wait_passed_check": mean(s["wait"] for s in steps_all if s["check"] is True),
        "p_redo_right": mean(s["redo_right"] for s in steps_all if s["redo_right"] is not None),
        "p_correct_wait": mean(ok for (_, ok, _), w in zip(reasoning, waits) if w),
        "p_correct_wrong_no_wait": mean(ok for (_, ok, _), w, x in zip(reasoning, waits, wrong) if x and not w),
        "p_correct_reasoning": mean(ok for _, ok, _ in reasoning),
        "reasoning_length": mean(token_count(t) for t, _, _ in reasoning),
        "accuracy": mean(correct), "accuracy_hard2": mean(hard2),
        "n_samples": len(completions), "n_reasoning": len(reasoning)}


def toy_targets_missed(stats: dict) -> list[str]:
    """The TOY_TARGETS that stats miss, as readable strings (empty: all met)."""
    return [f"{k}={stats.get(k, float('nan')):.3f} not in [{lo}, {hi}]" for k, (lo, hi) in TOY_TARGETS.items()
            if not lo <= stats.get(k, float("nan")) <= hi]


# The rows of the table print_table shows: (label, evaluate_toy key).
TOY_TABLE = [("greedy accuracy", "greedy_accuracy"), ("greedy answers that reason", "greedy_reasoning_share"),
             ("T=1 samples that reason", "reasoning_share"), ("T=1 accuracy", "sample_accuracy"),
             ("T=1 accuracy when reasoning", "accuracy_with_reasoning"),
             ("T=1 accuracy when answering directly", "accuracy_without_reasoning"),
             ("T=1 traces that mix languages", "mixed_language_share"),
             ("T=1 traces that are readable", "readable_share"), ("T=1 samples that reflect", "reflection_share"),
             ("T=1 traces that check (units digits)", "check_share"), ("T=1 traces that wait", "wait_share"),
             ("T=1 P(wait | wrong step)", "p_wait_wrong_step"), ("T=1 P(wait | failed check)", "p_wait_failed_check"),
             ("T=1 P(correct | wait)", "p_correct_wait"),
             ("general prompts: gold win-rate (greedy)", "general_gold_win_rate")]


def print_table(stats: dict, before: dict | None = None):
    """The toy world's numbers (evaluate_toy) as a table, beside those of the model a run started from (before)."""
    samples = stats["n_samples"] // stats["n_problems"]
    print(f"\nOn {stats['n_problems']} held-out problems, {samples} samples each at T=1:")
    if before:
        print(f"  {'':<38} {'before':>6} {'after':>6}")
    for label, key in TOY_TABLE:
        was = f" {100 * before[key]:5.1f}%" if before and key in before else ""
        print(f"  {label:<38}{was} {100 * stats[key]:5.1f}%")


# ----------------------------------------------------------------------------------------------------------
# Toy preference pairs (rlhf_reward_model.py's default data)
# ----------------------------------------------------------------------------------------------------------


def _toy_response(steps: list[str], answer: str) -> str:
    return f"<think>{','.join(steps)}</think><answer>{answer}</answer>"


def toy_pair(row: dict, kind: str, rng: random.Random) -> dict:
    """One toy preference pair from an arithmetic row; kind 'correct', 'format' or 'concise'. The chosen side is
    the correct reasoning trace in R1's template, <think>3*4=12,7+12=19,19-2=17</think><answer>17</answer>."""
    steps, answer = row["steps"], row["answer"]
    chosen, body = _toy_response(steps, answer), f"<think>{','.join(steps)}</think>"
    if kind == "correct":   # a wrong answer that ignores the (correct) reasoning before it
        rejected = _toy_response(steps, str(int(answer) + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])))
    elif kind == "format":   # the same correct answer, outside the template
        rejected = rng.choice([f"{body}{answer}", f"{body}<answer>{answer}", f"<answer>{answer}</answer>{body}",
                               f"{body}<answer>{answer}</answer><answer>{answer}</answer>",
                               f"<think>{','.join(steps)}<answer>{answer}</answer>",
                               f"{body}<answer>{answer}</answer>{answer}", f"<answer>{answer}</answer>", answer])
    else:   # concise: the same correct reasoning, padded by repeating steps
        repeats = [s for s in steps for _ in range(rng.randint(1, 3))]
        repeats = repeats if len(repeats) > len(steps) else steps * rng.randint(2, 3)
        rejected = _toy_response(repeats, answer)
    return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "kind": kind}


def toy_preference_pairs(split: str, num_prompts: int, seed: int) -> list[dict]:
    """Three pairs (correct, format, concise) for each arithmetic prompt of the task's train or test split."""
    rows = env.make_dataset("arithmetic", split=split, n=num_prompts, seed=seed)
    rng = random.Random(f"toy-preferences-{split}-{seed}")
    return [toy_pair(row, kind, rng) for row in rows for kind in ("correct", "format", "concise")]


if __name__ == "__main__":
    # python toy_world.py [MODEL_DIR]: the toy world's numbers of a model (default toy/base), to compare with its
    # toy_stats.json.
    from transformers import AutoModelForCausalLM

    path = sys.argv[1] if len(sys.argv) > 1 else TOY_BASE
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stats = evaluate_toy(model, K.load_tokenizer(path))
    print_table(stats)
    print(json.dumps(stats, indent=2))
