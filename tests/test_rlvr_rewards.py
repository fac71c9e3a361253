"""Tests for rlvr_rewards.py: a hand-computed table per reward, hostile text, the sandbox, the built-in tasks."""

import dataclasses
import math
import multiprocessing
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlvr_rewards as R  # noqa: E402

PLAN = R._probe_sandbox()
AS_ROOT = PLAN is not None and PLAN.as_root
needs_sandbox = pytest.mark.skipif(PLAN is None, reason="no working code sandbox on this machine")


def program(source: str) -> str:
    return textwrap.dedent(source).strip() + "\n"


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
    assert R.extract_answer(text) == expected


def test_extract_answer_fallback_last_number():
    """With fallback_last_number the last number in the text is the answer; without it there is none."""
    assert R.extract_answer("first 3, then -4.5 is it", fallback_last_number=True) == "-4.5"
    assert R.extract_answer("first 3, then -4.5 is it") is None
    assert R.extract_answer("no digits", fallback_last_number=True) is None


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
    assert R.extract_code(text) == expected


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
    assert R.accuracy_reward([completion], [gold]) == [binary]
    assert R.accuracy_reward([completion], [gold], style="signed") == [signed]
    assert R.accuracy_reward([completion], [gold], style="logic_rl") == [logic_rl]


def test_accuracy_reward_custom_values_and_missing_gold():
    """Explicit values override the style, unparseable may be None, and a row without gold gets None."""
    got = R.accuracy_reward(["<answer>1</answer>", "x", "<answer>2</answer>"], ["1", "1", None],
                            correct=5.0, wrong=-5.0, unparseable=None)
    assert got == [5.0, None, None]
    with pytest.raises(ValueError, match="style"):
        R.accuracy_reward(["1"], ["1"], style="nope")


def test_numeric_fast_path_agrees_with_math_verify():
    """Wherever the Fraction fast path decides, its verdict equals math-verify's on the same two strings."""
    from math_verify import parse, verify

    def reference(gold, pred):
        return verify(parse(R._as_latex(gold), parsing_timeout=None), parse(R._as_latex(pred), parsing_timeout=None),
                      timeout_seconds=None)

    rng = random.Random(0)
    forms = ["17", "-4", "+5", "0", "1,000", "1000", "0.5", ".5", "1/2", "2/4", "50%", "50", "0.25", "25%", "1/3",
             "0.333333", "0.3333333", "0.33", "3", "3.0", "3.0000001", "12.5%", "1/8", "100", "100.0", "7/7", "1"]
    pairs = [(a, b) for a in forms for b in forms]
    pairs += [(str(rng.randint(-50, 50)), str(rng.randint(-50, 50))) for _ in range(50)]
    decided = [(gold, pred, fast) for gold, pred in pairs if (fast := R._numeric_verdict(pred, gold)) is not None]
    assert len(decided) > 0.8 * len(pairs)
    for gold, pred, fast in decided:
        assert fast == reference(gold, pred), (gold, pred)


def test_accuracy_timeout_works_off_the_main_thread():
    """A pathological LaTeX answer checked from a thread times out as wrong within the bound; the pool recovers."""
    results, start = {}, time.monotonic()
    completions, golds = ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{\\frac{2}{4}}"], ["1", "0.5"]
    worker = threading.Thread(target=lambda: results.update(r=R.accuracy_reward(completions, golds, timeout_s=1.0)))
    worker.start()
    worker.join(30)
    assert results["r"] == [0.0, 1.0]
    assert time.monotonic() - start < 20
    assert R.accuracy_reward(["\\boxed{\\frac{3}{6}}"], ["0.5"]) == [1.0]


def _accuracy_in_child(queue):
    queue.put(R.accuracy_reward(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["0.5", "\\frac{6}{2}"]))


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
    assert R.format_reward([text]) == [strict]
    assert R.format_reward([text], strict=False) == [soft]
    assert R.tag_count_reward([text]) == [tags]


