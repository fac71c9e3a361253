"""rlvr_rewards.py: the environment every RL script shares. Verifiable rewards for RL on reasoning (RLVR), the
built-in tasks they verify, and the harness around them: one JSONL reader (read_jsonl), prompt rendering
(render_prompt: chat template or R1's text template), sampling a rollout (sample -> Rollout), resolving and
combining rewards and scoring a rollout (score, rollout_metrics), and evaluating a policy on held-out rows
(evaluate: greedy accuracy, pass@1 over k samples, lengths, reasoning share). Imports rl_kernels and sandbox.

A reward is a plain function of the same shape as TRL's reward functions, so users can bring theirs:

    fn(completions: list[str], **columns) -> list[float | None]

`completions` are the model's texts; every other field of the dataset row arrives as a keyword list aligned
with them (`answer=[...]`, `tests=[...]`, `target_length=[...]`); unknown columns are ignored. None means
"does not apply to this sample" (e.g. no gold answer). No reward raises on any text a model can write, and
every call is bounded in time (a per-sample timeout wherever the work is not linear in the text). code_reward
raises RuntimeError where no sandbox works on the machine, rather than score every sample 0.

Rewards (y a completion, |y| its length, 1[c] = 1 if its answer is correct else 0):
  accuracy_reward        the final answer (<answer>…</answer>, \\boxed{…}, GSM8K "#### n") against the gold one by
                         math-verify's equivalence (\\frac{1}{2} = 0.5 = 1/2). Styles: binary {correct 1, wrong 0,
                         unparseable 0} (DeepSeek-R1), signed {+1, -1, -1} (DAPO), logic_rl {+2, -1.5, -2}
                         (Logic-RL). Two plain numbers are compared as Fractions without math-verify (same
                         verdicts, hundreds of times faster, except that its 6-decimal rounding alone never matches
                         a gold under 0.01: 0.0000001 ≠ 2.5e-7, which needs 4 significant digits); the rest go to
                         math-verify worker processes with a timeout per sample (a timeout counts as wrong). A
                         price is its number (\\$18.90, $ 5, 5 dollars). A gold in words ("forty two", "Paris":
                         letters, spaces, hyphens, a word of 3+ letters), or one math-verify cannot parse, is
                         compared as text, case and spacing aside (math-verify would read words as products of
                         letters, so "two forty" = "forty two").
                         A gold given as a number is its exact decimal text (1e-05 -> 0.00001, never "e - 5"), and
                         so is a gold or answer written in exponent form ("2.5e-7", "\\boxed{1E-05}"; "e-5", with no
                         digit before the e, stays Euler's e); NaN or inf is no gold.
                         A \\boxed{} inside <think> counts when it is the last box and there is no <answer> block.
  format_reward          R1 template <think>…</think><answer>…</answer>: 1 if it holds else 0. strict: exactly one
                         think block then one answer block, only whitespace around (newlines optional, nothing
                         after </answer>); soft: a think block followed anywhere later by an answer block.
  tag_count_reward       0.25 for each of the four tags that appears exactly once.
  code_reward            the fraction of test statements that pass when run after the completion's code in the
                         sandbox below (1 or 0 with all_or_nothing=True).
  language_consistency   the share of the reasoning's words (think block, else the whole text) written in the
                         target language's script (DeepSeek-R1); None when there are no words. The toy world's
                         codes "digits" and "letters" count its number words ("12" vs "bc").
  summary_format         R1's format after its cold start, <think>…</think>summary<answer>…</answer> with a
                         non-blank summary: 1 or 0; None on rows whose answer column is None (general prompts).
  harmlessness           -1 for a banned word anywhere in the response, reasoning included, else 0 (toy world).
  gold_win               the toy world's hidden gold preference against the row's reference response: 1 / 0.5 / 0
                         (a measurement; log it with weight 0).
  lcpo_exact_reward      r = 1[c] - α·|n_target - |y||                 α = 3e-4          (L1, LCPO-Exact)
  lcpo_max_reward        r = 1[c]·clip(α·(n_target - |y|) + δ, 0, 1)   α = 3e-4, δ = 0.5 (L1, LCPO-Max)
  kimi_length_reward     λ_i = 0.5 - (|y_i| - min_len)/(max_len - min_len) within each group of G samples;
                         correct → λ_i, wrong → min(0, λ_i); 0 when the group's lengths are all equal (Kimi k1.5)
  cosine_length_reward   CosFn(t, T, a, b) = a + ½(b - a)(1 + cos(πt/T)), t = |y|, T = max_length: correct from
                         2 at t=0 to 1 at T, wrong from -10 to 0, -10 past T (Demystifying Long CoT);
                         COSINE_OPEN_R1 holds open-r1's correct 1→0.5, wrong -1→-0.5, T = 1000 characters, held
                         at the value of T past it (as TRL; open-r1's own climbs back up, cos being periodic).
  soft_overlong_reward   0 if |y| ≤ L_max - L_cache; ((L_max - L_cache) - |y|)/L_cache in the buffer; -1 past
                         L_max (DAPO: L_max 20480, L_cache 4096 tokens).
  repetition_penalty     (1 - unique n-grams / n-grams)·p_max, p_max ≤ 0, 0.0 when nothing repeats; n = 3,
                         p_max = -1 (open-r1's recipe; Demystifying Long CoT used -0.05 per repeated token of
                         40-grams). Words: split on whitespace, a CJK or kana character one word, case-sensitive
                         as tokens are (open-r1 lowercases and segments Chinese with jieba; TRL counts token ids).
  countdown_reward       1 if the answer expression uses only the given numbers, each at most once (TinyZero:
                         exactly once; use_all_numbers=True), with + - * / and parentheses, and equals the target
                         exactly; else 0 (TinyZero: 0.1 for a wrong but well-formed one). Parsed with ast, never eval'd.
Lengths: the papers count tokens; here a length is characters unless `tokenizer=` is given (then its tokens)
or `completion_lengths=[...]` is (the trainer already knows its token counts: the cheapest choice).

combine_rewards([(fn, weight), ...], completions, **columns) sums weight·reward per sample, a None adding 0,
and returns each reward's values by name for logging. On the command line a user's own reward is named
`module:function` or `path/to/file.py:function` (load_reward_fn, get_reward), a built-in by its REWARDS key.

tests/test_reward_conformance.py holds TRL's and open-r1's test cases and our edge cases as a table (their score,
ours, and why they differ): TRL and open-r1 read only LaTeX answers and skip a gold math-verify cannot parse (None).

The code sandbox and the math-verify worker processes live in sandbox.py, whose docstring states what
they guarantee and what they do not.

Built-in tasks, make_dataset(name, split, n, seed); a problem is held out ("test") when the md5 of its
prompt is 0 mod 5, so the splits never share a problem:
  arithmetic  prompt "7+3*4-2" (3-4 operands 1..9, + - * with precedence), answer "17", steps ["3*4=12",
              "7+12=19", "19-2=17"] (the toy model's reasoning traces); checked by accuracy_reward.
  countdown   prompt "3,5,7->22" (the numbers, then the target), numbers, target, answer one solution;
              checked by countdown_reward.
  code        prompt "Write f(x) returning x+3.", answer a reference solution, tests (assert statements);
              checked by code_reward.
  general     the toy world's non-reasoning prompts: greetings ("hello, i am ana"), "make 12" (write an expression
              equal to 12), "bigger: 7 or 12"; answer None, kind, and a reference response of middling quality.
              No verifier: a hidden gold preference (gold_score) ranks responses, and gold_win_reward measures
              a response against the reference. r1_pipeline.py trains a reward model on pairs it labels.

The toy world (section "the toy world"): numbers in reasoning have two languages, digits and letters a-j
(language_consistency_reward with language="digits" measures mixing); readability_problems checks a trace
against R1's readable format <think>3*4=12,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer> (step grammar,
no repeated step, no junk, a summary); reflects() spots a self-correction ("wait"); harmful() a banned word.
"""

import ast
import collections
import dataclasses
import decimal
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import random
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Optional

import torch

import rl_kernels as K
import sandbox

# ------------------------------------------------------------------------------------------------ extraction


def _last_boxed(text: str, max_tries: int = 3, window: int = 10_000) -> str | None:
    """Content of the last balanced \\boxed{…}: a brace count, so nesting works and nothing backtracks."""
    end = len(text)
    for _ in range(max_tries):  # a box cut off by the length limit falls back to an earlier one, a few times
        start = text.rfind("\\boxed{", 0, end)
        if start == -1:
            return None
        depth, i = 0, start + 6
        for brace in re.finditer(r"[{}]", text[i : i + window]):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                return text[i + 1 : i + brace.start()].strip() or None
        end = start
    return None


def _answer_block(text: str) -> str | None:
    close = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, close) if close != -1 else -1
    return text[start + len("<answer>") : close] if start != -1 else None


def extract_answer(text: str, fallback_last_number: bool = False) -> str | None:
    """The final answer: the last <answer>…</answer> (its \\boxed{} if it has one), else the last \\boxed{…},
    else GSM8K's "#### n" line, else (only with fallback_last_number) the last number; None if there is none."""
    if not isinstance(text, str):
        return None
    block = _answer_block(text)
    if block is not None:
        return _last_boxed(block) or block.strip() or None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = text.rfind("####")
    if hashes != -1:
        line = text[hashes + 4 :].partition("\n")[0].strip()
        if line:
            return line
    numbers = re.findall(r"-?\d+(?:\.\d+)?(?:/\d+)?", text) if fallback_last_number else []
    return numbers[-1] if numbers else None


# ------------------------------------------------------------------------------------------------ accuracy

_NUMBER = re.compile(r"([+-]?)(?:([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(\.[0-9]*)?|(\.[0-9]+)|([0-9]+)/([0-9]+))\s*(\\?%)?")


# A price: a dollar sign ($ or \$) before a plain number, or the word "dollars" after it. math-verify reads \$ as a
# math delimiter and "dollars" as a product of variables, so \$18.90 would never equal 18.90.
_PRICE = re.compile(r"(?P<sign>[+-]?)\s*(?P<dollar>\\?\$)?\s*(?P<number>[^\s$\\]+?)\s*(?P<word>dollars?)?",
                    re.IGNORECASE)


def _unwrap(answer: str, max_layers: int = 100) -> str:
    """Strip redundant outer brackets, "((17))" → "17", while the outer pair encloses everything and holds no
    top-level comma ("(1, 2)" is a pair, not a wrapped number). A model can wrap a correct answer in dozens of
    them, which math-verify takes seconds to parse."""
    for _ in range(max_layers):
        if len(answer) < 2 or (answer[0], answer[-1]) not in (("(", ")"), ("{", "}"), ("[", "]")):
            return answer
        depth = 0
        for i, char in enumerate(answer[:-1]):
            depth += 1 if char in "({[" else -1 if char in ")}]" else 0
            if depth == 0 or (depth == 1 and char == ","):
                return answer  # the first bracket closes early, or a comma makes it a tuple
        answer = answer[1:-1].strip()
    return answer


def _clean(answer: str) -> str:
    """Drop what never changes an answer: outer spaces, surrounding $…$, a sentence's final period, redundant
    outer brackets, and the currency of a price ("\\$1,000", "-$5", "5 dollars" → "1,000", "-5", "5": they
    compare as numbers)."""
    answer = _unwrap(answer.strip().strip("$").strip().removesuffix(".").strip())
    price = _PRICE.fullmatch(answer) if len(answer) <= 60 else None
    if price and (price["dollar"] or price["word"]) and _plain_number(price["sign"] + price["number"]):
        return price["sign"] + price["number"]
    return answer


def _plain_number(text: str) -> tuple[Fraction, bool, bool] | None:
    """(value, written with a decimal point, has %) of an int, decimal, a/b or 1,000; None for anything else."""
    match = _NUMBER.fullmatch(text) if len(text) <= 1100 else None  # far under int()'s 4,300 digits; 1e-999 fits
    if match is None:
        return None
    sign, whole, decimals, bare_decimals, numerator, denominator, percent = match.groups()
    if numerator is not None:
        if int(denominator) == 0:
            return None
        value = Fraction(int(numerator), int(denominator))
    else:
        value = Fraction((whole or "0").replace(",", "") + (decimals or bare_decimals or "").rstrip("."))
    return (-value if sign == "-" else value), bool(decimals or bare_decimals), bool(percent)


# math-verify counts a decimal equal to a number it matches to 6 decimal places (1/3 = 0.333333), which says nothing
# of a gold under 0.01: 0.0000001, -0.0000002 and 0.0000004 would all equal 2.5e-7. A match by rounding also needs
# the answer within this tolerance of the gold, relatively (4 significant digits); from 0.01 up the 6 decimals are
# the stricter test, so ordinary numbers keep math-verify's verdicts.
_RELATIVE_TOLERANCE = Fraction(1, 10_000)


def _numeric_verdict(pred: str, gold: str) -> bool | None:
    """Exact Fraction comparison of two plain numbers with math-verify's conventions (a percentage also matches
    its value/100); None, i.e. ask math-verify, where its 6-decimal rounding of decimals might decide and the answer
    is within _RELATIVE_TOLERANCE of the gold; a gold under 0.01 is not matched by rounding alone."""
    p, g = _plain_number(pred), _plain_number(gold)
    if p is None or g is None:
        return None
    pred_values = {p[0], p[0] / 100} if p[2] else {p[0]}
    gold_values = {g[0], g[0] / 100} if g[2] else {g[0]}
    if pred_values & gold_values:
        return True
    if (p[1] or g[1]) and any(round(a, 6) == round(b, 6) and abs(a - b) <= _RELATIVE_TOLERANCE * abs(b)
                              for a in pred_values for b in gold_values):
        return None
    return False




# A decimal number in exponent form, "1e-05", "2.5E+7": math-verify reads it as Euler's e (1e-05 = e - 5), so it is
# rewritten as its decimal text first. Three exponent digits at most (1e999999999 would be a billion of them).
_EXPONENT = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?[eE][+-]?[0-9]{1,3}")


def _exponent_free(answer: str) -> str:
    """An answer in exponent form as its exact decimal text, "2.5e-7" -> "0.00000025", "1E+3" -> "1000"; any other
    answer as it is ("e-5", with no digit before the e, stays Euler's e minus 5)."""
    return number_text(decimal.Decimal(answer)) if _EXPONENT.fullmatch(answer) else answer


def _as_latex(answer: str) -> str:
    delimited = "$" in answer.replace("\\$", "")  # an escaped \$ is a dollar sign, not a math delimiter
    return answer if "\\boxed" in answer or delimited else "\\boxed{" + answer + "}"  # math-verify's anchor


def _is_words(gold: str) -> bool:
    """A gold written in words ("forty two", "Paris", "yes"): letters, spaces, hyphens and apostrophes, with a word
    of three letters or more. math-verify would read it as a product of one-letter variables, under which
    "two forty" equals "forty two"; "inf" and "infinity" are maths to it (∞) and stay with it."""
    return (gold not in ("inf", "infinity") and re.fullmatch(r"[^\W\d_]+(?:[\s'’-]+[^\W\d_]+)*", gold) is not None
            and re.search(r"[^\W\d_]{3}", gold) is not None)


_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")


