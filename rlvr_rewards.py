"""Verifiable rewards for RL on reasoning (RLVR), and the built-in tasks they verify.

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
                         verdicts, hundreds of times faster); the rest go to math-verify worker processes with a
                         timeout per sample (a timeout counts as wrong).
  format_reward          R1 template <think>…</think><answer>…</answer>: 1 if it holds else 0. strict: exactly one
                         think block then one answer block, only whitespace around; soft: a think block
                         followed anywhere later by an answer block.
  tag_count_reward       0.25 for each of the four tags that appears exactly once.
  code_reward            the fraction of test statements that pass when run after the completion's code in the
                         sandbox below (1 or 0 with all_or_nothing=True).
  language_consistency   the share of the reasoning's words (think block, else the whole text) written in the
                         target language's script (DeepSeek-R1); None when there are no words.
  lcpo_exact_reward      r = 1[c] - α·|n_target - |y||                 α = 3e-4          (L1, LCPO-Exact)
  lcpo_max_reward        r = 1[c]·clip(α·(n_target - |y|) + δ, 0, 1)   α = 3e-4, δ = 0.5 (L1, LCPO-Max)
  kimi_length_reward     λ_i = 0.5 - (|y_i| - min_len)/(max_len - min_len) within each group of G samples;
                         correct → λ_i, wrong → min(0, λ_i); 0 when the group's lengths are all equal (Kimi k1.5)
  cosine_length_reward   CosFn(t, T, a, b) = a + ½(b - a)(1 + cos(πt/T)), t = |y|, T = max_length: correct from
                         2 at t=0 to 1 at T, wrong from -10 to 0, -10 past T (Demystifying Long CoT);
                         COSINE_OPEN_R1 holds open-r1's correct 1→0.5, wrong -1→-0.5, T = 1000 characters.
  soft_overlong_reward   0 if |y| ≤ L_max - L_cache; ((L_max - L_cache) - |y|)/L_cache in the buffer; -1 past
                         L_max (DAPO: L_max 20480, L_cache 4096 tokens).
  repetition_penalty     (1 - unique n-grams / n-grams)·p_max, p_max ≤ 0, over whitespace words; n = 3,
                         p_max = -1 (open-r1's recipe; Demystifying Long CoT used -0.05 per repeated token of
                         40-grams).
  countdown_reward       1 if the answer expression uses only the given numbers, each at most once (TinyZero:
                         exactly once; use_all_numbers=True), with + - * / and parentheses, and equals the target
                         exactly; else 0 (TinyZero: 0.1 for a wrong but well-formed one). Parsed with ast, never eval'd.
Lengths: the papers count tokens; here a length is characters unless `tokenizer=` is given (then its tokens)
or `completion_lengths=[...]` is (the trainer already knows its token counts: the cheapest choice).

combine_rewards([(fn, weight), ...], completions, **columns) sums weight·reward per sample, a None adding 0,
and returns each reward's values by name for logging. On the command line a user's own reward is named
`module:function` or `path/to/file.py:function` (load_reward_fn, get_reward), a built-in by its REWARDS key.

The code sandbox (run_sandboxed, code_reward). Each sample runs in its own process tree (Linux):
  - set by the harness before any model code runs: no-new-privs (a setuid program gains nothing), limits on CPU
    seconds, address space (memory_mb), processes (max_processes), file size (max_file_mb; output goes to a file,
    so a flood of prints stops there), open files, no core dumps; after the wall-clock timeout the whole tree is
    SIGKILLed;
  - `python -I -S` (standard library only), cwd = HOME = TMPDIR = a fresh temporary directory removed
    afterwards, an empty environment;
  - as root, the code runs under an unprivileged uid of its own (one per concurrent slot): it cannot write
    outside its directory and the world-writable ones, read others' 0600 files, or signal the trainer, and
    RLIMIT_NPROC is enforced (the kernel ignores it for root). Afterwards every process of that uid is killed,
    its System V IPC objects removed, and what it left at the top of /tmp, /var/tmp, /dev/shm and /run/lock
    deleted. Where those uids do not exist (root of a rootless container) it runs as below, with a warning;
  - with util-linux `unshare` (probed until one works): new network (no network, not even loopback), IPC
    (System V shared memory dies with the run) and PID namespaces, and a /proc of its own where a mount
    namespace works (the trainer is invisible); the trainer kills the namespace's init, and with it every
    process in the namespace, however it detached. Not as root, through an unprivileged user namespace where
    the kernel allows one (there the code is root of its namespace and could unmount its /proc);
  - test outcomes come back on a private pipe tagged with a per-run random nonce: printed "passed" lines count
    for nothing.
It cannot stop code from reading world-readable files, from filling its directory with many files up to the
size limit within the timeout, or from forging outcomes by inspecting the harness's memory (tests run in the
solution's interpreter); a crafted __eq__ fools `assert f(x) == y`. Not as root, the code can write wherever
the training user can; without unshare it also keeps the network and the host's System V IPC and, not as
root, can signal the trainer (a warning says which). For RL on untrusted code, train as root in a container or
VM. If root's Python lives where other users cannot enter (e.g. pyenv under /root), the sandbox runs a system
python3 instead.

Built-in tasks, make_dataset(name, split, n, seed); a problem is held out ("test") when the md5 of its
prompt is 0 mod 5, so the splits never share a problem:
  arithmetic  prompt "7+3*4-2" (3-4 operands 1..9, + - * with precedence), answer "17", steps ["3*4=12",
              "7+12=19", "19-2=17"] (the toy model's reasoning traces); checked by accuracy_reward.
  countdown   prompt "3,5,7->22" (the numbers, then the target), numbers, target, answer one solution;
              checked by countdown_reward.
  code        prompt "Write f(x) returning x+3.", answer a reference solution, tests (assert statements);
              checked by code_reward.
"""