def test_format_checks_equal_their_regexes():
    """The linear find-based checks equal the regexes they stand for, on random tag soup."""
    inner = r"(?:(?!</?think>|</?answer>).)*"
    strict_regex = re.compile(rf"\s*<think>{inner}</think>\s*<answer>{inner}</answer>\s*", re.S)
    soft_regex = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.S)
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x", "<", ">"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        assert R._strict_format(text) == bool(strict_regex.fullmatch(text)), text
        assert R._soft_format(text) == bool(soft_regex.search(text)), text


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
    (value,) = R.language_consistency_reward([text], language=language)
    assert value == (None if expected is None else pytest.approx(expected))


def test_language_consistency_column_with_a_missing_language():
    """A language column may hold None: that row gets None, the others their score."""
    texts = ["<think>we add</think>", "<think>we add</think>"]
    assert R.language_consistency_reward(texts, language=["en", None]) == [1.0, None]


# ------------------------------------------------------------------------------------------------ length

def test_lcpo_rewards_table():
    """L1's LCPO-Exact 1[c] - α|n_t - n| and LCPO-Max 1[c]·clip(α(n_t - n) + δ, 0, 1), α=3e-4, δ=0.5."""
    texts = ["<answer>4</answer>", "<answer>5</answer>", "<answer>4</answer>"]
    columns = dict(answer=["4", "4", "4"], target_length=[1000, 1000, 5000], completion_lengths=[1000, 2000, 500])
    assert R.lcpo_exact_reward(texts, **columns) == pytest.approx([1.0, -0.3, 1.0 - 3e-4 * 4500])
    assert R.lcpo_max_reward(texts, **columns) == pytest.approx([0.5, 0.0, 1.0])
    assert R.lcpo_max_reward(texts[:1], ["4"], [1000], completion_lengths=[2000]) == [pytest.approx(0.2)]


def test_kimi_length_reward_table():
    """Kimi k1.5: λ = 0.5 - (len - min)/(max - min) per group; wrong gets min(0, λ); equal lengths give 0."""
    texts = ["<answer>1</answer>", "<answer>1</answer>", "<answer>2</answer>", "<answer>2</answer>"]
    lengths = [100, 300, 100, 200]
    got = R.kimi_length_reward(texts, ["1"] * 4, group_size=4, completion_lengths=lengths)
    assert got == pytest.approx([0.5, -0.5, 0.0, 0.0])
    got = R.kimi_length_reward(texts, ["1"] * 4, group_size=2, completion_lengths=lengths)
    assert got == pytest.approx([0.5, -0.5, 0.0, -0.5])
    assert R.kimi_length_reward(texts, ["1"] * 4, group_size=4, completion_lengths=[7] * 4) == [0.0] * 4
    with pytest.raises(ValueError, match="groups"):
        R.kimi_length_reward(texts, ["1"] * 4, group_size=3)


def test_cosine_length_reward_table():
    """Paper constants: correct 2 → 1, wrong -10 → 0 over [0, L_max], -10 beyond; open-r1's preset clamps."""
    right, wrong = "<answer>1</answer>", "<answer>2</answer>"
    got = R.cosine_length_reward([right, right, right, wrong, wrong, wrong, right], ["1"] * 7, max_length=100,
                                 completion_lengths=[0, 50, 100, 0, 50, 100, 101])
    assert got == pytest.approx([2.0, 1.5, 1.0, -10.0, -5.0, 0.0, -10.0])
    got = R.cosine_length_reward([right, wrong, right], ["1"] * 3, completion_lengths=[0, 0, 5000], **R.COSINE_OPEN_R1)
    assert got == pytest.approx([1.0, -1.0, 0.5])


def test_soft_overlong_reward_boundaries():
    """DAPO: 0 up to L_max - L_cache inclusive, linear to -1 at L_max, -1 beyond; defaults 20480 and 4096."""
    got = R.soft_overlong_reward([""] * 6, completion_lengths=[0, 16384, 16385, 18432, 20480, 20481])
    assert got == pytest.approx([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0])
    assert R.soft_overlong_reward(["abcd", "abcdef", "abcdefgh"], max_length=8, cache_length=4) == [0.0, -0.5, -1.0]


class _WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_length_rewards_count_tokens_with_a_tokenizer():
    """With a tokenizer a length is its token count, otherwise the character count."""
    text = "one two three four five six"  # 6 tokens, 27 characters
    assert R.soft_overlong_reward([text], max_length=10, cache_length=4, tokenizer=_WordTokenizer()) == [0.0]
    assert R.soft_overlong_reward([text], max_length=10, cache_length=4) == [-1.0]


