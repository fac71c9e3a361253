"""Tests for rlvr_rewards.py: a hand-computed table per reward, hostile text, code rewards, the built-in tasks."""

import math
import multiprocessing
import os
import random
import re
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlvr_rewards as env  # noqa: E402
import sandbox  # noqa: E402
from test_sandbox import PLAN, needs_sandbox  # noqa: E402


# ------------------------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize("text, expected", [
    ("<answer>3</answer> then <answer> 17 </answer>", "17"),
    ("<answer>so \\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
    ("we get \\boxed{\\frac{a^{2}}{b_{1}}} and done", "\\frac{a^{2}}{b_{1}}"),
    ("\\boxed{1} and \\boxed{2}", "2"),
    ("\\boxed{4} then cut off \\boxed{\\frac{1", "4"),
    ("so she has 72 apples.\n#### 72", "72"),
    ("#### 1,000\nextra", "1,000"),
    ("no answer here, 5 and 7", None),
    ("<answer></answer>", None),
    ("", None),
])
def test_extract_answer_table(text, expected):
    """The last <answer> block (its box if any), else the last balanced box, else '#### n', else None."""
    assert env.extract_answer(text) == expected


def test_extract_answer_fallback_last_number():
    """With fallback_last_number the last number in the text is the answer; without it there is none."""
    assert env.extract_answer("first 3, then -4.5 is it", fallback_last_number=True) == "-4.5"
    assert env.extract_answer("first 3, then -4.5 is it") is None
    assert env.extract_answer("no digits", fallback_last_number=True) is None


@pytest.mark.parametrize("text, expected", [
    ("text\n```python\ndef f(): pass\n```\nmore\n```python\nx = 2\n```", "x = 2\n"),
    ("```python\nx = 1\n```\n```\nplain\n```", "x = 1\n"),
    ("```\nplain\n```", "plain\n"),
    ("<think>hmm</think><answer>x = 3</answer>", "x = 3"),
    ("x = 4", "x = 4"),
    ("```python\nx = 5\n```\n```python\nunclosed", "x = 5\n"),
])
def test_extract_code_table(text, expected):
    """The last closed ```python block, else the last closed block, else the answer block, else the text."""
    assert env.extract_code(text) == expected


# ------------------------------------------------------------------------------------------------ accuracy

@pytest.mark.parametrize("completion, gold, binary, signed, logic_rl", [
    ("<answer>17</answer>", "17", 1.0, 1.0, 2.0),
    ("<answer>18</answer>", "17", 0.0, -1.0, -1.5),
    ("I think it is 17", "17", 0.0, -1.0, -2.0),
    ("", "17", 0.0, -1.0, -2.0),
    ("\\boxed{0.5}", "1/2", 1.0, 1.0, 2.0),
    ("#### 1,000", "1000", 1.0, 1.0, 2.0),
    ("<answer>50%</answer>", "50", 1.0, 1.0, 2.0),
    ("<answer>17.</answer>", "17", 1.0, 1.0, 2.0),
    ("<answer>$17$</answer>", "17", 1.0, 1.0, 2.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0, 2.0),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0, 1.0, 2.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0, 1.0, 2.0),
    ("\\boxed{x^2+1}", "1+x^2", 1.0, 1.0, 2.0),
    ("\\boxed{2\\pi}", "\\pi", 0.0, -1.0, -1.5),
    ("The answer is 72.\n#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0, 1.0, 2.0),
])
def test_accuracy_reward_table(completion, gold, binary, signed, logic_rl):
    """Correct, wrong and unparseable answers get R1's {1,0,0}, DAPO's {1,-1,-1} and Logic-RL's {2,-1.5,-2}."""
    assert env.accuracy_reward([completion], [gold]) == [binary]
    assert env.accuracy_reward([completion], [gold], style="signed") == [signed]
    assert env.accuracy_reward([completion], [gold], style="logic_rl") == [logic_rl]


def test_accuracy_reward_custom_values_and_missing_gold():
    """Explicit values override the style, unparseable may be None, and a row without gold gets None."""
    got = env.accuracy_reward(["<answer>1</answer>", "x", "<answer>2</answer>"], ["1", "1", None],
                            correct=5.0, wrong=-5.0, unparseable=None)
    assert got == [5.0, None, None]
    with pytest.raises(ValueError, match="style"):
        env.accuracy_reward(["1"], ["1"], style="nope")


@pytest.mark.parametrize("gold, right, look_alike", [
    (0.00001, "0.00001", "e-5"), (1e20, "100000000000000000000", "e+20"), (1e16, "10000000000000000", "e+16"),
    (2.5e-7, "0.00000025", "e-7")])