import ast
import atexit
import collections
import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import itertools
import json
import marshal
import math
import os
import queue
import random
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

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


def _clean(answer: str) -> str:
    """Drop what never changes an answer: outer spaces, surrounding $…$, a sentence's final period."""
    return answer.strip().strip("$").strip().removesuffix(".").strip()


def _plain_number(text: str) -> tuple[Fraction, bool, bool] | None:
    """(value, written with a decimal point, has %) of an int, decimal, a/b or 1,000; None for anything else."""
    match = _NUMBER.fullmatch(text) if len(text) <= 40 else None  # short: no giant int conversions
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


def _numeric_verdict(pred: str, gold: str) -> bool | None:
    """Exact Fraction comparison of two plain numbers with math-verify's conventions (a percentage also matches
    its value/100); None, i.e. ask math-verify, where its 6-decimal rounding of decimals might decide."""
    p, g = _plain_number(pred), _plain_number(gold)
    if p is None or g is None:
        return None
    pred_values = {p[0], p[0] / 100} if p[2] else {p[0]}
    gold_values = {g[0], g[0] / 100} if g[2] else {g[0]}
    if pred_values & gold_values:
        return True
    if (p[1] or g[1]) and any(round(a, 6) == round(b, 6) for a in pred_values for b in gold_values):
        return None
    return False


# math-verify's own timeout is signal.alarm, which works only in a main thread, so its checks run in small
# persistent worker processes. Each arms its own timer around parse + verify (a timeout costs no restart); the
# parent kills a worker that has not answered after timeout + 1 s (stuck in C code, deaf to its timer).
_MATH_WORKER = r"""
import json, logging, resource, signal, sys
logging.disable(logging.WARNING)
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from math_verify import parse, verify
except Exception:
    print("x", flush=True)
    sys.exit()
class Timeout(BaseException): pass
def alarm(signum, frame): raise Timeout()
signal.signal(signal.SIGALRM, alarm)
def check(gold, pred):
    g, p = parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None)
    return "g" if not g else "u" if not p else "1" if verify(g, p, timeout_seconds=None) else "0"
print("ready", flush=True)
for line in sys.stdin:
    gold, pred, timeout_s = json.loads(line)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            verdict = check(gold, pred)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Timeout:
        verdict = "t"
    except Exception:
        verdict = "e"
    print(verdict, flush=True)
"""