def test_repetition_penalty_table():
    """(1 - unique n-grams / n-grams)·p_max: no repeats 0, repeats toward p_max, fewer than n words 0."""
    got = R.repetition_penalty_reward(["a b c d e", "a b a b a b", "a b", ""], ngram_size=2, max_penalty=-1.0)
    assert got == pytest.approx([0.0, -(1 - 2 / 5), 0.0, 0.0])
    with pytest.raises(ValueError):
        R.repetition_penalty_reward(["x"], max_penalty=1.0)


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
    assert R.countdown_reward([f"<answer>{answer}</answer>"], [[3, 4, 5, 7]], [23]) == [expected]


def test_countdown_use_all_numbers_is_tinyzeros_rule():
    """By default a number may stay unused; with use_all_numbers (TinyZero's rule) every one must be used once."""
    texts = ["<answer>5*7-3*4</answer>", "<answer>5*7-3*4</answer>", "<answer>5*7-3*4*1</answer>"]
    numbers, targets = [[3, 4, 5, 7], [3, 4, 5, 7, 1], [3, 4, 5, 7, 1]], [23, 23, 23]
    assert R.countdown_reward(texts, numbers, targets) == [1.0, 1.0, 1.0]
    assert R.countdown_reward(texts, numbers, targets, use_all_numbers=True) == [1.0, 0.0, 1.0]


def test_countdown_division_is_exact():
    """Division is exact (Fractions): 7/2*4 hits 14; division by zero scores 0."""
    texts = ["<answer>7/2*4</answer>", "<answer>(7/2)*4+1</answer>", "<answer>7/(2-2)</answer>"]
    assert R.countdown_reward(texts, [[7, 2, 4], [7, 2, 4, 1], [7, 2, 2]], [14, 14, 1]) == [1.0, 0.0, 0.0]


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


@pytest.mark.parametrize("name", sorted(R.REWARDS))
def test_every_reward_survives_hostile_text(name):
    """Megabytes of garbage, deep or unbalanced nesting, repeated tags, NULs, odd Unicode: a number or None, fast."""
    n = len(HOSTILE)
    if name == "code" and PLAN is None:
        pytest.skip("no working code sandbox on this machine")
    columns = dict(answer=["31415"] * n, target_length=[100] * n, numbers=[[3, 4, 5]] * n, target=[12] * n,
                   tests=[["assert f(1) == 2"]] * n, timeout_s=1.0)
    start = time.monotonic()
    values = R.REWARDS[name](HOSTILE, **columns)
    assert time.monotonic() - start < 25
    assert len(values) == n
    assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in values)
    if name in ("accuracy", "countdown", "code"):
        assert not any(values)


# ------------------------------------------------------------------------------------------------ sandbox