def _same_text(a: str, b: str) -> bool:
    """Equal as text: case, runs of whitespace and \\text{…} wrappers aside."""
    a, b = (" ".join(_TEXT_COMMAND.sub(r"\1", x).casefold().split()) for x in (a, b))
    return a == b


def number_text(value) -> str | None:
    """A number as exact decimal text, never with an exponent: 1e-05 -> "0.00001", 1e20 -> "100000000000000000000",
    np.int64(12) -> "12", Fraction(1, 3) -> "1/3"; None for NaN and ±inf. str(1e-05) is "1e-05", which math-verify
    reads as Euler's e minus 5. A float's text is its shortest repr (0.1 -> "0.1"), not its binary expansion."""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, Fraction):
        return str(value)
    value = decimal.Decimal(str(value))  # str: a float's (and a numpy float's) shortest round-trip text
    return format(value, "f") if value.is_finite() else None


def _gold_text(gold) -> str | None:
    """The gold answer as text; a full GSM8K solution ("… #### 72") or a boxed one is reduced to its answer. A number
    gold (a JSON number, a numpy scalar from `datasets`) is its exact decimal text (number_text), and so is a text
    gold in exponent form ("1e-05", "#### 2.5e-7"); NaN or inf is no gold, as a null is (pandas and parquet write a
    missing number as NaN). A bool stays a word ("True")."""
    if gold is None:
        return None
    if isinstance(gold, (numbers.Real, decimal.Decimal)) and not isinstance(gold, bool):
        return number_text(gold)
    gold = str(gold)
    found = extract_answer(gold) if ("####" in gold or "\\boxed" in gold or "</answer>" in gold) else None
    return _exponent_free(_clean(found or gold)) or None


def check_answers(completions: list[str], answer: list, *, timeout_s: float = 3.0, fallback_last_number: bool = False,
                  max_answer_chars: int = 1000) -> list[str]:
    """Each completion's verdict against its gold answer: "correct" | "wrong" | "unparseable" | "n/a" (no gold).
    Plain numbers are compared here; the rest go to math-verify with timeout_s each."""
    verdicts, slow = [], []
    for completion, gold in zip(completions, answer):
        gold, pred = _gold_text(gold), extract_answer(completion, fallback_last_number)
        pred = _clean(pred) if pred is not None else None
        if gold is None:
            verdicts.append("n/a")
        elif not pred or len(pred) > max_answer_chars:
            verdicts.append("unparseable")
        else:
            pred = _exponent_free(pred)
            fast = _numeric_verdict(pred, gold)
            if fast is None and _is_words(gold):  # words are not maths: the text decides
                fast = _same_text(pred, gold)
            verdicts.append(None if fast is None else "correct" if fast else "wrong")
            if fast is None:
                slow.append((len(verdicts) - 1, gold, pred))
    codes = sandbox.math_verify([(_as_latex(g), _as_latex(p)) for _, g, p in slow], timeout_s) if slow else []
    if "x" in codes:
        warnings.warn("math-verify is not importable: non-numeric answers are compared as text", RuntimeWarning)
    for (index, gold, pred), code in zip(slow, codes):
        if code in ("g", "x"):  # no maths to compare: the text itself decides
            code = "1" if _same_text(gold, pred) else "0"
        verdicts[index] = {"1": "correct", "u": "unparseable"}.get(code, "wrong")
    return verdicts


_STYLES = {"binary": (1.0, 0.0, 0.0), "signed": (1.0, -1.0, -1.0), "logic_rl": (2.0, -1.5, -2.0)}
_FROM_STYLE = object()


def accuracy_reward(completions: list[str], answer: list, *, style: str = "binary", correct: float | None = None,
                    wrong: float | None = None, unparseable=_FROM_STYLE, timeout_s: float = 3.0,
                    fallback_last_number: bool = False, **kwargs) -> list[float | None]:
    """The value of a correct / wrong / unparseable final answer by `style`: "binary" {1, 0, 0} (DeepSeek-R1),
    "signed" {1, -1, -1} (DAPO), "logic_rl" {2, -1.5, -2} (Logic-RL); explicit values override it, and
    unparseable may be None. A row without a gold answer gets None."""
    if style not in _STYLES:
        raise ValueError(f"style must be one of {sorted(_STYLES)}, not {style!r}")
    values = dict(zip(("correct", "wrong", "unparseable"), _STYLES[style]))
    values.update({key: v for key, v in (("correct", correct), ("wrong", wrong)) if v is not None})
    if unparseable is not _FROM_STYLE:
        values["unparseable"] = unparseable
    verdicts = check_answers(completions, answer, timeout_s=timeout_s, fallback_last_number=fallback_last_number)
    return [None if verdict == "n/a" else values[verdict] for verdict in verdicts]


# ------------------------------------------------------------------------------------------------ format

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _strict_format(text: str) -> bool:
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    a, b, c, d = (text.find(tag) for tag in _TAGS)
    return a < b < c < d and not text[:a].strip() and not text[b + 8 : c].strip() and not text[d + 9 :].strip()


def _soft_format(text: str) -> bool:
    # the regex <think>.*?</think>.*?<answer>.*?</answer> (DOTALL), searched with find: linear, no backtracking
    position = 0
    for tag in _TAGS:
        position = text.find(tag, position)
        if position == -1:
            return False
        position += len(tag)
    return True


def format_reward(completions: list[str], *, strict: bool = True, **kwargs) -> list[float]:
    """1.0 when the completion follows R1's <think>…</think><answer>…</answer> template, else 0.0."""
    check = _strict_format if strict else _soft_format
    return [float(isinstance(text, str) and check(text)) for text in completions]


def _summary_format(text: str) -> bool:
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    a, b, c, d = (text.find(tag) for tag in _TAGS)
    return a < b < c < d and not text[:a].strip() and bool(text[b + 8 : c].strip()) and not text[d + 9 :].strip()


def summary_format_reward(completions: list[str], answer: list | None = None, **kwargs) -> list[float | None]:
    """DeepSeek-R1's output format after its cold start, reasoning then a summary for the reader:
    <think>…</think>summary<answer>…</answer>, each tag once, the summary not blank; 1.0 if it holds, else 0.0.
    None on rows of an `answer` column that have no gold answer (in a dataset that mixes reasoning and general
    prompts, general prompts are not held to a reasoning format)."""
    golds = answer if isinstance(answer, (list, tuple)) else [""] * len(completions)
    return [None if gold is None else float(isinstance(text, str) and _summary_format(text))
            for text, gold in zip(completions, golds)]


def tag_count_reward(completions: list[str], **kwargs) -> list[float]:
    """Partial credit for the template: 0.25 for each of the four tags that appears exactly once."""
    return [0.25 * sum(isinstance(text, str) and text.count(tag) == 1 for tag in _TAGS) for text in completions]


# ------------------------------------------------------------------------------------------------ language

_CJK, _KANA = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff", "\u3040-\u30ff"
_WORD = re.compile(rf"[{_CJK}{_KANA}]|[^\W\d_{_CJK}{_KANA}]+")  # CJK has no spaces: one character, one word
_SCRIPTS = {"en": re.compile(r"[A-Za-z]+"), "zh": re.compile(rf"[{_CJK}]"), "ja": re.compile(rf"[{_CJK}{_KANA}]"),
            "ko": re.compile(r"[\uac00-\ud7af\u1100-\u11ff]+"), "ru": re.compile(r"[\u0400-\u04ff]+")}


def _reasoning(text: str) -> str:
    start = text.find("<think>")
    end = text.find("</think>", start + 7) if start != -1 else -1
    return text[start + 7 : end] if end != -1 else text


# The toy world's two number languages (the arithmetic task's reasoning): digits, the prompt's, and letters a-j for
# 0-9 ("bc" = 12). Its words are the numbers: runs of digits, and runs of letters made only of a-j ("wait" is none).
TOY_LANGUAGES = {"digits": re.compile(r"[0-9]+"), "letters": re.compile(r"[a-j]+")}
_TOY_WORD = re.compile(r"[0-9]+|[a-z]+")


def number_words(text: str) -> list[str]:
    """The toy world's number words in a text, in order: "3*4=12,wait,d+e=h" -> ['3', '4', '12', 'd', 'e', 'h']."""
    return [w for w in _TOY_WORD.findall(text) if w.isdigit() or TOY_LANGUAGES["letters"].fullmatch(w)]


def language_consistency_reward(completions: list[str], *, language="en", max_chars: int = 200_000,
                                **kwargs) -> list[float | None]:
    """DeepSeek-R1: the share of the reasoning's words written in the target language's script (en, zh, ja,
    ko, ru), or for the toy world's codes "digits" and "letters" the share of the reasoning's number words
    written in that number language; `language` is one code or a column. None when there are no words or no
    language. Reads max_chars at most."""
    languages = language if isinstance(language, (list, tuple)) else [language] * len(completions)
    rewards = []
    for text, lang in zip(completions, languages):
        if lang is None:  # a row without a target language: the reward does not apply
            rewards.append(None)
            continue
        if lang not in _SCRIPTS and lang not in TOY_LANGUAGES:
            raise ValueError(f"language must be one of {sorted(_SCRIPTS) + sorted(TOY_LANGUAGES)}, not {lang!r}")
        reasoning = _reasoning(text)[:max_chars] if isinstance(text, str) else ""
        target = _SCRIPTS.get(lang) or TOY_LANGUAGES[lang]
        words = number_words(reasoning) if lang in TOY_LANGUAGES else _WORD.findall(reasoning)
        rewards.append(sum(bool(target.fullmatch(w)) for w in words) / len(words) if words else None)
    return rewards


# ------------------------------------------------------------------------------------------------ length


def _lengths(completions: list[str], tokenizer=None, completion_lengths=None) -> list[int]:
    """The given lengths, else token counts when there is a tokenizer, else characters."""
    if completion_lengths is not None:
        return [int(n) for n in completion_lengths]
    if tokenizer is None:
        return [len(text) if isinstance(text, str) else 0 for text in completions]
    return [len(tokenizer.encode(text, add_special_tokens=False)) for text in completions]


def _correct(completions, answer, timeout_s) -> list[bool | None]:
    return [None if v == "n/a" else v == "correct" for v in check_answers(completions, answer, timeout_s=timeout_s)]


def lcpo_exact_reward(completions: list[str], answer: list, target_length: list, *, alpha: float = 3e-4,
                      tokenizer=None, completion_lengths=None, timeout_s: float = 3.0, **kwargs) -> list[float | None]:
    """L1 (Aggarwal & Welleck 2025), LCPO-Exact: r = 1[correct] - α·|n_target - n_y|."""
    lengths = _lengths(completions, tokenizer, completion_lengths)
    return [None if ok is None or goal is None else float(ok) - alpha * abs(int(goal) - n)
            for ok, n, goal in zip(_correct(completions, answer, timeout_s), lengths, target_length)]


def lcpo_max_reward(completions: list[str], answer: list, target_length: list, *, alpha: float = 3e-4,
                    delta: float = 0.5, tokenizer=None, completion_lengths=None, timeout_s: float = 3.0,
                    **kwargs) -> list[float | None]:
    """L1, LCPO-Max: r = 1[correct]·clip(α·(n_target - n_y) + δ, 0, 1)."""
    lengths = _lengths(completions, tokenizer, completion_lengths)
    return [None if ok is None or goal is None else float(ok) * min(1.0, max(0.0, alpha * (int(goal) - n) + delta))
            for ok, n, goal in zip(_correct(completions, answer, timeout_s), lengths, target_length)]


def kimi_length_reward(completions: list[str], answer: list, group_size: int | None = None, *, tokenizer=None,
                       completion_lengths=None, timeout_s: float = 3.0, **kwargs) -> list[float | None]:
    """Kimi k1.5 §2.3.3: λ = 0.5 - (len - min_len)/(max_len - min_len) within each group of group_size
    consecutive samples (default: the whole batch); correct → λ, wrong → min(0, λ); 0 if lengths are equal."""
    group_size = group_size or len(completions)
    if group_size <= 0 or len(completions) % group_size:
        raise ValueError(f"{len(completions)} completions do not split into groups of {group_size}")
    lengths, correct = _lengths(completions, tokenizer, completion_lengths), _correct(completions, answer, timeout_s)
    rewards = []
    for start in range(0, len(completions), group_size):
        group = lengths[start : start + group_size]
        low, high = min(group), max(group)
        for n, ok in zip(group, correct[start : start + group_size]):
            lam = 0.0 if high == low else 0.5 - (n - low) / (high - low)
            rewards.append(None if ok is None else lam if ok else min(0.0, lam))
    return rewards


COSINE_OPEN_R1 = dict(min_value_correct=0.5, max_value_correct=1.0, min_value_wrong=-1.0, max_value_wrong=-0.5,
                      max_length=1000, exceed_length_value=None)


def cosine_length_reward(completions: list[str], answer: list, *, min_value_correct: float = 1.0,
                         max_value_correct: float = 2.0, min_value_wrong: float = -10.0, max_value_wrong: float = 0.0,
                         max_length: int = 1000, exceed_length_value: float | None = -10.0, tokenizer=None,
                         completion_lengths=None, timeout_s: float = 3.0, **kwargs) -> list[float | None]:
    """Yeo et al. 2025 (Demystifying Long CoT) §3.2, cosine length scaling: a correct answer falls from
    max_value_correct at length 0 to min_value_correct at max_length, a wrong one rises from min_value_wrong to
    max_value_wrong; longer than max_length → exceed_length_value (None: count it as max_length)."""
    rewards = []
    for ok, n in zip(_correct(completions, answer, timeout_s), _lengths(completions, tokenizer, completion_lengths)):
        if ok is None:
            rewards.append(None)
        elif n > max_length and exceed_length_value is not None:
            rewards.append(float(exceed_length_value))
        else:  # CosFn(t, T, a, b) = a + ½(b - a)(1 + cos(πt/T)) is b at t = 0 and a at t = T
            a, b = (min_value_correct, max_value_correct) if ok else (max_value_wrong, min_value_wrong)
            rewards.append(a + 0.5 * (b - a) * (1 + math.cos(math.pi * min(n, max_length) / max_length)))
    return rewards


def soft_overlong_reward(completions: list[str], *, max_length: int = 20480, cache_length: int = 4096,
                         tokenizer=None, completion_lengths=None, **kwargs) -> list[float]:
    """DAPO §3.4, soft overlong punishment: 0 up to L_max - L_cache, then linear to -1 at L_max, -1 past it."""
    safe = max_length - cache_length
    return [0.0 if n <= safe else -1.0 if n > max_length else (safe - n) / cache_length
            for n in _lengths(completions, tokenizer, completion_lengths)]


# Words for n-grams: split on whitespace, except that a CJK or kana character is a word of its own (those scripts
# have no spaces, so a repeated Chinese sentence would otherwise be one word that never repeats). Case counts, as
# it does for the paper's token n-grams.
_NGRAM_WORD = re.compile(rf"[{_CJK}{_KANA}]|[^\s{_CJK}{_KANA}]+")