def test_number_golds_in_exponent_form_are_compared_as_their_value(gold, right, look_alike):
    """A JSON number gold that Python writes with an exponent (1e-05) is compared as its exact decimal value: the
    right answer scores 1 and math-verify's reading of the exponent text (e - 5, Euler's e) scores 0."""
    completions = [f"<answer>\\boxed{{{right}}}</answer>", f"<answer>\\boxed{{{look_alike}}}</answer>"]
    assert env.accuracy_reward(completions, [gold, gold]) == [1.0, 0.0]


@pytest.mark.parametrize("gold", ["1e-05", "1E-5", "+1e-5", "0.1e-4", "#### 1e-05", "\\boxed{1e-05}",
                                  "<answer>1e-05</answer>", 1e-05, "0.00001"])
def test_exponent_form_is_its_number_in_gold_and_answer(gold):
    """A decimal number in exponent form, as text gold or as the model's answer, is that number, not Euler's e: the
    value in any form scores 1, a bare e-5 (no digit before the e) and another value score 0."""
    right = ["\\boxed{0.00001}", "<answer>1e-05</answer>", "\\boxed{1E-5}", "#### 10e-6", "\\boxed{\\frac{1}{100000}}"]
    wrong = ["\\boxed{e-5}", "<answer>e-5</answer>", "\\boxed{2e-05}", "\\boxed{1e-06}", "\\boxed{1e5}"]
    assert env.accuracy_reward(right + wrong, [gold] * 10) == [1.0] * 5 + [0.0] * 5


@pytest.mark.parametrize("gold", [2.5e-7, "2.5e-7", "0.00000025", "#### 2.5E-07"])
def test_a_tiny_gold_is_not_matched_by_six_decimal_rounding(gold):
    """math-verify rounds decimals to 6 places, so 0.0000001, -0.0000002 and 0.0000004 all equal 2.5e-7 to it; here a
    gold under 0.01 also needs 4 significant digits: only its value (in any form) scores 1."""
    right = ["0.00000025", "2.5e-7", "2.50E-07", "0.000000250"]
    wrong = ["0.0000001", "-0.0000002", "0.0000004", "0.0000002", "0.00000026", "0", "-0.00000025", "2.5e-6"]
    completions = [f"<answer>{answer}</answer>" for answer in right + wrong]
    assert env.accuracy_reward(completions, [gold] * len(completions)) == [1.0] * len(right) + [0.0] * len(wrong)


@pytest.mark.parametrize("answer, gold, expected", [
    ("72.0", "72", 1.0), ("0.5", "1/2", 1.0), ("0.333333", "1/3", 1.0), ("0.3333333", "1/3", 1.0),
    ("0.033333", "1/30", 1.0), ("0.1", "0.1000004", 1.0), ("0.0100004", "0.01", 1.0), ("50%", "0.5", 1.0),
    ("0.33", "1/3", 0.0), ("3.0000001", "3", 0.0), ("0.0000001", "0", 0.0), ("1000", "1e3", 1.0)])
def test_ordinary_numbers_keep_their_verdicts(answer, gold, expected):
    """From 0.01 up, matching to 6 decimals is the stricter test, so the tiny-gold rule changes no verdict there:
    1/3 = 0.333333 still, 0.33 is still wrong, and math-verify still decides 3.0000001 against 3 (wrong)."""
    assert env.accuracy_reward([f"<answer>{answer}</answer>"], [gold]) == [expected]


def test_number_golds_become_exact_text():
    """Ints, floats, numpy scalars and Decimals become plain decimal text; a bool stays a word; NaN and inf are no
    gold (None), as a null is."""
    import decimal

    import numpy as np

    cases = [(7, "7"), (-0.5, "-0.5"), (1e-05, "0.00001"), (1e20, "100000000000000000000"),
             (2.5e-7, "0.00000025"), (np.float32(1e-5), "0.00001"), (np.int64(12), "12"), (np.float64(3.0), "3.0"),
             (decimal.Decimal("1E+3"), "1000"), (True, "True"), (math.nan, None), (-math.inf, None)]
    assert [env._gold_text(gold) for gold, _ in cases] == [text for _, text in cases]