def _sandbox_processes() -> list[str]:
    """Live processes of any sandbox uid."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive = open(f"/proc/{pid}/stat").read().rsplit(")")[-1][1] not in "ZX"
            if alive and R._UID_BASE <= os.stat(f"/proc/{pid}").st_uid < R._UID_BASE + (1 << 22) * R._UID_SLOTS:
                pids.append(pid)
        except OSError:
            pass
    return pids


@needs_sandbox
def test_code_reward_counts_passed_tests():
    """Correct code scores 1, half-correct 0.5 (0 all-or-nothing), fenced code is found, no tests give None."""
    tests = ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1", "assert f(-1) == 0"]
    good = "Here:\n```python\ndef f(x):\n    return x + 1\n```\n"
    half = "```python\ndef f(x):\n    return x + 1 if x > 0 else 7\n```"
    assert R.code_reward([good, half, "def f(x): return x+1", good], [tests, tests, tests, []]) == [1.0, 0.5, 1.0, None]
    assert R.code_reward([half], [tests], all_or_nothing=True) == [0.0]


@needs_sandbox
def test_sandbox_partial_credit_when_a_test_hangs():
    """Tests that passed before a hanging test still count, the rest fail, and the wall time is the timeout."""
    start = time.monotonic()
    tests = ["assert f(1) == 2", "while True: pass", "assert f(2) == 3"]
    assert R.code_reward(["def f(x): return x + 1"], [tests], timeout_s=1.0) == [pytest.approx(1 / 3)]
    assert time.monotonic() - start < 5


HOSTILE_PROGRAMS = {
    "infinite_loop": """
        while True:
            pass
        done = True""",
    "fork_bomb": """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        done = True""",
    "memory_bomb": """
        chunks = []
        while True:
            chunks.append(bytearray(50 << 20))
        done = True""",
    "print_gigabytes": """
        import sys
        for _ in range(2000):
            sys.stdout.write("x" * (1 << 20))
        done = True""",
    "forge_markers": """
        import os
        for fd in range(64):
            try:
                os.write(fd, b"0 0\\n" * 10)
            except OSError:
                pass
        done = False""",
    "patch_builtins": """
        import builtins
        builtins.exec = builtins.compile = lambda *args, **kwargs: None
        done = False""",
    "escape_the_session": """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        done = False""",
    "exit_early": """
        import os
        os._exit(0)
        done = True""",
}


@needs_sandbox
@pytest.mark.parametrize("name", sorted(HOSTILE_PROGRAMS))
def test_sandbox_contains_hostile_programs(name):
    """Loops, fork and memory bombs, output floods, forged markers, patched builtins: 0, bounded, nothing left."""
    start = time.monotonic()
    result = R.run_sandboxed(program(HOSTILE_PROGRAMS[name]), ["assert done"], timeout_s=2.0)
    assert result.passed == [False]
    assert time.monotonic() - start < 6
    assert len(result.output) <= 65536
    assert _sandbox_processes() == []


def _first_uid(queue):
    queue.put(R._FREE_UIDS.queue[0])


def test_sandbox_uids_are_disjoint_across_processes():
    """A forked process (like another torchrun rank) draws sandbox uids from a block of its own."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_first_uid, args=(queue,))
    child.start()
    assert abs(queue.get(timeout=30) - R._FREE_UIDS.queue[0]) >= R._UID_SLOTS
    child.join(10)


@needs_sandbox
def test_sandbox_cannot_kill_the_trainer():
    """Code that signals its parent and the training process by pid fails to; this test process lives on."""
    if not AS_ROOT and PLAN.unshare is None:
        pytest.skip("without root or namespaces the code runs as the trainer's user and could kill it")
    killer = program(f"""
        import os, signal
        os.kill(os.getppid(), signal.SIGKILL)
        try:
            os.kill({os.getpid()}, signal.SIGKILL)
            trainer_killed = True
        except OSError:
            trainer_killed = False""")
    assert R.code_reward([killer], [["assert trainer_killed"]]) == [0.0]
    assert R.code_reward(["x = 1"], [["assert x == 1"]]) == [1.0]


@needs_sandbox
def test_sandbox_hides_environment(monkeypatch):
    """A secret in the trainer's environment is neither inherited nor readable through /proc."""
    monkeypatch.setenv("RLVR_TEST_SECRET", "hunter2")
    snoop = program(f"""
        import os
        leaked = os.environ.get("RLVR_TEST_SECRET")
        try:
            via_proc = b"hunter2" in open("/proc/{os.getpid()}/environ", "rb").read()
        except OSError:
            via_proc = False""")
    result = R.run_sandboxed(snoop, ["assert leaked == 'hunter2'", "assert via_proc", "assert leaked is None"])
    assert result.passed[0] is False and result.passed[2] is True
    if AS_ROOT:
        assert result.passed[1] is False