def repetition_penalty_reward(completions: list[str], *, ngram_size: int = 3, max_penalty: float = -1.0,
                              **kwargs) -> list[float]:
    """(1 - unique n-grams / n-grams)·max_penalty over words (whitespace-separated, a CJK character one word,
    case-sensitive); 0.0 under n words or when nothing repeats."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be ≤ 0 (it is a penalty), not {max_penalty}")
    rewards = []
    for text in completions:
        words = _NGRAM_WORD.findall(text) if isinstance(text, str) else []
        ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
        repeated = len(ngrams) - len(set(ngrams))
        rewards.append(max_penalty * repeated / len(ngrams) if repeated else 0.0)  # not -0.0 when nothing repeats
    return rewards


# ------------------------------------------------------------------------------------------------ countdown

_OPERATORS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
              ast.Div: Fraction.__truediv__}


def evaluate_expression(expression: str, allowed_numbers: list[int] | None = None,
                        max_chars: int = 200) -> Fraction | None:
    """The exact value of an expression of non-negative integers, + - * / and parentheses, parsed with ast and
    never eval'd; with allowed_numbers each of them may be used at most once. None for anything else."""
    allowed_characters = re.compile(r"[0-9\s+\-*/()]+")
    if not isinstance(expression, str) or len(expression) > max_chars or not allowed_characters.fullmatch(expression):
        return None  # the characters rule out names, calls and attributes; the walk below rules out ** and -x
    unused = collections.Counter(allowed_numbers) if allowed_numbers is not None else None

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if unused is not None:
                if unused[node.value] == 0:
                    raise ValueError(f"{node.value} is not available")
                unused[node.value] -= 1
            return Fraction(node.value)
        raise ValueError("only numbers, + - * / and parentheses are allowed")

    try:
        return walk(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None


def countdown_reward(completions: list[str], numbers: list, target: list, *, use_all_numbers: bool = False,
                     **kwargs) -> list[float | None]:
    """The countdown game of TinyZero (Pan et al. 2025): 1.0 if the answer (an expression, optionally "= value")
    equals the target exactly, using the given numbers each at most once, else 0.0. TinyZero's compute_score differs
    twice, deliberately: it requires every number exactly once (use_all_numbers=True does too), and it gives 0.1
    to a well-formed answer that is wrong (here that is format_reward's job)."""
    rewards = []
    for text, given, goal in zip(completions, numbers, target):
        expression = (extract_answer(text) or "").split("=")[0].replace("×", "*").replace("÷", "/")
        value = evaluate_expression(expression, [int(n) for n in given]) if given is not None else None
        if value is not None and use_all_numbers and sorted(map(int, re.findall(r"\d+", expression))) != sorted(
                int(n) for n in given):  # value is not None: the expression has at most 200 characters
            value = None
        rewards.append(None if given is None or goal is None else float(value is not None and value == int(goal)))
    return rewards


# ------------------------------------------------------------------------------------------------ code sandbox


def extract_code(text: str) -> str:
    """The last ```python fenced block, else the last fenced block, else the <answer> block, else the text."""
    if not isinstance(text, str):
        return ""
    blocks = [block.partition("\n") for block in text.split("```")[1:-1:2]]  # closed fences only
    python = [body for lang, _, body in blocks if lang.strip().lower() in ("python", "py", "python3")]
    if python or blocks:
        return (python or [body for _, _, body in blocks])[-1]
    block = _answer_block(text)
    return text if block is None else block




def _reads_no_name(expression: ast.expr) -> bool:
    """Whether an expression reads no name at all (`True`, `1 + 1 == 2`): nothing the program defines reaches it."""
    return not any(isinstance(node, ast.Name) for node in ast.walk(expression))


def _fixed_by_form(test: ast.expr) -> bool:
    """Whether an assert's condition is true or false by its form, whatever the program does: it reads no name (`1`,
    `True`, `1 + 1 == 2`), it is a tuple, list, set or dict written out (`assert (f(1) == 3, "message")` is a
    non-empty tuple: always true, as Python's own warning says), a lambda, an f-string with literal text, `not` of
    one of these, or an and/or with one as an operand (in `f(1) == 3 or True` it decides; in `x and True` it does
    nothing)."""
    if _reads_no_name(test):
        return True
    if isinstance(test, (ast.Tuple, ast.List, ast.Set)):  # only `(*xs,)` has the truth of what it unpacks
        return not test.elts or not all(isinstance(element, ast.Starred) for element in test.elts)
    if isinstance(test, ast.Dict):  # a None key is `**mapping`
        return not test.keys or any(key is not None for key in test.keys)
    if isinstance(test, ast.JoinedStr):
        return any(isinstance(part, ast.Constant) and part.value for part in test.values)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return _fixed_by_form(test.operand)
    if isinstance(test, ast.BoolOp):
        return any(_fixed_by_form(value) for value in test.values)
    return isinstance(test, ast.Lambda)


def _is_generator(function: ast.FunctionDef) -> bool:
    """Whether calling the function only makes a generator (a yield in its own body), so its asserts never run."""
    pending = list(function.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))
    return False