def test_numeric_fast_path_agrees_with_math_verify():
    """Wherever the Fraction fast path decides, its verdict equals math-verify's on the same two strings."""
    from math_verify import parse, verify

    def reference(gold, pred):
        return verify(parse(env._as_latex(gold), parsing_timeout=None), parse(env._as_latex(pred), parsing_timeout=None),
                      timeout_seconds=None)

    rng = random.Random(0)
    forms = ["17", "-4", "+5", "0", "1,000", "1000", "0.5", ".5", "1/2", "2/4", "50%", "50", "0.25", "25%", "1/3",
             "0.333333", "0.3333333", "0.33", "3", "3.0", "3.0000001", "12.5%", "1/8", "100", "100.0", "7/7", "1",
             "0.00000025", "0.0000001", "-0.0000002", "0.0000004", "0.01", "0.0100004", "1/30", "0.033333"]
    pairs = [(a, b) for a in forms for b in forms]
    pairs += [(str(rng.randint(-50, 50)), str(rng.randint(-50, 50))) for _ in range(50)]
    decided = [(gold, pred, fast) for gold, pred in pairs if (fast := env._numeric_verdict(pred, gold)) is not None]
    assert len(decided) > 0.8 * len(pairs)
    departures = []
    for gold, pred, fast in decided:
        if fast != reference(gold, pred):  # the one deliberate departure: a tiny gold matched by rounding alone
            departures.append((gold, pred))
            assert not fast and abs(env._plain_number(gold)[0]) < 0.01, (gold, pred)
    assert ("0.00000025", "0.0000001") in departures


def test_accuracy_timeout_works_off_the_main_thread():
    """A pathological LaTeX answer checked from a thread times out as wrong within the bound; the pool recovers."""
    results, start = {}, time.monotonic()
    completions, golds = ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{\\frac{2}{4}}"], ["1", "0.5"]
    worker = threading.Thread(target=lambda: results.update(r=env.accuracy_reward(completions, golds, timeout_s=1.0)))
    worker.start()
    worker.join(30)
    assert results["r"] == [0.0, 1.0]
    assert time.monotonic() - start < 20
    assert env.accuracy_reward(["\\boxed{\\frac{3}{6}}"], ["0.5"]) == [1.0]


def _accuracy_in_child(queue):
    queue.put(env.accuracy_reward(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["0.5", "\\frac{6}{2}"]))


def test_accuracy_works_in_a_daemon_worker_process():
    """The math-verify path works inside a daemonic worker process (e.g. a data-loader worker)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_accuracy_in_child, args=(queue,), daemon=True)
    child.start()
    assert queue.get(timeout=60) == [1.0, 1.0]
    child.join(10)


# ------------------------------------------------------------------------------------------------ format

@pytest.mark.parametrize("text, strict, soft, tags", [
    ("<think>a</think><answer>1</answer>", 1.0, 1.0, 1.0),
    ("  <think>\na\n</think>\n<answer>\n1\n</answer>\n", 1.0, 1.0, 1.0),
    ("hi <think>a</think><answer>1</answer>", 0.0, 1.0, 1.0),
    ("<think>a</think> so <answer>1</answer>", 0.0, 1.0, 1.0),
    ("<think>a</think><answer>1</answer> bye", 0.0, 1.0, 1.0),
    ("<think>a</think><think>b</think><answer>1</answer>", 0.0, 1.0, 0.5),
    ("<answer>1</answer><think>a</think>", 0.0, 0.0, 1.0),
    ("<think>a<answer>1</answer></think>", 0.0, 0.0, 1.0),
    ("<think>a</think>", 0.0, 0.0, 0.5),
    ("", 0.0, 0.0, 0.0),
])
def test_format_rewards_table(text, strict, soft, tags):
    """Strict needs exactly think-then-answer with only whitespace around; soft finds the pair anywhere."""
    assert env.format_reward([text]) == [strict]
    assert env.format_reward([text], strict=False) == [soft]
    assert env.tag_count_reward([text]) == [tags]


def test_format_checks_equal_their_regexes():
    """The linear find-based checks equal the regexes they stand for, on random tag soup."""
    inner = r"(?:(?!</?think>|</?answer>).)*"
    strict_regex = re.compile(rf"\s*<think>{inner}</think>\s*<answer>{inner}</answer>\s*", re.S)
    soft_regex = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.S)
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x", "<", ">"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        assert env._strict_format(text) == bool(strict_regex.fullmatch(text)), text
        assert env._soft_format(text) == bool(soft_regex.search(text)), text


# ------------------------------------------------------------------------------------------------ language

@pytest.mark.parametrize("text, language, expected", [
    ("<think>we add the two numbers</think><answer>5</answer>", "en", 1.0),
    ("<think>we 加 the numbers</think>", "en", 0.75),
    ("<think>我们相加</think>", "zh", 1.0),
    ("<think>我们 add</think>", "zh", 2 / 3),
    ("plain reasoning sans tags", "en", 1.0),
    ("<think>12 + 3 = 15</think>", "en", None),
    ("", "en", None),
    ("<think>we add</think>", None, None),
])
def test_language_consistency_table(text, language, expected):
    """The share of the reasoning's words in the target script; None when the reasoning has no words or the row
    no language."""
    (value,) = env.language_consistency_reward([text], language=language)
    assert value == (None if expected is None else pytest.approx(expected))


def test_language_consistency_column_with_a_missing_language():
    """A language column may hold None: that row gets None, the others their score."""
    texts = ["<think>we add</think>", "<think>we add</think>"]
    assert env.language_consistency_reward(texts, language=["en", None]) == [1.0, None]


# ------------------------------------------------------------------------------------------------ length

def test_lcpo_rewards_table():
    """L1's LCPO-Exact 1[c] - α|n_t - n| and LCPO-Max 1[c]·clip(α(n_t - n) + δ, 0, 1), α=3e-4, δ=0.5."""
    texts = ["<answer>4</answer>", "<answer>5</answer>", "<answer>4</answer>"]
    columns = dict(answer=["4", "4", "4"], target_length=[1000, 1000, 5000], completion_lengths=[1000, 2000, 500])
    assert env.lcpo_exact_reward(texts, **columns) == pytest.approx([1.0, -0.3, 1.0 - 3e-4 * 4500])
    assert env.lcpo_max_reward(texts, **columns) == pytest.approx([0.5, 0.0, 1.0])
    assert env.lcpo_max_reward(texts[:1], ["4"], [1000], completion_lengths=[2000]) == [pytest.approx(0.2)]