class _MathWorker:
    """One math-verify process; check() answers one (gold, pred) pair. A worker that is stuck or dead is
    killed, and the next check starts a fresh one."""

    def __init__(self):
        self.proc = None

    def _read_line(self, timeout_s: float) -> str | None:
        ready = select.select([self.proc.stdout], [], [], timeout_s)[0]  # the worker writes whole lines
        return self.proc.stdout.readline().decode().strip() if ready else None

    def check(self, gold: str, pred: str, timeout_s: float) -> str:
        try:
            if self.proc is None:
                self.proc = subprocess.Popen([sys.executable, "-c", _MATH_WORKER], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
                if self._read_line(60.0) != "ready":  # importing sympy takes a moment, once
                    self.kill()
                    return "x"
            self.proc.stdin.write((json.dumps([gold, pred, timeout_s]) + "\n").encode())
            self.proc.stdin.flush()
            verdict = self._read_line(timeout_s + 1.0)
        except OSError:
            verdict = ""
        if not verdict:
            self.kill()
        return verdict or ("t" if verdict is None else "e")

    def kill(self):
        if self.proc is not None:
            for step in (self.proc.kill, self.proc.stdin.close, self.proc.stdout.close):
                with contextlib.suppress(OSError):
                    step()
            self.proc.wait()
            self.proc = None


def _new_math_workers():
    global _MATH_WORKERS, _MATH_LOCK  # a forked child must not share its parent's workers, pipes or lock
    _MATH_WORKERS, _MATH_LOCK = [_MathWorker() for _ in range(max(1, min(4, os.cpu_count() or 1)))], threading.Lock()


_new_math_workers()
os.register_at_fork(after_in_child=_new_math_workers)
atexit.register(lambda: [worker.kill() for worker in _MATH_WORKERS])


def _math_verify(pairs: list[tuple[str, str]], timeout_s: float) -> list[str]:
    """Verdicts: "1" equal, "0" not, "u" prediction unparseable, "g" gold unparseable, "t" timeout, "e" error,
    "x" no math-verify. Worker k takes pairs k, k + W, k + 2W, ... in its own thread; one batch at a time."""
    verdicts = [""] * len(pairs)

    def serve(k: int):
        for i in range(k, len(pairs), len(_MATH_WORKERS)):
            verdicts[i] = _MATH_WORKERS[k].check(*pairs[i], timeout_s)

    with _MATH_LOCK, ThreadPoolExecutor(len(_MATH_WORKERS)) as pool:
        list(pool.map(serve, range(min(len(_MATH_WORKERS), len(pairs)))))
    return verdicts


def _as_latex(answer: str) -> str:
    return answer if "\\boxed" in answer or "$" in answer else "\\boxed{" + answer + "}"  # math-verify's anchor


def _gold_text(gold) -> str | None:
    """The gold answer; a full GSM8K solution ("… #### 72") or a boxed one is reduced to its answer."""
    if gold is None:
        return None
    gold = str(gold)
    found = extract_answer(gold) if ("####" in gold or "\\boxed" in gold or "</answer>" in gold) else None
    return _clean(found or gold) or None


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
            fast = _numeric_verdict(pred, gold)
            verdicts.append(None if fast is None else "correct" if fast else "wrong")
            if fast is None:
                slow.append((len(verdicts) - 1, gold, pred))
    codes = _math_verify([(_as_latex(g), _as_latex(p)) for _, g, p in slow], timeout_s) if slow else []
    if "x" in codes:
        warnings.warn("math-verify is not importable: non-numeric answers are compared as text", RuntimeWarning)
    for (index, gold, pred), code in zip(slow, codes):
        if code in ("g", "x"):  # no maths to compare: the text itself decides
            code = "1" if " ".join(gold.split()) == " ".join(pred.split()) else "0"
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


def language_consistency_reward(completions: list[str], *, language="en", max_chars: int = 200_000,
                                **kwargs) -> list[float | None]:
    """DeepSeek-R1: the share of the reasoning's words written in the target language's script (en, zh, ja,
    ko, ru); `language` is one code or a column. None when there are no words or no language. Reads max_chars
    at most."""
    languages = language if isinstance(language, (list, tuple)) else [language] * len(completions)
    rewards = []
    for text, lang in zip(completions, languages):
        if lang is None:  # a row without a target language: the reward does not apply
            rewards.append(None)
            continue
        if lang not in _SCRIPTS:
            raise ValueError(f"language must be one of {sorted(_SCRIPTS)}, not {lang!r}")
        words = _WORD.findall(_reasoning(text)[:max_chars]) if isinstance(text, str) else []
        rewards.append(sum(bool(_SCRIPTS[lang].fullmatch(w)) for w in words) / len(words) if words else None)
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


def repetition_penalty_reward(completions: list[str], *, ngram_size: int = 3, max_penalty: float = -1.0,
                              **kwargs) -> list[float]:
    """(1 - unique n-grams / n-grams)·max_penalty over whitespace-separated words; 0 under n words."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be ≤ 0 (it is a penalty), not {max_penalty}")
    rewards = []
    for text in completions:
        words = text.split() if isinstance(text, str) else []
        ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
        rewards.append((1 - len(set(ngrams)) / len(ngrams)) * max_penalty if ngrams else 0.0)
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


# The harness runs inside the sandbox. It reads its job from stdin (nothing on disk or in argv), sets no-new-privs
# and lowers its limits before any model code runs, then runs the program and each test in one namespace, writing
# "nonce i" for each passing test to a pipe only the parent reads. Its default arguments bind exec, compile, ... at
# definition time, so a solution that patches builtins cannot make the tests vacuous.
_HARNESS = r"""
import marshal, os, resource, sys
def main(exec=exec, compile=compile, enumerate=enumerate, write=os.write, excepthook=sys.__excepthook__,
         exc_info=sys.exc_info, BaseException=BaseException):
    job = marshal.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    try:  # PR_SET_NO_NEW_PRIVS (38): no setuid program the code runs can raise its privileges; for good
        import ctypes
        ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
    except Exception:
        pass
    for name, value in job["limits"]:
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (AttributeError, ValueError, OSError):
            pass
    report, nonce, namespace = job["report_fd"], job["nonce"].encode(), {"__name__": "__main__"}
    def run(source, name):
        try:
            exec(compile(source, name, "exec", dont_inherit=True), namespace)
            return True
        except BaseException:
            try:
                excepthook(*exc_info())
            except BaseException:
                pass
            return False
    run(job["program"], "<solution>")
    for index, test in enumerate(job["tests"]):
        if run(test, "<test %d>" % index):
            write(report, b"%s %d\n" % (nonce, index))
main()
"""
# Unprivileged uids for the sandboxes, far from any real account: one per concurrent run, from a block of 64 that
# the trainer process's pid makes its own (torchrun ranks on one machine must not kill each other's sandboxes).
_UID_BASE, _UID_SLOTS = 1_500_000_000, 64


def _new_uid_pool():
    global _FREE_UIDS
    _FREE_UIDS = queue.Queue()
    for uid in range(_UID_BASE + os.getpid() * _UID_SLOTS, _UID_BASE + (os.getpid() + 1) * _UID_SLOTS):
        _FREE_UIDS.put(uid)


_new_uid_pool()
os.register_at_fork(after_in_child=_new_uid_pool)
_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")


@dataclass(frozen=True)
class _Plan:
    python: str  # an interpreter the sandbox's uid can run
    unshare: str | None  # util-linux unshare, when namespaces work here
    as_root: bool  # run the code under a per-slot unprivileged uid
    mount_proc: bool = False  # a /proc of the sandbox's own PID namespace (needs a mount namespace)

    def command(self, uid: int | None) -> list[str]:
        run = [self.python, "-I", "-S", "-c", _HARNESS]
        if self.unshare is None:
            return run
        namespaces = ["--net", "--pid", "--ipc", "--fork", "--kill-child"] + ["--mount-proc"] * self.mount_proc
        if self.as_root:
            return [self.unshare, *namespaces, f"--setgid={uid}", f"--setuid={uid}", "--", *run]
        return [self.unshare, "--map-root-user", *namespaces, "--", *run]


@dataclass
class SandboxResult:
    passed: list[bool]  # one per test
    output: str  # the first max_output_bytes of stdout and stderr
    timed_out: bool


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process of uid: the slot is ours alone, so that is exactly the sandbox's tree."""
    for _ in range(100):
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().rsplit(")")[-1][1] in "ZX":  # a zombie is dead already; its parent reaps it
                        continue
                alive.append(int(pid))
                os.kill(int(pid), signal.SIGKILL)
        if not alive:
            return
        time.sleep(0.002)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox. unshare's child is the init of the sandbox's PID namespace, and when it dies the kernel
    kills everything in the namespace, even code that left the session and cleared its parent-death signal (which
    the process-group kill and unshare --kill-child alone would miss). unshare is stopped first so that it cannot
    reap that child and free its pid while we read it."""
    with contextlib.suppress(OSError):
        os.kill(proc.pid, signal.SIGSTOP)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as children:
            for pid in children.read().split():
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _remove_ipc(uid: int) -> None:
    """Remove the System V shared memory, message queues and semaphores that uid created or owns: outside an IPC
    namespace they outlive their processes, holding memory no rlimit counts and passing data to the next sample."""
    libc = ctypes.CDLL(None)
    remove = {"shm": lambda id_: libc.shmctl(id_, 0, None), "msg": lambda id_: libc.msgctl(id_, 0, None),
              "sem": lambda id_: libc.semctl(id_, 0, 0)}  # 0 is IPC_RMID
    for kind, remove_one in remove.items():
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/sysvipc/{kind}") as table:
                header, *rows = table.read().splitlines()
            owner, creator = header.split().index("uid"), header.split().index("cuid")
            for fields in map(str.split, rows):
                if uid in (int(fields[owner]), int(fields[creator])):
                    remove_one(int(fields[1]))


def _sweep_files(uid: int, keep: str) -> None:
    """Delete what uid left at the top of the world-writable directories (whatever it made lies below)."""
    for directory in {*_SHARED_DIRS, tempfile.gettempdir()}:
        with contextlib.suppress(OSError):
            for entry in list(os.scandir(directory)):
                with contextlib.suppress(OSError):
                    if entry.path != keep and entry.stat(follow_symlinks=False).st_uid == uid:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """True if proc exits within timeout_s. A pidfd wakes us the moment it does; Popen.wait would poll."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            return proc.wait(timeout_s) is not None
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


def _run(plan: _Plan, program: str, tests: list[str], *, timeout_s: float = 3.0, memory_mb: int = 512,
         max_processes: int = 4, max_file_mb: int = 16, max_output_bytes: int = 65536) -> SandboxResult:
    nonce = secrets.token_hex(16)
    limits = [("RLIMIT_CPU", math.ceil(timeout_s)), ("RLIMIT_AS", memory_mb << 20), ("RLIMIT_NPROC", max_processes),
              ("RLIMIT_FSIZE", max_file_mb << 20), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)]
    uid = _FREE_UIDS.get() if plan.as_root else None
    try:
        with tempfile.TemporaryDirectory(prefix="rlvr-sandbox-", ignore_cleanup_errors=True) as tmp, \
                tempfile.TemporaryFile(dir=tmp) as output:  # nameless: the code cannot swap it for a FIFO
            if uid is not None:
                os.chown(tmp, uid, uid)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
            as_user = {"user": uid, "group": uid, "extra_groups": []} if uid and plan.unshare is None else {}
            (read_fd, write_fd), report = os.pipe(), b""
            try:
                try:
                    proc = subprocess.Popen(plan.command(uid), stdin=subprocess.PIPE, stdout=output, cwd=tmp, env=env,
                                            stderr=subprocess.STDOUT, pass_fds=(write_fd,), start_new_session=True,
                                            **as_user)
                finally:
                    os.close(write_fd)
                job = {"program": program, "tests": tests, "limits": limits, "report_fd": write_fd, "nonce": nonce}
                try:
                    with contextlib.suppress(OSError):  # the harness reads its job first thing, or has died
                        proc.stdin.write(marshal.dumps(job, 4))  # marshal: nothing to import in the child
                        proc.stdin.close()
                    timed_out = not _wait(proc, timeout_s)
                finally:  # the PID namespace or the session holds the tree; the uid sweep catches what left it
                    _kill_tree(proc)
                    if uid is not None:
                        _kill_uid(uid)
                        _remove_ipc(uid)
                os.set_blocking(read_fd, False)
                with contextlib.suppress(OSError):
                    report = os.read(read_fd, 1 << 20)
            finally:
                os.close(read_fd)
            passed = [False] * len(tests)
            for tag, _, index in (line.partition(b" ") for line in report.split(b"\n")):
                if tag == nonce.encode() and index.isdigit() and int(index) < len(tests):
                    passed[int(index)] = True
            output.seek(0)
            text = output.read(max_output_bytes).decode(errors="replace")
        if uid is not None:
            _sweep_files(uid, keep=tmp)
        return SandboxResult(passed, text, timed_out)
    finally:
        if uid is not None:
            _FREE_UIDS.put(uid)