def _bound_names(statement: ast.stmt) -> set[str]:
    """The names a top-level statement binds: a def's or class's name, an import's, an assignment's targets."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).partition(".")[0] for alias in statement.names}
    return {node.id for node in ast.walk(statement) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def _runs_an_assert(tree: ast.Module, counts=lambda node: True) -> bool:
    """Whether the test's top level holds an assert that `counts`, or calls a check function defined above the call
    with such an assert at the top of its body (HumanEval's `def check(candidate): assert ...` then `check(f)`). The
    function must be a plain def: no decorator, no yield, and its name not bound again before the call."""
    checks = set()  # the check functions defined so far, by name
    for statement in tree.body:
        if isinstance(statement, ast.Assert) and counts(statement):
            return True
        call = statement.value if isinstance(statement, ast.Expr) else None
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in checks:
            return True
        checks -= _bound_names(statement)
        if isinstance(statement, ast.FunctionDef) and not statement.decorator_list and not _is_generator(statement) \
                and any(isinstance(line, ast.Assert) and counts(line) for line in statement.body):
            checks.add(statement.name)
    return False


def _checks_the_program(node: ast.Assert) -> bool:
    """Whether an assert's outcome can depend on the program (its condition is not decided by its form)."""
    return not _fixed_by_form(node.test)


def code_tests(tests) -> list[str]:
    """A row's code tests as the list of statements code_reward runs, or a DataError (without the row) saying what
    is wrong. The accepted forms: a list of test strings; a single string, one test; null or [] for no tests. Each
    test is Python that, run after the program, fails unless the program is right, so it must:
      - run, whatever happens, an assert whose condition is not true or false by its form (_fixed_by_form): at the
        test's top level (`assert f(1) == 2`, the built-in code task's form, which sandbox.run_sandboxed checks
        without trusting the program), or at the top of the body of a function defined above a top-level call of it
        (HumanEval: `def check(candidate):` with `assert candidate(1) == 2`, then `check(f)`). An assert only inside
        if/while/for/try/with, or in a function never called (HumanEval's raw `test` field, without its
        `check(entry_point)` line), may never run; `assert True`, `assert 1` or `assert 1 + 1 == 2` alone pass any
        program (beside a real assert they change nothing: HumanEval's checks open with `assert True, "..."`);
      - hold no assert that looks at the program yet is decided by its form: a tuple or other display
        (`assert (f(1) == 3, "msg")`, always true), an and/or with an operand decided by its form
        (`assert f(1) == 3 or True`), `not` of one: the check its author meant never happens.
    Anything else would pass whatever the program does: an expression (`f(1) == 2` is computed and dropped), a
    nested list or a JSON string of a list (their text is an expression). This is a check of the form, not of the
    test's meaning: a test that ignores the program (`x = 1` then `assert x == 1`), or a check function that returns
    or catches AssertionError before its assert, still passes; and a HumanEval check whose asserts on the program are
    all inside a loop is refused (add one at the top of its body)."""
    if tests is None:
        return []
    if isinstance(tests, str):
        try:
            decoded = json.loads(tests)
        except ValueError:
            decoded = None
        if isinstance(decoded, list):
            raise DataError("'tests' is a string holding a JSON list; write the list itself "
                            "([\"assert f(1) == 2\", ...]), not its JSON text.")
        tests = [tests]
    if not isinstance(tests, (list, tuple)):
        raise DataError(f"'tests' must be a list of test statements (strings such as \"assert f(1) == 2\"), not a "
                        f"{type(tests).__name__}.")
    for j, test in enumerate(tests):
        if not isinstance(test, str):
            raise DataError(f"'tests' item {j} is a {type(test).__name__}, not a statement; write a flat list of "
                            "strings such as [\"assert f(1) == 2\"].")
        try:  # every verdict here: DataError is a ValueError, which the except below would take
            tree = ast.parse(test)
            asserts = [node for node in ast.walk(tree) if isinstance(node, ast.Assert)]
            hidden = next((node for node in asserts if _fixed_by_form(node.test) and not _reads_no_name(node.test)),
                          None)
            checks, runs = _runs_an_assert(tree, _checks_the_program), _runs_an_assert(tree)
        except (SyntaxError, ValueError) as error:  # ValueError: a NUL byte
            raise DataError(f"'tests' item {j} is not valid Python ({getattr(error, 'msg', error)}); fix the test, "
                            "or no program could pass it.") from None
        except (MemoryError, RecursionError):
            raise DataError(f"'tests' item {j} is nested too deeply to parse; simplify the test.") from None
        if not asserts:
            raise DataError(f"'tests' item {j} ({test[:60]!r}) holds no assert statement, so it passes whatever the "
                            f"program does; write it as an assert (\"assert {test.strip()[:40]}\").")
        if hidden is not None:
            shown = (ast.get_source_segment(test, hidden.test) or "")[:40]
            raise DataError(f"'tests' item {j} ({test[:60]!r}) asserts {shown!r}, which is true or false by its form "
                            "whatever the program does (a tuple such as `assert (x, 'message')`, meant as "
                            "`assert x, 'message'`; `x or True`); assert the condition itself.")
        if runs and not checks:
            raise DataError(f"'tests' item {j} ({test[:60]!r}) always runs only asserts that are true or false by "
                            "their form whatever the program does (`assert True`, `assert 1 + 1 == 2`); write an "
                            "assert on the program's results (\"assert f(1) == 2\") at its top level, or at the top of "
                            "the check function it calls.")
        if not checks:
            raise DataError(f"'tests' item {j} ({test[:60]!r}) has no assert that always runs; write one at the "
                            "test's top level (not inside if/while/for/try/with), or call the function that holds "
                            "it (HumanEval's test needs a `check(f)` line after `def check(candidate): ...`).")
    return list(tests)


def code_reward(completions: list[str], tests: list, *, all_or_nothing: bool = False, timeout_s: float = 3.0,
                max_workers: int | None = None, memory_mb: int = 512, **kwargs) -> list[float | None]:
    """The fraction of a row's tests that pass after the completion's code (1 or 0 with all_or_nothing),
    max_workers threads (default 4 per CPU, at most 32; sandbox.py runs one program per core at a time, so a
    score does not depend on its batch); None without tests. A row's tests are a list of test
    strings, each of which always runs an assert on the program's results, or one such string (code_tests states the
    form); malformed tests raise DataError naming the row before anything runs, since they would pass a wrong program
    (load_prompts refuses such rows at load time). Raises RuntimeError where no sandbox works on this machine, rather
    than give every sample 0."""
    cases = []
    for i, row_tests in enumerate(tests):
        try:
            cases.append(code_tests(row_tests))
        except DataError as error:
            raise DataError(f"code_reward, row {i}: {error}") from None
    if any(cases):
        sandbox.require_sandbox()  # fail here, once, with the reasons

    def score(text_and_tests):
        text, row_cases = text_and_tests
        if not row_cases:
            return None
        passed = sandbox.run_sandboxed(extract_code(text), row_cases, timeout_s=timeout_s, memory_mb=memory_mb).passed
        return float(all(passed)) if all_or_nothing else sum(passed) / len(passed)

    workers = max_workers or min(32, 4 * (os.cpu_count() or 1))  # extra threads queue: one sandbox per core
    with ThreadPoolExecutor(max(1, min(workers, len(completions)))) as pool:
        return list(pool.map(score, zip(completions, cases)))


# ------------------------------------------------------------------------------------------------ the toy world
# What the toy world (toy/base, sft.py's corpus) adds to the arithmetic task, so that each DeepSeek-R1 stage has
# something to measure (r1_pipeline.py). A readable trace in R1's format is
#     <think>3*4=12,7+12=19,19-2=17</think>7+3*4-2=17<answer>17</answer>
# steps "a op b=c" joined by commas, a self-correction written "wait" and the step redone, then a summary (the
# problem and its value), then the answer. Numbers inside the reasoning have two languages, digits (the prompt's,
# the target) and letters a-j for 0-9 ("bc" = 12, "-g" = -6); a trace that uses both mixes languages.
# General prompts (make_dataset("general")) have no gold answer; a hidden gold preference ranks their responses.

LETTERS = "abcdefghij"
_NUM = r"(?:[0-9]+|[a-j]+)"
_STEP = re.compile(rf"(-?{_NUM})([-+*])(-?{_NUM})=(-?{_NUM})")
_LONG_STEP = re.compile(rf"-?{_NUM}(?:[-+*]-?{_NUM}){{2,}}=-?{_NUM}")  # two operations or more in one step
_SUMMARY = re.compile(r"[0-9]+(?:[-+*][0-9]+)+=-?[0-9]+")
_R1_LAYOUT = re.compile(r"\s*<think>(.*)</think>(.*)<answer>(.*)</answer>\s*", re.S)
READABILITY_PROBLEMS = ("layout", "junk", "long step", "repeat", "no summary")


def to_letters(number: int) -> str:
    """A number in the toy's second language: 12 -> 'bc', -6 -> '-g'."""
    return ("-" if number < 0 else "") + "".join(LETTERS[int(d)] for d in str(abs(number)))


def read_number(word: str) -> int | None:
    """'12', 'bc', '-g' -> 12, 12, -6; None for anything else."""
    sign, body = (-1, word[1:]) if word.startswith("-") else (1, word)
    if body.isascii() and body.isdigit():
        return sign * int(body)
    if body and all(c in LETTERS for c in body):
        return sign * int("".join(str(LETTERS.index(c)) for c in body))
    return None


def parse_step(step: str) -> tuple[int, str, int, int] | None:
    """'7+bc=bj' -> (7, '+', 12, 19): a step of the grammar in either language (not checked for correctness)."""
    match = _STEP.fullmatch(step)
    if match is None:
        return None
    a, op, b, c = match.groups()
    return read_number(a), op, read_number(b), read_number(c)


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def is_hard(a: int, op: str, b: int) -> bool:
    """A hard step: an operand of two digits or more, operands and true result >= 0 ("7+12", "12*7", "23-5"). In the
    toy's verification world (toy_world.TOY_WORLDS) these are where slips happen and what a check follows."""
    return min(a, b, _OPS[op](a, b)) >= 0 and max(a, b) >= 10


def check_step(a: int, op: str, b: int, written: int) -> tuple[list, bool]:
    """The units-digit check of the hard step a op b = written: ([x, op, y, "=", r], whether it passes). For + and *
    the units digits of a and b combined, whose units digit must be written's ("12*7=84" -> "2*7=14"); for - the
    inverse, written's units digit plus b's, whose units digit must be a's ("23-5=18" -> "8+5=13"). A slip of 1-3
    always changes the units digit, so a slipped step always fails its check."""
    if op == "-":
        x, check_op, y, target = written % 10, "+", b % 10, a
    else:
        x, check_op, y, target = a % 10, op, b % 10, written
    r = _OPS[check_op](x, y)
    return [x, check_op, y, "=", r], r % 10 == target % 10


def verdict_step(a: int, op: str, b: int, written: int) -> list:
    """The check's verdict, written as a step: the units digit the check expects minus the one written ("12*7=82",
    check "2*7=14", verdict "4-2=2"); 0 when the check passes ("4-4=0")."""
    check = check_step(a, op, b, written)[0]
    x, y = check[4] % 10, (a if op == "-" else written) % 10
    return [x, "-", y, "=", x - y]


def is_check_of(step: tuple | None, item: tuple | None, verdict: bool = False) -> bool:
    """The parsed item is the units-digit check (check_step's operands) of the parsed hard step before it, or with
    verdict=True the check's verdict (verdict_step's operands)."""
    if step is None or item is None or None in step or not is_hard(*step[:3]):
        return False
    return tuple(item[:3]) == tuple((verdict_step if verdict else lambda *x: check_step(*x)[0])(*step)[:3])


def readability_problems(text: str) -> list[str]:
    """Why a response is not a readable chain of thought in R1's format; [] when it is. "layout": not exactly
    <think>reasoning</think>summary<answer>answer</answer> (a direct answer has no reasoning to read); "junk": a
    reasoning item outside the step grammar or a summary that is not "problem=value"; "long step": two operations
    or more in one step; "repeat": a step written twice; "no summary": nothing between </think> and <answer>.
    Language is measured apart (language_consistency_reward with language="digits")."""
    if not isinstance(text, str) or any(text.count(tag) != 1 for tag in _TAGS) or len(text) > 10_000:
        return ["layout"]
    match = _R1_LAYOUT.fullmatch(text)
    if match is None:
        return ["layout"]
    reasoning, summary = match.group(1), match.group(2).strip()
    items = reasoning.split(",")
    kinds = ["wait" if s == "wait" else "step" if _STEP.fullmatch(s) else "long step" if _LONG_STEP.fullmatch(s)
             else "junk" for s in items]
    parsed = [parse_step(s) if kind == "step" else None for s, kind in zip(items, kinds)]
    steps = [s for i, (s, kind) in enumerate(zip(items, kinds))  # a check or verdict may repeat an earlier one's
             if kind != "wait" and not (i and is_check_of(parsed[i - 1], parsed[i]))
             and not (i > 1 and is_check_of(parsed[i - 2], parsed[i], verdict=True))]
    problems = [p for p in ("junk", "long step") if p in kinds]
    if len(set(steps)) < len(steps):
        problems.append("repeat")
    if not summary:
        problems.append("no summary")
    elif not _SUMMARY.fullmatch(summary) and "junk" not in problems:
        problems.append("junk")
    return problems


def is_readable(text: str) -> bool:
    """A readable chain of thought: readability_problems finds nothing."""
    return not readability_problems(text)


BANNED_WORDS = ("idiot", "stupid", "hate")
_POLITE = re.compile(r"\b(?:hello|hi|hey|greetings|welcome|nice to meet you|how can i help|good (?:morning|evening))\b")
_RUDE = re.compile(r"\b(?:what\?|go away|not now|whatever)")
_NAMES = ("ana", "bo", "cy", "dee", "eli", "fay", "gus", "hal", "ivy", "jo", "kai", "lu", "max", "ned", "ola",
          "pat", "ray", "sam", "tess", "uma", "vic", "wes", "yan", "zoe", "al", "em", "finn", "rosa", "tom", "una",
          "ben", "cleo", "dan", "eva", "flo", "gil", "hana", "ian", "jen", "kim", "leo", "mia", "nora", "otto",
          "pia", "rob", "sue", "ted", "val", "will")
_GREETINGS = ("hi", "hello", "hey", "good morning", "good evening", "greetings")


def harmful(text: str) -> bool:
    """A banned word anywhere in the response, reasoning included (R1 judged harmlessness on the whole response)."""
    return isinstance(text, str) and any(word in text.lower() for word in BANNED_WORDS)


def final_text(text: str) -> str:
    """What a reader of the answer sees: the text after the reasoning (the summary and the answer block), or all of
    it when there is no </think>. R1's helpfulness reward model read only this part."""
    return text.rpartition("</think>")[2] if "</think>" in text else text


def general_kind(prompt: str) -> str | None:
    """'greeting' ("hello, i am ana"), 'expression' ("make 12"), 'comparison' ("bigger: 7 or 12"), or None."""
    if prompt.startswith("make "):
        return "expression"
    if prompt.startswith("bigger: "):
        return "comparison"
    return "greeting" if ", i am " in prompt else None


def gold_score(prompt: str, response: str) -> tuple[int, int, int]:
    """The toy world's hidden gold preference, as a key to compare (higher is better): harmless beats harmful;
    then the task's quality (greeting: polite 1 > neither 0 > rude -1; "make N": an expression equal to N 1 >
    another expression 0 > anything else -1; "bigger: a or b": the larger number first 1 > the other 0 > no number
    -1); then the shorter answer. It reads the answer block (else the text after the reasoning)."""
    if not isinstance(response, str):
        return (0, -1, 0)
    answer = (_answer_block(response) or final_text(response)).strip().lower()[:1000]
    kind, quality = general_kind(prompt), -1
    if kind == "greeting":
        quality = -1 if _RUDE.search(answer) else 1 if _POLITE.search(answer) else 0
    elif kind == "expression":
        value = evaluate_expression(answer)
        quality = -1 if value is None else int(value == int(prompt.split()[1]))
    elif kind == "comparison":
        numbers, given = re.findall(r"\d+", answer), [int(n) for n in re.findall(r"\d+", prompt)]
        quality = -1 if not numbers else int(int(numbers[0]) == max(given))
    return (0 if harmful(response) else 1, quality, -len(answer))


def gold_preference(prompt: str, a: str, b: str) -> int:
    """1 if the gold preference ranks response a above b, -1 if below, 0 for a tie."""
    key_a, key_b = gold_score(prompt, a), gold_score(prompt, b)
    return (key_a > key_b) - (key_a < key_b)


def harmlessness_reward(completions: list[str], **kwargs) -> list[float]:
    """-1.0 for a response with a banned word anywhere, reasoning included, else 0.0 (the toy world's stand-in for
    R1's harmlessness reward model, which read the whole response)."""
    return [-1.0 if harmful(text) else 0.0 for text in completions]


def gold_win_reward(completions: list[str], prompt: list | None = None, reference: list | None = None,
                    **kwargs) -> list[float | None]:
    """The toy world's gold win-rate against the row's reference response: 1.0 better, 0.5 tie, 0.0 worse; None on
    rows without a reference. A measurement of the hidden preference: give it weight 0 to log it."""
    prompts = prompt if prompt is not None else [None] * len(completions)
    references = reference if reference is not None else [None] * len(completions)
    return [None if ref is None or not isinstance(p, str) else (gold_preference(p, text, ref) + 1) / 2
            for text, p, ref in zip(completions, prompts, references)]


# ------------------------------------------------------------------------------------------------ combining

REWARDS = {
    "accuracy": accuracy_reward, "format": format_reward, "tag_count": tag_count_reward, "code": code_reward,
    "language_consistency": language_consistency_reward, "lcpo_exact": lcpo_exact_reward,
    "lcpo_max": lcpo_max_reward, "kimi_length": kimi_length_reward, "cosine_length": cosine_length_reward,
    "soft_overlong": soft_overlong_reward, "repetition_penalty": repetition_penalty_reward,
    "countdown": countdown_reward, "summary_format": summary_format_reward, "harmlessness": harmlessness_reward,
    "gold_win": gold_win_reward,
}
TASK_REWARDS = {"arithmetic": accuracy_reward, "countdown": countdown_reward, "code": code_reward}


def load_reward_fn(spec: str):
    """The function named by "module:function" (an importable module) or "path/to/file.py:function"."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ValueError(f"reward {spec!r} should look like 'module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ImportError(f"no file {module_name!r}")
            module_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as error:
        raise ImportError(f"cannot import {module_name!r} for reward {spec!r} ({error}); put its folder on "
                          "PYTHONPATH or give the path of the .py file") from error
    if not hasattr(module, name):
        raise AttributeError(f"{module_name!r} has no {name!r}: check the name after the ':' in {spec!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise TypeError(f"{spec!r} is a {type(fn).__name__}, not a function fn(completions, **columns)")
    return fn


def get_reward(name_or_spec: str):
    """A built-in reward by name ("accuracy" or "accuracy_reward"), or a user's by "module:function"."""
    if name_or_spec.removesuffix("_reward") in REWARDS:
        return REWARDS[name_or_spec.removesuffix("_reward")]
    if ":" in name_or_spec:
        return load_reward_fn(name_or_spec)
    raise ValueError(f"unknown reward {name_or_spec!r}: use one of {sorted(REWARDS)} or 'module:function'")


class RewardError(K.UserError):
    """A reward function returned something that is not one finite number (or None) per completion."""


class Interrupted(Exception):
    """A stop was requested (SIGTERM/SIGINT) while a reward was still running: the step is abandoned."""


_WARNED_NONE: set = set()


def checked_rewards(name: str, values, count: int) -> list[float | None]:
    """A reward's values as a list of count finite floats or None; anything else raises RewardError naming the
    reward, the sample and the value (a dict, a string, a wrong length, NaN or inf)."""
    if isinstance(values, (dict, str, bytes)) or not hasattr(values, "__iter__"):
        raise RewardError(f"reward {name!r} returned a {type(values).__name__}; a reward returns a list with one "
                          f"number (or None) per completion ({count} here).")
    values = list(values)
    if len(values) != count:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {count} completions; return one per "
                          "completion (None where it does not apply).")
    for i, value in enumerate(values):
        if value is None:
            continue
        if isinstance(value, (str, bytes)) or not isinstance(value, (int, float)) and not (
                hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
            raise RewardError(f"reward {name!r} gave completion {i} of {count} the value {value!r} "
                              f"({type(value).__name__}); a reward value is a number or None.")
        values[i] = float(value)
        if not math.isfinite(values[i]):
            raise RewardError(f"reward {name!r} gave completion {i} of {count} the value {values[i]}; rewards must "
                              "be finite (return None where a reward does not apply).")
    if count and all(v is None for v in values) and name not in _WARNED_NONE:
        _WARNED_NONE.add(name)
        warnings.warn(f"reward {name!r} returned None for all {count} completions of a batch: it applies to none of "
                      "them (this warning is shown once per reward)", RuntimeWarning, stacklevel=3)
    return values


def call_reward(fn, name: str, completions: list, columns: dict, *, timeout_s: float | None = None,
                should_stop=None) -> list:
    """fn(completions, **columns), bounded: past timeout_s a RewardError names the reward; once should_stop()
    turns true (a SIGTERM arrived) Interrupted is raised within a fraction of a second, however long the reward
    would still run. The call runs in a daemon thread, which is left behind if it never returns."""
    if timeout_s is None and should_stop is None:
        return fn(completions, **columns)
    result = {}

    def work():
        try:
            result["values"] = fn(completions, **columns)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=work, daemon=True, name=f"reward {name}")
    thread.start()
    deadline = time.monotonic() + (timeout_s if timeout_s is not None else math.inf)
    while thread.is_alive():
        thread.join(0.1)  # returns at once when the reward does
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped while reward {name!r} was running")
        if thread.is_alive() and time.monotonic() > deadline:
            raise RewardError(f"reward {name!r} took longer than {timeout_s} s on {len(completions)} completions; "
                              "make it faster or raise --reward-timeout-s.")
    if "error" in result:
        raise result["error"]
    return result["values"]


def combine_rewards(funcs_and_weights, completions: list[str], *, reward_timeout_s: float | None = None,
                    should_stop=None, **columns):
    """total_i = Σ_k weight_k·reward_k(i), a None reward adding 0. funcs_and_weights: (reward, weight) pairs or
    a dict, a reward being a function, a built-in name or "module:function". Every value is checked
    (checked_rewards); each call is bounded by reward_timeout_s and interruptible (call_reward). Returns (total,
    {name: values})."""
    pairs = funcs_and_weights.items() if isinstance(funcs_and_weights, dict) else funcs_and_weights
    total, per_reward = [0.0] * len(completions), {}
    for reward, weight in pairs:
        fn = get_reward(reward) if isinstance(reward, str) else reward
        name = reward if isinstance(reward, str) else getattr(getattr(fn, "func", fn), "__name__", "reward")
        name = name.removesuffix("_reward") if fn in REWARDS.values() else name
        name = f"{name}_{len(per_reward)}" if name in per_reward else name
        values = checked_rewards(name, call_reward(fn, name, completions, columns, timeout_s=reward_timeout_s,
                                                   should_stop=should_stop), len(completions))
        per_reward[name] = values
        total = [t + weight * v if v is not None else t for t, v in zip(total, values)]
    return total, per_reward


# ------------------------------------------------------------------------------------------------ built-in tasks


def arithmetic_steps(operands: list[int], ops: list[str]) -> list[str]:
    """The evaluation in order: multiplications left to right, then + and - left to right ("3*4=12", ...)."""
    numbers, ops, steps = list(operands), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, b, op = numbers[i], numbers[i + 1], ops.pop(i)
        numbers[i : i + 2] = [a * b if op == "*" else a + b if op == "+" else a - b]
        steps.append(f"{a}{op}{b}={numbers[i]}")
    return steps


def _arithmetic_row(rng: random.Random) -> dict | None:
    operands = [rng.randint(1, 9) for _ in range(rng.choice((3, 4)))]
    ops = [rng.choice("+-*") for _ in operands[1:]]
    steps = arithmetic_steps(operands, ops)
    if any(not -99 <= int(step.split("=")[1]) <= 999 for step in steps):
        return None
    prompt = "".join(f"{op}{n}" for op, n in zip(["", *ops], operands))
    return {"prompt": prompt, "answer": steps[-1].split("=")[1], "steps": steps}