def test_kimi_length_reward_table():
    """Kimi k1.5: λ = 0.5 - (len - min)/(max - min) per group; wrong gets min(0, λ); equal lengths give 0."""
    texts = ["<answer>1</answer>", "<answer>1</answer>", "<answer>2</answer>", "<answer>2</answer>"]
    lengths = [100, 300, 100, 200]
    got = env.kimi_length_reward(texts, ["1"] * 4, group_size=4, completion_lengths=lengths)
    assert got == pytest.approx([0.5, -0.5, 0.0, 0.0])
    got = env.kimi_length_reward(texts, ["1"] * 4, group_size=2, completion_lengths=lengths)
    assert got == pytest.approx([0.5, -0.5, 0.0, -0.5])
    assert env.kimi_length_reward(texts, ["1"] * 4, group_size=4, completion_lengths=[7] * 4) == [0.0] * 4
    with pytest.raises(ValueError, match="groups"):
        env.kimi_length_reward(texts, ["1"] * 4, group_size=3)


def test_cosine_length_reward_table():
    """Paper constants: correct 2 → 1, wrong -10 → 0 over [0, L_max], -10 beyond; open-r1's preset clamps."""
    right, wrong = "<answer>1</answer>", "<answer>2</answer>"
    got = env.cosine_length_reward([right, right, right, wrong, wrong, wrong, right], ["1"] * 7, max_length=100,
                                 completion_lengths=[0, 50, 100, 0, 50, 100, 101])
    assert got == pytest.approx([2.0, 1.5, 1.0, -10.0, -5.0, 0.0, -10.0])
    got = env.cosine_length_reward([right, wrong, right], ["1"] * 3, completion_lengths=[0, 0, 5000], **env.COSINE_OPEN_R1)
    assert got == pytest.approx([1.0, -1.0, 0.5])


def test_soft_overlong_reward_boundaries():
    """DAPO: 0 up to L_max - L_cache inclusive, linear to -1 at L_max, -1 beyond; defaults 20480 and 4096."""
    got = env.soft_overlong_reward([""] * 6, completion_lengths=[0, 16384, 16385, 18432, 20480, 20481])
    assert got == pytest.approx([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0])
    assert env.soft_overlong_reward(["abcd", "abcdef", "abcdefgh"], max_length=8, cache_length=4) == [0.0, -0.5, -1.0]


class _WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_length_rewards_count_tokens_with_a_tokenizer():
    """With a tokenizer a length is its token count, otherwise the character count."""
    text = "one two three four five six"  # 6 tokens, 27 characters
    assert env.soft_overlong_reward([text], max_length=10, cache_length=4, tokenizer=_WordTokenizer()) == [0.0]
    assert env.soft_overlong_reward([text], max_length=10, cache_length=4) == [-1.0]


def test_repetition_penalty_table():
    """(1 - unique n-grams / n-grams)·p_max: no repeats 0, repeats toward p_max, fewer than n words 0."""
    got = env.repetition_penalty_reward(["a b c d e", "a b a b a b", "a b", ""], ngram_size=2, max_penalty=-1.0)
    assert got == pytest.approx([0.0, -(1 - 2 / 5), 0.0, 0.0])
    with pytest.raises(ValueError):
        env.repetition_penalty_reward(["x"], max_penalty=1.0)


# ------------------------------------------------------------------------------------------------ countdown