def _ids_mapped() -> bool:
    """Whether every sandbox uid and gid exists here: not so in a user namespace with a short map, e.g. as "root"
    of a rootless container (uid_map "0 65534 1"), where switching to them fails."""
    low, high = _UID_BASE, _UID_BASE + (1 << 22) * _UID_SLOTS  # 2^22: one past the largest pid Linux hands out
    for name in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{name}") as id_map:
                extents = [tuple(map(int, line.split())) for line in id_map]
        except OSError:  # no user namespaces here: every id exists
            continue
        if not any(inside <= low and high <= inside + count for inside, _, count in extents):
            return False
    return True


_PLAN: _Plan | None = None  # the sandbox found by the probe; a failed probe is not kept, so the next call retries


def _probe_sandbox(failures: list[str] | None = None) -> _Plan | None:
    """The strongest isolation that works here, found once: under an unprivileged uid of its own where we are root
    and can switch to one, else as the training user; with namespaces (and its own /proc) where util-linux unshare
    works, else without; our interpreter, else (as root, where ours may sit in a directory the unprivileged uid
    cannot enter) a system python3. None if nothing works, each failed try described in `failures`."""
    global _PLAN
    if _PLAN is not None:
        return _PLAN
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    pythons = [sys.executable] + [path for path in ("/usr/bin/python3", "/usr/local/bin/python3")
                                  if root and os.path.exists(path) and path != sys.executable]
    unshare = shutil.which("unshare") if sys.platform.startswith("linux") else None
    namespaces = ([(unshare, True), (unshare, False)] if unshare else []) + [(None, False)]
    for as_root in ([True] if root and _ids_mapped() else []) + [False]:
        for (namespace, mount_proc), python in itertools.product(namespaces, pythons):
            plan = _Plan(python, namespace, as_root, mount_proc)
            try:
                result = _run(plan, "import collections, math, re", ["assert 1 + 1 == 2"], timeout_s=10)
                error = None if result.passed == [True] else (result.output.strip().splitlines() or ["no output"])[-1]
            except Exception as exception:
                error = repr(exception)
            if error is not None:
                if failures is not None:
                    failures.append(f"`{' '.join(plan.command(_UID_BASE)[:-2])}`: {error}")
                continue
            if root and not as_root:
                warnings.warn("the code sandbox cannot switch to an unprivileged uid here (the uids from "
                              f"{_UID_BASE} are not mapped in this user namespace, or setuid fails): code runs as "
                              "root and can write wherever root can", RuntimeWarning)
            if namespace is None:
                warnings.warn("the code sandbox has no namespaces here: code keeps network access"
                              + ("" if as_root else " and can signal the trainer"), RuntimeWarning)
            _PLAN = plan
            return plan
    return None