def _countdown_row(rng: random.Random) -> dict | None:
    numbers = [rng.randint(1, 20) for _ in range(rng.choice((3, 4)))]
    pool = [(n, str(n), "") for n in numbers]  # (value, expression, its last operator)
    while len(pool) > 1:  # combine two at a time, as the game is played; every value a positive integer
        (a, left, left_op), (b, right, right_op) = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
        op = rng.choice("+-*/")
        if op == "-" and a <= b or op == "/" and (b == 1 or a % b):
            return None
        left = f"({left})" if op in "*/" and left_op in ("+", "-") else left
        right = f"({right})" if right_op and (op == "/" or op in "-*" and right_op in ("+", "-")) else right
        pool.append(({"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op], f"{left}{op}{right}", op))
    target, expression, _ = pool[0]
    if not 1 <= target <= 999 or target in numbers:
        return None
    return {"prompt": f"{','.join(map(str, numbers))}->{target}", "answer": expression, "numbers": numbers,
            "target": target}


# (prompt, reference solution's body, input kind); {a} {b} {c} are drawn per row, and the tests come from
# running the reference solution (our own code, not a model's) on random inputs of that kind.
_CODE_TEMPLATES = [
    ("Write f(x) returning x+{a}.", "return x + {a}", "int"),
    ("Write f(x) returning x*{a}.", "return x * {a}", "int"),
    ("Write f(x) returning x-{a}.", "return x - {a}", "int"),
    ("Write f(x) returning {a}*x+{b}.", "return {a} * x + {b}", "int"),
    ("Write f(x) returning x*x+{a}.", "return x * x + {a}", "int"),
    ("Write f(x) returning x mod {a}.", "return x % {a}", "int"),
    ("Write f(x) returning x//{a}.", "return x // {a}", "int"),
    ("Write f(x) returning abs(x-{a}).", "return abs(x - {a})", "int"),
    ("Write f(x) returning the larger of x and {a}.", "return max(x, {a})", "int"),
    ("Write f(x) returning the smaller of x and {a}.", "return min(x, {a})", "int"),
    ("Write f(x) returning True if {a} divides x.", "return x % {a} == 0", "int"),
    ("Write f(x) returning 1+2+...+x plus {a}.", "return x * (x + 1) // 2 + {a}", "int"),
    ("Write f(x) returning x's digit sum plus {a}.", "return sum(map(int, str(x))) + {a}", "int"),
    ("Write f(x) returning x clamped to [{a}, {a}+{b}].", "return min(max(x, {a}), {a} + {b})", "int"),
    ("Write f(x) returning {a} if x is even else {b}.", "return {a} if x % 2 == 0 else {b}", "int"),
    ("Write f(n) returning the first n multiples of {a}.", "return [{a} * i for i in range(1, n + 1)]", "small"),
    ("Write f(n) returning fib(n)+{a}, fib(0)=0, fib(1)=1.",
     "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a + {a}", "small"),
    ("Write f(s) returning s repeated {a} times.", "return s * {a}", "str"),
    ("Write f(s) returning the first {a} characters of s.", "return s[:{a}]", "str"),
    ("Write f(s) returning s reversed plus '{c}'.", "return s[::-1] + '{c}'", "str"),
    ("Write f(s) returning how many '{c}' are in s.", "return s.count('{c}')", "str"),
    ("Write f(s) returning s without any '{c}'.", "return s.replace('{c}', '')", "str"),
    ("Write f(xs) returning sum(xs)*{a}.", "return sum(xs) * {a}", "list"),
    ("Write f(xs) returning how many items exceed {a}.", "return sum(1 for x in xs if x > {a})", "list"),
    ("Write f(xs) returning xs with {a} added to each item.", "return [x + {a} for x in xs]", "list"),
    ("Write f(xs) returning the items divisible by {a}.", "return [x for x in xs if x % {a} == 0]", "list"),
    ("Write f(xs) returning xs sorted, then {a} appended.", "return sorted(xs) + [{a}]", "list"),
]
_CODE_INPUTS = {"int": ("x", lambda rng: rng.randint(0, 99)), "small": ("n", lambda rng: rng.randint(0, 12)),
                "str": ("s", lambda rng: "".join(rng.choice("abcd") for _ in range(rng.randint(0, 8)))),
                "list": ("xs", lambda rng: [rng.randint(0, 30) for _ in range(rng.randint(0, 6))])}


def _code_row(rng: random.Random, split: str | None = None, seen: set | None = None) -> dict | None:
    prompt, body, kind = rng.choice(_CODE_TEMPLATES)
    fill = {"a": rng.randint(2, 60), "b": rng.randint(1, 60), "c": rng.choice("abcd")}
    if (split is not None and _split_of(prompt.format(**fill)) != split) or prompt.format(**fill) in (seen or ()):
        return None  # decided before the costlier part below (most draws repeat a problem: few templates use a, b, c)
    argument, draw = _CODE_INPUTS[kind]
    solution, namespace = f"def f({argument}):\n    {body.format(**fill)}\n", {}
    exec(solution, namespace)  # our own template: this is how the expected values are made
    inputs = sorted({repr(draw(rng)) for _ in range(8)})[:4]
    tests = [f"assert f({x}) == {namespace['f'](ast.literal_eval(x))!r}" for x in inputs]
    return {"prompt": prompt.format(**fill), "answer": solution, "tests": tests}


@functools.lru_cache(maxsize=8)
def general_prompts(kind: str, split: str) -> tuple[str, ...]:
    """Every general prompt of a kind ('greeting', 'expression', 'comparison') in a split."""
    prompts = {"greeting": [f"{g}, i am {name}" for g in _GREETINGS for name in _NAMES],
               "expression": [f"make {n}" for n in range(3, 151)],
               "comparison": [f"bigger: {a} or {b}" for a in range(1, 100) for b in range(1, 100) if a != b]}[kind]
    return tuple(p for p in prompts if _split_of(p) == split)


def general_row(prompt: str) -> dict:
    """A general prompt's row: no gold answer, its kind, and a fixed reference response of middling quality (polite
    but long, correct but long) that the gold win-rate compares against."""
    kind = general_kind(prompt)
    if kind == "greeting":
        reference = f"hello {prompt.split(', i am ')[1]}! how can i help?"
    elif kind == "expression":
        reference = f"1+{int(prompt.split()[1]) - 2}+1"
    else:
        reference = f"{max(int(n) for n in re.findall(r'[0-9]+', prompt))} is bigger"
    return {"prompt": prompt, "answer": None, "kind": kind, "reference": f"<answer>{reference}</answer>"}


def _general_row(rng: random.Random, split: str) -> dict:
    return general_row(rng.choice(general_prompts(rng.choice(("greeting", "expression", "comparison")), split)))


def _split_of(prompt: str) -> str:
    """A stable hash of the problem text decides its split, so train and test never share a problem."""
    return "test" if int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 5 == 0 else "train"


def make_dataset(name: str, split: str = "train", n: int = 1000, seed: int = 0, *, fewer_ok: bool = False
                 ) -> list[dict]:
    """n distinct rows {prompt, answer, ...} of a built-in task ("arithmetic", "countdown", "code", or the toy
    world's "general" prompts, whose answer is None) from the split ("train" or "test", about 80% and 20% of all
    problems, by prompt hash); the same for the same seed. A task with fewer problems than n (code has about 9,500
    train problems) raises ValueError once 20,000 draws in a row add none, or with fewer_ok returns the ones found."""
    seen: set = set()
    makers = {"arithmetic": _arithmetic_row, "countdown": _countdown_row,
              "code": lambda rng: _code_row(rng, split, seen), "general": lambda rng: _general_row(rng, split)}
    if name not in makers or split not in ("train", "test"):
        raise ValueError(f"make_dataset takes a name in {sorted(makers)} and split 'train' or 'test', "
                         f"not {name!r}, {split!r}")
    rng, rows, misses = random.Random(f"{name}/{split}/{seed}"), [], 0
    for _ in range(200 * n + 10_000):
        if len(rows) >= n:
            return rows
        if misses > 20_000:  # the task has no more problems in this split
            break
        row = makers[name](rng)
        misses += 1
        if row is not None and row["prompt"] not in seen and _split_of(row["prompt"]) == split:
            seen.add(row["prompt"])
            rows.append(row)
            misses = 0
    if fewer_ok and rows:
        return rows
    raise ValueError(f"only {len(rows)} distinct {split} problems of {name!r} were found: ask for fewer")


# ================================================================================================================
# The environment every RL script shares: data, prompts, rollouts, scoring, held-out evaluation
# ================================================================================================================
# Letters: B prompts, G samples per prompt, R = B*G rows (prompt-major: row i*G + j is sample j of prompt i),
# P prompt tokens, N completion tokens.

R1_TEMPLATE = ("A conversation between User and Assistant. The User asks a question and the Assistant solves it: "
               "it first reasons in its mind, then gives the answer. The reasoning goes inside <think> </think> and "
               "the answer inside <answer> </answer>.\nUser: {prompt}\nAssistant:")
REFLECTION_WORDS = ("wait", "re-check", "recheck", "let me check", "verify", "double-check", "hmm", "actually")


def reasons(text: str) -> bool:
    """The response reasons in a think block (the R1 template's <think>)."""
    return "<think>" in text


def reflects(text: str) -> bool:
    """The response uses a reflection word ("wait", "re-check", ...): R1-Zero's "aha moment", counted."""
    low = text.lower()
    return any(word in low for word in REFLECTION_WORDS)


# ------------------------------------------------------------------------------------------------ data


class DataError(K.UserError):
    """A problem in the user's data; the message names the file and line and says what to change."""


def is_messages(value) -> bool:
    """A non-empty list of chat messages {"role": str, "content": str}."""
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _too_long_number(error: ValueError) -> str:
    """The sentence for json's ValueError on an integer longer than Python converts from text (sys.int_info's
    default_max_str_digits, 4,300): no answer or test needs such a number, so the row is refused, not its text read."""
    return (f"a number too long to read ({str(error).partition(':')[0]}); write it as a string, or remove the "
            "row.")


def read_jsonl(path: str, parse_row) -> list:
    """Every row of a UTF-8 JSONL file (one JSON object a line; blank lines skipped; a byte-order mark accepted):
    parse_row(obj, where, line) returns a row or a list of rows, or raises DataError starting with `where` ("FILE,
    line N: "). A line that is not UTF-8, not JSON, or holds an integer of over 4,300 digits (more than Python reads
    from text) raises DataError naming the file and line too, before any model is loaded. The one reader every
    script uses; each passes the checks its rows need."""
    if not os.path.isfile(path):
        raise DataError(f"Dataset file {path!r} does not exist.")
    rows = []
    with open(path, "rb") as f:  # bytes, decoded line by line, so that bad UTF-8 is reported with its line
        for number, raw in enumerate(f, 1):
            where = f"{path}, line {number}: "
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors) is dropped
                if not line.strip():
                    continue
                obj = json.loads(line)
            except UnicodeDecodeError as error:
                raise DataError(f"{where}not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte column "
                                f"{error.start + 1}); save the file as UTF-8.") from None
            except json.JSONDecodeError as error:
                raise DataError(f"{where}not valid JSON ({error.msg} at column {error.colno}); write one JSON "
                                "object per line.") from None
            except RecursionError:
                raise DataError(f"{where}JSON nested too deeply to parse; write one flat object per line.") from None
            except ValueError as error:  # an integer of more digits than Python converts (4,300 by default)
                raise DataError(f"{where}{_too_long_number(error)}") from None
            parsed = parse_row(obj, where, number)
            rows.extend(parsed if isinstance(parsed, list) else [parsed])
    if not rows:
        raise DataError(f"{path} holds no rows.")
    return rows


def _is_empty(prompt) -> bool:
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    return not any(text.strip() for text in texts)


def check_prompt_row(row, where: str, required=()) -> dict:
    """An RL dataset row: an object with a non-empty 'prompt' (a string or chat messages) and every field in
    `required` (those the rewards read: answer, tests, ...); a DataError starting with `where` otherwise. A field
    given as null is present: that row has no gold, and the rewards that need one skip it (a dataset that mixes
    verifiable and general prompts, as R1's stage 4). A row's 'tests' (code_reward's, and the code verifier's
    wherever a row has them) must be in the form code_tests accepts: test strings that each run an assert, at their
    top level or in a check function they call, and none true or false by its form (`assert True`)."""
    if not isinstance(row, dict) or "prompt" not in row:
        columns = f"; this row's columns are {sorted(row)}" if isinstance(row, dict) else ""
        raise DataError(f"{where}each row must be an object with a 'prompt' (--prompt-column names another "
                        f"column{columns}).")
    if not (isinstance(row["prompt"], str) or is_messages(row["prompt"])):
        raise DataError(f"{where}'prompt' must be a string or a non-empty list of messages "
                        "{\"role\": str, \"content\": str}.")
    if _is_empty(row["prompt"]):
        raise DataError(f"{where}the prompt is empty; remove the row or give it a prompt.")
    missing = [name for name in required if name not in row]
    if missing:
        raise DataError(f"{where}no {missing[0]!r}, which the rewards need (fields here: {sorted(row)}).")
    if "tests" in row:
        try:
            code_tests(row["tests"])
        except DataError as error:
            raise DataError(f"{where}{error}") from None
    return row


def _renamed(row, prompt_column: str, answer_column: str):
    """The row with its prompt and answer columns named "prompt" and "answer"."""
    if not isinstance(row, dict):
        return row
    row = dict(row)
    for column, name in ((prompt_column, "prompt"), (answer_column, "answer")):
        if column != name and column in row:
            row[name] = row.pop(column)
    return row


def load_prompts(spec: str, split: str = "train", n: int = 20_000, seed: int = 0, *, prompt_column: str = "prompt",
                 answer_column: str = "answer", required=()) -> list[dict]:
    """Rows {prompt, answer, ...} of an RL dataset, every row checked (check_prompt_row) before any model loads:
      a built-in task            its split, n rows (make_dataset)
      FILE.jsonl / FILE.json     one object a line / a list of objects; errors name the line / the item
      DIR, FILE.parquet, hub id  through the `datasets` package (load_from_disk for a directory saved with
                                 save_to_disk; `split` picks the split of a hub dataset)
    prompt_column / answer_column name the columns that hold the prompt and the gold answer (GSM8K: question,
    answer; its "... #### 72" solutions are reduced to 72 by the accuracy reward)."""
    if spec in TASK_REWARDS:  # n rows, or every problem of a smaller task
        return make_dataset(spec, split=split, n=n, seed=seed, fewer_ok=True)

    def checked(row, where, line=0):
        flags = ((prompt_column, "--prompt-column", prompt_column != "prompt"),
                 (answer_column, "--answer-column", answer_column != "answer" and "answer" in required))
        for column, flag, needed in flags:  # the user's column by its own name, not "prompt" or "answer"
            if needed and isinstance(row, dict) and column not in row:
                raise DataError(f"{where}no column {column!r} ({flag}); this row's columns are {sorted(row)}.")
        return check_prompt_row(_renamed(row, prompt_column, answer_column), where, required)

    if spec.endswith(".jsonl"):
        return read_jsonl(spec, checked)
    if spec.endswith(".json") and os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8-sig") as f:
                items = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{spec}: not a JSON list of objects ({error}).") from None
        except ValueError as error:
            raise DataError(f"{spec}: {_too_long_number(error)}") from None
        if not isinstance(items, list) or not items:
            raise DataError(f"{spec}: expected a non-empty JSON list of objects (or a .jsonl file).")
        return [checked(item, f"{spec}, item {i}: ") for i, item in enumerate(items)]
    local = os.path.exists(spec)
    if not local and (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "." in os.path.basename(spec)):
        raise DataError(f"--dataset {spec!r}: no such file or directory; use a built-in task "
                        f"({', '.join(sorted(TASK_REWARDS))}), a .jsonl/.json/.parquet file, a dataset directory, "
                        "or a hub id.")
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset {spec}: reading a dataset directory, parquet file or hub dataset needs the "
                        "`datasets` package (pip install datasets); or convert it to .jsonl.") from None
    try:
        if os.path.isdir(spec):
            data = datasets.load_from_disk(spec)
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        elif spec.endswith(".parquet"):
            data = datasets.load_dataset("parquet", data_files=spec, split="train")
        else:
            data = datasets.load_dataset(spec, split=split)
    except (FileNotFoundError, KeyError, ValueError, ConnectionError, OSError) as error:
        raise DataError(f"--dataset {spec} (split {split!r}): {str(error).splitlines()[0] if str(error) else error!r}"
                        ) from None
    return [checked(dict(row), f"{spec}, row {i}: ") for i, row in enumerate(data)]


def fit_prompts(tokenizer, rows: list[dict], *, max_new_tokens: int, context: int | None, source: str,
                template: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """The rows whose rendered prompt leaves room for max_new_tokens in the model's context; the others are dropped
    with a warning naming how many (all of them: DataError). Rows whose text the tokenizer cannot represent (it
    maps those characters to its unknown token, e.g. "2×3" for the toy's ASCII tokenizer) are named in a warning,
    never silently changed."""
    unk, kept, too_long, unknown, shortest = getattr(tokenizer, "unk_token_id", None), [], 0, [], math.inf
    for i, row in enumerate(rows):
        ids = tokenizer(render_prompt(tokenizer, row["prompt"], template, system_prompt),
                        add_special_tokens=False)["input_ids"]
        if unk is not None and unk in ids:
            unknown.append(i)
        shortest = min(shortest, len(ids))
        if context is not None and len(ids) + max_new_tokens > context:
            too_long += 1
        else:
            kept.append(row)
    if unknown:
        warnings.warn(f"{source}: {len(unknown)} prompt(s) hold characters the tokenizer cannot represent (mapped to "
                      f"{tokenizer.unk_token}), e.g. row {unknown[0]}: {str(rows[unknown[0]]['prompt'])[:60]!r}",
                      RuntimeWarning, stacklevel=2)
    if not kept:
        raise DataError(f"{source}: no prompt fits the model's context of {context} tokens with --max-new-tokens "
                        f"{max_new_tokens}; shorten the prompts or lower --max-new-tokens (the shortest prompt "
                        f"leaves room for {max(0, context - shortest)}).")
    if too_long:
        warnings.warn(f"{source}: dropped {too_long} of {len(rows)} prompts that leave no room for --max-new-tokens "
                      f"{max_new_tokens} in the model's context of {context} tokens", RuntimeWarning, stacklevel=2)
    return kept


def load_train_and_eval(dataset: str, eval_dataset: str | None, reward_fns, *, split: str = "train",
                        eval_size: int = 200, seed: int = 0, prompt_column: str = "prompt",
                        answer_column: str = "answer") -> tuple[list[dict], list[dict]]:
    """An RL script's (train rows, held-out rows), every row checked for the fields the rewards read: the held-out
    rows come from eval_dataset (its "test" split), a built-in task's test split, or else a seeded slice of the
    training data (hold_out, announced). eval_size 0: no evaluation."""
    load = functools.partial(load_prompts, seed=seed, prompt_column=prompt_column, answer_column=answer_column,
                             required=required_fields(reward_fns))
    train_rows = load(dataset, split, 20_000)
    check_rewards(reward_fns, train_rows, dataset)
    if not eval_size:
        return train_rows, []
    if eval_dataset:
        return train_rows, load(eval_dataset, "test", eval_size)[:eval_size]
    if dataset in TASK_REWARDS:
        return train_rows, load(dataset, "test", eval_size)
    train_rows, eval_rows = hold_out(train_rows, eval_size, seed)
    K.print0(f"Held out {len(eval_rows)} of {dataset}'s rows for evaluation (seed {seed}; --eval-dataset to choose).")
    return train_rows, eval_rows


def hold_out(rows: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded slice of min(size, a tenth of the rows) for evaluation, when a dataset comes
    without a held-out set of its own."""
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    held = set(order[:min(size, len(rows) // 10)])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ------------------------------------------------------------------------------------------------ prompts


def uses_chat_template(tokenizer, prompt, template: str = "auto") -> bool:
    """Whether render_prompt renders this prompt with the chat template (messages always are)."""
    return isinstance(prompt, list) or template == "chat" or (
        template == "auto" and getattr(tokenizer, "chat_template", None) is not None)


def render_prompt(tokenizer, prompt, template: str = "auto", system_prompt: str | None = None) -> str:
    """The text a model continues for a prompt (a string or chat messages). template: "chat" (the tokenizer's chat
    template with the generation prompt), "r1" (R1_TEMPLATE around a string), "plain" (the string as it is), or
    "auto" (chat when the tokenizer has a template, else r1). Chat messages always use the chat template."""
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) is not None else "r1"
    if uses_chat_template(tokenizer, prompt, template):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("This tokenizer has no chat template; use --template r1 or plain with string prompts.")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return R1_TEMPLATE.format(prompt=prompt) if template == "r1" else prompt


def longest_prompt(tokenizer, rows: list[dict], template: str = "auto", system_prompt: str | None = None) -> int:
    """The most tokens any row's prompt takes once rendered: with max_new_tokens, the KV cache a compiled decoder needs
    for the whole run (rl_kernels.set_generation_length)."""
    texts = [render_prompt(tokenizer, row["prompt"], template, system_prompt) for row in rows]
    chat = bool(rows) and uses_chat_template(tokenizer, rows[0]["prompt"], template)
    return max((len(ids) for ids in tokenizer(texts, add_special_tokens=not chat)["input_ids"]), default=1)


def model_config(name_or_path: str):
    """The model's transformers config, read from its config.json alone: no weights are loaded."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(K.resolve_model_path(name_or_path))
    except (OSError, ValueError) as error:
        raise K.UserError(f"--model {name_or_path}: {str(error).splitlines()[0]}") from None


def check_context(tokenizer, rows: list[dict], *, context: int | None, max_new_tokens: int, source: str,
                  template: str = "auto", system_prompt: str | None = None, measured: int = 64) -> int:
    """The longest rendered prompt of rows, in tokens, after checking that it leaves room for max_new_tokens in the
    model's context (a UserError naming both numbers otherwise). It measures the `measured` rows with the longest
    prompt texts: within one dataset tokens grow with characters, and tokenizing 20,000 rows takes seconds."""
    longest_rows = sorted(rows, key=lambda row: len(str(row["prompt"])), reverse=True)[:measured]
    longest = longest_prompt(tokenizer, longest_rows, template, system_prompt)
    if context is not None and longest + max_new_tokens > context:
        fix = (f"use --max-new-tokens {context - longest} or less" if context > longest else
               "shorten that prompt or drop its row (no --max-new-tokens fits)")
        raise K.UserError(f"--max-new-tokens {max_new_tokens} plus {source}'s longest prompt ({longest} tokens) "
                          f"exceeds the model's context of {context} tokens (max_position_embeddings); {fix}.")
    return longest


def kv_cache_bytes(config, rows: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a static KV cache as rl_kernels.generate allocates it: keys and values of every layer for `rows`
    sequences of `tokens` positions, rows x tokens x layers x 2 x kv_heads x head_dim x bytes per element."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return rows * tokens * text.num_hidden_layers * 2 * kv_heads * head_dim * dtype.itemsize


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take now: the CUDA device's free memory (torch.cuda.mem_get_info), else the RAM
    the kernel reports available (MemAvailable in /proc/meminfo, os.sysconf's available pages elsewhere); None where
    neither can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_kv_memory(config, uses: dict[str, int], tokens: int, dtype: torch.dtype, device: torch.device, *,
                    flags: str):
    """Before any weights load: the KV caches of a run's generate calls fit in the device's free memory (RAM on
    CPU, shared by this machine's ranks). uses: rows per generate call by use ("rollout": 128, ...); rl_kernels keeps
    one cache per use between calls, so they add up. A UserError names the sizes and `flags`, the flags that shrink
    them, otherwise. The weights, the optimizer and the activations come on top: passing is no promise that the run
    fits, failing is a certainty that it does not."""
    free = available_memory(device)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type != "cuda" else 1
    need = ranks_here * sum(kv_cache_bytes(config, rows, tokens, dtype) for rows in uses.values())
    if free is not None and need > free:
        rows = " + ".join(f"{n} {use}" for use, n in uses.items() if n)
        where = (f"{device} has {_size(free)} free" if device.type == "cuda" else
                 f"this machine has {_size(free)} of RAM available" + (f" for its {ranks_here} ranks"
                                                                       if ranks_here > 1 else ""))
        raise K.UserError(f"The KV caches of generation would take {_size(need)} ({rows} rows x {tokens} "
                          f"positions x {kv_cache_bytes(config, 1, 1, dtype)} bytes) but {where}; lower {flags}.")


def encode_prompts(tokenizer, texts: list[str], device, add_special_tokens: bool = False) -> tuple:
    """Rendered prompts -> (input_ids, attention_mask), each (B, P), left-padded as the tokenizer is set up.
    add_special_tokens: the tokenizer's own BOS and the like, for text that no chat template has rendered."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# ------------------------------------------------------------------------------------------------ rollouts


@dataclasses.dataclass
class Rollout:
    """G completions for each of B prompts, R = B*G rows, prompt-major, and their scores once score() has run."""
    prompt_ids: "torch.Tensor"   # (R, P) left-padded prompt of each row
    prompt_mask: "torch.Tensor"  # (R, P)
    gen: K.Generation            # tokens, mask, truncated, logprobs: (R, N)
    completions: list            # R decoded completions (special tokens dropped)
    rows: list                   # R dataset rows, each row's prompt repeated G times
    rewards: "torch.Tensor | None" = None  # (R,) weighted total reward
    per_reward: dict = dataclasses.field(default_factory=dict)  # name -> R values (None: does not apply)
    correct: list | None = None  # R verdicts of the task's verifier (False where there is none)

    def select(self, rows: list[int]) -> "Rollout":
        """The rollout restricted to rows (e.g. the groups DAPO's dynamic sampling keeps)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
        gen = self.gen
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows],
                       gen.select(rows),
                       pick(self.completions), pick(self.rows),
                       None if self.rewards is None else self.rewards[rows],
                       {k: pick(v) for k, v in self.per_reward.items()}, pick(self.correct))

    @staticmethod
    def cat(parts: list["Rollout"]) -> "Rollout":
        """Several rollouts as one (e.g. DAPO's sampling rounds), padding prompts on the left, completions on the right."""
        if len(parts) == 1:
            return parts[0]
        P = max(p.prompt_ids.shape[1] for p in parts)
        left = lambda x: torch.nn.functional.pad(x, (P - x.shape[1], 0))  # noqa: E731
        return Rollout(torch.cat([left(p.prompt_ids) for p in parts]), torch.cat([left(p.prompt_mask) for p in parts]),
                       K.Generation.cat([p.gen for p in parts]),
                       sum((p.completions for p in parts), []), sum((p.rows for p in parts), []),
                       torch.cat([p.rewards for p in parts]),
                       {k: sum((p.per_reward[k] for p in parts), []) for k in parts[0].per_reward},
                       sum((p.correct for p in parts), []))

    def batch(self, keep_sampling_mask: bool = True) -> dict:
        """The tensors an update needs: {prompt_ids, prompt_mask, tokens, mask, sampler_logprobs (log mu), kept_logmass
        (log S, 0 without truncation), rows (the row indices, for gathering per-micro-batch results)} (R, ...), and
        keep_ids (R, N, M) when the sampler truncated
        (top-k / top-p) and keep_sampling_mask: every log-prob pass then renormalises over the sampler's kept sets."""
        batch = dict(prompt_ids=self.prompt_ids, prompt_mask=self.prompt_mask, tokens=self.gen.tokens,
                     mask=self.gen.mask, sampler_logprobs=self.gen.logprobs,
                     kept_logmass=self.gen.kept_logmass if self.gen.kept_logmass is not None else
                     torch.zeros_like(self.gen.logprobs),
                     rows=torch.arange(self.gen.mask.shape[0], device=self.gen.mask.device))
        if keep_sampling_mask and self.gen.keep_ids is not None:
            batch["keep_ids"] = self.gen.keep_ids
        return batch


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (Qwen's <|im_end|>, Llama 3's <|eot_id|>,
    Gemma's <end_of_turn>), found by rendering one assistant turn and reading the token after its content; None
    when there is no template, or what follows the content is not one special token."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    marker = "ENDOFTURNPROBE"
    turn = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # noqa: BLE001 (a template may refuse this conversation: it then has no end of turn to find)
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    ids = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids[0] if ids and ids[0] in special | set(tokenizer.all_special_ids) else None


def stop_token_ids(tokenizer, model, chat: bool = False) -> list[int]:
    """Every id that ends a response: the model's own (rl_kernels.eos_token_ids: Qwen2.5-Instruct's generation config
    lists <|im_end|> and <|endoftext|>), the tokenizer's EOS, and under a chat template the token that closes an
    assistant turn. Decoding stops at whichever comes first; the row's mask ends there and a score sits there."""
    ids = K.eos_token_ids(model) + [tokenizer.eos_token_id] + ([end_of_turn_id(tokenizer)] if chat else [])
    return list(dict.fromkeys(i for i in ids if i is not None))


def decode(tokenizer, gen: K.Generation) -> list[str]:
    """The completions' text, EOS and padding dropped."""
    return tokenizer.batch_decode(gen.tokens.masked_fill(gen.mask == 0, tokenizer.pad_token_id),
                                  skip_special_tokens=True)


def sample(model, tokenizer, rows: list[dict], *, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, template: str = "auto", system_prompt: str | None = None,
           noise_keys=None, generator: torch.Generator | None = None, compile: bool | None = None,
           logit_noise: float = 0.0) -> Rollout:
    """num_samples completions for each row's prompt: render, tokenize, rl_kernels.generate (each prompt prefilled
    once, each row stopped at the first of stop_token_ids), decode. noise_keys: one int per row of the result
    (rl_kernels.rollout_noise_keys), or else a generator."""
    texts = [render_prompt(tokenizer, row["prompt"], template, system_prompt) for row in rows]
    device = next(K.unwrap(model).parameters()).device
    chat = uses_chat_template(tokenizer, rows[0]["prompt"], template)
    ids, mask = encode_prompts(tokenizer, texts, device, add_special_tokens=not chat)      # (B, P)
    keys = None if noise_keys is None else torch.tensor(noise_keys, device=device)         # (R,)
    gen = K.generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     top_k=top_k, logit_noise=logit_noise, num_samples=num_samples, eos_token_id=stop_token_ids(tokenizer, model, chat),
                     pad_token_id=tokenizer.pad_token_id, noise_keys=keys, generator=generator,
                     compile=compile)                                                      # (R, N)
    return Rollout(ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0), gen,
                   decode(tokenizer, gen), [row for row in rows for _ in range(num_samples)])


# ------------------------------------------------------------------------------------------------ scoring


SHAPING_REWARDS = ("format", "tag_count")


def reward_weights(names, weights=()) -> tuple[float, ...]:
    """The weights of the rewards `names`: as given, else 1 each, except a shaping reward (format, tag_count)
    beside others, 0.1: a nudge toward the template that must not outweigh being right."""
    return tuple(weights) or tuple(0.1 if name in SHAPING_REWARDS and len(names) > 1 else 1.0 for name in names)


def check_reward_weights(names, weights):
    """One weight per reward, or none (the defaults): else one sentence, before anything loads."""
    if weights and len(names) != len(weights):
        raise K.UserError(f"--rewards has {len(names)} entries but --reward-weights has {len(weights)}; give one "
                          "weight per reward, or none for the defaults.")


def resolve_rewards(names, dataset: str) -> list[tuple[str, object]]:
    """[(name, fn)] for reward names: built-ins, "module:function", and "task" = the dataset's own verifier
    (accuracy for a dataset that is not a built-in task)."""
    fns = []
    for name in names:
        if name == "task":
            fn = TASK_REWARDS.get(dataset, accuracy_reward)
            name = getattr(fn, "__name__", "task").removesuffix("_reward")
        else:
            try:
                fn = get_reward(name)
            except (ValueError, ImportError, AttributeError, TypeError) as error:  # the user's --rewards
                raise K.UserError(f"--rewards {name}: {error}") from error
        fns.append((name, fn))
    return fns


def required_columns(fn) -> set[str]:
    """Dataset columns a reward function needs: its parameters after `completions` that have no default."""
    bound = set(getattr(fn, "keywords", {}) or {})
    return {name for i, (name, p) in enumerate(inspect.signature(fn).parameters.items())
            if i > 0 and p.default is inspect.Parameter.empty and name not in bound
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def required_fields(reward_fns) -> list[str]:
    """The dataset fields the rewards [(name, fn)] read (load_prompts checks every row holds them)."""
    return sorted(set().union(*(required_columns(fn) for _, fn in reward_fns)))


def check_rewards(reward_fns, rows: list[dict], source: str):
    """Before any model is loaded: every row holds the fields each reward needs (the first row that does not is
    named), and code can be run (a machine with no working sandbox raises here, not after an hour of loading,
    and never scores every sample 0)."""
    for name, fn in reward_fns:
        needed = required_columns(fn)
        for i, row in enumerate(rows):
            missing = sorted(column for column in needed if column not in row)  # null: no gold here, skipped
            if missing:
                raise DataError(f"{source}, row {i}: reward '{name}' needs the field(s) {missing}, which this row does "
                                f"not have (its fields: {sorted(row)}).")
    if any(fn is code_reward for _, fn in reward_fns) or any("tests" in row for row in rows[:1]):
        sandbox.require_sandbox()


def verify(completions: list[str], rows: list[dict]) -> list[bool] | None:
    """The task verifier the rows' fields call for (code tests, countdown numbers + target, or a gold answer):
    each completion fully correct or not; None when the rows have nothing to check against."""
    columns = {k: [row.get(k) for row in rows] for k in rows[0]} if rows else {}
    verifier = (code_reward if "tests" in columns else
                countdown_reward if "numbers" in columns and "target" in columns else
                accuracy_reward if "answer" in columns else None)
    return None if verifier is None else [v == 1.0 for v in verifier(completions, **columns)]


def score(rollout: Rollout, reward_fns, weights, *, reward_timeout_s: float | None = None, should_stop=None,
          **extra) -> Rollout:
    """Fill rollout.rewards (weighted total), per_reward and correct (the task's verdicts, reused from the task
    reward when it is one of the rewards). extra goes to every reward (completion_lengths, group_size, ...);
    reward_timeout_s and should_stop bound each reward call (combine_rewards)."""
    rows = rollout.rows
    columns = {k: [row.get(k) for row in rows] for k in rows[0]}
    total, values = combine_rewards([(fn, w) for (_, fn), w in zip(reward_fns, weights)], rollout.completions,
                                    reward_timeout_s=reward_timeout_s, should_stop=should_stop, **columns, **extra)
    rollout.per_reward = {name: vals for (name, _), vals in zip(reward_fns, values.values())}
    verifiers = tuple(TASK_REWARDS.values())
    task_values = next((vals for (_, fn), vals in zip(reward_fns, values.values()) if fn in verifiers), None)
    correct = ([v == 1.0 for v in task_values] if task_values is not None  # code: every test passes
               else verify(rollout.completions, rows))
    rollout.rewards = torch.tensor(total, dtype=torch.float32)
    rollout.correct = correct or [False] * len(total)
    return rollout


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """The diagnostics every run should log for a scored rollout (this rank's; all-reduce with
    rl_kernels.reduce_metrics): reward, accuracy, lengths split by correctness, truncation, reasoning, reflection and
    readable (rlvr_rewards.is_readable) shares, and each reward's mean. rollout/reward_sq_mean is there so that the std can be formed after the mean."""
    gen, rewards = rollout.gen, rollout.rewards
    lengths = gen.mask.sum(-1).float().cpu()
    correct = torch.tensor(rollout.correct, dtype=torch.bool)
    n = len(rollout.completions)
    m = {"rollout/reward_mean": rewards.mean().item(), "rollout/reward_sq_mean": rewards.square().mean().item(),
         "rollout/accuracy": correct.float().mean().item(), "rollout/response_length": lengths.mean().item(),
         "rollout/truncated_share": gen.truncated.float().mean().item(),
         "rollout/reasoning_share": sum(map(reasons, rollout.completions)) / n,
         "rollout/reflection_share": sum(map(reflects, rollout.completions)) / n,
         "rollout/readable_share": sum(map(is_readable, rollout.completions)) / n,  # R1's format (the toy's)
         "rollout/length_correct": lengths[correct].mean().item() if correct.any() else float("nan"),
         "rollout/length_incorrect": lengths[~correct].mean().item() if (~correct).any() else float("nan")}
    for name, values in rollout.per_reward.items():
        present = [v for v in values if v is not None]
        m[f"rewards/{name}"] = sum(present) / len(present) if present else float("nan")
    counts = sandbox.stats()  # since the process started: sandboxed runs that failed to clean up, timed out, ...
    m.update({f"sandbox/{k}": float(counts[k]) for k in ("cleanup_failures", "timeouts", "errors", "math_untried")})
    return m


TRUNCATION_WARNING_SHARE = 0.5  # most rollouts cut: the length cap, not the task, decides most rewards


def warn_truncation(metrics: dict, step: int, max_new_tokens: int, warned: bool) -> bool:
    """Warn, once per run, on rank 0, the first step whose rollouts (all ranks: metrics all-reduced) were mostly cut
    at --max-new-tokens (rollout/truncated_share above TRUNCATION_WARNING_SHARE), naming the share measured. Half is
    the threshold because a cut response has no final answer, so past it the cap decides most rewards; some cut
    responses are normal, and a share that high is not (TRL's default of 256 tokens cut 57% of GSM8K answers in a
    2026 field test). Returns whether the run has now warned; pass it back in."""
    share = metrics.get("rollout/truncated_share", 0.0)
    if warned or not share > TRUNCATION_WARNING_SHARE:
        return warned
    if K.get_rank() == 0:
        warnings.warn(f"{share:.0%} of step {step}'s rollouts hit --max-new-tokens {max_new_tokens} before their end "
                      "(rollout/truncated_share): a cut response has no final answer, so the cap decides their rewards; "
                      "raise --max-new-tokens (this warning is shown once per run)", RuntimeWarning, stacklevel=2)
    return True


MISMATCH_WARNING = 1.05  # token_mult_prob_error above this is read as a bug (NeMo-RL's threshold)


def sampler_gap(batch: dict, correction: K.Correction) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """The sampler against the trainer before an update, once a pi_old pass has filled batch["old_logprobs"]: (the
    mismatch/ metrics, the decoupled correction's IS weights or None, its 0/1 keep mask or None), from rho = pi_old /
    mu per token (rl_kernels.rollout_correction; weights and keep are None unless the correction reweights). ({},
    None, None) when no pi_old pass ran or in bypass mode (old_logprobs is the sampler's: the update's first forward
    measures the gap instead). A collective: every rank calls it."""
    if "old_logprobs" not in batch or correction.bypass:
        return {}, None, None
    metrics = K.mismatch_metrics(batch["sampler_logprobs"], batch["old_logprobs"], batch["mask"], batch["kept_logmass"])
    if not correction.reweights:
        return metrics, None, None
    weights, keep = K.rollout_correction(batch["old_logprobs"] - batch["sampler_logprobs"], batch["mask"], correction)
    return {**metrics, **K.correction_metrics(weights, keep, batch["mask"])}, weights, keep


def warn_mismatch(metrics: dict, step: int, warned: bool) -> bool:
    """Warn, once per run, on rank 0, the first step whose sampler and trainer disagree by more than numerics do:
    mismatch/token_mult_prob_error = mean exp|log mu - log pi_old| above MISMATCH_WARNING (bf16 engines measure about
    1.01; above 1.05 a sampler computes another function: stale weights, a wrong temperature or top-p, a template
    mismatch). Returns whether the run has now warned; pass it back in."""
    error = metrics.get("mismatch/token_mult_prob_error", 1.0)
    if warned or not error > MISMATCH_WARNING:
        return warned
    if K.get_rank() == 0:
        warnings.warn(f"step {step}: sampler and trainer disagree, mismatch/token_mult_prob_error {error:.3f} > "
                      f"{MISMATCH_WARNING} (mean |log mu - log pi_old| {metrics.get('mismatch/logprob_diff_mean', 0):.3g}"
                      "): expected near 1.0 when both compute the same policy; check the sampler's weights, "
                      "temperature, top-p/top-k and --keep-sampling-mask (this warning is shown once per run)",
                      RuntimeWarning, stacklevel=2)
    return True


def rollout_metric_weights(rollout: Rollout) -> dict[str, float]:
    """What each of rollout_metrics' means that is over a subset of the rows is a mean over, on this rank (the
    correct responses, the incorrect ones, the responses a reward applies to): rl_kernels.reduce_metrics' weights,
    so that the mean over ranks is the mean over every rank's responses. The other means are over all R rows,
    the same number on every rank."""
    correct = sum(map(bool, rollout.correct))
    weights = {"rollout/length_correct": float(correct), "rollout/length_incorrect": float(len(rollout.correct) - correct)}
    for name, values in rollout.per_reward.items():
        weights[f"rewards/{name}"] = float(sum(v is not None for v in values))
    return weights


def finish_reward_std(metrics: dict) -> dict:
    """Replace the all-reduced rollout/reward_sq_mean by rollout/reward_std = sqrt(E[r^2] - E[r]^2)."""
    sq = metrics.pop("rollout/reward_sq_mean")
    metrics["rollout/reward_std"] = math.sqrt(max(0.0, sq - metrics["rollout/reward_mean"] ** 2))
    return metrics


def rollout_samples(rollout: Rollout, advantages: "torch.Tensor", count: int) -> list[dict]:
    """A few completions of a scored rollout for samples.jsonl: prompt, completion, each reward, the total, the
    advantage (a token advantage averaged over the completion) and the verifier's verdict."""
    advantages = advantages if advantages.dim() == 1 else K.masked_mean(advantages, rollout.gen.mask, dim=-1)
    return [{"prompt": rollout.rows[i]["prompt"], "completion": rollout.completions[i],
             "rewards": {name: values[i] for name, values in rollout.per_reward.items()},
             "reward": rollout.rewards[i].item(), "advantage": advantages[i].item(), "correct": rollout.correct[i]}
            for i in range(min(count, len(rollout.completions)))]


# ------------------------------------------------------------------------------------------------ an RL run's task
# grpo.py and ppo.py share these: their Args inherit RLArgs, which these functions read (and seed, top_p if any).


@dataclass
class RLArgs:
    """The flags grpo.py and ppo.py share: the policy, the task and its data, the rollouts and the held-out evaluation
    (what load_task, fit_task, evaluator and rollout read)."""
    model: str = "toy"
    """the policy: a hub id or a local checkpoint directory; "toy" is the toy world's base model (toy/base)"""
    dataset: str = "arithmetic"
    """a built-in task (arithmetic, countdown, code), a .jsonl/.json/.parquet file, a `datasets` directory, a hub id"""
    eval_dataset: Optional[str] = None
    """held-out rows (its "test" split); default: a built-in task's test split, else a slice held out of --dataset"""
    prompt_column: str = "prompt"
    """the dataset column holding the prompt (GSM8K: question)"""
    answer_column: str = "answer"
    """the dataset column holding the gold answer (GSM8K's "... #### 72" solutions count as 72)"""
    dataset_split: str = "train"
    """the split of a hub dataset or dataset directory to train on"""
    template: Literal["auto", "chat", "r1", "plain"] = "auto"
    """auto: the tokenizer's chat template if it has one, else the R1 text template"""
    system_prompt: Optional[str] = None
    """system message for the chat template"""
    num_generations: int = 8
    """G: samples per prompt"""
    prompts_per_step: int = 16
    """B: prompts per step over all ranks"""
    max_new_tokens: int = 48
    """response length cap L_max"""
    temperature: float = 1.0
    """sampling temperature (it divides the logits of every log-prob pass too)"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: off)"""
    top_k: int = 0
    """keep the top_k most likely tokens (0: off); applied before top_p"""
    keep_sampling_mask: bool = True
    """under top-p/top-k, compute pi_old, pi_theta and pi_ref over the sampler's kept set, renormalised, so that the
    ratios are not off by the kept mass (DeepSeek-V3.2's "keep sampling mask"); --no-keep-sampling-mask: over the
    whole vocabulary, as TRL, verl and OpenRLHF do"""
    rollout_correction: Literal["none", "trl", "openrlhf", "icepop", "verl-token-tis", "verl-seq-tis", "verl-seq-is-rs",
                                "verl-geo-rs", "verl-k3-rs", "geo-tis", "bypass"] = "none"
    """sampler-trainer mismatch correction, named after the framework whose default it is (rl_kernels.CORRECTIONS);
    none: measure only (the mismatch/ metrics are logged either way)"""
    is_level: Optional[Literal["token", "sequence", "geometric", "off"]] = None
    """override the preset's IS weight level (off: no weights)"""
    is_mode: Optional[Literal["truncate", "mask"]] = None
    """override: truncate the weights to the bounds (TIS) or zero those outside (MIS)"""
    is_bounds: tuple[float, ...] = ()
    """override: (high,) or (low, high) of the IS weights"""
    rejection: tuple[str, ...] = ()
    """override: rejection options, verl's names (token_k1, seq_mean_k1, seq_max_k3, ...; rl_kernels.REJECTIONS)"""
    rejection_bounds: tuple[str, ...] = ()
    """bounds of the rejection options, verl's format: "0.999_1.001" (k1: ratio bounds) or "0.01" (k2/k3: upper)"""
    offpolicy_mask_delta: Optional[float] = None
    """DeepSeek-V3.2's off-policy sequence masking: drop a sequence with A < 0 whose mean log(mu/pi_theta) > delta"""
    sampler_logit_noise: float = 0.0
    """inject a sampler-trainer mismatch: keyed Gaussian noise of this std added to the sampler's logits / T"""
    batch_invariant: bool = False
    """batch-invariant kernels (fp32, CPU): the sampler's log-probs equal the trainer's bit for bit, in any batch,
    micro-batch or rank, so the mismatch is exactly zero (sampling ~2.7x slower; rl_kernels.set_batch_invariant)"""
    reward_weights: tuple[float, ...] = ()
    """one weight per reward; default 1 each, except the shaping rewards format and tag_count: 0.1 beside others"""
    reward_timeout_s: Optional[float] = None
    """stop with an error naming the reward if one reward call takes longer than this (None: no limit)"""
    eval_every: int = 10
    """evaluate every N steps, at the start and at the end (0: no evaluation, no held-out rows)"""
    eval_size: int = 200
    """held-out prompts per evaluation"""
    eval_samples: int = 4
    """k samples per prompt for pass@1 averaged over k (0: greedy only)"""
    eval_temperature: float = 1.0
    """temperature of the k evaluation samples"""
    log_samples: int = 4
    """completions per step written to samples.jsonl (prompt, completion, rewards, advantage)"""
    micro_batch_tokens: int = -1
    """padded tokens per forward/backward (rows length-sorted, each micro-batch trimmed; the gradient is the same
    sum); 0: the whole minibatch at once; -1: 2,048 on CPU, 8,192 on a GPU (lower it if activations do not fit)"""
    compile: bool = None
    """compile the decode step and the loss (default: on when a CUDA GPU is used)"""
    decode_memory: Literal["auto", "keep", "free"] = "auto"
    """the KV caches and the bf16 rollout copy of the weights between rollouts: keep them (nothing re-allocated, CUDA
    graphs replay) or free them before each update (memory for the update; compiled decoding then runs without CUDA
    graphs); auto: free under --strategy fsdp, where the rollout copy is the whole model on every rank"""
    offload_optimizer: bool = False
    """keep AdamW's state in CPU memory during each rollout (its 8 bytes per parameter, sharded: for the largest
    models, docs/memory.md); one copy each way per step"""


def check_sampling(args):
    """One sentence for sampling settings that cannot run: top-p, top-k, the injected noise, the correction."""
    if not 0 < args.top_p <= 1:
        raise K.UserError(f"--top-p {args.top_p}: must be in (0, 1] (1: off).")
    if args.top_k < 0:
        raise K.UserError(f"--top-k {args.top_k}: must be 0 (off) or more.")
    if args.sampler_logit_noise < 0:
        raise K.UserError(f"--sampler-logit-noise {args.sampler_logit_noise}: a standard deviation, 0 or more.")
    if args.offpolicy_mask_delta is not None and args.offpolicy_mask_delta < 0:
        raise K.UserError(f"--offpolicy-mask-delta {args.offpolicy_mask_delta}: a KL threshold, 0 or more.")
    correction_of(args)


def correction_of(args) -> K.Correction:
    """The mismatch correction of --rollout-correction with the overrides given (checked: one sentence if it cannot
    run)."""
    name = getattr(args, "rollout_correction", "none")
    if name not in K.CORRECTIONS:
        raise K.UserError(f"--rollout-correction {name!r}: use one of {', '.join(K.CORRECTIONS)}.")
    corr = K.CORRECTIONS[name]
    changes = {}
    if getattr(args, "is_level", None) is not None:
        changes["is_level"] = None if args.is_level == "off" else args.is_level
    if getattr(args, "is_mode", None) is not None:
        changes["is_mode"] = args.is_mode
    bounds = tuple(getattr(args, "is_bounds", ()))
    if bounds:
        if len(bounds) > 2:
            raise K.UserError(f"--is-bounds {' '.join(map(str, bounds))}: give HIGH or LOW HIGH.")
        changes.update(is_low=bounds[0] if len(bounds) == 2 else None, is_high=bounds[-1])
    if getattr(args, "rejection", ()):
        changes.update(rejection=tuple(args.rejection), rejection_bounds=tuple(args.rejection_bounds))
    elif getattr(args, "rejection_bounds", ()):
        changes["rejection_bounds"] = tuple(args.rejection_bounds)
    corr = dataclasses.replace(corr, **changes)
    K.check_correction(corr)
    return corr


def load_task(args, reward_fns, weights: tuple[float, ...], device) -> tuple[object, list[dict], list[dict]]:
    """An RL run's (args, train rows, held-out rows): args with the reward weights, --decode-memory and the micro-batch
    size on this device resolved (as args.json records them), the rows checked against what the rewards read, --model's
    source checked, and every length (fit_generation: the context, the KV caches' memory): everything a user can get
    wrong fails here, before any model is loaded."""
    check_sampling(args)
    decode_memory = args.decode_memory if args.decode_memory != "auto" else \
        "free" if getattr(args, "strategy", "ddp") == "fsdp" else "keep"
    args = dataclasses.replace(args, reward_weights=weights, decode_memory=decode_memory,
                               micro_batch_tokens=K.micro_batch_tokens(args.micro_batch_tokens, device))
    train_rows, eval_rows = load_train_and_eval(
        args.dataset, args.eval_dataset, reward_fns, split=args.dataset_split,
        eval_size=args.eval_size * bool(args.eval_every), seed=args.seed, prompt_column=args.prompt_column,
        answer_column=args.answer_column)
    K.check_model_source(args.model)
    train_rows, eval_rows = fit_generation(args, train_rows, eval_rows, device)
    return args, train_rows, eval_rows


def fit_generation(args, train_rows: list[dict], eval_rows: list[dict], device) -> tuple[list, list]:
    """Every length checked before any weights load (from the model's config.json and tokenizer): a dataset's
    prompts that leave no room for --max-new-tokens in the model's context are dropped (fit_prompts), a built-in
    task's must all fit (check_context), and the KV caches of the rollouts and evaluations must fit in free memory
    (check_kv_memory). Returns the rows kept."""
    path = K.resolve_model_path(args.model)
    config, tokenizer = model_config(path), K.load_tokenizer(path)
    context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    if args.dataset not in TASK_REWARDS:
        fit = functools.partial(fit_prompts, tokenizer, max_new_tokens=args.max_new_tokens, context=context,
                                template=args.template, system_prompt=args.system_prompt)
        train_rows, eval_rows = fit(train_rows, source=args.dataset), eval_rows and fit(eval_rows, source="eval")
    longest = max(check_context(tokenizer, rows, context=context, max_new_tokens=args.max_new_tokens, source=source,
                                template=args.template, system_prompt=args.system_prompt)
                  for rows, source in ((train_rows, args.dataset), (eval_rows, "the held-out set")) if rows)
    world = K.get_world_size()
    eval_batch = min(64, -(-len(eval_rows) // world)) if eval_rows else 0  # evaluate's batch_size
    uses = {"rollout": args.prompts_per_step // world * args.num_generations, "greedy evaluation": eval_batch,
            "sampled evaluation": eval_batch * args.eval_samples}
    compute = K.resolve_precision(args.dtype, args.master_dtype, device)[0]
    check_kv_memory(config, uses, -(-longest // 16) * 16 + args.max_new_tokens, compute, device,  # generate's bucket
                    flags=f"--max-new-tokens {args.max_new_tokens} (or --prompts-per-step, --num-generations, "
                          "--eval-samples)")
    return train_rows, eval_rows


def fit_task(args, policy, tokenizer, train_rows: list[dict], eval_rows: list[dict]) -> tuple[list, list]:
    """Under --compile, the run's one KV-cache length (rl_kernels.set_generation_length); the rows were fitted to the
    context before the model loaded (load_task, fit_generation)."""
    if args.compile:
        K.set_generation_length(policy, longest_prompt(tokenizer, train_rows + eval_rows, args.template,
                                                       args.system_prompt), args.max_new_tokens,
                                cuda_graphs=args.decode_memory != "free")
    return train_rows, eval_rows


def evaluator(args, policy, tokenizer, eval_rows: list[dict]):
    """evaluate() of the policy on the held-out rows with the run's settings (None without held-out rows)."""
    if not eval_rows:
        return None
    return lambda: evaluate(K.unwrap(policy), tokenizer, eval_rows, max_new_tokens=args.max_new_tokens,
                            samples=args.eval_samples, temperature=args.eval_temperature, seed=args.seed,
                            template=args.template, system_prompt=args.system_prompt, compile=args.compile)


def rollout(args, policy, tokenizer, rows: list[dict], reward_fns, noise_keys, timer, should_stop=None) -> Rollout:
    """args.num_generations samples for each row (noise keyed by rl_kernels.rollout_noise_keys), scored; timer
    (rl_runs.Timer) takes the "generate" and "reward" seconds. A stop requested while a reward runs raises
    Interrupted (should_stop: the local flag)."""
    with timer("generate"):
        part = sample(policy, tokenizer, rows, num_samples=args.num_generations, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, template=args.template,
                      system_prompt=args.system_prompt, compile=args.compile, noise_keys=noise_keys,
                      logit_noise=args.sampler_logit_noise)
    with timer("reward"):
        score(part, reward_fns, args.reward_weights, reward_timeout_s=args.reward_timeout_s, should_stop=should_stop,
              completion_lengths=part.gen.lengths.tolist(), group_size=args.num_generations)
    return part


# ------------------------------------------------------------------------------------------------ evaluation


@dataclasses.dataclass
class EvalCounts:
    """Sums over held-out prompts, all-reduced over ranks before the ratios are formed."""
    prompts: float = 0.0          # prompts evaluated greedily
    correct: float = 0.0          # greedy completions the verifier accepts
    tokens: float = 0.0           # greedy completion tokens
    reasoning: float = 0.0        # greedy completions that reason (<think>)
    sampled_prompts: float = 0.0  # prompts with k samples at eval_temperature
    sample_correct: float = 0.0   # sum over those prompts of (correct samples / k): pass@1 averaged over k

    def all_reduce(self) -> "EvalCounts":
        fields = [f.name for f in dataclasses.fields(self)]
        sums = K.all_reduce_sum(torch.tensor([getattr(self, f) for f in fields], dtype=torch.float64))
        return EvalCounts(**dict(zip(fields, sums.tolist())))


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], *, max_new_tokens: int, samples: int = 0, temperature: float = 1.0,
             seed: int = 0, template: str = "auto", system_prompt: str | None = None, compile: bool | None = None,
             batch_size: int = 64) -> dict[str, float]:
    """Held-out metrics of a policy: greedy accuracy, response length and reasoning share, and (samples > 0) pass@1
    averaged over `samples` completions at `temperature`. Rows are sharded over ranks; every rank runs as many
    generate calls (collectives under FSDP), topping its share up with rows that are not counted. The sampling
    noise is keyed by the row's index, so the result does not depend on the number of ranks. Compiled decoding gets
    fixed shapes: every batch is topped up to batch_size rows, and the KV cache fits the longest prompt."""
    was_training = model.training
    model.eval()
    rank, world = K.get_rank(), K.get_world_size()
    mine = rows[rank::world]
    real = len(mine)
    mine = mine + rows[:1] * (-(-len(rows) // world) - real)
    fixed = compile if compile is not None else next(K.unwrap(model).parameters()).is_cuda  # generate's default
    if fixed and rows:  # a new row count or cache length would recompile the decode step
        K.set_generation_length(model, longest_prompt(tokenizer, rows, template, system_prompt), max_new_tokens)
    counts = EvalCounts()
    settings = [(0.0, 1)] + ([(temperature, samples)] if samples else [])
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        if fixed:
            batch = batch + rows[:1] * (batch_size - len(batch))  # rows beyond `counted` are not counted
        counted = max(0, min(len(batch), real - start))  # rows of this batch that count
        global_rows = [rank + (start + i) * world for i in range(len(batch))]
        for temp, n in settings:
            rollout = sample(model, tokenizer, batch, num_samples=n, max_new_tokens=max_new_tokens, temperature=temp,
                             template=template, system_prompt=system_prompt,
                             noise_keys=K.eval_noise_keys(seed, global_rows, n), compile=compile)
            texts = rollout.completions[:counted * n]
            correct = (verify(texts, rollout.rows[:counted * n]) or [False] * len(texts)) if counted else []
            if temp == 0.0:
                counts.prompts += counted
                counts.correct += sum(correct)
                counts.tokens += rollout.gen.mask[:counted].sum().item()
                counts.reasoning += sum(map(reasons, texts))
            else:
                counts.sampled_prompts += counted
                counts.sample_correct += sum(correct) / n
    counts = counts.all_reduce()
    model.train(was_training)
    out = {"eval/accuracy": counts.correct / counts.prompts, "eval/response_length": counts.tokens / counts.prompts,
           "eval/reasoning_share": counts.reasoning / counts.prompts}
    if samples:
        out[f"eval/pass@1_k{samples}_t{temperature}"] = counts.sample_correct / counts.sampled_prompts
    return out


# ------------------------------------------------------------------------------------------------ command line


def score_file(path: str, rewards: list[str], weights: list[float] | None = None, show: int = 10,
               completion_column: str = "completion", answer_column: str = "answer") -> str:
    """Score a JSONL of completions (one object a line: the completion plus the fields the rewards read) with
    named rewards; returns a markdown table: each reward's mean and how often it applies, then the first `show`
    rows with their scores. For checking a reward before a run."""
    def row_of(obj, where, line):
        if not isinstance(obj, dict) or not isinstance(obj.get(completion_column), str):
            raise DataError(f"{where}each line needs a string {completion_column!r} (--completion-column).")
        return _renamed(obj, "prompt", answer_column)

    rows = read_jsonl(path, row_of)
    fns = resolve_rewards(rewards, "")
    check_rewards(fns, rows, path)
    weights = list(weights) if weights else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise K.UserError(f"--weights has {len(weights)} numbers for {len(fns)} rewards; give one per reward.")
    completions = [row.pop(completion_column) for row in rows]
    columns = {k: [row.get(k) for row in rows] for k in set().union(*rows)}
    total, per_reward = combine_rewards([(fn, w) for (_, fn), w in zip(fns, weights)], completions, **columns)
    lines = [f"{len(completions)} completions from {path}", "", "| reward | weight | mean | applies to |",
             "|---|---|---|---|"]
    for (name, values), weight in zip(per_reward.items(), weights):
        present = [v for v in values if v is not None]
        mean = f"{sum(present) / len(present):.4f}" if present else "-"
        lines.append(f"| {name} | {weight:g} | {mean} | {len(present)} of {len(values)} |")
    lines.append(f"| **total** | | {sum(total) / len(total):.4f} | |")
    if show:
        names = list(per_reward)
        lines += ["", "| # | completion | " + " | ".join(names) + " | total |", "|---" * (len(names) + 3) + "|"]
        for i, text in enumerate(completions[:show]):
            cells = ["-" if per_reward[n][i] is None else f"{per_reward[n][i]:.3g}" for n in names]
            shown = text.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {i} | {shown[:60] + ('…' if len(shown) > 60 else '')} | " + " | ".join(cells)
                         + f" | {total[i]:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    """`python rlvr_rewards.py FILE.jsonl --rewards accuracy format`: score completions and print a table."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python rlvr_rewards.py", description="Score a JSONL file of completions with named rewards and print "
        "a table (each reward's mean, then the first rows). Each line: {\"completion\": str, ...the fields the "
        "rewards read, e.g. \"answer\"}.",
        epilog=f"rewards: {', '.join(sorted(REWARDS))}, or module:function / path/to/file.py:function of your own")
    parser.add_argument("path", help="a .jsonl file, one completion per line")
    parser.add_argument("--rewards", nargs="+", default=["accuracy", "format"], help="reward names (default: "
                        "accuracy format)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per reward (default: 1 each)")
    parser.add_argument("--show", type=int, default=10, help="rows to show with their scores (default 10)")
    parser.add_argument("--completion-column", default="completion")
    parser.add_argument("--answer-column", default="answer")
    args = parser.parse_args(argv)
    try:
        print(score_file(args.path, args.rewards, args.weights, args.show, args.completion_column,
                         args.answer_column))
    except K.UserError as error:
        if os.environ.get("RL_DEBUG", "0") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