@pytest.mark.parametrize("answer, expected", [
    ("5*7-3*4", 1.0),
    ("(5*7)-(3*4)", 1.0),
    ("5*7-4*3 = 23", 1.0),
    ("7*3+5-4", 0.0),  # 22: misses the target
    ("3*7+5-7", 0.0),  # 7 used twice
    ("5*7-12", 0.0),  # 12 is not given
    ("-5*7", 0.0),  # unary minus is not an allowed operation
    ("5**7", 0.0),
    ("9**9**9", 0.0),
    ("__import__('os').system('true')", 0.0),
    ("(" * 150 + "5" + ")" * 150, 0.0),
    ("", 0.0),
])
def test_countdown_reward_table(answer, expected):
    """Target 23 from 3, 4, 5, 7, each at most once, with + - * / and parentheses only."""
    assert env.countdown_reward([f"<answer>{answer}</answer>"], [[3, 4, 5, 7]], [23]) == [expected]


def test_countdown_use_all_numbers_is_tinyzeros_rule():
    """By default a number may stay unused; with use_all_numbers (TinyZero's rule) every one must be used once."""
    texts = ["<answer>5*7-3*4</answer>", "<answer>5*7-3*4</answer>", "<answer>5*7-3*4*1</answer>"]
    numbers, targets = [[3, 4, 5, 7], [3, 4, 5, 7, 1], [3, 4, 5, 7, 1]], [23, 23, 23]
    assert env.countdown_reward(texts, numbers, targets) == [1.0, 1.0, 1.0]
    assert env.countdown_reward(texts, numbers, targets, use_all_numbers=True) == [1.0, 0.0, 1.0]


def test_countdown_division_is_exact():
    """Division is exact (Fractions): 7/2*4 hits 14; division by zero scores 0."""
    texts = ["<answer>7/2*4</answer>", "<answer>(7/2)*4+1</answer>", "<answer>7/(2-2)</answer>"]
    assert env.countdown_reward(texts, [[7, 2, 4], [7, 2, 4, 1], [7, 2, 2]], [14, 14, 1]) == [1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------ hostile text

_ALPHABET = b"abc{}\\<>/ 0123456789#*()$%"
HOSTILE = [
    random.Random(0).randbytes(1_000_000).translate(bytes(_ALPHABET[i % len(_ALPHABET)] for i in range(256))).decode(),
    "\\boxed{" * 200_000,
    "{" * 100_000 + "}" * 99_999,
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "<think>" * 100_000 + "</answer>" * 100_000,
    "<answer>" * 50_000 + "1" + "</answer>",
    "<think>" + "a" * 500_000,
    "1" * 200_000 + "." + "1" * 200_000,
    "#### " + "9" * 100_000,
    "\x00\x00<answer>\x00</answer>\x00",
    "\ud800\udfff\u202e\ufeff<answer>\u0661\u0662</answer>\U0001f600",
    "<answer>9**9**9</answer>",
    "<answer>\\boxed{9^{9^{9^{9}}}}</answer>",
    "a " * 300_000,
    "```python\n" * 100_000,
]


@pytest.mark.parametrize("name", sorted(env.REWARDS))
def test_every_reward_survives_hostile_text(name):
    """Megabytes of garbage, deep or unbalanced nesting, repeated tags, NULs, odd Unicode: a number or None, fast."""
    n = len(HOSTILE)
    if name == "code" and PLAN is None:
        pytest.skip("no working code sandbox on this machine")
    columns = dict(answer=["31415"] * n, target_length=[100] * n, numbers=[[3, 4, 5]] * n, target=[12] * n,
                   tests=[["assert f(1) == 2"]] * n, timeout_s=1.0)
    start = time.monotonic()
    values = env.REWARDS[name](HOSTILE, **columns)
    assert time.monotonic() - start < 25
    assert len(values) == n
    assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in values)
    if name in ("accuracy", "countdown", "code"):
        assert not any(values)


# ------------------------------------------------------------------------------------------------ combining

def test_combine_rewards_weights_and_logs_each():
    """total = Σ weight·reward with None as 0; each reward is returned under its own name."""
    texts = ["<think>a</think><answer>1</answer>", "<answer>2</answer>"]
    rewards = [(env.accuracy_reward, 1.0), ("format", 0.5), (lambda completions, **kw: [None, 3.0], 2.0)]
    total, per_reward = env.combine_rewards(rewards, texts, answer=["1", "1"])
    assert total == [1.5, 6.0]
    assert per_reward == {"accuracy": [1.0, 0.0], "format": [1.0, 0.0], "<lambda>": [None, 3.0]}
    total, per_reward = env.combine_rewards({"format": 1.0, "format_reward": 2.0}, texts)
    assert total == [3.0, 0.0] and list(per_reward) == ["format", "format_1"]  # a repeated name gets a suffix