_PROBE_LOCK = threading.Lock()


def _sandbox_plan() -> _Plan:
    """The sandbox, or a RuntimeError that names every plan tried and why it failed."""
    failures = []
    with _PROBE_LOCK:
        plan = _probe_sandbox(failures)
    if plan is None:
        raise RuntimeError("no working code sandbox on this machine, so code cannot be scored (it would score 0); "
                           "tried " + "; ".join(failures))
    return plan


def run_sandboxed(program: str, tests: list[str] = (), *, timeout_s: float = 3.0, memory_mb: int = 512,
                  max_processes: int = 4, max_file_mb: int = 16, max_output_bytes: int = 65536) -> SandboxResult:
    """Run program, then each test statement, in the sandbox described at the top of this file. Raises only
    RuntimeError, where no sandbox works on this machine; a failure of one run scores its tests as failed."""
    tests = [str(test) for test in tests]
    plan = _sandbox_plan()
    try:
        return _run(plan, program if isinstance(program, str) else "", tests, timeout_s=timeout_s,
                    memory_mb=memory_mb, max_processes=max_processes, max_file_mb=max_file_mb,
                    max_output_bytes=max_output_bytes)
    except Exception as error:  # e.g. fork failing under load: the sample scores 0 and training goes on
        return SandboxResult([False] * len(tests), f"sandbox error: {error!r}", False)