@needs_sandbox
@pytest.mark.skipif(not AS_ROOT, reason="file protection needs root (to switch to an unprivileged uid)")
def test_sandbox_cannot_write_or_read_outside(tmp_path):
    """A file outside the sandbox keeps its content, a 0600 file stays unread, /tmp litter is removed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o666)
    fd, secret = tempfile.mkstemp(dir="/tmp")
    os.write(fd, b"top secret")
    os.close(fd)
    litter = f"/tmp/rlvr-litter-{os.getpid()}"
    try:
        write = f"open({str(victim)!r}, 'w').write('pwned')"
        read = f"assert open({secret!r}).read() == 'top secret'"
        assert R.code_reward([write, read], [[write], [read]]) == [0.0, 0.0]
        litter_code = f"import os\nopen({litter!r}, 'w').write('x')\nos.mkdir({litter + '.d'!r})"
        assert R.code_reward([litter_code], [["assert True"]]) == [1.0]  # /tmp is world-writable...
        assert not os.path.exists(litter) and not os.path.exists(litter + ".d")  # ...but swept afterwards
        assert victim.read_text() == "original"
    finally:
        os.unlink(secret)


@needs_sandbox
def test_sandbox_has_no_network():
    """A connection to a port this process listens on never arrives."""
    if PLAN.unshare is None:
        pytest.skip("no network namespace here (unshare unavailable): the sandbox keeps network access")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    connect = program(f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=1).sendall(b"hi")
            connected = True
        except OSError:
            connected = False""")
    try:
        assert R.code_reward([connect], [["assert connected"]]) == [0.0]
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@needs_sandbox
def test_sandbox_runs_in_a_fresh_directory_that_is_removed():
    """cwd, HOME and TMPDIR are one fresh directory, empty at the start and gone afterwards."""
    source = "import os\ncwd = os.getcwd()\nprint(cwd)\nopen('f', 'w').write('x')"
    tests = ["assert os.environ['HOME'] == cwd == os.environ['TMPDIR']", "assert os.listdir() == ['f']"]
    result = R.run_sandboxed(source, tests)
    assert result.passed == [True, True]
    assert not os.path.exists(result.output.strip())


ESCAPE = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG 0: clear the parent-death signal unshare --kill-child set
try:
    os.setsid()  # leave the process group the trainer kills
except OSError:
    pass
os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", {token!r}])
"""


def _kill_marked(token: str) -> list[int]:
    """SIGKILL the live processes whose command line holds token; their pids."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(int(pid), 9)
                found.append(int(pid))
        except OSError:
            pass
    return found