def test_load_reward_fn_from_module_and_file(tmp_path):
    """'module:function' and 'file.py:function' load; bad specs fail with a message that says what to fix."""
    path = tmp_path / "my_rewards.py"
    path.write_text("def shout(completions, **kw):\n    return [float(c.isupper()) for c in completions]\nvalue = 3\n")
    assert env.load_reward_fn(f"{path}:shout")(["A", "a"]) == [1.0, 0.0]
    assert env.get_reward("math:sqrt") is math.sqrt
    assert env.get_reward("accuracy_reward") is env.accuracy_reward is env.get_reward("accuracy")
    with pytest.raises(ValueError, match="module:function"):
        env.load_reward_fn("no_colon")
    with pytest.raises(ImportError, match="PYTHONPATH"):
        env.load_reward_fn("surely_not_a_module_xyz:f")
    with pytest.raises(AttributeError, match="nope"):
        env.load_reward_fn(f"{path}:nope")
    with pytest.raises(TypeError, match="not a function"):
        env.load_reward_fn(f"{path}:value")
    with pytest.raises(ValueError, match="unknown reward"):
        env.get_reward("accurasy")


def test_rewards_ignore_unknown_columns():
    """Every built-in accepts and ignores columns it does not use."""
    columns = dict(answer=["1"], target_length=[10], numbers=[[1]], target=[1], tests=[["assert f(1) == 2"]],
                   prompt=["p"], something_else=[object()])
    for name, fn in env.REWARDS.items():
        if name != "code" or PLAN is not None:
            assert len(fn(["<answer>1</answer>"], **columns)) == 1, name


# ------------------------------------------------------------------------------------------------ tasks

@pytest.mark.parametrize("name", ["arithmetic", "countdown", "code"])
def test_make_dataset_is_deterministic_and_splits_are_disjoint(name):
    """Same seed, same rows; another seed, other rows; train and test never share a prompt; no duplicates."""
    train = env.make_dataset(name, "train", n=300, seed=1)
    assert train == env.make_dataset(name, "train", n=300, seed=1)
    assert train != env.make_dataset(name, "train", n=300, seed=2)
    test = env.make_dataset(name, "test", n=300, seed=1)
    prompts = {row["prompt"] for row in train}
    assert len(prompts) == 300 and not prompts & {row["prompt"] for row in test}
    assert all(isinstance(row["answer"], str) and len(row["prompt"]) < 60 for row in train + test)
    assert env.make_dataset(name, "test", n=0) == []


def test_general_prompts_split_by_hash_and_carry_a_reference():
    """The toy world's general prompts: deterministic, train and test disjoint, no gold answer, every kind, and a
    reference response the gold preference can rank."""
    train, test = env.make_dataset("general", "train", n=200, seed=1), env.make_dataset("general", "test", n=60, seed=1)
    assert train == env.make_dataset("general", "train", n=200, seed=1)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert {r["kind"] for r in train} == {"greeting", "expression", "comparison"}
    assert all(r["answer"] is None and env.gold_score(r["prompt"], r["reference"])[:2] == (1, 1) for r in train + test)


def test_arithmetic_rows_are_consistent():
    """The answer is the last step's value and the prompt's value (with precedence); steps stay in range."""
    for row in env.make_dataset("arithmetic", "train", n=500):
        assert re.fullmatch(r"[1-9]([+\-*][1-9]){2,3}", row["prompt"])
        assert row["answer"] == row["steps"][-1].split("=")[1]
        assert env.evaluate_expression(row["prompt"]) == int(row["answer"]) == eval(row["prompt"])  # regex-checked
        assert all(-99 <= int(step.split("=")[1]) <= 999 for step in row["steps"])
    assert env.arithmetic_steps([7, 3, 4, 2], ["+", "*", "-"]) == ["3*4=12", "7+12=19", "19-2=17"]


def test_countdown_rows_are_solvable():
    """Each row's answer reaches its target with its numbers, and the prompt reads 'n1,n2,...->target'."""
    rows = env.make_dataset("countdown", "test", n=300)
    texts = [f"<answer>{row['answer']}</answer>" for row in rows]
    numbers, targets = [row["numbers"] for row in rows], [row["target"] for row in rows]
    assert env.countdown_reward(texts, numbers, targets) == [1.0] * len(rows)
    for row in rows:
        assert row["prompt"] == ",".join(map(str, row["numbers"])) + f"->{row['target']}"
        assert 3 <= len(row["numbers"]) <= 4 and all(1 <= n <= 20 for n in row["numbers"])