def code_reward(completions: list[str], tests: list, *, all_or_nothing: bool = False, timeout_s: float = 3.0,
                max_workers: int | None = None, memory_mb: int = 512, **kwargs) -> list[float | None]:
    """The fraction of a row's tests (statements, usually asserts) that pass after the completion's code (1 or 0
    with all_or_nothing), max_workers samples at a time (default 4 per CPU, at most 32); None without tests.
    Raises RuntimeError where no sandbox works on this machine, rather than give every sample 0."""
    if any(tests):
        _sandbox_plan()  # fail here, once, with the reasons

    def score(text_and_tests):
        text, cases = text_and_tests
        cases = [cases] if isinstance(cases, str) else list(cases or [])
        if not cases:
            return None
        passed = run_sandboxed(extract_code(text), cases, timeout_s=timeout_s, memory_mb=memory_mb).passed
        return float(all(passed)) if all_or_nothing else sum(passed) / len(passed)

    workers = max_workers or min(32, 4 * (os.cpu_count() or 1))  # bound by process start-up latency, not CPU
    with ThreadPoolExecutor(max(1, min(workers, len(completions)))) as pool:
        return list(pool.map(score, zip(completions, tests)))


# ------------------------------------------------------------------------------------------------ combining

REWARDS = {
    "accuracy": accuracy_reward, "format": format_reward, "tag_count": tag_count_reward, "code": code_reward,
    "language_consistency": language_consistency_reward, "lcpo_exact": lcpo_exact_reward,
    "lcpo_max": lcpo_max_reward, "kimi_length": kimi_length_reward, "cosine_length": cosine_length_reward,
    "soft_overlong": soft_overlong_reward, "repetition_penalty": repetition_penalty_reward,
    "countdown": countdown_reward,
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


def combine_rewards(funcs_and_weights, completions: list[str], **columns):
    """total_i = Σ_k weight_k·reward_k(i), a None reward adding 0. funcs_and_weights: (reward, weight) pairs or
    a dict, a reward being a function, a built-in name or "module:function". Returns (total, {name: values})."""
    pairs = funcs_and_weights.items() if isinstance(funcs_and_weights, dict) else funcs_and_weights
    total, per_reward = [0.0] * len(completions), {}
    for reward, weight in pairs:
        fn = get_reward(reward) if isinstance(reward, str) else reward
        name = reward if isinstance(reward, str) else getattr(getattr(fn, "func", fn), "__name__", "reward")
        name = name.removesuffix("_reward") if fn in REWARDS.values() else name
        name = f"{name}_{len(per_reward)}" if name in per_reward else name
        values = list(fn(completions, **columns))
        if len(values) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        per_reward[name] = values
        total = [t + weight * float(v) if v is not None else t for t, v in zip(total, values)]
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


def _code_row(rng: random.Random, split: str | None = None) -> dict | None:
    prompt, body, kind = rng.choice(_CODE_TEMPLATES)
    fill = {"a": rng.randint(2, 60), "b": rng.randint(1, 60), "c": rng.choice("abcd")}
    if split is not None and _split_of(prompt.format(**fill)) != split:
        return None  # decided before the costlier part below
    argument, draw = _CODE_INPUTS[kind]
    solution, namespace = f"def f({argument}):\n    {body.format(**fill)}\n", {}
    exec(solution, namespace)  # our own template: this is how the expected values are made
    inputs = sorted({repr(draw(rng)) for _ in range(8)})[:4]
    tests = [f"assert f({x}) == {namespace['f'](ast.literal_eval(x))!r}" for x in inputs]
    return {"prompt": prompt.format(**fill), "answer": solution, "tests": tests}


def _split_of(prompt: str) -> str:
    """A stable hash of the problem text decides its split, so train and test never share a problem."""
    return "test" if int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 5 == 0 else "train"


def make_dataset(name: str, split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    """n distinct rows {prompt, answer, ...} of a built-in task ("arithmetic", "countdown", "code") from the
    split ("train" or "test", about 80% and 20% of all problems, by prompt hash); the same for the same seed."""
    makers = {"arithmetic": _arithmetic_row, "countdown": _countdown_row, "code": lambda rng: _code_row(rng, split)}
    if name not in makers or split not in ("train", "test"):
        raise ValueError(f"make_dataset takes a name in {sorted(makers)} and split 'train' or 'test', "
                         f"not {name!r}, {split!r}")
    rng, rows, seen = random.Random(f"{name}/{split}/{seed}"), [], set()
    for _ in range(200 * n + 10_000):
        if len(rows) >= n:
            return rows
        row = makers[name](rng)
        if row is not None and row["prompt"] not in seen and _split_of(row["prompt"]) == split:
            seen.add(row["prompt"])
            rows.append(row)
    raise ValueError(f"only {len(rows)} distinct {split} problems of {name!r} were found: ask for fewer")