def _run_as_nobody(source: str) -> None:
    """Run source with a python as user nobody; skip where this process cannot switch users, nobody cannot import
    rlvr_rewards, or source prints SKIP."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as user nobody")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
        try:
            child = subprocess.run([python, "-c", f"import sys\nsys.path.insert(0, {repo!r})\n{source}"], cwd="/",
                                   capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]},
                                   user=65534, group=65534, extra_groups=[])
        except OSError:  # missing, or where nobody cannot reach it (pyenv under /root)
            continue
        if child.returncode == 0 and "SKIP" not in child.stdout:
            return
    pytest.skip("user nobody cannot import rlvr_rewards or has no sandbox with namespaces here")


@needs_sandbox
@pytest.mark.parametrize("user", ["this process", "nobody"])
def test_sandbox_kills_code_that_detaches_itself(user):
    """Code that clears its parent-death signal, leaves its session and execs is dead once the run returns, also
    not as root (there only killing the PID namespace's init reaches it)."""
    token = f"rlvr-escape-{os.getpid()}-{time.monotonic_ns()}"
    escape = ESCAPE.format(token=token)
    try:
        if user == "this process":
            R.run_sandboxed(escape, ["assert True"], timeout_s=1.0)
        else:
            _run_as_nobody("import rlvr_rewards as R\nplan = R._probe_sandbox()\n"
                           "if plan is None or plan.unshare is None:\n    print('SKIP')\n"
                           f"else:\n    R.run_sandboxed({escape!r}, ['assert True'], timeout_s=1.0)")
        time.sleep(0.2)
    finally:
        survivors = _kill_marked(token)
    assert survivors == []


@needs_sandbox
def test_sandbox_sets_no_new_privs():
    """The code runs with no-new-privs, so no setuid program it runs can raise its privileges."""
    source = "status = open('/proc/self/status').read()"
    assert R.run_sandboxed(source, ["assert 'NoNewPrivs:\\t1' in status"]).passed == [True]


@needs_sandbox
@pytest.mark.parametrize("namespaces", [True, False])
def test_sandbox_shared_memory_does_not_outlive_the_run(namespaces):
    """A System V shared-memory segment the code creates is gone once the run returns: it lived in the run's IPC
    namespace, or (as root without namespaces) the slot uid's segments were removed."""
    if namespaces and PLAN.unshare is None:
        pytest.skip("no namespaces here")
    if not namespaces and not AS_ROOT:
        pytest.skip("not as root and without namespaces the code shares the training user's System V IPC")
    plan = PLAN if namespaces else dataclasses.replace(PLAN, unshare=None, mount_proc=False)
    key = 0x5EED0000 + os.getpid() % 0xFFFF
    create = f"import ctypes\nshmid = ctypes.CDLL(None).shmget({key}, 1 << 20, 0o1000 | 0o600)  # IPC_CREAT"

    def segments():
        with open("/proc/sysvipc/shm") as table:
            return [row.split()[1] for row in table.read().splitlines()[1:] if int(row.split()[0]) == key]

    try:
        assert R._run(plan, create, ["assert shmid >= 0"]).passed == [True]
        assert segments() == []
    finally:
        for shmid in segments():
            subprocess.run(["ipcrm", "-m", shmid], check=False)


@needs_sandbox
def test_sandbox_has_its_own_proc_where_mounts_work():
    """With a mount namespace, /proc shows only the sandbox's own PID namespace: the trainer's pid is not there."""
    if not PLAN.mount_proc:
        pytest.skip("no mount namespace here: the sandbox sees the host's /proc")
    source = f"import os\nvisible = os.path.exists('/proc/{os.getpid()}')"
    assert R.run_sandboxed(source, ["assert not visible"]).passed == [True]


def test_sandbox_falls_back_where_its_uids_are_unmapped():
    """As "root" of a user namespace that maps only uid 0 (a rootless container), the probe picks a plan that runs
    as the training user, and code is scored, not zeroed."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or subprocess.run([unshare, "--map-root-user", "true"]).returncode:
        pytest.skip("needs root and unprivileged user namespaces")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = (f"import sys, warnings\nsys.path.insert(0, {repo!r})\nwarnings.simplefilter('ignore')\n"
              "import rlvr_rewards as R\n"
              "print(open('/proc/self/uid_map').read().split(), R._ids_mapped(), R._probe_sandbox().as_root,\n"
              "      R.code_reward(['def f(x):\\n    return x + 1'], [['assert f(1) == 2']]))")
    child = subprocess.run([unshare, "--map-root-user", sys.executable, "-c", source], capture_output=True,
                           text=True, timeout=60)
    assert child.stdout.strip() == "['0', '0', '1'] False False [1.0]", child.stderr[-2000:]


@needs_sandbox
def test_failed_probe_is_not_kept_and_code_reward_says_why(monkeypatch):
    """Where no plan works, code_reward raises a RuntimeError naming what was tried and why, rather than score 0;
    the failure is not cached, so once the sandbox works again code is scored."""
    def broken_run(*args, **kwargs):
        raise OSError("fork failed, say")

    run = R._run
    monkeypatch.setattr(R, "_PLAN", None)
    monkeypatch.setattr(R, "_run", broken_run)
    with pytest.raises(RuntimeError, match=r"no working code sandbox.*python.*fork failed, say"):
        R.code_reward(["x = 1"], [["assert x == 1"]])
    assert R.code_reward(["x = 1"], [None]) == [None]  # nothing to run: no error
    monkeypatch.setattr(R, "_run", run)
    assert R.code_reward(["x = 1"], [["assert x == 1"]]) == [1.0]
    assert R._PLAN is not None


# ------------------------------------------------------------------------------------------------ combining

def test_combine_rewards_weights_and_logs_each():
    """total = Σ weight·reward with None as 0; each reward is returned under its own name."""
    texts = ["<think>a</think><answer>1</answer>", "<answer>2</answer>"]
    rewards = [(R.accuracy_reward, 1.0), ("format", 0.5), (lambda completions, **kw: [None, 3.0], 2.0)]
    total, per_reward = R.combine_rewards(rewards, texts, answer=["1", "1"])
    assert total == [1.5, 6.0]
    assert per_reward == {"accuracy": [1.0, 0.0], "format": [1.0, 0.0], "<lambda>": [None, 3.0]}
    total, per_reward = R.combine_rewards({"format": 1.0, "format_reward": 2.0}, texts)
    assert total == [3.0, 0.0] and list(per_reward) == ["format", "format_1"]  # a repeated name gets a suffix


def test_load_reward_fn_from_module_and_file(tmp_path):
    """'module:function' and 'file.py:function' load; bad specs fail with a message that says what to fix."""
    path = tmp_path / "my_rewards.py"
    path.write_text("def shout(completions, **kw):\n    return [float(c.isupper()) for c in completions]\nvalue = 3\n")
    assert R.load_reward_fn(f"{path}:shout")(["A", "a"]) == [1.0, 0.0]
    assert R.get_reward("math:sqrt") is math.sqrt
    assert R.get_reward("accuracy_reward") is R.accuracy_reward is R.get_reward("accuracy")
    with pytest.raises(ValueError, match="module:function"):
        R.load_reward_fn("no_colon")
    with pytest.raises(ImportError, match="PYTHONPATH"):
        R.load_reward_fn("surely_not_a_module_xyz:f")
    with pytest.raises(AttributeError, match="nope"):
        R.load_reward_fn(f"{path}:nope")
    with pytest.raises(TypeError, match="not a function"):
        R.load_reward_fn(f"{path}:value")
    with pytest.raises(ValueError, match="unknown reward"):
        R.get_reward("accurasy")


def test_rewards_ignore_unknown_columns():
    """Every built-in accepts and ignores columns it does not use."""
    columns = dict(answer=["1"], target_length=[10], numbers=[[1]], target=[1], tests=[["assert True"]],
                   prompt=["p"], something_else=[object()])
    for name, fn in R.REWARDS.items():
        if name != "code" or PLAN is not None:
            assert len(fn(["<answer>1</answer>"], **columns)) == 1, name


# ------------------------------------------------------------------------------------------------ tasks

@pytest.mark.parametrize("name", ["arithmetic", "countdown", "code"])
def test_make_dataset_is_deterministic_and_splits_are_disjoint(name):
    """Same seed, same rows; another seed, other rows; train and test never share a prompt; no duplicates."""
    train = R.make_dataset(name, "train", n=300, seed=1)
    assert train == R.make_dataset(name, "train", n=300, seed=1)
    assert train != R.make_dataset(name, "train", n=300, seed=2)
    test = R.make_dataset(name, "test", n=300, seed=1)
    prompts = {row["prompt"] for row in train}
    assert len(prompts) == 300 and not prompts & {row["prompt"] for row in test}
    assert all(isinstance(row["answer"], str) and len(row["prompt"]) < 60 for row in train + test)
    assert R.make_dataset(name, "test", n=0) == []


def test_arithmetic_rows_are_consistent():
    """The answer is the last step's value and the prompt's value (with precedence); steps stay in range."""
    for row in R.make_dataset("arithmetic", "train", n=500):
        assert re.fullmatch(r"[1-9]([+\-*][1-9]){2,3}", row["prompt"])
        assert row["answer"] == row["steps"][-1].split("=")[1]
        assert R.evaluate_expression(row["prompt"]) == int(row["answer"]) == eval(row["prompt"])  # regex-checked
        assert all(-99 <= int(step.split("=")[1]) <= 999 for step in row["steps"])
    assert R.arithmetic_steps([7, 3, 4, 2], ["+", "*", "-"]) == ["3*4=12", "7+12=19", "19-2=17"]


def test_countdown_rows_are_solvable():
    """Each row's answer reaches its target with its numbers, and the prompt reads 'n1,n2,...->target'."""
    rows = R.make_dataset("countdown", "test", n=300)
    texts = [f"<answer>{row['answer']}</answer>" for row in rows]
    numbers, targets = [row["numbers"] for row in rows], [row["target"] for row in rows]
    assert R.countdown_reward(texts, numbers, targets) == [1.0] * len(rows)
    for row in rows:
        assert row["prompt"] == ",".join(map(str, row["numbers"])) + f"->{row['target']}"
        assert 3 <= len(row["numbers"]) <= 4 and all(1 <= n <= 20 for n in row["numbers"])


@needs_sandbox
def test_code_rows_reference_solutions_pass_their_tests():
    """The reference solutions of code rows pass all their tests in the sandbox; a wrong solution passes none."""
    rows = R.make_dataset("code", "train", n=16)
    assert R.code_reward([row["answer"] for row in rows], [row["tests"] for row in rows]) == [1.0] * 16
    assert R.code_reward(["def f(*args):\n    return None"] * 16, [row["tests"] for row in rows]) == [0.0] * 16