@needs_sandbox
def test_code_rows_reference_solutions_pass_their_tests():
    """The reference solutions of code rows pass all their tests in the sandbox; a wrong solution passes none."""
    rows = env.make_dataset("code", "train", n=16)
    assert env.code_reward([row["answer"] for row in rows], [row["tests"] for row in rows]) == [1.0] * 16
    assert env.code_reward(["def f(*args):\n    return None"] * 16, [row["tests"] for row in rows]) == [0.0] * 16


NEVER_RUNS, BY_FORM = "has no assert that always runs", "true or false by (its|their) form"
# Valid Python with an assert that a wrong program passes: the assert never runs, or its form decides it.
PASS_ANY_PROGRAM = [
    ("def check(candidate):\n    assert candidate(1) == 2", NEVER_RUNS),  # HumanEval's raw test: check(f) never called
    (["if False:\n    assert f(1) == 2"], NEVER_RUNS),
    (["while False:\n    assert f(1) == 2"], NEVER_RUNS),
    (["for x in []:\n    assert f(x) == 2"], NEVER_RUNS),
    (["try:\n    assert f(1) == 2\nexcept AssertionError:\n    pass"], NEVER_RUNS),
    (["def check(c):\n    assert c(1) == 2\n    yield\ncheck(f)"], NEVER_RUNS),  # the call only makes a generator
    (["def check(c):\n    assert c(1) == 2\ncheck = print\ncheck(f)"], NEVER_RUNS),
    (["def check(c):\n    assert True, 'debug'\n    for x in []:\n        assert c(x) == 2\ncheck(f)"], BY_FORM),
    (["assert (f(1) == 2, 'f(1) should be 2')"], BY_FORM),  # a non-empty tuple: always true
    (["assert f(1) == 2 or True"], BY_FORM),
    (["assert 1"], BY_FORM),
    (["assert True", "assert f(1) == 2"], "item 0 .*" + BY_FORM),  # a wrong program scored 0.5
    (["assert f(1) == 2", "assert 1 + 1 == 2"], "item 1 .*" + BY_FORM),
]
MALFORMED_TESTS = [
    ('["assert f(1) == 2"]', "a string holding a JSON list"),   # JSON-encoded once too often
    (["f(1) == 2"], "item 0 .* holds no assert"),                # an expression: true or false, it never fails
    ([["assert f(1) == 2"]], "item 0 is a list"),                # nested: str() of a list is an expression too
    (["assert f(1) == 2", "assert f(2) =="], "item 1 is not valid Python"),
    (3, "must be a list of test statements"),
] + PASS_ANY_PROGRAM


@needs_sandbox
def test_the_refused_forms_pass_a_wrong_program():
    """Why PASS_ANY_PROGRAM is refused: run as they are, every one of those tests passes a wrong program (f returns
    0), except the real asserts beside `assert True` and `assert 1 + 1 == 2`."""
    tests = [test for row, _ in PASS_ANY_PROGRAM for test in ([row] if isinstance(row, str) else row)]
    real = {"assert f(1) == 2"}
    assert sandbox.run_sandboxed("def f(x):\n    return 0", tests).passed == [test not in real for test in tests]


@pytest.mark.parametrize("tests, why", MALFORMED_TESTS)
def test_malformed_code_tests_are_refused_with_their_line(tests, why, tmp_path):
    """A row whose tests would pass any program (a JSON string of a list, an expression without assert, a nested
    list, an assert that may never run or that its form decides) or could pass none (invalid Python) is refused at
    load time, naming its line."""
    import json

    path = tmp_path / "code.jsonl"
    good = {"prompt": "Write f(x) returning x + 1.", "tests": ["assert f(1) == 2"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tests": tests}) + "\n")
    with pytest.raises(env.DataError, match=f"line 2: 'tests' .*{why}"):
        env.load_prompts(str(path), required=["tests"])


@pytest.mark.parametrize("tests, why", MALFORMED_TESTS)
def test_code_reward_refuses_malformed_tests_rather_than_pass_a_wrong_program(tests, why):
    """Handed malformed tests directly, code_reward raises DataError naming the row: a wrong program never scores 1."""
    good = ["assert f(1) == 2"]
    with pytest.raises(env.DataError, match=f"code_reward, row 1: 'tests' .*{why}"):
        env.code_reward(["def f(x):\n    return 0"] * 2, [good, tests])


@needs_sandbox
def test_well_formed_code_tests_load_and_score():
    """A list of top-level asserts, a single string with a HumanEval-style check function that it calls (its
    `assert True, "..."` line and a loop of asserts beside a real one at its top), and a null load; the right program
    scores 1 and a wrong one 0."""
    check = ("def check(candidate):\n    assert True, 'This prints if this assert fails 1'\n"
             "    assert candidate(1) == 2\n    for x in range(3):\n        assert candidate(x) == x + 1\n\ncheck(f)")
    for tests in (["assert f(1) == 2", "x = f(2)\nassert x == 3", "assert [*map(f, [1])] == [2]"], check):
        assert env.check_prompt_row({"prompt": "p", "tests": tests}, "", ["tests"])["tests"] == tests
        assert env.code_reward(["def f(x):\n    return x + 1", "def f(x):\n    return 0"], [tests] * 2) == [1.0, 0.0]
    assert env.check_prompt_row({"prompt": "p", "tests": None}, "", ["tests"])["tests"] is None


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_number_too_long_to_read_is_one_sentence_naming_its_line(suffix, tmp_path):
    """A JSON integer of 5,000 digits (past Python's 4,300-digit limit for reading text as int) is a DataError naming
    the file and line (or item), not a ValueError traceback."""
    path = tmp_path / f"long{suffix}"
    rows = ['{"prompt": "p", "answer": "1"}', '{"prompt": "p", "answer": ' + "1" * 5000 + "}"]
    path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[" + ", ".join(rows) + "]")
    where = f"{path}, line 2: " if suffix == ".jsonl" else f"{path}: "
    with pytest.raises(env.DataError, match=re.escape(where + "a number too long to read (Exceeds the limit (4300 "
                                                      "digits) for integer string conversion); write it as a string")):
        env.load_prompts(str(path), required=["answer"])


def test_a_null_answer_marks_a_row_without_gold_and_a_missing_one_is_refused(tmp_path):
    """A mixed dataset (R1's stage 4: reasoning prompts with answers, general prompts with "answer": null) loads,
    and the accuracy reward skips its general rows; a row with no answer field at all is still a named error."""
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "2+2", "answer": "4"}\n{"prompt": "hello, i am ana", "answer": null}\n')
    fns = env.resolve_rewards(("accuracy",), str(path))
    rows = env.load_prompts(str(path), required=env.required_fields(fns))
    env.check_rewards(fns, rows, str(path))
    assert env.accuracy_reward(["<answer>4</answer>", "<answer>hi</answer>"], answer=[r["answer"] for r in rows]) == [
        1.0, None]
    path.write_text('{"prompt": "2+2", "answer": "4"}\n{"prompt": "hello"}\n')
    with pytest.raises(env.DataError, match="line 2: no 'answer'"):
        env.load_prompts(str(path), required=env.required_fields(fns))


@pytest.mark.parametrize("columns, why", [
    (dict(prompt_column="3"), r"no column '3' \(--prompt-column\); this row's columns are \['answer', 'question'\]"),
    (dict(prompt_column="nosuch"), r"no column 'nosuch' \(--prompt-column\); .* \['answer', 'question'\]"),
    (dict(prompt_column="question", answer_column="nosuch"),
     r"no column 'nosuch' \(--answer-column\); .* \['answer', 'question'\]")])
def test_a_column_flag_naming_no_column_is_named_with_the_rows_columns(columns, why, tmp_path):
    """--prompt-column / --answer-column naming a column the rows lack: the sentence names the column the user gave
    and the columns the row has (not 'prompt', and never a silent fall back on a column named 'answer')."""
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(env.DataError, match="line 1: " + why):
        env.load_prompts(str(path), required=["answer"], **columns)
    assert env.load_prompts(str(path), prompt_column="question", required=["answer"]) == [
        {"prompt": "1+1", "answer": "2"}]


def test_default_reward_weights_are_one_each_with_shaping_rewards_at_a_tenth_beside_others():
    """grpo.py and ppo.py share this rule: weights as given, else 1 each, but format / tag_count at 0.1 beside
    another reward (alone, a shaping reward is the whole signal and keeps weight 1)."""
    assert env.reward_weights(("task", "format")) == (1.0, 0.1)
    assert env.reward_weights(("accuracy", "tag_count", "format")) == (1.0, 0.1, 0.1)
    assert env.reward_weights(("format",)) == (1.0,)
    assert env.reward_weights(("task", "format"), (2.0, 0.5)) == (2.0, 0.5)


def test_a_built_in_task_smaller_than_the_request_gives_all_its_problems_in_seconds():
    """grpo.py --dataset code asks for up to 20,000 training rows; the code task has about 9,450: every distinct
    problem comes back, within seconds (it was a ValueError traceback after about 4 minutes of drawing)."""
    start = time.monotonic()
    rows = env.load_prompts("code", "train", 20_000)
    assert 9_000 < len(rows) < 20_000 and len({row["prompt"] for row in rows}) == len(rows)
    assert time.monotonic() - start < 30
    with pytest.raises(ValueError, match="distinct train problems of 'code'"):
        env.make_dataset("code", "train", n=20_000)
